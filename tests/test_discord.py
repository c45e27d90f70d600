"""The Discord front-end end to end: a real discord.py client against the local fake Discord,
real INTERACTION_CREATE payloads in, and the HTTP calls the bot makes asserted on.
Every story runs through the worker with a tiny scripted model (tests/scripted_model.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time

import pytest

from bot import messages
from bot.commands import CommandError, SimpleCommand, StoryCommand
from bot.config import BotConfig
from bot.discord.adapter import DiscordFrontEnd, to_story_command
from bot.discord.delivery import TOKEN_TTL_S
from bot.service import StoryService
from bot.state import BotState
from storygen.config import Env, Secret, StorygenConfig
from storygen.errors import ConfigError, UnknownGenreError
from storygen.settings import SettingsStore
from storygen.worker import Worker
from tests.conftest import tiny_config
from tests.fakes import discord_objects as obj
from tests.scripted_model import LONG, ScriptedModel, model, scripted_lm  # noqa: F401  (fixtures)

CALLBACK = "POST /interactions/{interaction_id}/{interaction_token}/callback"
EDIT = "PATCH /webhooks/{application_id}/{interaction_token}/messages/{message_id}"
FOLLOWUP = "POST /webhooks/{application_id}/{interaction_token}"
CHANNEL_POST = "POST /channels/{channel_id}/messages"
CHANNEL_EDIT = "PATCH /channels/{channel_id}/messages/{message_id}"
ADMIN = str(int(obj.MEMBER_PERMISSIONS) | 1 << 5)  # Manage Server
STORY = "The ship drifted. Stars went out. Nobody answered."
RAW_MENTION = re.compile(r"<@[!&]?\d|@(everyone|here)")  # what would ping; a <#channel> link does not


@contextlib.asynccontextmanager
async def storybot(fake, lm, tmp_path, *, token_ttl_s=TOKEN_TTL_S, guild_ids=(), **changes):
    """The bot as `python -m bot` runs it, on the scripted model, pointed at the fake."""
    config = tiny_config(lm.name, "instruct", tmp_path, **changes)
    worker = Worker(lm, config)
    await worker.start()
    settings, state = SettingsStore(config.settings_db), BotState(config.settings_db)
    bot_config = BotConfig(discord_token=Secret(fake.token), discord_api_url=fake.api_url,
                           discord_gateway_url=fake.gateway_url, discord_guild_ids=guild_ids, stream_interval_s=0.05)
    front = DiscordFrontEnd(StoryService(worker, settings, state, config), bot_config,
                            token_ttl_s=token_ttl_s, guild_ready_timeout=0.05)
    await front.start()
    try:
        yield front
    finally:
        await front.stop()
        await worker.stop()
        settings.close()
        state.close()


@pytest.fixture
async def bot(fake_discord, scripted_lm, model, tmp_path):
    async with storybot(fake_discord, scripted_lm, tmp_path) as front:
        yield front


def ask(fake, name, options=None, **where):
    return fake.slash_command(name, options or {}, **where)


async def run(fake, name, options=None, **where):
    payload = ask(fake, name, options, **where)
    await fake.interact(payload)
    return payload


async def line(fake, payload) -> str:
    """The one ephemeral line an interaction was answered with."""
    callback = await fake.wait_for(lambda r: r.route == CALLBACK and payload["id"] in r.path)
    assert callback.status == 200, callback.response
    assert callback.json["type"] == 4 and callback.json["data"]["flags"] == 64, callback.json
    assert callback.json["data"]["allowed_mentions"] == {"parse": []}
    return callback.json["data"]["content"]


def story_message(r, payload, button="story:continue:") -> bool:
    """An edit or follow-up of this interaction's story that shows this button."""
    return r.route in (EDIT, FOLLOWUP) and payload["token"] in r.path and button in json.dumps(r.json)


async def finished(fake, payload, timeout=10.0):
    """The message that carries the finished story's buttons (the last page)."""
    return await fake.wait_for(lambda r: story_message(r, payload), timeout=timeout)


def custom_ids(body) -> list[str]:
    return [c["custom_id"] for row in body.get("components") or [] for c in row["components"]]


def sent_by_bot(fake) -> list:
    """Every interaction callback, message and edit the bot sent."""
    return [r for r in fake.requests if r.method in ("POST", "PATCH") and r.json and "/commands" not in r.path]


# --- the genre and prompt boxes (pure) ------------------------------------------------------------

@pytest.mark.parametrize("genre, prompt, options, expected", [
    ("sci_fi", "After discovering time travel", {}, StoryCommand("After discovering time travel", "sci_fi")),
    ("Science Fiction", "The ship", {"length": 50}, StoryCommand("The ship", "sci_fi", {"length": 50})),
    ("auto", "A castle", {}, StoryCommand("A castle", "auto")),
    ("sci_fi", "He said x=5", {}, StoryCommand("He said x=5", "sci_fi")),  # a typed prompt is never parsed
    ("sci_fi After discovering time travel", "", {}, StoryCommand("After discovering time travel", "sci_fi")),
    ("horror The door length=150 seed=3", "", {"length": 90},
     StoryCommand("The door", "horror", {"length": 90, "seed": 3})),  # the typed option wins
    ("After discovering", "time travel", {}, StoryCommand("After discovering time travel", None)),
    ("The door creaked", "", {}, StoryCommand("The door creaked", None)),  # the user's default genre
    ("queue", "", {}, SimpleCommand("queue")),
])
def test_genre_and_prompt_boxes(genre, prompt, options, expected):
    assert to_story_command(genre, prompt, options) == expected


@pytest.mark.parametrize("genre, prompt, error, fragment", [
    ("cyberpunk", "A hacker", UnknownGenreError, "unknown genre 'cyberpunk'; choose one of: action, auto"),
    ("sci_fi", "", CommandError, "add an opening after the genre"),
])
def test_genre_and_prompt_box_mistakes(genre, prompt, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        to_story_command(genre, prompt, {})


# --- schema and autocomplete ------------------------------------------------------------------------

async def test_the_synced_command_schema(fake_discord, bot):
    [put] = [r for r in fake_discord.requests if r.method == "PUT"]
    assert put.route == "PUT /applications/{application_id}/commands"  # no DISCORD_GUILD_IDS: global
    commands = {c["name"]: c for c in put.json}
    assert set(commands) == {"story", "continue", "settings", "genres", "queue", "cancel", "storyadmin"}
    assert all(c["contexts"] == [0] and len(c["description"]) <= 100 for c in put.json)  # servers only
    story = commands["story"]["options"]
    assert [(o["name"], o["type"], o["required"]) for o in story] == [
        ("genre", 3, True), ("prompt", 3, False), ("length", 4, False), ("temperature", 10, False),
        ("top_p", 10, False), ("top_k", 4, False), ("repetition_penalty", 10, False), ("seed", 4, False)]
    genre, prompt, length, temperature, top_p, top_k, penalty, seed = story
    assert genre["autocomplete"] is True and (genre["min_length"], genre["max_length"]) == (1, 4000)
    assert prompt["max_length"] == 4000
    assert (length["min_value"], length["max_value"]) == (1, 400)  # the operator's caps
    assert (temperature["min_value"], temperature["max_value"]) == (0, 2)
    assert (top_p["min_value"], top_p["max_value"]) == (0.01, 1)
    assert (top_k["min_value"], top_k["max_value"]) == (0, 200)
    assert (penalty["min_value"], penalty["max_value"]) == (1, 2)
    assert (seed["min_value"], seed["max_value"]) == (0, 2**32 - 1)
    settings = {o["name"]: o for o in commands["settings"]["options"]}
    assert list(settings) == ["show", "set", "reset"] and all(o["type"] == 1 for o in settings.values())
    assert [o["name"] for o in settings["set"]["options"]] == [
        "genre", "length", "temperature", "top_p", "top_k", "repetition_penalty"]
    admin = commands["storyadmin"]
    assert int(admin["default_member_permissions"]) == 1 << 5  # Manage Server
    assert [(o["name"], o["type"]) for o in admin["options"]] == [
        ("allow_channel", 7), ("disallow_channel", 7), ("all_channels", 5), ("max_length", 4),
        ("max_temperature", 10), ("cooldown", 10)]
    assert commands["story"]["default_member_permissions"] is None


async def test_commands_sync_to_the_configured_servers(fake_discord, scripted_lm, model, tmp_path):
    guild_id = int(fake_discord.guild["id"])
    async with storybot(fake_discord, scripted_lm, tmp_path, guild_ids=(guild_id,)):
        [put] = [r for r in fake_discord.requests if r.method == "PUT"]
    assert put.params["guild_id"] == str(guild_id) and len(put.json) == 7
    assert fake_discord.state.global_commands == []


@pytest.mark.parametrize("typed, values", [
    ("", ["auto", "superhero", "sci_fi", "horror", "action", "thriller", "drama", "fantasy", "romance", "mystery",
          "comedy"]),
    ("sc", ["sci_fi", "horror"]),  # sci_fi by name, horror by its alias "scary"
    ("science f", ["sci_fi"]),
    ("sci_fi After discovering time travel", []),  # an opening: nothing to pick, what was typed is kept
])
async def test_genre_autocomplete(fake_discord, bot, typed, values):
    payload = fake_discord.autocomplete("story", {"genre": typed}, focused="genre")
    await fake_discord.interact(payload)
    callback = await fake_discord.wait_for(lambda r: r.route == CALLBACK and payload["id"] in r.path)
    choices = callback.json["data"]["choices"]
    assert callback.json["type"] == 8 and [c["value"] for c in choices] == values
    if choices:
        assert choices[0]["name"].startswith(f"{values[0]}: ")  # with its description


# --- /story ---------------------------------------------------------------------------------------

async def test_story_defers_streams_and_finishes_with_buttons(fake_discord, bot, model):
    model.delay_s = 0.02  # ~0.6 s of writing: several streaming edits at 0.05 s apart
    started = time.monotonic()
    payload = await run(fake_discord, "story", {"genre": "sci_fi", "prompt": "[long] The road", "length": 30})
    done = await finished(fake_discord, payload)
    elapsed = time.monotonic() - started

    callback, *edits = [r for r in fake_discord.requests if payload["token"] in r.path]
    assert callback.route == CALLBACK and callback.json == {"type": 5}  # defer(thinking=True), not ephemeral
    assert all(e.route == EDIT and e.params["message_id"] == "@original" for e in edits)
    streaming = [e for e in edits if (e.json["content"] or "").startswith("✍️ writing…")]
    assert len(streaming) >= 3 and len(edits) <= elapsed / 0.05 + 3  # at most about once per interval
    texts = [e.json["embeds"][0]["description"] for e in streaming if e.json["embeds"]]
    assert texts == sorted(texts, key=len) and texts[0].startswith("[long] The road")  # the opening first
    assert len(set(texts)) >= 3 and texts[-1].startswith("[long] The road The long road")
    request_id = custom_ids(streaming[0].json)[0].split(":")[2]
    assert custom_ids(streaming[0].json) == [f"story:cancel:{request_id}"]

    assert done is edits[-1] and custom_ids(done.json) == [f"story:continue:{request_id}",
                                                            f"story:regenerate:{request_id}"]
    [embed] = done.json["embeds"]
    assert embed["title"] == "📖 science fiction"
    assert embed["description"].startswith("[long] The road" + LONG) and embed["description"].endswith("north.")
    assert re.fullmatch(r"sci_fi · 30 tokens · seed \d+ · trimmed at the length limit", embed["footer"]["text"])
    message = fake_discord.original_message(payload)
    assert message["embeds"][0]["description"] == embed["description"] and message["flags"] == 0
    assert all(r.json.get("allowed_mentions") == {"parse": []} for r in edits)
    assert fake_discord.problems == []


async def test_the_whole_command_typed_into_the_genre_box(fake_discord, bot):
    first = await run(fake_discord, "story", {"genre": "sci_fi After discovering time travel"})
    second = await run(fake_discord, "story", {"genre": "A dragon slept beneath the castle. length=5"})
    done = (await finished(fake_discord, first)).json
    assert done["embeds"][0]["title"] == "📖 science fiction"
    assert done["embeds"][0]["description"] == f"After discovering time travel {STORY}"
    done = (await finished(fake_discord, second)).json
    assert done["content"] == "genre auto → fantasy (dragon, castle)"  # not a genre: the user's default, auto
    assert done["embeds"][0]["description"].startswith("A dragon slept beneath the castle. The ship")


async def test_two_users_at_once(fake_discord, bot):
    bob = fake_discord.add_user("bob")
    payloads = [ask(fake_discord, "story", {"genre": "horror", "prompt": "Alice's door"}),
                ask(fake_discord, "story", {"genre": "comedy", "prompt": "Bob's goat"}, user=bob)]
    await asyncio.gather(*(fake_discord.interact(p) for p in payloads))
    alice, bob_done = [(await finished(fake_discord, p)).json for p in payloads]
    assert alice["embeds"][0]["description"] == f"Alice's door {STORY}"
    assert bob_done["embeds"][0]["description"] == f"Bob's goat {STORY}"
    assert custom_ids(alice) != custom_ids(bob_done)


async def test_model_output_and_echoed_prompts_never_ping(fake_discord, bot):
    payload = await run(fake_discord, "story", {"genre": "drama", "prompt": "[mentions] Dear <@!42> and @everyone,"})
    done = (await finished(fake_discord, payload)).json
    text = done["embeds"][0]["description"]
    assert "@\u200beveryone cheered, <@&\u200b4242> waved at <@\u200b1234> in <#5678>, and @\u200bhere" in text
    assert text.startswith("[mentions] Dear <@!\u200b42> and @\u200beveryone,")
    for request in sent_by_bot(fake_discord):
        body = json.dumps(request.json, ensure_ascii=False)
        assert not RAW_MENTION.search(body), body
        data = request.json.get("data", request.json)
        assert data.get("allowed_mentions", {"parse": []}) == {"parse": []}


async def test_a_long_story_continues_in_follow_ups(fake_discord, bot):
    payload = await run(fake_discord, "story", {"genre": "drama", "prompt": "[long] Far", "length": 60})
    last = await finished(fake_discord, payload)
    first = next(r for r in fake_discord.requests if r.route == EDIT and payload["token"] in r.path
                 and r.json["embeds"] and "(1/2)" in r.json["embeds"][0]["title"])
    assert last.route == FOLLOWUP and last.status == 200
    pages = [first.json["embeds"][0], last.json["embeds"][0]]
    assert [p["title"] for p in pages] == ["📖 drama (1/2)", "📖 drama (2/2)"]
    assert all(len(p["description"]) <= 4096 for p in pages) and "footer" not in pages[0]
    assert custom_ids(first.json) == [] and len(custom_ids(last.json)) == 2
    whole = "[long] Far" + LONG * 60
    assert " ".join(p["description"] for p in pages) == whole.strip()
    assert [m["embeds"][0]["title"] for m in fake_discord.followup_messages(payload)] == ["📖 drama (2/2)"]


async def test_a_very_long_story_comes_as_a_file(fake_discord, bot):
    payload = await run(fake_discord, "story", {"genre": "drama", "prompt": "[long] Far", "length": 200})
    done = await finished(fake_discord, payload)
    whole = "[long] Far" + LONG * 200
    assert done.route == EDIT
    assert done.json["content"] == f"The whole story is in the attached file ({len(whole)} characters)."
    [upload] = done.files
    assert upload.filename.startswith("story-") and upload.data.decode() == whole
    assert done.json["embeds"][0]["description"].endswith(" …") and len(done.json["embeds"][0]["description"]) <= 4096
    assert fake_discord.original_message(payload)["attachments"][0]["filename"] == upload.filename


# --- buttons and /continue ------------------------------------------------------------------------

async def test_continue_and_regenerate_buttons(fake_discord, bot):
    first = await run(fake_discord, "story", {"genre": "sci_fi", "prompt": "After discovering time travel"})
    done = await finished(fake_discord, first)
    continue_id, regenerate_id = custom_ids(done.json)
    message = fake_discord.original_message(first)

    click = fake_discord.button_click(message, continue_id)
    await fake_discord.interact(click)
    more = (await finished(fake_discord, click)).json
    assert fake_discord.interaction(click).callback == {"type": 5}  # a new message under the story
    assert more["embeds"][0]["title"] == "📖 science fiction, continued"
    assert more["embeds"][0]["description"] == STORY  # only the new part; the reread tail is not posted again

    click = fake_discord.button_click(message, regenerate_id)
    await fake_discord.interact(click)
    again = (await finished(fake_discord, click)).json
    assert again["embeds"][0]["description"] == f"After discovering time travel {STORY}"
    assert custom_ids(again) != custom_ids(done.json)  # a new story, with its own buttons


async def test_continue_command(fake_discord, bot):
    nothing = await run(fake_discord, "continue")
    assert await line(fake_discord, nothing) == "There is no story of yours in this channel to continue yet; " \
                                                "start one with `/story`."
    await finished(fake_discord, await run(fake_discord, "story", {"genre": "horror", "prompt": "The door"}))
    more = await run(fake_discord, "continue")
    done = (await finished(fake_discord, more)).json
    assert done["embeds"][0]["title"] == "📖 horror, continued" and done["embeds"][0]["description"] == STORY


async def test_buttons_still_work_after_a_restart(fake_discord, scripted_lm, model, tmp_path):
    async with storybot(fake_discord, scripted_lm, tmp_path):
        payload = await run(fake_discord, "story", {"genre": "fantasy", "prompt": "The last dragon"})
        continue_id = custom_ids((await finished(fake_discord, payload)).json)[0]
    async with storybot(fake_discord, scripted_lm, tmp_path):  # a new process: nothing in memory
        click = fake_discord.button_click(fake_discord.original_message(payload), continue_id)
        await fake_discord.interact(click)
        done = (await finished(fake_discord, click)).json
    assert done["embeds"][0]["title"] == "📖 fantasy, continued"
    assert fake_discord.gateway.identify_count == 2


# --- waiting, cancelling, outages ------------------------------------------------------------------

async def test_queue_position_is_shown_and_updated(fake_discord, scripted_lm, model, tmp_path):
    bob = fake_discord.add_user("bob")
    async with storybot(fake_discord, scripted_lm, tmp_path, max_batch=1):
        model.hold()
        alice = await run(fake_discord, "story", {"genre": "drama", "prompt": "First"})
        await model.until_held()
        waiting = await run(fake_discord, "story", {"genre": "drama", "prompt": "Second"}, user=bob)
        queued = await fake_discord.wait_for(lambda r: story_message(r, waiting, "story:cancel:"))
        assert re.fullmatch(r"⏳ queued, #1 in line \(about \d+ s\)", queued.json["content"])
        status = await run(fake_discord, "queue", user=bob)
        assert re.fullmatch(r"Your story is #1 in line \(about \d+ s\); the queue holds 1 story\.",
                            await line(fake_discord, status))
        status = await run(fake_discord, "queue")
        assert await line(fake_discord, status) == "Your story is being written now; the queue holds 1 story."
        model.release()
        await finished(fake_discord, alice)
        done = (await finished(fake_discord, waiting)).json
    assert done["embeds"][0]["description"] == f"Second {STORY}"


async def test_cancel_by_the_requester_and_refused_to_others(fake_discord, bot, model):
    bob = fake_discord.add_user("bob")
    model.hold()
    payload = await run(fake_discord, "story", {"genre": "drama", "prompt": "A long tale"})
    writing = await fake_discord.wait_for(lambda r: story_message(r, payload, "story:cancel:"))
    [cancel_id] = custom_ids(writing.json)
    message = fake_discord.original_message(payload)

    refused = fake_discord.button_click(message, cancel_id, user=bob)
    await fake_discord.interact(refused)
    assert await line(fake_discord, refused) == "Only the person who asked for this story can cancel it."
    click = fake_discord.button_click(message, cancel_id)
    await fake_discord.interact(click)
    assert await line(fake_discord, click) == "🛑 Cancelled your story."
    model.release()
    ended = await fake_discord.wait_for(lambda r: r.route == EDIT and payload["token"] in r.path
                                        and r.json["content"] == "🛑 cancelled")
    assert custom_ids(ended.json) == []  # nothing left to press

    model.hold()
    again = await run(fake_discord, "story", {"genre": "drama", "prompt": "Another"})
    await fake_discord.wait_for(lambda r: story_message(r, again, "story:cancel:"))
    assert await line(fake_discord, await run(fake_discord, "cancel", user=bob)) == "You have no story in progress."
    assert await line(fake_discord, await run(fake_discord, "cancel")) == "🛑 Cancelled your story."
    model.release()
    await fake_discord.wait_for(lambda r: r.route == EDIT and again["token"] in r.path
                                and r.json["content"] == "🛑 cancelled")


async def test_gateway_outages_mid_story_lose_nothing(fake_discord, scripted_lm, model, tmp_path):
    bob = fake_discord.add_user("bob")
    async with storybot(fake_discord, scripted_lm, tmp_path, max_batch=1):
        # A story under way when the connection drops is delivered after the client resumes...
        model.hold()
        before = await run(fake_discord, "story", {"genre": "drama", "prompt": "Before"})
        await model.until_held()
        await fake_discord.disconnect()
        await fake_discord.wait_for_frame(lambda f: f.direction == "recv" and f.op == 6)  # RESUME
        model.release()
        assert (await finished(fake_discord, before)).json["embeds"][0]["description"] == f"Before {STORY}"
        # ...and running and queued stories are delivered while the gateway is still down.
        model.hold()
        running = await run(fake_discord, "story", {"genre": "drama", "prompt": "Running"})
        queued = await run(fake_discord, "story", {"genre": "drama", "prompt": "Queued"}, user=bob)
        await fake_discord.wait_for(lambda r: story_message(r, queued, "story:cancel:"))
        async with fake_discord.gateway_down():
            model.release()
            for payload, opening in ((running, "Running"), (queued, "Queued")):
                done = (await finished(fake_discord, payload)).json
                assert done["embeds"][0]["description"] == f"{opening} {STORY}"
        await fake_discord.wait_for_frame(lambda f: f.direction == "recv" and f.op == 6, count=2)
        later = await run(fake_discord, "story", {"genre": "drama", "prompt": "Later"})
        await finished(fake_discord, later)
    assert (fake_discord.gateway.identify_count, fake_discord.gateway.resume_count) == (1, 2)


async def test_after_the_token_expires_the_story_is_posted_in_the_channel(fake_discord, scripted_lm, model,
                                                                          tmp_path):
    async with storybot(fake_discord, scripted_lm, tmp_path, token_ttl_s=0.3):
        model.hold()
        payload = await run(fake_discord, "story", {"genre": "drama", "prompt": "Slow"})
        moved = await fake_discord.wait_for(lambda r: r.route == EDIT and payload["token"] in r.path
                                            and r.json["content"].startswith("⌛"))
        assert moved.json["embeds"] == [] and custom_ids(moved.json) == []
        post = await fake_discord.wait_for(lambda r: r.route == CHANNEL_POST)
        model.release()
        done = await fake_discord.wait_for(lambda r: r.route == CHANNEL_EDIT
                                           and "story:continue:" in json.dumps(r.json))
    alice = fake_discord.user["id"]
    assert post.json["content"].startswith(f"Story for <@{alice}>") and post.json["allowed_mentions"] == {"parse": []}
    assert done.params["message_id"] == post.response["id"]
    assert done.json["content"] == f"Story for <@{alice}>" and done.json["allowed_mentions"] == {"parse": []}
    assert done.json["embeds"][0]["description"] == f"Slow {STORY}"
    assert [r for r in fake_discord.requests if payload["token"] in r.path][-1] is moved


# --- settings, genres, admin -----------------------------------------------------------------------

async def test_settings_show_set_and_reset(fake_discord, bot):
    saved = await run(fake_discord, "settings set", {"temperature": 1.1, "genre": "horror"})
    text = await line(fake_discord, saved)
    assert text.startswith("Saved. Your settings now:") and "• genre = horror  (your default)" in text
    assert "• temperature = 1.1  (your default)" in text and "• length = 200  (server default)" in text
    shown = await line(fake_discord, await run(fake_discord, "settings show"))
    assert shown.startswith("Your settings:") and "temperature = 1.1  (your default)" in shown
    payload = await run(fake_discord, "story", {"genre": "The door creaked"})  # no genre named: the default
    assert (await finished(fake_discord, payload)).json["embeds"][0]["title"] == "📖 horror"
    reset = await line(fake_discord, await run(fake_discord, "settings reset"))
    assert reset.startswith("Your settings are back") and "(your default)" not in reset
    nothing = await line(fake_discord, await run(fake_discord, "settings set"))
    assert nothing.startswith("nothing to set")
    wrong = await line(fake_discord, await run(fake_discord, "settings set", {"genre": "cyberpunk"}))
    assert wrong.startswith("unknown genre 'cyberpunk'; choose one of: action, auto, comedy")


async def test_genres_lists_each_with_an_example(fake_discord, bot):
    text = await line(fake_discord, await run(fake_discord, "genres"))
    assert "`sci_fi`: Spaceships" in text and "After discovering time travel, the first thing" in text
    assert text.count("• `") == 10 and len(text) <= 2000


async def test_storyadmin_needs_manage_server_and_persists(fake_discord, bot):
    refused = await line(fake_discord, await run(fake_discord, "storyadmin", {"cooldown": 5.0}))
    assert refused == messages.ADMIN_ONLY
    shown = await line(fake_discord, await run(fake_discord, "storyadmin", member_permissions=ADMIN))
    assert shown.startswith("Server story settings:\n• channels: all channels")
    saved = await run(fake_discord, "storyadmin", {"allow_channel": fake_discord.channel, "max_length": 50,
                                                   "max_temperature": 1.5, "cooldown": 30.0}, member_permissions=ADMIN)
    assert await line(fake_discord, saved) == ("Server story settings saved:\n"
                                               f"• channels: <#{fake_discord.channel['id']}>\n• max length: 50\n"
                                               "• max temperature: 1.5\n• cooldown: 30 s")
    server = bot.service.state.server(f"discord:{fake_discord.guild['id']}")
    assert server.allowed_channels == (fake_discord.channel["id"],) and server.max_length == 50
    opened = await run(fake_discord, "storyadmin", {"all_channels": True}, member_permissions=ADMIN)
    assert "• channels: all channels" in await line(fake_discord, opened)


# --- refusals: one ephemeral line each -------------------------------------------------------------

async def refused(fake, payload) -> str:
    text = await line(fake, payload)
    await asyncio.sleep(0.1)
    assert len([r for r in fake.requests if payload["token"] in r.path]) == 1  # nothing else was sent
    assert "\n" not in text
    return text


async def test_refused_unknown_genre_and_length_out_of_range(fake_discord, bot):
    payload = await run(fake_discord, "story", {"genre": "cyberpunk", "prompt": "A hacker"})
    assert (await refused(fake_discord, payload)).startswith("unknown genre 'cyberpunk'; choose one of: action, auto")
    payload = await run(fake_discord, "story", {"genre": "sci_fi", "prompt": "A ship", "length": 999})
    assert await refused(fake_discord, payload) == "length=999 is out of range; allowed: 1 to 400 tokens"
    payload = await run(fake_discord, "story", {"genre": "sci_fi"})
    assert (await refused(fake_discord, payload)).startswith("add an opening after the genre")


async def test_refused_too_many_stories_and_queue_full(fake_discord, scripted_lm, model, tmp_path):
    bob, carol = fake_discord.add_user("bob"), fake_discord.add_user("carol")
    async with storybot(fake_discord, scripted_lm, tmp_path, max_batch=1, max_queue=1, max_per_user=1):
        model.hold()
        await run(fake_discord, "story", {"genre": "drama", "prompt": "Mine"})
        await model.until_held()
        again = await run(fake_discord, "story", {"genre": "drama", "prompt": "Mine too"})
        assert await refused(fake_discord, again) == ("you already have 1 story in progress; wait for one to "
                                                      "finish or cancel it")
        await run(fake_discord, "story", {"genre": "drama", "prompt": "Bob's"}, user=bob)
        full = await run(fake_discord, "story", {"genre": "drama", "prompt": "Carol's"}, user=carol)
        assert re.fullmatch(r"the story queue is busy, try again in about \d+ s", await refused(fake_discord, full))
        model.release()


async def test_refused_by_server_rules(fake_discord, scripted_lm, model, tmp_path):
    stories = obj.text_channel(obj.snowflake(), fake_discord.guild["id"], "stories", position=1)
    fake_discord.guild["channels"].append(stories)
    fake_discord.state.channels[stories["id"]] = stories
    async with storybot(fake_discord, scripted_lm, tmp_path):
        await run(fake_discord, "storyadmin", {"allow_channel": stories, "cooldown": 60.0, "max_length": 50},
                  member_permissions=ADMIN)
        here = await run(fake_discord, "story", {"genre": "drama", "prompt": "Here"})
        assert await refused(fake_discord, here) == ("Stories are not enabled in this channel; ask an admin, "
                                                      f"or use one of: <#{stories['id']}>")
        capped = await run(fake_discord, "story", {"genre": "drama", "prompt": "x", "length": 80}, channel=stories)
        assert await refused(fake_discord, capped) == ("length=80 is out of range; allowed: 1 to 50 tokens")
        await finished(fake_discord, await run(fake_discord, "story", {"genre": "drama", "prompt": "There"},
                                               channel=stories))
        cooling = await run(fake_discord, "story", {"genre": "drama", "prompt": "More"}, channel=stories)
        assert re.fullmatch(r"You're on cooldown: try again in \d+ s\.", await refused(fake_discord, cooling))


async def test_an_unexpected_failure_shows_a_reference_that_the_log_has(fake_discord, bot, caplog, monkeypatch):
    def broken(ctx):
        raise RuntimeError("the queue exploded")

    monkeypatch.setattr(bot.service, "queue", broken)
    with caplog.at_level(logging.ERROR):
        text = await refused(fake_discord, await run(fake_discord, "queue"))
    ref = re.fullmatch(r"Story generation failed \(ref ([0-9a-f]{4})\)", text).group(1)
    [record] = [r for r in caplog.records if ref in r.getMessage()]
    assert record.exc_info and "the queue exploded" in str(record.exc_info[1])


async def test_stopping_the_bot_says_so_in_unfinished_stories(fake_discord, scripted_lm, model, tmp_path):
    async with storybot(fake_discord, scripted_lm, tmp_path) as front:
        model.hold()
        payload = await run(fake_discord, "story", {"genre": "drama", "prompt": "Unfinished"})
        await fake_discord.wait_for(lambda r: story_message(r, payload, "story:cancel:"))
        await front.stop()
        model.release()
    last = [r for r in fake_discord.requests if payload["token"] in r.path][-1]
    assert last.json["content"] == "⚠️ the bot restarted before your story was finished; please ask again"
    assert custom_ids(last.json) == []


@contextlib.asynccontextmanager
async def restarted(front: DiscordFrontEnd):
    """The front-end started again on the same state, as the next process would start it after a crash. One
    process holds one worker, so here the new front-end shares the old one's, which lives on."""
    again = DiscordFrontEnd(front.service, front.config, token_ttl_s=front.token_ttl_s, guild_ready_timeout=0.05)
    await again.start()
    try:
        yield again
    finally:
        await again.stop()


async def held_story(fake, front, model, prompt, *, shown=lambda r, payload: story_message(r, payload, "story:cancel:"),
                     kept=lambda left: True):
    """A story the model holds mid-way, once its message shows it: its payload and its in-flight row, once `kept`."""
    model.hold()
    payload = await run(fake, "story", {"genre": "drama", "prompt": prompt})
    await fake.wait_for(lambda r: shown(r, payload))
    for _ in range(250):  # the row is written just after Discord answers the edit
        if (left := front.service.state.in_flight("discord")) and kept(left[0]):
            return payload, left[0]
        await asyncio.sleep(0.02)
    raise AssertionError(f"the story's message was never kept in the state as expected: {left}")


async def test_a_story_cut_off_by_a_crash_is_marked_interrupted_at_the_next_start(fake_discord, scripted_lm, model,
                                                                                 tmp_path):
    async with storybot(fake_discord, scripted_lm, tmp_path) as first:
        state = first.service.state
        payload, left = await held_story(fake_discord, first, model, "Unfinished")
        original = fake_discord.original_message(payload)
        assert left.messages == (original["id"],) and left.text == "Unfinished"
        assert left.details["token"] == payload["token"] and left.details["genre"] == "drama"

        # The process dies here (kill -9): nothing edits the message. The next start finds it.
        async with restarted(first):
            marked = await fake_discord.wait_for(lambda r: r.route == EDIT and payload["token"] in r.path
                                                 and r.params["message_id"] == original["id"])
            assert state.in_flight("discord") == []  # marked once, not at every start
        assert marked.json["content"] == "⚠️ the bot restarted before your story was finished; please ask again"
        assert marked.json["embeds"][0]["description"] == "Unfinished" and custom_ids(marked.json) == []
        assert marked.json["allowed_mentions"] == {"parse": []}
        model.release()  # (in this test the "dead" bot is alive, and finishes)
        await finished(fake_discord, payload)
        for _ in range(100):  # a story that ends is no longer kept (just after its last edit)
            if not state.in_flight("discord"):
                break
            await asyncio.sleep(0.02)
        assert state.in_flight("discord") == []


async def test_after_a_crash_a_story_moved_to_the_channel_is_marked_there(fake_discord, scripted_lm, model, tmp_path):
    async with storybot(fake_discord, scripted_lm, tmp_path, token_ttl_s=0.3) as first:
        payload, left = await held_story(fake_discord, first, model, "Slow", shown=lambda r, _: r.route == CHANNEL_POST,
                                         kept=lambda left: left.details.get("moved"))
        post = next(r for r in fake_discord.requests if r.route == CHANNEL_POST)
        assert left.messages == (post.response["id"],) and "token" not in left.details
        async with restarted(first):
            marked = await fake_discord.wait_for(lambda r: r.route == CHANNEL_EDIT
                                                 and r.params["message_id"] == post.response["id"])
        model.release()
    alice = fake_discord.user["id"]
    assert marked.json["content"] == (f"Story for <@{alice}>\n"
                                      "⚠️ the bot restarted before your story was finished; please ask again")
    assert marked.json["embeds"][0]["description"] == "Slow" and marked.json["allowed_mentions"] == {"parse": []}
    assert payload["token"] not in marked.path


async def test_after_a_crash_a_story_whose_token_expired_is_forgotten(fake_discord, scripted_lm, model, tmp_path):
    async with storybot(fake_discord, scripted_lm, tmp_path) as first:
        state = first.service.state
        payload, left = await held_story(fake_discord, first, model, "Late")
        # The restart comes after the token's 15 minutes: its message can no longer be edited.
        state.track(left.request_id, "discord", left.channel, list(left.messages), left.user_key, left.text,
                    {**left.details, "token_expires": time.time() - 1})
        async with restarted(first):
            assert state.in_flight("discord") == []  # forgotten, not tried at every start
        model.release()
        await finished(fake_discord, payload)
    assert not [r for r in fake_discord.requests if r.route == EDIT and r.params["message_id"] == left.messages[0]]


async def test_python_m_bot_serves_discord_from_the_environment(fake_discord, scripted_lm, model, tmp_path,
                                                                monkeypatch):
    from bot import __main__ as entry

    env = Env({"DISCORD_TOKEN": fake_discord.token, "DISCORD_API_URL": fake_discord.base_url,
               "DISCORD_GATEWAY_URL": fake_discord.gateway_url, "STORYGEN_SETTINGS_DB": str(tmp_path / "bot.db"),
               "HTTP_ENABLED": "false"}, env_file=None)
    monkeypatch.setattr("storygen.serving.load_model", lambda config: scripted_lm)  # the scripted model, not a download
    stop = asyncio.Event()
    serving = asyncio.create_task(entry.serve(BotConfig.from_env(env), StorygenConfig.from_env(env), stop))
    await fake_discord.wait_for(lambda r: r.method == "PUT", timeout=10)
    await fake_discord.wait_for_frame(lambda f: f.t == "GUILD_CREATE", timeout=10)
    payload = await run(fake_discord, "story", {"genre": "sci_fi After discovering time travel"})
    done = (await finished(fake_discord, payload)).json
    stop.set()
    await asyncio.wait_for(serving, 10)
    assert done["embeds"][0]["description"] == f"After discovering time travel {STORY}"


async def test_a_refused_token_fails_start_with_one_line(fake_discord, scripted_lm, tmp_path):
    config = tiny_config(scripted_lm.name, "instruct", tmp_path)
    settings, state = SettingsStore(config.settings_db), BotState(config.settings_db)
    bot_config = BotConfig(discord_token=Secret("not-the-token"), discord_api_url=fake_discord.api_url,
                           discord_gateway_url=fake_discord.gateway_url)
    front = DiscordFrontEnd(StoryService(Worker(scripted_lm, config), settings, state, config), bot_config)
    with pytest.raises(ConfigError, match="DISCORD_TOKEN was refused by Discord"):
        await front.start()
    await front.stop()
    settings.close()
    state.close()
    assert "not-the-token" not in repr(bot_config)
