"""Next-token choice on the CPU, per sequence: logit bias, penalties, grammar mask, temperature,
top-k, top-p, min-p, the draw, and the logprobs of the distribution that was drawn from.

Semantics follow OpenAI (logit_bias; presence/frequency penalties over the generated tokens) and
vLLM/Hugging Face (repetition_penalty over prompt and generated tokens; top_k, top_p, min_p, in Hugging
Face's order). Logprobs are those of the distribution drawn from: after bias, penalties and the grammar
mask, then for sampled rows after temperature and truncation (truncated tokens never appear in `top`),
for greedy rows at temperature 1. Plain greedy rows (no bias, penalty, mask or logprobs) cost one
argmax for the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import SamplingParams, TokenLogprob

# Nucleus sampling sorts at most this many top tokens; flatter rows are bucketed instead.
_TOP_CANDIDATES = 1024
# Wide rows are cut into this many strided groups to find top candidates and to draw.
_GROUP = 32
_NEG_INF_BITS = np.float32(-np.inf).view(np.int32)


class SamplingState:
    """One sequence's sampling state: its seeded rng and the tokens that drive the penalties."""

    def __init__(self, params: SamplingParams, prompt: Sequence[int] = ()):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.greedy = params.greedy
        self.temperature = float(params.temperature)
        self.top_k = int(params.top_k or 0)
        self.top_p = float(params.top_p)
        self.min_p = float(params.min_p or 0.0)
        self.presence = float(params.presence_penalty or 0.0)
        self.frequency = float(params.frequency_penalty or 0.0)
        self.repetition = float(params.repetition_penalty or 1.0)
        self.logprobs = params.logprobs
        bias = params.logit_bias or {}
        self._bias_ids = np.fromiter((int(k) for k in bias), dtype=np.int64, count=len(bias))
        self._bias = np.fromiter((float(v) for v in bias.values()), dtype=np.float32, count=len(bias))
        self.adjusts = bool(bias) or self.presence != 0 or self.frequency != 0 or self.repetition != 1
        # Plain rows take the batch argmax and nothing else.
        self.plain = self.greedy and not self.adjusts and self.logprobs is None
        self.counts: dict[int, int] = {}  # generated token -> times
        self._seen = set(int(t) for t in prompt) if self.repetition != 1 else set()
        self._seen_ids: np.ndarray | None = None  # cached arrays, rebuilt when the tokens change
        self._count_ids: np.ndarray | None = None
        self._count_vals: np.ndarray | None = None

    def observe(self, token: int) -> None:
        """Record an accepted token (its counts feed the penalties of the next steps)."""
        token = int(token)
        self.counts[token] = self.counts.get(token, 0) + 1
        self._count_ids = None
        if self.repetition != 1 and token not in self._seen:
            self._seen.add(token)
            self._seen_ids = None

    def adjust(self, row: np.ndarray) -> None:
        """logit_bias, repetition penalty, then presence/frequency penalties, in place on one row."""
        vocab = row.shape[0]
        if self._bias_ids.size:
            ok = (self._bias_ids >= 0) & (self._bias_ids < vocab)
            row[self._bias_ids[ok]] += self._bias[ok]
        if self.repetition != 1 and self._seen:
            if self._seen_ids is None:
                ids = np.fromiter(self._seen, dtype=np.int64, count=len(self._seen))
                self._seen_ids = ids[(ids >= 0) & (ids < vocab)]
            v = row[self._seen_ids]
            row[self._seen_ids] = np.where(v > 0, v / self.repetition, v * self.repetition)
        if (self.presence or self.frequency) and self.counts:
            if self._count_ids is None:
                ids = np.fromiter(self.counts, dtype=np.int64, count=len(self.counts))
                vals = np.fromiter(self.counts.values(), dtype=np.float32, count=len(self.counts))
                ok = (ids >= 0) & (ids < vocab)
                self._count_ids, self._count_vals = ids[ok], vals[ok]
            row[self._count_ids] -= self._count_vals * self.frequency + self.presence


def sample_rows(
    logits: np.ndarray,
    states: Sequence[SamplingState],
    bitmask: np.ndarray | None = None,
    masked_rows: Sequence[int] = (),
) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [n, vocab] float32 (modified in place). bitmask int32 [n, ceil(vocab/32)], bit set =
    allowed (llguidance's layout), applied to the rows in `masked_rows` only. One token per row, and
    its logprobs when the row's params ask for them."""
    logits = np.atleast_2d(logits)
    if logits.dtype != np.float32 or not logits.flags.c_contiguous or not logits.flags.writeable:
        logits = np.array(logits, dtype=np.float32, order="C")
    n = logits.shape[0]
    if len(states) != n:
        raise ValueError(f"{n} rows of logits for {len(states)} sequences")
    masked_rows = list(masked_rows) if bitmask is not None else []
    masked = set(masked_rows)
    busy = [i for i, st in enumerate(states) if not st.plain or i in masked]
    if not busy:
        return np.argmax(logits, axis=-1).tolist(), [None] * n
    for i in busy:
        if states[i].adjusts:
            states[i].adjust(logits[i])
    if masked_rows:
        apply_bitmask(logits, bitmask, masked_rows)
    tokens = np.argmax(logits, axis=-1).tolist()
    out: list[TokenLogprob | None] = [None] * n
    for i in busy:
        st = states[i]
        if st.greedy:
            if st.logprobs is not None:
                out[i] = _entry(logits[i], tokens[i], st.logprobs, scratch=logits[i])
            continue
        idx, probs = final_distribution(logits[i], st)
        if idx is None and probs is None:  # nothing allowed: keep the argmax, the grammar will refuse it
            continue
        pick = _draw(probs, st.rng)
        tokens[i] = int(pick if idx is None else idx[pick])
        if st.logprobs is not None:
            out[i] = _entry_from(idx, probs, pick, st.logprobs)
    return tokens, out


def apply_bitmask(logits: np.ndarray, bitmask: np.ndarray, rows: Sequence[int]) -> None:
    """Disallowed tokens of `rows` to -inf, in place. Bit j of word w allows token 32*w + j; tokens
    past the mask's width are disallowed. Same result as llguidance.numpy.apply_token_bitmask_inplace,
    but only for the masked rows and about 5x faster on [16, 49152]."""
    vocab = logits.shape[1]
    words = np.ascontiguousarray(bitmask[np.asarray(rows, dtype=np.int64)], dtype="<i4")
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    width = bits.shape[1]
    keep = np.empty(width, dtype=np.int32)
    for j, r in enumerate(rows):
        # bit arithmetic on the float's int32 view: much faster than np.where on a random mask
        row = logits[r].view(np.int32)
        np.negative(bits[j], out=keep, dtype=np.int32)  # -1 (all ones) = allowed, 0 = not
        row[:width] &= keep
        np.invert(keep, out=keep)
        keep &= _NEG_INF_BITS
        row[:width] |= keep
        logits[r, width:] = -np.inf


def final_distribution(row: np.ndarray, st: SamplingState) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The distribution a sampled row draws from, after temperature, top_k, top_p and min_p.

    Overwrites `row` (whole-row temporaries cost more in page faults than in arithmetic). Returns
    (idx, probs): normalised probs over the token ids `idx`, or over the whole row when idx is None,
    zero for truncated tokens; (None, None) when no token is allowed.
    """
    np.divide(row, np.float32(st.temperature), out=row)
    top = row.max()
    if not np.isfinite(top):
        return None, None
    idx = None
    if 0 < st.top_k < row.shape[0]:
        idx = _superset(row, st.top_k)
        if idx.shape[0] > st.top_k:  # (fewer only when the mask leaves fewer tokens)
            kth = np.partition(row[idx], idx.shape[0] - st.top_k)[idx.shape[0] - st.top_k]
            idx = idx[row[idx] >= kth]  # ties at the k-th value stay, as vLLM and HF do
        p = np.exp(row[idx].astype(np.float64) - top)
    else:
        p = row
        np.subtract(p, top, out=p)
        np.exp(p, out=p)  # unnormalised; the best token has 1
    if st.top_p < 1.0:
        idx, p = _nucleus(idx, p, st.top_p)
    if st.min_p > 0.0:
        p[p < st.min_p * p.max()] = 0
    if p.shape[0] < 4096:
        p = p.astype(np.float64)
    np.multiply(p, p.dtype.type(1.0 / float(p.sum())), out=p)  # float32 pairwise sum: exact enough
    return idx, p


def _nucleus(idx: np.ndarray | None, p: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The smallest set of best tokens whose mass reaches top_p (the best token always stays).
    Sorts only the best 64 or 1024 tokens when they hold the mass; else buckets the whole row."""
    total = p.sum(dtype=np.float64)
    target = top_p * total
    n = p.shape[0]
    if n <= 4 * _TOP_CANDIDATES:
        cand = np.arange(n)
    else:
        for k in (64, _TOP_CANDIDATES):
            cand = _superset(p, k)
            if p[cand].sum(dtype=np.float64) >= target:
                break
        else:
            keep = _nucleus_by_buckets(p, target)
            return (keep if idx is None else idx[keep]), p[keep]
    order = cand[np.argsort(-p[cand], kind="stable")]
    mass = np.cumsum(p[order], dtype=np.float64)
    keep = int(np.searchsorted(mass, target, side="left")) + 1
    order = order[: max(1, min(keep, order.shape[0]))]
    return (order if idx is None else idx[order]), p[order]


def _nucleus_by_buckets(p: np.ndarray, target: float) -> np.ndarray:
    """Nucleus of a flat wide row in O(vocab): non-negative float32 bits order like their values, so
    their top bits are value buckets (1/32 octave); whole buckets are kept from the top down and only
    the boundary bucket is sorted. Positions, unordered."""
    p32 = p if p.dtype == np.float32 else p.astype(np.float32)
    keys = p32.view(np.int32) >> 18
    mass = np.cumsum(np.bincount(keys, weights=p)[::-1])  # mass of each bucket and those above it
    j = min(int(np.searchsorted(mass, target, side="left")), mass.shape[0] - 1)
    edge = mass.shape[0] - 1 - j
    above = mass[j - 1] if j else 0.0
    inside = np.flatnonzero(keys == edge)
    inside = inside[np.argsort(-p[inside], kind="stable")]
    cut = int(np.searchsorted(above + np.cumsum(p[inside], dtype=np.float64), target, side="left")) + 1
    keep = np.concatenate([np.flatnonzero(keys > edge), inside[: max(1, min(cut, inside.shape[0]))]])
    return keep


def _superset(values: np.ndarray, k: int) -> np.ndarray:
    """Ascending positions of a small superset of the k largest values (ties included), from the
    k-th largest of strided group maxima: no full-vocabulary sort or partition."""
    n = values.shape[0]
    group = min(_GROUP, n // max(k, 1))
    if group < 2:
        return np.arange(n)
    per = n // group
    maxima = values[: per * group].reshape(group, per).max(axis=0)
    floor = np.partition(maxima, per - k)[per - k]  # at least k values are >= floor
    if floor == -np.inf:
        return np.flatnonzero(values > -np.inf)
    return np.flatnonzero(values >= floor)


def _draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Inverse-CDF draw: one uniform per step, so a seed replays the same tokens. Wide rows walk
    strided group sums first, so no full-vocabulary cumsum."""
    n = probs.shape[0]
    u = rng.random()
    if n < 64 * _GROUP:
        members = np.arange(n)
    else:
        per = n // _GROUP
        sums = probs[: per * _GROUP].reshape(_GROUP, per).sum(axis=0)
        if n > per * _GROUP:  # the tail is one more group
            sums = np.append(sums, probs[per * _GROUP :].sum())
        cdf = np.cumsum(sums, dtype=np.float64)
        u *= cdf[-1]
        g = min(int(np.searchsorted(cdf, u, side="right")), sums.shape[0] - 1)
        u = (u - (cdf[g - 1] if g else 0.0)) / max(float(sums[g]), 1e-300)
        members = np.arange(per * _GROUP, n) if g == per else np.arange(g, per * _GROUP, per)
    local = np.cumsum(probs[members], dtype=np.float64)
    pick = members[min(int(np.searchsorted(local, u * local[-1], side="right")), members.shape[0] - 1)]
    if probs[pick] == 0:  # float edge at the top of a cdf: the nearest token that can be drawn
        nz = np.flatnonzero(probs)
        pick = nz[min(int(np.searchsorted(nz, pick)), nz.shape[0] - 1)]
    return int(pick)


def _best(values: np.ndarray, k: int, above: float = -np.inf) -> np.ndarray:
    """Positions of the k largest values that are > `above`, best first (ties by position)."""
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    cand = _superset(values, k) if k < values.shape[0] else np.arange(values.shape[0])
    cand = cand[np.argsort(-values[cand], kind="stable")][:k]
    return cand[values[cand] > above]


def _entry(row: np.ndarray, token: int, k: int, scratch: np.ndarray) -> TokenLogprob:
    """Logprobs at temperature 1 of logits `row`; `scratch` (may be `row` itself) takes the exps."""
    best = _best(row, k)
    values = row[best].astype(np.float64)
    value = float(row[token])
    top = row.max()
    if not np.isfinite(top):
        return TokenLogprob(int(token), float("-inf"), [])
    np.subtract(row, top, out=scratch)
    np.exp(scratch, out=scratch)
    lse = float(top) + float(np.log(float(scratch.sum())))
    top_list = [(int(t), float(v - lse)) for t, v in zip(best, values, strict=True)]
    return TokenLogprob(int(token), value - lse, top_list)


def _entry_from(idx: np.ndarray | None, probs: np.ndarray, pick: int, k: int) -> TokenLogprob:
    """Logprobs of a drawn token and the k best of the distribution it was drawn from."""
    best = _best(probs, k, above=0.0)
    top = [(int(j if idx is None else idx[j]), float(np.log(float(probs[j])))) for j in best]
    token = pick if idx is None else idx[pick]
    return TokenLogprob(int(token), float(np.log(float(probs[pick]))), top)


def prompt_logprobs(logits: np.ndarray, next_ids: Sequence[int], top: int) -> list[TokenLogprob]:
    """Echo logprobs: row i of `logits` scores next_ids[i]; its logprob and the `top` best of the row."""
    logits = np.atleast_2d(logits)
    scratch = np.empty(logits.shape[1], dtype=np.float32)
    return [_entry(row, int(token), top, scratch) for row, token in zip(logits, next_ids, strict=True)]
