"""The variant recipe registry: name → how to build a variant, and when it applies.

A recipe is registered once, by name, at import time:

    from model_store.recipes import BuildContext, recipe

    @recipe("torch-bf16-cuda", task="chat", format="torch", params={"dtype": "bfloat16"},
            applies=lambda hw, src: (hw.has_cuda, "needs a CUDA device"), device="cuda",
            evaluate=my_evaluator)
    def build_bf16(ctx: BuildContext) -> None:
        ...  # write the artifact's files into ctx.out

`applies(hardware, source) -> (bool, reason)` decides whether the recipe is a candidate on this
machine; `evaluate(folder, ctx) -> {"quality": {...}, "speed": {"score": ...}}` measures a built
variant (the default evaluators cover the "onnx-genai"/"onnx-optimum" and "onnx-encoder" formats).
Modules that register recipes are found by `load_plugins()`: model_store.recipes_cuda if it exists,
plus any entry point in the group "fmgate.recipes".
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import StoreError
from .hardware import HardwareProfile
from .quality import EvalSettings, evaluate_causal, evaluate_encoder
from .sources import Source

log = logging.getLogger("fmgate.model_store")

Applies = Callable[[HardwareProfile, Source], tuple[bool, str]]
AutoHere = Callable[[HardwareProfile], tuple[bool, str]]  # whether "auto" builds it on this hardware, and why


@dataclass
class BuildContext:
    source: Source
    out: Path  # empty folder: write the artifact here
    work: Path  # scratch folder, deleted afterwards
    params: dict[str, Any]
    hardware: HardwareProfile
    hf_dir: Callable[[], Path]  # the source as a transformers folder (GGUF converted once, cached)
    step: Callable[[str], contextlib.AbstractContextManager] = lambda what: contextlib.nullcontext()
    reference_dir: Path | None = None  # the built reference variant of this source (None when building it)


@dataclass
class EvalContext:
    settings: EvalSettings
    threads: int
    hardware: HardwareProfile
    reference: Any = None  # encoder: the reference embeddings of the sentence set


Evaluator = Callable[[Path, EvalContext], dict]


@dataclass(frozen=True)
class Recipe:
    name: str
    task: str  # "chat" | "embed"
    format: str  # what the artifact folder holds; the engine picks a runner by it
    build: Callable[[BuildContext], None]
    params: Mapping[str, Any] = field(default_factory=dict)
    applies: Applies = lambda hw, src: (True, "")
    default: bool | AutoHere = True  # a candidate for variant "auto" (everywhere, or where the check says)
    reference: bool = False  # the full-precision variant the others are measured against
    device: str = "cpu"
    evaluate: Evaluator | None = None
    description: str = ""

    def auto(self, hw: HardwareProfile) -> tuple[bool, str]:
        """Whether variant "auto" builds and measures this recipe on this hardware, and why not."""
        if callable(self.default):
            return self.default(hw)
        return self.default, "" if self.default else "built only when named"


RECIPES: dict[str, Recipe] = {}


def register(r: Recipe) -> Recipe:
    if r.task not in ("chat", "embed"):
        raise ValueError(f"recipe {r.name}: task must be 'chat' or 'embed'")
    RECIPES[r.name] = r
    return r


def recipe(name: str, *, task: str, format: str, params: Mapping[str, Any] | None = None,
           applies: Applies | None = None, default: bool | AutoHere = True, reference: bool = False,
           device: str = "cpu", evaluate: Evaluator | None = None, description: str = ""):
    """Decorator form of `register` over the build function."""

    def deco(fn: Callable[[BuildContext], None]) -> Callable[[BuildContext], None]:
        register(Recipe(name, task, format, fn, dict(params or {}), applies or (lambda hw, src: (True, "")),
                        default, reference, device, evaluate, description or (fn.__doc__ or "").strip()))
        return fn

    return deco


def get(name: str, task: str | None = None) -> Recipe:
    load_plugins()
    r = RECIPES.get(name)
    if r is None or (task and r.task != task):
        known = ", ".join(sorted(n for n, x in RECIPES.items() if not task or x.task == task))
        what = f"for task {task!r} " if task and r is not None else ""
        raise StoreError(f"unknown recipe {name!r} {what}(known: {known}, or 'auto')")
    return r


def for_task(task: str) -> list[Recipe]:
    load_plugins()
    return [r for r in RECIPES.values() if r.task == task]


def reference_for(task: str) -> Recipe:
    refs = [r for r in for_task(task) if r.reference]
    if not refs:
        raise StoreError(f"no reference recipe registered for task {task!r}")
    return refs[0]


_plugins_loaded = False


def load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for mod in ("model_store.recipes_cuda", "model_store.recipes_encoder", "model_store.recipes_int4",
                "model_store.recipes_prune"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                log.warning("recipe module %s failed to import: %s", mod, exc)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the store
            log.warning("recipe module %s failed to import: %s", mod, exc)
    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group="fmgate.recipes"):
            try:
                ep.load()
            except Exception as exc:  # noqa: BLE001
                log.warning("recipe plugin %s failed to load: %s", ep.name, exc)
    except Exception:  # noqa: BLE001
        pass


def default_evaluator(fmt: str, task: str) -> Evaluator:
    if task == "chat" and fmt in ("onnx-genai", "onnx-optimum"):
        return lambda folder, ctx: evaluate_causal(folder, ctx.settings, ctx.threads)
    if task == "embed" and fmt == "onnx-encoder":
        return lambda folder, ctx: evaluate_encoder(folder, ctx.settings, ctx.threads, ctx.reference)
    raise StoreError(f"no evaluator for format {fmt!r}; the recipe must provide evaluate=")


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Builders print a line per tensor and draw tqdm bars; keep them out of the gateway's log."""
    buf = io.StringIO()
    old = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    old_disable = logging.root.manager.disable
    logging.disable(logging.WARNING)  # onnxruntime.quantization logs every tensor on the root logger
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield buf
    finally:
        logging.disable(old_disable)
        if old is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old


# --- applicability ----------------------------------------------------------------------------

def _cpu_ort(hw: HardwareProfile, src: Source) -> tuple[bool, str]:
    if "CPUExecutionProvider" not in hw.ort_providers and not hw.fake:
        return False, "onnxruntime's CPU provider is not available"
    return True, "onnxruntime CPU"


def _int8_isa(hw: HardwareProfile, src: Source) -> tuple[bool, str]:
    ok, why = _cpu_ort(hw, src)
    if not ok:
        return ok, why
    preset = isa_preset(hw)
    if preset is None:
        return False, f"no int8 kernels worth using on {hw.arch} without avx2"
    return True, f"int8 preset {preset}"


def isa_preset(hw: HardwareProfile) -> str | None:
    tier = hw.isa_tier
    if tier in ("amx", "avx512_vnni"):
        return "avx512_vnni"
    if tier == "avx512":
        return "avx512"
    if tier == "avx2":
        return "avx2"
    if tier.startswith("arm64"):
        return "arm64"
    return None


def _gguf_native_applies(hw: HardwareProfile, src: Source) -> tuple[bool, str]:
    ok, why = _cpu_ort(hw, src)
    if not ok:
        return ok, why
    if src.model_format != "gguf":
        return False, "the source is not a GGUF file"
    try:
        mod = importlib.import_module("model_store.gguf_native")
        if not callable(getattr(mod, "repack_gguf_weights", None)):
            raise AttributeError("no repack_gguf_weights()")
    except Exception as exc:  # noqa: BLE001
        return False, f"model_store.gguf_native is not usable ({type(exc).__name__}: {exc})"
    if src.path is not None and callable(getattr(mod, "native_support", None)):
        return mod.native_support(src.path)  # the block types and architecture it can re-pack
    return True, "GGUF source: serve its own quantized blocks"


# --- causal LMs: onnxruntime-genai builder ----------------------------------------------------

def genai_build(ctx: BuildContext, precision: str, options: Mapping[str, Any]) -> None:
    from onnxruntime_genai.models import builder

    from .convert import finish_causal_artifact

    hf = ctx.hf_dir()
    opts = {"shared_embeddings": "false", "hf_token": "false", **{k: str(v) for k, v in options.items()}}
    cache = ctx.work / "genai-cache"
    with ctx.step(f"build {precision} (onnxruntime-genai)"), quiet() as buf:
        try:
            extra = builder.parse_extra_options(None, str(hf), str(ctx.out), precision, "cpu", str(cache),
                                                [f"{k}={v}" for k, v in opts.items()])
            builder.create_model(None, str(hf), str(ctx.out), precision, "cpu", str(cache), **extra)
        except Exception as exc:
            log.debug("genai builder output:\n%s", buf.getvalue()[-4000:])
            raise RuntimeError(f"onnxruntime-genai builder failed: {type(exc).__name__}: {exc}") from exc
    for name in ("vocab.json", "merges.txt"):  # tokenizer.json is what runtimes read
        (ctx.out / name).unlink(missing_ok=True)
    finish_causal_artifact(ctx.out, hf, repaired=ctx.source.model_format == "gguf")


@recipe("genai-fp32", task="chat", format="onnx-genai", params={"precision": "fp32"}, applies=_cpu_ort,
        reference=True)
def build_genai_fp32(ctx: BuildContext) -> None:
    """onnxruntime-genai fp32: the reference every other causal variant is measured against."""
    genai_build(ctx, "fp32", {})


@recipe("genai-int8", task="chat", format="onnx-genai",
        params={"precision": "int8", "block_size": 32, "accuracy_level": 4}, applies=_cpu_ort)
def build_genai_int8(ctx: BuildContext) -> None:
    """onnxruntime-genai int8 weight-only (MatMulNBits 8-bit)."""
    genai_build(ctx, "int8", {k: ctx.params[k] for k in ("block_size", "accuracy_level")})


@recipe("genai-int4", task="chat", format="onnx-genai",
        params={"precision": "int4", "block_size": 32, "accuracy_level": 4}, applies=_cpu_ort)
def build_genai_int4(ctx: BuildContext) -> None:
    """onnxruntime-genai int4 weight-only (MatMulNBits 4-bit, symmetric RTN)."""
    genai_build(ctx, "int4", {k: ctx.params[k] for k in ("block_size", "accuracy_level")})


@recipe("onnx-gguf-native", task="chat", format="onnx-genai",
        params={"precision": "int4", "block_size": 32, "accuracy_level": 4}, applies=_gguf_native_applies)
def build_gguf_native(ctx: BuildContext) -> None:
    """genai int4 graph whose MatMulNBits weights are the GGUF's own Q4_1/Q8_0 blocks."""
    mod = importlib.import_module("model_store.gguf_native")
    genai_build(ctx, "int4", {k: ctx.params[k] for k in ("block_size", "accuracy_level")})
    with ctx.step("repack GGUF blocks"):
        mod.repack_gguf_weights(ctx.source.fetch(), ctx.out)


@recipe("optimum-int8-default", task="chat", format="onnx-optimum",
        params={"quantizer": "ORTQuantizer", "dynamic": True, "per_channel": False, "ops": "default"},
        applies=_int8_isa, default=False)
def build_optimum_int8_default(ctx: BuildContext) -> None:
    """optimum's default dynamic int8 on every op it knows (kept to show the gate works: it breaks LMs)."""
    from optimum.exporters.onnx import main_export

    hf = ctx.hf_dir()
    export = ctx.work / "export"
    with ctx.step("export (optimum, text-generation-with-past)"), quiet():
        main_export(str(hf), output=str(export), task="text-generation-with-past", library_name="transformers",
                    do_validation=False, local_files_only=True)
    _ort_quantize(ctx, export, per_channel=False, ops=None)
    for f in export.iterdir():
        if f.is_file() and not f.name.endswith((".onnx", ".onnx_data", ".onnx.data")):
            shutil.copy2(f, ctx.out / f.name)
    from .convert import finish_causal_artifact

    finish_causal_artifact(ctx.out, hf, repaired=ctx.source.model_format == "gguf")


def _ort_quantize(ctx: BuildContext, export: Path, per_channel: bool, ops: list[str] | None) -> None:
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    preset = isa_preset(ctx.hardware) or "avx2"
    with ctx.step(f"quantize int8 ({preset}, {'per-channel' if per_channel else 'per-tensor'})"), quiet():
        cfg = getattr(AutoQuantizationConfig, preset)(is_static=False, per_channel=per_channel,
                                                      operators_to_quantize=ops)
        q = ORTQuantizer.from_pretrained(str(export), file_name="model.onnx")
        q.quantize(quantization_config=cfg, save_dir=str(ctx.work / "quantized"))
    produced = ctx.work / "quantized" / "model_quantized.onnx"
    os.replace(produced, ctx.out / "model.onnx")


# --- encoders: optimum export + onnxruntime quantization --------------------------------------

def _encoder_meta(hf: Path) -> dict:
    cfg = json.loads((hf / "config.json").read_text())
    from .sources import sentence_transformers_pooling

    max_length = None
    pooling, normalize = sentence_transformers_pooling(hf)  # modules.json + the Pooling module's config
    pooling, normalize = pooling or "mean", True if normalize is None else normalize
    sbert = hf / "sentence_bert_config.json"
    if sbert.exists():
        max_length = json.loads(sbert.read_text()).get("max_seq_length")
    if not max_length:
        max_length = min(int(cfg.get("max_position_embeddings", 512)), 512)
    dim = int(cfg.get("hidden_size") or cfg.get("dim") or cfg.get("d_model"))
    return {"pooling": pooling, "normalize": bool(normalize), "dim": dim, "max_length": int(max_length)}


def encoder_export(ctx: BuildContext, dest: Path) -> None:
    """optimum main_export, feature-extraction; library_name pinned so no pooling is baked in."""
    from optimum.exporters.onnx import main_export
    from transformers import AutoTokenizer

    if ctx.source.model_format == "gguf":
        raise StoreError("GGUF sources are causal LMs; an embedding model needs a transformers folder")
    hf = ctx.hf_dir()
    with ctx.step("export fp32 (optimum, feature-extraction)"), quiet():
        main_export(str(hf), output=str(dest), task="feature-extraction", library_name="transformers",
                    do_validation=False, local_files_only=True)
        AutoTokenizer.from_pretrained(str(hf)).save_pretrained(str(dest))
    (dest / "fmgate_encoder.json").write_text(json.dumps(_encoder_meta(hf), indent=2))


def _fp32_encoder(ctx: BuildContext) -> Path:
    """The fp32 export to quantize: the reference artifact when built, else a fresh export."""
    if ctx.reference_dir and (ctx.reference_dir / "model.onnx").exists():
        return ctx.reference_dir
    fp32 = ctx.work / "fp32"
    encoder_export(ctx, fp32)
    return fp32


def _encoder_files(src: Path, out: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".onnx":
            shutil.copy2(f, out / f.name)


@recipe("ort-fp32", task="embed", format="onnx-encoder", params={"precision": "fp32"}, applies=_cpu_ort,
        reference=True)
def build_encoder_fp32(ctx: BuildContext) -> None:
    """optimum ONNX export, fp32 (onnxruntime applies its graph optimizations at load)."""
    encoder_export(ctx, ctx.out)


@recipe("ort-int8-per-channel", task="embed", format="onnx-encoder",
        params={"precision": "int8", "per_channel": True, "ops": ["MatMul"], "weights_only_constb": True},
        applies=_cpu_ort)
def build_encoder_int8_pc(ctx: BuildContext) -> None:
    """Dynamic int8, per-channel weights, MatMul with constant weights only."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = _fp32_encoder(ctx)
    with ctx.step("quantize int8 (per-channel, MatMul only)"), quiet():
        quantize_dynamic(str(fp32 / "model.onnx"), str(ctx.out / "model.onnx"), per_channel=True,
                         weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         extra_options={"MatMulConstBOnly": True})
    _encoder_files(fp32, ctx.out)


@recipe("ort-int8-weight-only", task="embed", format="onnx-encoder",
        params={"precision": "int8", "kernel": "MatMulNBits", "block_size": 32, "accuracy_level": 4},
        applies=_cpu_ort)
def build_encoder_int8_wo(ctx: BuildContext) -> None:
    """8-bit weights in blocks (MatMulNBits); activations are quantized per row, so batchmates don't matter."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    fp32 = _fp32_encoder(ctx)
    p = ctx.params
    with ctx.step("quantize int8 (weight-only, MatMulNBits)"), quiet():
        cfg = DefaultWeightOnlyQuantConfig(block_size=p["block_size"], is_symmetric=True,
                                           accuracy_level=p["accuracy_level"], bits=8)
        q = MatMulNBitsQuantizer(onnx.load(str(fp32 / "model.onnx")), algo_config=cfg)
        q.process()
        q.model.save_model_to_file(str(ctx.out / "model.onnx"))
    _encoder_files(fp32, ctx.out)


@recipe("ort-int8-per-tensor", task="embed", format="onnx-encoder",
        params={"precision": "int8", "per_channel": False, "quantizer": "optimum-isa-preset"}, applies=_int8_isa)
def build_encoder_int8_pt(ctx: BuildContext) -> None:
    """optimum's ISA preset (avx512_vnni / avx2 / arm64), dynamic, per-tensor: its default."""
    fp32 = _fp32_encoder(ctx)
    _ort_quantize(ctx, fp32, per_channel=False, ops=None)
    _encoder_files(fp32, ctx.out)
