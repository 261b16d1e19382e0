"""Metrics, readiness and graceful shutdown of a real `fmgate serve` process."""

from __future__ import annotations

import re
import signal
import subprocess
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


def wait_for(condition, timeout: float, what: str, interval: float = 0.05):
    """Poll `condition` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = condition()
        if got:
            return got
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _refused_or_status(method: str, url: str, **kw) -> int | str:
    try:
        return httpx.request(method, url, timeout=10, **kw).status_code
    except httpx.HTTPError:
        return "refused"  # the listener is already closed: also refusing new work


def test_sigterm_drains_a_long_stream_and_exits_zero(start_server, chat_artifact):
    from transformers import AutoTokenizer

    # EOS is banned with logit_bias, so the stream surely runs all its max_tokens: it is still in flight when
    # SIGTERM lands, and finishing it proves the drain rather than an early end of the story.
    tok = AutoTokenizer.from_pretrained(chat_artifact.path)
    vocab = tok.get_vocab()
    eos = {tok.eos_token_id} | {vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab}
    max_tokens = 160
    srv = start_server(env={"FMGATE_AUTH": "off", "FMGATE_SHUTDOWN_GRACE_S": "300"})
    client = srv.client(timeout=300)
    text: list[str] = []
    finish: list[str | None] = []
    usage: list = []
    failed: list[BaseException] = []

    def stream():
        try:
            s = client.chat.completions.create(
                model=CHAT_MODEL, messages=[{"role": "user", "content": "Tell me a very long story about a dragon."}],
                max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
                logit_bias={str(i): -100 for i in eos})
            for chunk in s:
                if chunk.usage is not None:
                    usage.append(chunk.usage)
                if chunk.choices:
                    text.append(chunk.choices[0].delta.content or "")
                    if chunk.choices[0].finish_reason:
                        finish.append(chunk.choices[0].finish_reason)
        except BaseException as exc:  # surfaced by the main thread's asserts
            failed.append(exc)

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    wait_for(lambda: len(text) >= 5 or failed or not t.is_alive(), 300, "the stream's first chunks")
    assert not failed, f"the stream failed before SIGTERM: {failed[0]!r}"
    assert not finish, "the stream must still be in flight when SIGTERM is sent"
    srv.proc.send_signal(signal.SIGTERM)
    # /readyz turns 503 at once, then the listener closes; either way it refuses new work.
    ready = wait_for(lambda: (s := _refused_or_status("GET", srv.base_url + "/readyz")) != 200 and s, 30,
                     "/readyz to stop answering 200 after SIGTERM")
    assert ready in (503, "refused"), ready
    try:
        r = httpx.post(srv.base_url + "/v1/embeddings", json={"model": EMBED_MODEL, "input": "x"}, timeout=10)
    except httpx.HTTPError:
        pass  # the listener is already closed: refused
    else:
        assert r.status_code == 503, f"a new request during drain must be refused, got {r.status_code}"
        assert r.json()["error"]["type"] == "service_unavailable"
    t.join(timeout=300)
    assert not t.is_alive(), "the in-flight stream did not finish within 300 s of SIGTERM"
    assert not failed, f"the in-flight stream broke during the drain: {failed[0]!r}"
    assert finish == ["length"], "the in-flight stream ran to its end"
    assert usage and usage[-1].completion_tokens == max_tokens
    try:
        code = srv.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        srv.proc.wait()
        pytest.fail("fmgate did not exit within 120 s of finishing its drain")
    assert code == 0, srv.logs[-3000:]


@pytest.mark.parametrize("host,auth,key,warns", [
    ("0.0.0.0", "auto", False, True),  # the Docker image's bind before the first key
    ("0.0.0.0", "off", False, True),
    ("0.0.0.0", "auto", True, False),
    ("0.0.0.0", "on", False, False),
    ("127.0.0.1", "auto", False, False),
    ("::1", "off", False, False),
])
def test_an_open_bind_without_auth_is_warned_about(tmp_path, caplog, host, auth, key, warns):
    import asyncio
    import logging

    from gateway.quota.gatekeeper import Gatekeeper
    from gateway.settings import Settings

    async def start():
        if key:
            gk = await Gatekeeper.create(Settings(home=tmp_path, auth="on", redis_url=None))
            await gk.create_key("someone")
            await gk.close()
        caplog.clear()
        gk = await Gatekeeper.create(Settings(home=tmp_path, host=host, auth=auth, redis_url=None))
        await gk.close()

    caplog.set_level(logging.WARNING, logger="fmgate.quota")
    asyncio.run(start())
    assert ("anyone who can reach port" in caplog.text) == warns, caplog.text
