"""Measuring apart from building: the gate fails closed, old caches are re-gated, another machine
measures again, `fmgate models bench` re-chooses; all without rebuilding. Tiny random models."""

from __future__ import annotations

import json
import logging

from typer.testing import CliRunner

from model_store import ModelStore
from model_store import recipes as reg
from model_store import store as store_mod
from model_store.cli import models_app
from model_store.hardware import HardwareProfile, detect, use_profile

from .conftest import SMALL_EVAL


def _selection(store: ModelStore, art) -> dict:
    return json.loads((store.cache.selections / f"{art.manifest['selection_key']}.json").read_text())


def test_every_candidate_has_figures_verdict_and_spread(tiny_store, tiny_models):
    art = tiny_store.load(str(tiny_models["bert"]), task="embed")
    rows = art.manifest["candidates"]
    assert {r["variant"] for r in rows} >= {"ort-fp32", "ort-int8-weight-only"}
    assert all(r.get("verdict") for r in rows)
    assert [r["variant"] for r in rows if r["verdict"].startswith("chosen")] == [art.variant]
    measured = [r for r in rows if "quality" in r]
    assert all(isinstance(r["quality"].get("batch_invariance"), float) for r in measured)
    benched = [r for r in rows if "spread_pct" in r["speed"]]
    assert len(benched) >= 2  # the top candidates were timed against each other
    assert all(r["speed"]["rounds"] >= SMALL_EVAL.bench_min_rounds for r in benched)
    assert art.manifest["speed"] == next(r["speed"] for r in rows if r["variant"] == art.variant)
    sel = _selection(tiny_store, art)
    assert sel["tie_margin"] == SMALL_EVAL.tie_margin and sel["fingerprint"] == detect().fingerprint
    assert set(sel["measure_digests"]) == {r["variant"] for r in rows}


def test_cache_from_before_the_gate_change_is_regated(tmp_path, tiny_models, monkeypatch, caplog):
    """A store whose measuring code differed (here: no batch-invariance figure) is measured again."""
    src = str(tiny_models["bert"])
    home = tmp_path / "home"
    real_eval = reg.evaluate_encoder

    def old_eval(*a, **kw):
        out = real_eval(*a, **kw)
        out["quality"].pop("batch_invariance", None)
        return out

    with monkeypatch.context() as m:
        m.setattr(reg, "evaluate_encoder", old_eval)
        m.setattr(store_mod, "measure_digest", lambda r: "before-the-change")
        old = ModelStore(home, eval_settings=SMALL_EVAL, gate=store_mod.Gate(min_batch_invariance=None))
        old_art = old.load(src, task="embed")
    assert all("batch_invariance" not in r["quality"] for r in old_art.manifest["candidates"] if "quality" in r)

    caplog.set_level(logging.INFO, logger="fmgate.model_store")
    new = ModelStore(home, eval_settings=SMALL_EVAL)
    art = new.load(src, task="embed")
    assert "building variant" not in caplog.text  # the artifacts are reused
    assert "evaluate ort-fp32" in caplog.text  # the figures are not
    assert all(isinstance(r["quality"]["batch_invariance"], float) for r in art.manifest["candidates"]
               if "quality" in r)
    assert art.manifest["selection_key"] != old_art.manifest["selection_key"]

    # A stored choice whose winner lacks a figure (written at today's key) is not trusted either.
    sel_path = new.cache.selections / f"{art.manifest['selection_key']}.json"
    sel = json.loads(sel_path.read_text())
    other = next(r for r in sel["candidates"] if r["variant"] != sel["reference"] and "quality" in r)
    other["quality"].pop("batch_invariance")
    sel["chosen"] = other["variant"]
    sel_path.write_text(json.dumps(sel))
    caplog.clear()
    again = ModelStore(home, eval_settings=SMALL_EVAL).load(src, task="embed")
    assert "no longer passes the gate" in caplog.text and "building variant" not in caplog.text
    fresh = json.loads(sel_path.read_text())
    assert all("batch_invariance" in r["quality"] for r in fresh["candidates"] if "quality" in r)
    assert again.variant == fresh["chosen"]


def test_another_machine_measures_again_without_rebuilding(tmp_path, tiny_models, caplog):
    src = str(tiny_models["llama"])
    home = tmp_path / "home"
    first = ModelStore(home, eval_settings=SMALL_EVAL).load(src, task="chat")
    real = detect()
    other = HardwareProfile(arch=real.arch, cpu_model=real.cpu_model + " (another box)", cores=real.cores,
                            memory_mb=real.memory_mb, isa=real.isa, cuda=real.cuda, ort_providers=real.ort_providers)
    assert other.hardware_class == real.hardware_class and other.fingerprint != real.fingerprint
    caplog.set_level(logging.INFO, logger="fmgate.model_store")
    with use_profile(other):
        second = ModelStore(home, eval_settings=SMALL_EVAL).load(src, task="chat")
    assert "building variant" not in caplog.text and "evaluate genai-fp32" in caplog.text
    assert second.manifest["selection_key"] != first.manifest["selection_key"]
    assert {r["key"] for r in second.manifest["candidates"]} == {r["key"] for r in first.manifest["candidates"]}
    assert len(list((home / "models" / "measures").glob("*.json"))) == 2 * len(first.manifest["candidates"])


def test_models_bench_remeasures_and_show_prints_spread(tmp_path, tiny_models, monkeypatch):
    home = tmp_path / "home"
    src = str(tiny_models["bert"])
    first = ModelStore(home, eval_settings=SMALL_EVAL).load(src, task="embed")
    monkeypatch.setattr(store_mod, "EvalSettings", lambda: SMALL_EVAL)
    before = sorted(p.name for p in (home / "models" / "variants").iterdir())
    res = CliRunner().invoke(models_app, ["bench", src, "--home", str(home), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out[0]["selection_key"] == first.manifest["selection_key"]
    assert any("spread_pct" in r["speed"] for r in out[0]["candidates"])
    assert sorted(p.name for p in (home / "models" / "variants").iterdir()) == before  # nothing rebuilt
    shown = CliRunner().invoke(models_app, ["show", src, "--home", str(home)])
    assert shown.exit_code == 0, shown.output
    assert "±" in shown.output and "chosen" in shown.output and "tie margin" in shown.output


def test_v1_models_card_shows_every_candidate(tmp_path, tiny_models):
    """GET /v1/models: each model's card carries the store's verdict for every candidate."""
    from types import SimpleNamespace

    from gateway.api.models import _card

    home = tmp_path / "home"
    src = str(tiny_models["bert"])
    art = ModelStore(home, eval_settings=SMALL_EVAL).load(src, task="embed")
    served = SimpleNamespace(name="tiny", created=0, task="embed", variant=art.variant, quality=art.quality,
                             engine=SimpleNamespace(dim=32), config=SimpleNamespace(source=src))
    card = _card(served, home)
    assert card["variant"] == art.variant and card["why"] == art.manifest["why"]
    rows = {r["variant"]: r for r in card["candidates"]}
    assert set(rows) == {r["variant"] for r in art.manifest["candidates"]}
    assert rows[art.variant]["verdict"].startswith("chosen")
    assert all(r["verdict"] for r in rows.values())
    assert "candidates" not in _card(served, tmp_path / "elsewhere")  # no record: the plain card
