"""Fair shares over real HTTP: with one batch slot and key A's backlog queued, key B's request is admitted
before A's backlog drains. Only the order of first tokens is observed, never how long anything took."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest

from tests.conftest import CHAT_MODEL, CHAT_SOURCE

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ADMIN = "test-admin-key-fairness"
CONFIG = f"""
models:
  - name: {CHAT_MODEL}
    source: "{CHAT_SOURCE}"
    task: chat
    max_num_seqs: 1
"""
A_REQUESTS = 8


def make_key(srv, name: str) -> str:
    r = httpx.post(srv.base_url + "/admin/keys", json={"name": name}, timeout=30,
                   headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 201, r.text
    return r.json()["key"]


def queued(srv) -> float:
    pattern = r'^fmgate_queue_depth\{model="' + re.escape(CHAT_MODEL) + r'"\} ([0-9.]+)$'
    m = re.search(pattern, srv.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


def test_late_key_is_admitted_before_the_backlog_drains(start_server):
    srv = start_server(env={"FMGATE_AUTH": "on", "FMGATE_ADMIN_KEY": ADMIN, "FMGATE_FAIRNESS": "fair"},
                       config=CONFIG)
    key_a, key_b = make_key(srv, "flood"), make_key(srv, "late")
    order: list[str] = []  # who got a first token, in the order they arrived
    errors: list[str] = []
    lock = threading.Lock()

    def stream(tag: str, key: str) -> None:
        body = {"model": CHAT_MODEL, "stream": True, "max_tokens": 48, "temperature": 0,
                "messages": [{"role": "user", "content": "Count from 1 to 100, separated by commas."}]}
        try:
            with httpx.stream("POST", srv.base_url + "/v1/chat/completions", json=body, timeout=600,
                              headers={"Authorization": f"Bearer {key}"}) as r:
                if r.status_code != 200:
                    errors.append(f"{tag}: {r.status_code} {r.read()!r}")
                    return
                first = True
                for line in r.iter_lines():  # read to the end, as a real client would
                    if first and line.startswith("data: ") and line != "data: [DONE]":
                        choice = json.loads(line[6:])["choices"]
                        if choice and (choice[0]["delta"].get("content") or choice[0].get("finish_reason")):
                            first = False
                            with lock:
                                order.append(tag)
        except Exception as exc:
            errors.append(f"{tag}: {exc!r}")

    threads = [threading.Thread(target=stream, args=(f"a{i}", key_a), daemon=True) for i in range(A_REQUESTS)]
    for t in threads:
        t.start()
    # One of A's requests runs; wait until the others are all queued behind it.
    deadline = time.monotonic() + 120
    while queued(srv) < A_REQUESTS - 1 and not errors:
        assert time.monotonic() < deadline, f"A's backlog never queued: depth {queued(srv)}, {errors}"
        time.sleep(0.1)
    b = threading.Thread(target=stream, args=("b", key_b), daemon=True)
    b.start()
    threads.append(b)
    for t in threads:
        t.join(600)
    assert not errors, errors
    assert sorted(order) == sorted([f"a{i}" for i in range(A_REQUESTS)] + ["b"])
    after_b = len(order) - 1 - order.index("b")
    # FCFS would admit B last (after_b == 0). Fair admits it within about one of A's items once it has
    # arrived; the margin allows for B's request reaching the queue a few of A's requests late.
    assert after_b >= 3, order
