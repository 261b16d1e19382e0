"""Continuous (iteration-level) batching for generation. Knows nothing of HTTP or asyncio.

One thread owns the runner. Each iteration it
1. drops cancelled sequences (a disconnected client frees its slot within one step),
2. admits waiting requests FCFS while slots are free,
3. prefills prompts in chunks, at most `max_batch_tokens - running` prompt tokens per iteration,
   so a long prompt never stalls the decoders for more than one chunk,
4. runs one batched decode step for every running sequence and hands each new token to its sink.
Finished sequences leave the batch at once; new ones join at the next step boundary.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from .. import metrics
from ..engines.base import CausalRunner, EngineError, Overloaded, SamplingParams, SequenceState

log = logging.getLogger("fmgate.scheduler")


@dataclass
class Event:
    """What a sequence produced in one step. `finish_reason` is set on its last event."""

    text: str = ""
    token_id: int | None = None
    finish_reason: str | None = None  # stop | length | abort | error
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


Sink = Callable[[Event], None]


@dataclass(eq=False)
class GenSequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    sink: Sink
    state: SequenceState
    detok: DecodeStream
    prefilled: int = 0
    output: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # chars of `text` already handed to the sink
    cancelled: bool = False
    done: bool = False
    t_submit: float = field(default_factory=time.monotonic)
    t_first: float | None = None


class GenerationScheduler:
    def __init__(
        self,
        runner: CausalRunner,
        tokenizer: Tokenizer,
        eos_token_ids: Sequence[int],
        *,
        name: str = "model",
        max_num_seqs: int = 16,
        max_batch_tokens: int = 512,
        max_queued: int = 256,
    ):
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos = frozenset(eos_token_ids)
        self.name = name
        self.max_num_seqs = min(max_num_seqs, runner.capacity)
        self.max_batch_tokens = max_batch_tokens
        self.max_queued = max_queued
        self._ids = itertools.count()
        self._cv = threading.Condition()
        self._waiting: deque[GenSequence] = deque()
        self._prefilling: list[GenSequence] = []
        self._running: list[GenSequence] = []
        self._cancel_pending = False
        self._stopping = False
        self._step_seconds = 0.05  # moving average, for Retry-After
        self._thread = threading.Thread(target=self._loop, name=f"gen-{name}", daemon=True)
        self._thread.start()

    # -- called from any thread --

    def submit(self, prompt: Sequence[int], params: SamplingParams, sink: Sink) -> GenSequence:
        limit = self.runner.max_seq_len
        if not prompt:
            raise EngineError("The prompt is empty.", param="messages")
        if len(prompt) + params.max_tokens > limit:
            raise EngineError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(prompt) + params.max_tokens} tokens ({len(prompt)} in the prompt, {params.max_tokens} "
                "for the completion). Please reduce the prompt or the completion length.",
                param="messages", code="context_length_exceeded",
            )
        seq = GenSequence(
            id=next(self._ids), prompt=list(prompt), params=params, sink=sink,
            state=SequenceState(params, np.random.default_rng(params.seed)),
            detok=DecodeStream(skip_special_tokens=True),
        )
        with self._cv:
            if self._stopping:
                raise Overloaded("The server is shutting down.", retry_after=5)
            if len(self._waiting) >= self.max_queued:
                raise Overloaded(
                    f"Too many queued requests for {self.name}; retry shortly.", retry_after=self.retry_after()
                )
            self._waiting.append(seq)
            metrics.QUEUE_DEPTH.labels(self.name).set(len(self._waiting))
            self._cv.notify()
        return seq

    def cancel(self, seq: GenSequence) -> None:
        if seq.done:
            return
        with self._cv:
            seq.cancelled = True
            self._cancel_pending = True
            self._cv.notify()

    def retry_after(self) -> float:
        """Seconds until a queued request could likely start: queue drained at the current pace."""
        per_seq = self._step_seconds * 64
        return max(1.0, min(60.0, len(self._waiting) * per_seq / max(1, self.max_num_seqs)))

    @property
    def busy(self) -> int:
        return len(self._waiting) + len(self._prefilling) + len(self._running)

    def stats(self) -> dict:
        return {"waiting": len(self._waiting), "prefilling": len(self._prefilling), "running": len(self._running)}

    def shutdown(self, abort: bool = True) -> None:
        with self._cv:
            self._stopping = True
            if abort:
                for seq in [*self._waiting, *self._prefilling, *self._running]:
                    seq.cancelled = True
                self._cancel_pending = True
            self._cv.notify()
        self._thread.join(timeout=10)

    # -- the loop (scheduler thread only) --

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._waiting or self._prefilling or self._running or self._stopping):
                    self._cv.wait()
                if self._stopping and not (self._waiting or self._prefilling or self._running):
                    return
                if self._cancel_pending:
                    self._cancel_pending = False
                    self._reap_cancelled()
                while self._waiting and len(self._prefilling) + len(self._running) < self.max_num_seqs:
                    self._prefilling.append(self._waiting.popleft())
                metrics.QUEUE_DEPTH.labels(self.name).set(len(self._waiting))
            try:
                t0 = time.monotonic()
                self._prefill_step()
                if self._running:
                    self._decode_step()
                    self._step_seconds = 0.9 * self._step_seconds + 0.1 * (time.monotonic() - t0)
            except Exception:  # the loop must survive; the affected requests get an error
                log.exception("engine step failed for %s", self.name)
                for seq in [*self._prefilling, *self._running]:
                    self._finish(seq, "error", error="The engine failed while generating.")
            metrics.RUNNING_SEQS.labels(self.name).set(len(self._running))

    def _reap_cancelled(self) -> None:
        self._waiting = deque(s for s in self._waiting if not s.cancelled)
        for seq in [s for s in (*self._prefilling, *self._running) if s.cancelled]:
            self._finish(seq, "abort")

    def _prefill_step(self) -> None:
        budget = max(self.max_batch_tokens - len(self._running), 16)
        for seq in list(self._prefilling):
            if budget <= 0:
                break
            if seq.prefilled == 0 and hasattr(self.runner, "reuse_prefix"):
                seq.prefilled = self.runner.reuse_prefix(seq.id, seq.prompt)
            chunk = seq.prompt[seq.prefilled : seq.prefilled + budget]
            try:
                logits = self.runner.prefill(seq.id, chunk)
            except EngineError as exc:
                self._finish(seq, "error", error=str(exc))
                continue
            seq.prefilled += len(chunk)
            budget -= len(chunk)
            if seq.prefilled == len(seq.prompt):
                if hasattr(self.runner, "cache_prefix"):
                    self.runner.cache_prefix(seq.id, seq.prompt)
                self._prefilling.remove(seq)
                self._running.append(seq)
                token = self.runner.sample(logits, [seq.state])[0]
                self._accept(seq, token)

    def _decode_step(self) -> None:
        batch = self._running
        logits = self.runner.decode([s.id for s in batch], [s.output[-1] for s in batch])
        tokens = self.runner.sample(logits, [s.state for s in batch])
        metrics.BATCH_SIZE.labels(self.name, "decode").observe(len(batch))
        for seq, token in zip(list(batch), tokens, strict=True):
            self._accept(seq, token)

    def _accept(self, seq: GenSequence, token: int) -> None:
        now = time.monotonic()
        if seq.t_first is None:
            seq.t_first = now
            metrics.TTFT_SECONDS.labels(self.name).observe(now - seq.t_submit)
        p = seq.params
        if token in self.eos and not p.ignore_eos or token in p.stop_token_ids:
            self._finish(seq, "stop")
            return
        seq.output.append(token)
        piece = seq.detok.step(self.tokenizer, token) or ""
        seq.text += piece
        if p.stop:
            hit = _find_stop(seq.text, p.stop, seq.sent)
            if hit is not None:
                seq.text = seq.text[:hit]
                self._finish(seq, "stop")
                return
        if len(seq.output) >= p.max_tokens or len(seq.prompt) + len(seq.output) >= self.runner.max_seq_len:
            self._finish(seq, "length")
            return
        upto = len(seq.text) - _holdback(seq.text, p.stop) if p.stop else len(seq.text)
        if upto > seq.sent:
            seq.sink(Event(text=seq.text[seq.sent : upto], token_id=token))
            seq.sent = upto

    def _finish(self, seq: GenSequence, reason: str, error: str | None = None) -> None:
        seq.done = True
        if seq in self._running:
            self._running.remove(seq)
        if seq in self._prefilling:
            self._prefilling.remove(seq)
        self.runner.release(seq.id)
        if seq.t_first is not None and len(seq.output) > 1:
            metrics.TPOT_SECONDS.labels(self.name).observe(
                (time.monotonic() - seq.t_first) / (len(seq.output) - 1)
            )
        if reason == "abort":
            return
        seq.sink(Event(
            text=seq.text[seq.sent :], finish_reason=reason, error=error,
            prompt_tokens=len(seq.prompt), completion_tokens=len(seq.output),
        ))
        seq.sent = len(seq.text)


def _find_stop(text: str, stops: Sequence[str], sent: int) -> int | None:
    """Earliest index where a stop string starts, searching only text that could hold a new match."""
    start = max(0, sent - max(len(s) for s in stops))
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
