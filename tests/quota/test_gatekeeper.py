"""The Gatekeeper contract, on both backends (memory, and the real Redis with a private key prefix)."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.errors import APIError
from gateway.quota import ANONYMOUS
from gateway.quota.keys import day_number
from tests.quota.conftest import bearer, new_key

HEADERS = {"x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
           "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"}


async def refused(coro) -> APIError:
    with pytest.raises(APIError) as info:
        await coro
    return info.value


async def test_authenticate(qenv):
    gk = await qenv.gk()
    secret, rec = await new_key(gk)
    p = await gk.authenticate(bearer(secret))
    assert p.key_id == rec.id and not p.anonymous
    for bad in (None, "fm-wrong", secret + "x", secret[:-1]):
        e = await refused(gk.authenticate(bearer(bad)))
        assert (e.status, e.type, e.code) == (401, "authentication_error", "invalid_api_key")
        assert secret not in e.message and (bad is None or bad not in e.message)
    e = await refused(gk.authenticate(bearer(secret, header="x-api-key")))
    assert e.status == 401


@pytest.mark.parametrize("mode", ["auto", "on", "off"])
async def test_auth_modes(qenv, mode):
    gk = await qenv.gk(settings=qenv.settings(auth=mode))
    if mode == "on":
        assert (await refused(gk.authenticate(bearer(None)))).status == 401
    else:
        assert (await gk.authenticate(bearer(None))).anonymous  # auto with no key yet: open
    secret, _ = await new_key(gk)
    if mode == "off":
        assert (await gk.authenticate(bearer(None))).anonymous
        grant = await gk.admit(ANONYMOUS, "m", 10**9)
        assert grant.headers == {}
        await grant.settle(1, 1)
    else:
        assert (await refused(gk.authenticate(bearer(None)))).status == 401
        assert not (await gk.authenticate(bearer(secret))).anonymous


async def test_auto_turns_on_when_another_process_creates_a_key(qenv):
    gk = await qenv.gk(settings=qenv.settings(auth="auto"))
    assert (await gk.authenticate(bearer(None))).anonymous
    other = await qenv.gk(settings=qenv.settings(auth="auto"))  # the CLI or another replica, same store
    await new_key(other)
    await asyncio.sleep(1.05)
    assert (await refused(gk.authenticate(bearer(None)))).status == 401


async def test_auto_honours_a_new_key_at_once(qenv):
    """A key created elsewhere is enforced from its first request, not after the next auth check."""
    gk = await qenv.gk(settings=qenv.settings(auth="auto"))
    assert (await gk.authenticate(bearer("sk-anything"))).anonymous  # no keys: any token passes
    other = await qenv.gk(settings=qenv.settings(auth="auto"))
    secret, rec = await new_key(other, rpm=1)
    p = await gk.authenticate(bearer(secret))  # well within the second the "any keys?" answer is cached
    assert p.key_id == rec.id
    await gk.admit(p, "m", 1)
    assert (await refused(gk.admit(p, "m", 1))).status == 429
    assert (await refused(gk.authenticate(bearer(None)))).status == 401  # and auth is now on


async def test_model_allow_list(qenv):
    gk = await qenv.gk()
    secret, _ = await new_key(gk, models=["a", "b"])
    p = await gk.authenticate(bearer(secret))
    gk.check_model(p, "a")
    e = await refused(asyncio.to_thread(gk.check_model, p, "c"))
    assert (e.status, e.type) == (403, "permission_error")
    gk.check_model(ANONYMOUS, "c")


async def test_headers_and_429_shape(qenv):
    gk = await qenv.gk()
    secret, _ = await new_key(gk, rpm=2, tpm=1000)
    p = await gk.authenticate(bearer(secret))
    g = await gk.admit(p, "m", 100)
    assert set(g.headers) == HEADERS
    assert g.headers["x-ratelimit-limit-requests"] == "2" and g.headers["x-ratelimit-remaining-requests"] == "1"
    assert g.headers["x-ratelimit-limit-tokens"] == "1000" and g.headers["x-ratelimit-remaining-tokens"] == "900"
    assert g.headers["x-ratelimit-reset-requests"] in ("1m0s", "59.999s", "59.998s")
    await g.settle(10, 5)
    await (await gk.admit(p, "m", 10)).settle(1, 1)
    e = await refused(gk.admit(p, "m", 10))
    assert (e.status, e.type, e.code) == (429, "rate_limit_error", "rate_limit_exceeded")
    assert HEADERS <= set(e.headers) and 1 <= int(e.headers["retry-after"]) <= 60
    assert e.headers["x-ratelimit-remaining-requests"] == "0"
    assert e.body()["error"]["type"] == "rate_limit_error"


async def test_key_without_limits_has_no_rate_headers(qenv):
    gk = await qenv.gk()
    secret, _ = await new_key(gk)
    g = await gk.admit(await gk.authenticate(bearer(secret)), "m", 10**6)
    assert g.headers == {}
    await g.settle(3, 4)


async def test_rpm_exhaustion_does_not_charge_tokens(qenv):
    gk = await qenv.gk()
    secret, _ = await new_key(gk, rpm=3, tpm=1000)
    p = await gk.authenticate(bearer(secret))
    for _ in range(3):
        await gk.admit(p, "m", 10)
    for _ in range(5):
        e = await refused(gk.admit(p, "m", 10))
        assert "requests per minute" in e.message
        assert e.headers["x-ratelimit-remaining-tokens"] == "970"  # refusals consumed no tokens


async def test_tpm_exhaustion_does_not_charge_requests(qenv):
    gk = await qenv.gk()
    secret, _ = await new_key(gk, rpm=100, tpm=100)
    p = await gk.authenticate(bearer(secret))
    assert (await gk.admit(p, "m", 80)).headers["x-ratelimit-remaining-requests"] == "99"
    for _ in range(5):
        e = await refused(gk.admit(p, "m", 50))
        assert "tokens per minute" in e.message and e.type == "rate_limit_error"
        assert e.headers["x-ratelimit-remaining-requests"] == "99"  # refusals consumed no requests
    g = await gk.admit(p, "m", 20)  # a request that fits the tokens still goes through
    assert g.headers["x-ratelimit-remaining-requests"] == "98"
    assert g.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_windows_slide(qenv):
    gk = await qenv.gk(window_s=1.0)
    secret, _ = await new_key(gk, rpm=2, tpm=100)
    p = await gk.authenticate(bearer(secret))
    await gk.admit(p, "m", 60)
    await gk.admit(p, "m", 10)
    e = await refused(gk.admit(p, "m", 1))
    assert int(e.headers["retry-after-ms"]) <= 1000
    await asyncio.sleep(1.05)
    g = await gk.admit(p, "m", 100)
    assert g.headers["x-ratelimit-remaining-requests"] == "1"


async def test_reservation_never_overruns_a_budget_and_refunds(qenv):
    """20 parallel requests that could each use 100 tokens, against 1,000 tokens: at most 1,000 granted."""
    gk = await qenv.gk()
    secret, rec = await new_key(gk, tokens_per_day=1000, tpm=1000)
    p = await gk.authenticate(bearer(secret))

    async def one():
        try:
            return await gk.admit(p, "m", 100)
        except APIError as e:
            return e

    results = await asyncio.gather(*(one() for _ in range(20)))
    grants = [r for r in results if not isinstance(r, APIError)]
    errors = [r for r in results if isinstance(r, APIError)]
    assert sum(g.reserve for g in grants) == 1000 and len(grants) == 10
    assert {(e.status, e.type, e.code) for e in errors} == {(429, "insufficient_quota", "insufficient_quota")}
    assert all(int(e.headers["retry-after"]) >= 1 for e in errors)
    # Each used 30 of its 100: 700 come back, so exactly 7 more 100-token reservations fit.
    await asyncio.gather(*(g.settle(10, 20) for g in grants))
    more = await asyncio.gather(*(one() for _ in range(10)))
    assert sum(not isinstance(r, APIError) for r in more) == 7
    rows = await gk.usage(rec.id)
    assert [(r["prompt_tokens"], r["completion_tokens"], r["requests"]) for r in rows] == [(100, 200, 10)]


async def test_request_larger_than_tpm_is_refused_without_retry(qenv):
    gk = await qenv.gk()
    secret, _ = await new_key(gk, tpm=100)
    e = await refused(gk.admit(await gk.authenticate(bearer(secret)), "m", 101))
    assert e.status == 429 and "Request too large" in e.message and "retry-after" not in e.headers


async def test_month_budget(qenv):
    gk = await qenv.gk()
    secret, _ = await new_key(gk, tokens_per_month=50)
    p = await gk.authenticate(bearer(secret))
    g = await gk.admit(p, "m", 50)
    e = await refused(gk.admit(p, "m", 1))
    assert e.type == "insufficient_quota" and "monthly" in e.message
    await g.settle(5, 5)
    await gk.admit(p, "m", 40)


async def test_concurrency_slots_are_released_by_settle(qenv):
    gk = await qenv.gk()
    secret, _ = await new_key(gk, max_concurrent=2)
    p = await gk.authenticate(bearer(secret))
    a = await gk.admit(p, "m", 1)
    await gk.admit(p, "m", 1)
    e = await refused(gk.admit(p, "m", 1))
    assert e.type == "rate_limit_error" and "concurrent" in e.message
    await a.settle(1, 0)
    await a.settle(1, 0)  # idempotent: the slot is not released twice
    await gk.admit(p, "m", 1)
    assert (await refused(gk.admit(p, "m", 1))).status == 429


async def test_long_requests_keep_their_lease(qenv):
    gk = await qenv.gk(lease_ttl_s=3.0)  # renewed every 1 s: 2 s of slack for a busy box
    secret, _ = await new_key(gk, max_concurrent=1)
    p = await gk.authenticate(bearer(secret))
    g = await gk.admit(p, "m", 1)
    await asyncio.sleep(4.5)  # longer than the TTL: the background renewal keeps the slot
    assert (await refused(gk.admit(p, "m", 1))).status == 429
    await g.settle(1, 1)
    await gk.admit(p, "m", 1)


async def test_unsettled_grant_that_is_dropped_frees_its_slot(qenv):
    import gc

    gk = await qenv.gk(lease_ttl_s=0.5)
    secret, _ = await new_key(gk, max_concurrent=1)
    p = await gk.authenticate(bearer(secret))
    await gk.admit(p, "m", 1)  # a bug upstream forgot to settle; nothing holds the grant
    gc.collect()
    await asyncio.sleep(0.8)
    await gk.admit(p, "m", 1)


async def test_revocation_takes_effect_within_a_second(qenv):
    gk = await qenv.gk()
    secret, rec = await new_key(gk, rpm=1000)
    p = await gk.authenticate(bearer(secret))
    await (await gk.admit(p, "m", 1)).settle(1, 0)
    # Revoke from a second gatekeeper with its own handle on the store (the CLI, or another replica).
    admin = await qenv.gk()
    assert (await admin.revoke_key(rec.id)).revoked
    if qenv.backend == "redis":
        # The admission script reads the revoked flag: the very next admission is refused.
        assert (await refused(gk.admit(p, "m", 1))).status == 401
    # Memory mode: the other process's record cache is 0.5 s; poll with a generous deadline.
    deadline = time.monotonic() + 5
    while True:
        try:
            await gk.admit(p, "m", 1)
        except APIError as e:
            assert e.status == 401
            break
        assert time.monotonic() < deadline, "revocation never seen"
        await asyncio.sleep(0.02)
    assert (await refused(gk.authenticate(bearer(secret)))).status == 401


async def test_usage_per_key_model_day(qenv):
    gk = await qenv.gk()
    s1, r1 = await new_key(gk, name="one")
    s2, r2 = await new_key(gk, name="two")
    p1, p2 = await gk.authenticate(bearer(s1)), await gk.authenticate(bearer(s2))
    for p, model, n in ((p1, "a", 3), (p1, "b", 1), (p2, "a", 2)):
        for _ in range(n):
            await (await gk.admit(p, model, 50)).settle(7, 3)
    rows = {(r["key_id"], r["model"]): r for r in await gk.usage()}
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert rows[(r1.id, "a")]["requests"] == 3 and rows[(r1.id, "a")]["total_tokens"] == 30
    assert rows[(r1.id, "b")]["requests"] == 1 and rows[(r2.id, "a")]["prompt_tokens"] == 14
    assert rows[(r2.id, "a")]["key_name"] == "two" and rows[(r2.id, "a")]["date"] == today
    assert [r["key_id"] for r in await gk.usage(r2.id)] == [r2.id]
    assert await gk.usage(r1.id, since_day=day_number(time.time()) + 1) == []


async def test_usage_and_budgets_survive_a_restart(qenv):
    gk = await qenv.gk()
    secret, rec = await new_key(gk, tokens_per_day=100)
    p = await gk.authenticate(bearer(secret))
    for _ in range(3):
        await (await gk.admit(p, "m", 40)).settle(20, 10)
    await gk.close()
    gk2 = await qenv.gk()
    rows = await gk2.usage(rec.id)
    assert [(r["requests"], r["total_tokens"]) for r in rows] == [(3, 90)]
    p = await gk2.authenticate(bearer(secret))
    e = await refused(gk2.admit(p, "m", 11))  # 90 used today: 11 more does not fit
    assert e.type == "insufficient_quota"
    await (await gk2.admit(p, "m", 10)).settle(5, 5)


async def test_workers_need_redis(menv):
    from gateway.quota import check_settings

    with pytest.raises(ValueError, match="REDIS_URL"):
        check_settings(menv.settings(workers=2))
    check_settings(menv.settings(workers=2, auth="off"))
    check_settings(menv.settings(workers=2, redis_url="redis://127.0.0.1:6379/0"))


async def test_ready(qenv):
    gk = await qenv.gk()
    assert await gk.ready()
