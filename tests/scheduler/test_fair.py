"""FairQueue: deficit round robin between tenants, deterministic (no threads, no clocks)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from gateway.engines.base import SamplingParams
from gateway.scheduler.fair import FairQueue


@dataclass(eq=False)
class Seq:
    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    tag: str = ""


def seq(tenant: str, tag: str = "", prompt: int = 20, max_tokens: int = 64, weight: float = 1.0) -> Seq:
    params = SamplingParams(max_tokens=max_tokens)
    params.tenant = tenant  # set as attributes so the test also runs before SamplingParams has them
    params.weight = weight
    return Seq(prompt=[1] * prompt, params=params, tag=tag)


def drain(q: FairQueue) -> list[Seq]:
    out = []
    while q:
        out.append(q.pop())
    return out


def test_one_tenant_is_fifo():
    q = FairQueue()
    items = [seq("a", str(i)) for i in range(10)]
    for s in items:
        q.push(s)
    assert len(q) == 10
    assert drain(q) == items
    with pytest.raises(IndexError):
        q.pop()


def test_late_tenant_is_served_within_a_bounded_number_of_pops():
    q = FairQueue()
    for i in range(32):
        q.push(seq("A", f"a{i}", prompt=100, max_tokens=256))
    for _ in range(3):
        q.pop()
    q.push(seq("B", "b0", prompt=100, max_tokens=256))
    q.push(seq("B", "b1", prompt=100, max_tokens=256))
    order = [s.tag for s in drain(q)]
    assert order.index("b0") <= 2, order  # at most two of A's backlog before B's first request
    assert order.index("b1") <= 5, order
    assert [t for t in order if t.startswith("a")] == [f"a{i}" for i in range(3, 32)]  # FIFO within a tenant


def test_fcfs_policy_keeps_arrival_order():
    q = FairQueue("fcfs")
    for i in range(32):
        q.push(seq("A", f"a{i}"))
    q.push(seq("B", "b0"))
    assert [s.tag for s in drain(q)][-1] == "b0"


def test_equal_tenants_alternate_and_costs_count():
    q = FairQueue(quantum=100)
    for i in range(6):
        q.push(seq("A", f"a{i}", prompt=50, max_tokens=50))  # cost 100
    for i in range(3):
        q.push(seq("B", f"b{i}", prompt=100, max_tokens=100))  # cost 200
    order = [s.tag for s in drain(q)]
    # By tokens, A gets two small items per B big item while both wait.
    first_six = order[:6]
    assert first_six.count("b0") + first_six.count("b1") == 2, order
    assert sorted(order) == sorted([f"a{i}" for i in range(6)] + [f"b{i}" for i in range(3)])


def test_weight_buys_a_larger_share():
    q = FairQueue(quantum=100)
    for i in range(40):
        q.push(seq("heavy", f"h{i}", prompt=50, max_tokens=50, weight=3.0))
        q.push(seq("light", f"l{i}", prompt=50, max_tokens=50, weight=1.0))
    first = [q.pop().tag[0] for _ in range(40)]
    assert 27 <= first.count("h") <= 33, first  # about 3:1


def test_huge_item_does_not_spin_and_is_served():
    q = FairQueue(quantum=1)
    q.push(seq("A", "big", prompt=10_000, max_tokens=4096))
    q.push(seq("B", "small"))
    assert {q.pop().tag, q.pop().tag} == {"big", "small"}


def test_remove_if_iter_peek_and_push_front():
    q = FairQueue()
    items = [seq("A" if i % 2 else "B", str(i)) for i in range(8)]
    for s in items:
        q.push(s)
    assert set(map(id, q)) == set(map(id, items))
    removed = q.remove_if(lambda s: int(s.tag) % 4 == 0)
    assert sorted(s.tag for s in removed) == ["0", "4"]
    assert len(q) == 6 and all(int(s.tag) % 4 for s in q)
    nxt = q.peek()
    assert q.pop() is nxt
    q.push_front(nxt)
    assert q.peek() is nxt and len(q) == 6
    assert q.remove_if(lambda s: True) and len(q) == 0 and not q
    q.push(seq("C", "c"))
    assert q.pop().tag == "c"


def test_default_policy_is_settable():
    from gateway.scheduler import fair

    try:
        fair.set_default_policy("fcfs")
        assert FairQueue().policy == "fcfs"
    finally:
        fair.set_default_policy("fair")
    assert FairQueue().policy == "fair"
    with pytest.raises(ValueError):
        fair.set_default_policy("random")
