"""POST /v1/completions (legacy text completions)"""

from __future__ import annotations

from fastapi import APIRouter, Request

from .. import errors
from ..protocol import CompletionRequest
from . import common, generation

router = APIRouter()


@router.post("/v1/completions")
async def create_completion(req: CompletionRequest, request: Request):
    common.warn_unknown("completions", req.unknown_fields())
    principal = await common.authenticate(request)
    served = common.resolve(request, principal, req.model, "chat")
    if (bad := req.unsupported()) is not None:
        raise errors.bad_request(bad[1], param=bad[0], code="unsupported_parameter")
    engine = served.engine
    vocab = engine.runner.vocab_size
    prompts = []
    for p in req.prompts():
        if isinstance(p, str):
            ids = engine.text_prompt(p)
        else:
            if any(t >= vocab for t in p):
                raise errors.bad_request(f"Token ids must be below the vocabulary size {vocab}.", param="prompt")
            ids = list(p)
        if not ids:
            raise errors.bad_request("The prompt is empty.", param="prompt")
        prompts.append(ids)
    if len(prompts) * req.n > request.app.state.settings.limits.max_n * 4:
        raise errors.bad_request("Too many prompts × n in one request.", param="prompt")
    params, reserve = generation.plan(request, req, engine, prompts, req.max_tokens)
    call = await common.admit(request, principal, served, reserve)
    include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)

    def choice(i: int, text: str, finish: str | None) -> dict:
        return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}

    return await generation.respond(call, engine, prompts, params, req.stream, include_usage,
                                    "text_completion", choice, choice, "cmpl")
