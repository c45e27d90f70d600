"""The playground in a real headless browser: Debian's chromium, driven by Playwright.

Playwright's own browser download is not reachable here, so it launches the system binary
(CHROMIUM, default /usr/bin/chromium; `.ci/run` installs it with apt). Where there is no
browser the test is skipped with the reason, never passed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import tiny_config
from tests.model_hooks import ModelGate, endless, gate  # noqa: F401  (fixtures)
from tests.web_helpers import web_front_end

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# As this machine's probe runs it: no sandbox as root, and no background calls to the closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

playwright_api = pytest.importorskip("playwright.async_api", reason="playwright is not installed (requirements-dev.txt)")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"no chromium at {CHROMIUM}: `apt-get install chromium` (done by .ci/run)")


@pytest.fixture
def lm(tiny_lms):
    return tiny_lms["instruct"]


async def _wait_for(predicate, timeout=20.0):
    for _ in range(int(timeout / 0.05)):
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the page did not get there in time")


async def test_a_user_writes_a_story_sees_the_queue_and_cancels_a_second_one(lm, tmp_path, gate, endless):  # noqa: F811
    config = tiny_config(lm.name, "instruct", tmp_path, max_batch=1)
    async with web_front_end(lm, tmp_path, storygen=config) as web, playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = await browser.new_page()
        await page.goto(web.url + "/")
        assert await page.title() == "StoryBot playground"

        # The first story takes the only slot and is held in the model; the second waits in line.
        gate.open.clear()
        await page.fill("#command", "/story sci_fi After discovering time travel length=300")
        await page.click("#send")
        first = page.locator("article.story").first
        await first.locator(".status").filter(has_text="writing").wait_for()
        await page.fill("#command", "/story horror The cellar door length=300")
        await page.click("#send")
        await _wait_for(lambda: _count(page, "article.story", 2))
        second = page.locator("article.story").first  # newest on top
        await second.locator(".status").filter(has_text="queued, #1 in line").wait_for()
        assert await second.locator(".text").text_content() == "The cellar door"

        # Let the model go: the first story grows in place.
        gate.open.set()
        story = page.locator("article.story").nth(1)
        lengths = []
        for _ in range(100):
            lengths.append(len(await story.locator(".text").text_content()))
            if len(set(lengths)) >= 3:
                break
            await asyncio.sleep(0.05)
        assert lengths[0] >= len("After discovering time travel") and len(set(lengths)) >= 3, lengths

        # Cancel the second story with its button.
        await second.locator("button.cancel").click()
        await second.locator(".status").filter(has_text="the story was cancelled").wait_for()
        await page.locator(".reply").filter(has_text="Cancelled your story").wait_for()
        # the first one goes on to its end, and its buttons come alive
        await story.locator("button.continue:not([disabled])").wait_for(timeout=60_000)
        assert "tokens · seed" in await story.locator(".status").text_content()

        # What people and the model write is shown as text, never as markup.
        await page.fill("#command", "/story drama <b id=x>bold</b> and <img src=y onerror=alert(1)> then length=3")
        await page.click("#send")
        await _wait_for(lambda: _count(page, "article.story", 3))
        shown = page.locator("article.story").first.locator(".text")
        await _wait_for(lambda: _contains(shown, "<b id=x>bold</b>"))
        assert await page.locator("#x").count() == 0 and await page.locator("article img").count() == 0
        await page.screenshot(path=str(tmp_path / "playground.png"))
        await browser.close()


async def _count(page, selector, n):
    return await page.locator(selector).count() == n


async def _contains(locator, text):
    return text in (await locator.text_content() or "")
