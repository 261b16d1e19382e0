"""POST /v1/embeddings"""

from __future__ import annotations

import asyncio
import base64

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .. import errors
from ..engines.base import EngineError, Overloaded
from ..protocol import EmbeddingRequest
from . import common

router = APIRouter()


@router.post("/v1/embeddings")
async def create_embeddings(req: EmbeddingRequest, request: Request):
    common.warn_unknown("embeddings", req.unknown_fields())
    principal = await common.authenticate(request)
    served = common.resolve(request, principal, req.model, "embed")
    engine = served.engine
    limits = request.app.state.settings.limits
    batch = req.batch()
    if len(batch) > limits.max_embedding_inputs:
        raise errors.bad_request(f"At most {limits.max_embedding_inputs} inputs are allowed.", param="input")
    if req.dimensions is not None and req.dimensions != engine.dim:
        raise errors.bad_request(f"This model has {engine.dim} dimensions; it cannot return {req.dimensions}.",
                                 param="dimensions")
    try:
        if isinstance(batch[0], str):
            ids = await asyncio.to_thread(engine.tokenize, batch)  # keep the event loop free
        else:
            ids = engine.check_ids(batch)
    except EngineError as exc:
        raise common.engine_error(exc) from exc
    cap = min(engine.max_length, limits.max_embedding_input_tokens)
    if (longest := max(len(x) for x in ids)) > cap:
        raise errors.bad_request(f"An input has {longest} tokens; at most {cap} are allowed.", param="input")
    tokens = sum(len(x) for x in ids)
    call = await common.admit(request, principal, served, tokens)
    try:
        vectors = await common.until_disconnect(request, engine.aembed_ids(ids), lambda: None)
    except Overloaded as exc:
        call.settle_soon(0, 0)
        raise common.overloaded(exc) from exc
    except BaseException:
        call.settle_soon(tokens, 0)
        raise
    call.settle_soon(tokens, 0)
    if req.encoding_format == "base64":
        data = _base64_rows(vectors)
    else:
        data = vectors.tolist()
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
        "model": served.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return JSONResponse(body, headers=dict(call.grant.headers))


def _base64_rows(vectors) -> list[str]:
    """One base64 string per row; a single encode sliced by row when rows are whole 3-byte groups."""
    raw = vectors.astype("<f4", copy=False).tobytes()
    row = vectors.shape[1] * 4
    if row % 3:
        return [base64.b64encode(raw[i:i + row]).decode() for i in range(0, len(raw), row)]
    text = base64.b64encode(raw).decode()
    step = row // 3 * 4
    return [text[i:i + step] for i in range(0, len(text), step)]
