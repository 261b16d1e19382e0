"""`fmgate models …` and `fmgate hw` through typer's runner, on a tiny model."""

from __future__ import annotations

import json
import os

import typer
from typer.testing import CliRunner

from model_store.cli import hw_command, models_app

runner = CliRunner()


def _hw_app() -> typer.Typer:
    app = typer.Typer()
    app.command("hw")(hw_command)
    app.command("noop")(lambda: None)  # two commands, so "hw" stays a subcommand
    return app


def test_hw_shows_profile_and_recipes():
    res = runner.invoke(_hw_app(), ["hw"])
    assert res.exit_code == 0, res.output
    assert "hardware class" in res.output and "genai-int8" in res.output
    res = runner.invoke(_hw_app(), ["hw", "--json"])
    data = json.loads(res.output)
    assert data["hardware"]["cores"] >= 1
    assert any(r["recipe"] == "onnx-gguf-native" and r["source"] == "hf" and not r["applies"] for r in data["recipes"])


def test_models_lifecycle(tmp_path, tiny_models, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("FMGATE_HOME", str(home))
    src = str(tiny_models["bert"])
    res = runner.invoke(models_app, ["pull", src, "--task", "embed", "--json"])
    assert res.exit_code == 0, res.output
    manifest = json.loads(res.output)
    chosen = manifest["variant"]
    assert {c["variant"] for c in manifest["candidates"]} == {"ort-fp32", "ort-int8-per-channel",
                                                                "ort-int8-weight-only", "ort-int8-per-tensor",
                                                                "ort-int8-rowwise"}

    res = runner.invoke(models_app, ["list", "--json"])
    assert res.exit_code == 0, res.output
    [entry] = json.loads(res.output)
    assert entry["name"] == "tiny-bert" and entry["chosen"] == chosen and len(entry["variants"]) == 5
    res = runner.invoke(models_app, ["list"])
    assert "tiny-bert" in res.output and "✓" in res.output

    res = runner.invoke(models_app, ["show", "tiny-bert"])
    assert res.exit_code == 0 and "why:" in res.output and "ort-int8-per-tensor" in res.output

    res = runner.invoke(models_app, ["verify"])
    assert res.exit_code == 0 and res.output.count("ok") == 5
    art = home / "models" / "artifacts" / manifest["key"] / "model.onnx"
    os.chmod(art, 0o644)
    with open(art, "r+b") as f:
        f.truncate(100)
    res = runner.invoke(models_app, ["verify", "tiny-bert", "--repair"])
    assert res.exit_code == 1 and "corrupt" in res.output

    res = runner.invoke(models_app, ["rm", "tiny-bert", "--variant", "ort-int8-per-tensor"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(models_app, ["prune", "--losers"])
    assert res.exit_code == 0 and "freed" in res.output
    res = runner.invoke(models_app, ["rm", "tiny-bert"])
    assert res.exit_code == 0
    assert not list((home / "models" / "blobs").iterdir())
    res = runner.invoke(models_app, ["show", "tiny-bert"])
    assert res.exit_code == 1 and "no cached model" in res.output


def test_bad_input_is_one_line_without_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("FMGATE_HOME", str(tmp_path / "home"))
    for args in (["pull", str(tmp_path / "missing")], ["pull", "wheel:", "--task", "chat"],
                 ["pull", str(tmp_path), "--variant", "nonsense-recipe"]):
        res = runner.invoke(models_app, args)
        assert res.exit_code == 1, res.output
        assert "error:" in res.output and "Traceback" not in res.output
