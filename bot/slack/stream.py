"""One story in a Slack channel: post it, edit it as it is written, finish it with buttons.

The story is edited at most once per `interval_s` (Slack allows about one chat.update
a second per channel). Errors go to the requester as one ephemeral line; the
channel message keeps what was written and says how it ended.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot import messages
from bot.service import ChatContext, Started, StoryService, user_message
from bot.slack.render import SlackLimits, SlackMessage, StoryView, escape, needs_file, to_slack_blocks
from storygen.errors import RequestCancelledError, WorkerUnavailableError
from storygen.prompts import to_opening
from storygen.stories import Story

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0  # how long stop() lets stories say they were stopped
_SLACK_ERRORS = (SlackApiError, aiohttp.ClientError, asyncio.TimeoutError)


async def tell(client: AsyncWebClient, ctx: ChatContext, text: str, respond: Any = None) -> None:
    """One ephemeral line for the user; through response_url where the bot can't post."""
    try:
        await client.chat_postEphemeral(channel=ctx.channel, user=ctx.user, text=escape(text))
    except _SLACK_ERRORS as error:
        if respond is None:
            logger.warning("could not tell %s in %s: %s", ctx.user_key, ctx.channel_key, error)
            return
        await respond(text=escape(text), response_type="ephemeral", replace_original=False)


class StoryMessages:
    """The channel messages that show one story: posted once, then edited in place."""

    def __init__(self, client: AsyncWebClient, channel: str, limits: SlackLimits,
                 existing: tuple[str, ...] = ()) -> None:
        self.client = client
        self.channel = channel
        self.limits = limits
        # (ts, what it shows now); messages an earlier run posted show something unknown
        self._shown: list[tuple[str, SlackMessage | None]] = [(ts, None) for ts in existing]

    @property
    def ids(self) -> list[str]:
        return [ts for ts, _ in self._shown]

    async def show(self, view: StoryView) -> None:
        pages = to_slack_blocks(view, self.limits)
        # Surplus messages go first (a story that shrank when its dangling end was trimmed, or
        # became a preview), so the edit that shows the buttons is the last thing a reader sees.
        for ts, _ in self._shown[len(pages):]:
            await self.client.chat_delete(channel=self.channel, ts=ts)
        del self._shown[len(pages):]
        for i, page in enumerate(pages):
            if i < len(self._shown):
                ts, old = self._shown[i]
                if old != page:
                    await self.client.chat_update(channel=self.channel, ts=ts, text=page.text, blocks=page.blocks)
                    self._shown[i] = (ts, page)
            else:
                posted = await self.client.chat_postMessage(channel=self.channel, text=page.text, blocks=page.blocks)
                self._shown.append((posted["ts"], page))

    async def attach(self, text: str, request_id: str) -> None:
        """The whole story as a text file in the thread of its first message."""
        await self.client.files_upload_v2(channel=self.channel, thread_ts=self._shown[0][0], content=text,
                                          filename=f"story-{request_id}.txt", title="story.txt")


class StoryWriter:
    """Streams stories into channels; `close()` stops them all at shutdown."""

    def __init__(self, service: StoryService, interval_s: float, limits: SlackLimits = SlackLimits()) -> None:
        self.service = service
        self.interval_s = interval_s
        self.limits = limits
        self._live: dict[asyncio.Task, Started] = {}
        self._closing = False

    async def write(self, client: AsyncWebClient, ctx: ChatContext, started: Started, respond: Any = None) -> None:
        request_id = started.request.request_id
        task = asyncio.current_task()
        self._live[task] = started
        try:
            await self._write(client, ctx, started, respond)
        except asyncio.CancelledError:
            started.handle.cancel()
            raise
        except Exception as error:  # a bug here must not pass silently: the user gets a ref, the log the traceback
            await tell(client, ctx, user_message(error, f"streaming {request_id} for {ctx.user_key}"), respond)
        finally:
            self._live.pop(task, None)

    async def close(self) -> None:
        """Stop every story in progress; each says so in its channel before the grace period ends."""
        self._closing = True
        for started in self._live.values():
            started.handle.cancel()
        tasks = list(self._live)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=SHUTDOWN_GRACE_S)
            for task in late:
                task.cancel()

    async def _write(self, client: AsyncWebClient, ctx: ChatContext, started: Started, respond: Any) -> None:
        request_id = started.request.request_id
        view = StoryView(self._text(started, ""), request_id, ctx.user)
        shown = StoryMessages(client, ctx.channel, self.limits)
        try:
            await shown.show(view)
        except _SLACK_ERRORS as error:
            started.handle.cancel()
            logger.warning("story %s for %s: cannot post in %s: %s", request_id, ctx.user_key, ctx.channel_key, error)
            await tell(client, ctx, messages.CANT_POST, respond)
            return
        self._track(ctx, shown, view)
        written = ""
        last = time.monotonic()
        async for chunk in started.handle:
            written += chunk
            if time.monotonic() - last >= self.interval_s:
                await self._show(shown, replace(view, text=self._text(started, written)), request_id)
                self._track(ctx, shown, replace(view, text=self._text(started, written)))
                last = time.monotonic()
        try:
            story = await started.handle
        except RequestCancelledError:
            state = "stopped" if self._closing else "cancelled"
            await self._show(shown, replace(view, text=self._text(started, written), state=state), request_id)
            self.service.state.untrack(request_id)
            if self._closing:
                await tell(client, ctx, str(WorkerUnavailableError("shutting down")), respond)
            return
        except Exception as error:
            await self._show(shown, replace(view, text=self._text(started, written), state="stopped"), request_id)
            self.service.state.untrack(request_id)
            await tell(client, ctx, user_message(error, f"story {request_id} for {ctx.user_key}"), respond)
            return
        self.service.record(ctx, started, story)
        await self._finish(shown, view, started, story)
        self.service.state.untrack(request_id)

    def _track(self, ctx: ChatContext, shown: StoryMessages, view: StoryView) -> None:
        """Remember where the story is and what it shows, until it ends; a crash leaves the row behind."""
        self.service.state.track(view.request_id, "slack", ctx.channel, shown.ids, ctx.user_key, view.text)

    async def mark_interrupted(self, client: AsyncWebClient) -> int:
        """At start-up: stories an earlier run left mid-way (it crashed or was killed) say so."""
        marked = 0
        for left in self.service.state.in_flight("slack"):
            view = StoryView(left.text, left.request_id, left.user_key.rsplit(":", 1)[-1], state="interrupted")
            try:
                await StoryMessages(client, left.channel, self.limits, left.messages).show(view)
                marked += 1
            except _SLACK_ERRORS as error:  # deleted, or the channel is gone: nothing left to fix
                logger.warning("story %s: could not mark it interrupted: %s", left.request_id, error)
            self.service.state.untrack(left.request_id)
        if marked:
            logger.info("marked %s stories interrupted by the last restart", marked)
        return marked

    async def _finish(self, shown: StoryMessages, view: StoryView, started: Started, story: Story) -> None:
        text = self._text(started, started.new_text(story)) if started.shown else story.text
        footer = messages.footer(story.genre, story.new_tokens, story.seed, story.finish_reason)
        await self._show(shown, replace(view, text=text, state="done", footer=footer), story.request_id)
        if needs_file(text, self.limits):
            try:
                await shown.attach(text, story.request_id)
            except _SLACK_ERRORS as error:
                logger.warning("story %s: file upload failed: %s", story.request_id, error)

    def _text(self, started: Started, written: str) -> str:
        """The story as shown: the opening and what the model wrote; a continuation shows only its new part."""
        if started.shown:
            return "…" + written.lstrip()
        return to_opening(started.request.prompt, self.service.config.max_prompt_chars)[0] + written

    @staticmethod
    async def _show(shown: StoryMessages, view: StoryView, request_id: str) -> None:
        try:
            await shown.show(view)
        except _SLACK_ERRORS as error:  # a missed edit is not worth failing the story for
            logger.warning("story %s: chat update failed: %s", request_id, error)
