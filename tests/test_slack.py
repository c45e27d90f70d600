"""The Slack front-end end to end: the real bolt app in HTTP and Socket Mode, the fake Slack
Web API on 127.0.0.1, and StoryService on a running worker with the tiny model
(see tests/slack_helpers.py). Stories, streaming, long output, buttons, redelivery
and request verification; tests/test_slack_commands.py has the subcommands and errors.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import yaml

from bot import messages
from bot.__main__ import serve
from bot.config import BotConfig
from bot.slack.adapter import SETTINGS_COMMAND, STORY_COMMAND
from bot.slack.render import CANCEL, CONTINUE, REGENERATE, SlackLimits, escape
from bot.slack.storytime import STORYTIME_COMMAND
from storygen.config import Secret
from storygen.errors import ConfigError
from tests.conftest import tiny_config
from tests.fakes.bolt_http import FORM, SlackSender
from tests.fakes.fake_slack import fake_slack  # noqa: F401  (fixture)
from tests.fakes.slack_payloads import form_body, retry_headers
from tests.fakes.workspace import ALICE, APP_TOKEN, BOB, BOT_SCOPES, BOT_TOKEN, STORIES, TEAM_ID
from tests.slack_helpers import endless, frontends, gate, lm, service, slack  # noqa: F401  (fixtures)
from tests.slack_helpers import (POSTED, SECRET, blocks, buttons, ended, ephemeral, finished, queued_or_writing,
                                 request_id_of, sections, status)

MANIFEST = Path(__file__).resolve().parents[1] / "slack_manifest.yml"


# ---- stories over HTTP


async def test_story_is_acked_posted_streamed_and_finished_with_buttons(fake_slack, slack, service):  # noqa: F811
    delivery = await slack.slash_command(fake_slack.slash_command("sci_fi After discovering time travel length=20 seed=1"))

    assert delivery.status == 200 and delivery.seconds < 3 and queued_or_writing(delivery.text)
    done = await finished(fake_slack)
    request_id = request_id_of(done)
    [post] = fake_slack.calls_to("chat.postMessage")
    assert post.args["channel"] == STORIES and post.token == BOT_TOKEN
    assert sections(blocks(post)) == ["After discovering time travel"] and buttons(post) == [(CANCEL, request_id)]
    updates = fake_slack.calls_to("chat.update")
    assert all(u.args["ts"] == post.response["ts"] for u in updates)
    assert any(buttons(u) == [(CANCEL, request_id)] for u in updates[:-1])  # streamed while it was written
    assert buttons(done) == [(CONTINUE, request_id), (REGENERATE, request_id)]
    stored = service.state.story(request_id)
    assert stored.user_key == f"slack:{TEAM_ID}:{ALICE}" and stored.genre == "sci_fi"
    assert sections(blocks(done)) == [escape(stored.text)] and stored.text.startswith("After discovering time travel")
    assert status(blocks(done)).startswith("sci_fi · 20 tokens · seed 1") and status(blocks(done)).endswith(f"for <@{ALICE}>")
    assert fake_slack.message(STORIES, post.response["ts"])["blocks"] == blocks(done)


async def test_edits_are_throttled_by_the_stream_interval(fake_slack, frontends):  # noqa: F811
    front = await frontends("http", interval=60)
    async with SlackSender(front.url, SECRET) as slack:
        await slack.slash_command(fake_slack.slash_command("drama The letter came length=30"))
        await finished(fake_slack)
    assert [c.method for c in fake_slack.calls if c.method in POSTED] == ["chat.postMessage", "chat.update"]


async def test_inline_options_reach_the_story(fake_slack, slack, service):  # noqa: F811
    await slack.slash_command(fake_slack.slash_command("horror The door creaked length=12 temperature=1.1 seed=3"))
    done = await finished(fake_slack)
    stored = service.state.story(request_id_of(done))
    assert (stored.genre, stored.prompt) == ("horror", "The door creaked")
    assert (stored.overrides["length"], stored.overrides["temperature"], stored.overrides["seed"]) == (12, 1.1, 3)
    assert status(blocks(done)).startswith("horror · 12 tokens · seed 3")


async def test_default_and_auto_genres(fake_slack, slack, service):  # noqa: F811
    await slack.slash_command(fake_slack.slash_command("settings genre=horror"))
    await slack.slash_command(fake_slack.slash_command("After discovering time travel length=5"))
    first = service.state.story(request_id_of(await finished(fake_slack)))
    delivery = await slack.slash_command(fake_slack.slash_command("auto a magic castle with a dragon length=5"))
    second = service.state.story(request_id_of(await finished(fake_slack, 2)))
    assert first.genre == "horror"
    assert "genre auto →" in delivery.text and second.genre != "auto"


# ---- long stories


async def test_long_story_is_split_across_blocks_and_messages(fake_slack, frontends, service):  # noqa: F811
    limits = SlackLimits(section_chars=20, message_chars=40, message_blocks=50, max_messages=20)
    front = await frontends("http", limits=limits)
    async with SlackSender(front.url, SECRET) as slack:
        await slack.slash_command(fake_slack.slash_command("fantasy The dragon slept length=60 seed=5"))
        done = await finished(fake_slack)
    stored = service.state.story(request_id_of(done))
    posts = fake_slack.calls_to("chat.postMessage")
    shown = [m for p in posts if (m := fake_slack.message(STORIES, p.response["ts"])) is not None]  # not deleted
    assert len(shown) > 1 and all(sum(map(len, sections(m["blocks"]))) <= 40 for m in shown)  # message_chars
    texts = [t for m in shown for t in sections(m["blocks"])]
    assert all(len(t) <= 20 for t in texts) and "".join("".join(texts).split()) == "".join(escape(stored.text).split())
    assert [bool(buttons(m)) for m in shown] == [False] * (len(shown) - 1) + [True]


async def test_too_long_a_story_is_a_preview_and_a_file(fake_slack, frontends, service):  # noqa: F811
    limits = SlackLimits(section_chars=20, message_chars=40, max_messages=1)
    front = await frontends("http", limits=limits)
    async with SlackSender(front.url, SECRET) as slack:
        await slack.slash_command(fake_slack.slash_command("fantasy The dragon slept length=60 seed=5"))
        done = await finished(fake_slack)
        complete = await fake_slack.wait_for("files.completeUploadExternal")
    stored = service.state.story(request_id_of(done))
    [post] = fake_slack.calls_to("chat.postMessage")
    [upload] = fake_slack.uploads
    assert upload.content.decode() == stored.text and upload.filename == f"story-{stored.request_id}.txt"
    assert (complete.args["channel_id"], complete.args["thread_ts"]) == (STORIES, post.response["ts"])
    assert sections(blocks(done))[-1] == escape(messages.STORY_ATTACHED)


# ---- buttons


async def test_continue_and_regenerate_buttons(fake_slack, slack, service):  # noqa: F811
    await slack.slash_command(fake_slack.slash_command("mystery The butler smiled length=10 seed=2"))
    first = await finished(fake_slack)
    request_id = request_id_of(first)
    message = fake_slack.message(STORIES, first.args["ts"])

    clicked = await slack.interaction(fake_slack.block_actions(CONTINUE, request_id, message=message))
    assert (clicked.status, clicked.text) == (200, "")
    assert queued_or_writing((await ephemeral(fake_slack, ALICE)).args["text"])
    more = await finished(fake_slack, 2)
    assert sections(blocks(more))[0].startswith("…")
    whole = service.state.last_story(f"slack:{TEAM_ID}:{ALICE}", f"slack:{TEAM_ID}:{STORIES}")
    assert whole.text.startswith(service.state.story(request_id).text) and whole.request_id == request_id_of(more)

    await slack.interaction(fake_slack.block_actions(REGENERATE, request_id, message=message, user_id=BOB))
    again = service.state.story(request_id_of(await finished(fake_slack, 3)))
    assert again.user_key == f"slack:{TEAM_ID}:{BOB}" and again.prompt == "The butler smiled"

    typed = await slack.slash_command(fake_slack.slash_command("continue", user_id=BOB))  # Bob's latest story here
    assert queued_or_writing(typed.text)
    bobs = service.state.story(request_id_of(await finished(fake_slack, 4)))
    assert bobs.text.startswith(again.text) and bobs.user_key == again.user_key


async def test_only_the_requester_can_cancel(fake_slack, slack, service, gate):  # noqa: F811
    gate.open.clear()
    await slack.slash_command(fake_slack.slash_command("horror The well was deep length=50"))
    post = await fake_slack.wait_for("chat.postMessage")
    request_id = buttons(post)[0][1]

    await slack.interaction(fake_slack.block_actions(CANCEL, request_id, user_id=BOB))
    assert (await ephemeral(fake_slack, BOB)).args["text"] == messages.NOT_YOURS
    await slack.interaction(fake_slack.block_actions(CANCEL, request_id, user_id=ALICE))
    assert (await ephemeral(fake_slack, ALICE)).args["text"] == escape(messages.CANCELLED)
    gate.open.set()
    end = await ended(fake_slack, escape(messages.STORY_CANCELLED))
    assert buttons(end) == [] and service.state.story(request_id) is None


# ---- security and redelivery


@pytest.mark.parametrize("tamper", [{"signing_secret": "not-the-secret"}, {"signature": "v0=" + "0" * 64},
                                    {"timestamp": int(time.time()) - 6 * 60}],
                         ids=["wrong-secret", "forged", "replayed-old-timestamp"])
async def test_unverified_requests_are_401_and_start_nothing(fake_slack, slack, service, tamper):  # noqa: F811
    delivery = await slack.slash_command(fake_slack.slash_command("drama Tale length=5"), **tamper)
    assert delivery.status == 401 and service.worker.queue_depth() == 0
    assert [c.method for c in fake_slack.calls] == ["auth.test"]  # the front-end's own check at start-up


async def test_redeliveries_never_start_a_second_story(fake_slack, slack):  # noqa: F811
    fields = fake_slack.slash_command("drama Tale length=5")
    first = await slack.slash_command(fields)
    retried = await slack.post(form_body(fields), content_type=FORM, headers=retry_headers(1))
    duplicate = await slack.slash_command(fields)  # same trigger_id, no retry header
    await finished(fake_slack)
    await asyncio.sleep(0.1)
    assert queued_or_writing(first.text) and (retried.status, retried.text) == (duplicate.status, duplicate.text) == (200, "")
    assert len(fake_slack.calls_to("chat.postMessage")) == 1


# ---- Socket Mode


async def test_socket_mode_story_buttons_and_duplicate_envelopes(fake_slack, frontends, service):  # noqa: F811
    await frontends("socket")
    await fake_slack.socket.wait_connected()
    command = fake_slack.slash_command("thriller The sheriff rode in length=8 seed=4")

    ack = await fake_slack.socket.deliver("slash_commands", command)
    again = await fake_slack.socket.deliver("slash_commands", command)

    assert queued_or_writing(ack.payload["text"]) and ack.latency < 3 and again.payload is None
    done = await finished(fake_slack)
    request_id = request_id_of(done)
    assert service.state.story(request_id).genre == "thriller"
    help_ack = await fake_slack.socket.deliver("slash_commands", fake_slack.slash_command("help"))
    assert help_ack.payload == {"text": escape(messages.HELP)}
    click = await fake_slack.socket.deliver("interactive", fake_slack.block_actions(CANCEL, request_id, user_id=BOB))
    assert click.payload is None
    assert (await ephemeral(fake_slack, BOB)).args["text"] == messages.NOT_YOURS
    assert len(fake_slack.calls_to("chat.postMessage")) == 1


@pytest.mark.parametrize("mode, method, key", [("http", "auth.test", "SLACK_BOT_TOKEN"),
                                               ("socket", "apps.connections.open", "SLACK_APP_TOKEN")])
async def test_a_refused_token_fails_at_start_up_naming_it(fake_slack, frontends, mode, method, key):  # noqa: F811
    fake_slack.fail_next(method, "invalid_auth")
    with pytest.raises(ConfigError, match=f"Slack refused {key} \\(invalid_auth\\)"):
        await frontends(mode)


async def test_a_story_cut_off_by_a_crash_is_marked_interrupted_at_the_next_start(
        fake_slack, frontends, service, gate):  # noqa: F811
    first = await frontends("http", interval=0)
    gate.open.clear()  # the story is posted, then held in the model
    async with SlackSender(first.url, SECRET) as sender:
        await sender.slash_command(fake_slack.slash_command("drama The lighthouse keeper length=40"))
    post = await fake_slack.wait_for("chat.postMessage")
    [left] = service.state.in_flight("slack")
    assert left.messages == (post.response["ts"],) and left.text == "The lighthouse keeper"

    # The process dies here (kill -9): nothing edits the message. The next start finds it.
    await frontends("http")
    marked = await fake_slack.wait_for(
        lambda c: c.method == "chat.update" and status(blocks(c)).startswith(escape(messages.STORY_INTERRUPTED)))
    assert marked.args["ts"] == post.response["ts"] and sections(blocks(marked)) == ["The lighthouse keeper"]
    assert buttons(marked) == []
    assert service.state.in_flight("slack") == []  # marked once, not at every start
    gate.open.set()
    await finished(fake_slack)  # (in this test the "dead" writer is alive, and finishes)
    for _ in range(100):  # a story that ends is no longer tracked (just after its last edit)
        if not service.state.in_flight("slack"):
            break
        await asyncio.sleep(0.02)
    assert service.state.in_flight("slack") == []


# ---- python -m bot


async def test_python_m_bot_serves_slack(fake_slack, tiny_dirs, tmp_path):  # noqa: F811
    config = BotConfig(slack_bot_token=Secret(BOT_TOKEN), slack_app_token=Secret(APP_TOKEN),
                       slack_api_url=fake_slack.base_url, http_port=0)  # auto mode: an app token means Socket Mode
    stop = asyncio.Event()
    serving = asyncio.create_task(serve(config, tiny_config(tiny_dirs["instruct"], "instruct", tmp_path), stop))
    await fake_slack.socket.wait_connected(timeout=30)
    ack = await fake_slack.socket.deliver("slash_commands", fake_slack.slash_command("drama Tale length=5"))
    assert queued_or_writing(ack.payload["text"])
    await fake_slack.wait_for("chat.postMessage")
    stop.set()
    await asyncio.wait_for(serving, 15)
    assert fake_slack.socket.connections and not serving.exception()


async def test_shutdown_lets_a_running_story_finish_and_turns_new_ones_away(
        fake_slack, lm, gate, endless, tmp_path, monkeypatch):  # noqa: F811
    import bot.__main__ as entry

    monkeypatch.setattr("storygen.serving.load_model", lambda config: lm)  # the tiny model, with the gate on it
    config = BotConfig(slack_bot_token=Secret(BOT_TOKEN), slack_app_token=Secret(APP_TOKEN),
                       slack_api_url=fake_slack.base_url, shutdown_grace_s=30, http_port=0)
    stop = asyncio.Event()
    serving = asyncio.create_task(serve(config, tiny_config(lm.name, "instruct", tmp_path), stop))
    await fake_slack.socket.wait_connected(timeout=30)
    gate.open.clear()
    await fake_slack.socket.deliver("slash_commands", fake_slack.slash_command("drama Tale length=5"))
    await asyncio.to_thread(gate.entered.wait, 5)  # Alice's story is in the model
    stop.set()  # SIGTERM
    await asyncio.sleep(0.3)
    late = await fake_slack.socket.deliver("slash_commands", fake_slack.slash_command("drama Another", user_id=BOB))
    assert late.payload["text"] == escape("the story engine is shutting down; try again shortly")
    gate.open.set()
    done = await finished(fake_slack)  # delivered in full while the bot was still connected
    assert sections(blocks(done))[0].startswith("Tale")
    await asyncio.wait_for(serving, 15)
    assert not serving.exception()


# ---- the manifest


def test_manifest_matches_the_app():
    manifest = yaml.safe_load(MANIFEST.read_text())
    commands = {c["command"] for c in manifest["features"]["slash_commands"]}
    assert commands == {STORY_COMMAND, SETTINGS_COMMAND, STORYTIME_COMMAND}
    assert manifest["settings"]["interactivity"]["is_enabled"] is True  # the buttons
    assert set(manifest["oauth_config"]["scopes"]["bot"]) == set(BOT_SCOPES.split(","))  # what the fake grants
    assert manifest["settings"]["socket_mode_enabled"] is True
    # storytime reads thread replies; history scopes are what these events need
    assert manifest["settings"]["event_subscriptions"]["bot_events"] == ["message.channels", "message.groups"]
