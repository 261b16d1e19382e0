"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} with OpenAI's `type` vocabulary."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("fmgate.errors")

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
PERMISSION = "permission_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_error"
INSUFFICIENT_QUOTA = "insufficient_quota"
SERVER = "server_error"
UNAVAILABLE = "service_unavailable"


class APIError(Exception):
    """An error that reaches the client as-is. Messages must never hold secrets or internal paths."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = INVALID_REQUEST,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientDisconnected(Exception):
    """The client hung up before the reply was complete: answered as a quiet, counted 499."""


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, INVALID_REQUEST, code=code, param=param)


def model_not_found(name: str) -> APIError:
    return APIError(
        404, f"The model '{name}' does not exist or you do not have access to it.", INVALID_REQUEST,
        code="model_not_found", param="model",
    )


_UNION_MEMBER = re.compile(r"[\[\]-]|^[A-Z]|^(str|int|float|bool|list|dict|none)$")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None
    # With unions pydantic reports one error per member; a bound ("at most 4 items") says more than "not a
    # string", and the member names ("constrained-str", "NamedToolChoice") are no part of the field path.
    first = sorted(errors, key=lambda e: str(e.get("type", "")).endswith("_type"))[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _UNION_MEMBER.search(str(p))]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "We could not parse the JSON body of your request.", None
    msg = first.get("msg", "invalid value")
    return (f"Invalid value for '{param}': {msg}" if param else f"Invalid request: {msg}"), param


_STATUS_TYPES = {401: AUTHENTICATION, 403: PERMISSION, 404: NOT_FOUND, 429: RATE_LIMIT}


def install(app: FastAPI) -> None:
    """Map every error path, including the framework's own, onto OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return APIError(400, message, INVALID_REQUEST, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        etype = _STATUS_TYPES.get(exc.status_code, INVALID_REQUEST if exc.status_code < 500 else SERVER)
        message = exc.detail if isinstance(exc.detail, str) else "Request failed."
        return APIError(exc.status_code, message, etype, code=getattr(exc, "code", None),
                        headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # Log the traceback server-side; the client gets no internals.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, "The server had an error while processing your request.", SERVER).response()


_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}
_DOCUMENTED = {"400": "Invalid request", "401": "Missing or invalid API key", "403": "Not allowed for this key",
               "404": "Unknown model or resource", "413": "Request body too large",
               "429": "Rate limited, over quota or overloaded", "500": "Server error",
               "503": "Loading, draining or quota backend down"}


def document(app: FastAPI, model_names: list[str] | None = None) -> None:
    """Describe the real error responses in the OpenAPI schema (FastAPI's default says 422 only),
    and give the served model names as examples of every request's `model`."""
    build = app.openapi

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas["Error"] = _ERROR_SCHEMA
        for body in schemas.values():
            model = body.get("properties", {}).get("model")
            if model_names and model is not None and model.get("type") == "string":
                model["examples"] = list(model_names)
        ref = {"$ref": "#/components/schemas/Error"}
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                responses = op.setdefault("responses", {})
                responses.pop("422", None)
                for code, text in _DOCUMENTED.items():
                    responses.setdefault(code, {"description": text, "content": {"application/json": {"schema": ref}}})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
