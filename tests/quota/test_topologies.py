"""The Redis limiter against a real Sentinel and a real 3-master Cluster, through redis-py's own clients."""

from __future__ import annotations

import pytest

from gateway.errors import APIError
from gateway.quota.keys import ModelLimits
from tests.quota.conftest import QuotaEnv, bearer, new_key


@pytest.fixture(params=["sentinel", "cluster"])
def tenv(request, tmp_path, prefix) -> QuotaEnv:
    return QuotaEnv(tmp_path, "redis", request.getfixturevalue(f"{request.param}_url"), prefix)


async def test_limits_edit_expiry_and_audit_on_topology(tenv):
    gk = await tenv.gk()
    other = await tenv.gk(home=tenv.tmp / "other")  # a second replica with its own SQLite
    secret, rec = await new_key(gk, rpm=3, models=["a", "b"], model_limits={"b": ModelLimits(rpm=1)})
    # Every key lives under one hash tag: the cluster keeps a script's keys in one slot.
    tags = {k[: k.index("}") + 1] for k in gk.redis.keys(rec.id, "b")}
    assert len(tags) == 1
    p = await other.authenticate(bearer(secret))
    g = await other.admit(p, "b", 5)
    await g.renew()  # the lease renewal pipeline
    await other.redis.sync(full=True)  # the mirror into SQLite
    await g.settle(2, 3)
    with pytest.raises(APIError) as e:
        await other.admit(p, "b", 5)  # per-model rpm 1
    assert e.value.status == 429 and "model 'b'" in e.value.message
    for _ in range(2):
        await (await other.admit(p, "a", 5)).settle(1, 1)
    with pytest.raises(APIError) as e:
        await other.admit(p, "a", 5)  # key rpm 3
    assert e.value.status == 429
    await gk.edit_key(rec.id, {"rpm": 10, "models": ["a"]})
    await (await other.admit(p, "a", 5)).settle(1, 1)  # the script reads the new limit at once
    with pytest.raises(APIError) as e:
        await other.admit(p, "b", 5)  # the script reads the new allow-list at once
    assert e.value.status == 403
    await gk.edit_key(rec.id, {"expires_at": 1.0})
    with pytest.raises(APIError) as e:
        await other.admit(p, "a", 5)
    assert e.value.status == 401 and "expired" in e.value.message
    await gk.revoke_key(rec.id)
    rows = await other.usage(rec.id)
    assert sum(r["requests"] for r in rows) == 4
    assert [a["action"] for a in await other.audit(rec.id)] == ["key.revoke", "key.edit", "key.edit", "key.create"]
    assert await gk.ready() and await other.ready()
