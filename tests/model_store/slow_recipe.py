"""A recipe that never finishes on its own: it writes its pid, then waits to be killed (tests only)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from model_store.recipes import BuildContext, recipe


@recipe("test-slow-build", task="embed", format="onnx-encoder", params={"test": True}, default=False)
def build_slow(ctx: BuildContext) -> None:
    """Writes the child's pid to $FMGATE_TEST_PID_FILE, then sleeps."""
    print("a builder that prints to stdout")  # must not reach the parent's stdout
    Path(os.environ["FMGATE_TEST_PID_FILE"]).write_text(str(os.getpid()))
    time.sleep(600)
