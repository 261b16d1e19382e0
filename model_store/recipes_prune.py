"""Depth pruning as a store recipe: drop the decoder layers that change their input least.

A layer's importance is 1 - cos(input, output) of its hidden states on calibration text (ShortGPT's
"block influence"): a layer whose output points where its input did mostly adds nothing. The
`drop_fraction` least important layers are removed (never the first or the last), the smaller
transformers model is saved, and onnxruntime-genai builds it at int8 or int4 like any other
variant. Fewer layers means proportionally less work per token, so the variants compete in the
same perplexity gate as the rest; on a 135M model they usually fail it, on bigger models (which
have more redundant layers) this is where depth pruning pays.

The calibration tokens come after the ones the gate scores (see recipes_int4.CALIB_START).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

from .recipes import BuildContext, _cpu_ort, genai_build, quiet, recipe
from .recipes_int4 import CALIB_LEN, CALIB_START

log = logging.getLogger("fmgate.model_store")

PLAN_FILE = "fmgate_prune.json"
_WEIGHTS = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def layer_influence(model, ids: np.ndarray) -> list[float]:
    """1 - mean cosine between each decoder layer's input and output hidden states, per layer."""
    import torch

    layers = model.model.layers
    seen: dict[int, float] = {}
    hooks = []

    def hook(i):
        def fn(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            seen[i] = float(1.0 - cos.mean())
        return fn

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(hook(i), with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=torch.as_tensor(ids[None, :], dtype=torch.long), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [seen[i] for i in range(len(layers))]


def layers_to_drop(influence: list[float], fraction: float) -> list[int]:
    """The round(fraction * layers) least influential layers, never the first or the last (at least
    one when fraction > 0 and there is a middle layer to drop)."""
    n = len(influence)
    middle = list(range(1, n - 1))
    k = min(len(middle), max(1 if fraction > 0 else 0, round(fraction * n)))
    return sorted(sorted(middle, key=lambda i: influence[i])[:k])


def prune_hf(hf: Path, dest: Path, fraction: float) -> dict:
    """Save `hf` without its least influential layers to `dest`; returns the plan."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from .quality import calibration_text

    model = AutoModelForCausalLM.from_pretrained(str(hf), torch_dtype=torch.float32)
    model.eval()
    ids = Tokenizer.from_file(str(hf / "tokenizer.json")).encode(calibration_text(), add_special_tokens=False).ids
    start = CALIB_START if len(ids) >= CALIB_START + CALIB_LEN else max(0, len(ids) - CALIB_LEN)
    calib = np.asarray(ids[start:start + CALIB_LEN], dtype=np.int64)
    influence = layer_influence(model, calib)
    drop = layers_to_drop(influence, fraction)
    kept = [layer for i, layer in enumerate(model.model.layers) if i not in drop]
    for i, layer in enumerate(kept):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = i
    model.model.layers = torch.nn.ModuleList(kept)
    cfg = model.config
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, list) and len(types) == len(influence):
        cfg.layer_types = [t for i, t in enumerate(types) if i not in drop]
    cfg.num_hidden_layers = len(kept)
    dest.mkdir(parents=True, exist_ok=True)
    for f in hf.iterdir():  # tokenizer, chat template, generation config
        if f.is_file() and f.name != "config.json" and not f.name.endswith(_WEIGHTS) and "index.json" not in f.name:
            shutil.copyfile(f, dest / f.name)
    model.save_pretrained(str(dest))
    plan = {"metric": "1 - cos(layer input, layer output)", "calibration_tokens": int(len(calib)),
            "drop_fraction": fraction, "layers_before": len(influence), "layers_after": len(kept),
            "dropped": drop, "influence": [round(x, 6) for x in influence]}
    (dest / PLAN_FILE).write_text(json.dumps(plan, indent=1))
    return plan


def _build(ctx: BuildContext, precision: str) -> None:
    p = ctx.params
    pruned = ctx.work / "pruned-hf"
    if not (pruned / PLAN_FILE).exists():
        with ctx.step(f"prune {p['drop_fraction']:.0%} of the layers (least influence)"), quiet():
            prune_hf(ctx.hf_dir(), pruned, float(p["drop_fraction"]))
    sub = BuildContext(source=ctx.source, out=ctx.out, work=ctx.work / "genai", params=dict(p),
                       hardware=ctx.hardware, hf_dir=lambda: pruned, step=ctx.step)
    genai_build(sub, precision, {k: p[k] for k in ("block_size", "accuracy_level")})
    shutil.copyfile(pruned / PLAN_FILE, ctx.out / PLAN_FILE)


_PRUNE = {"drop_fraction": 0.1, "metric": "block-influence", "block_size": 32, "accuracy_level": 4,
          "calibration": f"{CALIB_LEN}@{CALIB_START}"}


@recipe("pruned-int8", task="chat", format="onnx-genai", params={"precision": "int8", **_PRUNE},
        applies=_cpu_ort, default=False)
def build_pruned_int8(ctx: BuildContext) -> None:
    """10% of the decoder layers dropped (least influence on calibration text), then genai int8."""
    _build(ctx, "int8")


@recipe("pruned-int4", task="chat", format="onnx-genai", params={"precision": "int4", **_PRUNE},
        applies=_cpu_ort, default=False)
def build_pruned_int4(ctx: BuildContext) -> None:
    """10% of the decoder layers dropped (least influence on calibration text), then genai int4."""
    _build(ctx, "int4")
