"""Discord API objects as the real API serialises them (v10 JSON).

Every builder returns a plain dict shaped like Discord's own payloads, with ids as
strings, so discord.py parses them exactly as it parses the real thing. Nothing here
imports discord.py: the fake must not borrow the client's idea of the protocol.
"""

from __future__ import annotations

import datetime
import itertools
import time
from typing import Any

DISCORD_EPOCH_MS = 1_420_070_400_000

# Permission bits (https://discord.com/developers/docs/topics/permissions).
ADD_REACTIONS = 1 << 6
VIEW_CHANNEL = 1 << 10
SEND_MESSAGES = 1 << 11
EMBED_LINKS = 1 << 14
ATTACH_FILES = 1 << 15
READ_MESSAGE_HISTORY = 1 << 16
USE_EXTERNAL_EMOJIS = 1 << 18
USE_APPLICATION_COMMANDS = 1 << 31
CREATE_PUBLIC_THREADS = 1 << 35
SEND_MESSAGES_IN_THREADS = 1 << 38
ADMINISTRATOR = 1 << 3

# What an ordinary member (and the bot) can do in an ordinary text channel.
MEMBER_PERMISSIONS = str(
    ADD_REACTIONS
    | VIEW_CHANNEL
    | SEND_MESSAGES
    | EMBED_LINKS
    | ATTACH_FILES
    | READ_MESSAGE_HISTORY
    | USE_EXTERNAL_EMOJIS
    | USE_APPLICATION_COMMANDS
    | CREATE_PUBLIC_THREADS
    | SEND_MESSAGES_IN_THREADS
)

# Message flags.
EPHEMERAL = 1 << 6
LOADING = 1 << 7

# Channel types.
GUILD_TEXT = 0
DM = 1

_counter = itertools.count()


def snowflake(*, shard: tuple[int, int] | None = None) -> str:
    """A fresh, unique snowflake stamped with the current time, so `created_at` is now.

    shard=(id, count): a guild id that shard owns, `(guild_id >> 22) % count == id`; it is
    stamped up to count - 1 ms in the future for that.
    """
    ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
    if shard is not None:
        shard_id, count = shard
        ms += (shard_id - ms) % count
    return str((ms << 22) | (1 << 17) | (next(_counter) % 4096))


def shard_of(guild_id: str | int, shard_count: int) -> int:
    """The shard that receives a guild's events, by Discord's rule."""
    return (int(guild_id) >> 22) % shard_count


def timestamp(when: datetime.datetime | None = None) -> str:
    """ISO 8601 with microseconds and offset, as Discord writes timestamps."""
    when = when or datetime.datetime.now(datetime.timezone.utc)
    return when.isoformat(timespec="microseconds")


def user(user_id: str, username: str, *, bot: bool = False) -> dict[str, Any]:
    return {
        "id": user_id,
        "username": username,
        # Users moved to unique usernames (discriminator "0"); bots kept four digits.
        "discriminator": "4242" if bot else "0",
        "global_name": None if bot else username.title(),
        "avatar": None,
        "banner": None,
        "accent_color": None,
        "avatar_decoration_data": None,
        "public_flags": 0,
        "flags": 0,
        "bot": bot,
        "system": False,
    }


def role(role_id: str, name: str, *, permissions: str = MEMBER_PERMISSIONS, position: int = 0) -> dict[str, Any]:
    return {
        "id": role_id,
        "name": name,
        "color": 0,
        "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
        "hoist": False,
        "icon": None,
        "unicode_emoji": None,
        "position": position,
        "permissions": permissions,
        "managed": False,
        "mentionable": False,
        "flags": 0,
    }


def member(user_obj: dict[str, Any], *, roles: list[str] | None = None) -> dict[str, Any]:
    return {
        "user": user_obj,
        "nick": None,
        "avatar": None,
        "banner": None,
        "roles": roles or [],
        "joined_at": timestamp(),
        "premium_since": None,
        "deaf": False,
        "mute": False,
        "flags": 0,
        "pending": False,
        "communication_disabled_until": None,
    }


def text_channel(channel_id: str, guild_id: str, name: str, *, position: int = 0) -> dict[str, Any]:
    return {
        "id": channel_id,
        "type": GUILD_TEXT,
        "guild_id": guild_id,
        "name": name,
        "position": position,
        "permission_overwrites": [],
        "parent_id": None,
        "topic": None,
        "nsfw": False,
        "last_message_id": None,
        "rate_limit_per_user": 0,
        "flags": 0,
    }


def dm_channel(channel_id: str, recipient: dict[str, Any]) -> dict[str, Any]:
    return {"id": channel_id, "type": DM, "last_message_id": None, "flags": 0, "recipients": [recipient]}


def guild(
    guild_id: str,
    name: str,
    *,
    owner_id: str,
    channels: list[dict[str, Any]],
    members: list[dict[str, Any]],
) -> dict[str, Any]:
    """A full GUILD_CREATE guild: the gateway sends channels and members, REST does not."""
    everyone = role(guild_id, "@everyone")  # @everyone's id is the guild's id
    return {
        "id": guild_id,
        "name": name,
        "icon": None,
        "splash": None,
        "discovery_splash": None,
        "banner": None,
        "description": None,
        "owner_id": owner_id,
        "afk_channel_id": None,
        "afk_timeout": 300,
        "verification_level": 0,
        "default_message_notifications": 0,
        "explicit_content_filter": 0,
        "mfa_level": 0,
        "nsfw_level": 0,
        "premium_tier": 0,
        "premium_subscription_count": 0,
        "premium_progress_bar_enabled": False,
        "preferred_locale": "en-US",
        "features": [],
        "roles": [everyone],
        "emojis": [],
        "stickers": [],
        "system_channel_id": channels[0]["id"] if channels else None,
        "system_channel_flags": 0,
        "rules_channel_id": None,
        "public_updates_channel_id": None,
        "safety_alerts_channel_id": None,
        "vanity_url_code": None,
        "max_members": 500000,
        "max_video_channel_users": 25,
        "application_id": None,
        "incidents_data": None,
        "nsfw": False,
        "lazy": True,
        "large": False,
        "unavailable": False,
        "joined_at": timestamp(),
        "member_count": len(members),
        "members": members,
        "channels": channels,
        "threads": [],
        "presences": [],
        "voice_states": [],
        "stage_instances": [],
        "guild_scheduled_events": [],
        "soundboard_sounds": [],
    }


def application(app_id: str, name: str, owner: dict[str, Any], *, flags: int) -> dict[str, Any]:
    """GET /oauth2/applications/@me."""
    return {
        "id": app_id,
        "name": name,
        "description": "",
        "icon": None,
        "bot_public": True,
        "bot_require_code_grant": False,
        "owner": owner,
        "team": None,
        "verify_key": "0" * 64,
        "flags": flags,
        "tags": [],
        "redirect_uris": [],
        "interactions_endpoint_url": None,  # set => discord.py warns that the gateway won't deliver interactions
        "approximate_guild_count": 1,
        "integration_types_config": {"0": {}},
    }


def message(
    message_id: str,
    channel_id: str,
    author: dict[str, Any],
    *,
    content: str = "",
    embeds: list[dict[str, Any]] | None = None,
    components: list[dict[str, Any]] | None = None,
    attachments: list[dict[str, Any]] | None = None,
    flags: int = 0,
    message_type: int = 0,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": message_id,
        "channel_id": channel_id,
        "author": author,
        "content": content,
        "timestamp": timestamp(),
        "edited_timestamp": None,
        "tts": False,
        "mention_everyone": False,
        "mentions": [],
        "mention_roles": [],
        "attachments": attachments or [],
        "embeds": embeds or [],
        "components": components or [],
        "pinned": False,
        "type": message_type,
        "flags": flags,
        **(extra or {}),
    }


def attachment(
    attachment_id: str, filename: str, data: bytes, *, url: str, content_type: str | None, description: str | None
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": attachment_id,
        "filename": filename,
        "size": len(data),
        "url": url,
        "proxy_url": url,
        "content_type": content_type,
    }
    if description is not None:
        obj["description"] = description
    return obj
