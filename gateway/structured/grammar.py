"""Grammar-constrained decoding with llguidance: one matcher per sequence, compiled off the engine thread.

Why llguidance rather than xgrammar (measured here, `python -m bench.structured engines`): a ~50-property
schema compiles in ~4 ms against ~100 ms, and its per-step mask has no multi-millisecond outliers.
"""

from __future__ import annotations

import asyncio
import json
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import llguidance
import llguidance.hf
import numpy as np

from ..engines.base import EngineError

# Fixed separators and no free whitespace: a small model cannot wander off into endless newlines.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 256

_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fmgate-grammar")
_lock = threading.Lock()
_tokenizers: weakref.WeakKeyDictionary[Any, llguidance.LLTokenizer] = weakref.WeakKeyDictionary()
_cache: OrderedDict[tuple, Future] = OrderedDict()


def allocate_bitmask(n: int, vocab_size: int) -> np.ndarray:
    """int32 [n, ceil(vocab/32)], every token allowed; bit set = allowed (llguidance's layout)."""
    return np.full((n, (vocab_size + 31) // 32), -1, dtype=np.int32)


class Constraint:
    """One sequence's grammar state. Not thread-safe: only the engine thread touches it."""

    def __init__(self, matcher: llguidance.LLMatcher, words: int, grammar: str = ""):
        self._m = matcher
        self._words = words
        self.grammar = grammar  # its source, so another process can rebuild it (gateway/core)

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        """Allowed next tokens into bitmask[row]; words past the grammar's vocabulary are cleared."""
        v = bitmask[row]
        if not v.flags["C_CONTIGUOUS"] or v.dtype != np.int32 or v.shape[0] < self._words:
            raise ValueError("bitmask row must be contiguous int32 of at least ceil(vocab/32) words")
        self._m.unsafe_compute_mask_ptr(v.ctypes.data, self._words * 4)
        if v.shape[0] > self._words:
            v[self._words:] = 0

    def accept(self, token: int) -> bool:
        """False when the token breaks the grammar (the sequence should end with an error)."""
        return self._m.consume_token(int(token))

    def is_finished(self) -> bool:
        """True once the grammar can produce nothing more (e.g. the JSON object is closed, or EOS taken)."""
        return self._m.is_stopped()

    @property
    def error(self) -> str:
        return self._m.get_error() if self._m.is_error() else ""


class ConstraintFactory:
    """A compiled grammar; `new()` is a cheap copy (microseconds) of a warmed template matcher."""

    def __init__(self, template: llguidance.LLMatcher, vocab_size: int, grammar: str):
        self._template = template
        self._words = (vocab_size + 31) // 32
        self.vocab_size = vocab_size
        self.grammar = grammar

    def new(self) -> Constraint:
        return Constraint(self._template.deep_copy(), self._words, self.grammar)


def _eos_ids(engine) -> list[int]:
    eos = getattr(getattr(engine, "scheduler", None), "eos", None)
    if eos:
        return sorted(int(t) for t in eos)
    tid = engine.tokenizer.eos_token_id
    return [int(tid)] if tid is not None else []


def _vocab_size(engine, param: str) -> int:
    """The model's logits width; the tokenizer may know fewer ids (padding rows) but never more."""
    model = int(engine.runner.vocab_size)
    known = len(engine.tokenizer)
    if known > model:
        raise EngineError(f"tokenizer has {known} ids but the model only {model}; cannot constrain output",
                          param=param)
    return model


def _ll_tokenizer(engine, param: str) -> llguidance.LLTokenizer:
    """The llguidance view of the engine's tokenizer (~1 s to build), kept as long as the tokenizer lives."""
    tok = engine.tokenizer
    with _lock:
        lt = _tokenizers.get(tok)
    if lt is None:
        lt = llguidance.hf.from_tokenizer(tok, n_vocab=_vocab_size(engine, param), eos_token=_eos_ids(engine))
        with _lock:
            _tokenizers[tok] = lt
    return lt


def _build(engine, grammar: str, param: str) -> ConstraintFactory:
    lt = _ll_tokenizer(engine, param)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, lt)
    if is_error:
        raise EngineError(f"Invalid or unsupported schema: {messages[0] if messages else 'unknown error'}",
                          param=param, code="invalid_schema")
    matcher = llguidance.LLMatcher(lt, grammar, log_level=0)
    if matcher.is_error():
        raise EngineError(f"Invalid or unsupported schema: {matcher.get_error()}", param=param,
                          code="invalid_schema")
    # Warm the lexer on the first mask here, so copies start fast on the engine thread.
    vocab = lt.vocab_size
    matcher.compute_bitmask()
    return ConstraintFactory(matcher, vocab, grammar)


async def compile_grammar(engine, grammar: str, param: str) -> ConstraintFactory:
    """Compile in the grammar thread (never the event loop or the engine thread), cached by grammar text."""
    key = (engine.tokenizer, grammar)  # holds the tokenizer, so its id cannot be reused while cached
    with _lock:
        fut = _cache.get(key)
        if fut is not None:
            _cache.move_to_end(key)
        else:
            fut = _executor.submit(_build, engine, grammar, param)
            _cache[key] = fut
            while len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
    try:
        return await asyncio.wrap_future(fut)
    except BaseException:
        with _lock:
            if _cache.get(key) is fut and fut.done():
                del _cache[key]  # errors are not cached: a later identical request recompiles
        raise


_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SUBSCHEMA_ONE = ("items", "additionalProperties", "contains", "if", "then", "else")


def close_objects(schema: Any) -> Any:
    """Objects that list `properties` but say nothing of others get `additionalProperties: false`.

    Output stays valid for the schema as given (no extra keys is one valid choice); without this a small
    model keeps inventing keys until max_tokens. allOf branches and `not` are left alone (closing them
    would change what validates)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out and not any(k in out for k in ("additionalProperties", "unevaluatedProperties",
                                                          "patternProperties")):
        out["additionalProperties"] = False
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: close_objects(v) for k, v in out[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [close_objects(v) for v in out[key]]
    for key in _SUBSCHEMA_ONE:
        if isinstance(out.get(key), dict):
            out[key] = close_objects(out[key])
    return out


def json_grammar(schema: Any, strict: bool, param: str) -> str:
    """llguidance grammar text for a JSON schema. strict: unsupported keywords are errors, not ignored."""
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise EngineError("The JSON schema must be an object.", param=param, code="invalid_schema")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(close_objects(schema)), overrides={**JSON_OPTIONS, "lenient": not strict})
    except (ValueError, TypeError) as exc:
        raise EngineError(f"Invalid JSON schema: {exc}", param=param, code="invalid_schema") from exc


async def compile_response_format(engine, response_format: dict | None) -> ConstraintFactory | None:
    """OpenAI `response_format` -> a factory (None for text). Bad schemas raise EngineError(param="response_format")."""
    param = "response_format"
    if response_format is None:
        return None
    if hasattr(response_format, "model_dump"):
        response_format = response_format.model_dump(exclude_none=True)
    if not isinstance(response_format, dict):
        raise EngineError("response_format must be an object.", param=param)
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return await compile_grammar(engine, json_grammar({"type": "object"}, True, param), param)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise EngineError("response_format.json_schema must be an object with a 'schema'.", param=param)
        schema = spec.get("schema", {})
        if not isinstance(spec.get("name", ""), str):
            raise EngineError("response_format.json_schema.name must be a string.", param=param)
        strict = bool(spec.get("strict") or False)
        return await compile_grammar(engine, json_grammar(schema, strict, param), param)
    raise EngineError(f"Unsupported response_format type {kind!r}; use text, json_object or json_schema.",
                      param=param)
