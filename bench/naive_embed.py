"""The embeddings server a user would write: FastAPI + sentence-transformers, one request at a time.

The handler is `async def` and calls `encode` directly, so requests run one after another on the
event loop, with no cross-request batching. Runs in bench/.peers/venv-naive.

    python bench/naive_embed.py --model-dir PATH --port 8000 [--threads 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from sentence_transformers import SentenceTransformer


def build_app(model_dir: Path, model_name: str) -> FastAPI:
    model = SentenceTransformer(str(model_dir), device="cpu")
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "naive"}]}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict:
        body = await request.json()
        inputs = body["input"]
        if isinstance(inputs, str):
            inputs = [inputs]
        vecs = model.encode(inputs, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
        return {
            "object": "list",
            "model": model_name,
            "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vecs)],
            "usage": {"prompt_tokens": 0, "total_tokens": 0},
        }

    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--model-name", default="all-minilm-l6-v2")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    uvicorn.run(build_app(args.model_dir, args.model_name), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
