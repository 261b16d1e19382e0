"""Calibrated 4-bit chat variants, and mixed 4/8-bit by measured sensitivity.

All start from the fp32 onnxruntime-genai build (the reference variant) and only replace its MatMul
nodes by MatMulNBits, so the graph, its config and the engine that runs it stay the same. The
quantizers are onnxruntime's own (onnxruntime.quantization: the weight-only code it carries from
Intel Neural Compressor, and MatMulNBitsQuantizer for HQQ):

* ort-int4-kquant: k-quant (llama.cpp's weighted min/scale search), asymmetric, no calibration.
* ort-int4-gptq: GPTQ over the Hessian of each MatMul's input on calibration text.
* ort-int4-hqq: HQQ (half-quadratic). Its zero points are floats, which onnxruntime's CPU kernel
  serves by dequantizing the whole matrix on every call: kept out of `auto`, measured on request.
* ort-int4-mixed: GPTQ 4-bit, with the output head and the MatMuls whose 4-bit error costs most kept
  at 8 bits, the way llama.cpp's Q4_K_M keeps some tensors at 6 bits. Sensitivity is measured, not
  listed: the error tr(EᵀHE) each MatMul's 4-bit weights E = W - Q(W) add to its output on the
  calibration activations (H = XᵀX). The head, then the most sensitive MatMuls, are kept at 8 bits
  until they hold `mix_fraction` of the MatMul weights. (Ranking by the error relative to the
  output, tr(EᵀHE)/tr(WᵀHW), picked up_proj everywhere and did worse: see docs/cpu_speed.md.)

Calibration uses tokens of model_store/data/calibration.txt *after* the ones the quality gate
scores, so a calibrated variant is not measured on the text it was fitted to.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .hardware import HardwareProfile
from .recipes import BuildContext, _cpu_ort, genai_build, quiet, recipe

log = logging.getLogger("fmgate.model_store")

CALIB_START = 2048  # the gate scores the first EvalSettings.ppl_tokens (1,024) tokens; calibrate after them
CALIB_SAMPLES = 2
CALIB_LEN = 512
PLAN_FILE = "fmgate_quant.json"  # what each MatMul became, and why


# --- the fp32 graph ---------------------------------------------------------------------------

def fp32_folder(ctx: BuildContext) -> Path:
    """A private copy of the fp32 genai build (the reference when built, else a fresh build).

    Copied, not linked: onnx refuses external data files that are hard links (the store's blobs)."""
    dest = ctx.work / "fp32"
    if dest.exists():
        return dest
    src = ctx.reference_dir
    if src is None or not (src / "model.onnx").exists() or not (src / "genai_config.json").exists():
        built = ctx.work / "fp32-build"
        built.mkdir(parents=True, exist_ok=True)
        sub = BuildContext(source=ctx.source, out=built, work=ctx.work / "fp32-scratch", params={},
                           hardware=ctx.hardware, hf_dir=ctx.hf_dir, step=ctx.step)
        genai_build(sub, "fp32", {})
        src = built
    dest.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copyfile(f, dest / f.name)
    return dest


def side_files(src: Path, out: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model.onnx"):
            shutil.copyfile(f, out / f.name)


def matmuls(model) -> list[tuple[Any, Any]]:
    """(node, weight initializer) of every MatMul with a constant 2-D weight, in graph order."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
            out.append((n, inits[n.input[1]]))
    return out


def calibration_samples(folder: Path, n: int = CALIB_SAMPLES, length: int = CALIB_LEN,
                        start: int = CALIB_START) -> list[np.ndarray]:
    from tokenizers import Tokenizer

    from .quality import calibration_text

    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(calibration_text(),
                                                                        add_special_tokens=False).ids
    if len(ids) < start + length:  # a tokenizer with a tiny vocabulary or a short text: start earlier
        start = max(0, len(ids) - n * length)
    out = []
    for i in range(n):
        piece = ids[start + i * length: start + (i + 1) * length]
        if len(piece) >= 8:
            out.append(np.asarray(piece, dtype=np.int64))
    return out


def genai_feed(folder: Path, sess, ids: np.ndarray) -> dict:
    cfg = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    feed = {"input_ids": ids[None, :], "attention_mask": np.ones((1, len(ids)), np.int64)}
    empty = np.zeros((1, cfg["num_key_value_heads"], 0, cfg["head_size"]), np.float32)
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feed[i.name] = empty
        elif i.name == "position_ids":
            feed[i.name] = np.arange(len(ids), dtype=np.int64)[None, :]
    return feed


def collect_hessians(folder: Path, model, names: Iterable[str], samples: list[np.ndarray],
                     threads: int = 0) -> dict[str, np.ndarray]:
    """H = 2/n Σ xᵀx of each named tensor (a MatMul input) over the calibration tokens: one forward
    per sample with those tensors added as graph outputs."""
    import onnx
    import onnxruntime as ort

    names = sorted(set(names))
    aug = onnx.ModelProto()
    aug.CopyFrom(model)
    del aug.graph.output[:]
    for name in names:
        aug.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    path = folder / "augmented.onnx"
    onnx.save_model(aug, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="augmented.onnx.data", size_threshold=1024)
    del aug
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    hs: dict[str, np.ndarray] = {}
    count = 0
    for ids in samples:
        outs = sess.run(names, genai_feed(folder, sess, ids))
        for name, x in zip(names, outs, strict=True):
            x = x.reshape(-1, x.shape[-1]).astype(np.float64)
            hs[name] = hs.get(name, 0) + x.T @ x
        count += len(ids)
    del sess
    path.unlink(missing_ok=True)
    (folder / "augmented.onnx.data").unlink(missing_ok=True)
    return {k: v * (2.0 / max(count, 1)) for k, v in hs.items()}


# --- quantizing one weight ----------------------------------------------------------------------

def quantize_weight(w: np.ndarray, bits: int, algo: str, block: int, h: np.ndarray | None = None):
    """w [K, N] fp32 → (q uint8 [N, K'], scale [N*K'/block], zp uint8 or None, dequantized [K, N]).

    K' is K padded to the block. algo: "rtn" (symmetric), "rtn-asym" (min/max, integer zero point),
    "kquant" (asymmetric, weighted search),
    "gptq" (asymmetric, needs the Hessian h of the input)."""
    from onnxruntime.quantization.neural_compressor.weight_only import (
        gptq,
        pad_tensor,
        quant_tensor,
        quant_tensor_k_quant_cpu,
    )

    k, n = w.shape
    blocks = (k + block - 1) // block
    if algo in ("gptq", "gptq-sym"):
        if h is None:
            raise ValueError("gptq needs the input's Hessian")
        if k % block:
            raise ValueError(f"gptq needs K ({k}) to be a multiple of the block ({block})")
        q, scale, zp = gptq_blocks(w, h, bits, block, symmetric=algo == "gptq-sym")
    elif algo == "gptq-inc":  # onnxruntime's own port (see gptq_blocks for why it is not used)
        fq = gptq(w.astype(np.float64).copy(), h.copy(), num_bits=bits, group_size=block, scheme="asym",
                  blocksize=128, percdamp=0.01, actorder=False, mse=False, perchannel=True)
        padded = pad_tensor(fq, block, blocks)
        q, scale, zp = quant_tensor(padded.T, bits, block, "asym", "uint")
    elif algo == "kquant":
        padded = pad_tensor(w, block, blocks)
        q, scale, zp = quant_tensor_k_quant_cpu(padded.T, bits, block)
    elif algo == "rtn-asym":
        padded = pad_tensor(w, block, blocks)
        q, scale, zp = quant_tensor(padded.T, bits, block, "asym", "uint")
    elif algo == "rtn":
        padded = pad_tensor(w, block, blocks)
        q, scale, zp = quant_tensor(padded.T, bits, block, "sym", "uint")
        zp = None  # the kernel's default zero point (8 or 128) is the symmetric one
    else:
        raise ValueError(f"unknown algorithm {algo!r}")
    q = np.asarray(q).reshape(n, blocks * block)
    scale = np.asarray(scale, dtype=np.float32).reshape(n, blocks)
    z = (np.full_like(scale, 1 << (bits - 1)) if zp is None
         else np.asarray(zp, dtype=np.float32).reshape(n, blocks))
    deq = ((q.reshape(n, blocks, block) - z[..., None]) * scale[..., None]).reshape(n, -1)[:, :k].T
    q8 = q.astype(np.uint8)
    zp8 = None if zp is None else np.asarray(zp).reshape(n * blocks).astype(np.uint8)
    return q8, scale.reshape(-1), zp8, deq.astype(np.float32)


def gptq_blocks(w: np.ndarray, h: np.ndarray, bits: int, block: int, symmetric: bool,
                percdamp: float = 0.01, lazy: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """GPTQ (Frantar et al. 2022, the reference algorithm with lazy batch updates) for w [K, N]:
    columns of Wᵀ are quantized in order, each one's rounding error spread over the columns not yet
    quantized through the upper Cholesky factor of H⁻¹; a block's scale (and zero point) is set from
    the already-updated weights when the quantizer reaches it.

    onnxruntime 1.32's port (neural_compressor.weight_only.gptq) indexes the upper factor by column
    (Hinv1[i:, i], which is zero below the diagonal), so no error is ever propagated and its result
    equals round-to-nearest; this is the same algorithm with the row index (Hinv1[i, i:]).
    Returns q uint8 [N, K], scale float32 [N, K/block], zp uint8 [N*K/block] (None when symmetric)."""
    maxq = (1 << bits) - 1
    mid = 1 << (bits - 1)
    k, n = w.shape
    W = np.ascontiguousarray(w.T, dtype=np.float32)  # [N, K]
    H = np.array(h, dtype=np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices(k)] += percdamp * float(np.mean(np.diag(H)))
    try:
        U = np.linalg.cholesky(np.linalg.inv(H)).T  # inv(H) = Uᵀ U, U upper
    except np.linalg.LinAlgError:
        H[np.diag_indices(k)] += float(np.mean(np.diag(H)))
        U = np.linalg.cholesky(np.linalg.inv(H)).T
    U = U.astype(np.float32)
    Q = np.zeros((n, k), dtype=np.uint8)
    scales = np.zeros((n, k // block), dtype=np.float32)
    zeros = np.full((n, k // block), mid, dtype=np.float32)
    lazy = max(block, lazy - lazy % block)
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        W1 = W[:, i1:i2].copy()
        E1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % block == 0:
                g = W1[:, i:i + block]
                if symmetric:  # the largest magnitude lands exactly on -8 or +7 (llama.cpp's Q4_0 rule)
                    big = g[np.arange(n), np.abs(g).argmax(axis=1)]
                    sc = np.where(big < 0, -big / mid, big / (mid - 1))
                    zp = np.full(n, float(mid), dtype=np.float32)
                else:
                    lo, hi = np.minimum(g.min(axis=1), 0.0), np.maximum(g.max(axis=1), 0.0)
                    sc = (hi - lo) / maxq
                    sc[sc == 0] = 1.0
                    zp = np.clip(np.round(-lo / sc), 0, maxq)
                sc[sc == 0] = 1.0
                scales[:, col // block], zeros[:, col // block] = sc, zp
            b = col // block
            x = W1[:, i]
            q = np.clip(np.round(x / scales[:, b]) + zeros[:, b], 0, maxq)
            Q[:, col] = q
            err = (x - (q - zeros[:, b]) * scales[:, b]) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    zp8 = None if symmetric else zeros.reshape(-1).astype(np.uint8)
    return Q, scales.astype(np.float32), zp8


def relative_error(w: np.ndarray, deq: np.ndarray, h: np.ndarray | None) -> float:
    """Output error of the quantized weight relative to the output: tr(EᵀHE)/tr(WᵀHW), or the plain
    Frobenius ratio without a Hessian."""
    e = (w - deq).astype(np.float64)
    w64 = w.astype(np.float64)
    if h is None:
        return float((e * e).sum() / max((w64 * w64).sum(), 1e-30))
    return float(((h @ e) * e).sum() / max(((h @ w64) * w64).sum(), 1e-30))


def output_error(w: np.ndarray, deq: np.ndarray, h: np.ndarray | None) -> float:
    """tr(EᵀHE)/n: the mean squared error the quantized weight adds to the MatMul's output (which is
    added to the residual stream), per calibration token. Ranks MatMuls for 8 bits."""
    e = (w - deq).astype(np.float64)
    if h is None:
        return float((e * e).sum())
    return float(((h @ e) * e).sum())


def choose_8bit(sizes: Mapping[str, int], errors: Mapping[str, float], fraction: float,
                first: Iterable[str] = ()) -> list[str]:
    """The MatMuls in `first` (the output head, whose error reaches the logits unattenuated), then the
    most sensitive ones, most sensitive first, until they hold `fraction` of the weights (a MatMul
    that would overshoot the budget is skipped for smaller ones further down)."""
    total = sum(sizes.values())
    budget = fraction * total
    chosen, used = [], 0
    head = [x for x in first if x in errors]
    for name in head + sorted((x for x in errors if x not in head), key=lambda x: -errors[x]):
        if used + sizes[name] <= budget:
            chosen.append(name)
            used += sizes[name]
    return chosen


# --- the whole graph ----------------------------------------------------------------------------

def quantize_graph(fp32: Path, out: Path, *, algo: str, block: int, accuracy_level: int,
                   mix_fraction: float = 0.0, threads: int = 0, step=None,
                   hessians: dict[str, np.ndarray] | None = None) -> dict:
    """Write out/model.onnx (+ side files): every MatMul as MatMulNBits, 4-bit by `algo`, and the
    most sensitive `mix_fraction` of the weights at 8 bits. Returns the plan (also in PLAN_FILE)."""
    import contextlib

    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization.neural_compressor.weight_only import make_matmul_weight_only_node

    step = step or (lambda what: contextlib.nullcontext())
    model = onnx.load(str(fp32 / "model.onnx"))
    pairs = matmuls(model)
    hs: dict[str, np.ndarray] = dict(hessians or {})
    if not hs and (algo == "gptq" or mix_fraction > 0):
        with step("calibration activations"):
            hs = collect_hessians(fp32, model, [n.input[0] for n, _ in pairs], calibration_samples(fp32),
                                  threads=threads)
    four: dict[str, tuple] = {}
    errors: dict[str, float] = {}
    harm: dict[str, float] = {}
    sizes: dict[str, int] = {}
    weights: dict[str, np.ndarray] = {}
    with step(f"quantize 4-bit ({algo})"):
        for node, init in pairs:
            w = numpy_helper.to_array(init).astype(np.float32)
            h = hs.get(node.input[0])
            weights[node.name] = w
            four[node.name] = quantize_weight(w, 4, algo, block, h)
            errors[node.name] = relative_error(w, four[node.name][3], h)
            harm[node.name] = output_error(w, four[node.name][3], h)
            sizes[node.name] = int(w.size)
    heads = [n.name for n, _ in pairs if n.output[0] in {o.name for o in model.graph.output}
             or n.name.startswith("/lm_head/")]
    eight = set(choose_8bit(sizes, harm, mix_fraction, heads)) if mix_fraction > 0 else set()
    new_nodes, drop, inits = [], set(), []
    for node, init in pairs:
        w = weights[node.name]
        if node.name in eight:
            q, scale, zp, _ = quantize_weight(w, 8, "rtn", block)
            bits = 8
        else:
            q, scale, zp, _ = four[node.name]
            bits = 4
        blocks = q.shape[1] // block
        qnode, new = make_matmul_weight_only_node(node=node, weight_shape=w.shape, num_bits=bits, group_size=block,
                                                 k_blocks=blocks, q_weight=q.reshape(-1, block), scale=scale,
                                                 zero_point=zp,
                                                 accuracy_level=accuracy_level)
        new_nodes.append((node, qnode))
        inits.extend(new)
        drop.add(init.name)
    by_old = {id(old): new for old, new in new_nodes}
    nodes = [by_old.get(id(n), n) for n in model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    keep = [t for t in model.graph.initializer if t.name not in drop]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep + inits)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    (out / "model.onnx.data").unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(model, str(out / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    side_files(fp32, out)
    plan = {"algorithm": algo, "block_size": block, "accuracy_level": accuracy_level,
            "mix_fraction": mix_fraction, "first": heads if mix_fraction > 0 else [],
            "calibration_tokens": int(sum(len(s) for s in calibration_samples(fp32))) if hs else 0,
            "matmuls": {n.name: {"bits": 8 if n.name in eight else 4, "params": sizes[n.name],
                                 "rel_error_4bit": round(errors[n.name], 6),
                                 "out_error_4bit": float(f"{harm[n.name]:.6g}")} for n, _ in pairs}}
    (out / PLAN_FILE).write_text(json.dumps(plan, indent=1))
    return plan


def _build(ctx: BuildContext, algo: str, mix: float = 0.0) -> None:
    p = ctx.params
    fp32 = fp32_folder(ctx)
    with quiet():
        quantize_graph(fp32, ctx.out, algo=algo, block=int(p["block_size"]), accuracy_level=int(p["accuracy_level"]),
                       mix_fraction=mix, step=ctx.step)


@recipe("ort-int4-kquant", task="chat", format="onnx-genai",
        params={"precision": "int4", "algorithm": "k_quant", "block_size": 32, "accuracy_level": 4},
        applies=_cpu_ort, default=False)
def build_kquant(ctx: BuildContext) -> None:
    """MatMulNBits 4-bit, asymmetric, k-quant scale search (onnxruntime's port of llama.cpp's)."""
    _build(ctx, "kquant")


@recipe("ort-int4-gptq", task="chat", format="onnx-genai",
        params={"precision": "int4", "algorithm": "GPTQ", "block_size": 32, "accuracy_level": 4,
                "calibration": f"{CALIB_SAMPLES}x{CALIB_LEN}@{CALIB_START}"},
        applies=_cpu_ort, default=False)
def build_gptq(ctx: BuildContext) -> None:
    """MatMulNBits 4-bit, asymmetric, GPTQ on calibration text (onnxruntime's GPTQ)."""
    _build(ctx, "gptq")


def _mixed_measured_here(hw: HardwareProfile) -> tuple[bool, str]:
    """Built by `auto` on x86 with AVX2 or better, where it was measured to serve faster: on AVX2 alone it
    won beyond the tie margin (score 213 vs 185); on a Zen 5 with AVX-512 VNNI the store's score tied with
    genai-int8 (366 vs 354; the smaller wins a tie) and, served, it decoded one stream 1.2x faster (192 vs
    158 tok/s). Not measured on arm64 (docs/cpu_speed.md)."""
    if hw.isa_tier in ("avx2", "avx512", "avx512_vnni", "amx"):
        return True, ""
    return False, f"measured only on x86 with AVX2 or better ({hw.isa_tier} here); name it to build it"


@recipe("ort-int4-mixed", task="chat", format="onnx-genai",
        params={"precision": "int4+int8", "algorithm": "GPTQ", "block_size": 32, "accuracy_level": 4,
                "mix_fraction": 0.4, "calibration": f"{CALIB_SAMPLES}x{CALIB_LEN}@{CALIB_START}"},
        applies=_cpu_ort, default=_mixed_measured_here)
def build_mixed(ctx: BuildContext) -> None:
    """GPTQ 4-bit; lm_head and the MatMuls most sensitive on calibration text (40% of the weights) at 8 bits."""
    _build(ctx, "gptq", float(ctx.params["mix_fraction"]))


@recipe("ort-int4-hqq", task="chat", format="onnx-genai",
        params={"precision": "int4", "algorithm": "HQQ", "block_size": 32, "accuracy_level": 4},
        applies=_cpu_ort, default=False)
def build_hqq(ctx: BuildContext) -> None:
    """MatMulNBits 4-bit by HQQ (onnxruntime's MatMulNBitsQuantizer). Float zero points: the CPU kernel
    dequantizes the whole weight per call (about 6 tok/s on SmolLM2), so not a candidate for auto."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    p = ctx.params
    fp32 = fp32_folder(ctx)
    with ctx.step("quantize 4-bit (HQQ)"), quiet():
        cfg = HQQWeightOnlyQuantConfig(block_size=int(p["block_size"]), bits=4)
        q = MatMulNBitsQuantizer(onnx.load(str(fp32 / "model.onnx")), block_size=int(p["block_size"]),
                                 accuracy_level=int(p["accuracy_level"]), algo_config=cfg)
        q.process()
        q.model.save_model_to_file(str(ctx.out / "model.onnx"), use_external_data_format=True)
    side_files(fp32, ctx.out)
