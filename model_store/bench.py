"""Time the best candidates against each other the way a benchmark would, then pick the winner.

Each candidate is loaded into the runner the gateway serves it with, at the serving thread count.
The candidates then take turns (one trial each per round, the order rotated every round), so a
noisy neighbour slows all of them alike. Rounds repeat until the leader's lower quartile clears
every other candidate's upper quartile, or a round or time cap is reached.

Medians closer than `tie_margin`, or still overlapping at the cap, are a tie; a tie goes to the
smaller variant, then the less lossy.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .quality import EvalSettings, OrtCausalLM, calibration_ids, sentences

log = logging.getLogger("fmgate.model_store")

Trial = Callable[[], float]  # one timed run; returns units/s (tok/s or sentences/s)


def open_trial(folder: Path, fmt: str, task: str, s: EvalSettings, threads: int) -> Trial | None:
    """A trial on the serving runner for this format; None when the store has no runner for it."""
    if task == "chat" and fmt == "onnx-genai":
        return _genai_trial(folder, s, threads)
    if task == "chat" and fmt == "onnx-optimum":
        return _optimum_trial(folder, s, threads)
    if task == "embed" and fmt == "onnx-encoder":
        return _encoder_trial(folder, s, threads)
    return None


def _genai_trial(folder: Path, s: EvalSettings, threads: int) -> Trial:
    from gateway.engines.onnx_causal import OnnxCausalRunner

    batches = tuple(s.decode_batches)
    runner = OnnxCausalRunner(folder, capacity=max(batches), max_seq_len=s.prompt_tokens + s.decode_steps + 8,
                              threads=threads, prefix_cache_blocks=0)
    prompt = [int(t) for t in calibration_ids(folder, s.prompt_tokens)]

    def once() -> float:
        rates = []
        for b in batches:
            ids = list(range(b))
            for i in ids:
                runner.prefill(i, prompt)
            nxt = [prompt[-1]] * b
            runner.decode(ids, nxt)  # warm-up step
            t0 = time.perf_counter()
            for _ in range(s.decode_steps):
                logits = runner.decode(ids, nxt)
                nxt = [int(x) for x in np.asarray(logits).argmax(-1)]
            rates.append(b * s.decode_steps / (time.perf_counter() - t0))
            for i in ids:
                runner.release(i)
        return _geomean(rates)

    return _repeat(once, s.bench_min_trial_s)


def _optimum_trial(folder: Path, s: EvalSettings, threads: int) -> Trial:
    from .quality import decode_speed

    lm = OrtCausalLM(folder, threads)
    prompt = calibration_ids(folder, s.prompt_tokens)
    return _repeat(lambda: _geomean([decode_speed(lm, prompt, b, s.decode_steps) for b in s.decode_batches]),
                   s.bench_min_trial_s)


def _encoder_trial(folder: Path, s: EvalSettings, threads: int) -> Trial:
    from tokenizers import Tokenizer

    from gateway.engines.onnx_encoder import OnnxEncoderRunner

    runner = OnnxEncoderRunner(folder, threads=threads)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(runner.max_length)
    sents = sentences()
    batch = [e.ids for e in tok.encode_batch((sents * (s.encoder_batch // len(sents) + 1))[:s.encoder_batch])]

    def once() -> float:
        t0 = time.perf_counter()
        runner.encode(batch)
        return len(batch) / (time.perf_counter() - t0)

    return _repeat(once, s.bench_min_trial_s)


def _repeat(once: Trial, min_s: float) -> Trial:
    """A trial of at least `min_s`: tiny models take microseconds, too short to time one at a time."""

    def trial() -> float:
        rates, t0 = [once()], time.perf_counter()
        while time.perf_counter() - t0 < min_s:
            rates.append(once())
        return float(np.median(rates))

    return trial


def stats(samples: list[float]) -> dict:
    """Median, quartiles, and the spread: the interquartile range as a share of the median."""
    a = np.asarray(samples, dtype=np.float64)
    q25, med, q75 = (float(x) for x in np.percentile(a, [25, 50, 75]))
    return {"median": round(med, 1), "q25": round(q25, 1), "q75": round(q75, 1),
            "min": round(float(a.min()), 1), "max": round(float(a.max()), 1),
            "spread_pct": round(100 * (q75 - q25) / med, 1) if med > 0 else 0.0, "rounds": len(samples)}


def separated(st: dict[str, dict]) -> bool:
    """The leader's lower quartile is above every other candidate's upper quartile."""
    order = sorted(st, key=lambda n: -st[n]["median"])
    return all(st[order[0]]["q25"] > st[n]["q75"] for n in order[1:])


def interleave(trials: dict[str, Trial], s: EvalSettings) -> dict[str, dict]:
    """{name: stats} after rounds of one trial per candidate, order rotated each round."""
    names = list(trials)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for n in names:
        trials[n]()  # warm-up: first-run allocations and caches
    t0 = time.monotonic()
    for rnd in range(s.bench_max_rounds):
        k = rnd % len(names)
        for n in names[k:] + names[:k]:
            samples[n].append(trials[n]())
        if rnd + 1 >= s.bench_min_rounds:
            st = {n: stats(v) for n, v in samples.items()}
            if len(names) < 2 or separated(st) or time.monotonic() - t0 > s.bench_cap_s:
                break
    out = {n: stats(v) for n, v in samples.items()}
    log.info("benchmark: %s", ", ".join(f"{n} {v['median']} ±{v['spread_pct']}% ({v['rounds']} rounds)"
                                        for n, v in out.items()))
    return out


def loss(task: str, quality: dict) -> float:
    """How much a variant loses against the reference: smaller is better."""
    if task == "chat":
        return float(quality.get("perplexity_ratio", math.inf))
    return 1.0 - float(quality.get("cosine_mean", -math.inf))


def overlaps(a: dict, b: dict) -> bool:
    """Both were benchmarked and their interquartile ranges overlap: the medians never separated."""
    return all(k in a and k in b for k in ("q25", "q75")) and a["q25"] <= b["q75"] and b["q25"] <= a["q75"]


def choose(rows: list[dict], task: str, margin: float) -> tuple[dict, list[dict]]:
    """(winner, the rows tied with it). Rows: passing candidates with speed["score"] = benchmark median.

    Tied with the fastest: a median within `margin` of its median, or quartiles that still overlap
    its quartiles when the benchmark stopped at its cap."""
    lead = max(rows, key=lambda x: x["speed"]["score"])
    best = lead["speed"]["score"]
    tied = [x for x in rows if x["speed"]["score"] >= best * (1 - margin) or overlaps(x["speed"], lead["speed"])]
    tied.sort(key=lambda x: (x.get("size_bytes") or 0, loss(task, x.get("quality", {})), -x["speed"]["score"]))
    return tied[0], tied


def _geomean(xs: list[float]) -> float:
    xs = [x for x in xs if x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else 0.0
