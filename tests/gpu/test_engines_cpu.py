"""torch_loader.load() end to end on the CPU (FMGATE_TORCH_DEVICE=cpu): scheduler + torch runner."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from gateway.engines import torch_loader
from gateway.engines.embedder import EmbeddingEngine
from gateway.engines.llm import LLMEngine
from gateway.settings import ModelConfig


@pytest.fixture
def cpu_device(monkeypatch):
    monkeypatch.setenv("FMGATE_TORCH_DEVICE", "cpu")


def test_chat_engine_batches_like_alone(cpu_device, tiny_llama):
    cfg = ModelConfig(name="tiny", source=str(tiny_llama), task="chat", max_num_seqs=4, max_model_len=256,
                      max_batch_tokens=16)
    engine = torch_loader.load(tiny_llama, cfg, threads=2)
    try:
        assert isinstance(engine, LLMEngine)
        assert engine.scheduler.max_num_seqs == 4
        prompts = [" ".join(f"w{(7 * i + j) % 500 + 1}" for j in range(3 + 9 * i)) for i in range(6)]
        alone = [engine.generate(p, max_tokens=12, temperature=0, ignore_eos=True) for p in prompts]
        together: list = [None] * len(prompts)

        def run(i):
            together[i] = engine.generate(prompts[i], max_tokens=12, temperature=0, ignore_eos=True)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [c.text for c in together] == [c.text for c in alone]
        assert all(c.completion_tokens == 12 for c in together)
        assert engine.runner.live == 0
    finally:
        engine.close()


def test_embed_engine(cpu_device, tiny_bert, tmp_path):
    import shutil

    from tests.gpu.conftest import write_word_tokenizer

    folder = tmp_path / "enc"
    shutil.copytree(tiny_bert, folder)
    write_word_tokenizer(folder, 300)
    (folder / "fmgate_torch.json").write_text(json.dumps(
        {"format": "torch", "task": "embed", "dtype": "bfloat16", "pooling": "mean", "normalize": True,
         "dim": 48, "max_length": 128}))
    cfg = ModelConfig(name="enc", source=str(folder), task="embed")
    engine = torch_loader.load(folder, cfg, threads=2)
    try:
        assert isinstance(engine, EmbeddingEngine)
        assert engine.batcher.max_batch_size == 64  # GPU defaults apply on CUDA only
        a = engine.embed(["w1 w2 w3", "w4"])
        b = engine.embed(["w4"])
        assert a.shape == (2, 48)
        np.testing.assert_allclose(a[1], b[0], rtol=1e-5, atol=1e-6)
    finally:
        engine.close()


def test_no_cuda_is_a_clear_error(monkeypatch, tiny_llama):
    monkeypatch.delenv("FMGATE_TORCH_DEVICE", raising=False)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(Exception, match="no CUDA device"):
        torch_loader.load(tiny_llama, ModelConfig(name="x", source=str(tiny_llama)), 0)
