"""Cache maintenance is safe: prune and rm wait for loads and builds in progress, and `--losers`
keeps what was asked for by name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from model_store import ModelStore
from model_store.cli import models_app

from .conftest import ROOT, SMALL_EVAL, finish, run_load

PRUNE_LOOP = """
import pathlib, subprocess, sys, time
home, stop = sys.argv[1], pathlib.Path(sys.argv[2])
runs = busy = 0
while not stop.exists():
    p = subprocess.run([sys.executable, "-m", "model_store.cli", "models", "prune", "--losers", "--wait", "1",
                        "--home", home], capture_output=True, text=True)
    if p.returncode == 0:
        runs += 1
    elif "busy" in p.stderr + p.stdout:
        busy += 1
    else:
        print("prune failed:", p.returncode, p.stdout, p.stderr, flush=True)
        sys.exit(3)
    time.sleep(0.2)
print("runs", runs, "busy", busy, flush=True)
"""


def test_prune_in_a_loop_never_breaks_a_first_load(tmp_path, tiny_models):
    home = tmp_path / "home"
    stop = tmp_path / "stop"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    pruner = subprocess.Popen([sys.executable, "-c", PRUNE_LOOP, str(home), str(stop)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    try:
        first, log = run_load(home, str(tiny_models["llama"]), "chat", small=True)
        assert "error" not in first, first
        second, log2 = run_load(home, str(tiny_models["llama"]), "chat", small=True)
        assert second["path"] == first["path"] and "building variant" not in log2
        stop.write_text("")
        out, _ = pruner.communicate(timeout=120)
    finally:
        stop.write_text("")
        if pruner.poll() is None:
            pruner.kill()
            pruner.wait(30)
    assert pruner.returncode == 0, out
    runs, busy = (int(x) for x in out.split()[-3::2])
    assert runs + busy >= 1, out
    # What the loads built is whole: every file matches its digest.
    res = CliRunner().invoke(models_app, ["verify", "--home", str(home)])
    assert res.exit_code == 0, res.output


def test_prune_waits_for_a_load_in_progress(tmp_path, tiny_models):
    """While one process is loading, prune says the cache is busy instead of deleting its work."""
    home = tmp_path / "home"
    proc = run_load(home, str(tiny_models["bert"]), "embed", small=True, wait=False)
    try:
        store = ModelStore(home, eval_settings=SMALL_EVAL)
        lock = home / "models" / "locks" / "maintenance.lock"
        saw_busy = False
        while proc.poll() is None and not saw_busy:
            if lock.exists():
                res = CliRunner().invoke(models_app, ["prune", "--wait", "0.2", "--home", str(home)])
                saw_busy = res.exit_code == 1 and "busy" in res.output
        result, _ = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert "error" not in result, result
    assert store.load(str(tiny_models["bert"]), task="embed").path == Path(result["path"])


def test_prune_losers_keeps_pinned_variants(tmp_path, tiny_models):
    home = tmp_path / "home"
    store = ModelStore(home, eval_settings=SMALL_EVAL)
    src = str(tiny_models["bert"])
    auto = store.load(src, task="embed")
    pinned_name = next(r["variant"] for r in auto.manifest["candidates"]
                       if r["variant"] not in (auto.variant, "ort-fp32"))
    pinned = store.load(src, task="embed", variant=pinned_name)
    res = CliRunner().invoke(models_app, ["prune", "--losers", "--home", str(home)])
    assert res.exit_code == 0, res.output
    left = {p.stem for p in (home / "models" / "variants").glob("*.json")}
    assert auto.manifest["key"] in left and pinned.manifest["key"] in left
    assert len(left) < len(auto.manifest["candidates"])  # the other losers went
    assert store.load(src, task="embed", variant=pinned_name).path == pinned.path
