"""The embedding queue bound (`max_queued_inputs`) over real HTTP: concurrent requests whose inputs together
exceed it are refused in OpenAI's shape, the queue never holds more than the bound, and it drains after."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.conftest import EMBED_MODEL, EMBED_SOURCE
from tests.e2e.test_operations import sample

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
BOUND, PER_REQUEST, CLIENTS = 64, 48, 16  # each request fits alone; any two together do not
CONFIG = f"""
models:
  - name: {EMBED_MODEL}
    source: "{EMBED_SOURCE}"
    task: embed
    max_queued_inputs: {BOUND}
    max_batch_size: 8
    max_wait_ms: 0
"""


def body(tag: str, n: int) -> dict:
    # Long inputs make encoding slow next to tokenizing, so requests arrive while others are queued.
    return {"model": EMBED_MODEL, "input": [f"{tag} input {i}: " + "rivers run to the sea " * 30 for i in range(n)]}


async def burst(base_url: str, round_: int) -> tuple[list[httpx.Response], float]:
    """CLIENTS requests at once, while /metrics is sampled for the queue depth; returns the responses and
    the deepest queue seen."""
    deepest = 0.0
    done = asyncio.Event()
    async with httpx.AsyncClient(base_url=base_url, timeout=300,
                                 limits=httpx.Limits(max_connections=CLIENTS + 2)) as client:
        async def watch():
            nonlocal deepest
            while not done.is_set():
                text = (await client.get("/metrics")).text
                deepest = max(deepest, sample(text, "fmgate_queue_depth", model=EMBED_MODEL))
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        try:
            responses = await asyncio.gather(*(client.post("/v1/embeddings", json=body(f"r{round_}c{c}", PER_REQUEST))
                                               for c in range(CLIENTS)))
        finally:
            done.set()
            await watcher
    return responses, deepest


def test_concurrent_requests_over_the_queue_bound(start_server):
    srv = start_server(env={"FMGATE_AUTH": "off"}, config=CONFIG)
    before = srv.metrics()
    refused: list[httpx.Response] = []
    served = 0
    # Whether a given request finds room depends on how fast the batcher drains; bursts repeat until one
    # has been refused (the first nearly always is: 16 x 48 inputs against a bound of 64).
    for round_ in range(5):
        responses, deepest = asyncio.run(burst(srv.base_url, round_))
        assert deepest <= BOUND, f"the queue held {deepest} inputs, over its bound of {BOUND}"
        for r in responses:
            assert r.status_code in (200, 429), r.text
            if r.status_code == 200:
                served += 1
                assert len(r.json()["data"]) == PER_REQUEST
            else:
                refused.append(r)
        if refused:
            break
    assert refused, "five bursts of 16 x 48 inputs against a bound of 64 were all served"
    assert served, "requests that fit are served"
    for r in refused:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == "rate_limit_error" and err["code"] == "server_overloaded"
        assert int(r.headers["retry-after"]) >= 1
    after = srv.metrics()
    assert (sample(after, "fmgate_engine_overloaded_total", model=EMBED_MODEL)
            - sample(before, "fmgate_engine_overloaded_total", model=EMBED_MODEL)) == len(refused)
    # The queue drains, and then the whole bound is available to one request.
    deadline = time.monotonic() + 120
    while sample(srv.metrics(), "fmgate_queue_depth", model=EMBED_MODEL) > 0:
        assert time.monotonic() < deadline, "the embedding queue did not drain"
        time.sleep(0.1)
    r = httpx.post(srv.base_url + "/v1/embeddings", json=body("full", BOUND), timeout=300)
    assert r.status_code == 200 and len(r.json()["data"]) == BOUND
    # More inputs than the whole bound could never be queued: a 400 to split the request, not a 429 to retry.
    r = httpx.post(srv.base_url + "/v1/embeddings", json=body("over", BOUND + 1), timeout=300)
    err = r.json()["error"]
    assert r.status_code == 400 and err["type"] == "invalid_request_error" and err["code"] == "too_many_inputs"
