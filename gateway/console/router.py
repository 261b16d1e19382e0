"""The console: static pages at /console (no build step), a redirect from /, and two small admin APIs.

Every console response carries a strict Content-Security-Policy: scripts and styles from this origin
only, nothing inline, no frames. Keys live in the browser tab's sessionStorage, never in a cookie.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse

from ..api.admin import require_admin
from ..errors import NOT_FOUND, APIError
from .live import Sampler

log = logging.getLogger("fmgate.console")

STATIC = Path(__file__).parent / "static"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
           "x-frame-options": "DENY"}
_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml",
          ".png": "image/png", ".txt": "text/plain", ".LICENSE": "text/plain"}
# Only files that ship with the package are served; the names are fixed when the module loads.
FILES = {p.relative_to(STATIC).as_posix(): p for p in STATIC.rglob("*") if p.is_file() and p.suffix in _TYPES}


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    task = asyncio.create_task(_sampler(app).run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


router = APIRouter(include_in_schema=False, lifespan=lifespan)


@router.get("/")
async def root():
    return RedirectResponse("/console/", status_code=307)


@router.get("/console")
async def console_bare():
    return RedirectResponse("/console/", status_code=307, headers=HEADERS)


@router.get("/console/")
async def index():
    return FileResponse(STATIC / "index.html", media_type="text/html",
                        headers={**HEADERS, "cache-control": "no-store"})


@router.get("/console/static/{name:path}")
async def static(name: str):
    path = FILES.get(name)
    if path is None:
        raise APIError(404, f"No console file '{name}'.", NOT_FOUND, code="not_found")
    return FileResponse(path, media_type=_TYPES[path.suffix], headers={**HEADERS, "cache-control": "no-cache"})


def _sampler(app) -> Sampler:
    """One per app (tests run several in a process); the lifespan starts its loop."""
    if getattr(app.state, "console_sampler", None) is None:
        app.state.console_sampler = Sampler()
    return app.state.console_sampler


@router.get("/console/api/live", dependencies=[Depends(require_admin)])
async def live(request: Request):
    sampler = _sampler(request.app)
    if not sampler.points:
        sampler.sample()  # the first call after start: at least the gauges' current values soon
    return JSONResponse(sampler.data(), headers={**HEADERS, "cache-control": "no-store"})


@router.get("/console/api/models", dependencies=[Depends(require_admin)])
async def models(request: Request):
    """What /v1/models says, for the admin key (which /v1 does not accept), plus this machine's hardware."""
    from ..api import models as models_api

    card = getattr(models_api, "_card", None)
    home = request.app.state.settings.home
    takes_home = card is not None and "home" in inspect.signature(card).parameters  # with the candidates
    data = []
    for m in list(request.app.state.registry.models.values()):
        try:
            data.append(card(m, home) if takes_home else card(m) if card else
                        {"id": m.name, "task": m.task, "variant": m.variant})
        except Exception:  # a card another module could not build must not hide the others
            log.exception("console: no card for %s", m.name)
            data.append({"id": m.name, "task": m.task, "variant": m.variant, "quality": m.quality})
    return JSONResponse({"object": "list", "data": data, "hardware": await asyncio.to_thread(_hardware)},
                        headers={**HEADERS, "cache-control": "no-store"})


def _hardware() -> dict | None:
    try:
        from model_store.hardware import detect

        hw = detect()
    except Exception:  # pragma: no cover - hardware detection is best effort here
        return None
    return {"cpu": hw.cpu_model, "cores": hw.cores, "isa_tier": hw.isa_tier, "memory_mb": hw.memory_mb,
            "gpus": [f"{d.name} (sm {d.compute_capability}, {d.memory_mb} MB)" for d in hw.cuda]}
