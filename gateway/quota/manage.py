"""Key administration shared by the admin API and `fmgate keys`: create, list, revoke, usage.

With Redis configured, Redis holds the authoritative record (a revocation there is seen by the next
admit on every replica) and the local SQLite gets a copy. Without Redis, SQLite is the only store.
"""

from __future__ import annotations

import asyncio
import time

from gateway.quota.keys import (
    KeyLimits,
    KeyRecord,
    day_str,
    hash_secret,
    key_id_of,
    new_secret,
)
from gateway.quota.redis import RedisLimiter, Unavailable
from gateway.quota.store import KeyExists, Store


class BackendError(Exception):
    """An admin operation could not reach Redis; the message says what did and did not happen."""


class KeyManager:
    def __init__(self, store: Store, redis: RedisLimiter | None = None):
        self.store = store
        self.redis = redis

    async def create(self, name: str, limits: KeyLimits | None = None,
                     models: tuple[str, ...] | None = None) -> tuple[str, KeyRecord]:
        """Returns (secret, record). The secret exists only in this return value."""
        name = name.strip()
        if not name:
            raise ValueError("a key needs a non-empty name")
        for _ in range(5):
            secret = new_secret()
            digest = hash_secret(secret)
            rec = KeyRecord(id=key_id_of(digest), name=name, hash=digest, created_at=time.time(),
                            limits=limits or KeyLimits(), models=models)
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

    async def revoke(self, key_id: str) -> KeyRecord | None:
        """Revoke everywhere. Returns the revoked record, or None for an unknown id."""
        now = time.time()
        rec = await asyncio.to_thread(self.store.get_key, key_id)
        if self.redis is None:
            return await asyncio.to_thread(self.store.revoke, key_id, now) if rec else None
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
        return await asyncio.to_thread(self.store.get_key, key_id)

    async def usage(self, key_id: str | None = None, since_day: int | None = None,
                    until_day: int | None = None) -> list[dict]:
        """Usage per key, model and UTC day. With Redis, the larger of Redis's and SQLite's counts."""
        rows = await asyncio.to_thread(self.store.usage, key_id, since_day, until_day)
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
