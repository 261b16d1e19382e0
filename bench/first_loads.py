"""Fresh first loads of the default models, to check that the store's choice is steady.

    python -m bench.first_loads --runs 3          # three empty FMGATE_HOMEs, one after another

Each run pulls every default model (Settings' defaults: the two wheels) into an empty home with
`fmgate models pull --json`, as a first `fmgate serve` would, and records its wall time, the chosen
variant and every candidate's figures (median speed score, spread, quality, verdict). The JSON goes to
bench/results/first-loads-<stamp>.json; the markdown summary to stdout. Run it on a quiet box.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gateway.settings import Settings

RESULTS = Path(__file__).resolve().parent / "results"
FMGATE = str(Path(sys.executable).with_name("fmgate"))


def pull(source: str, task: str, home: Path) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([FMGATE, "models", "pull", source, "--task", task, "--home", str(home), "--json"],
                         capture_output=True, text=True, check=True)
    manifest = json.loads(out.stdout)
    wall = time.perf_counter() - t0
    return {
        "source": source, "task": task, "wall_s": round(wall, 1), "chosen": manifest["chosen"],
        "why": manifest.get("why", ""),
        "candidates": [
            {"variant": c["variant"], "size_mb": round(c["size_bytes"] / 1e6, 1), "build_s": c.get("build_s"),
             "quality": c.get("quality"), "speed": c.get("speed"), "passes": c.get("passes"),
             "verdict": c.get("verdict", "")}
            for c in manifest.get("candidates", [])
        ],
    }


def summary(runs: list[list[dict]]) -> str:
    lines = ["| run | model | wall | chosen | every candidate: score (spread) |", "|---:|---|---:|---|---|"]
    for i, run in enumerate(runs, 1):
        for m in run:
            cands = ", ".join(
                f"{c['variant']} {c['speed'].get('score', '–')} (±{c['speed'].get('spread_pct', '–')}%)"
                + ("" if c["passes"] else " fails gate")
                for c in m["candidates"] if c.get("speed"))
            lines.append(f"| {i} | {m['source']} | {m['wall_s']:.0f} s | **{m['chosen']}** | {cands} |")
    chosen = {m["source"]: {r[j]["chosen"] for r in runs} for j, m in enumerate(runs[0])}
    lines += ["", "Steady: " + "; ".join(f"{s}: {'yes' if len(c) == 1 else 'NO'} ({', '.join(sorted(c))})"
                                        for s, c in chosen.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    models = [(m.source, m.task) for m in Settings().models]
    meta = {"started": time.strftime("%Y-%m-%d %H:%M"), "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "cores": os.cpu_count(), "command": "python -m bench.first_loads --runs " + str(args.runs)}
    runs = []
    for i in range(args.runs):
        home = Path(tempfile.mkdtemp(prefix="fmgate-first-load-"))
        try:
            runs.append([pull(src, task, home) for src, task in models])
        finally:
            shutil.rmtree(home, ignore_errors=True)
        print(f"[first_loads] run {i + 1}: " + ", ".join(f"{m['source']} -> {m['chosen']} in {m['wall_s']} s"
                                                          for m in runs[-1]), flush=True)
    meta["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"first-loads-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    print(summary(runs))
    print(f"\nraw: {path.relative_to(RESULTS.parent.parent)}")


if __name__ == "__main__":
    main()
