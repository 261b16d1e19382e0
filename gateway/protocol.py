"""Request and response models with OpenAI's field names. Validation here is the first line of defence:
every bad value becomes a 400 in OpenAI's shape before any engine sees it.

Every list is bounded. The bounds come from the defaults of `Settings.limits`, the single source of
limits; an operator may tighten a limit (the route checks the configured value) but never loosen it past
what the published schema says (Limits refuses that)."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .settings import Limits

log = logging.getLogger("fmgate.api")

LIMITS = Limits()  # the schema's bounds: the defaults, which configured limits may only tighten
_MAX_STR = LIMITS.max_body_bytes
MAX_TOP_LOGPROBS = 20  # OpenAI's own caps
MAX_COMPLETION_LOGPROBS = 5

Str256 = Annotated[str, Field(max_length=256)]
StopList = Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(max_length=LIMITS.max_stop)]
LogitBias = Annotated[dict[Annotated[str, Field(max_length=16)], Annotated[float, Field(ge=-100, le=100)]],
                      Field(max_length=LIMITS.max_logit_bias)]
# Seconds (a number, or a string such as "300") or a duration ("5m", "1h30m", "90s"); 0: unload once idle;
# negative: stay loaded. Parsed by gateway.api.params.keep_alive.
KeepAlive = (Annotated[float, Field(ge=-1e9, le=1e9, allow_inf_nan=False)]
             | Annotated[str, Field(min_length=1, max_length=32)])


class _Request(BaseModel):
    # Unknown fields are accepted and logged, as OpenAI clients send newer fields all the time.
    model_config = ConfigDict(extra="allow")

    def unknown_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: Annotated[str, Field(max_length=_MAX_STR)]


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Annotated[str, Field(max_length=256)]
    arguments: Annotated[str, Field(max_length=_MAX_STR)] = ""


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: Annotated[str, Field(max_length=256)] = ""
    type: Literal["function"] = "function"
    function: FunctionCall


Content = (Annotated[str, Field(max_length=_MAX_STR)]
           | Annotated[list[TextPart], Field(max_length=LIMITS.max_content_parts)] | None)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Content = None
    name: Str256 | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=LIMITS.max_tools)] | None = None
    tool_call_id: Str256 | None = None
    function_call: FunctionCall | None = None  # legacy assistant turn

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def as_dict(self) -> dict:
        """The OpenAI-shaped dict the chat template renders (developer -> system, legacy function -> tool)."""
        role = {"developer": "system", "function": "tool"}.get(self.role, self.role)
        out: dict[str, Any] = {"role": role, "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        calls = [c.model_dump() for c in self.tool_calls or []]
        if self.function_call is not None:
            calls.append({"id": "call_0", "type": "function", "function": self.function_call.model_dump()})
        if calls:
            out["tool_calls"] = calls
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        elif self.role == "function" and self.name:
            out["tool_call_id"] = self.name
        return out


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: Annotated[str, Field(max_length=_MAX_STR)] | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: Annotated[str, Field(min_length=1, max_length=64)]


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: Annotated[str, Field(min_length=1, max_length=64)] = "response"
    description: Str256 | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def as_dict(self) -> dict:
        return self.model_dump(by_alias=True, exclude_none=True)


class _Sampling(_Request):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=LIMITS.max_n)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Annotated[str, Field(min_length=1, max_length=256)] | StopList | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: LogitBias | None = None
    user: Str256 | None = None
    # vLLM's extra sampling fields.
    top_k: Annotated[int, Field(ge=-1, le=1_000_000)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None
    # Ollama's field: how long the model stays loaded after this request (gateway.api.params.keep_alive).
    keep_alive: KeepAlive | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def refused(self) -> tuple[str, str] | None:
        """(param, message) for a value this server does not implement, else None."""
        return None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=LIMITS.max_messages)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: Annotated[list[Tool], Field(max_length=LIMITS.max_tools)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: Annotated[list[FunctionDef], Field(max_length=LIMITS.max_tools)] | None = None
    function_call: Literal["none", "auto"] | NamedFunction | None = None
    response_format: ResponseFormat | None = None
    # Fields OpenAI defines that do not apply to a self-hosted text model.
    metadata: Annotated[dict[Str256, Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None = None
    store: bool | None = None
    service_tier: Str256 | None = None
    modalities: Annotated[list[Str256], Field(max_length=4)] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: Str256 | None = None
    verbosity: Str256 | None = None
    web_search_options: dict[str, Any] | None = None
    prompt_cache_key: Str256 | None = None
    safety_identifier: Str256 | None = None

    def refused(self) -> tuple[str, str] | None:
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true."
        if self.tools and self.functions:
            return "functions", "Send either tools or the legacy functions, not both."
        if self.modalities and set(self.modalities) - {"text"}:
            return "modalities", "Only the text modality is served."
        if self.audio is not None:
            return "audio", "Audio output is not served by this server."
        if self.prediction is not None:
            return "prediction", "Predicted outputs are not supported by this server."
        if self.web_search_options is not None:
            return "web_search_options", "Web search is not available on this server."
        if self.store:
            return "store", "This server does not store completions; omit store or set it to false."
        if self.reasoning_effort is not None:
            return "reasoning_effort", "The served models do not reason; omit reasoning_effort."
        return super().refused()

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def all_tools(self) -> list[dict] | None:
        """tools, or the legacy functions mapped onto tools."""
        if self.tools:
            return [t.model_dump(exclude_none=True) for t in self.tools]
        if self.functions:
            return [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in self.functions]
        return None

    def choice(self) -> Any:
        """tool_choice, or the legacy function_call mapped onto it."""
        if self.tool_choice is not None:
            c = self.tool_choice
        elif self.functions and self.function_call is not None:
            c = self.function_call
            if isinstance(c, NamedFunction):
                return {"type": "function", "function": {"name": c.name}}
        else:
            return None
        return c if isinstance(c, str) else c.model_dump()


TokenIds = Annotated[list[Annotated[int, Field(ge=0, lt=2**31)]],
                     Field(min_length=1, max_length=LIMITS.max_prompt_tokens)]
Text = Annotated[str, Field(min_length=1, max_length=_MAX_STR)]


def _texts_or_tokens(most: int) -> Any:
    """OpenAI's four input shapes: a string, strings, token ids, lists of token ids; at most `most` items."""
    return (Text | Annotated[list[Text], Field(min_length=1, max_length=most)] | TokenIds
            | Annotated[list[TokenIds], Field(min_length=1, max_length=most)])


class CompletionRequest(_Sampling):
    prompt: _texts_or_tokens(LIMITS.max_prompts)
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    suffix: Annotated[str, Field(max_length=_MAX_STR)] | None = None
    best_of: Annotated[int, Field(ge=1, le=LIMITS.max_n)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for legacy completions

    def refused(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix", "suffix (fill-in-the-middle) is not supported by the served models."
        if self.best_of not in (None, 1, self.n):
            return "best_of", "best_of is not supported; use n."
        return super().refused()

    def prompts(self) -> list[str | list[int]]:
        return as_batch(self.prompt)


class EmbeddingRequest(_Request):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: _texts_or_tokens(LIMITS.max_embedding_inputs)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: Str256 | None = None
    keep_alive: KeepAlive | None = None  # as for chat

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
