"""What the fake Discord remembers: guilds, channels, messages, attachments, commands, interactions.

Messages are created and edited here with Discord's rules, so that every route that
makes a message (channel send, interaction response, follow-up) behaves the same:
limits on content and embeds, "Cannot send an empty message", attachments that
reference `files[n]` by index on create and keep-lists of ids on edit.
"""

from __future__ import annotations

import mimetypes
from dataclasses import dataclass, field
from typing import Any

from . import discord_objects as obj
from .discord_records import RecordedFile
from .discord_rest import DiscordError, invalid_form

# Flags a sender may set on a message; the rest are Discord's to set.
_SETTABLE_FLAGS = 1 << 2 | obj.EPHEMERAL | 1 << 12 | 1 << 15  # suppress embeds, ephemeral, silent, components v2


@dataclass
class InteractionRecord:
    """An interaction the fake dispatched, and everything the bot did with its token."""

    payload: dict[str, Any]
    created_at: float  # monotonic seconds; the initial response is due within the callback deadline
    callback: dict[str, Any] | None = None  # the JSON the bot sent to /callback
    original_id: str | None = None  # message id behind @original
    followup_ids: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.payload["id"]

    @property
    def token(self) -> str:
        return self.payload["token"]

    @property
    def type(self) -> int:
        return self.payload["type"]


@dataclass
class DiscordState:
    base_url: str
    application_id: str
    bot_user: dict[str, Any]
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    guilds: dict[str, dict[str, Any]] = field(default_factory=dict)
    channels: dict[str, dict[str, Any]] = field(default_factory=dict)
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)
    attachment_data: dict[str, bytes] = field(default_factory=dict)  # CDN path -> bytes
    global_commands: list[dict[str, Any]] = field(default_factory=list)
    guild_commands: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    interactions: dict[str, InteractionRecord] = field(default_factory=dict)

    # -- lookups -------------------------------------------------------------------

    def channel(self, channel_id: str) -> dict[str, Any]:
        try:
            return self.channels[channel_id]
        except KeyError:
            raise DiscordError(404, 10003, "Unknown Channel") from None

    def message(self, message_id: str, channel_id: str | None = None) -> dict[str, Any]:
        found = self.messages.get(message_id)
        if found is None or (channel_id is not None and found["channel_id"] != channel_id):
            raise DiscordError(404, 10008, "Unknown Message")
        return found

    def interaction_by_token(self, application_id: str, token: str) -> InteractionRecord:
        """The webhook behind an interaction token exists only once the interaction was answered."""
        for record in self.interactions.values():
            if record.token == token and application_id == self.application_id and record.callback is not None:
                return record
        raise DiscordError(404, 10015, "Unknown Webhook")

    def channel_messages(self, channel_id: str) -> list[dict[str, Any]]:
        return [m for m in self.messages.values() if m["channel_id"] == channel_id]

    def find_command(self, name: str, guild_id: str | None) -> dict[str, Any] | None:
        """A synced command by name: the guild's own first, then global, as Discord resolves them."""
        for command in [*self.guild_commands.get(guild_id or "", []), *self.global_commands]:
            if command["name"] == name and command.get("type", 1) == 1:
                return command
        return None

    # -- messages ------------------------------------------------------------------

    def create_message(
        self,
        channel_id: str,
        body: dict[str, Any] | None,
        files: tuple[RecordedFile, ...],
        *,
        error_path: str = "",
        message_type: int = 0,
        extra: dict[str, Any] | None = None,
        flags: int = 0,
    ) -> dict[str, Any]:
        body = body or {}
        _validate_content(body, error_path)
        attachments = self._attachments(channel_id, body, files, existing=[], error_path=error_path)
        if not (body.get("content") or body.get("embeds") or attachments or body.get("components")
                or body.get("sticker_ids") or body.get("poll")):
            raise DiscordError(400, 50006, "Cannot send an empty message")
        message = obj.message(
            obj.snowflake(),
            channel_id,
            self.bot_user,
            content=body.get("content") or "",
            embeds=body.get("embeds"),
            components=body.get("components"),
            attachments=attachments,
            flags=flags | (body.get("flags", 0) & _SETTABLE_FLAGS),
            message_type=message_type,
            extra=extra,
        )
        self.messages[message["id"]] = message
        return message

    def create_loading_message(
        self, channel_id: str, *, ephemeral: bool, message_type: int, extra: dict[str, Any]
    ) -> dict[str, Any]:
        """The "<bot> is thinking..." placeholder a deferred response shows."""
        flags = obj.LOADING | (obj.EPHEMERAL if ephemeral else 0)
        message = obj.message(
            obj.snowflake(), channel_id, self.bot_user, flags=flags, message_type=message_type, extra=extra
        )
        self.messages[message["id"]] = message
        return message

    def edit_message(
        self,
        message: dict[str, Any],
        body: dict[str, Any] | None,
        files: tuple[RecordedFile, ...],
        *,
        error_path: str = "",
    ) -> dict[str, Any]:
        body = body or {}
        _validate_content(body, error_path)
        for key in ("content", "embeds", "components", "allowed_mentions", "poll"):
            if key in body:
                message[key] = body[key] if body[key] is not None else ([] if key != "content" else "")
        if "attachments" in body or files:
            message["attachments"] = self._attachments(
                message["channel_id"], body, files, existing=message["attachments"], error_path=error_path
            )
        if "flags" in body and body["flags"] is not None:
            # Only suppress-embeds can change after sending; ephemeral stays as it was.
            message["flags"] = (message["flags"] & ~(1 << 2)) | (body["flags"] & (1 << 2))
        message["flags"] &= ~obj.LOADING  # any edit ends the "thinking..." state
        if not (message["content"] or message["embeds"] or message["attachments"] or message["components"]):
            raise DiscordError(400, 50006, "Cannot send an empty message")
        message["edited_timestamp"] = obj.timestamp()
        return message

    def _attachments(
        self,
        channel_id: str,
        body: dict[str, Any],
        files: tuple[RecordedFile, ...],
        *,
        existing: list[dict[str, Any]],
        error_path: str,
    ) -> list[dict[str, Any]]:
        """New files are referenced by `files[n]` index; existing attachments are kept by id."""
        by_index = {_file_index(f.field): f for f in files}
        if "attachments" not in body:
            return [*existing, *(self._store(channel_id, f, None) for f in files)]
        kept_ids = {a["id"]: a for a in existing}
        result = []
        for position, entry in enumerate(body["attachments"] or []):
            ref = str(entry.get("id"))
            if ref in kept_ids:
                result.append(kept_ids[ref])
            elif ref.isdigit() and int(ref) in by_index:
                upload = by_index[int(ref)]
                if entry.get("filename"):
                    upload = RecordedFile(upload.field, entry["filename"], upload.content_type, upload.data)
                result.append(self._store(channel_id, upload, entry.get("description")))
            else:
                raise invalid_form(
                    f"{error_path}attachments.{position}.id", "ATTACHMENT_NOT_FOUND", f"Unknown attachment {ref}"
                )
        return result

    def _store(self, channel_id: str, upload: RecordedFile, description: str | None) -> dict[str, Any]:
        attachment_id = obj.snowflake()
        path = f"/attachments/{channel_id}/{attachment_id}/{upload.filename}"
        self.attachment_data[path] = upload.data
        content_type = mimetypes.guess_type(upload.filename)[0] or "application/octet-stream"
        if content_type.startswith("text/"):
            content_type += "; charset=utf-8"
        return obj.attachment(
            attachment_id, upload.filename, upload.data,
            url=self.base_url + path, content_type=content_type, description=description,
        )


def _file_index(field_name: str) -> int:
    """`files[3]` -> 3; discord.py names parts that way (Discord also accepts `file`, ...)."""
    digits = "".join(ch for ch in field_name if ch.isdigit())
    return int(digits) if digits else 0


def _validate_content(body: dict[str, Any], error_path: str) -> None:
    """The limits a story bot is most likely to hit."""
    content = body.get("content")
    if content is not None and len(content) > 2000:
        raise invalid_form(f"{error_path}content", "BASE_TYPE_MAX_LENGTH", "Must be 2000 or fewer in length.")
    embeds = body.get("embeds") or []
    if len(embeds) > 10:
        raise invalid_form(f"{error_path}embeds", "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")
    total = 0
    for i, embed in enumerate(embeds):
        for key, limit in (("title", 256), ("description", 4096)):
            text = embed.get(key) or ""
            total += len(text)
            if len(text) > limit:
                raise invalid_form(
                    f"{error_path}embeds.{i}.{key}", "BASE_TYPE_MAX_LENGTH", f"Must be {limit} or fewer in length."
                )
        fields = embed.get("fields") or []
        if len(fields) > 25:
            raise invalid_form(
                f"{error_path}embeds.{i}.fields", "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length."
            )
        total += sum(len(f.get("name", "")) + len(f.get("value", "")) for f in fields)
        total += len((embed.get("footer") or {}).get("text", "")) + len((embed.get("author") or {}).get("name", ""))
    if total > 6000:
        raise invalid_form(f"{error_path}embeds", "MAX_EMBED_SIZE_EXCEEDED", "Embed size exceeds maximum size of 6000")
    rows = body.get("components") or []
    if len(rows) > 5 and not (body.get("flags", 0) & (1 << 15)):
        raise invalid_form(f"{error_path}components", "BASE_TYPE_MAX_LENGTH", "Must be 5 or fewer in length.")
    for i, row in enumerate(rows):
        for j, component in enumerate(row.get("components") or []):
            if len(component.get("custom_id") or "") > 100:
                raise invalid_form(
                    f"{error_path}components.{i}.components.{j}.custom_id",
                    "BASE_TYPE_MAX_LENGTH",
                    "Must be 100 or fewer in length.",
                )
