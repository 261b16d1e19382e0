"""What the chat core (engine_core) and the embedding core (embed_core) share: the main thread's ROUTER
loop with its drain, parent-death and client-liveness helpers, and `main`."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import time
from typing import Any

import zmq

log = logging.getLogger("fmgate.core")

DRAIN_S = 30.0


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class CoreLoop:
    """A core's main thread: owns the ROUTER socket, hands each client message to `_handle`, is woken by
    the worker thread through a PULL socket at `wake`, reaps gone clients once a second, and drains
    (up to DRAIN_S) once `stopping` is set. Subclasses set the names below and give the hooks."""

    kind = "engine core"  # for logs
    worker = "scheduler thread"
    items = "sequences"
    wake = "inproc://fmgate-core-wake"
    wire: Any  # the core's wire module (wire or embed_wire)
    engine: Any
    address: str
    parent: int | None
    ctx: zmq.Context
    stopping: bool

    def serve(self) -> int:
        if self.address.startswith("ipc://"):
            try:
                os.unlink(self.address[len("ipc://"):])
            except FileNotFoundError:
                pass
        router = self.router = self.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.SNDHWM, 0)
        router.setsockopt(zmq.RCVHWM, 0)
        router.setsockopt(zmq.LINGER, 2000)
        wake = self.ctx.socket(zmq.PULL)
        wake.bind(self.wake)
        router.bind(self.address)
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        log.info("%s for %s serving at %s (pid %d)", self.kind, self.engine.name, self.address, os.getpid())
        next_check = time.monotonic() + 1.0
        drain_until = None
        code = 0
        while True:
            ready = dict(poller.poll(100))
            woken = wake in ready
            if woken:
                while True:
                    try:
                        wake.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
            self._woken(woken)
            if router in ready:
                while True:
                    try:
                        ident, payload = router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    except ValueError:
                        continue
                    try:
                        msg = self.wire.to_core.decode(payload)
                    except Exception as exc:
                        log.warning("%s: undecodable message from a client: %s", self.kind, exc)
                        continue
                    self._handle(ident, msg)
            if not self._worker_alive() and not self.stopping:
                self._send_last()
                log.error("%s for %s: the %s died; exiting so it restarts", self.kind, self.engine.name, self.worker)
                code = 3
                break
            now = time.monotonic()
            if now >= next_check:
                next_check = now + 1.0
                self._reap_clients()
                if self.parent is not None and os.getppid() != self.parent:
                    self.stopping = True
            if self.stopping:
                if drain_until is None:
                    drain_until = now + DRAIN_S
                    log.info("%s for %s draining %d %s", self.kind, self.engine.name, len(self._live()), self.items)
                if not self._live() or now >= drain_until:
                    break
        if code == 0:
            self._shut_down()
        self._close_pushes()  # their threads have stopped
        router.close()
        wake.close()
        return code

    # -- hooks --

    def _woken(self, woken: bool) -> None:
        """After each poll; `woken`: the worker thread has results to send."""

    def _worker_alive(self) -> bool:
        raise NotImplementedError

    def _send_last(self) -> None:
        """The worker thread died: send what it left."""

    def _live(self) -> dict:
        """The requests in flight, keyed by (client identity, rid)."""
        raise NotImplementedError

    def _shut_down(self) -> None:
        """After a drain: close the engine and send what is left."""

    def _close_pushes(self) -> None:
        pass

    def _reply(self, ident: bytes, msg: Any) -> None:
        self.router.send_multipart([ident, self.wire.encoder.encode(msg)])

    def _handle(self, ident: bytes, msg: Any) -> None:
        """One decoded message from a client."""
        raise NotImplementedError

    def _reap_clients(self) -> None:
        pass


def main(cls: type, prog: str, argv: list[str] | None = None) -> int:
    """A core process: build the engine as the API process would (Registry._engine), serve until stopped."""
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--address", required=True)
    ap.add_argument("--model-json", required=True)
    ap.add_argument("--path", required=True)
    ap.add_argument("--fmt", required=True)
    ap.add_argument("--variant", default="prebuilt")
    ap.add_argument("--parent", type=int, default=None)
    args = ap.parse_args(argv)
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from pathlib import Path

    from .. import logs
    from ..registry import Registry
    from ..settings import ModelConfig, Settings

    settings = Settings(engine_process=False, engine_cores={})
    logs.setup(settings.log_level, settings.log_json)
    if args.parent is not None and os.getppid() != args.parent:
        return 0  # the parent is already gone
    cfg = ModelConfig.model_validate_json(args.model_json)
    served = Registry(settings)._engine(cfg, Path(args.path), args.fmt, args.variant, {})
    core = cls(served.engine, args.address, args.parent)
    signal.signal(signal.SIGTERM, lambda *_: setattr(core, "stopping", True))
    code = core.serve()
    core.ctx.term()
    logging.shutdown()
    os._exit(code)  # no waiting on daemon threads or atexit hooks of the runtime libraries
