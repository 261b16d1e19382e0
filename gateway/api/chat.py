"""POST /v1/chat/completions"""

from __future__ import annotations

from fastapi import APIRouter, Request

from .. import errors
from ..engines.base import EngineError
from ..protocol import ChatCompletionRequest
from . import common, generation

router = APIRouter()


@router.post("/v1/chat/completions")
async def create_chat_completion(req: ChatCompletionRequest, request: Request):
    common.warn_unknown("chat.completions", req.unknown_fields())
    principal = await common.authenticate(request)
    served = common.resolve(request, principal, req.model, "chat")
    limits = request.app.state.settings.limits
    if len(req.messages) > limits.max_messages:
        raise errors.bad_request(f"At most {limits.max_messages} messages are allowed.", param="messages")
    if (bad := req.unsupported()) is not None:
        raise errors.bad_request(bad[1], param=bad[0], code="unsupported_parameter")
    engine = served.engine
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    try:
        prompt = engine.chat_prompt(messages)
    except EngineError as exc:
        raise common.engine_error(exc) from exc
    params, reserve = generation.plan(request, req, engine, [prompt], req.token_limit())
    call = await common.admit(request, principal, served, reserve)
    include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)

    def chunk(i: int, text: str, finish: str | None) -> dict:
        return {"index": i, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": finish}

    def full(i: int, text: str, finish: str | None) -> dict:
        return {"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None, "finish_reason": finish}

    return await generation.respond(call, engine, [prompt], params, req.stream, include_usage,
                                    "chat.completion.chunk" if req.stream else "chat.completion",
                                    chunk, full, "chatcmpl")
