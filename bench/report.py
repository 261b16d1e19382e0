"""Turn a results JSON into BENCHMARKS.md tables: medians over repetitions, ratios against fmgate.

Standard library only, so bench/plot.py can import it from the tools venv.
"""

from __future__ import annotations

import base64
import statistics
import struct
from collections.abc import Iterable

BEGIN = "<!-- bench:serving:begin (written by `make bench`; edit bench/report.py, not this block) -->"
END = "<!-- bench:serving:end -->"

SKELETON = """# Benchmarks

Measured on this project's reference box (2 cores, no GPU) unless a section says otherwise.
Each section says how to reproduce it.

## Serving: fmgate against peer servers

{begin}
{end}
"""


def scenario_key(kind: str, concurrency: int, batch: int = 0) -> str:
    """chat-c8, long-c4 (long prompts), embed-c32-b16."""
    return f"embed-c{concurrency}-b{batch}" if kind == "embed" else f"{kind}-c{concurrency}"


def median(values: Iterable[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return statistics.median(v) if v else None


METRICS = ("tok_s", "sent_s", "ttft_p50_ms", "ttft_p95_ms", "e2e_p50_ms", "e2e_p95_ms", "mean_tokens",
           "peak_rss_mb", "errors", "requests")


def aggregate(results: dict) -> dict[str, dict[str, dict]]:
    """server -> scenario -> {metric: median over reps, 'reps': n}."""
    out: dict[str, dict[str, dict]] = {}
    for name, srv in results.get("servers", {}).items():
        by: dict[str, list[dict]] = {}
        for run in srv.get("runs", []):
            by.setdefault(run["scenario"], []).append(run)
        agg = {}
        for sc, runs in by.items():
            row: dict = {"reps": len(runs), "kind": runs[0]["kind"], "concurrency": runs[0]["concurrency"],
                         "batch": runs[0].get("batch", 0)}
            for m in METRICS:
                row[m] = median(r.get(m) for r in runs)
            row["token_source"] = runs[0].get("token_source", "")
            agg[sc] = row
        out[name] = agg
    return out


def _f(x: float | None, nd: int = 0) -> str:
    if x is None:
        return "–"
    return f"{x:,.{nd}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _rx(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def _label(results: dict, name: str) -> str:
    return results["servers"][name].get("label", name)


def _chat_table(results: dict, agg: dict, levels: list[int]) -> list[str]:
    names = [n for n, s in results["servers"].items() if "chat" in s.get("kinds", [])]
    lines = ["| clients | server | tok/s | TTFT p50 | TTFT p95 | e2e p50 | e2e p95 | tokens/req | fmgate ÷ server |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in levels:
        sc = scenario_key("chat", c)
        fm = agg.get("fmgate", {}).get(sc, {}).get("tok_s")
        for n in names:
            row = agg.get(n, {}).get(sc)
            if not row:
                continue
            err = f" ({_f(row['errors'])} errors)" if row.get("errors") else ""
            ratio = "" if n == "fmgate" else _rx(_ratio(fm, row["tok_s"]))
            lines.append(
                f"| {c} | {_label(results, n)}{err} | {_f(row['tok_s'], 1)} | {_f(row['ttft_p50_ms'])} ms | "
                f"{_f(row['ttft_p95_ms'])} ms | {_f(row['e2e_p50_ms'])} ms | {_f(row['e2e_p95_ms'])} ms | "
                f"{_f(row['mean_tokens'], 1)} | {ratio} |")
    return lines


def _long_table(results: dict, agg: dict, levels: list[int]) -> list[str]:
    names = [n for n, s in results["servers"].items() if "chat" in s.get("kinds", [])]
    lines = ["| clients | server | TTFT p50 | TTFT p95 | e2e p50 | requests | server's TTFT p50 ÷ fmgate's |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for c in levels:
        sc = scenario_key("long", c)
        fm = agg.get("fmgate", {}).get(sc, {}).get("ttft_p50_ms")
        for n in names:
            row = agg.get(n, {}).get(sc)
            if not row:
                continue
            err = f" ({_f(row['errors'])} errors)" if row.get("errors") else ""
            ratio = "" if n == "fmgate" else _rx(_ratio(row["ttft_p50_ms"], fm))
            lines.append(f"| {c} | {_label(results, n)}{err} | {_f(row['ttft_p50_ms'])} ms | "
                         f"{_f(row['ttft_p95_ms'])} ms | {_f(row['e2e_p50_ms'])} ms | {_f(row['requests'])} | {ratio} |")
    return lines


def _embed_table(results: dict, agg: dict, levels: list[tuple[int, int]]) -> list[str]:
    names = [n for n, s in results["servers"].items() if "embed" in s.get("kinds", [])]
    lines = ["| clients × sentences/request | server | sentences/s | e2e p50 | e2e p95 | fmgate ÷ server |",
             "|---|---|---:|---:|---:|---:|"]
    for c, b in levels:
        sc = scenario_key("embed", c, b)
        fm = agg.get("fmgate", {}).get(sc, {}).get("sent_s")
        for n in names:
            row = agg.get(n, {}).get(sc)
            if not row:
                continue
            err = f" ({_f(row['errors'])} errors)" if row.get("errors") else ""
            ratio = "" if n == "fmgate" else _rx(_ratio(fm, row["sent_s"]))
            lines.append(f"| {c} × {b} | {_label(results, n)}{err} | {_f(row['sent_s'], 1)} | "
                         f"{_f(row['e2e_p50_ms'])} ms | {_f(row['e2e_p95_ms'])} ms | {ratio} |")
    return lines


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _quality_table(results: dict) -> list[str]:
    """Greedy answers compared with llama-server's (same Q4_1 weights) and the naive fp32 model's."""
    refs = [r for r in ("llama-server", "naive-chat") if results["servers"].get(r, {}).get("texts")]
    names = [n for n, s in results["servers"].items() if s.get("texts")]
    if not refs or len(names) < 2:
        return []
    head = "| server | " + " | ".join(f"same text as {_label(results, r)}" for r in refs) + " |"
    lines = [head, "|---|" + "---:|" * len(refs)]
    for n in names:
        cells = []
        for r in refs:
            if r == n:
                cells.append("(reference)")
                continue
            a, b = results["servers"][n]["texts"], results["servers"][r]["texts"]
            common = [p for p in a if p in b]
            if not common:
                cells.append("–")
                continue
            same = sum(a[p] == b[p] for p in common)
            prefix = statistics.fmean(_common_prefix(a[p], b[p]) for p in common)
            cells.append(f"{same}/{len(common)} (first {prefix:.0f} chars agree on average)")
        lines.append(f"| {_label(results, n)} | " + " | ".join(cells) + " |")
    return lines


def pack_vectors(vectors: list[list[float]]) -> dict:
    """Vectors as base64 of little-endian float16, for the results JSON."""
    rows, dim = len(vectors), len(vectors[0]) if vectors else 0
    raw = struct.pack(f"<{rows * dim}e", *(x for v in vectors for x in v))
    return {"dtype": "float16", "shape": [rows, dim], "b64": base64.b64encode(raw).decode()}


def unpack_vectors(packed: dict | list | None) -> list[list[float]] | None:
    """The inverse of pack_vectors; older results files hold plain lists."""
    if not packed or isinstance(packed, list):
        return packed
    rows, dim = packed["shape"]
    flat = struct.unpack(f"<{rows * dim}e", base64.b64decode(packed["b64"]))
    return [list(flat[i * dim:(i + 1) * dim]) for i in range(rows)]


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na = sum(x * x for x in a) ** 0.5
    nb = sum(y * y for y in b) ** 0.5
    return dot / (na * nb) if na and nb else 0.0


def _embed_quality(results: dict) -> list[str]:
    """Cosine of each server's vectors against sentence-transformers' (the naive baseline's)."""
    ref = unpack_vectors(results["servers"].get("naive-embed", {}).get("probe_vectors"))
    if not ref:
        return []
    lines = ["| server | cosine vs sentence-transformers, mean / min |", "|---|---:|"]
    for n, s in results["servers"].items():
        vecs = unpack_vectors(s.get("probe_vectors"))
        if not vecs or n == "naive-embed":
            continue
        if len(vecs) != len(ref) or len(vecs[0]) != len(ref[0]):
            lines.append(f"| {_label(results, n)} | shape differs ({len(vecs)}×{len(vecs[0])}) |")
            continue
        c = [_cos(a, b) for a, b in zip(vecs, ref, strict=True)]
        lines.append(f"| {_label(results, n)} | {statistics.fmean(c):.4f} / {min(c):.4f} |")
    return lines if len(lines) > 2 else []


def goals(results: dict, agg: dict) -> list[tuple[str, str, float | None, str]]:
    """(goal, target, measured, verdict) for each goal of issues 8 and 14 that this run can judge."""
    fm = agg.get("fmgate", {})

    def get(server: str, sc: str, m: str) -> float | None:
        return agg.get(server, {}).get(sc, {}).get(m)

    rows: list[tuple[str, str, float | None, str]] = []

    def ratio_goal(label: str, sc: str, metric: str, peer: str, target: float) -> None:
        r = _ratio(get("fmgate", sc, metric), get(peer, sc, metric))
        verdict = "not measured" if r is None else ("met" if r >= target else "NOT met")
        rows.append((label, f"≥ {target:g}×", r, verdict))

    ratio_goal("Chat, 1 client, tok/s vs native llama-server", "chat-c1", "tok_s", "llama-server", 1.0)
    ratio_goal("Chat, 1 client, tok/s vs llama-cpp-python", "chat-c1", "tok_s", "llama-cpp-python", 1.8)
    ratio_goal("Chat, 8 clients, tok/s vs llama-server -np 8", "chat-c8", "tok_s", "llama-server", 1.5)
    ratio_goal("Chat, 8 clients, tok/s vs llama-cpp-python", "chat-c8", "tok_s", "llama-cpp-python", 4.0)
    ttft = fm.get("chat-c8", {}).get("ttft_p50_ms")
    rows.append(("Chat, 8 clients, fmgate TTFT p50", "≤ 100 ms", ttft,
                 "not measured" if ttft is None else ("met" if ttft <= 100 else "NOT met")))
    t8, t16 = get("fmgate", "chat-c8", "tok_s"), get("fmgate", "chat-c16", "tok_s")
    r = _ratio(t16, t8)
    rows.append(("Chat, 16 clients scale further (fmgate tok/s at 16 ÷ at 8)", "> 1×", r,
                 "not measured" if r is None else ("met" if r > 1.0 else "NOT met")))
    ratio_goal("Embeddings, 32 clients × 1, vs Infinity", "embed-c32-b1", "sent_s", "infinity", 2.0)
    ratio_goal("Embeddings, 32 clients × 16, vs Infinity", "embed-c32-b16", "sent_s", "infinity", 1.3)
    ratio_goal("Embeddings, 32 clients × 1, vs naive", "embed-c32-b1", "sent_s", "naive-embed", 4.0)
    ratio_goal("Embeddings, 32 clients × 16, vs naive", "embed-c32-b16", "sent_s", "naive-embed", 4.0)
    for c in (1, 4):  # lower is better: the peer's TTFT over fmgate's
        sc = scenario_key("long", c)
        r = _ratio(get("llama-server", sc, "ttft_p50_ms"), get("fmgate", sc, "ttft_p50_ms"))
        rows.append((f"Long prompt (~1,400 tokens), {c} client{'s' if c > 1 else ''}, TTFT p50, "
                     "llama-server's ÷ fmgate's", "≥ 1.5×", r,
                     "not measured" if r is None else ("met" if r >= 1.5 else "NOT met")))
    return rows


def _command(meta: dict) -> str:
    cmd = meta.get("command", "").strip()
    return "make bench" if cmd in ("", "python -m bench.run") else cmd


def render(results: dict, plot_name: str | None = None) -> str:
    """The serving section's body, between the BEGIN/END markers."""
    meta = results.get("meta", {})
    agg = aggregate(results)
    chat_levels = meta.get("chat_levels", [])
    long_levels = meta.get("long_levels", [])
    embed_levels = [tuple(x) for x in meta.get("embed_levels", [])]
    out = [
        f"Run `{_command(meta)}` — {meta.get('started', '')}, {meta.get('cpu', '')}, "
        f"{meta.get('nproc', '?')} cores, load average {meta.get('loadavg_start', '?')} at the start. "
        f"Medians of {meta.get('reps', '?')} repetition{'' if meta.get('reps') == 1 else 's'}; each repetition is a closed loop of N clients for "
        f"{meta.get('chat_seconds', '?')} s (chat) or {meta.get('embed_seconds', '?')} s (embeddings). "
        f"Ratios are fmgate's figure divided by the peer's, from this same run. "
        f"Raw data: `{meta.get('results_file', '')}`.",
        "",
    ]
    if meta.get("quick"):
        out += ["**Quick smoke run** (`--quick`): one short repetition; figures are indicative only.", ""]
    if meta.get("note"):
        out += [meta["note"], ""]
    out += ["### Servers and the settings each was given", "",
            "| server | version | settings | why | startup | peak RSS serving | peak RSS at startup | status |",
            "|---|---|---|---|---:|---:|---:|---|"]
    for n, s in results["servers"].items():
        status = s.get("status", "")
        if s.get("error"):
            status += ": " + s["error"].splitlines()[0][:160].replace("|", "/")
        start = f"{s['startup_s']:.1f} s" if s.get("startup_s") is not None else "–"
        rss = f"{s['peak_rss_mb']:,.0f} MB" if s.get("peak_rss_mb") else "–"
        srss = f"{s['startup_peak_rss_mb']:,.0f} MB" if s.get("startup_peak_rss_mb") else "–"
        out.append(f"| {s.get('label', n)} | {s.get('version', '')} | {s.get('settings', '')} | "
                   f"{s.get('why', '')} | {start} | {rss} | {srss} | {status} |")
    out += ["", "Peak RSS is the whole process tree's, sampled every 0.2 s: while serving (warm-up and all "
            "load levels) and from launch to ready. fmgate holds both models; each peer holds one. Startup "
            "includes loading (and, on fmgate's first start in an empty FMGATE_HOME, building) the models.", ""]
    has_chat = any(r["kind"] == "chat" for a in agg.values() for r in a.values())
    has_embed = any(r["kind"] == "embed" for a in agg.values() for r in a.values())
    if chat_levels and has_chat:
        out += ["### Chat: SmolLM2-135M-Instruct, max_tokens 64, temperature 0, streaming", "",
                *_chat_table(results, agg, chat_levels), "",
                "TTFT is the time to the first chunk carrying content; tokens come from the server's "
                "`usage` when it sends one. tok/s is all clients' completion tokens over the wall time.", ""]
        q = _quality_table(results)
        if q:
            out += ["Greedy answers, one client (a quick check that like is compared with like):", "", *q, ""]
    if long_levels and any(r["kind"] == "long" for a in agg.values() for r in a.values()):
        out += [f"### Long prompts: about 1,400 tokens each, all distinct, max_tokens {meta.get('long_max_tokens', 16)}", "",
                *_long_table(results, agg, long_levels), "",
                "Each request's prompt starts with its own number, so no prefix cache helps. The last column "
                "is the peer's TTFT p50 over fmgate's (above 1: fmgate answers first).", ""]
    if embed_levels and has_embed:
        out += ["### Embeddings: all-MiniLM-L6-v2, sentences of about 20–30 tokens", "",
                *_embed_table(results, agg, embed_levels), ""]
        q = _embed_quality(results)
        if q:
            out += ["Vectors for the same sentences, compared with the naive baseline's:", "", *q, ""]
    rows = goals(results, agg)
    out += ["### Goals (issues 8 and 14)", "", "| goal | target | measured | verdict |", "|---|---|---:|---|"]
    for label, target, val, verdict in rows:
        if val is None:
            shown = "–"
        elif target.endswith("ms"):
            shown = f"{val:.0f} ms"
        else:
            shown = f"{val:.2f}×"
        out.append(f"| {label} | {target} | {shown} | {verdict} |")
    missed = [r[0] for r in rows if r[3] == "NOT met"]
    if missed:
        out += ["", "Not reached in this run: " + "; ".join(missed) + "."]
    if plot_name:
        out += ["", f"![throughput and latency]({plot_name})"]
    return "\n".join(out)


def update_markdown(text: str | None, body: str) -> str:
    """Replace the serving block in BENCHMARKS.md, leaving every other section alone."""
    if not text:
        text = SKELETON.format(begin=BEGIN, end=END)
    block = f"{BEGIN}\n{body}\n{END}"
    if BEGIN in text and END in text:
        pre, rest = text.split(BEGIN, 1)
        _, post = rest.split(END, 1)
        return pre + block + post
    return text.rstrip() + "\n\n## Serving: fmgate against peer servers\n\n" + block + "\n"
