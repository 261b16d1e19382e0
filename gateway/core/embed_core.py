"""One embedding model's core: the dynamic batcher and encoder in a process of their own.

    python -m gateway.core.embed_core --address ipc:///tmp/x.sock --model-json '{...}' --path DIR --fmt onnx-encoder

API processes tokenize and send token ids (embed_wire.Embed); requests from every API process share the
one EmbeddingBatcher queue, so many single-sentence clients spread over several API processes reach the
encoder as large batches. The engine is built as the API process would build it (Registry._engine).
Two threads: the batcher's own, whose done callbacks only queue results and wake this main thread, and
this main thread, which owns the ROUTER socket and sends each result as raw float32 bytes.
Like the chat core: exits 3 when the batcher thread dies, drains and exits 0 on SIGTERM, ignores SIGINT,
and dies with its parent. The main loop and the parent-death and liveness helpers are core_loop's.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
from typing import Any

import zmq

from . import core_loop
from . import embed_wire as wire
from .core_loop import CoreLoop, pid_alive

log = logging.getLogger("fmgate.core")


class EmbedCore(CoreLoop):
    kind = "embedding core"
    worker = "batcher thread"
    items = "requests"
    wake = "inproc://fmgate-embed-core-wake"
    wire = wire

    def __init__(self, engine: Any, address: str, parent: int | None = None):
        self.engine = engine
        self.batcher = engine.batcher
        self.address = address
        self.parent = parent
        self.ctx = zmq.Context()
        self._done: queue.SimpleQueue[tuple[bytes, int, Any, Exception | None]] = queue.SimpleQueue()
        self._push: zmq.Socket | None = None  # the batcher thread's wake socket, made there
        self.jobs: dict[tuple[bytes, int], Any] = {}
        self.clients: dict[bytes, int] = {}
        self.stopping = False

    # -- the batcher thread's side --

    def _callback(self, ident: bytes, rid: int):
        def done(out, err) -> None:
            self._done.put((ident, rid, out, err))
            if self._push is None:  # only the batcher thread calls this: one socket, made on first use
                self._push = self.ctx.socket(zmq.PUSH)
                self._push.setsockopt(zmq.LINGER, 0)
                self._push.connect(self.wake)
            self._push.send(b"", copy=False)
        return done

    # -- the main thread (CoreLoop's hooks first) --

    def _woken(self, woken: bool) -> None:
        self._send_results()

    def _worker_alive(self) -> bool:
        return self.batcher.alive

    def _send_last(self) -> None:
        self._send_results()

    def _live(self) -> dict:
        return self.jobs

    def _shut_down(self) -> None:
        self.engine.close()  # the batcher finishes what is queued, then stops
        self._send_results()
        for ident, rid in list(self.jobs):
            self._reply(ident, wire.Refused(rid, "unavailable", "The server is shutting down.", retry_after=5))

    def _close_pushes(self) -> None:
        if self._push is not None:
            self._push.close()

    def _send_results(self) -> None:
        while True:
            try:
                ident, rid, out, err = self._done.get_nowait()
            except queue.Empty:
                return
            if self.jobs.pop((ident, rid), None) is None:
                continue  # cancelled meanwhile
            if err is None:
                msg: Any = wire.vectors_out(rid, out)
            else:
                msg = _refusal(rid, err)
            self._reply(ident, msg)

    def _handle(self, ident: bytes, msg: Any) -> None:
        if isinstance(msg, wire.Embed):
            self._submit(ident, msg)
        elif isinstance(msg, wire.Cancel):
            job = self.jobs.pop((ident, msg.rid), None)
            if job is not None:
                self.batcher.cancel(job)
        elif isinstance(msg, wire.Hello):
            self.clients[ident] = msg.pid
            st = self.batcher.stats
            self._reply(ident, wire.Welcome(
                os.getpid(), int(self.engine.dim), int(self.engine.max_length), int(self.batcher.max_queued),
                len(self.jobs), len(self.clients), st["batches"], st["inputs"], st["largest"],
                st["largest_requests"]))

    def _submit(self, ident: bytes, msg: wire.Embed) -> None:
        if self.stopping:
            self._reply(ident, wire.Refused(msg.rid, "overloaded", "The server is shutting down.", retry_after=5))
            return
        try:
            job = self.batcher.submit(msg.inputs, self._callback(ident, msg.rid), tenant=msg.tenant,
                                      weight=msg.weight)
        except Exception as exc:  # Overloaded, EngineError; anything else refuses this request only
            self._reply(ident, _refusal(msg.rid, exc))
            return
        self.jobs[(ident, msg.rid)] = job

    def _reap_clients(self) -> None:
        """Cancel the requests of API processes that are gone (a crashed worker frees its queue places)."""
        for ident, pid in list(self.clients.items()):
            if pid_alive(pid):
                continue
            del self.clients[ident]
            for key in [k for k in self.jobs if k[0] == ident]:
                self.batcher.cancel(self.jobs.pop(key))


def _refusal(rid: int, exc: Exception) -> wire.Refused:
    from ..engines.base import EngineError, EngineUnavailable, Overloaded

    if isinstance(exc, EngineError):
        return wire.Refused(rid, "engine_error", str(exc), exc.param, exc.code)
    if isinstance(exc, Overloaded):
        return wire.Refused(rid, "overloaded", str(exc), retry_after=exc.retry_after)
    if isinstance(exc, EngineUnavailable):
        return wire.Refused(rid, "unavailable", str(exc), retry_after=exc.retry_after)
    log.error("embedding core: a request failed: %r", exc)
    return wire.Refused(rid, "failed", f"The embedding engine failed: {type(exc).__name__}")


def main(argv: list[str] | None = None) -> int:
    return core_loop.main(EmbedCore, "python -m gateway.core.embed_core", argv)


if __name__ == "__main__":
    sys.exit(main())
