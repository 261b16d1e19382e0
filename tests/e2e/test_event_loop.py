"""No request can stall the event loop: /healthz stays fast while the largest request of each route is
served, and list bounds are checked before any work. The 50 ms goal is measured by bench/loop_latency.py;
the bound here is generous so that it catches a multi-second stall without flaking on a busy box."""

from __future__ import annotations

import httpx
import pytest

from bench.loop_latency import p99, probe, workloads
from tests.conftest import CHAT_MODEL, EMBED_MODEL

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.parametrize("name", list(workloads()))
def test_healthz_stays_fast_while_the_largest_request_is_served(server, name):
    path, body, statuses = workloads(CHAT_MODEL, EMBED_MODEL)[name]
    lat, status = probe(server.base_url, path, body)
    assert status in statuses
    assert len(lat) >= 3
    assert p99(lat) < 0.3, f"/healthz p99 {p99(lat) * 1e3:.0f} ms while serving {name}"


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": ["x"] * 33}, "prompt"),
    ("/v1/completions", {"prompt": ["x"] * 5, "n": 8}, "prompt"),
    ("/v1/completions", {"prompt": [[1]] * 33}, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": ["a"] * 5}, "stop"),
    ("/v1/completions", {"prompt": "x", "n": 9}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}] * 257}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * 65}]},
     "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logit_bias": {str(i): 1 for i in
                                                                                          range(301)}}, "logit_bias"),
    ("/v1/embeddings", {"input": ["x"] * 2049}, "input"),
])
def test_every_list_is_bounded(server, path, body, param):
    model = EMBED_MODEL if "embeddings" in path else CHAT_MODEL
    r = httpx.post(server.base_url + path, json={"model": model, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"] or "").startswith(param), r.text


def test_schema_bounds_match_the_settings(server):
    """One place for each limit: the published schema says what Settings.limits says."""
    from gateway.settings import Limits

    limits = Limits()
    schema = httpx.get(server.base_url + "/openapi.json", timeout=30).json()["components"]["schemas"]
    chat = schema["ChatCompletionRequest"]["properties"]
    assert chat["n"]["maximum"] == limits.max_n
    assert chat["messages"]["maxItems"] == limits.max_messages
    stop_list = next(s for s in chat["stop"]["anyOf"] if s.get("type") == "array")
    assert stop_list["maxItems"] == limits.max_stop
    with pytest.raises(ValueError):
        Limits(max_n=limits.max_n + 1)
