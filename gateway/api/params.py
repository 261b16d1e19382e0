"""OpenAI request fields -> the engine's SamplingParams, one per choice; limits checked before any work."""

from __future__ import annotations

import re
from typing import Any

from .. import errors
from ..engines.base import SamplingParams
from ..settings import Limits


def check_limits(req: Any, limits: Limits, prompts: int = 1) -> None:
    """The configured limits (which may be tighter than the schema's); counts only, no tokenizing."""
    if req.n > limits.max_n:
        raise errors.bad_request(f"n must be at most {limits.max_n}.", param="n")
    if len(req.stop_list()) > limits.max_stop:
        raise errors.bad_request(f"At most {limits.max_stop} stop sequences are allowed.", param="stop")
    max_tokens = req.token_limit() if hasattr(req, "token_limit") else req.max_tokens
    if max_tokens is not None and max_tokens > limits.max_tokens_cap:
        raise errors.bad_request(f"max_tokens must be at most {limits.max_tokens_cap}.", param="max_tokens")
    if req.logit_bias and len(req.logit_bias) > limits.max_logit_bias:
        raise errors.bad_request(f"logit_bias takes at most {limits.max_logit_bias} entries.", param="logit_bias")
    if prompts * req.n > limits.max_prompts:
        raise errors.bad_request(f"At most {limits.max_prompts} prompts × n are allowed in one request.",
                                 param="prompt")
    if (bad := req.refused()) is not None:
        raise errors.bad_request(bad[1], param=bad[0], code="unsupported_parameter")


def logit_bias(raw: dict[str, float] | None, vocab: int) -> dict[int, float] | None:
    if not raw:
        return None
    out = {}
    for key, value in raw.items():
        if not key.isdigit() or int(key) >= vocab:
            raise errors.bad_request(f"logit_bias keys must be token ids below {vocab}; got '{key[:16]}'.",
                                     param="logit_bias")
        out[int(key)] = float(value)
    return out


def sampling(req: Any, max_tokens: int, n_prompts: int, vocab: int, deadline: float | None,
             principal: Any, logprobs: int | None = None, prompt_logprobs: int | None = None,
             constraints: Any = None) -> list[SamplingParams]:
    """n SamplingParams per prompt; seeds differ per choice so n samples differ yet repeat."""
    bias = logit_bias(req.logit_bias, vocab)
    out = []
    for _ in range(n_prompts):
        for j in range(req.n):
            out.append(SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                seed=None if req.seed is None else (req.seed + j) % 2**63,
                stop=req.stop_list(),
                top_k=max(0, req.top_k or 0),
                min_p=req.min_p or 0.0,
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                repetition_penalty=req.repetition_penalty or 1.0,
                logit_bias=bias,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                constraint=None if constraints is None else constraints.new(),
                deadline=deadline,
                tenant=principal.tenant or "",
                weight=principal.weight,
            ))
    return out


_DURATION = re.compile(r"(-?)((?:[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h))+)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive(value: float | str | None) -> float | None:
    """A request's keep_alive in seconds (Ollama's meaning: how long the model stays loaded after this
    request; 0 unloads it once idle, negative keeps it); None when absent. Numbers are seconds; strings
    are seconds or Go-style durations ("5m", "1h30m", "90s", "-1")."""
    if value is None or isinstance(value, float | int):
        return None if value is None else float(value)
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        m = _DURATION.fullmatch(text)
        if m is None:
            raise errors.bad_request('keep_alive must be seconds or a duration such as "5m", "1h30m", "0" or "-1".',
                                     param="keep_alive") from None
        seconds = sum(float(n) * _UNIT[u] for n, u in re.findall(r"([0-9.]+)(ms|s|m|h)", m.group(2)))
        seconds = -seconds if m.group(1) else seconds
    if seconds != seconds or abs(seconds) > 1e9:
        raise errors.bad_request("keep_alive is out of range.", param="keep_alive")
    return seconds


def default_max_tokens(asked: int | None, limits: Limits, ctx: int, longest_prompt: int) -> int:
    """What the request may generate; whether prompt + max_tokens fits the context is the engine's check."""
    if asked is not None:
        return asked
    return max(1, min(limits.max_tokens_cap, ctx - longest_prompt))
