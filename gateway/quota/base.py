"""What both limiter backends return, and how a decision becomes headers or an OpenAI-shaped error.

Algorithms (identical in memory.py and the Lua scripts in redis.py):
- requests per minute: sliding-window log. Each admitted request is one entry; a request is admitted
  while fewer than `rpm` entries are younger than the window. Exact: no 60 s span ever holds more.
- tokens per minute: sliding-window log of reservations. Each admitted request adds an entry worth its
  reservation; settle lowers it to the real use. Admitted while the window's sum plus the new
  reservation fits. A separate log from the requests one.
- tokens per day / month: fixed UTC calendar day and month counters, charged with the reservation at
  admission and corrected to the real use at settle.
- concurrency: leases with an expiry; a lease not renewed or released within its TTL stops counting.
- per-model limits (a key's `model_limits`): the same windows and budgets over the key's requests
  to one model, checked after the key's own and charged in the same step.
All checks happen before any charge, so a refusal of one kind never consumes another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Protocol

from gateway.errors import INSUFFICIENT_QUOTA, RATE_LIMIT, APIError

OK = "ok"
# Refusal reasons; also the `reason` label of fmgate_quota_rejections_total.
RPM = "rpm"
TPM = "tpm"
TOO_LARGE = "tpm_request_too_large"
CONCURRENCY = "concurrency"
DAY = "tokens_per_day"
MONTH = "tokens_per_month"
REVOKED = "revoked"
EXPIRED = "expired"
MODEL_NOT_ALLOWED = "model_not_allowed"
UNAVAILABLE = "backend_unavailable"


@dataclass(frozen=True)
class Decision:
    status: str
    now_ms: int
    day: int
    month: int
    limit_requests: int = 0
    remaining_requests: int = 0
    reset_requests_ms: int = 0
    limit_tokens: int = 0
    remaining_tokens: int = 0
    reset_tokens_ms: int = 0
    retry_ms: int = 0

    @property
    def ok(self) -> bool:
        return self.status == OK

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers, for the limits this key has (none for a key without)."""
        h: dict[str, str] = {}
        if self.limit_requests:
            h["x-ratelimit-limit-requests"] = str(self.limit_requests)
            h["x-ratelimit-remaining-requests"] = str(max(0, self.remaining_requests))
            h["x-ratelimit-reset-requests"] = fmt_duration(self.reset_requests_ms)
        if self.limit_tokens:
            h["x-ratelimit-limit-tokens"] = str(self.limit_tokens)
            h["x-ratelimit-remaining-tokens"] = str(max(0, self.remaining_tokens))
            h["x-ratelimit-reset-tokens"] = fmt_duration(self.reset_tokens_ms)
        return h


class Limiter(Protocol):
    async def admit(self, rec, lease: str, reserve: int, model: str = "") -> Decision: ...
    async def settle(self, key_id: str, lease: str, reserve: int, prompt: int, completion: int,
                     model: str, day: int, month: int, cancel: bool = False) -> None: ...
    async def renew(self, leases: dict[str, list[str]]) -> None: ...
    async def ready(self) -> bool: ...
    async def close(self) -> None: ...


def fmt_duration(ms: int | float) -> str:
    """Go-style durations as OpenAI sends them: 0s, 20ms, 1.5s, 6m0s, 1h2m3s."""
    ms = max(0, int(math.ceil(ms)))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = rest / 1000
    sec = f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{sec}"
    if minutes:
        return f"{minutes}m{sec}"
    return sec


def refusal(d: Decision, reserve: int, model: str = "") -> APIError:
    """The 429 for a refused decision, carrying the rate-limit headers and, where waiting helps, Retry-After.
    A refusal by the key's limits on one model (status `model_*`) says so and names the model."""
    if d.status.startswith("model_"):
        err = refusal(replace(d, status=d.status[len("model_"):]), reserve)
        err.message = err.message.replace("for this API key", f"for this API key on model '{model}'").replace(
            "than this API key's limit", f"than this API key's limit on model '{model}'")
        return err
    headers = d.headers()
    retry_s = max(1, math.ceil(d.retry_ms / 1000)) if d.retry_ms > 0 else 0
    if d.status in (DAY, MONTH):
        period = "daily" if d.status == DAY else "monthly"
        message = (
            f"You exceeded your {period} token budget for this API key: this request reserves {reserve} tokens "
            "(prompt + max completion tokens) and the budget has fewer left. Lower max_tokens or wait for "
            "the budget to reset."
        )
        err = APIError(429, message, INSUFFICIENT_QUOTA, code="insufficient_quota", headers=headers)
    elif d.status == TOO_LARGE:
        message = (
            f"Request too large: it reserves {reserve} tokens (prompt + max completion tokens), more than this "
            f"API key's limit of {d.limit_tokens} tokens per minute. Lower max_tokens or the prompt."
        )
        return APIError(429, message, RATE_LIMIT, code="rate_limit_exceeded", headers=headers)
    else:
        what = {
            RPM: f"requests per minute (limit {d.limit_requests})",
            TPM: f"tokens per minute (limit {d.limit_tokens}, requested {reserve})",
            CONCURRENCY: "concurrent requests",
        }.get(d.status, "rate limit")
        message = f"Rate limit reached for this API key on {what}. Please try again in {retry_s or 1}s."
        err = APIError(429, message, RATE_LIMIT, code="rate_limit_exceeded", headers=headers)
    if retry_s:
        err.headers["retry-after"] = str(retry_s)
        err.headers["retry-after-ms"] = str(max(1, int(d.retry_ms)))
    return err
