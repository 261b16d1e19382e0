"""SQLite under the data dir: the key table, per-day usage, and charges waiting for Redis.

The server, the `fmgate keys` CLI and other replicas' mirrors all use this file, so every write is a
short transaction in WAL mode with a busy timeout. Calls are synchronous and fast (tens of
microseconds); the async side runs the bulk ones in a thread.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

from gateway.quota.keys import KeyLimits, KeyRecord, ModelLimits

DB_NAME = "quota.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    revoked_at REAL,
    rpm INTEGER NOT NULL DEFAULT 0,
    tpm INTEGER NOT NULL DEFAULT 0,
    tokens_per_day INTEGER NOT NULL DEFAULT 0,
    tokens_per_month INTEGER NOT NULL DEFAULT 0,
    max_concurrent INTEGER NOT NULL DEFAULT 0,
    models TEXT
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    key_id TEXT,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS usage (
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    day INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    requests INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, model, day)
);
CREATE TABLE IF NOT EXISTS pending (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    payload TEXT NOT NULL
);
"""

UsageRow = tuple[str, str, int, int, int, int]  # key_id, model, day number, prompt, completion, requests


class KeyExists(Exception):
    pass


class Store:
    def __init__(self, home: Path):
        home = Path(home)
        home.mkdir(parents=True, exist_ok=True)
        self.path = home / DB_NAME
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        with self._lock:
            self._db.executescript(_SCHEMA)
            have = {r[1] for r in self._db.execute("PRAGMA table_info(keys)")}
            for col, decl in _ADDED_COLS:  # columns added after the first release
                if col not in have:
                    try:
                        self._db.execute(f"ALTER TABLE keys ADD COLUMN {col} {decl}")
                    except sqlite3.OperationalError as exc:  # another process added it first
                        if "duplicate column" not in str(exc):
                            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def ping(self) -> bool:
        try:
            with self._lock:
                self._db.execute("SELECT 1").fetchone()
            return True
        except sqlite3.Error:
            return False

    # Keys.
    def insert_key(self, rec: KeyRecord) -> None:
        try:
            with self._lock:
                self._db.execute(
                    f"INSERT INTO keys ({_KEY_COLS}) VALUES ({_QMARKS})", _key_values(rec)
                )
        except sqlite3.IntegrityError as exc:
            raise KeyExists(rec.id) from exc

    def upsert_key(self, rec: KeyRecord) -> None:
        """Write a record (an edit, or a mirror from Redis). Revocation is one-way: a revoked row never
        comes back."""
        updates = ", ".join(f"{c}=excluded.{c}" for c in _KEY_COLS.split(", ")[5:])
        with self._lock:
            self._db.execute(
                f"INSERT INTO keys ({_KEY_COLS}) VALUES ({_QMARKS}) ON CONFLICT(id) DO UPDATE SET "
                f"name=excluded.name, revoked_at=COALESCE(keys.revoked_at, excluded.revoked_at), {updates}",
                _key_values(rec),
            )

    def get_key(self, key_id: str) -> KeyRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_KEY_COLS} FROM keys WHERE id=?", (key_id,)).fetchone()
        return _key_from_row(row) if row else None

    def list_keys(self) -> list[KeyRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_KEY_COLS} FROM keys ORDER BY created_at, id").fetchall()
        return [_key_from_row(r) for r in rows]

    def any_keys(self) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM keys LIMIT 1").fetchone() is not None

    def revoke(self, key_id: str, at: float) -> KeyRecord | None:
        with self._lock:
            self._db.execute("UPDATE keys SET revoked_at=COALESCE(revoked_at, ?) WHERE id=?", (at, key_id))
        return self.get_key(key_id)

    @contextlib.contextmanager
    def _transaction(self, mode: str = ""):
        """One explicit transaction under the lock (the connection is in autocommit mode)."""
        with self._lock:
            self._db.execute(f"BEGIN {mode}")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # Audit log of admin actions.
    def add_audit(self, at: float, actor: str, action: str, key_id: str | None, detail: dict) -> None:
        with self._lock:
            self._db.execute("INSERT INTO audit (at, actor, action, key_id, detail) VALUES (?,?,?,?,?)",
                             (at, actor, action, key_id, json.dumps(detail, sort_keys=True)))

    def audit(self, key_id: str | None = None, limit: int = 1000) -> list[dict]:
        sql = "SELECT at, actor, action, key_id, detail FROM audit"
        args: list = []
        if key_id is not None:
            sql += " WHERE key_id=?"
            args.append(key_id)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [{"at": r[0], "actor": r[1], "action": r[2], "key_id": r[3], "detail": json.loads(r[4])}
                for r in rows]

    # Usage.
    def add_usage(self, rows: Iterable[UsageRow]) -> None:
        """Add increments (memory mode, where this table is the record)."""
        rows = list(rows)
        if not rows:
            return
        with self._transaction():
            self._db.executemany(
                "INSERT INTO usage VALUES (?,?,?,?,?,?) ON CONFLICT(key_id, model, day) DO UPDATE SET "
                "prompt_tokens=prompt_tokens+excluded.prompt_tokens, "
                "completion_tokens=completion_tokens+excluded.completion_tokens, "
                "requests=requests+excluded.requests",
                rows,
            )

    def snapshot_usage(self, rows: Iterable[UsageRow]) -> None:
        """Store absolute totals read from Redis; counters only grow, so keep the larger value."""
        rows = list(rows)
        if not rows:
            return
        with self._transaction():
            self._db.executemany(
                "INSERT INTO usage VALUES (?,?,?,?,?,?) ON CONFLICT(key_id, model, day) DO UPDATE SET "
                "prompt_tokens=MAX(prompt_tokens, excluded.prompt_tokens), "
                "completion_tokens=MAX(completion_tokens, excluded.completion_tokens), "
                "requests=MAX(requests, excluded.requests)",
                rows,
            )

    def usage(
        self, key_id: str | None = None, since_day: int | None = None, until_day: int | None = None,
        model: str | None = None,
    ) -> list[UsageRow]:
        sql = "SELECT key_id, model, day, prompt_tokens, completion_tokens, requests FROM usage WHERE 1=1"
        args: list = []
        if key_id is not None:
            sql += " AND key_id=?"
            args.append(key_id)
        if model is not None:
            sql += " AND model=?"
            args.append(model)
        if since_day is not None:
            sql += " AND day>=?"
            args.append(since_day)
        if until_day is not None:
            sql += " AND day<=?"
            args.append(until_day)
        with self._lock:
            return [tuple(r) for r in self._db.execute(sql + " ORDER BY day, key_id, model", args)]

    def token_totals(self, key_id: str, since_day: int, model: str | None = None) -> dict[int, int]:
        """Tokens (prompt + completion) per day since `since_day`, for seeding budget counters."""
        sql, args = "WHERE key_id=? AND day>=?", [key_id, since_day]
        if model is not None:
            sql += " AND model=?"
            args.append(model)
        with self._lock:
            rows = self._db.execute(
                f"SELECT day, SUM(prompt_tokens + completion_tokens) FROM usage {sql} GROUP BY day", args
            ).fetchall()
        return {int(d): int(t) for d, t in rows}

    # Charges that could not reach Redis before shutdown.
    def save_pending(self, items: Iterable[dict]) -> None:
        payloads = [(json.dumps(i),) for i in items]
        if payloads:
            with self._lock:
                self._db.executemany("INSERT INTO pending (payload) VALUES (?)", payloads)

    def take_pending(self) -> list[dict]:
        with self._transaction("IMMEDIATE"):
            rows = self._db.execute("SELECT payload FROM pending ORDER BY id").fetchall()
            self._db.execute("DELETE FROM pending")
        return [json.loads(r[0]) for r in rows]


_KEY_COLS = (
    "id, name, hash, created_at, revoked_at, rpm, tpm, tokens_per_day, tokens_per_month, max_concurrent, models, "
    "expires_at, owner, tags, weight, model_limits"
)
_QMARKS = ",".join("?" * 16)
_ADDED_COLS = (("expires_at", "REAL"), ("owner", "TEXT"), ("tags", "TEXT"), ("weight", "REAL"),
               ("model_limits", "TEXT"))


def _key_values(rec: KeyRecord) -> tuple:
    lim = rec.limits
    return (
        rec.id, rec.name, rec.hash, rec.created_at, rec.revoked_at, lim.rpm, lim.tpm, lim.tokens_per_day,
        lim.tokens_per_month, lim.max_concurrent, json.dumps(list(rec.models)) if rec.models is not None else None,
        rec.expires_at, rec.owner, json.dumps(list(rec.tags)), lim.weight,
        json.dumps({m: ml.encode() for m, ml in rec.model_limits.items()}),
    )


def _key_from_row(row) -> KeyRecord:
    return KeyRecord(
        id=row[0], name=row[1], hash=row[2], created_at=row[3], revoked_at=row[4],
        limits=KeyLimits(rpm=row[5], tpm=row[6], tokens_per_day=row[7], tokens_per_month=row[8],
                         max_concurrent=row[9], weight=row[14] if row[14] is not None else 1.0),
        models=tuple(json.loads(row[10])) if row[10] else None,
        expires_at=row[11], owner=row[12] or "", tags=tuple(json.loads(row[13])) if row[13] else (),
        model_limits={m: ModelLimits.decode(v) for m, v in json.loads(row[15] or "{}").items()},
    )
