"""Tiny random-weight GGUFs of each quant type, written in the test (no llama.cpp needed).

gguf-py (0.19) quantizes Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, F16 and BF16, but its K-quant classes only
dequantize (`quantize_blocks` raises NotImplementedError). So the K-quant blocks are written here
from the format, and checked against gguf-py's own dequantizer (`test_gguf_types.py`):

* Q4_K, 144 B per 256: fp16 d, fp16 dmin, 12 B of eight 6-bit (scale, min), 128 B of 4-bit q
  (32 B per pair of 32-sub-blocks: low nibbles the first, high the second); w = d*sc*q - dmin*m.
* Q5_K, 176 B per 256: as Q4_K plus 32 B qh holding the fifth bit (bit j of byte l: sub-block j,
  element l) before the 128 B of low nibbles; w = d*sc*q - dmin*m with q in 0..31.
* Q6_K, 210 B per 256: 128 B low nibbles, 64 B high 2-bit pairs, 16 int8 scales (one per 16
  values), fp16 d; w = d*sc*(q - 32) with q in 0..63.

The mixes follow llama.cpp's `llama_tensor_get_type`: Q4_K_M and Q5_K_M put Q6_K in attn_v and
ffn_down of the "more bits" layers (the first and last eighth, every third in between) and in
output; token_embd is Q4_K in Q4_K_M, Q5_K in Q5_K_M, Q8_0 elsewhere in the 4-bit legacy types
(as SmolLM2's Q4_1 file has it). Norms stay F32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

QK_K = 256
TYPES = ("Q4_0", "Q4_1", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16")
# The tiny model is as small as K-quants allow: each row's length must be a multiple of 256.
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 256, 512, 2, 4, 2


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(*x.shape[:-1], -1) if x.ndim > 1 else \
        x.astype(np.float16).view(np.uint8)


def _scale_min_bytes(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins [n, 8] → the 12 bytes Q4_K/Q5_K store them in."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    d = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    m = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    md = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return np.concatenate([d, m, md], axis=1).astype(np.uint8)


def _affine_k(x: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Per 32-sub-block asymmetric quantization with 6-bit scale/min codes: (d, dmin, sc, mn, q)."""
    n = x.shape[0]
    sub = x.reshape(n, 8, 32)
    lo = np.minimum(sub.min(-1), 0.0)
    hi = sub.max(-1)
    scale = (hi - lo) / levels
    mins = -lo
    d = (scale.max(-1) / 63).astype(np.float16).astype(np.float32)
    dmin = (mins.max(-1) / 63).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / np.where(d > 0, d, 1)[:, None]), 0, 63)
    mn = np.clip(np.round(mins / np.where(dmin > 0, dmin, 1)[:, None]), 0, 63)
    step = d[:, None] * sc
    q = np.clip(np.round((sub + (dmin[:, None] * mn)[..., None]) / np.where(step > 0, step, 1)[..., None]),
                0, levels).astype(np.uint8)
    return d, dmin, sc, mn, q


def _low_nibbles(q: np.ndarray) -> np.ndarray:
    """[n, 8, 32] values (low 4 bits used) → [n, 128]: per pair of sub-blocks, first | second << 4."""
    q = q & 0x0F
    return (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(q.shape[0], 128).astype(np.uint8)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    x = x.reshape(-1, QK_K).astype(np.float32)
    d, dmin, sc, mn, q = _affine_k(x, 15)
    return np.concatenate([_f16(d[:, None]), _f16(dmin[:, None]), _scale_min_bytes(sc, mn), _low_nibbles(q)], 1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    x = x.reshape(-1, QK_K).astype(np.float32)
    d, dmin, sc, mn, q = _affine_k(x, 31)
    qh = ((q >> 4) & 1).astype(np.uint8)  # [n, 8 sub-blocks, 32]
    qh = np.bitwise_or.reduce(qh << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)  # [n, 32]
    return np.concatenate([_f16(d[:, None]), _f16(dmin[:, None]), _scale_min_bytes(sc, mn), qh.astype(np.uint8),
                           _low_nibbles(q)], 1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    x = x.reshape(-1, QK_K).astype(np.float32)
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    scale = np.abs(sub).max(-1) / 31
    d = (scale.max(-1) / 127).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / np.where(d > 0, d, 1)[:, None]), -128, 127)
    step = d[:, None] * sc
    q = (np.clip(np.round(sub / np.where(step > 0, step, 1)[..., None]), -32, 31) + 32).astype(np.uint8)
    g = q.reshape(n, 2, 4, 32)  # groups of 32: [half, 4 groups, 32]
    low, high = g & 0x0F, g >> 4
    # ql[half, p], p < 64: group 2*nib + p//32 of the half, nib 0 in the low nibble, 1 in the high one.
    ql = low[:, :, [0, 1]].reshape(n, 2, 64) | (low[:, :, [2, 3]].reshape(n, 2, 64) << 4)
    # qh[half, l]: 2 bits of each of the half's 4 groups, group s at bits 2s.
    qh = np.bitwise_or.reduce(high << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None], axis=2)
    return np.concatenate([ql.reshape(n, 128).astype(np.uint8), qh.reshape(n, 64).astype(np.uint8),
                           sc.astype(np.int8).view(np.uint8), _f16(d[:, None])], 1)


HAND_WRITTEN = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def encode(w: np.ndarray, qtype: str) -> tuple[np.ndarray, object]:
    """(bytes or float array for GGUFWriter.add_tensor, raw_dtype)."""
    import gguf

    t = gguf.GGMLQuantizationType[qtype]
    rows = w.reshape(-1, w.shape[-1]).astype(np.float32)
    if qtype == "F32":
        return rows.reshape(w.shape), None
    if qtype == "F16":
        return rows.astype(np.float16).reshape(w.shape), None
    if qtype in HAND_WRITTEN:
        data = HAND_WRITTEN[qtype](rows).reshape(rows.shape[0], -1)
    else:
        data = gguf.quants.quantize(rows, t)
    return data, t


def _more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's use_more_bits: the layers Q4_K_M/Q5_K_M give Q6_K attn_v and ffn_down."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def tensor_type(name: str, ftype: str, layers: int) -> str:
    if name.endswith("norm.weight"):
        return "F32"
    if ftype in ("F16", "Q8_0", "Q6_K"):
        return ftype
    if ftype in ("Q4_0", "Q4_1"):
        return "Q8_0" if name == "token_embd.weight" else ("Q6_K" if name == "output.weight" else ftype)
    base = {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K"}[ftype]
    if name == "output.weight":
        return "Q6_K"
    if ".attn_v." in name or ".ffn_down." in name:
        return "Q6_K" if _more_bits(int(name.split(".")[1]), layers) else base
    return base


FILE_TYPE = {"F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert-time Q/K row permutation (transformers undoes it on load)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_llama_weights(folder: Path) -> Path:
    """tiny.py's tokenizer with a random Llama as small as K-quants allow, untied output (so the
    GGUF has an output.weight, Q6_K in the K mixes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .tiny import tiny_llama

    tiny_llama(folder)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    for f in folder.glob("*.safetensors"):
        f.unlink()
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False, rope_theta=10000.0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # weights of the usual size, so quantization error means what it means for real models
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 1.0 / np.sqrt(p.shape[1]) if "embed" not in name else 1.0)
    model.save_pretrained(folder)
    return folder


def write_gguf(hf: Path, path: Path, ftype: str, spm: bool = False, extra: dict | None = None) -> Path:
    """The transformers folder `hf` as a GGUF of `ftype`, laid out like llama.cpp's converter:
    tensor names from gguf-py's TensorNameMap, metadata from transformers' GGUF config mapping read
    backwards. Llama and Mistral are written as llama.cpp writes them, architecture "llama" with its
    Q/K row permutation; Gemma's norms get llama.cpp's +1. spm: a SentencePiece-style vocabulary
    (tokenizer model "llama": ▁ pieces, byte tokens, scores, no merges), as Mistral, Phi-3 and Gemma
    files carry, instead of the GPT-2 BPE one; the model's vocab_size must have room for it. extra:
    more F32 tensors by GGUF name (LongRoPE's rope_factors_long.weight)."""
    import gguf
    from safetensors.numpy import load_file
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    cfg = json.loads((hf / "config.json").read_text())
    tj = json.loads((hf / "tokenizer.json").read_text())
    tc = json.loads((hf / "tokenizer_config.json").read_text())
    sd = {}
    for f in sorted(hf.glob("*.safetensors")):
        sd.update(load_file(f))
    arch = {"mistral": "llama", "gemma3_text": "gemma3"}.get(cfg["model_type"], cfg["model_type"])
    layers, heads, kv = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, layers)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{cfg['model_type']}")
    w.add_file_type(FILE_TYPE[ftype])
    w.add_quantization_version(2)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rotary = int(head_dim * cfg.get("partial_rotary_factor", 1.0))  # llama.cpp writes the rotated dims
    for key, hf_key in GGUF_CONFIG_MAPPING[arch].items():
        value = rotary if key == "rope.dimension_count" else cfg.get(hf_key) if hf_key else None
        if value is None:
            continue
        if isinstance(value, float):
            w.add_float32(f"{arch}.{key}", value)
        else:
            w.add_uint32(f"{arch}.{key}", int(value))

    if spm:
        _spm_tokenizer(w, cfg["vocab_size"])
    else:
        vocab = tj["model"]["vocab"]
        added = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
        tokens = [""] * cfg["vocab_size"]
        for tok, i in {**vocab, **added}.items():
            tokens[i] = tok
        merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm" if arch == "llama" else "qwen2")
        w.add_token_list(tokens)
        w.add_token_types([3 if t in added else 1 for t in tokens])
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_pad_token_id(2)
        w.add_add_bos_token(False)
        w.add_add_space_prefix(False)
    template = tc.get("chat_template") or ((hf / "chat_template.jinja").read_text()
                                           if (hf / "chat_template.jinja").exists() else None)
    if template:
        w.add_chat_template(template)

    for hname, arr in sd.items():
        gname = names.get_name(hname, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ValueError(f"no GGUF name for {hname} ({arch})")
        arr = arr.astype(np.float32)
        if arch == "llama" and ".attn_q." in gname:
            arr = _permute(arr, heads)
        elif arch == "llama" and ".attn_k." in gname:
            arr = _permute(arr, kv)
        if arch.startswith("gemma") and gname.endswith("norm.weight"):
            arr = arr + 1.0
        qtype = "F32" if arr.ndim == 1 else tensor_type(gname, ftype, layers)
        data, raw = encode(arr, qtype)
        w.add_tensor(gname, data, raw_dtype=raw)
    for gname, arr in (extra or {}).items():
        w.add_tensor(gname, np.asarray(arr, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


SPM_SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def spm_vocab(size: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style BPE vocabulary of `size` pieces learned from the calibration text:
    (pieces, scores, token types) with llama.cpp's types (1 normal, 2 unknown, 3 control, 6 byte)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from .tiny import _lines

    learn = size - len(SPM_SPECIAL) - 256
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(_lines(), trainers.BpeTrainer(vocab_size=learn, show_progress=False))
    pieces = [p for p, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])][:learn]
    tokens = SPM_SPECIAL + [f"<0x{b:02X}>" for b in range(256)] + pieces
    tokens += [f"<unused{i}>" for i in range(size - len(tokens))]
    types = [2] + [3] * (len(SPM_SPECIAL) - 1) + [6] * 256 + [1] * (size - len(SPM_SPECIAL) - 256)
    scores = [0.0] * (len(SPM_SPECIAL) + 256) + [-float(i) for i in range(size - len(SPM_SPECIAL) - 256)]
    return tokens, scores, types


def _spm_tokenizer(w, size: int) -> None:
    tokens, scores, types = spm_vocab(size)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(SPM_SPECIAL.index("<|im_end|>"))
    w.add_unk_token_id(0)
    w.add_pad_token_id(SPM_SPECIAL.index("<|im_end|>"))
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)
