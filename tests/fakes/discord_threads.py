"""Threads in the fake Discord: `POST /channels/{channel_id}/threads` starts one without a
message, as `TextChannel.create_thread()` does, and THREAD_CREATE goes out on the gateway.

A thread is a channel of its own (type 11, public): messages are posted to its id, and an
interaction typed in it carries the thread as its channel.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from . import discord_objects as obj
from .discord_rest import DiscordError, Incoming, RestRouter
from .discord_state import DiscordState

PUBLIC_THREAD, PRIVATE_THREAD = 11, 12
GUILDS = 1 << 0  # the intent THREAD_CREATE is sent under


def thread_channel(thread_id: str, parent: dict[str, Any], name: str, owner_id: str, *, kind: int = PUBLIC_THREAD,
                   auto_archive_duration: int = 1440) -> dict[str, Any]:
    return {
        "id": thread_id,
        "type": kind,
        "guild_id": parent["guild_id"],
        "parent_id": parent["id"],
        "owner_id": owner_id,
        "name": name,
        "last_message_id": None,
        "rate_limit_per_user": 0,
        "message_count": 0,
        "member_count": 1,
        "total_message_sent": 0,
        "flags": 0,
        "thread_metadata": {"archived": False, "auto_archive_duration": auto_archive_duration,
                            "archive_timestamp": obj.timestamp(), "locked": False, "create_timestamp": obj.timestamp()},
        "member": {"id": thread_id, "user_id": owner_id, "join_timestamp": obj.timestamp(), "flags": 0},
    }


def register_threads(router: RestRouter, state: DiscordState,
                     dispatch: Callable[[str, Any, int], Awaitable[Any]]) -> None:
    async def start_thread(req: Incoming) -> Any:
        parent = state.channel(req.params["channel_id"])
        body = req.json or {}
        if parent.get("type") != obj.GUILD_TEXT:
            raise DiscordError(400, 50024, "Cannot execute action on this channel type")
        name = str(body.get("name") or "")
        if not 1 <= len(name) <= 100:
            raise DiscordError(400, 50035, "Invalid Form Body: name must be 1 to 100 characters")
        thread = thread_channel(obj.snowflake(), parent, name, state.bot_user["id"],
                                kind=int(body.get("type") or PRIVATE_THREAD),
                                auto_archive_duration=int(body.get("auto_archive_duration") or 1440))
        state.channels[thread["id"]] = thread
        await dispatch("THREAD_CREATE", {**thread, "newly_created": True}, GUILDS)
        return thread

    router.add("POST", "/channels/{channel_id}/threads", start_thread)
