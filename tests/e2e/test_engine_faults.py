"""Engine failures over real HTTP: a dead scheduler thread turns the model's requests into 503s in
OpenAI's shape; a request past its deadline ends with a clear error.

The thread is killed through FMGATE_TEST_KILL_ENGINE_AT_DECODE (gateway/engines/llm.py), a test-only
switch that is off unless set: no request can make a healthy engine thread die, which is the point."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import CHAT_MODEL

pytestmark = pytest.mark.e2e

CHAT = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Count to fifty."}], "max_tokens": 40}


def sample(text: str, name: str, model: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(f'{name}{{model="{model}"}} '):
            return float(line.rsplit(" ", 1)[1])
    return None


def assert_openai_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]
    return err


def test_a_dead_engine_thread_turns_the_model_unready_and_requests_into_503s(start_server):
    srv = start_server(env={"FMGATE_AUTH": "off", "FMGATE_TEST_KILL_ENGINE_AT_DECODE": "1"})
    with httpx.Client(base_url=srv.base_url, timeout=60) as http:
        assert sample(http.get("/metrics").text, "fmgate_engine_up", CHAT_MODEL) == 1
        # The first decode step kills the thread under this in-flight request.
        r = http.post("/v1/chat/completions", json=CHAT)
        assert_openai_error(r, 503, "engine_failed")
        assert r.headers.get("retry-after")
        # Streaming, a new request is refused before its first byte.
        r = http.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert_openai_error(r, 503, "engine_unavailable")
        r = http.post("/v1/completions", json={"model": CHAT_MODEL, "prompt": "Hello", "max_tokens": 4})
        assert_openai_error(r, 503, "engine_unavailable")
        assert http.get("/healthz").status_code == 200  # the process is alive; the model is not
        assert http.get("/readyz").status_code == 503
        text = http.get("/metrics").text
        assert sample(text, "fmgate_engine_up", CHAT_MODEL) == 0
        assert sample(text, "fmgate_engine_failures_total", CHAT_MODEL) == 1
    assert "engine thread for" in srv.logs and "ERROR" in srv.logs


def test_requests_past_their_deadline_end_with_a_clear_error(start_server, server):
    # A setting of a microsecond has passed before the engine first looks at any request: deterministic.
    srv = start_server(env={"FMGATE_AUTH": "off", "FMGATE_REQUEST_TIMEOUT_S": "0.000001"})
    with httpx.Client(base_url=srv.base_url, timeout=60) as http:
        r = http.post("/v1/chat/completions", json=CHAT)
        err = assert_openai_error(r, 504, "deadline_exceeded")
        assert "deadline" in err["message"]
        r = http.post("/v1/completions", json={"model": CHAT_MODEL, "prompt": "Hello", "max_tokens": 4})
        assert_openai_error(r, 504, "deadline_exceeded")
        with http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as s:
            body = s.read().decode()
        assert "deadline_exceeded" in body
        assert http.get("/readyz").status_code == 200  # a late request is not an engine fault
    # The header asks for less than an unlimited server allows.
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        r = http.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Timeout": "0.000001"})
        assert_openai_error(r, 504, "deadline_exceeded")
        r = http.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Timeout": "60"})
        assert r.status_code == 200, r.text
        r = http.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Timeout": "soon"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "X-Request-Timeout"
