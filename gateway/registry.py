"""The served models: resolve each through the model store, start its engine, and look it up by name."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import metrics
from .engines.embedder import EmbeddingEngine
from .engines.llm import LLMEngine
from .settings import ModelConfig, Settings

log = logging.getLogger("fmgate.registry")


@dataclass
class ServedModel:
    config: ModelConfig
    engine: LLMEngine | EmbeddingEngine
    variant: str
    quality: dict[str, Any] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def task(self) -> str:
        return self.config.task


class ModelLoadError(Exception):
    pass


class Registry:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.models: dict[str, ServedModel] = {}
        self.errors: dict[str, str] = {}

    @property
    def loaded(self) -> bool:
        return all(m.name in self.models for m in self.settings.models)

    def get(self, name: str) -> ServedModel | None:
        return self.models.get(name)

    def load_all(self) -> None:
        """Blocking; run it off the event loop. A model that fails is reported and the rest still load."""
        for cfg in self.settings.models:
            t0 = time.monotonic()
            try:
                self.models[cfg.name] = self._load(cfg)
            except Exception as exc:
                self.errors[cfg.name] = str(exc)
                log.error("model %s failed to load: %s", cfg.name, exc)
                continue
            self.errors.pop(cfg.name, None)
            took = time.monotonic() - t0
            served = self.models[cfg.name]
            metrics.MODEL_LOAD_SECONDS.labels(cfg.name).set(took)
            metrics.MODEL_VARIANT.labels(cfg.name).info({"variant": served.variant, "task": cfg.task})
            log.info("model %s ready: variant %s, %.1fs", cfg.name, served.variant, took)

    def _load(self, cfg: ModelConfig) -> ServedModel:
        path, fmt, variant, quality = self._resolve(cfg)
        threads = self.settings.threads
        if fmt == "onnx-genai":
            engine: LLMEngine | EmbeddingEngine = LLMEngine.from_dir(
                path, cfg.name, max_num_seqs=cfg.max_num_seqs, max_model_len=cfg.max_model_len, threads=threads,
                max_batch_tokens=cfg.max_batch_tokens, max_queued=cfg.max_queued,
            )
        elif fmt == "onnx-encoder":
            engine = EmbeddingEngine.from_dir(
                path, cfg.name, threads=threads, max_batch_size=cfg.max_batch_size, max_wait_ms=cfg.max_wait_ms,
                max_queued=cfg.max_queued * 32,
            )
        elif fmt == "torch":
            from .engines import torch_cuda  # CUDA code is imported only where a GPU variant was chosen

            engine = torch_cuda.load(path, cfg, threads)
        else:
            raise ModelLoadError(f"model {cfg.name}: artifact format {fmt!r} has no engine")
        if (cfg.task == "chat") != isinstance(engine, LLMEngine):
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

    def close(self) -> None:
        for m in self.models.values():
            m.engine.close()
