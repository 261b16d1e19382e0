"""Unit tests: key material, calendar arithmetic (Python and Lua agree), header formats, the memory limiter."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from gateway.quota import base
from gateway.quota.keys import (
    KeyLimits,
    KeyRecord,
    day_number,
    hash_secret,
    key_id_of,
    month_of_day,
    new_secret,
    next_month_start_day,
    parse_models,
)
from gateway.quota.memory import MemoryLimiter
from gateway.quota.store import Store


def test_secret_format_and_hashing():
    s = new_secret()
    assert re.fullmatch(r"fm-[A-Za-z0-9_-]{43}", s)
    assert new_secret() != s
    digest = hash_secret(s)
    assert re.fullmatch(r"[0-9a-f]{64}", digest) and key_id_of(digest) == digest[:12]
    assert s not in repr(KeyRecord(key_id_of(digest), "n", digest, 0.0).public())


def test_parse_models():
    assert parse_models(None) is None and parse_models(" , ") is None
    assert parse_models("a, b,a") == ("a", "b")


def test_limits_reject_negative():
    with pytest.raises(ValueError):
        KeyLimits(rpm=-1)


@pytest.mark.parametrize("date", ["1970-01-01", "2024-02-29", "2024-03-01", "2026-11-28", "2026-12-31",
                                  "2027-01-01", "2100-02-28", "2000-12-31"])
def test_calendar(date):
    d = dt.date.fromisoformat(date)
    day = (d - dt.date(1970, 1, 1)).days
    assert day_number(dt.datetime(d.year, d.month, d.day, 23, 59, 59, tzinfo=dt.UTC).timestamp()) == day
    assert month_of_day(day) == d.year * 100 + d.month
    nxt = dt.date(1970, 1, 1) + dt.timedelta(days=next_month_start_day(day))
    assert nxt.day == 1 and nxt > d and (nxt - dt.timedelta(days=1)).month == d.month


def test_lua_month_matches_python(redis_url):
    import redis

    from gateway.quota import scripts

    r = redis.Redis.from_url(redis_url)
    month_of = r.register_script(scripts.MONTH_OF)
    keys = [f"{{fmt-cal}}:{i}" for i in range(9)]
    for day in list(range(0, 40)) + list(range(19_700, 20_900, 7)) + [11_016, 11_017, 47_540, 47_541]:
        assert int(month_of(keys=keys, args=[day])) == month_of_day(day), day


@pytest.mark.parametrize("ms,text", [(0, "0s"), (20, "20ms"), (999, "999ms"), (1000, "1s"), (1500, "1.5s"),
                                     (59_999, "59.999s"), (60_000, "1m0s"), (360_000, "6m0s"),
                                     (3_723_000, "1h2m3s"), (-5, "0s")])
def test_openai_duration_format(ms, text):
    assert base.fmt_duration(ms) == text


class Clock:
    def __init__(self, t: int = 1_764_300_000_000):
        self.t = t

    def __call__(self) -> int:
        return self.t


def _rec(**limits) -> KeyRecord:
    return KeyRecord("k1", "n", "0" * 64, 0.0, KeyLimits(**limits))


@pytest.fixture
def lim(tmp_path):
    store = Store(tmp_path)
    clock = Clock()
    yield MemoryLimiter(store, window_s=60, lease_ttl_s=10, clock=clock), clock
    store.close()


def test_memory_rpm_sliding_window(lim):
    m, clock = lim
    rec = _rec(rpm=3)
    for i in range(3):
        assert m.admit_now(rec, f"l{i}", 0).ok
        clock.t += 10_000
    d = m.admit_now(rec, "l3", 0)
    assert d.status == base.RPM and d.retry_ms == 30_000  # the first admit leaves the window at 60 s
    clock.t += 29_999
    assert m.admit_now(rec, "l4", 0).status == base.RPM
    clock.t += 1
    d = m.admit_now(rec, "l5", 0)
    assert d.ok and d.remaining_requests == 0


def test_memory_tpm_reserve_and_refund(lim):
    m, clock = lim
    rec = _rec(tpm=1000)
    grants = [f"l{i}" for i in range(20) if m.admit_now(rec, f"l{i}", 100).ok]
    assert len(grants) == 10
    for lease in grants[:5]:
        import asyncio

        asyncio.run(m.settle("k1", lease, 100, 10, 20, "m", 0, 0))
    # 5 x 70 tokens came back: 3 more 100-token reservations fit, the 4th does not.
    assert sum(m.admit_now(rec, f"x{i}", 100).ok for i in range(4)) == 3


def test_memory_request_larger_than_tpm(lim):
    m, _ = lim
    assert m.admit_now(_rec(tpm=100), "l", 101).status == base.TOO_LARGE


def test_memory_concurrency_lease_expires(lim):
    m, clock = lim
    rec = _rec(max_concurrent=2)
    assert m.admit_now(rec, "a", 0).ok and m.admit_now(rec, "b", 0).ok
    assert m.admit_now(rec, "c", 0).status == base.CONCURRENCY
    clock.t += 10_001  # nobody renewed or released them: the leases lapse
    assert m.admit_now(rec, "d", 0).ok


def test_memory_day_budget_resets_at_utc_midnight(lim):
    m, clock = lim
    rec = _rec(tokens_per_day=100)
    day = day_number(clock.t / 1000)
    clock.t = (day + 1) * 86_400_000 - 1
    assert m.admit_now(rec, "a", 100).ok
    assert m.admit_now(rec, "b", 1).status == base.DAY
    clock.t += 1
    assert m.admit_now(rec, "c", 100).ok


def test_memory_admit_is_idempotent_per_lease(lim):
    m, _ = lim
    rec = _rec(rpm=5, tpm=100)
    a = m.admit_now(rec, "same", 10)
    b = m.admit_now(rec, "same", 10)
    assert a.ok and b.ok and b.remaining_requests == 4 and b.remaining_tokens == 90


def test_principal_carries_tenant_and_weight(tmp_path):
    import asyncio

    from gateway.quota import ANONYMOUS, KeyLimits
    from gateway.quota.gatekeeper import Gatekeeper
    from gateway.settings import Settings
    from tests.quota.conftest import bearer

    async def main():
        gk = await Gatekeeper.create(Settings(home=tmp_path, auth="on"))
        try:
            secret, rec = await gk.create_key("w", KeyLimits(weight=2.5))
            p = await gk.authenticate(bearer(secret))
            assert p.tenant == rec.id and p.weight == 2.5
            plain, _ = await gk.create_key("plain")
            assert (await gk.authenticate(bearer(plain))).weight == 1.0
        finally:
            await gk.close()

    asyncio.run(main())
    assert ANONYMOUS.tenant == "" and ANONYMOUS.weight == 1.0
    for bad in (0, -1, 1001, True):
        with pytest.raises(ValueError):
            KeyLimits(weight=bad)


def test_store_migrates_an_old_key_table(tmp_path):
    import sqlite3

    from gateway.quota.store import DB_NAME, Store

    db = sqlite3.connect(tmp_path / DB_NAME)
    db.executescript(
        "CREATE TABLE keys (id TEXT PRIMARY KEY, name TEXT NOT NULL, hash TEXT NOT NULL UNIQUE, "
        "created_at REAL NOT NULL, revoked_at REAL, rpm INTEGER NOT NULL DEFAULT 0, tpm INTEGER NOT NULL DEFAULT 0, "
        "tokens_per_day INTEGER NOT NULL DEFAULT 0, tokens_per_month INTEGER NOT NULL DEFAULT 0, "
        "max_concurrent INTEGER NOT NULL DEFAULT 0, models TEXT);"
        "INSERT INTO keys VALUES ('abc', 'old', 'h', 1.0, NULL, 5, 0, 0, 0, 0, '[\"m\"]');")
    db.commit()
    db.close()
    store = Store(tmp_path)
    rec = store.get_key("abc")
    assert rec.limits.rpm == 5 and rec.limits.weight == 1.0 and rec.models == ("m",)
    assert rec.tags == () and rec.model_limits == {} and rec.expires_at is None
    store.close()
    Store(tmp_path).close()  # a second open finds the columns there
