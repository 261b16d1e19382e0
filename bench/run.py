"""Side-by-side benchmark: start each server in turn on loopback, run the same load, write tables.

    python -m bench.run                      # everything, 3 reps: BENCHMARKS.md + bench/plot.png
    python -m bench.run --quick              # smoke test, a few minutes; writes under bench/results/
    python -m bench.run --servers fmgate,llama-server --reps 5
    python -m bench.run --from-json bench/results/X.json   # re-render tables and plot only

Peers are installed on first use into bench/.peers/ (see bench/peers.py). Raw results go to
bench/results/<timestamp>.json; server logs to bench/results/<timestamp>-logs/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench import peers, report
from bench.load import SENTENCES, run_chat, run_embed
from bench.servers import SPECS, RunningServer, expand

REPO = peers.BENCH.parent
RESULTS = peers.BENCH / "results"

FULL_CHAT_LEVELS = [1, 4, 8, 16]
FULL_EMBED_LEVELS = [(1, 1), (8, 1), (32, 1), (1, 16), (8, 16), (32, 16)]
QUICK_CHAT_LEVELS = [1, 8]
FULL_LONG_LEVELS = [1, 4]
QUICK_LONG_LEVELS = [1]
LONG_MAX_TOKENS = 16
QUICK_EMBED_LEVELS = [(1, 1), (32, 1), (32, 16)]
# Upper bounds on requests per client; the time window normally ends a repetition first.
CHAT_PER_CLIENT = 64
EMBED_PER_CLIENT = 5000
PROBE = 8


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _cpu_name() -> str:
    """The model name and the vector extensions that decide int8/int4 speed: boxes of the same name differ."""
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    ext = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    name = name or platform.processor() or platform.machine()
    return f"{name} ({', '.join(ext)})" if ext else name


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _parse_levels(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        c, _, b = part.strip().partition("x")
        if int(c) > 0:  # "0" skips embeddings
            out.append((int(c), int(b or 1)))
    return out


def warm_up(srv: RunningServer, chat_levels: list[int], embed_levels: list[tuple[int, int]]) -> None:
    """Touch every code path once (batched and single) before anything is timed."""
    spec = srv.spec
    if "chat" in spec.kinds:  # also before a long-prompts-only run
        asyncio.run(run_chat(srv.base_url, spec.chat_model, 1, per_client=2, max_seconds=120))
        asyncio.run(run_chat(srv.base_url, spec.chat_model, max(chat_levels, default=1), per_client=1,
                             max_seconds=120))
    if "embed" in spec.kinds and embed_levels:
        asyncio.run(run_embed(srv.base_url, spec.embed_model, 1, 1, per_client=5, max_seconds=60))
        c = max(c for c, _ in embed_levels)
        b = max(b for _, b in embed_levels)
        asyncio.run(run_embed(srv.base_url, spec.embed_model, c, b, per_client=2, max_seconds=60))


def served_variants(base_url: str) -> dict[str, str]:
    """fmgate's /v1/models says which compressed variant serves each model; peers say nothing."""
    try:
        r = httpx.get(base_url + "/v1/models", timeout=10, trust_env=False)
        return {m["id"]: str(m["variant"]) for m in r.json().get("data", []) if m.get("variant")}
    except (httpx.HTTPError, ValueError, KeyError, AttributeError):
        return {}


async def embed_probe(base_url: str, model: str) -> dict:
    """Embeddings of a few fixed sentences, to compare servers' vectors (cosine) in the report; packed as
    little-endian float16 in base64 (6 kB a server instead of 60 kB of JSON numbers; the cosines the report
    prints to 4 decimals are unchanged)."""
    async with httpx.AsyncClient(trust_env=False, timeout=120) as c:
        r = await c.post(base_url + "/v1/embeddings", json={"model": model, "input": SENTENCES[:PROBE]})
        r.raise_for_status()
        data = sorted(r.json()["data"], key=lambda d: d["index"])
        return report.pack_vectors([d["embedding"] for d in data])


def bench_server(name: str, args: argparse.Namespace, logs: Path) -> dict:
    spec = SPECS[name]
    entry: dict = {"label": spec.label, "kinds": list(spec.kinds), "settings": spec.settings, "why": spec.why,
                   "status": "ok", "runs": [], "texts": {}}
    try:
        if not args.no_setup:
            peers.ensure(list(spec.needs))
    except Exception as exc:  # noqa: BLE001 - one peer's failed setup must not stop the others
        entry.update(status="setup failed", error=str(exc)[-2000:])
        log(f"{name}: setup failed: {str(exc)[-500:]}")
        return entry
    entry["version"] = spec.version()
    entry["loadavg_start"] = _loadavg()
    log(f"{name}: starting (load average {entry['loadavg_start']})")
    try:
        srv = RunningServer(spec, logs / f"{name}.log")
    except OSError as exc:
        entry.update(status="failed to start", error=str(exc))
        log(f"{name}: failed to start: {exc}")
        return entry
    entry["command"] = shlex.join(srv.cmd)
    chat_levels = args.chat_levels if "chat" in spec.kinds else []
    long_levels = args.long_levels if "chat" in spec.kinds else []
    embed_levels = args.embed_levels if "embed" in spec.kinds else []
    try:
        srv.wait_ready()
        entry["startup_s"] = srv.startup_s
        entry["startup_peak_rss_mb"] = round(srv.rss.peak / 1e6, 1)
        srv.rss.mark_serving()
        variants = served_variants(srv.base_url)
        if variants:
            entry["variants"] = variants
            entry["version"] += " (" + ", ".join(f"{k}: {v}" for k, v in variants.items()) + ")"
        log(f"{name}: ready in {srv.startup_s} s on {srv.base_url}; warming up")
        warm_up(srv, chat_levels, embed_levels)
        if embed_levels:
            entry["probe_vectors"] = asyncio.run(embed_probe(srv.base_url, spec.embed_model))
        entry["idle_rss_mb"] = round(srv.rss.sample() / 1e6, 1)
        for rep in range(1, args.reps + 1):
            for c in chat_levels:
                srv.rss.reset_window()
                s = asyncio.run(run_chat(srv.base_url, spec.chat_model, c, per_client=CHAT_PER_CLIENT,
                                         max_seconds=args.chat_seconds, keep_texts=(c == 1)))
                d = s.to_dict()
                for prompt, text in d.pop("texts").items():
                    entry["texts"].setdefault(prompt, text)
                d.update(scenario=report.scenario_key("chat", c), rep=rep,
                         peak_rss_mb=round(srv.rss.window_peak / 1e6, 1))
                entry["runs"].append(d)
                log(f"{name}: rep {rep} chat c={c}: {d['tok_s']} tok/s, TTFT p50 {d['ttft_p50_ms']} ms, "
                    f"e2e p50 {d['e2e_p50_ms']} ms, {d['requests']} req, {d['errors']} errors"
                    + (f" ({d['first_error'][:200]})" if d["errors"] else ""))
            for c in long_levels:
                srv.rss.reset_window()
                s = asyncio.run(run_chat(srv.base_url, spec.chat_model, c, per_client=CHAT_PER_CLIENT,
                                         max_seconds=2 * args.chat_seconds, max_tokens=LONG_MAX_TOKENS, long=True,
                                         first_id=(rep * 100 + c) * 1000))  # new prompts each rep and level
                d = s.to_dict()
                d.pop("texts")
                d.update(scenario=report.scenario_key("long", c), rep=rep,
                         peak_rss_mb=round(srv.rss.window_peak / 1e6, 1))
                entry["runs"].append(d)
                log(f"{name}: rep {rep} long prompts c={c}: TTFT p50 {d['ttft_p50_ms']} ms, "
                    f"{d['requests']} req, {d['errors']} errors"
                    + (f" ({d['first_error'][:200]})" if d["errors"] else ""))
            for c, b in embed_levels:
                srv.rss.reset_window()
                s = asyncio.run(run_embed(srv.base_url, spec.embed_model, c, b, per_client=EMBED_PER_CLIENT,
                                          max_seconds=args.embed_seconds))
                d = s.to_dict()
                d.pop("texts")
                d.update(scenario=report.scenario_key("embed", c, b), rep=rep,
                         peak_rss_mb=round(srv.rss.window_peak / 1e6, 1))
                entry["runs"].append(d)
                log(f"{name}: rep {rep} embed c={c} b={b}: {d['sent_s']} sent/s, e2e p50 {d['e2e_p50_ms']} ms, "
                    f"{d['requests']} req, {d['errors']} errors"
                    + (f" ({d['first_error'][:200]})" if d["errors"] else ""))
    except Exception as exc:  # noqa: BLE001 - record it and go on to the next server
        entry.update(status="failed", error=f"{type(exc).__name__}: {exc}"[-2000:])
        log(f"{name}: FAILED: {str(exc)[-800:]}")
    finally:
        srv.stop()
        entry["peak_rss_mb"] = round(srv.rss.serving_peak / 1e6, 1) if srv.rss.serving else None
        entry["overall_peak_rss_mb"] = round(srv.rss.peak / 1e6, 1)
        log(f"{name}: stopped; peak RSS serving {entry['peak_rss_mb']} MB, overall {entry['overall_peak_rss_mb']} MB; "
            f"log {srv.log_path}")
    return entry


def render(results: dict, results_path: Path, md_path: Path, plot_path: Path) -> None:
    rel_plot = os.path.relpath(plot_path, md_path.parent)
    plotted = make_plot(results_path, plot_path)
    body = report.render(results, rel_plot if plotted else None)
    old = md_path.read_text() if md_path.exists() else None
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(report.update_markdown(old, body))
    log(f"wrote {md_path}" + (f" and {plot_path}" if plotted else " (no plot)"))


def make_plot(results_path: Path, plot_path: Path) -> bool:
    """matplotlib lives in bench/.peers/venv-tools, not in fmgate's venv."""
    try:
        py = peers.ensure_venv("tools")
        subprocess.run([str(py), "-m", "bench.plot", str(results_path), str(plot_path)], cwd=str(REPO),
                       check=True, timeout=300)
        return True
    except Exception as exc:  # noqa: BLE001 - tables still get written without the plot
        log(f"plot failed: {exc}")
        return False


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default="all",
                    help=f"comma-separated: {', '.join(SPECS)}, or all / peers / naive / chat / embed")
    ap.add_argument("--quick", action="store_true", help="one short repetition of fewer load levels")
    ap.add_argument("--reps", type=int, help="repetitions per load level (default 3, quick 1)")
    ap.add_argument("--out", type=Path, help="markdown file to update (default BENCHMARKS.md; quick: "
                    "bench/results/<stamp>-quick.md)")
    ap.add_argument("--plot", type=Path, help="PNG to write (default bench/plot.png; quick: beside --out)")
    ap.add_argument("--chat-levels", help="e.g. 1,4,8,16 (0: skip)")
    ap.add_argument("--long-levels", help="clients for the ~1,400-token prompt scenario, e.g. 1,4 (0: skip)")
    ap.add_argument("--embed-levels", help="clients x sentences, e.g. 1x1,8x1,32x1,1x16,8x16,32x16 (0: skip)")
    ap.add_argument("--chat-seconds", type=float, help="time window per chat repetition (default 20, quick 6)")
    ap.add_argument("--embed-seconds", type=float, help="time window per embeddings repetition (default 10, quick 4)")
    ap.add_argument("--no-setup", action="store_true", help="do not install peers; fail those that are missing")
    ap.add_argument("--note", default="", help="a line to print above the tables (e.g. 'box was busy')")
    ap.add_argument("--from-json", type=Path, help="only re-render the markdown and plot from a results file")
    args = ap.parse_args(argv)

    stamp = time.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    if args.out is None:
        args.out = RESULTS / f"{stamp}.md" if args.quick else REPO / "BENCHMARKS.md"
    if args.plot is None:
        args.plot = args.out.with_suffix(".png") if args.quick else peers.BENCH / "plot.png"

    if args.from_json:
        results = json.loads(args.from_json.read_text())
        if args.note:
            results["meta"]["note"] = args.note
        render(results, args.from_json, args.out, args.plot)
        return

    args.reps = args.reps or (1 if args.quick else 3)
    if args.chat_levels:
        args.chat_levels = [int(x) for x in args.chat_levels.split(",") if int(x) > 0]
    else:
        args.chat_levels = QUICK_CHAT_LEVELS if args.quick else FULL_CHAT_LEVELS
    if args.long_levels:
        args.long_levels = [int(x) for x in args.long_levels.split(",") if int(x) > 0]
    else:
        args.long_levels = QUICK_LONG_LEVELS if args.quick else FULL_LONG_LEVELS
    if args.embed_levels:
        args.embed_levels = _parse_levels(args.embed_levels)
    else:
        args.embed_levels = QUICK_EMBED_LEVELS if args.quick else FULL_EMBED_LEVELS
    args.chat_seconds = args.chat_seconds or (6.0 if args.quick else 20.0)
    args.embed_seconds = args.embed_seconds or (4.0 if args.quick else 10.0)
    names = expand([s.strip() for s in args.servers.split(",") if s.strip()])

    RESULTS.mkdir(parents=True, exist_ok=True)
    results_path = RESULTS / f"{stamp}.json"
    logs = RESULTS / f"{stamp}-logs"
    results: dict = {
        "meta": {
            "started": time.strftime("%Y-%m-%d %H:%M"), "command": "python -m bench.run " + shlex.join(
                argv if argv is not None else sys.argv[1:]),
            "cpu": _cpu_name(), "nproc": os.cpu_count(), "loadavg_start": _loadavg(), "quick": args.quick,
            "reps": args.reps, "chat_levels": args.chat_levels, "embed_levels": args.embed_levels,
            "long_levels": args.long_levels, "long_max_tokens": LONG_MAX_TOKENS,
            "chat_seconds": args.chat_seconds, "embed_seconds": args.embed_seconds, "max_tokens": 64,
            "results_file": os.path.relpath(results_path, REPO), "note": args.note,
        },
        "servers": {},
    }
    log(f"servers: {', '.join(names)}; reps {args.reps}; chat {args.chat_levels}; "
        f"long prompts {args.long_levels}; embed {args.embed_levels}")
    try:
        if os.getloadavg()[0] > 0.5 * (os.cpu_count() or 2):
            log(f"WARNING: load average {_loadavg()} before starting: other work shares the cores, "
                "and the figures will show it (llama.cpp's spinning threads worst of all)")
    except OSError:
        pass
    for name in names:
        results["servers"][name] = bench_server(name, args, logs)
        results_path.write_text(json.dumps(results, indent=1))
    results["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M")
    results_path.write_text(json.dumps(results, indent=1))
    log(f"results: {results_path}")
    render(results, results_path, args.out, args.plot)
    failed = [n for n, s in results["servers"].items() if s["status"] != "ok"]
    if failed:
        log(f"did not complete: {', '.join(failed)} (see the table's status column and {logs})")


if __name__ == "__main__":
    main()
