"""Encoders users bring: pooling and normalisation read from the sentence-transformers files (BERT
here, XLM-R in test_families.py), and NomicBERT, whose modelling code is `trust_remote_code`,
refused at load time with an error that names it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model_store import ModelStore, StoreError
from model_store.sources import sentence_transformers_pooling

from .conftest import SMALL_EVAL
from .tiny import tiny_bert

ST = "sentence_transformers.models."


def _st_files(folder: Path, pooling: str, normalize: bool, pool_dir: str = "1_Pooling") -> None:
    if pool_dir != "1_Pooling":
        (folder / "1_Pooling" / "config.json").unlink(missing_ok=True)
    (folder / pool_dir).mkdir(exist_ok=True)
    (folder / pool_dir / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": pooling == "cls",
         "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": pooling == "max"}))
    modules = [{"idx": 0, "name": "0", "path": "", "type": ST + "Transformer"},
               {"idx": 1, "name": "1", "path": pool_dir, "type": ST + "Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": ST + "Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))


def test_pooling_read_from_the_module_modules_json_names(tmp_path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    assert sentence_transformers_pooling(folder) == (None, None)  # no files: the store's default (mean, normalised)
    _st_files(folder, "cls", False, pool_dir="pooling_layer")
    assert sentence_transformers_pooling(folder) == ("cls", False)
    _st_files(folder, "mean", True, pool_dir="pooling_layer")
    assert sentence_transformers_pooling(folder) == ("mean", True)
    _st_files(folder, "max", True)
    with pytest.raises(StoreError, match="pooling max is not supported"):
        sentence_transformers_pooling(folder)


@pytest.mark.slow
@pytest.mark.parametrize("pooling,normalize", [("cls", False), ("mean", True)])
def test_bert_served_vectors_pool_as_sentence_transformers_says(pooling, normalize, tmp_path, monkeypatch) -> None:
    """The served vector equals transformers' hidden states pooled and normalised the way the
    model's sentence-transformers files say (CLS, not normalised; mean, normalised)."""
    monkeypatch.setenv("FMGATE_BUILD_IN_PROCESS", "1")  # the child path is test_child.py's; this saves its imports
    import torch
    from tokenizers import Tokenizer
    from transformers import BertModel

    from gateway.engines.onnx_encoder import OnnxEncoderRunner

    folder = tiny_bert(tmp_path / "bert")
    _st_files(folder, pooling, normalize)
    art = ModelStore(tmp_path / "home", eval_settings=SMALL_EVAL).load(str(folder), task="embed", variant="ort-fp32")
    meta = json.loads((art.path / "fmgate_encoder.json").read_text())
    assert (meta["pooling"], meta["normalize"]) == (pooling, normalize)

    tok = Tokenizer.from_file(str(art.path / "tokenizer.json"))
    ids = [tok.encode(s).ids for s in ("the cat sat on the mat", "a much longer sentence about the weather today")]
    got = OnnxEncoderRunner(art.path, threads=1).encode(ids)
    model = BertModel.from_pretrained(folder).eval()
    for i, seq in enumerate(ids):
        with torch.no_grad():
            h = model(torch.tensor([seq])).last_hidden_state[0].numpy()
        want = h[0] if pooling == "cls" else h.mean(0)
        if normalize:
            want = want / np.linalg.norm(want)
        np.testing.assert_allclose(got[i], want, rtol=0, atol=2e-4 * np.abs(want).max())


def _tiny_nomic(folder: Path) -> Path:
    """nomic-embed-text-v1.5's config shape (model_type nomic_bert, auto_map to the hub's own code),
    a BERT tokenizer and random weights named as its checkpoint names them."""
    from safetensors.numpy import save_file

    tiny_bert(folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["NomicBertModel"], "model_type": "nomic_bert",
        "auto_map": {"AutoConfig": "nomic-ai/nomic-bert-2048--configuration_hf_nomic_bert.NomicBertConfig",
                     "AutoModel": "nomic-ai/nomic-bert-2048--modeling_hf_nomic_bert.NomicBertModel"},
        "activation_function": "swiglu", "rotary_emb_fraction": 1.0, "rotary_emb_base": 1000,
        "n_embd": 32, "n_head": 2, "n_layer": 2, "n_inner": 64, "n_positions": 128, "vocab_size": vocab,
        "qkv_proj_bias": False, "mlp_fc1_bias": False, "mlp_fc2_bias": False, "prenorm": False}))
    rng = np.random.default_rng(0)
    weights = {"embeddings.word_embeddings.weight": (vocab, 32), "emb_ln.weight": (32,)}
    for i in range(2):
        weights |= {f"encoder.layers.{i}.attn.Wqkv.weight": (96, 32), f"encoder.layers.{i}.attn.out_proj.weight": (32, 32),
                    f"encoder.layers.{i}.mlp.fc11.weight": (64, 32), f"encoder.layers.{i}.mlp.fc12.weight": (64, 32),
                    f"encoder.layers.{i}.mlp.fc2.weight": (32, 64)}
    save_file({k: rng.normal(0, 0.02, s).astype(np.float32) for k, s in weights.items()},
              str(folder / "model.safetensors"))
    _st_files(folder, "mean", True)
    return folder


def test_nomic_bert_is_refused_at_load_time_naming_it(tmp_path) -> None:
    folder = _tiny_nomic(tmp_path / "nomic")
    store = ModelStore(tmp_path / "home", eval_settings=SMALL_EVAL)
    with pytest.raises(StoreError, match=r"NomicBertModel \(model_type 'nomic_bert'\).*trust_remote_code.*NomicBERT"):
        store.load(str(folder), task="embed")
    assert not list((tmp_path / "home" / "models" / "variants").glob("*.json"))  # refused before any build


def test_bundled_code_for_a_built_in_architecture_is_not_refused(tmp_path) -> None:
    """Some repos keep an auto_map for an architecture transformers now has built in: that is fine."""
    folder = tiny_bert(tmp_path / "bert")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "someone/repo--modeling.MyBert"}
    (folder / "config.json").write_text(json.dumps(cfg))
    assert ModelStore(tmp_path / "home").resolve(str(folder)).model_format == "hf"
