"""Per-request keep_alive over real HTTP (Ollama's meaning: how long the model stays loaded after the
request; 0 unloads it as soon as no request uses it; a request without it brings back the configured
one), seen through /admin/models and `fmgate ps`."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import CHAT_MODEL, CHAT_SOURCE, EMBED_MODEL, EMBED_SOURCE
from tests.registry.test_on_demand_http import ps, ps_state, status, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ADMIN = "test-admin-key-on-demand"  # the helpers above use this key
CONFIG = f"""
models:
  - name: {CHAT_MODEL}
    source: "{CHAT_SOURCE}"
    task: chat
  - name: {EMBED_MODEL}
    source: "{EMBED_SOURCE}"
    task: embed
    load: on_demand
    keep_alive: 120
"""


@pytest.fixture(scope="module")
def srv(start_server):
    return start_server(env={"FMGATE_AUTH": "off", "FMGATE_ADMIN_KEY": ADMIN}, config=CONFIG)


def chat(srv, **extra) -> httpx.Response:
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, **extra}
    return httpx.post(srv.base_url + "/v1/chat/completions", json=body, timeout=300)


def embed(srv, **extra) -> httpx.Response:
    return httpx.post(srv.base_url + "/v1/embeddings", json={"model": EMBED_MODEL, "input": "hi", **extra},
                      timeout=300)


def test_keep_alive_zero_unloads_the_model_after_the_request(srv):
    assert status(srv)[CHAT_MODEL]["state"] == "ready"  # loaded at start, kept forever by its config
    r = chat(srv, keep_alive=0)
    assert r.status_code == 200, r.text
    wait_for(lambda: status(srv)[CHAT_MODEL]["state"] == "unloaded", "keep_alive 0 to unload the chat model")
    assert ps_state(ps(srv), CHAT_MODEL) == "unloaded"
    # the next request loads it again; without keep_alive it stays (the configured keep_alive: forever)
    r = httpx.post(srv.base_url + "/v1/completions", timeout=300,
                   json={"model": CHAT_MODEL, "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200, r.text
    st = status(srv)[CHAT_MODEL]
    assert st["state"] == "ready" and st["keep_alive"] is None and st["expires_at"] is None, st
    # completions take it too, as a duration string
    assert httpx.post(srv.base_url + "/v1/completions", timeout=300,
                      json={"model": CHAT_MODEL, "prompt": "Hello", "max_tokens": 2, "keep_alive": "0s"}
                      ).status_code == 200
    wait_for(lambda: status(srv)[CHAT_MODEL]["state"] == "unloaded", "keep_alive '0s' to unload it")


def test_embeddings_keep_alive_durations_and_the_configured_default(srv):
    r = embed(srv, keep_alive="1h30m")
    assert r.status_code == 200, r.text
    st = status(srv)[EMBED_MODEL]
    assert st["state"] == "ready" and st["keep_alive"] == 5400
    assert st["expires_at"] > time.time() + 3600  # an hour and a half after its last use
    assert embed(srv).status_code == 200  # without keep_alive: the configured 120 s again
    st = status(srv)[EMBED_MODEL]
    assert st["keep_alive"] == 120 and st["expires_at"] < time.time() + 600, st
    assert embed(srv, keep_alive=-1).status_code == 200  # negative: stays loaded
    st = status(srv)[EMBED_MODEL]
    assert st["keep_alive"] is None and st["expires_at"] is None, st
    assert ps_state(ps(srv), EMBED_MODEL) == "ready"
    assert embed(srv, keep_alive=0).status_code == 200
    wait_for(lambda: status(srv)[EMBED_MODEL]["state"] == "unloaded", "keep_alive 0 to unload the embedding model")
    assert ps_state(ps(srv), EMBED_MODEL) == "unloaded"


@pytest.mark.parametrize("value", ["soon", "5 minutes", "1e12", "nan", ""])
def test_a_bad_keep_alive_is_a_400_and_loads_nothing(srv, value):
    before = status(srv)[EMBED_MODEL]["state"]
    r = embed(srv, keep_alive=value)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "keep_alive", r.text
    if before == "unloaded":
        assert status(srv)[EMBED_MODEL]["state"] == "unloaded"
