"""The playground at `/`, in a real browser: Debian's chromium (installed when missing)
driven by Playwright, against `lorag serve` on the real default model on loopback.

Screenshots of every screen go to test-artifacts/playground/ (docs/playground.md shows two of them).
"""

import json
import re
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.daemons import KEYS
from tests.polling import wait_for
from tests.system import program

pytestmark = pytest.mark.e2e

ADMIN, USER, BOB = list(KEYS)[:3]
SHOTS = Path(__file__).parents[2] / "test-artifacts" / "playground"
ADAPTER = "playground-style"
SHARED = "playground-shared"  # bob's, shared with every tenant
NAMESPACE = "playground-notes"
NOTES = ("# Opening hours\n\nThe Tartu reading room of the Lumen library opens at 7:40 "
         "on weekdays and closes at 19:15. On Saturdays it opens at 10:05.\n")
LONG = {"type": "object", "required": ["items"], "properties": {"items": {
    "type": "array", "minItems": 300, "items": {"type": "string"}}}}
TIMEOUT = 180_000  # ms: answers come from a 135M model on 2 CPU cores
# expectations wait as long too: Playwright's default, 5 s, is less than one answer takes on
# a CPU without AVX512 (float32 compute; an adapter's 24 tokens there took over 5 s)
expect.set_options(timeout=TIMEOUT)


@pytest.fixture(scope="module")
def browser():
    chromium = program("chromium", "chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-background-networking"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, real_daemon) -> Page:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT)
    page.goto(real_daemon.url + "/")
    yield page
    context.close()


@pytest.fixture(scope="module")
def adapter(real_daemon, real_adapters):
    """The real "style" adapter, loaded under the playground's own name by the API, so
    tests that do not load it through the page still find it."""
    body = {"name": ADAPTER, "path": str(real_adapters / "style")}
    httpx.post(f"{real_daemon.url}/v1/adapters", json=body, timeout=120,
               headers={"Authorization": f"Bearer {ADMIN}"}).raise_for_status()
    shared = {"name": SHARED, "path": str(real_adapters / "style"), "shared": True}
    httpx.post(f"{real_daemon.url}/v1/adapters", json=shared, timeout=120,
               headers={"Authorization": f"Bearer {BOB}"}).raise_for_status()
    return ADAPTER


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SHOTS / f"{name}.png", full_page=True)


def connect(page: Page, key: str = ADMIN) -> None:
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Connect").click()
    expect(page.locator("#whoami")).to_contain_text("Connected to")


def tab(page: Page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def running(real_daemon) -> int:
    return real_daemon.health()["running"]


def test_the_page_is_served_from_the_daemon_alone(real_daemon, browser):
    response = httpx.get(real_daemon.url + "/")
    assert response.status_code == 200 and "lorag playground" in response.text
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    context = browser.new_context()
    page = context.new_page()
    elsewhere = []
    page.on("request", lambda request: request.url.startswith(real_daemon.url)
            or elsewhere.append(request.url))
    page.goto(real_daemon.url + "/")
    page.wait_for_load_state("networkidle")  # the page has asked the API (no key: a 401)
    expect(page.locator("#whoami")).to_have_text("Not connected.")
    context.close()
    assert elsewhere == []


def test_a_wrong_key_shows_the_401_message(page, real_daemon):
    said = httpx.get(f"{real_daemon.url}/v1/server",
                     headers={"Authorization": "Bearer not-a-key"}).json()["error"]["message"]
    page.get_by_label("API key").fill("not-a-key")
    page.get_by_role("button", name="Connect").click()
    expect(page.get_by_role("alert")).to_have_text(said)
    expect(page.locator("#whoami")).to_have_text("Not connected.")
    shot(page, "wrong-key")
    # the key is kept for the tab only, never in the address
    assert page.evaluate("sessionStorage.getItem('lorag.apiKey')") == "not-a-key"
    assert "not-a-key" not in page.url


def test_chat_streams_an_adapters_answer_with_the_servers_defaults(page, real_daemon,
                                                                   adapter):
    connect(page)
    defaults = httpx.get(f"{real_daemon.url}/v1/server",
                         headers={"Authorization": f"Bearer {ADMIN}"}).json()["defaults"]
    assert float(page.get_by_label("Temperature").input_value()) == defaults["temperature"]
    models = page.locator("#chat-model option").all_text_contents()
    assert f"{real_daemon.health()['model']} (base)" in models
    assert f"{ADAPTER} (adapter)" in models and f"{SHARED} (adapter, shared by bob)" in models
    page.locator("#chat-model").select_option(ADAPTER)
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill("24")
    page.get_by_label("Message").fill("Name three colours of the rainbow.")
    page.get_by_role("button", name="Send").click()
    answer = page.locator(".message.assistant").last
    expect(answer.locator(".meta")).to_contain_text("completion tokens")
    assert answer.locator(".text").inner_text().strip()
    shot(page, "chat")

    # a weighted composition of the adapter with itself at half strength
    page.get_by_text("Weighted composition").click()
    page.get_by_role("button", name="Add adapter").click()
    page.get_by_label("Weight").fill("0.5")
    page.get_by_label("Message").fill("And one more colour?")
    page.keyboard.press("Control+Enter")
    expect(page.locator(".message.assistant").nth(1).locator(".meta")).to_contain_text(
        "completion tokens")


def test_retrieval_ingests_dropped_files_and_shows_the_sources(page):
    connect(page)
    tab(page, "Knowledge")
    page.get_by_label("Namespace (an existing one, or a new name)").fill(NAMESPACE)
    # a real drop event, carrying files as a desktop's file manager would
    page.locator("#drop-zone").evaluate("""(zone, files) => {
        const transfer = new DataTransfer();
        for (const [name, text] of Object.entries(files)) {
            transfer.items.add(new File([text], name));
        }
        zone.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true}));
    }""", {"hours.md": NOTES, "scan.pdf": "%PDF-1.4 not really"})
    rows = page.locator("#ingest-results tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_contain_text("hours.md: added")
    expect(rows.nth(1)).to_contain_text("error: scan.pdf is not a readable PDF")
    expect(page.locator("#namespace-rows")).to_contain_text(NAMESPACE)
    shot(page, "knowledge")

    tab(page, "Chat")
    page.get_by_label("Ground answers in a namespace").check()
    page.locator("#rag-namespace").select_option(NAMESPACE)
    page.get_by_label("Passages (top_k)").fill("2")
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill("24")
    page.get_by_label("Message").fill("When does the Tartu reading room open on weekdays?")
    page.get_by_role("button", name="Send").click()
    sources = page.locator(".message.assistant .sources")
    expect(sources).to_contain_text("hours.md")
    source = sources.locator(".source").first
    source.locator("summary").click()
    expect(source.locator(".passage")).to_contain_text("opens at 7:40")
    shot(page, "chat-retrieval")


def grounded(page: Page, real_daemon) -> None:
    """The notes in NAMESPACE (put by the API), the page connected and retrieval on it."""
    httpx.post(f"{real_daemon.url}/v1/namespaces/{NAMESPACE}/documents", timeout=120,
               json={"id": "hours.md", "text": NOTES},
               headers={"Authorization": f"Bearer {ADMIN}"}).raise_for_status()
    connect(page)
    page.get_by_label("Ground answers in a namespace").check()
    page.locator("#rag-namespace").select_option(NAMESPACE)


def test_a_reranked_answer_says_which_adapter_reranked_and_how_long_each_stage_took(
        page, real_daemon, adapter):
    grounded(page, real_daemon)
    page.get_by_label("Rerank with").select_option(adapter)
    page.get_by_label("Max tokens").fill("4")
    page.get_by_label("Message").fill("When does the Tartu reading room open?")
    page.get_by_role("button", name="Send").click()
    meta = page.locator(".message.assistant .meta")
    expect(meta).to_contain_text(f"ms ({adapter})")
    expect(meta).to_contain_text("search ")
    expect(page.locator(".message.assistant .sources")).to_contain_text("hours.md")


def cites(source: str) -> str:
    """A response format that makes any model answer in the demo's JSON, citing `source`."""
    return json.dumps({"type": "object", "required": ["answer", "source"], "properties": {
        "answer": {"type": "string", "maxLength": 24}, "source": {"enum": [source]}}})


def test_a_declined_answer_is_shown_as_declined(page, real_daemon):
    """The rules come from /v1/server: a JSON answer citing the abstention source "none" is
    declined, one citing a page is not (the grammar makes the model write either)."""
    grounded(page, real_daemon)
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill("40")
    answers = page.locator(".message.assistant")
    for turn, source in enumerate(["hours.md", "none"]):
        page.get_by_label("JSON schema (empty: free text)").fill(cites(source))
        page.get_by_label("Message").fill("What is the wifi password of the reading room?")
        page.get_by_role("button", name="Send").click()
        expect(answers.nth(turn).locator(".meta")).to_contain_text("completion tokens")
        expect(answers.nth(turn)).to_contain_text(re.compile(f'"source": ?"{source}"'))
    expect(answers.nth(0).locator(".declined")).to_have_count(0)
    expect(answers.nth(1).locator(".declined")).to_contain_text("Declined")
    shot(page, "declined")


def test_the_message_box_stays_in_view_at_a_laptops_height(browser, real_daemon):
    context = browser.new_context(viewport={"width": 1366, "height": 768})
    page = context.new_page()
    page.goto(real_daemon.url + "/")
    connect(page)
    for box in (page.get_by_label("Message"), page.get_by_role("button", name="Send")):
        expect(box).to_be_in_viewport(ratio=1)
    page.locator("#messages").evaluate("""(list) => {  // a long conversation
        for (let i = 0; i < 40; i++) {
            const item = document.createElement("li");
            item.className = "message user";
            item.textContent = "a question that was asked earlier ".repeat(8);
            list.append(item);
            item.scrollIntoView({block: "end"});
        }
    }""")
    for box in (page.get_by_label("Message"), page.get_by_role("button", name="Send")):
        expect(box).to_be_in_viewport(ratio=1)
    shot(page, "laptop")
    context.close()


def test_compare_runs_four_columns_at_once(page, adapter):
    """base / base + retrieval / adapter / adapter + retrieval, streamed together."""
    connect(page)
    page.get_by_label("Temperature").fill("0")  # Compare samples as the Chat screen says
    page.get_by_label("Max tokens").fill("16")
    page.locator("#rag-namespace").wait_for(state="attached")
    tab(page, "Compare")
    expect(page.locator(".column")).to_have_count(4)
    page.locator("#column-3-model").select_option(ADAPTER)
    page.locator("#column-4-model").select_option(ADAPTER)
    has_notes = NAMESPACE in page.locator("#column-2-namespace option").all_text_contents()
    for i in (2, 4):  # retrieval, over the notes the retrieval test uploaded if it ran
        if has_notes:
            page.locator(f"#column-{i}-namespace").select_option(NAMESPACE)
        else:
            page.locator(f"#column-{i}-rag").uncheck()
    page.get_by_label("Question").fill("When does the Tartu reading room open?")
    page.get_by_role("button", name="Run all").click()
    for i in range(1, 5):
        meta = page.locator(f"#column-{i}-meta")
        expect(meta).to_contain_text("completion tokens")
        expect(meta).to_contain_text(" ms")
    if has_notes:
        expect(page.locator("#column-2-sources")).to_contain_text("hours.md")
    expect(page.locator("#column-1-sources")).to_be_empty()
    shot(page, "compare")


def test_stop_cancels_on_the_server(page, real_daemon):
    connect(page)
    page.get_by_label("JSON schema (empty: free text)").fill(json.dumps(LONG))
    page.get_by_label("Max tokens").fill("400")
    page.get_by_label("Message").fill("List fruits.")
    page.get_by_role("button", name="Send").click()
    answer = page.locator(".message.assistant").last.locator(".text")
    expect(answer).to_contain_text('"items"')
    assert running(real_daemon) >= 1
    page.get_by_role("button", name="Stop").click()
    expect(page.locator(".message.assistant").last.locator(".meta")).to_have_text("stopped")
    wait_for(lambda: running(real_daemon) == 0, 30, 0.2, "the request stopped")
    expect(page.get_by_role("button", name="Send")).to_be_enabled()


def test_adapters_load_pin_unpin_unload_and_errors_as_the_api_words_them(page, real_daemon,
                                                                         real_adapters):
    connect(page)
    tab(page, "Adapters")
    page.get_by_label("Name", exact=True).fill("playground-loaded")
    page.get_by_label("Path (a PEFT folder inside the daemon's adapter roots)").fill(
        str(real_adapters / "style"))
    page.get_by_role("button", name="Load", exact=True).click()
    row = page.locator('tr[data-adapter="playground-loaded"]')
    expect(row).to_contain_text("alice")
    page.get_by_role("button", name="Pin playground-loaded").click()
    expect(row.locator("td").nth(3)).to_have_text("yes")
    expect(row.locator("td").nth(2)).to_have_text("in a slot")
    shot(page, "adapters")
    page.get_by_role("button", name="Unpin playground-loaded").click()
    expect(row.locator("td").nth(3)).to_have_text("no")
    page.get_by_role("button", name="Unload playground-loaded").click()
    expect(row).to_have_count(0)

    page.get_by_label("Name", exact=True).fill("outside")
    page.get_by_label("Path (a PEFT folder inside the daemon's adapter roots)").fill("/etc")
    page.get_by_role("button", name="Load", exact=True).click()
    said = httpx.post(f"{real_daemon.url}/v1/adapters", json={"name": "outside", "path": "/etc"},
                      headers={"Authorization": f"Bearer {ADMIN}"}).json()["error"]["message"]
    expect(page.get_by_role("alert")).to_have_text(said)


def test_a_user_key_sees_the_apis_refusal(page):
    connect(page, USER)
    tab(page, "Adapters")
    page.get_by_label("Name", exact=True).fill("nope")
    page.get_by_label("Path (a PEFT folder inside the daemon's adapter roots)").fill("/tmp")
    page.get_by_role("button", name="Load", exact=True).click()
    expect(page.get_by_role("alert")).to_contain_text("admin")


def test_keyboard_and_a_phone_width(browser, real_daemon):
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    page.goto(real_daemon.url + "/")
    connect(page)
    page.get_by_role("tab", name="Chat").focus()
    page.keyboard.press("ArrowRight")
    expect(page.get_by_role("tab", name="Compare")).to_be_focused()
    expect(page.locator("#compare")).to_be_visible()
    expect(page.locator("#chat")).to_be_hidden()
    page.keyboard.press("ArrowLeft")
    expect(page.locator("#chat")).to_be_visible()
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0
    shot(page, "phone")
    context.close()
