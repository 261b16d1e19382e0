"""File hashing with a persistent stat cache, so a warm start does not re-read unchanged sources."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from pathlib import Path

CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


class HashCache:
    """sha256 of files keyed by (path, size, mtime_ns, inode); stored as JSON next to the cache.

    A changed file changes its stat, so it is hashed again; an unchanged one is not re-read.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._data: dict[str, list] | None = None
        self._dirty = False

    def _load(self) -> dict[str, list]:
        if self._data is None:
            self._data = {}
            if self.path and self.path.exists():
                try:
                    self._data = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    self._data = {}
        return self._data

    def digest(self, path: Path) -> str:
        path = Path(path).resolve()
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        with self._lock:
            data = self._load()
            hit = data.get(str(path))
            if hit and hit[:3] == stamp:
                return hit[3]
        sha = sha256_file(path)
        with self._lock:
            self._load()[str(path)] = [*stamp, sha]
            self._dirty = True
        return sha

    def flush(self) -> None:
        if not (self._dirty and self.path):
            return
        with self._lock:
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(json.dumps(self._data))
                os.replace(tmp, self.path)
                self._dirty = False
            except OSError:
                with contextlib.suppress(OSError):  # a read-only cache only costs re-hashing next time
                    tmp.unlink(missing_ok=True)
