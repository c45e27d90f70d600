"""Group storytelling on Discord end to end: a real discord.py client against the fake Discord
(REST and gateway), the scripted tiny model on a running worker. Three people write a story in
vote mode in a thread the bot opens, with thread replies (Message Content intent on), slash
commands, persistent vote buttons, an undo, a restart of the bot in the middle, then end; the
exported .md is read line by line. Timers run on a clock the test moves.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime, timezone

from bot import messages
from bot.config import BotConfig
from bot.discord.adapter import DiscordFrontEnd
from bot.discord.render import ZWSP
from bot.service import StoryService
from bot.state import BotState
from bot.storytime.limits import StorytimeLimits
from bot.storytime.service import StorytimeService
from bot.storytime.store import SessionStore
from storygen.config import Secret
from storygen.settings import SettingsStore
from storygen.worker import Worker
from tests.conftest import tiny_config
from tests.fakes.discord_threads import PUBLIC_THREAD
from tests.scripted_model import SENTENCES, model, scripted_lm  # noqa: F401  (fixtures)
from tests.storytime_helpers import Clock

CALLBACK = "POST /interactions/{interaction_id}/{interaction_token}/callback"
FOLLOWUP = "POST /webhooks/{application_id}/{interaction_token}"
CHANNEL_POST = "POST /channels/{channel_id}/messages"
LIMITS = StorytimeLimits(turn_timeout_s=300, vote_timeout_s=60)
MODEL_LINE = "".join(SENTENCES).strip()  # what the scripted model writes, every time


class DiscordBot:
    """The bot's Discord side with storytime; `restart()` is a new process on the same database."""

    def __init__(self, fake, lm, tmp_path, message_content: bool) -> None:
        self.fake, self.lm, self.clock = fake, lm, Clock()
        self.config = tiny_config(lm.name, "instruct", tmp_path)
        self.message_content = message_content

    async def start(self) -> None:
        self.worker = Worker(self.lm, self.config)
        await self.worker.start()
        self.settings, self.state = SettingsStore(self.config.settings_db), BotState(self.config.settings_db)
        self.storytime = StorytimeService(self.worker, SessionStore(self.config.settings_db), LIMITS, self.clock)
        bot_config = BotConfig(discord_token=Secret(self.fake.token), discord_api_url=self.fake.api_url,
                               discord_gateway_url=self.fake.gateway_url, stream_interval_s=0.05,
                               discord_message_content=self.message_content)
        self.front = DiscordFrontEnd(StoryService(self.worker, self.settings, self.state, self.config), bot_config,
                                     guild_ready_timeout=0.05, storytime=self.storytime)
        await self.front.start()
        await self.storytime.idle()

    async def stop(self) -> None:
        await self.front.stop()
        await self.storytime.close()
        await self.worker.stop()
        for store in (self.storytime.store, self.settings, self.state):
            store.close()

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def command(self, name: str, options: dict | None = None, *, user=None, channel=None) -> str:
        """A /storytime subcommand; returns the one ephemeral line it was answered with."""
        payload = self.fake.slash_command(f"storytime {name}", options or {}, user=user or self.fake.user,
                                          channel=channel)
        await self.fake.interact(payload)
        answer = await self.fake.wait_for(lambda r: payload["token"] in r.path and r.route in (CALLBACK, FOLLOWUP)
                                          and "content" in (r.json.get("data") or r.json), timeout=30)
        await self.storytime.idle()
        body = answer.json.get("data") or answer.json
        assert body["flags"] & 64 and body["allowed_mentions"] == {"parse": []}
        return body["content"]

    async def click(self, message: dict, index: int, user) -> str:
        button = next(c["custom_id"] for row in message["components"] for c in row["components"]
                      if c["custom_id"].endswith(f":{index}"))
        payload = self.fake.button_click(message, button, user=user)
        await self.fake.interact(payload)
        answer = await self.fake.wait_for(lambda r: r.route == CALLBACK and payload["id"] in r.path, timeout=30)
        await self.storytime.idle()
        return answer.json["data"]["content"]

    async def reply(self, text: str, user, thread) -> dict:
        """A member posts in the thread; returns once the bot took it as a line or answered it."""
        lines, posts = self._lines(), len(self.fake.messages_in(thread))
        message = await self.fake.user_message(text, user=user, channel=thread)
        await until(lambda: self._lines() > lines or replies_to(self.fake, thread, message))
        await self.storytime.idle()
        assert len(self.fake.messages_in(thread)) >= posts
        return message

    def _lines(self) -> int:
        sessions = self.storytime.store.open_sessions("discord")
        return len(sessions[0].lines) if sessions else 0


async def until(condition, timeout: float = 30) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        assert loop.time() < end, "the bot did not react"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(fake, lm, tmp_path, message_content=True):
    bot = DiscordBot(fake, lm, tmp_path, message_content)
    await bot.start()
    try:
        yield bot
    finally:
        await bot.stop()


def replies_to(fake, thread, message) -> list[dict]:
    return [m for m in fake.messages_in(thread)
            if str((m.get("message_reference") or {}).get("message_id")) == message["id"]]


def bot_posts(fake, thread) -> list[str]:
    """The thread's messages by the bot, as they read now, oldest first."""
    return [m["content"] for m in fake.messages_in(thread) if m["author"]["id"] == fake.bot_user["id"]]


def ballot(fake, thread) -> dict:
    return [m for m in fake.messages_in(thread) if m.get("components")][-1]


async def test_three_members_write_a_story_with_votes_an_undo_and_a_restart(fake_discord, scripted_lm, model,
                                                                            tmp_path):
    fake = fake_discord
    alice, bob, carol = fake.user, fake.add_user("bob"), fake.add_user("carol")
    async with running(fake, scripted_lm, tmp_path) as bot:
        ack = await bot.command("start", {"genre": "fantasy", "opening": "The dragon woke @everyone.",
                                          "title": "Dragon Days", "mode": "vote", "turns": 6})
        [thread] = fake.threads()
        assert thread["type"] == PUBLIC_THREAD and thread["name"] == "Dragon Days"
        assert ack == messages.ST_STARTED_ACK_DISCORD.format(title="Dragon Days", thread=thread["id"])
        assert await bot.command("join", user=bob, channel=thread) == messages.ST_JOINED.format(name="Bob", position=2)
        await bot.command("join", user=carol)  # in the channel it was started in: the same session
        posts = bot_posts(fake, thread)
        assert posts[0].startswith("📖 *Dragon Days* (fantasy, vote mode) started by Alice")
        assert posts[1] == f"*Alice*: The dragon woke @{ZWSP}everyone."
        assert posts[2:4] == [f"**Option 1**: {MODEL_LINE}", f"**Option 2**: {MODEL_LINE}"]

        # vote 1 with the buttons; Bob changes his mind
        assert await bot.click(ballot(fake, thread), 1, bob) == "You voted for option 2."
        assert await bot.click(ballot(fake, thread), 0, bob) == "You changed your vote to option 1."
        await bot.click(ballot(fake, thread), 1, alice)
        await bot.click(ballot(fake, thread), 0, carol)
        assert messages.ST_VOTE_RESULT.format(number=1, votes="2 to 1 votes") in bot_posts(fake, thread)
        assert bot_posts(fake, thread)[-1] == messages.ST_NEXT.format(name="Bob", timeout="5 minutes")

        # Bob replies in the thread; Carol, out of turn, gets a reply saying why not
        await bot.reply("Bob <@1234> tamed it.", bob, thread)
        refused = await bot.reply("Carol barges in.", carol, thread)
        [answer] = replies_to(fake, thread, refused)
        assert answer["content"] == messages.ST_VOTING
        # vote 2 times out with one vote in
        await bot.click(ballot(fake, thread), 1, alice)
        bot.clock.advance(60)
        await bot.storytime.tick()
        await bot.storytime.idle()
        assert messages.ST_VOTE_TIMEOUT.format(number=2, votes="0 to 1 vote") in bot_posts(fake, thread)

        await bot.restart()  # between turns
        assert await bot.command("add", {"text": "Carol lights a lamp."}, user=carol, channel=thread) == \
            messages.ST_ADDED.format(left=3)
        old_ballot = ballot(fake, thread)
        await bot.restart()  # with vote 3 open: its buttons were posted by the last run
        for user in (alice, bob, carol):
            await bot.click(old_ballot, 0, user)
        assert await bot.command("undo", user=bob, channel=thread) == messages.ST_UNDO_ONLY
        assert (await bot.command("undo", channel=thread)).startswith("↩️ Removed the last line (StoryBot:")
        status = await bot.command("status", user=carol, channel=thread)
        assert "Players: Alice, Bob, Carol." in status and "It's Alice's turn (300 s left)." in status

        assert await bot.command("end", channel=thread) == messages.ST_ENDED_ACK.format(title="Dragon Days")
        [sent] = [r for r in fake.requests if r.route == CHANNEL_POST and r.files and thread["id"] in r.path]
        assert sent.json["content"].startswith("🏁 *Dragon Days* is finished: 5 lines")
        [upload] = sent.files
        assert upload.filename.startswith("dragon-days-") and upload.filename.endswith(".md")
        date = datetime.fromtimestamp(bot.clock(), timezone.utc)
        assert upload.data.decode().splitlines() == [
            "# Dragon Days", "", f"*fantasy · {date:%Y-%m-%d}*", "",
            "The dragon woke @everyone.", "", MODEL_LINE, "", r"Bob \<@1234\> tamed it.", "", MODEL_LINE, "",
            "Carol lights a lamp.", "",
            "## Credits", "", "- StoryBot (the model): 2 lines", "- Alice: 1 line", "- Bob: 1 line", "- Carol: 1 line"]
        assert await bot.command("status") == messages.ST_NO_SESSION
        no_pings = [r.json for r in fake.requests if r.route == CHANNEL_POST and r.json]
        pinging = [body for body in no_pings if body["allowed_mentions"].get("parse") != []
               or body["allowed_mentions"].get("replied_user")]
    assert pinging == []


async def test_without_message_content_replies_are_not_lines_and_help_says_so(fake_discord, scripted_lm, model,
                                                                             tmp_path):
    fake = fake_discord
    async with running(fake, scripted_lm, tmp_path, message_content=False) as bot:
        await bot.command("start", {"genre": "horror", "mode": "free"})
        [thread] = fake.threads()
        await fake.user_message("A reply the bot cannot read.", channel=thread)
        await bot.command("add", {"text": "A line by command."}, channel=thread)
        [session] = bot.storytime.store.open_sessions("discord")
        assert [line.text for line in session.lines][:1] == ["A line by command."]
        help_text = await bot.command("help")
        assert help_text == messages.DISCORD_STORYTIME_HELP.format(reply_hint=messages.DISCORD_STORYTIME_NO_REPLIES)
    identify = [f for f in fake.frames if f.op == 2]
    assert identify and not identify[-1].d["intents"] & (1 << 15)  # no privileged intent asked for


async def test_the_synced_storytime_group_and_genre_autocomplete(fake_discord, scripted_lm, model, tmp_path):
    fake = fake_discord
    async with running(fake, scripted_lm, tmp_path):
        [group] = [c for c in fake.state.global_commands if c["name"] == "storytime"]
        subs = {o["name"]: o for o in group["options"]}
        assert set(subs) == {"start", "join", "leave", "add", "status", "undo", "end", "list", "help"}
        start = {o["name"]: o for o in subs["start"]["options"]}
        assert start["genre"]["autocomplete"] is True and start["genre"]["required"] is True
        assert [c["value"] for c in start["mode"]["choices"]] == ["turns", "free", "vote"]
        assert start["turns"]["max_value"] == LIMITS.max_turns and subs["add"]["options"][0]["max_length"] == 400
        payload = fake.autocomplete("storytime start", {"genre": "sci"}, focused="genre")
        await fake.interact(payload)
        answer = await fake.wait_for(lambda r: r.route == CALLBACK and payload["id"] in r.path)
        assert [c["value"] for c in answer.json["data"]["choices"]] == ["sci_fi"]


async def test_without_thread_permissions_start_is_one_line_and_no_session(fake_discord, scripted_lm, model,
                                                                          tmp_path):
    async with running(fake_discord, scripted_lm, tmp_path) as bot:
        fake_discord.fail_next("POST", r"/channels/\d+/threads", status=403, code=50013,
                               message="Missing Permissions")
        assert await bot.command("start", {"genre": "horror"}) == messages.ST_CANT_OPEN_THREAD
        assert bot.storytime.store.open_sessions() == [] and fake_discord.threads() == []


async def test_a_restart_mid_model_line_marks_the_old_message_and_writes_the_line_once(fake_discord, scripted_lm,
                                                                                       model, tmp_path):
    fake = fake_discord
    async with running(fake, scripted_lm, tmp_path) as bot:
        await bot.command("start", {"genre": "horror", "mode": "free"})
        [thread] = fake.threads()
        model.hold()
        payload = fake.slash_command("storytime add", {"text": "The door opened."}, channel=thread)
        await fake.interact(payload)
        await model.until_held(30)
        await until(lambda: (bot.storytime.store.open_sessions()[0].model or None) is not None
                    and bot.storytime.store.open_sessions()[0].model.message != "")
        cut_off = bot.storytime.store.open_sessions()[0].model.message
        assert fake.state.message(cut_off)["content"] == f"**StoryBot**: {messages.STARTED}"
        await bot.storytime.close()  # the process dies with the line half written
        model.release()
        await bot.restart()
        assert fake.state.message(cut_off)["content"] == f"**StoryBot**: {messages.STORY_STOPPED}"
        [session] = bot.storytime.store.open_sessions()
        assert [line.text for line in session.lines] == ["The door opened.", MODEL_LINE] and session.model is None
        assert bot_posts(fake, thread)[-2:] == [f"**StoryBot**: {MODEL_LINE}", messages.ST_NEXT_FREE]
