"""The messages between API processes and an embedding core: msgspec structs, msgpack-encoded, over ZeroMQ.

API process (DEALER) -> core (ROUTER): Hello, Embed (one request's token ids), Cancel.
Core -> API process: Welcome (the answer to Hello, with the batcher's counters), Vectors (float32 rows as
raw little-endian bytes, one msgpack bin: no per-float encoding), Refused (nothing was computed).
Request ids are the client's own; the core keys requests by (client identity, rid).
"""

from __future__ import annotations

import msgspec
import numpy as np


class Hello(msgspec.Struct, tag="h", array_like=True):
    pid: int  # the core cancels a client's requests once this process is gone


class Embed(msgspec.Struct, tag="e", array_like=True):
    rid: int
    inputs: list[list[int]]
    tenant: str = ""
    weight: float = 1.0


class Cancel(msgspec.Struct, tag="c", array_like=True):
    rid: int


class Welcome(msgspec.Struct, tag="w", array_like=True):
    pid: int
    dim: int
    max_length: int
    max_queued: int
    live: int = 0  # requests the core holds now
    clients: int = 0  # API processes (and probes) it knows
    batches: int = 0  # encoder calls so far
    inputs: int = 0  # inputs encoded so far
    largest: int = 0  # inputs in the largest encoder call
    largest_requests: int = 0  # distinct requests in that call


class Vectors(msgspec.Struct, tag="v", array_like=True):
    rid: int
    rows: int
    data: bytes  # float32, little-endian, rows x dim


class Refused(msgspec.Struct, tag="r", array_like=True):
    rid: int
    kind: str  # engine_error | overloaded | unavailable | failed
    message: str
    param: str | None = None
    code: str | None = None
    retry_after: float = 1.0


ToCore = Hello | Embed | Cancel
FromCore = Welcome | Vectors | Refused

encoder = msgspec.msgpack.Encoder()
to_core = msgspec.msgpack.Decoder(ToCore)
from_core = msgspec.msgpack.Decoder(FromCore)


def vectors_out(rid: int, out: np.ndarray) -> Vectors:
    return Vectors(rid, int(out.shape[0]), np.ascontiguousarray(out, dtype="<f4").tobytes())


def vectors_in(v: Vectors) -> np.ndarray:
    return np.frombuffer(v.data, dtype="<f4").reshape(v.rows, -1)
