"""How to start each server under test, with the settings that are best for it on this box.

Each spec builds a command line for a free loopback port. Settings are chosen per peer (threads,
slots, batch size) and the `settings` and `why` strings go into BENCHMARKS.md verbatim, so a reader
sees what every peer was given.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench import peers

REPO = peers.BENCH.parent
CHAT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-minilm-l6-v2"
THREADS = int(os.environ.get("BENCH_THREADS", str(os.cpu_count() or 2)))

# llama-server: the issue asks for -np 8. 512 tokens of context per slot is far more than a
# prompt (~40 tokens with the template) plus 64 new tokens needs.
LLAMA_SERVER_SLOTS = 8
LLAMA_SERVER_CTX_PER_SLOT = 2048  # the long-prompt scenario needs about 1,450 tokens in a slot
LLAMA_SERVER_THREADS = int(os.environ.get("BENCH_LLAMA_SERVER_THREADS", str(THREADS)))
# Infinity: largest batch per forward pass (its default is 32). `python -m bench.tune infinity` on
# the 2-core box: 8-128 all within noise at 32 clients x 1 sentence; at 32 x 16, 64 and 128 gained
# 6-11% (inside the noise) while peak RSS grew from 1.6 GB to 2.8 and 5.1 GB. 32 kept.
INFINITY_BATCH = int(os.environ.get("BENCH_INFINITY_BATCH", "32"))
# llama-cpp-python: generation threads. It decodes one sequence at a time, where one thread beats
# two on this box (bench.tune: 62 vs 42 tok/s at 1 and 4 clients); prompt processing keeps all cores.
LLAMA_CPP_PYTHON_THREADS = int(os.environ.get("BENCH_LCP_THREADS", "1"))


@dataclass
class Launch:
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None


@dataclass
class ServerSpec:
    name: str
    label: str
    kinds: tuple[str, ...]
    settings: str
    why: str
    needs: tuple[str, ...]
    launch: Callable[[int], Launch]
    ready_path: str = "/health"
    ready_timeout: float = 300.0
    chat_model: str = CHAT_MODEL
    embed_model: str = EMBED_MODEL
    version: Callable[[], str] = lambda: ""


def _venv_bin(venv: str, exe: str) -> str:
    return str(peers.PEERS / f"venv-{venv}" / "bin" / exe)


def _pkg_version(venv: str, dist: str) -> Callable[[], str]:
    def get() -> str:
        py = peers.venv_python(venv)
        code = f"import importlib.metadata as m; print(m.version({dist!r}))"
        try:
            out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return ""
        return f"{dist} {out.stdout.strip()}" if out.returncode == 0 else ""
    return get


def _fmgate_bin() -> str:
    here = Path(sys.executable).parent / "fmgate"
    return str(here if here.exists() else REPO / ".venv" / "bin" / "fmgate")


def _fmgate(port: int) -> Launch:
    home = peers.PEERS / "fmgate-home"
    home.mkdir(parents=True, exist_ok=True)
    env = {"FMGATE_HOST": "127.0.0.1", "FMGATE_PORT": str(port), "FMGATE_HOME": str(home),
           "FMGATE_THREADS": str(THREADS),
           # The peers take no API keys either; a key check would be a handicap of fmgate's own.
           "FMGATE_AUTH": "off"}
    return Launch([_fmgate_bin(), "serve"], env)


def _fmgate_engine_process(port: int) -> Launch:
    launch = _fmgate(port)
    launch.env["FMGATE_ENGINE_PROCESS"] = "true"
    return launch


def _fmgate_version() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return f"fmgate @ {out}" if out else "fmgate"


def _llama_server(port: int) -> Launch:
    m = peers.model_paths()
    return Launch([
        str(peers.llama_server_path()), "-m", str(m["gguf"]), "--host", "127.0.0.1", "--port", str(port),
        "-np", str(LLAMA_SERVER_SLOTS), "-c", str(LLAMA_SERVER_SLOTS * LLAMA_SERVER_CTX_PER_SLOT),
        "-t", str(LLAMA_SERVER_THREADS), "-tb", str(THREADS), "--cont-batching", "-a", CHAT_MODEL,
    ])


def _llama_server_version() -> str:
    sdist = sorted((peers.PEERS / "src").glob("llama_cpp_python-*.tar.gz"))
    return f"llama.cpp from {sdist[0].name[:-7]} sdist" if sdist else "llama.cpp"


def _llama_cpp_python(port: int) -> Launch:
    m = peers.model_paths()
    return Launch([
        _venv_bin("llamacpp", "python"), "-m", "llama_cpp.server", "--model", str(m["gguf"]),
        "--model_alias", CHAT_MODEL, "--host", "127.0.0.1", "--port", str(port),
        "--n_threads", str(LLAMA_CPP_PYTHON_THREADS), "--n_threads_batch", str(THREADS), "--n_ctx", "2048",
        # Its default (true) ends the stream being generated as soon as another request waits, so
        # with more than one client most answers would be cut short.
        "--interrupt_requests", "false",
    ])


def _infinity(port: int) -> Launch:
    # Model id "." from inside the folder: Infinity 0.0.78 lists a local folder's ONNX files with the
    # folder prefixed, which optimum 2.x then rejects as a file name; relative to "." they match.
    return Launch([
        _venv_bin("infinity", "infinity_emb"), "v2", "--model-id", ".",
        "--served-model-name", EMBED_MODEL, "--engine", "optimum", "--pooling-method", "mean",
        "--batch-size", str(INFINITY_BATCH), "--device", "cpu", "--url-prefix", "/v1", "--log-level", "warning",
        "--host", "127.0.0.1", "--port", str(port),
    ], {"INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
        "INFINITY_HOME": str(peers.infinity_home()), "HF_HOME": str(peers.infinity_home())},
        cwd=peers.infinity_model_dir())


def _naive_chat(port: int) -> Launch:
    m = peers.model_paths()
    return Launch([_venv_bin("naive", "python"), str(peers.BENCH / "naive_chat.py"), "--gguf", str(m["gguf"]),
                   "--port", str(port), "--threads", str(THREADS)], {"HF_HUB_OFFLINE": "1"})


def _naive_embed(port: int) -> Launch:
    m = peers.model_paths()
    return Launch([_venv_bin("naive", "python"), str(peers.BENCH / "naive_embed.py"), "--model-dir",
                   str(m["minilm"]), "--port", str(port), "--threads", str(THREADS)], {"HF_HUB_OFFLINE": "1"})


SPECS: dict[str, ServerSpec] = {s.name: s for s in [
    ServerSpec(
        "fmgate", "fmgate", ("chat", "embed"),
        f"FMGATE_THREADS={THREADS}, defaults otherwise",
        "the gateway under test, with the variant it picks for this CPU",
        (), _fmgate, ready_path="/readyz", ready_timeout=1800.0, version=_fmgate_version),
    ServerSpec(
        "fmgate-engine-process", "fmgate --engine-process", ("chat", "embed"),
        f"FMGATE_THREADS={THREADS}, FMGATE_ENGINE_PROCESS=true (a core process per model), defaults otherwise",
        "the same fmgate with each model's engine in its own process (issue 17): is it faster on this box?",
        (), _fmgate_engine_process, ready_path="/readyz", ready_timeout=1800.0, version=_fmgate_version),
    ServerSpec(
        "llama-server", "llama-server -np 8", ("chat",),
        f"-np {LLAMA_SERVER_SLOTS} -c {LLAMA_SERVER_SLOTS * LLAMA_SERVER_CTX_PER_SLOT} -t {LLAMA_SERVER_THREADS} "
        f"-tb {THREADS} --cont-batching, -march=native build, Q4_1 GGUF",
        "8 slots batch concurrent decodes; -t 2 beat -t 1 at 1 client (bench.tune), within noise at 8",
        ("models", "llama-server"), _llama_server, version=_llama_server_version),
    ServerSpec(
        "llama-cpp-python", "llama-cpp-python server", ("chat",),
        f"n_threads={LLAMA_CPP_PYTHON_THREADS} n_threads_batch={THREADS} n_ctx=2048 interrupt_requests=false, "
        "-march=native build, Q4_1",
        "serves one request at a time; one decode thread beats two here; the default interrupt_requests=true "
        "cuts a stream short whenever another request waits",
        ("models", "llamacpp"), _llama_cpp_python, ready_path="/v1/models",
        version=_pkg_version("llamacpp", "llama-cpp-python")),
    ServerSpec(
        "infinity", "Infinity (optimum)", ("embed",),
        f"--engine optimum --pooling-method mean --batch-size {INFINITY_BATCH}, fp32 ONNX",
        "mean pooling is MiniLM's (auto picks CLS); batch 8-128 swept, 32 (its default) as good as any within "
        "noise and far leaner than 64-128",
        ("models", "infinity", "infinity-model"), _infinity, version=_pkg_version("infinity", "infinity-emb")),
    ServerSpec(
        "naive-chat", "naive FastAPI + transformers", ("chat",),
        f"torch fp32 from the GGUF, {THREADS} threads, one request at a time",
        "the baseline a user would write",
        ("models", "naive"), _naive_chat, ready_timeout=600.0, version=_pkg_version("naive", "transformers")),
    ServerSpec(
        "naive-embed", "naive FastAPI + sentence-transformers", ("embed",),
        f"torch fp32, {THREADS} threads, encode batch 32, one request at a time",
        "the baseline a user would write",
        ("models", "naive"), _naive_embed, version=_pkg_version("naive", "sentence-transformers")),
]}

ALIASES = {
    "all": list(SPECS),
    "peers": [n for n in SPECS if not n.startswith("fmgate")],
    "naive": ["naive-chat", "naive-embed"],
    "chat": [n for n, s in SPECS.items() if "chat" in s.kinds],
    "embed": [n for n, s in SPECS.items() if "embed" in s.kinds],
}


def expand(names: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        for m in ALIASES.get(n, [n]):
            if m not in SPECS:
                raise SystemExit(f"unknown server {m!r}; choose from {', '.join([*SPECS, *ALIASES])}")
            if m not in out:
                out.append(m)
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_bytes(pid: int) -> int:
    """RSS of a process and all its descendants (psutil, else /proc)."""
    try:
        import psutil
    except ImportError:
        return _proc_tree_rss(pid)
    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


def _proc_tree_rss(pid: int) -> int:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    total, stack, page = 0, [pid], os.sysconf("SC_PAGE_SIZE")
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/statm") as fh:
                total += int(fh.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            pass
        stack.extend(children.get(p, []))
    return total


class RssSampler:
    """Samples the server tree's RSS in a thread: overall peak, peak since ready, resettable window peak."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval = pid, interval
        self.peak = 0
        self.window_peak = 0
        self.serving_peak = 0
        self.serving = False
        self.last = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> int:
        rss = tree_rss_bytes(self.pid)
        self.last = rss
        self.peak = max(self.peak, rss)
        self.window_peak = max(self.window_peak, rss)
        if self.serving:
            self.serving_peak = max(self.serving_peak, rss)
        return rss

    def mark_serving(self) -> None:
        """From now on also track the peak while serving (a first start may build models)."""
        self.serving = True
        self.serving_peak = self.sample()

    def reset_window(self) -> None:
        self.window_peak = self.last

    def start(self) -> RssSampler:
        self._t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._t.join(timeout=5)


class RunningServer:
    """A server process in its own process group, started on a free loopback port."""

    def __init__(self, spec: ServerSpec, log_path: Path) -> None:
        self.spec = spec
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        launch = spec.launch(self.port)
        self.cmd = launch.cmd
        env = {**os.environ, **launch.env}
        env.pop("VIRTUAL_ENV", None)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("wb")
        self.t_start = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     cwd=str(launch.cwd or REPO))
        self.rss = RssSampler(self.proc.pid).start()
        self.startup_s: float | None = None

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.spec.ready_timeout
        url = self.base_url + self.spec.ready_path
        with httpx.Client(trust_env=False, timeout=5.0) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.spec.name} exited with {self.proc.returncode} before ready; "
                                       f"log tail:\n{self.log_tail()}")
                try:
                    if c.get(url).status_code == 200:
                        self.startup_s = round(time.monotonic() - self.t_start, 2)
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        raise RuntimeError(f"{self.spec.name} not ready after {self.spec.ready_timeout:.0f} s; "
                           f"log tail:\n{self.log_tail()}")

    def log_tail(self, n: int = 2500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        self.rss.stop()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        self._log.close()
