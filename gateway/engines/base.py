"""What an engine must do. Runners do the model math; schedulers decide what runs when.

A runner is model-level and knows nothing of requests, HTTP or asyncio. The generation scheduler
drives a CausalRunner one step at a time (continuous batching); the embedding batcher drives an
EncoderRunner with padded batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


class EngineError(Exception):
    """A request the engine cannot serve (too long, bad parameters); maps to a 400."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class Overloaded(Exception):
    """The bounded queue is full; maps to a 429 with Retry-After."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class EngineUnavailable(Exception):
    """The engine cannot serve at all (its scheduler thread died, the model is not ready); maps to a 503."""

    def __init__(self, message: str, retry_after: float = 30.0):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None  # None: none; 0: the sampled token's logprob; k: plus the top k
    prompt_logprobs: int | None = None  # logprobs of the prompt tokens (completions echo)
    constraint: Any = None  # a gateway.structured.Constraint, one per sequence, or None
    deadline: float | None = None  # time.monotonic() after which the sequence ends with an error
    tenant: str = ""  # fairness key (the API key id; "" = anonymous)
    weight: float = 1.0  # fair-share weight of the tenant
    detokenize: bool = True  # False: the scheduler sends token ids only (unless `stop` needs text); the caller decodes

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


@dataclass
class SequenceState:
    """Per-sequence sampling state handed to `CausalRunner.sample`."""

    params: SamplingParams
    rng: np.random.Generator = field(default_factory=np.random.default_rng)


class CausalRunner(Protocol):
    capacity: int  # most sequences held at once
    max_seq_len: int  # prompt + output tokens per sequence
    vocab_size: int
    device: str

    def prefill(self, seq_id: int, token_ids: Sequence[int]) -> Any:
        """Append tokens to the sequence's KV cache (a new sequence if unseen); logits of the last one."""

    def decode(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> Any:
        """One token for each sequence in one batched forward; logits [n, vocab]."""

    def release(self, seq_id: int) -> None:
        """Drop the sequence and its KV cache."""

    def sample(self, logits: Any, states: Sequence[SequenceState]) -> list[int]:
        """Pick the next token per row of logits."""


class BatchPrefill(Protocol):
    """Optional on a CausalRunner: the scheduler uses it when present."""

    def prefill_many(self, seq_ids: Sequence[int], chunks: Sequence[Sequence[int]]) -> Any:
        """Several sequences' chunks, right-padded into as few forwards as the runner can; logits
        [n, vocab], row i for chunk i's last token. Every sequence is checked before anything changes, so an
        EngineError means nothing ran (the caller prefills them one by one to find the one at fault)."""


def padded_runs(order: Sequence[int], lengths: Sequence[int], joins=None, waste: float = 1.0,
                slack: int = 8) -> list[list[int]]:
    """Split items (taken in `order`) into runs to right-pad into one forward each. An item joins the run
    before it when `joins(run, item)` allows and the padding stays within `waste` x the run's real tokens
    or within `slack` pad tokens per joined item (about what one forward's fixed cost buys on a CPU)."""
    runs: list[list[int]] = []
    for i in order:
        run = runs[-1] if runs else None
        if run is not None and (joins is None or joins(run, i)):
            k = len(run) + 1
            real = sum(lengths[j] for j in run) + lengths[i]
            padded = max(max(lengths[j] for j in run), lengths[i]) * k
            if padded <= waste * real or padded - real <= slack * (k - 1):
                run.append(i)
                continue
        runs.append([i])
    return runs


class EncoderRunner(Protocol):
    dim: int
    max_length: int
    device: str

    def encode(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """Token id lists (unpadded) -> pooled, L2-normalised float32 [n, dim]."""
