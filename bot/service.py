"""What every chat front-end does, once: start, continue, regenerate and cancel stories,
show the queue and settings, apply a server's admin limits.

Adapters turn platform events into a `ChatContext` plus a command from
bot/commands.py, call one method here, and render what comes back. Every method
raises only StorygenError subclasses for the user to see; `user_message` turns any
other exception into a reference the log also carries.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass, replace

from bot import messages
from bot.commands import AdminCommand, Command, SettingsCommand, StoryCommand
from bot.state import BotState, ServerSettings, StoredStory
from storygen.config import StorygenConfig
from storygen.errors import SettingRangeError, StorygenError, failure_reference
from storygen.prompts import to_opening
from storygen.sampling import SamplingLimits
from storygen.settings import SettingsStore
from storygen.stories import Story, StoryRequest
from storygen.handle import StoryHandle
from storygen.queue_front import QueueFront

logger = logging.getLogger(__name__)

CONTINUE_TAIL_CHARS = 400  # how much of a story the model rereads to continue it


class NotAllowedError(StorygenError):
    """Refused by a server rule: channel not enabled, cooldown, or admin only."""


@dataclass(frozen=True)
class ChatContext:
    """Who asked, and where. Plain strings: a Discord guild or Slack team is a `workspace`."""

    platform: str  # "discord", "slack" or "api" (the HTTP API and the playground, with no workspace)
    workspace: str
    channel: str
    user: str
    is_admin: bool = False

    @property
    def user_key(self) -> str:
        return ":".join(p for p in (self.platform, self.workspace, self.user) if p)

    @property
    def server_key(self) -> str:
        return ":".join(p for p in (self.platform, self.workspace) if p)

    @property
    def channel_key(self) -> str:
        return ":".join(p for p in (self.platform, self.workspace, self.user if not self.workspace else "",
                                    self.channel) if p)


@dataclass(frozen=True)
class Started:
    """A story under way. The story's text starts with `shown`: for a continuation, the
    part of the old story the model reread, which the adapter should not post again."""

    handle: StoryHandle
    request: StoryRequest
    shown: str = ""
    previous_text: str = ""  # a continuation's whole earlier story

    def new_text(self, story: Story) -> str:
        return story.text[len(self.shown):] if story.text.startswith(self.shown) else story.text


def user_message(error: BaseException, log_context: str = "") -> str:
    """One line for the user: our errors as they are, anything else as a reference id."""
    if isinstance(error, StorygenError):
        return str(error)
    ref = failure_reference()
    logger.error("unexpected failure %s (ref %s)", log_context, ref, exc_info=error)
    return f"Story generation failed (ref {ref})"


class StoryService:
    def __init__(self, worker: QueueFront, settings: SettingsStore, state: BotState, config: StorygenConfig) -> None:
        self.worker = worker
        self.settings = settings
        self.state = state
        self.config = config
        self._active: dict[str, StoryHandle] = {}  # user key -> their latest story in progress
        self._by_id: dict[str, StoryHandle] = {}  # request id -> story in progress, so a button can cancel any
        self._last_start: dict[str, float] = {}  # user key -> monotonic time of their last story, for cooldowns

    # --- stories -----------------------------------------------------------------------------

    async def story(self, ctx: ChatContext, command: StoryCommand, *, shown: str = "",
                    previous_text: str = "") -> Started:
        server = self._check_server_rules(ctx)
        config = self._config_for(server)
        effective = self.settings.effective(ctx.user_key, command.overrides, config)
        request = StoryRequest(uuid.uuid4().hex[:12], ctx.user_key, command.genre or effective.genre,
                               command.prompt, effective.params)
        handle = await self.worker.submit(request)
        self._active[ctx.user_key] = handle
        self._by_id = {rid: h for rid, h in self._by_id.items() if not h.done()}
        self._by_id[request.request_id] = handle
        self._last_start[ctx.user_key] = time.monotonic()
        logger.info("story %s started for %s in %s", request.request_id, ctx.user_key, ctx.channel_key)
        return Started(handle, request, shown, previous_text)

    async def completion(self, ctx: ChatContext, prompt_ids: list[int], overrides: dict) -> Started:
        """A completion of a prompt already encoded (token ids): no genre framing, the text comes back as written."""
        config = self._config_for(self._check_server_rules(ctx))
        params = self.settings.effective(ctx.user_key, overrides, config).params
        request = StoryRequest(uuid.uuid4().hex[:12], ctx.user_key, "auto", "", params, prompt_ids=tuple(prompt_ids))
        handle = await self.worker.submit(request)
        self._by_id = {rid: h for rid, h in self._by_id.items() if not h.done()}
        self._by_id[request.request_id] = handle
        logger.info("completion %s started for %s (%s prompt tokens)", request.request_id, ctx.user_key,
                    len(prompt_ids))
        return Started(handle, request)

    async def continue_last(self, ctx: ChatContext) -> Started:
        last = self.state.last_story(ctx.user_key, ctx.channel_key)
        if last is None:
            raise NotAllowedError(messages.NOTHING_TO_CONTINUE)
        return await self._continue(ctx, last)

    async def continue_story(self, ctx: ChatContext, request_id: str) -> Started:
        stored = self.state.story(request_id)
        if stored is None:
            raise NotAllowedError(messages.STORY_GONE)
        return await self._continue(ctx, stored)

    async def regenerate(self, ctx: ChatContext, request_id: str) -> Started:
        """Write the same story again with a new seed; for a continuation, the same continuation."""
        stored = self.state.story(request_id)
        if stored is None:
            raise NotAllowedError(messages.STORY_GONE)
        if stored.base_text:
            return await self._continue_from(ctx, stored.base_text, stored.genre, stored.overrides)
        overrides = {k: v for k, v in stored.overrides.items() if k != "seed"}  # a new seed: a new story
        return await self.story(ctx, StoryCommand(stored.prompt, stored.genre, overrides))

    async def _continue(self, ctx: ChatContext, stored: StoredStory) -> Started:
        return await self._continue_from(ctx, stored.text, stored.genre, stored.overrides)

    async def _continue_from(self, ctx: ChatContext, text: str, genre: str, overrides: dict) -> Started:
        tail = _tail(text, CONTINUE_TAIL_CHARS)
        shown, _ = to_opening(tail, self.config.max_prompt_chars)
        command = StoryCommand(tail, genre, {k: v for k, v in overrides.items() if k != "seed"})
        return await self.story(ctx, command, shown=shown, previous_text=text)

    def record(self, ctx: ChatContext, started: Started, story: Story, prompt: str | None = None) -> None:
        """Keep a finished story so Continue and Regenerate work, across restarts too."""
        text = started.previous_text + started.new_text(story) if started.previous_text else story.text
        request = started.request
        overrides = dict(request.params.__dict__)  # Regenerate reuses them, with a new seed
        self.state.save_story(StoredStory(request.request_id, ctx.user_key, ctx.channel_key, story.genre,
                                          prompt or request.prompt, overrides, text, started.previous_text))

    # --- cancel and queue ----------------------------------------------------------------------

    def cancel(self, ctx: ChatContext, request_id: str | None = None) -> str:
        """Cancel the user's story in progress, or a given one if it is theirs."""
        if request_id is None:
            handle = self._active.get(ctx.user_key)
            if handle is None or handle.done():
                return messages.NOTHING_TO_CANCEL
        else:
            handle = self._by_id.get(request_id)
            if handle is not None and handle.user_key != ctx.user_key:
                raise NotAllowedError(messages.NOT_YOURS)
            stored = self.state.story(request_id)
            if stored is not None and stored.user_key != ctx.user_key:
                raise NotAllowedError(messages.NOT_YOURS)
            if handle is None or handle.done():
                return messages.NOTHING_TO_CANCEL
        handle.cancel()
        return messages.CANCELLED

    def queue(self, ctx: ChatContext) -> str:
        depth = self.worker.queue_depth()
        handle = self._active.get(ctx.user_key)
        stories = messages.plural(depth)
        if handle is None or handle.done():
            return messages.NOTHING_QUEUED.format(depth=depth, stories=stories)
        position = handle.position
        if position is None:
            return messages.RUNNING_STATUS.format(depth=depth, stories=stories)
        return messages.QUEUE_STATUS.format(position=position + 1, eta=max(1, round(handle.eta_s or 0)),
                                            depth=depth, stories=stories)

    # --- settings ------------------------------------------------------------------------------

    def user_settings(self, ctx: ChatContext, command: SettingsCommand) -> str:
        config = self._config_for(self.state.server(ctx.server_key))
        if command.action == "reset":
            self.settings.reset(ctx.user_key)
            head = messages.SETTINGS_RESET
        elif command.action == "set":
            self.settings.update(ctx.user_key, command.values, config)
            head = messages.SETTINGS_SAVED
        else:
            head = "Your settings:"
        lines = self.settings.effective(ctx.user_key, {}, config).describe()
        return "\n".join([head, *(f"• {line}" for line in lines)])

    def admin(self, ctx: ChatContext, **changes: object) -> str:
        if not ctx.is_admin:
            raise NotAllowedError(messages.ADMIN_ONLY)
        server = self.state.server(ctx.server_key)
        changes = {k: v for k, v in changes.items() if v is not None}
        if changes:
            _check_admin_values(changes, self.config.limits)
            server = replace(server, **changes)
            self.state.save_server(ctx.server_key, server)
        head = messages.ADMIN_SAVED if changes else messages.ADMIN_SHOW
        return "\n".join([head, *describe_server(server, self.config.limits)])

    def answer(self, ctx: ChatContext, command: Command) -> str:
        """A command that is not a story, answered in one message (Slack's wording, which the playground shares)."""
        if isinstance(command, SettingsCommand):
            return self.user_settings(ctx, command)
        if isinstance(command, AdminCommand):
            return self.admin(ctx, **command.changes(self.state.server(ctx.server_key)))
        return {
            "help": lambda: messages.HELP,
            "genres": messages.genres_text,
            "queue": lambda: self.queue(ctx),
            "cancel": lambda: self.cancel(ctx),
        }[command.name]()

    # --- server rules ----------------------------------------------------------------------------

    def _check_server_rules(self, ctx: ChatContext) -> ServerSettings:
        server = self.state.server(ctx.server_key)
        if server.allowed_channels and ctx.channel not in server.allowed_channels:
            raise NotAllowedError(messages.CHANNEL_NOT_ALLOWED.format(channels=_channel_list(server)))
        last = self._last_start.get(ctx.user_key)
        if server.cooldown_s and last is not None:
            left = server.cooldown_s - (time.monotonic() - last)
            if left > 0:
                raise NotAllowedError(messages.COOLDOWN.format(seconds=max(1, round(left))))
        return server

    def _config_for(self, server: ServerSettings) -> StorygenConfig:
        """The operator's config with this server's tighter caps, if any."""
        limits = self.config.limits
        if server.max_length is not None:
            limits = replace(limits, max_length=min(limits.max_length, server.max_length))
        if server.max_temperature is not None:
            limits = replace(limits, max_temperature=min(limits.max_temperature, server.max_temperature))
        defaults = replace(self.config.defaults, length=min(self.config.defaults.length, limits.max_length),
                           temperature=min(self.config.defaults.temperature, limits.max_temperature))
        return replace(self.config, limits=limits, defaults=defaults)


def _check_admin_values(changes: dict[str, object], limits: SamplingLimits) -> None:
    length, temperature, cooldown = (changes.get(k) for k in ("max_length", "max_temperature", "cooldown_s"))
    if length is not None and not 1 <= int(length) <= limits.max_length:
        raise SettingRangeError("max_length", length, f"1 to {limits.max_length} (the operator's cap)")
    if temperature is not None and not 0 <= float(temperature) <= limits.max_temperature:
        raise SettingRangeError("max_temperature", temperature, f"0 to {limits.max_temperature:g} (the operator's cap)")
    if cooldown is not None and not 0 <= float(cooldown) <= 86_400:
        raise SettingRangeError("cooldown_s", cooldown, "0 to 86400 seconds")


def describe_server(server: ServerSettings, limits: SamplingLimits) -> list[str]:
    channels = _channel_list(server) or "all channels"
    return [f"• channels: {channels}",
            f"• max length: {server.max_length or limits.max_length}",
            f"• max temperature: {server.max_temperature if server.max_temperature is not None else limits.max_temperature:g}",
            f"• cooldown: {server.cooldown_s:g} s"]


def _channel_list(server: ServerSettings) -> str:
    """Channel references as <#id>, which Discord and Slack both show as the channel's name."""
    return ", ".join(f"<#{channel}>" for channel in server.allowed_channels)


_SENTENCE_START = re.compile(r"(?<=[.!?…])[\"'”’)\]]*\s+")


def _tail(text: str, limit: int) -> str:
    """The end of a story, at most `limit` characters, starting at a sentence where possible."""
    if len(text) <= limit:
        return text
    tail = text[-limit:]
    match = _SENTENCE_START.search(tail)
    return tail[match.end():] if match and match.end() < len(tail) - 20 else tail.split(" ", 1)[-1]
