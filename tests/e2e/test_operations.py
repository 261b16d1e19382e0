"""Metrics, readiness and graceful shutdown of a real `fmgate serve` process."""

from __future__ import annotations

import re
import signal
import threading
import time

import httpx
import pytest

from tests.conftest import CHAT_MODEL, EMBED_MODEL

pytestmark = pytest.mark.e2e


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample, 0 if absent."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_move_by_the_right_amounts(server):
    client = server.client()
    before = server.metrics()
    r = client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "Hi!"}],
                                       max_tokens=5, temperature=0)
    e = client.embeddings.create(model=EMBED_MODEL, input=["one", "two", "three"])
    after = server.metrics()
    route = {"route": "/v1/chat/completions", "model": CHAT_MODEL, "status": "200"}
    assert sample(after, "fmgate_requests_total", **route) - sample(before, "fmgate_requests_total", **route) == 1
    for name, value in [("fmgate_prompt_tokens_total", r.usage.prompt_tokens),
                        ("fmgate_completion_tokens_total", r.usage.completion_tokens)]:
        assert sample(after, name, model=CHAT_MODEL) - sample(before, name, model=CHAT_MODEL) == value
    assert (sample(after, "fmgate_prompt_tokens_total", model=EMBED_MODEL)
            - sample(before, "fmgate_prompt_tokens_total", model=EMBED_MODEL)) == e.usage.prompt_tokens
    hist = "fmgate_request_duration_seconds_count"
    assert sample(after, hist, route="/v1/embeddings", model=EMBED_MODEL) == \
        sample(before, hist, route="/v1/embeddings", model=EMBED_MODEL) + 1
    ttft = "fmgate_time_to_first_token_seconds_count"
    assert sample(after, ttft, model=CHAT_MODEL) >= sample(before, ttft, model=CHAT_MODEL) + 1
    assert sample(after, "fmgate_batch_size_count", model=EMBED_MODEL, kind="embed") > 0
    assert sample(after, "fmgate_model_variant_info", model=CHAT_MODEL) == 1
    assert "fmgate_queue_depth" in after and "fmgate_running_sequences" in after


def test_readyz_is_503_while_loading(start_server):
    srv = start_server(env={"FMGATE_AUTH": "off"}, ready=False)
    seen = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            r = httpx.get(srv.base_url + "/readyz", timeout=2)
        except httpx.HTTPError:
            time.sleep(0.05)
            continue
        seen.append(r.status_code)
        if r.status_code == 200:
            break
        assert httpx.get(srv.base_url + "/healthz").status_code == 200
        time.sleep(0.05)
    assert seen[0] == 503 and seen[-1] == 200
    srv.stop()


def test_sigterm_drains_a_long_stream_and_exits_zero(start_server):
    srv = start_server(env={"FMGATE_AUTH": "off", "FMGATE_SHUTDOWN_GRACE_S": "60"})
    client = srv.client()
    text: list[str] = []
    finish: list[str | None] = []

    def stream():
        s = client.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "Tell me a very long story about a dragon."}],
            max_tokens=200, temperature=0, stream=True)
        for chunk in s:
            text.append(chunk.choices[0].delta.content or "")
            if chunk.choices[0].finish_reason:
                finish.append(chunk.choices[0].finish_reason)

    t = threading.Thread(target=stream)
    t.start()
    while len(text) < 5:
        time.sleep(0.02)
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    ready = None
    try:
        ready = httpx.get(srv.base_url + "/readyz", timeout=2).status_code
    except httpx.HTTPError:
        ready = "refused"  # the listener is already closed: also refusing new work
    assert ready in (503, "refused")
    try:
        r = httpx.post(srv.base_url + "/v1/embeddings", json={"model": EMBED_MODEL, "input": "x"}, timeout=5)
    except httpx.HTTPError:
        pass  # the listener is already closed: refused
    else:
        assert r.status_code == 503, "a new request during drain must be refused"
        assert r.json()["error"]["type"] == "service_unavailable"
    t.join(timeout=90)
    assert finish and finish[0] in ("stop", "length"), "the in-flight stream completed"
    assert srv.proc.wait(timeout=60) == 0
