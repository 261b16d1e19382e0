"""Request and response models with OpenAI's field names. Validation here is the first line of defence:
every bad value becomes a 400 in OpenAI's shape before any engine sees it."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("fmgate.api")

# Bounds that hold whatever the settings say; the configurable, tighter ones live in Settings.limits.
_MAX_STR = 4_000_000
StopList = Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(max_length=64)]


class _Request(BaseModel):
    # Unknown fields are accepted and logged, as OpenAI clients send newer fields all the time.
    model_config = ConfigDict(extra="allow")

    def unknown_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: Annotated[str, Field(max_length=_MAX_STR)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str, Field(max_length=_MAX_STR)] | Annotated[list[TextPart], Field(max_length=256)] | None = None
    name: Annotated[str, Field(max_length=256)] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Sampling(_Request):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Annotated[str, Field(min_length=1, max_length=256)] | StopList | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[str, float] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for a value this server does not implement, else None."""
        if self.presence_penalty:
            return "presence_penalty", "presence_penalty is not supported; omit it or use 0."
        if self.frequency_penalty:
            return "frequency_penalty", "frequency_penalty is not supported; omit it or use 0."
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported."
        return None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.logprobs or self.top_logprobs:
            return "logprobs", "logprobs are not supported by this server."
        if self.tools:
            return "tools", "Tool calling is not supported by this model."
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return "response_format", "Only response_format {'type': 'text'} is supported."
        return super().unsupported()

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


TokenIds = Annotated[list[Annotated[int, Field(ge=0, lt=2**31)]], Field(min_length=1)]
Text = Annotated[str, Field(min_length=1, max_length=_MAX_STR)]
# OpenAI's four input shapes: a string, strings, token ids, lists of token ids.
TextsOrTokens = Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]


class CompletionRequest(_Sampling):
    prompt: TextsOrTokens
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for legacy completions

    def unsupported(self) -> tuple[str, str] | None:
        if self.logprobs:
            return "logprobs", "logprobs are not supported by this server."
        if self.suffix:
            return "suffix", "suffix is not supported by this model."
        if self.echo:
            return "echo", "echo is not supported by this server."
        if self.best_of not in (None, 1, self.n):
            return "best_of", "best_of is not supported."
        return super().unsupported()

    def prompts(self) -> list[str | list[int]]:
        return as_batch(self.prompt)


class EmbeddingRequest(_Request):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: TextsOrTokens
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None

    def batch(self) -> list[str] | list[list[int]]:
        return as_batch(self.input)


def as_batch(x: Any) -> list:
    """One item (a string or one token-id list) becomes a batch of one."""
    return [x] if isinstance(x, str) or (x and isinstance(x[0], int)) else list(x)


# -- responses --

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
