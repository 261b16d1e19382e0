"""Continuous (iteration-level) batching for generation. Knows nothing of HTTP or asyncio.

One thread owns the runner. Each iteration it
1. ends cancelled and overdue sequences (a disconnected client frees its slot within one step),
2. admits waiting requests while slots are free: FCFS, or with the fair policy (FMGATE_FAIRNESS=fair)
   the slot goes to the waiting tenant with the fewest running sequences per unit of weight; when every
   slot is taken, a waiting tenant under its weighted share preempts one sequence of the tenant most over
   it (see gateway.scheduler.fair.preemption), so a key with nothing running starts at the next step
   however many streams another key keeps busy,
3. prefills prompts in chunks, at most `max_batch_tokens - running` prompt tokens per iteration,
   so a long prompt never stalls the decoders for more than one chunk; with the fair policy the
   prompts of tenants with the fewest running sequences go first, so a newcomer's prompt is not
   queued behind a flood's long chunked prompts; the iteration's chunks go to the runner in one
   `prefill_many` call where it has one, so a burst of arrivals costs one forward, not one each,
4. runs one batched decode step for every running sequence and hands each new token to its sink.
Finished sequences leave the batch at once; new ones join at the next step boundary.

A preempted sequence keeps everything but its KV cache (its tokens, sampling and grammar state, its
detokenizer); it goes back to the head of its tenant's queue. When it is admitted again its KV is rebuilt
the way it was first computed: the full blocks it had come back from the runner's prefix cache (a copy),
the rest of the prompt is prefilled, and the generated tokens past the restored blocks are replayed as
decode steps whose logits are dropped (a prefill of them would round a little differently and could flip
a near-tie). Then it continues where it stopped, with the output it would have had unpaused.

Failures are contained: a sequence whose own input breaks (a grammar, a token, its sink) ends alone
with an error; a runner fault fails the batch it ran; if the thread itself dies, every sequence gets
a final "engine_failed" event, `alive` turns False and `submit` raises EngineUnavailable.
Every sequence gets exactly one final event, cancelled ones included (finish_reason "abort").
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from .. import metrics
from ..engines import sampling
from ..engines.base import (
    CausalRunner,
    EngineError,
    EngineUnavailable,
    Overloaded,
    SamplingParams,
    TokenLogprob,
)

log = logging.getLogger("fmgate.scheduler")

# A runner that faults this many steps in a row is treated as dead (the thread stops; see `alive`).
MAX_CONSECUTIVE_FAULTS = 3


@dataclass
class Event:
    """What a sequence produced since its previous event. `finish_reason` is set on its last event."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)  # every token accepted since the previous event
    logprobs: list[TokenLogprob] | None = None  # aligned with tokens when params.logprobs is not None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first event only, when asked; [0] is None
    finish_reason: str | None = None  # stop | length | abort | error
    error: str | None = None
    error_code: str | None = None  # deadline_exceeded | engine_failed | engine_error | grammar_error | ...
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def token_id(self) -> int | None:
        """The last token of this event (older callers' view of one token per event)."""
        return self.tokens[-1] if self.tokens else None


Sink = Callable[[Event], None]


@dataclass(eq=False)
class GenSequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    sink: Sink
    state: sampling.SamplingState
    detok: DecodeStream
    prefilled: int = 0
    output: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # chars of `text` already handed to the sink
    pending: list[int] = field(default_factory=list)  # accepted tokens not yet in an event
    pending_lp: list[TokenLogprob] = field(default_factory=list)
    prompt_lp: list[TokenLogprob | None] | None = None
    cancelled: bool = False
    done: bool = False
    t_submit: float = field(default_factory=time.monotonic)
    t_first: float | None = None
    preempted: int = 0  # times this sequence was paused to give its slot to another tenant
    replay: list[int] = field(default_factory=list)  # resuming: generated tokens to feed back, not sample


class _Fifo:
    """First come, first served; the interface of gateway.scheduler.fair.FairQueue."""

    def __init__(self) -> None:
        self._q: deque[GenSequence] = deque()

    def push(self, seq: GenSequence) -> None:
        self._q.append(seq)

    def pop(self) -> GenSequence:
        return self._q.popleft()

    def remove_if(self, pred: Callable[[GenSequence], bool]) -> list[GenSequence]:
        gone = [s for s in self._q if pred(s)]
        if gone:
            self._q = deque(s for s in self._q if not pred(s))
        return gone

    def __len__(self) -> int:
        return len(self._q)

    def __iter__(self) -> Iterator[GenSequence]:
        return iter(self._q)


def _waiting_queue():
    try:
        from .fair import FairQueue
    except ImportError:
        return _Fifo()
    return FairQueue()


def _plain(p: SamplingParams) -> bool:
    """Parameters any runner's own `sample` handles (greedy or temperature/top-p), with no logprobs."""
    return (p.constraint is None and p.logprobs is None and not p.top_k and not p.min_p
            and not p.presence_penalty and not p.frequency_penalty and p.repetition_penalty == 1.0
            and not p.logit_bias)


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
        self._waiting = _waiting_queue()
        self._prefilling: list[GenSequence] = []
        self._running: list[GenSequence] = []
        self._live: set[GenSequence] = set()  # submitted and not yet given their final event
        self._cancel_pending = False
        self._stopping = False
        self._failed: str | None = None  # why the thread died
        self._faults = 0  # runner faults since the last good decode step
        self._step_seconds = 0.05  # moving average, for Retry-After
        self._fair = getattr(self._waiting, "policy", "fcfs") == "fair"
        self._arrived = False  # something was submitted since the last admission
        self.preemptions = 0  # sequences paused to give their slot to another tenant
        self._admissions = itertools.count()
        self._last_served: dict[str, int] = {}  # tenant -> its latest admission's number (ties go round)
        metrics.ENGINE_UP.labels(name).set(1)
        self._thread = threading.Thread(target=self._main, name=f"gen-{name}", daemon=True)
        self._thread.start()

    # -- called from any thread --

    @property
    def alive(self) -> bool:
        """False once the scheduler thread has died or stopped: nothing submitted would ever run."""
        return self._failed is None and not self._stopping and self._thread.is_alive()

    def submit(self, prompt: Sequence[int], params: SamplingParams, sink: Sink) -> GenSequence:
        return self.submit_many([(prompt, params, sink)])[0]

    def submit_many(self, requests: Sequence[tuple[Sequence[int], SamplingParams, Sink]]) -> list[GenSequence]:
        """Queue every request or none: a refusal (EngineError, Overloaded, EngineUnavailable) queues nothing."""
        seqs = [self._new_seq(prompt, params, sink) for prompt, params, sink in requests]
        with self._cv:
            if self._failed is not None:
                raise EngineUnavailable(f"The engine for {self.name} failed: {self._failed}", retry_after=30)
            if self._stopping:
                raise Overloaded("The server is shutting down.", retry_after=5)
            if len(self._waiting) + len(seqs) > self.max_queued:
                raise Overloaded(
                    f"Too many queued requests for {self.name}; retry shortly.", retry_after=self.retry_after()
                )
            for seq in seqs:
                self._waiting.push(seq)
            self._live.update(seqs)
            self._arrived = True
            metrics.QUEUE_DEPTH.labels(self.name).set(len(self._waiting))
            self._cv.notify()
        return seqs

    def _new_seq(self, prompt: Sequence[int], params: SamplingParams, sink: Sink) -> GenSequence:
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
        vocab = self.runner.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise EngineError(f"Token id {bad} is outside this model's vocabulary (0 to {vocab - 1}).",
                              param="prompt")
        if params.prompt_logprobs is not None and not getattr(self.runner, "prompt_logits", False):
            raise EngineError("Prompt logprobs are not available on this engine.", param="logprobs")
        return GenSequence(
            id=next(self._ids), prompt=list(prompt), params=params, sink=sink, state=sampling.SamplingState(params, prompt),
            # Stop strings are matched on text here, so a sequence with some keeps its detokenizer.
            detok=DecodeStream(skip_special_tokens=True) if params.detokenize or params.stop else None,
            prompt_lp=[None] if params.prompt_logprobs is not None else None,
        )

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
        """Stop the thread; with `abort`, every unfinished sequence gets its final "abort" event first."""
        with self._cv:
            self._stopping = True
            if abort:
                for seq in [*self._waiting, *self._prefilling, *self._running]:
                    seq.cancelled = True
                self._cancel_pending = True
            self._cv.notify()
        self._thread.join(timeout=30)
        metrics.ENGINE_UP.labels(self.name).set(0)

    # -- the loop (scheduler thread only) --

    def _main(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # the watchdog: nothing may be left waiting on a dead thread
            self._die(exc)

    def _die(self, exc: BaseException) -> None:
        with self._cv:
            self._failed = f"{type(exc).__name__}: {exc}"
            self._waiting.remove_if(lambda s: True)
            self._prefilling, self._running = [], []
            seqs = list(self._live)  # wherever the thread left them
        log.error("engine thread for %s died; the model is unavailable", self.name, exc_info=exc)
        metrics.ENGINE_FAILURES.labels(self.name).inc()
        metrics.ENGINE_UP.labels(self.name).set(0)
        for seq in seqs:
            self._end(seq, "error", "The engine for this model failed; retry later.", "engine_failed")
        metrics.QUEUE_DEPTH.labels(self.name).set(0)
        metrics.RUNNING_SEQS.labels(self.name).set(0)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (len(self._waiting) or self._prefilling or self._running or self._stopping):
                    self._cv.wait()
                if self._stopping and not (len(self._waiting) or self._prefilling or self._running):
                    return
                reap = self._cancel_pending
                self._cancel_pending = False
                gone = self._waiting.remove_if(lambda s: s.cancelled) if reap else []
                gone += self._waiting.remove_if(_overdue) if any(map(_has_deadline, self._waiting)) else []
                self._arrived = False
                paused = self._admit()
                metrics.QUEUE_DEPTH.labels(self.name).set(len(self._waiting))
            # Runner work (release, resize) happens outside the lock that submit and cancel take.
            for seq in gone:
                self._finish_early(seq)
            for seq in paused:
                self._drop_kv(seq)
            for seq in [s for s in (*self._prefilling, *self._running) if s.cancelled or _overdue(s)]:
                self._finish_early(seq)
            t0 = time.monotonic()
            self._prefill_step()
            if self._fair and self._arrived and self._running:
                self._admit_before_decode()
            if self._running:
                self._decode_step()
                self._step_seconds = 0.9 * self._step_seconds + 0.1 * (time.monotonic() - t0)
            metrics.RUNNING_SEQS.labels(self.name).set(len(self._running))

    def _admit(self) -> list[GenSequence]:
        """Fill free slots from the waiting queue; with the fair policy, preempt for an under-share tenant.
        Caller holds the lock. Returns the paused sequences, already requeued: their KV is dropped next,
        before any prefill, so the runner has a free row for each newcomer."""
        if not self._fair:
            while len(self._waiting) and len(self._prefilling) + len(self._running) < self.max_num_seqs:
                self._prefilling.append(self._waiting.pop())
            return []
        from .fair import next_tenant, preemption

        active: dict[str, int] = {}
        weights: dict[str, float] = {}
        for seq in (*self._prefilling, *self._running):
            t, w = _tenant(seq)
            active[t] = active.get(t, 0) + 1
            weights[t] = w
        paused: list[GenSequence] = []
        while len(self._waiting):
            waiting = self._waiting.tenants()
            if len(self._prefilling) + len(self._running) < self.max_num_seqs:
                tenant = next_tenant(active, waiting, self._last_served)
            else:
                move = preemption(active, weights, waiting, self._last_served)
                victim = None if move is None else self._victim(move[1])
                if victim is None:
                    break
                tenant = move[0]
                self._pause(victim)
                paused.append(victim)
                active[move[1]] -= 1
            seq = self._waiting.pop_tenant(tenant)
            self._prefilling.append(seq)
            if len(self._last_served) > 10_000:  # only ties use it; forget tenants long gone
                self._last_served.clear()
            self._last_served[tenant] = next(self._admissions)
            t, w = _tenant(seq)
            active[t] = active.get(t, 0) + 1
            weights[t] = w
        return paused

    def _admit_before_decode(self) -> None:
        """Fair policy: a request that arrived during this iteration's prefills is admitted (and its prompt
        prefilled) before the decode step, so a newcomer waits for at most one of the two phases."""
        with self._cv:
            self._arrived = False
            before = set(self._prefilling)
            paused = self._admit()
            fresh = any(s not in before for s in self._prefilling)
            metrics.QUEUE_DEPTH.labels(self.name).set(len(self._waiting))
        for seq in paused:
            self._drop_kv(seq)
        if fresh:
            self._prefill_step()

    def _victim(self, tenant: str) -> GenSequence | None:
        """The tenant's most recently admitted sequence that can be paused (not one whose prompt logprobs
        are still being gathered, nor one already ending)."""
        for seq in (*reversed(self._prefilling), *reversed(self._running)):
            if (_tenant(seq)[0] == tenant and seq.prompt_lp is None and not seq.done and not seq.cancelled
                    and not _overdue(seq)):
                return seq
        return None

    def _pause(self, seq: GenSequence) -> None:
        if seq in self._running:
            self._running.remove(seq)
        else:
            self._prefilling.remove(seq)
        seq.preempted += 1
        self.preemptions += 1
        self._waiting.requeue(seq)

    def _drop_kv(self, seq: GenSequence) -> None:
        """Free a paused sequence's runner row; its full KV blocks go to the prefix cache first, so the
        resume mostly copies them back instead of recomputing them."""
        if seq.done:
            return
        try:
            if hasattr(self.runner, "cache_prefix"):
                self.runner.cache_prefix(seq.id, seq.prompt + seq.output)
        except Exception:  # only an optimisation
            log.debug("prefix caching of a paused sequence of %s failed", self.name, exc_info=True)
        self.runner.release(seq.id)
        seq.prefilled = 0
        seq.replay = []
        metrics.PREEMPTIONS.labels(self.name).inc()

    def _finish_early(self, seq: GenSequence) -> None:
        if seq.cancelled:
            self._finish(seq, "abort")
        else:
            self._finish(seq, "error", f"The request did not finish within its deadline "
                         f"({seq.params.deadline - seq.t_submit:.1f} s).", "deadline_exceeded")

    def _fault(self, what: str, seqs: Sequence[GenSequence]) -> None:
        """A runner call failed: fail the sequences it ran. A runner that fails again and again with no
        good decode step in between is dead (its state can no longer be trusted)."""
        self._faults += 1
        log.exception("engine %s failed for %s (%d in a row)", what, self.name, self._faults)
        for seq in list(seqs):
            self._finish(seq, "error", "The engine failed while generating.", "engine_error")
        if self._faults >= MAX_CONSECUTIVE_FAULTS:
            raise RuntimeError(f"{self._faults} engine steps failed in a row")

    def _prefill_order(self) -> list[GenSequence]:
        """FCFS: admission order. Fair: tenants with the fewest running sequences per weight first (stable),
        so a newcomer's short prompt is not queued behind a flood's long chunked ones."""
        if not self._fair or len(self._prefilling) < 2:
            return list(self._prefilling)
        load: dict[str, float] = {}
        for seq in self._running:
            t, w = _tenant(seq)
            load[t] = load.get(t, 0.0) + 1.0 / max(w, 1e-3)
        return sorted(self._prefilling, key=lambda s: load.get(_tenant(s)[0], 0.0))

    def _prefill_step(self) -> None:
        """Prefill chunks within this step's token budget, in `_prefill_order`. With a runner that has
        `prefill_many`, the step's chunks go together in one call (one forward for a burst of new prompts);
        a sequence gathering prompt logprobs needs every position's logits and is prefilled alone."""
        budget = max(self.max_batch_tokens - len(self._running), 16)
        together = hasattr(self.runner, "prefill_many")
        batch: list[tuple[GenSequence, list[int]]] = []
        for seq in self._prefill_order():
            if budget <= 0:
                break
            resumed = bool(seq.output)  # paused after it had generated: rebuild its KV, then go on
            if seq.prefilled == 0 and seq.prompt_lp is None and hasattr(self.runner, "reuse_prefix"):
                seq.prefilled = self.runner.reuse_prefix(seq.id, seq.prompt + seq.output if resumed else seq.prompt)
            if resumed and seq.prefilled >= len(seq.prompt):
                self._resume(seq)
                continue
            chunk = seq.prompt[seq.prefilled : seq.prefilled + budget]
            if together and seq.prompt_lp is None:
                batch.append((seq, chunk))
                budget -= len(chunk)
            elif self._prefill_one(seq, chunk):
                budget -= len(chunk)
        if len(batch) == 1:
            self._prefill_one(*batch[0])
        elif batch:
            self._prefill_many(batch)

    def _prefill_one(self, seq: GenSequence, chunk: list[int]) -> bool:
        """Prefill one sequence's chunk; False if the sequence ended instead."""
        start = seq.prefilled
        try:
            if seq.prompt_lp is not None:
                logits = self.runner.prefill(seq.id, chunk, all_logits=True)
                self._prompt_logprobs(seq, logits, start, len(chunk))
                logits = logits[-1]
            else:
                logits = self.runner.prefill(seq.id, chunk)
        except EngineError as exc:
            self._finish(seq, "error", str(exc), exc.code)
            return False
        except Exception:
            self._fault("prefill", [seq])
            return False
        if self._prefilled(seq, len(chunk)):
            self._sample_and_accept([seq], logits.reshape(1, -1))  # runners give [vocab] or [1, vocab]
        return True

    def _prefill_many(self, batch: list[tuple[GenSequence, list[int]]]) -> None:
        """Several sequences' chunks in one runner call; their first tokens are sampled together."""
        seqs = [seq for seq, _ in batch]
        try:
            logits = self.runner.prefill_many([s.id for s in seqs], [chunk for _, chunk in batch])
        except EngineError:  # nothing ran: one by one, so only the sequence at fault ends
            for seq, chunk in batch:
                self._prefill_one(seq, chunk)
            return
        except Exception:
            self._fault("prefill", seqs)
            return
        metrics.BATCH_SIZE.labels(self.name, "prefill").observe(len(seqs))
        ready = [i for i, (seq, chunk) in enumerate(batch) if self._prefilled(seq, len(chunk))]
        if ready:
            self._sample_and_accept([seqs[i] for i in ready], logits[ready])

    def _prefilled(self, seq: GenSequence, n: int) -> bool:
        """Count n more prefilled tokens; True when the sequence has just become ready for its first token."""
        seq.prefilled += n
        if seq.prefilled < len(seq.prompt):
            return False
        if seq.output:  # a resumed sequence goes on from its own output
            self._resume(seq)
            return False
        if hasattr(self.runner, "cache_prefix"):
            self.runner.cache_prefix(seq.id, seq.prompt)
        self._prefilling.remove(seq)
        self._running.append(seq)
        return True

    def _resume(self, seq: GenSequence) -> None:
        """A paused sequence's KV holds its first `prefilled` tokens of prompt + output; the generated ones
        after that are fed back by decode steps (their logits dropped) up to the last, which the next
        decode step feeds as usual."""
        seq.replay = (seq.prompt + seq.output)[seq.prefilled : -1]
        self._prefilling.remove(seq)
        self._running.append(seq)

    def _prompt_logprobs(self, seq: GenSequence, logits: Any, start: int, n: int) -> None:
        """Logprob of each prompt token after the first, from the chunk's logits (row i predicts i + 1)."""
        nxt = seq.prompt[start + 1 : start + n + 1]
        rows = np.asarray(logits[: len(nxt)], dtype=np.float32)
        seq.prompt_lp.extend(sampling.prompt_logprobs(rows, nxt, seq.params.prompt_logprobs))

    def _decode_step(self) -> None:
        batch = list(self._running)
        try:
            logits = self.runner.decode([s.id for s in batch], [s.replay[0] if s.replay else s.output[-1]
                                                                for s in batch])
        except Exception:
            self._fault("decode", batch)
            return
        self._faults = 0
        metrics.BATCH_SIZE.labels(self.name, "decode").observe(len(batch))
        if any(s.replay for s in batch):  # resuming sequences: their token was fed back, not predicted
            keep = [i for i, s in enumerate(batch) if not s.replay]
            for s in batch:
                if s.replay:
                    s.replay.pop(0)
            if not keep:
                return
            batch, logits = [batch[i] for i in keep], logits[keep]
        self._sample_and_accept(batch, logits)

    def _sample_and_accept(self, seqs: list[GenSequence], logits: Any) -> None:
        try:
            tokens, lps = self._sample(seqs, logits)
        except Exception:  # find the row at fault: sample one by one
            tokens, lps = [], []
            for i, seq in enumerate(seqs):
                if seq.done:
                    tokens.append(None)
                    lps.append(None)
                    continue
                try:
                    t, lp = self._sample([seq], logits[i : i + 1])
                except Exception as exc:
                    log.warning("sampling failed for one sequence of %s: %s", self.name, exc)
                    self._finish(seq, "error", f"Sampling failed: {exc}", "sampling_error")
                    t, lp = [None], [None]
                tokens += t
                lps += lp
        for seq, token, lp in zip(seqs, tokens, lps, strict=True):
            if seq.done or token is None:
                continue
            try:
                self._accept(seq, int(token), lp)
            except Exception as exc:
                log.warning("sequence of %s failed on token %s: %s", self.name, token, exc)
                self._finish(seq, "error", f"The engine could not use token {token}.", "bad_token")

    def _sample(self, seqs: list[GenSequence], logits: Any) -> tuple[list[int | None], list[Any]]:
        states = [s.state for s in seqs]
        if not isinstance(logits, np.ndarray) and all(_plain(s.params) for s in seqs):
            return self.runner.sample(logits, states), [None] * len(seqs)  # e.g. on the GPU
        host = np.atleast_2d(logits if isinstance(logits, np.ndarray) else logits.float().cpu().numpy())
        masked = [i for i, s in enumerate(seqs) if s.params.constraint is not None]
        bitmask = None
        broken = set()
        if masked:
            from ..structured import allocate_bitmask

            bitmask = allocate_bitmask(len(seqs), host.shape[-1])
            for i in masked:
                try:
                    seqs[i].params.constraint.fill_bitmask(bitmask, i)
                except Exception as exc:
                    broken.add(i)
                    self._finish(seqs[i], "error", f"The output grammar failed: {exc}", "grammar_error")
        tokens, lps = sampling.sample_rows(host, states, bitmask, masked)
        return [None if i in broken else t for i, t in enumerate(tokens)], lps

    def _accept(self, seq: GenSequence, token: int, lp: TokenLogprob | None) -> None:
        now = time.monotonic()
        if seq.t_first is None:
            seq.t_first = now
            metrics.TTFT_SECONDS.labels(self.name).observe(now - seq.t_submit)
        p = seq.params
        if token in self.eos and not p.ignore_eos or token in p.stop_token_ids:
            self._finish(seq, "stop")
            return
        c = p.constraint
        if c is not None and not c.accept(token):
            self._finish(seq, "error", f"Token {token} does not fit the requested output format.", "grammar_error")
            return
        if hasattr(seq.state, "observe"):
            seq.state.observe(token)
        seq.output.append(token)
        seq.pending.append(token)
        if p.logprobs is not None and lp is not None:
            seq.pending_lp.append(lp)
        if seq.detok is not None:
            seq.text += seq.detok.step(self.tokenizer, token) or ""
        if p.stop:
            hit = _find_stop(seq.text, p.stop, seq.sent)
            if hit is not None:
                seq.text = seq.text[:hit]
                self._finish(seq, "stop")
                return
        if c is not None and c.is_finished():
            self._finish(seq, "stop")
            return
        if len(seq.output) >= p.max_tokens or len(seq.prompt) + len(seq.output) >= self.runner.max_seq_len:
            self._finish(seq, "length")
            return
        if seq.detok is None:  # token ids only: every token goes out as it comes
            self._emit(seq, self._event(seq, ""))
            return
        upto = len(seq.text) - _holdback(seq.text, p.stop) if p.stop else len(seq.text)
        if upto > seq.sent:
            text = seq.text[seq.sent : upto]
            seq.sent = upto
            self._emit(seq, self._event(seq, text))

    def _event(self, seq: GenSequence, text: str, **final: Any) -> Event:
        ev = Event(text=text, tokens=seq.pending, **final)
        seq.pending = []
        if seq.params.logprobs is not None:
            ev.logprobs, seq.pending_lp = seq.pending_lp, []
        if seq.prompt_lp is not None:
            ev.prompt_logprobs, seq.prompt_lp = seq.prompt_lp, None
        return ev

    def _emit(self, seq: GenSequence, ev: Event) -> None:
        """Hand an event over; a sink that raises (its loop closed, say) cancels only its own sequence."""
        try:
            seq.sink(ev)
        except Exception as exc:
            log.warning("the consumer of a sequence of %s failed (%s); cancelling it", self.name, exc)
            seq.cancelled = True
            self._cancel_pending = True

    def _finish(self, seq: GenSequence, reason: str, error: str | None = None, code: str | None = None) -> None:
        if seq.done:
            return
        if seq in self._running:
            self._running.remove(seq)
        if seq in self._prefilling:
            self._prefilling.remove(seq)
        try:
            self.runner.release(seq.id)
        finally:
            if seq.t_first is not None and len(seq.output) > 1:
                metrics.TPOT_SECONDS.labels(self.name).observe(
                    (time.monotonic() - seq.t_first) / (len(seq.output) - 1)
                )
            self._end(seq, reason, error, code)

    def _end(self, seq: GenSequence, reason: str, error: str | None = None, code: str | None = None) -> None:
        """The sequence's one final event (no runner work: also used once the thread is dead)."""
        if seq.done:
            return
        seq.done = True
        self._live.discard(seq)
        text = "" if reason in ("abort", "error") else seq.text[seq.sent :]
        seq.sent = len(seq.text)
        self._emit(seq, self._event(seq, text, finish_reason=reason, error=error, error_code=code,
                                    prompt_tokens=len(seq.prompt), completion_tokens=len(seq.output)))


def _tenant(seq: GenSequence) -> tuple[str, float]:
    p = seq.params
    return p.tenant or "", float(p.weight or 1.0)


def _has_deadline(seq: GenSequence) -> bool:
    return seq.params.deadline is not None


def _overdue(seq: GenSequence) -> bool:
    return seq.params.deadline is not None and time.monotonic() > seq.params.deadline


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
