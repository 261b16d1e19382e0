"""Failures stay where they belong: a sequence's own fault ends that sequence, a runner fault ends its
batch, and a dead scheduler thread ends everything with a clear error instead of a hang.

The real ONNX runner does the work; a thin wrapper injects runner faults where a test needs one."""

from __future__ import annotations

import logging
import queue
import threading
import time

import numpy as np
import pytest
from prometheus_client import REGISTRY

from gateway.engines.base import EngineUnavailable, SamplingParams
from gateway.engines.llm import LLMEngine
from gateway.engines.onnx_causal import OnnxCausalRunner

LONG = SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True)


class FaultyRunner:
    """The real runner; `decode` raises `fail_with` on the calls listed in `fail_at` (1-based)."""

    def __init__(self, runner, fail_at=(), fail_with=RuntimeError):
        self._runner = runner
        self.fail_at = set(fail_at)
        self.fail_with = fail_with
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def decode(self, seq_ids, token_ids):
        self.calls += 1
        if self.calls in self.fail_at:
            raise self.fail_with("injected runner fault")
        return self._runner.decode(seq_ids, token_ids)


def make_engine(path, name, runner_wrap=None, **opts):
    runner = OnnxCausalRunner(path, capacity=opts.get("max_num_seqs", 4), threads=2)
    if runner_wrap is not None:
        runner = runner_wrap(runner)
    return LLMEngine.from_dir(path, name, runner=runner, threads=2, **{"max_num_seqs": 4, **opts})


def prompt(engine, text="Count to one hundred."):
    return engine.chat_prompt([{"role": "user", "content": text}])


def final(events: queue.Queue, timeout=60.0):
    while True:
        ev = events.get(timeout=timeout)
        if ev.finish_reason:
            return ev


def submit(engine, params, text="Count to one hundred."):
    q: queue.Queue = queue.Queue()
    engine.submit(prompt(engine, text), params, q.put)
    return q


def metric(name, model):
    return REGISTRY.get_sample_value(name, {"model": model})


def test_a_runner_fault_fails_its_batch_and_the_engine_goes_on(chat_artifact):
    eng = make_engine(chat_artifact.path, "fault-batch", lambda r: FaultyRunner(r, fail_at={3}))
    try:
        ev = final(submit(eng, LONG))
        assert (ev.finish_reason, ev.error_code) == ("error", "engine_error")
        assert eng.ready
        ok = eng.chat([{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
        assert ok.finish_reason in ("stop", "length")
    finally:
        eng.close()


class Grammar:
    """A stand-in constraint: allows a fixed set of tokens; refuses or finishes where told."""

    def __init__(self, allowed, refuse_at=None, finish_at=None, raise_in_fill=False):
        self.allowed = list(allowed)
        self.refuse_at, self.finish_at, self.raise_in_fill = refuse_at, finish_at, raise_in_fill
        self.accepted: list[int] = []

    def fill_bitmask(self, bitmask, row):
        if self.raise_in_fill:
            raise ValueError("broken grammar")
        bitmask[row] = 0
        for t in self.allowed:
            bitmask[row, t // 32] |= np.int32(np.uint32(1 << (t % 32)).view(np.int32))

    def accept(self, token):
        if len(self.accepted) + 1 == self.refuse_at:
            return False
        self.accepted.append(token)
        return True

    def is_finished(self):
        return self.finish_at is not None and len(self.accepted) >= self.finish_at


def test_grammar_errors_end_only_their_own_sequence(chat_artifact):
    eng = make_engine(chat_artifact.path, "grammar")
    try:
        allowed = eng.tokenizer.encode(" yes no maybe", add_special_tokens=False)
        plain = submit(eng, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
        refused = submit(eng, SamplingParams(max_tokens=30, temperature=0, constraint=Grammar(allowed, refuse_at=3)))
        broken = submit(eng, SamplingParams(max_tokens=30, constraint=Grammar(allowed, raise_in_fill=True)))
        g = Grammar(allowed, finish_at=5)
        finished = submit(eng, SamplingParams(max_tokens=30, temperature=0.8, seed=1, constraint=g))
        ev = final(refused)
        assert (ev.finish_reason, ev.error_code, ev.completion_tokens) == ("error", "grammar_error", 2)
        ev = final(broken)
        assert (ev.finish_reason, ev.error_code) == ("error", "grammar_error")
        evs = [finished.get(timeout=60)]
        while not evs[-1].finish_reason:
            evs.append(finished.get(timeout=60))
        assert evs[-1].finish_reason == "stop" and evs[-1].completion_tokens == 5
        tokens = [t for e in evs for t in e.tokens]
        assert tokens == g.accepted and set(tokens) <= set(allowed)  # the mask held every step
        ev = final(plain)
        assert (ev.finish_reason, ev.completion_tokens) == ("length", 30)
    finally:
        eng.close()


def test_a_failing_consumer_cancels_only_its_own_sequence(chat_artifact):
    eng = make_engine(chat_artifact.path, "bad-sink")
    try:
        def sink(ev):
            raise RuntimeError("event loop is closed")

        eng.submit(prompt(eng), LONG, sink)
        ok = eng.chat([{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0)
        assert ok.finish_reason in ("stop", "length")
        deadline = time.monotonic() + 60
        while eng.scheduler.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        assert eng.scheduler.busy == 0 and eng.ready
    finally:
        eng.close()


def test_a_dead_thread_ends_every_sequence_and_refuses_new_ones(chat_artifact, caplog):
    gate = threading.Event()

    class Dies(FaultyRunner):
        def decode(self, seq_ids, token_ids):
            gate.wait(60)  # both sequences are in (one running, one queued) before it dies
            raise KeyboardInterrupt("a fault no step handler catches")

    eng = make_engine(chat_artifact.path, "dies", lambda r: Dies(r), max_num_seqs=1)
    failures = metric("fmgate_engine_failures_total", "dies") or 0
    try:
        running, waiting = submit(eng, LONG), submit(eng, LONG)
        with caplog.at_level(logging.ERROR, logger="fmgate.scheduler"):
            gate.set()
            for q in (running, waiting):
                ev = final(q)
                assert (ev.finish_reason, ev.error_code) == ("error", "engine_failed")
        assert not eng.ready
        assert any(r.levelno == logging.ERROR and "died" in r.getMessage() for r in caplog.records)
        assert metric("fmgate_engine_failures_total", "dies") == failures + 1
        assert metric("fmgate_engine_up", "dies") == 0
        with pytest.raises(EngineUnavailable):
            eng.submit(prompt(eng), LONG, lambda ev: None)
        with pytest.raises(EngineUnavailable):
            eng.chat([{"role": "user", "content": "Hi"}], max_tokens=4)
    finally:
        eng.close()


def test_a_runner_that_keeps_failing_is_declared_dead(chat_artifact):
    eng = make_engine(chat_artifact.path, "keeps-failing", lambda r: FaultyRunner(r, fail_at=range(1, 100)))
    try:
        for _ in range(3):
            try:
                ev = final(submit(eng, LONG))
            except EngineUnavailable:
                break
            assert ev.finish_reason == "error"
        assert not eng.ready
        with pytest.raises(EngineUnavailable):
            eng.submit(prompt(eng), LONG, lambda ev: None)
    finally:
        eng.close()


def test_deadlines_end_running_and_queued_sequences(chat_artifact):
    eng = make_engine(chat_artifact.path, "deadline", max_num_seqs=1)
    try:
        params = SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True, deadline=time.monotonic() + 3600)
        running = submit(eng, params)
        running.get(timeout=60)  # it holds the only slot and is decoding
        queued = submit(eng, SamplingParams(max_tokens=4, deadline=time.monotonic()))  # already due
        ev = final(queued)
        assert (ev.finish_reason, ev.error_code, ev.completion_tokens) == ("error", "deadline_exceeded", 0)
        assert "deadline" in ev.error
        params.deadline = time.monotonic()  # now the running one is due too
        ev = final(running)
        assert (ev.finish_reason, ev.error_code) == ("error", "deadline_exceeded")
        assert 0 < ev.completion_tokens < 1500
        assert eng.chat([{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0).finish_reason
    finally:
        eng.close()


def test_decode_sizes_the_kv_buffer_for_rows_mid_prefill(chat_artifact):
    """A row mid-prefill that fills the buffer exactly rides along in a decode step (its token lands one
    past its length). The buffer must grow for it; the decoding row's logits must not change. The reference
    decodes beside a short neighbour, as a lone row may take another kernel path (tests/scheduler/_neighbour)."""
    runner = OnnxCausalRunner(chat_artifact.path, capacity=4, threads=2, prefix_cache_blocks=0)
    ref = OnnxCausalRunner(chat_artifact.path, capacity=4, threads=2, prefix_cache_blocks=0)
    long = np.random.default_rng(0).integers(100, 5000, runner._buf_len).tolist()
    runner.prefill(1, long)  # row 0: exactly the buffer's length, more prompt to come
    runner.prefill(2, [1, 200, 300, 400])  # row 1: decoding
    ref.prefill(3, [1, 5, 6])  # row 0: a short neighbour that rides along
    ref.prefill(2, [1, 200, 300, 400])
    assert np.array_equal(runner.decode([2], [500]), ref.decode([2], [500]))
    runner.prefill(1, [7, 8, 9])  # the rest of the long prompt; its KV was not disturbed
    ref.prefill(1, [*long, 7, 8, 9])
    assert np.array_equal(runner.decode([1, 2], [10, 11]), ref.decode([1, 2], [10, 11]))


def test_runner_release_runs_outside_the_lock_that_submit_and_cancel_take(chat_artifact):
    """Release (and the KV resizing it may do) must not hold up submit/cancel from other threads. While
    the runner releases a cancelled sequence, another thread tries the scheduler's lock."""
    free: list[bool] = []

    class Probe(FaultyRunner):
        def release(self, seq_id):
            def probe():
                ok = eng.scheduler._cv.acquire(timeout=10)  # held by the releasing thread: 10 s, then False
                if ok:
                    eng.scheduler._cv.release()
                free.append(ok)

            t = threading.Thread(target=probe)
            t.start()
            t.join()
            return self._runner.release(seq_id)

    eng = make_engine(chat_artifact.path, "release-lock", lambda r: Probe(r))
    try:
        q: queue.Queue = queue.Queue()
        seq = eng.submit(prompt(eng), LONG, q.put)
        q.get(timeout=60)
        eng.cancel(seq)
        assert final(q).finish_reason == "abort"
        assert free == [True]
    finally:
        eng.close()
