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


PREEMPT_CONFIG = f"""
models:
  - name: {CHAT_MODEL}
    source: "{CHAT_SOURCE}"
    task: chat
    max_num_seqs: 4
"""
SLOTS = 4
BACKLOG = 2
A_TOKENS = 200  # each of A's runs: long enough that none ends while B's request is on its way in
NO_END = {"0": -100, "1": -100, "2": -100}  # <|endoftext|>, <|im_start|>, <|im_end|>: A runs to max_tokens


def preemptions(srv) -> float:
    pattern = r'^fmgate_preemptions_total\{model="' + re.escape(CHAT_MODEL) + r'"\} ([0-9.]+)$'
    m = re.search(pattern, srv.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


def running(srv) -> float:
    pattern = r'^fmgate_running_sequences\{model="' + re.escape(CHAT_MODEL) + r'"\} ([0-9.]+)$'
    m = re.search(pattern, srv.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


def test_late_key_starts_while_every_slot_is_held_by_a_flood(start_server):
    """Key A holds every batch slot with long runs and has more queued; key B's request is started at once
    by pausing one of A's runs, not after one of them ends. The paused run still finishes in full."""
    srv = start_server(env={"FMGATE_AUTH": "on", "FMGATE_ADMIN_KEY": ADMIN, "FMGATE_FAIRNESS": "fair"},
                       config=PREEMPT_CONFIG)
    key_a, key_b = make_key(srv, "flood"), make_key(srv, "late")
    events: list[tuple[str, str]] = []  # ("first" | "end", tag), in the order the client saw them
    ends: dict[str, tuple[str | None, int]] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def stream(tag: str, key: str, max_tokens: int, bias: dict | None) -> None:
        body = {"model": CHAT_MODEL, "stream": True, "max_tokens": max_tokens, "temperature": 0,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}]}
        if bias:
            body["logit_bias"] = bias
        finish, tokens, first = None, 0, True
        try:
            with httpx.stream("POST", srv.base_url + "/v1/chat/completions", json=body, timeout=900,
                              headers={"Authorization": f"Bearer {key}"}) as r:
                if r.status_code != 200:
                    errors.append(f"{tag}: {r.status_code} {r.read()!r}")
                    return
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    for choice in chunk["choices"]:
                        if first and (choice["delta"].get("content") or choice.get("finish_reason")):
                            first = False
                            with lock:
                                events.append(("first", tag))
                        finish = choice.get("finish_reason") or finish
        except Exception as exc:
            errors.append(f"{tag}: {exc!r}")
        finally:
            with lock:
                events.append(("end", tag))
                ends[tag] = (finish, tokens)

    a_tags = [f"a{i}" for i in range(SLOTS + BACKLOG)]
    threads = [threading.Thread(target=stream, args=(t, key_a, A_TOKENS, NO_END), daemon=True) for t in a_tags]
    for t in threads:
        t.start()
    # A holds every slot (and this client has seen each of those runs start) with a backlog queued behind.
    deadline = time.monotonic() + 300
    while (len(events) < SLOTS or queued(srv) < BACKLOG) and not errors:
        assert time.monotonic() < deadline, f"A's flood never filled the batch: {running(srv)}, {queued(srv)}"
        time.sleep(0.1)
    assert preemptions(srv) == 0  # one key alone is never paused
    b = threading.Thread(target=stream, args=("b", key_b, 8, None), daemon=True)
    b.start()
    threads.append(b)
    for t in threads:
        t.join(900)
    assert not errors, errors
    with lock:
        seen = list(events)
    b_first = seen.index(("first", "b"))
    before_b = seen[:b_first]
    # B started before any of A's long runs ended, and before A's queued backlog moved at all:
    assert not [e for e in before_b if e[0] == "end"], seen
    assert len([e for e in before_b if e[0] == "first"]) == SLOTS, seen
    assert preemptions(srv) >= 1
    # every run of A, the paused one included, finished in full
    assert all(ends[t] == ("length", A_TOKENS) for t in a_tags), ends
    assert ends["b"][1] >= 1, ends
