"""Loads a "torch" artifact into an engine: torch runners on a CUDA device, sized from free GPU memory,
or on the CPU (FMGATE_TORCH_DEVICE=cpu).

The registry imports this module only for artifacts of format "torch" (a CPU box never does). An
artifact is a folder holding a Hugging Face checkpoint in bf16 or fp16 (config.json, *.safetensors),
its tokenizer files, and the marker `fmgate_torch.json`:

    {"format": "torch", "task": "chat" | "embed", "arch": "llama", "dtype": "bfloat16",
     "device_name": "NVIDIA H200", "compute_capability": "9.0",
     # encoders also: "pooling", "normalize", "dim", "max_length" (the ONNX encoder's keys)
    }

Scheduler sizing (chat): the KV cache gets `FMGATE_GPU_KV_FRACTION` (default 0.5) of the GPU memory
free after the weights, less a reserve for activations and CUDA graphs; `max_num_seqs` is what fits
at `max_model_len` tokens per sequence, capped at 256 unless the model's config sets it explicitly
(then the config wins, down to what fits). `FMGATE_TORCH_DEVICE=cpu` runs the same engines on the
CPU in float32 (tests, debugging).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import EngineError

log = logging.getLogger("fmgate.engine")

MARKER = "fmgate_torch.json"
DEFAULT_MAX_SEQS = 256  # when the config leaves max_num_seqs at its default
KV_FRACTION = 0.5
RESERVE_BYTES = 2 << 30  # activations, graph pools, cuBLAS workspaces, the logits buffers
GPU_EMBED_BATCH = 256  # a full batch goes at once; the batcher waits for company only below it
GPU_EMBED_WAIT_MS = 0.5
GPU_EMBED_BATCH_TOKENS = 131072


@dataclass(frozen=True)
class KVPlan:
    per_seq_bytes: int
    budget_bytes: int
    fits: int  # sequences of max_model_len tokens that fit the budget
    max_num_seqs: int
    why: str


def kv_bytes_per_seq(layers: int, kv_heads: int, head_dim: int, max_len: int, dtype_bytes: int = 2) -> int:
    """K and V for every layer at full context: what one sequence slot costs."""
    return 2 * layers * kv_heads * head_dim * max_len * dtype_bytes


def plan_kv(free_bytes: int, weight_bytes: int, per_seq_bytes: int, *, requested: int | None = None,
            fraction: float = KV_FRACTION, reserve_bytes: int = RESERVE_BYTES,
            default_max: int = DEFAULT_MAX_SEQS) -> KVPlan:
    """KV budget = fraction x (free - weights - reserve); max_num_seqs = min(fits, requested or default_max)."""
    if per_seq_bytes <= 0:
        raise ValueError("per_seq_bytes must be positive")
    budget = int(max(0, free_bytes - weight_bytes - reserve_bytes) * fraction)
    fits = budget // per_seq_bytes
    if fits < 1:
        raise EngineError(
            f"not enough GPU memory for one sequence: {free_bytes >> 20} MiB free, weights {weight_bytes >> 20} MiB, "
            f"one sequence's KV cache {per_seq_bytes >> 20} MiB; lower max_model_len")
    want = requested if requested is not None else default_max
    n = max(1, min(fits, want))
    why = (f"KV budget {budget >> 20} MiB ({fraction:.0%} of free after weights and reserve) holds {fits} "
           f"sequences of {per_seq_bytes >> 20} MiB; max_num_seqs {n}"
           + (" (config)" if requested is not None and n == requested else
              " (capped by memory)" if n == fits else " (default cap)"))
    return KVPlan(per_seq_bytes, budget, int(fits), int(n), why)


def read_marker(path: Path) -> dict:
    f = Path(path) / MARKER
    if f.exists():
        return json.loads(f.read_text())
    cfg = json.loads((Path(path) / "config.json").read_text())
    task = "embed" if cfg.get("model_type") == "bert" else "chat"
    return {"format": "torch", "task": task, "dtype": "bfloat16"}


def device_info(index: int = 0) -> dict:
    """Name and compute capability of a CUDA device, for manifests and markers."""
    import torch

    p = torch.cuda.get_device_properties(index)
    return {"device_name": p.name, "compute_capability": f"{p.major}.{p.minor}",
            "memory_mb": int(p.total_memory // (1 << 20))}


def _explicit(cfg: Any, field: str) -> bool:
    return field in getattr(cfg, "model_fields_set", set())


def _dtype(name: str, device: str):
    import torch

    if device == "cpu":
        return torch.float32
    return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
            "fp16": torch.float16}.get(name, torch.bfloat16)


def _weight_bytes(path: Path, dtype_bytes: int) -> int:
    """Parameter bytes at the serving dtype, read from the safetensors headers (no tensor is loaded)."""
    total = 0
    for f in Path(path).glob("*.safetensors"):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                count = 1
                for d in v["shape"]:
                    count *= d
                total += count * dtype_bytes
    return total


def pick_device() -> str:
    import torch

    want = os.environ.get("FMGATE_TORCH_DEVICE", "").strip()
    if want:
        return want
    if not torch.cuda.is_available():
        raise EngineError("this is a CUDA variant and no CUDA device is available; serve a CPU variant")
    return "cuda"


def _tune_gil() -> None:
    """The scheduler thread must win the GIL back quickly after each GPU step: 5 ms (Python's default
    switch interval) is longer than a whole decode step. FMGATE_GIL_SWITCH_MS=0 keeps the default."""
    ms = float(os.environ.get("FMGATE_GIL_SWITCH_MS", "0.5"))
    if ms > 0:
        sys.setswitchinterval(ms / 1000.0)


def load(path: Path, cfg: Any, threads: int = 0):
    """Build the engine for a "torch" artifact: an LLMEngine (chat) or an EmbeddingEngine (embed)."""
    import torch

    from .embedder import EmbeddingEngine
    from .llm import LLMEngine

    path = Path(path)
    marker = read_marker(path)
    device = pick_device()
    dtype = _dtype(marker.get("dtype", "bfloat16"), device)
    if device == "cpu" and threads:
        torch.set_num_threads(threads)
    if device.startswith("cuda"):
        _tune_gil()
    task = marker.get("task", getattr(cfg, "task", "chat"))

    if task == "embed":
        from .torch_bert import TorchEncoderRunner

        runner = TorchEncoderRunner(path, device=device, dtype=dtype)
        gpu = device.startswith("cuda")
        opts = {
            "max_batch_size": cfg.max_batch_size if _explicit(cfg, "max_batch_size") or not gpu else GPU_EMBED_BATCH,
            "max_wait_ms": cfg.max_wait_ms if _explicit(cfg, "max_wait_ms") or not gpu else GPU_EMBED_WAIT_MS,
            "max_batch_tokens": GPU_EMBED_BATCH_TOKENS if gpu else 16384,
            "max_queued": cfg.max_queued * 32,
        }
        runner.encode([[101, 102]] * 8)  # warm-up: kernels chosen, allocator primed
        log.info("model %s: torch encoder on %s (%s), batch %d", cfg.name, device, dtype, opts["max_batch_size"])
        return EmbeddingEngine.from_dir(path, cfg.name, runner=runner, **opts)

    from .torch_llama import TorchCausalRunner, read_config

    mcfg = read_config(path)
    layers = int(mcfg["num_hidden_layers"])
    heads = int(mcfg["num_attention_heads"])
    kv_heads = int(mcfg.get("num_key_value_heads") or heads)
    head_dim = int(mcfg.get("head_dim") or int(mcfg["hidden_size"]) // heads)
    max_len = min(int(cfg.max_model_len), int(mcfg.get("max_position_embeddings") or cfg.max_model_len))
    dbytes = torch.empty((), dtype=dtype).element_size()
    per_seq = kv_bytes_per_seq(layers, kv_heads, head_dim, max_len, dbytes)
    requested = cfg.max_num_seqs if _explicit(cfg, "max_num_seqs") else None
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        fraction = float(os.environ.get("FMGATE_GPU_KV_FRACTION", KV_FRACTION))
        plan = plan_kv(free, _weight_bytes(path, dbytes), per_seq, requested=requested, fraction=fraction)
    else:
        plan = KVPlan(per_seq, per_seq * cfg.max_num_seqs, cfg.max_num_seqs, cfg.max_num_seqs, "CPU: config")
    log.info("model %s: %s", cfg.name, plan.why)
    runner = TorchCausalRunner(path, capacity=plan.max_num_seqs, max_seq_len=max_len, device=device, dtype=dtype,
                               max_graph_tokens=min(512, max(16, cfg.max_batch_tokens)))
    captured = runner.warmup(512)
    if captured:
        log.info("model %s: %d CUDA graphs captured", cfg.name, captured)
    max_queued = cfg.max_queued if _explicit(cfg, "max_queued") else max(cfg.max_queued, 4 * plan.max_num_seqs)
    return LLMEngine.from_dir(path, cfg.name, max_num_seqs=plan.max_num_seqs, max_model_len=runner.max_seq_len,
                              runner=runner, max_batch_tokens=cfg.max_batch_tokens, max_queued=max_queued)
