"""Key material never appears in logs, metrics, errors or the database: capture everything and grep."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import generate_latest

from gateway.errors import APIError
from gateway.quota.keys import hash_secret
from tests.quota.conftest import QuotaEnv, bearer, new_key


def _assert_absent(secret: str, *texts: str) -> None:
    body = secret.removeprefix("fm-")
    for text in texts:
        assert secret not in text and body not in text and body[:16] not in text


async def test_secrets_never_logged(tmp_path, prefix, redis_proc, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, every level, including redis-py's
    env = QuotaEnv(tmp_path, "redis", redis_proc.url, prefix)
    seen: list[str] = []
    try:
        gk = await env.gk(settings=env.settings(quota_on_redis_error="open"))
        secret, rec = await new_key(gk, rpm=2, tokens_per_day=100, models=["m"])
        near_miss = secret[:-2] + "zz"
        p = await gk.authenticate(bearer(secret))
        for attempt in (near_miss, "fm-" + "a" * 43, secret + " extra"):
            try:
                await gk.authenticate(bearer(attempt))
            except APIError as e:
                seen += [e.message, str(e.body()), str(e.headers)]
                _assert_absent(near_miss, e.message)
        try:
            gk.check_model(p, "other")
        except APIError as e:
            seen.append(e.message)
        for reserve in (10, 10, 10, 1000):
            try:
                await (await gk.admit(p, "m", reserve)).settle(1, 1)
            except APIError as e:
                seen += [e.message, str(e.headers)]
        redis_proc.kill()  # errors while Redis is away get logged too
        for _ in range(3):  # the per-replica limiter of open mode admits 2 (rpm 2) and refuses one
            try:
                await (await gk.admit(p, "m", 1)).settle(1, 1)
            except APIError as e:
                seen += [e.message, str(e.headers)]
        redis_proc.start()
        await gk.redis.reconcile()
        await gk.revoke_key(rec.id)
        with pytest.raises(APIError) as info:
            await gk.authenticate(bearer(secret))
        seen.append(info.value.message)
        await gk.close()
    finally:
        await env.aclose()
    db = "".join(f.read_bytes().decode("latin-1") for f in (tmp_path / "home").glob("quota.sqlite3*"))
    assert hash_secret(secret) in db  # stored hashed ...
    assert len(caplog.records) > 0
    _assert_absent(secret, caplog.text, "\n".join(seen), generate_latest().decode(), db)  # ... and only hashed
