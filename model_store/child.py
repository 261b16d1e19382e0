"""Build one variant in a child process, so the serving process is never changed by a builder.

Builders print a line per tensor, silence logging, monkey-patch transformers and gguf, and can use
all the memory there is. In a child (`python -m model_store.child`) they do it to themselves: what
they print goes to a log file in the build's scratch folder, the child's `fmgate` log records and progress
steps come back to the parent as JSON lines, and a crash or an OOM kill fails that one build cleanly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import StoreError, TransientError

log = logging.getLogger("fmgate.model_store")


def build_in_child(store, src, r, hw, vkey: str, ref_dir: Path | None) -> dict:
    """The build manifest of `r` for `src`, built by `store._build` in a child process.

    `python -m model_store.child`, not multiprocessing: spawn would re-run the caller's __main__."""
    src.fetch()  # a download happens here, in the parent; the child gets local files
    src = dataclasses.replace(src, _fetch=None)
    scratch = store.cache.scratch(f"build-{r.name}-")  # the child builds in here; removed whatever happens
    log_path = str(scratch / "child.log")
    args = {"home": str(store.home), "source": src, "recipe": r.name, "task": r.task, "module": r.build.__module__,
            "hardware": hw.to_dict(), "vkey": vkey, "ref_dir": str(ref_dir) if ref_dir else None,
            "scratch": str(scratch), "sys_path": [p for p in sys.path if p]}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(args["sys_path"]), "TQDM_DISABLE": "1"}
    steps: dict[str, object] = {}
    result: tuple | None = None
    with open(log_path, "ab") as child_log:
        proc = subprocess.Popen([sys.executable, "-m", "model_store.child"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=child_log, env=env)
    try:
        log.info("building %s of %s in child process %d (output: %s)", r.name, src.name, proc.pid, log_path)
        proc.stdin.write(pickle.dumps(args))
        proc.stdin.close()
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            result = _handle(msg, store, steps) or result
        proc.wait(timeout=60)
    except BaseException:
        proc.kill()  # the parent gave up (KeyboardInterrupt, ...): take the child with it
        proc.wait(timeout=10)
        raise
    finally:
        for label in list(steps):
            store._reporter.end(steps.pop(label))
        proc.stdout.close()
        tail = _tail(log_path)
        shutil.rmtree(scratch, ignore_errors=True)
    if result is None:
        code = proc.returncode
        if code is not None and code < 0:
            sig = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            why = " (out of memory?)" if -code == signal.SIGKILL else ""
            raise TransientError(f"building {r.name} for {src.name} failed: the build process was killed by "
                                 f"{sig}{why}")
        raise StoreError(f"building {r.name} for {src.name} failed: the build process exited with status {code}"
                         + (f": {tail}" if tail else ""))
    kind, payload = result
    if kind == "done":
        return payload
    cls = TransientError if payload["transient"] else StoreError
    raise cls(payload["message"])


def _handle(msg: tuple, store, steps: dict) -> tuple | None:
    kind = msg[0]
    if kind == "log":
        rec = logging.makeLogRecord(msg[1])
        lg = logging.getLogger(rec.name)
        if lg.isEnabledFor(rec.levelno):
            lg.handle(rec)
    elif kind == "step-start":
        steps[msg[1]] = store._reporter.begin(msg[1])
    elif kind == "step-end":
        if msg[1] in steps:
            store._reporter.end(steps.pop(msg[1]))
    elif kind in ("done", "error"):
        return kind, msg[1]
    return None


def _tail(path: str, n: int = 400) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip()
    except OSError:
        return ""
    return " ".join(text[-n:].split())


class _Channel:
    """JSON lines to the parent, on the stdout the child was started with."""

    def __init__(self, f):
        self.f = f

    def put(self, msg) -> None:
        self.f.write(json.dumps(msg, default=str) + "\n")
        self.f.flush()


class _QueueHandler(logging.Handler):
    def __init__(self, q):
        super().__init__()
        self.q = q

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.q.put(("log", {"name": record.name, "levelno": record.levelno, "levelname": record.levelname,
                                "msg": record.getMessage(), "created": record.created,
                                "processName": record.processName, "process": record.process}))
        except Exception:  # noqa: BLE001 - a log line is not worth failing the build
            pass


class _QueueReporter:
    def __init__(self, q):
        self.q = q

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        t0 = time.perf_counter()
        self.q.put(("step-start", what))
        log.info("%s ...", what)
        try:
            yield
        finally:
            self.q.put(("step-end", what))
            log.info("%s: %.1f s", what, time.perf_counter() - t0)


def main() -> None:
    """`python -m model_store.child`: the pickled arguments on stdin, JSON lines back on stdout."""
    args = pickle.loads(sys.stdin.buffer.read())
    sys.path[:0] = [p for p in args["sys_path"] if p not in sys.path]
    # Messages go out on a private copy of stdout; whatever the builders print goes to stderr (the log file).
    q = _Channel(os.fdopen(os.dup(1), "w"))
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    root = logging.getLogger()
    root.handlers[:] = [_QueueHandler(q)]
    root.setLevel(logging.WARNING)
    logging.getLogger("fmgate").setLevel(logging.INFO)
    name, task = args["recipe"], args["task"]
    try:
        import importlib

        from . import recipes as reg
        from .hardware import HardwareProfile
        from .store import ModelStore

        with contextlib.suppress(ImportError):
            importlib.import_module(args["module"])  # a recipe registered by a plugin or a test module
        r = reg.get(name, task)
        profile = HardwareProfile.from_dict(args["hardware"])
        store = ModelStore(args["home"], hardware=profile)
        store._reporter = _QueueReporter(q)
        ref_dir = Path(args["ref_dir"]) if args["ref_dir"] else None
        m = store._build(args["source"], r, profile, args["vkey"], ref_dir, Path(args["scratch"]))
        q.put(("done", m))
    except StoreError as exc:
        q.put(("error", {"message": str(exc), "transient": isinstance(exc, TransientError)}))
    except (OSError, MemoryError) as exc:
        q.put(("error", {"message": f"building {name} failed: {type(exc).__name__}: {exc}", "transient": True}))
    except BaseException as exc:  # noqa: BLE001 - report anything to the parent, then exit
        q.put(("error", {"message": f"building {name} failed: {type(exc).__name__}: {exc}", "transient": False}))


if __name__ == "__main__":
    main()
