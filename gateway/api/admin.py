"""Admin API: /admin/keys (create, list, show, revoke) and /admin/usage, behind the admin key only.

The admin key (FMGATE_ADMIN_KEY) is compared by SHA-256 digest in constant time. User keys are never
looked up here, so no user key can reach these routes; with no admin key configured they all say 401.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..errors import AUTHENTICATION, NOT_FOUND, UNAVAILABLE, APIError, bad_request
from ..quota.keys import KeyLimits, day_from_str
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


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    rpm: int | None = Field(None, ge=0, description="requests per minute (sliding window)")
    tpm: int | None = Field(None, ge=0, description="tokens per minute (sliding window, reserved then refunded)")
    tokens_per_day: int | None = Field(None, ge=0, description="UTC calendar day budget")
    tokens_per_month: int | None = Field(None, ge=0, description="UTC calendar month budget")
    max_concurrent: int | None = Field(None, ge=0)
    weight: float | None = Field(None, gt=0, le=1000, description="fair share of the batch (default 1)")
    models: list[str] | None = Field(None, description="allowed model names; omitted: all")


def _gatekeeper(request: Request):
    return request.app.state.gatekeeper


def _unavailable(exc: BackendError) -> APIError:
    return APIError(503, str(exc), UNAVAILABLE, code="quota_backend_unavailable", headers={"retry-after": "1"})


@router.post("/keys", status_code=201)
async def create_key(body: KeyCreate, request: Request):
    limits = KeyLimits(rpm=body.rpm or 0, tpm=body.tpm or 0, tokens_per_day=body.tokens_per_day or 0,
                       tokens_per_month=body.tokens_per_month or 0, max_concurrent=body.max_concurrent or 0,
                       weight=body.weight or 1.0)
    models = tuple(dict.fromkeys(m.strip() for m in body.models if m.strip())) if body.models is not None else None
    try:
        secret, rec = await _gatekeeper(request).create_key(body.name, limits, models)
    except BackendError as exc:
        raise _unavailable(exc) from None
    except ValueError as exc:
        raise bad_request(str(exc), param="name") from None
    # The only time the secret is ever shown.
    return JSONResponse({"object": "api_key", **rec.public(), "key": secret}, status_code=201,
                        headers={"cache-control": "no-store"})


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
        rec = await _gatekeeper(request).revoke_key(key_id)
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


@router.get("/usage")
async def usage(
    request: Request,
    key_id: str | None = Query(None),
    start: str | None = Query(None, description="first UTC date, YYYY-MM-DD (default: 30 days ago)"),
    end: str | None = Query(None, description="last UTC date, YYYY-MM-DD (default: today)"),
):
    since = _day(start, "start")
    until = _day(end, "end")
    if since is None:
        since = (dt.datetime.now(dt.UTC).date() - dt.date(1970, 1, 1)).days - 30
    rows = await _gatekeeper(request).usage(key_id, since, until)
    totals = {k: sum(r[k] for r in rows) for k in ("prompt_tokens", "completion_tokens", "total_tokens", "requests")}
    return {"object": "list", "data": rows, "totals": totals}
