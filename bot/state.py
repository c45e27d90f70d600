"""What the bot keeps across restarts, in the same SQLite file as user settings.

- stories: each finished story with the command that made it, so Continue and
  Regenerate buttons still work after a restart;
- server settings: per Discord guild or Slack workspace, set by its admins;
- messages in flight: where a story is being written (a Slack channel and message ts; a
  Discord channel and message id, with the interaction's token while it lasts, 15 minutes,
  since only that token may edit the interaction's own message), so that after a crash
  the next start can mark it interrupted instead of leaving "writing…" there for good.
  A row goes when its story ends.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

MAX_STORED_PER_CHANNEL = 50  # older stories in a channel are pruned


@dataclass(frozen=True)
class StoredStory:
    request_id: str
    user_key: str
    channel_key: str
    genre: str
    prompt: str  # the opening the user typed (for Regenerate)
    overrides: dict[str, object]
    text: str  # the whole story so far (grows with Continue)
    base_text: str = ""  # for a continuation: the story before it (Regenerate continues from here again)


@dataclass(frozen=True)
class ServerSettings:
    """An admin's limits for one server; None means the operator's value applies."""

    allowed_channels: tuple[str, ...] = ()  # empty: every channel
    max_length: int | None = None
    max_temperature: float | None = None
    cooldown_s: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class InFlight:
    request_id: str
    channel: str
    messages: tuple[str, ...]  # the platform's ids of the messages showing it (Slack: their ts)
    user_key: str
    text: str  # what they showed last
    details: dict[str, object] = field(default_factory=dict)  # what else the platform needs to edit them


def open_db(path: Path | str) -> sqlite3.Connection:
    """The bot's SQLite file, as every store in it opens it: autocommit, WAL, shared across threads."""
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    # Durable across a crash of the process (not a power cut) without an fsync per write:
    # streaming stories update their in-flight row about once a second each, on the event loop.
    db.execute("PRAGMA synchronous=NORMAL")
    return db


class BotState:
    def __init__(self, path: Path | str) -> None:
        self._lock = threading.Lock()
        self._db = open_db(path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS stories (request_id TEXT PRIMARY KEY, user_key TEXT NOT NULL,"
            " channel_key TEXT NOT NULL, genre TEXT NOT NULL, prompt TEXT NOT NULL, overrides TEXT NOT NULL,"
            " text TEXT NOT NULL, created_at REAL NOT NULL, base_text TEXT NOT NULL DEFAULT '')"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS stories_by_channel ON stories (channel_key, user_key, created_at)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS server_settings (server_key TEXT PRIMARY KEY, settings TEXT NOT NULL)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS in_flight (request_id TEXT PRIMARY KEY, platform TEXT NOT NULL,"
            " channel TEXT NOT NULL, messages TEXT NOT NULL, user_key TEXT NOT NULL, text TEXT NOT NULL,"
            " updated_at REAL NOT NULL)"
        )
        if "details" not in {row[1] for row in self._db.execute("PRAGMA table_info(in_flight)")}:  # before 2026-12-07
            self._db.execute("ALTER TABLE in_flight ADD COLUMN details TEXT NOT NULL DEFAULT '{}'")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def save_story(self, story: StoredStory) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO stories VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (story.request_id, story.user_key, story.channel_key, story.genre, story.prompt,
                 json.dumps(story.overrides), story.text, time.time(), story.base_text),
            )
            self._db.execute(
                "DELETE FROM stories WHERE channel_key = ? AND request_id NOT IN (SELECT request_id FROM stories"
                " WHERE channel_key = ? ORDER BY created_at DESC LIMIT ?)",
                (story.channel_key, story.channel_key, MAX_STORED_PER_CHANNEL),
            )

    def story(self, request_id: str) -> StoredStory | None:
        with self._lock:
            row = self._db.execute(
                "SELECT request_id, user_key, channel_key, genre, prompt, overrides, text, base_text FROM stories"
                " WHERE request_id = ?", (request_id,)).fetchone()
        return _to_story(row)

    def last_story(self, user_key: str, channel_key: str) -> StoredStory | None:
        with self._lock:
            row = self._db.execute(
                "SELECT request_id, user_key, channel_key, genre, prompt, overrides, text, base_text FROM stories"
                " WHERE user_key = ? AND channel_key = ? ORDER BY created_at DESC LIMIT 1",
                (user_key, channel_key)).fetchone()
        return _to_story(row)

    def server(self, server_key: str) -> ServerSettings:
        with self._lock:
            row = self._db.execute("SELECT settings FROM server_settings WHERE server_key = ?",
                                   (server_key,)).fetchone()
        if not row:
            return ServerSettings()
        data = json.loads(row[0])
        data["allowed_channels"] = tuple(data.get("allowed_channels", ()))
        return ServerSettings(**data)

    def save_server(self, server_key: str, settings: ServerSettings) -> None:
        data = settings.__dict__ | {"allowed_channels": list(settings.allowed_channels)}
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO server_settings VALUES (?, ?)", (server_key, json.dumps(data)))


    # --- messages in flight ---------------------------------------------------------------------

    def track(self, request_id: str, platform: str, channel: str, messages: list[str], user_key: str,
              text: str, details: dict[str, object] | None = None) -> None:
        """A story is on screen in `messages` of `channel`, showing `text`, and still being written."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO in_flight (request_id, platform, channel, messages, user_key,"
                             " text, updated_at, details) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (request_id, platform, channel, json.dumps(messages), user_key, text, time.time(),
                              json.dumps(details or {})))

    def untrack(self, request_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM in_flight WHERE request_id = ?", (request_id,))

    def in_flight(self, platform: str) -> list[InFlight]:
        """Messages a previous run left mid-story (it stopped without saying how they ended)."""
        with self._lock:
            rows = self._db.execute("SELECT request_id, channel, messages, user_key, text, details FROM in_flight"
                                    " WHERE platform = ? ORDER BY updated_at", (platform,)).fetchall()
        return [InFlight(rid, channel, tuple(json.loads(ids)), user, text, json.loads(details))
                for rid, channel, ids, user, text, details in rows]


def _to_story(row: tuple | None) -> StoredStory | None:
    if row is None:
        return None
    request_id, user_key, channel_key, genre, prompt, overrides, text, base_text = row
    return StoredStory(request_id, user_key, channel_key, genre, prompt, json.loads(overrides), text, base_text)
