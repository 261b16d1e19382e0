"""The engine cores of `fmgate serve --engine-process`: started before the API, restarted when they die,
stopped after the API has drained.

The parent process (the one `fmgate serve` runs in) resolves each model once (the model store builds
or finds its artifact), starts `python -m gateway.core` for each chat model and
`python -m gateway.core.embed_core` for each embedding model on an ipc:// socket, and waits for its Welcome. The addresses go to every API process through FMGATE_ENGINE_CORES. A watcher thread (alive
as long as the cores, so PR_SET_PDEATHSIG stays tied to a living thread) restarts a core that exits
unless the server is stopping, with a backoff of 0.5 s doubling to 10 s while it keeps failing fast.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..settings import ModelConfig, Settings
from . import embed_client, sockets, wire

log = logging.getLogger("fmgate.core")


@dataclass
class Core:
    cfg: ModelConfig
    address: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    started: float = 0.0
    backoff: float = 0.5
    restarts: int = 0
    due: float = 0.0  # when a restart is due (after a crash)
    pids: list[int] = field(default_factory=list)  # every pid it ever had
    kind: str = "chat"  # chat (gateway.core) or embed (gateway.core.embed_core)


probe = functools.partial(sockets.probe, wire)


class Supervisor:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.cores: dict[str, Core] = {}
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="fmgate-cores-"))

    def start(self, ready_timeout: float = 600.0) -> dict[str, str]:
        """Start a core per chat and embedding model and wait for each; returns {model name: address} of those up."""
        from ..registry import Registry

        registry = Registry(self.settings.model_copy(update={"engine_process": False}), build=lambda cfg: None)
        for n, cfg in enumerate(m for m in self.settings.models if m.task in ("chat", "embed")):
            try:
                path, fmt, variant, _ = registry._resolve(cfg)
            except Exception as exc:
                log.error("model %s: no engine core (the model did not resolve: %s)", cfg.name, exc)
                continue
            address = f"ipc://{self._dir}/core-{n}.sock"
            module = "gateway.core" if cfg.task == "chat" else "gateway.core.embed_core"
            argv = [sys.executable, "-m", module, "--address", address, "--model-json",
                    cfg.model_dump_json(), "--path", str(path), "--fmt", fmt, "--variant", variant,
                    "--parent", str(os.getpid())]
            core = self.cores[cfg.name] = Core(cfg, address, argv, kind=cfg.task)
            self._spawn(core)
        up: dict[str, str] = {}
        for name, core in self.cores.items():
            deadline = time.monotonic() + ready_timeout
            while time.monotonic() < deadline:
                if core.proc is not None and core.proc.poll() is not None:
                    log.error("engine core for %s exited with %s while loading", name, core.proc.returncode)
                    break
                if (probe if core.kind == "chat" else embed_client.probe)(core.address, 1.0) is not None:
                    up[name] = core.address
                    break
        self._thread = threading.Thread(target=self._watch, name="core-supervisor", daemon=True)
        self._thread.start()
        return up

    def _spawn(self, core: Core) -> None:
        core.proc = subprocess.Popen(core.argv, stdin=subprocess.DEVNULL)
        core.started = time.monotonic()
        core.pids.append(core.proc.pid)
        log.info("engine core for %s started (pid %d)", core.cfg.name, core.proc.pid)

    def _watch(self) -> None:
        while not self._stopping.wait(0.1):
            with self._lock:
                if self._stopping.is_set():
                    return
                for core in self.cores.values():
                    proc = core.proc
                    if proc is None or proc.poll() is None:
                        continue
                    now = time.monotonic()
                    if core.due == 0.0:
                        # A core that ran a while before dying starts again at once; one dying young backs off.
                        core.backoff = 0.5 if now - core.started > 30 else min(core.backoff * 2, 10.0)
                        core.due = now + (0.0 if now - core.started > 30 else core.backoff)
                        log.error("engine core for %s (pid %d) exited with %s; restarting", core.cfg.name,
                                  proc.pid, proc.returncode)
                    if now >= core.due:
                        core.due = 0.0
                        core.restarts += 1
                        self._spawn(core)

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.cores.values() if c.proc is not None]

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM every core (each drains what it still runs), SIGKILL those left after `grace`, reap all."""
        with self._lock:
            self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        procs = [c.proc for c in self.cores.values() if c.proc is not None]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("engine core pid %d did not stop in %.0fs; killing it", p.pid, grace)
                p.kill()
                p.wait()
        for f in self._dir.glob("*"):
            f.unlink(missing_ok=True)
        try:
            self._dir.rmdir()
        except OSError:
            pass
