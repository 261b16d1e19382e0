"""The console in a real headless chromium (Debian's package, through Playwright) against a real
`fmgate serve` with the default models, auth on and an admin key.

The tests share one server and one page, and run in file order: sign in, Models, create a key and
chat with it, usage on Keys, model output shown as text, Live, phone width. Screenshots go to
$FMGATE_CONSOLE_SHOTS (docs/console/ to refresh the ones in docs/console.md), else a temporary folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from tests.conftest import CHAT_MODEL, EMBED_MODEL, need

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.timeout(1800)]

ADMIN = "console-admin-" + "k" * 32
WAIT_MS = 60_000


@pytest.fixture(scope="module")
def gateway(start_server, store_home, tmp_path_factory, chat_artifact, embed_artifact):
    # A private home (its own key database) whose models/ is the session's shared model cache. In a clean
    # CI run this module may come first: the artifact fixtures then build the default models in-process
    # (bounded by the test's timeout, not the server's start), and the server only loads them.
    home = tmp_path_factory.mktemp("console-home")
    (store_home / "models").mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(store_home / "models", target_is_directory=True)
    srv = start_server(env={"FMGATE_AUTH": "on", "FMGATE_ADMIN_KEY": ADMIN}, home=home, ready=False)
    srv.wait_ready(timeout=600)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    path = Path(os.environ.get("FMGATE_CONSOLE_SHOTS") or tmp_path_factory.mktemp("console-shots"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser():
    exe = shutil.which("chromium")
    need(exe is not None, "Debian's chromium is not installed (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need(False, "playwright is not installed (make install)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()


class Page:
    """The one page the tests share, and the browser errors it logged (CSP violations show up here)."""

    def __init__(self, page):
        self.p = page
        self.errors: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("console", lambda m: m.type == "error" and "Failed to load resource" not in m.text
                and self.errors.append(m.text))


@pytest.fixture(scope="module")
def ui(browser, gateway):
    ctx = browser.new_context(base_url=gateway.base_url, viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    page.set_default_timeout(WAIT_MS)
    try:
        yield Page(page)
    finally:
        ctx.close()


@pytest.fixture(scope="module")
def state() -> dict:
    return {}


def admin_get(gateway, path: str):
    r = httpx.get(gateway.base_url + path, headers={"authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_sign_in_then_models_page_shows_variant_and_figures(ui, gateway, shots):
    from playwright.sync_api import expect

    p = ui.p
    resp = p.goto("/")  # redirected to /console/
    assert resp is not None and resp.url.endswith("/console/")
    assert "script-src 'self'" in resp.headers["content-security-policy"]
    p.get_by_label("Admin key").fill(ADMIN)
    p.get_by_role("button", name="Sign in").click()
    card = p.locator(f'article[data-model="{CHAT_MODEL}"]')
    expect(card).to_be_visible()
    served = {m["id"]: m for m in admin_get(gateway, "/console/api/models")["data"]}
    chat = served[CHAT_MODEL]
    expect(card).to_contain_text(chat["variant"])
    for k, v in (chat.get("quality") or {}).items():  # the measured figures, e.g. perplexity
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            expect(card).to_contain_text(k.replace("_", " "))
    if chat.get("candidates"):
        expect(card.locator("tr.chosen")).to_contain_text(chat["variant"])
    expect(p.locator(f'article[data-model="{EMBED_MODEL}"]')).to_be_visible()
    assert p.evaluate("sessionStorage.getItem('fmgate.adminKey')") == ADMIN
    assert p.context.cookies() == []  # keys are never cookies
    p.screenshot(path=str(shots / "models.png"), full_page=True)


def test_create_key_and_stream_a_chat_answer(ui, gateway, shots, state):
    from playwright.sync_api import expect

    p = ui.p
    p.get_by_role("link", name="Keys").click()
    p.get_by_text("Create a key").click()
    form = p.locator("#create-form")
    form.get_by_label("Name").fill("console-test-app")
    form.get_by_label("Tokens per day").fill("100000")
    form.get_by_role("button", name="Create").click()
    secret_el = p.locator("#secret-value")
    expect(secret_el).not_to_be_empty()
    secret = secret_el.text_content()
    keys = admin_get(gateway, "/admin/keys")["data"]
    state["key_id"] = next(k["id"] for k in keys if k["name"] == "console-test-app")
    state["secret"] = secret
    p.get_by_role("button", name="Use in the playground").click()

    expect(p.locator("#pg-model")).to_have_value(CHAT_MODEL)
    p.get_by_label("Temperature").fill("0")
    p.get_by_label("Max tokens").fill("24")
    p.get_by_label("Message").fill("Say hello in one short sentence.")
    p.get_by_role("button", name="Send").click()
    expect(p.locator("#pg-stats")).to_contain_text("finish:")
    stats = p.locator("#pg-stats").text_content()
    streamed = re.search(r"\+ (\d+) completion tokens", stats)
    assert streamed and int(streamed.group(1)) >= 1, stats
    assert p.locator('#transcript li[data-role="assistant"] .text').last.text_content() is not None
    curl = p.locator("#snippet-curl").text_content()
    assert "/v1/chat/completions" in curl and CHAT_MODEL in curl and "$FMGATE_API_KEY" in curl
    assert "response_format" not in curl and '"tools"' not in curl  # toggles off: not sent
    assert secret not in curl and secret not in p.locator("#snippet-python").text_content()

    p.get_by_role("button", name="Compare").click()
    expect(p.locator("#emb-table td.cosine").first).to_have_text("1.000")
    p.screenshot(path=str(shots / "playground.png"), full_page=True)


def test_usage_of_the_new_key_rises_on_keys_page(ui, state, shots):
    from playwright.sync_api import expect

    p = ui.p
    p.get_by_role("link", name="Keys").click()
    if p.locator("#secret-box").is_visible():
        p.get_by_role("button", name="Done").click()  # no secret in the screenshot
    row = p.locator(f'tr[data-key-id="{state["key_id"]}"]')
    expect(row).to_contain_text("console-test-app")
    # Usage is recorded just after the answer; the page refreshes itself every few seconds.
    expect(row.locator(".usage-requests")).not_to_have_text("0", timeout=WAIT_MS)
    expect(row.locator(".usage-today")).to_contain_text("of 100,000")
    expect(p.locator("#chart-usage-tokens canvas")).to_be_visible()
    expect(p.locator("#usage-table tbody tr").first).to_contain_text(CHAT_MODEL)
    p.screenshot(path=str(shots / "keys.png"), full_page=True)

    # Edit the key's daily budget (PATCH /admin/keys/{id}), then revoke it (two presses).
    row.get_by_role("button", name="Edit console-test-app").click()
    dialog = p.locator("#edit-dialog")
    dialog.get_by_label("Tokens per day").fill("200000")
    dialog.get_by_role("button", name="Save").click()
    expect(dialog).to_be_hidden()
    expect(row.locator(".usage-today")).to_contain_text("of 200,000")
    revoke = row.get_by_role("button", name="Revoke console-test-app")
    revoke.click()
    expect(revoke).to_have_text("Confirm revoke")
    revoke.click()
    expect(row).to_contain_text("revoked")
    expect(p.locator("#audit-table")).to_contain_text("key.revoke")  # the admin audit log


def test_model_output_is_rendered_as_text(ui):
    """A crafted stream through the real page: markup in the model's words must stay words."""
    from playwright.sync_api import expect

    p = ui.p
    evil = ['<script>window.__pwned = 1</script>', '<img src=x onerror="window.__pwned = 2">', ' done']
    chunks = [{"id": "c", "object": "chat.completion.chunk", "created": 0, "model": CHAT_MODEL,
               "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]} for t in evil]
    chunks.append({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": CHAT_MODEL,
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    sent: list[dict] = []

    def fake(route):
        sent.append(route.request.post_data_json)
        route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body=body)

    p.route("**/v1/chat/completions", fake)
    try:
        p.get_by_role("link", name="Playground").click()
        p.get_by_label("Structured output (JSON schema)").check()  # sent only when switched on
        p.get_by_label("Message").fill("Echo some HTML.")
        p.get_by_role("button", name="Send").click()
        answer = p.locator('#transcript li[data-role="assistant"] .text').last
        expect(answer).to_contain_text("<script>window.__pwned = 1</script>")
        expect(answer).to_contain_text("done")
        p.get_by_label("Structured output (JSON schema)").uncheck()
    finally:
        p.unroute("**/v1/chat/completions")
    assert sent[-1]["response_format"]["type"] == "json_schema" and "tools" not in sent[-1]
    assert sent[-1]["stream"] is True and sent[-1]["messages"][-1]["content"] == "Echo some HTML."
    assert p.locator("#transcript script, #transcript img").count() == 0
    assert p.evaluate("window.__pwned") is None


def test_live_page_charts_the_servers_metrics(ui, shots):
    from playwright.sync_api import expect

    p = ui.p
    p.get_by_role("link", name="Live").click()
    expect(p.locator("#live-now")).to_contain_text("Tokens/s")
    for chart in ("rate", "queue", "ttft", "tpot", "errors"):
        expect(p.locator(f"#chart-live-{chart} canvas")).to_be_visible()
    p.screenshot(path=str(shots / "live.png"), full_page=True)


def test_phone_width_and_no_browser_errors(ui, shots):
    from playwright.sync_api import expect

    p = ui.p
    p.set_viewport_size({"width": 390, "height": 844})
    for page in ("models", "keys", "live", "playground"):
        p.get_by_role("link", name=page.capitalize()).click()
        expect(p.locator(f"#page-{page}")).to_be_visible()
        expect(p.locator(f"#page-{page} h1")).to_be_visible()
        # No sideways scrolling (charts resize a moment after the viewport does, so wait for it).
        p.wait_for_function("document.documentElement.scrollWidth <= 392")
    p.screenshot(path=str(shots / "playground-phone.png"), full_page=False)
    unlabelled = p.evaluate("""[...document.querySelectorAll('input, select, textarea, button')]
        .filter((e) => e.type !== 'hidden' && !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                && !(e.tagName === 'BUTTON' && e.textContent.trim()))
        .map((e) => e.id || e.outerHTML)""")
    assert unlabelled == []  # every control has a name a screen reader can say
    p.set_viewport_size({"width": 1280, "height": 900})
    assert ui.errors == []
