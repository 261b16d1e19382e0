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
import functools
import itertools
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..engines.base import EngineUnavailable
from ..engines.embedder import EmbeddingEngine
from . import embed_wire as wire
from . import sockets

FAILED = "The embedding engine for this model failed; retry later."


class EmbedClient(sockets.CoreClient, EmbeddingEngine):
    kind = "embedding core"

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
        self.welcome: wire.Welcome | None = None
        self._start_io(wire, f"embed-client-{name}", connect_timeout)

    @classmethod
    def connect(cls, path: Path, cfg: Any, settings: Any) -> EmbedClient:
        from transformers import AutoTokenizer

        return cls(cfg.name, settings.engine_cores[cfg.name], AutoTokenizer.from_pretrained(path))

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

    # -- called by the I/O thread --

    def _resolve(self, msgs: list[wire.Vectors | wire.Refused]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for m in msgs:
                entry = self._waiting.pop(m.rid, None)
                if entry is None:
                    continue  # cancelled by its caller
                loop, fut = entry
                result = wire.vectors_in(m) if isinstance(m, wire.Vectors) else sockets.refusal(m)
                by_loop.setdefault(loop, []).append((fut, result))
        for loop, batch in by_loop.items():
            sockets.post(loop, _set_all, batch)

    def _received(self, msgs: list) -> None:
        results = []
        for msg in msgs:
            if isinstance(msg, wire.Welcome):
                self._welcome(msg)
            else:
                results.append(msg)
        if results:
            self._resolve(results)

    def _unsent(self, msg: Any) -> None:
        if isinstance(msg, wire.Embed):
            self._resolve([wire.Refused(msg.rid, "unavailable",
                                        f"The engine for {self.name} is not available; retry later.", 5)])

    def _fail_all(self, exc: Exception) -> None:
        with self._lock:
            entries, self._waiting = list(self._waiting.values()), {}
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for loop, fut in entries:
            by_loop.setdefault(loop, []).append((fut, exc))
        for loop, batch in by_loop.items():
            sockets.post(loop, _set_all, batch)

    def _welcome(self, w: wire.Welcome) -> None:
        self.welcome = w
        self._came_up(w.pid)

    def _fail_in_flight(self, lost: bool) -> None:
        self._fail_all(EngineUnavailable(FAILED if lost else "The model was unloaded.", retry_after=5))


def _set_all(batch: list) -> None:
    for fut, result in batch:
        if fut.done():
            continue
        if isinstance(result, Exception):
            fut.set_exception(result)
        else:
            fut.set_result(result)


probe = functools.partial(sockets.probe, wire)
