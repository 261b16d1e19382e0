"""Constraints from response_format, with the real SmolLM2 tokenizer: random walks always give valid JSON."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import numpy as np
import pytest

from gateway.engines.base import EngineError
from gateway.structured import allocate_bitmask, compile_response_format
from gateway.structured.grammar import close_objects
from tests.structured.conftest import allowed_ids, make_engine, walk

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": ["string", "null"]},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                    "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"], "additionalProperties": False},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "kind": {"anyOf": [{"const": "x"}, {"type": "integer"}]},
    },
    "required": ["name", "age", "tags", "address", "active", "kind"],
    "additionalProperties": False,
}


def schema_format(schema, strict=True):
    return {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": strict}}


def compile_now(engine, fmt):
    return asyncio.run(compile_response_format(engine, fmt))


def generate(engine, factory, seed):
    ids, finished = walk(factory.new(), engine.tokenizer, engine.runner.vocab_size, seed)
    assert finished, f"walk did not finish: {engine.tokenizer.decode(ids)[:300]!r}"
    return engine.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("seed", range(8))
def test_random_walks_validate_against_the_schema(engine, seed):
    factory = compile_now(engine, schema_format(PERSON))
    text = generate(engine, factory, seed)
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("seed", range(4))
def test_json_object_is_any_object(engine, seed):
    factory = compile_now(engine, {"type": "json_object"})
    assert isinstance(json.loads(generate(engine, factory, seed)), dict)


def test_text_and_none_need_no_constraint(engine):
    assert compile_now(engine, None) is None
    assert compile_now(engine, {"type": "text"}) is None


@pytest.mark.parametrize("fmt, words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}, "Invalid type"),
    (schema_format({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}), "missing"),
    (schema_format({"type": "string", "pattern": "(?<=a)b"}), "look-around"),
    (schema_format({"type": "string", "format": "no-such-format"}, strict=True), "no-such-format"),
    (schema_format([1, 2]), "must be an object"),
    ({"type": "json_schema"}, "json_schema"),
    ({"type": "xml"}, "xml"),
    ("json", "must be an object"),
])
def test_bad_schemas_raise_engine_error_naming_the_problem(engine, fmt, words):
    with pytest.raises(EngineError) as err:
        compile_now(engine, fmt)
    assert err.value.param == "response_format"
    assert words in str(err.value)


def test_strict_false_ignores_unsupported_keywords(engine):
    fmt = schema_format({"type": "object", "properties": {"d": {"type": "string", "format": "no-such-format"}},
                         "required": ["d"]}, strict=False)
    text = generate(engine, compile_now(engine, fmt), 1)
    assert isinstance(json.loads(text)["d"], str)


def test_compiled_once_per_schema_and_copies_are_independent(engine):
    async def both():
        return await asyncio.gather(compile_response_format(engine, schema_format(PERSON)),
                                    compile_response_format(engine, schema_format(PERSON)))
    a, b = asyncio.run(both())
    assert a is b
    c1, c2 = a.new(), a.new()
    assert c1.accept(engine.tokenizer.encode("{", add_special_tokens=False)[0])
    mask = allocate_bitmask(2, engine.runner.vocab_size)
    c1.fill_bitmask(mask, 0)
    c2.fill_bitmask(mask, 1)
    assert not np.array_equal(mask[0], mask[1])


def test_model_vocab_wider_than_tokenizer(tokenizer):
    wide = make_engine(tokenizer, vocab_size=len(tokenizer) + 100)
    factory = compile_now(wide, {"type": "json_object"})
    mask = allocate_bitmask(1, wide.runner.vocab_size)
    factory.new().fill_bitmask(mask, 0)
    allowed = allowed_ids(mask, 0, wide.runner.vocab_size)
    assert len(allowed) and allowed.max() < len(tokenizer)


def test_closing_the_object_finishes_and_bad_tokens_are_refused(engine):
    tok = engine.tokenizer
    c = compile_now(engine, schema_format({"type": "object", "properties": {"a": {"type": "integer"}},
                                           "required": ["a"], "additionalProperties": False})).new()
    assert not c.is_finished()
    for t in tok.encode('{"a": 12}', add_special_tokens=False):
        assert c.accept(t), c.error
    assert c.is_finished()
    c2 = compile_now(engine, {"type": "json_object"}).new()
    assert not c2.accept(tok.encode("hello", add_special_tokens=False)[0])


def test_open_objects_are_generated_without_extra_keys(engine):
    open_schema = {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "object", "properties": {
        "c": {"type": "boolean"}}, "required": ["c"]}}, "required": ["a", "b"]}
    closed = close_objects(open_schema)
    assert closed["additionalProperties"] is False and closed["properties"]["b"]["additionalProperties"] is False
    assert "additionalProperties" not in open_schema  # the caller's schema is not changed
    both = {"allOf": [{"properties": {"x": {}}}, {"properties": {"y": {}}}], "not": {"properties": {"z": {}}}}
    assert close_objects(both) == both
    for seed in range(3):
        value = json.loads(generate(engine, compile_now(engine, schema_format(open_schema, strict=False)), seed))
        jsonschema.validate(value, open_schema)
        assert set(value) == {"a", "b"} and set(value["b"]) == {"c"}
