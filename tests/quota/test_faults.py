"""Quotas under faults (#11): a lost admission answer is settled once, open mode keeps a per-replica
limit, Redis state is bounded, and a tokens-per-minute refusal does not walk the window."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis as sync_redis

import gateway.quota.redis as qredis
from gateway.errors import APIError
from gateway.quota.gatekeeper import degraded_record
from gateway.quota.keys import KeyLimits, ModelLimits, day_number
from tests.quota.conftest import QuotaEnv, bearer, new_key


async def settled(limiter, timeout: float = 30.0) -> None:
    """Wait until the background loop has written everything it queued."""
    deadline = time.monotonic() + timeout
    while limiter.pending:
        assert time.monotonic() < deadline, f"{limiter.pending} charges still pending"
        await asyncio.sleep(0.1)


BUSY = """
local t0 = redis.call('TIME')
local start = tonumber(t0[1]) * 1000000 + tonumber(t0[2])
while true do
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000000 + tonumber(t[2]) - start > tonumber(ARGV[1]) * 1000 then break end
end
return 1
"""


def busy(port: int, ms: int) -> None:
    """Keep Redis busy for `ms` with a script on another connection; returns once it is busy."""
    r = sync_redis.Redis(port=port, socket_timeout=30)
    threading.Thread(target=lambda: r.eval(BUSY, 0, ms), daemon=True).start()
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    probe = sync_redis.Redis(port=port, socket_timeout=0.1, retry=Retry(NoBackoff(), 0))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            probe.ping()
        except sync_redis.exceptions.TimeoutError:
            return
        time.sleep(0.005)
    raise AssertionError("redis never got busy")


@pytest.mark.parametrize("fail", ["closed", "open"])
async def test_admission_whose_answer_is_lost_is_settled_once(tmp_path, prefix, redis_proc, monkeypatch, fail):
    # A short socket timeout and a Redis kept busy by a slow script on another connection: our admission
    # waits in Redis's input, our call times out, and the admission script runs afterwards, when nobody
    # is listening for its answer.
    monkeypatch.setattr(qredis, "SOCKET_TIMEOUT_S", 0.3)
    env = QuotaEnv(tmp_path, "redis", redis_proc.url, prefix)
    admin = sync_redis.Redis(port=redis_proc.port, decode_responses=True)
    try:
        gk = await env.gk(settings=env.settings(quota_on_redis_error=fail))
        secret, rec = await new_key(gk, rpm=100, tokens_per_day=1000)
        p = await gk.authenticate(bearer(secret))
        keys = gk.redis.keys(rec.id)
        await (await gk.admit(p, "m", 1)).settle(0, 0)  # loads the scripts: a NOSCRIPT answer would be lost too
        busy(redis_proc.port, 3000)  # long enough that our call surely starts while Redis is busy
        if fail == "closed":
            with pytest.raises(APIError) as info:
                await gk.admit(p, "m", 100)
            assert info.value.status == 503
        else:
            grant = await gk.admit(p, "m", 100)  # admitted by this replica's share of the limits
            assert grant.mode == "unsure"
            await grant.settle(30, 20)  # may time out too (still paused): then replayed, once
        await settled(gk.redis)
        day = f"d{day_number(time.time())}"
        if fail == "closed":
            # The script did run (the budget field exists) and its reservation was undone entirely.
            assert admin.hget(keys[7], day) == "0"
            assert admin.zcard(keys[1]) == 1 and admin.zcard(keys[5]) == 0 and admin.zcard(keys[4]) == 0
            assert [v for f, v in admin.hgetall(keys[8]).items() if f.endswith("|r")] == ["1"]  # the warm-up
        else:
            assert admin.hget(keys[7], day) == "50"  # the real use, once: not 100 + 50, not 50 + 50
            use = admin.hgetall(keys[8])
            assert {f.rsplit("|", 1)[1]: v for f, v in use.items() if "|" in f} == {"p": "30", "c": "20", "r": "2"}
        # The whole day budget is there for the next request (closed) or less the 50 used (open).
        await (await gk.admit(p, "m", 1000 if fail == "closed" else 950)).settle(0, 0)
    finally:
        await env.aclose()


async def test_open_mode_keeps_a_per_replica_limit_while_redis_is_down(tmp_path, prefix, redis_proc, monkeypatch):
    monkeypatch.setenv("FMGATE_QUOTA_REPLICAS", "2")
    env = QuotaEnv(tmp_path, "redis", redis_proc.url, prefix)
    try:
        gk = await env.gk(settings=env.settings(quota_on_redis_error="open"))
        assert gk.replicas == 2
        secret, rec = await new_key(gk, rpm=10, max_concurrent=10, model_limits={"big": ModelLimits(rpm=4)})
        p = await gk.authenticate(bearer(secret))
        await (await gk.admit(p, "m", 1)).settle(1, 1)
        await gk.redis.sync(full=True)  # into SQLite: this diskless Redis is about to lose everything
        redis_proc.kill()
        # Per-model limits are shared out too: 4 / 2 replicas = 2 here.
        big = [await gk.admit(p, "big", 1) for _ in range(2)]
        with pytest.raises(APIError) as info:
            await gk.admit(p, "big", 1)
        assert info.value.status == 429 and "model 'big'" in info.value.message
        for g in big:
            await g.settle(1, 1)
        codes = []
        for _ in range(5):  # rpm 10 over 2 replicas: 5 here, 2 of them spent on "big"
            try:
                await (await gk.admit(p, "m", 1)).settle(1, 1)
                codes.append(200)
            except APIError as e:
                codes.append(e.status)
                assert e.type == "rate_limit_error" and "requests per minute (limit 5)" in e.message
        assert codes == [200] * 3 + [429] * 2
        redis_proc.start()
        await gk.redis.reconcile()
        rows = await gk.usage(rec.id)
        assert sum(r["requests"] for r in rows) == 1 + 2 + 3  # what was served while Redis was away is kept
    finally:
        await env.aclose()


def test_degraded_record_divides_rate_limits_not_below_one():
    from gateway.quota.keys import KeyRecord

    rec = KeyRecord("k", "n", "h", 0.0, KeyLimits(rpm=10, tpm=1, max_concurrent=3, tokens_per_day=100),
                    model_limits={"m": ModelLimits(rpm=7)})
    d = degraded_record(rec, 3)
    assert (d.limits.rpm, d.limits.tpm, d.limits.max_concurrent, d.limits.tokens_per_day) == (3, 1, 1, 100)
    assert d.model_limits["m"].rpm == 2
    assert degraded_record(rec, 1).limits == rec.limits


async def test_redis_state_is_bounded(renv):
    gk = await renv.gk()
    secret, rec = await new_key(gk, rpm=10, tpm=1000, tokens_per_day=10_000, model_limits={"m": ModelLimits(tpm=500)})
    p = await gk.authenticate(bearer(secret))
    await (await gk.admit(p, "m", 10)).settle(3, 4)
    r = gk.redis.r
    day_ms = 86_400_000
    for key in gk.redis.keys(rec.id, "m"):
        if not await r.exists(key):
            continue
        ttl = await r.pttl(key)
        if key.endswith(":meta"):
            assert ttl == -1  # the record itself stays
        else:
            assert 0 < ttl <= 63 * day_ms, key  # usage: 63 days idle; budgets 40; windows a minute
    assert 0 < await r.pttl(gk.redis.keys(rec.id)[8]) and await r.hget(gk.redis.keys(rec.id)[8], "_day")
    # Usage rows older than 62 days are pruned from Redis (SQLite keeps the history).
    use = gk.redis.keys(rec.id)[8]
    old = day_number(time.time()) - 70
    await r.hset(use, mapping={f"{old}|m|p": 5, "_day": old})
    await (await gk.admit(p, "m", 10)).settle(1, 1)
    assert not await r.hexists(use, f"{old}|m|p")


async def test_tpm_refusal_retry_matches_the_window_exactly_up_to_one_bucket(renv):
    """The bucketed Retry-After against the exact answer computed from the window's entries."""
    gk = await renv.gk(window_s=60.0)
    secret, rec = await new_key(gk, tpm=100_000)
    lim = gk.redis
    leases = []
    for i in range(300):
        lease = f"l{i}"
        d = await lim.admit(rec, lease, 200 + (i % 7) * 13, "m")
        assert d.ok
        leases.append((lease, 200 + (i % 7) * 13))
        if i % 50 == 0:
            await asyncio.sleep(0.05)  # spread entries over several buckets
    for lease, reserve in leases[::3]:  # settled below the reservation: amounts and buckets change
        await lim.settle(rec.id, lease, reserve, 10, 5, "m", d.day, d.month)
    tk, tka = lim.keys(rec.id)[2], lim.keys(rec.id)[3]
    for want in (1, 5_000, 20_000, 40_000):
        total = int(await lim.r.hget(tka, "_sum"))
        reserve = 100_000 - total + want
        d = await lim.admit(rec, f"x{want}", reserve, "m")
        assert d.status == "tpm"
        entries = await lim.r.zrange(tk, 0, -1, withscores=True)
        amounts = await lim.r.hgetall(tka)
        assert total == sum(int(amounts[e]) for e, _ in entries)
        buckets = {k: int(v) for k, v in amounts.items() if k.startswith("b")}
        assert sum(buckets.values()) == total
        freed, exact = 0, None
        for e, ts in entries:
            freed += int(amounts[e])
            if freed >= want:
                exact = int(ts) + lim.window_ms - d.now_ms
                break
        bucket = lim.window_ms // 64
        assert exact is not None and exact <= d.retry_ms <= exact + bucket + 1, (exact, d.retry_ms)


async def test_tpm_window_purge_keeps_sums_exact(renv):
    gk = await renv.gk(window_s=0.5)
    secret, rec = await new_key(gk, tpm=10_000)
    lim = gk.redis
    for i in range(40):
        d = await lim.admit(rec, f"a{i}", 50, "m")
        await lim.settle(rec.id, f"a{i}", 50, i % 3, 1, "m", d.day, d.month)
        await asyncio.sleep(0.02)
    tka = lim.keys(rec.id)[3]
    deadline = time.monotonic() + 30
    while await lim.r.exists(tka):  # entries leave the window a few at a time; then the hash goes
        d = await lim.admit(rec, "too-big", 20_000, "m")  # refused, but purges first
        assert d.status == "tpm_request_too_large"
        amounts = {k: int(v) for k, v in (await lim.r.hgetall(tka)).items()}
        if amounts:
            entries = [v for k, v in amounts.items() if k.startswith("a")]
            assert amounts["_sum"] == sum(entries) == sum(v for k, v in amounts.items() if k.startswith("b"))
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_memory_policy_is_checked_at_start(renv, redis_proc):
    gk = await renv.gk()
    lim = gk.redis
    # The private test Redis starts without maxmemory: a warning says what to set.
    other = type(lim)(redis_proc.url, lim.store, prefix=renv.prefix)
    try:
        warning = await other.check_memory_policy()
        assert warning and "noeviction" in warning
        await other.r.config_set("maxmemory", "64mb")
        await other.r.config_set("maxmemory-policy", "noeviction")
        assert await other.check_memory_policy() is None
    finally:
        await qredis.close_client(other.r)
