"""Several gateway processes sharing one Redis: the limits hold across them, exactly.

Each worker (tests/quota/_worker.py) is its own OS process with its own data dir, like a replica on
another box; they share only Redis.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from gateway.errors import APIError
from gateway.metrics import REDIS_ERRORS
from gateway.quota import Principal
from tests.quota.conftest import bearer, new_key

pytestmark = pytest.mark.timeout(180)


def _start(workers, renv, key_id: str, procs: int, scenario: str = "burst", **cfg):
    ws = [workers({"home": str(renv.tmp / f"replica{i}"), "redis_url": renv.redis_url, "prefix": renv.prefix,
                   "key_id": key_id, "scenario": scenario, **cfg}) for i in range(procs)]
    for w in ws:
        w.wait_ready()
    return ws


async def test_exactness_500_requests_two_processes_limit_100(renv, workers):
    gk = await renv.gk()
    _, rec = await new_key(gk, rpm=100)
    ws = _start(workers, renv, rec.id, 2, n=250, reserve=1)
    for w in ws:
        w.go()
    results = [w.result() for w in ws]
    assert sum(r["admitted"] for r in results) == 100, results
    assert sum(sum(r["refused"].values()) for r in results) == 400
    assert all(set(r["refused"]) <= {"429:rate_limit_exceeded"} for r in results)


@pytest.mark.parametrize("limit", ["tokens_per_day", "tpm"])
async def test_reservation_across_processes_never_overruns(renv, workers, limit):
    """Neither a budget nor TPM is per process: reserved up front in Redis, 1,000 means 1,000 in all."""
    gk = await renv.gk()
    _, rec = await new_key(gk, **{limit: 1000})
    # 20 parallel requests (10 per process) that could each use 100 tokens; each then uses 30.
    ws = _start(workers, renv, rec.id, 2, n=10, reserve=100, use=[10, 20])
    for w in ws:
        w.go()
    results = [w.result() for w in ws]  # all grants still held: every reservation outstanding
    assert sum(r["reserved"] for r in results) == 1000, results
    assert sum(r["admitted"] for r in results) == 10
    for w in ws:
        w.go()  # now settle
    assert sum(w.result()["settled"] for w in ws) == 10
    # The refunds are visible to everyone: 300 used, so 7 of 10 new 100-token reservations fit.
    p = Principal(rec.id, "t")
    ok = 0
    for _ in range(10):
        try:
            await gk.admit(p, "m", 100)
            ok += 1
        except APIError as e:
            assert e.type == ("insufficient_quota" if limit == "tokens_per_day" else "rate_limit_error")
    assert ok == 7


async def test_lease_of_a_killed_process_expires(renv, workers):
    gk = await renv.gk()
    _, rec = await new_key(gk, max_concurrent=2)
    (w,) = _start(workers, renv, rec.id, 1, n=2, reserve=1, hold_s=600, lease_ttl_s=1.0)
    w.go()
    assert w.result()["admitted"] == 2
    p = Principal(rec.id, "t")
    time.sleep(1.5)  # the live worker renews its leases: still full
    with pytest.raises(APIError) as info:
        await gk.admit(p, "m", 1)
    assert info.value.status == 429
    w.proc.send_signal(signal.SIGKILL)
    w.proc.wait(5)
    deadline = time.monotonic() + 5
    while True:
        try:
            await gk.admit(p, "m", 1)
            break
        except APIError:
            assert time.monotonic() < deadline, "leases of the killed worker never expired"
            await asyncio.sleep(0.1)


async def test_revocation_propagates_across_processes(renv, workers):
    gk = await renv.gk()
    _, rec = await new_key(gk)
    (w,) = _start(workers, renv, rec.id, 1, scenario="poll", every_s=0.02, for_s=20)
    w.go()
    time.sleep(1.0)
    assert (await gk.revoke_key(rec.id)).revoked
    revoked = time.time()
    out = w.result()
    assert out["status"] == 401 and out["ok"] > 5
    # Redis holds the revoked flag and the admit script reads it: no request that started after the
    # revoke returned was admitted, in the other process either.
    assert out["last_ok_started"] < revoked, out
    assert out["refused_started"] >= out["last_ok_started"], out


async def test_usage_survives_gateway_and_redis_restarts(tmp_path, prefix, redis_proc):
    from tests.quota.conftest import QuotaEnv

    env = QuotaEnv(tmp_path, "redis", redis_proc.url, prefix)
    try:
        gk = await env.gk()
        secret, rec = await new_key(gk, tokens_per_day=100)
        p = await gk.authenticate(bearer(secret))
        for _ in range(3):
            await (await gk.admit(p, "m", 30)).settle(20, 10)
        await gk.close()  # flushes Redis usage into SQLite
        gk = await env.gk()  # a gateway restart: Redis still has everything
        assert [(r["requests"], r["total_tokens"]) for r in await gk.usage(rec.id)] == [(3, 90)]
        await gk.close()
        redis_proc.kill()  # Redis keeps nothing on disk: a restart loses everything
        redis_proc.start()
        gk = await env.gk()
        assert [(r["requests"], r["total_tokens"]) for r in await gk.usage(rec.id)] == [(3, 90)]
        p = await gk.authenticate(bearer(secret))  # the record comes back from SQLite
        with pytest.raises(APIError) as info:
            await gk.admit(p, "m", 11)  # and the day's budget with it
        assert info.value.type == "insufficient_quota"
        await (await gk.admit(p, "m", 10)).settle(5, 5)
        assert [(r["requests"], r["total_tokens"]) for r in await gk.usage(rec.id)] == [(4, 100)]
    finally:
        await env.aclose()


@pytest.mark.parametrize("fail", ["closed", "open"])
async def test_redis_killed_mid_run(tmp_path, prefix, redis_proc, fail):
    from tests.quota.conftest import QuotaEnv

    env = QuotaEnv(tmp_path, "redis", redis_proc.url, prefix)
    try:
        gk = await env.gk(settings=env.settings(quota_on_redis_error=fail))
        secret, rec = await new_key(gk, rpm=1000, tokens_per_day=100_000)
        p = await gk.authenticate(bearer(secret))
        served = 0
        for _ in range(5):
            await (await gk.admit(p, "m", 100)).settle(10, 5)
            served += 1
        inflight = await gk.admit(p, "m", 100)  # admitted before the crash, settled during the outage
        await gk.flush_usage()
        errors_before = sum(REDIS_ERRORS.labels(op)._value.get() for op in ("admit", "lookup", "settle", "ping"))

        redis_proc.kill()
        await inflight.settle(10, 5)
        served += 1
        outcomes = []
        for _ in range(10):
            try:
                g = await gk.admit(p, "m", 100)
            except APIError as e:
                outcomes.append(e.status)
                assert e.status == 503 and e.headers.get("retry-after") == "1"
                continue
            outcomes.append(200)
            await g.settle(10, 5)
            served += 1
            await asyncio.sleep(0.01)
        assert outcomes == ([503] * 10 if fail == "closed" else [200] * 10)
        assert await gk.ready() is (fail == "open")
        assert sum(REDIS_ERRORS.labels(op)._value.get() for op in ("admit", "lookup", "settle", "ping")) > errors_before

        redis_proc.start()  # back, and empty
        deadline = time.monotonic() + 5
        while True:
            try:
                await (await gk.admit(p, "m", 100)).settle(10, 5)
                served += 1
                break
            except APIError:
                assert time.monotonic() < deadline, "never recovered after Redis came back"
                await asyncio.sleep(0.1)
        while gk.redis.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert gk.redis.pending == 0
        assert await gk.ready()
        # Everything served is accounted once: before the crash, during it (buffered), after it.
        rows = await gk.usage(rec.id)
        assert [(r["requests"], r["prompt_tokens"], r["completion_tokens"]) for r in rows] == \
            [(served, 10 * served, 5 * served)]
        # And the budget counter Redis enforces agrees with that use (15 tokens per request).
        import redis as sync_redis

        r = sync_redis.Redis.from_url(redis_proc.url, decode_responses=True)
        bud = r.hgetall(gk.redis.keys(rec.id)[7])
        day = rows[0]["date"]
        from gateway.quota.keys import day_from_str

        assert int(bud[f"d{day_from_str(day)}"]) == 15 * served
    finally:
        await env.aclose()


async def test_open_mode_charges_survive_shutdown_while_redis_is_down(tmp_path, prefix, redis_proc):
    from tests.quota.conftest import QuotaEnv

    env = QuotaEnv(tmp_path, "redis", redis_proc.url, prefix)
    try:
        gk = await env.gk(settings=env.settings(quota_on_redis_error="open"))
        secret, rec = await new_key(gk)
        p = await gk.authenticate(bearer(secret))
        await (await gk.admit(p, "m", 10)).settle(1, 1)
        await gk.flush_usage()
        redis_proc.kill()
        for _ in range(3):
            await (await gk.admit(p, "m", 10)).settle(2, 3)
        await gk.close()  # Redis still down: the charges go to SQLite
        redis_proc.start()
        gk = await env.gk(settings=env.settings(quota_on_redis_error="open"))  # replays them at start
        rows = await gk.usage(rec.id)
        assert [(r["requests"], r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [(4, 7, 10)]
    finally:
        await env.aclose()
