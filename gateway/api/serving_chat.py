"""Serving /v1/chat/completions: render the prompt off the loop, constrain and sample each choice, and
answer in OpenAI's chat shape (tool calls, logprobs), gathered or streamed."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from .. import errors
from ..protocol import ChatCompletionRequest, new_id, now
from ..scheduler.generation import Event
from . import choices, common, constraints, params


async def create(request: Request, req: ChatCompletionRequest) -> Any:
    common.warn_unknown("chat.completions", req.unknown_fields())
    principal = await common.authenticate(request)
    limits = request.app.state.settings.limits
    if len(req.messages) > limits.max_messages:
        raise errors.bad_request(f"At most {limits.max_messages} messages are allowed.", param="messages")
    params.check_limits(req, limits)
    deadline = common.deadline(request)
    tools = req.all_tools()
    tool_choice = req.choice()
    if tool_choice is not None and not tools:
        raise errors.bad_request("tool_choice needs tools.", param="tool_choice")
    served = await common.acquire(request, principal, req.model, "chat", req.keep_alive)
    try:
        engine = served.engine
        messages = [m.as_dict() for m in req.messages]
        with common.engine_errors(served.name):
            prompt = await asyncio.to_thread(engine.chat_prompt, messages, tools)
            factory = await constraints.constraint(engine, req.response_format, tools, tool_choice,
                                                  req.parallel_tool_calls)
        use_tools = bool(tools) and tool_choice != "none"
        top = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = params.default_max_tokens(req.token_limit(), limits, engine.max_model_len, len(prompt))
        sps = params.sampling(req, max_tokens, 1, engine.runner.vocab_size, deadline, principal,
                              logprobs=top, constraints=factory)
        reserve = len(prompt) + len(sps) * max_tokens
        call = await common.admit(request, principal, served, reserve)
    except BaseException:
        common.release(request, served)
        raise
    run = choices.Choices(call, engine, [(prompt, sp) for sp in sps], len(prompt))
    await run.start(request)
    reply = _Reply(call, engine, req, use_tools)
    if req.stream and run.first_error() is None:
        return StreamingResponse(reply.stream(request, run), media_type="text/event-stream",
                                 headers={**call.grant.headers, "Cache-Control": "no-cache"})
    finals = await run.gather(request)
    return JSONResponse(reply.full(finals, run.usage()), headers=dict(call.grant.headers))


class _Reply:
    """The chat shape of one request's choices."""

    def __init__(self, call: common.Call, engine: Any, req: ChatCompletionRequest, use_tools: bool):
        self.engine = engine
        self.req = req
        self.use_tools = use_tools
        self.rid = new_id("chatcmpl")
        self.created = now()
        self.model = call.model.name
        self.fingerprint = f"fp_{call.model.variant}"

    def envelope(self, obj: str, choice_list: list[dict]) -> dict:
        out = {"id": self.rid, "object": obj, "created": self.created, "model": self.model,
               "system_fingerprint": self.fingerprint, "choices": choice_list}
        if obj == "chat.completion.chunk" and self.req.stream_options and self.req.stream_options.include_usage:
            out["usage"] = None
        return out

    def logprobs(self, entries: list[Any]) -> dict | None:
        if not self.req.logprobs:
            return None
        return {"content": [self._entry(e) for e in entries], "refusal": None}

    def _entry(self, e: Any) -> dict:
        def one(token_id: int, logprob: float) -> dict:
            return {"token": self.engine.token_text(token_id), "logprob": max(float(logprob), -9999.0),
                    "bytes": self.engine.token_bytes(token_id)}
        return {**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in (e.top or [])]}

    # -- gathered --

    def full(self, finals: list[choices.Final], usage: dict) -> dict:
        out = []
        for i, f in enumerate(finals):
            message: dict[str, Any] = {"role": "assistant", "content": f.text, "refusal": None}
            finish = f.finish_reason
            if self.use_tools:
                parser = constraints.parser()
                parser.feed(f.text)
                content, calls = parser.finish()
                message["content"] = content
                if calls:
                    message["tool_calls"] = calls
                    if finish == "stop":
                        finish = "tool_calls"
            out.append({"index": i, "message": message, "logprobs": self.logprobs(f.logprobs),
                        "finish_reason": finish})
        return {**self.envelope("chat.completion", out), "usage": usage}

    # -- streamed --

    async def stream(self, request: Request, run: choices.Choices):
        n = len(run.requests)
        parsers = [constraints.parser() if self.use_tools else None for _ in range(n)]
        called = [False] * n

        def chunk(i: int, delta: dict, finish: str | None = None, logprobs: Any = None) -> dict:
            return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

        def chunks(i: int, ev: Event) -> list[dict]:
            lp = self.logprobs(ev.logprobs or []) if self.req.logprobs else None
            parser = parsers[i]
            if parser is None:
                deltas = [{"content": ev.text}] if ev.text else []
            else:
                deltas = parser.feed(ev.text) if ev.text else []
                if ev.finish_reason is not None:
                    deltas += parser.flush()
                called[i] = called[i] or any("tool_calls" in d for d in deltas)
            out = [chunk(i, d) for d in deltas]
            if lp is not None and lp["content"]:
                if out:
                    out[0]["logprobs"] = lp
                else:
                    out.append(chunk(i, {}, logprobs=lp))
            if ev.finish_reason is not None:
                finish = "tool_calls" if called[i] and ev.finish_reason == "stop" else ev.finish_reason
                out.append(chunk(i, {}, finish))
            return out

        head = [chunk(i, {"role": "assistant", "content": ""}) for i in range(n)]
        async for frame in run.sse(request, chunks, lambda c: self.envelope("chat.completion.chunk", c), head,
                                   bool(self.req.stream_options and self.req.stream_options.include_usage)):
            yield frame
