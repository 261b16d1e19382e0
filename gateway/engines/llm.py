"""A chat/completion engine usable from Python without HTTP: tokenizer + runner + scheduler.

    engine = LLMEngine.from_dir(path)
    print(engine.chat([{"role": "user", "content": "Hi"}], max_tokens=32).text)
"""

from __future__ import annotations

import asyncio
import json
import queue
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..scheduler.generation import Event, GenerationScheduler, GenSequence
from .base import CausalRunner, EngineError, SamplingParams


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class LLMEngine:
    def __init__(self, runner: CausalRunner, tokenizer: PreTrainedTokenizerBase, eos_ids: Sequence[int],
                 name: str = "model", **scheduler_opts: Any):
        self.name = name
        self.runner = runner
        self.tokenizer = tokenizer
        self.scheduler = GenerationScheduler(
            runner, tokenizer.backend_tokenizer, eos_ids, name=name, **scheduler_opts
        )

    @classmethod
    def from_dir(cls, path: Path, name: str = "model", *, max_num_seqs: int = 16, max_model_len: int = 2048,
                 threads: int = 0, runner: CausalRunner | None = None, **scheduler_opts: Any) -> LLMEngine:
        """Load an onnx-genai artifact folder (or wrap a given runner, e.g. a CUDA one)."""
        path = Path(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if runner is None:
            from .onnx_causal import OnnxCausalRunner

            runner = OnnxCausalRunner(path, capacity=max_num_seqs, max_seq_len=max_model_len, threads=threads)
        return cls(runner, tokenizer, eos_token_ids(path, tokenizer), name=name,
                   max_num_seqs=max_num_seqs, **scheduler_opts)

    @property
    def max_model_len(self) -> int:
        return self.runner.max_seq_len

    # -- prompts --

    def chat_prompt(self, messages: Sequence[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise EngineError("This model has no chat template; use /v1/completions.", param="messages")
        try:
            ids = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # a template may raise on message shapes it does not accept
            raise EngineError(f"The chat template rejected the messages: {exc}", param="messages") from exc
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def text_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    # -- generation --

    def submit(self, prompt: Sequence[int], params: SamplingParams, sink) -> GenSequence:
        return self.scheduler.submit(prompt, params, sink)

    def cancel(self, seq: GenSequence) -> None:
        self.scheduler.cancel(seq)

    async def stream(self, prompt: Sequence[int], params: SamplingParams) -> AsyncIterator[Event]:
        """Events as the scheduler produces them; leaving the loop early cancels the sequence."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Event] = asyncio.Queue()
        seq = self.submit(prompt, params, lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev))
        try:
            while True:
                ev = await q.get()
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            self.cancel(seq)

    def stream_sync(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[Event]:
        q: queue.Queue[Event] = queue.Queue()
        seq = self.submit(prompt, params, q.put)
        try:
            while True:
                ev = q.get()
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            self.cancel(seq)

    def generate(self, prompt: str | Sequence[int], **params: Any) -> Completion:
        ids = self.text_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        return _collect(self.stream_sync(ids, SamplingParams(**params)))

    def chat(self, messages: Sequence[dict], **params: Any) -> Completion:
        return _collect(self.stream_sync(self.chat_prompt(messages), SamplingParams(**params)))

    def close(self) -> None:
        self.scheduler.shutdown()


def _collect(events: Iterator[Event]) -> Completion:
    parts = []
    for ev in events:
        parts.append(ev.text)
        if ev.finish_reason is not None:
            if ev.error:
                raise EngineError(ev.error)
            return Completion("".join(parts), ev.finish_reason, ev.prompt_tokens, ev.completion_tokens)
    raise EngineError("generation ended without a result")


def eos_token_ids(path: Path, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """End-of-turn ids: the tokenizer's eos plus those the model's generation config names."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for name in ("genai_config.json", "generation_config.json"):
        f = path / name
        if not f.exists():
            continue
        cfg = json.loads(f.read_text())
        eos = cfg.get("model", cfg).get("eos_token_id")
        if eos is not None:
            ids.update(int(x) for x in (eos if isinstance(eos, list) else [eos]))
    return sorted(ids)
