"""Group storytelling on Discord: the `/storytime` group, thread replies, persistent vote buttons.

    to_storytime_request(interaction) -> (Place, Actor, StorytimeCommand)   a /storytime subcommand
    DiscordStorytime.handle / on_message / on_vote                          the handlers the client calls
    DiscordSurface                                                          the core's voice in a thread

A session lives in a new public thread off the channel where it was started. Commands
typed in the channel or in the thread find it. A reply in the thread is a line only
when the operator enabled the Message Content intent (DISCORD_MESSAGE_CONTENT=true):
without it Discord sends the bot empty messages, and `/storytime add` is the way.
Everything sent is neutralised for mentions and sent with allowed_mentions=none.
"""

from __future__ import annotations

import io
import logging
import re
import time
from collections.abc import AsyncIterator

import discord

from bot import messages
from bot.discord.render import NO_MENTIONS, to_discord_line
from bot.service import user_message
from bot.storytime.grammar import StorytimeCommand
from bot.storytime.rules import announcement
from bot.storytime.service import StorytimeService
from bot.storytime.session import Actor, Place, Session, StartOptions, StorytimeError

logger = logging.getLogger(__name__)

THREAD_ARCHIVE_MINUTES = 1440  # a day without messages; a session idles out after an hour anyway


class StorytimeVote(discord.ui.DynamicItem[discord.ui.Button],
                    template=r"storytime:vote:(?P<session_id>[0-9a-f]{1,32}):(?P<index>[0-9])"):
    """A vote button whose custom_id names the session and the option, so it works after a restart."""

    def __init__(self, session_id: str, index: int) -> None:
        super().__init__(discord.ui.Button(label=messages.ST_VOTE_OPTION.format(number=index + 1),
                                           style=discord.ButtonStyle.primary,
                                           custom_id=f"storytime:vote:{session_id}:{index}"))
        self.session_id = session_id
        self.index = index

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button,
                             match: re.Match[str]) -> StorytimeVote:
        return cls(match["session_id"], int(match["index"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.client.on_storytime_vote(interaction, self.session_id, self.index)  # type: ignore[attr-defined]


def to_storytime_request(interaction: discord.Interaction) -> tuple[Place, Actor, StorytimeCommand]:
    """A /storytime subcommand's typed options as the same command Slack's text parses into."""
    place = Place("discord", str(interaction.guild_id or "dm"), str(interaction.channel_id))
    actor = Actor(str(interaction.user.id), interaction.user.display_name, interaction.permissions.manage_guild)
    action = interaction.command.qualified_name.split()[-1]  # type: ignore[union-attr]
    options = interaction.namespace
    if action == "start":
        start = StartOptions(options.genre, options.opening or "", options.title or "", options.turns,
                             float(options.turn_timeout) if options.turn_timeout is not None else None,
                             options.mode or "turns", options.model_every or 1)
        return place, actor, StorytimeCommand("start", start=start)
    if action == "add":
        return place, actor, StorytimeCommand("add", text=options.text)
    if action == "end":
        return place, actor, StorytimeCommand("end", session_id=options.session or "")
    return place, actor, StorytimeCommand(action)


class DiscordSurface:
    """Posts into a session's thread over REST; needs no cache, so it works right after a restart."""

    def __init__(self, client: discord.Client, interval_s: float) -> None:
        self.client = client
        self.interval_s = interval_s

    def _thread(self, session: Session) -> discord.PartialMessageable:
        return self.client.get_partial_messageable(int(session.thread), guild_id=int(session.workspace))

    async def say(self, session: Session, text: str) -> None:
        await self._thread(session).send(to_discord_line(text), allowed_mentions=NO_MENTIONS)

    async def begin(self, session: Session, label: str) -> str:
        message = await self._thread(session).send(_model_text(label, "", writing=True), allowed_mentions=NO_MENTIONS)
        return str(message.id)

    async def stream(self, session: Session, message: str, label: str, chunks: AsyncIterator[str]) -> None:
        written, last = "", time.monotonic()
        async for chunk in chunks:
            written += chunk
            if time.monotonic() - last >= self.interval_s:
                await self._edit(session, message, _model_text(label, written, writing=True))
                last = time.monotonic()

    async def settle(self, session: Session, message: str, label: str, text: str | None) -> None:
        shown = _model_text(label, text) if text is not None else to_discord_line(f"**{label}**: "
                                                                                 f"{messages.STORY_STOPPED}")
        await self._edit(session, message, shown)

    async def offer_vote(self, session: Session) -> None:
        view = discord.ui.View(timeout=None)
        for index in range(len(session.vote.options)):
            view.add_item(StorytimeVote(session.session_id, index))
        await self._thread(session).send(messages.ST_VOTE_BUTTONS, view=view, allowed_mentions=NO_MENTIONS)

    async def attach(self, session: Session, filename: str, content: str, text: str) -> None:
        file = discord.File(io.BytesIO(content.encode()), filename=filename)
        await self._thread(session).send(to_discord_line(text), file=file, allowed_mentions=NO_MENTIONS)

    async def _edit(self, session: Session, message: str, content: str) -> None:
        try:
            await self._thread(session).get_partial_message(int(message)).edit(content=content,
                                                                               allowed_mentions=NO_MENTIONS)
        except discord.HTTPException as error:  # a missed edit is not worth failing the turn for
            logger.warning("storytime: edit in %s failed (%s %s)", session.thread, error.status, error.code)


def _model_text(label: str, text: str, writing: bool = False) -> str:
    words = " ".join(part for part in (text.strip(), messages.STARTED if writing else "") if part)
    return to_discord_line(f"**{label}**: {words}".rstrip())


class DiscordStorytime:
    """What the client calls for /storytime, thread messages and vote clicks."""

    def __init__(self, storytime: StorytimeService, message_content: bool) -> None:
        self.storytime = storytime
        self.message_content = message_content

    async def handle(self, interaction: discord.Interaction) -> None:
        try:
            place, actor, command = to_storytime_request(interaction)
            if command.action == "start":
                await interaction.response.defer(ephemeral=True, thinking=True)  # a thread to open first
            reply = await self._run(interaction, place, actor, command)
        except Exception as error:
            reply = user_message(error, f"storytime for discord user {interaction.user.id}")
        await _reply(interaction, reply)

    async def _run(self, interaction: discord.Interaction, place: Place, actor: Actor,
                   command: StorytimeCommand) -> str:
        storytime = self.storytime
        if command.action == "start":
            async def open_thread(session: Session) -> str:
                channel = interaction.channel
                if not isinstance(channel, discord.TextChannel):
                    raise StorytimeError(messages.ST_START_IN_CHANNEL)
                try:
                    thread = await channel.create_thread(name=session.title[:100],
                                                         type=discord.ChannelType.public_thread,
                                                         auto_archive_duration=THREAD_ARCHIVE_MINUTES)
                    await thread.send(to_discord_line(announcement(session)), allowed_mentions=NO_MENTIONS)
                except discord.Forbidden:
                    raise StorytimeError(messages.ST_CANT_OPEN_THREAD) from None
                return str(thread.id)

            session = await storytime.start(place, actor, command.start, open_thread)
            return messages.ST_STARTED_ACK_DISCORD.format(title=session.title, thread=session.thread)
        if (reply := await storytime.act(place, actor, command)) is not None:
            return reply
        hint = messages.STORYTIME_REPLY_HINT if self.message_content else messages.DISCORD_STORYTIME_NO_REPLIES
        return messages.DISCORD_STORYTIME_HELP.format(reply_hint=hint)

    async def on_message(self, message: discord.Message) -> None:
        """A message in a session's thread is a line (Message Content intent only); refusals reply to it."""
        if not self.message_content or message.author.bot or message.guild is None or not message.content:
            return
        place = Place("discord", str(message.guild.id), str(message.channel.id))
        session = self.storytime.store.find_open(place.server_key, place.channel)
        if session is None or session.thread != place.channel:
            return  # not a session's thread (the channel a session was started in is not one)
        actor = Actor(str(message.author.id), message.author.display_name)
        try:
            await self.storytime.add(place, actor, message.content, echo=False)
        except Exception as error:
            line = user_message(error, f"storytime reply from discord user {message.author.id}")
            await message.reply(to_discord_line(line), mention_author=False, allowed_mentions=NO_MENTIONS)

    async def on_vote(self, interaction: discord.Interaction, session_id: str, index: int) -> None:
        actor = Actor(str(interaction.user.id), interaction.user.display_name)
        try:
            reply = await self.storytime.vote("discord", session_id, actor, index)
        except Exception as error:
            reply = user_message(error, f"storytime vote from discord user {interaction.user.id}")
        await _reply(interaction, reply)


async def _reply(interaction: discord.Interaction, line: str) -> None:
    """One ephemeral line, as a response or (after a defer) a follow-up."""
    if interaction.response.is_done():
        await interaction.followup.send(to_discord_line(line), ephemeral=True, allowed_mentions=NO_MENTIONS)
    else:
        await interaction.response.send_message(to_discord_line(line), ephemeral=True, allowed_mentions=NO_MENTIONS)
