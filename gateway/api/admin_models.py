"""Admin API for models: what is loaded (GET /admin/models), load, unload, add one, and the residency
budget (/admin/model-budget), all without a restart."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import INVALID_REQUEST, APIError, bad_request, model_not_found
from ..registry import ModelBusy, ModelNotFound, Registry
from ..settings import ModelConfig, parse_bytes
from .admin import require_admin

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


def _registry(request: Request) -> Registry:
    return request.app.state.registry


def _entry(registry: Registry, name: str) -> dict:
    return {"object": "model_status", **next(s for s in registry.status() if s["name"] == name)}


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_loaded_memory: int | str | None = Field(None, description="bytes, or a size like '4GiB'")
    max_loaded_models: int | None = Field(None, ge=0, description="0 = no limit")


@router.get("/model-budget")
async def show_budget(request: Request):
    return {"object": "model_budget", **_registry(request).budget()}


@router.post("/model-budget")
async def set_budget(body: Budget, request: Request):
    """Change max_loaded_memory / max_loaded_models without a restart; idle models over it unload now."""
    memory = body.max_loaded_memory
    if isinstance(memory, str):
        try:
            memory = parse_bytes(memory)
        except ValueError as exc:
            raise bad_request(str(exc), param="max_loaded_memory") from None
    if memory is not None and memory < 0:
        raise bad_request("max_loaded_memory must not be negative.", param="max_loaded_memory")
    registry = _registry(request)
    await registry.set_budget(memory, body.max_loaded_models)
    return {"object": "model_budget", **registry.budget()}


@router.get("/models")
async def list_models(request: Request):
    return {"object": "list", "data": [{"object": "model_status", **s} for s in _registry(request).status()]}


@router.get("/models/{name}")
async def show_model(name: str, request: Request):
    registry = _registry(request)
    if name not in registry.slots:
        raise model_not_found(name)
    return _entry(registry, name)


@router.post("/models/{name}/load")
async def load_model(name: str, request: Request, wait: float | None = None):
    """Loads (or retries a failed load); answers when it is done, or after `wait` seconds while it loads."""
    registry = _registry(request)
    try:
        slot = await registry.load(name, wait=wait)
    except ModelNotFound:
        raise model_not_found(name) from None
    return JSONResponse(_entry(registry, name), status_code=202 if slot.state == "loading" else 200)


@router.post("/models/{name}/unload")
async def unload_model(name: str, request: Request):
    registry = _registry(request)
    try:
        await registry.unload(name)
    except ModelNotFound:
        raise model_not_found(name) from None
    except ModelBusy as exc:
        raise APIError(409, str(exc), INVALID_REQUEST, code="model_busy", headers={"Retry-After": "5"}) from None
    return _entry(registry, name)


@router.post("/models", status_code=201)
async def add_model(request: Request):
    """Body: a model entry as in the config file, at least {name, source, task}; load defaults to on_demand."""
    try:
        body = await request.json()
    except ValueError:
        raise bad_request("The body must be a JSON object.") from None
    if not isinstance(body, dict):
        raise bad_request("The body must be a JSON object.")
    body.setdefault("load", "on_demand")
    try:
        cfg = ModelConfig(**body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err.get("loc", ())) or None
        raise bad_request(f"Invalid model entry: {err.get('msg')}", param=param) from None
    except TypeError as exc:
        raise bad_request(f"Invalid model entry: {exc}") from None
    registry = _registry(request)
    try:
        registry.add(cfg)
    except ValueError as exc:
        raise APIError(409, str(exc), INVALID_REQUEST, code="model_exists") from None
    return JSONResponse(_entry(registry, cfg.name), status_code=201)

