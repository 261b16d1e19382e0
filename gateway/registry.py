"""The served models: each configured name, its state, and its engine while it is loaded.

A model loads at start or at first use (`load: on_demand`), stays while requests use it, and unloads when
it has been idle past its keep_alive, or when a load needs room under max_loaded_memory / max_loaded_models
(the least recently used idle model goes first; a model with requests in flight is never unloaded).
Memory is measured as the process's RSS growth around each engine load, not guessed.
Routes use only acquire() / release(); loads and unloads run off the event loop, one at a time.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from . import metrics
from .engines.embedder import EmbeddingEngine
from .engines.llm import LLMEngine
from .scheduler.fair import set_default_policy
from .settings import ModelConfig, Settings

log = logging.getLogger("fmgate.registry")

STATES = ("unloaded", "loading", "ready", "unloading", "failed")


@dataclass
class ServedModel:
    config: ModelConfig
    engine: LLMEngine | EmbeddingEngine
    variant: str
    quality: dict[str, Any] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))
    memory_bytes: int = 0  # RSS the engine added to the process when it loaded

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def task(self) -> str:
        return self.config.task


class ModelLoadError(Exception):
    pass


class ModelNotFound(Exception):
    """No model of that name is configured (404 model_not_found)."""

    def __init__(self, name: str):
        super().__init__(f"The model '{name}' does not exist.")
        self.name = name


class ModelUnavailable(Exception):
    """The model exists but cannot serve now: loading, failed to load, no room (503 + Retry-After)."""

    def __init__(self, message: str, retry_after: float = 5.0):
        super().__init__(message)
        self.retry_after = retry_after


class WrongTask(Exception):
    """The model serves another task (400 model_not_supported)."""

    def __init__(self, name: str, task: str):
        verb = {"chat": "chat and completions", "embed": "embeddings"}.get(task, task)
        super().__init__(f"The model '{name}' serves {verb} only.")
        self.name = name
        self.task = task


class ModelBusy(Exception):
    """An unload was asked while requests use the model (409)."""


@dataclass(eq=False)
class Slot:
    """One configured model name and what is known about it."""

    config: ModelConfig
    state: str = "unloaded"
    served: ServedModel | None = None
    error: str | None = None
    memory_bytes: int = 0  # last measured; kept after an unload as the estimate for the next load
    in_use: int = 0
    last_used: float | None = None  # wall clock
    keep_alive: float | None = None  # the latest request's keep_alive (None: the config's)
    expires_at: float | None = None  # wall clock; None: stays loaded
    loaded_once: bool = False
    load_seconds: float | None = None
    task: asyncio.Task | None = None  # the load in progress

    @property
    def name(self) -> str:
        return self.config.name


class Registry:
    def __init__(self, settings: Settings, build: Callable[[ModelConfig], ServedModel] | None = None):
        self.settings = settings
        self.slots: dict[str, Slot] = {m.name: Slot(m) for m in settings.models}
        self._build = build or self._build_engine  # blocking; tests pass a fake
        self._lock: asyncio.Lock | None = None
        self._reaper: asyncio.Task | None = None
        self.started = False  # the models marked load=start have each loaded or failed
        set_default_policy(settings.fairness)  # admission across keys in every engine's queue
        for slot in self.slots.values():
            self._publish(slot)

    # -- what routes use --

    async def acquire(self, name: str, task: str, keep_alive: float | None = None) -> ServedModel:
        """The model, loaded and marked in use; release() it exactly once when the request is done."""
        slot = self.slots.get(name)
        if slot is None:
            raise ModelNotFound(name)
        if slot.config.task != task:
            raise WrongTask(name, slot.config.task)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.model_load_wait_s
        while True:
            if slot.state == "ready" and slot.served is not None:
                slot.in_use += 1
                slot.last_used = time.time()
                slot.expires_at = None
                # Ollama's meaning: each request says how long the model stays after it; a request
                # without keep_alive brings back the configured one. The latest request decides.
                slot.keep_alive = keep_alive
                return slot.served
            if slot.state == "failed":
                raise ModelUnavailable(f"The model '{name}' failed to load: {slot.error}", retry_after=60)
            load = self._begin_load(slot)
            left = deadline - loop.time()
            if left <= 0:
                raise ModelUnavailable(f"The model '{name}' is loading; retry shortly.", retry_after=5)
            try:
                await asyncio.wait_for(asyncio.shield(load), left)
            except TimeoutError:
                raise ModelUnavailable(f"The model '{name}' is loading; retry shortly.", retry_after=5) from None

    def release(self, served: ServedModel) -> None:
        slot = self.slots.get(served.name)
        if slot is None or slot.in_use <= 0:
            return
        slot.in_use -= 1
        slot.last_used = time.time()
        if slot.in_use == 0:
            self._arm_expiry(slot)

    def ready(self) -> bool:
        """/readyz: every `required` model has come up (a later idle unload does not count against it)."""
        return all(s.loaded_once and s.state != "failed" and self._engine_alive(s)
                   for s in self.slots.values() if s.config.is_required)

    @staticmethod
    def _engine_alive(slot) -> bool:
        """False once a loaded model's engine thread has died (its watchdog turned it unready)."""
        return slot.served is None or getattr(slot.served.engine, "ready", True)

    def status(self) -> list[dict]:
        out = []
        for s in self.slots.values():
            served = s.served
            out.append({
                "name": s.name, "task": s.config.task, "state": s.state, "source": s.config.source,
                "load": s.config.load, "required": s.config.is_required,
                "variant": served.variant if served else None, "error": s.error,
                "memory_bytes": s.memory_bytes or None, "in_use": s.in_use,
                "last_used": s.last_used, "expires_at": s.expires_at,
                "keep_alive": self._keep_alive(s), "load_seconds": s.load_seconds,
            })
        return out

    # -- read-only views kept for older callers --

    @property
    def models(self) -> dict[str, ServedModel]:
        """Loaded models by name."""
        return {s.name: s.served for s in self.slots.values() if s.state == "ready" and s.served is not None}

    @property
    def errors(self) -> dict[str, str]:
        return {s.name: s.error or "" for s in self.slots.values() if s.state == "failed"}

    @property
    def loaded(self) -> bool:
        """Deprecated: use ready(). True once the start-up loads have finished (some may have failed)."""
        return self.started

    def get(self, name: str) -> ServedModel | None:
        """The model if it is loaded now; does not load it and does not mark it in use (see acquire)."""
        slot = self.slots.get(name)
        return slot.served if slot is not None and slot.state == "ready" else None

    # -- lifecycle --

    async def start(self) -> None:
        """Load the models marked load=start, one after another; a failure is reported, the rest load."""
        self._reaper = asyncio.create_task(self._reap())
        for slot in list(self.slots.values()):
            if slot.config.load == "start":
                try:
                    await asyncio.shield(self._begin_load(slot))
                except ModelUnavailable as exc:
                    log.error("model %s not loaded at start: %s", slot.name, exc)
        self.started = True

    async def aclose(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        for slot in self.slots.values():
            if slot.served is not None:
                slot.served.engine.close()

    # -- admin --

    def add(self, cfg: ModelConfig) -> Slot:
        if cfg.name in self.slots:
            raise ValueError(f"a model named '{cfg.name}' already exists")
        slot = self.slots[cfg.name] = Slot(cfg)
        self._publish(slot)
        if cfg.load == "start":
            self._begin_load(slot)
        return slot

    async def load(self, name: str, wait: float | None = None) -> Slot:
        """Load now (a failed model is retried); waits up to `wait` seconds, then returns while it loads."""
        slot = self.slots.get(name)
        if slot is None:
            raise ModelNotFound(name)
        if slot.state == "failed":
            slot.state = "unloaded"
        load = self._begin_load(slot)
        try:
            await asyncio.wait_for(asyncio.shield(load), self.settings.model_load_wait_s if wait is None else wait)
        except TimeoutError:
            pass
        return slot

    async def unload(self, name: str) -> Slot:
        slot = self.slots.get(name)
        if slot is None:
            raise ModelNotFound(name)
        if slot.in_use:
            raise ModelBusy(f"The model '{name}' has {slot.in_use} requests in flight; retry when they finish.")
        async with self._get_lock():
            await self._unload(slot, "admin")
        return slot

    async def set_budget(self, max_loaded_memory: int | None = None, max_loaded_models: int | None = None) -> None:
        """Change the residency limits at run time; idle models over the new limits unload now (LRU first)."""
        if max_loaded_memory is not None:
            self.settings.max_loaded_memory = max_loaded_memory
        if max_loaded_models is not None:
            self.settings.max_loaded_models = max_loaded_models
        async with self._get_lock():
            while True:
                loaded = [s for s in self.slots.values() if s.state == "ready"]
                most = self.settings.max_loaded_models
                over = (sum(s.memory_bytes for s in loaded) > self.settings.max_loaded_memory
                        or (most and len(loaded) > most))
                idle = [s for s in loaded if s.in_use == 0]
                if not over or not idle:
                    return
                await self._unload(min(idle, key=lambda s: s.last_used or 0.0), "lru")

    def budget(self) -> dict:
        loaded = [s for s in self.slots.values() if s.state == "ready"]
        return {"max_loaded_memory": self.settings.max_loaded_memory,
                "max_loaded_models": self.settings.max_loaded_models,
                "loaded_memory": sum(s.memory_bytes for s in loaded), "loaded_models": len(loaded)}

    # -- loading and unloading --

    def _get_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def _begin_load(self, slot: Slot) -> asyncio.Task:
        if slot.task is None or slot.task.done():
            slot.task = asyncio.get_running_loop().create_task(self._load(slot))
            slot.task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved by waiters
        return slot.task

    async def _load(self, slot: Slot) -> None:
        async with self._get_lock():  # one load at a time, so room is made and RSS measured without overlap
            if slot.state in ("ready", "failed"):
                return
            slot.state, slot.error = "loading", None
            self._publish(slot)
            try:
                await self._make_room(slot, self._estimate(slot))
            except ModelUnavailable as exc:
                slot.state = "unloaded"
                self._publish(slot)
                raise exc
            t0 = time.monotonic()
            try:
                served = await asyncio.to_thread(self._build, slot.config)
            except Exception as exc:
                slot.state, slot.error = "failed", f"{exc}" or type(exc).__name__
                self._publish(slot)
                metrics.MODEL_LOAD_FAILURES.labels(slot.name).inc()
                log.error("model %s failed to load: %s", slot.name, slot.error)
                return
            took = time.monotonic() - t0
            slot.served, slot.state, slot.loaded_once, slot.load_seconds = served, "ready", True, took
            slot.memory_bytes = served.memory_bytes
            slot.last_used = time.time()
            ka = self._keep_alive(slot)  # a grace period, so the requests that waited for the load get it
            slot.expires_at = None if ka is None else slot.last_used + max(ka, 5.0)
            self._publish(slot)
            metrics.MODEL_LOAD_SECONDS.labels(slot.name).set(took)
            metrics.MODEL_VARIANT.labels(slot.name).info({"variant": served.variant, "task": slot.config.task})
            log.info("model %s ready: variant %s, %.1fs, %.0f MB", slot.name, served.variant, took,
                     served.memory_bytes / 2**20)
            # The measured size may exceed the estimate: trim other idle models to fit.
            try:
                await self._make_room(slot, 0)
            except ModelUnavailable as exc:
                log.warning("over the loaded-model budget: %s", exc)

    def _estimate(self, slot: Slot) -> int:
        """Bytes the load will likely add: its own last size, else that of a model from the same source."""
        if slot.memory_bytes:
            return slot.memory_bytes
        same = [s.memory_bytes for s in self.slots.values()
                if s.config.source == slot.config.source and s.config.variant == slot.config.variant]
        return max(same, default=0)

    async def _make_room(self, keep: Slot, extra: int) -> None:
        """Unload least recently used idle models until `keep` (+ `extra` bytes) fits the budget."""
        budget, most = self.settings.max_loaded_memory, self.settings.max_loaded_models
        while True:
            loaded = [s for s in self.slots.values() if s.state == "ready" and s is not keep]
            used = sum(s.memory_bytes for s in loaded) + extra + (keep.memory_bytes if keep.state == "ready" else 0)
            count = len(loaded) + 1
            if used <= budget and (not most or count <= most):
                return
            idle = [s for s in loaded if s.in_use == 0]
            if not idle:
                raise ModelUnavailable(
                    f"Not enough room to load '{keep.name}': the loaded models in use hold "
                    f"{used - extra} bytes of the {budget}-byte budget"
                    + (f" and the limit is {most} models" if most else "") + "; retry shortly.",
                    retry_after=10,
                )
            victim = min(idle, key=lambda s: s.last_used or 0.0)
            log.info("unloading %s (least recently used) to make room for %s", victim.name, keep.name)
            await self._unload(victim, "lru")

    async def _unload(self, slot: Slot, reason: str) -> None:
        """Caller holds the lock. Only an idle, ready model is unloaded."""
        if slot.state != "ready" or slot.in_use or slot.served is None:
            return
        served, slot.served, slot.state = slot.served, None, "unloading"
        self._publish(slot)
        try:
            await asyncio.to_thread(_close, served)
        finally:
            slot.state, slot.expires_at = "unloaded", None
            self._publish(slot)
            metrics.MODEL_UNLOADS.labels(slot.name, reason).inc()
            log.info("model %s unloaded (%s)", slot.name, reason)

    def _keep_alive(self, slot: Slot) -> float | None:
        """Seconds to stay after the last use; None: forever."""
        ka = slot.keep_alive if slot.keep_alive is not None else slot.config.keep_alive
        if ka is None:
            ka = None if slot.config.load == "start" else self.settings.keep_alive
        return None if ka is None or ka < 0 else ka

    def _arm_expiry(self, slot: Slot) -> None:
        ka = self._keep_alive(slot)
        slot.expires_at = None if ka is None else time.time() + ka
        if ka == 0:
            try:
                asyncio.get_running_loop().create_task(self._expire())
            except RuntimeError:
                pass

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await self._expire()
            except Exception:  # the reaper must survive
                log.exception("keep_alive reaper failed")

    async def _expire(self) -> None:
        now = time.time()
        due = [s for s in self.slots.values()
               if s.state == "ready" and not s.in_use and s.expires_at is not None and s.expires_at <= now]
        if not due:
            return
        async with self._get_lock():
            for slot in due:
                if slot.expires_at is not None and slot.expires_at <= time.time():
                    await self._unload(slot, "keep_alive")

    def _publish(self, slot: Slot) -> None:
        for state in STATES:
            metrics.MODEL_STATE.labels(slot.name, state).set(1 if slot.state == state else 0)
        metrics.MODEL_MEMORY_BYTES.labels(slot.name).set(slot.memory_bytes if slot.state == "ready" else 0)

    # -- building an engine (blocking, in a worker thread) --

    def _build_engine(self, cfg: ModelConfig) -> ServedModel:
        path, fmt, variant, quality = self._resolve(cfg)
        before = _resident()
        served = self._engine(cfg, path, fmt, variant, quality)
        served.memory_bytes = max(0, _resident() - before)
        return served

    def _engine(self, cfg: ModelConfig, path: Path, fmt: str, variant: str, quality: dict) -> ServedModel:
        if self.settings.engine_process and cfg.task == "chat":  # the engine runs in its core process
            from .core.client import EngineClient

            return ServedModel(cfg, EngineClient.connect(path, cfg, self.settings), variant, quality)
        if self.settings.engine_process and cfg.task == "embed" and cfg.name in self.settings.engine_cores:
            from .core.embed_client import EmbedClient  # tokenization here, batching in its core process

            return ServedModel(cfg, EmbedClient.connect(path, cfg, self.settings), variant, quality)
        threads = self.settings.threads
        if fmt == "onnx-genai":
            opts: dict[str, Any] = dict(max_num_seqs=cfg.max_num_seqs, max_model_len=cfg.max_model_len,
                                        threads=threads, max_batch_tokens=cfg.max_batch_tokens,
                                        max_queued=cfg.max_queued_requests)
            if _accepts("fairness"):
                opts["fairness"] = self.settings.fairness
            engine: LLMEngine | EmbeddingEngine = LLMEngine.from_dir(path, cfg.name, **opts)
        elif fmt == "onnx-encoder":
            engine = EmbeddingEngine.from_dir(
                path, cfg.name, threads=threads, max_batch_size=cfg.max_batch_size, max_wait_ms=cfg.max_wait_ms,
                max_queued=cfg.max_queued_inputs, fairness=self.settings.fairness,
            )
        elif fmt == "torch":
            # torch (CUDA) code is imported only where a GPU variant was chosen
            from .engines import torch_loader

            engine = torch_loader.load(path, cfg, threads)
        else:
            raise ModelLoadError(f"model {cfg.name}: artifact format {fmt!r} has no engine")
        if (cfg.task == "chat") != isinstance(engine, LLMEngine):
            engine.close()
            raise ModelLoadError(f"model {cfg.name}: task {cfg.task} does not match its artifact ({fmt})")
        return ServedModel(cfg, engine, variant, quality)

    def _resolve(self, cfg: ModelConfig) -> tuple[Path, str, str, dict]:
        direct = Path(cfg.source).expanduser()
        # An already-built artifact folder is served as it is.
        if (direct / "fmgate_torch.json").is_file():
            return direct, "torch", "prebuilt", {}
        if (direct / "genai_config.json").is_file():
            return direct, "onnx-genai", "prebuilt", {}
        if (direct / "fmgate_encoder.json").is_file():
            return direct, "onnx-encoder", "prebuilt", {}
        from model_store import Gate, ModelStore

        store = ModelStore(self.settings.home, gate=Gate(**self.settings.quality_gate.model_dump()))
        t0 = time.monotonic()
        art = store.load(cfg.source, task=cfg.task, variant=cfg.variant)
        metrics.MODEL_COMPRESS_SECONDS.labels(cfg.name).set(time.monotonic() - t0)
        return Path(art.path), art.format, art.variant, dict(art.quality or {})


def _accepts(option: str) -> bool:
    """Whether the generation scheduler takes this option (it gains `fairness` with the FairQueue)."""
    from .scheduler.generation import GenerationScheduler

    return option in inspect.signature(GenerationScheduler.__init__).parameters


def _resident() -> int:
    """Bytes resident in this process (plus CUDA memory held by torch, where it is in use)."""
    rss = psutil.Process().memory_info().rss
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        rss += torch.cuda.memory_reserved()
    return rss


def _close(served: ServedModel) -> None:
    served.engine.close()
    del served
    gc.collect()
    try:  # hand freed heap back to the OS, so RSS (and the next measurement) reflects the unload
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
