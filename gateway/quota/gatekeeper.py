"""The Gatekeeper: the only thing the HTTP layer calls for authentication, model permission and quotas."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import secrets
import time
import weakref
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from gateway.errors import AUTHENTICATION, PERMISSION, UNAVAILABLE, APIError
from gateway.metrics import QUOTA_REJECTIONS, REDIS_ERRORS
from gateway.quota import base
from gateway.quota.keys import (
    KeyLimits,
    KeyRecord,
    day_number,
    hash_secret,
    key_id_of,
    month_of_day,
    next_month_start_day,
    same_digest,
)
from gateway.quota.manage import KeyManager
from gateway.quota.memory import MemoryLimiter
from gateway.quota.redis import RedisLimiter, Unavailable, stop_task
from gateway.quota.store import Store

if TYPE_CHECKING:
    from starlette.requests import Request

    from gateway.settings import Settings

log = logging.getLogger("fmgate.quota")


def open_to_network(host: str) -> bool:
    """Whether a bind address is reachable from other machines (anything but loopback)."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a host name: it resolves to whatever it resolves to


CACHE_TTL_S = 0.5  # how stale a key record may be: a revocation takes effect within this (memory mode)
_DUMMY_DIGEST = "0" * 64
_MISS: KeyRecord | None = object()  # type: ignore[assignment]


def check_settings(settings: Settings) -> None:
    """Refuse configurations whose limits would silently not hold."""
    if settings.workers > 1 and not settings.redis_url and settings.auth != "off":
        raise ValueError(
            "workers > 1 needs FMGATE_REDIS_URL: without Redis each worker counts on its own, so every "
            "limit would be multiplied by the number of workers. Set FMGATE_REDIS_URL, use one worker, "
            "or turn auth off (FMGATE_AUTH=off)."
        )


@dataclass(frozen=True)
class Principal:
    """Who is calling. `key_id` is safe to log; the secret is never kept."""

    key_id: str | None
    name: str
    models: tuple[str, ...] | None = None
    anonymous: bool = False
    weight: float = 1.0  # fair-share weight (the key's limits)

    @property
    def tenant(self) -> str:
        """The fairness key: the key id, or "" when anonymous."""
        return self.key_id or ""


ANONYMOUS = Principal(key_id=None, name="anonymous", anonymous=True)


class Grant:
    """One admitted request. `settle` exactly once (repeats are ignored), also on errors and disconnects."""

    def __init__(self, gk: Gatekeeper | None, principal: Principal, model: str, reserve: int, lease: str,
                 decision: base.Decision | None, mode: str):
        self._gk = gk
        self.principal = principal
        self.model = model
        self.reserve = reserve
        self.lease = lease
        self.decision = decision
        # "memory" | "redis" | "local" (admitted while Redis was away) | "unsure" (open mode: the admission's
        # answer was lost; settled through Redis by lease, so charged once whether or not it ran) | "none"
        self.mode = mode
        self.admitted_ms = int(time.time() * 1000)
        self.settled = False
        self.headers: dict[str, str] = decision.headers() if decision is not None and decision.ok else {}

    async def settle(self, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        if self.settled:
            return
        self.settled = True
        gk = self._gk
        if gk is None or self.mode == "none":
            return
        gk._live.discard(self)
        p, c = max(0, int(prompt_tokens or 0)), max(0, int(completion_tokens or 0))
        kid = self.principal.key_id
        assert kid is not None
        d = self.decision
        assert d is not None
        if self.mode in ("local", "unsure"):
            await gk.degraded.settle(kid, self.lease, self.reserve, p, c, self.model, d.day, d.month)
        if self.mode == "local":
            assert isinstance(gk.limiter, RedisLimiter)
            gk.limiter.charge_local(kid, self.model, d.day, p, c, ts_ms=self.admitted_ms)
            return
        try:
            await gk.limiter.settle(kid, self.lease, self.reserve, p, c, self.model, d.day, d.month)
        except Exception:  # settle runs in finally blocks; it must never raise into the request
            log.exception("quota settle failed for key %s", kid)
        if self.mode == "memory":
            gk._record_usage(kid, self.model, d.day, p, c)

    async def renew(self) -> None:
        """Extend the concurrency lease now (the Gatekeeper also renews live grants in the background)."""
        if not self.settled and self._gk is not None and self.mode in ("memory", "redis"):
            await self._gk.limiter.renew({self.principal.key_id: [self.lease]})


class Gatekeeper:
    def __init__(self, settings: Settings, store: Store, limiter: MemoryLimiter | RedisLimiter,
                 lease_ttl_s: float, flush_interval_s: float, cache_ttl_s: float):
        self.settings = settings
        self.store = store
        self.limiter = limiter
        self.redis = limiter if isinstance(limiter, RedisLimiter) else None
        self.keys = KeyManager(store, self.redis)
        self.fail_open = settings.quota_on_redis_error == "open"
        # Open mode while Redis is away: this replica's share of each key's limits (see degraded_record).
        self.replicas = replica_count(settings)
        self.degraded = MemoryLimiter(store, window_s=getattr(limiter, "window_ms", 60_000) / 1000,
                                      lease_ttl_s=lease_ttl_s)
        self.lease_ttl_s = lease_ttl_s
        self.flush_interval_s = flush_interval_s
        self.cache_ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[KeyRecord | None, float]] = {}
        self._lookups: dict[str, asyncio.Future] = {}
        self._auth_seen = False
        self._auth_checked = 0.0
        self._live: weakref.WeakSet[Grant] = weakref.WeakSet()
        self._usage: dict[tuple[str, str, int], list[int]] = {}
        self._tasks: list[asyncio.Task] = []
        self._closed = False

    @classmethod
    async def create(cls, settings: Settings, *, prefix: str | None = None, window_s: float = 60.0,
                     lease_ttl_s: float = 30.0, flush_interval_s: float = 1.0, sync_interval_s: float = 2.0,
                     cache_ttl_s: float = CACHE_TTL_S) -> Gatekeeper:
        check_settings(settings)
        store = await asyncio.to_thread(Store, settings.home)
        limiter: MemoryLimiter | RedisLimiter
        if settings.redis_url:
            prefix = prefix or os.environ.get("FMGATE_REDIS_PREFIX") or "fm"
            limiter = RedisLimiter(settings.redis_url, store, prefix=prefix, window_s=window_s,
                                   lease_ttl_s=lease_ttl_s, sync_interval_s=sync_interval_s)
            await limiter.start()
        else:
            limiter = MemoryLimiter(store, window_s=window_s, lease_ttl_s=lease_ttl_s)
        gk = cls(settings, store, limiter, lease_ttl_s, flush_interval_s, cache_ttl_s)
        gk._tasks.append(asyncio.create_task(gk._renew_loop(), name="fmgate-quota-renew"))
        if gk.redis is None:
            gk._tasks.append(asyncio.create_task(gk._flush_loop(), name="fmgate-quota-flush"))
        log.info("quotas: %s backend, auth=%s", "redis" if gk.redis else "memory", settings.auth)
        if open_to_network(settings.host) and settings.auth != "on" and not await gk.auth_enabled():
            log.warning("bound to %s (not loopback) with %s: anyone who can reach port %s is served, unlimited "
                        "and unrecorded. Create a key (fmgate keys create) or set FMGATE_AUTH=on.", settings.host,
                        "auth=off" if settings.auth == "off" else "auth=auto and no API key yet", settings.port)
        return gk

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for t in self._tasks:
            await stop_task(t)
        await self.flush_usage()
        await self.limiter.close()
        await asyncio.to_thread(self.store.close)

    async def ready(self) -> bool:
        if self.redis is None:
            return self.store.ping()
        ok = await self.redis.ready()
        return ok or self.fail_open

    # Authentication.
    async def auth_enabled(self) -> bool:
        mode = self.settings.auth
        if mode == "off":
            return False
        if mode == "on" or self._auth_seen:
            return True
        # auto: on as soon as any key exists (revoked ones too, so revoking the last key never opens
        # the box); checked at most once per cache TTL, and never turns off again.
        now = time.monotonic()
        if now - self._auth_checked >= self.cache_ttl_s:
            self._auth_checked = now
            seen = await asyncio.to_thread(self.store.any_keys)
            if not seen and self.redis is not None:
                try:
                    seen = await self.redis.any_keys()
                except Unavailable:
                    pass
            self._auth_seen = seen
        return self._auth_seen

    async def authenticate(self, request: Request) -> Principal:
        if self.settings.auth == "off":
            return ANONYMOUS
        secret = _bearer(request.headers.get("authorization"))
        enabled = await self.auth_enabled()
        if not enabled and not secret:
            return ANONYMOUS
        if not secret:
            raise _auth_error(
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        digest = hash_secret(secret)
        rec = await self._record(key_id_of(digest))
        valid = same_digest(rec.hash if rec else _DUMMY_DIGEST, digest) and rec is not None
        if not enabled:
            # auto mode before this process has seen a key: a real key is honoured (and its limits
            # applied) the moment it exists anywhere, not after the next once-a-second check.
            if not valid:
                return ANONYMOUS
            self._auth_seen = True
        if not valid or rec is None:
            raise _auth_error("Incorrect API key provided.")
        if rec.revoked:
            raise _auth_error("This API key has been revoked.")
        if rec.expired(time.time()):
            raise _auth_error("This API key has expired.")
        return Principal(key_id=rec.id, name=rec.name, models=rec.models, weight=rec.limits.weight)

    async def _record(self, key_id: str) -> KeyRecord | None:
        hit = self._cache.get(key_id)
        now = time.monotonic()
        if hit is not None and now - hit[1] < self.cache_ttl_s:
            return hit[0]
        if self.redis is None:
            rec = self.store.get_key(key_id)
        else:
            # One Redis lookup per key however many requests arrive while it is cold.
            fut = self._lookups.get(key_id)
            if fut is not None:
                got = await asyncio.shield(fut)
                if got is not _MISS:
                    return got
            fut = self._lookups[key_id] = asyncio.get_running_loop().create_future()
            rec = _MISS
            try:
                try:
                    rec = await self.redis.lookup(key_id)
                except Unavailable:
                    rec = self.store.get_key(key_id)  # the local mirror
            finally:
                # On an error or cancellation the waiters get _MISS and look up for themselves.
                fut.set_result(rec)
                if self._lookups.get(key_id) is fut:
                    del self._lookups[key_id]
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[key_id] = (rec, now)
        return rec

    def invalidate(self, key_id: str) -> None:
        self._cache.pop(key_id, None)

    def check_model(self, principal: Principal, model_name: str) -> None:
        if principal.models is not None and model_name not in principal.models:
            QUOTA_REJECTIONS.labels("model_not_allowed").inc()
            raise APIError(403, f"This API key is not allowed to use the model '{model_name}'.", PERMISSION,
                           code="model_not_allowed", param="model")

    # Admission.
    async def admit(self, principal: Principal, model_name: str, reserve_tokens: int) -> Grant:
        if principal.anonymous or principal.key_id is None:
            return Grant(None, principal, model_name, 0, "", None, "none")
        reserve = max(0, int(reserve_tokens or 0))
        rec = await self._record(principal.key_id)
        if rec is None or rec.revoked:
            QUOTA_REJECTIONS.labels(base.REVOKED).inc()
            raise _auth_error("This API key has been revoked.")
        if rec.expired(time.time()):
            QUOTA_REJECTIONS.labels(base.EXPIRED).inc()
            raise _auth_error("This API key has expired.")
        lease = secrets.token_hex(8)
        try:
            d = await self.limiter.admit(rec, lease, reserve, model_name)
        except Unavailable as exc:
            return self._admit_without_redis(principal, rec, model_name, reserve, lease, exc.sent)
        if d.status in (base.REVOKED, base.EXPIRED):
            self.invalidate(rec.id)
            QUOTA_REJECTIONS.labels(d.status).inc()
            raise _auth_error("This API key has been revoked." if d.status == base.REVOKED
                              else "This API key has expired.")
        if d.status == base.MODEL_NOT_ALLOWED:  # the allow-list changed after this process cached it
            self.invalidate(rec.id)
            self.check_model(replace(principal, models=()), model_name)
        if not d.ok:
            QUOTA_REJECTIONS.labels(d.status).inc()
            kind = d.status.removeprefix("model_")
            if kind == base.DAY:
                d = replace(d, retry_ms=(d.day + 1) * 86_400_000 - d.now_ms)
            elif kind == base.MONTH:
                d = replace(d, retry_ms=next_month_start_day(d.day) * 86_400_000 - d.now_ms)
            raise base.refusal(d, reserve, model_name)
        grant = Grant(self, principal, model_name, reserve, lease, d, "redis" if self.redis else "memory")
        self._live.add(grant)
        return grant

    def _admit_without_redis(self, principal: Principal, rec: KeyRecord, model: str, reserve: int, lease: str,
                             sent: bool) -> Grant:
        """Redis did not answer. Closed: 503. Open: admit against this replica's share of the limits.
        When the call may have reached Redis (`sent`), its script may have run: closed mode undoes it in
        the background; open mode settles it through Redis by lease, so it is charged exactly once."""
        assert self.redis is not None
        now = time.time()
        day = day_number(now)
        month = month_of_day(day)
        if sent and not self.fail_open:
            self.redis.cancel_later(rec.id, lease, reserve, model, day, month)
        if not self.fail_open:
            QUOTA_REJECTIONS.labels(base.UNAVAILABLE).inc()
            raise APIError(503, "Rate limiting is temporarily unavailable. Please retry shortly.",
                           UNAVAILABLE, code="quota_backend_unavailable", headers={"retry-after": "1"})
        d = self.degraded.admit_now(degraded_record(rec, self.replicas), lease, reserve, model)
        if not d.ok:
            if sent:
                self.redis.cancel_later(rec.id, lease, reserve, model, day, month)
            if d.status == base.MODEL_NOT_ALLOWED:
                self.check_model(replace(principal, models=()), model)
            QUOTA_REJECTIONS.labels(d.status).inc()
            raise base.refusal(d, reserve, model)
        REDIS_ERRORS.labels("admitted_without_redis").inc()
        grant = Grant(self, principal, model, reserve, lease, d, "unsure" if sent else "local")
        self._live.add(grant)
        return grant

    # Background work.
    async def _renew_loop(self) -> None:
        interval = max(0.05, self.lease_ttl_s / 3)
        while not self._closed:
            await asyncio.sleep(interval)
            leases: dict[str, list[str]] = {}
            local: dict[str, list[str]] = {}
            for g in list(self._live):
                if not g.settled and g.principal.key_id:
                    target = leases if g.mode in ("memory", "redis") else local
                    target.setdefault(g.principal.key_id, []).append(g.lease)
            try:
                await self.limiter.renew(leases)
                await self.degraded.renew(local)
            except Exception:
                log.exception("quota lease renewal failed")

    def _record_usage(self, key_id: str, model: str, day: int, prompt: int, completion: int) -> None:
        row = self._usage.setdefault((key_id, model, day), [0, 0, 0])
        row[0] += prompt
        row[1] += completion
        row[2] += 1

    async def flush_usage(self) -> None:
        """Write buffered usage to SQLite (memory mode; Redis mode syncs from Redis instead)."""
        if self.redis is not None:
            await self.redis.sync()
            return
        if not self._usage:
            return
        batch, self._usage = self._usage, {}
        rows = [(k, m, d, p, c, r) for (k, m, d), (p, c, r) in batch.items()]
        try:
            await asyncio.to_thread(self.store.add_usage, rows)
        except Exception:
            log.exception("could not record usage; will retry")
            for (k, m, d), v in batch.items():
                cur = self._usage.setdefault((k, m, d), [0, 0, 0])
                for i in range(3):
                    cur[i] += v[i]

    async def _flush_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.flush_interval_s)
            await self.flush_usage()

    # Administration (the admin API and the CLI use the same KeyManager).
    async def create_key(self, name: str, limits: KeyLimits | None = None,
                         models: tuple[str, ...] | None = None, actor: str = "unknown",
                         **extra) -> tuple[str, KeyRecord]:
        secret, rec = await self.keys.create(name, limits, models, actor=actor, **extra)
        self._auth_seen = True
        return secret, rec

    async def list_keys(self) -> list[KeyRecord]:
        return await self.keys.list()

    async def edit_key(self, key_id: str, changes: dict, actor: str = "unknown") -> KeyRecord | None:
        try:
            return await self.keys.edit(key_id, changes, actor=actor)
        finally:
            self.invalidate(key_id)

    async def revoke_key(self, key_id: str, actor: str = "unknown") -> KeyRecord | None:
        try:
            return await self.keys.revoke(key_id, actor=actor)
        finally:
            self.invalidate(key_id)

    async def usage(self, key_id: str | None = None, since_day: int | None = None,
                    until_day: int | None = None, model: str | None = None) -> list[dict]:
        await self.flush_usage()
        return await self.keys.usage(key_id, since_day, until_day, model)

    async def audit(self, key_id: str | None = None, limit: int = 1000) -> list[dict]:
        return await self.keys.audit(key_id, limit)


def replica_count(settings: Settings) -> int:
    """FMGATE_QUOTA_REPLICAS (or a `quota_replicas` setting): how many replicas share Redis."""
    value = getattr(settings, "quota_replicas", None) or os.environ.get("FMGATE_QUOTA_REPLICAS") or 1
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"FMGATE_QUOTA_REPLICAS must be a whole number >= 1, not {value!r}") from None
    if n < 1:
        raise ValueError(f"FMGATE_QUOTA_REPLICAS must be a whole number >= 1, not {value!r}")
    return n


def degraded_record(rec: KeyRecord, replicas: int) -> KeyRecord:
    """The key with its rate and concurrency limits divided by the replica count (at least 1 each), for
    the per-replica limiter of open mode. Budgets stay whole: they are checked against this machine's
    copy of the usage, which is as fresh as the last sync from Redis."""
    def share(v: int) -> int:
        return max(1, v // replicas) if v else 0

    lim = rec.limits
    return replace(
        rec,
        limits=replace(lim, rpm=share(lim.rpm), tpm=share(lim.tpm), max_concurrent=share(lim.max_concurrent)),
        model_limits={m: replace(ml, rpm=share(ml.rpm), tpm=share(ml.tpm)) for m, ml in rec.model_limits.items()},
    )


def _bearer(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


def _auth_error(message: str) -> APIError:
    return APIError(401, message, AUTHENTICATION, code="invalid_api_key",
                    headers={"www-authenticate": "Bearer"})
