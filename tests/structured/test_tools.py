"""Tool definitions, tool_choice grammars (random walks with the real tokenizer) and the streaming parser."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

from gateway.engines.base import EngineError
from gateway.structured import ToolCallParser, compile_tools
from tests.structured.conftest import walk

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city {with braces} and \"quotes\".",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 16},
        "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
NOARGS = {"type": "function", "function": {"name": "now"}}
TOOLS = [WEATHER, ADD, NOARGS]
PARAMS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in TOOLS}


def run_walk(engine, choice, seed, parallel=True, tools=TOOLS):
    factory = asyncio.run(compile_tools(engine, tools, choice, parallel_tool_calls=parallel))
    ids, finished = walk(factory.new(), engine.tokenizer, engine.runner.vocab_size, seed)
    assert finished, engine.tokenizer.decode(ids)[:300]
    return engine.tokenizer.decode(ids, skip_special_tokens=True)


def _parse(text):
    p = ToolCallParser()
    p.feed(text)
    return p.finish()


@pytest.mark.parametrize("seed", range(6))
def test_required_gives_calls_whose_arguments_validate(engine, seed):
    content, calls = _parse(run_walk(engine, "required", seed))
    assert content is None and calls
    for call in calls:
        assert call["id"].startswith("call_") and call["type"] == "function"
        jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMS[call["function"]["name"]])


@pytest.mark.parametrize("seed", range(4))
def test_named_choice_calls_that_function_once_without_parallel(engine, seed):
    choice = {"type": "function", "function": {"name": "add"}}
    text = run_walk(engine, choice, seed, parallel=False)
    content, calls = _parse(text)
    assert content is None and len(calls) == 1 and calls[0]["function"]["name"] == "add"
    jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), PARAMS["add"])


def test_auto_allows_text_or_a_constrained_call(engine):
    factory = asyncio.run(compile_tools(engine, TOOLS, "auto"))
    tok = engine.tokenizer
    text = factory.new()
    assert all(text.accept(t) for t in tok.encode("It is sunny, no call needed.", add_special_tokens=False))
    call = factory.new()
    ok = [call.accept(t) for t in tok.encode('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", '
                                             '"unit": "c"}}</tool_call>', add_special_tokens=False)]
    assert all(ok), call.error
    bad = factory.new()
    assert not all(bad.accept(t) for t in tok.encode('<tool_call>{"name": "missing"', add_special_tokens=False))
    for seed in range(4):
        content, calls = _parse(run_walk(engine, "auto", seed))
        for c in calls:
            jsonschema.validate(json.loads(c["function"]["arguments"]), PARAMS[c["function"]["name"]])


def test_none_and_no_tools_are_unconstrained(engine):
    assert asyncio.run(compile_tools(engine, TOOLS, "none")) is None
    assert asyncio.run(compile_tools(engine, None, None)) is None
    assert asyncio.run(compile_tools(engine, [], "none")) is None


@pytest.mark.parametrize("tools, choice, param", [
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    (TOOLS, "sometimes", "tool_choice"),
    ([], "required", "tool_choice"),
    ([{"type": "function", "function": {"name": "bad name!"}}], "auto", "tools[0].function.name"),
    ([WEATHER, WEATHER], "auto", "tools[1]"),
    ([{"type": "retrieval"}], "auto", "tools[0]"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], "auto", "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}], "auto", "tools"),
])
def test_bad_tools_and_choices_raise_engine_error(engine, tools, choice, param):
    with pytest.raises(EngineError) as err:
        asyncio.run(compile_tools(engine, tools, choice))
    assert err.value.param == param


# -- the streaming parser --

REPLIES = [
    "Just text, with a < sign and <tool and </tool_call> bits.",
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}</tool_call>',
    '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n'
    '<tool_call>{"name": "now", "arguments": {}}</tool_call>',
    'Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "}</tool_call>{", "unit": "f"}}'
    '</tool_call>',
    '<tool_call>{"arguments": {"a": 1}, "name": "add"}</tool_call>',  # other key order: parsed whole
    '<tool_call>not json</tool_call>',  # given back as text
    '<tool_call>{"name": "add", "arguments": {"a": 1, "b"',  # cut by max_tokens
    '<tool_call>{"name": "add", "arguments": {"a": 1}}',  # cut right before the closing tag
    "  padded text  \n",
]


def gather(chunks):
    """Feed chunks; return (content from deltas, calls rebuilt from deltas, finish())."""
    p = ToolCallParser()
    deltas = [d for c in chunks for d in p.feed(c)] + p.flush()
    content = "".join(d.get("content", "") for d in deltas) or None
    calls: list[dict] = []
    for d in deltas:
        for tc in d.get("tool_calls", []):
            if "id" in tc:
                assert tc["index"] == len(calls) and tc["type"] == "function"
                calls.append({"id": tc["id"], "type": "function", "function": dict(tc["function"])})
            else:
                calls[tc["index"]]["function"]["arguments"] += tc["function"]["arguments"]
    return content, calls, p.finish()


def without_ids(calls):
    return [c["function"] for c in calls]


@pytest.mark.parametrize("reply", REPLIES)
def test_parser_gives_the_same_result_at_every_chunk_boundary(reply):
    whole_content, whole_calls, finish = gather([reply])
    assert finish == (whole_content, whole_calls)
    for i in range(len(reply) + 1):
        content, calls, _ = gather([reply[:i], reply[i:]])
        assert (content, without_ids(calls)) == (whole_content, without_ids(whole_calls)), i
    content, calls, _ = gather(list(reply))
    assert (content, without_ids(calls)) == (whole_content, without_ids(whole_calls))


def test_parser_results():
    assert gather([REPLIES[0]])[0] == REPLIES[0]
    content, calls, _ = gather([REPLIES[2]])
    assert content is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("add", {"a": 1, "b": 2}), ("now", {})]
    assert len({c["id"] for c in calls}) == 2
    content, calls, _ = gather([REPLIES[3]])
    assert content == "Let me check."
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "}</tool_call>{", "unit": "f"}
    assert gather([REPLIES[4]])[1][0]["function"] == {"name": "add", "arguments": '{"a": 1}'}
    assert gather([REPLIES[5]])[0] == REPLIES[5] and not gather([REPLIES[5]])[1]
    assert gather([REPLIES[6]])[1][0]["function"]["arguments"] == '{"a": 1, "b"'
    assert gather([REPLIES[7]])[1][0]["function"]["arguments"] == '{"a": 1}'
    assert gather([REPLIES[8]])[0] == REPLIES[8]


def test_arguments_stream_before_the_call_closes():
    p = ToolCallParser()
    deltas = p.feed('<tool_call>{"name": "get_weather", "arguments": {"city": "Os')
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert deltas[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Os'
