"""Shared helpers for the deployment tests: repo paths, tool lookup, and Helm rendering."""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "fmgate"
DOCKERFILE = REPO / "Dockerfile"
DASHBOARD = CHART / "dashboards" / "fmgate.json"

# The oldest Kubernetes the chart claims (Chart.yaml kubeVersion) and the newest kubernetes-validate knows.
KUBE_VERSIONS = ("1.25.0", "1.37.0")
RELEASE = "demo"
NAMESPACE = "inference"


def _missing(what: str, how: str) -> None:
    """Skip on a developer box, but fail under CI: a check that cannot run there has not passed."""
    msg = f"{what} is not available ({how})"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):  # as tests/conftest.py reads it
        pytest.fail(msg)
    pytest.skip(msg)


def need_module(name: str, pip_name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        _missing(name, f"pip install {pip_name}")
        raise  # unreachable: _missing raises


def need_tool(name: str, pip_name: str) -> str:
    """A tool from the project venv first (make test runs pytest without activating it), then PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    _missing(name, f"pip install {pip_name}")
    raise AssertionError  # unreachable


def helm() -> ModuleType:
    return need_module("helm_python", "helm-python-sdk")


def render(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Render the chart with Helm's own engine (Helm v4 SDK via helm-python-sdk), offline."""
    h = helm()
    with h.Chart.load(str(CHART)) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def render_docs(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The rendered Kubernetes objects (NOTES.txt and empty templates left out)."""
    docs: list[dict[str, Any]] = []
    for path, text in sorted(render(values).items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append(doc)
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def default_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())
