"""The chat page of runtime.serve in a real browser: Debian's ``chromium``, headless, driven by Playwright's Python
package (``executable_path``; Playwright's own browser downloads are never used). Type a prompt, see the answer
stream in, see a completion rendered as a code block; the screenshot goes to ``tests/output/chat_page.png`` (or
``$TEST_OUTPUT_DIR``).

Skipped with the reason when chromium or playwright is missing, except under ``CI=1``, where it fails instead:
``.ci/run`` installs chromium, and CI must run this test.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import REPO
from serve_helpers import API_KEY, server  # noqa: F401 (server is a fixture)

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]  # fmt: skip


def _missing() -> str | None:
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        return f"{CHROMIUM} not found (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    return None


MISSING = _missing()
if MISSING and not os.environ.get("CI"):
    pytest.skip(MISSING, allow_module_level=True)  # before the server starts


@pytest.fixture
def page(tmp_path):
    if MISSING:
        pytest.fail(f"CI must run the browser test: {MISSING}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                   headless=True, args=CHROMIUM_ARGS,
                                                   viewport={"width": 1000, "height": 760})  # fmt: skip
        try:
            yield ctx.pages[0] if ctx.pages else ctx.new_page()
        finally:
            ctx.close()


@pytest.mark.slow
def test_chat_page_streams_an_answer_and_shows_code(server, page):  # noqa: F811
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.locator("summary").click()
    page.fill("#api_key", API_KEY)
    # the shipped model is chat-tuned (training.chat_tuned): the page opens in chat mode and says so
    page.wait_for_function("document.getElementById('mode').dataset.supported !== undefined", timeout=60_000)
    assert page.locator("#mode").input_value() == "chat"
    assert "chat-tuned: chat mode" in page.locator("#status").inner_text()
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "48")
    # record every text the answer shows, to see it grow in several steps: each render puts new nodes into the
    # answer, so the nodes a mutation added keep the text of that render, even when a fast server's events arrive in
    # one network read and are all rendered before the observer runs
    page.evaluate("""() => {
        window.seen = [];
        new MutationObserver((mutations) => {
            for (const m of mutations)
                if (m.target.matches && m.target.matches('.msg.assistant .body'))
                    for (const n of m.addedNodes) window.seen.push(n.textContent.length);
        }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
    }""")
    page.fill("#prompt", "Write a function that adds two numbers.")
    page.press("#prompt", "Enter")
    answer = page.locator(".msg.assistant").first
    page.wait_for_function("document.querySelector('.msg.assistant')?.dataset.state === 'done'", timeout=60_000)
    assert page.locator(".msg.user").first.inner_text().startswith("Write a function")
    assert answer.locator(".body").inner_text().strip(), "no text appeared"
    assert "tokens" in answer.locator(".stats").inner_text()
    grew = sorted(set(page.evaluate("window.seen")))
    assert len([n for n in grew if n > 0]) >= 2, f"the answer did not stream: {grew}"

    page.select_option("#mode", "complete")  # a code model's own mode: the continuation, shown as code
    page.fill("#prompt", "def fib(n):")
    page.locator("#send").click()
    code = page.locator(".msg.assistant").nth(1)
    page.wait_for_function("document.querySelectorAll('.msg.assistant')[1]?.dataset.state === 'done'",
                           timeout=60_000)  # fmt: skip
    assert code.locator("pre code").inner_text().startswith("def fib(n):")
    # fenced blocks inside a chat answer render as code too (the page's own renderer, on a fixed text)
    html = page.evaluate("""() => { const d = document.createElement('div');
        renderMessage(d, 'Here:\\n```python\\nprint(1)\\n```\\ndone'); return d.innerHTML; }""")
    assert '<pre><code class="language-python">print(1)</code></pre>' in html
    assert not errors, errors

    out = Path(os.environ.get("TEST_OUTPUT_DIR", REPO / "tests" / "output"))
    out.mkdir(parents=True, exist_ok=True)
    shot = out / "chat_page.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot: {shot}")


@pytest.mark.slow
def test_chat_page_opens_in_complete_mode_for_a_plain_code_model(page):
    """A model without ``training.chat_tuned`` (the fake engine's): the page picks complete mode and says why; the
    user may still switch to chat."""
    from serve_helpers import FakeBackend, run_app

    from runtime.serve import ServeConfig

    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    with run_app(FakeBackend(ServeConfig())) as url:
        page.goto(url + "/")
        page.locator("summary").click()  # the settings, where the mode is
        page.wait_for_function("document.getElementById('mode').dataset.supported !== undefined", timeout=60_000)
        assert page.locator("#mode").input_value() == "complete"
        assert "not chat-tuned" in page.locator("#status").inner_text()
        page.select_option("#mode", "chat")
        assert page.locator("#mode").input_value() == "chat"
    assert not errors, errors
