"""A waiting queue that shares admission fairly between tenants: deficit round robin on tokens.

Each tenant (an API key id; "" = anonymous) has its own FIFO. Tenants take turns; a turn grants
`quantum * weight` tokens of credit, and an item is admitted when its tenant's credit covers its cost
(prompt tokens + max_tokens for generation, input tokens for embeddings). A small quantum keeps turns
short, so a newcomer waits for about one item of each busy tenant, not a whole quantum's worth. So one key with 32 queued
streams cannot hold back another key's first request for more than about one item per turn.
With policy "fcfs" it is a plain FIFO (for comparison). Not thread-safe: the owner holds its lock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def default_cost(item: Any) -> int:
    """Generation sequences: prompt tokens + max_tokens."""
    return len(item.prompt) + item.params.max_tokens


def default_key(item: Any) -> tuple[str, float]:
    """(tenant, weight) from the item's SamplingParams."""
    params = item.params
    return getattr(params, "tenant", "") or "", float(getattr(params, "weight", 1.0) or 1.0)


_default_policy = "fair"


def set_default_policy(policy: str) -> None:
    """The policy of queues made without one (the process's FMGATE_FAIRNESS; the registry sets it)."""
    global _default_policy
    if policy not in ("fair", "fcfs"):
        raise ValueError(f"unknown fairness policy {policy!r} (fair or fcfs)")
    _default_policy = policy


class FairQueue(Generic[T]):
    def __init__(self, policy: str | None = None, *, quantum: int = 64,
                 cost: Callable[[T], int] = default_cost, key: Callable[[T], tuple[str, float]] = default_key):
        policy = policy or _default_policy
        if policy not in ("fair", "fcfs"):
            raise ValueError(f"unknown fairness policy {policy!r} (fair or fcfs)")
        self.policy = policy
        self.quantum = quantum
        self._cost = cost
        self._key = key
        self._front: deque[T] = deque()  # pushed back to the front, or peeked: served next, in order
        self._queues: dict[str, deque[T]] = {}
        self._ring: deque[str] = deque()  # tenants with queued items, in turn order
        self._deficit: dict[str, float] = {}
        self._len = 0

    def push(self, item: T) -> None:
        tenant = self._key(item)[0] if self.policy == "fair" else ""
        q = self._queues.get(tenant)
        if q is None:
            q = self._queues[tenant] = deque()
            self._ring.append(tenant)
            self._deficit[tenant] = 0.0
        q.append(item)
        self._len += 1

    append = push  # deque-compatible

    def push_front(self, item: T) -> None:
        """Put an item back to be served next (e.g. a preempted sequence)."""
        self._front.appendleft(item)
        self._len += 1

    appendleft = push_front

    def peek(self) -> T:
        """The item pop() will return next."""
        if not self._front:
            self._front.append(self._take())
        return self._front[0]

    def pop(self) -> T:
        if self._front:
            self._len -= 1
            return self._front.popleft()
        item = self._take()
        self._len -= 1
        return item

    popleft = pop

    def _take(self) -> T:
        """Choose the next item by deficit round robin (without changing _len)."""
        if not self._ring:
            raise IndexError("pop from an empty FairQueue")
        if len(self._ring) == 1:  # alone: no one to be fair to, and no credit to bank
            tenant = self._ring[0]
            q = self._queues[tenant]
            item = q.popleft()
            if not q:
                self._drop(tenant)
            return item
        while True:
            # Skip whole rounds in which no tenant could pay, so a big item costs no busy loop.
            rounds = min(self._rounds_needed(t) for t in self._ring)
            if rounds > 0:
                for t in self._ring:
                    self._deficit[t] += rounds * self._quantum(t)
            tenant = self._ring[0]
            q = self._queues[tenant]
            cost = self._cost(q[0])
            if self._deficit[tenant] >= cost:
                item = q.popleft()
                self._deficit[tenant] -= cost
                if not q:
                    self._drop(tenant)
                return item
            # This tenant's turn is over: fresh credit, and it goes to the back.
            self._deficit[tenant] += self._quantum(tenant)
            self._ring.rotate(-1)

    def _quantum(self, tenant: str) -> float:
        weight = self._key(self._queues[tenant][0])[1]
        return self.quantum * max(weight, 1e-3)

    def _rounds_needed(self, tenant: str) -> int:
        short = self._cost(self._queues[tenant][0]) - self._deficit[tenant]
        return 0 if short <= 0 else int(short // self._quantum(tenant))

    def _drop(self, tenant: str) -> None:
        del self._queues[tenant]
        del self._deficit[tenant]  # credit is not banked while idle
        self._ring.remove(tenant)

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[T]:
        yield from self._front
        for tenant in self._ring:
            yield from self._queues[tenant]

    def remove_if(self, pred: Callable[[T], bool]) -> list[T]:
        """Remove (and return) every queued item for which pred is true, e.g. cancelled ones."""
        removed = [x for x in self._front if pred(x)]
        self._front = deque(x for x in self._front if not pred(x))
        for tenant in list(self._ring):
            q = self._queues[tenant]
            gone = [x for x in q if pred(x)]
            if gone:
                removed.extend(gone)
                q = self._queues[tenant] = deque(x for x in q if not pred(x))
                if not q:
                    self._drop(tenant)
        self._len -= len(removed)
        return removed
