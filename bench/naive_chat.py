"""The chat server a user would write in an afternoon: FastAPI + transformers, one request at a time.

Loads the SmolLM2 GGUF through transformers (dequantized to fp32), streams with
TextIteratorStreamer, and serialises generation with a lock. Runs in bench/.peers/venv-naive.

    python bench/naive_chat.py --gguf PATH --port 8000 [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer


def build_app(gguf: Path, model_name: str) -> FastAPI:
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF conversion gets the special tokens wrong (eos <|im_start|>, no pad).
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|im_end|>"
    tok.add_bos_token = False
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.eos_token_id
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "naive"}]}

    def generate(body: dict):
        ids = tok.apply_chat_template(body["messages"], add_generation_prompt=True, return_tensors="pt")
        max_new = int(body.get("max_tokens") or 64)
        temp = float(body.get("temperature") or 0)
        kwargs = {"max_new_tokens": max_new, "do_sample": temp > 0}
        if temp > 0:
            kwargs["temperature"] = temp
        return ids, kwargs

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        ids, kwargs = generate(body)
        rid = "chatcmpl-" + uuid.uuid4().hex
        created = int(time.time())
        if not body.get("stream"):
            with lock:
                with torch.inference_mode():
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
            new = out[0, ids.shape[1]:]
            text = tok.decode(new, skip_special_tokens=True)
            return JSONResponse({
                "id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "length" if len(new) >= kwargs["max_new_tokens"] else "stop"}],
                "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": len(new),
                          "total_tokens": ids.shape[1] + len(new)},
            })

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def stream():
            # Held for the whole generation: one request at a time, as the simple server does.
            with lock:
                streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
                counted = {"n": 0}

                def run() -> None:
                    with torch.inference_mode():
                        out = model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                             **kwargs)
                    counted["n"] = int(out.shape[1] - ids.shape[1])

                th = threading.Thread(target=run)
                th.start()
                for piece in streamer:
                    if piece:
                        chunk = {"id": rid, "object": "chat.completion.chunk", "created": created,
                                 "model": model_name,
                                 "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                        yield f"data: {json.dumps(chunk)}\n\n"
                th.join()
            n = counted["n"]
            final = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                     "choices": [{"index": 0, "delta": {},
                                  "finish_reason": "length" if n >= kwargs["max_new_tokens"] else "stop"}]}
            yield f"data: {json.dumps(final)}\n\n"
            if include_usage:
                usage = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                         "choices": [], "usage": {"prompt_tokens": int(ids.shape[1]), "completion_tokens": n,
                                                  "total_tokens": int(ids.shape[1]) + n}}
                yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--model-name", default="smollm2-135m-instruct")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    uvicorn.run(build_app(args.gguf, args.model_name), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
