"""`fmgate keys create | list | revoke | usage`: the same store and Redis the server uses (FMGATE_* settings)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

import typer

from .settings import Settings

keys_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="Create, list and revoke API keys; read usage.")
T = TypeVar("T")


def _run(op: Callable[..., Awaitable[T]]) -> T:
    from .quota.manage import BackendError, KeyManager
    from .quota.redis import RedisLimiter
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
                await redis.r.aclose()
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
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
):
    """Create a key and print its secret, once. Only its SHA-256 is stored."""
    from .quota.keys import KeyLimits, parse_models

    try:
        limits = KeyLimits(rpm=rpm, tpm=tpm, tokens_per_day=tokens_per_day, tokens_per_month=tokens_per_month,
                           max_concurrent=max_concurrent, weight=weight)
    except ValueError as exc:
        typer.echo(f"fmgate: {exc}", err=True)
        raise typer.Exit(2) from None
    secret, rec = _run(lambda km: km.create(name, limits, parse_models(models)))
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
def revoke(key_id: str = typer.Argument(..., help="the key id from `fmgate keys list`")):
    """Revoke a key. With Redis, every replica refuses it from the next request on."""
    rec = _run(lambda km: km.revoke(key_id))
    if rec is None:
        typer.echo(f"fmgate: no key with id {key_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"Revoked key {rec.id} ({rec.name}).")


@keys_app.command()
def usage(
    key: str = typer.Option(None, "--key", help="one key id; default: all keys"),
    start: str = typer.Option(None, "--start", help="first UTC date, YYYY-MM-DD; default: 30 days ago"),
    end: str = typer.Option(None, "--end", help="last UTC date, YYYY-MM-DD; default: today"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
):
    """Usage per key, model and UTC day: requests, prompt and completion tokens."""
    from .quota.keys import day_from_str

    try:
        since = day_from_str(start) if start else (dt.datetime.now(dt.UTC).date() - dt.date(1970, 1, 1)).days - 30
        until = day_from_str(end) if end else None
    except ValueError:
        typer.echo("fmgate: dates look like 2026-11-28", err=True)
        raise typer.Exit(2) from None
    rows = _run(lambda km: km.usage(key, since, until))
    if as_json:
        typer.echo(json.dumps(rows))
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
