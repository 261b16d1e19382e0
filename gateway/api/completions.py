"""POST /v1/completions: parse, call the serving module, which maps engine errors onto OpenAI's."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..protocol import CompletionRequest
from . import serving_completions

router = APIRouter()


@router.post("/v1/completions")
async def create_completion(req: CompletionRequest, request: Request):
    return await serving_completions.create(request, req)
