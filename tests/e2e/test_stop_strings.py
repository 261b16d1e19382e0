"""Stop strings over real HTTP, chat and completions, streaming and not: each run is compared with the same
request without `stop`, which goes on past the stop string, so only the stop string can have ended it."""

from __future__ import annotations

import pytest

from tests.conftest import CHAT_MODEL
from tests.scheduler.test_generation import STOP_PROMPT, stop_inside

pytestmark = pytest.mark.e2e
ROUTES = ["chat", "completions"]
COMPLETION_PROMPT = "The three largest cities of France are"


def run(client, route: str, stream: bool, **kw) -> tuple[str, str]:
    """(text, finish_reason) of one greedy request."""
    if route == "chat":
        kw.update(model=CHAT_MODEL, messages=STOP_PROMPT, temperature=0, max_tokens=40)
        if not stream:
            r = client.chat.completions.create(**kw)
            return r.choices[0].message.content, r.choices[0].finish_reason
        chunks = [c for c in client.chat.completions.create(**kw, stream=True) if c.choices]
        return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason
    kw.update(model=CHAT_MODEL, prompt=COMPLETION_PROMPT, temperature=0, max_tokens=24)
    if not stream:
        r = client.completions.create(**kw)
        return r.choices[0].text, r.choices[0].finish_reason
    chunks = [c for c in client.completions.create(**kw, stream=True) if c.choices]
    return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("route", ROUTES)
def test_stop_string_cuts_the_text(server, route, stream):
    client = server.client(timeout=120)
    full, _ = run(client, route, stream)
    for kind in ("word", "fragment"):
        stop = stop_inside(full, kind)
        text, finish = run(client, route, stream, stop=[stop, "no such text ~~"])
        assert finish == "stop", (full, stop, text)
        assert text == full[:full.index(stop)], (full, stop, text)
