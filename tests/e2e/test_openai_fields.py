"""Issue 12 over real HTTP with the openai SDK: logprobs (chat, streamed, completions echo), tool-call
shapes gathered and streamed, legacy functions, sampling fields, and 4xx for what cannot be served."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.conftest import CHAT_MODEL

pytestmark = pytest.mark.e2e
ASK = [{"role": "system", "content": "You are a helpful assistant."},
       {"role": "user", "content": "What is the capital of France?"}]
TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                   "required": ["city"], "additionalProperties": False}}}


def test_chat_logprobs_gathered_and_streamed_agree(server):
    client = server.client()
    kw = dict(model=CHAT_MODEL, messages=ASK, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    full = client.chat.completions.create(**kw)
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens or full.choices[0].finish_reason == "stop"
    assert "".join(e.token for e in content).startswith(full.choices[0].message.content[:3])
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3 and e.bytes
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert e.token == e.top_logprobs[0].token  # greedy picks the most likely token
    streamed = [c for c in client.chat.completions.create(**kw, stream=True) if c.choices and c.choices[0].logprobs]
    entries = [e for c in streamed for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 3)) for e in entries] == [(e.token, round(e.logprob, 3)) for e in content]


def test_completions_echo_logprobs_have_the_lm_eval_shape(server, chat_artifact):
    tok = AutoTokenizer.from_pretrained(chat_artifact.path)
    ctx, cont = tok.encode("The capital of France is"), tok.encode(" Paris")
    r = server.client().completions.create(model=CHAT_MODEL, prompt=[ctx + cont], max_tokens=1, temperature=0,
                                           logprobs=1, echo=True)
    lp = r.choices[0].logprobs
    n = len(ctx) + len(cont)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert all(len(t) == 1 for t in lp.top_logprobs[1:])
    # lm-evaluation-harness: the continuation's logprobs are token_logprobs[ctxlen:-1].
    assert len(lp.token_logprobs[len(ctx):-1]) == len(cont)
    assert r.choices[0].text.startswith("The capital of France is Paris")
    plain = server.client().completions.create(model=CHAT_MODEL, prompt="Hello", max_tokens=3, temperature=0,
                                               logprobs=2)
    assert len(plain.choices[0].logprobs.tokens) == plain.usage.completion_tokens


def test_tool_calls_gathered_streamed_and_round_trip(server):
    client = server.client()
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model=CHAT_MODEL, messages=ask, tools=[TOOL], tool_choice="required",
                                       temperature=0, max_tokens=48)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.id and call.type == "function" and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(model=CHAT_MODEL, messages=ask, tools=[TOOL], stream=True,
                                                tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                                temperature=0, max_tokens=48):
        delta = chunk.choices[0].delta
        for d in delta.tool_calls or []:
            slot = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            slot["id"] = slot["id"] or d.id
            slot["name"] += (d.function.name or "") if d.function else ""
            slot["arguments"] += (d.function.arguments or "") if d.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and calls[0]["id"] and calls[0]["name"] == "get_weather"
    assert isinstance(json.loads(calls[0]["arguments"])["city"], str)
    # The call and its result go back into the prompt; the model answers in text.
    follow = ask + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                    {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21}'}]
    again = client.chat.completions.create(model=CHAT_MODEL, messages=follow, tools=[TOOL], tool_choice="none",
                                           temperature=0, max_tokens=16)
    assert again.choices[0].message.content and not again.choices[0].message.tool_calls


def test_legacy_functions_map_onto_tools(server):
    r = httpx.post(server.base_url + "/v1/chat/completions", timeout=60, json={
        "model": CHAT_MODEL, "messages": [{"role": "user", "content": "Weather in Rome?"}], "max_tokens": 48,
        "temperature": 0, "functions": [TOOL["function"]], "function_call": {"name": "get_weather"}})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_logit_bias_and_penalties_are_applied(server, chat_artifact):
    tok = AutoTokenizer.from_pretrained(chat_artifact.path)
    forced = tok.encode(" yes")[0]
    client = server.client()
    r = client.chat.completions.create(model=CHAT_MODEL, messages=ASK, temperature=0, max_tokens=5,
                                       logit_bias={str(forced): 100})
    assert r.choices[0].message.content == tok.decode([forced] * 5)
    # A strong frequency penalty forbids repeating the forced token: the text changes.
    p = client.chat.completions.create(model=CHAT_MODEL, messages=ASK, temperature=0, max_tokens=5,
                                       logit_bias={str(forced): 3}, frequency_penalty=2, presence_penalty=2)
    assert p.choices[0].message.content != r.choices[0].message.content
    extra = client.chat.completions.create(model=CHAT_MODEL, messages=ASK, temperature=0.8, max_tokens=5, seed=3,
                                           extra_body={"top_k": 1, "min_p": 0.5, "repetition_penalty": 1.1})
    greedy = client.chat.completions.create(model=CHAT_MODEL, messages=ASK, temperature=0, max_tokens=5,
                                            extra_body={"repetition_penalty": 1.1})
    assert extra.choices[0].message.content == greedy.choices[0].message.content  # top_k 1 is greedy


@pytest.mark.parametrize("extra,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"tools": [TOOL], "functions": [TOOL["function"]]}, "functions"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"response_format": {"type": "json_object"}, "tools": [TOOL]}, "response_format"),
    ({"audio": {"voice": "alloy"}}, "audio"),
])
def test_what_cannot_be_served_is_a_4xx_naming_the_field(server, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model=CHAT_MODEL, messages=ASK, max_tokens=4, **extra)
    err = e.value.body
    assert (err["param"] or "").split(".")[0] == param, err
    assert err["type"] == "invalid_request_error"


def test_request_deadline_header(server):
    body = {"model": CHAT_MODEL, "messages": ASK, "max_tokens": 1000, "temperature": 0.8, "seed": 1,
            "logit_bias": {"0": -100, "1": -100, "2": -100}}  # no EOS: it cannot finish in time
    headers = {"X-Request-Timeout": "0.5"}
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body, headers=headers, timeout=120)
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "deadline_exceeded"
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json={**body, "stream": True},
                      headers=headers, timeout=120) as s:
        lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    if s.status_code == 200:  # the first token came in time: the deadline ends the stream with an error event
        assert json.loads(lines[-1][6:])["error"]["code"] == "deadline_exceeded"
    else:
        assert s.status_code == 504
    bad = httpx.post(server.base_url + "/v1/chat/completions", json=body, headers={"X-Request-Timeout": "soon"},
                     timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Request-Timeout"
