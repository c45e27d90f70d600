"""A fake Discord on 127.0.0.1: REST under /api/v10, the v10 gateway, and a tiny CDN for attachments.

    async with FakeDiscord() as fake:
        restore = point_discord_at(fake.api_url, fake.gateway_url)   # bot.discord.endpoints
        ...start a real discord.Client with fake.token...
        record = await fake.interact(fake.slash_command("story", {"genre": "sci_fi"}))
        edit = await fake.wait_for(lambda r: r.method == "PATCH" and r.params.get("message_id") == "@original")

The fake keeps Discord's state (guilds, channels, messages, synced commands, interactions),
enforces the rules a bot trips over (respond once, within the deadline; follow-ups only
after a response; 2000-character messages; no empty messages) and records every REST
call and gateway frame for tests to assert on.

Sharding: `FakeDiscord(shards=2)` recommends two shards in GET /gateway/bot,
`add_guild(..., shard=(1, 2))` makes a guild shard 1 of 2 owns, and each shard's session
gets only its own guilds' events (discord_gateway.py); `delivered_on(payload)` says which
shard delivered an interaction.
"""

from __future__ import annotations

import copy
import logging
import socket
import time
from typing import Any, AsyncContextManager, Callable

from aiohttp import web

from . import discord_interactions as build
from . import discord_objects as obj
from .discord_gateway import (
    DIRECT_MESSAGES, GUILD_MESSAGES, INVALID_SESSION, MESSAGE_CONTENT, PRIVILEGED_INTENTS, RECONNECT,
    RESUMABLE_CLOSE, FakeGateway,
)
from .discord_records import GatewayFrame, RecordedRequest
from .discord_rest import API_PREFIX, RestRouter
from .discord_routes import DiscordRoutes
from .discord_state import DiscordState, InteractionRecord
from .discord_threads import register_threads

logger = logging.getLogger(__name__)

# Application flags Discord sets once an unverified app enables privileged intents in the portal.
_INTENT_APP_FLAGS = {1 << 1: 1 << 15, 1 << 8: 1 << 13, 1 << 15: 1 << 19}


class FakeDiscord:
    """One application, one bot user, one guild ("Story Club", #general) and one human ("alice")."""

    def __init__(
        self,
        *,
        token: str = "MTAxMDEwMTAxMDEwMTAxMDEw.fake.bot-token",
        callback_deadline: float | None = 3.0,
        heartbeat_interval_ms: int = 41250,
        allowed_intents: int = PRIVILEGED_INTENTS,
        shards: int = 1,
    ) -> None:
        self.token = token
        self.recommended_shards = shards  # what GET /gateway/bot answers; may be changed before a client starts
        self.allowed_intents = allowed_intents
        application_id = obj.snowflake()
        # Since 2021, a bot user's id equals its application's id.
        self.bot_user = obj.user(application_id, "storybot", bot=True)
        self.state = DiscordState(base_url="", application_id=application_id, bot_user=self.bot_user)
        self.user = self.add_user("alice")
        self.guild = self.add_guild("Story Club")
        self.channel = self.state.channels[self.guild["channels"][0]["id"]]

        self.application_flags = sum(flag for intent, flag in _INTENT_APP_FLAGS.items() if allowed_intents & intent)
        self.router = RestRouter(token)
        self.gateway = FakeGateway(self, heartbeat_interval_ms=heartbeat_interval_ms)
        DiscordRoutes(
            self.state,
            token=token,
            gateway_url=lambda: self.gateway_url,
            message_events=self._message_event,
            callback_deadline=callback_deadline,
            application_flags=self.application_flags,
            recommended_shards=lambda: self.recommended_shards,
        ).register(self.router)
        register_threads(self.router, self.state, self._thread_event)
        self.base_url = ""
        self._runner: web.AppRunner | None = None

    @property
    def application_id(self) -> str:
        return self.state.application_id

    @property
    def api_url(self) -> str:
        """What `discord.http.Route.BASE` must be."""
        return self.base_url + API_PREFIX

    @property
    def gateway_url(self) -> str:
        """What `DiscordWebSocket.DEFAULT_GATEWAY` must be."""
        return self.base_url.replace("http://", "ws://") + "/gateway"

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> FakeDiscord:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/gateway", self.gateway.handle)
        app.router.add_get("/gateway-resume", self.gateway.handle)  # READY's resume_gateway_url
        app.router.add_get("/attachments/{tail:.*}", self._cdn)
        app.router.add_route("*", "/{tail:.*}", self.router.handle)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        self.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.state.base_url = self.base_url
        self.gateway.resume_url = self.base_url.replace("http://", "ws://") + "/gateway-resume"
        return self

    async def close(self) -> None:
        await self.gateway.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeDiscord:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- the world -------------------------------------------------------------------------

    def add_user(self, username: str) -> dict[str, Any]:
        """A human, member of every guild (GUILD_CREATE sent after this includes them)."""
        user = obj.user(obj.snowflake(), username)
        self.state.users[user["id"]] = user
        for guild in self.state.guilds.values():
            guild["members"].append(obj.member(user))
            guild["member_count"] += 1
        return user

    def add_guild(self, name: str, *, channel_names: tuple[str, ...] = ("general",),
                  shard: tuple[int, int] | None = None) -> dict[str, Any]:
        """A guild the bot is in, with text channels; every known user is a member. Sent on IDENTIFY.

        shard=(id, count): its id is one that shard owns when the bot runs `count` shards.
        """
        guild_id = obj.snowflake(shard=shard)
        channels = [obj.text_channel(obj.snowflake(), guild_id, n, position=i) for i, n in enumerate(channel_names)]
        members = [obj.member(self.bot_user), *(obj.member(u) for u in self.state.users.values())]
        guild = obj.guild(guild_id, name, owner_id=self.user["id"], channels=channels, members=members)
        self.state.guilds[guild_id] = guild
        for channel in channels:
            self.state.channels[channel["id"]] = channel
        return guild

    def dm_channel(self, user: dict[str, Any] | None = None) -> dict[str, Any]:
        recipient = user or self.user
        channel = obj.dm_channel(obj.snowflake(), recipient)
        self.state.channels[channel["id"]] = channel
        return channel

    def messages_in(self, channel: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return self.state.channel_messages((channel or self.channel)["id"])

    def interaction(self, payload_or_id: dict[str, Any] | str) -> InteractionRecord:
        """What happened to an interaction: its callback, @original and follow-up messages."""
        interaction_id = payload_or_id["id"] if isinstance(payload_or_id, dict) else payload_or_id
        return self.state.interactions[interaction_id]

    def original_message(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        return self.state.messages.get(self.interaction(payload).original_id or "")

    def followup_messages(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        return [self.state.messages[i] for i in self.interaction(payload).followup_ids if i in self.state.messages]

    # -- building interactions ----------------------------------------------------------------

    def context(self, *, user: dict[str, Any] | None = None, channel: dict[str, Any] | None = None,
                member_permissions: str = obj.MEMBER_PERMISSIONS, locale: str = "en-US") -> build.InteractionContext:
        channel = channel or self.channel
        guild = self.state.guilds.get(channel.get("guild_id", ""))
        return build.InteractionContext(
            self.application_id, channel, user or self.user, guild, member_permissions=member_permissions, locale=locale
        )

    def slash_command(self, name: str, options: dict[str, Any] | None = None, **where: Any) -> dict[str, Any]:
        """INTERACTION_CREATE for `/name`, typed from the synced schema; `name` may be "group sub"."""
        ctx = self.context(**where)
        command = self.state.find_command(name.split()[0], ctx.guild["id"] if ctx.guild else None)
        return build.application_command(ctx, name, options, command=command)

    def autocomplete(self, name: str, options: dict[str, Any], *, focused: str, **where: Any) -> dict[str, Any]:
        ctx = self.context(**where)
        command = self.state.find_command(name.split()[0], ctx.guild["id"] if ctx.guild else None)
        return build.application_command(ctx, name, options, command=command, focused=focused)

    def button_click(self, message: dict[str, Any] | str, custom_id: str, **where: Any) -> dict[str, Any]:
        message = self._current(message)
        ctx = self.context(channel=self.state.channels.get(message["channel_id"]), **where)
        return build.component(ctx, message, custom_id)

    def select_menu(self, message: dict[str, Any] | str, custom_id: str, values: list[str],
                    **where: Any) -> dict[str, Any]:
        message = self._current(message)
        ctx = self.context(channel=self.state.channels.get(message["channel_id"]), **where)
        return build.component(ctx, message, custom_id, component_type=build.STRING_SELECT, values=values)

    def modal_submit(self, custom_id: str, fields: dict[str, str], **where: Any) -> dict[str, Any]:
        return build.modal_submit(self.context(**where), custom_id, fields)

    def _current(self, message: dict[str, Any] | str) -> dict[str, Any]:
        """The message as the fake has it now (after edits), so its components are current."""
        return copy.deepcopy(self.state.message(message["id"] if isinstance(message, dict) else str(message)))

    # -- driving the gateway --------------------------------------------------------------------

    async def dispatch(self, event: str, data: Any) -> list[int]:
        """Send any DISPATCH event; INTERACTION_CREATE payloads become interactions the bot can answer."""
        if event == "INTERACTION_CREATE":
            self.state.interactions[data["id"]] = InteractionRecord(payload=data, created_at=time.monotonic())
        return await self.gateway.dispatch(event, data)

    async def interact(self, payload: dict[str, Any]) -> InteractionRecord:
        if not await self.dispatch("INTERACTION_CREATE", payload):
            raise RuntimeError(f"no gateway session owns guild {payload.get('guild_id')}: is its shard connected?")
        return self.state.interactions[payload["id"]]

    def delivered_on(self, payload: dict[str, Any]) -> list[int | None]:
        """The shard (None: unsharded) of each connection that sent this interaction to the client."""
        return [f.shard for f in self.frames
                if f.direction == "send" and f.t == "INTERACTION_CREATE" and f.d["id"] == payload["id"]]

    async def user_message(self, content: str, *, user: dict[str, Any] | None = None,
                           channel: dict[str, Any] | None = None) -> dict[str, Any]:
        """A human posts in a channel; without the MESSAGE_CONTENT intent the bot sees it blank."""
        channel = channel or self.channel
        author = user or self.user
        message = obj.message(obj.snowflake(), channel["id"], author, content=content)
        mentions_bot = f"<@{self.bot_user['id']}>" in content
        if mentions_bot:
            message["mentions"] = [self.bot_user]
        self.state.messages[message["id"]] = message
        await self._message_event("MESSAGE_CREATE", message, channel, redact=not mentions_bot)
        return message

    async def disconnect(self, code: int = RESUMABLE_CLOSE) -> None:
        """Close the client's socket; 4000 (and most codes) let it RESUME, 4004/4010-4014 do not."""
        await self.gateway.disconnect(code)

    def gateway_down(self, code: int = RESUMABLE_CLOSE) -> AsyncContextManager[None]:
        """`async with fake.gateway_down(): await fake.interact(...)` - the client misses it and must RESUME."""
        return self.gateway.down(code)

    async def request_reconnect(self) -> None:
        """Op 7 RECONNECT: the client closes and RESUMEs on resume_gateway_url."""
        await self.gateway.send_op(RECONNECT)

    async def invalidate_session(self, *, resumable: bool = False) -> None:
        """Op 9. discord.py sleeps 5 s in before_identify_hook before a non-initial IDENTIFY."""
        if resumable:
            await self.gateway.send_op(INVALID_SESSION, True)
        else:
            await self.gateway.invalidate_sessions()

    # -- scripting failures ------------------------------------------------------------------------

    def fail_next(self, method: str, path_regex: str, *, status: int, code: int = 0, message: str = "error",
                  times: int = 1) -> None:
        """The next matching REST call(s) get this Discord error, e.g. (404, 10062, "Unknown interaction")."""
        self.router.fail_next(method, path_regex, status=status, body={"message": message, "code": code}, times=times)

    def rate_limit_next(self, method: str, path_regex: str, *, retry_after: float = 0.05,
                        is_global: bool = False) -> None:
        """A 429 as Discord sends it; discord.py sleeps `retry_after` and retries."""
        body = {"message": "You are being rate limited.", "retry_after": retry_after, "global": is_global}
        self.router.fail_next(method, path_regex, status=429, body=body,
                              headers={"Retry-After": str(retry_after), "X-RateLimit-Scope": "user"})

    # -- what happened ----------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        return self.router.requests.items

    @property
    def frames(self) -> list[GatewayFrame]:
        return self.gateway.frames.items

    @property
    def problems(self) -> list[str]:
        """Protocol errors the fake answered: unknown routes, bad gateway payloads."""
        unknown = [f"unknown route {r.method} {r.path}" for r in self.requests if r.route is None]
        return unknown + self.gateway.problems

    async def wait_for(self, predicate: Callable[[RecordedRequest], bool], *, timeout: float = 5.0,
                       count: int = 1) -> RecordedRequest:
        """The `count`-th REST request (already recorded or still to come) matching `predicate`."""
        return await self.router.requests.wait_for(predicate, timeout=timeout, count=count)

    async def wait_for_frame(self, predicate: Callable[[GatewayFrame], bool], *, timeout: float = 5.0,
                             count: int = 1) -> GatewayFrame:
        return await self.gateway.frames.wait_for(predicate, timeout=timeout, count=count)

    # -- GatewayWorld --------------------------------------------------------------------------------

    def ready(self, session_id: str, resume_gateway_url: str) -> dict[str, Any]:
        return {
            "v": 10,
            "user": {**self.bot_user, "verified": True, "mfa_enabled": False, "email": None},
            "guilds": [{"id": guild_id, "unavailable": True} for guild_id in self.state.guilds],
            "session_id": session_id,
            "session_type": "normal",
            "resume_gateway_url": resume_gateway_url,
            "application": {"id": self.application_id, "flags": self.application_flags},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "geo_ordered_rtc_regions": ["us-east"],
            "_trace": ['["fake-discord",{"micros":0}]'],
        }

    def guild_creates(self) -> list[dict[str, Any]]:
        return [copy.deepcopy(guild) for guild in self.state.guilds.values()]

    def guild_members(self, guild_id: str) -> list[dict[str, Any]]:
        return copy.deepcopy(self.state.guilds.get(guild_id, {}).get("members", []))

    # -- internals -----------------------------------------------------------------------------------

    async def _message_event(self, event: str, message: dict[str, Any], channel: dict[str, Any], *,
                             redact: bool = False) -> None:
        """Mirror a message change onto the gateway, as Discord does; ephemeral messages never are."""
        if message["flags"] & obj.EPHEMERAL or not self.gateway.sessions:
            return
        guild_id = channel.get("guild_id")
        if event == "MESSAGE_DELETE":
            data: dict[str, Any] = {"id": message["id"], "channel_id": message["channel_id"]}
        else:
            data = copy.deepcopy(message)
            author_id = message["author"]["id"]
            if guild_id is not None:
                members = self.state.guilds[guild_id]["members"]
                member = next((m for m in members if m["user"]["id"] == author_id), None)
                data["member"] = {k: v for k, v in (member or obj.member(message["author"])).items() if k != "user"}
        if guild_id is not None:
            data["guild_id"] = guild_id
        if redact and guild_id is not None:
            blank = {**data, "content": "", "embeds": [], "attachments": [], "components": []}
            payload: Any = lambda intents: data if intents & MESSAGE_CONTENT else blank  # noqa: E731
        else:
            payload = data
        await self.gateway.dispatch(event, payload, intent=GUILD_MESSAGES if guild_id else DIRECT_MESSAGES)

    async def _thread_event(self, event: str, data: Any, intent: int) -> None:
        if self.gateway.sessions:
            await self.gateway.dispatch(event, data, intent=intent)

    def threads(self, parent: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The threads started off a channel (#general by default), oldest first."""
        parent_id = (parent or self.channel)["id"]
        return [c for c in self.state.channels.values() if c.get("parent_id") == parent_id and "thread_metadata" in c]

    async def _cdn(self, request: web.Request) -> web.Response:
        data = self.state.attachment_data.get(request.path)
        if data is None:
            return web.Response(status=404, text="Not Found")
        return web.Response(body=data)
