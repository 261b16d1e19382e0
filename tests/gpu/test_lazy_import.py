"""A CPU box never imports the GPU engine code: not at gateway start, not when the store lists recipes."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

PROBE = """
import sys
import gateway.app, gateway.registry, gateway.cli
from model_store import recipes
recipes.load_plugins()
names = {r.name for r in recipes.for_task("chat")}
assert "torch-bf16-cuda" in names, names
bad = sorted(m for m in sys.modules if m.startswith("gateway.engines.torch_"))
assert not bad, bad
import model_store.recipes_cuda as rc
src = open(rc.__file__).read().split("def build_torch")[0]
assert "import torch" not in src  # module level stays torch-free
print("ok")
"""


def test_gpu_code_is_not_imported_at_startup():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
