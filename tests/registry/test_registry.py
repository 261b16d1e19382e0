"""The registry's residency rules with fake engines (no model loads): deterministic, no clocks asserted."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gateway.registry import ModelBusy, ModelNotFound, ModelUnavailable, Registry, ServedModel, WrongTask
from gateway.settings import ModelConfig, Settings

MB = 2**20


class FakeEngine:
    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True


def fake_builder(sizes: dict[str, int], gates: dict[str, threading.Event] | None = None, broken=()):
    built: list[str] = []

    def build(cfg: ModelConfig) -> ServedModel:
        if gates and cfg.name in gates:
            gates[cfg.name].wait(60)
        if cfg.name in broken:
            raise RuntimeError(f"cannot read {cfg.source}")
        built.append(cfg.name)
        return ServedModel(cfg, FakeEngine(), "fake", memory_bytes=sizes.get(cfg.name, 100 * MB))

    build.built = built
    return build


def settings(models, **kw) -> Settings:
    return Settings(models=models, **kw)


def cfg(name, task="chat", **kw) -> ModelConfig:
    return ModelConfig(name=name, source=f"src-{name}", task=task, **kw)


def test_errors_and_readiness():
    async def main():
        reg = Registry(settings([cfg("a"), cfg("e", "embed"), cfg("bad"), cfg("lazy", load="on_demand")]),
                       build=fake_builder({}, broken={"bad"}))
        assert not reg.ready()
        await reg.start()
        with pytest.raises(ModelNotFound):
            await reg.acquire("nope", "chat")
        with pytest.raises(WrongTask, match="embeddings only"):
            await reg.acquire("e", "chat")
        with pytest.raises(ModelUnavailable, match="failed to load: cannot read src-bad") as info:
            await reg.acquire("bad", "chat")
        assert info.value.retry_after > 0
        assert not reg.ready()  # "bad" is required (loaded at start by default)
        states = {s["name"]: s for s in reg.status()}
        assert states["bad"]["state"] == "failed" and "cannot read" in states["bad"]["error"]
        assert states["a"]["state"] == "ready" and states["lazy"]["state"] == "unloaded"
        served = await reg.acquire("a", "chat")
        assert served.name == "a" and reg.status()[0]["in_use"] == 1
        reg.release(served)
        assert reg.status()[0]["in_use"] == 0
        await reg.aclose()

        ok = Registry(settings([cfg("a"), cfg("bad", required=False)]), build=fake_builder({}, broken={"bad"}))
        await ok.start()
        assert ok.ready()
        await ok.aclose()

    asyncio.run(main())


def test_lru_idle_model_makes_room_and_in_flight_is_never_unloaded():
    async def main():
        build = fake_builder({"a": 100 * MB, "b": 100 * MB, "c": 100 * MB})
        reg = Registry(settings([cfg("a"), cfg("b"), cfg("c", load="on_demand")], max_loaded_memory=250 * MB),
                       build=build)
        await reg.start()
        a = await reg.acquire("a", "chat")  # a in flight, and the most recently used
        b = await reg.acquire("b", "chat")
        reg.release(b)
        a2 = await reg.acquire("a", "chat")
        reg.release(a2)  # a: used last but still in flight once
        c = await reg.acquire("c", "chat")  # needs room: b is the only idle one
        state = {s["name"]: s["state"] for s in reg.status()}
        assert state == {"a": "ready", "b": "unloaded", "c": "ready"}
        assert b.engine.closed and not a.engine.closed
        reg.release(a)
        reg.release(c)
        # Now both idle; c was used last, so loading b unloads a.
        b2 = await reg.acquire("b", "chat")
        state = {s["name"]: s["state"] for s in reg.status()}
        assert state == {"a": "unloaded", "b": "ready", "c": "ready"}
        reg.release(b2)
        assert reg.ready()  # a required model unloaded by policy still counts as up
        await reg.aclose()

    asyncio.run(main())


def test_no_room_while_everything_is_busy_and_model_count_limit():
    async def main():
        reg = Registry(settings([cfg("a"), cfg("b", load="on_demand")], max_loaded_models=1),
                       build=fake_builder({}))
        await reg.start()
        a = await reg.acquire("a", "chat")
        with pytest.raises(ModelUnavailable, match="Not enough room"):
            await reg.acquire("b", "chat")
        with pytest.raises(ModelBusy):
            await reg.unload("a")
        reg.release(a)
        b = await reg.acquire("b", "chat")
        assert {s["name"]: s["state"] for s in reg.status()} == {"a": "unloaded", "b": "ready"}
        reg.release(b)
        await reg.aclose()

    asyncio.run(main())


def test_waiting_for_a_load_is_bounded_then_served():
    async def main():
        gate = threading.Event()
        reg = Registry(settings([cfg("slow", load="on_demand")], model_load_wait_s=0.2),
                       build=fake_builder({}, gates={"slow": gate}))
        await reg.start()
        assert reg.ready()  # nothing required
        with pytest.raises(ModelUnavailable, match="is loading") as info:
            await reg.acquire("slow", "chat")
        assert info.value.retry_after > 0
        assert reg.status()[0]["state"] == "loading"
        gate.set()
        reg.settings.model_load_wait_s = 60
        served = await reg.acquire("slow", "chat")
        assert served.name == "slow"
        reg.release(served)
        await reg.aclose()

    asyncio.run(main())


def test_keep_alive_zero_unloads_after_last_use_and_per_request_keep_alive():
    async def main():
        reg = Registry(settings([cfg("a", load="on_demand", keep_alive=0), cfg("b", load="on_demand")]),
                       build=fake_builder({}))
        await reg.start()
        a1 = await reg.acquire("a", "chat")
        a2 = await reg.acquire("a", "chat")
        reg.release(a1)
        await asyncio.sleep(0)
        assert reg.status()[0]["state"] == "ready"  # still in use once
        reg.release(a2)
        for _ in range(600):  # the unload runs off the loop; poll
            if reg.status()[0]["state"] == "unloaded":
                break
            await asyncio.sleep(0.05)
        assert reg.status()[0]["state"] == "unloaded"

        b = await reg.acquire("b", "chat", keep_alive=-1)  # negative: stays
        reg.release(b)
        assert reg.status()[1]["expires_at"] is None and reg.status()[1]["keep_alive"] is None
        b = await reg.acquire("b", "chat", keep_alive=120)
        reg.release(b)
        assert reg.status()[1]["expires_at"] is not None and reg.status()[1]["keep_alive"] == 120
        await reg.aclose()

    asyncio.run(main())


def test_admin_add_load_unload():
    async def main():
        reg = Registry(settings([cfg("a")]), build=fake_builder({}))
        await reg.start()
        reg.add(cfg("new", task="embed", load="on_demand"))
        with pytest.raises(ValueError):
            reg.add(cfg("new"))
        slot = await reg.load("new")
        assert slot.state == "ready"
        await reg.unload("new")
        assert reg.slots["new"].state == "unloaded"
        served = await reg.acquire("new", "embed")
        reg.release(served)
        await reg.aclose()

    asyncio.run(main())


def test_deprecated_max_queued_and_sizes():
    from gateway.settings import parse_bytes

    m = ModelConfig(name="x", source="y", max_queued=4)
    assert (m.max_queued_requests, m.max_queued_inputs, m.max_queued) == (4, 128, 4)
    assert parse_bytes("4GiB") == 4 * 2**30 and parse_bytes("512MB") == 512 * 10**6 and parse_bytes("77") == 77
    with pytest.raises(ValueError):
        parse_bytes("lots")
    assert Settings(max_loaded_memory="1GiB").max_loaded_memory == 2**30


def test_budget_change_unloads_idle_models_over_it():
    async def main():
        reg = Registry(settings([cfg("a"), cfg("b"), cfg("c")]), build=fake_builder({}))
        await reg.start()
        a = await reg.acquire("a", "chat")  # in flight: stays whatever the budget
        b = await reg.acquire("b", "chat")
        reg.release(b)  # b is used after c, so c is the least recently used idle one
        await reg.set_budget(max_loaded_memory=250 * MB)
        assert {s["name"]: s["state"] for s in reg.status()} == {"a": "ready", "b": "ready", "c": "unloaded"}
        await reg.set_budget(max_loaded_models=1)
        assert {s["name"]: s["state"] for s in reg.status()} == {"a": "ready", "b": "unloaded", "c": "unloaded"}
        assert reg.budget() == {"max_loaded_memory": 250 * MB, "max_loaded_models": 1,
                                "loaded_memory": 100 * MB, "loaded_models": 1}
        reg.release(a)
        await reg.aclose()

    asyncio.run(main())
