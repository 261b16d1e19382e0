"""GPU benchmark pieces for bench/gpu_check.sh (one NVIDIA GPU, no network).

    python -m bench.gpu_bench models OUT_DIR          # random-weight SmolLM2-135M and MiniLM-L6 "torch" artifacts
    python -m bench.gpu_bench serve                    # `fmgate serve`, taught the torch marker if the registry lacks it
    python -m bench.gpu_bench chat URL MODEL --clients 1,8,64 --out f.json
    python -m bench.gpu_bench embed URL MODEL --inflight 256 --out f.json
    python -m bench.gpu_bench runner DIR --out f.json  # the runner alone, no HTTP
    python -m bench.gpu_bench hf DIR --out f.json      # plain transformers generate, bf16, eager, batched
    python -m bench.gpu_bench report OUT               # JSON files -> results.md

The weights are random (the model files exceed what can be carried to the GPU machine); the
configs and tokenizers are the real ones. Throughput at a fixed token count does not depend on
the weight values, so the speed figures stand for the real models; quality figures do not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / ".gpu_assets"

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
               rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
               pad_token_id=2, hidden_act="silu")
MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
              hidden_act="gelu", pad_token_id=0)
PROMPT = ("You are a careful assistant. Write a long, detailed story about a lighthouse keeper who "
          "finds a message in a bottle, and describe the sea.")


# --- artifacts ---------------------------------------------------------------------------------

def _device_record() -> dict:
    import torch

    p = torch.cuda.get_device_properties(0)
    return {"device_name": p.name, "compute_capability": f"{p.major}.{p.minor}"}


def make_models(out: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rec = _device_record() if dev == "cuda" else {"device_name": "cpu", "compute_capability": ""}
    chat, enc = out / "smollm2", out / "minilm"
    for d, src in ((chat, ASSETS / "smollm2"), (enc, ASSETS / "minilm")):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        for f in src.iterdir():
            if f.is_file() and f.name != "config.json":
                shutil.copy2(f, d / f.name)
            elif f.is_dir():
                shutil.copytree(f, d / f.name)
    with torch.device(dev):
        lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2)).to(torch.bfloat16)
    lm.save_pretrained(str(chat), safe_serialization=True)
    (chat / "fmgate_torch.json").write_text(json.dumps(
        {"format": "torch", "task": "chat", "arch": "llama", "dtype": "bfloat16", "random_weights": True, **rec}))
    with torch.device(dev):
        bert = transformers.BertModel(transformers.BertConfig(**MINILM), add_pooling_layer=False).to(torch.bfloat16)
    bert.save_pretrained(str(enc), safe_serialization=True)
    (enc / "fmgate_torch.json").write_text(json.dumps(
        {"format": "torch", "task": "embed", "arch": "bert", "dtype": "bfloat16", "random_weights": True,
         "pooling": "mean", "normalize": True, "dim": 384, "max_length": 256, **rec}))
    print(f"models in {out}: {sum(p.numel() for p in lm.parameters()) / 1e6:.1f}M + "
          f"{sum(p.numel() for p in bert.parameters()) / 1e6:.1f}M params (random, bf16)")


# --- serve -------------------------------------------------------------------------------------

def serve(argv: list[str]) -> None:
    """`fmgate serve`, with prebuilt torch folders recognised by their marker if the registry does not yet."""
    import inspect

    from gateway import registry

    if "fmgate_torch.json" not in inspect.getsource(registry.Registry._resolve):
        orig = registry.Registry._resolve

        def _resolve(self, cfg):
            direct = Path(cfg.source).expanduser()
            marker = direct / "fmgate_torch.json"
            if marker.is_file():
                return direct, "torch", f"torch-{json.loads(marker.read_text()).get('dtype', 'bf16')}-prebuilt", {}
            return orig(self, cfg)

        registry.Registry._resolve = _resolve
    from gateway.engines import llm

    if "isinstance(ids, dict)" in inspect.getsource(llm.LLMEngine.chat_prompt):
        # transformers 5 returns a BatchEncoding (a UserDict, not a dict) from apply_chat_template.
        orig_prompt = llm.LLMEngine.chat_prompt

        def chat_prompt(self, messages):
            tok = self.tokenizer
            real = tok.apply_chat_template

            def apply(*a, **k):
                out = real(*a, **k)
                return out["input_ids"] if hasattr(out, "keys") else out

            tok.apply_chat_template = apply
            try:
                return orig_prompt(self, messages)
            finally:
                del tok.apply_chat_template

        llm.LLMEngine.chat_prompt = chat_prompt
    from gateway import cli

    sys.argv = ["fmgate", "serve", *argv]
    cli.main()


# --- load clients ------------------------------------------------------------------------------

async def _chat_client(url: str, model: str, n_req: int, max_tokens: int, records: list, session) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    for _ in range(n_req):
        t0 = time.time()
        first = None
        events = 0
        tail = b""
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                records.append({"error": resp.status, "body": (await resp.text())[:300]})
                continue
            async for chunk in resp.content.iter_any():
                events += chunk.count(b"data:")
                if first is None and events >= 2:  # the first event is the role; the next carries content
                    first = time.time()
                tail = (tail + chunk)[-2048:]
        usage = None
        for line in tail.split(b"\n"):
            if line.startswith(b"data: {") and b'"usage":{' in line:
                usage = json.loads(line[6:])["usage"]
        records.append({"t0": t0, "t1": time.time(), "ttft": (first or time.time()) - t0,
                        "tokens": usage["completion_tokens"] if usage else max(0, events - 3)})


def _chat_proc(args: tuple) -> list:
    url, model, clients, n_req, max_tokens = args
    import aiohttp

    async def main():
        records: list = []
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as s:
            await asyncio.gather(*(_chat_client(url, model, n_req, max_tokens, records, s) for _ in range(clients)))
        return records

    return asyncio.run(main())


def chat_load(url: str, model: str, clients: int, n_req: int, max_tokens: int) -> dict:
    procs = max(1, min(8, clients // 8))
    split = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    with mp.get_context("fork").Pool(procs) as pool:
        parts = pool.map(_chat_proc, [(url, model, c, n_req, max_tokens) for c in split])
    recs = [r for p in parts for r in p]
    errors = [r for r in recs if "error" in r]
    ok = [r for r in recs if "error" not in r]
    if not ok:
        return {"clients": clients, "errors": errors[:3]}
    wall = max(r["t1"] for r in ok) - min(r["t0"] for r in ok)
    tokens = sum(r["tokens"] for r in ok)
    per_stream = [r["tokens"] / max(1e-9, r["t1"] - r["t0"] - r["ttft"]) for r in ok if r["tokens"] > 1]
    return {"clients": clients, "requests": len(ok), "errors": len(errors), "tokens": tokens,
            "wall_s": round(wall, 3), "tok_s": round(tokens / wall, 1),
            "per_stream_tok_s_p50": round(statistics.median(per_stream), 1) if per_stream else None,
            "ttft_p50_ms": round(1000 * statistics.median(r["ttft"] for r in ok), 1),
            "ttft_p90_ms": round(1000 * sorted(r["ttft"] for r in ok)[int(0.9 * (len(ok) - 1))], 1)}


def _sentences() -> list[str]:
    lines = (ROOT / "model_store" / "data" / "sentences.txt").read_text().splitlines()
    return [s.strip() for s in lines if s.strip() and not s.startswith("#")]


def _embed_proc(args: tuple) -> list:
    url, model, clients, per_req, seconds, start_at = args
    import aiohttp

    sents = _sentences()

    async def client(s, k, out):
        i = k
        while time.time() < start_at + seconds:
            batch = [sents[(i + j) % len(sents)] for j in range(per_req)]
            i += per_req
            t0 = time.time()
            async with s.post(url + "/v1/embeddings", json={"model": model, "input": batch,
                                                             "encoding_format": "base64"}) as resp:
                data = await resp.read()
                if resp.status != 200:
                    out.append({"error": resp.status, "body": data[:200].decode(errors="replace")})
                    return
            out.append({"t0": t0, "t1": time.time(), "n": per_req})

    async def main():
        while time.time() < start_at:
            await asyncio.sleep(0.001)
        out: list = []
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as s:
            await asyncio.gather(*(client(s, k * 7, out) for k in range(clients)))
        return out

    return asyncio.run(main())


def embed_load(url: str, model: str, clients: int, per_req: int, seconds: float) -> dict:
    procs = max(1, min(8, clients // 4))
    split = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    start_at = time.time() + 1.0
    with mp.get_context("fork").Pool(procs) as pool:
        parts = pool.map(_embed_proc, [(url, model, c, per_req, seconds, start_at) for c in split])
    recs = [r for p in parts for r in p]
    ok = [r for r in recs if "error" not in r]
    errors = [r for r in recs if "error" in r]
    if not ok:
        return {"clients": clients, "per_request": per_req, "errors": errors[:3]}
    wall = max(r["t1"] for r in ok) - min(r["t0"] for r in ok)
    n = sum(r["n"] for r in ok)
    lat = sorted(r["t1"] - r["t0"] for r in ok)
    return {"clients": clients, "per_request": per_req, "inflight": clients * per_req, "requests": len(ok),
            "errors": len(errors), "sentences": n, "wall_s": round(wall, 3), "sent_s": round(n / wall, 1),
            "latency_p50_ms": round(1000 * lat[len(lat) // 2], 2)}


# --- in-process baselines ----------------------------------------------------------------------

def _dev() -> tuple[str, object]:
    import torch

    return ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def runner_only(folder: Path, batches: list[int], steps: int = 128) -> dict:
    """The torch runner with no scheduler or HTTP: prefill 32 tokens, then `steps` graph-replayed decodes."""
    from gateway.engines.torch_llama import TorchCausalRunner

    dev, dtype = _dev()
    steps = int(os.environ.get("STEPS", steps))
    r = TorchCausalRunner(folder, capacity=max(batches), max_seq_len=512, device=dev, dtype=dtype)
    t0 = time.time()
    n_graphs = r.warmup(512)
    out = {"warmup_s": round(time.time() - t0, 2), "graphs": n_graphs}
    prompt = list(range(100, 132))
    for b in batches:
        seqs = list(range(b))
        _sync()
        t0 = time.perf_counter()
        toks = [r.sample(r.prefill(s, prompt), [])[0] for s in seqs]
        _sync()
        prefill_ms = (time.perf_counter() - t0) * 1000 / b
        t0 = time.perf_counter()
        for _ in range(steps):
            toks = r.decode(seqs, toks).argmax(-1).tolist()
        dt = time.perf_counter() - t0
        out[f"b{b}"] = {"tok_s": round(b * steps / dt, 1), "step_ms": round(1000 * dt / steps, 3),
                        "prefill_ms_per_seq": round(prefill_ms, 3)}
        for s in seqs:
            r.release(s)
    return out


def hf_generate(folder: Path, batches: list[int], new_tokens: int = 128, prompt_len: int = 32) -> dict:
    """Plain transformers `generate`, bf16, default (eager, dynamic cache) decoding, batched, greedy.
    Measured as is (`b<N>`) and with min_new_tokens forcing exactly `new_tokens` (`min_b<N>`)."""
    import torch
    import transformers

    dev, dtype = _dev()
    new_tokens = int(os.environ.get("STEPS", new_tokens))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(dev).eval()
    out = {"transformers": transformers.__version__, "torch": torch.__version__,
           "attn_implementation": getattr(model.config, "_attn_implementation", None)}
    g = torch.Generator().manual_seed(0)
    runs = [("b", 1, {})] + [("b", b, {}) for b in batches] + [("min_b", b, {"min_new_tokens": new_tokens})
                                                               for b in batches]
    for prefix, b, extra in runs:  # the first batch-1 run is a warm-up
        ids = torch.randint(100, 40000, (b, prompt_len), generator=g).to(dev)
        _sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            res = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=2, **extra)
        _sync()
        dt = time.perf_counter() - t0
        made = (res.shape[1] - prompt_len) * b
        out[f"{prefix}{b}"] = {"tok_s": round(made / dt, 1), "s": round(dt, 3), "new_tokens": res.shape[1] - prompt_len}
    return out


def embed_inproc(folder: Path, batches: list[int]) -> dict:
    from transformers import AutoTokenizer

    from gateway.engines.torch_bert import TorchEncoderRunner

    dev, dtype = _dev()
    r = TorchEncoderRunner(folder, device=dev, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = tok(_sentences())["input_ids"]
    out = {"mean_tokens": round(sum(map(len, ids)) / len(ids), 1)}
    for b in batches:
        batch = (ids * (b // len(ids) + 1))[:b]
        r.encode(batch)
        _sync()
        t0 = time.perf_counter()
        for _ in range(20):
            r.encode(batch)
        out[f"b{b}"] = round(20 * b / (time.perf_counter() - t0), 1)
    return out


# --- report ------------------------------------------------------------------------------------

def report(out: Path) -> str:
    def load(name):
        f = out / name
        return json.loads(f.read_text()) if f.exists() else {}

    env, chat, emb, hf, run = load("env.json"), load("chat.json"), load("embed.json"), load("hf.json"), load("runner.json")
    lines = [f"# fmgate GPU check ({env.get('gpu', '?')})", "",
             f"torch {env.get('torch')}, transformers {env.get('transformers')}, CUDA {env.get('cuda')}. "
             "Random weights with the real SmolLM2-135M / all-MiniLM-L6-v2 configs and tokenizers: "
             "throughput at a fixed token count does not depend on the weight values.", "",
             "## Chat, streaming, max_tokens 128, greedy (tok/s, all clients together)", "",
             "| clients | fmgate tok/s | per stream p50 | TTFT p50 ms | transformers eager generate, same batch | ratio |",
             "|---|---|---|---|---|---|"]
    for row in chat.get("runs", []):
        c = row["clients"]
        base = hf.get(f"b{c}", {}).get("tok_s")
        ratio = f"{row.get('tok_s', 0) / base:.1f}x" if base and row.get("tok_s") else "-"
        lines.append(f"| {c} | {row.get('tok_s')} | {row.get('per_stream_tok_s_p50')} | {row.get('ttft_p50_ms')} "
                     f"| {base} | {ratio} |")
    mp_runs = load("chat_mp.json").get("runs", [])
    if mp_runs:
        lines += ["", "Engine core in its own process, several API processes (`--engine-process`, docs/processes.md):", "",
                  "| clients | fmgate tok/s | per stream p50 | TTFT p50 ms | vs single process |", "|---|---|---|---|---|"]
        single = {r["clients"]: r.get("tok_s") for r in chat.get("runs", [])}
        for row in mp_runs:
            base = single.get(row["clients"])
            ratio = f"{row.get('tok_s', 0) / base:.2f}x" if base and row.get("tok_s") else "-"
            lines.append(f"| {row['clients']} | {row.get('tok_s')} | {row.get('per_stream_tok_s_p50')} "
                         f"| {row.get('ttft_p50_ms')} | {ratio} |")
    if hf:
        lines += ["", "transformers generate with min_new_tokens=128 (exactly 128 new tokens): " + ", ".join(
            f"batch {k[5:]} {v['tok_s']} tok/s" for k, v in hf.items() if k.startswith("min_b")) + "."]
    if run:
        lines += ["", "Runner alone (no scheduler, no HTTP), decode after a 32-token prefill: " + ", ".join(
            f"batch {k[1:]} {v['tok_s']} tok/s ({v['step_ms']} ms/step)" for k, v in run.items()
            if k.startswith("b")) + f"; {run.get('graphs')} CUDA graphs captured in {run.get('warmup_s')} s."]
    lines += ["", "## Embeddings, base64, sentences/s", "", "| clients x inputs per request | in flight | sentences/s | p50 ms |",
              "|---|---|---|---|"]
    for row in emb.get("runs", []):
        lines.append(f"| {row.get('clients')} x {row.get('per_request')} | {row.get('inflight')} | {row.get('sent_s')} "
                     f"| {row.get('latency_p50_ms')} |")
    if emb.get("inproc"):
        lines += ["", "Encoder alone (no batcher, no HTTP): " + ", ".join(
            f"batch {k[1:]} {v} sent/s" for k, v in emb["inproc"].items() if k.startswith("b"))
            + f" (mean {emb['inproc'].get('mean_tokens')} tokens per sentence)."]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("models")
    p.add_argument("out", type=Path)
    sub.add_parser("serve")
    p = sub.add_parser("chat")
    p.add_argument("url")
    p.add_argument("model")
    p.add_argument("--clients", default="1,8,64")
    p.add_argument("--requests", default="4,3,3")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("embed")
    p.add_argument("url")
    p.add_argument("model")
    p.add_argument("--shapes", default="1x256,8x32,32x8,256x1")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--inproc", type=Path)
    p.add_argument("--out", type=Path, required=True)
    for name in ("runner", "hf"):
        p = sub.add_parser(name)
        p.add_argument("folder", type=Path)
        p.add_argument("--batches", default="1,8,64")
        p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("report")
    p.add_argument("out", type=Path)
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        return serve(sys.argv[2:])
    a = ap.parse_args()
    if a.cmd == "models":
        make_models(a.out)
    elif a.cmd == "chat":
        clients = [int(x) for x in a.clients.split(",")]
        reqs = [int(x) for x in a.requests.split(",")]
        warm = chat_load(a.url, a.model, 8, 1, 16)
        runs = []
        for c, n in zip(clients, reqs, strict=True):
            runs.append(chat_load(a.url, a.model, c, n, a.max_tokens))
            print(json.dumps(runs[-1]), flush=True)
        a.out.write_text(json.dumps({"warmup": warm, "runs": runs}, indent=2))
    elif a.cmd == "embed":
        embed_load(a.url, a.model, 4, 64, 1.0)  # warm-up
        runs = []
        for shape in a.shapes.split(","):
            c, k = (int(x) for x in shape.split("x"))
            runs.append(embed_load(a.url, a.model, c, k, a.seconds))
            print(json.dumps(runs[-1]), flush=True)
        res = {"runs": runs}
        a.out.write_text(json.dumps(res, indent=2))
        if a.inproc:
            res["inproc"] = embed_inproc(a.inproc, [32, 256, 1024])
            a.out.write_text(json.dumps(res, indent=2))
    elif a.cmd in ("runner", "hf"):
        batches = [int(x) for x in a.batches.split(",")]
        res = runner_only(a.folder, batches) if a.cmd == "runner" else hf_generate(a.folder, batches)
        print(json.dumps(res), flush=True)
        a.out.write_text(json.dumps(res, indent=2))
    elif a.cmd == "report":
        print(report(a.out))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
