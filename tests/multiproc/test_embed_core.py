"""Embedding cores in their own processes (`fmgate serve --engine-process --api-workers 2`), over real HTTP
with the real MiniLM model: the openai SDK's vectors equal the in-process engine's, a burst of
single-sentence requests over both API workers reaches the encoder as one batch (the core's own counters,
read over its socket), a killed core gives 503s in OpenAI's shape and comes back, and SIGTERM leaves no
process behind.

Robustness: every wait polls a condition with a generous deadline, every process started is killed in a
finally, and nothing asserts on time. The burst's batch is deterministic: that server's batcher waits
(up to 10 minutes) for a full batch of BURST inputs, so it runs only once every request is queued."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

from gateway.core.embed_client import probe
from gateway.engines.embedder import EmbeddingEngine
from tests.conftest import EMBED_MODEL, EMBED_SOURCE, Server
from tests.multiproc.test_engine_process import (
    core_address,
    core_pids,
    descendants,
    gone,
    home_for,
    kill_all,
    owner_of,
    start,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

QUEUE_BOUND = 64
BURST = 16
BURST_QUEUE = 20  # the burst server's queue bound, shared by both API workers
CONFIG = f"""
models:
  - name: {EMBED_MODEL}
    source: "{EMBED_SOURCE}"
    task: embed
    max_queued_inputs: {QUEUE_BOUND}
"""
BURST_CONFIG = f"""
models:
  - name: {EMBED_MODEL}
    source: "{EMBED_SOURCE}"
    task: embed
    max_batch_size: {BURST}
    max_wait_ms: 600000
    max_queued_inputs: {BURST_QUEUE}
"""
TEXTS = ["Paris is the capital of France.", "short", "a slightly longer sentence about cats and their naps",
         "The quick brown fox jumps over the lazy dog " * 4] + [f"sentence {i} about rivers and hills" for i in range(16)]


EMBED = "gateway.core.embed_core"
ENV = {"FMGATE_WORKERS": "2", "FMGATE_AUTH": "off"}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def reference(embed_artifact):
    """The engine single-process mode serves, in this process."""
    eng = EmbeddingEngine.from_dir(embed_artifact.path, "reference", threads=2, max_wait_ms=0)
    try:
        yield eng
    finally:
        eng.close()


@pytest.fixture(scope="module")
def ec(store_home, embed_artifact, tmp_path_factory):
    srv = start(home_for(tmp_path_factory.mktemp("ec"), store_home), ENV, CONFIG)
    try:
        yield srv
    finally:
        kill_all(srv)


def test_sdk_vectors_equal_the_single_process_engine(ec, reference):
    assert len(core_pids(ec, EMBED)) == 1
    client = ec.client()
    one = client.embeddings.create(model=EMBED_MODEL, input=TEXTS[0])
    assert len(one.data) == 1 and one.model == EMBED_MODEL and one.usage.prompt_tokens > 0
    got = np.asarray([one.data[0].embedding], dtype=np.float32)
    assert cosines(got, reference.embed(TEXTS[:1])).min() >= 0.99999
    for kw in ({"encoding_format": "float"}, {}):  # unasked, the SDK asks for base64 and decodes it
        many = client.embeddings.create(model=EMBED_MODEL, input=TEXTS, **kw)
        assert [d.index for d in many.data] == list(range(len(TEXTS)))
        got = np.asarray([d.embedding for d in many.data], dtype=np.float32)
        assert got.shape == (len(TEXTS), reference.dim)
        assert cosines(got, reference.embed(TEXTS)).min() >= 0.99999
    ids = reference.tokenize(TEXTS[:3])
    by_ids = client.embeddings.create(model=EMBED_MODEL, input=[x[1:-1] for x in ids])  # [CLS]/[SEP] added
    got = np.asarray([d.embedding for d in by_ids.data], dtype=np.float32)
    assert cosines(got, reference.embed(TEXTS[:3])).min() >= 0.99999


def test_bad_input_is_a_400_in_openai_shape_through_the_core(ec):
    client = ec.client()
    # Refused by the core's batcher: more inputs than its whole queue can ever hold.
    with pytest.raises(openai.BadRequestError) as too_many:
        client.embeddings.create(model=EMBED_MODEL, input=["a few words"] * (QUEUE_BOUND + 1))
    err = too_many.value.body
    assert err["type"] == "invalid_request_error" and err["param"] == "input" and err["code"] == "too_many_inputs"
    # Refused in the API process, where tokenization stays.
    with pytest.raises(openai.BadRequestError) as too_long:
        client.embeddings.create(model=EMBED_MODEL, input="information " * 2000)
    assert too_long.value.body["param"] == "input"
    assert len(client.embeddings.create(model=EMBED_MODEL, input=["a few words"] * QUEUE_BOUND).data) == QUEUE_BOUND


def test_a_killed_embedding_core_gives_503s_then_comes_back(ec, reference):
    [old] = core_pids(ec, EMBED)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: gone(old), "the core to die")
    with httpx.Client(base_url=ec.base_url, timeout=300) as http:
        # The restarted core needs seconds to load the model; this answers at once.
        r = http.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": TEXTS[0]})
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["type"] == "service_unavailable", err
        assert err["code"] in ("engine_unavailable", "engine_failed") and err["message"]
        assert r.headers.get("retry-after")
        wait_for(lambda: http.get("/readyz").status_code == 200, "the restarted core", timeout=300)
        r = http.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": [TEXTS[0]]})
        assert r.status_code == 200, r.text
        got = np.asarray([r.json()["data"][0]["embedding"]], dtype=np.float32)
        assert cosines(got, reference.embed(TEXTS[:1])).min() >= 0.99999
    new = core_pids(ec, EMBED)
    assert new and old not in new


# -- a burst over both API workers, then SIGTERM --

@pytest.fixture(scope="module")
def burst_srv(store_home, embed_artifact, tmp_path_factory):
    srv = start(home_for(tmp_path_factory.mktemp("burst"), store_home), ENV, BURST_CONFIG)
    try:
        yield srv
    finally:
        kill_all(srv)


def pinned_clients(srv: Server, per_worker: int) -> list[httpx.Client]:
    """per_worker one-connection clients on each of the two API workers (a new connection may land on either)."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    by_worker: dict[int, list[httpx.Client]] = {}
    spare: list[httpx.Client] = []
    try:
        for _ in range(400):
            if len(by_worker) == 2 and all(len(v) >= per_worker for v in by_worker.values()):
                break
            c = httpx.Client(base_url=srv.base_url, timeout=900, limits=limits)
            mine = by_worker.setdefault(owner_of(srv, c).pid, [])
            (mine if len(mine) < per_worker else spare).append(c)
        assert len(by_worker) == 2 and all(len(v) == per_worker for v in by_worker.values()), \
            {k: len(v) for k, v in by_worker.items()}
    except BaseException:
        for c in [c for v in by_worker.values() for c in v]:
            c.close()
        raise
    finally:
        for c in spare:
            c.close()
    return [c for v in by_worker.values() for c in v]


def test_a_burst_over_both_api_workers_reaches_the_encoder_as_one_batch(burst_srv, reference):
    """BURST - 1 requests wait in the core's queue (the batch is not full); a request that would overflow
    the queue bound they share is a 429; the last request fills the batch and all are served at once."""
    address = core_address(burst_srv, "embedding core")
    before = probe(address, 30)
    assert before is not None and before.batches == 0 and before.max_queued == BURST_QUEUE
    clients = pinned_clients(burst_srv, BURST // 2)
    texts = [f"client {i} asks about the weather in city number {i}" for i in range(BURST)]
    try:
        def one(i: int) -> httpx.Response:
            return clients[i].post("/v1/embeddings", json={"model": EMBED_MODEL, "input": texts[i]})

        with ThreadPoolExecutor(BURST) as pool:
            waiting = [pool.submit(one, i) for i in range(BURST - 1)]
            wait_for(lambda: (w := probe(address, 30)) is not None and w.live == BURST - 1,
                     "the first requests to queue in the core", timeout=300)
            over = httpx.post(burst_srv.base_url + "/v1/embeddings", timeout=300,
                              json={"model": EMBED_MODEL, "input": ["one more"] * (BURST_QUEUE - BURST + 2)})
            assert over.status_code == 429, over.text
            assert over.json()["error"]["type"] == "rate_limit_error" and over.headers.get("retry-after")
            replies = [one(BURST - 1)] + [f.result() for f in waiting]
            texts = texts[-1:] + texts[:-1]
    finally:
        for c in clients:
            c.close()
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
    got = np.asarray([r.json()["data"][0]["embedding"] for r in replies], dtype=np.float32)
    assert cosines(got, reference.embed(texts)).min() >= 0.99999
    after = probe(address, 30)
    assert after is not None
    # One encoder call held every request: BURST single-sentence requests from two API processes.
    assert (after.batches, after.inputs, after.largest, after.largest_requests) == (1, BURST, BURST, BURST), after


def test_sigterm_leaves_no_process_behind(burst_srv):
    family = [p.pid for p in descendants(burst_srv)]
    try:
        assert len(core_pids(burst_srv, EMBED)) == 1 and len(family) >= 3  # the core and two API workers
        burst_srv.proc.send_signal(signal.SIGTERM)
        burst_srv.proc.wait(300)
        assert burst_srv.proc.returncode == 0, burst_srv.logs[-3000:]
        wait_for(lambda: all(gone(pid) for pid in family), "every child process to exit", timeout=120)
    finally:
        kill_all(burst_srv, family)
