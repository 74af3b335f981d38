"""`make screenshots`: the playground's pictures in docs/, taken with the demo's trained
adapters on the demo's knowledge base (run `make demo` first: it trains them).

A daemon starts on a fresh data dir with demo-results/adapters as its adapter root, demo/kb
is ingested into `kestrel`, the three adapters are loaded, and Debian's chromium (driven
by Playwright, at a laptop's 1366x768) asks through the playground what a user would:

- docs/playground-chat.png: the RAFT adapter, grounded in kestrel, answers a held-out
  question and cites its page (reranking off: the demo's relevance adapter hurts, README);
- docs/playground-declined.png: the same adapter asked what the pages never say declines;
- docs/playground-compare.png: one question, four columns: base, base + retrieval, the
  format adapter + retrieval, the RAFT adapter + retrieval.

Greedy decoding, so a re-run on the same adapters takes the same pictures.
"""

import shutil
import sys
from pathlib import Path

from playwright.sync_api import Page, expect, sync_playwright

from demo.run import ADAPTERS, BASE, NAMESPACE, OUT, TOP_K, start_daemon
from lorag.client import DaemonClient
from lorag.retrieval.ingest import ingest

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs"
ASKED = "Who is the chief executive of Kestrel Robotics?"  # from demo/questions.jsonl
NEVER_SAID = "What is the Wi-Fi password at the Porto office?"  # demo/unanswerable.jsonl
COMPARED = "In which year was Kestrel Robotics founded?"
WAIT = 300_000  # ms: four answers at once on 2 CPU cores take a while


def chat(page: Page, question: str, turn: int) -> None:
    page.get_by_label("Message").fill(question)
    page.get_by_role("button", name="Send").click()
    expect(page.locator(".message.assistant").nth(turn).locator(".meta")).to_contain_text(
        "completion tokens", timeout=WAIT)


def take(page: Page) -> None:
    page.get_by_label("API key").fill("")
    page.get_by_role("button", name="Connect").click()
    expect(page.locator("#whoami")).to_contain_text("Connected to")
    page.locator("#chat-model").select_option("raft-adapter")
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill("64")
    page.get_by_label("Ground answers in a namespace").check()
    page.locator("#rag-namespace").select_option(NAMESPACE)
    page.get_by_label("Passages (top_k)").fill(str(TOP_K))
    page.get_by_label("Rerank with").select_option("off")
    chat(page, ASKED, 0)
    page.screenshot(path=DOCS / "playground-chat.png")
    page.get_by_role("button", name="New chat").click()
    chat(page, NEVER_SAID, 0)
    page.screenshot(path=DOCS / "playground-declined.png")

    page.get_by_role("tab", name="Compare").click()
    page.get_by_label("Question").fill(COMPARED)
    for i, (model, rag) in enumerate([(BASE, False), (BASE, True),
                                      ("house-style", True), ("raft-adapter", True)]):
        column = page.locator(".column").nth(i)
        column.locator("select").first.select_option(model)
        checkbox = column.get_by_role("checkbox")
        checkbox.check() if rag else checkbox.uncheck()
    page.get_by_role("button", name="Run all").click()
    expect(page.locator(".column .meta").filter(has_text="completion tokens")).to_have_count(
        4, timeout=WAIT)
    page.screenshot(path=DOCS / "playground-compare.png", full_page=True)


def main() -> None:
    adapters = OUT / "adapters"
    missing = [a.name for a in ADAPTERS if not (adapters / a.name).is_dir()]
    if missing:
        sys.exit(f"no trained {', '.join(missing)} under {adapters}: run `make demo` first")
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("the screenshots need Debian's chromium: apt-get install chromium")
    data_dir = OUT / "screenshots-data"
    shutil.rmtree(data_dir, ignore_errors=True)
    daemon = start_daemon(data_dir, OUT / "screenshots.log")
    try:
        client = DaemonClient(daemon.url)
        ingest(client, NAMESPACE, [HERE / "kb"])
        for adapter in ADAPTERS:
            client.load_adapter(adapter.name, str(adapters / adapter.name))
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=chromium,
                args=["--no-sandbox", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1366, "height": 768})
            page.goto(daemon.url + "/")
            take(page)
            browser.close()
    finally:
        daemon.stop()
    print(f"wrote {DOCS}/playground-{{chat,declined,compare}}.png")


if __name__ == "__main__":
    main()
