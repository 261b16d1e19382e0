"""API key material: generation, hashing, and the record every backend shares.

A secret is `fm-` + 43 url-safe characters (256 random bits). Only its SHA-256 hex digest is stored.
The key id is the first 12 hex characters of that digest: short, stable, and safe to log, because
recovering anything about the secret from it would mean inverting SHA-256.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
from dataclasses import dataclass, field, replace

PREFIX = "fm-"
ID_LEN = 12


def new_secret() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def key_id_of(digest: str) -> str:
    return digest[:ID_LEN]


def same_digest(a: str, b: str) -> bool:
    """Constant-time comparison of two hex digests."""
    return secrets.compare_digest(a.encode(), b.encode())


_INT_LIMITS = ("rpm", "tpm", "tokens_per_day", "tokens_per_month")


def _check_ints(obj, names) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer")


@dataclass(frozen=True)
class KeyLimits:
    """Per-key limits; 0 means no limit of that kind. `weight` is the key's fair share in the batch."""

    rpm: int = 0
    tpm: int = 0
    tokens_per_day: int = 0
    tokens_per_month: int = 0
    max_concurrent: int = 0
    weight: float = 1.0

    def __post_init__(self) -> None:
        _check_ints(self, (*_INT_LIMITS, "max_concurrent"))
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not (0 < w <= 1000):
            raise ValueError("weight must be a number in (0, 1000]")
        object.__setattr__(self, "weight", float(w))


@dataclass(frozen=True)
class ModelLimits:
    """Limits of one key on one model, checked and charged in the same atomic step as the key's."""

    rpm: int = 0
    tpm: int = 0
    tokens_per_day: int = 0
    tokens_per_month: int = 0

    def __post_init__(self) -> None:
        _check_ints(self, _INT_LIMITS)

    def encode(self) -> str:  # the Lua scripts read this form: "rpm,tpm,tpd,tpmo"
        return f"{self.rpm},{self.tpm},{self.tokens_per_day},{self.tokens_per_month}"

    @classmethod
    def decode(cls, text: str) -> ModelLimits:
        a, b, c, d = (int(x) for x in text.split(","))
        return cls(a, b, c, d)

    def public(self) -> dict:
        return {k: getattr(self, k) or None for k in _INT_LIMITS}


@dataclass(frozen=True)
class KeyRecord:
    """Everything known about one key except its secret."""

    id: str
    name: str
    hash: str
    created_at: float
    limits: KeyLimits = field(default_factory=KeyLimits)
    models: tuple[str, ...] | None = None  # None: every model
    revoked_at: float | None = None
    expires_at: float | None = None  # unix time; the key stops working from then on
    owner: str = ""
    tags: tuple[str, ...] = ()
    model_limits: dict[str, ModelLimits] = field(default_factory=dict)

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def with_revoked(self, at: float) -> KeyRecord:
        return self if self.revoked else replace(self, revoked_at=at)

    def public(self) -> dict:
        """What list/admin output shows: no hash, no secret."""
        return {
            "id": self.id,
            "name": self.name,
            "created_at": _iso(self.created_at),
            "revoked_at": _iso(self.revoked_at) if self.revoked_at is not None else None,
            "expires_at": _iso(self.expires_at) if self.expires_at is not None else None,
            "rpm": self.limits.rpm or None,
            "tpm": self.limits.tpm or None,
            "tokens_per_day": self.limits.tokens_per_day or None,
            "tokens_per_month": self.limits.tokens_per_month or None,
            "max_concurrent": self.limits.max_concurrent or None,
            "weight": self.limits.weight,
            "models": list(self.models) if self.models is not None else None,
            "model_limits": {m: ml.public() for m, ml in sorted(self.model_limits.items())},
            "owner": self.owner or None,
            "tags": list(self.tags),
        }

    # Redis hash form (gateway/quota/redis.py); field names are what the Lua scripts read.
    def to_redis(self) -> dict[str, str]:
        h = {
            "hash": self.hash,
            "name": self.name,
            "created": repr(self.created_at),
            "revoked": "1" if self.revoked else "0",
            "revoked_at": repr(self.revoked_at) if self.revoked_at is not None else "",
            "exp": str(int(self.expires_at * 1000)) if self.expires_at is not None else "",
            "rpm": str(self.limits.rpm),
            "tpm": str(self.limits.tpm),
            "tpd": str(self.limits.tokens_per_day),
            "tpmo": str(self.limits.tokens_per_month),
            "maxc": str(self.limits.max_concurrent),
            "w": repr(self.limits.weight),
            "models": json.dumps(list(self.models)) if self.models is not None else "",
            "owner": self.owner,
            "tags": json.dumps(list(self.tags)),
        }
        for m, ml in self.model_limits.items():
            h["ml:" + m] = ml.encode()
        return h

    @classmethod
    def from_redis(cls, key_id: str, h: dict[str, str]) -> KeyRecord:
        revoked_at: float | None = None
        if h.get("revoked") == "1":
            revoked_at = float(h["revoked_at"]) if h.get("revoked_at") else 0.0
        models = tuple(json.loads(h["models"])) if h.get("models") else None
        return cls(
            id=key_id,
            name=h.get("name", ""),
            hash=h.get("hash", ""),
            created_at=float(h.get("created") or 0.0),
            limits=KeyLimits(
                rpm=int(h.get("rpm") or 0),
                tpm=int(h.get("tpm") or 0),
                tokens_per_day=int(h.get("tpd") or 0),
                tokens_per_month=int(h.get("tpmo") or 0),
                max_concurrent=int(h.get("maxc") or 0),
                weight=float(h.get("w") or 1.0),
            ),
            models=models,
            revoked_at=revoked_at,
            expires_at=int(h["exp"]) / 1000 if h.get("exp") else None,
            owner=h.get("owner", ""),
            tags=tuple(json.loads(h["tags"])) if h.get("tags") else (),
            model_limits={f[3:]: ModelLimits.decode(v) for f, v in h.items() if f.startswith("ml:")},
        )


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_time(text: str | None) -> float | None:
    """An ISO 8601 date or datetime (UTC unless it says otherwise) -> unix time; '' or None -> None."""
    if not text:
        return None
    t = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.timestamp()


def parse_model_limits(items) -> dict[str, ModelLimits]:
    """CLI form 'model:rpm=10,tpm=1000,tokens_per_day=5' (one per item) -> {model: ModelLimits}."""
    out: dict[str, ModelLimits] = {}
    for item in items or ():
        model, sep, rest = item.rpartition(":")
        if not sep or not model:
            raise ValueError(f"model limit {item!r} should look like 'model:rpm=10,tpm=1000'")
        kw = {}
        for part in filter(None, (p.strip() for p in rest.split(","))):
            k, eq, v = part.partition("=")
            if not eq or k.strip() not in _INT_LIMITS:
                raise ValueError(f"model limit {item!r}: use {', '.join(_INT_LIMITS)}")
            kw[k.strip()] = int(v)
        out[model] = ModelLimits(**kw)
    return out


def parse_models(text: str | None) -> tuple[str, ...] | None:
    """'a,b' -> ('a', 'b'); empty or None -> None (every model)."""
    if not text:
        return None
    names = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    return names or None


# Calendar helpers shared by both backends: UTC day numbers (days since 1970-01-01) and YYYYMM months.
EPOCH = dt.date(1970, 1, 1)


def day_number(ts: float) -> int:
    return int(ts // 86400)


def day_str(day: int) -> str:
    return (EPOCH + dt.timedelta(days=day)).isoformat()


def day_from_str(text: str) -> int:
    return (dt.date.fromisoformat(text) - EPOCH).days


def month_of_day(day: int) -> int:
    d = EPOCH + dt.timedelta(days=day)
    return d.year * 100 + d.month


def next_month_start_day(day: int) -> int:
    d = EPOCH + dt.timedelta(days=day)
    first = dt.date(d.year + (d.month == 12), d.month % 12 + 1, 1)
    return (first - EPOCH).days
