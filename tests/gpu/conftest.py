"""Tiny random checkpoints for the torch runners, and the `gpu` marker.

Tests marked `gpu` need a CUDA device and skip without one: CI has no GPU by design, so that is the
one skip allowed there; bench/gpu_check.sh runs them on a GPU machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skips without one; run by bench/gpu_check.sh)")


def has_cuda() -> bool:
    return torch.cuda.is_available()


def write_word_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level tokenizer over "w0".."w{n}" so engines can be driven end to end without a download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<eos>": 0, **{f"w{i}": i for i in range(1, vocab)}}
    tk = Tokenizer(models.WordLevel(words, unk_token="<eos>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(str(folder))


def make_llama(folder: Path, *, model_type: str = "llama", layers: int = 2, vocab: int = 512, seed: int = 0,
               tie: bool = True) -> Path:
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  rope_theta=10000.0, tie_word_embeddings=tie, initializer_range=0.2, rms_norm_eps=1e-5)
    if model_type == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # random biases, so the bias path is exercised
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    else:
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    model.eval().save_pretrained(str(folder), safe_serialization=True)
    write_word_tokenizer(folder, vocab)
    return folder


def make_bert(folder: Path, seed: int = 0, vocab: int = 300) -> Path:
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=128)
    transformers.BertModel(cfg, add_pooling_layer=False).eval().save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("tiny-qwen"), model_type="qwen2", tie=False, seed=1)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_bert(tmp_path_factory.mktemp("tiny-bert"))
