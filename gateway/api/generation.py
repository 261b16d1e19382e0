"""Shared by /v1/chat/completions and /v1/completions: n choices per prompt, streamed or gathered."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from .. import errors
from ..engines.base import EngineError, Overloaded, SamplingParams
from ..engines.llm import LLMEngine
from ..protocol import Usage, new_id, now
from ..scheduler.generation import Event
from . import common

log = logging.getLogger("fmgate.api")

# chunk(index, text, finish_reason) -> one choice object of the route's own shape
ChoiceChunk = Callable[[int, str, str | None], dict]


def plan(request: Request, req: Any, engine: LLMEngine, prompts: list[list[int]], max_tokens: int | None,
         ) -> tuple[list[SamplingParams], int]:
    """Validate limits and build one SamplingParams per choice; returns (params, tokens to reserve)."""
    limits = request.app.state.settings.limits
    if req.n > limits.max_n:
        raise errors.bad_request(f"n must be at most {limits.max_n}.", param="n")
    stops = req.stop_list()
    if len(stops) > limits.max_stop:
        raise errors.bad_request(f"At most {limits.max_stop} stop sequences are allowed.", param="stop")
    if max_tokens is not None and max_tokens > limits.max_tokens_cap:
        raise errors.bad_request(f"max_tokens must be at most {limits.max_tokens_cap}.", param="max_tokens")
    ctx = engine.max_model_len
    longest = max(len(p) for p in prompts)
    if longest >= ctx:
        raise errors.bad_request(
            f"This model's maximum context length is {ctx} tokens, but the prompt has {longest} tokens. "
            "Please shorten the prompt.", param="messages", code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = min(limits.max_tokens_cap, ctx - longest)
    elif longest + max_tokens > ctx:
        raise errors.bad_request(
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} for the completion). "
            "Please reduce the prompt or the completion length.",
            param="max_tokens", code="context_length_exceeded",
        )
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    params = []
    for _ in prompts:
        for j in range(req.n):
            seed = None if req.seed is None else (req.seed + j) % 2**63
            params.append(SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                         seed=seed, stop=stops))
    reserve = sum(len(p) for p in prompts) + len(params) * max_tokens
    return params, reserve


async def respond(call: common.Call, engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams],
                  stream: bool, include_usage: bool, obj: str, choice: ChoiceChunk, full: ChoiceChunk,
                  id_prefix: str) -> Any:
    """Submit every choice, then stream chunks or gather the whole reply."""
    n = len(params) // len(prompts)
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    seqs = []
    prompt_tokens = sum(len(p) for p in prompts)
    try:
        for idx, sp in enumerate(params):
            seqs.append(engine.submit(prompts[idx // n], sp,
                                      lambda ev, i=idx: loop.call_soon_threadsafe(queue.put_nowait, (i, ev))))
    except (Overloaded, EngineError) as exc:
        for s in seqs:
            engine.cancel(s)
        call.settle_soon(0, 0)
        raise common.overloaded(exc) if isinstance(exc, Overloaded) else common.engine_error(exc) from exc

    progress = [0] * len(params)  # completion tokens seen per choice, for usage on disconnect

    def abort() -> None:
        for s in seqs:
            engine.cancel(s)
        call.settle_soon(prompt_tokens, sum(progress))

    rid, created, model = new_id(id_prefix), now(), call.model.name
    fingerprint = f"fp_{call.model.variant}"
    headers = dict(call.grant.headers)

    def envelope(choices: list[dict], usage: dict | None = None, with_usage_key: bool = False) -> dict:
        out = {"id": rid, "object": obj, "created": created, "model": model,
               "system_fingerprint": fingerprint, "choices": choices}
        if usage is not None or with_usage_key:
            out["usage"] = usage
        return out

    if stream:
        async def events() -> AsyncIterator[str]:
            left = len(params)
            completion = 0
            try:
                if obj == "chat.completion.chunk":
                    for i in range(len(params)):
                        first = choice(i, "", None)
                        first["delta"] = {"role": "assistant", "content": ""}
                        yield common.sse(envelope([first], with_usage_key=include_usage))
                while left:
                    i, ev = await queue.get()
                    if ev.token_id is not None:
                        progress[i] += 1
                    if ev.finish_reason == "error":
                        abort()
                        err = errors.APIError(500, ev.error or "The engine failed.", errors.SERVER)
                        yield common.sse(err.body())
                        return
                    if ev.text or ev.finish_reason:
                        yield common.sse(envelope([choice(i, ev.text, ev.finish_reason)],
                                                  with_usage_key=include_usage))
                    if ev.finish_reason:
                        left -= 1
                        completion += ev.completion_tokens
                        progress[i] = ev.completion_tokens
                usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                              total_tokens=prompt_tokens + completion).model_dump()
                call.settle_soon(prompt_tokens, completion)
                if include_usage:
                    yield common.sse(envelope([], usage))
                yield "data: [DONE]\n\n"
            finally:
                abort()  # no-op once settled; on disconnect it frees the slots and records usage

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache"})

    async def gather() -> list[Event]:
        texts = [[] for _ in params]
        finals: list[Event | None] = [None] * len(params)
        left = len(params)
        while left:
            i, ev = await queue.get()
            texts[i].append(ev.text)
            if ev.token_id is not None:
                progress[i] += 1
            if ev.finish_reason:
                ev.text = "".join(texts[i])
                finals[i] = ev
                progress[i] = ev.completion_tokens
                left -= 1
        return finals  # type: ignore[return-value]

    try:
        finals = await common.until_disconnect(call.request, gather(), abort)
    except BaseException:
        abort()
        raise
    completion = sum(ev.completion_tokens for ev in finals)
    call.settle_soon(prompt_tokens, completion)
    failed = next((ev for ev in finals if ev.finish_reason == "error"), None)
    if failed is not None:
        raise errors.APIError(500, failed.error or "The engine failed.", errors.SERVER)
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)
    body = envelope([full(i, ev.text, ev.finish_reason) for i, ev in enumerate(finals)], usage.model_dump())
    return JSONResponse(body, headers=headers)
