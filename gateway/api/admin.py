"""Admin API: /admin/keys (create, list, show, edit, revoke), /admin/usage and /admin/audit, behind the
admin key only.

The admin key (FMGATE_ADMIN_KEY) is compared by SHA-256 digest in constant time. User keys are never
looked up here, so no user key can reach these routes; with no admin key configured they all say 401.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import secrets
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from ..errors import AUTHENTICATION, NOT_FOUND, UNAVAILABLE, APIError, bad_request
from ..quota.keys import ModelLimits, day_from_str, parse_time
from ..quota.manage import BackendError


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


async def require_admin(request: Request) -> None:
    admin_key = request.app.state.settings.admin_key
    header = request.headers.get("authorization") or ""
    scheme, _, token = header.strip().partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    # Always compare, even when there is nothing to compare against, so timing says nothing.
    expected = _digest(admin_key) if admin_key else secrets.token_bytes(32)
    if not admin_key or not token or not secrets.compare_digest(_digest(token), expected):
        message = ("The admin API is disabled: set FMGATE_ADMIN_KEY to enable it." if not admin_key
                   else "Incorrect or missing admin key.")
        raise APIError(401, message, AUTHENTICATION, code="invalid_api_key", headers={"www-authenticate": "Bearer"})


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


class ModelLimitsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(None, ge=0)
    tpm: int | None = Field(None, ge=0)
    tokens_per_day: int | None = Field(None, ge=0)
    tokens_per_month: int | None = Field(None, ge=0)

    def limits(self) -> ModelLimits:
        return ModelLimits(self.rpm or 0, self.tpm or 0, self.tokens_per_day or 0, self.tokens_per_month or 0)


class KeyFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(None, ge=0, description="requests per minute (sliding window)")
    tpm: int | None = Field(None, ge=0, description="tokens per minute (sliding window, reserved then refunded)")
    tokens_per_day: int | None = Field(None, ge=0, description="UTC calendar day budget")
    tokens_per_month: int | None = Field(None, ge=0, description="UTC calendar month budget")
    max_concurrent: int | None = Field(None, ge=0)
    weight: float | None = Field(None, gt=0, le=1000, description="fair share of the batch (default 1)")
    models: list[str] | None = Field(None, description="allowed model names; null: all")
    expires_at: str | None = Field(None, description="ISO 8601 time (UTC unless stated); null: never")
    owner: str | None = Field(None, max_length=200)
    tags: list[str] | None = Field(None, max_length=50)
    model_limits: dict[str, ModelLimitsBody | None] | None = Field(
        None, description="per-model limits, merged: {model: {rpm, tpm, tokens_per_day, tokens_per_month}}; "
                          "{model: null} removes a model's")

    def changes(self) -> dict:
        """The fields the caller sent (absent ones stay as they are), in KeyManager's terms."""
        out: dict = {}
        for name in self.model_fields_set:
            value = getattr(self, name)
            if name == "models" and value is not None:
                value = [m.strip() for m in value if m.strip()]
            elif name == "tags" and value is not None:
                value = [t.strip() for t in value if t.strip()]
            elif name == "expires_at":
                try:
                    value = parse_time(value)
                except ValueError:
                    raise bad_request("'expires_at' must be an ISO 8601 time like 2026-12-31T00:00:00Z.",
                                      param="expires_at") from None
            elif name == "model_limits":
                value = {m: (v.limits() if v is not None else None) for m, v in (value or {}).items()}
            out[name] = value
        return out


class KeyCreate(KeyFields):
    name: str = Field(min_length=1, max_length=200)


class KeyEdit(KeyFields):
    name: str | None = Field(None, min_length=1, max_length=200)


def _actor(request: Request) -> str:
    host = request.client.host if request.client else "unknown"
    return f"admin-api@{host}"


def _gatekeeper(request: Request):
    return request.app.state.gatekeeper


def _unavailable(exc: BackendError) -> APIError:
    return APIError(503, str(exc), UNAVAILABLE, code="quota_backend_unavailable", headers={"retry-after": "1"})


@router.post("/keys", status_code=201)
async def create_key(body: KeyCreate, request: Request):
    changes = body.changes()
    name = changes.pop("name")
    models = changes.pop("models", None)
    models = tuple(dict.fromkeys(models)) or None if models is not None else None
    try:
        secret, rec = await _gatekeeper(request).create_key(name, None, models, actor=_actor(request), **changes)
    except BackendError as exc:
        raise _unavailable(exc) from None
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    # The only time the secret is ever shown.
    return JSONResponse({"object": "api_key", **rec.public(), "key": secret}, status_code=201,
                        headers={"cache-control": "no-store"})


@router.patch("/keys/{key_id}")
async def edit_key(key_id: str, body: KeyEdit, request: Request):
    changes = body.changes()
    if changes.get("name", "") is None:
        raise bad_request("'name' cannot be null.", param="name")
    try:
        rec = await _gatekeeper(request).edit_key(key_id, changes, actor=_actor(request))
    except BackendError as exc:
        raise _unavailable(exc) from None
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    if rec is None:
        raise APIError(404, f"No API key with id '{key_id}'.", NOT_FOUND, code="key_not_found")
    return {"object": "api_key", **rec.public()}


@router.get("/keys")
async def list_keys(request: Request):
    recs = await _gatekeeper(request).list_keys()
    return {"object": "list", "data": [{"object": "api_key", **r.public()} for r in recs]}


@router.get("/keys/{key_id}")
async def show_key(key_id: str, request: Request):
    rec = next((r for r in await _gatekeeper(request).list_keys() if r.id == key_id), None)
    if rec is None:
        raise APIError(404, f"No API key with id '{key_id}'.", NOT_FOUND, code="key_not_found")
    return {"object": "api_key", **rec.public()}


@router.delete("/keys/{key_id}")
@router.post("/keys/{key_id}/revoke")
async def revoke_key(key_id: str, request: Request):
    try:
        rec = await _gatekeeper(request).revoke_key(key_id, actor=_actor(request))
    except BackendError as exc:
        raise _unavailable(exc) from None
    if rec is None:
        raise APIError(404, f"No API key with id '{key_id}'.", NOT_FOUND, code="key_not_found")
    return {"object": "api_key", **rec.public()}


def _day(value: str | None, param: str) -> int | None:
    if value is None:
        return None
    try:
        return day_from_str(value)
    except ValueError:
        raise bad_request(f"'{param}' must be a date like 2026-11-28.", param=param) from None


USAGE_COLUMNS = ("date", "key_id", "key_name", "model", "requests", "prompt_tokens", "completion_tokens",
                 "total_tokens")


def usage_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, USAGE_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


@router.get("/usage")
async def usage(
    request: Request,
    key_id: str | None = Query(None),
    model: str | None = Query(None),
    start: str | None = Query(None, description="first UTC date, YYYY-MM-DD (default: 30 days ago)"),
    end: str | None = Query(None, description="last UTC date, YYYY-MM-DD (default: today)"),
    format: Literal["json", "csv"] = Query("json"),
):
    since = _day(start, "start")
    until = _day(end, "end")
    if since is None:
        since = (dt.datetime.now(dt.UTC).date() - dt.date(1970, 1, 1)).days - 30
    rows = await _gatekeeper(request).usage(key_id, since, until, model)
    if format == "csv":
        return Response(usage_csv(rows), media_type="text/csv; charset=utf-8",
                        headers={"content-disposition": 'attachment; filename="fmgate-usage.csv"'})
    totals = {k: sum(r[k] for r in rows) for k in ("prompt_tokens", "completion_tokens", "total_tokens", "requests")}
    return {"object": "list", "data": rows, "totals": totals}


@router.get("/audit")
async def audit(request: Request, key_id: str | None = Query(None), limit: int = Query(1000, ge=1, le=10_000)):
    entries = await _gatekeeper(request).audit(key_id, limit)
    return {"object": "list", "data": [{**e, "at": _iso(e["at"])} for e in entries]}


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
