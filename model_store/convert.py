"""GGUF → Hugging Face folder (dequantized fp32), with the tokenizer repaired for ONNX runtimes.

The GGUF carries the weights, the tokenizer and the chat template. transformers converts all three,
but its tokenizer has the wrong eos/pad and a hybrid BPE (byte_fallback + ByteLevel) that
onnxruntime-genai's tokenizer mis-reads; `fix_tokenizer` rewrites it as plain GPT-2 ByteLevel BPE and
checks that every id is unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import StoreError

log = logging.getLogger("fmgate.model_store")

DATA = Path(__file__).parent / "data"
# Text the tokenizer rewrite is checked on: the calibration text plus the awkward cases.
TOKENIZER_PROBES = ["Hello world!  Numbers 12345 and 3.14159, emoji 😀, accents é ñ ü, CJK 你好, tabs\tand\nnewlines.",
                    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
                    "def f(x):\n    return x ** 2  # comment\n\n\n", "   leading spaces", "ÅÄÖ ß Ω ∑ → ☃"]


@contextlib.contextmanager
def _fast_gguf() -> Iterator[None]:
    """transformers parses the GGUF four times and rebuilds one tensor-name map per submodule
    (≈20 s for a 49k vocabulary); both are pure, so memoize them for the conversion only."""
    import copy
    import importlib

    import gguf

    orig_reader, orig_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}
    metas: dict = {}
    mods = [importlib.import_module(f"transformers.{m}") for m in (
        "modeling_gguf_pytorch_utils", "configuration_utils", "tokenization_utils_fast",
        "models.auto.tokenization_auto")]
    orig_load = mods[0].load_gguf_checkpoint

    def load(path, return_tensors=False, model_to_load=None):
        if return_tensors:
            return orig_load(path, return_tensors=True, model_to_load=model_to_load)
        if str(path) not in metas:
            metas[str(path)] = orig_load(path, return_tensors=False)
        return copy.deepcopy(metas[str(path)])

    def reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = orig_reader(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(orig_map)
    for m in mods:
        m.load_gguf_checkpoint = load
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = orig_reader, orig_map
        for m in mods:
            m.load_gguf_checkpoint = orig_load
        readers.clear()
        metas.clear()


# Architectures transformers reads from GGUF but that are not chat decoders the store builds.
_NOT_CAUSAL = {"general", "tokenizer", "t5", "umt5"}


def check_gguf_servable(gguf_path: Path) -> dict[str, str]:
    """Fail at load time, naming the problem, for a GGUF this store cannot dequantize: an
    architecture transformers has no GGUF mapping for, or a block type gguf-py cannot dequantize.
    Returns {tensor type: how it is served} for the weights."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from .gguf_native import NATIVE_TYPES, gguf_header

    try:
        arch, tensors, _ = gguf_header(gguf_path)
    except StoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated header fails anywhere in the parse
        raise StoreError(f"{gguf_path.name}: cannot read the GGUF header ({type(exc).__name__}); "
                         "the file is corrupt or truncated") from None
    causal = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - _NOT_CAUSAL)
    if arch not in causal:
        raise StoreError(f"{gguf_path.name}: GGUF architecture {arch!r} is not supported "
                         f"(supported: {', '.join(causal)})")
    if arch == "phi3" and any(n.startswith("rope_factors_") for n in tensors):
        raise StoreError(f"{gguf_path.name}: a phi3 GGUF with LongRoPE factors (rope_factors_long/short: "
                         "Phi-3-128k, Phi-3.5-mini, Phi-4-mini) is not served yet: transformers "
                         f"{_version('transformers')} drops the factors, so its answers would be wrong")
    served: dict[str, str] = {}
    for name, (ttype, _) in sorted(tensors.items()):
        if ttype in served:
            continue
        try:
            qtype = gguf.GGMLQuantizationType[ttype]
            if qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                block, size = gguf.GGML_QUANT_SIZES[qtype]
                gguf.quants.dequantize(np.zeros((1, size), np.uint8), qtype)
        except (KeyError, NotImplementedError):
            raise StoreError(f"{gguf_path.name}: tensor {name} is {ttype}, a GGUF block type that gguf "
                             f"{_version('gguf')} cannot dequantize, so this file cannot be served; use a "
                             "file quantized as Q4_0, Q4_1, Q4_K_M, Q5_K_M, Q6_K, Q8_0 or F16") from None
        served[ttype] = "native" if ttype in NATIVE_TYPES else "dequantized"
    return served


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def gguf_to_hf(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF into a transformers folder at `out` (fp32 safetensors + fixed tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .gguf_native import gguf_header

    check_gguf_servable(gguf_path)
    arch, _, meta = gguf_header(gguf_path, _PHI3_KEYS)
    try:
        with _fast_gguf(), _byte_level_phi3(arch == "phi3" and meta.get("tokenizer.ggml.model") == "gpt2"):
            tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
    except StoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - the GGUF reader raises anything on a bad file
        raise StoreError(f"{gguf_path.name}: cannot read the GGUF ({type(exc).__name__}: {exc}); "
                         "the file is corrupt, truncated, or an unsupported architecture") from None
    if arch == "phi3":
        _phi3_config(model.config, meta)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    fix_tokenizer(out)


_PHI3_KEYS = ("tokenizer.ggml.model", "phi3.rope.dimension_count", "phi3.embedding_length",
              "phi3.attention.head_count", "phi3.context_length")


@contextlib.contextmanager
def _byte_level_phi3(on: bool) -> Iterator[None]:
    """transformers 4.57 converts every phi3 GGUF's vocabulary as SentencePiece; Phi-4's is GPT-2-style
    byte-level BPE (tokenizer.ggml.model "gpt2"), which that converter breaks (no ByteLevel
    pre-tokenizer: spaces vanish). Convert it with transformers' GPT-2 converter instead."""
    from transformers.integrations import ggml

    if not on:
        yield
        return
    orig = ggml.GGUF_TO_FAST_CONVERTERS["phi3"]
    ggml.GGUF_TO_FAST_CONVERTERS["phi3"] = ggml.GGUFGPTConverter
    try:
        yield
    finally:
        ggml.GGUF_TO_FAST_CONVERTERS["phi3"] = orig


def _phi3_config(config, meta: dict) -> None:
    """What transformers 4.57 does not read from a phi3 GGUF. Partial rotary (Phi-4-mini): the file's
    rope.dimension_count against head_dim = embedding_length / head_count. And no LongRoPE (refused
    above), so the original context is the context: left at Phi3Config's 4096, any other length
    (Phi-4: 16384) makes onnxruntime-genai build the LongRoPE variant, which fails."""
    head_dim = meta["phi3.embedding_length"] // meta["phi3.attention.head_count"]
    rotary = meta.get("phi3.rope.dimension_count", head_dim)
    if rotary != head_dim:
        config.partial_rotary_factor = rotary / head_dim
    config.original_max_position_embeddings = config.max_position_embeddings


def _eos_token(folder: Path) -> str | None:
    """The token that ends a turn: the model config's eos id, spelled as in the vocabulary."""
    cfg = json.loads((folder / "config.json").read_text())
    gen = folder / "generation_config.json"
    eos = json.loads(gen.read_text()).get("eos_token_id") if gen.exists() else None
    eos = eos if eos is not None else cfg.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if eos is None:
        return None
    tj = json.loads((folder / "tokenizer.json").read_text())
    for t in tj.get("added_tokens", []):
        if t["id"] == eos:
            return t["content"]
    vocab = tj["model"].get("vocab") or {}
    if isinstance(vocab, list):  # Unigram (Gemma): [[piece, score], ...]
        return vocab[eos][0] if 0 <= eos < len(vocab) else None
    for tok, i in vocab.items():
        if i == eos:
            return tok
    return None


def fix_tokenizer(folder: Path) -> None:
    """eos/pad = the config's eos token (<|im_end|> for SmolLM2), no BOS, plain ByteLevel BPE,
    chat template inside tokenizer_config.json, no copy of the GGUF as tokenizer.model."""
    from tokenizers import Tokenizer

    tj_path, tc_path = folder / "tokenizer.json", folder / "tokenizer_config.json"
    (folder / "tokenizer.model").unlink(missing_ok=True)
    tj = json.loads(tj_path.read_text())
    model = tj.get("model", {})
    hybrid = (model.get("type") == "BPE" and model.get("byte_fallback")
              and (tj.get("pre_tokenizer") or {}).get("type") == "ByteLevel")
    # A SentencePiece-style vocabulary (▁ pieces, <0xNN> byte fallback: Llama-2, Mistral, Phi-3, Gemma
    # files) is what tokenizers and the runtimes read natively: it is left as it is.
    if hybrid:
        before = Tokenizer.from_str(json.dumps(tj))
        model.update({"byte_fallback": False, "fuse_unk": False, "unk_token": None, "dropout": None})
        tj["normalizer"] = None
        tj["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                               "use_regex": True}
        tj["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                                "use_regex": True}
        tj["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
        after = Tokenizer.from_str(json.dumps(tj))
        probes = TOKENIZER_PROBES + [(DATA / "calibration.txt").read_text()[:20000]]
        for text in probes:
            a = before.encode(text, add_special_tokens=False).ids
            b = after.encode(text, add_special_tokens=False).ids
            if a != b:
                raise StoreError("rewriting the GGUF tokenizer as ByteLevel BPE changed token ids; "
                                 "this tokenizer is not supported yet")
            if after.decode(b, skip_special_tokens=False) != text:
                log.warning("tokenizer round trip differs on %r", text[:40])
        tj_path.write_text(json.dumps(tj, ensure_ascii=False, indent=1))
    # Plain byte-level BPE from transformers' GPT-2 converter (a Phi-4 GGUF): it comes wrapped in
    # LlamaTokenizer's settings, a BOS template and "<s>"/"<unk>" tokens the vocabulary lacks.
    wrapped = (not hybrid and (tj.get("pre_tokenizer") or {}).get("type") == "ByteLevel" and tc_path.exists()
               and json.loads(tc_path.read_text()).get("tokenizer_class") == "LlamaTokenizer")
    byte_level = hybrid or wrapped
    extra: set[str] = set()
    if wrapped:
        size = json.loads((folder / "config.json").read_text())["vocab_size"]
        extra = {t["content"] for t in tj.get("added_tokens", []) if t["id"] >= size}
        tj["added_tokens"] = [t for t in tj.get("added_tokens", []) if t["id"] < size]
        tj["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                                "use_regex": True}
        tj_path.write_text(json.dumps(tj, ensure_ascii=False, indent=1))
    _fix_sentencepiece(tj_path, tj, hybrid)
    eos = _eos_token(folder)
    tc = json.loads(tc_path.read_text()) if tc_path.exists() else {}
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        tc.setdefault("chat_template", jinja.read_text())
        jinja.unlink()
    if eos:
        tc["eos_token"] = eos
        if tc.get("pad_token") in (None, tc.get("bos_token")) or hybrid:
            tc["pad_token"] = eos
    for key in ("eos_token_id", "pad_token_id", "bos_token_id", "unk_token_id"):
        tc.pop(key, None)  # stale ids the GGUF conversion writes; the token strings are what count
    cfg = json.loads((folder / "config.json").read_text())
    if tc.get("model_max_length", 0) > 10**9 and cfg.get("max_position_embeddings"):
        tc["model_max_length"] = cfg["max_position_embeddings"]
    if byte_level:
        tc["add_bos_token"] = False
        tc["add_prefix_space"] = False
        tc["tokenizer_class"] = "GPT2Tokenizer"
        tc.pop("legacy", None)
    if wrapped:
        for key in ("bos_token", "unk_token"):
            if _content(tc.get(key)) in extra:
                tc.pop(key)
        tc["added_tokens_decoder"] = {k: v for k, v in tc.get("added_tokens_decoder", {}).items()
                                      if int(k) < size}
    tc_path.write_text(json.dumps(tc, ensure_ascii=False, indent=2))
    stm = folder / "special_tokens_map.json"
    if stm.exists() and eos:
        m = json.loads(stm.read_text())
        m["eos_token"] = eos
        m["pad_token"] = tc.get("pad_token", eos)
        for key in ("bos_token", "unk_token"):
            if _content(m.get(key)) in extra:
                m.pop(key)
        stm.write_text(json.dumps(m, ensure_ascii=False, indent=2))


def _content(token) -> str | None:
    """A special token as written in tokenizer files: its string, or an AddedToken's dict."""
    return token.get("content") if isinstance(token, dict) else token


def _fix_sentencepiece(tj_path: Path, tj: dict, hybrid: bool) -> None:
    """A SentencePiece-style BPE (▁ pieces, byte fallback) must turn spaces into ▁ before the model
    sees them. transformers 4.57's GGUF converter for Phi-3 leaves out that normalizer, so every space
    is dropped ("Hello world" → "Helloworld"), and the byte fallback, so every newline is; put
    Llama-2's back. Then any tokenizer must give back
    the text it encoded, or the store refuses it rather than serve a model that reads other text."""
    from tokenizers import Tokenizer

    model = tj.get("model", {})
    vocab = model.get("vocab")
    spm = (not hybrid and model.get("type") == "BPE" and isinstance(vocab, dict)
           and any(k.startswith("▁") for k in vocab))
    changed = False
    if spm and not tj.get("normalizer") and not tj.get("pre_tokenizer"):
        tj["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
        changed = True
    if spm and "<0x0A>" in vocab and not model.get("byte_fallback"):
        model["byte_fallback"] = True  # the same converter drops it too: "\n" would vanish
        changed = True
    if changed:
        tj_path.write_text(json.dumps(tj, ensure_ascii=False, indent=1))
        log.info("GGUF tokenizer: restored the SentencePiece normalizer/byte fallback the conversion left out")
    if hybrid:
        return  # checked id for id against the original above
    tok = Tokenizer.from_str(json.dumps(tj))
    for text in ("Hello world, the capital of France is Paris.", "two  spaces and a\nnewline"):
        back = tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=True)
        if back.strip() != text.strip():
            raise StoreError(f"the GGUF's tokenizer, as converted, does not give back the text it encoded "
                             f"({text!r} → {back!r}); this tokenizer is not supported yet")


def finish_causal_artifact(out: Path, hf_dir: Path, repaired: bool) -> None:
    """The engine reads tokenizer files from the artifact: the repaired ones (GGUF conversions), and
    in every case a tokenizer_config.json that holds the chat template."""
    if repaired:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (hf_dir / name).exists():
                (out / name).write_bytes((hf_dir / name).read_bytes())
    (out / "tokenizer.model").unlink(missing_ok=True)
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text()) if tc_path.exists() else {}
    jinja = out / "chat_template.jinja"
    if jinja.exists():
        tc.setdefault("chat_template", jinja.read_text())
        tc_path.write_text(json.dumps(tc, ensure_ascii=False, indent=2))
        jinja.unlink()
    if "chat_template" not in tc:
        log.warning("%s has no chat template; /v1/chat/completions will need one", hf_dir)
