"""Fixtures and readers for the Slack front-end tests: the tiny model held or failed on
demand, StoryService on a running worker, SlackFrontEnd started against the fake Slack.

Stories never stop early (the output layer never proposes a stop token), so a story
of `length=N` is N tokens; `Gate`, a forward pre-hook, holds the model to keep a
story in progress for as long as a test needs, or makes it fail.
"""

from __future__ import annotations

import json

import pytest
import pytest_asyncio

from bot import messages
from bot.config import BotConfig
from bot.slack.adapter import SlackFrontEnd
from bot.slack.render import CONTINUE, escape
from storygen.config import Secret
from tests.conftest import running_service, tiny_config
from tests.fakes.bolt_http import SlackSender
from tests.fakes.fake_slack import FakeSlack
from tests.fakes.workspace import APP_TOKEN, BOT_TOKEN
from tests.model_hooks import endless, gate  # noqa: F401  (fixtures, re-exported)

SECRET = "storybot-slack-test-secret"
POSTED = ("chat.postMessage", "chat.update")


@pytest.fixture
def lm(tiny_lms):
    return tiny_lms["instruct"]


@pytest_asyncio.fixture
async def service(lm, tmp_path, endless):
    config = tiny_config(lm.name, "instruct", tmp_path, max_batch=1)  # one story at a time: queues form
    async with running_service(lm, config) as story_service:
        yield story_service


@pytest_asyncio.fixture
async def frontends(service, fake_slack: FakeSlack):  # noqa: F811
    """start(mode, interval=..., limits=...) -> a started SlackFrontEnd; all are stopped afterwards."""
    running: list[SlackFrontEnd] = []

    async def start(mode: str = "http", interval: float = 0.0, **options) -> SlackFrontEnd:
        config = BotConfig(slack_bot_token=Secret(BOT_TOKEN), slack_app_token=Secret(APP_TOKEN),
                           slack_signing_secret=Secret(SECRET), slack_api_url=fake_slack.base_url,
                           slack_mode=mode, slack_http_port=0, stream_interval_s=interval)
        front = SlackFrontEnd(service, config, host="127.0.0.1", **options)
        await front.start()
        running.append(front)
        return front

    yield start
    for front in running:
        await front.stop()


@pytest_asyncio.fixture
async def slack(frontends):
    front = await frontends("http")
    async with SlackSender(front.url, SECRET) as sender:
        yield sender


# ---- reading what reached the fake


def blocks(call) -> list[dict]:
    raw = call.args.get("blocks") or []
    return json.loads(raw) if isinstance(raw, str) else raw


def buttons(call_or_message) -> list[tuple[str, str]]:
    found = blocks(call_or_message) if hasattr(call_or_message, "args") else call_or_message.get("blocks", [])
    return [(e["action_id"], e["value"]) for b in found if b["type"] == "actions" for e in b["elements"]]


def sections(found: list[dict]) -> list[str]:
    return [b["text"]["text"] for b in found if b["type"] == "section"]


def status(found: list[dict]) -> str:
    return next(b["elements"][0]["text"] for b in found if b["type"] == "context")


async def finished(fake: FakeSlack, count: int = 1, timeout: float = 15):
    """The `count`-th post or edit that shows a finished story (with a Continue button)."""
    def done(call) -> bool:
        return call.method in POSTED and call.ok and any(a == CONTINUE for a, _ in buttons(call))

    await fake.calls.wait_for(lambda call: done(call) and sum(map(done, fake.calls)) >= count, timeout)
    return [call for call in fake.calls if done(call)][count - 1]


async def ended(fake: FakeSlack, line: str, timeout: float = 15):
    """The edit that marks a story as ended with `line` (cancelled, stopped)."""
    return await fake.wait_for(lambda c: c.method == "chat.update" and status(blocks(c)).startswith(line), timeout)


async def ephemeral(fake: FakeSlack, user: str, timeout: float = 10):
    return await fake.wait_for(lambda c: c.method == "chat.postEphemeral" and c.args["user"] == user, timeout)


def request_id_of(call) -> str:
    return buttons(call)[0][1]


def queued_or_writing(text: str) -> bool:
    return text == escape(messages.STARTED) or text.startswith("⏳ queued, #1 in line")


