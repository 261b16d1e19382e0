"""Schemathesis against fmgate's own OpenAPI schema: no server errors, no responses off the schema."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import need

pytestmark = pytest.mark.slow

# Short generations keep each fuzzed call cheap; the limits under test are the same code paths.
FUZZ_ENV = {"FMGATE_LIMITS__MAX_TOKENS_CAP": "8", "FMGATE_LIMITS__MAX_N": "2"}


def run_schemathesis(base_url: str, headers: dict[str, str], max_examples: int = 25) -> subprocess.CompletedProcess:
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    need(exe is not None, "schemathesis is not installed (make install)")
    # One worker: with two, hypothesis describes strategies from two threads at once and CPython 3.11's
    # parser fails ("AST constructor recursion depth mismatch"), a runtime error in the fuzzer itself.
    cmd = [exe, "run", base_url + "/openapi.json", "--url", base_url,
           "--checks", "not_a_server_error,response_schema_conformance,status_code_conformance",
           "--max-examples", str(max_examples), "--workers", "1", "--request-timeout", "30",
           "--suppress-health-check", "all", "--seed", "1234", "--no-color"]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "SCHEMATHESIS_HOOKS": ""})


def test_fuzz_with_auth_off(start_server):
    srv = start_server(env={"FMGATE_AUTH": "off", **FUZZ_ENV})
    out = run_schemathesis(srv.base_url, {})
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert " 500 " not in srv.logs and "Traceback" not in srv.logs


def test_fuzz_with_auth_on(start_server):
    srv = start_server(env={"FMGATE_AUTH": "on", "FMGATE_ADMIN_KEY": "fm-admin-fuzz-secret", **FUZZ_ENV})
    created = subprocess.run([sys.executable, "-m", "gateway.cli", "keys", "create", "--name", "fuzz"],
                             capture_output=True, text=True, env={**os.environ, "FMGATE_HOME": str(srv.home)},
                             timeout=60)
    assert created.returncode == 0, created.stderr
    secret = next(w for w in created.stdout.split() if w.startswith("fm-"))
    out = run_schemathesis(srv.base_url, {"Authorization": f"Bearer {secret}"})
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert secret not in srv.logs
