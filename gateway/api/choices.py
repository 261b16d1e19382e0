"""The choices of one admitted generation request on the engine's async API (`LLMEngine.stream_many`):
events in, usage settled exactly once with the tokens actually produced, whatever ends the request."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from ..engines.base import EngineError, EngineUnavailable, Overloaded, SamplingParams
from ..scheduler.generation import Event
from . import common

Requests = list[tuple[list[int], SamplingParams]]


@dataclass
class Final:
    """One gathered choice."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    prompt_logprobs: list[Any] | None = None
    finish_reason: str | None = None
    event: Event | None = None


class Choices:
    def __init__(self, call: common.Call, engine: Any, requests: Requests, prompt_tokens: int):
        self.call = call
        self.engine = engine
        self.requests = requests
        self.prompt_tokens = prompt_tokens
        self.produced = [0] * len(requests)
        self._events = self._run()
        self._first: tuple[int, Event] | None = None

    @property
    def completion_tokens(self) -> int:
        return sum(self.produced)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    async def _run(self) -> AsyncIterator[tuple[int, Event]]:
        charged = self.prompt_tokens
        try:
            async for i, ev in self.engine.stream_many(self.requests):
                self.produced[i] += len(ev.tokens)
                if ev.finish_reason is not None:
                    self.produced[i] = max(self.produced[i], ev.completion_tokens)
                yield i, ev
        except (EngineError, Overloaded, EngineUnavailable):
            charged = 0  # refused before any work
            raise
        finally:
            self.call.settle_soon(charged, self.completion_tokens)

    async def start(self, request: Request) -> None:
        """Submit and wait for the first event, so refusals are real status codes and a client that
        hangs up while queued frees its place."""
        try:
            with common.engine_errors(self.call.model.name):
                self._first = await common.until_disconnect(request, anext(self._events))
        except StopAsyncIteration:
            self._first = None
        except BaseException:
            await self._events.aclose()
            raise

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        try:
            if self._first is not None:
                yield self._first
            async for item in self._events:
                yield item
        finally:
            await self._events.aclose()

    def first_error(self) -> Event | None:
        if self._first is not None and self._first[1].finish_reason == "error":
            return self._first[1]
        return None

    async def gather(self, request: Request) -> list[Final]:
        """Every choice in full; a client hang-up cancels the rest (ClientDisconnected)."""
        async def collect() -> list[Final]:
            finals = [Final() for _ in self.requests]
            async for i, ev in self.events():
                f = finals[i]
                f.text += ev.text
                f.tokens += ev.tokens
                f.logprobs += ev.logprobs or []
                if ev.prompt_logprobs is not None:
                    f.prompt_logprobs = ev.prompt_logprobs
                if ev.finish_reason is not None:
                    f.finish_reason, f.event = ev.finish_reason, ev
                    if ev.finish_reason == "error":
                        raise common.event_error(ev)
            return finals

        return await common.until_disconnect(request, collect())

    async def sse(self, request: Request, chunks: Callable[[int, Event], list[dict]],
                  envelope: Callable[[list[dict]], dict], head: list[dict], include_usage: bool,
                  ) -> AsyncIterator[bytes]:
        """Server-sent events: head chunks, one chunk per event, an error event if the engine fails,
        the usage chunk when asked, then [DONE]."""
        for c in head:
            yield common.sse(envelope([c]))
        async for i, ev in common.until_disconnect_iter(request, self.events()):
            if ev.finish_reason == "error":
                yield common.sse(common.event_error(ev).body())
                return
            for c in chunks(i, ev):
                yield common.sse(envelope([c]))
        if include_usage:
            yield common.sse({**envelope([]), "usage": self.usage()})
        yield b"data: [DONE]\n\n"
