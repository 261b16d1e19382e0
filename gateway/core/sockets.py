"""ZeroMQ code shared by the chat and embedding sides: the client's socket thread, its up/down state, and
`probe`.

Each side passes its wire module (gateway/core/wire.py or embed_wire.py): both have Hello(pid), Welcome,
`encoder` and `from_core`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from types import ModuleType
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from .. import metrics
from ..engines.base import EngineError, EngineUnavailable, Overloaded

log = logging.getLogger("fmgate.core.client")


def probe(wire: ModuleType, address: str, timeout: float) -> Any:
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


def post(loop: asyncio.AbstractEventLoop, apply: Callable[[list], None], batch: list) -> None:
    """apply(batch) on that loop's thread (one wake-up for the batch)."""
    try:
        loop.call_soon_threadsafe(apply, batch)
    except RuntimeError:  # that loop is closed: nobody waits there any more
        pass


def refusal(r: Any) -> Exception:
    """The exception for a core's Refused (either wire's)."""
    if r.kind == "engine_error":
        return EngineError(r.message, param=r.param, code=r.code)
    if r.kind == "overloaded":
        return Overloaded(r.message, retry_after=r.retry_after)
    if r.kind == "failed":  # the embedding encoder failed: a 500, as in single-process mode
        return RuntimeError(r.message)
    return EngineUnavailable(r.message, retry_after=r.retry_after or 5)


class CoreClient:
    """What EngineClient and EmbedClient share: the socket thread, `up` (and fmgate_engine_up), and
    failing what is in flight when the core is lost or the client closes. Subclasses set `kind` and
    give `_fail_in_flight(lost)`; their `_welcome` ends with `_came_up(pid)`."""

    kind = "engine core"
    name: str
    address: str

    def _start_io(self, wire: ModuleType, thread_name: str, connect_timeout: float) -> None:
        self._welcomed = threading.Event()
        self.up = False
        self._io = ClientIO(self, wire, thread_name)
        if not self._welcomed.wait(connect_timeout):
            self._io.stop()
            raise RuntimeError(f"the {self.kind} of {self.name} at {self.address} did not answer in "
                               f"{connect_timeout:.0f}s")

    @property
    def ready(self) -> bool:
        return self.up

    def close(self) -> None:
        self._io.stop()
        self.up = False
        metrics.ENGINE_UP.labels(self.name).set(0)
        self._fail_in_flight(lost=False)

    def _fail_in_flight(self, lost: bool) -> None:
        raise NotImplementedError

    def _came_up(self, pid: int) -> None:
        if not self.up:
            log.info("%s of %s is up (pid %d)", self.kind, self.name, pid)
        self.up = True
        metrics.ENGINE_UP.labels(self.name).set(1)
        self._welcomed.set()

    def _lost(self) -> None:
        if self.up:
            log.error("%s of %s is gone; the model is unavailable until it restarts", self.kind, self.name)
            metrics.ENGINE_FAILURES.labels(self.name).inc()
        self.up = False
        metrics.ENGINE_UP.labels(self.name).set(0)
        self._fail_in_flight(lost=True)


class ClientIO:
    """A client's socket thread: owns the DEALER, sends what `send` queues, and says Hello until the core
    answers (again after each disconnect). The client gives `address`, `up`, and three callbacks, all
    called on this thread: `_received(msgs)` (what one wake-up read, in order), `_unsent(msg)` (a message
    no core was connected to take), `_lost()` (the core's connection dropped)."""

    def __init__(self, client: Any, wire: ModuleType, thread_name: str):
        self.client = client
        self.wire = wire
        self.ctx = zmq.Context()
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._wake_addr = f"inproc://fmgate-client-{uuid.uuid4().hex}"
        self._wake_pull = self.ctx.socket(zmq.PULL)
        self._wake_pull.bind(self._wake_addr)
        self._wake_push = self.ctx.socket(zmq.PUSH)
        self._wake_push.setsockopt(zmq.LINGER, 0)
        self._wake_push.connect(self._wake_addr)
        self._push_lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name=thread_name, daemon=True)
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
        c, wire = self.client, self.wire
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
                        next_hello = 0.0  # say Hello at once after a (re)connect or a drop
                if dealer in ready:
                    msgs = []
                    while True:
                        try:
                            msgs.append(wire.from_core.decode(dealer.recv(zmq.NOBLOCK)))
                        except zmq.Again:
                            break
                    if msgs:
                        c._received(msgs)
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
                        c._unsent(msg)
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
