"""`fmgate keys create | list | show | edit | revoke | usage | audit`: the same store and Redis the server
uses (FMGATE_* settings)."""

from __future__ import annotations

import asyncio
import datetime as dt
import getpass
import json
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

import typer

from .settings import Settings

keys_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="Create, list, edit and revoke API keys; read usage and the audit log.")
T = TypeVar("T")


def _actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no user name in this environment
        user = str(os.getuid())
    return f"cli:{user}@{socket.gethostname()}"


def _fail(message: str, code: int = 2):
    typer.echo(f"fmgate: {message}", err=True)
    raise typer.Exit(code)


def _extra(expires: str | None, owner: str | None, tags: list[str] | None, model_limit: list[str] | None,
           clear_model_limit: list[str] | None = None) -> dict:
    """The record fields beyond limits that the create and edit commands share."""
    from .quota.keys import parse_model_limits, parse_time

    out: dict = {}
    if expires is not None:
        try:
            out["expires_at"] = None if expires in ("", "never") else parse_time(expires)
        except ValueError:
            _fail("--expires takes an ISO 8601 time like 2026-12-31 or 2026-12-31T18:00:00Z, or 'never'")
    if owner is not None:
        out["owner"] = owner
    if tags is not None:
        out["tags"] = [t for tag in tags for t in tag.split(",") if t.strip()]
    try:
        ml: dict = parse_model_limits(model_limit) if model_limit else {}
    except ValueError as exc:
        _fail(str(exc))
    for m in clear_model_limit or ():
        ml[m] = None
    if ml:
        out["model_limits"] = ml
    return out


def _run(op: Callable[..., Awaitable[T]]) -> T:
    from .quota.manage import BackendError, KeyManager
    from .quota.redis import RedisLimiter, close_client
    from .quota.store import Store

    try:
        settings = Settings()
    except Exception as exc:
        typer.echo(f"fmgate: invalid settings: {exc}", err=True)
        raise typer.Exit(2) from None

    async def main() -> T:
        store = Store(settings.home)
        redis = None
        if settings.redis_url:
            redis = RedisLimiter(settings.redis_url, store, prefix=os.environ.get("FMGATE_REDIS_PREFIX") or "fm")
        try:
            return await op(KeyManager(store, redis))
        finally:
            if redis is not None:
                await close_client(redis.r)
            store.close()

    try:
        return asyncio.run(main())
    except BackendError as exc:
        typer.echo(f"fmgate: {exc}", err=True)
        raise typer.Exit(1) from None


def _n(v: int) -> int | None:
    return v or None


@keys_app.command()
def create(
    name: str = typer.Option(..., "--name", help="a label for the key (shown in list and usage)"),
    rpm: int = typer.Option(0, "--rpm", min=0, help="requests per minute; 0 = unlimited"),
    tpm: int = typer.Option(0, "--tpm", min=0, help="tokens per minute; 0 = unlimited"),
    tokens_per_day: int = typer.Option(0, "--tokens-per-day", min=0, help="UTC day budget; 0 = unlimited"),
    tokens_per_month: int = typer.Option(0, "--tokens-per-month", min=0, help="UTC month budget; 0 = unlimited"),
    max_concurrent: int = typer.Option(0, "--max-concurrent", min=0, help="requests in flight; 0 = unlimited"),
    weight: float = typer.Option(1.0, "--weight", help="fair share of the batch against other keys"),
    models: str = typer.Option(None, "--models", help="comma-separated model names; default: all"),
    expires: str = typer.Option(None, "--expires", help="ISO 8601 time the key stops working (UTC unless stated)"),
    owner: str = typer.Option(None, "--owner", help="who the key belongs to"),
    tag: list[str] = typer.Option(None, "--tag", help="a label; repeat or comma-separate"),
    model_limit: list[str] = typer.Option(None, "--model-limit",
                                          help="per-model limits, e.g. 'chat-model:rpm=10,tpm=5000'; repeat"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
):
    """Create a key and print its secret, once. Only its SHA-256 is stored."""
    from .quota.keys import KeyLimits, parse_models

    try:
        limits = KeyLimits(rpm=rpm, tpm=tpm, tokens_per_day=tokens_per_day, tokens_per_month=tokens_per_month,
                           max_concurrent=max_concurrent, weight=weight)
    except ValueError as exc:
        _fail(str(exc))
    extra = _extra(expires, owner, tag, model_limit)
    secret, rec = _run(lambda km: km.create(name, limits, parse_models(models), actor=_actor(), **extra))
    if as_json:
        typer.echo(json.dumps({**rec.public(), "key": secret}))
        return
    typer.echo(f"Created key {rec.id} ({rec.name}). Its secret is shown only now; store it safely:", err=True)
    typer.echo(secret)


@keys_app.command("list")
def list_keys(as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """List keys (ids, names, limits; never secrets)."""
    recs = _run(lambda km: km.list())
    rows = [r.public() for r in recs]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    from rich.console import Console
    from rich.table import Column, Table

    table = Table(Column("id", no_wrap=True, min_width=12), "name", "created", "status", "rpm", "tpm",
                  "tokens/day", "tokens/month", "concurrent", "models")
    for r in rows:
        table.add_row(
            r["id"], r["name"], r["created_at"], "revoked" if r["revoked_at"] else "active",
            *[str(r[k] or "-") for k in ("rpm", "tpm", "tokens_per_day", "tokens_per_month", "max_concurrent")],
            ",".join(r["models"]) if r["models"] is not None else "all",
        )
    Console().print(table)


@keys_app.command()
def show(key_id: str = typer.Argument(..., help="the key id from `fmgate keys list`")):
    """Print one key's record as JSON (never its secret)."""
    recs = _run(lambda km: km.list())
    rec = next((r for r in recs if r.id == key_id), None)
    if rec is None:
        _fail(f"no key with id {key_id}", 1)
    typer.echo(json.dumps(rec.public(), indent=2))


@keys_app.command()
def edit(
    key_id: str = typer.Argument(..., help="the key id from `fmgate keys list`"),
    name: str = typer.Option(None, "--name"),
    rpm: int = typer.Option(None, "--rpm", min=0, help="0 = unlimited"),
    tpm: int = typer.Option(None, "--tpm", min=0, help="0 = unlimited"),
    tokens_per_day: int = typer.Option(None, "--tokens-per-day", min=0, help="0 = unlimited"),
    tokens_per_month: int = typer.Option(None, "--tokens-per-month", min=0, help="0 = unlimited"),
    max_concurrent: int = typer.Option(None, "--max-concurrent", min=0, help="0 = unlimited"),
    weight: float = typer.Option(None, "--weight"),
    models: str = typer.Option(None, "--models", help="comma-separated model names; 'all' = every model"),
    expires: str = typer.Option(None, "--expires", help="ISO 8601 time, or 'never'"),
    owner: str = typer.Option(None, "--owner"),
    tag: list[str] = typer.Option(None, "--tag", help="replaces the tags; repeat or comma-separate"),
    model_limit: list[str] = typer.Option(None, "--model-limit", help="'model:rpm=10,tpm=5000' sets that model's"),
    clear_model_limit: list[str] = typer.Option(None, "--clear-model-limit", help="a model whose limits go"),
    as_json: bool = typer.Option(False, "--json", help="print the new record as JSON"),
):
    """Change a key in place; options left out stay as they are. Every replica applies it within a second."""
    from .quota.keys import parse_models

    changes = {k: v for k, v in {"name": name, "rpm": rpm, "tpm": tpm, "tokens_per_day": tokens_per_day,
                                 "tokens_per_month": tokens_per_month, "max_concurrent": max_concurrent,
                                 "weight": weight}.items() if v is not None}
    if models is not None:
        changes["models"] = None if models.strip() in ("", "all") else list(parse_models(models) or ())
    changes.update(_extra(expires, owner, tag, model_limit, clear_model_limit))
    if not changes:
        _fail("nothing to change: give at least one option")
    try:
        rec = _run(lambda km: km.edit(key_id, changes, actor=_actor()))
    except ValueError as exc:
        _fail(str(exc))
    if rec is None:
        _fail(f"no key with id {key_id}", 1)
    if as_json:
        typer.echo(json.dumps(rec.public()))
        return
    typer.echo(f"Updated key {rec.id} ({rec.name}).")


@keys_app.command()
def audit(
    key: str = typer.Option(None, "--key", help="one key id; default: all"),
    limit: int = typer.Option(100, "--limit", min=1),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
):
    """The admin actions on keys, newest first: when, who, what (never a secret)."""
    entries = _run(lambda km: km.audit(key, limit))
    for e in entries:
        e["at"] = dt.datetime.fromtimestamp(e["at"], dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    if as_json:
        typer.echo(json.dumps(entries))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("at", "actor", "action", "key", "detail")
    for e in entries:
        table.add_row(e["at"], e["actor"], e["action"], e["key_id"] or "", json.dumps(e["detail"], sort_keys=True))
    Console().print(table)


@keys_app.command()
def revoke(key_id: str = typer.Argument(..., help="the key id from `fmgate keys list`")):
    """Revoke a key. With Redis, every replica refuses it from the next request on."""
    rec = _run(lambda km: km.revoke(key_id, actor=_actor()))
    if rec is None:
        typer.echo(f"fmgate: no key with id {key_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"Revoked key {rec.id} ({rec.name}).")


@keys_app.command()
def usage(
    key: str = typer.Option(None, "--key", help="one key id; default: all keys"),
    model: str = typer.Option(None, "--model", help="one model; default: all"),
    start: str = typer.Option(None, "--start", help="first UTC date, YYYY-MM-DD; default: 30 days ago"),
    end: str = typer.Option(None, "--end", help="last UTC date, YYYY-MM-DD; default: today"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    as_csv: bool = typer.Option(False, "--csv", help="print CSV (the admin API's format=csv)"),
):
    """Usage per key, model and UTC day: requests, prompt and completion tokens."""
    from .quota.keys import day_from_str

    try:
        since = day_from_str(start) if start else (dt.datetime.now(dt.UTC).date() - dt.date(1970, 1, 1)).days - 30
        until = day_from_str(end) if end else None
    except ValueError:
        typer.echo("fmgate: dates look like 2026-11-28", err=True)
        raise typer.Exit(2) from None
    rows = _run(lambda km: km.usage(key, since, until, model))
    if as_json:
        typer.echo(json.dumps(rows))
        return
    if as_csv:
        from .api.admin import usage_csv

        typer.echo(usage_csv(rows), nl=False)
        return
    from rich.console import Console
    from rich.table import Column, Table

    table = Table(Column("date", no_wrap=True, min_width=10), Column("key", no_wrap=True, min_width=12), "name",
                  "model", "requests", "prompt", "completion", "total")
    for r in rows:
        table.add_row(r["date"], r["key_id"], r["key_name"] or "", r["model"], str(r["requests"]),
                      str(r["prompt_tokens"]), str(r["completion_tokens"]), str(r["total_tokens"]))
    if rows:
        table.add_row("total", "", "", "", *[str(sum(r[k] for r in rows)) for k in
                                             ("requests", "prompt_tokens", "completion_tokens", "total_tokens")])
    Console().print(table)
