"""Builds run in a child process: the serving process keeps its logging, stdout and umask, and a
killed build fails that one build cleanly without being recorded as a verdict."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import pytest

from model_store import ModelStore, StoreError

from . import slow_recipe  # noqa: F401 - registers test-slow-build
from .conftest import SMALL_EVAL


def _state() -> tuple:
    mask = os.umask(0o022)  # tests may read it this way; the store must not
    os.umask(mask)
    root = logging.getLogger()
    return (mask, sys.stdout, sys.stderr, tuple(root.handlers), logging.root.manager.disable,
            os.environ.get("TQDM_DISABLE"))


def test_build_progress_comes_back_to_the_parent_log(tiny_models, tmp_path, caplog, capfd):
    caplog.set_level(logging.INFO, logger="fmgate.model_store")
    before = _state()
    ModelStore(tmp_path / "home", eval_settings=SMALL_EVAL).load(str(tiny_models["bert"]), task="embed",
                                                                 candidates=["ort-int8-weight-only"])
    assert _state() == before
    child_lines = [r for r in caplog.records if r.process != os.getpid()]
    assert any("export fp32" in r.getMessage() for r in child_lines)  # a step logged by the builder child
    assert any("quantize int8 (weight-only" in r.getMessage() for r in child_lines)
    out, _ = capfd.readouterr()
    assert "Exporting" not in out and "TracerWarning" not in out


def test_killing_the_build_child_fails_that_build_only(tiny_models, tmp_path, monkeypatch, caplog):
    pid_file = tmp_path / "child.pid"
    monkeypatch.setenv("FMGATE_TEST_PID_FILE", str(pid_file))
    store = ModelStore(tmp_path / "home", eval_settings=SMALL_EVAL)
    src = str(tiny_models["bert"])
    before = _state()
    result: dict = {}

    def load():
        try:
            result["art"] = store.load(src, task="embed", variant="test-slow-build")
        except StoreError as exc:
            result["error"] = exc

    t = threading.Thread(target=load, daemon=True)
    t.start()
    deadline = time.monotonic() + 300
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and t.is_alive(), result
        time.sleep(0.2)
    child = int(pid_file.read_text())
    assert child != os.getpid()
    os.kill(child, signal.SIGKILL)  # what the kernel's OOM killer does
    t.join(120)
    assert not t.is_alive()
    err = result.get("error")
    assert err is not None and "killed by SIGKILL" in str(err), result
    assert _state() == before
    # Not recorded as a verdict: no manifest for it, and nothing left in tmp/ but free space.
    variants = [p.read_text() for p in (store.cache.variants).glob("*.json")]
    assert not any("test-slow-build" in v for v in variants)
    assert not [p for p in store.cache.tmp.iterdir() if p.name.startswith("build-test-slow")]
    # The same process goes on serving: the next load works.
    art = store.load(src, task="embed", variant="ort-fp32")
    assert art.variant == "ort-fp32"


@pytest.mark.parametrize("exc", [MemoryError("boom"), OSError(28, "No space left on device")])
def test_transient_failures_are_retried_not_recorded(tiny_models, tmp_path, monkeypatch, exc):
    from model_store import recipes as reg

    monkeypatch.setenv("FMGATE_BUILD_IN_PROCESS", "1")  # so the patched builder is the one that runs
    store = ModelStore(tmp_path / "home", eval_settings=SMALL_EVAL)
    src = str(tiny_models["bert"])
    r = reg.get("ort-int8-weight-only")

    def fail(ctx):
        raise exc

    monkeypatch.setitem(reg.RECIPES, r.name, reg.Recipe(r.name, r.task, r.format, fail, r.params, r.applies))
    art = store.load(src, task="embed", candidates=["ort-int8-weight-only"])
    row = next(x for x in art.manifest["candidates"] if x["variant"] == "ort-int8-weight-only")
    assert row["transient"] and "next load" in row["verdict"]
    assert not list(store.cache.selections.glob("*.json"))  # the choice was not recorded
    monkeypatch.setitem(reg.RECIPES, r.name, r)
    again = store.load(src, task="embed", candidates=["ort-int8-weight-only"])
    row = next(x for x in again.manifest["candidates"] if x["variant"] == "ort-int8-weight-only")
    assert "quality" in row and not row.get("transient")
    assert len(list(store.cache.selections.glob("*.json"))) == 1
