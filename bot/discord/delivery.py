"""Deliver one story on Discord, from the deferred "thinking…" message to the last page.

While the story waits its turn the message shows its place in line and an ETA; while
it is written the message is edited with the text so far, at most once per
`interval`; when it is done the pages replace it, with Continue and Regenerate.

Everything goes through REST with the interaction's token, so a gateway reconnect
does not touch it. The token lasts 15 minutes: past `token_ttl_s` the delivery says
so in the original message and carries on in a normal channel message instead.

While it is written, the story's message is kept in the bot's state (bot/state.py), with the
token while it lasts: after a crash, `mark_interrupted` at the next start says so in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import discord

from bot import messages
from bot.discord.render import NO_MENTIONS, DiscordMessage, StoryProgress, to_discord_messages
from bot.service import Started, user_message
from bot.state import BotState
from storygen.errors import RequestCancelledError, StorygenError
from storygen.prompts import to_opening
from storygen.stories import Story

logger = logging.getLogger(__name__)

TOKEN_TTL_S = 14 * 60  # Discord's interaction tokens last 15 minutes; stop relying on one a minute early
_TOKEN_GONE = {10015, 50027}  # Unknown Webhook, Invalid Webhook Token


class StoryDelivery:
    def __init__(self, interaction: discord.Interaction, started: Started, *, on_done: Callable[[Story], None],
                 max_prompt_chars: int, interval: float, token_ttl_s: float = TOKEN_TTL_S,
                 received_at: float | None = None, state: BotState | None = None) -> None:
        self.interaction = interaction
        self.state = state  # where the story's message is kept while it is written
        self.started = started
        self.on_done = on_done
        self.interval = interval
        self.token_ttl_s = token_ttl_s
        self.received_at = time.monotonic() if received_at is None else received_at
        request = started.request
        self.log_id = f"story {request.request_id} for {request.user_key}"
        # A new story shows its opening; a continuation only what comes after the part reread.
        self._opening = "" if started.shown else to_opening(request.prompt, max_prompt_chars)[0]
        self._text = ""
        self._shown: tuple | None = None
        self._moved = False  # True once the token is not to be used: channel messages from then on
        self._channel_message: discord.Message | None = None
        self._message_id: int | None = None  # the message the story is written in, once Discord has said
        self._untrack = True  # False: left in the state for the next start to mark
        self._kept: tuple | None = None  # what _remember wrote last

    async def run(self) -> None:
        try:
            await self._deliver()
        finally:
            if self.state is not None and self._untrack:
                self.state.untrack(self.started.request.request_id)

    async def _deliver(self) -> None:
        handle = self.started.handle
        collector = asyncio.create_task(self._collect())
        try:
            while not collector.done():
                progress = self._progress()
                await self._show(progress)
                self._remember(progress)
                await asyncio.wait({collector}, timeout=self.interval)
            story = await handle
        except StorygenError as error:
            state = "cancelled" if isinstance(error, RequestCancelledError) else "failed"
            await self._show(self._progress(state, status=str(error)))
            return
        except asyncio.CancelledError:  # the bot is stopping: say so rather than leave "writing…" for ever
            self._untrack = False  # unless it is said now, the next start says it
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._show(self._progress("failed", status=messages.STORY_INTERRUPTED)), 2)
                self._untrack = True
            raise
        except Exception as error:
            await self._show(self._progress("failed", status=user_message(error, self.log_id)))
            return
        finally:
            collector.cancel()
        try:
            self.on_done(story)  # kept for Continue and Regenerate
        except Exception as error:
            user_message(error, f"recording {self.log_id}")  # logged with a ref; the story is still shown
        text = self.started.new_text(story) if self.started.shown else story.text
        done = StoryProgress(story.request_id, story.genre, "done", text, notices=story.notices,
                             footer=messages.footer(story.genre, story.new_tokens, story.seed, story.finish_reason),
                             continued=bool(self.started.shown))
        await self._show(done)
        logger.info("%s delivered (%s characters)", self.log_id, len(text))

    def _remember(self, progress: StoryProgress) -> None:
        """Keep where the story is on screen and what it shows, for the next start after a crash."""
        kept = (self._message_id, progress.text)
        if self.state is None or self._message_id is None or kept == self._kept:
            return
        self._kept = kept
        details: dict[str, object] = {"genre": progress.genre, "continued": progress.continued}
        if self._moved:
            details["moved"] = True
        else:  # the interaction's own message: only its token may edit it, until it expires
            expires = time.time() + self.token_ttl_s - (time.monotonic() - self.received_at)
            details.update(application_id=str(self.interaction.application_id), token=self.interaction.token,
                           token_expires=expires)
        request = self.started.request
        self.state.track(request.request_id, "discord", str(self.interaction.channel_id), [str(self._message_id)],
                         request.user_key, progress.text, details)

    async def _collect(self) -> None:
        async for chunk in self.started.handle:
            self._text += chunk

    def _progress(self, state: str | None = None, status: str = "") -> StoryProgress:
        handle = self.started.handle
        position = handle.position if handle.state == "queued" else None
        if state is None:
            state = "queued" if position is not None else "writing"
        if state == "queued":
            status = messages.queued(position, handle.eta_s or 0)
        return StoryProgress(handle.request_id, handle.genre, state, self._opening + self._text, status,
                             handle.notices, continued=bool(self.started.shown))

    # --- where the messages go -----------------------------------------------------------------

    async def _show(self, progress: StoryProgress) -> None:
        """Replace the story's message with the first rendered message and post the rest after it."""
        if not self._moved and time.monotonic() - self.received_at > self.token_ttl_s:
            await self._move_to_channel()
        first, *more = to_discord_messages(progress)
        if not more and first.signature() == self._shown:
            return
        self._shown = first.signature()
        try:
            await self._replace(first)
            for message in more:
                await self._add(message)
        except discord.HTTPException as error:
            if self._moved or error.code not in _TOKEN_GONE:
                logger.warning("%s: Discord refused a message (%s %s)", self.log_id, error.status, error.code)
                return
            logger.info("%s: interaction token gone; posting in the channel instead", self.log_id)
            self._moved = True
            self._shown = self._message_id = None
            await self._show(progress)

    async def _replace(self, message: DiscordMessage) -> None:
        if not self._moved:
            self._message_id = (await self.interaction.edit_original_response(**message.edit_kwargs())).id
            return
        message.content = for_user(self.interaction.user.id, message.content)
        if self._channel_message is None:
            channel = self.interaction.channel  # a text channel or thread: the commands are server-only
            self._channel_message = await channel.send(**message.send_kwargs())  # type: ignore[union-attr]
            self._message_id = self._channel_message.id
        else:
            await self._channel_message.edit(**message.edit_kwargs())

    async def _add(self, message: DiscordMessage) -> None:
        if self._moved:
            await self.interaction.channel.send(**message.send_kwargs())  # type: ignore[union-attr]
        else:
            await self.interaction.followup.send(**message.send_kwargs(), wait=True)

    async def _move_to_channel(self) -> None:
        """Say in the original message, while its token still works, where the story will be."""
        self._moved = True
        self._shown = self._message_id = None
        try:
            await self.interaction.edit_original_response(content=messages.STORY_MOVED, embeds=[], view=None,
                                                          allowed_mentions=NO_MENTIONS)
        except discord.HTTPException as error:
            logger.info("%s: could not update the original message (%s)", self.log_id, error.code)
        logger.info("%s: interaction token nearly expired; continuing in the channel", self.log_id)


async def mark_interrupted(client: discord.Client, state: BotState) -> int:
    """At start-up: stories an earlier run left mid-way (it crashed or was killed) say so, where Discord
    still lets the bot edit them: a channel message always, the interaction's own message while its
    token lasts. Returns how many it marked; each is forgotten, marked or not."""
    marked = 0
    for left in state.in_flight("discord"):
        details = left.details
        progress = StoryProgress(left.request_id, str(details.get("genre", "")), "failed", left.text,
                                 messages.STORY_INTERRUPTED, continued=bool(details.get("continued")))
        message = to_discord_messages(progress)[0]
        try:
            message_id = int(left.messages[0])
            if details.get("moved"):
                message.content = for_user(int(left.user_key.rsplit(":", 1)[-1]), message.content)
                channel = client.get_partial_messageable(int(left.channel))
                await channel.get_partial_message(message_id).edit(**message.edit_kwargs())
            elif float(details.get("token_expires", 0)) > time.time():  # type: ignore[arg-type]
                webhook = discord.Webhook.partial(int(details["application_id"]), str(details["token"]),  # type: ignore[call-overload]
                                                  client=client)
                await webhook.edit_message(message_id, **message.edit_kwargs())
            else:
                logger.info("story %s: its interaction token has expired; it cannot be marked interrupted",
                            left.request_id)
                continue
            marked += 1
        except (discord.HTTPException, LookupError, ValueError) as error:  # deleted, or no access any more
            logger.warning("story %s: could not mark it interrupted: %s", left.request_id, error)
        finally:
            state.untrack(left.request_id)
    if marked:
        logger.info("Discord: marked %s stories interrupted by the last restart", marked)
    return marked


def for_user(user_id: int, content: str | None) -> str:
    """A channel message's content, headed with whom the story is for (no ping: allowed_mentions is none)."""
    return _join(messages.STORY_FOR.format(user=f"<@{user_id}>"), content)


def _join(*lines: str | None) -> str:
    return "\n".join(line for line in lines if line)
