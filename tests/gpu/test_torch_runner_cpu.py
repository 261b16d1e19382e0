"""The torch runners' math, on the CPU in float32, against transformers' own forward.

These run in CI (no GPU): the CUDA path replays the same functions inside CUDA graphs, which
test_cuda.py checks against this eager path on a GPU machine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gateway.engines.base import EngineError, SamplingParams, SequenceState
from gateway.engines.torch_bert import TorchEncoderRunner
from gateway.engines.torch_llama import TorchCausalRunner, batch_buckets, len_buckets

PROMPTS = [[5, 17, 42, 7, 99, 3, 250], [11, 12], [300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310, 1, 2],
           [77]]


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def runner(path, capacity=4, **kw) -> TorchCausalRunner:
    return TorchCausalRunner(path, capacity=capacity, max_seq_len=256, device="cpu", dtype=torch.float32, **kw)


def greedy(r: TorchCausalRunner, logits) -> int:
    return r.sample(logits, [SequenceState(SamplingParams(temperature=0))])[0]


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen"])
def test_logits_match_transformers(which, request):
    path = request.getfixturevalue(which)
    model, r = hf_model(path), runner(path)
    prompt = PROMPTS[0]
    with torch.no_grad():
        ref = model(torch.tensor([prompt + [9, 8, 7]])).logits[0]
    out = r.prefill(0, prompt[:3])  # chunked prefill: 3 + 4 tokens
    torch.testing.assert_close(out[0], ref[2], rtol=1e-4, atol=1e-4)
    out = r.prefill(0, prompt[3:])
    torch.testing.assert_close(out[0], ref[len(prompt) - 1], rtol=1e-4, atol=1e-4)
    for j, tok in enumerate([9, 8, 7]):
        out = r.decode([0], [tok])
        torch.testing.assert_close(out[0], ref[len(prompt) + j], rtol=1e-4, atol=1e-4)


def test_greedy_matches_transformers_generate(tiny_llama):
    model, r = hf_model(tiny_llama), runner(tiny_llama)
    for prompt in PROMPTS[:2]:
        ref = hf_greedy(model, prompt, 12)
        tok = greedy(r, r.prefill(1, prompt))
        got = [tok]
        for _ in range(11):
            tok = greedy(r, r.decode([1], [tok]))
            got.append(tok)
        r.release(1)
        assert got == ref


def alone(path, prompt: list[int], steps: int) -> list[int]:
    r = runner(path, capacity=1)
    out = [greedy(r, r.prefill(0, prompt))]
    while len(out) < steps:
        out.append(greedy(r, r.decode([0], [out[-1]])))
    return out


def test_continuous_batching_equals_alone(tiny_qwen):
    """Sequences join mid-flight (chunked prefill while others decode), leave, and reuse freed rows."""
    steps = {0: 20, 1: 6, 2: 15, 3: 9}
    want = {i: alone(tiny_qwen, PROMPTS[i], steps[i]) for i in steps}
    r = runner(tiny_qwen, capacity=3)
    got: dict[int, list[int]] = {i: [] for i in steps}
    waiting = [0, 1, 2, 3]
    prefilling: dict[int, int] = {}
    running: list[int] = []
    while waiting or prefilling or running:
        if waiting and len(prefilling) + len(running) < 3:
            prefilling[waiting.pop(0)] = 0
        for s in list(prefilling):
            done = prefilling[s]
            chunk = PROMPTS[s][done:done + 4]  # prompts arrive in chunks of 4
            logits = r.prefill(s, chunk)
            prefilling[s] += len(chunk)
            if prefilling[s] == len(PROMPTS[s]):
                del prefilling[s]
                got[s].append(greedy(r, logits))
                running.append(s)
        if running:
            logits = r.decode(running, [got[s][-1] for s in running])
            toks = r.sample(logits, [SequenceState(SamplingParams(temperature=0)) for _ in running])
            for s, t in zip(list(running), toks, strict=True):
                got[s].append(t)
        for s in list(running):
            if len(got[s]) >= steps[s]:
                got[s] = got[s][:steps[s]]
                running.remove(s)
                r.release(s)
        running.reverse()  # rows out of order: decode must gather logits by row
    assert got == want


def drive(r: TorchCausalRunner, steps: int = 24) -> tuple[dict[int, list[int]], list]:
    """Four sequences, staggered admission and chunked prefill, one leaving early; greedy tokens per sequence."""
    got: dict[int, list[int]] = {}
    running: list[int] = []
    logits_seen = []
    for step in range(steps):
        if step in (0, 2, 5, 9):
            s = (0, 2, 5, 9).index(step)
            prompt = PROMPTS[s]
            for i in range(0, len(prompt), 4):
                logits = r.prefill(s, prompt[i:i + 4])
            got[s] = [greedy(r, logits)]
            running.append(s)
        if step == 14 and 1 in running:
            running.remove(1)
            r.release(1)
        logits = r.decode(running, [got[s][-1] for s in running])
        logits_seen.append(logits.float().cpu())
        for s, t in zip(running, r.sample(logits, [SequenceState(SamplingParams(temperature=0))] * len(running)),
                        strict=True):
            got[s].append(t)
        running.reverse()
    return got, logits_seen


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen"])
def test_bucketed_static_path_equals_eager(which, request):
    """The path CUDA graphs replay (padded chunks, bucketed rows and lengths, static buffers), run eagerly."""
    path = request.getfixturevalue(which)
    kw = dict(capacity=8, max_seq_len=300, device="cpu", dtype=torch.float32)
    eager = TorchCausalRunner(path, graphs=False, **kw)
    static = TorchCausalRunner(path, graphs="emulate", **kw)
    a, la = drive(eager)
    b, lb = drive(static)
    assert static.stats["decode_graph"] > 0 and static.stats["prefill_graph"] > 0
    assert eager.stats["decode_graph"] == 0
    assert a == b
    for x, y in zip(la, lb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_compaction_keeps_sequences(tiny_llama):
    r = runner(tiny_llama, capacity=6)
    want = alone(tiny_llama, PROMPTS[2], 10)
    for s in range(5):
        r.prefill(s, PROMPTS[1])
    first = greedy(r, r.prefill(9, PROMPTS[2]))  # row 5
    for s in range(5):
        r.release(s)
    got = [first]
    while len(got) < 10:
        got.append(greedy(r, r.decode([9], [got[-1]])))
    assert r.stats["compactions"] >= 1
    assert r._rows[9] == 0
    assert got == want


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(tiny_llama):
    r = runner(tiny_llama)
    logits = r.prefill(0, PROMPTS[0])
    arg = greedy(r, logits)

    def draw(seed, **p):
        st = SequenceState(SamplingParams(**p), np.random.default_rng(seed))
        return [r.sample(logits, [st])[0] for _ in range(8)]

    assert draw(3, temperature=1.0) == draw(3, temperature=1.0)
    assert len(set(draw(4, temperature=5.0))) > 1
    assert set(draw(5, temperature=1.0, top_p=1e-6)) == {arg}
    mixed = r.sample(torch.stack([logits[0], logits[0]]),
                     [SequenceState(SamplingParams(temperature=0)),
                      SequenceState(SamplingParams(temperature=1.0, top_p=1e-6), np.random.default_rng(0))])
    assert mixed == [arg, arg]


def test_limits(tiny_llama):
    r = runner(tiny_llama, capacity=1)
    r.prefill(0, [1, 2])
    with pytest.raises(EngineError, match="slot"):
        r.prefill(1, [1])
    with pytest.raises(EngineError, match="context"):
        r.prefill(0, list(range(1, 300)))
    r.release(0)
    r.release(0)  # twice is fine
    r.prefill(1, [1])
    assert r.length(1) == 1


def test_buckets():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_buckets(100)[-1] == 100 and 96 in batch_buckets(100)
    assert batch_buckets(3) == [1, 2, 3]
    assert len_buckets(2048) == [256, 512, 1024, 2048]
    assert len_buckets(300) == [256, 300]
    assert len_buckets(100) == [100]


def test_encoder_matches_transformers(tiny_bert):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(tiny_bert), dtype=torch.float32).eval()
    r = TorchEncoderRunner(tiny_bert, device="cpu", dtype=torch.float32)
    batch = [[101, 5, 6, 7, 102], [101, 9, 102], [101] + list(range(20, 60)) + [102]]
    got = r.encode(batch)
    assert got.shape == (3, 48) and got.dtype == np.float32
    for i, ids in enumerate(batch):  # each alone, unpadded, through transformers
        with torch.no_grad():
            h = model(torch.tensor([ids])).last_hidden_state[0].mean(0)
        ref = (h / h.norm()).numpy()
        np.testing.assert_allclose(got[i], ref, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
