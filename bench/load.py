"""Closed-loop load against an OpenAI-compatible server: N clients, each sends its next request
as soon as the previous one finishes, for a bounded number of requests and a bounded time.

Chat requests stream (with `stream_options.include_usage`), so time to first token is the time to
the first chunk that carries content; completion tokens come from the server's usage when it
reports one, else from the number of content chunks. Embedding requests send lists of sentences.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field

import httpx

# Questions that make a 135M chat model talk past 64 tokens, so every server generates the full
# max_tokens and throughput compares like with like.
CHAT_PROMPTS = [
    "Explain how a bicycle works, step by step.",
    "Write a short story about a robot who learns to paint.",
    "Describe the water cycle in detail.",
    "What are the main causes of the seasons on Earth? Explain thoroughly.",
    "Give me a detailed recipe for making bread at home.",
    "Explain what a computer's CPU does and how it executes a program.",
    "Describe a typical day in the life of a medieval farmer.",
    "Write a letter to a friend describing your last holiday.",
    "Explain the difference between weather and climate with examples.",
    "How do airplanes stay in the air? Explain the physics.",
    "Describe how to plant and care for a vegetable garden.",
    "Tell me about the history of the printing press.",
    "Explain photosynthesis to a high school student.",
    "Write a product description for a new kind of running shoe.",
    "What should someone know before adopting a dog? Give advice.",
    "Explain how the internet delivers a web page to a browser.",
]

_SUBJECTS = ["The old lighthouse keeper", "A small team of engineers", "My neighbour's cat",
             "The city council", "A curious student", "The night train to the coast",
             "An experienced mountain guide", "The museum's new exhibition"]
_VERBS = ["quietly repaired", "carefully described", "unexpectedly discovered", "patiently explained",
          "slowly rebuilt", "proudly presented", "thoroughly examined", "briefly mentioned"]
_OBJECTS = ["the broken clock that had stood in the hallway for decades",
            "a faster way to sort thousands of letters before the morning deadline",
            "the reasons why the river floods every spring after heavy rain",
            "an ancient map showing roads that no longer exist anywhere",
            "the recipe their grandmother used for apple pie on Sundays",
            "a plan to plant trees along every street in the old town",
            "how sound travels through water faster than through air",
            "the small details that make a photograph feel alive and honest"]


def make_sentences(n: int = 512) -> list[str]:
    """Deterministic, distinct sentences of roughly 20-30 tokens (MiniLM's typical input)."""
    out = []
    for i in range(n):
        s = _SUBJECTS[i % 8]
        v = _VERBS[(i // 8) % 8]
        o = _OBJECTS[(i // 64 + i) % 8]
        out.append(f"{s} {v} {o}, case {i}.")
    return out


SENTENCES = make_sentences()

LONG_SENTENCES = 58  # about 1,400 prompt tokens with SmolLM2's tokenizer and chat template


def long_prompt(i: int) -> str:
    """A distinct prompt of about 1,400 tokens: request i's number comes first, so no server can reuse
    an earlier prompt's cache (prefix caches match from the first token). Callers keep i unique across
    repetitions and levels too (run_chat's first_id): llama-server keeps each slot's last prompt."""
    start = (i * LONG_SENTENCES) % len(SENTENCES)
    notes = " ".join(SENTENCES[(start + k) % len(SENTENCES)] for k in range(LONG_SENTENCES))
    return f"Request {i}. Here are my notes: {notes} Summarise the notes in one sentence."


@dataclass
class ChatResult:
    ok: bool
    ttft: float | None = None
    e2e: float | None = None
    tokens: int = 0
    token_source: str = ""
    text: str = ""
    error: str = ""


@dataclass
class EmbedResult:
    ok: bool
    e2e: float | None = None
    sentences: int = 0
    dim: int = 0
    error: str = ""


@dataclass
class Summary:
    kind: str
    concurrency: int
    batch: int = 0
    requests: int = 0
    errors: int = 0
    wall_s: float = 0.0
    tok_s: float | None = None
    sent_s: float | None = None
    req_s: float = 0.0
    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None
    e2e_p50_ms: float | None = None
    e2e_p95_ms: float | None = None
    mean_tokens: float | None = None
    token_source: str = ""
    first_error: str = ""
    texts: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def pct(values: list[float], q: float) -> float | None:
    """Percentile with linear interpolation; None for no data."""
    if not values:
        return None
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    k = (len(v) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 1)


async def chat_once(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                    timeout: float) -> ChatResult:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft = None
    chunks = 0
    usage_tokens = None
    parts: list[str] = []
    try:
        async with client.stream("POST", url, json=body, timeout=timeout) as r:
            if r.status_code != 200:
                txt = (await r.aread()).decode(errors="replace")[:300]
                return ChatResult(ok=False, error=f"HTTP {r.status_code}: {txt}")
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                for ch in msg.get("choices") or []:
                    content = (ch.get("delta") or {}).get("content")
                    if content:
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                        chunks += 1
                        parts.append(content)
                usage = msg.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    usage_tokens = int(usage["completion_tokens"])
    except (TimeoutError, httpx.HTTPError, json.JSONDecodeError) as exc:
        return ChatResult(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
    e2e = time.perf_counter() - t0
    if usage_tokens is not None:
        tokens, source = usage_tokens, "usage"
    else:
        tokens, source = chunks, "deltas"
    return ChatResult(ok=True, ttft=ttft, e2e=e2e, tokens=tokens, token_source=source, text="".join(parts))


async def embed_once(post: Callable[[list[str]], Awaitable[tuple[int, bytes]]], inputs: list[str],
                     client_errors: tuple[type[Exception], ...]) -> EmbedResult:
    """One request through `post` (inputs -> status, body), whichever HTTP client it uses."""
    t0 = time.perf_counter()
    try:
        status, body = await post(inputs)
        if status != 200:
            return EmbedResult(ok=False, error=f"HTTP {status}: {body[:300]!r}")
        data = json.loads(body)["data"]
    except (*client_errors, ValueError, KeyError) as exc:
        return EmbedResult(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
    e2e = time.perf_counter() - t0
    if len(data) != len(inputs):
        return EmbedResult(ok=False, error=f"asked {len(inputs)} embeddings, got {len(data)}")
    return EmbedResult(ok=True, e2e=e2e, sentences=len(inputs), dim=len(data[0]["embedding"]))


async def _closed_loop(concurrency: int, per_client: int, max_seconds: float, fn):
    """Run `fn(i)` from `concurrency` workers; request i is global and unique. Returns (results, wall)."""
    counter = iter(range(10**9))
    results: list = []
    start = time.perf_counter()
    deadline = start + max_seconds

    async def worker() -> None:
        for _ in range(per_client):
            if time.perf_counter() >= deadline:
                return
            results.append(await fn(next(counter)))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - start


def _client(concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0), trust_env=False)


async def run_chat(base_url: str, model: str, concurrency: int, per_client: int, max_seconds: float,
                   max_tokens: int = 64, timeout: float = 300.0, keep_texts: bool = False,
                   long: bool = False, first_id: int = 0) -> Summary:
    """`long`: each request a distinct ~1,400-token prompt (see long_prompt) instead of a short question,
    numbered from `first_id`."""
    url = base_url.rstrip("/") + "/v1/chat/completions"
    async with _client(concurrency) as client:
        async def one(i: int) -> tuple[str, ChatResult]:
            prompt = long_prompt(first_id + i) if long else CHAT_PROMPTS[i % len(CHAT_PROMPTS)]
            return prompt, await chat_once(client, url, model, prompt, max_tokens, timeout)

        pairs, wall = await _closed_loop(concurrency, per_client, max_seconds, one)
    results = [r for _, r in pairs]
    ok = [r for r in results if r.ok]
    errs = [r for r in results if not r.ok]
    tokens = sum(r.tokens for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    e2es = [r.e2e for r in ok if r.e2e is not None]
    sources = sorted({r.token_source for r in ok})
    s = Summary(
        kind="long" if long else "chat", concurrency=concurrency, requests=len(results), errors=len(errs), wall_s=round(wall, 3),
        tok_s=round(tokens / wall, 2) if ok else None, req_s=round(len(ok) / wall, 3),
        ttft_p50_ms=_ms(pct(ttfts, 0.5)), ttft_p95_ms=_ms(pct(ttfts, 0.95)),
        e2e_p50_ms=_ms(pct(e2es, 0.5)), e2e_p95_ms=_ms(pct(e2es, 0.95)),
        mean_tokens=round(statistics.fmean(r.tokens for r in ok), 1) if ok else None,
        token_source="+".join(sources), first_error=errs[0].error if errs else "",
    )
    if keep_texts:
        for prompt, r in pairs:
            if r.ok:
                s.texts.setdefault(prompt, r.text)
    return s


async def run_embed(base_url: str, model: str, concurrency: int, batch: int, per_client: int,
                    max_seconds: float, timeout: float = 300.0) -> Summary:
    """BENCH_EMBED_CLIENT=aiohttp sends the same requests with aiohttp, a client that costs less CPU per
    request than httpx at 32 connections (the client shares the box's cores with the server)."""
    url = base_url.rstrip("/") + "/v1/embeddings"
    n = len(SENTENCES)

    def inputs(i: int) -> list[str]:
        start = (i * batch) % n
        return [SENTENCES[(start + j) % n] for j in range(batch)]

    def body(texts: list[str]) -> dict:
        return {"model": model, "input": texts}

    if os.environ.get("BENCH_EMBED_CLIENT") == "aiohttp":
        import aiohttp

        connector = aiohttp.TCPConnector(limit=concurrency + 4)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async def post(texts: list[str]) -> tuple[int, bytes]:
                async with s.post(url, json=body(texts)) as r:
                    return r.status, await r.read()

            results, wall = await _closed_loop(concurrency, per_client, max_seconds,
                                               lambda i: embed_once(post, inputs(i), (aiohttp.ClientError,)))
    else:
        async with _client(concurrency) as client:
            async def post(texts: list[str]) -> tuple[int, bytes]:
                r = await client.post(url, json=body(texts), timeout=timeout)
                return r.status_code, r.content

            results, wall = await _closed_loop(concurrency, per_client, max_seconds,
                                               lambda i: embed_once(post, inputs(i), (httpx.HTTPError,)))
    ok = [r for r in results if r.ok]
    errs = [r for r in results if not r.ok]
    e2es = [r.e2e for r in ok if r.e2e is not None]
    return Summary(
        kind="embed", concurrency=concurrency, batch=batch, requests=len(results), errors=len(errs),
        wall_s=round(wall, 3), sent_s=round(sum(r.sentences for r in ok) / wall, 2) if ok else None,
        req_s=round(len(ok) / wall, 3), e2e_p50_ms=_ms(pct(e2es, 0.5)), e2e_p95_ms=_ms(pct(e2es, 0.95)),
        first_error=errs[0].error if errs else "",
    )


def main() -> None:
    """Ad-hoc use: python -m bench.load chat|embed URL MODEL CONCURRENCY [BATCH]."""
    import sys

    kind, url, model, conc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if kind == "chat":
        s = asyncio.run(run_chat(url, model, conc, per_client=4, max_seconds=30, keep_texts=True))
    else:
        batch = int(sys.argv[5]) if len(sys.argv) > 5 else 1
        s = asyncio.run(run_embed(url, model, conc, batch, per_client=20, max_seconds=30))
    print(json.dumps(s.to_dict(), indent=2))


if __name__ == "__main__":
    main()
