"""The REST routes discord.py calls for login, command sync, channel messages and interactions."""

from __future__ import annotations

import re
import time
from typing import Any, Awaitable, Callable

from . import discord_objects as obj
from .discord_records import RecordedFile
from .discord_rest import DiscordError, Incoming, Reply, RestRouter, invalid_form
from .discord_state import DiscordState, InteractionRecord

# (event name, payload, intent bit) -> forwarded to the gateway when a client is connected.
EventSink = Callable[[str, dict[str, Any], dict[str, Any]], Awaitable[None]]

APPLICATION_COMMAND, MESSAGE_COMPONENT, AUTOCOMPLETE, MODAL_SUBMIT = 2, 3, 4, 5
# Which callback types Discord accepts for which interaction type.
_ALLOWED_CALLBACKS = {
    APPLICATION_COMMAND: {4, 5, 9},
    MESSAGE_COMPONENT: {4, 5, 6, 7, 9},
    AUTOCOMPLETE: {8},
    MODAL_SUBMIT: {4, 5, 6, 7},
}
_COMMAND_NAME = re.compile(r"^[-_\w]{1,32}$")
NO_CONTENT = Reply(204)


class DiscordRoutes:
    def __init__(
        self,
        state: DiscordState,
        *,
        token: str,
        gateway_url: Callable[[], str],
        message_events: EventSink,
        callback_deadline: float | None,
        application_flags: int,
        recommended_shards: Callable[[], int] = lambda: 1,
    ) -> None:
        self.state = state
        self.token = token
        self.gateway_url = gateway_url
        self.message_events = message_events
        self.callback_deadline = callback_deadline
        self.application_flags = application_flags
        self.recommended_shards = recommended_shards

    def register(self, router: RestRouter) -> None:
        s, add = self, router.add
        add("GET", "/users/@me", s.get_me)
        add("GET", "/oauth2/applications/@me", s.get_application)
        add("GET", "/applications/@me", s.get_application)
        add("GET", "/gateway", s.get_gateway, bot_auth=False)
        add("GET", "/gateway/bot", s.get_gateway_bot)
        add("POST", "/users/@me/channels", s.create_dm)
        for prefix in ("/applications/{application_id}", "/applications/{application_id}/guilds/{guild_id}"):
            add("GET", prefix + "/commands", s.get_commands)
            add("PUT", prefix + "/commands", s.put_commands)
            add("POST", prefix + "/commands", s.post_command)
            add("DELETE", prefix + "/commands/{command_id}", s.delete_command)
        add("GET", "/guilds/{guild_id}", s.get_guild)
        add("GET", "/guilds/{guild_id}/members/{user_id}", s.get_member)
        add("GET", "/channels/{channel_id}", s.get_channel)
        add("GET", "/channels/{channel_id}/messages", s.list_messages)
        add("POST", "/channels/{channel_id}/messages", s.post_message)
        add("GET", "/channels/{channel_id}/messages/{message_id}", s.get_message)
        add("PATCH", "/channels/{channel_id}/messages/{message_id}", s.patch_message)
        add("DELETE", "/channels/{channel_id}/messages/{message_id}", s.delete_message)
        add("POST", "/channels/{channel_id}/typing", s.no_content)
        add("PUT", "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me", s.no_content)
        # Interaction tokens are the credential here: discord.py sends no Authorization header.
        add("POST", "/interactions/{interaction_id}/{interaction_token}/callback", s.callback, bot_auth=False)
        add("POST", "/webhooks/{application_id}/{interaction_token}", s.followup, bot_auth=False)
        for verb, handler in (("GET", s.get_webhook_message), ("PATCH", s.patch_webhook_message),
                              ("DELETE", s.delete_webhook_message)):
            add(verb, "/webhooks/{application_id}/{interaction_token}/messages/{message_id}", handler, bot_auth=False)

    # -- identity ----------------------------------------------------------------------

    async def get_me(self, req: Incoming) -> Any:
        return self.state.bot_user

    async def get_application(self, req: Incoming) -> Any:
        owner = obj.user(obj.snowflake(), "app-owner")
        return obj.application(self.state.application_id, self.state.bot_user["username"], owner,
                               flags=self.application_flags)

    async def get_gateway(self, req: Incoming) -> Any:
        return {"url": self.gateway_url()}

    async def get_gateway_bot(self, req: Incoming) -> Any:
        limit = {"total": 1000, "remaining": 999, "reset_after": 86_400_000, "max_concurrency": 1}
        # What AutoShardedClient without a shard_count launches; Discord's is about one per 1,000 guilds.
        return {"url": self.gateway_url(), "shards": self.recommended_shards(), "session_start_limit": limit}

    async def create_dm(self, req: Incoming) -> Any:
        recipient = self.state.users.get(str((req.json or {}).get("recipient_id")))
        if recipient is None:
            raise DiscordError(400, 50033, "Invalid Recipient(s)")
        for channel in self.state.channels.values():
            if channel["type"] == obj.DM and channel["recipients"][0]["id"] == recipient["id"]:
                return channel
        channel = obj.dm_channel(obj.snowflake(), recipient)
        self.state.channels[channel["id"]] = channel
        return channel

    # -- application commands ------------------------------------------------------------

    def _command_list(self, req: Incoming) -> list[dict[str, Any]]:
        if req.params["application_id"] != self.state.application_id:
            raise DiscordError(403, 50001, "Missing Access")
        guild_id = req.params.get("guild_id")
        if guild_id is None:
            return self.state.global_commands
        if guild_id not in self.state.guilds:
            raise DiscordError(403, 50001, "Missing Access")
        return self.state.guild_commands.setdefault(guild_id, [])

    async def get_commands(self, req: Incoming) -> Any:
        return self._command_list(req)

    async def put_commands(self, req: Incoming) -> Any:
        """Bulk overwrite: the list becomes exactly what was sent; same name+type keeps its id."""
        current = self._command_list(req)
        if not isinstance(req.json, list):
            raise invalid_form("_errors", "LIST_TYPE_CONVERT", "Only iterables may be used in a ListType")
        for index, command in enumerate(req.json):
            _validate_command(command, str(index))
        old_ids = {(c["name"], c.get("type", 1)): c["id"] for c in current}
        current[:] = [self._stored_command(c, req.params.get("guild_id"), old_ids) for c in req.json]
        return current

    async def post_command(self, req: Incoming) -> Any:
        current = self._command_list(req)
        _validate_command(req.json, "")
        old_ids = {(c["name"], c.get("type", 1)): c["id"] for c in current}
        command = self._stored_command(req.json, req.params.get("guild_id"), old_ids)
        current[:] = [c for c in current if c["id"] != command["id"]] + [command]
        return Reply(200 if (command["name"], command["type"]) in old_ids else 201, command)

    async def delete_command(self, req: Incoming) -> Any:
        current = self._command_list(req)
        if not any(c["id"] == req.params["command_id"] for c in current):
            raise DiscordError(404, 10063, "Unknown application command")
        current[:] = [c for c in current if c["id"] != req.params["command_id"]]
        return NO_CONTENT

    def _stored_command(self, sent: dict[str, Any], guild_id: str | None, old_ids: dict) -> dict[str, Any]:
        kind = sent.get("type", 1)
        command = {
            "id": old_ids.get((sent["name"], kind)) or obj.snowflake(),
            "application_id": self.state.application_id,
            "version": obj.snowflake(),
            "type": kind,
            "name": sent["name"],
            "name_localizations": sent.get("name_localizations"),
            "description": sent.get("description", ""),
            "description_localizations": sent.get("description_localizations"),
            "default_member_permissions": sent.get("default_member_permissions"),
            "contexts": sent.get("contexts"),
            "integration_types": sent.get("integration_types") or [0],
            "nsfw": sent.get("nsfw", False),
        }
        if sent.get("options"):
            command["options"] = sent["options"]
        if guild_id is not None:
            command["guild_id"] = guild_id
        else:
            command["dm_permission"] = sent.get("dm_permission", True)
        return command

    # -- guilds and channels ----------------------------------------------------------------

    async def get_guild(self, req: Incoming) -> Any:
        guild = self.state.guilds.get(req.params["guild_id"])
        if guild is None:
            raise DiscordError(404, 10004, "Unknown Guild")
        gateway_only = {"members", "channels", "threads", "presences", "voice_states", "joined_at", "member_count",
                        "large", "unavailable", "stage_instances", "guild_scheduled_events", "soundboard_sounds"}
        return {k: v for k, v in guild.items() if k not in gateway_only}

    async def get_member(self, req: Incoming) -> Any:
        guild = self.state.guilds.get(req.params["guild_id"])
        if guild is None:
            raise DiscordError(404, 10004, "Unknown Guild")
        for member in guild["members"]:
            if member["user"]["id"] == req.params["user_id"]:
                return member
        raise DiscordError(404, 10007, "Unknown Member")

    async def get_channel(self, req: Incoming) -> Any:
        return self.state.channel(req.params["channel_id"])

    async def list_messages(self, req: Incoming) -> Any:
        self.state.channel(req.params["channel_id"])
        limit = int(req.query.get("limit", 50))
        newest_first = sorted(self.state.channel_messages(req.params["channel_id"]), key=lambda m: -int(m["id"]))
        return [m for m in newest_first if not m["flags"] & obj.EPHEMERAL][:limit]

    async def get_message(self, req: Incoming) -> Any:
        return self.state.message(req.params["message_id"], req.params["channel_id"])

    async def post_message(self, req: Incoming) -> Any:
        channel = self.state.channel(req.params["channel_id"])
        body = dict(req.json or {})
        body["flags"] = body.get("flags", 0) & ~obj.EPHEMERAL  # only interaction messages can be ephemeral
        extra = {"nonce": body["nonce"]} if "nonce" in body else {}
        if "message_reference" in body:
            extra["message_reference"] = {"type": 0, "channel_id": channel["id"], **body["message_reference"]}
        message = self.state.create_message(channel["id"], body, req.files, extra=extra,
                                            message_type=19 if "message_reference" in body else 0)
        await self.message_events("MESSAGE_CREATE", message, channel)
        return message

    async def patch_message(self, req: Incoming) -> Any:
        message = self.state.message(req.params["message_id"], req.params["channel_id"])
        if message["author"]["id"] != self.state.bot_user["id"]:
            raise DiscordError(403, 50005, "Cannot edit a message authored by another user")
        self.state.edit_message(message, req.json, req.files)
        await self.message_events("MESSAGE_UPDATE", message, self.state.channel(message["channel_id"]))
        return message

    async def delete_message(self, req: Incoming) -> Any:
        message = self.state.message(req.params["message_id"], req.params["channel_id"])
        del self.state.messages[message["id"]]
        await self.message_events("MESSAGE_DELETE", message, self.state.channel(message["channel_id"]))
        return NO_CONTENT

    async def no_content(self, req: Incoming) -> Any:
        self.state.channel(req.params["channel_id"])
        return NO_CONTENT

    # -- interactions ------------------------------------------------------------------------

    async def callback(self, req: Incoming) -> Any:
        record = self.state.interactions.get(req.params["interaction_id"])
        if record is None or record.token != req.params["interaction_token"]:
            raise DiscordError(404, 10062, "Unknown interaction")
        if record.callback is not None:
            raise DiscordError(400, 40060, "Interaction has already been acknowledged.")
        if self.callback_deadline is not None and time.monotonic() - record.created_at > self.callback_deadline:
            raise DiscordError(404, 10062, "Unknown interaction")  # what a response after 3 s gets
        body = req.json if isinstance(req.json, dict) else {}
        kind = body.get("type")
        if kind not in _ALLOWED_CALLBACKS.get(record.type, set()):
            raise invalid_form("type", "INTERACTION_RESPONSE_TYPE_INVALID",
                               f"Callback type {kind} is not valid for interaction type {record.type}")
        message = await self._answer(record, kind, body.get("data") or {}, req.files)
        record.callback = body
        if req.query.get("with_response") not in ("1", "true", "True"):
            return NO_CONTENT
        return _callback_response(record, kind, message)

    async def _answer(
        self, record: InteractionRecord, kind: int, data: dict[str, Any], files: tuple[RecordedFile, ...]
    ) -> dict[str, Any] | None:
        channel = self.state.channels.get(record.payload["channel_id"]) or record.payload["channel"]
        extra = _interaction_message_fields(record, self.state.application_id)
        message_type = 20 if record.type == APPLICATION_COMMAND else 0  # 20: CHAT_INPUT_COMMAND
        if kind == 4:
            message = self.state.create_message(channel["id"], data, files, error_path="data.",
                                                message_type=message_type, extra=extra)
        elif kind == 5:
            message = self.state.create_loading_message(
                channel["id"], ephemeral=bool(data.get("flags", 0) & obj.EPHEMERAL), message_type=message_type,
                extra=extra)
        elif kind in (6, 7):
            if "message" not in record.payload:
                raise invalid_form("type", "INTERACTION_RESPONSE_TYPE_INVALID", "No message to update")
            message = self.state.message(record.payload["message"]["id"])
            if kind == 7:
                self.state.edit_message(message, data, files, error_path="data.")
                await self.message_events("MESSAGE_UPDATE", message, channel)
            record.original_id = message["id"]
            return message
        else:  # 8 autocomplete choices, 9 modal: nothing is posted
            _validate_callback_data(kind, data)
            return None
        record.original_id = message["id"]
        await self.message_events("MESSAGE_CREATE", message, channel)
        return message

    async def followup(self, req: Incoming) -> Any:
        record = self.state.interaction_by_token(req.params["application_id"], req.params["interaction_token"])
        original = self.state.messages.get(record.original_id or "")
        channel = self.state.channels.get(record.payload["channel_id"]) or record.payload["channel"]
        if original is not None and original["flags"] & obj.LOADING:
            # Documented back-compat: the first follow-up after a deferral edits the "thinking" message.
            self.state.edit_message(original, req.json, req.files)
            await self.message_events("MESSAGE_UPDATE", original, channel)
            return original
        extra = _interaction_message_fields(record, self.state.application_id)
        message = self.state.create_message(channel["id"], req.json, req.files, extra=extra)
        record.followup_ids.append(message["id"])
        await self.message_events("MESSAGE_CREATE", message, channel)
        return message  # interaction follow-ups behave as if ?wait=true

    def _webhook_message(self, req: Incoming) -> tuple[InteractionRecord, dict[str, Any]]:
        record = self.state.interaction_by_token(req.params["application_id"], req.params["interaction_token"])
        message_id = req.params["message_id"]
        if message_id == "@original":
            message_id = record.original_id or ""
        elif message_id not in (record.original_id, *record.followup_ids):
            raise DiscordError(404, 10008, "Unknown Message")
        return record, self.state.message(message_id)

    async def get_webhook_message(self, req: Incoming) -> Any:
        return self._webhook_message(req)[1]

    async def patch_webhook_message(self, req: Incoming) -> Any:
        record, message = self._webhook_message(req)
        self.state.edit_message(message, req.json, req.files)
        await self.message_events("MESSAGE_UPDATE", message, self.state.channel(message["channel_id"]))
        return message

    async def delete_webhook_message(self, req: Incoming) -> Any:
        record, message = self._webhook_message(req)
        del self.state.messages[message["id"]]
        await self.message_events("MESSAGE_DELETE", message, self.state.channel(message["channel_id"]))
        return NO_CONTENT


def _interaction_message_fields(record: InteractionRecord, application_id: str) -> dict[str, Any]:
    """What marks a message as an interaction's: webhook_id is the application id."""
    payload = record.payload
    user = (payload.get("member") or {}).get("user") or payload.get("user")
    metadata: dict[str, Any] = {
        "id": payload["id"],
        "type": payload["type"],
        "user": user,
        "authorizing_integration_owners": payload.get("authorizing_integration_owners", {}),
    }
    if payload["type"] == APPLICATION_COMMAND:
        metadata["name"] = payload["data"]["name"]
        metadata["command_type"] = payload["data"].get("type", 1)
    if payload["type"] == MESSAGE_COMPONENT:
        metadata["interacted_message_id"] = payload["message"]["id"]
    return {"webhook_id": application_id, "application_id": application_id, "interaction_metadata": metadata}


def _callback_response(record: InteractionRecord, kind: int, message: dict[str, Any] | None) -> dict[str, Any]:
    """The body of POST .../callback?with_response=true (discord.py always asks for it)."""
    interaction: dict[str, Any] = {"id": record.id, "type": record.type}
    response: dict[str, Any] = {"interaction": interaction}
    if message is not None:
        interaction["response_message_id"] = message["id"]
        interaction["response_message_loading"] = bool(message["flags"] & obj.LOADING)
        interaction["response_message_ephemeral"] = bool(message["flags"] & obj.EPHEMERAL)
        response["resource"] = {"type": kind, "message": message}
    return response


def _validate_callback_data(kind: int, data: dict[str, Any]) -> None:
    if kind == 8:
        choices = data.get("choices")
        if not isinstance(choices, list) or len(choices) > 25:
            raise invalid_form("data.choices", "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
        for i, choice in enumerate(choices):
            if not 1 <= len(str(choice.get("name", ""))) <= 100:
                raise invalid_form(
                    f"data.choices.{i}.name", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length."
                )
    elif kind == 9:
        for key, limit in (("custom_id", 100), ("title", 45)):
            if not 1 <= len(data.get(key) or "") <= limit:
                raise invalid_form(f"data.{key}", "BASE_TYPE_BAD_LENGTH", f"Must be between 1 and {limit} in length.")


def _validate_command(command: Any, path: str) -> None:
    """The server-side checks that bite slash-command definitions most often."""
    prefix = f"{path}." if path else ""
    if not isinstance(command, dict) or "name" not in command:
        raise invalid_form(f"{prefix}name", "BASE_TYPE_REQUIRED", "This field is required")
    kind = command.get("type", 1)
    name = command["name"]
    if kind == 1 and (not _COMMAND_NAME.match(name) or name != name.lower()):
        raise invalid_form(f"{prefix}name", "APPLICATION_COMMAND_INVALID_NAME", f"Command name is invalid: {name!r}")
    description = command.get("description", "")
    if kind == 1 and not 1 <= len(description) <= 100:
        raise invalid_form(f"{prefix}description", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length.")
    options = command.get("options") or []
    if len(options) > 25:
        raise invalid_form(f"{prefix}options", "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
    seen_optional = False
    for i, option in enumerate(options):
        if option.get("type") not in (1, 2):
            if option.get("required") and seen_optional:
                raise invalid_form(f"{prefix}options.{i}.required", "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID",
                                   "Required options must be placed before non-required options")
            seen_optional = seen_optional or not option.get("required")
        if len(option.get("choices") or []) > 25:
            raise invalid_form(f"{prefix}options.{i}.choices", "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
        _validate_command({**option, "type": 1}, f"{prefix}options.{i}")
