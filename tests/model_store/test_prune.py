"""Depth pruning (model_store.recipes_prune) on a tiny random 4-layer Llama: the least influential
middle layer is dropped, the pruned variant builds through the store, has fewer layers, is measured
by the gate and still produces tokens in the served runner."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model_store import ModelStore
from model_store.recipes_prune import PLAN_FILE, layers_to_drop

from .conftest import SMALL_EVAL
from .tiny import tiny_llama

pytestmark = pytest.mark.slow


def test_layers_to_drop_picks_the_least_influential_middle_layers():
    influence = [0.01, 0.5, 0.02, 0.3, 0.05, 0.001]
    assert layers_to_drop(influence, 0.2) == [2]  # round(1.2) = 1; layers 0 and 5 are never dropped
    assert layers_to_drop(influence, 0.5) == [2, 3, 4]
    assert layers_to_drop(influence, 0.01) == [2]  # at least one
    assert layers_to_drop(influence, 0.0) == []
    assert layers_to_drop([0.1, 0.2], 0.5) == []  # nothing between the first and the last


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tiny_llama(tmp_path_factory.mktemp("prune") / "tiny-llama-4")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 4
    for f in folder.glob("*.safetensors"):
        f.unlink()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")})
                     ).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("variant", ["pruned-int8", "pruned-int4"])
def test_pruned_variant_has_fewer_layers_and_still_serves(tiny4, tmp_path, variant):
    from gateway.engines.onnx_causal import OnnxCausalRunner

    store = ModelStore(tmp_path / "home", eval_settings=SMALL_EVAL)
    art = store.load(str(tiny4), task="chat", variant=variant)
    assert art.variant == variant
    assert np.isfinite(art.quality["perplexity"]) and np.isfinite(art.quality["perplexity_ratio"])
    plan = json.loads((art.path / PLAN_FILE).read_text())
    assert plan["layers_before"] == 4 and plan["layers_after"] == 3 and len(plan["dropped"]) == 1
    assert plan["dropped"][0] in (1, 2)
    middle = plan["influence"][1:3]
    assert plan["influence"][plan["dropped"][0]] == min(middle)
    genai = json.loads((art.path / "genai_config.json").read_text())["model"]["decoder"]
    assert genai["num_hidden_layers"] == 3
    runner = OnnxCausalRunner(art.path, capacity=1, max_seq_len=64, threads=1, prefix_cache_blocks=0)
    assert runner.layers == 3
    logits = runner.prefill(0, [5, 17, 42, 9])
    tokens = []
    for _ in range(5):
        tokens.append(int(np.asarray(logits).argmax(-1)))
        logits = runner.decode([0], [tokens[-1]])[0]
    vocab = json.loads((tiny4 / "config.json").read_text())["vocab_size"]
    assert len(tokens) == 5 and all(0 <= t < vocab for t in tokens)
