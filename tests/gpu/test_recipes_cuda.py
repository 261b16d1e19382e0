"""The GPU recipes: registered through the store's plugin hook, applicable only with a CUDA device,
and buildable (the cast and the marker) on any machine."""

from __future__ import annotations

import json

import pytest
import torch

from model_store import recipes
from model_store.hardware import CudaDevice, HardwareProfile, use_profile
from model_store.recipes import BuildContext
from model_store.sources import Source

H200 = HardwareProfile(arch="x86_64", cpu_model="fake", cores=16, memory_mb=131072, isa=("avx2",),
                       cuda=(CudaDevice(0, "NVIDIA H200", "9.0", 143771),), ort_providers=("CPUExecutionProvider",),
                       fake=True)
T4 = HardwareProfile(arch="x86_64", cpu_model="fake", cores=8, memory_mb=32768, isa=("avx2",),
                     cuda=(CudaDevice(0, "Tesla T4", "7.5", 15360),), fake=True)
CPU = HardwareProfile(arch="x86_64", cpu_model="fake", cores=2, memory_mb=8192, isa=("avx2",), fake=True)
SRC = Source(ref="x", kind="folder", name="x", digest="sha256:0", model_format="hf")
NAMES = {"chat": ("torch-bf16-cuda", "torch-fp16-cuda"), "embed": ("torch-bf16-cuda-encoder", "torch-fp16-cuda-encoder")}


def applicable(task: str, hw: HardwareProfile) -> set[str]:
    return {r.name for r in recipes.for_task(task) if r.device == "cuda" and r.applies(hw, SRC)[0]}


@pytest.mark.parametrize("task", ["chat", "embed"])
def test_registered_via_plugin_hook(task):
    names = {r.name for r in recipes.for_task(task)}
    assert set(NAMES[task]) <= names
    for n in NAMES[task]:
        r = recipes.get(n, task)
        assert r.format == "torch" and r.device == "cuda" and r.evaluate is not None and not r.reference


@pytest.mark.parametrize("task", ["chat", "embed"])
def test_applies_only_with_cuda(task):
    bf16, fp16 = NAMES[task]
    assert applicable(task, H200) == {bf16}
    assert applicable(task, T4) == {fp16}
    assert applicable(task, CPU) == set()
    ok, why = recipes.get(bf16).applies(CPU, SRC)
    assert not ok and "CUDA" in why


def test_faked_profile_reaches_hardware_class(monkeypatch):
    from model_store import hardware

    monkeypatch.setenv("FMGATE_FAKE_HARDWARE", json.dumps(H200.to_dict()))
    hw = hardware.detect()
    assert hw.has_cuda and hw.cuda[0].compute_capability == "9.0"
    assert hw.hardware_class.endswith("cuda-sm90")
    with use_profile(CPU):
        assert not hardware.detect().has_cuda


def _ctx(src_dir, out, work, name, hw=H200):
    r = recipes.get(name)
    return BuildContext(source=SRC, out=out, work=work, params=dict(r.params), hardware=hw, hf_dir=lambda: src_dir)


def test_build_causal_records_device(tiny_llama, tmp_path, monkeypatch):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir(), work.mkdir()
    recipes.get("torch-bf16-cuda").build(_ctx(tiny_llama, out, work, "torch-bf16-cuda"))
    marker = json.loads((out / "fmgate_torch.json").read_text())
    assert marker["device_name"] == "NVIDIA H200" and marker["compute_capability"] == "9.0"
    assert marker["dtype"] == "bfloat16" and marker["task"] == "chat"
    assert (out / "tokenizer.json").exists() and (out / "model.safetensors").exists()
    from safetensors.torch import load_file

    st = load_file(str(out / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in st.values() if v.is_floating_point())
    assert "lm_head.weight" not in st  # tied
    # The built folder serves (CPU, float32 from the bf16 weights).
    from gateway.engines.torch_llama import TorchCausalRunner

    r = TorchCausalRunner(out, capacity=1, max_seq_len=64, device="cpu", dtype=torch.float32)
    assert r.prefill(0, [1, 2, 3]).shape == (1, 512)


def test_build_encoder_writes_encoder_keys(tiny_bert, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir(), work.mkdir()
    recipes.get("torch-fp16-cuda-encoder").build(_ctx(tiny_bert, out, work, "torch-fp16-cuda-encoder", T4))
    marker = json.loads((out / "fmgate_torch.json").read_text())
    assert marker["task"] == "embed" and marker["dtype"] == "float16" and marker["device_name"] == "Tesla T4"
    assert {"pooling", "normalize", "dim", "max_length"} <= set(marker)
    assert marker["dim"] == 48
    assert not (out / "fmgate_encoder.json").exists()  # that marker means an ONNX encoder to the registry


def test_build_refuses_unsupported_architecture(tiny_bert, tmp_path):
    from model_store.errors import StoreError

    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir(), work.mkdir()
    with pytest.raises(StoreError, match="supports"):
        recipes.get("torch-bf16-cuda").build(_ctx(tiny_bert, out, work, "torch-bf16-cuda"))
