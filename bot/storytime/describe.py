"""What `/storytime status` and `/storytime list` say, and other lines about a session."""

from __future__ import annotations

import logging

from bot import messages
from bot.storytime.limits import StorytimeLimits
from bot.storytime.rules import describe_seconds
from bot.storytime.session import MODEL, Line, Session

logger = logging.getLogger(__name__)


def status(session: Session, limits: StorytimeLimits, now: float) -> str:
    """The story so far (its end, with a note, when long), the players, whose turn it is, the turns left."""
    text = "\n".join(line.text for line in session.lines)
    if len(text) > limits.status_chars:
        text = messages.ST_STATUS_CUT + "\n…" + text[-limits.status_chars:].split(" ", 1)[-1]
    head = messages.ST_STATUS.format(title=session.title, genre=session.genre, mode=session.mode,
                                     lines=len(session.lines), left=session.turns_left, whose=_whose(session, now),
                                     players=", ".join(map(session.name_of, session.players)) or "none")
    return head.rstrip() + ("\n\n" + text if text else "")


def _whose(session: Session, now: float) -> str:
    if session.vote is not None:
        return messages.ST_STATUS_VOTE
    if session.model is not None:
        return messages.ST_STATUS_MODEL
    if session.mode == "free":
        return messages.ST_STATUS_FREE
    if session.turn is not None:
        left = max(0, round((session.deadline or 0) - now))
        return messages.ST_STATUS_TURN.format(name=session.name_of(session.turn), seconds=left)
    return ""


def listing(sessions: list[Session]) -> str:
    """An admin's view of a server's open sessions, with the ids `/storytime end <id>` takes."""
    if not sessions:
        return messages.ST_LIST_EMPTY
    return "\n".join([messages.ST_LIST_HEAD, *(messages.ST_LIST_LINE.format(
        session_id=s.session_id, title=s.title, channel=s.channel, players=len(s.players), lines=len(s.lines),
        starter=s.name_of(s.starter)) for s in sessions)])


def turn_notice(session: Session) -> list[str]:
    """Who goes now, for the thread."""
    if session.mode == "free":
        return [messages.ST_NEXT_FREE]
    if session.turn is None:
        return []
    return [messages.ST_NEXT.format(name=session.name_of(session.turn),
                                    timeout=describe_seconds(session.turn_timeout_s))]


def undone(session: Session, line: Line, limit: int = 60) -> str:
    author = messages.STORYTIME_BOT_NAME if line.author == MODEL else session.name_of(line.author)
    text = line.text if len(line.text) <= limit else line.text[:limit].rsplit(" ", 1)[0] + "…"
    return messages.ST_UNDONE.format(author=author, text=text)
