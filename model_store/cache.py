"""Content-addressed blobs + JSON manifests, atomic writes, cross-process locks.

Layout under <home>/models:
    blobs/sha256-<hex>        every file of every artifact, stored once, read-only
    variants/<key>.json       one built variant: recipe, params, versions, files → digests
    measures/<key>.json       one measurement of a variant on one machine, by the code that measured it
    selections/<key>.json     one `auto` choice: every candidate's figures and why the winner won
    refs/<id>.json            what a user's source string resolved to (names for the CLI, offline use)
    artifacts/<key>/          the folder an engine loads: hard links to the blobs
    staging/<digest>/         intermediate folders (a GGUF dequantized to transformers); prunable
    locks/, tmp/              file locks; scratch space on the same file system (atomic renames)
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from .digest import sha256_file
from .errors import StoreError

log = logging.getLogger("fmgate.model_store")

SUBDIRS = ("blobs", "variants", "measures", "selections", "refs", "artifacts", "staging", "locks", "tmp", "sources")

# Files whose content this process has hashed and found right: (device, inode, size, mtime_ns);
# an artifact's hard link and its blob share the stamp.
_verified: set[tuple] = set()
_verified_lock = threading.Lock()


def os_error(exc: OSError, where: Path) -> StoreError:
    if exc.errno == errno.ENOSPC:
        return StoreError(f"no space left in the model cache {where}; free space or set FMGATE_HOME")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StoreError(f"the model cache {where} is not writable; set FMGATE_HOME to a writable folder")
    return StoreError(f"model cache {where}: {exc.strerror or exc}")


class Cache:
    def __init__(self, root: Path):
        self.root = root
        self.blobs = root / "blobs"
        self.variants = root / "variants"
        self.measures = root / "measures"
        self.selections = root / "selections"
        self.refs = root / "refs"
        self.artifacts = root / "artifacts"
        self.staging = root / "staging"
        self.locks = root / "locks"
        self.tmp = root / "tmp"
        self.sources = root / "sources"
        self._writable: bool | None = None

    # --- set-up -------------------------------------------------------------------------------

    def writable(self) -> bool:
        if self._writable is None:
            try:
                for d in SUBDIRS:
                    (self.root / d).mkdir(parents=True, exist_ok=True)
                probe = self.tmp / f".probe-{os.getpid()}"
                probe.write_bytes(b"x")
                probe.unlink(missing_ok=True)  # a prune may have swept it already
                self._writable = True
            except OSError:
                self._writable = False
        return self._writable

    def require_writable(self) -> None:
        if not self.writable():
            raise StoreError(f"the model cache {self.root} is not writable; set FMGATE_HOME to a writable folder")

    # --- JSON ---------------------------------------------------------------------------------

    @staticmethod
    def read_json(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("ignoring unreadable manifest %s", path)
            return None

    def write_json(self, path: Path, data: dict) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2, sort_keys=False, default=str)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise os_error(exc, self.root) from None

    # --- locks --------------------------------------------------------------------------------

    @contextmanager
    def lock(self, key: str, what: str) -> Iterator[None]:
        """One builder per key across processes; the others wait here, then find it built."""
        self.require_writable()
        lk = FileLock(str(self.locks / f"{key}.lock"))
        try:
            lk.acquire(timeout=0.05)
        except Timeout:
            log.info("waiting for another process that is building %s", what)
            t0 = time.monotonic()
            lk.acquire()
            log.info("%s: the other process finished after %.1f s", what, time.monotonic() - t0)
        try:
            yield
        finally:
            lk.release()

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Held by every load and build: maintenance (prune, rm) waits until none is in progress."""
        if not self.writable():  # a read-only cache: nobody prunes it through us
            yield
            return
        with open(self.locks / "maintenance.lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @contextmanager
    def exclusive(self, timeout: float | None = None) -> Iterator[None]:
        """Held by prune and rm: no load or build is in progress meanwhile (None: wait for ever)."""
        self.require_writable()
        with open(self.locks / "maintenance.lock", "a+") as f:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() > deadline:
                        raise StoreError("the model cache is busy (a model is being loaded or built); "
                                         "try again when it is done") from None
                    time.sleep(0.1)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # --- blobs --------------------------------------------------------------------------------

    def blob(self, sha: str) -> Path:
        return self.blobs / f"sha256-{sha}"

    def scratch(self, prefix: str) -> Path:
        self.require_writable()
        return Path(tempfile.mkdtemp(dir=self.tmp, prefix=prefix))

    def ingest(self, folder: Path) -> dict[str, dict]:
        """Move every file of a built folder into the blob store; returns {relpath: {sha256, size}}."""
        files: dict[str, dict] = {}
        try:
            for f in sorted(folder.rglob("*")):
                if not f.is_file():
                    continue
                rel = f.relative_to(folder).as_posix()
                sha = sha256_file(f)
                size = f.stat().st_size
                dst = self.blob(sha)
                if dst.exists() and dst.stat().st_size == size and _blob_ok(dst, sha):
                    f.unlink()  # the same content is stored already (e.g. a tokenizer shared by variants)
                else:
                    os.chmod(f, 0o444)
                    os.replace(f, dst)
                _mark_verified(dst)
                files[rel] = {"sha256": sha, "size": size}
        except OSError as exc:
            raise os_error(exc, self.root) from None
        return files

    def materialize(self, key: str, files: dict[str, dict]) -> Path:
        """artifacts/<key>/: hard links to the blobs (copies where links are impossible)."""
        final = self.artifacts / key
        tmp = Path(tempfile.mkdtemp(dir=self.tmp, prefix=f"art-{key[:12]}-"))
        try:
            for rel, meta in files.items():
                dst = tmp / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                src = self.blob(meta["sha256"])
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise os_error(exc, self.root) from None
        return final

    def verify(self, key: str, files: dict[str, dict]) -> str | None:
        """None when the artifact is whole; else what is wrong. Sizes always, hashes once per process."""
        folder = self.artifacts / key
        if not folder.is_dir():
            return "artifact folder missing"
        for rel, meta in files.items():
            p = folder / rel
            blob = self.blob(meta["sha256"])
            try:
                st = p.stat()
            except OSError:
                return f"{rel} missing"
            if st.st_size != meta["size"]:
                return f"{rel} has {st.st_size} bytes, expected {meta['size']}"
            stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            with _verified_lock:
                if stamp in _verified:
                    continue
            if sha256_file(p) != meta["sha256"]:
                return f"{rel} does not match its digest"
            with _verified_lock:
                _verified.add(stamp)
            if not blob.exists():
                return f"blob of {rel} missing"
        return None

    def drop_variant(self, key: str, files: dict[str, dict] | None, bad_blobs: bool = True) -> None:
        """Remove an artifact folder, its manifest and (optionally) blobs that fail their digest."""
        shutil.rmtree(self.artifacts / key, ignore_errors=True)
        (self.variants / f"{key}.json").unlink(missing_ok=True)
        if bad_blobs and files:
            for meta in files.values():
                b = self.blob(meta["sha256"])
                try:
                    if b.stat().st_size != meta["size"] or sha256_file(b) != meta["sha256"]:
                        b.unlink()
                except OSError:
                    continue


def _blob_ok(blob: Path, sha: str) -> bool:
    st = blob.stat()
    stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _verified_lock:
        if stamp in _verified:
            return True
    if sha256_file(blob) != sha:
        return False
    with _verified_lock:
        _verified.add(stamp)
    return True


def _mark_verified(blob: Path) -> None:
    st = blob.stat()
    with _verified_lock:
        _verified.add((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
