"""A sequence that keeps every decode step at two rows or more.

On CPUs without AVX-512 VNNI, onnxruntime's 4-bit MatMulNBits kernel (int8 activations) computes a step of
one row by another path than a step of several: one matmul differs from the sixth digit on, SmolLM2's
logits by up to 0.54, and greedy text can part late. Rows of a step of two or more are exact whatever
their neighbours. Tests that compare a sequence alone with the same sequence in a batch run both beside
this one (docs/reliability.md)."""

from __future__ import annotations

import queue
from contextlib import contextmanager

from gateway.engines.base import SamplingParams


@contextmanager
def neighbour(engine):
    first: queue.Queue = queue.Queue()
    seq = engine.submit(engine.chat_prompt([{"role": "user", "content": "Count to one hundred."}]),
                        SamplingParams(max_tokens=1024, temperature=0, ignore_eos=True), first.put)
    ev = first.get(timeout=60)  # decoding before the sequences under test arrive
    assert ev.token_id is not None, ev
    try:
        yield
    finally:
        engine.cancel(seq)
