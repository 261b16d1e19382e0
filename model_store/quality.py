"""Measure a built variant on this machine: quality against the fp32 reference, and speed.

Causal LMs: perplexity on the shipped calibration text (full-sequence forwards with an empty KV
cache), and greedy decode tokens/s at batch 1 and batch 8 with plain onnxruntime. Encoders: mean and
min cosine to the reference embeddings on the shipped sentence set, and sentences/s at batch 32.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"


@dataclass
class EvalSettings:
    """How much to measure. Defaults keep a SmolLM2 first load well inside 90 s on 2 cores."""

    ppl_tokens: int = 1024  # calibration tokens scored
    ppl_chunk: int = 512  # tokens per forward (each chunk starts with an empty cache)
    decode_steps: int = 12  # timed decode steps per batch size
    decode_batches: tuple[int, ...] = (1, 8)
    prompt_tokens: int = 16
    encoder_batch: int = 32
    encoder_rounds: int = 5
    threads: int = 0  # 0 = all usable cores
    # The interleaved benchmark that picks the winner (model_store.bench).
    bench_top: int = 4  # candidates timed against each other (the best first-pass scores)
    bench_min_rounds: int = 5
    bench_max_rounds: int = 15
    bench_cap_s: float = 60.0  # stop after this long even if the medians have not separated
    bench_min_trial_s: float = 0.2  # one trial repeats its run until it has lasted this long
    tie_margin: float = 0.05  # medians closer than this (relative) are a tie: smaller, less lossy wins


def calibration_text() -> str:
    return (DATA / "calibration.txt").read_text()


def sentences() -> list[str]:
    return [s.strip() for s in (DATA / "sentences.txt").read_text().splitlines()
            if s.strip() and not s.startswith("#")]


def _session(path: Path, threads: int, providers: list[str] | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])


def _tokenizer(folder: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json"))


# --- causal LMs -------------------------------------------------------------------------------

class OrtCausalLM:
    """Just enough of a decoder runner for measuring: genai- and optimum-style graphs alike."""

    def __init__(self, folder: Path, threads: int):
        self.sess = _session(folder / "model.onnx", threads)
        ins = {i.name: i for i in self.sess.get_inputs()}
        self.names = [o.name for o in self.sess.get_outputs()]
        self.past = sorted((n for n in ins if n.startswith("past_key_values.")),
                           key=lambda n: (int(n.split(".")[1]), n))
        self.has_pos = "position_ids" in ins
        dtype = ins[self.past[0]].type if self.past else "tensor(float)"
        self.kv_dtype = np.float16 if "float16" in dtype else np.float32
        shape = ins[self.past[0]].shape if self.past else [0, 0, 0, 0]
        self.kv_heads, self.head_dim = shape[1], shape[3]
        if not isinstance(self.head_dim, int) or not isinstance(self.kv_heads, int):
            cfg = _model_dims(folder)
            self.kv_heads = self.kv_heads if isinstance(self.kv_heads, int) else cfg["kv_heads"]
            self.head_dim = self.head_dim if isinstance(self.head_dim, int) else cfg["head_dim"]
        # Present outputs in the order of the past inputs they feed (genai lists all keys, then values).
        self.present = [n.replace("past_key_values.", "present.", 1) for n in self.past]
        missing = set(self.present) - set(self.names)
        if missing:
            raise ValueError(f"model outputs lack {sorted(missing)[:2]}")

    def forward(self, ids: np.ndarray, past: list[np.ndarray] | None):
        b, t = ids.shape
        plen = 0 if past is None else past[0].shape[2]
        if past is None:
            past = [np.zeros((b, self.kv_heads, 0, self.head_dim), self.kv_dtype) for _ in self.past]
        feed = {"input_ids": ids.astype(np.int64),
                "attention_mask": np.ones((b, plen + t), np.int64)}
        if self.has_pos:
            feed["position_ids"] = np.tile(np.arange(plen, plen + t, dtype=np.int64), (b, 1))
        feed.update(zip(self.past, past, strict=True))
        outs = self.sess.run(None, feed)
        by = dict(zip(self.names, outs, strict=True))
        return by["logits"], [by[n] for n in self.present]


def _model_dims(folder: Path) -> dict:
    g = folder / "genai_config.json"
    if g.exists():
        d = json.loads(g.read_text())["model"]["decoder"]
        return {"kv_heads": d["num_key_value_heads"], "head_dim": d["head_size"]}
    c = json.loads((folder / "config.json").read_text())
    heads = c["num_attention_heads"]
    return {"kv_heads": c.get("num_key_value_heads", heads),
            "head_dim": c.get("head_dim") or c["hidden_size"] // heads}


def calibration_ids(folder: Path, n: int) -> np.ndarray:
    ids = _tokenizer(folder).encode(calibration_text(), add_special_tokens=False).ids
    return np.asarray(ids[:n], dtype=np.int64)


def perplexity(lm: OrtCausalLM, ids: np.ndarray, chunk: int) -> float:
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, chunk):
        piece = ids[start:start + chunk]
        if len(piece) < 2:
            break
        logits, _ = lm.forward(piece[None, :], None)
        lg = logits[0, :-1].astype(np.float64)
        lg -= lg.max(axis=-1, keepdims=True)
        logz = np.log(np.exp(lg).sum(axis=-1))
        nll += float((logz - lg[np.arange(len(piece) - 1), piece[1:]]).sum())
        count += len(piece) - 1
    return math.exp(nll / max(count, 1))


def decode_speed(lm: OrtCausalLM, prompt: np.ndarray, batch: int, steps: int) -> float:
    """Greedy decode tokens/s (all sequences together) after a prefill of `prompt`.

    The median step time, not the mean: on a shared machine a few slow steps are someone else's.
    """
    ids = np.tile(prompt[None, :], (batch, 1))
    logits, past = lm.forward(ids, None)
    nxt = logits[:, -1].argmax(-1)[:, None]
    logits, past = lm.forward(nxt, past)  # warm-up step
    nxt = logits[:, -1].argmax(-1)[:, None]
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits, past = lm.forward(nxt, past)
        nxt = logits[:, -1].argmax(-1)[:, None]
        times.append(time.perf_counter() - t0)
    return batch / float(np.median(times))


def evaluate_causal(folder: Path, s: EvalSettings, threads: int) -> dict:
    lm = OrtCausalLM(folder, threads)
    ids = calibration_ids(folder, s.ppl_tokens)
    t0 = time.perf_counter()
    ppl = perplexity(lm, ids, s.ppl_chunk)
    t_ppl = time.perf_counter() - t0
    speed = {f"decode_tok_s_b{b}": round(decode_speed(lm, ids[:s.prompt_tokens], b, s.decode_steps), 1)
             for b in s.decode_batches}
    speed["score"] = round(_geomean(list(speed.values())), 1)
    speed["prefill_tok_s"] = round(len(ids) / t_ppl, 1)
    return {"quality": {"perplexity": round(ppl, 4), "tokens": int(len(ids))}, "speed": speed}


# --- encoders ---------------------------------------------------------------------------------

class OrtEncoder:
    def __init__(self, folder: Path, threads: int):
        self.sess = _session(folder / "model.onnx", threads)
        self.inputs = [i.name for i in self.sess.get_inputs()]
        self.tok = _tokenizer(folder)
        meta = json.loads((folder / "fmgate_encoder.json").read_text())
        self.pooling, self.normalize, self.max_length = meta["pooling"], meta["normalize"], meta["max_length"]
        self.tok.enable_truncation(self.max_length)
        pad_id = self.tok.token_to_id("[PAD]") or 0
        self.tok.enable_padding(pad_id=pad_id)

    def encode(self, texts: list[str]) -> np.ndarray:
        enc = self.tok.encode_batch(texts)
        ids = np.asarray([e.ids for e in enc], np.int64)
        mask = np.asarray([e.attention_mask for e in enc], np.int64)
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.asarray([e.type_ids for e in enc], np.int64)
        hidden = self.sess.run(None, {k: v for k, v in feed.items() if k in self.inputs})[0]
        if self.pooling == "cls":
            emb = hidden[:, 0]
        else:
            m = mask[:, :, None].astype(hidden.dtype)
            emb = (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
        if self.normalize:
            emb = emb / np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)
        return emb.astype(np.float32)


def embed_sentences(folder: Path, threads: int) -> np.ndarray:
    return OrtEncoder(folder, threads).encode(sentences())


def evaluate_encoder(folder: Path, s: EvalSettings, threads: int, reference: np.ndarray | None) -> dict:
    enc = OrtEncoder(folder, threads)
    sents = sentences()
    emb = np.concatenate([enc.encode(sents[i:i + s.encoder_batch]) for i in range(0, len(sents), s.encoder_batch)])
    quality: dict = {"cosine_mean": 1.0, "cosine_min": 1.0}  # the reference, against itself
    if reference is not None:
        a = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        b = reference / np.linalg.norm(reference, axis=1, keepdims=True)
        cos = (a * b).sum(1)
        quality = {"cosine_mean": round(float(cos.mean()), 5), "cosine_min": round(float(cos.min()), 5)}
    # A sentence's vector must not depend on its batchmates: dynamic activation quantization uses one
    # scale for the whole batch, so its output shifts with whoever else is in the batch.
    alone = np.concatenate([enc.encode([t]) for t in sents[:8]])
    quality["batch_invariance"] = round(batch_invariance(alone, emb[:8]), 7)
    batch = (sents * (s.encoder_batch // len(sents) + 1))[:s.encoder_batch]
    enc.encode(batch)  # warm-up
    times = []
    for _ in range(s.encoder_rounds):
        t0 = time.perf_counter()
        enc.encode(batch)
        times.append(time.perf_counter() - t0)
    rate = s.encoder_batch / float(np.median(times))
    return {"quality": quality, "speed": {"sent_s_b32": round(rate, 1), "score": round(rate, 1)},
            "embeddings": emb}


def batch_invariance(alone: np.ndarray, batched: np.ndarray) -> float:
    """The lowest cosine between a sentence's vector embedded alone and the same one inside a batch.

    A real cosine, so it means the same for encoders that do not normalise their output."""
    a = alone / np.clip(np.linalg.norm(alone, axis=1, keepdims=True), 1e-12, None)
    b = batched / np.clip(np.linalg.norm(batched, axis=1, keepdims=True), 1e-12, None)
    return float(np.min(np.sum(a * b, axis=1)))


def _geomean(xs: list[float]) -> float:
    xs = [x for x in xs if x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else 0.0


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-").lower() or "model"
