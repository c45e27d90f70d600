"""Deliver one story on Discord, from the deferred "thinking…" message to the last page.

While the story waits its turn the message shows its place in line and an ETA; while
it is written the message is edited with the text so far, at most once per
`interval`; when it is done the pages replace it, with Continue and Regenerate.

Everything goes through REST with the interaction's token, so a gateway reconnect
does not touch it. The token lasts 15 minutes: past `token_ttl_s` the delivery says
so in the original message and carries on in a normal channel message instead.
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
from storygen.errors import RequestCancelledError, StorygenError
from storygen.prompts import to_opening
from storygen.stories import Story

logger = logging.getLogger(__name__)

TOKEN_TTL_S = 14 * 60  # Discord's interaction tokens last 15 minutes; stop relying on one a minute early
_TOKEN_GONE = {10015, 50027}  # Unknown Webhook, Invalid Webhook Token


class StoryDelivery:
    def __init__(self, interaction: discord.Interaction, started: Started, *, on_done: Callable[[Story], None],
                 max_prompt_chars: int, interval: float, token_ttl_s: float = TOKEN_TTL_S,
                 received_at: float | None = None) -> None:
        self.interaction = interaction
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

    async def run(self) -> None:
        handle = self.started.handle
        collector = asyncio.create_task(self._collect())
        try:
            while not collector.done():
                await self._show(self._progress())
                await asyncio.wait({collector}, timeout=self.interval)
            story = await handle
        except StorygenError as error:
            state = "cancelled" if isinstance(error, RequestCancelledError) else "failed"
            await self._show(self._progress(state, status=str(error)))
            return
        except asyncio.CancelledError:  # the bot is stopping: say so rather than leave "writing…" for ever
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._show(self._progress("failed", status=messages.STORY_INTERRUPTED)), 2)
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
            self._shown = None
            await self._show(progress)

    async def _replace(self, message: DiscordMessage) -> None:
        if not self._moved:
            await self.interaction.edit_original_response(**message.edit_kwargs())
            return
        message.content = _join(messages.STORY_FOR.format(user=self.interaction.user.mention), message.content)
        if self._channel_message is None:
            channel = self.interaction.channel  # a text channel or thread: the commands are server-only
            self._channel_message = await channel.send(**message.send_kwargs())  # type: ignore[union-attr]
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
        self._shown = None
        try:
            await self.interaction.edit_original_response(content=messages.STORY_MOVED, embeds=[], view=None,
                                                          allowed_mentions=NO_MENTIONS)
        except discord.HTTPException as error:
            logger.info("%s: could not update the original message (%s)", self.log_id, error.code)
        logger.info("%s: interaction token nearly expired; continuing in the channel", self.log_id)


def _join(*lines: str | None) -> str:
    return "\n".join(line for line in lines if line)
