"""A chat/completion engine usable from Python without HTTP: tokenizer + runner + scheduler.

    engine = LLMEngine.from_dir(path)
    print(engine.chat([{"role": "user", "content": "Hi"}], max_tokens=32).text)
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import queue
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..scheduler.generation import Event, GenerationScheduler, GenSequence
from .base import CausalRunner, EngineError, EngineUnavailable, SamplingParams

# Tests only, off unless set: the scheduler thread dies at the Nth decode step (see tests/e2e/test_engine_faults.py).
TEST_FAULT_ENV = "FMGATE_TEST_KILL_ENGINE_AT_DECODE"


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
        if os.environ.get(TEST_FAULT_ENV):
            runner = _DyingRunner(runner, int(os.environ[TEST_FAULT_ENV]))
            self.runner = runner
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

    @property
    def ready(self) -> bool:
        """False once the scheduler thread died (or stopped): requests would never be served."""
        return self.scheduler.alive

    # -- prompts --

    def chat_prompt(self, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> list[int]:
        """Blocking (tokenizes): call it with asyncio.to_thread from async code."""
        try:
            from ..structured import render_chat
        except ImportError:
            render_chat = None
        if render_chat is not None:
            return list(render_chat(self.tokenizer, list(messages), list(tools) if tools else None))
        if tools:
            raise EngineError("Tool calling is not supported by this model.", param="tools")
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

    @functools.lru_cache(maxsize=65536)  # noqa: B019 (one engine per model, alive for the process)
    def token_text(self, token_id: int) -> str:
        """The text of one token as OpenAI's logprobs show it (a partial UTF-8 character shows as U+FFFD)."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    @functools.lru_cache(maxsize=65536)  # noqa: B019
    def token_bytes(self, token_id: int) -> list[int]:
        """The exact bytes of one token (logprobs' `bytes`), also when it is part of a UTF-8 character."""
        piece = self.tokenizer.convert_ids_to_tokens(int(token_id))
        if piece is None:
            return []
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # sentencepiece byte fallback
            return [int(piece[3:5], 16)]
        table = _byte_decoder()
        if all(ch in table for ch in piece):  # byte-level BPE (GPT-2 style): one char per byte
            return [table[ch] for ch in piece]
        return list(self.token_text(token_id).encode("utf-8"))

    # -- generation --

    def submit(self, prompt: Sequence[int], params: SamplingParams, sink) -> GenSequence:
        return self.scheduler.submit(prompt, params, sink)

    def cancel(self, seq: GenSequence) -> None:
        self.scheduler.cancel(seq)

    async def stream(self, prompt: Sequence[int], params: SamplingParams) -> AsyncIterator[Event]:
        """Events as the scheduler produces them; leaving the loop early cancels the sequence.
        Refusals (EngineError, Overloaded, EngineUnavailable) are raised before the first event."""
        async for _, ev in self.stream_many([(prompt, params)]):
            yield ev

    async def stream_many(self, requests: Sequence[tuple[Sequence[int], SamplingParams]],
                          ) -> AsyncIterator[tuple[int, Event]]:
        """(index, event) for several sequences at once (n choices, several prompts). All are queued or
        none; closing the generator or cancelling its task cancels every unfinished one within a step."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

        def sink(i: int):
            return lambda ev: loop.call_soon_threadsafe(q.put_nowait, (i, ev))

        seqs = self.scheduler.submit_many([(p, sp, sink(i)) for i, (p, sp) in enumerate(requests)])
        left = len(seqs)
        try:
            while left:
                i, ev = await q.get()
                if ev.finish_reason is not None:
                    left -= 1
                yield i, ev
        finally:
            for seq in seqs:
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
            if ev.error_code == "engine_failed":
                raise EngineUnavailable(ev.error or "The engine failed.")
            if ev.error:
                raise EngineError(ev.error, code=ev.error_code)
            return Completion("".join(parts), ev.finish_reason, ev.prompt_tokens, ev.completion_tokens)
    raise EngineError("generation ended without a result")


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class _DyingRunner:
    """A runner whose Nth decode kills the scheduler thread (an error no step handler catches).
    Only for tests of the watchdog, enabled by the FMGATE_TEST_KILL_ENGINE_AT_DECODE variable."""

    def __init__(self, runner: CausalRunner, at: int):
        self._runner = runner
        self._left = at

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def decode(self, seq_ids, token_ids):
        self._left -= 1
        if self._left <= 0:
            raise _EngineKilled(f"{TEST_FAULT_ENV} reached")
        return self._runner.decode(seq_ids, token_ids)


class _EngineKilled(BaseException):
    """Escapes the scheduler's per-step handlers, as a bug in the loop itself would."""


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
