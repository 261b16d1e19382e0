"""What the cache holds, and housekeeping: list, show, remove, verify, prune.

Works on the manifests only (no model is loaded), so the CLI stays fast.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .cache import Cache
from .errors import StoreError


@dataclass
class ModelEntry:
    name: str
    ref: str
    task: str
    digest: str
    chosen: str | None
    selection: dict | None
    variants: list[dict] = field(default_factory=list)  # variant manifests built for this source


class Inventory:
    def __init__(self, cache: Cache):
        self.cache = cache

    def _jsons(self, folder: Path) -> list[tuple[Path, dict]]:
        if not folder.exists():
            return []
        out = []
        for p in sorted(folder.glob("*.json")):
            d = self.cache.read_json(p)
            if d is not None:
                out.append((p, d))
        return out

    def models(self) -> list[ModelEntry]:
        variants = [d for _, d in self._jsons(self.cache.variants)]
        selections = {d.get("key"): d for _, d in self._jsons(self.cache.selections)}
        entries: dict[tuple[str, str], ModelEntry] = {}
        for _, rec in self._jsons(self.cache.refs):
            key = (rec["digest"], rec["task"])
            sel = selections.get(rec.get("selection"))
            chosen = (rec.get("chosen") or {}).get("variant")
            entries.setdefault(key, ModelEntry(rec["name"], rec["ref"], rec["task"], rec["digest"], chosen, sel))
        for v in variants:
            key = (v["source"]["digest"], v["task"])
            if key not in entries:
                entries[key] = ModelEntry(v["source"]["name"], v["source"]["ref"], v["task"], key[0], None, None)
            entries[key].variants.append(v)
        for e in entries.values():
            e.variants.sort(key=lambda v: v["variant"])
        return sorted(entries.values(), key=lambda e: (e.name, e.task))

    def find(self, name: str) -> list[ModelEntry]:
        hits = [e for e in self.models() if name in (e.name, e.ref, e.digest)]
        if not hits:
            known = ", ".join(sorted({e.name for e in self.models()})) or "none"
            raise StoreError(f"no cached model named {name!r} (cached: {known})")
        return hits

    def choice(self, ref: str, task: str) -> dict | None:
        """What `auto` chose for a source string and why, with every candidate's figures and verdict."""
        for _, rec in self._jsons(self.cache.refs):
            if rec.get("task") != task or ref not in (rec.get("ref"), rec.get("name")):
                continue
            sel = self.cache.read_json(self.cache.selections / f"{rec.get('selection')}.json") \
                if rec.get("selection") else None
            if not sel:
                return None
            keep = ("variant", "passes", "verdict", "reason", "quality", "speed", "size_bytes")
            return {"chosen": sel.get("chosen"), "why": sel.get("why"), "tie_margin": sel.get("tie_margin"),
                    "gate": sel.get("gate"),
                    "candidates": [{k: x.get(k) for k in keep if k in x} for x in sel.get("candidates", [])]}
        return None

    def remove(self, name: str, variant: str | None = None, timeout: float | None = 600) -> int:
        """Drop a model (or one of its variants); returns bytes freed once blobs are collected.

        Waits (up to `timeout` s) until no load or build is in progress."""
        with self.cache.exclusive(timeout):
            return self._remove(name, variant)

    def _remove(self, name: str, variant: str | None) -> int:
        for e in self.find(name):
            for v in e.variants:
                if variant and v["variant"] != variant:
                    continue
                shutil.rmtree(self.cache.artifacts / v["key"], ignore_errors=True)
                (self.cache.variants / f"{v['key']}.json").unlink(missing_ok=True)
            if variant is None:
                for p, rec in self._jsons(self.cache.refs):
                    if rec["digest"] == e.digest and rec["task"] == e.task:
                        p.unlink(missing_ok=True)
                for p, sel in self._jsons(self.cache.selections):
                    if sel.get("source", {}).get("digest") == e.digest and sel.get("task") == e.task:
                        p.unlink(missing_ok=True)
        return self.collect_blobs()

    def verify(self, name: str | None = None, repair: bool = False) -> list[tuple[str, str, str | None]]:
        """Hash every file of every artifact (or of one model): [(model, variant, problem or None)]."""
        from . import cache as cache_mod

        out = []
        entries = self.find(name) if name else self.models()
        for e in entries:
            for v in e.variants:
                with cache_mod._verified_lock:
                    cache_mod._verified.clear()  # a full check: hash again even if checked before
                problem = self.cache.verify(v["key"], v["files"])
                if problem and repair:
                    self.cache.drop_variant(v["key"], v["files"])
                out.append((e.name, v["variant"], problem))
        return out

    def referenced_blobs(self) -> set[str]:
        refs: set[str] = set()
        for _, v in self._jsons(self.cache.variants):
            refs.update(f"sha256-{f['sha256']}" for f in v.get("files", {}).values())
        return refs

    def collect_blobs(self) -> int:
        freed = 0
        keep = self.referenced_blobs()
        if self.cache.blobs.exists():
            for b in self.cache.blobs.iterdir():
                if b.name not in keep:
                    freed += b.stat().st_size
                    b.unlink(missing_ok=True)
        return freed

    def prune(self, losers: bool = False, staging: bool = True, timeout: float | None = 600) -> dict:
        """Free space: unreferenced blobs, stale scratch, GGUF conversions, and (losers) unchosen variants.

        Waits (up to `timeout` s) until no load or build is in progress, and holds them off meanwhile."""
        with self.cache.exclusive(timeout):
            return self._prune(losers, staging)

    def pinned(self) -> set[str]:
        """Variant keys a ref was last served or explicitly asked for: never a loser."""
        keys: set[str] = set()
        for _, rec in self._jsons(self.cache.refs):
            keys.update(rec.get("pinned", []))
            for k in ("chosen", "last"):
                if (rec.get(k) or {}).get("key"):
                    keys.add(rec[k]["key"])
        return keys

    def _prune(self, losers: bool, staging: bool) -> dict:
        freed = {"blobs": 0, "tmp": 0, "staging": 0, "losers": 0}
        if losers:
            chosen = {(sel.get("source", {}).get("digest"), sel.get("task"), sel.get("chosen"))
                      for _, sel in self._jsons(self.cache.selections)}
            keep = self.pinned()
            for p, v in self._jsons(self.cache.variants):
                if (v["source"]["digest"], v["task"], v["variant"]) not in chosen and v["key"] not in keep:
                    freed["losers"] += v.get("size_bytes", 0)
                    shutil.rmtree(self.cache.artifacts / v["key"], ignore_errors=True)
                    p.unlink(missing_ok=True)
        if self.cache.tmp.exists():  # no build is in progress while we hold the lock: all of it is stale
            for t in self.cache.tmp.iterdir():
                freed["tmp"] += _size(t)
                _rm(t)
        if staging and self.cache.staging.exists():
            for s in self.cache.staging.iterdir():
                freed["staging"] += _size(s)
                _rm(s)
        if self.cache.artifacts.exists():
            live = {v["key"] for _, v in self._jsons(self.cache.variants)}
            for a in self.cache.artifacts.iterdir():
                if a.name not in live:
                    _rm(a)
        freed["blobs"] = self.collect_blobs()
        return freed

    def disk_usage(self) -> int:
        return _size(self.cache.root) if self.cache.root.exists() else 0


def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    total, seen = 0, set()
    for dirpath, _, files in os.walk(p):
        for f in files:
            try:
                st = os.stat(os.path.join(dirpath, f))
            except OSError:
                continue
            if st.st_ino not in seen:  # hard links count once
                seen.add(st.st_ino)
                total += st.st_size
    return total


def _rm(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


__all__ = ["Inventory", "ModelEntry"]
