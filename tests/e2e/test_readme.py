"""Every example in README.md runs against a real server, and its output is sensible.

Python blocks run as scripts; curl blocks run with the real curl; YAML blocks load as fmgate settings.
The README's address (127.0.0.1:8000) is pointed at the test server's port.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, need

pytestmark = pytest.mark.e2e

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)
ADMIN = "readme-admin-key"


def _blocks(lang: str) -> list[str]:
    return [body for kind, body in BLOCKS if kind == lang]


def _curl_blocks() -> list[str]:
    return [b for b in _blocks("sh") if b.lstrip().startswith("curl ")]


@pytest.fixture(scope="module")
def readme_server(start_server):
    return start_server(env={"FMGATE_AUTH": "off", "FMGATE_ADMIN_KEY": ADMIN})


def _point(text: str, server) -> str:
    return text.replace("http://127.0.0.1:8000", server.base_url)


def test_readme_has_examples():
    assert len(_blocks("python")) >= 2 and _curl_blocks() and _blocks("yaml")


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_example(index, readme_server, tmp_path):
    code = _point(_blocks("python")[index], readme_server)
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {**os.environ, "FMGATE_HOME": str(readme_server.home), "FMGATE_ADMIN_KEY": ADMIN,
           "FMGATE_BASE_URL": readme_server.base_url, "FMGATE_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # Each block says in a trailing comment what it prints; the output must contain it.
    for expected in re.findall(r"print\(.*\)\s+# (.+)", code):
        assert expected.strip() in out.stdout, (expected, out.stdout)
    if "capital of France" in code:
        assert "Paris" in out.stdout
    assert out.stdout.strip(), "an example prints something"


@pytest.mark.parametrize("index", range(len(_curl_blocks())))
def test_curl_example(index, readme_server):
    need(shutil.which("curl") is not None, "curl is not installed")
    cmd = _point(_curl_blocks()[index], readme_server).replace("\\\n", " ")
    out = subprocess.run(shlex.split(cmd), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    body = out.stdout
    if '"stream": true' in cmd:
        chunks = [line for line in body.splitlines() if line.startswith("data: ")]
        assert chunks[-1] == "data: [DONE]"
        assert len(chunks) > 3, body
    else:
        assert '"error"' not in body, body


def test_yaml_examples_are_valid_settings(tmp_path):
    from gateway.settings import Settings

    for i, text in enumerate(_blocks("yaml")):
        path: Path = tmp_path / f"example{i}.yaml"
        path.write_text(text)
        settings = Settings(config=path)
        assert settings.models, text
