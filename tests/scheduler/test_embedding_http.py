"""/v1/embeddings over real HTTP: base64 and float replies carry the same float32 vectors, on the
small-request path (tokenized and encoded on the event loop) and the large one (worker threads)."""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import pytest

from gateway.api import serving_embeddings as se

from ..conftest import EMBED_MODEL, EMBED_SOURCE

QUEUE_BOUND = 256  # max_queued_inputs: a request with more inputs can never fit
CONFIG = f"""
models:
  - name: {EMBED_MODEL}
    source: "{EMBED_SOURCE}"
    task: embed
    max_queued_inputs: {QUEUE_BOUND}
"""

SMALL = ["Paris is the capital of France."]
FEW = ["short", "a slightly longer sentence about cats", "Embeddings map text to vectors."]
MANY = [f"sentence number {i} about rivers, hills and the weather in spring" for i in range(se.INLINE_ROWS + 12)]
# One input over the inline character budget, inside the model's 256 tokens ("information" is one token).
LONG_TEXT = ["information " * (se.INLINE_CHARS // 12 + 10)]


@pytest.fixture(scope="module")
def srv(start_server, embed_artifact):
    return start_server(env={"FMGATE_AUTH": "off"}, config=CONFIG)


def _post(srv, inputs, fmt: str | None = None) -> dict:
    body = {"model": EMBED_MODEL, "input": inputs}
    if fmt:
        body["encoding_format"] = fmt
    r = httpx.post(srv.base_url + "/v1/embeddings", json=body, timeout=120)
    assert r.status_code == 200, r.text + "\n" + srv.logs[-3000:]
    return r.json()


def _floats(reply: dict) -> np.ndarray:
    return np.asarray([d["embedding"] for d in reply["data"]], dtype=np.float32)


def _b64(reply: dict) -> np.ndarray:
    return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in reply["data"]])


def test_paths_are_chosen_as_described():
    assert se._small(SMALL) and se._small(FEW)
    assert not se._small(MANY) and not se._small(LONG_TEXT)
    assert se._small([[101, 2023, 102]]) and not se._small([[5] * se.INLINE_CHARS])


@pytest.mark.parametrize("inputs", [SMALL, FEW, MANY, LONG_TEXT], ids=["one", "few", "many", "long"])
def test_base64_equals_float(srv, inputs):
    as_float = _post(srv, inputs)
    as_b64 = _post(srv, inputs, "base64")
    f, b = _floats(as_float), _b64(as_b64)
    assert f.shape == b.shape == (len(inputs), 384)
    # The float reply writes each float32 in its shortest form: read back as float32 it is the same bits.
    np.testing.assert_array_equal(f, b)
    assert [d["index"] for d in as_float["data"]] == list(range(len(inputs)))
    assert [d["index"] for d in as_b64["data"]] == list(range(len(inputs)))
    assert all(d["object"] == "embedding" for d in as_b64["data"])
    assert as_float["usage"] == as_b64["usage"] and as_float["usage"]["prompt_tokens"] > 0
    assert as_float["model"] == as_b64["model"] == EMBED_MODEL
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-5)


def test_token_ids_equal_text(srv, embed_artifact):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(embed_artifact.path / "tokenizer.json"))
    tok.no_padding()  # the saved tokenizer pads to a fixed length
    ids = [e.ids[1:-1] for e in tok.encode_batch(FEW)]  # the server adds [CLS] and [SEP] itself
    by_text = _b64(_post(srv, FEW, "base64"))
    by_ids = _b64(_post(srv, ids, "base64"))
    assert np.min(np.sum(by_text * by_ids, axis=1)) >= 0.99999


def test_concurrent_single_sentences_equal_alone(srv):
    """32 clients with one sentence each (batched together on the engine) get the vectors each gets alone."""
    texts = [f"client {i} asks about the weather in city number {i}" for i in range(32)]
    alone = np.concatenate([_b64(_post(srv, [t], "base64")) for t in texts[:4]])

    async def run() -> list[dict]:
        async with httpx.AsyncClient(timeout=120) as c:
            async def one(t):
                r = await c.post(srv.base_url + "/v1/embeddings",
                                 json={"model": EMBED_MODEL, "input": [t], "encoding_format": "base64"})
                assert r.status_code == 200, r.text
                return r.json()

            return await asyncio.gather(*(one(t) for t in texts))

    replies = asyncio.run(run())
    together = np.concatenate([_b64(r) for r in replies])
    assert together.shape == (32, 384)
    assert np.min(np.sum(alone * together[:4], axis=1)) >= 0.99999


def test_more_inputs_than_the_whole_queue_is_a_400_not_a_429(srv):
    r = httpx.post(srv.base_url + "/v1/embeddings", timeout=120,
                   json={"model": EMBED_MODEL, "input": ["a few words"] * (QUEUE_BOUND + 1)})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "input" and err["code"] == "too_many_inputs"
    assert str(QUEUE_BOUND) in err["message"]
    assert _post(srv, ["a few words"] * QUEUE_BOUND)["data"][-1]["index"] == QUEUE_BOUND - 1  # the bound fits
