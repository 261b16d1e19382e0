"""Serving /v1/embeddings: tokenize, batch on the engine, encode the reply.

Large requests are tokenized and encoded off the event loop (the Rust batch encoder and orjson each
in one worker-thread call). Small ones, the common case of many clients with a sentence each, are
done on the loop: a thread hop costs more than tokenizing a sentence or writing one vector.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import numpy as np
import orjson
from fastapi import Request
from fastapi.responses import Response

from .. import errors
from ..protocol import EmbeddingRequest
from . import common

# At or below these sizes the work is done on the event loop (each is well under a millisecond).
INLINE_CHARS = 2048  # characters to tokenize
INLINE_ROWS = 8  # vectors to serialise


def _small(batch: list) -> bool:
    if len(batch) > INLINE_ROWS:
        return False
    if isinstance(batch[0], str):
        return sum(len(t) for t in batch) <= INLINE_CHARS
    return sum(len(t) for t in batch) <= INLINE_CHARS // 4


def tokenize(engine: Any, batch: list, cap: int) -> list[list[int]]:
    """Blocking: the Rust batch encoder for texts, bounds checks for token ids."""
    ids = engine.tokenize(batch) if isinstance(batch[0], str) else engine.check_ids(batch)
    if (longest := max(len(x) for x in ids)) > cap:
        raise errors.bad_request(f"An input has {longest} tokens; at most {cap} are allowed.", param="input")
    return ids


async def create(request: Request, req: EmbeddingRequest) -> Any:
    common.warn_unknown("embeddings", req.unknown_fields())
    principal = await common.authenticate(request)
    limits = request.app.state.settings.limits
    batch = req.batch()
    if len(batch) > limits.max_embedding_inputs:
        raise errors.bad_request(f"At most {limits.max_embedding_inputs} inputs are allowed.", param="input")
    served = await common.acquire(request, principal, req.model, "embed", req.keep_alive)
    try:
        engine = served.engine
        if req.dimensions is not None and req.dimensions != engine.dim:
            raise errors.bad_request(f"This model has {engine.dim} dimensions; it cannot return {req.dimensions}.",
                                     param="dimensions")
        cap = min(engine.max_length, limits.max_embedding_input_tokens)
        with common.engine_errors(served.name):
            ids = tokenize(engine, batch, cap) if _small(batch) else await asyncio.to_thread(tokenize, engine, batch, cap)
        tokens = sum(len(x) for x in ids)
        call = await common.admit(request, principal, served, tokens)
    except BaseException:
        common.release(request, served)
        raise
    try:
        with common.engine_errors(served.name):
            vectors = await common.until_disconnect(request, _embed(engine, ids, principal))
    except errors.APIError:
        call.settle_soon(0, 0)  # refused (overloaded): nothing was computed
        raise
    finally:
        call.settle_soon(tokens, 0)
    if len(vectors) <= INLINE_ROWS:
        body = encode(vectors, req.encoding_format, served.name, tokens)
    else:
        body = await asyncio.to_thread(encode, vectors, req.encoding_format, served.name, tokens)
    return Response(body, media_type="application/json", headers=dict(call.grant.headers))


async def _embed(engine: Any, ids: list[list[int]], principal: Any) -> np.ndarray:
    return await engine.aembed_ids(ids, tenant=principal.tenant or "", weight=principal.weight)


def encode(vectors: np.ndarray, encoding_format: str, model: str, tokens: int) -> bytes:
    """Blocking: the JSON body, one orjson call per row so the GIL passes back to the loop between rows."""
    if encoding_format == "base64":
        rows = [orjson.dumps(s) for s in _base64_rows(vectors)]
    else:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        rows = [orjson.dumps(v, option=orjson.OPT_SERIALIZE_NUMPY) for v in vectors]
    items = [b'{"object":"embedding","index":%d,"embedding":%s}' % (i, r) for i, r in enumerate(rows)]
    tail = orjson.dumps({"model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
    return b'{"object":"list","data":[' + b",".join(items) + b"]," + tail[1:]


def _base64_rows(vectors: np.ndarray) -> list[str]:
    """One base64 string per row; a single encode sliced by row when rows are whole 3-byte groups."""
    raw = vectors.astype("<f4", copy=False).tobytes()
    row = vectors.shape[1] * 4
    if row % 3:
        return [base64.b64encode(raw[i:i + row]).decode() for i in range(0, len(raw), row)]
    text = base64.b64encode(raw).decode()
    step = row // 3 * 4
    return [text[i:i + step] for i in range(0, len(text), step)]
