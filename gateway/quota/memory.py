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

    def _state(self, key_id: str, now: int) -> _State:
        st = self._states.get(key_id)
        if st is None:
            st = self._states[key_id] = _State()
        day = day_number(now / 1000)
        if st.seeded_day is None:
            # Seed budgets from recorded usage: this day, and every day of this month.
            totals = self.store.token_totals(key_id, day - 31)
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

    def _decision(self, st: _State, rec: KeyRecord, status: str, now: int, day: int, month: int,
                  retry: int = 0) -> base.Decision:
        lim = rec.limits
        reset_r = st.requests[-1] + self.window_ms - now if (lim.rpm and st.requests) else 0
        reset_t = st.tokens[-1][0] + self.window_ms - now if (lim.tpm and st.tokens) else 0
        return base.Decision(
            status, now, day, month,
            limit_requests=lim.rpm, remaining_requests=lim.rpm - len(st.requests), reset_requests_ms=reset_r,
            limit_tokens=lim.tpm, remaining_tokens=lim.tpm - st.token_sum, reset_tokens_ms=reset_t,
            retry_ms=retry,
        )

    async def admit(self, rec: KeyRecord, lease: str, reserve: int) -> base.Decision:
        return self.admit_now(rec, lease, reserve)

    def admit_now(self, rec: KeyRecord, lease: str, reserve: int) -> base.Decision:
        now = self.clock()
        day = day_number(now / 1000)
        month = month_of_day(day)
        st = self._state(rec.id, now)
        self._purge(st, now)
        if rec.revoked:
            return base.Decision(base.REVOKED, now, day, month)
        if lease in st.leases:
            return self._decision(st, rec, base.OK, now, day, month)
        lim = rec.limits
        dkey, mkey = f"d{day}", f"m{month}"
        status, retry = base.OK, 0
        if lim.tokens_per_day and st.budget.get(dkey, 0) + reserve > lim.tokens_per_day:
            status = base.DAY
        elif lim.tokens_per_month and st.budget.get(mkey, 0) + reserve > lim.tokens_per_month:
            status = base.MONTH
        elif lim.tpm and reserve > lim.tpm:
            status = base.TOO_LARGE
        elif lim.max_concurrent and len(st.leases) >= lim.max_concurrent:
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
        if status != base.OK:
            return self._decision(st, rec, status, now, day, month, retry)
        if lim.rpm:
            st.requests.append(now)
        if lim.tpm:
            st.tokens.append((now, lease))
            st.token_amount[lease] = reserve
            st.token_sum += reserve
        st.leases[lease] = now + self.ttl_ms
        st.reserved[lease] = now
        st.budget[dkey] = st.budget.get(dkey, 0) + reserve
        st.budget[mkey] = st.budget.get(mkey, 0) + reserve
        return self._decision(st, rec, base.OK, now, day, month)

    async def settle(self, key_id: str, lease: str, reserve: int, prompt: int, completion: int,
                     model: str, day: int, month: int) -> None:
        """Grant makes settle happen once; in one process there are no retries to deduplicate."""
        now = self.clock()
        st = self._state(key_id, now)
        st.leases.pop(lease, None)
        used = prompt + completion
        dkey, mkey = f"d{day}", f"m{month}"
        if st.reserved.pop(lease, None) is not None:
            refund = reserve - used
            if dkey in st.budget:
                st.budget[dkey] -= refund
            if mkey in st.budget:
                st.budget[mkey] -= refund
            if lease in st.token_amount:
                st.token_sum += used - st.token_amount[lease]
                st.token_amount[lease] = used
        else:
            st.budget[dkey] = st.budget.get(dkey, 0) + used
            st.budget[mkey] = st.budget.get(mkey, 0) + used
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
