"""The Live page's data: the process's own prometheus collectors, sampled into a ring of the last minutes."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field

from .. import metrics

INTERVAL_S = 2.0
HISTORY_S = 300.0
WINDOW_S = 30.0  # latency percentiles over the observations of the last half minute


@dataclass
class Snapshot:
    t: float
    completion_tokens: float
    requests: float
    rejected: float  # 429s
    errors: float  # 5xx
    queue: float
    running: float
    ttft: list[tuple[float, float]] = field(default_factory=list)  # cumulative (le, count), summed over models
    tpot: list[tuple[float, float]] = field(default_factory=list)


def _samples(collector, suffix: str = ""):
    for family in collector.collect():
        for s in family.samples:
            if s.name == family.name + suffix:
                yield s


def _total(collector, suffix: str = "_total") -> float:
    return sum(s.value for s in _samples(collector, suffix))


def _buckets(histogram) -> list[tuple[float, float]]:
    sums: dict[float, float] = {}
    for s in _samples(histogram, "_bucket"):
        le = float(s.labels["le"])
        sums[le] = sums.get(le, 0.0) + s.value
    return sorted(sums.items())


def snapshot() -> Snapshot:
    requests = rejected = errors = 0.0
    for s in _samples(metrics.REQUESTS, "_total"):
        if not s.labels["route"].startswith("/v1/"):
            continue
        requests += s.value
        code = s.labels["status"]
        rejected += s.value if code == "429" else 0.0
        errors += s.value if code.startswith("5") else 0.0
    return Snapshot(
        t=time.time(), completion_tokens=_total(metrics.COMPLETION_TOKENS), requests=requests,
        rejected=rejected, errors=errors, queue=_total(metrics.QUEUE_DEPTH, ""),
        running=_total(metrics.RUNNING_SEQS, ""), ttft=_buckets(metrics.TTFT_SECONDS),
        tpot=_buckets(metrics.TPOT_SECONDS),
    )


def quantile(q: float, old: list[tuple[float, float]], new: list[tuple[float, float]]) -> float | None:
    """The q-quantile of what was observed between two cumulative bucket snapshots, interpolated linearly
    inside the bucket as Prometheus's histogram_quantile does; None when nothing was observed."""
    before = dict(old)
    counts = [(le, c - before.get(le, 0.0)) for le, c in new]
    if not counts or counts[-1][1] <= 0:
        return None
    rank = q * counts[-1][1]
    lower, below = 0.0, 0.0
    for le, c in counts:
        if c >= rank:
            if math.isinf(le):
                return lower  # past the last finite bucket: its bound is the best we know
            inside = c - below
            return lower + (le - lower) * ((rank - below) / inside if inside > 0 else 1.0)
        lower, below = le, c
    return lower


def point(prev: Snapshot, cur: Snapshot, window: Snapshot) -> dict:
    dt = max(cur.t - prev.t, 1e-6)

    def rate(name: str) -> float:
        return max(getattr(cur, name) - getattr(prev, name), 0.0) / dt

    return {
        "t": round(cur.t, 3),
        "tokens_per_s": rate("completion_tokens"),
        "requests_per_s": rate("requests"),
        "rejected_per_s": rate("rejected"),
        "errors_per_s": rate("errors"),
        "queue_depth": cur.queue,
        "running": cur.running,
        "ttft_p50": quantile(0.5, window.ttft, cur.ttft),
        "ttft_p95": quantile(0.95, window.ttft, cur.ttft),
        "tpot_p50": quantile(0.5, window.tpot, cur.tpot),
        "tpot_p95": quantile(0.95, window.tpot, cur.tpot),
    }


class Sampler:
    """Keeps the last HISTORY_S of points; one snapshot every INTERVAL_S while the app runs."""

    def __init__(self, interval: float = INTERVAL_S, history: float = HISTORY_S, window: float = WINDOW_S):
        self.interval = interval
        self.points: deque[dict] = deque(maxlen=int(history / interval))
        self.snaps: deque[Snapshot] = deque(maxlen=int(window / interval) + 1)

    def sample(self) -> None:
        cur = snapshot()
        if self.snaps:
            self.points.append(point(self.snaps[-1], cur, self.snaps[0]))
        self.snaps.append(cur)

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)

    def data(self) -> dict:
        return {"object": "live", "interval_s": self.interval, "history_s": self.points.maxlen * self.interval,
                "data": list(self.points)}
