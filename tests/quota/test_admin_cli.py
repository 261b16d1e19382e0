"""The admin API (/admin/keys, /admin/usage) and `fmgate keys`, on both backends."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi import FastAPI
from typer.testing import CliRunner

from gateway import errors
from gateway.api import admin
from gateway.cli_keys import keys_app
from tests.quota.conftest import bearer, new_key

ADMIN = "adm-" + "x" * 40


def _app(gk, settings) -> FastAPI:
    app = FastAPI()
    errors.install(app)
    app.include_router(admin.router)
    app.state.settings = settings
    app.state.gatekeeper = gk
    return app


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def test_admin_api_lifecycle(qenv):
    settings = qenv.settings(admin_key=ADMIN)
    gk = await qenv.gk(settings=settings)
    h = {"authorization": f"Bearer {ADMIN}"}
    async with _client(_app(gk, settings)) as c:
        r = await c.post("/admin/keys", headers=h, json={"name": "team-a", "rpm": 10, "tokens_per_day": 1000,
                                                         "models": ["m1"]})
        assert r.status_code == 201 and r.headers["cache-control"] == "no-store"
        created = r.json()
        secret, kid = created["key"], created["id"]
        assert secret.startswith("fm-") and created["rpm"] == 10 and created["models"] == ["m1"]

        p = await gk.authenticate(bearer(secret))
        await (await gk.admit(p, "m1", 50)).settle(12, 8)

        r = await c.get("/admin/keys", headers=h)
        assert r.status_code == 200 and [k["id"] for k in r.json()["data"]] == [kid]
        assert secret not in r.text and created["id"] in r.text
        assert (await c.get(f"/admin/keys/{kid}", headers=h)).json()["name"] == "team-a"

        r = await c.get("/admin/usage", headers=h, params={"key_id": kid})
        body = r.json()
        assert body["totals"] == {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20, "requests": 1}
        assert body["data"][0]["model"] == "m1"
        assert (await c.get("/admin/usage", headers=h, params={"start": "nope"})).status_code == 400

        r = await c.delete(f"/admin/keys/{kid}", headers=h)
        assert r.status_code == 200 and r.json()["revoked_at"]
        with pytest.raises(errors.APIError):
            await gk.authenticate(bearer(secret))
        assert (await c.delete("/admin/keys/nope", headers=h)).status_code == 404
        r = await c.post("/admin/keys", headers=h, json={"name": "x", "rpm": -1})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


async def test_admin_api_refuses_anything_but_the_admin_key(qenv):
    settings = qenv.settings(admin_key=ADMIN)
    gk = await qenv.gk(settings=settings)
    user_secret, _ = await new_key(gk)
    async with _client(_app(gk, settings)) as c:
        for auth in (None, f"Bearer {user_secret}", "Bearer wrong", f"Basic {ADMIN}", ADMIN):
            headers = {"authorization": auth} if auth else {}
            for method, path in (("GET", "/admin/keys"), ("POST", "/admin/keys"), ("GET", "/admin/usage"),
                                 ("DELETE", "/admin/keys/abc")):
                r = await c.request(method, path, headers=headers, json={"name": "x"})
                assert r.status_code == 401, (auth, path)
                assert r.json()["error"]["type"] == "authentication_error"
                assert user_secret not in r.text and ADMIN not in r.text


async def test_admin_api_disabled_without_admin_key(qenv):
    settings = qenv.settings()
    gk = await qenv.gk(settings=settings)
    async with _client(_app(gk, settings)) as c:
        r = await c.get("/admin/keys", headers={"authorization": "Bearer "})
        assert r.status_code == 401 and "FMGATE_ADMIN_KEY" in r.json()["error"]["message"]


def _cli(args: list[str], env: dict[str, str]):
    result = CliRunner().invoke(keys_app, args, env=env)
    return result


def test_cli_create_list_revoke_usage(tmp_path, backend, request, prefix):
    import asyncio

    from gateway.quota import Gatekeeper
    from gateway.settings import Settings

    env = {"FMGATE_HOME": str(tmp_path / "home"), "FMGATE_REDIS_PREFIX": prefix, "FMGATE_REDIS_URL": ""}
    if backend == "redis":
        env["FMGATE_REDIS_URL"] = request.getfixturevalue("redis_url")
    r = _cli(["create", "--name", "ci", "--rpm", "5", "--tpm", "500", "--tokens-per-day", "900",
              "--tokens-per-month", "9000", "--max-concurrent", "2", "--models", "a,b", "--json"], env)
    assert r.exit_code == 0, r.output
    created = json.loads(r.stdout)
    secret, kid = created["key"], created["id"]
    assert created["tokens_per_month"] == 9000 and created["models"] == ["a", "b"]

    r = _cli(["create", "--name", "plain"], env)
    assert r.exit_code == 0 and r.stdout.strip().startswith("fm-") and len(r.stdout.strip().splitlines()) == 1

    # The server side sees the key and records usage for it.
    async def use():
        s = Settings(home=tmp_path / "home", redis_url=env["FMGATE_REDIS_URL"] or None)
        gk = await Gatekeeper.create(s, prefix=prefix)
        try:
            p = await gk.authenticate(bearer(secret))
            assert p.models == ("a", "b")
            await (await gk.admit(p, "a", 10)).settle(3, 4)
        finally:
            await gk.close()

    asyncio.run(use())

    r = _cli(["list", "--json"], env)
    listed = json.loads(r.stdout)
    assert {k["name"] for k in listed} == {"ci", "plain"} and secret not in r.stdout
    r = _cli(["list"], env)
    assert r.exit_code == 0 and kid in r.stdout and secret not in r.stdout

    r = _cli(["usage", "--json", "--key", kid], env)
    rows = json.loads(r.stdout)
    assert [(x["model"], x["prompt_tokens"], x["completion_tokens"], x["requests"]) for x in rows] == [("a", 3, 4, 1)]
    assert _cli(["usage"], env).exit_code == 0

    r = _cli(["revoke", kid], env)
    assert r.exit_code == 0 and "Revoked" in r.stdout
    assert json.loads(_cli(["list", "--json"], env).stdout)[0]["revoked_at"]
    assert _cli(["revoke", "nope"], env).exit_code == 1
    if backend == "redis":
        from tests.quota.conftest import _drop_prefix

        _drop_prefix(env["FMGATE_REDIS_URL"], prefix)


def test_cli_reports_unreachable_redis(tmp_path, prefix):
    from tests.conftest import free_port

    env = {"FMGATE_HOME": str(tmp_path), "FMGATE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
           "FMGATE_REDIS_PREFIX": prefix}
    r = _cli(["create", "--name", "x"], env)
    assert r.exit_code == 1 and "no key was created" in r.output
