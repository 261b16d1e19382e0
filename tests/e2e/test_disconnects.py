"""A client that hangs up frees its sequence within a step and is charged for what was produced.

Over real HTTP, on a server of its own (so the engine's counters move only for these requests): a
disconnect before the first byte, mid-stream and mid-gather. Proof the sequence was freed: the running
gauge returns to 0 and the engine decoded only a few rows more than the tokens the quota was charged for,
where a sequence left running would decode to max_tokens (EOS is banned). Usage is read back through the admin
API for the user key that made the request.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.conftest import CHAT_MODEL
from tests.e2e.test_operations import sample

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ADMIN = "fm-admin-disconnect-test"
MAX_TOKENS = 1500
NO_EOS = {"0": -100, "1": -100, "2": -100}  # SmolLM2's <|endoftext|>, <|im_start|>, <|im_end|>


@pytest.fixture(scope="module")
def srv(start_server):
    s = start_server(env={"FMGATE_AUTH": "on", "FMGATE_ADMIN_KEY": ADMIN})
    r = httpx.post(s.base_url + "/admin/keys", json={"name": "disconnects"},
                   headers={"authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert r.status_code == 201, r.text
    s.user_key, s.key_id = r.json()["key"], r.json()["id"]
    return s


def body(stream: bool, long_prompt: bool = False) -> dict:
    text = "Tell me a long story about a lighthouse keeper. " + ("and the sea " * 400 if long_prompt else "")
    return {"model": CHAT_MODEL, "messages": [{"role": "user", "content": text}],
            "max_tokens": 600 if long_prompt else MAX_TOKENS,
            "temperature": 0.7, "seed": 1, "logit_bias": NO_EOS, "stream": stream}


def usage(srv) -> dict:
    r = httpx.get(srv.base_url + "/admin/usage", params={"key_id": srv.key_id},
                  headers={"authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["totals"]


def poll(what, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def decode_rows(srv) -> float:
    return sample(srv.metrics(), "fmgate_batch_size_sum", model=CHAT_MODEL, kind="decode")


def raw_request(srv, payload: dict) -> socket.socket:
    """An HTTP/1.1 POST on a bare socket, so the test decides exactly when the connection goes."""
    data = json.dumps(payload).encode()
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {srv.user_key}\r\nContent-Length: {len(data)}\r\n\r\n").encode()
    sock.sendall(head + data)
    return sock


def settled(srv, before: dict, seen_tokens: int, decode_before: float) -> dict:
    """Wait for the sequence to leave the batch and its usage to be recorded; check both."""
    poll(lambda: sample(srv.metrics(), "fmgate_running_sequences", model=CHAT_MODEL) == 0)
    # Admission counts the request at once; the settlement (the tokens) lands a moment later.
    after = poll(lambda: (u := usage(srv))["prompt_tokens"] > before["prompt_tokens"] and u)
    assert after["requests"] == before["requests"] + 1
    charged = after["completion_tokens"] - before["completion_tokens"]
    assert seen_tokens <= charged < MAX_TOKENS, (seen_tokens, charged)
    # A sequence left running decodes to max_tokens (EOS is banned); a freed one stops within a few steps
    # of the hang-up. The slack covers a loop slowed by a busy box, and stays far below max_tokens.
    rows = decode_rows(srv) - decode_before
    assert rows <= charged + 64, f"the engine decoded {rows} rows for {charged} charged tokens"
    return after


def test_disconnect_before_the_first_byte(srv):
    before, rows0, gone0 = usage(srv), decode_rows(srv), sample(srv.metrics(), "fmgate_requests_total", status="499")
    sock = raw_request(srv, body(stream=True, long_prompt=True))  # a long prefill: we are gone before it ends
    sock.close()
    settled(srv, before, 0, rows0)
    poll(lambda: sample(srv.metrics(), "fmgate_requests_total", status="499") == gone0 + 1)


def test_disconnect_mid_stream(srv):
    before, rows0 = usage(srv), decode_rows(srv)
    seen = 0
    with httpx.Client(timeout=60) as c, c.stream("POST", srv.base_url + "/v1/chat/completions", json=body(True),
                                                 headers={"authorization": f"Bearer {srv.user_key}"}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                seen += 1
            if seen >= 5:
                break
    settled(srv, before, seen, rows0)


def test_disconnect_mid_gather(srv):
    before, rows0 = usage(srv), decode_rows(srv)
    gone0 = sample(srv.metrics(), "fmgate_requests_total", status="499")
    sock = raw_request(srv, body(stream=False))
    poll(lambda: decode_rows(srv) - rows0 >= 5)  # generation is under way
    sock.close()
    after = settled(srv, before, 5, rows0)
    poll(lambda: sample(srv.metrics(), "fmgate_requests_total", status="499") == gone0 + 1)
    assert after["completion_tokens"] - before["completion_tokens"] >= 5
    assert "Traceback" not in srv.logs and "CancelledError" not in srv.logs
