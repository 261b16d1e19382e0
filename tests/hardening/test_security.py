"""Defaults that keep a gateway safe to expose."""

from __future__ import annotations

import httpx
import pytest

from gateway.settings import Settings
from tests.conftest import CHAT_MODEL

pytestmark = pytest.mark.e2e


def test_binds_to_loopback_by_default(monkeypatch):
    monkeypatch.delenv("FMGATE_HOST", raising=False)
    assert Settings().host == "127.0.0.1"


def test_cors_is_off_by_default(server):
    r = httpx.options(server.base_url + "/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


def test_body_size_limit_is_413_in_openai_shape(server):
    big = "x" * (5 * 1024 * 1024)
    r = httpx.post(server.base_url + "/v1/embeddings", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_errors_carry_no_internals(server):
    bodies = [{"model": CHAT_MODEL, "messages": [{"role": "user", "content": {"bad": "shape"}}]},
              {"model": CHAT_MODEL, "prompt": [[10**9]]},
              {"model": CHAT_MODEL, "messages": [{"role": "wizard", "content": "hi"}]}]
    for path, body in zip(["/v1/chat/completions", "/v1/completions", "/v1/chat/completions"], bodies, strict=True):
        r = httpx.post(server.base_url + path, json=body)
        assert r.status_code == 400, r.text
        text = r.text
        for leak in ("Traceback", "File \"", "/work/", "site-packages", ".py"):
            assert leak not in text


@pytest.mark.parametrize("limit,body", [
    ("n", {"n": 99}),
    ("stop", {"stop": ["a", "b", "c", "d", "e"]}),
    ("max_tokens", {"max_tokens": 10**6}),
])
def test_input_limits(server, limit, body):
    r = httpx.post(server.base_url + "/v1/chat/completions", json={
        "model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}], **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == limit


def test_chunked_body_over_the_cap_is_413_not_400(server):
    limit = 4 * 1024 * 1024

    def chunks():  # no Content-Length: the cap is found while reading
        for _ in range(4):
            yield b" " * (1024 * 1024)
        yield b" " * 64

    r = httpx.post(server.base_url + "/v1/embeddings", content=chunks(), timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large" and str(limit) in r.json()["error"]["message"]
