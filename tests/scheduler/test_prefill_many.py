"""Batched prefill (`prefill_many`): several new prompts in one right-padded forward give the logits and the
greedy outputs that prefilling them one by one gives, on both runners, with tiny random-weight models."""

from __future__ import annotations

import contextlib
import io
import queue

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from gateway.engines.base import EngineError, SamplingParams, padded_runs
from gateway.engines.onnx_causal import OnnxCausalRunner
from gateway.engines.torch_llama import TorchCausalRunner
from gateway.scheduler.generation import GenerationScheduler
from tests.gpu.conftest import make_llama

LENGTHS = (6, 9, 12, 7, 10, 8)  # padded to 12: 20 pad tokens for 6 rows, inside padded_runs' slack


def prompts(lengths=LENGTHS, seed=0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(1, 500, size=n)] for n in lengths]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("prefill-many") / "llama")


@pytest.fixture(scope="module", params=["fp32", "int8"])
def tiny_onnx(request, tiny_hf, tmp_path_factory):
    """The served graph: onnxruntime-genai's builder (GroupQueryAttention), as model_store's recipes call it."""
    from onnxruntime_genai.models import builder

    out = tmp_path_factory.mktemp(f"prefill-many-{request.param}")
    opts = {"shared_embeddings": "false", "hf_token": "false"}
    if request.param == "int8":
        opts |= {"block_size": "32", "accuracy_level": "4"}
    with contextlib.redirect_stdout(io.StringIO()):
        extra = builder.parse_extra_options(None, str(tiny_hf), str(out), request.param, "cpu", str(out / "cache"),
                                            [f"{k}={v}" for k, v in opts.items()])
        builder.create_model(None, str(tiny_hf), str(out), request.param, "cpu", str(out / "cache"), **extra)
    return out


def onnx_runner(path, capacity=8) -> OnnxCausalRunner:
    return OnnxCausalRunner(path, capacity=capacity, max_seq_len=256, threads=2, prefix_cache_blocks=0)


def torch_runner(path, capacity=8, graphs=None) -> TorchCausalRunner:
    return TorchCausalRunner(path, capacity=capacity, max_seq_len=256, device="cpu", dtype=torch.float32,
                             graphs=graphs)


def count_passes(runner: OnnxCausalRunner) -> list[tuple[int, int]]:
    """Record (rows, tokens per row) of every forward the ONNX runner makes."""
    passes: list[tuple[int, int]] = []
    run = runner._run

    def counted(lo, hi, ids, *args, **kw):
        passes.append(ids.shape)
        return run(lo, hi, ids, *args, **kw)

    runner._run = counted
    return passes


def as_np(x) -> np.ndarray:
    return x.float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def test_padded_runs_split_on_padding_and_on_joins():
    assert padded_runs([0, 1, 2], [4, 4, 4]) == [[0, 1, 2]]
    assert padded_runs([0, 1, 2], [2, 2, 40]) == [[0, 1], [2]]  # 76 pads for 3 rows
    assert padded_runs([0, 1], [1, 40]) == [[0], [1]]
    assert padded_runs([0, 1], [1, 40], waste=2.0) == [[0, 1]]  # 80 <= 2 x 41
    assert padded_runs([1, 0, 2], [10, 12, 9]) == [[1, 0, 2]]
    assert padded_runs([0, 1, 2, 3], [5] * 4, joins=lambda run, i: i != 2) == [[0, 1], [2, 3]]


def test_onnx_batch_equals_one_by_one(tiny_onnx):
    alone, together = onnx_runner(tiny_onnx), onnx_runner(tiny_onnx)
    passes = count_passes(together)
    first = prompts()
    ids = list(range(len(first)))
    want = [as_np(alone.prefill(i, p)) for i, p in enumerate(first)]
    got = together.prefill_many(ids, first)
    assert passes == [(len(first), max(LENGTHS))]  # one forward for the whole burst
    assert got.shape == (len(first), alone.vocab_size)
    np.testing.assert_allclose(got, np.stack(want), rtol=0, atol=1e-5)

    # Later chunks: rows with a past run one by one (onnxruntime's GQA takes batch 1 there), same logits.
    more = prompts((3, 5, 2, 4, 1, 6), seed=1)
    want = [as_np(alone.prefill(i, p)) for i, p in enumerate(more)]
    passes.clear()
    np.testing.assert_allclose(together.prefill_many(ids, more), np.stack(want), rtol=0, atol=1e-5)
    assert len(passes) == len(more)

    # The pads' K/V past each row's length are overwritten before they are read: decode agrees.
    tokens = [3, 1, 4, 1, 5, 9]
    np.testing.assert_allclose(together.decode(ids, tokens), alone.decode(ids, tokens), rtol=0, atol=1e-5)

    # New rows join next to a row with a past: that one alone, the new ones together.
    for r in (alone, together):
        r.release(5)
    new = prompts((7, 11), seed=2)
    want = [as_np(alone.prefill(4, [8, 8])), *(as_np(alone.prefill(10 + i, p)) for i, p in enumerate(new))]
    passes.clear()
    got = together.prefill_many([4, 10, 11], [[8, 8], *new])
    assert passes == [(1, 2), (2, 11)]
    np.testing.assert_allclose(got, np.stack(want), rtol=0, atol=1e-5)
    assert [together.length(s) for s in (4, 10, 11)] == [alone.length(s) for s in (4, 10, 11)]


@pytest.mark.parametrize("graphs", [None, "emulate"])
def test_torch_batch_equals_one_by_one(tiny_hf, graphs):
    alone, together = torch_runner(tiny_hf, graphs=graphs), torch_runner(tiny_hf, graphs=graphs)
    first = prompts()
    ids = list(range(len(first)))
    want = torch.stack([alone.prefill(i, p).reshape(-1).clone() for i, p in enumerate(first)])
    got = together.prefill_many(ids, first)
    assert together.stats["prefill_many"] == 1
    assert together.stats["prefill_graph"] + together.stats["prefill_eager"] == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    more = prompts((3, 5, 2, 4, 1, 6), seed=1)  # later chunks of the same rows batch too
    want = torch.stack([alone.prefill(i, p).reshape(-1).clone() for i, p in enumerate(more)])
    torch.testing.assert_close(together.prefill_many(ids, more), want, rtol=1e-5, atol=1e-5)
    tokens = [3, 1, 4, 1, 5, 9]
    torch.testing.assert_close(together.decode(ids, tokens), alone.decode(ids, tokens), rtol=1e-5, atol=1e-5)
    assert [together.length(s) for s in ids] == [alone.length(s) for s in ids]


def check_bad_chunks(r) -> None:
    r.prefill(0, [1, 2, 3])
    for ids, chunks in (([1, 2], [[5, 6], list(range(1, 300))]),  # over the context
                        ([1, 2], [[5, 6], []]),  # empty
                        ([1, 2, 3, 4], [[5]] * 4),  # more new sequences than free rows
                        ([1, 1], [[5], [6]])):  # the same sequence twice
        with pytest.raises(EngineError):
            r.prefill_many(ids, chunks)
        assert r.length(0) == 3
        for s in ids:
            with pytest.raises(KeyError):
                r.length(s)


def test_onnx_bad_chunk_fails_the_call_before_anything_runs(tiny_onnx):
    check_bad_chunks(onnx_runner(tiny_onnx, 4))


def test_torch_bad_chunk_fails_the_call_before_anything_runs(tiny_hf):
    check_bad_chunks(torch_runner(tiny_hf, 4))


# -- through the scheduler --


def make_scheduler(runner, tiny_hf) -> GenerationScheduler:
    tok = Tokenizer.from_file(str(tiny_hf / "tokenizer.json"))
    return GenerationScheduler(runner, tok, [0], name="prefill-many", max_num_seqs=8, max_batch_tokens=256)


def run_all(sched: GenerationScheduler, batch: list[list[int]], max_tokens=8) -> list[tuple]:
    """Submit the prompts at once (one admission); each one's (tokens, finish_reason, error_code)."""
    events = [queue.Queue() for _ in batch]
    sched.submit_many([(p, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), q.put)
                       for p, q in zip(batch, events, strict=True)])
    out = []
    for q in events:
        tokens = []
        while True:
            ev = q.get(timeout=120)
            tokens += ev.tokens
            if ev.finish_reason:
                out.append((tokens, ev.finish_reason, ev.error_code))
                break
    return out


def test_onnx_burst_through_the_scheduler_is_one_forward_and_equals_one_by_one(tiny_onnx, tiny_hf):
    runner = onnx_runner(tiny_onnx)
    passes = count_passes(runner)
    sched = make_scheduler(runner, tiny_hf)
    try:
        batch = prompts()
        alone = [run_all(sched, [p])[0] for p in batch]
        passes.clear()
        together = run_all(sched, batch)
        assert together == alone
        assert all(r == (r[0], "length", None) and len(r[0]) == 8 for r in together)
        assert [p for p in passes if p[1] > 1] == [(len(batch), max(LENGTHS))]  # one prefill forward
        assert not runner._rows
    finally:
        sched.shutdown()


def test_torch_burst_through_the_scheduler_is_one_forward_and_equals_one_by_one(tiny_hf):
    runner = torch_runner(tiny_hf)
    sched = make_scheduler(runner, tiny_hf)
    try:
        batch = prompts()
        alone = [run_all(sched, [p])[0] for p in batch]
        before = dict(runner.stats)
        together = run_all(sched, batch)
        assert together == alone
        assert runner.stats["prefill_many"] - before["prefill_many"] == 1
        assert runner.stats["prefill_eager"] == before["prefill_eager"]  # no one-by-one prefill
        assert runner.live == 0
    finally:
        sched.shutdown()


class Breaking:
    """The real runner; a chunk that starts with `bad` is refused (EngineError), and `prefill_many` raises
    an unexpected error `crash` times."""

    def __init__(self, runner, bad=499, crash=0):
        self._runner = runner
        self.bad = bad
        self.crash = crash
        self.many = 0

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def prefill(self, seq_id, token_ids, **kw):
        if token_ids[0] == self.bad:
            raise EngineError("refused", code="test_refused")
        return self._runner.prefill(seq_id, token_ids, **kw)

    def prefill_many(self, seq_ids, chunks):
        self.many += 1
        if self.crash:
            self.crash -= 1
            raise RuntimeError("injected runner fault")
        if any(c[0] == self.bad for c in chunks):
            raise EngineError("refused", code="test_refused")
        return self._runner.prefill_many(seq_ids, chunks)


def test_a_refused_sequence_ends_alone_and_a_fault_ends_its_batch(tiny_hf):
    runner = Breaking(torch_runner(tiny_hf))
    sched = make_scheduler(runner, tiny_hf)
    try:
        batch = prompts()
        alone = [run_all(sched, [p])[0] for p in batch]
        bad = [499, *batch[2][1:]]
        got = run_all(sched, [*batch[:2], bad, *batch[2:]])
        assert got[2] == ([], "error", "test_refused")
        assert got[:2] + got[3:] == alone  # the others were prefilled one by one, with the same outputs

        runner.crash = 1
        got = run_all(sched, batch)
        assert all(r == ([], "error", "engine_error") for r in got)
        assert sched.alive and run_all(sched, batch) == alone
        assert runner._runner.live == 0
    finally:
        sched.shutdown()
