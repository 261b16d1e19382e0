"""In-process engine comparison on one artifact: onnxruntime-genai's own continuous-batching Engine
versus fmgate's runner driven by its scheduler, at 1 and 8 concurrent sequences (greedy, 64 tokens).

    python -m bench.engine_compare --artifact <onnx-genai folder> [--reps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import numpy as np

PROMPTS = ["Tell me about the ocean.", "Write a poem about cats.", "Explain gravity simply.", "Tell me a joke.",
           "What is a prime number?", "Name three colours and describe them.", "Describe the moon.",
           "Who was Ada Lovelace?"]
NEW_TOKENS = 64


def fmgate_run(path: Path, n: int, threads: int) -> float:
    from gateway.engines.llm import LLMEngine

    engine = LLMEngine.from_dir(path, "bench", max_num_seqs=max(n, 1), threads=threads)
    try:
        prompts = [engine.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS[:n]]
        engine.generate(prompts[0], max_tokens=4, temperature=0)  # warm-up
        counts = [0] * n

        def one(i):
            counts[i] = engine.generate(prompts[i], max_tokens=NEW_TOKENS, temperature=0,
                                        ignore_eos=True).completion_tokens

        t0 = time.perf_counter()
        ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return sum(counts) / (time.perf_counter() - t0)
    finally:
        engine.close()


def genai_run(path: Path, n: int, threads: int) -> float:
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = og.Model(str(path))  # its CPU session uses every core; this box has two, like --threads 2
    engine = og.Engine(model)

    def request(text: str):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + NEW_TOKENS, min_length=len(ids) + NEW_TOKENS,
                                  do_sample=False)
        req = og.Request(params)
        req.add_tokens(np.array(ids, dtype=np.int32))
        return req

    def drive(reqs) -> int:
        for r in reqs:
            engine.add_request(r)
        made = 0
        while engine.has_pending_requests():
            r = engine.step()
            while r is not None and r.has_unseen_tokens():
                r.get_unseen_token()
                made += 1
        return made

    drive([request(PROMPTS[0])])  # warm-up
    t0 = time.perf_counter()
    made = drive([request(p) for p in PROMPTS[:n]])
    return made / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifact", type=Path, required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    out = {}
    for name, fn in (("fmgate runner + scheduler", fmgate_run), ("onnxruntime-genai Engine", genai_run)):
        for n in (1, 8):
            runs = [fn(args.artifact, n, args.threads) for _ in range(args.reps)]
            out[f"{name} @{n}"] = statistics.median(runs)
            print(f"{name:28s} {n} seqs: {statistics.median(runs):7.1f} tok/s (runs: "
                  f"{', '.join(f'{r:.0f}' for r in runs)})", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
