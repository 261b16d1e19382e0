"""Where one decode step at batch 1 goes: from the Python scheduler through onnxruntime to the token.

    python -m bench.decode_profile --model DIR [--steps 64] [--threads 2] [--ort-profile]

DIR is a built onnx-genai artifact (`fmgate models path ...`, or a folder under the store). Each item
is timed on its own, interleaved and repeated, and reported as a median per step:

- ort_run: `run_with_iobinding` alone, on a binding prepared once (the graph: matmuls, attention, norms);
- bind: what the runner does around it each step (attention mask, OrtValues for the KV views, binding);
- logits_out: copying the logits row out of onnxruntime;
- runner_decode: `OnnxCausalRunner.decode` as the scheduler calls it (ort_run + bind + logits_out);
- sample: `sample_rows` for one greedy row over the full vocabulary (fp32), and for one
  temperature/top-p row;
- detok: one `DecodeStream.step`;
- engine_token: a whole token through `LLMEngine.stream_sync` (scheduler loop, sampling, detokenizer,
  event to the consumer), from a long greedy generation; `scheduler_other` is what is left of it.

With --ort-profile, onnxruntime's own profiler splits ort_run by operator type.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def _median_us(times: list[float]) -> float:
    return round(statistics.median(times) * 1e6, 1)


def profile(model: Path, steps: int = 64, threads: int = 2, rounds: int = 3, ort_profile: bool = False) -> dict:
    import onnxruntime as ort
    from tokenizers.decoders import DecodeStream

    from gateway.engines.base import SamplingParams
    from gateway.engines.llm import LLMEngine
    from gateway.engines.onnx_causal import OnnxCausalRunner
    from gateway.engines.sampling import SamplingState, sample_rows

    runner = OnnxCausalRunner(model, capacity=16, max_seq_len=2048, threads=threads)
    engine = LLMEngine.from_dir(model, runner=runner, max_num_seqs=16)
    prompt = engine.chat_prompt([{"role": "user", "content": "Write a long story about a lighthouse keeper."}])
    tok = engine.tokenizer.backend_tokenizer
    items: dict[str, list[float]] = defaultdict(list)

    for _ in range(rounds):
        # runner.decode, and a prebound run_with_iobinding at the same length
        sid = 10_000
        logits = runner.prefill(sid, prompt)
        token = int(np.argmax(logits))
        for _ in range(steps):
            t0 = time.perf_counter()
            logits = runner.decode([sid], [token])
            items["runner_decode"].append(time.perf_counter() - t0)
            token = int(np.argmax(logits[0]))
        n = runner.length(sid)
        ids = np.array([[token]], np.int64)
        mask = np.ones((1, n + 1), np.int64)
        b = runner.session.io_binding()
        t0 = time.perf_counter()
        b.bind_cpu_input("input_ids", ids)
        b.bind_cpu_input("attention_mask", mask)
        b.bind_output("logits")
        for (pk, pv), (ok, ov), (k, v) in zip(runner._past, runner._present, runner._kv, strict=True):
            kval = ort.OrtValue.ortvalue_from_numpy(k[0:1])
            vval = ort.OrtValue.ortvalue_from_numpy(v[0:1])
            b.bind_ortvalue_input(pk, kval)
            b.bind_ortvalue_input(pv, vval)
            b.bind_ortvalue_output(ok, kval)
            b.bind_ortvalue_output(ov, vval)
        items["bind"].append(time.perf_counter() - t0)
        for _ in range(steps):
            t0 = time.perf_counter()
            runner.session.run_with_iobinding(b)
            items["ort_run"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            row = b.get_outputs()[0].numpy()
            items["logits_out"].append(time.perf_counter() - t0)
        runner.release(sid)

        # sampling on a full-vocabulary fp32 row
        greedy = SamplingState(SamplingParams(temperature=0.0, max_tokens=16))
        sampled = SamplingState(SamplingParams(temperature=0.8, top_p=0.95, max_tokens=16, seed=1))
        for _ in range(steps):
            x = np.array(row.reshape(1, -1))
            t0 = time.perf_counter()
            sample_rows(x, [greedy])
            items["sample_greedy"].append(time.perf_counter() - t0)
            x = np.array(row.reshape(1, -1))
            t0 = time.perf_counter()
            sample_rows(x, [sampled])
            items["sample_top_p"].append(time.perf_counter() - t0)

        # detokenization, one token at a time
        text = "The keeper climbed the stairs every evening, and the light answered the sea. " * 4
        ids_ = tok.encode(text, add_special_tokens=False).ids[:steps]
        ds = DecodeStream(skip_special_tokens=True)
        for t in ids_:
            t0 = time.perf_counter()
            ds.step(tok, t)
            items["detok"].append(time.perf_counter() - t0)

        # a whole token through the engine (scheduler thread, sampling, detokenizer, sink)
        params = SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True)
        stamps = []
        for ev in engine.stream_sync(prompt, params):
            stamps.append((time.perf_counter(), len(ev.tokens)))
        gaps = [(b_[0] - a[0]) / max(b_[1], 1) for a, b_ in zip(stamps[1:], stamps[2:], strict=False)]
        items["engine_token"].extend(gaps)

    out = {k: _median_us(v) for k, v in items.items()}
    out["bind_per_step_est"] = round(out["runner_decode"] - out["ort_run"] - out["logits_out"], 1)
    out["scheduler_other"] = round(out["engine_token"] - out["runner_decode"] - out["sample_greedy"]
                                   - out["detok"], 1)
    if ort_profile:
        out["ort_ops_us_per_step"] = _ort_ops(model, runner, prompt, steps, threads)
    engine.close()
    return out


def _ort_ops(model: Path, runner, prompt, steps: int, threads: int) -> dict:
    """onnxruntime's profiler over `steps` decode steps of a fresh runner: microseconds per step by op type."""
    import onnxruntime as ort

    from gateway.engines.onnx_causal import OnnxCausalRunner

    with tempfile.TemporaryDirectory() as tmp:
        prof = OnnxCausalRunner(model, capacity=16, max_seq_len=2048, threads=threads)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        cfg = json.loads((model / "genai_config.json").read_text())["model"]["decoder"]
        logits = prof.prefill(1, prompt)  # on the plain session: only decode steps are profiled
        token = int(np.argmax(logits))
        prof.session = ort.InferenceSession(str(model / cfg["filename"]), so, providers=["CPUExecutionProvider"])
        prof._bindings.clear()  # bound to the old session
        for _ in range(steps):
            token = int(np.argmax(prof.decode([1], [token])[0]))
        path = prof.session.end_profiling()
        events = json.loads(Path(path).read_text())
    by_op: dict[str, float] = defaultdict(float)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            by_op[e.get("args", {}).get("op_name", "?")] += e["dur"]
    n = max(len(runs), 1)
    total = sum(e["dur"] for e in runs) / n
    res = {op: round(us / n, 1) for op, us in sorted(by_op.items(), key=lambda kv: -kv[1])}
    res["model_run"] = round(total, 1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ort-profile", action="store_true")
    a = ap.parse_args()
    print(json.dumps(profile(a.model, a.steps, a.threads, a.rounds, a.ort_profile), indent=1))


if __name__ == "__main__":
    main()
