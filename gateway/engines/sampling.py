"""Next-token choice on the CPU: greedy, temperature and nucleus (top-p) sampling, per sequence."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import SequenceState

# Nucleus sampling sorts only this many top logits unless their mass falls short of top_p.
_TOP_CANDIDATES = 1024


def sample_rows(logits: np.ndarray, states: Sequence[SequenceState]) -> list[int]:
    """logits: [n, vocab] float32. Greedy rows take the argmax; the rest draw from their own rng."""
    out = np.argmax(logits, axis=-1).tolist()
    for i, st in enumerate(states):
        p = st.params
        if p.greedy:
            continue
        out[i] = _draw(logits[i], p.temperature, p.top_p, st.rng)
    return out


def _draw(row: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    scaled = row.astype(np.float64) / temperature
    if top_p < 1.0 and scaled.shape[0] > _TOP_CANDIDATES:
        idx = np.argpartition(-scaled, _TOP_CANDIDATES)[:_TOP_CANDIDATES]
        probs = _softmax_of(scaled, idx)
        if probs.sum() < top_p:  # the tail matters: fall back to the full vocabulary
            idx = np.arange(scaled.shape[0])
    else:
        idx = np.arange(scaled.shape[0])
    cand = scaled[idx]
    order = np.argsort(-cand, kind="stable")
    idx, cand = idx[order], cand[order]
    probs = np.exp(cand - cand[0])
    probs /= probs.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), top_p) + 1)
        idx, probs = idx[:keep], probs[:keep] / probs[:keep].sum()
    return int(idx[rng.choice(len(idx), p=probs)])


def _softmax_of(scaled: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Probabilities of `idx` under the softmax over the whole row."""
    m = scaled.max()
    z = np.exp(scaled - m).sum()
    return np.exp(scaled[idx] - m) / z
