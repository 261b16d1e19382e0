"""Calibrated and mixed-precision 4-bit chat variants (model_store.recipes_int4) on a tiny random Llama:
each recipe builds through the store, loads in the served runner and produces tokens; the mixed graph
keeps exactly the MatMuls its sensitivity measure chose at 8 bits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model_store import ModelStore
from model_store.recipes_int4 import PLAN_FILE, choose_8bit, quantize_weight, relative_error

from .conftest import SMALL_EVAL
from .tiny import tiny_llama

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("int4") / "tiny-llama")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return ModelStore(tmp_path_factory.mktemp("int4-home"), eval_settings=SMALL_EVAL)


def _tokens(path, n: int = 6) -> list[int]:
    from gateway.engines.onnx_causal import OnnxCausalRunner

    runner = OnnxCausalRunner(path, capacity=1, max_seq_len=64, threads=1, prefix_cache_blocks=0)
    logits = runner.prefill(0, [5, 17, 42, 9])
    out = []
    for _ in range(n):
        out.append(int(np.asarray(logits).argmax(-1)))
        logits = runner.decode([0], [out[-1]])[0]
    return out


def _nbits(path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    assert not [n for n in model.graph.node if n.op_type == "MatMul" and "MatMul.weight" in "".join(n.input)]
    return {n.name.rsplit("_Q", 1)[0]: next(a.i for a in n.attribute if a.name == "bits")
            for n in model.graph.node if n.op_type == "MatMulNBits"}


def test_choose_8bit_takes_the_most_sensitive_within_the_budget():
    sizes = {"a": 50, "b": 30, "c": 20, "d": 10}
    errors = {"a": 0.01, "b": 0.05, "c": 0.04, "d": 0.03}
    assert choose_8bit(sizes, errors, 0.5) == ["b", "c"]  # 50 of 110 weights
    assert choose_8bit(sizes, errors, 0.55) == ["b", "c", "d"]
    assert choose_8bit(sizes, errors, 0.0) == []
    assert choose_8bit(sizes, errors, 0.5, first=["a"]) == ["a"]  # the head first, then by error


def test_quantizers_roundtrip_and_calibration_lowers_the_weighted_error():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    # correlated, uneven input channels: what GPTQ's error feedback exploits
    x = rng.standard_normal((512, 64)) @ rng.standard_normal((64, 64)) * np.linspace(0.1, 3.0, 64)
    h = 2.0 / len(x) * x.T @ x
    errs = {}
    for algo in ("rtn", "rtn-asym", "kquant", "gptq"):
        q, scale, zp, deq = quantize_weight(w, 4, algo, 32, h)
        assert q.shape == (48, 64) and q.max() <= 15 and scale.shape == (48 * 2,)
        assert (zp is None) == (algo == "rtn")
        errs[algo] = relative_error(w, deq, h)
        assert 0 < errs[algo] < 0.05
    assert errs["gptq"] < 0.8 * errs["rtn-asym"]
    _, _, _, deq8 = quantize_weight(w, 8, "rtn", 32)
    assert relative_error(w, deq8, h) < errs["rtn"] / 50


def test_mixed_keeps_the_chosen_matmuls_at_8_bits_and_serves(tiny, store):
    art = store.load(str(tiny), task="chat", variant="ort-int4-mixed")
    assert art.variant == "ort-int4-mixed" and art.format == "onnx-genai"
    assert np.isfinite(art.quality["perplexity"]) and np.isfinite(art.quality["perplexity_ratio"])
    plan = json.loads((art.path / PLAN_FILE).read_text())
    bits = _nbits(art.path)
    assert set(bits) == set(plan["matmuls"])  # every MatMul was replaced
    eight = {k for k, v in plan["matmuls"].items() if v["bits"] == 8}
    assert eight and {k for k, b in bits.items() if b == 8} == eight
    assert {k for k, b in bits.items() if b == 4} == set(plan["matmuls"]) - eight
    sizes = {k: v["params"] for k, v in plan["matmuls"].items()}
    errors = {k: v["out_error_4bit"] for k, v in plan["matmuls"].items()}
    assert eight == set(choose_8bit(sizes, errors, plan["mix_fraction"], plan["first"]))
    assert plan["first"] == ["/lm_head/MatMul"] and "/lm_head/MatMul" in eight
    assert sum(sizes[k] for k in eight) <= plan["mix_fraction"] * sum(sizes.values())
    assert plan["calibration_tokens"] > 0
    assert len(_tokens(art.path)) == 6


@pytest.mark.parametrize("variant", ["ort-int4-gptq", "ort-int4-kquant", "ort-int4-hqq"])
def test_int4_recipe_builds_loads_and_serves(tiny, store, variant):
    art = store.load(str(tiny), task="chat", variant=variant)
    assert art.variant == variant
    assert np.isfinite(art.quality["perplexity"])
    bits = _nbits(art.path)
    assert bits and set(bits.values()) == {4}
    vocab = json.loads((tiny / "config.json").read_text())["vocab_size"]
    assert all(0 <= t < vocab for t in _tokens(art.path))
