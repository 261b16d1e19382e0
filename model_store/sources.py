"""Where a model comes from: a local HF folder, a .gguf file, a Hugging Face id, or a PyPI wheel.

Every source resolves to a `Source` with a digest (the file hashes, or the hub commit), which is
what the cache keys on; the files themselves are only needed when something has to be built.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .digest import HashCache, sha256_json
from .errors import StoreError

log = logging.getLogger("fmgate.model_store")

GGUF_MAGIC = b"GGUF"
HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
SKIP_DIRS = {".git", "__pycache__", ".cache", ".huggingface"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Formats the store never reads; not worth downloading from the hub.
HF_IGNORE = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.onnx_data", "onnx/*", "openvino/*", "coreml/*",
             "*.tflite", "rust_model*", "*.mlmodel", "*.gguf"]


@dataclass
class Source:
    ref: str  # as the user wrote it
    kind: str  # folder | gguf | hf | wheel
    name: str  # short name for listings
    digest: str
    model_format: str  # "hf" (a transformers folder) or "gguf" (one file)
    path: Path | None = None  # local files, when present
    meta: dict = field(default_factory=dict)
    _fetch: Callable[[], Path] | None = None

    def fetch(self) -> Path:
        """The local files (folder or .gguf), downloading them if needed."""
        if self.path is None:
            if self._fetch is None:
                raise StoreError(f"{self.ref}: the model files are not available locally")
            self.path = self._fetch()
        return self.path

    def describe(self) -> dict:
        return {"ref": self.ref, "kind": self.kind, "name": self.name, "digest": self.digest,
                "model_format": self.model_format, **self.meta}


def resolve(ref: str, *, hashes: HashCache, wheel_dir: Path,
            recorded: Callable[[str], dict | None] = lambda ref: None) -> Source:
    """Turn a user's model reference into a Source, or raise StoreError saying what is wrong."""
    ref = ref.strip()
    if not ref:
        raise StoreError("empty model source")
    if ref.startswith("wheel:"):
        return _wheel(ref, hashes, wheel_dir)
    p = Path(ref).expanduser()
    if p.exists():
        return _local(ref, p, hashes)
    if ref.startswith(("/", "./", "../", "~")) or ref.endswith(".gguf") or os.sep + os.sep in ref:
        raise StoreError(f"model source {ref!r}: no such file or directory")
    if HF_ID.match(ref):
        return _hub(ref, recorded)
    raise StoreError(f"model source {ref!r} is not an existing path, a Hugging Face id (org/name[@rev]), "
                     "or wheel:<dist>[==version]")


def _local(ref: str, p: Path, hashes: HashCache, kind: str | None = None, name: str | None = None) -> Source:
    p = p.resolve()
    if p.is_file():
        check_gguf_header(p)
        return Source(ref, kind or "gguf", name or p.stem, "sha256:" + hashes.digest(p), "gguf", p)
    if not p.is_dir():
        raise StoreError(f"model source {ref!r} is neither a file nor a folder")
    if not (p / "config.json").is_file():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return _local(ref, ggufs[0], hashes, kind, name)
        raise StoreError(f"model folder {ref!r} has no config.json (not a Hugging Face model folder)")
    check_architecture(p, ref)
    return Source(ref, kind or "folder", name or p.name, folder_digest(p, hashes), "hf", p)


def _transformers_knows(model_type: str) -> bool:
    """Whether transformers has built-in modelling code for `model_type`, cheaply: its models/<type>
    folder, and only when that is absent the config registry (importing it costs seconds)."""
    import importlib.util

    spec = importlib.util.find_spec("transformers")
    if spec and spec.origin and (Path(spec.origin).parent / "models" / model_type.replace("-", "_")).is_dir():
        return True
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:
        return False
    return model_type in CONFIG_MAPPING_NAMES


def check_architecture(folder: Path, ref: str) -> None:
    """Refuse at load time, naming it, a model whose modelling code ships with the model
    (`trust_remote_code`, e.g. NomicBERT): the store never runs code from a model repository."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return  # the builder reports an unreadable config with its own message
    if not isinstance(cfg, dict) or "auto_map" not in cfg:
        return
    model_type = str(cfg.get("model_type") or "")
    if model_type and _transformers_knows(model_type):
        return  # transformers has the architecture built in; the bundled code is not needed
    arch = (cfg.get("architectures") or [model_type or "unknown"])[0]
    hint = (" NomicBERT (nomic-embed-text: rotary positions, SwiGLU) has no built-in transformers "
            "implementation yet; use a BERT, XLM-RoBERTa or ModernBERT encoder (BGE, E5, GTE) instead."
            if model_type == "nomic_bert" or arch.startswith("NomicBert") else "")
    raise StoreError(f"model {ref!r}: architecture {arch} (model_type {model_type!r}) needs the modelling code "
                     f"shipped with the model (trust_remote_code), which fmgate does not run.{hint}")


POOLING_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                 "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
                 "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


def sentence_transformers_pooling(folder: Path) -> tuple[str | None, bool | None]:
    """(pooling, normalize) from the sentence-transformers files: modules.json names the Pooling
    module's folder (usually 1_Pooling) and whether a Normalize module follows. None where a file is
    absent. A pooling the encoder runner does not do (max, last token, several at once) is refused."""
    modules: list = []
    if (folder / "modules.json").is_file():
        modules = json.loads((folder / "modules.json").read_text())
    pool_dir = next((m.get("path") for m in modules if str(m.get("type", "")).endswith("Pooling")), None)
    cfg_path = folder / (pool_dir or "1_Pooling") / "config.json"
    pooling = None
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        modes = [v for k, v in POOLING_MODES.items() if cfg.get(k)]
        if cfg.get("pooling_mode") and not modes:  # the newer single-key form
            modes = [{"cls_token": "cls", "mean_tokens": "mean"}.get(cfg["pooling_mode"], cfg["pooling_mode"])]
        if len(modes) != 1 or modes[0] not in ("cls", "mean"):
            raise StoreError(f"{folder.name}: sentence-transformers pooling {' + '.join(modes) or 'none'} is not "
                             "supported (fmgate pools by the CLS token or the mean of the tokens)")
        pooling = modes[0]
    normalize = any("Normalize" in str(m.get("type", "")) for m in modules) if modules else None
    return pooling, normalize


def check_gguf_header(p: Path) -> None:
    if p.suffix != ".gguf":
        raise StoreError(f"model file {p.name!r}: only .gguf files are supported as single-file models")
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise StoreError(f"cannot read {p}: {exc.strerror}") from None
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise StoreError(f"{p.name}: not a valid GGUF file (bad header); the file is corrupt or not GGUF")


def folder_digest(p: Path, hashes: HashCache) -> str:
    entries = []
    for f in sorted(p.rglob("*")):
        rel = f.relative_to(p)
        if any(part in SKIP_DIRS for part in rel.parts) or not f.is_file():
            continue
        entries.append([rel.as_posix(), f.stat().st_size, hashes.digest(f)])
    if not entries:
        raise StoreError(f"model folder {p} is empty")
    return "sha256:" + sha256_json(entries)


# --- Hugging Face hub -------------------------------------------------------------------------

def _hub(ref: str, recorded: Callable[[str], dict | None]) -> Source:
    repo, _, rev = ref.partition("@")
    rev = rev or None
    try:
        path = _snapshot(repo, rev)
    except StoreError:
        known = recorded(ref)
        if known:  # the hub is unreachable, but this store has served this ref before
            log.info("%s: hub unreachable and not in the HF cache; using the store's record", ref)
            src = Source(ref, "hf", known.get("name", repo.split("/")[-1]), known["digest"],
                         known.get("model_format", "hf"), None, {"repo": repo, "revision": rev})
            src._fetch = lambda: _snapshot(repo, rev)
            return src
        raise
    commit = path.name
    if (path / "config.json").is_file():
        check_architecture(path, ref)
    return Source(ref, "hf", repo.split("/")[-1], f"hf:{repo}@{commit}", "hf", path,
                  {"repo": repo, "revision": rev, "commit": commit})


def _snapshot(repo: str, rev: str | None) -> Path:
    """snapshot_download honouring HF_HUB_OFFLINE; an unreachable hub falls back to the HF cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    attempts = [True] if offline else [False, True]
    for local_only in attempts:
        try:
            return Path(snapshot_download(repo, revision=rev, ignore_patterns=HF_IGNORE,
                                          local_files_only=local_only))
        except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as exc:
            raise StoreError(f"{repo}: {type(exc).__name__.replace('Error', '')} on the Hugging Face hub "
                             f"(check the id, the revision and HF_TOKEN)") from None
        except LocalEntryNotFoundError:
            continue
        except Exception as exc:  # noqa: BLE001 - network errors come in many types
            log.info("%s: hub unreachable (%s); trying the local HF cache", repo, type(exc).__name__)
    where = "offline (HF_HUB_OFFLINE)" if offline else "the hub is unreachable"
    raise StoreError(f"{repo}{'@' + rev if rev else ''}: not in the Hugging Face cache and {where}") from None


# --- wheels -----------------------------------------------------------------------------------

def _wheel(ref: str, hashes: HashCache, wheel_dir: Path) -> Source:
    spec, _, sub = ref[len("wheel:"):].partition("#")
    dist, _, version = spec.partition("==")
    dist, version = dist.strip(), version.strip() or None
    if not re.match(r"^[A-Za-z0-9][\w.-]*$", dist):
        raise StoreError(f"{ref!r}: expected wheel:<distribution>[==version]")
    root, files, version = _installed(dist, version) or _downloaded(dist, version, wheel_dir)
    target = _model_in(files, root, sub, ref)
    src = _local(ref, target, hashes, kind="wheel", name=dist)
    src.meta.update({"dist": dist, "version": version, "path_in_wheel": str(target.relative_to(root))})
    return src


def _installed(dist: str, version: str | None):
    from importlib import metadata

    try:
        d = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return None
    if version and d.version != version:
        return None
    files = [Path(str(f)) for f in (d.files or []) if not str(f).startswith("..")]
    return Path(d.locate_file("")).resolve(), files, d.version


def _downloaded(dist: str, version: str | None, wheel_dir: Path):
    """`pip download --no-deps` into the store, then unpack; reused on later loads."""
    norm = re.sub(r"[-_.]+", "_", dist).lower()
    if version:
        target = wheel_dir / f"{norm}-{version}"
        if (target / ".complete").exists():
            return target, _walk(target), version
    wheel_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheel_dir, prefix=".dl-") as tmp:
        req = f"{dist}=={version}" if version else dist
        log.info("downloading %s with pip (--no-deps)", req)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, req]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.SubprocessError) as exc:
            raise StoreError(f"wheel:{req}: pip download failed: {exc}") from None
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["unknown error"]
            raise StoreError(f"wheel:{req}: not installed and pip download failed: {tail[0]}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise StoreError(f"wheel:{req}: pip downloaded no wheel")
        got = wheels[0].name.split("-")[1]
        target = wheel_dir / f"{norm}-{got}"
        if not (target / ".complete").exists():
            unpack = Path(tmp) / "unpacked"
            try:
                with zipfile.ZipFile(wheels[0]) as z:
                    z.extractall(unpack)
            except zipfile.BadZipFile:
                raise StoreError(f"wheel:{req}: the downloaded wheel is corrupt") from None
            (unpack / ".complete").write_text(wheels[0].name)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(unpack, target)
    return target, _walk(target), got


def _walk(root: Path) -> list[Path]:
    return [f.relative_to(root) for f in root.rglob("*") if f.is_file()]


def _model_in(files: list[Path], root: Path, sub: str, ref: str) -> Path:
    if sub:
        p = (root / sub).resolve()
        if not p.exists():
            raise StoreError(f"{ref}: no {sub!r} inside the wheel")
        return p
    ggufs = sorted(f for f in files if f.suffix == ".gguf")
    if len(ggufs) == 1:
        return root / ggufs[0]
    if len(ggufs) > 1:
        raise StoreError(f"{ref}: the wheel holds several GGUF files; pick one with #<path>: "
                         + ", ".join(map(str, ggufs)))
    configs = sorted((f.parent for f in files if f.name == "config.json"
                      and any(g.parent == f.parent and g.suffix in WEIGHT_SUFFIXES for g in files)),
                     key=lambda d: len(d.parts))
    if configs:
        return root / configs[0]
    raise StoreError(f"{ref}: the wheel holds no model (no .gguf file, no folder with config.json and weights)")
