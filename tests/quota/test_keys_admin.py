"""Keys an admin can run a business on (#15): edit, expiry, allow-lists, per-model limits, usage export,
audit log — on both backends, through the Gatekeeper, the admin API and the CLI."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time

import pytest
from typer.testing import CliRunner

from gateway.cli_keys import keys_app
from gateway.errors import APIError
from gateway.quota.keys import ModelLimits
from tests.quota.conftest import bearer, new_key
from tests.quota.test_admin_cli import ADMIN, _app, _client


async def refused(coro) -> APIError:
    with pytest.raises(APIError) as info:
        await coro
    return info.value


async def admit_settle(gk, secret, model="m", reserve=10, used=(5, 5)):
    p = await gk.authenticate(bearer(secret))
    gk.check_model(p, model)
    g = await gk.admit(p, model, reserve)
    await g.settle(*used)
    return g


async def eventually(make, timeout: float = 5.0):
    """Await make() until it returns without raising; its result. Fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await make()
        except (APIError, AssertionError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def weighted(gk, secret, weight):
    p = await gk.authenticate(bearer(secret))
    assert p.weight == weight
    return p


async def test_edit_limits_in_force_on_another_process(qenv):
    gk = await qenv.gk()
    other = await qenv.gk()  # another replica (memory mode: the same store, like the CLI)
    secret, rec = await new_key(gk, rpm=2)
    for _ in range(2):
        await admit_settle(other, secret)
    assert (await refused(admit_settle(other, secret))).status == 429
    await gk.edit_key(rec.id, {"rpm": 4, "weight": 3.0, "owner": "acme", "tags": ["prod", "eu"]})
    # The other process's cached record is at most 0.5 s old; poll with a generous deadline.
    await eventually(lambda: admit_settle(other, secret))
    p = await eventually(lambda: weighted(other, secret, 3.0))
    assert p.weight == 3.0 and p.tenant == rec.id
    shown = next(r for r in await other.list_keys() if r.id == rec.id).public()
    assert shown["rpm"] == 4 and shown["owner"] == "acme" and shown["tags"] == ["prod", "eu"]


async def test_expiry_stops_a_key(qenv):
    gk = await qenv.gk()
    other = await qenv.gk()
    secret, rec = await new_key(gk)
    await admit_settle(other, secret)
    await gk.edit_key(rec.id, {"expires_at": time.time() - 1})
    # In Redis mode the admission script checks the expiry itself, so even a cached record is refused.
    deadline = time.monotonic() + 5
    while True:
        try:
            await admit_settle(other, secret)
        except APIError as e:
            assert e.status == 401 and "expired" in e.message
            break
        assert qenv.backend == "memory" and time.monotonic() < deadline
        await asyncio.sleep(0.1)
    e = await refused(gk.authenticate(bearer(secret)))
    assert e.status == 401 and "expired" in e.message
    await gk.edit_key(rec.id, {"expires_at": None})  # un-expire
    await admit_settle(gk, secret)


async def test_edit_never_undoes_a_revocation(qenv):
    gk = await qenv.gk()
    secret, rec = await new_key(gk)
    await gk.revoke_key(rec.id)
    new = await gk.edit_key(rec.id, {"rpm": 5, "name": "renamed"})
    assert new.revoked and new.name == "renamed"
    assert (await refused(gk.authenticate(bearer(secret)))).status == 401
    assert await gk.edit_key("000000000000", {"rpm": 1}) is None


async def test_allow_list_edit(qenv):
    gk = await qenv.gk()
    secret, rec = await new_key(gk, models=["a"])
    await admit_settle(gk, secret, "a")
    p = await gk.authenticate(bearer(secret))
    with pytest.raises(APIError) as info:
        gk.check_model(p, "b")
    assert info.value.status == 403
    await gk.edit_key(rec.id, {"models": ["b"]})
    await admit_settle(gk, secret, "b")
    e = await refused(admit_settle(gk, secret, "a"))
    assert e.status == 403 and e.code == "model_not_allowed"
    await gk.edit_key(rec.id, {"models": None})
    await admit_settle(gk, secret, "a")


async def test_allow_list_checked_at_admission_even_with_a_stale_principal(renv):
    gk = await renv.gk()
    secret, rec = await new_key(gk, models=["a"])
    p = await gk.authenticate(bearer(secret))
    other = await renv.gk()
    await other.edit_key(rec.id, {"models": ["b"]})  # gk's cache still says "a"
    e = await refused(gk.admit(p, "a", 1))
    assert e.status == 403 and e.code == "model_not_allowed"


async def test_per_model_limits(qenv):
    gk = await qenv.gk()
    secret, rec = await new_key(gk, rpm=10, model_limits={"big": ModelLimits(rpm=2)})
    # `model_limits` as a create argument goes through the same path as an edit.
    assert rec.model_limits == {"big": ModelLimits(rpm=2)}
    for _ in range(2):
        await admit_settle(gk, secret, "big")
    e = await refused(admit_settle(gk, secret, "big"))
    assert e.status == 429 and "model 'big'" in e.message and e.code == "rate_limit_exceeded"
    assert int(e.headers["retry-after"]) >= 1
    # Other models still have the key's own limit left; the refusal on "big" charged nothing.
    for _ in range(8):
        await admit_settle(gk, secret, "small")
    e = await refused(admit_settle(gk, secret, "small"))
    assert e.status == 429 and "model" not in e.message


async def test_per_model_budget_and_tpm(qenv):
    gk = await qenv.gk()
    secret, rec = await new_key(gk)
    await gk.edit_key(rec.id, {"model_limits": {"big": ModelLimits(tokens_per_day=100, tpm=60)}})
    await admit_settle(gk, secret, "big", reserve=50, used=(20, 0))   # 20 charged after the refund
    e = await refused(admit_settle(gk, secret, "big", reserve=61))
    assert e.status == 429 and "Request too large" in e.message and "model 'big'" in e.message
    await admit_settle(gk, secret, "big", reserve=40, used=(40, 0))   # tpm: 60 of 60 used
    e = await refused(admit_settle(gk, secret, "big", reserve=10))
    assert e.status == 429 and "tokens per minute" in e.message
    await gk.edit_key(rec.id, {"model_limits": {"big": ModelLimits(tokens_per_day=70)}})  # tpm gone
    e = await refused(admit_settle(gk, secret, "big", reserve=11))  # day: 60 + 11 > 70
    assert e.status == 429 and e.code == "insufficient_quota" and "model 'big'" in e.message
    await admit_settle(gk, secret, "big", reserve=10)
    await gk.edit_key(rec.id, {"model_limits": {"big": None}})
    await admit_settle(gk, secret, "big", reserve=1000)


async def test_admin_api_edit_usage_export_and_audit(qenv):
    settings = qenv.settings(admin_key=ADMIN)
    gk = await qenv.gk(settings=settings)
    h = {"authorization": f"Bearer {ADMIN}"}
    async with _client(_app(gk, settings)) as c:
        r = await c.post("/admin/keys", headers=h, json={
            "name": "shop", "owner": "alice", "tags": ["prod"], "expires_at": "2099-01-01T00:00:00Z",
            "model_limits": {"big": {"rpm": 5}}, "weight": 2})
        assert r.status_code == 201, r.text
        secret, kid = r.json()["key"], r.json()["id"]
        body = r.json()
        assert body["expires_at"] == "2099-01-01T00:00:00Z" and body["owner"] == "alice" and body["weight"] == 2.0
        assert body["model_limits"] == {"big": {"rpm": 5, "tpm": None, "tokens_per_day": None,
                                                "tokens_per_month": None}}
        r = await c.patch(f"/admin/keys/{kid}", headers=h, json={
            "name": "shop-2", "rpm": 50, "models": ["big", "small"], "tags": ["prod", "eu"],
            "model_limits": {"big": None, "small": {"tpm": 1000}}, "expires_at": None})
        assert r.status_code == 200, r.text
        k = r.json()
        assert (k["name"], k["rpm"], k["models"], k["tags"], k["expires_at"], k["owner"]) == (
            "shop-2", 50, ["big", "small"], ["prod", "eu"], None, "alice")
        assert list(k["model_limits"]) == ["small"] and k["model_limits"]["small"]["tpm"] == 1000
        # Absent fields stay; null clears a limit.
        r = await c.patch(f"/admin/keys/{kid}", headers=h, json={"rpm": None})
        assert r.json()["rpm"] is None and r.json()["name"] == "shop-2"
        for bad in ({"rpm": -1}, {"expires_at": "soon"}, {"bogus": 1}, {"name": None}, {"weight": 0}):
            r = await c.patch(f"/admin/keys/{kid}", headers=h, json=bad)
            assert r.status_code in (400, 422) and r.json()["error"]["type"] == "invalid_request_error", (bad, r.text)
        assert (await c.patch("/admin/keys/000000000000", headers=h, json={"rpm": 1})).status_code == 404
        assert (await c.patch(f"/admin/keys/{kid}", headers={"authorization": f"Bearer {secret}"},
                              json={"rpm": 1})).status_code == 401

        await admit_settle(gk, secret, "big", used=(3, 4))
        await admit_settle(gk, secret, "big", used=(1, 1))
        await admit_settle(gk, secret, "small", used=(2, 0))
        r = await c.get("/admin/usage", headers=h, params={"key_id": kid, "model": "big"})
        rows = r.json()["data"]
        assert [(x["model"], x["requests"], x["prompt_tokens"], x["completion_tokens"]) for x in rows] == [
            ("big", 2, 4, 5)]
        r = await c.get("/admin/usage", headers=h, params={"key_id": kid, "format": "csv"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        table = list(csv.DictReader(io.StringIO(r.text)))
        assert {(x["model"], x["requests"], x["total_tokens"], x["key_name"]) for x in table} == {
            ("big", "2", "9", "shop-2"), ("small", "1", "2", "shop-2")}
        assert (await c.get("/admin/usage", headers=h, params={"format": "xml"})).status_code in (400, 422)

        await c.delete(f"/admin/keys/{kid}", headers=h)
        r = await c.get("/admin/audit", headers=h, params={"key_id": kid})
        entries = r.json()["data"]
        assert [e["action"] for e in entries] == ["key.revoke", "key.edit", "key.edit", "key.create"]
        assert all(e["actor"].startswith("admin-api@") and e["at"].endswith("Z") for e in entries)
        assert entries[1]["detail"] == {"rpm": None}
        assert entries[2]["detail"]["model_limits"]["big"] is None
        text = json.dumps(entries)
        assert secret not in text and secret[3:20] not in text
        rec = next(r for r in await gk.list_keys() if r.id == kid)
        assert rec.hash not in text


def test_cli_edit_usage_csv_and_audit(tmp_path, monkeypatch):
    monkeypatch.setenv("FMGATE_HOME", str(tmp_path))
    monkeypatch.delenv("FMGATE_REDIS_URL", raising=False)
    cli = CliRunner()

    def run(*args):
        r = cli.invoke(keys_app, list(args))
        assert r.exit_code == 0, r.output
        return r.stdout

    created = json.loads(run("create", "--name", "cli", "--rpm", "5", "--owner", "bob", "--tag", "a,b",
                             "--model-limit", "big:rpm=2,tpm=100", "--expires", "2099-01-01", "--json"))
    kid = created["id"]
    assert created["model_limits"]["big"]["tpm"] == 100 and created["tags"] == ["a", "b"]
    assert created["expires_at"] == "2099-01-01T00:00:00Z"
    edited = json.loads(run("edit", kid, "--rpm", "0", "--weight", "4", "--models", "big,small",
                            "--clear-model-limit", "big", "--model-limit", "small:tokens_per_day=9",
                            "--expires", "never", "--json"))
    assert edited["rpm"] is None and edited["weight"] == 4.0 and edited["models"] == ["big", "small"]
    assert edited["model_limits"] == {"small": {"rpm": None, "tpm": None, "tokens_per_day": 9,
                                                "tokens_per_month": None}}
    assert edited["expires_at"] is None and edited["owner"] == "bob"
    assert json.loads(run("show", kid))["weight"] == 4.0
    for bad in (["edit", kid], ["edit", kid, "--model-limit", "big:rps=1"], ["edit", kid, "--expires", "x"],
                ["edit", kid, "--weight", "0"]):
        assert cli.invoke(keys_app, bad).exit_code == 2, bad
    assert cli.invoke(keys_app, ["edit", "000000000000", "--rpm", "1"]).exit_code == 1
    assert run("usage", "--csv").splitlines()[0] == (
        "date,key_id,key_name,model,requests,prompt_tokens,completion_tokens,total_tokens")
    audit = json.loads(run("audit", "--json"))
    assert [e["action"] for e in audit] == ["key.edit", "key.create"]
    assert audit[0]["actor"].startswith("cli:") and audit[0]["detail"]["weight"] == 4.0
    assert "key.edit" in run("audit")
