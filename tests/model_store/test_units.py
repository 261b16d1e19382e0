"""Pieces without models: hardware profiles, the recipe registry, the gate, sources, the cache."""

from __future__ import annotations

import json
import os

import pytest

from model_store import Gate, StoreError, recipes
from model_store.cache import Cache
from model_store.digest import sha256_file
from model_store.hardware import CudaDevice, HardwareProfile, detect, use_profile
from model_store.sources import Source


def _src(fmt="hf"):
    return Source("x", "folder" if fmt == "hf" else "gguf", "x", "sha256:0", fmt)


def test_detect_real_profile():
    hw = detect()
    assert hw.cores >= 1 and hw.memory_mb > 0
    assert hw.hardware_class.startswith("cpu-")
    assert "CPUExecutionProvider" in hw.ort_providers


def test_fake_profiles_drive_applicability():
    old_cpu = HardwareProfile(arch="x86_64", cpu_model="old", cores=4, memory_mb=8000, isa=("fma",),
                              ort_providers=("CPUExecutionProvider",), fake=True)
    with use_profile(old_cpu):
        hw = detect()
        assert hw.isa_tier == "x86"
        ok, why = recipes.get("ort-int8-per-tensor").applies(hw, _src())
        assert not ok and "avx2" in why
        assert recipes.get("ort-int8-per-channel").applies(hw, _src())[0]
    gpu = HardwareProfile(arch="x86_64", cpu_model="big", cores=16, memory_mb=1 << 20, isa=("avx2", "avx512f"),
                          cuda=(CudaDevice(0, "NVIDIA H200", "9.0", 143771),), fake=True)
    with use_profile(gpu):
        assert detect().has_cuda
        assert detect().hardware_class == "cpu-avx512+cuda-sm90"
    assert not detect().fake


def test_fake_profile_from_env(monkeypatch):
    monkeypatch.setenv("FMGATE_FAKE_HARDWARE", json.dumps({"arch": "aarch64", "isa": ["asimd", "i8mm"]}))
    hw = detect()
    assert hw.fake and hw.isa_tier == "arm64-i8mm" and recipes.isa_preset(hw) == "arm64"


def test_gguf_native_only_for_gguf_sources():
    ok, why = recipes.get("onnx-gguf-native").applies(detect(), _src("hf"))
    assert not ok and "not a GGUF" in why


def test_registry_is_extensible():
    calls = []

    @recipes.recipe("test-only-cuda", task="chat", format="torch", params={"dtype": "bfloat16"},
                    applies=lambda hw, src: (hw.has_cuda, "needs a CUDA device"), device="cuda",
                    evaluate=lambda folder, ctx: {"quality": {}, "speed": {"score": 1.0}}, default=False)
    def build(ctx):
        calls.append(ctx)

    try:
        r = recipes.get("test-only-cuda", "chat")
        assert r.format == "torch" and r.params == {"dtype": "bfloat16"} and r.device == "cuda"
        assert r in recipes.for_task("chat")
        assert r.applies(detect(), _src()) == (False, "needs a CUDA device") or detect().has_cuda
    finally:
        recipes.RECIPES.pop("test-only-cuda")
    with pytest.raises(StoreError, match="unknown recipe"):
        recipes.get("test-only-cuda")


def test_reference_recipes():
    assert recipes.reference_for("chat").name == "genai-fp32"
    assert recipes.reference_for("embed").name == "ort-fp32"
    assert not recipes.get("optimum-int8-default").default  # measurable, never a default candidate


def test_the_int4_mix_is_an_auto_candidate_where_it_was_measured(tmp_path):
    """ort-int4-mixed served faster than every default on x86 with AVX2 and with AVX-512 VNNI
    (docs/cpu_speed.md): `auto` builds it there, says why not on arm64 (not measured), and builds it
    anywhere when named."""
    from model_store import ModelStore

    store = ModelStore(tmp_path)

    def pool(**hw):
        chosen, skipped = store.candidates(_src("gguf"), "chat", HardwareProfile.from_dict(hw))
        return [r.name for r in chosen], {s["variant"]: s["reason"] for s in skipped}

    for isa in (["avx2", "fma", "f16c"], ["avx2", "avx512f", "avx512_vnni"], ["avx2", "avx_vnni"],
                ["avx2", "avx512f", "avx512_vnni", "amx_int8"]):
        names, skipped = pool(isa=isa)
        assert "ort-int4-mixed" in names and names[0] == "genai-fp32" and "ort-int4-mixed" not in skipped, isa
    names, skipped = pool(arch="aarch64", isa=["asimd", "i8mm"])
    assert "ort-int4-mixed" not in names and "x86" in skipped["ort-int4-mixed"], skipped
    assert "genai-int8" in names and "optimum-int8-default" not in skipped  # plain opt-ins are not listed
    named, _ = store.candidates(_src("gguf"), "chat", HardwareProfile.from_dict({"arch": "aarch64", "isa": ["asimd"]}),
                                ["ort-int4-mixed"])
    assert [r.name for r in named] == ["genai-fp32", "ort-int4-mixed"]


def test_gate():
    g = Gate()
    ok, why, q = g.judge("chat", {"perplexity": 25.3}, {"perplexity": 19.2})
    assert not ok and q["perplexity_ratio"] == pytest.approx(1.3177, abs=1e-3) and "> 1.10x" in why
    assert g.judge("chat", {"perplexity": 19.3}, {"perplexity": 19.2})[0]
    assert g.judge("embed", {"cosine_mean": 0.992, "cosine_min": 0.986, "batch_invariance": 1.0}, None)[0]
    assert not g.judge("embed", {"cosine_mean": 0.961, "cosine_min": 0.913, "batch_invariance": 1.0}, None)[0]
    strict = Gate(max_perplexity_ratio=1.001, min_cosine_min=0.99)
    assert not strict.judge("chat", {"perplexity": 19.3}, {"perplexity": 19.2})[0]
    assert not strict.judge("embed", {"cosine_mean": 0.992, "cosine_min": 0.986}, None)[0]


def test_hf_id_parsing_offline(monkeypatch, tmp_path):
    from model_store.digest import HashCache
    from model_store.sources import HF_ID, resolve

    assert HF_ID.match("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert HF_ID.match("org/name@v1.0")
    assert not HF_ID.match("just-a-name")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StoreError, match="not in the Hugging Face cache"):
        resolve("fmgate-test/surely-absent", hashes=HashCache(None), wheel_dir=tmp_path)


def test_cache_ingest_materialize_verify(tmp_path):
    cache = Cache(tmp_path / "models")
    assert cache.writable()
    built = tmp_path / "built"
    (built / "sub").mkdir(parents=True)
    (built / "a.bin").write_bytes(b"a" * 1000)
    (built / "sub" / "b.txt").write_text("hello")
    files = cache.ingest(built)
    assert set(files) == {"a.bin", "sub/b.txt"}
    assert files["a.bin"]["sha256"] == sha256_file(cache.blob(files["a.bin"]["sha256"]))
    folder = cache.materialize("k1", files)
    assert (folder / "sub" / "b.txt").read_text() == "hello"
    assert cache.verify("k1", files) is None
    os.chmod(folder / "a.bin", 0o644)
    with open(folder / "a.bin", "r+b") as f:
        f.truncate(10)
    assert "expected 1000" in cache.verify("k1", files)
    cache.drop_variant("k1", files)
    assert not cache.blob(files["a.bin"]["sha256"]).exists()  # the bad blob went too
    assert cache.blob(files["sub/b.txt"]["sha256"]).exists()  # the good one stays


def test_atomic_json(tmp_path):
    cache = Cache(tmp_path / "models")
    p = tmp_path / "models" / "variants" / "x.json"
    cache.write_json(p, {"a": 1})
    assert json.loads(p.read_text()) == {"a": 1}
    assert not [f for f in p.parent.iterdir() if f.name.endswith(".tmp")]
    p.write_text("{broken")
    assert cache.read_json(p) is None


def test_gate_fails_closed():
    """A figure that is missing, or not a number, fails the gate: an old manifest is not a pass."""
    g = Gate()
    ok, why, _ = g.judge("embed", {"cosine_mean": 0.999, "cosine_min": 0.998}, None)
    assert not ok and "no batch-invariance figure" in why
    assert not g.judge("embed", {"cosine_mean": 0.999, "batch_invariance": float("nan")}, None)[0]
    assert not g.judge("embed", {"batch_invariance": 1.0}, None)[0]
    assert not g.judge("chat", {"perplexity": float("nan")}, {"perplexity": 19.2})[0]
    assert not g.judge("chat", {"perplexity": 19.2}, {})[0]
    assert not g.judge("chat", {}, {"perplexity": 19.2})[0]
    # Only a gate that turns the check off passes without it.
    assert Gate(min_batch_invariance=None).judge("embed", {"cosine_mean": 0.999}, None)[0]


def test_batch_invariance_is_a_cosine():
    """Vectors that are not normalised: a dot product would say 4.0 or 0.25; the cosine says 1."""
    import numpy as np

    from model_store.quality import batch_invariance

    a = np.array([[2.0, 0.0], [0.0, 0.5]])
    assert batch_invariance(a, a * 1.0) == pytest.approx(1.0)
    assert batch_invariance(a, np.array([[2.0, 0.1], [0.0, 0.5]])) == pytest.approx(2 / np.hypot(2, 0.1))


def test_measure_digest_covers_code_and_data(monkeypatch, tmp_path):
    from model_store import store as store_mod

    r = recipes.get("ort-fp32")
    d1 = store_mod.measure_digest(r)
    here = store_mod.Path(store_mod.__file__).parent
    monkeypatch.setattr(store_mod, "_file_digests", {str(here / "data/sentences.txt"): "changed"})
    assert store_mod.measure_digest(r) != d1
    monkeypatch.setattr(store_mod, "_file_digests", {str(here / "quality.py"): "changed"})
    assert store_mod.measure_digest(r) != d1


def test_bench_choose_and_tie_rule():
    from model_store.bench import choose, separated, stats

    st = stats([100, 102, 98, 101, 99])
    assert st["median"] == 100 and st["spread_pct"] == pytest.approx(2.0) and st["rounds"] == 5
    assert separated({"a": stats([120, 121, 119]), "b": stats([100, 101, 99])})
    assert not separated({"a": stats([103, 110, 96]), "b": stats([100, 108, 95])})
    big = {"variant": "int8", "size_bytes": 270, "quality": {"perplexity_ratio": 1.002}, "speed": {"score": 235.8}}
    small = {"variant": "int4", "size_bytes": 121, "quality": {"perplexity_ratio": 1.05}, "speed": {"score": 235.3}}
    assert choose([big, small], "chat", 0.05)[0] is small  # a tie goes to the smaller one
    fast = dict(big, speed={"score": 300.0})
    assert choose([fast, small], "chat", 0.05)[0] is fast  # beyond the margin, speed wins
    same = dict(small, variant="x", quality={"perplexity_ratio": 1.01})
    assert choose([small, same], "chat", 0.05)[0] is same  # same size: the less lossy one
