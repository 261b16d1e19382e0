"""Dynamic batching for embeddings. Knows nothing of HTTP or asyncio.

Inputs from all requests share one queue, shared fairly between tenants (deficit round robin on
input tokens, see fair.py; `fairness="fcfs"` for first come, first served). The batcher thread waits
at most `max_wait_ms` after the first input for company, takes up to `max_batch_size` inputs, sorts them by length
and cuts them into sub-batches whose padded size stays under `max_batch_tokens`, so short
inputs are not padded to the longest one in the window.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .. import metrics
from ..engines.base import EncoderRunner, EngineError, Overloaded
from .fair import FairQueue

log = logging.getLogger("fmgate.scheduler")

Done = Callable[[np.ndarray | None, Exception | None], None]


@dataclass(eq=False)
class EmbedJob:
    inputs: list[list[int]]
    done: Done
    out: np.ndarray | None = None
    left: int = 0
    cancelled: bool = False
    failed: bool = False
    tenant: str = ""
    weight: float = 1.0
    t_submit: float = field(default_factory=time.monotonic)


class EmbeddingBatcher:
    def __init__(
        self,
        runner: EncoderRunner,
        *,
        name: str = "model",
        max_batch_size: int = 64,
        max_batch_tokens: int = 16384,
        max_wait_ms: float = 3.0,
        max_queued: int = 8192,
        fairness: str | None = None,
    ):
        self.runner = runner
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait_ms / 1000.0
        self.max_queued = max_queued
        self._cv = threading.Condition()
        self._queue: FairQueue[tuple[EmbedJob, int]] = FairQueue(
            fairness, quantum=32, cost=_input_tokens, key=lambda it: (it[0].tenant, it[0].weight))
        self._stopping = False
        self._depth = metrics.QUEUE_DEPTH.labels(name)  # looked up once: labels() costs a lock and a dict
        self._batch_size = metrics.BATCH_SIZE.labels(name, "embed")
        self._rate = 200.0  # inputs per second, moving average, for Retry-After
        # Encoder calls, inputs encoded, and the largest call (inputs, distinct requests) so far.
        self.stats = {"batches": 0, "inputs": 0, "largest": 0, "largest_requests": 0}
        self._thread = threading.Thread(target=self._loop, name=f"embed-{name}", daemon=True)
        self._thread.start()

    def submit(self, inputs: Sequence[Sequence[int]], done: Done, tenant: str = "", weight: float = 1.0) -> EmbedJob:
        if len(inputs) > self.max_queued:  # it could never fit: a 400, not a 429 to retry forever
            raise EngineError(f"This request has {len(inputs)} inputs; {self.name} queues at most "
                              f"{self.max_queued}. Split it into smaller requests.", param="input",
                              code="too_many_inputs")
        job = EmbedJob(inputs=[list(x) for x in inputs], done=done, left=len(inputs), tenant=tenant, weight=weight)
        job.out = np.empty((len(inputs), self.runner.dim), dtype=np.float32)
        with self._cv:
            if self._stopping:
                raise Overloaded("The server is shutting down.", retry_after=5)
            if len(self._queue) + len(inputs) > self.max_queued:
                raise Overloaded(
                    f"Too many queued inputs for {self.name}; retry shortly.",
                    retry_after=max(1.0, len(self._queue) / self._rate),
                )
            before = len(self._queue)
            for i in range(len(inputs)):
                self._queue.push((job, i))
            self._depth.set(len(self._queue))
            # The batcher thread waits for a first input, then for a full batch (or its deadline): wake it
            # only for those, not once per request (each wake-up is a GIL hand-over for nothing).
            if before == 0 or len(self._queue) >= self.max_batch_size:
                self._cv.notify()
        return job

    def cancel(self, job: EmbedJob) -> None:
        job.cancelled = True
        with self._cv:  # free its queue places now
            self._queue.remove_if(lambda it: it[0] is job)

    @property
    def busy(self) -> int:
        return len(self._queue)

    @property
    def alive(self) -> bool:
        """False once the batcher thread has stopped (shut down, or died)."""
        return self._thread.is_alive()

    def shutdown(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self._queue:
                    return
                deadline = time.monotonic() + self.max_wait
                while len(self._queue) < self.max_batch_size and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                take = []
                while self._queue and len(take) < self.max_batch_size:
                    job, i = self._queue.pop()
                    if not job.cancelled and not job.failed:
                        take.append((job, i))
                self._depth.set(len(self._queue))
            if take:
                self._run(take)

    def _run(self, items: list[tuple[EmbedJob, int]]) -> None:
        items.sort(key=lambda it: len(it[0].inputs[it[1]]))
        start = 0
        t0 = time.monotonic()
        while start < len(items):
            # Grow the sub-batch while its padded size (longest x count) fits the token budget.
            end = start + 1
            while end < len(items):
                width = len(items[end][0].inputs[items[end][1]])
                if width * (end - start + 1) > self.max_batch_tokens:
                    break
                end += 1
            chunk = items[start:end]
            try:
                vecs = self.runner.encode([job.inputs[i] for job, i in chunk])
            except Exception as exc:
                log.exception("embedding batch failed for %s", self.name)
                for job, _ in chunk:
                    if not job.failed:
                        job.failed = True
                        job.done(None, exc)
                start = end
                continue
            self._batch_size.observe(len(chunk))
            st = self.stats
            st["batches"] += 1
            st["inputs"] += len(chunk)
            if len(chunk) > st["largest"]:
                st["largest"], st["largest_requests"] = len(chunk), len({id(job) for job, _ in chunk})
            for (job, i), vec in zip(chunk, vecs, strict=True):
                if job.failed:
                    continue
                job.out[i] = vec
                job.left -= 1
                if job.left == 0:
                    job.done(job.out, None)
            start = end
        elapsed = max(time.monotonic() - t0, 1e-6)
        self._rate = 0.8 * self._rate + 0.2 * (len(items) / elapsed)


def _input_tokens(item: tuple[EmbedJob, int]) -> int:
    job, i = item
    return len(job.inputs[i]) or 1
