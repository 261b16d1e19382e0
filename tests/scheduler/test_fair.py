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


# -- sharing batch slots: admission and preemption order (pure functions) --

from gateway.scheduler.fair import next_tenant, preemption  # noqa: E402


def test_free_slot_goes_to_the_tenant_with_the_fewest_running_per_weight():
    waiting = [("A", 1.0), ("B", 1.0), ("C", 1.0)]
    assert next_tenant({"A": 5, "B": 1, "C": 2}, waiting) == "B"
    assert next_tenant({"A": 5, "B": 1}, waiting) == "C"  # nothing running counts as 0
    # weight: B with weight 4 and 3 running is at (3 + 1) / 4 = 1, under A's (1 + 1) / 1 = 2
    assert next_tenant({"A": 1, "B": 3}, [("A", 1.0), ("B", 4.0)]) == "B"


def test_ties_go_to_the_tenant_served_least_recently_then_turn_order():
    waiting = [("A", 1.0), ("B", 1.0)]
    assert next_tenant({}, waiting) == "A"
    assert next_tenant({}, waiting, {"A": 7}) == "B"  # never served beats served
    assert next_tenant({}, waiting, {"A": 7, "B": 3}) == "B"
    assert next_tenant({}, waiting, {"A": 2, "B": 3}) == "A"


def test_newcomer_preempts_the_flooding_tenant_until_shares_are_equal():
    active = {"A": 8}
    weights = {"A": 1.0}
    moves = []
    for _ in range(20):  # B keeps requests waiting; each step moves at most the slot the rule allows
        move = preemption(active, {**weights, "B": 1.0}, [("A", 1.0), ("B", 1.0)])
        if move is None:
            break
        newcomer, victim = move
        moves.append(move)
        active[victim] -= 1
        active[newcomer] = active.get(newcomer, 0) + 1
    assert moves == [("B", "A")] * 4
    assert active == {"A": 4, "B": 4}
    # and A, now under no more than B, never takes a slot back
    assert preemption(active, {"A": 1.0, "B": 1.0}, [("A", 1.0), ("B", 1.0)]) is None


def test_no_ping_pong_with_one_slot_or_one_sequence_each():
    assert preemption({"A": 1}, {"A": 1.0}, [("B", 1.0)]) is None
    assert preemption({"A": 1, "B": 1}, {"A": 1.0, "B": 1.0}, [("A", 1.0), ("B", 1.0), ("C", 1.0)]) is None
    assert preemption({"A": 2}, {"A": 1.0}, [("B", 1.0)]) == ("B", "A")
    assert preemption({"A": 3}, {"A": 1.0}, [("A", 1.0)]) is None  # no one else waits
    assert preemption({"A": 3}, {"A": 1.0}, []) is None


def test_preemption_is_weighted_and_takes_from_the_most_over_share():
    # B (weight 1) may not take from A (weight 4) until A holds 4 x what B would hold
    assert preemption({"A": 4}, {"A": 4.0}, [("B", 1.0)]) is None
    assert preemption({"A": 5}, {"A": 4.0}, [("B", 1.0)]) == ("B", "A")
    # a heavy newcomer preempts sooner
    assert preemption({"A": 2, "B": 1}, {"A": 1.0, "B": 1.0}, [("C", 0.5)]) is None
    assert preemption({"A": 2, "B": 1}, {"A": 1.0, "B": 1.0}, [("C", 2.0)]) == ("C", "A")
    # the victim is the tenant with the most per weight
    assert preemption({"A": 3, "B": 5}, {"A": 1.0, "B": 1.0}, [("C", 1.0)]) == ("C", "B")
    assert preemption({"A": 3, "B": 5}, {"A": 1.0, "B": 2.0}, [("C", 1.0)]) == ("C", "A")


def test_requeue_pop_tenant_and_tenants():
    q = FairQueue()
    a = [seq("A", f"a{i}") for i in range(3)]
    b = [seq("B", f"b{i}", weight=2.0) for i in range(2)]
    for s in (*a, *b):
        q.push(s)
    assert q.tenants() == [("A", 1.0), ("B", 2.0)]
    assert q.pop_tenant("B").tag == "b0"
    paused = seq("A", "paused")
    q.requeue(paused)  # head of A's own queue, not ahead of B
    assert q.pop_tenant("A") is paused
    assert q.pop_tenant("A").tag == "a0"
    assert len(q) == 3
    assert sorted(s.tag for s in drain(q)) == ["a1", "a2", "b1"]
    assert q.tenants() == []
    q.requeue(seq("C", "c"))  # a tenant with nothing queued
    assert q.tenants() == [("C", 1.0)] and q.pop().tag == "c"


# -- the generation scheduler with the real SmolLM2 artifact: who runs when (orders only, no timings) --

import threading  # noqa: E402
import time  # noqa: E402

from gateway.engines.llm import LLMEngine  # noqa: E402
from gateway.engines.onnx_causal import OnnxCausalRunner  # noqa: E402
from gateway.scheduler import fair  # noqa: E402

LONG_TEXT = " ".join(f"Item {i} is a small grey stone found near the river bank." for i in range(40))


class GatedRunner:
    """The real runner, but each step waits while the gate is shut: the test queues a request at a known
    point of the batch's life, whatever the box's speed. `hold_at_decode = n` shuts the gate by itself
    just before the n-th decode step (and sets `held`), so that point is the same on every run."""

    def __init__(self, runner):
        self._runner = runner
        self.gate = threading.Event()
        self.gate.set()
        self.held = threading.Event()
        self.decodes = 0
        self.hold_at_decode = 0

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def prefill(self, seq_id, token_ids, all_logits=False):
        assert self.gate.wait(300), "gate left shut"
        return self._runner.prefill(seq_id, token_ids, all_logits=all_logits)

    def decode(self, seq_ids, token_ids):
        self.decodes += 1
        if self.decodes == self.hold_at_decode:
            self.gate.clear()
            self.held.set()
        assert self.gate.wait(300), "gate left shut"
        return self._runner.decode(seq_ids, token_ids)


class Recorder:
    """Every event of every sequence, in the order the scheduler thread emitted them."""

    def __init__(self):
        self.log: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def sink(self, name):
        def put(ev):
            with self.lock:
                self.log.append((name, ev))
        return put

    def index(self, name, final=False):
        with self.lock:
            for i, (n, ev) in enumerate(self.log):
                if n == name and (ev.finish_reason is not None if final else bool(ev.tokens or ev.finish_reason)):
                    return i
        return None

    def tokens(self, name):
        with self.lock:
            return sum(len(ev.tokens) for n, ev in self.log if n == name)


def wait_until(cond, what, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def make_engine(artifact, policy, max_num_seqs, max_batch_tokens=64):
    runner = GatedRunner(OnnxCausalRunner(artifact.path, capacity=max_num_seqs, max_seq_len=2048, threads=2))
    fair.set_default_policy(policy)
    try:
        eng = LLMEngine.from_dir(artifact.path, f"fair-{policy}", max_num_seqs=max_num_seqs,
                                 max_batch_tokens=max_batch_tokens, runner=runner)
    finally:
        fair.set_default_policy("fair")
    assert eng.scheduler._fair == (policy == "fair")
    return eng, runner


# The decode step at which B arrives (fixed, so every run pauses A at the same token). The resume rebuilds
# the KV as it was first computed (prefix-cache copy, prompt prefill, generated tokens replayed as decode
# steps): a prefill of generated tokens would round differently and flip near-ties (seen at 0.04 apart).
HOLD_AT = 6


def greedy(tenant, max_tokens):
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, tenant=tenant)


def prompt(eng, text):
    return eng.chat_prompt([{"role": "user", "content": text}])


def run_alone(eng, toks, max_tokens):
    done = threading.Event()
    s = eng.submit(toks, greedy("ref", max_tokens), lambda ev: ev.finish_reason and done.set())
    assert done.wait(300)
    return list(s.output)


def flood_then_newcomer(eng, runner, rec):
    """Key A fills both slots with 40-token greedy runs; at a fixed decode step, key B asks for 8 tokens."""
    pa1, pa2 = prompt(eng, "Tell me a long story about a lighthouse."), prompt(eng, "Count from one to fifty.")
    refs = run_alone(eng, pa1, 40), run_alone(eng, pa2, 40)
    runner.hold_at_decode = runner.decodes + HOLD_AT
    a = eng.scheduler.submit_many([(pa1, greedy("A", 40), rec.sink("a1")), (pa2, greedy("A", 40), rec.sink("a2"))])
    assert runner.held.wait(300), "the batch never reached the decode step"
    assert rec.tokens("a1") >= 2 and rec.tokens("a2") >= 2  # both of A's sequences are decoding
    b = eng.submit(prompt(eng, "Name a fruit."), greedy("B", 8), rec.sink("b"))
    runner.gate.set()
    wait_until(lambda: all(s.done for s in (*a, b)), "every sequence to finish")
    return a, b, refs


def test_newcomer_preempts_a_flood_and_the_paused_sequence_resumes_unchanged(chat_artifact):
    eng, runner = make_engine(chat_artifact, "fair", max_num_seqs=2)
    rec = Recorder()
    try:
        a, b, refs = flood_then_newcomer(eng, runner, rec)
        # B started without waiting for either of A's 40-token runs to end
        assert rec.index("b") < min(rec.index("a1", final=True), rec.index("a2", final=True)), rec.log
        assert eng.scheduler.preemptions == 1
        assert sorted(s.preempted for s in a) == [0, 1]
        # the paused sequence (and the other) produced exactly what an unpaused greedy run does
        assert [s.output for s in a] == list(refs)
        assert len(b.output) == 8
        assert eng.scheduler.stats() == {"waiting": 0, "prefilling": 0, "running": 0}
        assert len(runner._rows) == 0  # no KV row leaked by the pause
    finally:
        eng.close()


def test_fcfs_keeps_the_newcomer_waiting_for_a_slot(chat_artifact):
    eng, runner = make_engine(chat_artifact, "fcfs", max_num_seqs=2)
    rec = Recorder()
    try:
        a, b, refs = flood_then_newcomer(eng, runner, rec)
        assert rec.index("b") > min(rec.index("a1", final=True), rec.index("a2", final=True)), rec.log
        assert eng.scheduler.preemptions == 0 and [s.output for s in a] == list(refs)
    finally:
        eng.close()


def test_newcomers_prompt_is_not_queued_behind_a_floods_long_chunked_prompt(chat_artifact):
    eng, runner = make_engine(chat_artifact, "fair", max_num_seqs=3, max_batch_tokens=48)
    rec = Recorder()
    try:
        a1 = eng.submit(prompt(eng, "Hello there."), greedy("A", 60), rec.sink("a1"))
        wait_until(lambda: rec.tokens("a1") >= 1, "A's first sequence to decode")
        long = prompt(eng, LONG_TEXT)
        assert len(long) > 400  # about ten chunks of at most 47 tokens
        a2 = eng.submit(long, greedy("A", 4), rec.sink("a2"))
        wait_until(lambda: a2.prefilled > 0, "A's long prompt to start prefilling")
        runner.gate.clear()
        assert a2.prefilled < len(long) - 100
        b = eng.submit(prompt(eng, "Name a fruit."), greedy("B", 4), rec.sink("b"))
        runner.gate.set()
        wait_until(lambda: all(s.done for s in (a1, a2, b)), "every sequence to finish")
        assert rec.index("b") < rec.index("a2"), rec.log  # B's prompt went ahead of A's remaining chunks
        assert eng.scheduler.preemptions == 0  # a slot was free: nobody was paused
    finally:
        eng.close()
