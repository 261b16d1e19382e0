"""Key administration shared by the admin API and `fmgate keys`: create, list, edit, revoke, usage, audit.

With Redis configured, Redis holds the authoritative record (a revocation there is seen by the next
admit on every replica) and the local SQLite gets a copy. Without Redis, SQLite is the only store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import replace

from gateway.quota.keys import (
    KeyLimits,
    KeyRecord,
    ModelLimits,
    day_str,
    hash_secret,
    key_id_of,
    new_secret,
)
from gateway.quota.redis import RedisLimiter, Unavailable
from gateway.quota.store import KeyExists, Store

log = logging.getLogger("fmgate.quota")

LIMIT_FIELDS = ("rpm", "tpm", "tokens_per_day", "tokens_per_month", "max_concurrent", "weight")
EDIT_FIELDS = ("name", *LIMIT_FIELDS, "models", "expires_at", "owner", "tags", "model_limits")
AUDIT_KEEP = 10_000  # entries kept in Redis (SQLite keeps every entry this machine wrote)


def apply_changes(rec: KeyRecord, changes: dict) -> KeyRecord:
    """A record with `changes` applied. Limits given as None or 0 mean no limit (weight: back to 1).
    `model_limits` merges: {model: ModelLimits} sets that model's, {model: None} removes them."""
    unknown = set(changes) - set(EDIT_FIELDS)
    if unknown:
        raise ValueError(f"cannot edit {', '.join(sorted(unknown))}")
    lim = {k: changes[k] for k in LIMIT_FIELDS if k in changes}
    for k, v in lim.items():
        if v is None:
            lim[k] = 1.0 if k == "weight" else 0
    new = replace(rec, limits=replace(rec.limits, **lim)) if lim else rec
    if "name" in changes:
        name = (changes["name"] or "").strip()
        if not name:
            raise ValueError("a key needs a non-empty name")
        new = replace(new, name=name)
    if "models" in changes:
        models = changes["models"]
        new = replace(new, models=tuple(dict.fromkeys(models)) if models is not None else None)
    if "expires_at" in changes:
        new = replace(new, expires_at=changes["expires_at"])
    if "owner" in changes:
        new = replace(new, owner=changes["owner"] or "")
    if "tags" in changes:
        new = replace(new, tags=tuple(dict.fromkeys(changes["tags"] or ())))
    if "model_limits" in changes:
        merged = dict(new.model_limits)
        for model, ml in (changes["model_limits"] or {}).items():
            if ml is None:
                merged.pop(model, None)
            else:
                merged[model] = ml if isinstance(ml, ModelLimits) else ModelLimits(**ml)
        new = replace(new, model_limits=merged)
    return new


def _audit_value(v):
    if isinstance(v, ModelLimits):
        return v.public()
    if isinstance(v, dict):
        return {k: _audit_value(x) for k, x in v.items()}
    if isinstance(v, tuple):
        return list(v)
    return v


class BackendError(Exception):
    """An admin operation could not reach Redis; the message says what did and did not happen."""


class KeyManager:
    def __init__(self, store: Store, redis: RedisLimiter | None = None):
        self.store = store
        self.redis = redis

    async def create(self, name: str, limits: KeyLimits | None = None,
                     models: tuple[str, ...] | None = None, actor: str = "unknown",
                     **extra) -> tuple[str, KeyRecord]:
        """Returns (secret, record). The secret exists only in this return value. `extra`: expires_at,
        owner, tags, model_limits."""
        name = name.strip()
        if not name:
            raise ValueError("a key needs a non-empty name")
        for _ in range(5):
            secret = new_secret()
            digest = hash_secret(secret)
            rec = KeyRecord(id=key_id_of(digest), name=name, hash=digest, created_at=time.time(),
                            limits=limits or KeyLimits(), models=models)
            if extra:
                rec = apply_changes(rec, extra)
            if await asyncio.to_thread(self.store.get_key, rec.id) is not None:
                continue
            if self.redis is not None:
                try:
                    await self.redis.put_key(rec, create=True)
                except KeyError:
                    continue
                except Unavailable as exc:
                    raise BackendError("Redis is unreachable; no key was created.") from exc
            try:
                await asyncio.to_thread(self.store.insert_key, rec)
            except KeyExists:
                continue
            detail = {k: v for k, v in rec.public().items() if k not in ("id", "created_at", "revoked_at")}
            await self.audit_add(actor, "key.create", rec.id, detail)
            return secret, rec
        raise RuntimeError("could not allocate a unique key id")  # pragma: no cover - 48-bit ids

    async def list(self) -> list[KeyRecord]:
        if self.redis is not None:
            try:
                for rec in await self.redis.all_records():
                    await asyncio.to_thread(self.store.upsert_key, rec)
            except Unavailable:
                pass  # the local copy is the best we have
        return await asyncio.to_thread(self.store.list_keys)

    async def edit(self, key_id: str, changes: dict, actor: str = "unknown") -> KeyRecord | None:
        """Change a key's name, limits, models, expiry or metadata everywhere. None for an unknown id.
        With Redis the change is in Redis first: the next admission on any replica sees the limits, and
        every replica's cached record is at most 0.5 s old. A revocation is never undone by an edit."""
        rec = await asyncio.to_thread(self.store.get_key, key_id)
        if self.redis is None:
            if rec is None:
                return None
            new = apply_changes(rec, changes)
        else:
            try:
                remote = await self.redis.fetch(key_id)
                base = remote or rec
                if base is None:
                    return None
                new = apply_changes(base, changes)
                if remote is None or not await self.redis.edit_key(new):
                    await self.redis.load(new)  # Redis lost it: put it back with its usage
            except Unavailable as exc:
                raise BackendError("Redis is unreachable; the key was not changed.") from exc
        await asyncio.to_thread(self.store.upsert_key, new)
        await self.audit_add(actor, "key.edit", key_id, {k: _audit_value(v) for k, v in changes.items()})
        return await asyncio.to_thread(self.store.get_key, key_id)

    async def revoke(self, key_id: str, actor: str = "unknown") -> KeyRecord | None:
        """Revoke everywhere. Returns the revoked record, or None for an unknown id."""
        now = time.time()
        rec = await asyncio.to_thread(self.store.get_key, key_id)
        if self.redis is None:
            if rec is None:
                return None
            await self.audit_add(actor, "key.revoke", key_id, {})
            return await asyncio.to_thread(self.store.revoke, key_id, now)
        try:
            remote = await self.redis.fetch(key_id)
            base = remote or rec
            if base is None:
                return None
            revoked = base.with_revoked(now)
            if remote is None:
                await self.redis.load(revoked)  # Redis lost it: put it back with its usage, revoked
            await self.redis.put_key(revoked, create=False)
        except Unavailable as exc:
            if rec is not None:
                await asyncio.to_thread(self.store.revoke, key_id, now)
            raise BackendError(
                "Redis is unreachable: the key is revoked in this machine's store only, and other replicas "
                "still accept it. Run the revoke again when Redis is back."
            ) from exc
        await asyncio.to_thread(self.store.upsert_key, revoked)
        await self.audit_add(actor, "key.revoke", key_id, {})
        return await asyncio.to_thread(self.store.get_key, key_id)

    # Audit log: who did what to which key, when. Never a secret (records carry no secret or hash).
    async def audit_add(self, actor: str, action: str, key_id: str | None, detail: dict) -> None:
        at = time.time()
        await asyncio.to_thread(self.store.add_audit, at, actor, action, key_id, detail)
        if self.redis is not None:
            entry = json.dumps({"at": at, "actor": actor, "action": action, "key_id": key_id, "detail": detail},
                               sort_keys=True)
            try:
                await self.redis.audit_push(entry, AUDIT_KEEP)
            except Unavailable:
                log.warning("audit entry kept in this machine's store only: Redis is unreachable")

    async def audit(self, key_id: str | None = None, limit: int = 1000) -> list[dict]:
        """Newest first. With Redis, every replica's entries; otherwise this machine's."""
        if self.redis is not None:
            try:
                entries = [json.loads(e) for e in await self.redis.audit_read(AUDIT_KEEP)]
                return [e for e in entries if key_id is None or e["key_id"] == key_id][:limit]
            except Unavailable:
                pass
        return await asyncio.to_thread(self.store.audit, key_id, limit)

    async def usage(self, key_id: str | None = None, since_day: int | None = None,
                    until_day: int | None = None, model: str | None = None) -> list[dict]:
        """Usage per key, model and UTC day. With Redis, the larger of Redis's and SQLite's counts."""
        rows = await asyncio.to_thread(self.store.usage, key_id, since_day, until_day, model)
        merged: dict[tuple[str, str, int], list[int]] = {(k, m, d): [p, c, r] for k, m, d, p, c, r in rows}
        if self.redis is not None:
            try:
                if key_id is not None:
                    ids = [key_id]
                else:
                    ids = sorted({r.id for r in await self.redis.all_records()}
                                 | {r.id for r in await asyncio.to_thread(self.store.list_keys)})
                for k, m, d, p, c, r in await self.redis.usage_rows(ids):
                    if (since_day is not None and d < since_day) or (until_day is not None and d > until_day):
                        continue
                    if model is not None and m != model:
                        continue
                    cur = merged.setdefault((k, m, d), [0, 0, 0])
                    merged[(k, m, d)] = [max(cur[0], p), max(cur[1], c), max(cur[2], r)]
            except (Unavailable, *_redis_errors()):
                pass
        names = {r.id: r.name for r in await asyncio.to_thread(self.store.list_keys)}
        out = []
        for (k, m, d), (p, c, r) in sorted(merged.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):
            out.append({
                "key_id": k, "key_name": names.get(k), "model": m, "date": day_str(d),
                "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c, "requests": r,
            })
        return out


def _redis_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import RedisError

    return (RedisError, OSError)
