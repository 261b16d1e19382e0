"""Redis limiter: exact limits across workers and replicas, one EVALSHA per admit and one per settle.

Redis is the source of truth for key records (so a revocation is seen by the next admit anywhere),
window logs, budgets and usage. Each replica mirrors records and usage into its SQLite, which is
what brings them back if Redis loses its data. When Redis is unreachable the Gatekeeper either
refuses (closed) or admits without limits (open); charges that could not be written are kept here
and replayed when Redis answers again.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Iterable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.metrics import REDIS_ERRORS
from gateway.quota import base, scripts
from gateway.quota.keys import KeyRecord, day_number
from gateway.quota.store import Store, UsageRow

log = logging.getLogger("fmgate.quota")

_SUFFIXES = ("meta", "rq", "tk", "tka", "cc", "res", "done", "bud", "use")
_MODEL_SUFFIXES = ("rq", "tk", "tka", "bud")
_ERRORS = (RedisError, OSError, asyncio.TimeoutError)
MAX_PENDING_SETTLES = 100_000
FAIL_FAST_S = 0.25  # after an error, refuse without trying Redis for this long (unless a probe succeeds)
MAX_PENDING_WINDOW = 10_000


async def stop_task(task: asyncio.Task, timeout: float = 5.0) -> None:
    """Cancel a background loop and wait for it. The loops also check a closing flag, because a
    cancellation that lands inside a Redis call can come back as a connection error and be absorbed."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:  # pragma: no cover - the flag makes this unreachable short of a bug
        log.warning("background task %s did not stop", task.get_name())
    elif not task.cancelled() and task.exception() is not None:
        log.warning("background task %s failed: %r", task.get_name(), task.exception())


class Unavailable(Exception):
    """Redis did not answer; the caller applies the fail mode. `sent`: the call may have reached Redis
    (it timed out or broke mid-way), so its script may have run."""

    def __init__(self, sent: bool = False):
        super().__init__()
        self.sent = sent


SOCKET_TIMEOUT_S = 5.0  # per Redis call; the tests make it short to fake a slow Redis


def _hosts(netloc: str) -> list[tuple[str, int]]:
    """'h1:26379,h2' -> [('h1', 26379), ('h2', default)] (credentials before '@' are dropped here)."""
    out = []
    for part in netloc.rpartition("@")[2].split(","):
        host, _, port = part.strip().rpartition(":") if ":" in part else (part.strip(), "", "")
        out.append((host or "127.0.0.1", int(port) if port else 0))
    return out


def connect(url: str):
    """A client for `url`, through redis-py's own clients:

    redis://host:port/db, rediss://, unix://          one server
    redis+sentinel://host:port[,host:port]/service[/db]  Sentinel: the master of `service`, followed on failover
    redis+cluster://host:port[,host:port]              Cluster: every script's keys share one hash tag (one slot)

    Credentials go in the URL as usual (user:password@); with Sentinel they are the master's.
    """
    # One immediate retry covers a pooled connection that died with a Redis restart; every script is
    # idempotent (lease ids, batch ids), so a retried call cannot charge twice. No backoff: a down
    # Redis must fail fast, not stall requests. Timeouts are not retried: a slow Redis should cost one
    # timeout, not two.
    from urllib.parse import unquote, urlsplit

    opts = dict(decode_responses=True, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=5.0,
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))
    u = urlsplit(url)
    auth = {"username": unquote(u.username) if u.username else None,
            "password": unquote(u.password) if u.password else None}
    if u.scheme == "redis+sentinel":
        from redis.asyncio.sentinel import Sentinel

        parts = [p for p in u.path.split("/") if p]
        if not parts:
            raise ValueError("a redis+sentinel:// URL names the service: redis+sentinel://host:26379/mymaster")
        hosts = [(h, p or 26379) for h, p in _hosts(u.netloc)]
        sentinel = Sentinel(hosts, sentinel_kwargs={"socket_timeout": 5.0, "socket_connect_timeout": 5.0},
                            **auth, **opts)
        client = sentinel.master_for(parts[0], db=int(parts[1]) if len(parts) > 1 else 0)
        client._fmgate_sentinel = sentinel  # closed with the client (close_client)
        return client
    if u.scheme in ("redis+cluster", "rediss+cluster"):
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        nodes = [ClusterNode(h, p or 6379) for h, p in _hosts(u.netloc)]
        return RedisCluster(startup_nodes=nodes, max_connections=64, ssl=u.scheme.startswith("rediss"),
                            **auth, **opts)
    # A bounded pool: a burst queues for a connection (backpressure) instead of failing; a dead Redis
    # still fails fast, through the connect and socket timeouts.
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=64, timeout=30.0,
                                                    health_check_interval=0, **opts)
    return aioredis.Redis.from_pool(pool)  # the client owns the pool and closes it


async def close_client(client) -> None:
    await client.aclose()
    sentinel = getattr(client, "_fmgate_sentinel", None)
    for s in getattr(sentinel, "sentinels", ()):
        await s.aclose()


class RedisLimiter:
    def __init__(self, url: str, store: Store, prefix: str = "fm", window_s: float = 60.0,
                 lease_ttl_s: float = 30.0, sync_interval_s: float = 2.0):
        self.url = url
        self.store = store
        self.prefix = prefix
        self.window_ms = int(window_s * 1000)
        self.ttl_ms = int(lease_ttl_s * 1000)
        self.done_keep_ms = 600_000
        self.sync_interval_s = sync_interval_s
        self.r = connect(url)
        self._admit = self.r.register_script(scripts.ADMIT)
        self._settle = self.r.register_script(scripts.SETTLE)
        self._renew = self.r.register_script(scripts.RENEW)
        self._replay = self.r.register_script(scripts.REPLAY)
        self._load = self.r.register_script(scripts.LOAD)
        self._edit = self.r.register_script(scripts.EDIT)
        self._down_until = 0.0
        self._down = False
        self._pending_settles: list[dict] = []
        self._pending_charges: dict[str, dict] = {}  # key id -> charges still accumulating
        self._frozen: list[tuple[str, str, dict]] = []  # (key id, batch id, charges) being replayed
        self._touched: set[str] = set()
        self._task: asyncio.Task | None = None
        self._closing = False
        self._probe: asyncio.Task | None = None
        self._timeout_logged = 0.0
        self._replay_lock = asyncio.Lock()

    # Layout.
    def keys(self, key_id: str, model: str = "") -> list[str]:
        """The thirteen keys every script gets (scripts.py), all in one Cluster slot."""
        tag = f"{{{self.prefix}:{key_id}}}"
        return [f"{tag}:{s}" for s in _SUFFIXES] + [f"{tag}:m:{model}:{s}" for s in _MODEL_SUFFIXES]

    @property
    def registry(self) -> str:
        return f"{{{self.prefix}}}:keys"

    @property
    def audit_key(self) -> str:
        return f"{{{self.prefix}}}:audit"

    # Health.
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, op: str, exc: BaseException) -> None:
        """Count the error. A refused or broken connection means Redis is away: fail fast for a moment
        and probe at once. A timeout fails only its own call: under CPU overload this process's event
        loop can lag past a deadline while Redis is fine, and one late answer must not refuse a burst."""
        REDIS_ERRORS.labels(op).inc()
        if isinstance(exc, (RedisTimeoutError, asyncio.TimeoutError)):
            now = time.monotonic()
            if now - self._timeout_logged > 10:  # at most one line per 10 s
                self._timeout_logged = now
                log.warning("quota redis call timed out (%s)", op)
            return
        self._down_until = time.monotonic() + FAIL_FAST_S
        if not self._down:
            self._down = True
            log.warning("quota redis unreachable (%s): %s", op, type(exc).__name__)
        if (self._probe is None or self._probe.done()) and not self._closing:
            try:
                self._probe = asyncio.get_running_loop().create_task(self._probe_until_up(), name="fmgate-quota-probe")
            except RuntimeError:  # pragma: no cover - no loop (sync callers)
                pass

    async def _probe_until_up(self) -> None:
        while not self._closing:
            try:
                await self.r.ping()
            except _ERRORS:
                await asyncio.sleep(FAIL_FAST_S)
                continue
            self._down_until = 0.0
            self._ok()
            return

    def _ok(self) -> None:
        if self._down:
            self._down = False
            log.info("quota redis reachable again")

    async def ready(self) -> bool:
        try:
            await self.r.ping()
        except _ERRORS as exc:
            self._failed("ping", exc)
            return False
        self._ok()
        return True

    # Key records.
    async def lookup(self, key_id: str) -> KeyRecord | None:
        """The record from Redis; reloaded from SQLite if Redis lost it. Raises Unavailable."""
        if not self.available():
            raise Unavailable
        try:
            h = await self.r.hgetall(self.keys(key_id)[0])
        except _ERRORS as exc:
            self._failed("lookup", exc)
            raise Unavailable from exc
        self._ok()
        if h and h.get("hash"):
            return KeyRecord.from_redis(key_id, h)
        rec = await asyncio.to_thread(self.store.get_key, key_id)
        if rec is not None:
            await self.load(rec)
        return rec

    async def fetch(self, key_id: str) -> KeyRecord | None:
        """The record as Redis has it, without reloading. Raises Unavailable."""
        try:
            h = await self.r.hgetall(self.keys(key_id)[0])
        except _ERRORS as exc:
            self._failed("admin", exc)
            raise Unavailable from exc
        return KeyRecord.from_redis(key_id, h) if h and h.get("hash") else None

    async def load(self, rec: KeyRecord) -> None:
        """Write a record and its recorded usage back into Redis (only if Redis has no record)."""
        since = day_number(time.time()) - 62
        rows = await asyncio.to_thread(self.store.usage, rec.id, since)
        args: list = []
        meta = rec.to_redis()
        args.append(len(meta))
        for k, v in meta.items():
            args += [k, v]
        for _kid, model, day, p, c, r in rows:
            args += [day, model, p, c, r]
        try:
            await self._load(keys=self.keys(rec.id), args=args)
            await self.r.sadd(self.registry, rec.id)
        except _ERRORS as exc:
            self._failed("load", exc)
            raise Unavailable from exc

    async def put_key(self, rec: KeyRecord, *, create: bool) -> None:
        """Create or overwrite a record (admin operations). Raises Unavailable."""
        meta_key = self.keys(rec.id)[0]
        try:
            if create and await self.r.exists(meta_key):
                raise KeyError(rec.id)
            async with self.r.pipeline(transaction=False) as p:
                p.hset(meta_key, mapping=rec.to_redis())
                p.sadd(self.registry, rec.id)
                await p.execute()
        except _ERRORS as exc:
            self._failed("admin", exc)
            raise Unavailable from exc

    async def edit_key(self, rec: KeyRecord) -> bool:
        """Replace a record's fields atomically, keeping a revocation. False when Redis has no record."""
        args = [x for kv in rec.to_redis().items() for x in kv]
        try:
            return bool(await self._edit(keys=[self.keys(rec.id)[0]], args=args))
        except _ERRORS as exc:
            self._failed("admin", exc)
            raise Unavailable from exc

    async def audit_push(self, entry: str, keep: int) -> None:
        try:
            async with self.r.pipeline(transaction=False) as p:
                p.lpush(self.audit_key, entry)
                p.ltrim(self.audit_key, 0, keep - 1)
                await p.execute()
        except _ERRORS as exc:
            self._failed("admin", exc)
            raise Unavailable from exc

    async def audit_read(self, n: int) -> list[str]:
        try:
            return await self.r.lrange(self.audit_key, 0, n - 1)
        except _ERRORS as exc:
            self._failed("admin", exc)
            raise Unavailable from exc

    async def any_keys(self) -> bool:
        try:
            return bool(await self.r.scard(self.registry))
        except _ERRORS as exc:
            self._failed("auth", exc)
            raise Unavailable from exc

    async def all_records(self) -> list[KeyRecord]:
        try:
            ids = sorted(await self.r.smembers(self.registry))
            async with self.r.pipeline(transaction=False) as p:
                for kid in ids:
                    p.hgetall(self.keys(kid)[0])
                metas = await p.execute()
        except _ERRORS as exc:
            self._failed("admin", exc)
            raise Unavailable from exc
        return [KeyRecord.from_redis(kid, h) for kid, h in zip(ids, metas, strict=True) if h and h.get("hash")]

    # Admission.
    async def admit(self, rec: KeyRecord, lease: str, reserve: int, model: str = "") -> base.Decision:
        if not self.available():
            raise Unavailable
        args = [lease, reserve, self.window_ms, self.ttl_ms, self.done_keep_ms, model]
        keys = self.keys(rec.id, model)
        try:
            res = await self._admit(keys=keys, args=args)
            if res[0] == "load":
                await self.load(rec)
                res = await self._admit(keys=keys, args=args)
        except Unavailable:
            raise
        except _ERRORS as exc:
            self._failed("admit", exc)
            raise Unavailable(sent=True) from exc
        self._ok()
        if res[0] == "load":  # pragma: no cover - the record vanished between two calls
            raise Unavailable
        status, now, day, month, rpm, rem_r, reset_r, tpm, rem_t, reset_t, retry = res
        return base.Decision(
            status, int(now), int(day), int(month), int(rpm), int(rem_r), int(reset_r), int(tpm), int(rem_t),
            int(reset_t), int(retry),
        )

    async def settle(self, key_id: str, lease: str, reserve: int, prompt: int, completion: int,
                     model: str, day: int, month: int, cancel: bool = False) -> None:
        """Correct the reservation to the real use; idempotent by lease. `cancel`: the request was never
        served, so undo its reservation entirely (if the admission ran at all)."""
        item = {"key_id": key_id, "lease": lease, "reserve": reserve, "prompt": prompt,
                "completion": completion, "model": model, "day": day, "month": month}
        if cancel:
            item["cancel"] = 1
        if not self.available() or self._pending_settles:
            self._queue_settle(item)  # keep order behind earlier failures
            return
        try:
            await self._settle_one(item)
        except _ERRORS as exc:
            self._failed("settle", exc)
            self._queue_settle(item)

    async def _settle_one(self, item: dict) -> None:
        keys = self.keys(item["key_id"], item["model"])
        args = [item["lease"], item["reserve"], item["prompt"], item["completion"], item["day"],
                item["month"], item["model"], self.window_ms, self.done_keep_ms, item.get("cancel", 0)]
        res = await self._settle(keys=keys, args=args)
        if res == "load":
            rec = await asyncio.to_thread(self.store.get_key, item["key_id"])
            if rec is None:
                log.warning("dropping usage for key %s: no record in Redis or SQLite", item["key_id"])
                return
            await self.load(rec)
            await self._settle(keys=keys, args=args)
        self._touched.add(item["key_id"])

    def cancel_later(self, key_id: str, lease: str, reserve: int, model: str, day: int, month: int) -> None:
        """Undo an admission whose answer was lost (it may or may not have run), from the background
        loop: idempotent by lease, so it is safe whichever happened."""
        self._queue_settle({"key_id": key_id, "lease": lease, "reserve": reserve, "prompt": 0, "completion": 0,
                            "model": model, "day": day, "month": month, "cancel": 1})

    def _queue_settle(self, item: dict) -> None:
        if len(self._pending_settles) >= MAX_PENDING_SETTLES:
            self._charge_local_item(self._pending_settles.pop(0))
        self._pending_settles.append(item)

    def _charge_local_item(self, item: dict) -> None:
        if item.get("cancel"):
            return  # nothing was served
        self.charge_local(item["key_id"], item["model"], item["day"], item["prompt"], item["completion"],
                          ts_ms=None)

    def charge_local(self, key_id: str, model: str, day: int, prompt: int, completion: int,
                     ts_ms: int | None) -> None:
        """Record a request admitted without Redis, to replay when it returns."""
        ch = self._pending_charges.setdefault(key_id, {"rows": {}, "window": []})
        row = ch["rows"].setdefault(f"{day}|{model}", [0, 0, 0])
        row[0] += prompt
        row[1] += completion
        row[2] += 1
        if ts_ms is not None:
            win = ch["window"]
            if len(win) >= MAX_PENDING_WINDOW:
                del win[: len(win) // 2]
            win.append((ts_ms, prompt + completion))

    @property
    def pending(self) -> int:
        return len(self._pending_settles) + len(self._pending_charges) + len(self._frozen)

    async def reconcile(self) -> bool:
        """Replay what could not be written. True when nothing is left."""
        async with self._replay_lock:
            if not self.pending:
                return True
            try:
                await self.r.ping()
            except _ERRORS as exc:
                self._failed("reconcile", exc)
                return False
            self._ok()
            self._down_until = 0.0
            # Freeze what accumulated so far under batch ids: a batch retried after a lost reply is
            # recognised by Redis and not charged twice, and later charges go into new batches.
            for key_id, ch in self._pending_charges.items():
                self._frozen.append((key_id, secrets.token_hex(8), ch))
            self._pending_charges = {}
            n_settles, n_charges = len(self._pending_settles), len(self._frozen)
            try:
                while self._pending_settles:
                    await self._settle_one(self._pending_settles[0])
                    self._pending_settles.pop(0)
                while self._frozen:
                    await self._replay_charges(*self._frozen[0])
                    self._frozen.pop(0)
            except (_ERRORS + (Unavailable,)) as exc:
                self._failed("reconcile", exc)
                return False
            log.info("quota redis reconciled: %d settles, %d keys with local charges", n_settles, n_charges)
            return True

    async def _replay_charges(self, key_id: str, batch: str, ch: dict) -> None:
        now = int(time.time() * 1000)
        args: list = [batch, self.window_ms, self.done_keep_ms, len(ch["rows"])]
        for dm, (p, c, r) in ch["rows"].items():
            day, model = dm.split("|", 1)
            args += [int(day), model, p, c, r]
        for ts, tokens in ch["window"]:
            age = now - ts
            if age < self.window_ms:
                args += [max(0, age), tokens]
        keys = self.keys(key_id)
        res = await self._replay(keys=keys, args=args)
        if res == "load":
            rec = await asyncio.to_thread(self.store.get_key, key_id)
            if rec is None:
                return
            await self.load(rec)
            await self._replay(keys=keys, args=args)
        self._touched.add(key_id)

    async def renew(self, leases: dict[str, list[str]]) -> None:
        if not leases or not self.available():
            return
        try:
            # Concurrent calls, not a pipeline: a Cluster pipeline refuses scripts.
            await asyncio.gather(*(self._renew(keys=[self.keys(key_id)[4]], args=[self.ttl_ms, *ids])
                                   for key_id, ids in leases.items()))
        except _ERRORS as exc:
            self._failed("renew", exc)

    # Usage and mirroring into SQLite.
    async def usage_rows(self, key_ids: Iterable[str]) -> list[UsageRow]:
        key_ids = list(key_ids)
        async with self.r.pipeline(transaction=False) as p:
            for kid in key_ids:
                p.hgetall(self.keys(kid)[8])
            hashes = await p.execute()
        rows: list[UsageRow] = []
        for kid, h in zip(key_ids, hashes, strict=True):
            acc: dict[tuple[int, str], list[int]] = {}
            for f, v in h.items():
                if f.startswith("_"):
                    continue
                day_s, rest = f.split("|", 1)
                model, kind = rest.rsplit("|", 1)
                slot = acc.setdefault((int(day_s), model), [0, 0, 0])
                slot["pcr".index(kind)] = int(v)
            rows += [(kid, m, d, p_, c, r) for (d, m), (p_, c, r) in acc.items()]
        return rows

    async def sync(self, full: bool = False) -> None:
        """Copy records (full) and usage of keys used since the last sync into SQLite."""
        try:
            if full:
                recs = await self.all_records()
                for rec in recs:
                    await asyncio.to_thread(self.store.upsert_key, rec)
                ids = [r.id for r in recs]
            else:
                ids = list(self._touched)
            self._touched.difference_update(ids)
            if ids:
                rows = await self.usage_rows(ids)
                await asyncio.to_thread(self.store.snapshot_usage, rows)
        except Unavailable:
            return
        except _ERRORS as exc:
            self._failed("sync", exc)

    async def _loop(self) -> None:
        last_full = 0.0
        while not self._closing:
            await asyncio.sleep(0.5 if self.pending else self.sync_interval_s)
            try:
                if self.pending:
                    await self.reconcile()
                if self.available():
                    full = time.monotonic() - last_full > 30
                    await self.sync(full=full)
                    if full:
                        last_full = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop quota bookkeeping
                log.exception("quota background sync failed")

    async def start(self) -> None:
        """Replay charges left by the last run, mirror once, then keep syncing in the background."""
        saved = await asyncio.to_thread(self.store.take_pending)
        for item in saved:
            if item.get("kind") == "charges":
                ch = item["charges"]
                ch["window"] = [tuple(w) for w in ch["window"]]
                self._frozen.append((item["key_id"], item["batch"], ch))
            else:
                self._pending_settles.append(item)
        if self.pending:
            await self.reconcile()
        if await self.ready():
            await self.check_memory_policy()
            await self.sync(full=True)
        self._task = asyncio.create_task(self._loop(), name="fmgate-quota-sync")

    async def check_memory_policy(self) -> str | None:
        """Warn when Redis can grow without bound or evict any key (a key record, a window): quota data
        wants `maxmemory` with `noeviction`, so a full Redis refuses writes and the fail mode applies.
        Returns the warning, or None (also when CONFIG is not allowed, as on many managed services)."""
        try:
            conf = await self.r.config_get("maxmemory*")
        except _ERRORS:
            return None
        if isinstance(conf, dict) and conf and not any(k == "maxmemory" for k in conf):
            conf = next(iter(conf.values()))  # a Cluster answers per node
        maxmemory = int(conf.get("maxmemory") or 0) if isinstance(conf, dict) else 0
        policy = conf.get("maxmemory-policy", "") if isinstance(conf, dict) else ""
        if maxmemory and policy == "noeviction":
            return None
        msg = (f"quota redis has maxmemory={maxmemory} maxmemory-policy={policy or '?'}: set maxmemory and "
               "maxmemory-policy noeviction, so a full Redis refuses writes (the fail mode applies) instead "
               "of growing without bound or evicting limit state")
        log.warning(msg)
        return msg

    async def close(self) -> None:
        self._closing = True
        for task in (self._task, self._probe):
            if task is not None:
                await stop_task(task)
        self._task = self._probe = None
        if self.pending:
            self._down_until = 0.0
            await self.reconcile()
        if self.available():
            await self.sync(full=True)
        if self.pending:
            # Redis is still away: keep the charges in SQLite for the next start.
            frozen = self._frozen + [(k, secrets.token_hex(8), ch) for k, ch in self._pending_charges.items()]
            items: list[dict] = list(self._pending_settles)
            items += [{"kind": "charges", "key_id": k, "batch": b, "charges": ch} for k, b, ch in frozen]
            await asyncio.to_thread(self.store.save_pending, items)
            log.warning("quota redis unreachable at shutdown: %d charges saved for the next start", len(items))
            self._pending_settles, self._pending_charges, self._frozen = [], {}, []
        await close_client(self.r)
