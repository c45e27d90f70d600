"""slack-bolt front-end: `/story` and its buttons in, rendered stories out.

    ctx, command = to_chat_request(body)          # a slash command -> (ChatContext, Command)
    ctx, action, request_id = to_action_request(body)  # a button click
    ... one StoryService call ...
    StoryWriter.write(...)                         # to_slack_blocks, chat.postMessage / chat.update

Every listener calls ack() first, within Slack's 3 seconds: a slash command's answer
(help, settings, "queued, #N in line", or the error) travels in the ack itself, which
Slack shows to the user alone. Socket Mode (SLACK_APP_TOKEN) and HTTP
(SLACK_SIGNING_SECRET, bolt's aiohttp adapter) run the same app.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from dataclasses import replace
from collections.abc import Awaitable
from typing import Any

from aiohttp import web
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_bolt.response import BoltResponse
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import (AsyncConnectionErrorRetryHandler,
                                                         AsyncRateLimitErrorRetryHandler)
from slack_sdk.web.async_client import AsyncWebClient

from bot import messages
from bot.commands import (AdminCommand, Command, SimpleCommand, StoryCommand,
                          parse_command_text, parse_settings_words)
from bot.config import BotConfig
from bot.service import ChatContext, Started, StoryService, user_message
from bot.slack.render import CANCEL, CONTINUE, REGENERATE, SlackLimits, escape, link_channels, unescape
from bot.slack.storytime import STORYTIME_COMMAND, TOGETHER, VOTE_ACTION, SlackStorytime, SlackSurface
from bot.slack.stream import StoryWriter, tell
from bot.storytime.service import StorytimeService
from storygen.errors import ConfigError

logger = logging.getLogger(__name__)

STORY_COMMAND = "/story"
SETTINGS_COMMAND = "/storysettings"  # optional in the manifest; `/story settings` does the same
DEDUPE_TTL_S = 15 * 60  # Slack redelivers within minutes; remember deliveries a while longer
DEDUPE_MAX = 10_000


def to_chat_request(body: dict[str, Any]) -> tuple[ChatContext, Command]:
    """A slash command's form fields -> who asked where, and what; raises a ValidationError to show."""
    ctx = ChatContext("slack", body.get("team_id") or "", body["channel_id"], body["user_id"])
    text = unescape(body.get("text") or "")
    if body.get("command") == SETTINGS_COMMAND:
        return ctx, parse_settings_words(text.split())
    return ctx, parse_command_text(text, ctx.channel)


def to_action_request(body: dict[str, Any]) -> tuple[ChatContext, str, str]:
    """A block_actions payload -> (who clicked where, action_id, the story's request id)."""
    user = body["user"]
    team = (body.get("team") or {}).get("id") or user.get("team_id") or ""
    channel = (body.get("channel") or {}).get("id") or body["container"]["channel_id"]
    action = body["actions"][0]
    return ChatContext("slack", team, channel, user["id"]), action["action_id"], action.get("value") or ""


def _user_key(body: dict[str, Any]) -> str:
    """The user key for log lines, from a slash command's fields or an interaction payload."""
    user = body.get("user_id") or (body.get("user") or {}).get("id")
    team = body.get("team_id") or (body.get("team") or {}).get("id")
    return f"slack:{team}:{user}"


def queued_line(started: Started) -> str:
    """The first answer to a story request: its place in line, and any soft limit applied."""
    handle = started.handle
    position = handle.position
    head = messages.STARTED if position is None else messages.queued(position, handle.eta_s or 0)
    return "\n".join([head, *handle.notices])


class _Deliveries:
    """Slash commands and clicks already seen, by trigger_id (events by event_id), for a while."""

    def __init__(self) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()

    def first_time(self, key: str) -> bool:
        now = time.monotonic()
        while self._seen and (len(self._seen) > DEDUPE_MAX or next(iter(self._seen.values())) < now - DEDUPE_TTL_S):
            self._seen.popitem(last=False)
        if key in self._seen:
            return False
        self._seen[key] = now
        return True


def build_app(config: BotConfig) -> AsyncApp:
    """The bolt app with its Web API client pointed at config.slack_api_url, 429s retried."""
    client = AsyncWebClient(token=str(config.slack_bot_token), base_url=config.slack_api_url,
                            retry_handlers=[AsyncConnectionErrorRetryHandler(),
                                            AsyncRateLimitErrorRetryHandler(max_retry_count=2)])
    return AsyncApp(name="storybot", client=client, signing_secret=str(config.slack_signing_secret),
                    process_before_response=False)


async def _check_token(key: str, call: Awaitable[object]) -> None:
    try:
        await call
    except SlackApiError as error:
        raise ConfigError(f"Slack refused {key} ({error.response.get('error')}); copy it again from the "
                          "app's settings (see docs/SLACK.md)") from None


class SlackFrontEnd:
    """Slack for a StoryService: `await start()`, `await stop()`."""

    def __init__(self, service: StoryService, config: BotConfig, *, limits: SlackLimits = SlackLimits(),
                 host: str = "0.0.0.0", storytime: StorytimeService | None = None) -> None:
        self.service = service
        self.storytime = SlackStorytime(storytime, self._is_admin) if storytime is not None else None
        self.config = config
        self.host = host
        self.app = build_app(config)
        self.writer = StoryWriter(service, config.stream_interval_s, limits)
        self.url: str | None = None  # HTTP mode: the Request URL being served, once started
        self._deliveries = _Deliveries()
        self._socket: AsyncSocketModeHandler | None = None
        self._runner: web.AppRunner | None = None
        self._register()

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Check the bot token, then connect (Socket Mode) or listen (HTTP); a refused token is a ConfigError."""
        await _check_token("SLACK_BOT_TOKEN", self.app.client.auth_test())
        if self.config.slack_socket_mode:
            app_token = str(self.config.slack_app_token)
            # The socket client retries a refused token forever; ask once ourselves to fail fast instead.
            await _check_token("SLACK_APP_TOKEN", self.app.client.apps_connections_open(app_token=app_token))
            self._socket = AsyncSocketModeHandler(self.app, app_token=app_token)
            await self._socket.connect_async()
            logger.info("Slack: connected in Socket Mode")
            await self.writer.mark_interrupted(self.app.client)
            await self._resume_storytime()
            return
        path = self.config.slack_http_path
        self._runner = web.AppRunner(self.app.web_app(path=path), access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.config.slack_http_port).start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}{path}"
        logger.info("Slack: serving HTTP on %s", self.url)
        await self.writer.mark_interrupted(self.app.client)
        await self._resume_storytime()

    async def _resume_storytime(self) -> None:
        """Group sessions speak through this app's client; those a restart left open carry on."""
        if self.storytime is not None:
            self.storytime.storytime.attach("slack", SlackSurface(self.app.client, self.config.stream_interval_s))
            await self.storytime.storytime.resume("slack")

    async def stop(self) -> None:
        """Stop taking requests, then stop the stories in progress (each says so in its channel)."""
        if self._socket is not None:
            await self._socket.close_async()
            self._socket = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.writer.close()

    # --- listeners -----------------------------------------------------------------------------

    def _register(self) -> None:
        # bolt passes arguments by parameter name, so listeners are plain functions, not bound methods.
        async def once_only(request: AsyncBoltRequest, body: dict[str, Any], next: Any) -> BoltResponse | None:
            return await self._once_only(request, body, next)

        async def on_command(ack: Any, body: dict[str, Any], client: AsyncWebClient, respond: Any) -> None:
            await self.on_command(ack, body, client, respond)

        async def on_action(ack: Any, body: dict[str, Any], client: AsyncWebClient, respond: Any) -> None:
            await self.on_action(ack, body, client, respond)

        self.app.middleware(once_only)
        self.app.command(STORY_COMMAND)(on_command)
        self.app.command(SETTINGS_COMMAND)(on_command)
        self.app.action(re.compile(f"^({CONTINUE}|{REGENERATE}|{CANCEL})$"))(on_action)
        if self.storytime is not None:
            self._register_storytime(self.storytime)

    def _register_storytime(self, storytime: SlackStorytime) -> None:
        async def on_storytime(ack: Any, body: dict[str, Any], client: AsyncWebClient) -> None:
            await storytime.on_command(ack, body, client, body.get("text") or "")

        async def on_reply(event: dict[str, Any], body: dict[str, Any], client: AsyncWebClient) -> None:
            await storytime.on_reply(event, body, client)

        async def on_vote(ack: Any, body: dict[str, Any], client: AsyncWebClient) -> None:
            await storytime.on_vote(ack, body, client)

        self.app.command(STORYTIME_COMMAND)(on_storytime)
        self.app.event("message")(on_reply)
        self.app.action(VOTE_ACTION)(on_vote)

    async def _once_only(self, request: AsyncBoltRequest, body: dict[str, Any], next: Any) -> BoltResponse | None:
        """A redelivery never starts a second story: drop Slack's retries, and anything seen before."""
        retry = (request.headers.get("x-slack-retry-num") or ["0"])[0]
        if retry not in ("", "0"):  # Socket Mode sends "0" with every first delivery of an event
            logger.info("dropped Slack retry #%s from %s", retry, _user_key(body))
            return BoltResponse(status=200, body="")
        key = body.get("trigger_id") or body.get("event_id")
        if key and not self._deliveries.first_time(str(key)):
            logger.info("dropped a second delivery of %s from %s", key, _user_key(body))
            return BoltResponse(status=200, body="")
        await next()
        return None

    async def on_command(self, ack: Any, body: dict[str, Any], client: AsyncWebClient, respond: Any) -> None:
        words = (body.get("text") or "").split(None, 1)
        if self.storytime is not None and body.get("command") == STORY_COMMAND and words and \
                words[0].lower() == TOGETHER:  # `/story together …` is `/storytime …`
            await self.storytime.on_command(ack, body, client, words[1] if len(words) > 1 else "")
            return
        started: Started | None = None
        try:
            ctx, command = to_chat_request(body)
            if isinstance(command, AdminCommand):
                ctx = replace(ctx, is_admin=await self._is_admin(client, ctx.user))
            started = await self._start(ctx, command)
            reply = queued_line(started) if started else self.service.answer(ctx, command)
        except Exception as error:
            reply = user_message(error, f"for {_user_key(body)}")
        await ack(link_channels(escape(reply)))
        if started is not None:
            await self.writer.write(client, ctx, started, respond)

    async def _start(self, ctx: ChatContext, command: Command) -> Started | None:
        if isinstance(command, StoryCommand):
            return await self.service.story(ctx, command)
        if command == SimpleCommand("continue"):
            return await self.service.continue_last(ctx)
        return None

    async def _is_admin(self, client: AsyncWebClient, user: str) -> bool:
        """Workspace admins and owners may set the server's limits (users.info, scope users:read)."""
        try:
            info = (await client.users_info(user=user))["user"]
        except SlackApiError as error:
            logger.warning("users.info for %s failed (%s); treating them as not an admin", user,
                           error.response.get("error"))
            return False
        return bool(info.get("is_admin") or info.get("is_owner") or info.get("is_primary_owner"))

    async def on_action(self, ack: Any, body: dict[str, Any], client: AsyncWebClient, respond: Any) -> None:
        await ack()
        ctx, action, request_id = to_action_request(body)
        try:
            if action == CANCEL:
                await tell(client, ctx, self.service.cancel(ctx, request_id), respond)
                return
            if action == CONTINUE:
                started = await self.service.continue_story(ctx, request_id)
            else:
                started = await self.service.regenerate(ctx, request_id)
        except Exception as error:
            await tell(client, ctx, user_message(error, f"{action} {request_id} for {ctx.user_key}"), respond)
            return
        await tell(client, ctx, queued_line(started), respond)
        await self.writer.write(client, ctx, started, respond)
