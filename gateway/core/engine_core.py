"""One chat model's engine core: the generation scheduler and runner in a process of their own.

    python -m gateway.core --address ipc:///tmp/x.sock --model-json '{...}' --path DIR --fmt onnx-genai

The engine is built exactly as the API process would build it (Registry._engine), so the scheduler and
runner are the same classes. Two threads:
- the scheduler thread (GenerationScheduler's own) runs steps and hands events to sinks; the sinks only
  collect them, and the batch of a step goes out when the next runner call starts (or at once when a
  sequence finishes), so one step costs one message per client;
- this main thread (core_loop.CoreLoop's loop) owns the ROUTER socket: it decodes Hello/Submit/Abort,
  submits and cancels, and sends each step's batch to each client.
The core exits 3 when its scheduler thread dies (the supervisor restarts it), drains and exits 0 on
SIGTERM, ignores SIGINT (the parent decides), and dies with its parent (PR_SET_PDEATHSIG, and a check).
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import sys
import threading
from typing import Any

import zmq

from . import core_loop, wire
from .core_loop import CoreLoop, pid_alive

log = logging.getLogger("fmgate.core")

class _Flushing:
    """The runner, plus a flush of the previous step's events before each runner call: a step boundary."""

    def __init__(self, runner: Any, flush):
        self._runner = runner
        self._flush = flush
        if hasattr(runner, "prefill_many"):  # only where the runner has it: the scheduler checks with hasattr
            self.prefill_many = self._prefill_many

    def _prefill_many(self, *a, **kw):
        self._flush()
        return self._runner.prefill_many(*a, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def prefill(self, *a, **kw):
        self._flush()
        return self._runner.prefill(*a, **kw)

    def decode(self, *a, **kw):
        self._flush()
        return self._runner.decode(*a, **kw)


class EngineCore(CoreLoop):
    wire = wire

    def __init__(self, engine: Any, address: str, parent: int | None = None):
        self.engine = engine
        self.scheduler = engine.scheduler
        self.address = address
        self.parent = parent
        self.ctx = zmq.Context()
        self._pending: list[tuple[bytes, int, Any]] = []
        self._lock = threading.Lock()
        self._out: queue.SimpleQueue[list] = queue.SimpleQueue()
        self._local = threading.local()
        self._pushes: list[zmq.Socket] = []  # one per thread that flushes; closed at exit
        self.seqs: dict[tuple[bytes, int], Any] = {}
        self.clients: dict[bytes, int] = {}
        self._grammars: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.stopping = False
        self.scheduler.runner = _Flushing(self.scheduler.runner, self.flush)

    # -- the scheduler thread's side --

    def sink(self, ident: bytes, rid: int):
        def put(ev) -> None:
            with self._lock:
                self._pending.append((ident, rid, ev))
            if ev.finish_reason is not None:
                self.flush()
        return put

    def flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:
            return
        self._out.put(batch)
        push = getattr(self._local, "push", None)
        if push is None:
            push = self._local.push = self.ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(self.wake)
            self._pushes.append(push)
        push.send(b"", copy=False)

    # -- the main thread (CoreLoop's hooks first) --

    def _woken(self, woken: bool) -> None:
        if woken:
            self._send_outputs()

    def _worker_alive(self) -> bool:
        return self.scheduler.alive

    def _send_last(self) -> None:
        self.flush()
        self._send_outputs()

    def _live(self) -> dict:
        return self.seqs

    def _shut_down(self) -> None:
        self.engine.close()  # aborts what is left (final events) and stops the thread
        self.flush()
        self._send_outputs()

    def _close_pushes(self) -> None:
        for push in self._pushes:
            push.close()

    def _send_outputs(self) -> None:
        by_client: dict[bytes, list[wire.Out]] = {}
        while True:
            try:
                batch = self._out.get_nowait()
            except queue.Empty:
                break
            for ident, rid, ev in batch:
                by_client.setdefault(ident, []).append(wire.event_out(rid, ev))
                if ev.finish_reason is not None:
                    self.seqs.pop((ident, rid), None)
        for ident, outs in by_client.items():
            self.router.send_multipart([ident, wire.encoder.encode(wire.Outputs(outs))])

    def _handle(self, ident: bytes, msg: Any) -> None:
        if isinstance(msg, wire.Hello):
            self.clients[ident] = msg.pid
            r = self.scheduler.runner
            self._reply(ident, wire.Welcome(
                os.getpid(), int(r.vocab_size), int(r.max_seq_len), int(getattr(r, "capacity", 0) or 0),
                str(getattr(r, "device", "cpu")), bool(getattr(r, "prompt_logits", False)),
                sorted(int(t) for t in self.scheduler.eos), len(self.seqs), len(self.clients),
                int(getattr(self.scheduler, "preemptions", 0))))
        elif isinstance(msg, wire.Abort):
            for rid in msg.rids:
                seq = self.seqs.get((ident, rid))
                if seq is not None:
                    self.scheduler.cancel(seq)
        elif isinstance(msg, wire.Submit):
            self._submit(ident, msg)

    def _submit(self, ident: bytes, msg: wire.Submit) -> None:
        from ..engines.base import EngineError, EngineUnavailable, Overloaded

        rids = [it.rid for it in msg.items]
        if self.stopping:
            self._reply(ident, wire.Refused(rids, "overloaded", "The server is shutting down.", retry_after=5))
            return
        try:
            reqs = []
            for it in msg.items:
                constraint = self._constraint(it.params.grammar) if it.params.grammar else None
                reqs.append((it.prompt, wire.params_in(it.params, constraint), self.sink(ident, it.rid)))
            seqs = self.scheduler.submit_many(reqs)
        except EngineError as exc:
            self._reply(ident, wire.Refused(rids, "engine_error", str(exc), exc.param, exc.code))
            return
        except Overloaded as exc:
            self._reply(ident, wire.Refused(rids, "overloaded", str(exc), retry_after=exc.retry_after))
            return
        except EngineUnavailable as exc:
            self._reply(ident, wire.Refused(rids, "unavailable", str(exc), retry_after=exc.retry_after))
            return
        except Exception as exc:  # a bug must not kill the core: refuse this request only
            log.exception("engine core: submit failed")
            self._reply(ident, wire.Refused(rids, "unavailable", f"The engine could not take the request: {exc}"))
            return
        for rid, seq in zip(rids, seqs, strict=True):
            if not seq.done:
                self.seqs[(ident, rid)] = seq

    def _constraint(self, grammar: str) -> Any:
        """A fresh Constraint from the grammar text, compiled once per text (the API process checked it)."""
        factory = self._grammars.get(grammar)
        if factory is None:
            from ..structured.grammar import _build

            factory = _build(self.engine, grammar, "response_format")
            self._grammars[grammar] = factory
            while len(self._grammars) > 256:
                self._grammars.popitem(last=False)
        else:
            self._grammars.move_to_end(grammar)
        return factory.new()

    def _reap_clients(self) -> None:
        """Cancel the sequences of API processes that are gone (a crashed worker frees its slots)."""
        for ident, pid in list(self.clients.items()):
            if pid_alive(pid):
                continue
            del self.clients[ident]
            gone = [seq for (i, _), seq in self.seqs.items() if i == ident]
            if gone:
                log.warning("engine core for %s: API process %d is gone; cancelling its %d sequences",
                            self.engine.name, pid, len(gone))
            for seq in gone:
                self.scheduler.cancel(seq)


def main(argv: list[str] | None = None) -> int:
    return core_loop.main(EngineCore, "python -m gateway.core", argv)


if __name__ == "__main__":
    sys.exit(main())
