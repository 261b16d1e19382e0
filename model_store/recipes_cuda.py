"""GPU variants: a bf16 (or fp16) torch checkpoint served by gateway/engines/torch_cuda.py.

Registered by `recipes.load_plugins()`. Importing this module is cheap on any machine: torch and the
engine code are imported only inside build and evaluate, which run only where `applies` said a CUDA
device is present (the hardware profile's `cuda` list; `FMGATE_FAKE_HARDWARE` can fake one).

Why torch and not onnxruntime here: the onnxruntime wheels the project pins are CPU builds, and a
CUDA onnxruntime(-genai) would be a second multi-GB dependency; the torch runner with CUDA graphs
(docs/gpu.md) is measured against transformers' own `generate` instead.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from .errors import StoreError
from .hardware import HardwareProfile
from .recipes import BuildContext, EvalContext, recipe
from .sources import Source

MARKER = "fmgate_torch.json"  # same name as gateway.engines.torch_cuda.MARKER (not imported: no torch here)
CAUSAL_TYPES = ("llama", "mistral", "qwen2")
ENCODER_TYPES = ("bert",)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".onnx_data", ".h5", ".msgpack")


def _cc(hw: HardwareProfile) -> float:
    try:
        return float(hw.cuda[0].compute_capability)
    except (IndexError, ValueError):
        return 0.0


def cuda_bf16(hw: HardwareProfile, src: Source) -> tuple[bool, str]:
    if not hw.has_cuda:
        return False, "needs a CUDA device"
    if _cc(hw) < 8.0:
        return False, f"{hw.cuda[0].name} (sm{hw.cuda[0].compute_capability}) has no native bf16; fp16 applies"
    return True, f"CUDA {hw.cuda[0].name}, compute capability {hw.cuda[0].compute_capability}"


def cuda_fp16(hw: HardwareProfile, src: Source) -> tuple[bool, str]:
    if not hw.has_cuda:
        return False, "needs a CUDA device"
    if _cc(hw) >= 8.0:
        return False, "bf16 applies on this device (same speed, wider range)"
    if _cc(hw) < 7.0:
        return False, f"compute capability {hw.cuda[0].compute_capability} is below 7.0"
    return True, f"CUDA {hw.cuda[0].name}, compute capability {hw.cuda[0].compute_capability}"


def device_record(hw: HardwareProfile) -> dict:
    d = hw.cuda[0]
    return {"device_name": d.name, "compute_capability": d.compute_capability, "memory_mb": d.memory_mb}


# --- build ------------------------------------------------------------------------------------

def build_torch(ctx: BuildContext, task: str) -> None:
    """Cast the source checkpoint to the recipe's dtype as one safetensors file, with its tokenizer."""
    import torch
    from safetensors.torch import load_file, save_file

    hf = ctx.hf_dir()
    cfg = json.loads((hf / "config.json").read_text())
    kinds = CAUSAL_TYPES if task == "chat" else ENCODER_TYPES
    if cfg.get("model_type") not in kinds:
        raise StoreError(f"the torch {task} runner supports {', '.join(kinds)} models, not {cfg.get('model_type')!r}")
    dtype_name = ctx.params["dtype"]
    dtype = getattr(torch, dtype_name)
    with ctx.step(f"cast to {dtype_name}"):
        state: dict = {}
        for f in sorted(hf.glob("*.safetensors")):
            state.update(load_file(str(f)))
        if not state:
            for f in sorted(hf.glob("*.bin")):
                state.update(torch.load(str(f), map_location="cpu", weights_only=True))
        if not state:
            raise StoreError(f"{hf}: no safetensors or .bin weights to build a torch variant from")
        if cfg.get("tie_word_embeddings") and "lm_head.weight" in state:
            del state["lm_head.weight"]  # tied: the engine reads the embedding
        out = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
        save_file(out, str(ctx.out / "model.safetensors"), metadata={"format": "pt"})
    for f in hf.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name != "config.json":
            shutil.copy2(f, ctx.out / f.name)
    for sub in ("1_Pooling",):
        if (hf / sub).is_dir():
            shutil.copytree(hf / sub, ctx.out / sub, dirs_exist_ok=True)
    cfg["torch_dtype"] = cfg["dtype"] = dtype_name
    (ctx.out / "config.json").write_text(json.dumps(cfg, indent=2))
    marker = {"format": "torch", "task": task, "arch": cfg["model_type"], "dtype": dtype_name,
              **device_record(ctx.hardware)}
    if task == "embed":
        from .recipes import _encoder_meta

        marker.update(_encoder_meta(hf))
    (ctx.out / MARKER).write_text(json.dumps(marker, indent=2))


# --- evaluate ---------------------------------------------------------------------------------

def _cuda_sync() -> None:
    import torch

    torch.cuda.synchronize()


def evaluate_causal_cuda(folder: Path, ctx: EvalContext) -> dict:
    """Perplexity of the cast weights (transformers, same dtype) and the runner's decode speed (CUDA graphs)."""
    import torch
    from transformers import AutoModelForCausalLM

    from gateway.engines.torch_llama import TorchCausalRunner

    from .quality import calibration_ids

    s = ctx.settings
    ids = calibration_ids(folder, s.ppl_tokens)
    marker = json.loads((folder / MARKER).read_text())
    dtype = getattr(torch, marker.get("dtype", "bfloat16"))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to("cuda").eval()
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, s.ppl_chunk):
            piece = torch.as_tensor(ids[start:start + s.ppl_chunk], device="cuda")[None]
            if piece.shape[1] < 2:
                break
            logits = model(piece).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, piece[0, 1:], reduction="sum"))
            count += piece.shape[1] - 1
    del model
    ppl = math.exp(nll / max(count, 1))
    batches = (1, 8, 64)
    runner = TorchCausalRunner(folder, capacity=max(batches), max_seq_len=512, device="cuda", dtype=dtype)
    speed: dict = {}
    prompt = [int(x) for x in ids[: s.prompt_tokens]]
    for b in batches:
        seqs = list(range(b))
        for q in seqs:
            runner.prefill(q, prompt)
        toks = [1] * b
        for _ in range(3):
            runner.sample(runner.decode(seqs, toks), [])
        _cuda_sync()
        steps = max(s.decode_steps, 32)
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = runner.decode(seqs, toks)
            toks = logits.argmax(-1).tolist()
        speed[f"decode_tok_s_b{b}"] = round(b * steps / (time.perf_counter() - t0), 1)
        for q in seqs:
            runner.release(q)
    # The store's score for chat is the geometric mean at batch 1 and 8; batch 64 is recorded beside it.
    speed["score"] = round(math.sqrt(speed["decode_tok_s_b1"] * speed["decode_tok_s_b8"]), 1)
    return {"quality": {"perplexity": round(ppl, 4), "tokens": int(len(ids))}, "speed": speed,
            "device": device_record(ctx.hardware)}


def evaluate_encoder_cuda(folder: Path, ctx: EvalContext) -> dict:
    import numpy as np
    from tokenizers import Tokenizer

    from gateway.engines.torch_bert import TorchEncoderRunner

    from .quality import sentences

    marker = json.loads((folder / MARKER).read_text())
    import torch

    runner = TorchEncoderRunner(folder, device="cuda", dtype=getattr(torch, marker.get("dtype", "bfloat16")))
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(runner.max_length)
    sents = sentences()
    ids = [e.ids for e in tok.encode_batch(sents)]
    emb = np.concatenate([runner.encode(ids[i:i + 256]) for i in range(0, len(ids), 256)])
    quality: dict = {}
    if ctx.reference is not None:
        ref = ctx.reference / np.linalg.norm(ctx.reference, axis=1, keepdims=True)
        cos = (emb / np.linalg.norm(emb, axis=1, keepdims=True) * ref).sum(1)
        quality = {"cosine_mean": round(float(cos.mean()), 5), "cosine_min": round(float(cos.min()), 5)}
    from .quality import batch_invariance

    alone = np.concatenate([runner.encode([x]) for x in ids[:8]])
    quality["batch_invariance"] = round(batch_invariance(alone, emb[:8]), 7)
    speed: dict = {}
    for b in (ctx.settings.encoder_batch, 256):
        batch = (ids * (b // len(ids) + 1))[:b]
        runner.encode(batch)
        t0 = time.perf_counter()
        rounds = max(ctx.settings.encoder_rounds, 5)
        for _ in range(rounds):
            runner.encode(batch)
        speed[f"sent_s_b{b}"] = round(b * rounds / (time.perf_counter() - t0), 1)
    speed["score"] = speed[f"sent_s_b{ctx.settings.encoder_batch}"]
    return {"quality": quality, "speed": speed, "embeddings": emb, "device": device_record(ctx.hardware)}


# --- the recipes ------------------------------------------------------------------------------

@recipe("torch-bf16-cuda", task="chat", format="torch", params={"dtype": "bfloat16", "runner": "torch-cuda-graphs"},
        applies=cuda_bf16, device="cuda", evaluate=evaluate_causal_cuda)
def build_causal_bf16(ctx: BuildContext) -> None:
    """bf16 checkpoint, served by the torch runner: static KV cache, CUDA-graph decode, GPU sampling."""
    build_torch(ctx, "chat")


@recipe("torch-fp16-cuda", task="chat", format="torch", params={"dtype": "float16", "runner": "torch-cuda-graphs"},
        applies=cuda_fp16, device="cuda", evaluate=evaluate_causal_cuda)
def build_causal_fp16(ctx: BuildContext) -> None:
    """fp16 checkpoint for GPUs without native bf16 (compute capability 7.x)."""
    build_torch(ctx, "chat")


@recipe("torch-bf16-cuda-encoder", task="embed", format="torch", params={"dtype": "bfloat16"},
        applies=cuda_bf16, device="cuda", evaluate=evaluate_encoder_cuda)
def build_encoder_bf16(ctx: BuildContext) -> None:
    """bf16 encoder, served by the torch encoder runner (SDPA, pooling and normalisation on the GPU)."""
    build_torch(ctx, "embed")


@recipe("torch-fp16-cuda-encoder", task="embed", format="torch", params={"dtype": "float16"},
        applies=cuda_fp16, device="cuda", evaluate=evaluate_encoder_cuda)
def build_encoder_fp16(ctx: BuildContext) -> None:
    """fp16 encoder for GPUs without native bf16."""
    build_torch(ctx, "embed")
