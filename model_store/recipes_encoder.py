"""Batch-invariant int8 encoders: activations quantized per row (per token), weights per channel.

onnxruntime's dynamic int8 (`quantize_dynamic`, DynamicQuantizeLinear) takes one activation scale for
the whole input tensor, so a sentence's vector changes with whoever else is in its batch (the store's
gate refuses it). This rewrite gives every row of every MatMul input its own scale instead:

    s    = max(|x_row|, eps) / 127                      [..., 1]   (ReduceMax over the last axis)
    q    = QuantizeLinear(x, s, zero point 128)          uint8, symmetric around 128
    y    = MatMulIntegerToFloat(q, W_q, s, w_scale, 128) float = s * w_scale * (q - 128) @ W_q
    y   += bias                                          (the graph's own Add, left in place)

W_q is int8 per output channel, symmetric. The integer product is exact, and each row's scale depends
on that row alone, so a token's output does not depend on its batchmates or on padding: the alone vs
batched cosine is 1.0 to float rounding. uint8 x int8 is the layout onnxruntime's integer GEMM runs
fastest on x86 (VNNI's vpdpbusd; AMX where present). The bias is added by the graph's own Add:
MatMulIntegerToFloat's bias input is multiplied by a non-scalar a_scale as well (onnxruntime 1.32).

MatMuls that read the same input (attention's query, key and value) share one quantized copy of it.
Measured on all-MiniLM-L6-v2 in docs/embeddings.md.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .errors import StoreError
from .recipes import BuildContext, _encoder_files, _fp32_encoder, _int8_isa, quiet, recipe

log = logging.getLogger("fmgate.model_store")

MS_DOMAIN = "com.microsoft"


def rowwise_int8(model, reduce_range: bool = False):
    """Rewrite every MatMul with a constant 2-D weight into per-row int8; returns (model, count).

    reduce_range: 7-bit weights, for x86 without VNNI, where the u8 x s8 kernels add pairs in int16.
    """
    from onnx import helper, numpy_helper

    g = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise StoreError(f"per-row int8 needs ONNX opset ≥ 13 (per-axis QuantizeLinear); the model has {opset}")
    inits = {i.name: i for i in g.initializer}
    qmax = 63.0 if reduce_range else 127.0
    out_nodes: list = []
    new_inits: list = []
    shared = {}  # input name -> (quantized name, scale name)
    count = 0

    def add(op, ins, outs, **attrs):
        domain = attrs.pop("domain", "")
        out_nodes.append(helper.make_node(op, ins, outs, domain=domain, **attrs))

    def const(name, value):
        if name not in inits:
            t = numpy_helper.from_array(value, name)
            inits[name] = t
            new_inits.append(t)
        return name

    for node in g.node:
        w_init = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        w = numpy_helper.to_array(w_init) if w_init is not None else None
        if w is None or w.ndim != 2 or w.dtype != np.float32 or node.input[0] in inits:
            out_nodes.append(node)
            continue
        count += 1
        k, n = w.shape
        p = f"rowq{count}"
        w_scale = (np.maximum(np.abs(w).max(axis=0), 1e-12) / qmax).astype(np.float32)
        w_q = np.clip(np.round(w / w_scale), -qmax, qmax).astype(np.int8)
        const(p + "_w", w_q)
        const(p + "_wscale", w_scale)
        x = node.input[0]
        if x not in shared:
            minus1 = const("rowq_minus1", np.array([-1], np.int64))
            add("Abs", [x], [p + "_abs"])
            if opset >= 18:
                add("ReduceMax", [p + "_abs", minus1], [p + "_amax"], keepdims=1)
            else:
                add("ReduceMax", [p + "_abs"], [p + "_amax"], keepdims=1, axes=[-1])
            add("Max", [p + "_amax", const("rowq_eps", np.array(1e-8, np.float32))], [p + "_amax_eps"])
            add("Div", [p + "_amax_eps", const(f"rowq_qmax{int(qmax)}", np.array(qmax, np.float32))], [p + "_s"])
            # QuantizeLinear's per-axis scale is 1-D: quantize the [rows, K] view, then restore the shape.
            add("Shape", [x], [p + "_shape"])
            add("Reshape", [x, const(f"rowq_rows_{k}", np.array([-1, k], np.int64))], [p + "_x2"])
            add("Reshape", [p + "_s", minus1], [p + "_s1"])
            add("Shape", [p + "_s1"], [p + "_rows"])
            add("ConstantOfShape", [p + "_rows"], [p + "_zp"],
                value=numpy_helper.from_array(np.array([128], np.uint8)))
            add("QuantizeLinear", [p + "_x2", p + "_s1", p + "_zp"], [p + "_q2"], axis=0)
            add("Reshape", [p + "_q2", p + "_shape"], [p + "_q"])
            shared[x] = (p + "_q", p + "_s")
        q, s = shared[x]
        add("MatMulIntegerToFloat", [q, p + "_w", s, p + "_wscale", const("rowq_zp128", np.array(128, np.uint8))],
            list(node.output), domain=MS_DOMAIN, name=node.name)
    if not count:
        raise StoreError("no MatMul with constant weights to quantize")
    used = {i for nd in out_nodes for i in nd.input}
    kept = [i for i in g.initializer if i.name in used]
    del g.node[:]
    g.node.extend(out_nodes)
    del g.initializer[:]
    g.initializer.extend(kept + [t for t in new_inits if t.name in used])
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model, count


def quantize_encoder_rowwise(src: Path, dest: Path, reduce_range: bool = False) -> int:
    """src/model.onnx (fp32) -> dest/model.onnx (per-row int8); returns the number of MatMuls rewritten."""
    import onnx

    model = onnx.load(str(src))
    model, count = rowwise_int8(model, reduce_range=reduce_range)
    onnx.save(model, str(dest))
    return count


@recipe("ort-int8-rowwise", task="embed", format="onnx-encoder",
        params={"precision": "int8", "activations": "per-row", "weights": "per-channel",
                "kernel": "MatMulIntegerToFloat"},
        applies=_int8_isa)
def build_encoder_int8_rowwise(ctx: BuildContext) -> None:
    """int8 with per-row activation scales (batch-invariant) and per-channel weights, integer matmuls."""
    fp32 = _fp32_encoder(ctx)
    hw = ctx.hardware  # without VNNI, the u8 x s8 kernels add pairs in int16: keep the weights to 7 bits
    reduce_range = hw.isa_tier in ("avx2", "avx512") and not hw.has("avx_vnni")
    with ctx.step(f"quantize int8 (per-row activations{', 7-bit weights' if reduce_range else ''})"), quiet():
        n = quantize_encoder_rowwise(fp32 / "model.onnx", ctx.out / "model.onnx", reduce_range=reduce_range)
    log.debug("per-row int8: %d MatMuls rewritten", n)
    _encoder_files(fp32, ctx.out)
