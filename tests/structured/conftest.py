"""A stand-in engine with the real SmolLM2 tokenizer: all the structured package reads from an engine."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from transformers import AutoTokenizer


def make_engine(tokenizer, vocab_size: int | None = None):
    eos = {tokenizer.eos_token_id}
    return SimpleNamespace(tokenizer=tokenizer, runner=SimpleNamespace(vocab_size=vocab_size or len(tokenizer)),
                           scheduler=SimpleNamespace(eos=frozenset(eos)))


@pytest.fixture(scope="session")
def tokenizer(chat_artifact):
    return AutoTokenizer.from_pretrained(chat_artifact.path)


@pytest.fixture(scope="session")
def engine(tokenizer):
    return make_engine(tokenizer)


def allowed_ids(bitmask: np.ndarray, row: int, vocab: int) -> np.ndarray:
    bits = np.unpackbits(bitmask[row].view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


def walk(constraint, tokenizer, vocab: int, seed: int, max_steps: int = 800, close_after: int = 24):
    """A seeded random walk over allowed tokens; after `close_after` steps it leans to closing tokens so the
    walk ends. Returns (token ids, finished)."""
    rng = np.random.default_rng(seed)
    closers = _closers(tokenizer)
    mask = np.zeros((1, (vocab + 31) // 32), dtype=np.int32)
    ids: list[int] = []
    for step in range(max_steps):
        if constraint.is_finished():
            return ids, True
        constraint.fill_bitmask(mask, 0)
        allowed = allowed_ids(mask, 0, vocab)
        assert len(allowed), "the grammar allowed no token at all"
        pool = allowed
        if step >= close_after and rng.random() < 0.8:
            near = allowed[np.isin(allowed, closers)]
            pool = near if len(near) else allowed
        token = int(rng.choice(pool))
        assert constraint.accept(token), constraint.error
        ids.append(token)
    return ids, constraint.is_finished()


_CLOSERS: dict[int, np.ndarray] = {}


def _closers(tokenizer) -> np.ndarray:
    key = id(tokenizer)
    if key not in _CLOSERS:
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        ids = [i for i, t in enumerate(vocab) if t and any(c in t for c in '"}],>') and len(t) <= 3]
        ids.append(tokenizer.eos_token_id)
        _CLOSERS[key] = np.array(sorted(set(ids)))
    return _CLOSERS[key]
