"""Per-user settings, kept in SQLite so they survive a restart.

Precedence for every value: this request's override, then the user's saved default,
then the operator's default. The operator's caps bound all three: an override out
of range is an error; a saved default that a lowered cap now forbids is skipped (and
the user is told where the value came from).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

from storygen.config import StorygenConfig
from storygen.errors import StorygenError, UnknownSettingError
from storygen.genres import AUTO, is_auto, resolve_genre
from storygen.sampling import SamplingParams, allowed_range, parse_setting, validate

logger = logging.getLogger(__name__)

SAVED_SETTINGS = ("genre", "length", "temperature", "top_p", "top_k", "repetition_penalty")
REQUEST = "this request"
USER = "your default"
SERVER = "server default"


@dataclass(frozen=True)
class Effective:
    """The settings a story will use, and where each value came from."""

    genre: str
    params: SamplingParams
    sources: dict[str, str]  # setting name -> REQUEST, USER or SERVER (with a reason when a saved value was skipped)

    def describe(self) -> list[str]:
        lines = [f"genre = {self.genre}  ({self.sources['genre']})"]
        for name in SAVED_SETTINGS[1:]:
            lines.append(f"{name} = {getattr(self.params, name)}  ({self.sources[name]})")
        return lines


def check_value(name: str, value: object, config: StorygenConfig) -> object:
    """Check one setting against the operator's caps; returns the value in its canonical form."""
    if name == "genre":
        return AUTO if is_auto(str(value)) else resolve_genre(str(value)).name
    if name == "greedy":
        return bool(value)
    if name not in SAVED_SETTINGS and name != "seed":
        raise UnknownSettingError(name, SAVED_SETTINGS)
    validate(replace(SamplingParams(), **{name: value}), config.limits)
    return value


class SettingsStore:
    """User defaults in a SQLite file; safe to use from several threads."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS user_settings ("
            " user_key TEXT PRIMARY KEY, settings TEXT NOT NULL, updated_at REAL NOT NULL)"
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get(self, user_key: str) -> dict[str, object]:
        with self._lock:
            row = self._db.execute("SELECT settings FROM user_settings WHERE user_key = ?", (user_key,)).fetchone()
        return json.loads(row[0]) if row else {}

    def update(self, user_key: str, values: dict[str, str | object], config: StorygenConfig) -> dict[str, object]:
        """Check and save some of a user's defaults (text values are parsed); returns all their defaults."""
        checked = {}
        for name, raw in values.items():
            if name not in SAVED_SETTINGS:
                raise UnknownSettingError(name, SAVED_SETTINGS)
            value = parse_setting(name, raw) if isinstance(raw, str) and name != "genre" else raw
            checked[name] = check_value(name, value, config)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT settings FROM user_settings WHERE user_key = ?", (user_key,)).fetchone()
                merged = (json.loads(row[0]) if row else {}) | checked
                self._db.execute(
                    "INSERT INTO user_settings (user_key, settings, updated_at) VALUES (?, ?, ?)"
                    " ON CONFLICT(user_key) DO UPDATE SET settings = excluded.settings, updated_at = excluded.updated_at",
                    (user_key, json.dumps(merged), time.time()),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        logger.info("settings saved for %s: %s", user_key, sorted(checked))
        return merged

    def reset(self, user_key: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM user_settings WHERE user_key = ?", (user_key,))

    def effective(self, user_key: str, overrides: dict[str, object], config: StorygenConfig) -> Effective:
        """Resolve request > user > server for each setting; overrides out of range raise."""
        saved = self.get(user_key)
        server = {"genre": config.default_genre} | {f.name: getattr(config.defaults, f.name)
                                                    for f in fields(SamplingParams)}
        values: dict[str, object] = {}
        sources: dict[str, str] = {}
        for name in (*SAVED_SETTINGS, "greedy", "seed"):
            if overrides.get(name) is not None:
                values[name], sources[name] = check_value(name, overrides[name], config), REQUEST
                continue
            values[name], sources[name] = server[name], SERVER
            if name in saved:
                try:
                    values[name], sources[name] = check_value(name, saved[name], config), USER
                except StorygenError:
                    allowed = "the known genres" if name == "genre" else allowed_range(name, config.limits)
                    sources[name] = f"{SERVER}; your saved {saved[name]!r} is outside {allowed}"
        genre = str(values.pop("genre"))
        return Effective(genre, SamplingParams(**values), sources)
