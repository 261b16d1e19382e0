"""EmbedClient: EmbeddingEngine's async API in an API process, with the batcher and encoder in an embedding
core process (gateway/core/embed_core.py).

Tokenization and token-id checks stay here (EmbeddingEngine's own code, on this process's tokenizer); the
core gets token ids and answers with float32 rows as raw bytes. One I/O thread owns the DEALER socket:
it sends what the event loop queues, resolves the waiting futures (one call_soon_threadsafe per loop per
wake-up), and watches the connection: when the core's process dies the socket disconnects at once, every
request in flight fails with a 503, and `ready` turns False until the restarted core says Welcome.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from .. import metrics
from ..engines.base import EngineError, EngineUnavailable, Overloaded
from ..engines.embedder import EmbeddingEngine
from . import embed_wire as wire

log = logging.getLogger("fmgate.core.client")

FAILED = "The embedding engine for this model failed; retry later."


class EmbedClient(EmbeddingEngine):
    def __init__(self, name: str, address: str, tokenizer: Any, connect_timeout: float = 120.0):
        # Not EmbeddingEngine.__init__: no runner and no batcher here.
        self.name = name
        self.address = address
        self.tokenizer = tokenizer
        self._backend = tokenizer.backend_tokenizer
        self._backend.no_truncation()  # too-long input is an error to report, not text to drop
        self._backend.no_padding()
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._lock = threading.Lock()
        self._welcomed = threading.Event()
        self.welcome: wire.Welcome | None = None
        self.up = False
        self._io = _IO(self)
        if not self._welcomed.wait(connect_timeout):
            self._io.stop()
            raise RuntimeError(f"the embedding core of {name} at {address} did not answer in {connect_timeout:.0f}s")

    @classmethod
    def connect(cls, path: Path, cfg: Any, settings: Any) -> EmbedClient:
        from transformers import AutoTokenizer

        return cls(cfg.name, settings.engine_cores[cfg.name], AutoTokenizer.from_pretrained(path))

    @property
    def ready(self) -> bool:
        return self.up

    @property
    def dim(self) -> int:
        return self.welcome.dim

    @property
    def max_length(self) -> int:
        return self.welcome.max_length

    async def aembed_ids(self, batch: Sequence[Sequence[int]], tenant: str = "", weight: float = 1.0) -> np.ndarray:
        if not self.up:
            raise EngineUnavailable(f"The engine for {self.name} is not available; retry later.", retry_after=5)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        rid = next(self._ids)
        with self._lock:
            self._waiting[rid] = (loop, fut)
        self._io.send(wire.Embed(rid, [[int(t) for t in x] for x in batch], tenant, float(weight)))
        try:
            return await fut
        finally:
            with self._lock:
                open_ = self._waiting.pop(rid, None) is not None
            if open_:  # cancelled here (the client hung up): free its queue places in the core
                self._io.send(wire.Cancel(rid))

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError("EmbedClient serves the async API (aembed_ids) only")

    def close(self) -> None:
        self._io.stop()
        self.up = False
        metrics.ENGINE_UP.labels(self.name).set(0)
        self._fail_all(EngineUnavailable("The model was unloaded.", retry_after=5))

    # -- called by the I/O thread --

    def _resolve(self, msgs: list[wire.Vectors | wire.Refused]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for m in msgs:
                entry = self._waiting.pop(m.rid, None)
                if entry is None:
                    continue  # cancelled by its caller
                loop, fut = entry
                result = wire.vectors_in(m) if isinstance(m, wire.Vectors) else _refusal(m)
                by_loop.setdefault(loop, []).append((fut, result))
        for loop, batch in by_loop.items():
            _post(loop, batch)

    def _fail_all(self, exc: Exception) -> None:
        with self._lock:
            entries, self._waiting = list(self._waiting.values()), {}
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for loop, fut in entries:
            by_loop.setdefault(loop, []).append((fut, exc))
        for loop, batch in by_loop.items():
            _post(loop, batch)

    def _welcome(self, w: wire.Welcome) -> None:
        self.welcome = w
        if not self.up:
            log.info("embedding core of %s is up (pid %d)", self.name, w.pid)
        self.up = True
        metrics.ENGINE_UP.labels(self.name).set(1)
        self._welcomed.set()

    def _lost(self) -> None:
        if self.up:
            log.error("embedding core of %s is gone; the model is unavailable until it restarts", self.name)
            metrics.ENGINE_FAILURES.labels(self.name).inc()
        self.up = False
        metrics.ENGINE_UP.labels(self.name).set(0)
        self._fail_all(EngineUnavailable(FAILED, retry_after=5))


def _post(loop: asyncio.AbstractEventLoop, batch: list) -> None:
    try:
        loop.call_soon_threadsafe(_set_all, batch)
    except RuntimeError:  # that loop is closed: nobody waits on those futures any more
        pass


def _set_all(batch: list) -> None:
    for fut, result in batch:
        if fut.done():
            continue
        if isinstance(result, Exception):
            fut.set_exception(result)
        else:
            fut.set_result(result)


def _refusal(r: wire.Refused) -> Exception:
    if r.kind == "engine_error":
        return EngineError(r.message, param=r.param, code=r.code)
    if r.kind == "overloaded":
        return Overloaded(r.message, retry_after=r.retry_after)
    if r.kind == "unavailable":
        return EngineUnavailable(r.message, retry_after=r.retry_after or 5)
    return RuntimeError(r.message)  # the encoder failed: a 500, as in single-process mode


def probe(address: str, timeout: float) -> wire.Welcome | None:
    """Hello -> Welcome on a throwaway socket; None if no answer within `timeout`."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(address)
    try:
        deadline = time.monotonic() + timeout
        s.send(wire.encoder.encode(wire.Hello(os.getpid())))
        while time.monotonic() < deadline:
            if s.poll(200):
                msg = wire.from_core.decode(s.recv())
                if isinstance(msg, wire.Welcome):
                    return msg
        return None
    finally:
        s.close(0)


class _IO:
    """The client's socket thread (the same shape as client._IO, for this wire)."""

    def __init__(self, client: EmbedClient):
        self.client = client
        self.ctx = zmq.Context()
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._wake_addr = f"inproc://fmgate-embed-client-{uuid.uuid4().hex}"
        self._wake_pull = self.ctx.socket(zmq.PULL)
        self._wake_pull.bind(self._wake_addr)
        self._wake_push = self.ctx.socket(zmq.PUSH)
        self._wake_push.setsockopt(zmq.LINGER, 0)
        self._wake_push.connect(self._wake_addr)
        self._push_lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name=f"embed-client-{client.name}", daemon=True)
        self._thread.start()

    def send(self, msg: Any) -> None:
        self._outbox.put(msg)
        with self._push_lock:
            if not self._stopping:
                self._wake_push.send(b"", copy=False)

    def stop(self) -> None:
        with self._push_lock:
            if self._stopping:
                return
            self._stopping = True
            self._wake_push.send(b"", copy=False)
        self._thread.join(timeout=10)
        with self._push_lock:
            self._wake_push.close()
        if not self._thread.is_alive():
            self.ctx.term()

    def _main(self) -> None:
        c = self.client
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, f"{os.getpid()}-{uuid.uuid4().hex[:12]}".encode())
        dealer.setsockopt(zmq.IMMEDIATE, 1)  # nothing queues for a core that is not there
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.SNDHWM, 0)
        dealer.setsockopt(zmq.RCVHWM, 0)
        dealer.setsockopt(zmq.RECONNECT_IVL, 100)
        dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        monitor = dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        dealer.connect(c.address)
        poller = zmq.Poller()
        poller.register(dealer, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        poller.register(self._wake_pull, zmq.POLLIN)
        hello = wire.encoder.encode(wire.Hello(os.getpid()))
        next_hello = 0.0
        try:
            while not self._stopping:
                ready = dict(poller.poll(200))
                if monitor in ready:
                    while True:
                        try:
                            ev = recv_monitor_message(monitor, zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if ev["event"] == zmq.EVENT_DISCONNECTED:
                            c._lost()
                        next_hello = 0.0
                if dealer in ready:
                    results = []
                    while True:
                        try:
                            msg = wire.from_core.decode(dealer.recv(zmq.NOBLOCK))
                        except zmq.Again:
                            break
                        if isinstance(msg, wire.Welcome):
                            c._welcome(msg)
                        else:
                            results.append(msg)
                    if results:
                        c._resolve(results)
                if self._wake_pull in ready:
                    while True:
                        try:
                            self._wake_pull.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                while True:
                    try:
                        msg = self._outbox.get_nowait()
                    except queue.Empty:
                        break
                    try:
                        dealer.send(wire.encoder.encode(msg), zmq.NOBLOCK)
                    except zmq.Again:  # no core connected
                        if isinstance(msg, wire.Embed):
                            c._resolve([wire.Refused(msg.rid, "unavailable",
                                                     f"The engine for {c.name} is not available; retry later.", 5)])
                if not c.up and time.monotonic() >= next_hello:
                    next_hello = time.monotonic() + 0.5
                    try:
                        dealer.send(hello, zmq.NOBLOCK)
                    except zmq.Again:
                        pass
        finally:
            dealer.disable_monitor()
            monitor.close(0)
            dealer.close(0)
            self._wake_pull.close(0)
