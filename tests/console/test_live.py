"""The console's server side without models: routes, headers, auth, and the live sampler's arithmetic."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from gateway import errors, metrics
from gateway.console import live
from gateway.console.router import CSP
from gateway.console.router import router as console_router
from gateway.settings import Settings

ADMIN = "console-unit-" + "a" * 24


@pytest.fixture
def client():
    app = FastAPI()
    app.state.settings = Settings(admin_key=ADMIN, models=[])
    app.state.registry = SimpleNamespace(models={})
    errors.install(app)
    app.include_router(console_router)
    with TestClient(app) as c:
        yield c


def test_pages_carry_a_strict_csp_and_redirect_from_root(client):
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/console/"
    r = client.get("/console/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert r.headers["content-security-policy"] == CSP
    assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP
    assert "<script>" not in r.text and "style=" not in r.text  # nothing inline for the CSP to refuse
    js = client.get("/console/static/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert client.get("/console/static/vendor/uPlot.iife.min.js").status_code == 200


def test_only_packaged_files_are_served(client):
    for name in ("../router.py", "..%2Frouter.py", "nope.js", "vendor/../../live.py"):
        assert client.get(f"/console/static/{name}").status_code == 404


def test_admin_apis_need_the_admin_key(client):
    assert client.get("/console/api/live").status_code == 401
    assert client.get("/console/api/live", headers={"authorization": "Bearer wrong"}).status_code == 401
    r = client.get("/console/api/live", headers={"authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200 and r.json()["object"] == "live"
    r = client.get("/console/api/models", headers={"authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200 and r.json()["data"] == []


def test_quantile_interpolates_inside_buckets():
    old = [(0.1, 0.0), (0.5, 0.0), (1.0, 0.0), (math.inf, 0.0)]
    new = [(0.1, 10.0), (0.5, 20.0), (1.0, 20.0), (math.inf, 20.0)]
    assert live.quantile(0.5, old, new) == pytest.approx(0.1)
    assert live.quantile(0.75, old, new) == pytest.approx(0.3)
    assert live.quantile(0.5, new, new) is None  # nothing observed in between
    only_inf = [(0.1, 0.0), (math.inf, 4.0)]
    assert live.quantile(0.95, [], only_inf) == pytest.approx(0.1)


def test_points_turn_counters_into_rates():
    before = live.snapshot()
    metrics.COMPLETION_TOKENS.labels("console-test").inc(50)
    metrics.REQUESTS.labels("/v1/chat/completions", "console-test", "429").inc()
    metrics.TTFT_SECONDS.labels("console-test").observe(0.2)
    after = live.snapshot()
    before.t, after.t = 100.0, 102.0  # two seconds apart, whatever the box's speed
    p = live.point(before, after, before)
    # At least what this test added (other tests in the process may add more, never less).
    assert p["tokens_per_s"] >= 25.0 and p["rejected_per_s"] >= 0.5 and p["requests_per_s"] >= 0.5
    assert p["ttft_p50"] is not None and 0 < p["ttft_p50"] <= 120


def test_sampler_keeps_a_ring_of_the_last_points():
    s = live.Sampler(interval=1.0, history=10.0, window=5.0)
    for _ in range(25):
        s.sample()
    assert len(s.points) == 10 and len(s.snaps) == 6
    assert s.data()["history_s"] == 10.0


def test_the_app_lifespan_keeps_sampling(client):
    deadline = time.monotonic() + 60
    data: list = []
    while time.monotonic() < deadline and len(data) < 2:
        data = client.get("/console/api/live", headers={"authorization": f"Bearer {ADMIN}"}).json()["data"]
        time.sleep(0.2)
    assert len(data) >= 2 and data[-1]["t"] > data[0]["t"]
