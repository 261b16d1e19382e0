"""GET /v1/models and /v1/models/{model}: each entry also says which variant serves it and its quality."""

from __future__ import annotations

from fastapi import APIRouter, Request

from .. import errors
from ..registry import ServedModel
from . import common

router = APIRouter()


def _card(m: ServedModel) -> dict:
    card = {"id": m.name, "object": "model", "created": m.created, "owned_by": "fmgate",
            "task": m.task, "variant": m.variant, "quality": m.quality}
    engine = m.engine
    card["max_model_len" if m.task == "chat" else "dimensions"] = (
        engine.max_model_len if m.task == "chat" else engine.dim
    )
    return card


@router.get("/v1/models")
async def list_models(request: Request):
    await common.authenticate(request)
    models = request.app.state.registry.models.values()
    return {"object": "list", "data": [_card(m) for m in models]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request):
    await common.authenticate(request)
    served = request.app.state.registry.get(model)
    if served is None:
        raise errors.model_not_found(model)
    return _card(served)
