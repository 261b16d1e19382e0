"""What every OpenAI route does before and after the engine: auth, model lookup, admission, settling,
error mapping and client disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from fastapi import Request

from .. import errors, metrics
from .. import registry as registry_mod
from ..engines.base import EngineError, EngineUnavailable, Overloaded
from ..registry import ServedModel
from .params import keep_alive as keep_alive_seconds

log = logging.getLogger("fmgate.api")
T = TypeVar("T")

# Settling runs in tasks that outlive a cancelled handler; keep references so they are not collected.
_background: set[asyncio.Task] = set()


@dataclass
class Call:
    """One admitted request: who, which model, and the grant to settle exactly once."""

    request: Request
    model: ServedModel
    principal: Any
    grant: Any
    settled: bool = False

    def settle_soon(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Record usage, refund the reservation and release the model; safe from a cancelled task."""
        if self.settled:
            return
        self.settled = True
        release(self.request, self.model)
        metrics.PROMPT_TOKENS.labels(self.model.name).inc(prompt_tokens)
        metrics.COMPLETION_TOKENS.labels(self.model.name).inc(completion_tokens)
        task = asyncio.get_running_loop().create_task(self.grant.settle(prompt_tokens, completion_tokens))
        _background.add(task)
        task.add_done_callback(_background.discard)


async def settled(timeout: float = 10.0) -> None:
    """Wait for pending settle tasks (at shutdown)."""
    if _background:
        await asyncio.wait(set(_background), timeout=timeout)


async def authenticate(request: Request) -> Any:
    return await request.app.state.gatekeeper.authenticate(request)


async def acquire(request: Request, principal: Any, name: str, task: str, keep_alive: Any = None) -> ServedModel:
    """The served model for `name`, loaded and marked in use until `release` (Call.settle_soon does it).
    `keep_alive`: the request's field as sent (see params.keep_alive), checked before any loading."""
    request.state.model = name
    registry = request.app.state.registry
    seconds = keep_alive_seconds(keep_alive)
    try:
        served = await registry.acquire(name, task=task, keep_alive=seconds)
    except registry_mod.ModelNotFound as exc:
        raise errors.model_not_found(name) from exc
    except registry_mod.ModelUnavailable as exc:
        raise errors.APIError(503, str(exc), errors.UNAVAILABLE, code="model_unavailable",
                              headers={"Retry-After": retry_after(exc)}) from exc
    except registry_mod.WrongTask as exc:
        raise errors.bad_request(str(exc), param="model", code="model_not_supported") from exc
    try:
        request.app.state.gatekeeper.check_model(principal, name)
    except BaseException:
        registry.release(served)
        raise
    return served


def release(request: Request, served: ServedModel) -> None:
    request.app.state.registry.release(served)


async def admit(request: Request, principal: Any, served: ServedModel, reserve_tokens: int) -> Call:
    """Quota admission; from here on the Call owns the model's release (the caller releases on a refusal)."""
    grant = await request.app.state.gatekeeper.admit(principal, served.name, reserve_tokens)
    return Call(request, served, principal, grant)


def retry_after(exc: Exception) -> str:
    return str(max(1, round(getattr(exc, "retry_after", 5) or 5)))


@contextlib.contextmanager
def engine_errors(model: str) -> Iterator[None]:
    """Map the engine's exceptions onto OpenAI errors: 400, 429 + Retry-After, 503 + Retry-After."""
    try:
        yield
    except EngineError as exc:
        raise errors.bad_request(str(exc), param=exc.param, code=exc.code) from exc
    except Overloaded as exc:
        metrics.ENGINE_OVERLOADED.labels(model).inc()
        raise errors.APIError(429, str(exc), errors.RATE_LIMIT, code="server_overloaded",
                              headers={"Retry-After": retry_after(exc)}) from exc
    except EngineUnavailable as exc:
        raise errors.APIError(503, str(exc), errors.UNAVAILABLE, code="engine_unavailable",
                              headers={"Retry-After": retry_after(exc)}) from exc


def event_error(ev: Any) -> errors.APIError:
    """The error an engine event that finished with "error" becomes."""
    code = ev.error_code
    message = ev.error or "The engine failed while generating."
    if code == "deadline_exceeded":
        return errors.APIError(504, message, errors.SERVER, code=code)
    if code == "engine_failed":
        return errors.APIError(503, message, errors.UNAVAILABLE, code=code, headers={"Retry-After": "30"})
    return errors.APIError(500, message, errors.SERVER, code=code)


def deadline(request: Request) -> float | None:
    """time.monotonic() by which the request must finish: X-Request-Timeout (seconds) or the setting,
    whichever is sooner."""
    settings = request.app.state.settings
    limit = settings.request_timeout_s or None  # 0: no default deadline
    raw = request.headers.get("x-request-timeout")
    if raw is not None:
        try:
            asked = float(raw)
        except ValueError:
            asked = -1.0
        if not 0 < asked <= 86400:
            raise errors.bad_request("X-Request-Timeout must be a number of seconds above 0.",
                                     param="X-Request-Timeout")
        limit = min(asked, limit) if limit else asked
    return None if limit is None else time.monotonic() + float(limit)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Race `work` against the client hanging up; on hang-up cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task  # its cleanup (cancelling sequences, settling) runs before we answer
        raise errors.ClientDisconnected()
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()


async def until_disconnect_iter(request: Request, items: AsyncIterator[T]) -> AsyncIterator[T]:
    """Items from `items` until it ends or the client hangs up (then it is closed: no waiting for the
    next token to find out)."""
    watch = asyncio.ensure_future(_wait_disconnect(request))
    nxt: asyncio.Future | None = None
    try:
        while True:
            nxt = asyncio.ensure_future(anext(items))
            done, _ = await asyncio.wait({nxt, watch}, return_when=asyncio.FIRST_COMPLETED)
            if nxt not in done:
                raise errors.ClientDisconnected()
            try:
                item = nxt.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        watch.cancel()
        if nxt is not None and not nxt.done():
            nxt.cancel()  # the generator's own cleanup (cancelling sequences, settling) runs here
            with contextlib.suppress(BaseException):
                await nxt
        await items.aclose()  # type: ignore[attr-defined]


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def warn_unknown(route: str, fields: list[str]) -> None:
    if fields:
        log.warning("%s: ignoring unknown fields %s", route, ", ".join(fields[:20]))
