"""The messages between API processes and an engine core: msgspec structs, msgpack-encoded, over ZeroMQ.

API process (DEALER) -> core (ROUTER): Hello, Submit, Abort.
Core -> API process: Welcome (the answer to Hello), Refused (a Submit queued nothing), Outputs (one
message per client per scheduler step: every sequence's new tokens, text, logprobs, finish reasons, errors).
Request ids are the client's own; the core keys sequences by (client identity, rid).
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..engines.base import SamplingParams, TokenLogprob
from ..scheduler.generation import Event


class WireParams(msgspec.Struct, array_like=True):
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stop_token_ids: list[int]
    ignore_eos: bool
    top_k: int
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    logit_bias: dict[int, float] | None
    logprobs: int | None
    prompt_logprobs: int | None
    grammar: str | None  # the constraint's grammar (llguidance), rebuilt in the core
    deadline: float | None  # time.monotonic(): one clock for every process on the host
    tenant: str
    weight: float
    detokenize: bool = True  # False: the core sends token ids only (the API process decodes), unless `stop`


class Item(msgspec.Struct, array_like=True):
    rid: int
    prompt: list[int]
    params: WireParams


class Hello(msgspec.Struct, tag="h", array_like=True):
    pid: int  # the core cancels a client's sequences once this process is gone


class Submit(msgspec.Struct, tag="s", array_like=True):
    items: list[Item]  # queued all or none (LLMEngine.stream_many's contract)


class Abort(msgspec.Struct, tag="a", array_like=True):
    rids: list[int]


class Welcome(msgspec.Struct, tag="w", array_like=True):
    pid: int
    vocab_size: int
    max_seq_len: int
    capacity: int
    device: str
    prompt_logits: bool
    eos: list[int]
    live: int = 0  # sequences the core holds now (submitted, not yet finished)
    clients: int = 0  # API processes it knows
    preemptions: int = 0  # sequences its scheduler paused to give a slot to another tenant (fair policy)


class Refused(msgspec.Struct, tag="r", array_like=True):
    rids: list[int]
    kind: str  # engine_error | overloaded | unavailable
    message: str
    param: str | None = None
    code: str | None = None
    retry_after: float = 1.0


class WireLogprob(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


class Out(msgspec.Struct, array_like=True):
    rid: int
    text: str
    tokens: list[int]
    logprobs: list[WireLogprob] | None = None
    prompt_logprobs: list[WireLogprob | None] | None = None
    finish_reason: str | None = None
    error: str | None = None
    error_code: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Outputs(msgspec.Struct, tag="o", array_like=True):
    outs: list[Out]


ToCore = Hello | Submit | Abort
FromCore = Welcome | Refused | Outputs

encoder = msgspec.msgpack.Encoder()
to_core = msgspec.msgpack.Decoder(ToCore)
from_core = msgspec.msgpack.Decoder(FromCore)


# -- conversions --

def params_out(p: SamplingParams, detokenize: bool = True) -> WireParams:
    grammar = None
    if p.constraint is not None:
        grammar = getattr(p.constraint, "grammar", None)
        if not grammar:
            from ..engines.base import EngineError

            raise EngineError("This output constraint cannot be sent to the engine process.",
                              param="response_format", code="unsupported_parameter")
    return WireParams(
        p.max_tokens, p.temperature, p.top_p, p.seed, list(p.stop), [int(t) for t in p.stop_token_ids],
        p.ignore_eos, p.top_k, p.min_p, p.presence_penalty, p.frequency_penalty, p.repetition_penalty,
        {int(k): float(v) for k, v in p.logit_bias.items()} if p.logit_bias else None,
        p.logprobs, p.prompt_logprobs, grammar, p.deadline, p.tenant, p.weight, detokenize and p.detokenize,
    )


def params_in(w: WireParams, constraint: Any = None) -> SamplingParams:
    return SamplingParams(
        max_tokens=w.max_tokens, temperature=w.temperature, top_p=w.top_p, seed=w.seed, stop=tuple(w.stop),
        stop_token_ids=tuple(w.stop_token_ids), ignore_eos=w.ignore_eos, top_k=w.top_k, min_p=w.min_p,
        presence_penalty=w.presence_penalty, frequency_penalty=w.frequency_penalty,
        repetition_penalty=w.repetition_penalty, logit_bias=w.logit_bias, logprobs=w.logprobs,
        prompt_logprobs=w.prompt_logprobs, constraint=constraint, deadline=w.deadline, tenant=w.tenant,
        weight=w.weight, detokenize=w.detokenize,
    )


def _lp_out(lp: TokenLogprob | None) -> WireLogprob | None:
    if lp is None:
        return None
    return WireLogprob(int(lp.token_id), float(lp.logprob), [(int(t), float(v)) for t, v in (lp.top or [])])


def _lp_in(w: WireLogprob | None) -> TokenLogprob | None:
    return None if w is None else TokenLogprob(w.token_id, w.logprob, [tuple(x) for x in w.top])


def event_out(rid: int, ev: Event) -> Out:
    return Out(
        rid, ev.text, [int(t) for t in ev.tokens],
        None if ev.logprobs is None else [_lp_out(lp) for lp in ev.logprobs],
        None if ev.prompt_logprobs is None else [_lp_out(lp) for lp in ev.prompt_logprobs],
        ev.finish_reason, ev.error, ev.error_code, ev.prompt_tokens, ev.completion_tokens,
    )


def event_in(o: Out) -> Event:
    return Event(
        text=o.text, tokens=o.tokens,
        logprobs=None if o.logprobs is None else [_lp_in(w) for w in o.logprobs],
        prompt_logprobs=None if o.prompt_logprobs is None else [_lp_in(w) for w in o.prompt_logprobs],
        finish_reason=o.finish_reason, error=o.error, error_code=o.error_code,
        prompt_tokens=o.prompt_tokens, completion_tokens=o.completion_tokens,
    )
