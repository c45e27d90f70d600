"""Group storytelling on Slack end to end: the real bolt app over HTTP, the fake Slack Web API,
the tiny model on a running worker. Three people write a story in vote mode (a model turn after
every line, offered as two options), with thread replies, slash commands and `/story together`,
Block Kit vote buttons, an undo, a restart of the bot in the middle, then `end`; the exported
.md is read line by line. Timers run on a clock the test moves.
"""

from __future__ import annotations

import asyncio
import re
from datetime import datetime, timezone

import pytest_asyncio

from bot import messages
from bot.__main__ import serve
from bot.config import BotConfig
from bot.slack.adapter import SlackFrontEnd
from bot.slack.render import escape
from bot.slack.storytime import STORYTIME_COMMAND, VOTE
from bot.storytime.limits import StorytimeLimits
from bot.storytime.service import StorytimeService
from bot.storytime.session import MODEL
from bot.storytime.store import SessionStore
from storygen.config import Secret
from tests.conftest import tiny_config
from tests.fakes.bolt_http import SlackSender
from tests.fakes.fake_slack import fake_slack  # noqa: F401  (fixture)
from tests.fakes.slack_payloads import event_callback, message_event
from tests.fakes.workspace import ALICE, APP_TOKEN, BOB, BOT_TOKEN, CAROL, STORIES, TEAM_ID
from tests.slack_helpers import SECRET, endless, gate, lm, service  # noqa: F401  (fixtures)
from tests.storytime_helpers import Clock

LIMITS = StorytimeLimits(model_tokens=8, vote_timeout_s=60, turn_timeout_s=300)
NAMES = {ALICE: "alice", BOB: "bob", CAROL: "carol"}


class SlackBot:
    """One run of the bot's Slack side with storytime; `restart()` is a new process on the same DB."""

    def __init__(self, service, fake, clock: Clock) -> None:
        self.service, self.fake, self.clock = service, fake, clock
        self.front: SlackFrontEnd | None = None
        self.storytime: StorytimeService | None = None
        self.sender: SlackSender | None = None

    async def start(self) -> None:
        self.storytime = StorytimeService(self.service.worker, SessionStore(self.service.config.settings_db), LIMITS,
                                          self.clock)
        config = BotConfig(slack_bot_token=Secret(BOT_TOKEN), slack_app_token=Secret(APP_TOKEN),
                           slack_signing_secret=Secret(SECRET), slack_api_url=self.fake.base_url, slack_mode="http",
                           slack_http_port=0, stream_interval_s=0.0)
        self.front = SlackFrontEnd(self.service, config, host="127.0.0.1", storytime=self.storytime)
        await self.front.start()
        self.sender = SlackSender(self.front.url, SECRET)
        await self.sender.__aenter__()

    async def stop(self) -> None:
        await self.sender.__aexit__(None, None, None)
        await self.front.stop()
        await self.storytime.close()
        self.storytime.store.close()

    async def restart(self) -> None:
        await self.stop()
        await self.start()
        await self.storytime.idle()

    async def command(self, text: str, user: str = ALICE, command: str = STORYTIME_COMMAND) -> str:
        delivery = await self.sender.slash_command(self.fake.slash_command(text, command=command, user_id=user,
                                                                           user_name=NAMES[user]))
        assert delivery.status == 200
        await self.storytime.idle()
        return delivery.text

    async def reply(self, text: str, user: str, thread_ts: str) -> None:
        """A thread reply; returns once the bot took it as a line or told the writer why not."""
        lines, told = self._lines(), len(ephemerals(self.fake, user))
        event = message_event(text, user=user, channel=STORIES, thread_ts=thread_ts)
        assert (await self.sender.event(event_callback(event))).status == 200
        await until(lambda: self._lines() > lines or len(ephemerals(self.fake, user)) > told)
        await self.storytime.idle()

    async def vote(self, user: str, index: int, message: dict) -> str:
        """A click on a vote button; returns what the voter was told."""
        told = len(ephemerals(self.fake, user))
        value = dict(_buttons(message))[f"{VOTE}_{index}"]
        payload = self.fake.block_actions(f"{VOTE}_{index}", value, message=message, user_id=user)
        assert (await self.sender.interaction(payload)).status == 200
        await until(lambda: len(ephemerals(self.fake, user)) > told)
        await self.storytime.idle()
        return ephemerals(self.fake, user)[-1]

    def _lines(self) -> int:
        session = self.storytime.store.find_open(f"slack:{TEAM_ID}", STORIES)
        return len(session.lines) if session else 0


async def until(condition, timeout: float = 30) -> None:
    """Wait for the bot to react to a delivery (bolt handles events after it acks them)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        assert loop.time() < end, "the bot did not react"
        await asyncio.sleep(0.01)


def _buttons(message: dict) -> list[tuple[str, str]]:
    return [(e["action_id"], e["value"]) for b in message.get("blocks", []) if b["type"] == "actions"
            for e in b["elements"]]


@pytest_asyncio.fixture
async def bot(service, fake_slack):  # noqa: F811
    running = SlackBot(service, fake_slack, Clock())
    await running.start()
    yield running
    await running.stop()


def thread_posts(fake, thread_ts: str) -> list[str]:
    """The thread as people see it now: every message in it, in order, by its current text."""
    found = [m for (channel, ts), m in fake.workspace.messages.items() if m.get("thread_ts") == thread_ts]
    return [m["text"] for m in sorted(found, key=lambda m: float(m["ts"]))]


def vote_message(fake, thread_ts: str) -> dict:
    found = [m for m in fake.workspace.messages.values() if m.get("thread_ts") == thread_ts and _buttons(m)]
    return sorted(found, key=lambda m: float(m["ts"]))[-1]


def ephemerals(fake, user: str) -> list[str]:
    return [c.args["text"] for c in fake.calls_to("chat.postEphemeral") if c.args["user"] == user]


async def test_three_people_write_a_story_with_votes_an_undo_and_a_restart(bot, fake_slack, service):  # noqa: F811
    fake = fake_slack
    ack = await bot.command('start fantasy The dragon woke. title="Dragon Days" mode=vote turns=6')
    assert ack == escape(messages.ST_STARTED_ACK.format(title="Dragon Days"))
    first = fake.calls_to("chat.postMessage")[0]
    assert first.args["channel"] == STORIES and "thread_ts" not in first.args
    assert first.args["text"].startswith("📖 *Dragon Days* (fantasy, vote mode) started by alice")
    thread = first.response["ts"]
    assert await bot.command("join", BOB) == escape(messages.ST_JOINED.format(name="bob", position=2))
    assert await bot.command("together join", CAROL, command="/story") == escape(
        messages.ST_JOINED.format(name="carol", position=3))

    # vote 1: two options were streamed into the thread; three players vote, Bob changes his mind
    posts = thread_posts(fake, thread)
    assert posts[0] == "*alice*: The dragon woke."
    assert posts[1].startswith("*Option 1*: ") and posts[2].startswith("*Option 2*: ")
    assert escape(messages.ST_VOTE_OFFER.format(seconds=60)) in posts
    ballot = vote_message(fake, thread)
    assert [a for a, _ in _buttons(ballot)] == [f"{VOTE}_0", f"{VOTE}_1"]
    assert await bot.vote(BOB, 1, ballot) == "You voted for option 2."
    assert await bot.vote(BOB, 0, ballot) == "You changed your vote to option 1."
    await bot.vote(ALICE, 1, ballot)
    await bot.vote(CAROL, 0, ballot)
    assert escape(messages.ST_VOTE_RESULT.format(number=1, votes="2 to 1 votes")) in thread_posts(fake, thread)
    assert thread_posts(fake, thread)[-1] == escape(messages.ST_NEXT.format(name="bob", timeout="5 minutes"))

    # Bob replies in the thread; Carol, out of turn, is told whose turn it is, only her
    await bot.reply("Bob <@U0ALICE001> tamed it. @channel", BOB, thread)
    await bot.reply("Carol barges in.", CAROL, thread)
    assert ephemerals(fake, CAROL)[-1] == escape(messages.ST_VOTING)
    # vote 2 times out with one vote in: it counts
    await bot.vote(ALICE, 1, vote_message(fake, thread))
    bot.clock.advance(60)
    await bot.storytime.tick()
    await bot.storytime.idle()
    assert escape(messages.ST_VOTE_TIMEOUT.format(number=2, votes="0 to 1 vote")) in thread_posts(fake, thread)

    # the bot restarts between turns; Carol's turn carries on, by slash command, her line shown in the thread
    await bot.restart()
    assert await bot.command("add Carol lights a lamp @here.", CAROL) == escape(messages.ST_ADDED.format(left=3))
    assert "*carol*: Carol lights a lamp @\u200bhere." in thread_posts(fake, thread)
    # the bot restarts with vote 3 open; the old buttons still work
    ballot = vote_message(fake, thread)
    await bot.restart()
    for user in (ALICE, BOB, CAROL):
        await bot.vote(user, 1, ballot)
    session = bot.storytime.store.find_open(f"slack:{TEAM_ID}", STORIES)
    third_option = session.lines[-1].text
    # the starter undoes the model's last line; Bob may not
    assert (await bot.command("undo", BOB)) == escape(messages.ST_UNDO_ONLY)
    undone = await bot.command("undo", ALICE)
    assert undone.startswith(escape("↩️ Removed the last line (StoryBot:"))
    status = await bot.command("status", BOB)
    assert "Players: alice, bob, carol." in status
    assert escape(messages.ST_STATUS_TURN.format(name="alice", seconds=300)) in status

    # end: the whole story in a Markdown file in the thread
    assert await bot.command("end", ALICE) == escape(messages.ST_ENDED_ACK.format(title="Dragon Days"))
    complete = await fake.wait_for("files.completeUploadExternal")
    assert (complete.args["channel_id"], complete.args["thread_ts"]) == (STORIES, thread)
    [upload] = fake.uploads
    final = bot.storytime.store.get(session.session_id)
    assert [line.author for line in final.lines] == [ALICE, MODEL, BOB, MODEL, CAROL]
    assert third_option not in [line.text for line in final.lines]
    date = datetime.fromtimestamp(bot.clock(), timezone.utc)
    model_1, model_2 = (line.text for line in final.lines if line.author == MODEL)
    lines = upload.content.decode().splitlines()
    assert upload.filename == f"dragon-days-{session.session_id}.md"
    assert lines[:5] == ["# Dragon Days", "", f"*fantasy · {date:%Y-%m-%d}*", "", "The dragon woke."]
    assert lines[6] == _md(model_1) and lines[10] == _md(model_2)
    assert lines[8] == r"Bob \<@U0ALICE001\> tamed it. @channel"  # inert text in a file, as typed
    assert lines[12] == "Carol lights a lamp @here."
    assert lines[13:] == ["", "## Credits", "", "- StoryBot (the model): 2 lines", "- alice: 1 line",
                          "- bob: 1 line", "- carol: 1 line"]
    assert complete.args["initial_comment"].startswith(escape("🏁 *Dragon Days* is finished: 5 lines"))
    assert await bot.command("status") == escape(messages.ST_NO_SESSION)


def _md(text: str) -> str:
    return re.sub(r"([\\`*_\[\]#<>|])", r"\\\1", text)


async def test_replies_in_other_threads_and_the_bots_own_posts_are_not_lines(bot, fake_slack):  # noqa: F811
    await bot.command("start horror mode=free")
    thread = fake_slack.calls_to("chat.postMessage")[0].response["ts"]
    before = len([c for c in fake_slack.calls if c.method.startswith("chat.")])
    delivery = await bot.sender.event(event_callback(message_event("elsewhere", user=BOB, thread_ts="1.000001")))
    bot_post = message_event("mine", user=BOB, thread_ts=thread) | {"bot_id": "B0BOT00001"}
    await bot.sender.event(event_callback(bot_post))
    await bot.storytime.idle()
    assert delivery.status == 200 and len([c for c in fake_slack.calls if c.method.startswith("chat.")]) == before
    assert bot.storytime.store.find_open(f"slack:{TEAM_ID}", STORIES).lines == []


async def test_a_redelivered_reply_is_one_line(bot, fake_slack):  # noqa: F811
    await bot.command("start horror mode=free model_every=10")
    thread = fake_slack.calls_to("chat.postMessage")[0].response["ts"]
    body = event_callback(message_event("Once, only once.", user=BOB, thread_ts=thread))
    await bot.sender.event(body)
    await bot.sender.event(body, retry_num=1)  # Slack's retry
    await bot.sender.event(body)  # the same event_id again
    await bot.storytime.idle()
    session = bot.storytime.store.find_open(f"slack:{TEAM_ID}", STORIES)
    assert [line.text for line in session.lines] == ["Once, only once."]


async def test_help_and_errors_are_one_ephemeral_line(bot):
    assert await bot.command("") == escape(messages.STORYTIME_HELP.format(reply_hint=messages.STORYTIME_REPLY_HINT))
    assert await bot.command("join") == escape(messages.ST_NO_SESSION)
    assert "not a storytime command" in await bot.command("dance")
    assert await bot.command("start fantasy turns=99") == escape("turns=99 is out of range; allowed: 1 to 30")
    assert await bot.command("list") == escape(messages.ST_LIST_ONLY)


async def test_python_m_bot_serves_storytime_over_socket_mode(fake_slack, tiny_dirs, tmp_path):  # noqa: F811
    config = BotConfig(slack_bot_token=Secret(BOT_TOKEN), slack_app_token=Secret(APP_TOKEN),
                       slack_api_url=fake_slack.base_url)
    stop = asyncio.Event()
    serving = asyncio.create_task(serve(config, tiny_config(tiny_dirs["instruct"], "instruct", tmp_path), stop))
    await fake_slack.socket.wait_connected(timeout=30)
    ack = await fake_slack.socket.deliver("slash_commands", fake_slack.slash_command(
        "start drama The letter came.", command=STORYTIME_COMMAND))
    assert ack.payload["text"] == escape(messages.ST_STARTED_ACK.format(title="A drama story"))
    thread = fake_slack.calls_to("chat.postMessage")[0].response["ts"]

    def model_lines() -> list:
        return [c for c in fake_slack.calls_to("chat.update") if c.args["text"].startswith("*StoryBot*: ")
                and not c.args["text"].endswith(escape(messages.STARTED))]

    await until(lambda: len(model_lines()) == 1, 30)  # the model's turn after the opening
    reply = event_callback(message_event("She opened it.", thread_ts=thread))
    await fake_slack.socket.deliver("events_api", reply)
    await fake_slack.socket.deliver("events_api", reply, retry_attempt=1, retry_reason="timeout")  # redelivered
    await until(lambda: len(model_lines()) == 2, 30)
    stop.set()
    await asyncio.wait_for(serving, 15)
    assert not serving.exception()
    store = SessionStore(tmp_path / "settings.sqlite3")
    [session] = store.open_sessions("slack")
    assert [line.text for line in session.lines][::2] == ["The letter came.", "She opened it."]
    assert len(session.lines) == 4
    store.close()


async def test_a_channel_the_bot_cannot_post_in_is_one_line_and_no_session(bot, fake_slack):  # noqa: F811
    fake_slack.fail_next("chat.postMessage", "not_in_channel")
    assert await bot.command("start horror The door.") == escape(messages.CANT_POST)
    assert bot.storytime.store.open_sessions() == []


async def test_a_restart_mid_model_line_marks_the_old_message_and_writes_the_line_once(bot, fake_slack, gate):  # noqa: F811
    await bot.command("start horror mode=free")
    thread = fake_slack.calls_to("chat.postMessage")[0].response["ts"]
    gate.open.clear()
    await bot.sender.slash_command(fake_slack.slash_command("add The door opened.", command=STORYTIME_COMMAND,
                                                            user_name="alice"))
    writing = await fake_slack.wait_for(lambda c: c.method == "chat.postMessage"
                                        and c.args["text"].startswith("*StoryBot*:"), timeout=30)
    await until(lambda: bot.storytime.store.open_sessions()[0].model.message == writing.response["ts"])
    await bot.storytime.close()  # the process dies with the line half written
    gate.open.set()
    await bot.restart()
    old = fake_slack.message(STORIES, writing.response["ts"])
    assert old["text"] == f"*StoryBot*: {escape(messages.STORY_STOPPED)}"
    [session] = bot.storytime.store.open_sessions()
    assert [line.author for line in session.lines] == [ALICE, MODEL] and session.model is None
    assert f"*StoryBot*: {escape(session.lines[-1].text)}" in thread_posts(fake_slack, thread)
    assert escape(messages.ST_MODEL_RERUN) in thread_posts(fake_slack, thread)
