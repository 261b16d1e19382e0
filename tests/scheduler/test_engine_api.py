"""LLMEngine's own API (the one path the routes use), on the real SmolLM2 artifact: events, stream_many,
cancellation, shutdown, token text and bytes, logprobs, fairness."""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import pytest

from gateway.engines.base import EngineError, Overloaded, SamplingParams
from gateway.engines.llm import LLMEngine


@pytest.fixture(scope="module")
def engine(chat_artifact):
    eng = LLMEngine.from_dir(chat_artifact.path, "api", max_num_seqs=4, max_batch_tokens=64, max_queued=8,
                             threads=2)
    yield eng
    eng.close()


def prompt(engine, text):
    return engine.chat_prompt([{"role": "user", "content": text}])


def wait_idle(engine, timeout=60.0):
    deadline = time.monotonic() + timeout
    while engine.scheduler.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.scheduler.stats() == {"waiting": 0, "prefilling": 0, "running": 0}


def test_every_accepted_token_is_in_exactly_one_event(engine):
    # A stop string holds text back, so some events carry tokens whose text comes later.
    events = list(engine.stream_sync(prompt(engine, "List the days of the week."),
                                     SamplingParams(max_tokens=40, temperature=0, stop=["Friday"])))
    tokens = [t for ev in events for t in ev.tokens]
    final = events[-1]
    assert final.finish_reason in ("stop", "length")
    assert len(tokens) == final.completion_tokens > 0
    plain = list(engine.stream_sync(prompt(engine, "List the days of the week."),
                                    SamplingParams(max_tokens=final.completion_tokens, temperature=0)))
    assert [t for ev in plain for t in ev.tokens] == tokens  # the same tokens, stop or not
    text = "".join(ev.text for ev in plain)
    assert engine.tokenizer.decode(tokens, skip_special_tokens=True) == text


def test_stream_many_yields_every_sequence_and_final_events(engine):
    async def run():
        reqs = [(prompt(engine, q), SamplingParams(max_tokens=8, temperature=0)) for q in ("Hi", "Name a colour.")]
        got: dict[int, list] = {0: [], 1: []}
        async for i, ev in engine.stream_many(reqs):
            got[i].append(ev)
        return got

    got = asyncio.run(run())
    for evs in got.values():
        assert evs[-1].finish_reason in ("stop", "length")
        assert sum(len(ev.tokens) for ev in evs) == evs[-1].completion_tokens
        assert [ev.finish_reason is not None for ev in evs].count(True) == 1


def test_stream_many_submits_all_or_none(chat_artifact):
    eng = LLMEngine.from_dir(chat_artifact.path, "all-or-none", max_num_seqs=1, max_queued=2, threads=2)
    try:
        p = prompt(eng, "Hello")

        async def run(n):
            async for _ in eng.stream_many([(p, SamplingParams(max_tokens=4, temperature=0))] * n):
                pass

        with pytest.raises(Overloaded):
            asyncio.run(run(3))
        assert eng.scheduler.stats()["waiting"] == 0
        with pytest.raises(EngineError):  # one bad request refuses the whole group
            asyncio.run(eng.stream_many([(p, SamplingParams(max_tokens=4)), ([], SamplingParams())]).__anext__())
        assert eng.scheduler.busy == 0
    finally:
        eng.close()


def test_closing_or_cancelling_a_stream_cancels_its_sequences(engine):
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

    async def close_early():
        gen = engine.stream_many([(prompt(engine, "Count to one hundred."), long)] * 2)
        await gen.__anext__()
        await gen.aclose()

    asyncio.run(close_early())
    wait_idle(engine)
    assert len(engine.runner._rows) == 0

    async def cancel_task():
        started = asyncio.Event()

        async def consume():
            async for _ in engine.stream(prompt(engine, "Count to one hundred."), long):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_task())
    wait_idle(engine)
    assert len(engine.runner._rows) == 0


def test_cancelled_sequences_get_a_final_abort_event(engine):
    got: queue.Queue = queue.Queue()
    seq = engine.submit(prompt(engine, "Count to one hundred."),
                        SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), got.put)
    got.get(timeout=60)
    engine.cancel(seq)
    while True:
        ev = got.get(timeout=60)
        if ev.finish_reason:
            break
    assert ev.finish_reason == "abort"
    assert ev.completion_tokens >= 1


def test_stream_sync_ends_after_shutdown(chat_artifact):
    eng = LLMEngine.from_dir(chat_artifact.path, "shutdown", max_num_seqs=1, threads=2)
    p = prompt(eng, "Count to one hundred.")
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    running = eng.stream_sync(p, params)
    assert next(running).finish_reason is None  # submitted and decoding
    finals: list = []

    def consume(events):
        finals.extend(ev.finish_reason for ev in events if ev.finish_reason)

    threads = [threading.Thread(target=consume, args=(running,), daemon=True),
               threading.Thread(target=consume, args=(eng.stream_sync(p, params),), daemon=True)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while eng.scheduler.stats()["waiting"] < 1 and time.monotonic() < deadline:  # the second one is queued
        time.sleep(0.01)
    assert eng.ready
    eng.close()
    for t in threads:
        t.join(timeout=60)
    assert finals == ["abort", "abort"]
    assert not eng.ready


def test_token_text_and_bytes(engine):
    ids = engine.tokenizer.encode("Café ☕ naïve", add_special_tokens=False)
    raw = b"".join(bytes(engine.token_bytes(t)) for t in ids)
    assert raw.decode("utf-8") == "Café ☕ naïve"
    word = engine.tokenizer.encode(" Paris", add_special_tokens=False)
    assert "".join(engine.token_text(t) for t in word) == " Paris"


def test_logprobs_ride_with_their_tokens(engine):
    events = list(engine.stream_sync(prompt(engine, "Name a fruit."),
                                     SamplingParams(max_tokens=6, temperature=0, logprobs=3)))
    for ev in events:
        assert ev.logprobs is not None and [lp.token_id for lp in ev.logprobs] == ev.tokens
        for lp in ev.logprobs:
            assert lp.logprob <= 0 and len(lp.top) == 3
            assert lp.top[0][0] == lp.token_id  # greedy: the best one was picked


def test_prompt_logprobs_score_every_prompt_token_across_chunks(engine):
    text = "The quick brown fox jumps over the lazy dog. " * 8
    ids = engine.text_prompt(text)
    assert len(ids) > engine.scheduler.max_batch_tokens  # prefilled in several chunks
    events = list(engine.stream_sync(ids, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2)))
    plp = events[0].prompt_logprobs
    assert plp is not None and plp[0] is None and len(plp) == len(ids)
    assert [lp.token_id for lp in plp[1:]] == ids[1:]
    assert all(lp.logprob <= 0 and len(lp.top) == 2 for lp in plp[1:])
    # The repeated sentence is predictable the second time round.
    n = len(ids) // 8
    first = sum(lp.logprob for lp in plp[1:n])
    last = sum(lp.logprob for lp in plp[-n + 1 :])
    assert last > first


def test_bad_token_ids_are_refused_before_they_reach_the_batch(engine):
    with pytest.raises(EngineError) as exc:
        engine.submit([1, 2, engine.runner.vocab_size + 5], SamplingParams(max_tokens=2), lambda ev: None)
    assert exc.value.param == "prompt"
