"""Causal LM runner on plain torch for Llama-family checkpoints (Llama, Mistral, Qwen2, SmolLM2).

A compact forward over the Hugging Face weights, written for serving:

- a static KV cache per layer, [capacity, kv_heads, max_len, head_dim], allocated once; each live
  sequence owns a row; freed rows are reused lowest-first (no copies at release) and are compacted
  only when the live rows get sparse;
- decode of n rows is one batched step over rows [0, B) for a bucketed B; rows that are not decoding
  ride along with their token written at their own frontier, where it is overwritten before anything
  reads it (positions at or past a row's length are never read before they are written);
- fused weights (q|k|v, gate|up), residual adds folded into the GEMMs (addmm), RoPE as one complex
  multiply (the q/k weight rows are permuted at load so rotation pairs sit side by side; q·k is
  unchanged), GQA as plain SDPA with the group's query heads stacked along the query axis;
- on CUDA, every decode step and every prefill chunk up to `max_graph_tokens` replays a CUDA graph
  captured per (rows or tokens bucket, attention-length bucket): a 30-layer step is ~450 kernels,
  and launching them one by one from Python would cost more than running them;
- several prompts' chunks prefill as one right-padded [B, T] forward (`prefill_many`, eager);
- sampling on the device, one device→host copy per step.

On the CPU (device="cpu", float32) the same code runs eagerly; the unit tests check it against
transformers' own forward.
"""

from __future__ import annotations

import bisect
import heapq
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .base import EngineError, SequenceState, padded_runs

log = logging.getLogger("fmgate.engine")

SUPPORTED = ("llama", "mistral", "qwen2")
LEN_BUCKET_MIN = 256
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)


def batch_buckets(capacity: int) -> list[int]:
    """Decode batch sizes that get a CUDA graph: 1, 2, 4, 8, 16, then steps of 16 to 64, then x1.5."""
    out = [1, 2, 4, 8, 16, 32, 48, 64]
    while out[-1] < capacity:
        out.append(int(out[-1] * 1.5) // 16 * 16)
    return sorted({b for b in out if b < capacity} | {capacity})


def len_buckets(max_len: int) -> list[int]:
    out, n = [], LEN_BUCKET_MIN
    while n < max_len:
        out.append(n)
        n *= 2
    out.append(max_len)
    return out


def read_config(model_dir: Path) -> dict:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    if cfg.get("model_type") not in SUPPORTED:
        raise EngineError(f"the torch runner supports {', '.join(SUPPORTED)} checkpoints, not "
                          f"{cfg.get('model_type')!r}")
    return cfg


def rope_params(cfg: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from either transformers 4 (`rope_theta`, `rope_scaling`) or 5 (`rope_parameters`)."""
    rp = cfg.get("rope_parameters") or {}
    theta = float(cfg.get("rope_theta") or rp.get("rope_theta") or 10000.0)
    scaling = cfg.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return theta, scaling


def inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    f = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling:
        return f
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return f / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        lo, hi = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / f
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, f / factor, f)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        return torch.where((wavelen >= old / hi) & (wavelen <= old / lo), mid, scaled)
    raise EngineError(f"RoPE scaling {kind!r} is not supported by the torch runner")


def load_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise EngineError(f"{model_dir}: no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _interleave_rows(w: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Reorder each head's rows from [x_0..x_{d/2-1}, y_0..] (HF rotate_half) to [x_0, y_0, x_1, y_1, ...]."""
    shape = w.shape
    w = w.reshape(heads, 2, head_dim // 2, *shape[1:]).transpose(1, 2)
    return w.reshape(shape)


class TorchCausalRunner:
    def __init__(self, model_dir: Path, capacity: int = 16, max_seq_len: int = 2048, device: str = "cuda",
                 dtype: torch.dtype = torch.bfloat16, graphs: bool | str | None = None, max_graph_tokens: int = 512):
        """graphs: None = on CUDA only; "emulate" = the bucketed static-buffer path, replayed eagerly
        (lets the CPU tests cover the padding and bucketing the CUDA graphs rely on)."""
        cfg = read_config(model_dir)
        self.device = str(torch.device(device))
        self.dtype = dtype
        dev = torch.device(device)
        self.layers = int(cfg["num_hidden_layers"])
        self.hidden = int(cfg["hidden_size"])
        self.heads = int(cfg["num_attention_heads"])
        self.kv_heads = int(cfg.get("num_key_value_heads") or self.heads)
        self.head_dim = int(cfg.get("head_dim") or self.hidden // self.heads)
        self.group = self.heads // self.kv_heads
        self.inter = int(cfg["intermediate_size"])
        self.vocab_size = int(cfg["vocab_size"])
        self.eps = float(cfg.get("rms_norm_eps", 1e-6))
        self.max_seq_len = min(int(max_seq_len), int(cfg.get("max_position_embeddings") or max_seq_len))
        self.capacity = int(capacity)
        if cfg.get("hidden_act", "silu") != "silu":
            raise EngineError(f"activation {cfg.get('hidden_act')!r} is not supported by the torch runner")

        self._load_weights(load_state(model_dir), cfg, dev)
        theta, scaling = rope_params(cfg)
        pos = torch.arange(self.max_seq_len, dtype=torch.float64)
        ang = torch.outer(pos, inv_freq(self.head_dim, theta, scaling))
        self._freqs = torch.polar(torch.ones_like(ang), ang).to(torch.complex64).to(dev)  # [M, D/2]

        shape = (self.capacity, self.kv_heads, self.max_seq_len, self.head_dim)
        # Zeros, not empty: a masked position still multiplies its V by 0, and 0 * NaN is NaN.
        self._k = [torch.zeros(shape, dtype=dtype, device=dev) for _ in range(self.layers)]
        self._v = [torch.zeros(shape, dtype=dtype, device=dev) for _ in range(self.layers)]
        self._lens = np.zeros(self.capacity, dtype=np.int64)
        self._rows: dict[int, int] = {}
        self._seq_at = [-1] * self.capacity
        self._free = list(range(self.capacity))  # a heap: the lowest free row first
        self._arange = torch.arange(max(self.capacity, self.max_seq_len, max(TOKEN_BUCKETS)), device=dev)

        self._emulate = graphs == "emulate"
        self.graphs = (dev.type == "cuda") if graphs is None else bool(graphs)
        self._b_buckets = batch_buckets(self.capacity)
        self._l_buckets = len_buckets(self.max_seq_len)
        self._t_buckets = [t for t in TOKEN_BUCKETS if t <= max_graph_tokens]
        # Static inputs/outputs the graphs read and write. Decode: [rows, 3] = (token, position, gather index).
        self._d_in = torch.zeros((self.capacity, 3), dtype=torch.long, device=dev)
        self._p_in = torch.zeros((max(TOKEN_BUCKETS) + 3,), dtype=torch.long, device=dev)
        self._d_logits = torch.zeros((self.capacity, self.vocab_size), dtype=dtype, device=dev)
        self._p_logits = torch.zeros((1, self.vocab_size), dtype=dtype, device=dev)
        pin = dev.type == "cuda"
        self._d_stage = torch.zeros((self.capacity, 3), dtype=torch.long, pin_memory=pin)
        self._p_stage = torch.zeros((max(TOKEN_BUCKETS) + 3,), dtype=torch.long, pin_memory=pin)
        self._d_stage_np = self._d_stage.numpy()
        self._p_stage_np = self._p_stage.numpy()
        self._d_event = torch.cuda.Event() if pin else None
        self._p_event = torch.cuda.Event() if pin else None
        self._graph_store: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.graphs and not self._emulate else None
        self.stats = {"decode_graph": 0, "decode_eager": 0, "prefill_graph": 0, "prefill_eager": 0, "prefill_many": 0,
                      "compactions": 0}

    # -- weights --

    def _load_weights(self, st: dict[str, torch.Tensor], cfg: dict, dev: torch.device) -> None:
        def get(name: str) -> torch.Tensor:
            for key in (name, f"model.{name}"):
                if key in st:
                    return st[key]
            raise EngineError(f"weight {name} missing from the checkpoint")

        def opt(name: str) -> torch.Tensor | None:
            try:
                return get(name)
            except EngineError:
                return None

        def put(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=dev, dtype=self.dtype).contiguous()

        hd, H, KV = self.head_dim, self.heads, self.kv_heads
        self.embed = put(get("embed_tokens.weight"))
        lm = st.get("lm_head.weight")
        if lm is None or cfg.get("tie_word_embeddings", False):
            self.lm_head_t = self.embed.t()
        else:
            self.lm_head_t = put(lm).t()
        self.norm = put(get("norm.weight"))
        self.wqkv, self.bqkv, self.wo_t, self.wgu, self.wd_t, self.ln1, self.ln2 = [], [], [], [], [], [], []
        for i in range(self.layers):
            p = f"layers.{i}."
            q = _interleave_rows(get(p + "self_attn.q_proj.weight"), H, hd)
            k = _interleave_rows(get(p + "self_attn.k_proj.weight"), KV, hd)
            v = get(p + "self_attn.v_proj.weight")
            self.wqkv.append(put(torch.cat([q, k, v])))
            qb, kb, vb = (opt(p + f"self_attn.{n}_proj.bias") for n in "qkv")
            if qb is not None:
                self.bqkv.append(put(torch.cat([_interleave_rows(qb, H, hd), _interleave_rows(kb, KV, hd), vb])))
            else:
                self.bqkv.append(None)
            self.wo_t.append(put(get(p + "self_attn.o_proj.weight")).t())
            self.wgu.append(put(torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])))
            self.wd_t.append(put(get(p + "mlp.down_proj.weight")).t())
            self.ln1.append(put(get(p + "input_layernorm.weight")))
            self.ln2.append(put(get(p + "post_attention_layernorm.weight")))

    # -- public API (CausalRunner) --

    @torch.inference_mode()
    def prefill(self, seq_id: int, token_ids: Sequence[int]) -> torch.Tensor:
        row = self._rows.get(seq_id)
        if row is None:
            if not self._free:
                raise EngineError("no free sequence slot")
            row = heapq.heappop(self._free)
            self._rows[seq_id] = row
            self._seq_at[row] = seq_id
            self._lens[row] = 0
        start, n = int(self._lens[row]), len(token_ids)
        if start + n > self.max_seq_len:
            raise EngineError(f"sequence of {start + n} tokens exceeds the context of {self.max_seq_len}")
        if n == 0:
            raise EngineError("empty prefill chunk")
        tb = self._bucket(self._t_buckets, n) if self.graphs else None
        if tb is not None and start + tb <= self.max_seq_len:
            L = self._bucket(self._l_buckets, start + n)
            self._stage_wait(self._p_event)
            s = self._p_stage_np
            s[:n] = token_ids
            s[n:tb] = 0
            s[tb:tb + 3] = (row, start, n)
            self._p_in[: tb + 3].copy_(self._p_stage[: tb + 3], non_blocking=True)
            if self._p_event is not None:
                self._p_event.record()
            self._replay(("p", tb, L), lambda: self._prefill_graph_body(tb, L))
            self.stats["prefill_graph"] += 1
            out = self._p_logits
        else:
            dev = self._p_in.device
            ids = torch.as_tensor(list(token_ids), dtype=torch.long).to(dev)
            meta = torch.tensor([row, start, n], dtype=torch.long).to(dev)
            L = min(self.max_seq_len, _round_up(start + n, 16))
            out = self._prefill_core(ids, meta[0:1], meta[1:2], meta[2:3], L, None)
            self.stats["prefill_eager"] += 1
        self._lens[row] = start + n
        return out

    @torch.inference_mode()
    def prefill_many(self, seq_ids: Sequence[int], chunks: Sequence[Sequence[int]]) -> torch.Tensor:
        """Chunks of several sequences; logits [n, vocab], row i for chunk i's last token. Chunks of similar
        length go right-padded into one eager forward: causal attention keeps each row's real tokens from
        seeing the pads after them, and the pads' K/V land past the row's length (overwritten before read).
        A chunk left alone takes the single-sequence path (a CUDA graph where one fits)."""
        if len(set(seq_ids)) != len(seq_ids):
            raise EngineError("a sequence appears twice in one prefill")
        if sum(s not in self._rows for s in seq_ids) > len(self._free):
            raise EngineError("no free sequence slot")
        starts = [int(self._lens[self._rows[s]]) if s in self._rows else 0 for s in seq_ids]
        lens = [len(c) for c in chunks]
        for start, n in zip(starts, lens, strict=True):
            if n == 0:
                raise EngineError("empty prefill chunk")
            if start + n > self.max_seq_len:
                raise EngineError(f"sequence of {start + n} tokens exceeds the context of {self.max_seq_len}")
        rows = []
        for s in seq_ids:
            if s not in self._rows:
                row = heapq.heappop(self._free)
                self._rows[s], self._seq_at[row], self._lens[row] = row, s, 0
            rows.append(self._rows[s])

        def joins(run: list[int], i: int) -> bool:  # every row's pads must fit its context
            width = max(lens[j] for j in (*run, i))
            return all(starts[j] + width <= self.max_seq_len for j in (*run, i))

        out: list[torch.Tensor | None] = [None] * len(rows)
        waste = 2.0 if self._p_in.is_cuda else 1.0  # on a GPU a short prompt's pads are nearly free
        for run in padded_runs(sorted(range(len(rows)), key=lambda i: -lens[i]), lens, joins, waste):
            if len(run) == 1:
                i = run[0]
                out[i] = self.prefill(seq_ids[i], chunks[i]).reshape(-1).clone()  # the graph's output is reused
                continue
            T = max(lens[i] for i in run)
            ids = torch.zeros((len(run), T), dtype=torch.long)
            for b, i in enumerate(run):
                ids[b, : lens[i]] = torch.as_tensor(list(chunks[i]), dtype=torch.long)
            meta = torch.tensor([[rows[i], starts[i], lens[i]] for i in run], dtype=torch.long)
            dev = self._p_in.device
            L = min(self.max_seq_len, _round_up(max(starts[i] for i in run) + T, 16))
            logits = self._prefill_padded(ids.to(dev), meta.to(dev), L)
            self.stats["prefill_many"] += 1
            for b, i in enumerate(run):
                out[i] = logits[b]
                self._lens[rows[i]] = starts[i] + lens[i]
        return torch.stack(out)

    @torch.inference_mode()
    def decode(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> torch.Tensor:
        self._maybe_compact()
        rows = [self._rows[s] for s in seq_ids]
        n = len(rows)
        hi = max(rows) + 1
        lens = self._lens
        need = int(lens[rows].max()) + 1
        if need > self.max_seq_len:
            raise EngineError(f"sequence of {need} tokens exceeds the context of {self.max_seq_len}")
        B = self._bucket(self._b_buckets, hi) if self.graphs else hi
        L = self._bucket(self._l_buckets, need) if self.graphs else need
        self._stage_wait(self._d_event)
        s = self._d_stage_np
        s[:B, 0] = 0
        s[rows, 0] = token_ids
        # Riding rows write at their own frontier (clamped: a row is never full while it is live).
        np.minimum(lens[:B], self.max_seq_len - 1, out=s[:B, 1])
        in_order = rows == list(range(n))
        if not in_order:
            s[:n, 2] = rows
        self._d_in[:B].copy_(self._d_stage[:B], non_blocking=True)
        if self._d_event is not None:
            self._d_event.record()
        if self.graphs:
            self._replay(("d", B, L), lambda: self._decode_core(B, L))
            self.stats["decode_graph"] += 1
        else:
            self._decode_core(B, L)
            self.stats["decode_eager"] += 1
        lens[rows] += 1
        if in_order:
            return self._d_logits[:n]
        return self._d_logits.index_select(0, self._d_in[:n, 2])

    def release(self, seq_id: int) -> None:
        row = self._rows.pop(seq_id, None)
        if row is None:
            return
        self._seq_at[row] = -1
        self._lens[row] = 0
        heapq.heappush(self._free, row)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, states: Sequence[SequenceState]) -> list[int]:
        if logits.dim() == 1:
            logits = logits[None]
        tokens = logits.argmax(-1)
        drawn = [i for i, st in enumerate(states) if not st.params.greedy]
        if drawn:
            host = np.array([[states[i].params.temperature, states[i].params.top_p, states[i].rng.random(), i]
                             for i in drawn], dtype=np.float64)
            h = torch.from_numpy(host).to(logits.device)
            idx = h[:, 3].long()
            probs = torch.softmax(logits.index_select(0, idx).float() / h[:, 0:1].float(), dim=-1)
            p_sorted, order = probs.sort(dim=-1, descending=True)
            keep = (p_sorted.cumsum(-1) - p_sorted) < h[:, 1:2].float()  # the first token always stays
            cdf = (p_sorted * keep).cumsum(-1)
            pick = torch.searchsorted(cdf, h[:, 2:3].float() * cdf[:, -1:], right=True)
            pick = torch.minimum(pick, keep.sum(-1, keepdim=True) - 1)
            tokens = tokens.index_copy(0, idx, order.gather(1, pick).squeeze(1))
        return tokens.cpu().tolist()

    def length(self, seq_id: int) -> int:
        return int(self._lens[self._rows[seq_id]])

    @property
    def live(self) -> int:
        return len(self._rows)

    # -- set-up --

    @torch.inference_mode()
    def warmup(self, max_len: int | None = None) -> int:
        """Capture the graphs serving will need first (all decode batch buckets, prefill chunks) for the
        attention lengths up to `max_len`, so no capture happens while requests are in flight."""
        if not self.graphs or self._emulate:
            return 0
        if self._rows:
            raise RuntimeError("warm up before serving")
        top = max_len or self._l_buckets[0]
        try:
            for L in (b for b in self._l_buckets if b <= top or b == self._l_buckets[0]):
                for B in self._b_buckets:
                    self._d_in.zero_()
                    self._graph(("d", B, L), lambda B=B, L=L: self._decode_core(B, L))
                for tb in self._t_buckets:
                    if tb > L:
                        continue
                    self._p_in.zero_()
                    self._p_in[tb + 2] = 1
                    self._graph(("p", tb, L), lambda tb=tb, L=L: self._prefill_graph_body(tb, L))
        except Exception:  # serve eagerly rather than not at all
            log.exception("CUDA graph capture failed; the runner continues without graphs")
            self.graphs = False
            self._graph_store.clear()
        torch.cuda.synchronize()
        for k, v in zip(self._k, self._v, strict=True):  # dummy writes landed in free rows; tidy anyway
            k.zero_()
            v.zero_()
        return len(self._graph_store)

    # -- internals --

    @staticmethod
    def _bucket(buckets: list[int], n: int) -> int | None:
        i = bisect.bisect_left(buckets, n)
        return buckets[i] if i < len(buckets) else None

    @staticmethod
    def _stage_wait(event) -> None:
        if event is not None:
            event.synchronize()  # the last copy out of the pinned stage has finished

    def _replay(self, key: tuple, body) -> None:
        if self._emulate:
            body()
            return
        g = self._graph_store.get(key)
        if g is None:
            try:
                g = self._graph(key, body)
            except Exception:  # a capture that fails must not take serving down: run eagerly from now on
                log.exception("CUDA graph capture failed for %s; continuing without graphs", key)
                self.graphs = False
                self._graph_store.clear()
                body()
                return
        g.replay()

    def _graph(self, key: tuple, body) -> torch.cuda.CUDAGraph:
        g = self._graph_store.get(key)
        if g is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                body()  # warm-up run (cuBLAS/attention workspaces); computes this step for real
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._pool, capture_error_mode="thread_local"):
                body()
            self._graph_store[key] = g
        return g

    def _maybe_compact(self) -> None:
        """Move the highest live rows into the lowest holes when that shrinks the decode batch bucket."""
        live = len(self._rows)
        if not live:
            return
        hi = max(self._rows.values()) + 1
        if not self.graphs:
            if hi <= 2 * live:
                return
        elif self._bucket(self._b_buckets, hi) == self._bucket(self._b_buckets, live):
            return
        self.stats["compactions"] += 1
        for src in sorted(self._rows.values(), reverse=True):
            if not self._free or self._free[0] >= src:
                break
            dst = heapq.heappop(self._free)
            n = int(self._lens[src])
            for k, v in zip(self._k, self._v, strict=True):
                k[dst, :, :n].copy_(k[src, :, :n])
                v[dst, :, :n].copy_(v[src, :, :n])
            seq = self._seq_at[src]
            self._rows[seq], self._seq_at[dst], self._lens[dst] = dst, seq, n
            self._seq_at[src], self._lens[src] = -1, 0
            heapq.heappush(self._free, src)

    def _rope(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """x [N, heads, D] (pairs interleaved), freqs [N, 1, D/2] complex -> rotated, model dtype."""
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs).flatten(-2).to(x.dtype)

    def _layer_qkv(self, i: int, h: torch.Tensor, freqs: torch.Tensor):
        x = F.rms_norm(h, (self.hidden,), self.ln1[i], self.eps)
        qkv = F.linear(x, self.wqkv[i], self.bqkv[i])
        nq = self.heads * self.head_dim
        nk = self.kv_heads * self.head_dim
        qk = self._rope(qkv[:, : nq + nk].view(-1, self.heads + self.kv_heads, self.head_dim), freqs)
        q, k = qk[:, : self.heads], qk[:, self.heads :]
        v = qkv[:, nq + nk :].view(-1, self.kv_heads, self.head_dim)
        return q, k, v

    def _layer_rest(self, i: int, h: torch.Tensor, attn: torch.Tensor) -> None:
        h.addmm_(attn, self.wo_t[i])
        x = F.rms_norm(h, (self.hidden,), self.ln2[i], self.eps)
        gu = F.linear(x, self.wgu[i])
        h.addmm_(F.silu(gu[:, : self.inter]) * gu[:, self.inter :], self.wd_t[i])

    def _decode_core(self, B: int, L: int) -> None:
        """Rows [0, B): token and position from the static inputs; logits into the static output."""
        ids, pos = self._d_in[:B, 0], self._d_in[:B, 1]
        rows = self._arange[:B]
        h = F.embedding(ids, self.embed)
        freqs = self._freqs.index_select(0, pos)[:, None]
        valid = self._arange[:L][None, :] <= pos[:, None]
        mask = torch.zeros((B, 1, 1, L), dtype=self.dtype, device=h.device).masked_fill_(
            ~valid[:, None, None, :], float("-inf"))
        for i in range(self.layers):
            q, k, v = self._layer_qkv(i, h, freqs)
            kc, vc = self._k[i], self._v[i]
            kc[rows, :, pos] = k
            vc[rows, :, pos] = v
            o = F.scaled_dot_product_attention(
                q.view(B, self.kv_heads, self.group, self.head_dim), kc[:B, :, :L], vc[:B, :, :L], attn_mask=mask)
            self._layer_rest(i, h, o.reshape(B, self.heads * self.head_dim))
        h = F.rms_norm(h, (self.hidden,), self.norm, self.eps)
        torch.mm(h, self.lm_head_t, out=self._d_logits[:B])

    def _prefill_graph_body(self, tb: int, L: int) -> None:
        meta = self._p_in[tb : tb + 3]
        self._prefill_core(self._p_in[:tb], meta[0:1], meta[1:2], meta[2:3], L, self._p_logits)

    def _prefill_core(self, ids: torch.Tensor, row: torch.Tensor, start: torch.Tensor, n: torch.Tensor, L: int,
                      out: torch.Tensor | None) -> torch.Tensor:
        """One sequence's chunk of T tokens (the first n real) appended at `start`; logits of token n-1."""
        T = ids.shape[0]
        g, kvh, hd = self.group, self.kv_heads, self.head_dim
        pos = start + self._arange[:T]
        pos_w = torch.clamp(pos, max=self.max_seq_len - 1)
        rows = row.expand(T)
        h = F.embedding(ids, self.embed)
        freqs = self._freqs.index_select(0, pos_w)[:, None]
        valid = self._arange[:L][None, :] <= pos[:, None]  # [T, L]
        mask = torch.zeros((T, L), dtype=self.dtype, device=h.device).masked_fill_(~valid, float("-inf"))
        mask = mask.repeat(g, 1)[None, None]  # query index = group_member * T + t
        for i in range(self.layers):
            q, k, v = self._layer_qkv(i, h, freqs)
            kc, vc = self._k[i], self._v[i]
            kc[rows, :, pos_w] = k
            vc[rows, :, pos_w] = v
            qg = q.view(T, kvh, g, hd).permute(1, 2, 0, 3).reshape(1, kvh, g * T, hd)
            ks = kc[:, :, :L].index_select(0, row)
            vs = vc[:, :, :L].index_select(0, row)
            o = F.scaled_dot_product_attention(qg, ks, vs, attn_mask=mask)
            o = o.view(kvh, g, T, hd).permute(2, 0, 1, 3).reshape(T, self.heads * hd)
            self._layer_rest(i, h, o)
        last = F.rms_norm(h.index_select(0, n - 1), (self.hidden,), self.norm, self.eps)
        if out is None:
            return last @ self.lm_head_t
        torch.mm(last, self.lm_head_t, out=out)
        return out

    def _prefill_padded(self, ids: torch.Tensor, meta: torch.Tensor, L: int) -> torch.Tensor:
        """B sequences' chunks right-padded to T (ids [B, T]; meta [B, 3] = row, start, real tokens), each
        row's start + T within the context; logits [B, vocab] of each row's last real token."""
        B, T = ids.shape
        g, kvh, hd = self.group, self.kv_heads, self.head_dim
        rows, start, n = meta[:, 0], meta[:, 1], meta[:, 2]
        pos = start[:, None] + self._arange[:T][None, :]  # [B, T]
        flat_rows, flat_pos = rows[:, None].expand(B, T).reshape(-1), pos.reshape(-1)
        h = F.embedding(ids.reshape(-1), self.embed)
        freqs = self._freqs.index_select(0, flat_pos)[:, None]
        valid = self._arange[:L][None, None, :] <= pos[:, :, None]  # [B, T, L]
        mask = torch.zeros((B, T, L), dtype=self.dtype, device=h.device).masked_fill_(~valid, float("-inf"))
        mask = mask.repeat(1, g, 1)[:, None]  # query index = group_member * T + t, as in _prefill_core
        for i in range(self.layers):
            q, k, v = self._layer_qkv(i, h, freqs)
            kc, vc = self._k[i], self._v[i]
            kc[flat_rows, :, flat_pos] = k
            vc[flat_rows, :, flat_pos] = v
            qg = q.view(B, T, kvh, g, hd).permute(0, 2, 3, 1, 4).reshape(B, kvh, g * T, hd)
            ks = kc[:, :, :L].index_select(0, rows)
            vs = vc[:, :, :L].index_select(0, rows)
            o = F.scaled_dot_product_attention(qg, ks, vs, attn_mask=mask)
            o = o.view(B, kvh, g, T, hd).permute(0, 3, 1, 2, 4).reshape(B * T, self.heads * hd)
            self._layer_rest(i, h, o)
        last = h.index_select(0, self._arange[:B] * T + n - 1)
        return F.rms_norm(last, (self.hidden,), self.norm, self.eps) @ self.lm_head_t


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k
