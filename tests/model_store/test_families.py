"""The family matrix (docs/model_store.md): tiny random-weight models of each family, from configs,
through the whole pipeline (build in a child, measure, gate, choose) to an answer from the runner
the gateway serves them with."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model_store import ModelStore

from .conftest import SMALL_EVAL
from .tiny import tiny_bert, tiny_causal

pytestmark = pytest.mark.slow


def _answer(art, prompt: str = "The capital of France is", n: int = 6) -> tuple[list[int], str]:
    """Greedy tokens from the served runner (gateway.engines.onnx_causal) on the built artifact."""
    from tokenizers import Tokenizer

    from gateway.engines.onnx_causal import OnnxCausalRunner

    tok = Tokenizer.from_file(str(art.path / "tokenizer.json"))
    runner = OnnxCausalRunner(art.path, capacity=1, max_seq_len=64, threads=1, prefix_cache_blocks=0)
    ids = tok.encode(prompt, add_special_tokens=False).ids
    logits = runner.prefill(0, ids)
    out = []
    for _ in range(n):
        nxt = int(np.asarray(logits).argmax(-1))
        out.append(nxt)
        logits = runner.decode([0], [nxt])[0]
    return out, tok.decode(out)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "phi3", "gemma2"])
def test_causal_family_to_a_served_answer(family, tmp_path):
    src = tiny_causal(tmp_path / family, family)
    store = ModelStore(tmp_path / "home", eval_settings=SMALL_EVAL)
    art = store.load(str(src), task="chat", variant="genai-fp32")  # one build: the matrix checks the family
    assert art.format == "onnx-genai" and art.variant == "genai-fp32"
    assert np.isfinite(art.quality["perplexity"]) and art.quality["perplexity_ratio"] == 1.0
    tokens, text = _answer(art)
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    assert len(tokens) == 6 and all(0 <= t < vocab for t in tokens)
    assert isinstance(text, str)
    # Random weights answer nonsense, but the same nonsense as transformers does.
    import torch
    from transformers import AutoModelForCausalLM

    from model_store.quality import _tokenizer

    ids = _tokenizer(art.path).encode("The capital of France is", add_special_tokens=False).ids
    ref = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32)
    with torch.no_grad():
        first = int(ref(torch.tensor([ids])).logits[0, -1].argmax())
    assert tokens[0] == first


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_xlm_roberta_encoder_pooling_from_sentence_transformers(pooling, tmp_path):
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    folder = tiny_bert(tmp_path / "xlmr")
    for f in folder.glob("*.safetensors"):
        f.unlink()
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    XLMRobertaModel(XLMRobertaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=130, pad_token_id=0)
                    ).save_pretrained(folder)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": pooling == "cls",
         "pooling_mode_mean_tokens": pooling == "mean"}))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if pooling == "cls":
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 96}))
    art = ModelStore(tmp_path / "home", eval_settings=SMALL_EVAL).load(str(folder), task="embed")
    meta = json.loads((art.path / "fmgate_encoder.json").read_text())
    assert meta == {"pooling": pooling, "normalize": pooling == "cls", "dim": 32, "max_length": 96}
    from gateway.engines.onnx_encoder import OnnxEncoderRunner

    vec = OnnxEncoderRunner(art.path, threads=1).encode([[0, 5, 6, 7, 2]])
    assert vec.shape == (1, 32) and np.isfinite(vec).all()
    if pooling == "cls":
        assert np.linalg.norm(vec[0]) == pytest.approx(1.0, abs=1e-4)


# --- GGUF files of each family ------------------------------------------------------------------------

SPM_FAMILIES = {"mistral", "phi3", "gemma2"}  # their GGUFs carry a SentencePiece vocabulary ("llama" model)


def _tiny_for_gguf(folder, family):
    """tiny_causal, except Qwen3 with head_dim 128: transformers 4.57 reads no head_dim from a qwen3 GGUF
    (it ignores qwen3.attention.key_length) and takes Qwen3Config's 128, which every real Qwen3 has. And
    Phi-3 with Phi-3-mini-4k's 4096 positions: a phi3 GGUF gives only the context length, and against
    Phi3Config's default original_max_position_embeddings (4096) any other makes the genai builder take
    the LongRoPE path, which fails (the HF-folder case, docs/model_store.md)."""
    src = tiny_causal(folder, family)
    if family == "phi3":
        cfg = json.loads((src / "config.json").read_text())
        cfg["max_position_embeddings"] = cfg["original_max_position_embeddings"] = 4096
        (src / "config.json").write_text(json.dumps(cfg))
    if family == "qwen3":
        import torch
        from transformers import Qwen3Config, Qwen3ForCausalLM

        cfg = Qwen3Config.from_pretrained(src)
        cfg.head_dim = 128
        for f in src.glob("*.safetensors"):
            f.unlink()
        torch.manual_seed(0)
        Qwen3ForCausalLM(cfg).save_pretrained(src)
    return src


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "phi3", "gemma2"])
def test_gguf_of_each_family_to_a_served_answer(family, tmp_path, monkeypatch):
    """A Q8_0 GGUF of the family, written as llama.cpp writes it (Mistral as architecture "llama";
    Mistral, Phi-3 and Gemma-2 with a SentencePiece vocabulary), through the store to the served runner,
    whose logits are those of transformers reading the same GGUF, for the chosen variant and for the
    natively served one. Llama's GGUFs of every quant type: test_gguf_types.py."""
    import torch
    from transformers import AutoModelForCausalLM

    from gateway.engines.onnx_causal import OnnxCausalRunner

    from .tiny_gguf import write_gguf

    monkeypatch.setenv("FMGATE_BUILD_IN_PROCESS", "1")  # the child path is test_child.py's; saves its imports
    src = _tiny_for_gguf(tmp_path / family, family)
    gguf = write_gguf(src, tmp_path / f"tiny-{family}.Q8_0.gguf", "Q8_0", spm=family in SPM_FAMILIES)
    store = ModelStore(tmp_path / "home", eval_settings=SMALL_EVAL)
    art = store.load(str(gguf), task="chat", candidates=["onnx-gguf-native"])
    rows = {r["variant"]: r for r in art.manifest["candidates"]}
    skipped = {r["variant"]: r["reason"] for r in art.manifest["not_applicable"]}
    assert "onnx-gguf-native" not in skipped  # every family's Q8_0 blocks are served natively
    assert rows["onnx-gguf-native"]["passes"], rows["onnx-gguf-native"]["reason"]
    assert art.format == "onnx-genai" and np.isfinite(rows["genai-fp32"]["quality"]["perplexity"])

    from model_store.quality import _tokenizer

    tok = _tokenizer(art.path)
    text = "The capital of France is"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text  # the converted (and repaired) tokenizer gives back its text
    runner = OnnxCausalRunner(art.path, capacity=1, max_seq_len=64, threads=1, prefix_cache_blocks=0)
    logits = np.asarray(runner.prefill(0, ids), np.float32).reshape(-1)
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0, -1].numpy()
    cos = float(logits @ want / (np.linalg.norm(logits) * np.linalg.norm(want)))
    assert cos > 0.999, (art.variant, cos)
    nxt = runner.decode([0], [int(logits.argmax())])[0]
    assert np.isfinite(np.asarray(nxt)).all()
    # The native variant itself, whichever won: the file's own blocks (Phi-3's fused attn_qkv and
    # ffn_up sliced into the builder's projections), int8 activations.
    native = store.load(str(gguf), task="chat", variant="onnx-gguf-native")
    runner = OnnxCausalRunner(native.path, capacity=1, max_seq_len=64, threads=1, prefix_cache_blocks=0)
    got = np.asarray(runner.prefill(0, ids), np.float32).reshape(-1)
    assert float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want))) > 0.999


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "phi3", "gemma2"])
def test_k_quant_gguf_of_each_family_served_natively(family, tmp_path, monkeypatch):
    """Q4_K_M (Q4_K with Q6_K attn_v/ffn_down/output, as llama.cpp mixes them) of each non-Llama family,
    wide enough for K-quants' 256-blocks: the re-packed blocks (Qwen's q/k/v biases, Phi-3's fused
    attn_qkv and ffn_up, Gemma's norms left to the builder) give transformers' logits for the file."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from gateway.engines.onnx_causal import OnnxCausalRunner
    from model_store.quality import _tokenizer

    from .tiny_gguf import write_gguf

    monkeypatch.setenv("FMGATE_BUILD_IN_PROCESS", "1")
    src = _tiny_for_gguf(tmp_path / family, family)
    cfg = AutoConfig.from_pretrained(src)
    cfg.hidden_size, cfg.intermediate_size = 256, 512
    if family == "gemma2":
        cfg.head_dim = 64
    for f in src.glob("*.safetensors"):
        f.unlink()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # weights of the usual scale, so 4-bit rounding matters as it does in real files
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 1.0 if "embed" in name else 1.0 / np.sqrt(p.shape[1]))
    model.save_pretrained(src)
    gguf = write_gguf(src, tmp_path / f"tiny-{family}.Q4_K_M.gguf", "Q4_K_M", spm=family in SPM_FAMILIES)
    art = ModelStore(tmp_path / "home", eval_settings=SMALL_EVAL).load(str(gguf), task="chat",
                                                                        variant="onnx-gguf-native")
    assert art.manifest["candidates"][0]["passes"], art.manifest["candidates"][0]["reason"]
    ids = _tokenizer(art.path).encode("The capital of France is", add_special_tokens=False).ids
    runner = OnnxCausalRunner(art.path, capacity=1, max_seq_len=64, threads=1, prefix_cache_blocks=0)
    got = np.asarray(runner.prefill(0, ids), np.float32).reshape(-1)
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0, -1].numpy()
    assert float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want))) > 0.999


def _wide(folder, family):
    """Gemma-3 (text) and Phi-4-mini (phi3 with partial rotary 0.75 and tied embeddings), 256 wide:
    genai's attention needs the rotary half-width to be a multiple of 8, and K-quants 256-blocks."""
    import torch
    import transformers as tf

    from .tiny import tiny_llama

    tiny_llama(folder)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    for f in folder.glob("*.safetensors"):
        f.unlink()
    common = {"vocab_size": vocab, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "tie_word_embeddings": True}
    if family == "gemma3":
        cfg, model = tf.Gemma3TextConfig(**common, head_dim=64, sliding_window=128), tf.Gemma3ForCausalLM
    else:
        cfg, model = tf.Phi3Config(**common, partial_rotary_factor=0.75, original_max_position_embeddings=4096), \
            tf.Phi3ForCausalLM
    torch.manual_seed(0)
    model(cfg).save_pretrained(folder)
    return folder


def _served_logits(art, ids):
    from gateway.engines.onnx_causal import OnnxCausalRunner

    runner = OnnxCausalRunner(art.path, capacity=1, max_seq_len=64, threads=1, prefix_cache_blocks=0)
    return np.asarray(runner.prefill(0, ids), np.float32).reshape(-1)


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("family", ["gemma3", "phi4-mini"])
def test_newer_families_to_a_served_answer(family, tmp_path, monkeypatch):
    """Gemma-3 and Phi-4-mini HF folders to the served runner, logits = transformers'; Gemma-3 also as
    a Q4_K_M GGUF (architecture gemma3), served natively. (A Phi-4-mini GGUF is architecture phi3, and
    transformers 4.57 reads no partial rotary factor from it: not covered.)"""
    import torch
    from transformers import AutoModelForCausalLM

    from model_store.quality import _tokenizer

    from .tiny_gguf import write_gguf

    monkeypatch.setenv("FMGATE_BUILD_IN_PROCESS", "1")
    src = _wide(tmp_path / family, family)
    store = ModelStore(tmp_path / "home", eval_settings=SMALL_EVAL)
    art = store.load(str(src), task="chat", variant="genai-fp32")
    ids = _tokenizer(art.path).encode("The capital of France is", add_special_tokens=False).ids
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(torch.tensor([ids])).logits[0, -1].numpy()
    assert _cos(_served_logits(art, ids), want) > 0.9999
    if family != "gemma3":
        return
    gguf = write_gguf(src, tmp_path / "tiny-gemma3.Q4_K_M.gguf", "Q4_K_M", spm=True)
    native = store.load(str(gguf), task="chat", variant="onnx-gguf-native")
    ids = _tokenizer(native.path).encode("The capital of France is", add_special_tokens=False).ids
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0, -1].numpy()
    assert _cos(_served_logits(native, ids), want) > 0.999


# --- Phi-4 and Phi-4-mini -------------------------------------------------------------------------------

def _phi4(folder):
    """Phi-4's shape, tiny: Phi3ForCausalLM with tiny.py's GPT-2-style byte-level BPE vocabulary and
    16,384 positions without LongRoPE (original_max_position_embeddings = max_position_embeddings)."""
    src = tiny_causal(folder, "phi3")
    cfg = json.loads((src / "config.json").read_text())
    cfg["max_position_embeddings"] = cfg["original_max_position_embeddings"] = 16384
    (src / "config.json").write_text(json.dumps(cfg))
    return src


def _hf_logits(folder, ids):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(torch.tensor([ids])).logits[0, -1].numpy()


def test_phi4_folder_and_gguf_to_a_served_answer(tmp_path, monkeypatch):
    """Phi-4 as a transformers folder and as a Q8_0 GGUF (architecture phi3, tokenizer.ggml.model gpt2).
    transformers 4.57 converts every phi3 GGUF vocabulary as SentencePiece (spaces vanish) and leaves
    original_max_position_embeddings at 4096 (genai's LongRoPE path); the store reads the vocabulary
    as byte-level BPE and the context as the original one. Served ids = the folder's tokenizer's,
    served logits = transformers' on the folder."""
    from tokenizers import Tokenizer

    from model_store.quality import _tokenizer

    from .tiny_gguf import write_gguf

    monkeypatch.setenv("FMGATE_BUILD_IN_PROCESS", "1")
    src = _phi4(tmp_path / "phi4")
    store = ModelStore(tmp_path / "home", eval_settings=SMALL_EVAL)
    art = store.load(str(src), task="chat", variant="genai-fp32")
    text = "The capital of France is"
    ids = Tokenizer.from_file(str(src / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    want = _hf_logits(src, ids)
    assert _cos(_served_logits(art, ids), want) > 0.9999

    gguf = write_gguf(src, tmp_path / "tiny-phi4.Q8_0.gguf", "Q8_0")
    art = store.load(str(gguf), task="chat", candidates=["onnx-gguf-native"])
    rows = {r["variant"]: r for r in art.manifest["candidates"]}
    assert rows["onnx-gguf-native"]["passes"], rows["onnx-gguf-native"]["reason"]
    tok = _tokenizer(art.path)
    probe = "Hello world,  two spaces\nand a newline. " + text
    assert tok.encode(probe, add_special_tokens=False).ids == \
        Tokenizer.from_file(str(src / "tokenizer.json")).encode(probe, add_special_tokens=False).ids
    assert tok.encode(text).ids == ids  # no BOS added: the file's add_bos_token is false
    tc = json.loads((art.path / "tokenizer_config.json").read_text())
    assert tc["eos_token"] == "<|im_end|>" and "chat_template" in tc
    for variant in (art.variant, "onnx-gguf-native"):
        served = store.load(str(gguf), task="chat", variant=variant)
        assert _cos(_served_logits(served, ids), want) > 0.999, variant


def _phi4_mini_gguf(tmp_path, extra=None):
    from .tiny_gguf import write_gguf

    src = _wide(tmp_path / "phi4-mini", "phi4-mini")
    return src, write_gguf(src, tmp_path / "tiny-phi4-mini.Q8_0.gguf", "Q8_0", extra=extra)


def test_phi4_mini_gguf_partial_rotary_to_a_served_answer(tmp_path, monkeypatch):
    """Phi-4-mini's partial rotary (0.75) as a GGUF: llama.cpp writes only phi3.rope.dimension_count (48
    of head_dim 64), which transformers 4.57 does not read. The store sets partial_rotary_factor from
    it, so the config is the folder's and the served logits are transformers' on the folder."""
    import torch
    from transformers import AutoModelForCausalLM

    from model_store.quality import _tokenizer

    monkeypatch.setenv("FMGATE_BUILD_IN_PROCESS", "1")
    src, gguf = _phi4_mini_gguf(tmp_path)
    store = ModelStore(tmp_path / "home", eval_settings=SMALL_EVAL)
    art = store.load(str(gguf), task="chat", candidates=["onnx-gguf-native"])
    staged = next((tmp_path / "home" / "models" / "staging").glob("*/config.json"))
    cfg, want_cfg = json.loads(staged.read_text()), json.loads((src / "config.json").read_text())
    for key in ("partial_rotary_factor", "max_position_embeddings", "original_max_position_embeddings",
                "hidden_size", "num_attention_heads", "num_key_value_heads", "rope_theta", "tie_word_embeddings"):
        assert cfg[key] == want_cfg[key], key
    ids = _tokenizer(art.path).encode("The capital of France is", add_special_tokens=False).ids
    want = _hf_logits(src, ids)
    for variant in (art.variant, "onnx-gguf-native"):
        served = store.load(str(gguf), task="chat", variant=variant)
        assert _cos(_served_logits(served, ids), want) > 0.999, variant
    # transformers' own reading of the file rotates all 64 dims: not the model.
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    assert ref.config.partial_rotary_factor == 1.0


def test_phi3_gguf_with_longrope_factors_is_refused_at_load_time(tmp_path, monkeypatch):
    """Real Phi-4-mini (and Phi-3-128k, Phi-3.5-mini) GGUFs carry LongRoPE factor tensors, which
    transformers 4.57 drops: refused when the file is read, naming them, before any build."""
    from model_store import StoreError

    monkeypatch.setenv("FMGATE_BUILD_IN_PROCESS", "1")
    factors = {"rope_factors_long.weight": np.ones(24), "rope_factors_short.weight": np.ones(24)}
    _, gguf = _phi4_mini_gguf(tmp_path, extra=factors)
    store = ModelStore(tmp_path / "home", eval_settings=SMALL_EVAL)
    with pytest.raises(StoreError, match=r"phi3 GGUF with LongRoPE factors .* not served yet"):
        store.load(str(gguf), task="chat")
    assert not list((tmp_path / "home" / "models" / "variants").glob("*.json"))
