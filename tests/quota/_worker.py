"""A separate gateway process for multi-process quota tests: `python -m tests.quota._worker '<json>'`.

It builds its own Gatekeeper (its own data dir, the shared Redis), prints `ready`, waits for `go` on
stdin, then runs one scenario and prints one JSON line of results. Key ids come in; secrets never do.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from gateway.errors import APIError
from gateway.quota import Gatekeeper, Principal
from gateway.settings import Settings


async def main(cfg: dict) -> None:
    settings = Settings(home=cfg["home"], redis_url=cfg.get("redis_url"), auth="on",
                        quota_on_redis_error=cfg.get("fail", "closed"))
    gk = await Gatekeeper.create(settings, prefix=cfg.get("prefix"), lease_ttl_s=cfg.get("lease_ttl_s", 30.0),
                                 window_s=cfg.get("window_s", 60.0))
    principal = Principal(key_id=cfg["key_id"], name="worker")
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    scenario = cfg["scenario"]
    out: dict = {}
    if scenario == "burst":
        # n concurrent admissions; settle the admitted ones with the given use.
        async def one():
            try:
                g = await gk.admit(principal, cfg.get("model", "m"), cfg["reserve"])
            except APIError as e:
                return (e.status, e.code, None)
            return (200, None, g)

        results = await asyncio.gather(*(one() for _ in range(cfg["n"])))
        granted = [g for s, _, g in results if g is not None]
        out["admitted"] = len(granted)
        out["refused"] = {}
        for s, code, _ in results:
            if s != 200:
                out["refused"][f"{s}:{code}"] = out["refused"].get(f"{s}:{code}", 0) + 1
        out["reserved"] = sum(g.reserve for g in granted)
        if cfg.get("hold_s"):
            print(json.dumps(out), flush=True)
            await asyncio.sleep(cfg["hold_s"])
        use = cfg.get("use")
        if use is not None:
            # Hold the grants until told: then everyone's reservations are outstanding at once.
            print(json.dumps(out), flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            await asyncio.gather(*(g.settle(use[0], use[1]) for g in granted))
            out = {"settled": len(granted)}
    elif scenario == "poll":
        # Admit (and settle) every `every_s` until refused with 401 or `for_s` passes; report when.
        deadline = time.time() + cfg["for_s"]
        ok, last_ok_started = 0, 0.0
        out = {"status": 200, "ok": 0}
        while time.time() < deadline:
            started = time.time()
            try:
                g = await gk.admit(principal, "m", 1)
                await g.settle(1, 0)
                ok, last_ok_started = ok + 1, started
            except APIError as e:
                out = {"status": e.status, "refused_started": started, "at": time.time()}
                break
            await asyncio.sleep(cfg["every_s"])
        out.update(ok=ok, last_ok_started=last_ok_started)
    await gk.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
