"""Event-loop stall: /healthz latency while the largest requests each route accepts are being served.

    python -m bench.loop_latency --url http://127.0.0.1:8000      # against a running `fmgate serve`

The goal is /healthz p99 < 50 ms. tests/e2e/test_event_loop.py runs the same workloads with a generous
bound (a multi-second stall fails it; a busy CI box does not).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import httpx

CHAT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-minilm-l6-v2"
BODY = 4 * 1024 * 1024 - 64 * 1024  # just under the default body cap


def workloads(chat: str = CHAT_MODEL, embed: str = EMBED_MODEL) -> dict[str, tuple[str, dict, set[int]]]:
    """name -> (path, body, accepted statuses). "big" bodies fill the body cap and are refused only after
    tokenizing (the loop must not do that); "max" ones are the largest the server then serves."""
    word = "lorem ipsum dolor sit amet "
    return {
        "chat big": ("/v1/chat/completions", {
            "model": chat, "max_tokens": 1,
            "messages": [{"role": "user", "content": word * (BODY // 256 // len(word))}] * 256}, {400}),
        "chat max": ("/v1/chat/completions", {
            "model": chat, "n": 8, "max_tokens": 8, "stop": ["a", "b", "c", "d"],
            "messages": [{"role": "user", "content": "Say hi."}] * 64}, {200}),
        "completions big": ("/v1/completions", {
            "model": chat, "max_tokens": 1, "prompt": [word * (BODY // 32 // len(word))] * 32}, {400}),
        "completions max": ("/v1/completions", {
            "model": chat, "max_tokens": 4, "n": 8, "prompt": ["Once upon a time"] * 4}, {200}),
        "embeddings big": ("/v1/embeddings", {
            "model": embed, "input": [word * (BODY // 64 // len(word))] * 64}, {400}),
        "embeddings max": ("/v1/embeddings", {"model": embed, "input": ["hello world"] * 2048}, {200}),
    }


def probe(url: str, path: str, body: dict, headers: dict | None = None) -> tuple[list[float], int]:
    """Latencies of /healthz (seconds) sampled while one `body` is served; and that request's status."""
    result: dict = {}

    def send() -> None:
        with httpx.Client(timeout=600) as c:
            result["status"] = c.post(url + path, json=body, headers=headers or {}).status_code

    lat: list[float] = []
    with httpx.Client(timeout=60) as c:
        c.get(url + "/healthz")
        t = threading.Thread(target=send)
        t.start()
        while t.is_alive():
            t0 = time.perf_counter()
            c.get(url + "/healthz")
            lat.append(time.perf_counter() - t0)
            time.sleep(0.005)
        t.join()
    return lat, result.get("status", 0)


def p99(values: list[float]) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    args = ap.parse_args()
    rows = {}
    for name, (path, body, _) in workloads().items():
        lat, status = probe(args.url, path, body)
        rows[name] = {"status": status, "samples": len(lat), "p50_ms": round(statistics.median(lat) * 1e3, 1),
                      "p99_ms": round(p99(lat) * 1e3, 1), "max_ms": round(max(lat) * 1e3, 1)}
        print(f"{name:18} status {status}  n={len(lat):4}  p50 {rows[name]['p50_ms']:7.1f} ms  "
              f"p99 {rows[name]['p99_ms']:7.1f} ms  max {rows[name]['max_ms']:7.1f} ms  (goal p99 < 50 ms)")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
