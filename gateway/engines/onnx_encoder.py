"""Sentence-embedding runner on onnxruntime: padded batch -> pooled, L2-normalised vectors."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort


class OnnxEncoderRunner:
    device = "cpu"

    def __init__(self, model_dir: Path, threads: int = 0, providers: Sequence[str] = ("CPUExecutionProvider",),
                 spin: bool = False):
        model_dir = Path(model_dir)
        meta = json.loads((model_dir / "fmgate_encoder.json").read_text())
        self.pooling = meta.get("pooling", "mean")
        self.normalize = bool(meta.get("normalize", True))
        self.dim = int(meta["dim"])
        self.max_length = int(meta.get("max_length", 512))
        self.pad_id = int(meta.get("pad_token_id", 0))
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or (os.cpu_count() or 1)
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not spin:
            # onnxruntime's pool threads spin after each run by default, on the cores the event loop and the
            # tokenizer need between batches; a server with many small requests does better without it.
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(model_dir / "model.onnx"), so, providers=list(providers))
        self._inputs = {i.name for i in self.session.get_inputs()}
        self._output = self.session.get_outputs()[0].name

    def encode(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        width = max(len(ids) for ids in batch)
        ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for i, seq in enumerate(batch):
            ids[i, : len(seq)] = seq
            mask[i, : len(seq)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = self.session.run([self._output], feeds)[0]
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = mask[:, :, None].astype(np.float32)
            pooled = (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
        if self.normalize:
            pooled = pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        return pooled.astype(np.float32)
