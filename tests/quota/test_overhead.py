"""Admission overhead stays within the issue's targets (p50 <= 1 ms in memory, <= 2 ms with Redis)."""

from __future__ import annotations

import asyncio

import pytest

from bench.quota_overhead import TARGET_P50_MS, measure


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_admission_overhead_p50(backend, request):
    url = request.getfixturevalue("redis_url") if backend == "redis" else None
    r = asyncio.run(measure(backend, 400, url))
    assert r["admit_p50_ms"] <= TARGET_P50_MS[backend], r
