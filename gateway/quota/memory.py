"""In-process limiter for one gateway process: the same algorithms as the Lua scripts (see base.py).

Exact within one process because the event loop runs each admit to completion without awaiting.
Budget counters are seeded from SQLite usage the first time a key is seen, so a restart keeps them.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.quota import base
from gateway.quota.keys import KeyRecord, day_number, month_of_day
from gateway.quota.store import Store


def wall_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class _State:
    requests: deque = field(default_factory=deque)            # admit times, oldest first
    tokens: deque = field(default_factory=deque)              # (time, lease), oldest first
    token_amount: dict[str, int] = field(default_factory=dict)  # lease -> tokens counted in the window
    token_sum: int = 0
    leases: dict[str, int] = field(default_factory=dict)     # lease -> expiry
    reserved: dict[str, int] = field(default_factory=dict)   # lease -> admit time, until settle (in order)
    budget: dict[str, int] = field(default_factory=dict)     # "d<day>" / "m<yyyymm>" -> tokens
    seeded_day: int | None = None


class MemoryLimiter:
    def __init__(self, store: Store, window_s: float = 60.0, lease_ttl_s: float = 30.0,
                 clock: Callable[[], int] = wall_ms):
        self.store = store
        self.window_ms = int(window_s * 1000)
        self.ttl_ms = int(lease_ttl_s * 1000)
        self.keep_ms = 86_400_000
        self.clock = clock
        self._states: dict[str, _State] = {}

    def _state(self, key_id: str, now: int, model: str | None = None) -> _State:
        sid = key_id if model is None else f"{key_id}\x00{model}"
        st = self._states.get(sid)
        if st is None:
            st = self._states[sid] = _State()
        day = day_number(now / 1000)
        if st.seeded_day is None:
            # Seed budgets from recorded usage: this day, and every day of this month.
            totals = self.store.token_totals(key_id, day - 31, model)
            month = month_of_day(day)
            st.budget[f"d{day}"] = st.budget.get(f"d{day}", 0) + totals.get(day, 0)
            st.budget[f"m{month}"] = st.budget.get(f"m{month}", 0) + sum(
                t for d, t in totals.items() if month_of_day(d) == month
            )
            st.seeded_day = day
        return st

    def _purge(self, st: _State, now: int) -> None:
        cutoff = now - self.window_ms
        while st.requests and st.requests[0] <= cutoff:
            st.requests.popleft()
        while st.tokens and st.tokens[0][0] <= cutoff:
            _, lease = st.tokens.popleft()
            st.token_sum -= st.token_amount.pop(lease, 0)
        for lease in [k for k, exp in st.leases.items() if exp <= now]:
            del st.leases[lease]
        old = now - self.keep_ms
        while st.reserved:
            lease, t = next(iter(st.reserved.items()))
            if t > old:
                break
            del st.reserved[lease]
        if len(st.budget) > 6:
            day = day_number(now / 1000)
            min_month = month_of_day(day - 40)
            for k in list(st.budget):
                if (k[0] == "d" and int(k[1:]) < day - 2) or (k[0] == "m" and int(k[1:]) < min_month):
                    del st.budget[k]

    def _decision(self, st: _State, lim, status: str, now: int, day: int, month: int,
                  retry: int = 0) -> base.Decision:
        reset_r = st.requests[-1] + self.window_ms - now if (lim.rpm and st.requests) else 0
        reset_t = st.tokens[-1][0] + self.window_ms - now if (lim.tpm and st.tokens) else 0
        return base.Decision(
            status, now, day, month,
            limit_requests=lim.rpm, remaining_requests=lim.rpm - len(st.requests), reset_requests_ms=reset_r,
            limit_tokens=lim.tpm, remaining_tokens=lim.tpm - st.token_sum, reset_tokens_ms=reset_t,
            retry_ms=retry,
        )

    async def admit(self, rec: KeyRecord, lease: str, reserve: int, model: str = "") -> base.Decision:
        return self.admit_now(rec, lease, reserve, model)

    def _check(self, st: _State, lim, reserve: int, now: int, day: int, month: int) -> tuple[str, int]:
        status, retry = base.OK, 0
        maxc = getattr(lim, "max_concurrent", 0)
        if lim.tokens_per_day and st.budget.get(f"d{day}", 0) + reserve > lim.tokens_per_day:
            status = base.DAY
        elif lim.tokens_per_month and st.budget.get(f"m{month}", 0) + reserve > lim.tokens_per_month:
            status = base.MONTH
        elif lim.tpm and reserve > lim.tpm:
            status = base.TOO_LARGE
        elif maxc and len(st.leases) >= maxc:
            status, retry = base.CONCURRENCY, 1000
        elif lim.rpm and len(st.requests) >= lim.rpm:
            status = base.RPM
            retry = st.requests[len(st.requests) - lim.rpm] + self.window_ms - now
        elif lim.tpm and st.token_sum + reserve > lim.tpm:
            status = base.TPM
            need, freed = st.token_sum + reserve - lim.tpm, 0
            for t, ls in st.tokens:
                freed += st.token_amount.get(ls, 0)
                if freed >= need:
                    retry = t + self.window_ms - now
                    break
        return status, retry

    def _charge(self, st: _State, lim, lease: str, reserve: int, now: int, day: int, month: int) -> None:
        if lim.rpm:
            st.requests.append(now)
        if lim.tpm:
            st.tokens.append((now, lease))
            st.token_amount[lease] = reserve
            st.token_sum += reserve
        st.reserved[lease] = now
        st.budget[f"d{day}"] = st.budget.get(f"d{day}", 0) + reserve
        st.budget[f"m{month}"] = st.budget.get(f"m{month}", 0) + reserve

    def admit_now(self, rec: KeyRecord, lease: str, reserve: int, model: str = "") -> base.Decision:
        now = self.clock()
        day = day_number(now / 1000)
        month = month_of_day(day)
        st = self._state(rec.id, now)
        self._purge(st, now)
        if rec.revoked:
            return base.Decision(base.REVOKED, now, day, month)
        if rec.expired(now / 1000):
            return base.Decision(base.EXPIRED, now, day, month)
        if not rec.allows(model):
            return base.Decision(base.MODEL_NOT_ALLOWED, now, day, month)
        if lease in st.leases:
            return self._decision(st, rec.limits, base.OK, now, day, month)
        lim = rec.limits
        status, retry = self._check(st, lim, reserve, now, day, month)
        if status != base.OK:
            return self._decision(st, lim, status, now, day, month, retry)
        mlim = rec.model_limits.get(model)
        if mlim is not None:
            mst = self._state(rec.id, now, model)
            self._purge(mst, now)
            status, retry = self._check(mst, mlim, reserve, now, day, month)
            if status != base.OK:
                return self._decision(mst, mlim, "model_" + status, now, day, month, retry)
            self._charge(mst, mlim, lease, reserve, now, day, month)
        self._charge(st, lim, lease, reserve, now, day, month)
        st.leases[lease] = now + self.ttl_ms
        return self._decision(st, lim, base.OK, now, day, month)

    async def settle(self, key_id: str, lease: str, reserve: int, prompt: int, completion: int,
                     model: str, day: int, month: int, cancel: bool = False) -> None:
        """Grant makes settle happen once; in one process there are no retries to deduplicate."""
        now = self.clock()
        st = self._state(key_id, now)
        st.leases.pop(lease, None)
        used = 0 if cancel else prompt + completion
        states = [st]
        mst = self._states.get(f"{key_id}\x00{model}")
        if mst is not None:
            states.append(mst)
        for s in states:
            dkey, mkey = f"d{day}", f"m{month}"
            if s.reserved.pop(lease, None) is not None:
                refund = reserve - used
                if dkey in s.budget:
                    s.budget[dkey] -= refund
                if mkey in s.budget:
                    s.budget[mkey] -= refund
                if lease in s.token_amount:
                    s.token_sum += used - s.token_amount[lease]
                    s.token_amount[lease] = used
            elif s is st:
                s.budget[dkey] = s.budget.get(dkey, 0) + used
                s.budget[mkey] = s.budget.get(mkey, 0) + used

    async def renew(self, leases: dict[str, list[str]]) -> None:
        now = self.clock()
        for key_id, ids in leases.items():
            st = self._states.get(key_id)
            if st is None:
                continue
            for lease in ids:
                if lease in st.leases:
                    st.leases[lease] = now + self.ttl_ms

    async def ready(self) -> bool:
        return self.store.ping()

    async def close(self) -> None:
        pass
