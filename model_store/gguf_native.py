"""Re-pack a GGUF's own quantized blocks into an onnxruntime-genai int4 build, losslessly.

Quantizing the dequantized GGUF a second time (genai int4/int8) compounds two rounding errors and
visibly changes answers. Here the builder's graph is kept and only its weights are replaced by the
GGUF's blocks, so the ONNX model multiplies by exactly the weights llama.cpp uses:

* Q4_0 block (d, q): w = d*(q-8) is MatMulNBits' own 4-bit format with its default zero point 8.
* Q4_1 block (d, m, q): w = d*q + m needs a non-integer zero point -m/d. ORT accepts float zero
  points, but its CPU kernel then dequantizes the whole matrix on every call (~15x slower), so we
  split it instead: x·w = MatMulNBits(x; q, d, zp=8) + blocksum(x)·(m + 8d). The second term is a
  tiny fp32 MatMul over K/32 block sums, shared per input.
* Q8_0 block (d, q int8): 8-bit MatMulNBits with q+128 and the default zero point 128. Its CPU
  kernel only exists for accuracy_level 4; for the fp32 levels the byte is split into two 4-bit
  halves (16*d*hi + d*lo) over a doubled K. The tied embedding becomes a GatherBlockQuantized
  over the same bytes.
* Q4_K (256-blocks of eight 32-sub-blocks, w = d*sc*q - dmin*m): per sub-block that is Q4_1's
  form, scale d*sc and offset -dmin*m, so the same 4-bit path with the offset term.
* Q5_K (as Q4_K with 5-bit q) and Q6_K (sixteen 16-sub-blocks, w = d*sc*(q-32)): 8-bit
  MatMulNBits codes (q+128, q+96) with block_size 32 and 16; Q5_K adds the offset term.
* A fused projection whose parts differ (Q4_K_M's Q4_K q/k beside a Q6_K v) takes the widest
  form of its parts (8-bit, the smallest block; a 4-bit code q becomes q+120, scales repeat): still
  exact, only larger.
Other types (Q5_0/1, Q2_K, Q3_K, IQ*, F16, BF16) are not re-packed: `native_support` says so, and
the store serves them from the dequantized transformers folder (fp32, or re-quantized by genai).

GGUF stores each 32-block as 16 bytes with elements 0-15 in the low nibbles and 16-31 in the high
ones; MatMulNBits packs consecutive pairs (low, high). llama's Q/K rows are permuted by the GGUF
converter for its rotary layout; transformers (and so the builder) undoes that, and so do we. Qwen2/3,
Phi-3 and Gemma-2/3 files are not permuted; Phi-3's fuse q/k/v (attn_qkv) and gate/up (ffn_up), which
are sliced by rows into the builder's projections.

accuracy_level 4 (the builder's default) quantizes activations to int8 per 32-block, as llama.cpp's
own Q8_1 activation path does; levels 0/1 keep them fp32 and then match an fp32 build to ~1e-6.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StoreError

log = logging.getLogger("fmgate.model_store")

BLOCK = 32
MS_DOMAIN = "com.microsoft"
# Initializer names the onnxruntime-genai builder gives its MatMulNBits weights.
_LAYER_B = re.compile(r"^model\.layers\.(\d+)\.(attn|mlp)\.(\w+)\.MatMul\.weight_Q4$")
_HEAD_B = "lm_head.MatMul.weight_Q4"
# Builder projection → GGUF tensors whose rows it concatenates, in order.
_PROJ = {
    "qkv_proj": ("attn_q", "attn_k", "attn_v"),
    "q_proj": ("attn_q",),
    "k_proj": ("attn_k",),
    "v_proj": ("attn_v",),
    "o_proj": ("attn_output",),
    "gate_proj": ("ffn_gate",),
    "up_proj": ("ffn_up",),
    "gate_up_proj": ("ffn_gate", "ffn_up"),
    "down_proj": ("ffn_down",),
}


# GGUF block types re-packed here, each decoded to unsigned codes u with one scale d (and offset c)
# per block: w = d*(u - z) + c, z = 8 for 4-bit codes, 128 for 8-bit ones.
NATIVE_TYPES = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
# Architectures whose genai build names its weights as _PROJ expects (tested in test_families.py).
NATIVE_ARCHS = ("llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")


@dataclass
class _Blocks:
    """One weight [rows, K] as GGUF blocks, decoded but not dequantized."""

    q: np.ndarray  # uint8 codes [R, K]: 0..15 when bits == 4, 0..255 when bits == 8
    d: np.ndarray  # float32 [R, K/bs]
    c: np.ndarray | None = None  # float32 [R, K/bs] per-block offset, None when all zero
    bits: int = 4
    bs: int = BLOCK

    @property
    def zero(self) -> int:
        return 8 if self.bits == 4 else 128

    def rows(self, idx: np.ndarray) -> _Blocks:
        return _Blocks(self.q[idx], self.d[idx], None if self.c is None else self.c[idx], self.bits, self.bs)

    def dequantize(self) -> np.ndarray:
        r, k = self.q.shape
        w = (self.q.astype(np.float32).reshape(r, -1, self.bs) - self.zero) * self.d[..., None]
        return (w if self.c is None else w + self.c[..., None]).reshape(r, k)

    def widen(self, bits: int, bs: int) -> _Blocks:
        """The same weights as `bits`-bit codes in blocks of `bs` (≤ ours): exact, only bigger."""
        q, d, c = self.q, self.d, self.c
        if bits == 8 and self.bits == 4:
            q = (q + 120).astype(np.uint8)  # u - 128 == q - 8
        if bs != self.bs:
            d = np.repeat(d, self.bs // bs, axis=1)
            c = None if c is None else np.repeat(c, self.bs // bs, axis=1)
        return _Blocks(q, d, c, bits, bs)

    @staticmethod
    def concat(parts: list[_Blocks]) -> _Blocks:
        """Rows of several tensors (a fused projection), in a form that holds each of them exactly."""
        bits, bs = max(p.bits for p in parts), min(p.bs for p in parts)
        parts = [p.widen(bits, bs) for p in parts]
        cs = None
        if any(p.c is not None for p in parts):
            cs = np.concatenate([np.zeros_like(p.d) if p.c is None else p.c for p in parts])
        return _Blocks(np.concatenate([p.q for p in parts]), np.concatenate([p.d for p in parts]), cs, bits, bs)


def _fp16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _k_scales(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: the eight 6-bit (scale, min) codes of each 256-block from their 12 bytes."""
    b = raw.astype(np.uint8)
    d, m, md = b[..., 0:4], b[..., 4:8], b[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _decode(tensor) -> _Blocks:
    """Split a GGUF tensor's raw blocks into codes and per-block constants (see NATIVE_TYPES)."""
    kind = tensor.tensor_type.name
    rows = int(tensor.shape[-1]) if len(tensor.shape) > 1 else 1
    raw = np.asarray(tensor.data, dtype=np.uint8).reshape(rows, -1)
    if kind in ("Q4_0", "Q4_1"):
        size = 18 if kind == "Q4_0" else 20
        raw = raw.reshape(rows, -1, size)
        qs = raw[..., size - 16:]
        # Elements 0-15 sit in the low nibbles, 16-31 in the high ones.
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, -1)
        d = _fp16(raw[..., 0:2])
        if kind == "Q4_0":
            return _Blocks(q, d)
        # d*q + m == d*(q-8) + (m + 8d): keeps the default zero point 8, and the offset small.
        return _Blocks(q, d, _fp16(raw[..., 2:4]) + 8.0 * d)
    if kind == "Q8_0":
        raw = raw.reshape(rows, -1, 34)
        q = (raw[..., 2:].copy().view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return _Blocks(q.reshape(rows, -1), _fp16(raw[..., 0:2]), None, 8)
    if kind in ("Q4_K", "Q5_K"):
        # 256-blocks of eight 32-sub-blocks: w = (d*sc)*q - dmin*m per sub-block.
        size = 144 if kind == "Q4_K" else 176
        raw = raw.reshape(rows, -1, size)
        n = raw.shape[1]
        d, dmin = _fp16(raw[..., 0:2]), _fp16(raw[..., 2:4])
        sc, mn = _k_scales(raw[..., 4:16])
        qs = raw[..., size - 128:].reshape(rows, n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(2, 1)
        q = (qs & 0x0F).reshape(rows, n, 8, 32)
        scale = (d[..., None] * sc).reshape(rows, -1)
        offset = -(dmin[..., None] * mn).reshape(rows, -1)
        if kind == "Q4_K":
            return _Blocks(q.reshape(rows, -1), scale, offset + 8.0 * scale)
        qh = raw[..., 16:48].reshape(rows, n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(8, 1)
        q = q | ((qh & 1) << 4)
        return _Blocks((q.astype(np.int16) + 128).astype(np.uint8).reshape(rows, -1), scale, offset, 8)
    if kind == "Q6_K":
        # 256-blocks of sixteen 16-sub-blocks: w = (d*sc)*(q - 32), q 6-bit.
        raw = raw.reshape(rows, -1, 210)
        n = raw.shape[1]
        ql = raw[..., 0:128].reshape(rows, n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(2, 1)
        ql = (ql & 0x0F).reshape(rows, n, 8, 32)
        qh = raw[..., 128:192].reshape(rows, n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
        qh = (qh & 0x03).reshape(rows, n, 8, 32)
        q = (ql | (qh << 4)).astype(np.int16) + 96  # u - 128 == q - 32
        scale = _fp16(raw[..., 208:210])[..., None] * raw[..., 192:208].copy().view(np.int8).astype(np.float32)
        return _Blocks(q.astype(np.uint8).reshape(rows, -1), scale.reshape(rows, -1), None, 8, 16)
    raise StoreError(f"GGUF tensor {tensor.name} is {kind}; only {', '.join(NATIVE_TYPES)} re-pack losslessly")


_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type → bytes


_FORMAT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_summary(gguf_path: Path) -> tuple[str | None, dict[str, tuple[str, int]]]:
    """(general.architecture, {tensor: (type name, n_dims)}) from the header alone.

    GGUFReader decodes every metadata array (3.6 s for SmolLM2's vocabulary); this skips them."""
    arch, tensors, _ = gguf_header(gguf_path)
    return arch, tensors


def gguf_header(gguf_path: Path, keys: tuple[str, ...] = ()) -> tuple[str | None, dict[str, tuple[str, int]], dict]:
    """gguf_summary, plus {key: value} for the scalar or string metadata `keys` the file has."""
    import mmap
    import struct

    from gguf import GGMLQuantizationType

    with open(gguf_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != b"GGUF":
            raise StoreError(f"{Path(gguf_path).name}: not a GGUF file")
        n_tensors, n_kv = struct.unpack_from("<QQ", mm, 8)
        pos, arch, values = 24, None, {}

        def string(at: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", mm, at)
            return mm[at + 8:at + 8 + n].decode("utf-8", "replace"), at + 8 + n

        def skip(at: int, vtype: int) -> int:
            if vtype == 8:
                (n,) = struct.unpack_from("<Q", mm, at)
                return at + 8 + n
            if vtype == 9:
                etype, count = struct.unpack_from("<IQ", mm, at)
                at += 12
                if etype in _SCALAR:
                    return at + count * _SCALAR[etype]
                for _ in range(count):
                    at = skip(at, etype)
                return at
            return at + _SCALAR[vtype]

        for _ in range(n_kv):
            key, pos = string(pos)
            (vtype,) = struct.unpack_from("<I", mm, pos)
            pos += 4
            if key == "general.architecture" and vtype == 8:
                arch, pos = string(pos)
            elif key in keys and vtype == 8:
                values[key], pos = string(pos)
            elif key in keys and vtype in _FORMAT:
                (values[key],) = struct.unpack_from(_FORMAT[vtype], mm, pos)
                pos += _SCALAR[vtype]
            else:
                pos = skip(pos, vtype)
        tensors = {}
        for _ in range(n_tensors):
            name, pos = string(pos)
            (ndims,) = struct.unpack_from("<I", mm, pos)
            pos += 4 + 8 * ndims
            (ttype,) = struct.unpack_from("<I", mm, pos)
            pos += 12  # type, offset
            try:
                tname = GGMLQuantizationType(ttype).name
            except ValueError:
                tname = f"type {ttype}"
            tensors[name] = (tname, ndims)
    return arch, tensors, values


def native_support(gguf_path: Path) -> tuple[bool, str]:
    """Whether `repack_gguf_weights` can serve this GGUF's own blocks: (ok, why) for `applies`."""
    try:
        arch, tensors = gguf_summary(gguf_path)
    except (OSError, ValueError, IndexError, KeyError, __import__("struct").error) as exc:
        return False, f"cannot read the GGUF header ({type(exc).__name__}: {exc})"
    if arch not in NATIVE_ARCHS:
        return False, f"GGUF architecture {arch!r}: only {', '.join(NATIVE_ARCHS)} GGUFs are re-packed"
    weights = {t for t, nd in tensors.values() if nd > 1}
    other = sorted(weights - set(NATIVE_TYPES))
    if other:
        return False, (f"GGUF weights of type {', '.join(other)}: only {', '.join(NATIVE_TYPES)} are served "
                       "natively (this file is dequantized and built like a transformers folder)")
    return True, f"GGUF source ({', '.join(sorted(weights))}): serve its own quantized blocks"


def _unpermute(rows: int, heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's convert-time Q/K permutation (as transformers does)."""
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(rows)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 values 0..15 [..., 2n] → bytes [..., n], consecutive pairs (low, high)."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


class _Graph:
    """Just enough ONNX graph editing: initializers by name, nodes added around or instead of others.

    Nodes are keyed by their position in the original list: protobuf wrappers have no stable id().
    """

    def __init__(self, model: Any):
        from onnx import helper, numpy_helper

        self.g, self.nh, self.helper = model.graph, numpy_helper, helper
        self.inits = {t.name: t for t in self.g.initializer}
        self.before: dict[int, list] = {}
        self.after: dict[int, list] = {}
        self.dropped: set[int] = set()
        self._counter = 0

    def name(self, base: str) -> str:
        self._counter += 1
        return f"{base}/gguf_{self._counter}"

    def array(self, name: str) -> np.ndarray:
        return self.nh.to_array(self.inits[name])

    def set(self, name: str, arr: np.ndarray) -> str:
        tensor = self.nh.from_array(np.ascontiguousarray(arr), name)
        if name in self.inits:
            self.inits[name].CopyFrom(tensor)
        else:
            self.g.initializer.append(tensor)
            self.inits[name] = self.g.initializer[-1]
        return name

    def add(self, where: dict[int, list], pos: int, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        domain = MS_DOMAIN if op in ("MatMulNBits", "GatherBlockQuantized") else ""
        where.setdefault(pos, []).append(self.helper.make_node(op, inputs, [output], name=output, domain=domain,
                                                               **attrs))
        return output

    def commit(self) -> None:
        """Apply the insertions, then drop nodes and initializers nothing reads any more."""
        nodes = []
        for i, node in enumerate(self.g.node):
            nodes.extend(self.before.get(i, []))
            if i not in self.dropped:
                nodes.append(node)
            nodes.extend(self.after.get(i, []))
        outputs = {o.name for o in self.g.output}
        while True:  # e.g. the builder's Reshape feeding a replaced shared-embedding gather
            used = {i for n in nodes for i in n.input} | outputs
            live = [n for n in nodes if any(o in used for o in n.output)]
            if len(live) == len(nodes):
                break
            nodes = live
        del self.g.node[:]
        self.g.node.extend(nodes)
        keep = [t for t in self.g.initializer if t.name in used]
        del self.g.initializer[:]
        self.g.initializer.extend(keep)


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attrs(node, **attrs) -> None:
    from onnx import helper

    keep = [a for a in node.attribute if a.name not in attrs]
    del node.attribute[:]
    node.attribute.extend(keep + [helper.make_attribute(k, v) for k, v in attrs.items()])


def _check_close(name: str, old: np.ndarray, new: np.ndarray) -> None:
    """Guard against a wrong row order: the builder's own int4 weights are a noisy copy of ours."""
    err = float(np.linalg.norm(old - new) / max(float(np.linalg.norm(new)), 1e-30))
    if err > 0.5:
        raise StoreError(f"{name}: the GGUF weights do not line up with the ONNX build's "
                         f"(relative difference {err:.2f}); built from a different model?")


def _old_int4(g: _Graph, node, rows: np.ndarray) -> np.ndarray:
    """Dequantize some rows of the builder's MatMulNBits weight (uint8 zero points or the default 8)."""
    b = g.array(node.input[1])[rows]
    s = g.array(node.input[2]).astype(np.float32).reshape(-1, b.shape[1])[rows]
    n, nb, _ = b.shape
    q = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, nb, BLOCK).astype(np.float32)
    zp = np.full((n, nb), 8.0, np.float32)
    if len(node.input) > 3 and node.input[3]:
        z = g.array(node.input[3])
        z = z.reshape(-1, z.size // int(_attr(node, "N")))[rows]
        zp = (np.stack([z & 0x0F, z >> 4], axis=-1).reshape(n, -1)[:, :nb] if z.dtype == np.uint8
              else z).astype(np.float32)
    return ((q - zp[..., None]) * s.reshape(n, nb)[..., None]).reshape(n, -1)


def repack_gguf_weights(gguf_path: Path, model_dir: Path, accuracy_level: int | None = None) -> dict:
    """Rewrite, in place, the MatMulNBits weights of an onnxruntime-genai int4 (block_size=32) build of
    the same model with the GGUF's own quantized blocks. Returns a summary (tensors repacked, bytes).

    accuracy_level None keeps the builder's (4: int8 activations, the fast path); 0/1 computes in fp32.
    """
    import onnx
    from gguf import GGUFReader

    gguf_path, model_dir = Path(gguf_path), Path(model_dir)
    onnx_path = model_dir / "model.onnx"
    if not onnx_path.exists():
        raise StoreError(f"{model_dir}: no model.onnx to re-pack")
    reader = GGUFReader(gguf_path)
    arch_field = reader.fields.get("general.architecture")
    arch = arch_field.contents() if arch_field else None
    if arch not in NATIVE_ARCHS:
        raise StoreError(f"{gguf_path.name}: architecture {arch!r}; only {', '.join(NATIVE_ARCHS)} GGUFs are re-packed")
    heads = int(reader.fields[f"{arch}.attention.head_count"].contents())
    kv_field = reader.fields.get(f"{arch}.attention.head_count_kv")
    kv_heads = int(kv_field.contents()) if kv_field else heads
    tensors = {t.name: t for t in reader.tensors}

    hidden = int(reader.fields[f"{arch}.embedding_length"].contents())
    head_dim = hidden // heads

    def fused(name: str) -> _Blocks | None:
        """Phi-3's files fuse q/k/v into attn_qkv and gate/up into ffn_up: a part is a slice of rows."""
        _, blk, part = name.split(".")[:3]
        base = f"blk.{blk}."
        if part in ("attn_q", "attn_k", "attn_v") and base + "attn_qkv.weight" in tensors:
            sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
            start = sum(sizes[:("attn_q", "attn_k", "attn_v").index(part)])
            rows = np.arange(start, start + sizes[("attn_q", "attn_k", "attn_v").index(part)])
            return _decode(tensors[base + "attn_qkv.weight"]).rows(rows)
        if part in ("ffn_gate", "ffn_up") and base + "ffn_gate.weight" not in tensors and base + "ffn_up.weight" in tensors:
            both = _decode(tensors[base + "ffn_up.weight"])
            half = both.q.shape[0] // 2
            return both.rows(np.arange(half) + (0 if part == "ffn_gate" else half))
        return None

    def blocks(name: str) -> _Blocks:
        if name not in tensors or (name.endswith("ffn_up.weight") and name.replace("ffn_up", "ffn_gate") not in tensors
                                   and arch == "phi3"):
            b = fused(name)
            if b is None:
                raise StoreError(f"{gguf_path.name}: no tensor {name}")
            return b
        b = _decode(tensors[name])
        if arch == "llama" and ".attn_q." in name:  # only llama.cpp's llama converter permutes Q/K
            b = b.rows(_unpermute(b.q.shape[0], heads))
        elif arch == "llama" and ".attn_k." in name:
            b = b.rows(_unpermute(b.q.shape[0], kv_heads))
        return b

    model = onnx.load(str(onnx_path))
    g = _Graph(model)
    summary: dict[str, Any] = {"gguf": gguf_path.name, "repacked": 0, "corrections": 0, "tensors": {}}
    levels: set[int] = set()
    blocksums: dict[tuple[str, int, int], str] = {}  # (activation, K, block) → its per-block sums
    head_q8: str | None = None  # lm_head's 8-bit B when it is the tied Q8_0 token_embd

    for pos, node in enumerate(g.g.node):
        if node.op_type != "MatMulNBits" or node.domain != MS_DOMAIN:
            continue
        b_name = node.input[1]
        if b_name == _HEAD_B:
            sources = ["output.weight" if "output.weight" in tensors else "token_embd.weight"]
        elif (m := _LAYER_B.match(b_name)) and m.group(3) in _PROJ:
            sources = [f"blk.{m.group(1)}.{t}.weight" for t in _PROJ[m.group(3)]]
        else:
            raise StoreError(f"{node.name}: cannot tell which GGUF tensor {b_name} comes from")
        if _attr(node, "block_size") != BLOCK or _attr(node, "bits") != 4:
            raise StoreError(f"{node.name}: expected a 4-bit, block_size 32 build")
        k, n = int(_attr(node, "K")), int(_attr(node, "N"))
        w = _Blocks.concat([blocks(s) for s in sources])
        if w.q.shape != (n, k):
            raise StoreError(f"{node.name}: GGUF {sources} is {w.q.shape}, the ONNX weight is {(n, k)}")
        sample = np.arange(0, n, max(1, n // 512))  # enough rows to catch a misordering, cheaply
        _check_close(node.name, _old_int4(g, node, sample), w.rows(sample).dequantize())
        acc = int(_attr(node, "accuracy_level", 0) if accuracy_level is None else accuracy_level)
        levels.add(acc)
        bs, scales, a_in = w.bs, node.input[2], node.input[0]
        nb = k // bs
        inputs = [a_in, b_name, scales]

        if w.bits == 4:
            g.set(b_name, _pack_nibbles(w.q).reshape(n, nb, bs // 2))
            g.set(scales, w.d)
            _set_attrs(node, block_size=bs, accuracy_level=acc)
        elif acc == 4:
            # 8-bit codes (Q8_0, Q5_K, Q6_K, or a mix) → 8-bit MatMulNBits with the default zero point 128.
            g.set(b_name, w.q.reshape(n, nb, bs))
            g.set(scales, w.d)
            _set_attrs(node, bits=8, block_size=bs, accuracy_level=acc)
            tied_q8 = sources == ["token_embd.weight"] and tensors[sources[0]].tensor_type.name == "Q8_0"
            head_q8 = b_name if tied_q8 else None
        else:
            # No fp32-compute 8-bit kernel on CPU (it dequantizes per call): d*(u-128) = 16d*(hi-8) + d*lo,
            # as one 4-bit MatMulNBits over [x, x] with K doubled and zero points 8 | 0.
            signed = w.q.astype(np.int16) - 128
            hi = ((signed >> 4) + 8).astype(np.uint8)
            lo = (signed & 0x0F).astype(np.uint8)
            g.set(b_name, _pack_nibbles(np.concatenate([hi, lo], axis=1)).reshape(n, 2 * nb, bs // 2))
            g.set(scales, np.concatenate([16.0 * w.d, w.d], axis=1))
            zp = np.concatenate([np.full((n, nb), 8, np.uint8), np.zeros((n, nb), np.uint8)], axis=1)
            zp_name = g.set(b_name.replace(".weight_Q4", ".gguf_zero_points"), _pack_nibbles(zp))
            doubled = g.add(g.before, pos, "Concat", [a_in, a_in], g.name(node.name + "/A2"), axis=-1)
            inputs = [doubled, b_name, scales, zp_name]
            _set_attrs(node, K=2 * k, block_size=bs, accuracy_level=acc)
        del node.input[:]
        node.input.extend(inputs)

        if w.c is not None:
            # Q4_1/Q4_K/Q5_K's offset: y += (per-block sums of x) · c, an fp32 MatMul over K/bs columns.
            if (a_in, k, bs) not in blocksums:
                ind = g.set(f"gguf_native.blocksum_{k}_{bs}",
                            np.kron(np.eye(nb, dtype=np.float32), np.ones((bs, 1), np.float32)))  # [K, nb]
                blocksums[a_in, k, bs] = g.add(g.before, pos, "MatMul", [a_in, ind],
                                               g.name(a_in.rsplit("/", 1)[0] + "/blocksum"))
            offset = g.set(b_name.replace(".weight_Q4", ".gguf_offset"), w.c.T)
            out, node.output[0] = node.output[0], g.name(node.name + "/main")
            corr = g.add(g.after, pos, "MatMul", [blocksums[a_in, k, bs], offset], g.name(node.name + "/offset"))
            g.add(g.after, pos, "Add", [node.output[0], corr], out)
            summary["corrections"] += 1
        summary["repacked"] += 1
        summary["tensors"].update({s: _source_type(tensors, s) for s in sources})

    summary["accuracy_level"] = sorted(levels)
    summary["embedding"] = _replace_embedding(g, tensors["token_embd.weight"], blocks, head_q8)
    g.commit()
    summary["bytes"] = _save(model, model_dir)
    log.info("re-packed %d GGUF weights into %s (%d offset terms, %.1f MB)", summary["repacked"],
             model_dir, summary["corrections"], summary["bytes"] / 1e6)
    return summary


def _source_type(tensors: dict, name: str) -> str:
    """The block type of a tensor, or of the fused one it is a slice of (Phi-3)."""
    if name in tensors:
        return tensors[name].tensor_type.name
    _, blk, part = name.split(".")[:3]
    whole = f"blk.{blk}.attn_qkv.weight" if part.startswith("attn_") else f"blk.{blk}.ffn_up.weight"
    return tensors[whole].tensor_type.name


def _replace_embedding(g: _Graph, table: Any, blocks: Callable[[str], _Blocks], head_q8: str | None) -> str:
    """The input embedding straight from the GGUF's token_embd: GatherBlockQuantized over its Q8_0
    bytes (the very initializer of an 8-bit lm_head when tied), else an fp32 Gather of the exactly
    dequantized table. Replaces the builder's Gather or (shared_embeddings) GatherBlockQuantized."""
    found = [(i, n) for i, n in enumerate(g.g.node)
             if n.op_type in ("Gather", "GatherBlockQuantized") and n.input[1] == "input_ids"]
    if len(found) != 1:
        raise StoreError(f"expected one embedding lookup of input_ids in the ONNX build, found {len(found)}")
    pos, node = found[0]
    g.dropped.add(pos)
    vocab, hidden = int(table.shape[-1]), int(table.shape[0])
    if table.tensor_type.name != "Q8_0":
        import gguf

        dense = gguf.quants.dequantize(np.asarray(table.data), table.tensor_type).astype(np.float32)
        weight = g.set("model.embed_tokens.weight", dense.reshape(vocab, hidden))
        g.add(g.before, pos, "Gather", [weight, node.input[1]], node.output[0])
        return f"{table.tensor_type.name} → fp32 Gather"
    nb, w = hidden // BLOCK, blocks("token_embd.weight")
    data = head_q8 or g.set("model.embed_tokens.weight_Q8", w.q.reshape(vocab, nb, BLOCK))
    scales = g.set("model.embed_tokens.scales_Q8", w.d.reshape(vocab, nb, 1))
    shape = g.set("gguf_native.embed_shape", np.array([0, 0, hidden], np.int64))
    # [batch, seq, blocks, 32] (quantized along the last axis, like lm_head's B), then back to hidden.
    gathered = g.add(g.before, pos, "GatherBlockQuantized", [data, node.input[1], scales],
                     g.name(node.name + "/blocks"), bits=8, block_size=BLOCK, quantize_axis=2, gather_axis=0)
    g.add(g.before, pos, "Reshape", [gathered, shape], node.output[0])
    return "Q8_0 GatherBlockQuantized" + (", bytes shared with lm_head" if head_q8 else "")


def _save(model, model_dir: Path) -> int:
    """Write model.onnx + model.onnx.data next to the old ones, then swap them in."""
    import onnx

    tmp = Path(tempfile.mkdtemp(prefix=".gguf-native-", dir=model_dir))
    try:
        onnx.save_model(model, str(tmp / "model.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
        mode = 0o666 & ~_umask()
        for name in ("model.onnx.data", "model.onnx"):  # data first: the graph names it
            os.chmod(tmp / name, mode)
            os.replace(tmp / name, model_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sum((model_dir / n).stat().st_size for n in ("model.onnx", "model.onnx.data"))


def _umask() -> int:
    """The process umask, read without setting it (os.umask would flip it for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022
