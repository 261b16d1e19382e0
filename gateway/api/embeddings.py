"""POST /v1/embeddings: parse, call the serving module, which maps engine errors onto OpenAI's."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..protocol import EmbeddingRequest
from . import serving_embeddings

router = APIRouter()


@router.post("/v1/embeddings")
async def create_embeddings(req: EmbeddingRequest, request: Request):
    return await serving_embeddings.create(request, req)
