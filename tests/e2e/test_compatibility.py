"""docs/compatibility.md stays true: each table lists exactly the request model's fields, and each row's
example gets what the row promises from a real server (200 for honoured and n/a, a 400 naming the field
for refused)."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from gateway import protocol
from tests.conftest import CHAT_MODEL, EMBED_MODEL, ROOT

pytestmark = pytest.mark.e2e

ENDPOINTS = {
    "/v1/chat/completions": (protocol.ChatCompletionRequest,
                             {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Say hi."}],
                              "max_tokens": 4}),
    "/v1/completions": (protocol.CompletionRequest, {"model": CHAT_MODEL, "prompt": "Hello", "max_tokens": 4}),
    "/v1/embeddings": (protocol.EmbeddingRequest, {"model": EMBED_MODEL, "input": "hello"}),
}


def tables() -> dict[str, list[tuple[str, str, dict]]]:
    """endpoint -> [(field, status, example)] read from the page."""
    out: dict[str, list] = {}
    current = None
    for line in (ROOT / "docs" / "compatibility.md").read_text().splitlines():
        if m := re.match(r"## POST (\S+)", line):
            current = out.setdefault(m.group(1), [])
        elif current is not None and (m := re.match(r"\| `(\w+)` \| (honoured|refused|n/a) \| `(.*?)` \|", line)):
            current.append((m.group(1), m.group(2), json.loads(m.group(3))))
    return out


ROWS = [(path, *row) for path, rows in tables().items() for row in rows]


def test_each_table_lists_exactly_the_fields_of_its_request_model():
    found = tables()
    assert set(found) == set(ENDPOINTS)
    for path, (model, _) in ENDPOINTS.items():
        fields = {f.alias or name for name, f in model.model_fields.items()}
        listed = [row[0] for row in found[path]]
        assert len(listed) == len(set(listed)), f"{path}: a field is listed twice"
        assert set(listed) == fields, f"{path}: table {set(listed) ^ fields} differs from the model"


@pytest.mark.parametrize("path,field,status,example", ROWS, ids=[f"{r[0]}:{r[1]}" for r in ROWS])
def test_each_row_holds(server, path, field, status, example):
    assert field in example, "the example sets its own field"
    body = {**ENDPOINTS[path][1], **example}
    r = httpx.post(server.base_url + path, json=body, timeout=120)
    if status == "refused":
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == field and err["type"] == "invalid_request_error", err
    else:
        assert r.status_code == 200, r.text
        if body.get("stream"):
            assert r.text.rstrip().endswith("data: [DONE]"), r.text[-500:]
