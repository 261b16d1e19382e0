"""render_chat with SmolLM2's own template, which has no tool support: the documented fallback."""

from __future__ import annotations

import json

import pytest

from gateway.engines.base import EngineError
from gateway.structured import render_chat, template_handles_tools
from tests.structured.test_tools import WEATHER


def text_of(tokenizer, ids):
    return tokenizer.decode(ids)


def test_smollm2_template_has_no_tool_support(tokenizer):
    assert not template_handles_tools(tokenizer)


def test_plain_messages_render_exactly_as_the_template_does(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    assert render_chat(tokenizer, msgs, None) == tokenizer.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=True)
    user_only = [{"role": "user", "content": "Hi"}]
    assert render_chat(tokenizer, user_only, None) == tokenizer.apply_chat_template(
        user_only, add_generation_prompt=True, tokenize=True)


def test_tools_calls_results_names_and_parts_are_all_rendered(tokenizer):
    msgs = [
        {"role": "developer", "content": "Use tools."},
        {"role": "user", "name": "alice", "content": [{"type": "text", "text": "Weather in "},
                                                      {"type": "text", "text": "Oslo?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"},
    ]
    text = text_of(tokenizer, render_chat(tokenizer, msgs, [WEATHER]))
    assert text.startswith("<|im_start|>system\nUse tools.")
    assert '"name": "get_weather"' in text and "<tool_call>{\"name\": ..." not in text
    assert "alice: Weather in Oslo?" in text
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}</tool_call>' in text
    assert ('<tool_response>{"name": "get_weather", "tool_call_id": "call_1", "content": "-3 C"}'
            '</tool_response>') in text
    assert text.endswith("<|im_start|>assistant\n")
    assert "You are a helpful AI assistant named SmolLM" not in text


def test_two_tool_results_share_one_turn(tokenizer):
    msgs = [{"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "a", "content": "1"},
            {"role": "tool", "tool_call_id": "b", "content": [{"type": "text", "text": "2"}]}]
    text = text_of(tokenizer, render_chat(tokenizer, msgs, None))
    assert text.count("<|im_start|>user") == 2
    assert json.dumps({"name": "g", "tool_call_id": "b", "content": "2"}) in text


@pytest.mark.parametrize("msgs", [
    [],
    [{"role": "wizard", "content": "x"}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
    [{"role": "user", "content": 5}],
    [{"role": "tool", "content": "result without an id"}],
    [{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}],
    [{"role": "assistant", "tool_calls": [{"id": "x", "function": {}}]}],
])
def test_unsupported_shapes_raise_instead_of_being_dropped(tokenizer, msgs):
    with pytest.raises(EngineError) as err:
        render_chat(tokenizer, msgs, None)
    assert err.value.param == "messages"
