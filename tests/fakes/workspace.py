"""The pretend workspace behind the fake: one team, a bot, a few people and channels.

IDs follow Slack's shapes (T…, U…, B…, C…, A…) so code that inspects prefixes keeps working.
Payload builders default to these, so a payload and the fake agree without wiring.
"""

from __future__ import annotations

import itertools
import secrets
import string
import time
from dataclasses import dataclass, field
from typing import Any

TEAM_ID = "T0TEST0001"
TEAM_DOMAIN = "storybot-test"
TEAM_NAME = "StoryBot Test"
APP_ID = "A0STORYBOT"
BOT_USER_ID = "U0BOT00001"
BOT_ID = "B0BOT00001"
ALICE = "U0ALICE001"
BOB = "U0BOB00001"
CAROL = "U0CAROL001"
STORIES = "C0STORIES1"
GENERAL = "C0GENERAL1"

BOT_TOKEN = "xoxb-1234567890-0987654321-storybottest"
APP_TOKEN = "xapp-1-A0STORYBOT-1234567890-storybottest"
BOT_SCOPES = "commands,chat:write,chat:write.public,files:write,users:read,channels:history,groups:history"

_ALPHANUM = string.ascii_uppercase + string.digits


def new_id(prefix: str, length: int = 10) -> str:
    """A Slack-shaped ID: `F0A1B2C3D4E` for prefix "F"."""
    return prefix + "".join(secrets.choice(_ALPHANUM) for _ in range(length))


def new_trigger_id() -> str:
    """A trigger_id as Slack formats it: `<digits>.<digits>.<32 hex>`."""
    return f"{secrets.randbelow(10**13)}.{secrets.randbelow(10**11)}.{secrets.token_hex(16)}"


def _user(user_id: str, name: str, real_name: str, *, is_bot: bool = False) -> dict[str, Any]:
    return {
        "id": user_id,
        "team_id": TEAM_ID,
        "name": name,
        "deleted": False,
        "real_name": real_name,
        "tz": "Europe/London",
        "tz_label": "Greenwich Mean Time",
        "tz_offset": 0,
        "profile": {"real_name": real_name, "display_name": name, "team": TEAM_ID},
        "is_admin": False,
        "is_owner": False,
        "is_bot": is_bot,
        "is_app_user": False,
        "updated": 1700000000,
    }


def _channel(channel_id: str, name: str) -> dict[str, Any]:
    return {
        "id": channel_id,
        "name": name,
        "is_channel": True,
        "is_group": False,
        "is_im": False,
        "is_mpim": False,
        "is_private": False,
        "created": 1700000000,
        "is_archived": False,
        "is_general": name == "general",
        "name_normalized": name,
        "is_shared": False,
        "is_member": True,
        "creator": ALICE,
        "topic": {"value": "", "creator": "", "last_set": 0},
        "purpose": {"value": "", "creator": "", "last_set": 0},
    }


@dataclass
class StoredFile:
    """A file between files.getUploadURLExternal and files.completeUploadExternal (and after)."""

    id: str
    filename: str
    length: int
    content: bytes | None = None  # set once the upload URL received the bytes
    title: str | None = None
    channel_id: str | None = None  # set by files.completeUploadExternal
    initial_comment: str | None = None
    thread_ts: str | None = None
    completed: bool = False


@dataclass
class Workspace:
    """Mutable state the fake's API methods read and write."""

    users: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            ALICE: _user(ALICE, "alice", "Alice Liddell"),
            BOB: _user(BOB, "bob", "Bob Dobbs"),
            CAROL: _user(CAROL, "carol", "Carol Danvers"),
            BOT_USER_ID: _user(BOT_USER_ID, "storybot", "StoryBot", is_bot=True),
        }
    )
    channels: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {STORIES: _channel(STORIES, "stories"), GENERAL: _channel(GENERAL, "general")}
    )
    # (channel, ts) -> the message as conversations.history would return it
    messages: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    files: dict[str, StoredFile] = field(default_factory=dict)
    _ts_counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _ts_base: int = field(default_factory=lambda: int(time.time()))

    def add_channel(self, channel_id: str, name: str, **overrides: Any) -> dict[str, Any]:
        self.channels[channel_id] = {**_channel(channel_id, name), **overrides}
        return self.channels[channel_id]

    def add_user(self, user_id: str, name: str, real_name: str = "", **overrides: Any) -> dict[str, Any]:
        self.users[user_id] = {**_user(user_id, name, real_name or name), **overrides}
        return self.users[user_id]

    def next_ts(self) -> str:
        """Message timestamps are unique and increasing, like Slack's `1700000000.000100`."""
        return f"{self._ts_base}.{next(self._ts_counter) * 100:06d}"
