"""GET /v1/models and /v1/models/{model}: each entry also says which variant serves it and its quality."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request

from .. import errors
from ..registry import ServedModel
from . import common

router = APIRouter()


def _card(m: ServedModel, home=None) -> dict:
    card = {"id": m.name, "object": "model", "created": m.created, "owned_by": "fmgate",
            "task": m.task, "variant": m.variant, "quality": m.quality}
    engine = m.engine
    card["max_model_len" if m.task == "chat" else "dimensions"] = (
        engine.max_model_len if m.task == "chat" else engine.dim
    )
    choice = _choice(home, m)
    if choice:  # every candidate's figures and why it won or lost
        card["why"] = choice["why"]
        card["candidates"] = choice["candidates"]
    return card


def _choice(home, m: ServedModel) -> dict | None:
    """The store's record of the `auto` choice (manifests only; nothing is loaded)."""
    source = getattr(getattr(m, "config", None), "source", None)
    if home is None or not source:
        return None
    try:
        from model_store.cache import Cache
        from model_store.inventory import Inventory

        return Inventory(Cache(Path(home) / "models")).choice(source, m.task)
    except Exception:  # noqa: BLE001 - the figures are extra; the card stands without them
        return None


def _home(request: Request):
    return getattr(getattr(request.app.state, "settings", None), "home", None)


@router.get("/v1/models")
async def list_models(request: Request):
    await common.authenticate(request)
    models = request.app.state.registry.models.values()
    home = _home(request)
    return {"object": "list", "data": [_card(m, home) for m in models]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request):
    await common.authenticate(request)
    served = request.app.state.registry.get(model)
    if served is None:
        raise errors.model_not_found(model)
    return _card(served, _home(request))
