"""Sampling against a plain reference: full sorts, float64, one parameter at a time, as OpenAI, vLLM and
Hugging Face define them. Every random draw is seeded, so nothing here can flake."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from gateway.engines.base import SamplingParams, TokenLogprob
from gateway.engines.sampling import (
    SamplingState,
    apply_bitmask,
    final_distribution,
    prompt_logprobs,
    sample_rows,
)
from tests.conftest import need

WIDE = 49152  # SmolLM2's vocabulary


def reference(row, params, prompt=(), generated=(), allowed=None):
    """(greedy token or None, full probability vector of the distribution sampled from)."""
    x = np.asarray(row, dtype=np.float64).copy()
    for t, b in (params.logit_bias or {}).items():
        x[int(t)] += b
    if params.repetition_penalty != 1:
        for t in set(prompt) | set(generated):
            x[t] = x[t] / params.repetition_penalty if x[t] > 0 else x[t] * params.repetition_penalty
    for t, c in Counter(generated).items():
        x[t] -= c * params.frequency_penalty + (c > 0) * params.presence_penalty
    if allowed is not None:
        x[~allowed] = -np.inf
    if params.greedy:
        return int(np.argmax(x)), _softmax(x)
    x /= params.temperature
    if 0 < params.top_k < x.size:
        kth = np.sort(x)[-params.top_k]
        x[x < kth] = -np.inf
    probs = _softmax(x)
    if params.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]
        cut = np.zeros_like(probs, dtype=bool)
        cut[order[before >= params.top_p]] = True
        probs[cut] = 0
        probs /= probs.sum()
    if params.min_p > 0:
        probs[probs < params.min_p * probs.max()] = 0
        probs /= probs.sum()
    return None, probs


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def state(prompt=(), generated=(), **kw):
    st = SamplingState(SamplingParams(**kw), prompt=prompt)
    for t in generated:
        st.observe(t)
    return st


def full_logprobs(entry: TokenLogprob, vocab: int) -> np.ndarray:
    """The row's whole distribution from a `top` that covers the vocabulary."""
    out = np.full(vocab, -np.inf)
    for t, lp in entry.top:
        out[t] = lp
    return out


CASES = [
    dict(temperature=0.0),
    dict(temperature=0.0, logit_bias={3: 5.0, 7: -100.0}),
    dict(temperature=0.0, presence_penalty=1.5, frequency_penalty=0.7),
    dict(temperature=0.0, repetition_penalty=1.3),
    dict(temperature=1.0),
    dict(temperature=0.6),
    dict(temperature=1.7, top_k=5),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=0.9, top_p=0.3, top_k=10),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=1.2, top_k=20, top_p=0.9, min_p=0.05),
    dict(temperature=0.8, presence_penalty=-0.5, frequency_penalty=0.4, repetition_penalty=1.2,
         logit_bias={0: 2.0, 11: -3.5}, top_p=0.95, min_p=0.02),
]


@pytest.mark.parametrize("kw", CASES, ids=[str(c) for c in CASES])
def test_distribution_matches_reference_small_vocab(kw):
    vocab = 40
    for seed in range(20):
        r = np.random.default_rng(seed)
        row = (r.standard_normal(vocab) * 2).astype(np.float32)
        prompt = r.integers(0, vocab, 12).tolist()
        generated = r.integers(0, vocab, 9).tolist()
        params = SamplingParams(**kw, logprobs=vocab)
        st = state(prompt, generated, **kw, logprobs=vocab, seed=seed)
        greedy, want = reference(row, params, prompt, generated)
        tokens, lps = sample_rows(row[None].copy(), [st])
        got = full_logprobs(lps[0], vocab)
        np.testing.assert_allclose(np.exp(got), want, atol=1e-6)
        assert want[tokens[0]] > 0
        assert lps[0].token_id == tokens[0]
        assert lps[0].logprob == pytest.approx(np.log(want[tokens[0]]), abs=1e-5)
        if greedy is not None:
            assert tokens[0] == greedy
        # top excludes what cannot be drawn, best first
        assert len(lps[0].top) == int((want > 0).sum())
        assert [lp for _, lp in lps[0].top] == sorted((lp for _, lp in lps[0].top), reverse=True)


@pytest.mark.parametrize("scale", [3.0, 6.0])  # 6: the best 1024 tokens hold the top_p mass
@pytest.mark.parametrize("kw", CASES[4:], ids=[str(c) for c in CASES[4:]])
def test_distribution_matches_reference_wide_row(kw, scale):
    r = np.random.default_rng(7)
    row = (r.standard_normal(WIDE) * scale).astype(np.float32)
    prompt = r.integers(0, WIDE, 300).tolist()
    generated = r.integers(0, WIDE, 100).tolist()
    params = SamplingParams(**kw)
    _, want = reference(row, params, prompt, generated)
    st = state(prompt, generated, **kw)
    work = row.copy()
    st.adjust(work)
    idx, probs = final_distribution(work, st)
    got = np.zeros(WIDE)
    if idx is None:
        got[:] = probs
    else:
        got[idx] = probs
    np.testing.assert_allclose(got, want, atol=1e-7, rtol=1e-4)
    # and through sample_rows: the sampled token's logprob and the 20 best
    st = state(prompt, generated, **kw, logprobs=20, seed=1)
    tokens, lps = sample_rows(row[None].copy(), [st])
    assert want[tokens[0]] > 0
    assert lps[0].logprob == pytest.approx(np.log(want[tokens[0]]), abs=1e-4)
    best = np.argsort(-want, kind="stable")[:20]
    best = best[want[best] > 0]
    assert [t for t, _ in lps[0].top] == best.tolist()
    np.testing.assert_allclose([lp for _, lp in lps[0].top], np.log(want[best]), atol=1e-4)


def test_nucleus_falls_back_when_the_top_candidates_lack_the_mass():
    """A flat wide row: the best 1024 tokens hold ~2% of the mass, so top_p needs the full sort."""
    r = np.random.default_rng(3)
    row = (r.standard_normal(WIDE) * 0.01).astype(np.float32)
    params = SamplingParams(temperature=1.0, top_p=0.5)
    _, want = reference(row, params)
    idx, probs = final_distribution(row.copy(), SamplingState(params))
    got = np.zeros(WIDE)
    got[idx] = probs
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-9)
    assert 0.45 * WIDE < (got > 0).sum() < 0.55 * WIDE


@pytest.mark.parametrize("kw", [dict(top_p=0.5), dict(top_p=0.9), dict(top_p=0.99), dict(top_p=0.9, top_k=10000),
                                dict(top_p=0.7, min_p=0.05, temperature=1.5)])
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_nucleus_of_flat_wide_rows(kw, scale):
    """Rows whose top_p mass lies beyond the best 1024 tokens take the bucketed path: still exact."""
    r = np.random.default_rng(int(scale * 10))
    row = (r.standard_normal(WIDE) * scale).astype(np.float32)
    params = SamplingParams(**kw)
    _, want = reference(row, params)
    idx, probs = final_distribution(row.copy(), SamplingState(params))
    got = np.zeros(WIDE)
    got[idx] = probs
    assert (got > 0).sum() == (want > 0).sum()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=4),
                                dict(temperature=1.3, top_p=0.7), dict(temperature=1.0, min_p=0.2)])
def test_draws_follow_the_distribution(kw):
    """6,000 seeded draws over 8 tokens: frequencies within 0.04 total variation of the reference."""
    vocab, n = 8, 6000
    row = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 3.0], dtype=np.float32)
    _, want = reference(row, SamplingParams(**kw))
    states = [state(**kw, seed=s) for s in range(n)]
    tokens, _ = sample_rows(np.tile(row, (n, 1)), states)
    freq = np.bincount(tokens, minlength=vocab) / n
    assert 0.5 * np.abs(freq - want).sum() < 0.04
    assert all(want[t] > 0 for t in set(tokens))


def test_seeded_reproducibility():
    r = np.random.default_rng(0)
    rows = (r.standard_normal((60, 500)) * 2).astype(np.float32)

    def run(seed):
        st = state(temperature=1.1, top_p=0.9, presence_penalty=0.3, seed=seed)
        out = []
        for row in rows:
            tok = sample_rows(row[None].copy(), [st])[0][0]
            st.observe(tok)
            out.append(tok)
        return out

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_batch_rows_are_independent_of_their_neighbours():
    """A seeded sequence draws the same tokens alone or inside a batch of other kinds of rows."""
    r = np.random.default_rng(1)
    rows = (r.standard_normal((4, 300)) * 2).astype(np.float32)
    alone = sample_rows(rows[2:3].copy(), [state(temperature=0.9, top_k=50, seed=5)])[0][0]
    batch = [state(temperature=0.0), state(temperature=1.0, seed=9, logprobs=3),
             state(temperature=0.9, top_k=50, seed=5), state(temperature=0.0, frequency_penalty=1.0)]
    assert sample_rows(rows.copy(), batch)[0][2] == alone


def test_greedy_fast_path_is_argmax_and_touches_nothing():
    r = np.random.default_rng(2)
    logits = r.standard_normal((16, WIDE)).astype(np.float32)
    before = logits.copy()
    states = [state(temperature=0.0) for _ in range(16)]
    tokens, lps = sample_rows(logits, states)
    assert tokens == np.argmax(before, axis=-1).tolist()
    assert lps == [None] * 16
    np.testing.assert_array_equal(logits, before)
    assert all(st.plain for st in states)
    assert not state(temperature=0.0, logprobs=0).plain
    assert not state(temperature=0.0, presence_penalty=0.1).plain
    assert not state(temperature=0.5).plain


def test_logprobs_zero_means_the_sampled_token_only():
    row = np.array([1.0, 2.0, 0.5], dtype=np.float32)
    tokens, lps = sample_rows(row[None].copy(), [state(temperature=0.0, logprobs=0)])
    assert tokens == [1] and lps[0].top == []
    assert lps[0].logprob == pytest.approx(np.log(_softmax(row.astype(np.float64))[1]))


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.5, top_p=0.9),
                                dict(temperature=1.4, top_k=30, min_p=0.05)])
def test_logprobs_sum_to_one_over_the_support(kw):
    vocab = 64
    for seed in range(30):
        row = (np.random.default_rng(seed).standard_normal(vocab) * 2).astype(np.float32)
        _, lps = sample_rows(row[None].copy(), [state(**kw, logprobs=vocab, seed=seed)])
        total = sum(np.exp(lp) for _, lp in lps[0].top)
        assert total == pytest.approx(1.0, abs=1e-6)
        assert all(np.isfinite(lp) for _, lp in lps[0].top)


def test_penalties_as_openai_and_vllm_define_them():
    row = np.array([2.0, -1.0, 0.5, 3.0, 1.0], dtype=np.float32)
    # OpenAI: logit -= count * frequency + (count > 0) * presence, over the generated tokens only
    st = state(prompt=[0], generated=[3, 3, 2], temperature=0.0, logprobs=5,
               presence_penalty=0.5, frequency_penalty=0.25)
    _, lps = sample_rows(row[None].copy(), [st])
    want = row.astype(np.float64) - np.array([0, 0, 0.25 + 0.5, 2 * 0.25 + 0.5, 0])
    np.testing.assert_allclose(full_logprobs(lps[0], 5), np.log(_softmax(want)), atol=1e-6)
    # vLLM: repetition over prompt and generated tokens, divide positive logits, multiply negative ones
    st = state(prompt=[0, 1], generated=[3], temperature=0.0, logprobs=5, repetition_penalty=2.0)
    _, lps = sample_rows(row[None].copy(), [st])
    want = np.array([1.0, -2.0, 0.5, 1.5, 1.0])
    np.testing.assert_allclose(full_logprobs(lps[0], 5), np.log(_softmax(want)), atol=1e-6)
    # each token is penalised once however often it repeats
    st = state(prompt=[3, 3], generated=[3, 3], temperature=0.0, logprobs=5, repetition_penalty=2.0)
    _, lps = sample_rows(row[None].copy(), [st])
    want = row.astype(np.float64).copy()
    want[3] = 1.5
    np.testing.assert_allclose(full_logprobs(lps[0], 5), np.log(_softmax(want)), atol=1e-6)


def test_logit_bias_bans_and_forces():
    r = np.random.default_rng(4)
    row = r.standard_normal(1000).astype(np.float32)
    best = int(np.argmax(row))
    assert sample_rows(row[None].copy(), [state(temperature=0.0, logit_bias={best: -100})])[0][0] != best
    for seed in range(50):
        st = state(temperature=1.0, seed=seed, logit_bias={17: 100})
        assert sample_rows(row[None].copy(), [st])[0][0] == 17
    # ids outside the vocabulary are ignored rather than crash the step
    assert sample_rows(row[None].copy(), [state(temperature=0.0, logit_bias={5000: 3.0})])[0][0] == best


def test_counts_follow_observe():
    row = np.zeros(4, dtype=np.float32)
    row[1] = 1.0
    st = state(temperature=0.0, frequency_penalty=0.6)
    seen = []
    for _ in range(4):
        tok = sample_rows(row[None].copy(), [st])[0][0]
        st.observe(tok)
        seen.append(tok)
    # token 1 wins until two uses cost it 1.2; then token 0, then token 2 (0 and 1 now penalised)
    assert seen == [1, 1, 0, 2]
    assert st.counts == {1: 2, 0: 1, 2: 1}


def _bits(allowed: np.ndarray) -> np.ndarray:
    """llguidance's layout, written out: bit j of word w allows token 32*w + j."""
    words = np.zeros((allowed.shape[0], (allowed.shape[1] + 31) // 32), dtype=np.int64)
    for r, c in zip(*np.nonzero(allowed), strict=True):
        words[r, c // 32] |= 1 << (c % 32)
    return words.astype(np.uint32).view(np.int32)


MASK_KINDS = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=2.0, top_p=0.9),
              dict(temperature=1.5, top_k=3), dict(temperature=1.0, min_p=0.3, logprobs=5),
              dict(temperature=0.0, logprobs=4, presence_penalty=2.0, logit_bias={1: 100.0})]


def test_mask_never_lets_a_disallowed_token_through():
    vocab, n = 70, len(MASK_KINDS)  # 70: the last word is partly used
    for seed in range(300):
        r = np.random.default_rng(seed)
        allowed = r.random((n, vocab)) < r.uniform(0.01, 0.5, (n, 1))
        allowed[np.arange(n), r.integers(0, vocab, n)] = True
        logits = (r.standard_normal((n, vocab)) * 4).astype(np.float32)
        states = [state(**kw, seed=seed, generated=[1, 1]) for kw in MASK_KINDS]
        tokens, lps = sample_rows(logits, states, _bits(allowed), masked_rows=range(n))
        for i, tok in enumerate(tokens):
            assert allowed[i, tok], (seed, i, tok)
            if lps[i] is not None:
                assert all(allowed[i, t] for t, _ in lps[i].top)


def test_mask_applies_to_masked_rows_only_and_matches_reference():
    vocab = 100
    r = np.random.default_rng(5)
    logits = (r.standard_normal((3, vocab)) * 2).astype(np.float32)
    allowed = r.random((3, vocab)) < 0.3
    allowed[:, 0] = True
    bitmask = _bits(allowed)
    states = [state(temperature=0.0, logprobs=vocab) for _ in range(3)]
    _, lps = sample_rows(logits.copy(), states, bitmask, masked_rows=[0, 2])
    for i in range(3):
        mask = allowed[i] if i != 1 else None
        _, want = reference(logits[i], SamplingParams(temperature=0.0), allowed=mask)
        np.testing.assert_allclose(np.exp(full_logprobs(lps[i], vocab)), want, atol=1e-6)


def test_mask_on_the_wide_row_and_tokens_past_its_width():
    r = np.random.default_rng(6)
    logits = r.standard_normal((2, WIDE)).astype(np.float32)
    allowed = np.zeros((2, WIDE), dtype=bool)
    allowed[0, [5, 4000, 49151]] = True
    allowed[1, r.integers(0, WIDE, 500)] = True
    bitmask = _bits(allowed)
    for seed in range(40):
        states = [state(temperature=1.0, seed=seed), state(temperature=0.3, top_p=0.5, seed=seed)]
        tokens, _ = sample_rows(logits.copy(), states, bitmask, masked_rows=[0, 1])
        assert allowed[0, tokens[0]] and allowed[1, tokens[1]]
    narrow = bitmask[:, :10]  # covers tokens 0..319; the rest counts as disallowed
    allowed[:, 320:] = False
    tokens, _ = sample_rows(logits.copy(), [state(temperature=1.0, seed=1)] * 2, narrow, masked_rows=[0, 1])
    assert tokens[0] == 5 and allowed[1, tokens[1]]


def test_apply_bitmask_matches_llguidance_numpy_helper():
    try:
        from llguidance.numpy import apply_token_bitmask_inplace
    except ImportError:
        apply_token_bitmask_inplace = None
    need(apply_token_bitmask_inplace is not None, "llguidance is not installed")
    r = np.random.default_rng(9)
    for vocab, words in [(WIDE, WIDE // 32), (1000, 32), (1000, 20)]:  # exact, one word spare, narrow
        logits = r.standard_normal((4, vocab)).astype(np.float32)
        bitmask = r.integers(-(2**31), 2**31, (4, words), dtype=np.int64).astype(np.int32)
        bitmask[1] = -1  # all allowed
        bitmask[2] = 0  # none allowed
        want = logits.copy()
        apply_token_bitmask_inplace(want, bitmask)
        got = logits.copy()
        apply_bitmask(got, bitmask, range(4))
        np.testing.assert_array_equal(got, want)


def test_mask_with_nothing_allowed_does_not_crash():
    logits = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    bitmask = np.zeros((2, 2), dtype=np.int32)
    tokens, lps = sample_rows(logits, [state(temperature=1.0, seed=0), state(temperature=0.0, logprobs=2)],
                              bitmask, masked_rows=[0, 1])
    assert len(tokens) == 2 and lps[1].top == []


def test_prompt_logprobs_match_log_softmax():
    r = np.random.default_rng(8)
    logits = (r.standard_normal((5, WIDE)) * 2).astype(np.float32)
    next_ids = r.integers(0, WIDE, 5).tolist()
    out = prompt_logprobs(logits, next_ids, top=5)
    for row, token, entry in zip(logits, next_ids, out, strict=True):
        want = np.log(_softmax(row.astype(np.float64)))
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(want[token], abs=1e-5)
        best = np.argsort(-want)[:5]
        assert [t for t, _ in entry.top] == best.tolist()
        np.testing.assert_allclose([lp for _, lp in entry.top], want[best], atol=1e-5)
    assert prompt_logprobs(logits[:1], next_ids[:1], top=0)[0].top == []


def test_read_only_and_half_precision_logits_are_copied_not_refused():
    logits = np.random.default_rng(10).standard_normal((2, 300)).astype(np.float32)
    want = np.argmax(logits, axis=-1).tolist()
    logits.flags.writeable = False
    states = [state(temperature=0.0, presence_penalty=0.5), state(temperature=0.0, logprobs=1)]
    assert sample_rows(logits, states)[0] == want
    assert sample_rows(logits.astype(np.float16), [state(temperature=0.0)] * 2)[0] == want
    with pytest.raises(ValueError):
        sample_rows(logits, states[:1])
