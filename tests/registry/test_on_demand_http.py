"""Models on demand over real HTTP with `fmgate serve` and the real default models.

Three names (the chat model, the embedding model, and a second name for the embedding model) under a
memory budget that fits two of them (set from the sizes measured in the same process): a request to the third loads it and unloads the least recently used
idle one, a streaming request in flight on the chat model is never cut, and `fmgate ps` shows the change.
A broken source is reported without holding back the others.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.conftest import CHAT_MODEL, CHAT_SOURCE, EMBED_MODEL, EMBED_SOURCE, ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SECOND = "minilm-second-name"
ADMIN = "test-admin-key-on-demand"
ENV = {"FMGATE_AUTH": "off", "FMGATE_ADMIN_KEY": ADMIN}
AUTH = {"Authorization": f"Bearer {ADMIN}"}
CONFIG = f"""
models:
  - name: {CHAT_MODEL}
    source: "{CHAT_SOURCE}"
    task: chat
  - name: {EMBED_MODEL}
    source: "{EMBED_SOURCE}"
    task: embed
  - name: {SECOND}
    source: "{EMBED_SOURCE}"
    task: embed
    load: on_demand
  - name: broken
    source: /nonexistent/fmgate-test/model.gguf
    task: chat
    required: false
"""


def status(srv) -> dict[str, dict]:
    r = httpx.get(srv.base_url + "/admin/models", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return {m["name"]: m for m in r.json()["data"]}


def embed(srv, model: str) -> httpx.Response:
    return httpx.post(srv.base_url + "/v1/embeddings", json={"model": model, "input": ["hello world"]}, timeout=120)


def ps(srv) -> str:
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "ps"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "FMGATE_URL": srv.base_url, "FMGATE_ADMIN_KEY": ADMIN})
    assert out.returncode == 0, out.stderr
    return out.stdout


def ps_state(text: str, name: str) -> str:
    row = next(line for line in text.splitlines() if line.split()[0] == name)
    return row.split()[2]


def wait_for(cond, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def srv(start_server):
    return start_server(env=ENV, config=CONFIG)


def set_budget(srv, **limits) -> dict:
    r = httpx.post(srv.base_url + "/admin/model-budget", json=limits, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_broken_model_is_reported_and_the_others_serve(srv):
    assert httpx.get(srv.base_url + "/readyz", timeout=30).status_code == 200  # broken is not required
    st = status(srv)
    assert st["broken"]["state"] == "failed" and "/nonexistent/fmgate-test" in st["broken"]["error"]
    r = httpx.post(srv.base_url + "/v1/chat/completions", timeout=60,
                   json={"model": "broken", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503, r.text
    assert "/nonexistent/fmgate-test" in r.json()["error"]["message"] and r.headers.get("retry-after")
    r = httpx.post(srv.base_url + "/v1/chat/completions", timeout=60,
                   json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert 'fmgate_model_state{model="broken",state="failed"} 1.0' in srv.metrics()


def test_third_model_loads_and_lru_idle_one_unloads_while_a_stream_continues(srv):
    assert embed(srv, EMBED_MODEL).status_code == 200  # the embedding model is used first: it is the LRU one
    st = status(srv)
    assert st[SECOND]["state"] == "unloaded" and st[EMBED_MODEL]["state"] == "ready"
    # Room for the chat model and one and a half embedding models, as measured in this process (the
    # variant chosen on this machine decides the sizes): any two of the three names, never all three.
    chat, emb = st[CHAT_MODEL]["memory_bytes"], st[EMBED_MODEL]["memory_bytes"]
    assert chat > 0 and emb > 0, st
    assert set_budget(srv, max_loaded_memory=chat + emb * 3 // 2)["loaded_models"] == 2
    assert "unloaded" == ps_state(ps(srv), SECOND)

    stream: dict = {"text": "", "finish": None, "error": None}
    started = threading.Event()

    def run_stream():
        body = {"model": CHAT_MODEL, "stream": True, "max_tokens": 400, "temperature": 0,
                "messages": [{"role": "user", "content": "Count from 1 to 500, separated by commas."}]}
        try:
            with httpx.stream("POST", srv.base_url + "/v1/chat/completions", json=body, timeout=300) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    choice = chunk["choices"][0]
                    stream["text"] += choice["delta"].get("content") or ""
                    started.set()
                    stream["finish"] = choice.get("finish_reason") or stream["finish"]
        except Exception as exc:  # reported below
            stream["error"] = repr(exc)
        finally:
            started.set()

    t = threading.Thread(target=run_stream, daemon=True)
    t.start()
    try:
        assert started.wait(120), "the stream produced nothing"
        assert stream["error"] is None, stream["error"]
        # The third model: loading it needs room; the chat model is in use (and used last), so the
        # embedding model is the one to go.
        r = embed(srv, SECOND)
        assert r.status_code == 200, r.text
        st = status(srv)
        assert st[SECOND]["state"] == "ready" and st[SECOND]["memory_bytes"] > 0
        assert st[EMBED_MODEL]["state"] == "unloaded"
        assert st[CHAT_MODEL]["state"] == "ready"
        text = ps(srv)
        assert ps_state(text, SECOND) == "ready" and ps_state(text, EMBED_MODEL) == "unloaded", text
    finally:
        t.join(300)
    assert stream["error"] is None, stream["error"]
    assert stream["finish"] in ("stop", "length") and len(stream["text"]) > 20, stream  # never cut
    assert httpx.get(srv.base_url + "/readyz", timeout=30).status_code == 200  # unloaded by policy, still ready

    # Now all are idle and at most two may stay loaded; the second name is used last, so bringing the first
    # embedding name back unloads the least recently used one: the chat model.
    wait_for(lambda: status(srv)[CHAT_MODEL]["in_use"] == 0, "the chat request to be released")
    set_budget(srv, max_loaded_memory="1TiB", max_loaded_models=2)
    assert embed(srv, SECOND).status_code == 200
    assert embed(srv, EMBED_MODEL).status_code == 200
    st = status(srv)
    assert st[CHAT_MODEL]["state"] == "unloaded"
    assert st[EMBED_MODEL]["state"] == "ready" and st[SECOND]["state"] == "ready"
    assert ps_state(ps(srv), CHAT_MODEL) == "unloaded"


def test_admin_routes_load_unload_and_add(srv):
    r = httpx.post(srv.base_url + f"/admin/models/{SECOND}/unload", headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["state"] == "unloaded", r.text
    r = httpx.post(srv.base_url + f"/admin/models/{SECOND}/load", headers=AUTH, timeout=180)
    assert r.status_code == 200 and r.json()["state"] == "ready", r.text
    assert httpx.get(srv.base_url + "/admin/models", timeout=30).status_code == 401  # admin key needed
    r = httpx.post(srv.base_url + "/admin/models", headers=AUTH, timeout=60,
                   json={"name": "added-later", "source": EMBED_SOURCE, "task": "embed"})
    assert r.status_code == 201 and r.json()["state"] == "unloaded", r.text
    assert httpx.post(srv.base_url + "/admin/models", headers=AUTH, timeout=60,
                      json={"name": "added-later", "source": EMBED_SOURCE, "task": "embed"}).status_code == 409
    assert httpx.post(srv.base_url + "/admin/models", headers=AUTH, timeout=60,
                      json={"name": "x", "source": EMBED_SOURCE, "task": "paint"}).status_code == 400
    assert embed(srv, "added-later").status_code == 200
    assert status(srv)["added-later"]["state"] == "ready"
    assert httpx.post(srv.base_url + "/admin/models/nope/load", headers=AUTH, timeout=60).status_code == 404
    r = httpx.post(srv.base_url + "/admin/model-budget", json={"max_loaded_memory": "lots"}, headers=AUTH,
                   timeout=60)
    assert r.status_code == 400, r.text
    budget = set_budget(srv, max_loaded_models=1)  # idle models over a new limit unload at once
    assert budget["loaded_models"] <= 1 and budget["max_loaded_models"] == 1
