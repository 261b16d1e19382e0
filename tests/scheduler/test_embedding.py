"""The dynamic embedding batcher with the real MiniLM artifact (no HTTP)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from gateway.engines.base import EngineError, Overloaded
from gateway.engines.embedder import EmbeddingEngine

TEXTS = ["short", "a slightly longer sentence about cats", "The quick brown fox jumps over the lazy dog " * 5,
         "Embeddings map text to vectors.", "hello world", "Paris is the capital of France."]


@pytest.fixture(scope="module")
def engine(embed_artifact):
    eng = EmbeddingEngine.from_dir(embed_artifact.path, "test-embed", threads=2, max_batch_size=8, max_wait_ms=5)
    yield eng
    eng.close()


def test_batched_equals_one_at_a_time(engine):
    alone = np.stack([engine.embed([t])[0] for t in TEXTS])
    together = engine.embed(TEXTS)
    cos = np.sum(alone * together, axis=1)
    assert np.all(cos > 1 - 1e-5), cos
    out: list = [None] * len(TEXTS)

    def run(i):
        out[i] = engine.embed([TEXTS[i]])[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(TEXTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert np.all(np.sum(np.stack(out) * alone, axis=1) > 1 - 1e-5)


def test_unit_norm(engine):
    np.testing.assert_allclose(np.linalg.norm(engine.embed(TEXTS), axis=1), 1.0, atol=1e-5)


class _HeldRunner:
    """The real encoder behind a gate: the first batch waits until released, so nothing leaves the queue
    while the test fills it and the queue's length is then its maximum."""

    def __init__(self, runner):
        self.runner = runner
        self.dim = runner.dim
        self.max_length = runner.max_length
        self.gate = threading.Event()
        self.started = threading.Event()

    def encode(self, batch):
        self.started.set()
        self.gate.wait(120)
        return self.runner.encode(batch)


def test_concurrent_requests_over_the_bound_are_refused_and_the_queue_drains(embed_artifact):
    bound, per_request, clients = 16, 3, 12  # 36 inputs asked for at once against a bound of 16
    eng = EmbeddingEngine.from_dir(embed_artifact.path, "tiny", threads=2, max_queued=bound, max_batch_size=4,
                                   max_wait_ms=0)
    held = _HeldRunner(eng.batcher.runner)
    eng.batcher.runner = held
    try:
        with pytest.raises(EngineError) as too_many:  # one request alone over the bound can never fit: a 400
            eng.batcher.submit([[101, 102]] * (bound + 1), lambda out, err: None)
        assert too_many.value.param == "input" and too_many.value.code == "too_many_inputs"
        first_done = threading.Event()
        eng.batcher.submit(eng.tokenize(["hold the runner"]), lambda out, err: first_done.set())
        assert held.started.wait(60)  # the runner holds its first batch: from here the queue only grows
        texts = [[f"client {c} sentence {i} about rivers" for i in range(per_request)] for c in range(clients)]
        ids = [eng.tokenize(t) for t in texts]
        results: dict[int, np.ndarray] = {}
        refused: dict[int, Overloaded] = {}
        finished = threading.Semaphore(0)
        barrier = threading.Barrier(clients)

        def client(c):
            def done(out, err):
                assert err is None
                results[c] = out.copy()
                finished.release()

            barrier.wait(30)
            try:
                eng.batcher.submit(ids[c], done)
            except Overloaded as exc:
                refused[c] = exc

        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        accepted = clients - len(refused)
        # Exactly the requests that fit were queued, whatever order they came in; the rest were refused
        # with a Retry-After, and the queue (whose length cannot fall while the runner is held) stays bounded.
        assert accepted == bound // per_request and len(refused) == clients - accepted
        assert eng.batcher.busy == accepted * per_request <= bound
        assert all(exc.retry_after >= 1 for exc in refused.values())
        held.gate.set()
        assert first_done.wait(60)
        for _ in range(accepted):
            assert finished.acquire(timeout=60), "an accepted request never finished"
        assert eng.batcher.busy == 0
        for c, vecs in results.items():  # each accepted request got its own inputs' vectors
            alone = np.stack([eng.embed([t])[0] for t in texts[c]])
            assert np.all(np.sum(vecs * alone, axis=1) > 1 - 1e-5)
        # Drained, the whole bound is available again.
        assert eng.embed(["again"] * bound).shape == (bound, eng.dim)
    finally:
        held.gate.set()
        eng.close()


class _GatedRunner:
    """A fake encoder that holds its first batch until released and records who was encoded when."""

    dim = 4
    max_length = 512

    def __init__(self):
        self.gate = threading.Event()
        self.order: list[int] = []
        self.started = threading.Event()

    def encode(self, batch):
        self.started.set()
        self.gate.wait(60)
        self.order.extend(ids[0] for ids in batch)
        return np.ones((len(batch), self.dim), dtype=np.float32) / 2


def test_batcher_shares_fairly_between_tenants():
    from gateway.scheduler.embedding import EmbeddingBatcher

    runner = _GatedRunner()
    batcher = EmbeddingBatcher(runner, name="fair-test", max_batch_size=2, max_wait_ms=0)
    done = threading.Event()
    left = [3]

    def finished(out, err):
        left[0] -= 1
        if left[0] == 0:
            done.set()

    try:
        batcher.submit([[1, 5]], finished, tenant="A")  # occupies the runner while the queue builds
        assert runner.started.wait(60)
        batcher.submit([[1, 5, 6, 7]] * 40, finished, tenant="A")  # A's backlog: ids start with 1
        batcher.submit([[2, 5, 6, 7]], finished, tenant="B")  # B arrives last
        runner.gate.set()
        assert done.wait(60)
        # FCFS would encode B's input last (position 41); fairly it comes after about one turn of A's
        # (32 tokens of credit: 8 of A's 4-token inputs).
        assert runner.order.index(2) <= 10, runner.order
    finally:
        runner.gate.set()
        batcher.shutdown()
