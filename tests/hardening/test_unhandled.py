"""An unhandled error is a 500 in OpenAI's shape that carries X-Request-Id, is counted, and leaks nothing."""

from __future__ import annotations

import threading
import time

import httpx
import uvicorn

from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import free_port
from tests.e2e.test_operations import sample


def test_unhandled_error_is_a_counted_500_with_request_id(tmp_path):
    app = create_app(Settings(models=[], auth="off", home=tmp_path))

    @app.get("/v1/boom")
    async def boom():
        raise RuntimeError("internal detail /secret/path")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        before = sample(httpx.get(base + "/metrics", timeout=30).text, "fmgate_requests_total", status="500")
        r = httpx.get(base + "/v1/boom", headers={"X-Request-Id": "boom-1"}, timeout=30)
        assert r.status_code == 500
        assert r.headers["x-request-id"] == "boom-1"
        assert r.json()["error"]["type"] == "server_error"
        assert "secret" not in r.text and "Traceback" not in r.text
        after = sample(httpx.get(base + "/metrics", timeout=30).text, "fmgate_requests_total", status="500")
        assert after == before + 1
    finally:
        server.should_exit = True
        thread.join(30)
