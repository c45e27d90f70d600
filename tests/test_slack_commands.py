"""The Slack front-end's answers and errors end to end: every subcommand, the settings,
each parse error, escaping, and the errors a user sees (ephemeral, one line each).
"""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

from bot import messages
from bot.slack.adapter import SETTINGS_COMMAND, STORY_COMMAND
from bot.slack.render import escape
from tests.fakes.bolt_http import SlackSender
from tests.fakes.fake_slack import fake_slack  # noqa: F401  (fixture)
from tests.fakes.workspace import ALICE, BOB
from tests.slack_helpers import endless, frontends, gate, lm, service, slack  # noqa: F401  (fixtures)
from tests.slack_helpers import (POSTED, SECRET, blocks, ended, ephemeral, finished, request_id_of, sections,
                                 status)


# ---- everything that is not a story is answered in the ack


@pytest.mark.parametrize("command, text, expected", [
    (STORY_COMMAND, "", messages.HELP),
    (STORY_COMMAND, "help", messages.HELP),
    (STORY_COMMAND, "genres", messages.genres_text()),
    (STORY_COMMAND, "queue", messages.NOTHING_QUEUED.format(depth=0, stories="stories")),
    (STORY_COMMAND, "cancel", messages.NOTHING_TO_CANCEL),
    (STORY_COMMAND, "continue", messages.NOTHING_TO_CONTINUE),
])
async def test_subcommands_answer_in_the_ack(fake_slack, slack, command, text, expected):  # noqa: F811
    delivery = await slack.slash_command(fake_slack.slash_command(text, command=command))
    assert (delivery.status, delivery.text) == (200, escape(expected))
    assert "`/story &lt;genre&gt; &lt;opening&gt;`" in escape(messages.HELP)  # our own <…> show as typed
    assert fake_slack.calls_to("chat.postMessage") == []


async def test_settings_show_set_and_reset(fake_slack, slack):  # noqa: F811
    saved = await slack.slash_command(fake_slack.slash_command("settings temperature=1.1 length=150"))
    shown = await slack.slash_command(fake_slack.slash_command("", command=SETTINGS_COMMAND))
    alone = await slack.slash_command(fake_slack.slash_command("top_p=0.5", command=SETTINGS_COMMAND))
    reset = await slack.slash_command(fake_slack.slash_command("settings reset"))

    assert saved.text.startswith(messages.SETTINGS_SAVED) and "temperature = 1.1  (your default)" in saved.text
    assert shown.text.startswith("Your settings:") and "length = 150  (your default)" in shown.text
    assert "top_p = 0.5  (your default)" in alone.text
    assert reset.text.startswith(messages.SETTINGS_RESET) and "(your default)" not in reset.text


@pytest.mark.parametrize("text, fragment", [
    ("horror", "add an opening after the genre"),
    ("horror The door lenght=150", "unknown setting 'lenght'; settings are: length"),
    ("horror The door length=many", "a whole number"),
    ("horror The door length=100000", "length=100000 is out of range"),
    ("settings temperature", "settings are written name=value"),
    ("settings volume=11", "unknown setting 'volume'"),
    ("help me", "takes nothing after it"),
    ("horror The door seed=<!channel>", "seed='<!channel>'"),
    ("x" * 4001, "a command can be at most 4000"),
])
async def test_parse_errors_are_one_ephemeral_line(fake_slack, slack, service, text, fragment):  # noqa: F811
    delivery = await slack.slash_command(fake_slack.slash_command(text))
    assert delivery.status == 200 and escape(fragment) in delivery.text and "\n" not in delivery.text
    assert fake_slack.calls_to("chat.postMessage") == [] and service.worker.queue_depth() == 0


async def test_cancel_and_queue_commands_while_stories_wait(fake_slack, slack, gate):  # noqa: F811
    gate.open.clear()
    await slack.slash_command(fake_slack.slash_command("drama Alice's tale length=50"))
    await asyncio.to_thread(gate.entered.wait, 5)  # Alice's story holds the only slot
    bob = await slack.slash_command(fake_slack.slash_command("drama Bob's tale length=5", user_id=BOB))
    assert bob.text.startswith("⏳ queued, #1 in line (about ")
    assert (await slack.slash_command(fake_slack.slash_command("queue", user_id=BOB))).text.startswith(
        "Your story is #1 in line")
    assert (await slack.slash_command(fake_slack.slash_command("queue"))).text == messages.RUNNING_STATUS.format(
        depth=1, stories="story")
    cancelled = await slack.slash_command(fake_slack.slash_command("cancel"))
    assert cancelled.text == escape(messages.CANCELLED)
    gate.open.set()
    await ended(fake_slack, escape(messages.STORY_CANCELLED))
    await finished(fake_slack)  # Bob's story, once Alice's left the slot


# ---- escaping


async def test_echoed_prompts_cannot_mention_or_link(fake_slack, slack, service):  # noqa: F811
    # Slack sends &, < and > escaped in command text; the model sees them plain, the channel escaped again.
    typed = "drama &lt;@U0BOB00001&gt; met &lt;!channel&gt; &amp; <!here> @here at <https://evil.test|home> length=6"
    await slack.slash_command(fake_slack.slash_command(typed))
    done = await finished(fake_slack)

    stored = service.state.story(request_id_of(done))
    assert stored.prompt == "<@U0BOB00001> met <!channel> & <!here> @here at <https://evil.test|home>"
    for call in fake_slack.calls:
        if call.method in POSTED:
            shown = "\n".join([call.args["text"], *sections(blocks(call)), status(blocks(call))])
            assert re.findall(r"<[^>]*>", shown) == [f"<@{ALICE}>"]
            assert "&lt;!channel&gt; &amp; &lt;!here&gt; @\u200bhere" in shown


# ---- errors


async def test_a_failure_mid_story_is_an_ephemeral_line_with_a_ref(fake_slack, slack, gate):  # noqa: F811
    gate.fail_when = lambda ids: RuntimeError("CUDA exploded")
    await slack.slash_command(fake_slack.slash_command("drama It began length=10"))
    told = await ephemeral(fake_slack, ALICE)
    assert re.fullmatch(r"Story generation failed \(ref [0-9a-f]{4}\)", told.args["text"])
    await ended(fake_slack, escape(messages.STORY_STOPPED))


async def test_too_many_stories_is_refused_in_the_ack(fake_slack, slack, gate):  # noqa: F811
    gate.open.clear()
    for _ in range(2):
        await slack.slash_command(fake_slack.slash_command("drama Tale length=5"))
    third = await slack.slash_command(fake_slack.slash_command("drama Tale length=5"))
    gate.open.set()
    assert third.text == "you already have 2 stories in progress; wait for one to finish or cancel it"


async def test_unexpected_errors_show_a_ref_that_the_log_has(fake_slack, slack, service, monkeypatch, caplog):  # noqa: F811
    monkeypatch.setattr(service, "queue", lambda ctx: 1 / 0)
    with caplog.at_level(logging.ERROR, logger="bot.service"):
        delivery = await slack.slash_command(fake_slack.slash_command("queue"))
    ref = re.fullmatch(r"Story generation failed \(ref ([0-9a-f]{4})\)", delivery.text).group(1)
    [record] = [r for r in caplog.records if ref in r.getMessage()]
    assert record.exc_info[0] is ZeroDivisionError


async def test_a_channel_the_bot_cannot_post_in_is_told_through_response_url(fake_slack, slack, service):  # noqa: F811
    await slack.slash_command(fake_slack.slash_command("drama Tale length=5", channel_id="C0PRIVATE1"))
    response = await fake_slack.responses.wait_for(lambda post: True)
    assert response.body["text"] == escape(messages.CANT_POST) and response.body["response_type"] == "ephemeral"
    assert [c.response["error"] for c in fake_slack.calls_to("chat.postMessage")] == ["channel_not_found"]


async def test_rate_limited_edits_are_retried(fake_slack, frontends):  # noqa: F811
    front = await frontends("http", interval=60)
    fake_slack.fail_next("chat.update", "ratelimited", retry_after=0)
    async with SlackSender(front.url, SECRET) as slack:
        await slack.slash_command(fake_slack.slash_command("drama Tale length=5"))
        await finished(fake_slack)
    assert [c.status for c in fake_slack.calls_to("chat.update")] == [429, 200]


async def test_stopping_tells_stories_in_progress(fake_slack, frontends, gate):  # noqa: F811
    front = await frontends("http")
    gate.open.clear()
    async with SlackSender(front.url, SECRET) as slack:
        await slack.slash_command(fake_slack.slash_command("drama Tale length=50"))
        await fake_slack.wait_for("chat.postMessage")
    stopping = asyncio.create_task(front.stop())
    await asyncio.sleep(0.05)
    gate.open.set()
    await stopping
    assert (await ephemeral(fake_slack, ALICE)).args["text"] == "the story engine is shutting down; try again shortly"
    await ended(fake_slack, escape(messages.STORY_STOPPED))




# ---- /story admin: workspace admins set the server's limits


async def test_admin_is_for_workspace_admins_and_limits_where_and_how_long(fake_slack, slack):  # noqa: F811
    from tests.fakes.workspace import GENERAL, STORIES

    refused = await slack.slash_command(fake_slack.slash_command("admin allow"))
    assert refused.text == escape(messages.ADMIN_ONLY)
    fake_slack.workspace.users[ALICE]["is_admin"] = True  # as users.info reports it
    saved = await slack.slash_command(fake_slack.slash_command("admin allow max_length=50 cooldown=0"))
    assert saved.text.startswith(messages.ADMIN_SAVED)
    assert f"• channels: <#{STORIES}>" in saved.text and "• max length: 50" in saved.text  # a channel link
    assert fake_slack.calls_to("users.info")[-1].args["user"] == ALICE

    elsewhere = await slack.slash_command(fake_slack.slash_command("drama Tale", user_id=BOB, channel_id=GENERAL))
    assert elsewhere.text == messages.CHANNEL_NOT_ALLOWED.format(channels=f"<#{STORIES}>")
    too_long = await slack.slash_command(fake_slack.slash_command("drama Tale length=80", user_id=BOB))
    assert "length=80 is out of range; allowed: 1 to 50 tokens" in too_long.text

    everywhere = await slack.slash_command(fake_slack.slash_command("admin everywhere"))
    assert "• channels: all channels" in everywhere.text
    fake_slack.fail_next("users.info", "missing_scope")  # an app installed before users:read was added
    assert (await slack.slash_command(fake_slack.slash_command("admin"))).text == escape(messages.ADMIN_ONLY)


@pytest.mark.parametrize("text, fragment", [
    ("admin max_length=abc", "max_length='abc' is not a whole number"),
    ("admin cooldown=soon", "cooldown='soon' is not a number of seconds"),
    ("admin volume=11", "'volume=11' is not an admin setting"),
    ("admin max_temperature=9", "max_temperature=9.0 is out of range; allowed: 0 to 2"),
])
async def test_admin_mistakes_get_one_line(fake_slack, slack, text, fragment):  # noqa: F811
    fake_slack.workspace.users[ALICE]["is_owner"] = True
    delivery = await slack.slash_command(fake_slack.slash_command(text))
    assert fragment in delivery.text and "\n" not in delivery.text
