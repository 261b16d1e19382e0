"""On a CUDA device: the graph-replayed runner equals the eager one, bf16 stays close to transformers,
the hardware profile sees the GPU, and the recipe builds and serves there.

Every test here is marked `gpu` and skips without CUDA: CI has no GPU by design, so this is the one
allowed skip; bench/gpu_check.sh runs them on a GPU machine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gateway.engines.torch_llama import TorchCausalRunner

from .conftest import has_cuda
from .test_torch_runner_cpu import PROMPTS, drive

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not has_cuda(), reason="needs a CUDA device (CI has none)")]


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen"])
def test_graphs_equal_eager(which, request):
    path = request.getfixturevalue(which)
    kw = dict(capacity=8, max_seq_len=300, device="cuda", dtype=torch.float32)
    eager = TorchCausalRunner(path, graphs=False, **kw)
    graph = TorchCausalRunner(path, graphs=True, **kw)
    assert graph.warmup() > 0
    a, la = drive(eager)
    b, lb = drive(graph)
    assert graph.stats["decode_graph"] > 0 and graph.stats["prefill_graph"] > 0
    assert a == b
    for x, y in zip(la, lb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-3)


def test_bf16_close_to_transformers(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).cuda().eval()
    r = TorchCausalRunner(tiny_llama, capacity=4, max_seq_len=256, device="cuda", dtype=torch.bfloat16)
    prompt = PROMPTS[2]
    with torch.no_grad():
        ref = model(torch.tensor([prompt], device="cuda")).logits[0, -1]
    out = r.prefill(0, prompt)[0].float()
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 3e-2, rel


def test_encoder_bf16_close(tiny_bert):
    from transformers import AutoModel

    from gateway.engines.torch_bert import TorchEncoderRunner

    model = AutoModel.from_pretrained(str(tiny_bert), dtype=torch.float32).eval()
    r = TorchEncoderRunner(tiny_bert, device="cuda", dtype=torch.bfloat16)
    batch = [[101, 5, 6, 7, 102], [101, 9, 102], [101] + list(range(20, 60)) + [102]]
    got = r.encode(batch)
    for i, ids in enumerate(batch):
        with torch.no_grad():
            h = model(torch.tensor([ids])).last_hidden_state[0].mean(0)
        ref = (h / h.norm()).numpy()
        assert float(np.dot(got[i], ref)) > 0.999


def test_profile_sees_the_gpu_and_recipe_applies():
    from model_store import hardware, recipes
    from model_store.sources import Source

    hardware._detect_real.cache_clear()
    hw = hardware._detect_real()
    assert hw.has_cuda and hw.cuda[0].name and hw.cuda[0].compute_capability
    src = Source(ref="x", kind="folder", name="x", digest="sha256:0", model_format="hf")
    live = {r.name for r in recipes.for_task("chat") if r.device == "cuda" and r.applies(hw, src)[0]}
    assert live == ({"torch-bf16-cuda"} if float(hw.cuda[0].compute_capability) >= 8 else {"torch-fp16-cuda"})


def test_load_serves_on_cuda(tiny_llama, monkeypatch):
    from gateway.engines import torch_loader
    from gateway.settings import ModelConfig

    monkeypatch.delenv("FMGATE_TORCH_DEVICE", raising=False)
    engine = torch_loader.load(tiny_llama, ModelConfig(name="t", source=str(tiny_llama), max_model_len=512), 0)
    try:
        assert engine.runner.device.startswith("cuda")
        assert engine.scheduler.max_num_seqs == 256  # default cap: the tiny model's KV fits far more
        out = engine.generate("w1 w2 w3", max_tokens=40, temperature=0, ignore_eos=True)
        assert out.completion_tokens == 40
        assert engine.runner.stats["decode_graph"] >= 39
    finally:
        engine.close()
