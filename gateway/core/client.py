"""EngineClient: LLMEngine's async API in an API process, with the engine in its core process.

Tokenization (chat_prompt, text_prompt), detokenization (Detokenizer: the core sends token ids only,
except for sequences with stop strings, which it matches on text), logprob token text and bytes, and
grammar compilation (to check a schema and give a 400 early) stay here; the core gets token ids and
SamplingParams, and a grammar as its text. One I/O thread per client owns the DEALER socket: it sends what the event loop queues, hands
each step's outputs to the streams' asyncio queues (one call_soon_threadsafe per message), and watches
the connection: when the core's process dies the socket disconnects at once, every stream in flight
ends with an "engine_failed" error (a 503), `ready` turns False until the restarted core says Welcome.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from ..engines.base import EngineUnavailable, SamplingParams
from ..engines.llm import LLMEngine
from ..scheduler.generation import Event
from . import wire
from .sockets import CoreClient, post, refusal

log = logging.getLogger("fmgate.core.client")

FAILED = "The engine for this model failed; retry later."


class EngineClient(CoreClient, LLMEngine):
    def __init__(self, name: str, address: str, tokenizer: Any, connect_timeout: float = 120.0):
        self.name = name
        self.address = address
        self.tokenizer = tokenizer
        self._ids = itertools.count(1)
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue, int]] = {}
        self._lock = threading.Lock()
        self.runner: Any = None
        self.scheduler: Any = None
        self._start_io(wire, f"core-client-{name}", connect_timeout)

    @classmethod
    def connect(cls, path: Path, cfg: Any, settings: Any) -> EngineClient:
        address = settings.engine_cores.get(cfg.name)
        if not address:
            raise RuntimeError(f"no engine core runs for {cfg.name}: engine_process needs `fmgate serve` to start "
                               "the cores (models added at run time are not served in this mode)")
        from transformers import AutoTokenizer

        return cls(cfg.name, address, AutoTokenizer.from_pretrained(path))

    # -- generation --

    def submit(self, prompt: Sequence[int], params: SamplingParams, sink) -> Any:
        raise NotImplementedError("EngineClient serves the async API (stream, stream_many) only")

    async def stream_many(self, requests: Sequence[tuple[Sequence[int], SamplingParams]],
                          ) -> AsyncIterator[tuple[int, Event]]:
        """As LLMEngine.stream_many: refusals raise before the first event; closing cancels in the core."""
        items = [wire.Item(next(self._ids), [int(t) for t in p], wire.params_out(sp, detokenize=False))
                 for p, sp in requests]
        # The core sends token ids only, except for sequences with stop strings (matched on text there).
        detoks = [None if sp.stop else Detokenizer(self.tokenizer.backend_tokenizer) for _, sp in requests]
        if not self.up:
            raise EngineUnavailable(f"The engine for {self.name} is not available; retry later.", retry_after=5)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        rids = [it.rid for it in items]
        with self._lock:
            for i, rid in enumerate(rids):
                self._streams[rid] = (loop, q, i)
        self._io.send(wire.Submit(items))
        left = len(items)
        try:
            while left:
                item = await q.get()
                if isinstance(item, wire.Refused):
                    left = 0
                    raise refusal(item)
                i, ev = item
                if detoks[i] is not None:
                    ev = detoks[i].step(ev)
                    if ev is None:
                        continue
                if ev.finish_reason is not None:
                    left -= 1
                yield i, ev
        finally:
            with self._lock:
                open_ = [rid for rid in rids if self._streams.pop(rid, None) is not None]
            if open_:
                self._io.send(wire.Abort(open_))

    # -- called by the I/O thread --

    def _deliver(self, outs: list[wire.Out]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for o in outs:
                entry = self._streams.get(o.rid)
                if entry is None:
                    continue  # closed by its consumer; its Abort is on the way
                if o.finish_reason is not None:
                    del self._streams[o.rid]
                loop, q, i = entry
                by_loop.setdefault(loop, []).append((q, (i, wire.event_in(o))))
        for loop, batch in by_loop.items():
            post(loop, _put_all, batch)

    def _received(self, msgs: list) -> None:
        for msg in msgs:
            if isinstance(msg, wire.Outputs):
                self._deliver(msg.outs)
            elif isinstance(msg, wire.Refused):
                self._refused(msg)
            elif isinstance(msg, wire.Welcome):
                self._welcome(msg)

    def _unsent(self, msg: Any) -> None:
        if isinstance(msg, wire.Submit):
            self._refused(wire.Refused([it.rid for it in msg.items], "unavailable",
                                       f"The engine for {self.name} is not available; retry later.", 5))

    def _refused(self, r: wire.Refused) -> None:
        with self._lock:
            entries = [self._streams.pop(rid, None) for rid in r.rids]
        first = next((e for e in entries if e is not None), None)
        if first is not None:
            post(first[0], _put_all, [(first[1], r)])

    def _fail_all(self, reason: str, error: str | None, code: str | None) -> None:
        with self._lock:
            entries, self._streams = list(self._streams.values()), {}
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for loop, q, i in entries:
            ev = Event(finish_reason=reason, error=error, error_code=code)
            by_loop.setdefault(loop, []).append((q, (i, ev)))
        for loop, batch in by_loop.items():
            post(loop, _put_all, batch)

    def _welcome(self, w: wire.Welcome) -> None:
        self.runner = SimpleNamespace(vocab_size=w.vocab_size, max_seq_len=w.max_seq_len, capacity=w.capacity,
                                      device=w.device, prompt_logits=w.prompt_logits)
        self.scheduler = SimpleNamespace(eos=frozenset(w.eos), alive=True)
        self._came_up(w.pid)

    def _fail_in_flight(self, lost: bool) -> None:
        if lost:
            self._fail_all("error", FAILED, "engine_failed")
        else:
            self._fail_all("abort", None, None)


class Detokenizer:
    """One sequence's text from its token ids, as the scheduler makes it in a single process (the tokenizers
    library's DecodeStream): tokens that end inside a character wait, and go out with the next event."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.stream = DecodeStream(skip_special_tokens=True)
        self.held: Event | None = None
        self.done = False

    def step(self, ev: Event) -> Event | None:
        """The event to hand on (with its text), or None while its tokens make no text yet."""
        if self.done:
            return None
        text = ""
        for t in ev.tokens:
            try:
                text += self.stream.step(self.tokenizer, t) or ""
            except Exception:  # what the scheduler does with a token it cannot use
                log.warning("engine client: token %s cannot be decoded", t)
                ev = Event(tokens=ev.tokens, logprobs=ev.logprobs, finish_reason="error",
                           error=f"The engine could not use token {t}.", error_code="bad_token",
                           completion_tokens=ev.completion_tokens)
                text = ""
                break
        if self.held is not None:
            ev = _merge(self.held, ev)
            self.held = None
        if ev.finish_reason is None and not text:
            self.held = ev
            return None
        self.done = ev.finish_reason is not None
        ev.text = "" if ev.finish_reason in ("abort", "error") else text
        return ev


def _merge(a: Event, b: Event) -> Event:
    """b, with a's tokens (and their logprobs, and the prompt's) in front."""
    b.tokens = a.tokens + b.tokens
    if a.logprobs is not None:
        b.logprobs = a.logprobs + (b.logprobs or [])
    if a.prompt_logprobs is not None:
        b.prompt_logprobs = a.prompt_logprobs
    return b


def _put_all(batch: list) -> None:
    for q, item in batch:
        q.put_nowait(item)
