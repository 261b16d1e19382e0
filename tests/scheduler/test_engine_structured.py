"""Grammar-constrained rows inside the continuous batch (real llguidance constraints, real SmolLM2), and
tenants taking turns in the waiting queue."""

from __future__ import annotations

import asyncio
import json
import queue

import jsonschema
import pytest

from gateway.engines.base import SamplingParams
from gateway.engines.llm import LLMEngine
from gateway.scheduler import fair
from gateway.structured import compile_response_format
from tests.scheduler._neighbour import neighbour

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def engine(chat_artifact):
    eng = LLMEngine.from_dir(chat_artifact.path, "structured", max_num_seqs=4, max_batch_tokens=64, threads=2)
    yield eng
    eng.close()


def ask(engine, text):
    return engine.chat_prompt([{"role": "user", "content": text}])


def collect(engine, requests):
    async def run():
        out = {i: [] for i in range(len(requests))}
        async for i, ev in engine.stream_many(requests):
            out[i].append(ev)
        return out

    return asyncio.run(run())


def test_constrained_and_plain_rows_share_a_batch(engine):
    factory = asyncio.run(compile_response_format(engine, FORMAT))
    q = ask(engine, "Give me a person as JSON.")
    plain_q = ask(engine, "Name three colours.")
    with neighbour(engine):  # see _neighbour: a lone row may take another kernel path
        alone = collect(engine, [(plain_q, SamplingParams(max_tokens=30, temperature=0))])[0]
        out = collect(engine, [
            (q, SamplingParams(max_tokens=60, temperature=0, constraint=factory.new())),
            (q, SamplingParams(max_tokens=60, temperature=0.9, seed=3, constraint=factory.new(), logprobs=1)),
            (plain_q, SamplingParams(max_tokens=30, temperature=0)),
        ])
    for i in (0, 1):
        evs = out[i]
        assert evs[-1].finish_reason == "stop", evs[-1]
        jsonschema.validate(json.loads("".join(e.text for e in evs)), SCHEMA)
    assert all(e.logprobs is not None and len(e.logprobs) == len(e.tokens) for e in out[1])
    # The unconstrained row is untouched by its constrained neighbours.
    assert [t for e in out[2] for t in e.tokens] == [t for e in alone for t in e.tokens]


def test_a_constrained_reply_cut_by_max_tokens_is_length_and_left_open(engine):
    factory = asyncio.run(compile_response_format(engine, FORMAT))
    evs = collect(engine, [(ask(engine, "Give me a person as JSON."),
                            SamplingParams(max_tokens=3, temperature=0, constraint=factory.new()))])[0]
    text = "".join(e.text for e in evs)
    assert evs[-1].finish_reason == "length" and evs[-1].completion_tokens == 3
    assert text.startswith("{") and not text.endswith("}")


def test_tenants_take_turns_in_the_waiting_queue(chat_artifact, monkeypatch):
    """One slot; tenant a queues four long requests, then b one: b starts before a's last ones
    (first come, first served would start it last)."""
    monkeypatch.setattr(fair, "_default_policy", "fair")  # whatever an earlier test's server set
    eng = LLMEngine.from_dir(chat_artifact.path, "fair", max_num_seqs=1, threads=2)
    try:
        starts: queue.Queue = queue.Queue()
        p = ask(eng, "Count to one hundred.")
        seqs = {}
        for name in ("a1", "a2", "a3", "a4", "b1"):
            seqs[name] = eng.submit(p, SamplingParams(max_tokens=400, temperature=0, ignore_eos=True,
                                                      tenant=name[0]), lambda ev, name=name: starts.put(name))
        order: list[str] = []
        while len(order) < 5:
            name = starts.get(timeout=60)
            if name not in order:
                order.append(name)
                eng.cancel(seqs[name])  # free the slot for the next one
        assert order[0] == "a1"
        assert order.index("b1") < order.index("a4")
    finally:
        eng.close()
