"""The app factory. The lifespan owns the engines (via the registry) and the quota gatekeeper."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from . import errors, logs, metrics
from .api import chat, common, completions, embeddings, models
from .registry import Registry
from .settings import Settings

log = logging.getLogger("fmgate.app")

_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/healthz", "/readyz",
           "/metrics"}
_ALWAYS_OPEN = {"/healthz", "/readyz", "/metrics"}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def create_app(settings: Settings | None = None, gatekeeper: Any = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if app.state.gatekeeper is None:
            from .quota import Gatekeeper

            app.state.gatekeeper = await Gatekeeper.create(settings)
        # Load in the background so /healthz answers and /readyz says 503 meanwhile.
        app.state.loader = asyncio.create_task(app.state.registry.start())
        try:
            yield
        finally:
            app.state.draining = True
            if not app.state.loader.done():
                await asyncio.wait({app.state.loader}, timeout=1)
            await app.state.registry.aclose()
            await common.settled()  # usage of the last requests is recorded before the store closes
            await app.state.gatekeeper.close()
            log.info("shutdown complete")

    app = FastAPI(title="fmgate", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible gateway for compressed open models, metered per key.")
    app.state.settings = settings
    app.state.registry = Registry(settings)
    app.state.gatekeeper = gatekeeper
    app.state.draining = False
    errors.install(app)
    errors.document(app, [m.name for m in settings.models])
    for module in (chat, completions, embeddings, models):
        app.include_router(module.router)
    try:
        from .api import admin
    except ImportError:  # pragma: no cover - the admin API ships with the quota package
        admin = None
    if admin is not None:
        app.include_router(admin.router)
        from .api import admin_models  # GET /admin/models, load, unload, add (same admin key)

        app.include_router(admin_models.router)
        from .console import router as console_router  # the web console at /console (admin API needed)

        app.include_router(console_router)

    @app.get("/healthz", include_in_schema=False)
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request):
        reg: Registry = request.app.state.registry
        state = {"models": {m["name"]: m["state"] for m in reg.status()}}
        if request.app.state.draining:
            return JSONResponse({"status": "draining", **state}, status_code=503)
        if not reg.ready():  # the models marked `required` are up; others may still load or have failed
            failed = any(s["required"] and s["state"] == "failed" for s in reg.status())
            return JSONResponse({"status": "model failed" if failed else "loading", **state}, status_code=503)
        if not await request.app.state.gatekeeper.ready():
            return JSONResponse({"status": "quota backend unavailable", **state}, status_code=503)
        return {"status": "ready", **state}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST",
                           "DELETE"], allow_headers=["Authorization", "Content-Type", "X-Request-Id"])
    app.add_middleware(RequestContext, max_body=settings.limits.max_body_bytes)
    return app


class RequestContext:
    """Pure ASGI middleware: request id, body-size cap, drain refusal, metrics and one log line per request."""

    def __init__(self, app, max_body: int):
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = rid if _REQUEST_ID.match(rid) else uuid.uuid4().hex
        token = logs.request_id.set(rid)
        path = scope.get("path", "")
        route = path if path in _ROUTES else ("/v1/models/{model}" if path.startswith("/v1/models/") else
                                              "/admin" if path.startswith("/admin") else "other")
        t0 = time.monotonic()
        status = {"code": 500, "started": False}

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["started"] = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                status["done"] = True
                self._observe(scope, route, status["code"], t0)

        async def reject(err: errors.APIError):
            await err.response()(scope, receive, send_wrapped)

        try:
            app_state = scope["app"].state if "app" in scope else None
            if app_state is not None and app_state.draining and path not in _ALWAYS_OPEN:
                return await reject(errors.APIError(503, "The server is shutting down.", errors.UNAVAILABLE,
                                                    headers={"Retry-After": "5", "Connection": "close"}))
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                return await reject(_too_large(self.max_body))
            seen = 0

            async def receive_capped():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.max_body:
                        raise _BodyTooLarge(self.max_body)
                return message

            try:
                await self.app(scope, receive_capped, send_wrapped)
                if not status.get("done"):  # a stream the client left: starlette stops it quietly
                    self._observe(scope, route, 499, t0)
            except (errors.ClientDisconnected, ClientDisconnect):
                # The client hung up: its work is already cancelled and settled. Quiet, but counted.
                status["code"] = 499
                self._observe(scope, route, 499, t0)
            except Exception:
                log.exception("unhandled error on %s %s", scope.get("method"), path)
                if status["started"]:
                    self._observe(scope, route, 500, t0)
                else:
                    await reject(errors.APIError(500, "The server had an error while processing your request.",
                                                 errors.SERVER))
        finally:
            logs.request_id.reset(token)

    @staticmethod
    def _observe(scope, route: str, code: int, t0: float) -> None:
        name = (scope.get("state") or {}).get("model")
        served = scope["app"].state.registry.slots if "app" in scope else {}
        model = "" if not name else (name if name in served else "unknown")  # bounded label values
        took = time.monotonic() - t0
        metrics.REQUESTS.labels(route, model, str(code)).inc()
        metrics.REQUEST_SECONDS.labels(route, model).observe(took)
        if route not in _ALWAYS_OPEN:
            logging.getLogger("fmgate.access").info("%s %s %d %.1fms", scope.get("method"), route, code, took * 1e3)


class _BodyTooLarge(StarletteHTTPException):
    """Raised from receive() once a (chunked) body passes the cap; an HTTPException so that FastAPI's body
    parsing passes it on as a 413 instead of wrapping it into a 400."""

    def __init__(self, limit: int):
        super().__init__(413, f"The request body exceeds the limit of {limit} bytes.")
        self.code = "request_too_large"


def _too_large(limit: int) -> errors.APIError:
    return errors.APIError(413, f"The request body exceeds the limit of {limit} bytes.", errors.INVALID_REQUEST,
                           code="request_too_large")
