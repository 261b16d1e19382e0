"""Draw the benchmark PNG from a results JSON. Runs in bench/.peers/venv-tools (matplotlib).

    python -m bench.plot RESULTS.json OUT.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.report import aggregate, scenario_key  # noqa: E402


def plot(results: dict, out: Path) -> None:
    agg = aggregate(results)
    meta = results.get("meta", {})
    chat_levels = meta.get("chat_levels", [])
    embed_levels = [tuple(x) for x in meta.get("embed_levels", [])]
    servers = results.get("servers", {})
    chat = [n for n, s in servers.items() if "chat" in s.get("kinds", []) and agg.get(n)]
    embed = [n for n, s in servers.items() if "embed" in s.get("kinds", []) and agg.get(n)]
    label = {n: s.get("label", n) for n, s in servers.items()}

    panels = (["tok", "ttft"] if chat else []) + (["embed"] if embed else [])
    if not panels:
        panels = ["tok"]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(9.0, 5.7 * len(panels)), 5.2), squeeze=False)
    axes = dict(zip(panels, axes[0], strict=True))

    if "tok" in axes:
        ax = axes["tok"]
        for n in chat:
            ys = [agg[n].get(scenario_key("chat", c), {}).get("tok_s") for c in chat_levels]
            ax.plot(chat_levels, ys, marker="o", label=label[n], linewidth=2.5 if n == "fmgate" else 1.5)
        ax.set(title="Chat throughput (max_tokens 64)", xlabel="concurrent clients", ylabel="tokens/s")
        ax.set_xticks(chat_levels)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if chat:
            ax.legend(fontsize=8)

    if "ttft" in axes:
        ax = axes["ttft"]
        for n in chat:
            ys = [agg[n].get(scenario_key("chat", c), {}).get("ttft_p50_ms") for c in chat_levels]
            ax.plot(chat_levels, ys, marker="o", label=label[n], linewidth=2.5 if n == "fmgate" else 1.5)
        ax.set(title="Chat TTFT p50 (log scale)", xlabel="concurrent clients", ylabel="ms")
        ax.set_yscale("log")
        ax.set_xticks(chat_levels)
        ax.grid(alpha=0.3, which="both")

    if "embed" in axes:
        ax = axes["embed"]
        width = 0.8 / len(embed)
        xs = range(len(embed_levels))
        for i, n in enumerate(embed):
            ys = [agg[n].get(scenario_key("embed", c, b), {}).get("sent_s") or 0 for c, b in embed_levels]
            ax.bar([x + i * width for x in xs], ys, width=width, label=label[n])
        ax.set_xticks([x + width * (len(embed) - 1) / 2 for x in xs])
        ax.set_xticklabels([f"{c}×{b}" for c, b in embed_levels])
        ax.set(title="Embeddings throughput", xlabel="clients × sentences per request", ylabel="sentences/s")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)

    sub = f"{meta.get('started', '')} · {meta.get('nproc', '?')} cores · median of {meta.get('reps', '?')} reps"
    if meta.get("quick"):
        sub += " · QUICK SMOKE RUN"
    fig.suptitle(f"fmgate vs peers — {sub}", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    results = json.loads(Path(sys.argv[1]).read_text())
    plot(results, Path(sys.argv[2]))


if __name__ == "__main__":
    main()
