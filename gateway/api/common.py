"""What every OpenAI route does before and after the engine: auth, model lookup, admission, settling."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request

from .. import errors, metrics
from ..engines.base import EngineError, Overloaded
from ..registry import ServedModel

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
        """Record usage and refund the reservation; safe from a cancelled task or a finally block."""
        if self.settled:
            return
        self.settled = True
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


def resolve(request: Request, principal: Any, name: str, task: str) -> ServedModel:
    request.state.model = name
    served = request.app.state.registry.get(name)
    if served is None:
        if name in request.app.state.registry.errors:
            raise errors.APIError(503, f"The model '{name}' failed to load.", errors.UNAVAILABLE,
                                  code="model_unavailable")
        if not request.app.state.registry.loaded:
            raise errors.APIError(503, "Models are still loading; retry shortly.", errors.UNAVAILABLE,
                                  code="model_loading", headers={"Retry-After": "5"})
        raise errors.model_not_found(name)
    request.app.state.gatekeeper.check_model(principal, name)
    if served.task != task:
        verb = {"chat": "chat and completions", "embed": "embeddings"}[served.task]
        raise errors.bad_request(f"The model '{name}' serves {verb} only.", param="model",
                                 code="model_not_supported")
    return served


async def admit(request: Request, principal: Any, served: ServedModel, reserve_tokens: int) -> Call:
    grant = await request.app.state.gatekeeper.admit(principal, served.name, reserve_tokens)
    return Call(request, served, principal, grant)


def engine_error(exc: EngineError) -> errors.APIError:
    return errors.bad_request(str(exc), param=exc.param, code=exc.code)


def overloaded(exc: Overloaded) -> errors.APIError:
    metrics.QUOTA_REJECTIONS.labels("overloaded").inc()
    return errors.APIError(429, str(exc), errors.RATE_LIMIT, code="server_overloaded",
                           headers={"Retry-After": str(max(1, round(exc.retry_after)))})


async def until_disconnect(request: Request, work: Awaitable[T], on_disconnect: Callable[[], None]) -> T:
    """Race `work` against the client hanging up; on hang-up run on_disconnect and raise CancelledError."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        on_disconnect()
        task.cancel()
        raise asyncio.CancelledError("client disconnected")
    finally:
        watch.cancel()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


def warn_unknown(route: str, fields: list[str]) -> None:
    if fields:
        log.warning("%s: ignoring unknown fields %s", route, ", ".join(fields[:20]))
