"""Sweep each peer's main knob on this box, to pick the settings bench/servers.py gives it.

    python -m bench.tune                    # all sweeps, 3 reps each
    python -m bench.tune infinity --reps 2  # one sweep

Sweeps: Infinity --batch-size on 32 clients x 1 and x 16 sentences; llama-cpp-python n_threads on
1 and 4 clients (it serves one request at a time, so more clients only queue); llama-server -t at
1 and 8 clients. Prints a markdown table of medians; the winners belong in bench/servers.py (or in
the BENCH_* variables it reads). Run it on a quiet box: it measures CPU contention otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from bench import peers, servers
from bench.load import run_chat, run_embed
from bench.servers import SPECS, RunningServer

RESULTS = peers.BENCH / "results"

# sweep name -> (server, module variable, values, scenarios as (kind, clients, batch))
SWEEPS = {
    "infinity": ("infinity", "INFINITY_BATCH", [8, 16, 32, 64, 128], [("embed", 32, 1), ("embed", 32, 16)]),
    "llama-cpp-python": ("llama-cpp-python", "LLAMA_CPP_PYTHON_THREADS", [1, 2], [("chat", 1, 0), ("chat", 4, 0)]),
    "llama-server": ("llama-server", "LLAMA_SERVER_THREADS", [1, 2], [("chat", 1, 0), ("chat", 8, 0)]),
}


def _measure(srv: RunningServer, kind: str, clients: int, batch: int, seconds: float) -> float | None:
    spec = srv.spec
    if kind == "chat":
        s = asyncio.run(run_chat(srv.base_url, spec.chat_model, clients, per_client=64, max_seconds=seconds))
        return s.tok_s
    s = asyncio.run(run_embed(srv.base_url, spec.embed_model, clients, batch, per_client=5000, max_seconds=seconds))
    return s.sent_s


def sweep(name: str, reps: int, seconds: float, logs) -> list[dict]:
    server, var, values, scenarios = SWEEPS[name]
    spec = SPECS[server]
    peers.ensure(list(spec.needs))
    default = getattr(servers, var)
    rows = []
    try:
        for v in values:
            setattr(servers, var, v)
            srv = RunningServer(spec, logs / f"{name}-{v}.log")
            try:
                srv.wait_ready()
                for kind, c, b in scenarios:  # warm-up
                    _measure(srv, kind, c, b, 2.0)
                got: dict[str, list[float]] = {}
                for _ in range(reps):
                    for kind, c, b in scenarios:
                        key = f"{kind} {c}" + (f"x{b}" if kind == "embed" else "")
                        val = _measure(srv, kind, c, b, seconds)
                        if val is not None:
                            got.setdefault(key, []).append(val)
                row = {"sweep": name, var: v, **{k: round(statistics.median(x), 1) for k, x in got.items()},
                       "peak_rss_mb": round(srv.rss.peak / 1e6)}
            except Exception as exc:  # noqa: BLE001 - report and go on with the next value
                row = {"sweep": name, var: v, "error": str(exc)[:300]}
            finally:
                srv.stop()
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        setattr(servers, var, default)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweeps", nargs="*", default=list(SWEEPS), choices=list(SWEEPS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = RESULTS / f"tune-{stamp}-logs"
    all_rows = []
    for name in args.sweeps:
        all_rows += sweep(name, args.reps, args.seconds, logs)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"tune-{stamp}.json"
    out.write_text(json.dumps(all_rows, indent=1))
    print(f"\n{out}\n")
    for name in args.sweeps:
        rows = [r for r in all_rows if r["sweep"] == name]
        keys = [k for r in rows for k in r if k != "sweep"]
        cols = list(dict.fromkeys(keys))
        print(f"### {name}\n\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
        print()


if __name__ == "__main__":
    main()
