"""POST /v1/chat/completions: parse, call the serving module, which maps engine errors onto OpenAI's."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..protocol import ChatCompletionRequest
from . import serving_chat

router = APIRouter()


@router.post("/v1/chat/completions")
async def create_chat_completion(req: ChatCompletionRequest, request: Request):
    return await serving_chat.create(request, req)
