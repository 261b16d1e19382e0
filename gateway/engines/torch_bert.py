"""Sentence-embedding runner on plain torch for BERT-style encoders (MiniLM, BGE, E5, ...).

A compact post-LayerNorm BERT forward over the Hugging Face weights: fused q|k|v projection,
attention through scaled_dot_product_attention with a key-padding mask, pooling (mean or CLS) and
L2 normalisation on the device, float32 vectors back. Padding is vectorised (no per-row Python).
The batcher already sorts inputs by length, so a batch pads little.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .base import EngineError
from .torch_llama import load_state

SUPPORTED = ("bert",)
_ACT = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}


def encoder_meta(model_dir: Path, cfg: dict) -> dict:
    """pooling / normalize / dim / max_length: from fmgate_torch.json, else fmgate_encoder.json, else defaults."""
    for name in ("fmgate_torch.json", "fmgate_encoder.json"):
        f = Path(model_dir) / name
        if f.exists():
            meta = json.loads(f.read_text())
            if "dim" in meta:
                return meta
    return {"pooling": "mean", "normalize": True, "dim": int(cfg["hidden_size"]),
            "max_length": min(int(cfg.get("max_position_embeddings", 512)), 512)}


class TorchEncoderRunner:
    def __init__(self, model_dir: Path, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
        model_dir = Path(model_dir)
        cfg = json.loads((model_dir / "config.json").read_text())
        if cfg.get("model_type") not in SUPPORTED:
            raise EngineError(f"the torch encoder supports {', '.join(SUPPORTED)} checkpoints, not "
                              f"{cfg.get('model_type')!r}")
        act = cfg.get("hidden_act", "gelu")
        if act not in _ACT:
            raise EngineError(f"activation {act!r} is not supported by the torch encoder")
        self._gelu = _ACT[act]
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise EngineError("only absolute position embeddings are supported by the torch encoder")
        meta = encoder_meta(model_dir, cfg)
        self.pooling = meta.get("pooling", "mean")
        self.normalize = bool(meta.get("normalize", True))
        self.dim = int(meta["dim"])
        self.max_length = int(meta.get("max_length", 512))
        self.pad_id = int(meta.get("pad_token_id", cfg.get("pad_token_id") or 0))
        self.device = str(torch.device(device))
        self.dtype = dtype
        self.hidden = int(cfg["hidden_size"])
        self.heads = int(cfg["num_attention_heads"])
        self.head_dim = self.hidden // self.heads
        self.layers = int(cfg["num_hidden_layers"])
        self.eps = float(cfg.get("layer_norm_eps", 1e-12))
        self.max_positions = int(cfg.get("max_position_embeddings", 512))
        self._load(load_state(model_dir), torch.device(device))

    def _load(self, st: dict[str, torch.Tensor], dev: torch.device) -> None:
        st = {k.removeprefix("bert."): v for k, v in st.items()}

        def get(name: str) -> torch.Tensor:
            if name not in st:
                raise EngineError(f"weight {name} missing from the checkpoint")
            return st[name].to(device=dev, dtype=self.dtype).contiguous()

        e = "embeddings."
        self.word = get(e + "word_embeddings.weight")
        self.pos = get(e + "position_embeddings.weight")
        tt = st.get(e + "token_type_embeddings.weight")
        self.type0 = get(e + "token_type_embeddings.weight")[0] if tt is not None else None
        self.emb_ln = (get(e + "LayerNorm.weight"), get(e + "LayerNorm.bias"))
        self.L = []
        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            a = p + "attention."
            wqkv = torch.cat([get(a + f"self.{n}.weight") for n in ("query", "key", "value")])
            bqkv = torch.cat([get(a + f"self.{n}.bias") for n in ("query", "key", "value")])
            self.L.append((
                wqkv, bqkv, get(a + "output.dense.weight"), get(a + "output.dense.bias"),
                (get(a + "output.LayerNorm.weight"), get(a + "output.LayerNorm.bias")),
                get(p + "intermediate.dense.weight"), get(p + "intermediate.dense.bias"),
                get(p + "output.dense.weight"), get(p + "output.dense.bias"),
                (get(p + "output.LayerNorm.weight"), get(p + "output.LayerNorm.bias")),
            ))

    def _pad(self, batch: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        lens = np.fromiter((len(x) for x in batch), dtype=np.int64, count=len(batch))
        if lens.min() < 1:
            raise EngineError("empty input")
        width = int(lens.max())
        if width > self.max_positions:
            raise EngineError(f"input of {width} tokens exceeds the model's {self.max_positions} positions")
        width = min(self.max_positions, (width + 7) // 8 * 8)  # aligned masks keep the fused attention kernel
        valid = np.arange(width)[None, :] < lens[:, None]
        ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
        ids[valid] = np.fromiter(itertools.chain.from_iterable(batch), dtype=np.int64, count=int(lens.sum()))
        return ids, valid

    @torch.inference_mode()
    def encode(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        ids_np, valid_np = self._pad(batch)
        dev = torch.device(self.device)
        ids = torch.from_numpy(ids_np).to(dev, non_blocking=True)
        valid = torch.from_numpy(valid_np).to(dev, non_blocking=True)
        n, t = ids.shape
        x = F.embedding(ids, self.word) + self.pos[:t]
        if self.type0 is not None:
            x = x + self.type0
        x = F.layer_norm(x, (self.hidden,), *self.emb_ln, self.eps)
        mask = torch.zeros((n, 1, 1, t), dtype=self.dtype, device=dev).masked_fill_(
            ~valid[:, None, None, :], float("-inf"))
        for wqkv, bqkv, wo, bo, ln1, wi, bi, wo2, bo2, ln2 in self.L:
            qkv = F.linear(x, wqkv, bqkv).view(n, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)
            o = o.transpose(1, 2).reshape(n, t, self.hidden)
            x = F.layer_norm(x + F.linear(o, wo, bo), (self.hidden,), *ln1, self.eps)
            y = F.linear(F.gelu(F.linear(x, wi, bi), approximate=self._gelu), wo2, bo2)
            x = F.layer_norm(x + y, (self.hidden,), *ln2, self.eps)
        if self.pooling == "cls":
            pooled = x[:, 0].float()
        else:
            m = valid[:, :, None].to(torch.float32)
            pooled = (x.float() * m).sum(1) / m.sum(1).clamp_min(1e-9)
        if self.normalize:
            pooled = F.normalize(pooled, dim=-1, eps=1e-12)
        return pooled.cpu().numpy()
