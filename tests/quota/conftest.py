"""Quota test fixtures: both backends, a unique Redis key prefix per test, a private redis-server to kill.

`async def` tests run in a fresh event loop (no pytest-asyncio needed); gatekeepers a test opens
through `qenv` are closed in that same loop afterwards. Under CI=true a missing Redis fails.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from starlette.requests import Request

from gateway.quota import Gatekeeper, KeyLimits
from gateway.settings import Settings
from tests.conftest import ROOT, free_port, need


class QuotaEnv:
    """One test's world: a data dir, the backend, a Redis prefix, and the gatekeepers it opened."""

    def __init__(self, tmp: Path, backend: str, redis_url: str | None, prefix: str):
        self.tmp = tmp
        self.backend = backend
        self.redis_url = redis_url
        self.prefix = prefix
        self.opened: list[Gatekeeper] = []

    def settings(self, home: Path | str | None = None, **kw) -> Settings:
        kw.setdefault("auth", "on")
        kw.setdefault("redis_url", self.redis_url if self.backend == "redis" else None)
        return Settings(home=Path(home) if home else self.tmp / "home", **kw)

    async def gk(self, home: Path | str | None = None, settings: Settings | None = None, **kw) -> Gatekeeper:
        gk = await Gatekeeper.create(settings or self.settings(home), prefix=self.prefix, **kw)
        self.opened.append(gk)
        return gk

    async def aclose(self) -> None:
        for gk in self.opened:
            await gk.close()


def bearer(secret: str | None, header: str = "authorization") -> Request:
    headers = [] if secret is None else [(header.encode(), f"Bearer {secret}".encode())]
    return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers})


async def new_key(gk: Gatekeeper, name: str = "test", models=None, **limits) -> tuple[str, object]:
    """Limits by name; record fields beyond limits (expires_at, owner, tags, model_limits) pass through."""
    extra = {k: limits.pop(k) for k in ("expires_at", "owner", "tags", "model_limits") if k in limits}
    return await gk.create_key(name, KeyLimits(**limits), tuple(models) if models else None, **extra)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    args = {a: pyfuncitem.funcargs[a] for a in pyfuncitem._fixtureinfo.argnames}

    async def run():
        async def watchdog():  # a hung test prints where every task waits, before pytest-timeout hits
            await asyncio.sleep(float(os.environ.get("FMGATE_TEST_WATCHDOG_S", "100")))
            for t in asyncio.all_tasks():
                t.print_stack(file=sys.stderr)
        wd = asyncio.create_task(watchdog())
        try:
            await pyfuncitem.obj(**args)
        finally:
            wd.cancel()
            wd = asyncio.create_task(watchdog())
            for v in args.values():
                if isinstance(v, QuotaEnv):
                    await v.aclose()

    asyncio.run(run())
    return True


@pytest.fixture
def prefix() -> str:
    return "fmt" + uuid.uuid4().hex[:12]


def _drop_prefix(url: str, prefix: str) -> None:
    import redis

    try:
        r = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
        keys = list(r.scan_iter(match=f"{{{prefix}*", count=1000))
        if keys:
            r.delete(*keys)
        r.close()
    except Exception:
        pass


@pytest.fixture(params=["memory", "redis"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def qenv(request, tmp_path, prefix, backend) -> QuotaEnv:
    url = request.getfixturevalue("redis_url") if backend == "redis" else None
    env = QuotaEnv(tmp_path, backend, url, prefix)
    yield env
    if url:
        _drop_prefix(url, prefix)


@pytest.fixture
def renv(request, tmp_path, prefix, redis_url) -> QuotaEnv:
    """Redis only (the shared test Redis)."""
    env = QuotaEnv(tmp_path, "redis", redis_url, prefix)
    yield env
    _drop_prefix(redis_url, prefix)


@pytest.fixture
def menv(tmp_path, prefix) -> QuotaEnv:
    """Memory only."""
    return QuotaEnv(tmp_path, "memory", None, prefix)


class RedisProc:
    """A private, diskless redis-server on a free loopback port, to kill and restart mid-test."""

    def __init__(self, workdir: Path):
        self.binary = shutil.which("redis-server")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisProc:
        assert self.binary
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import redis

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis(port=self.port, socket_connect_timeout=0.2).ping()
                return self
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def _wait(check, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready in {timeout:.0f}s: {last!r}")


def _spawn(args: list[str], workdir: Path, started: list[subprocess.Popen]) -> None:
    started.append(subprocess.Popen(args, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))


def _server_args(port: int, workdir: Path, *extra: str) -> list[str]:
    return [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(workdir), *extra]


@pytest.fixture(scope="session")
def sentinel_url(tmp_path_factory) -> str:
    """A real Sentinel watching a real master: redis+sentinel://127.0.0.1:<port>/fmtest."""
    need(shutil.which("redis-server") is not None, "redis-server is not installed")
    import redis

    workdir = tmp_path_factory.mktemp("sentinel")
    started: list[subprocess.Popen] = []
    try:
        master, sport = free_port(), free_port()
        _spawn(_server_args(master, workdir), workdir, started)
        _wait(lambda: redis.Redis(port=master, socket_timeout=1).ping(), "sentinel's master")
        conf = workdir / "sentinel.conf"
        conf.write_text(f"port {sport}\nbind 127.0.0.1\ndir {workdir}\n"
                        f"sentinel monitor fmtest 127.0.0.1 {master} 1\n")
        _spawn([shutil.which("redis-server") or "redis-server", str(conf), "--sentinel"], workdir, started)
        _wait(lambda: redis.Redis(port=sport, socket_timeout=1).execute_command(
            "SENTINEL", "get-master-addr-by-name", "fmtest"), "sentinel")
        yield f"redis+sentinel://127.0.0.1:{sport}/fmtest"
    finally:
        for p in started:
            p.kill()
            p.wait(10)


@pytest.fixture(scope="session")
def cluster_url(tmp_path_factory) -> str:
    """A real 3-master Redis Cluster: redis+cluster://127.0.0.1:<port>."""
    need(shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None,
         "redis-server / redis-cli are not installed")
    import redis

    workdir = tmp_path_factory.mktemp("cluster")
    started: list[subprocess.Popen] = []
    try:
        ports = [free_port() for _ in range(3)]
        for p in ports:
            _spawn(_server_args(p, workdir, "--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                                "--cluster-config-file", f"nodes-{p}.conf", "--cluster-node-timeout", "5000"),
                   workdir, started)
        for p in ports:
            _wait(lambda p=p: redis.Redis(port=p, socket_timeout=1).ping(), f"cluster node {p}")
        subprocess.run([shutil.which("redis-cli"), "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=120)

        def ok() -> bool:
            for p in ports:
                info = redis.Redis(port=p, socket_timeout=1, decode_responses=True).cluster("INFO")
                if info.get("cluster_state") != "ok":
                    return False
            return True

        _wait(ok, "cluster", timeout=120)
        yield f"redis+cluster://127.0.0.1:{ports[0]}"
    finally:
        for p in started:
            p.kill()
            p.wait(10)


@pytest.fixture
def redis_proc(tmp_path) -> RedisProc:
    need(shutil.which("redis-server") is not None, "redis-server is not installed")
    rp = RedisProc(tmp_path)
    rp.start()
    yield rp
    rp.kill()


class Worker:
    """A separate gateway process (tests/quota/_worker.py) sharing Redis with the test."""

    def __init__(self, cfg: dict):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.quota._worker", json.dumps(cfg)], cwd=ROOT, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def wait_ready(self, timeout: float = 60) -> Worker:
        line = self._line(timeout)
        if line.strip() != "ready":
            raise RuntimeError(f"worker did not start: {line!r} {self.stderr()}")
        return self

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self, timeout: float = 60) -> dict:
        line = self._line(timeout)
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            raise RuntimeError(f"worker said {line!r}: {self.stderr()}") from None

    def _line(self, timeout: float) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise TimeoutError(f"worker silent for {timeout}s: {self.stderr()}") from None

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(running)"
        return (self.proc.stderr.read() if self.proc.stderr else "")[-3000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def workers():
    started: list[Worker] = []

    def start(cfg: dict) -> Worker:
        w = Worker(cfg)
        started.append(w)
        return w

    yield start
    for w in started:
        w.kill()
