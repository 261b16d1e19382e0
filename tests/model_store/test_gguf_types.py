"""GGUF quant types through the whole pipeline: a tiny random Llama written as a GGUF of each type in
the test (tiny_gguf.py), resolved, dequantized, built (fp32 reference, genai int8/int4 re-quantized,
and onnx-gguf-native where the file's blocks can be re-packed), gated, chosen, and answered by the
runner the gateway serves with. A type that cannot be served fails at load time, saying so.

Builds run in-process (FMGATE_BUILD_IN_PROCESS=1): a build child costs ~15 s of imports on a busy
box, and the child path is tested in test_child.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from model_store import ModelStore, StoreError

from .conftest import SMALL_EVAL
from .test_gguf_native import Greedy
from .tiny_gguf import HAND_WRITTEN, TYPES, tiny_llama_weights, write_gguf

pytestmark = pytest.mark.slow

NATIVE = {"Q4_0", "Q4_1", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"}  # served from the file's own blocks
CANDIDATES = ["onnx-gguf-native", "genai-int8", "genai-int4"]
# Measured once on the tiny model (docs/model_store.md): mean cosine of the served variant's logits
# to the fp32 build of the dequantized GGUF. The bounds leave room; a wrong block layout gives ~0.
MIN_COSINE = {"onnx-gguf-native": 0.995, "genai-int8": 0.995, "genai-int4": 0.95}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gguf-types")
    hf = tiny_llama_weights(root / "hf")
    return {"hf": hf, "root": root, **{t: write_gguf(hf, root / f"tiny.{t}.gguf", t) for t in TYPES}}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ModelStore:
    return ModelStore(tmp_path_factory.mktemp("gguf-types-home"), eval_settings=SMALL_EVAL)


def _ids(folder: Path, n: int = 96) -> list[int]:
    from model_store.quality import _tokenizer, calibration_text

    return _tokenizer(folder).encode(calibration_text()[:2000], add_special_tokens=False).ids[:n]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return float(np.mean(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))


def _served_answer(folder: Path, n: int = 6) -> list[int]:
    """Greedy tokens from gateway.engines.onnx_causal (what /v1/chat/completions runs) on a chat prompt."""
    from tokenizers import Tokenizer

    from gateway.engines.onnx_causal import OnnxCausalRunner

    tc = json.loads((folder / "tokenizer_config.json").read_text())
    assert "im_start" in tc["chat_template"] and tc["eos_token"] == "<|im_end|>"
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(prompt, add_special_tokens=False).ids
    runner = OnnxCausalRunner(folder, capacity=1, max_seq_len=64, threads=1, prefix_cache_blocks=0)
    logits, out = runner.prefill(0, ids), []
    for _ in range(n):
        out.append(int(np.asarray(logits).argmax(-1)))
        logits = runner.decode([0], [out[-1]])[0]
    return out


def test_hand_written_k_quants_decode_with_gguf_py(files) -> None:
    """gguf-py cannot write K-quants; ours decode with gguf-py's own dequantizer to the weights (to
    the type's rounding), and gguf_native decodes every tensor of every file exactly as gguf-py does."""
    import gguf

    from model_store.gguf_native import _decode

    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 512)).astype(np.float32)
    for name, bound in (("Q4_K", 0.1), ("Q5_K", 0.05), ("Q6_K", 0.03)):
        with pytest.raises(NotImplementedError):
            gguf.quants.quantize(x, gguf.GGMLQuantizationType[name])
        raw = HAND_WRITTEN[name](x).reshape(16, -1)
        back = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name])
        assert np.linalg.norm(back - x) / np.linalg.norm(x) < bound, name
    for t in TYPES:
        if t == "F16":
            continue
        for tensor in gguf.GGUFReader(files[t]).tensors:
            if len(tensor.shape) < 2:
                continue
            ref = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(int(tensor.shape[-1]), -1)
            blocks = _decode(tensor)
            assert np.array_equal(blocks.dequantize(), ref), (t, tensor.name)
            assert np.array_equal(blocks.widen(8, 16).dequantize(), ref), (t, tensor.name)  # mixed fused form


@pytest.mark.parametrize("qtype", TYPES)
def test_gguf_type_to_a_served_answer(qtype, files, store, monkeypatch) -> None:
    monkeypatch.setenv("FMGATE_BUILD_IN_PROCESS", "1")
    art = store.load(str(files[qtype]), task="chat", candidates=CANDIDATES)
    rows = {r["variant"]: r for r in art.manifest["candidates"]}
    skipped = {r["variant"]: r["reason"] for r in art.manifest["not_applicable"]}
    assert art.format == "onnx-genai" and rows[art.variant]["passes"]
    if qtype in NATIVE:
        assert "onnx-gguf-native" in rows and "onnx-gguf-native" not in skipped
    else:
        assert "F16" in skipped["onnx-gguf-native"] and "dequantized" in skipped["onnx-gguf-native"]
    # Every built variant's logits against the fp32 build of the dequantized GGUF (the reference).
    ref_dir = store.cache.artifacts / rows["genai-fp32"]["key"]
    ids = _ids(ref_dir)
    ref = Greedy(ref_dir).logits(ids)
    cosines = {}
    for name, row in rows.items():
        if name == "genai-fp32":
            continue
        assert row["passes"], (name, row["reason"])  # inside the gate (perplexity ≤ 1.10x fp32)
        cosines[name] = _cosine(Greedy(store.cache.artifacts / row["key"]).logits(ids), ref)
        assert cosines[name] >= MIN_COSINE[name], (qtype, name, cosines[name])
    print(f"\n{qtype}: chosen {art.variant}; logit cosine to fp32 {cosines}; "
          f"ppl ratio { {n: r['quality'].get('perplexity_ratio') for n, r in rows.items()} }; "
          f"MB { {n: round(r['size_bytes'] / 1e6, 2) for n, r in rows.items()} }")
    tokens = _served_answer(art.path)
    vocab = json.loads((files["hf"] / "config.json").read_text())["vocab_size"]
    assert len(tokens) == 6 and all(0 <= t < vocab for t in tokens)


@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q5_K_M"])
def test_native_k_quants_are_lossless(qtype, files, store, monkeypatch, tmp_path) -> None:
    """At accuracy_level 1 (fp32 activations) the re-packed Q4_K/Q5_K/Q6_K blocks, mixed inside the
    fused qkv projection, compute what the fp32 build of the dequantized file computes."""
    from model_store.gguf_native import repack_gguf_weights

    monkeypatch.setenv("FMGATE_BUILD_IN_PROCESS", "1")
    int4 = store.load(str(files[qtype]), task="chat", variant="genai-int4")  # the graph the recipe re-packs
    fp32 = store.load(str(files[qtype]), task="chat", variant="genai-fp32")
    folder = shutil.copytree(int4.path, tmp_path / "exact", copy_function=shutil.copy)
    for f in folder.iterdir():
        f.chmod(0o644)
    summary = repack_gguf_weights(files[qtype], folder, accuracy_level=1)
    assert summary["repacked"] == 2 * 5 + 1 and summary["accuracy_level"] == [1]
    assert {"Q6_K"} < set(summary["tensors"].values())
    ids = _ids(fp32.path)
    exact, ref = Greedy(folder).logits(ids), Greedy(fp32.path).logits(ids)
    err = float(np.abs(exact - ref).max() / np.abs(ref).max())
    requant = Greedy(int4.path).logits(ids)  # genai's own int4 of the dequantized weights: a second rounding
    requant_err = float(np.abs(requant - ref).max() / np.abs(ref).max())
    print(f"\n{qtype} at accuracy_level 1: re-packed max|Δ|/max = {err:.2e}, genai-int4 {requant_err:.2e}")
    assert err < 1e-4 and requant_err > 10 * err


def _retype(src: Path, dst: Path, tensor: str, qtype) -> Path:
    """A copy of a GGUF with one tensor re-declared as another block type (its bytes resized)."""
    import gguf

    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), "llama")
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
    for t in r.tensors:
        shape = [int(x) for x in reversed(t.shape)]
        if t.name == tensor:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            w.add_tensor(t.name, np.zeros((shape[0], shape[1] // block * size), np.uint8), raw_dtype=qtype)
        else:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_a_type_that_cannot_be_served_fails_at_load_time(files, tmp_path, monkeypatch) -> None:
    import gguf

    monkeypatch.setenv("FMGATE_BUILD_IN_PROCESS", "1")

    # Q1_0 is a block type gguf-py 0.19 knows by name but cannot dequantize.
    bad = _retype(files["Q8_0"], tmp_path / "tiny.Q1_0.gguf", "blk.0.ffn_up.weight", gguf.GGMLQuantizationType.Q1_0)
    store = ModelStore(tmp_path / "home", eval_settings=SMALL_EVAL)
    with pytest.raises(StoreError, match=r"blk\.0\.ffn_up\.weight is Q1_0.*cannot be served"):
        store.load(str(bad), task="chat")
    # and the native recipe says, before any build, which blocks it cannot re-pack
    from model_store.gguf_native import native_support

    ok, why = native_support(bad)
    assert not ok and "Q1_0" in why
