"""Storytime sessions in the bot's SQLite file (the same one as bot/state.py and the settings).

A session is one row: its settings, players, lines, turn, deadlines, vote and pending
model turn as JSON. One row means one write per change, and a write is committed
when `save` returns (autocommit), so the bot acknowledges only what a restart would find.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from bot.state import open_db
from bot.storytime.session import Session

logger = logging.getLogger(__name__)


class SessionStore:
    def __init__(self, path: Path | str) -> None:
        self._lock = threading.Lock()
        self._db = open_db(path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS storytime_sessions (session_id TEXT PRIMARY KEY, platform TEXT NOT NULL,"
            " server_key TEXT NOT NULL, channel TEXT NOT NULL, thread TEXT NOT NULL, status TEXT NOT NULL,"
            " data TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS storytime_open ON storytime_sessions (status, server_key)")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def save(self, session: Session) -> None:
        """Write the session as it is now; committed when this returns."""
        data = json.dumps(session.to_dict(), ensure_ascii=False)
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO storytime_sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (session.session_id, session.platform, session.server_key, session.channel, session.thread,
                 session.status, data, session.created_at, session.last_activity),
            )

    def get(self, session_id: str) -> Session | None:
        with self._lock:
            row = self._db.execute("SELECT data FROM storytime_sessions WHERE session_id = ?",
                                   (session_id,)).fetchone()
        return Session.from_dict(json.loads(row[0])) if row else None

    def find_open(self, server_key: str, channel: str) -> Session | None:
        """The open session started in `channel`, or living in it (its thread)."""
        with self._lock:
            row = self._db.execute(
                "SELECT data FROM storytime_sessions WHERE status = 'open' AND server_key = ?"
                " AND (channel = ? OR thread = ?) ORDER BY created_at DESC LIMIT 1",
                (server_key, channel, channel)).fetchone()
        return Session.from_dict(json.loads(row[0])) if row else None

    def open_sessions(self, platform: str | None = None, server_key: str | None = None) -> list[Session]:
        query = "SELECT data FROM storytime_sessions WHERE status = 'open'"
        args: list[str] = []
        if platform is not None:
            query += " AND platform = ?"
            args.append(platform)
        if server_key is not None:
            query += " AND server_key = ?"
            args.append(server_key)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created_at", args).fetchall()
        return [Session.from_dict(json.loads(row[0])) for row in rows]
