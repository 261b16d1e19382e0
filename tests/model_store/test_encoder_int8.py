"""The per-row int8 encoder (ort-int8-rowwise): batch-invariant, close to fp32, served by the engine.

Built from the real all-MiniLM-L6-v2 wheel model and from a tiny random BERT. No timing asserts: speed
is in docs/embeddings.md.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest

from gateway.engines.embedder import EmbeddingEngine
from gateway.engines.onnx_encoder import OnnxEncoderRunner
from model_store import ModelStore
from model_store.quality import batch_invariance, sentences
from model_store.recipes_encoder import rowwise_int8

from .conftest import MINILM, SMALL_EVAL, needs_minilm

VARIANT = "ort-int8-rowwise"
LONG = "A much longer sentence that pads every other input in its batch, " * 6


def _ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path / "model.onnx")).graph.node)


def _invariance(runner: OnnxEncoderRunner, tok_ids: list[list[int]], long_ids: list[int]) -> float:
    """Lowest cosine of each input alone against the same input in one padded batch with a long one."""
    alone = np.concatenate([runner.encode([ids]) for ids in tok_ids])
    batched = runner.encode(tok_ids + [long_ids])[: len(tok_ids)]
    return batch_invariance(alone, batched)


def _tokenize(folder, texts):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    return [e.ids for e in tok.encode_batch(texts)]


@pytest.fixture(scope="module")
def rowwise(tmp_path_factory):
    """MiniLM's fp32 reference and the per-row int8 variant, built by the store in a fresh home."""
    store = ModelStore(tmp_path_factory.mktemp("rowwise-home"), eval_settings=SMALL_EVAL)
    art = store.load(MINILM, task="embed", variant=VARIANT)
    ref = store.load(MINILM, task="embed", variant="ort-fp32")
    return {"art": art, "ref": ref}


@needs_minilm
def test_manifest_records_invariance_and_cosine_inside_the_gate(rowwise):
    art = rowwise["art"]
    assert art.variant == VARIANT and art.format == "onnx-encoder"
    row = art.manifest["candidates"][0]
    assert row["passes"], row
    assert art.quality["batch_invariance"] >= 0.99999, art.quality
    assert art.quality["cosine_mean"] >= 0.99, art.quality
    ops = _ops(art.path)
    assert ops["MatMulIntegerToFloat"] == 36  # 6 layers x (q, k, v, out, ffn in, ffn out)
    assert ops["MatMul"] == 12  # attention's QK^T and AV stay float: no constant weight
    assert ops["QuantizeLinear"] == 24  # q, k and v share one quantized input per layer
    assert "DynamicQuantizeLinear" not in ops


@needs_minilm
def test_alone_equals_batched_with_padding(rowwise):
    art = rowwise["art"]
    runner = OnnxEncoderRunner(art.path, threads=2)
    texts = sentences()[:12]
    ids = _tokenize(art.path, texts)
    (long_ids,) = _tokenize(art.path, [LONG])
    assert len(long_ids) > 2 * max(len(x) for x in ids)  # the others really are padded
    assert _invariance(runner, ids, long_ids) >= 0.99999
    # Batchmates of other lengths in another order: still the same vectors.
    a = runner.encode(ids)
    b = runner.encode([long_ids] + ids[::-1])[1:][::-1]
    assert batch_invariance(a, b) >= 0.99999


@needs_minilm
def test_close_to_fp32(rowwise):
    art, ref = rowwise["art"], rowwise["ref"]
    texts = sentences()
    ids = _tokenize(art.path, texts)
    got = OnnxEncoderRunner(art.path, threads=2).encode(ids)
    want = OnnxEncoderRunner(ref.path, threads=2).encode(ids)
    cos = np.sum(got * want, axis=1)  # both unit norm
    assert cos.mean() >= 0.99 and cos.min() >= 0.98, (cos.mean(), cos.min())


@needs_minilm
def test_served_by_the_engine(rowwise):
    art = rowwise["art"]
    eng = EmbeddingEngine.from_dir(art.path, "rowwise", threads=2, max_batch_size=8, max_wait_ms=2)
    try:
        texts = sentences()[:6] + [LONG]
        together = eng.embed(texts)
        assert together.shape == (len(texts), 384) and together.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
        alone = np.concatenate([eng.embed([t]) for t in texts])
        assert batch_invariance(alone, together) >= 0.99999
    finally:
        eng.close()


@needs_minilm
def test_competes_in_the_default_gate(minilm):
    """The default load measures the per-row variant beside the others; whichever wins passes the gate."""
    rows = {r["variant"]: r for r in minilm.manifest["candidates"]}
    assert VARIANT in rows
    row = rows[VARIANT]
    assert row["passes"], row
    assert row["quality"]["batch_invariance"] >= 0.99999
    assert row["quality"]["cosine_mean"] >= 0.99
    assert rows[minilm.variant]["passes"]


def test_tiny_bert_rewrite_is_batch_invariant(tiny_models, tmp_path):
    """The rewrite on a tiny random BERT, built by the store from a local folder."""
    store = ModelStore(tmp_path / "home", eval_settings=SMALL_EVAL)
    art = store.load(str(tiny_models["bert"]), task="embed", variant=VARIANT)
    assert art.quality["batch_invariance"] >= 0.99999
    assert _ops(art.path)["MatMulIntegerToFloat"] == 12  # 2 layers x 6
    runner = OnnxEncoderRunner(art.path, threads=1)
    ids = _tokenize(art.path, ["a short one", "rivers and hills", "x"])
    (long_ids,) = _tokenize(art.path, ["the longest input of them all, with many words in it " * 3])
    assert _invariance(runner, ids, long_ids) >= 0.99999


def test_rewrite_refuses_a_graph_without_weights():
    from onnx import TensorProto, helper

    from model_store.errors import StoreError

    g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "g",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3]),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, [3, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])])
    with pytest.raises(StoreError):
        rowwise_int8(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))
