"""Serving /v1/completions (legacy text completions): tokenize all prompts in one batch off the loop,
n choices per prompt, logprobs and echo (prompt logprobs, as lm-evaluation-harness scores with)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from .. import errors
from ..protocol import CompletionRequest, new_id, now
from ..scheduler.generation import Event
from . import choices, common, params


def tokenize(engine: Any, prompts: list[str | list[int]]) -> list[list[int]]:
    """Blocking: one call into the tokenizers Rust batch encoder for every text prompt."""
    texts = [p for p in prompts if isinstance(p, str)]
    encoded = iter(e.ids for e in engine.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=True)) \
        if texts else iter(())
    vocab = engine.runner.vocab_size
    out = []
    for p in prompts:
        if isinstance(p, str):
            ids = list(next(encoded))
        else:
            if max(p) >= vocab:
                raise errors.bad_request(f"Token ids must be below the vocabulary size {vocab}.", param="prompt")
            ids = list(p)
        if not ids:
            raise errors.bad_request("The prompt is empty.", param="prompt")
        out.append(ids)
    return out


async def create(request: Request, req: CompletionRequest) -> Any:
    common.warn_unknown("completions", req.unknown_fields())
    principal = await common.authenticate(request)
    limits = request.app.state.settings.limits
    texts = req.prompts()
    params.check_limits(req, limits, prompts=len(texts))
    deadline = common.deadline(request)
    served = await common.acquire(request, principal, req.model, "chat", req.keep_alive)
    try:
        engine = served.engine
        prompts = await asyncio.to_thread(tokenize, engine, texts)
        longest = max(len(p) for p in prompts)
        max_tokens = params.default_max_tokens(req.max_tokens, limits, engine.max_model_len, longest)
        prompt_lp = req.logprobs if req.echo and req.logprobs is not None else None
        sps = params.sampling(req, max_tokens, len(prompts), engine.runner.vocab_size, deadline, principal,
                              logprobs=req.logprobs, prompt_logprobs=prompt_lp)
        reserve = sum(len(p) for p in prompts) + len(sps) * max_tokens
        call = await common.admit(request, principal, served, reserve)
    except BaseException:
        common.release(request, served)
        raise
    requests = [(prompts[k // req.n], sp) for k, sp in enumerate(sps)]
    run = choices.Choices(call, engine, requests, sum(len(p) for p in prompts))
    await run.start(request)
    reply = _Reply(call, engine, req, texts, prompts)
    if req.stream and run.first_error() is None:
        return StreamingResponse(reply.stream(request, run), media_type="text/event-stream",
                                 headers={**call.grant.headers, "Cache-Control": "no-cache"})
    finals = await run.gather(request)
    return JSONResponse(reply.full(finals, run.usage()), headers=dict(call.grant.headers))


class _Reply:
    def __init__(self, call: common.Call, engine: Any, req: CompletionRequest, texts: list, prompts: list):
        self.engine = engine
        self.req = req
        self.texts = texts
        self.prompts = prompts
        self.rid = new_id("cmpl")
        self.created = now()
        self.model = call.model.name
        self.fingerprint = f"fp_{call.model.variant}"

    def envelope(self, choice_list: list[dict]) -> dict:
        out = {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model,
               "system_fingerprint": self.fingerprint, "choices": choice_list}
        if self.req.stream and self.req.stream_options and self.req.stream_options.include_usage:
            out["usage"] = None
        return out

    def prompt_text(self, k: int) -> str:
        p = self.texts[k // self.req.n]
        return p if isinstance(p, str) else self.engine.tokenizer.decode(p)

    def logprobs(self, entries: list[Any], offset: int = 0) -> dict:
        """OpenAI's legacy shape: tokens, token_logprobs, top_logprobs, text_offset; a None entry (the
        first prompt token) has no logprob."""
        tokens, values, tops, offsets = [], [], [], []
        pos = offset
        for e in entries:
            if e is None:
                continue
            text = self.engine.token_text(e.token_id)
            tokens.append(text)
            values.append(float(e.logprob))
            tops.append({self.engine.token_text(t): float(lp) for t, lp in (e.top or [])})
            offsets.append(pos)
            pos += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def echo_logprobs(self, k: int, prompt_lps: list[Any] | None, generated: list[Any]) -> dict:
        prompt = self.prompts[k // self.req.n]
        entries = list(prompt_lps or [])
        head = self.logprobs([e for e in entries if e is not None])
        # The first prompt token has no logprob: OpenAI shows it with null.
        first = self.engine.token_text(prompt[0])
        out = {"tokens": [first, *head["tokens"]], "token_logprobs": [None, *head["token_logprobs"]],
               "top_logprobs": [None, *head["top_logprobs"]],
               "text_offset": [0, *[o + len(first) for o in head["text_offset"]]]}
        tail = self.logprobs(generated, offset=len("".join(out["tokens"])))
        for key in out:
            out[key] += tail[key]
        return out

    def full(self, finals: list[choices.Final], usage: dict) -> dict:
        out = []
        for k, f in enumerate(finals):
            text = f.text
            lp = None
            if self.req.echo:
                text = self.prompt_text(k) + text
            if self.req.logprobs is not None:
                lp = self.echo_logprobs(k, f.prompt_logprobs, f.logprobs) if self.req.echo else \
                    self.logprobs(f.logprobs)
            out.append({"index": k, "text": text, "logprobs": lp, "finish_reason": f.finish_reason})
        return {**self.envelope(out), "usage": usage}

    async def stream(self, request: Request, run: choices.Choices):
        started = [False] * len(run.requests)

        def chunks(k: int, ev: Event) -> list[dict]:
            text = ev.text
            lp = None
            if self.req.echo and not started[k]:
                text = self.prompt_text(k) + text
            if self.req.logprobs is not None:
                entries = ev.logprobs or []
                lp = self.echo_logprobs(k, ev.prompt_logprobs, entries) \
                    if self.req.echo and not started[k] else self.logprobs(entries)
            started[k] = True
            if not text and ev.finish_reason is None and not (lp and lp["tokens"]):
                return []
            return [{"index": k, "text": text, "logprobs": lp, "finish_reason": ev.finish_reason}]

        async for frame in run.sse(request, chunks, self.envelope, [],
                                   bool(self.req.stream_options and self.req.stream_options.include_usage)):
            yield frame
