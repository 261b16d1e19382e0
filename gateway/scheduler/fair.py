"""A waiting queue that shares admission fairly between tenants: deficit round robin on tokens.

Each tenant (an API key id; "" = anonymous) has its own FIFO. Tenants take turns; a turn grants
`quantum * weight` tokens of credit, and an item is admitted when its tenant's credit covers its cost
(prompt tokens + max_tokens for generation, input tokens for embeddings). A small quantum keeps turns
short, so a newcomer waits for about one item of each busy tenant, not a whole quantum's worth. So one key with 32 queued
streams cannot hold back another key's first request for more than about one item per turn.
With policy "fcfs" it is a plain FIFO (for comparison). Not thread-safe: the owner holds its lock.

Inside a continuous batch the scarce thing is a batch slot, held for a whole generation, so admission
order alone cannot keep a flood from holding every slot. `next_tenant` and `preemption` share the
slots themselves: a free slot goes to the waiting tenant with the fewest running sequences per unit of
weight, and when none is free, a waiting tenant that is under its weighted share takes one from the
tenant most over it (the scheduler pauses one of that tenant's sequences and resumes it later).
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

    def _queue_of(self, item: T) -> deque:
        tenant = self._key(item)[0] if self.policy == "fair" else ""
        q = self._queues.get(tenant)
        if q is None:
            q = self._queues[tenant] = deque()
            self._ring.append(tenant)
            self._deficit[tenant] = 0.0
        return q

    def push(self, item: T) -> None:
        self._queue_of(item).append(item)
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

    def requeue(self, item: T) -> None:
        """Put a paused (preempted) item back at the head of its own tenant's queue: it runs before that
        tenant's later items, but does not jump ahead of other tenants as push_front does."""
        self._queue_of(item).appendleft(item)
        self._len += 1

    def tenants(self) -> list[tuple[str, float]]:
        """(tenant, weight) of every tenant with queued items, in turn order (fair policy; fcfs: one "")."""
        out = {self._key(x)[0] if self.policy == "fair" else "": self._key(x)[1] for x in self._front}
        for tenant in self._ring:
            out.setdefault(tenant, self._key(self._queues[tenant][0])[1])
        return list(out.items())

    def pop_tenant(self, tenant: str) -> T:
        """The next item of one tenant (a peeked item first); that tenant's turn moves to the back."""
        for i, x in enumerate(self._front):
            if (self._key(x)[0] if self.policy == "fair" else "") == tenant:
                del self._front[i]
                self._len -= 1
                return x
        q = self._queues[tenant]
        item = q.popleft()
        self._len -= 1
        self._deficit[tenant] = max(0.0, self._deficit[tenant] - self._cost(item))
        if not q:
            self._drop(tenant)
        else:
            self._ring.remove(tenant)
            self._ring.append(tenant)
        return item

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


# -- sharing batch slots between tenants (the generation scheduler's admission and preemption) --

_EPS = 1e-9


def next_tenant(active: dict[str, int], waiting: list[tuple[str, float]],
                last_served: dict[str, int] | None = None) -> str:
    """The waiting tenant that gets a free slot: the fewest running sequences per unit of weight once it
    has one more; ties go to the tenant admitted least recently (`last_served`: a counter per tenant,
    absent = never), then to the earliest in `waiting`'s turn order."""
    last = last_served or {}
    best, best_key = waiting[0][0], (float("inf"), 0)
    for tenant, weight in waiting:
        load = (active.get(tenant, 0) + 1) / max(weight, 1e-3)
        key = (round(load / _EPS) * _EPS, last.get(tenant, -1))
        if key < best_key:
            best, best_key = tenant, key
    return best


def preemption(active: dict[str, int], weights: dict[str, float], waiting: list[tuple[str, float]],
               last_served: dict[str, int] | None = None) -> tuple[str, str] | None:
    """(newcomer, victim): with every slot taken, the waiting tenant `next_tenant` picks takes a slot from
    the running tenant with the most sequences per unit of weight, if that tenant would still hold at
    least as many per weight as the newcomer then does. That test makes the move one-way: the victim
    can never win the slot straight back (no ping-pong), and a tenant alone in the batch with one slot
    is never paused. None when no move is due."""
    if not waiting:
        return None
    newcomer = next_tenant(active, waiting, last_served)
    w_new = max(dict(waiting)[newcomer], 1e-3)
    after_new = (active.get(newcomer, 0) + 1) / w_new
    victim, most = None, -1.0
    for tenant, n in active.items():
        if tenant == newcomer or n <= 0:
            continue
        w = max(weights.get(tenant, 1.0), 1e-3)
        if (n - 1) / w >= after_new - _EPS and n / w > most:
            victim, most = tenant, n / w
    return None if victim is None else (newcomer, victim)
