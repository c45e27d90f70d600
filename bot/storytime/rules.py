"""The rules of a session, as plain functions on a Session: starting, joining, leaving,
adding lines, whose turn it is, timeouts and skips, undo, and when a session ends.

Every function takes `now` (wall-clock seconds) rather than reading a clock, so tests
step time by hand. Refusals raise StorytimeError with one line from bot/messages.py;
what the thread should be told comes back as a list of lines.
"""

from __future__ import annotations

import logging

from bot import messages
from bot.storytime.limits import MODEL_EVERY_RANGE, MODES, TURN_TIMEOUT_RANGE, StorytimeLimits
from bot.storytime.session import MODEL, Actor, Line, ModelTurn, Place, Session, StartOptions, StorytimeError
from storygen.genres import resolve_genre
from storygen.prompts import to_opening

logger = logging.getLogger(__name__)

TITLE_CHARS = 80


def new_session(session_id: str, place: Place, thread: str, actor: Actor, options: StartOptions,
                limits: StorytimeLimits, now: float) -> Session:
    """A session as the starter asked for it; the opening, if any, is its first line. Raises on a bad option."""
    genre = resolve_genre(options.genre).name
    check_options(options, limits)
    title = to_opening(options.title, TITLE_CHARS)[0] or f"A {genre.replace('_', ' ')} story"
    session = Session(session_id, place.platform, place.workspace, place.channel, thread, actor.user, genre, title,
                      options.mode, options.turns or limits.max_turns,
                      options.turn_timeout_s or limits.turn_timeout_s, options.model_every, now, now,
                      players=[actor.user], names={actor.user: actor.name or actor.user})
    if options.opening.strip():
        add_line(session, actor, clean_line(options.opening, limits), now)
    else:
        _give_turn(session, actor.user, now)
    return session


def check_options(options: StartOptions, limits: StorytimeLimits) -> None:
    if options.mode not in MODES:
        raise StorytimeError(messages.ST_BAD_MODE.format(value=options.mode, modes=", ".join(MODES)))
    if options.turns is not None and not 1 <= options.turns <= limits.max_turns:
        raise StorytimeError(messages.ST_TURNS_RANGE.format(value=options.turns, limit=limits.max_turns))
    low, high = TURN_TIMEOUT_RANGE
    if options.turn_timeout_s is not None and not low <= options.turn_timeout_s <= high:
        raise StorytimeError(messages.ST_TIMEOUT_RANGE.format(value=options.turn_timeout_s, low=low, high=high))
    low, high = MODEL_EVERY_RANGE
    if not low <= options.model_every <= high:
        raise StorytimeError(messages.ST_EVERY_RANGE.format(value=options.model_every, low=low, high=high))


def clean_line(text: str, limits: StorytimeLimits) -> str:
    """A line as it goes into the story: control and invisible characters gone; too long is refused."""
    cleaned = to_opening(text, 100_000)[0]
    if not cleaned:
        raise StorytimeError(messages.ST_EMPTY_LINE)
    if len(cleaned) > limits.max_line_chars:
        raise StorytimeError(messages.ST_LINE_TOO_LONG.format(chars=len(cleaned), limit=limits.max_line_chars))
    return cleaned


# --- players --------------------------------------------------------------------------------------

def join(session: Session, actor: Actor, limits: StorytimeLimits, now: float) -> list[str]:
    if actor.user in session.players:
        raise StorytimeError(messages.ST_ALREADY_JOINED)
    if len(session.players) >= limits.max_players:
        raise StorytimeError(messages.ST_TOO_MANY_PLAYERS.format(limit=limits.max_players))
    session.players.append(actor.user)
    session.names[actor.user] = actor.name or session.names.get(actor.user) or actor.user
    session.skips.pop(actor.user, None)
    session.last_activity = now
    told = [messages.ST_JOINED.format(name=session.name_of(actor.user), position=len(session.players))]
    if session.mode != "free" and session.turn is None and not session.busy:
        told += _give_turn(session, actor.user, now)  # everyone had left: the newcomer goes on
    return told


def leave(session: Session, actor: Actor, now: float) -> list[str]:
    if actor.user not in session.players:
        raise StorytimeError(messages.ST_NOT_A_PLAYER)
    session.last_activity = now
    return [messages.ST_LEFT.format(name=session.name_of(actor.user)), *_remove(session, actor.user, now)]


def _remove(session: Session, user: str, now: float) -> list[str]:
    """Take `user` out of the order; if it was their turn, it passes to the next player."""
    nxt = next_player(session, user)
    session.players.remove(user)
    session.skips.pop(user, None)
    if session.vote is not None:
        session.vote.ballots.pop(user, None)
    if session.turn == user:
        session.turn, session.deadline = None, None
        if session.players:
            return _give_turn(session, nxt if nxt != user else session.players[0], now)
    return []


def next_player(session: Session, after: str | None) -> str | None:
    """Who goes after `after` in join order (wrapping); the first player if `after` is not playing."""
    if not session.players:
        return None
    if after not in session.players:
        return session.players[0]
    return session.players[(session.players.index(after) + 1) % len(session.players)]


def _give_turn(session: Session, user: str | None, now: float) -> list[str]:
    if session.mode == "free":
        session.turn, session.deadline = None, None
        return [messages.ST_NEXT_FREE]
    session.turn = user
    session.deadline = now + session.turn_timeout_s if user else None
    if user is None:
        return []
    return [messages.ST_NEXT.format(name=session.name_of(user), timeout=describe_seconds(session.turn_timeout_s))]


# --- lines ----------------------------------------------------------------------------------------

def check_can_add(session: Session, actor: Actor) -> None:
    if session.model is not None:
        raise StorytimeError(messages.ST_MODEL_WRITING)
    if session.vote is not None:
        raise StorytimeError(messages.ST_VOTING)
    if session.mode == "free":
        return
    if actor.user not in session.players:
        raise StorytimeError(messages.ST_NOT_A_PLAYER)
    if session.turn != actor.user:
        raise StorytimeError(messages.ST_NOT_YOUR_TURN.format(name=session.name_of(session.turn or "")))


def add_line(session: Session, actor: Actor, text: str, now: float) -> list[str]:
    """A human line, already cleaned and checked. Then either the model's turn starts
    (session.model is set; the caller runs it) or the next player's does."""
    if session.mode == "free" and actor.user not in session.players:
        session.players.append(actor.user)  # in free mode writing a line is joining
    session.names.setdefault(actor.user, actor.name or actor.user)
    session.lines.append(Line(actor.user, text))
    session.skips.pop(actor.user, None)
    session.last_activity = now
    session.since_model += 1
    session.turn, session.deadline = None, None
    if session.turns_left == 0:
        return []  # the caller ends the session
    if session.since_model >= session.model_every:
        session.model = ModelTurn("vote" if session.mode == "vote" else "line")
        return []
    return _give_turn(session, next_player(session, actor.user), now)


def add_model_line(session: Session, text: str, now: float) -> list[str]:
    """The model's line is in: it is credited to the model, and the turn passes on."""
    session.lines.append(Line(MODEL, text))
    return finish_model_turn(session, now)


def finish_model_turn(session: Session, now: float) -> list[str]:
    """The model turn is over (with a line or without): the player after the last human author goes."""
    session.model, session.vote = None, None
    session.since_model = 0
    session.last_activity = now
    last_human = next((line.author for line in reversed(session.lines) if line.author != MODEL), None)
    return _give_turn(session, next_player(session, last_human), now)


def undo(session: Session, actor: Actor, now: float) -> tuple[Line, list[str]]:
    """Remove the last line (the model's or a person's). A person's line gives them their turn back."""
    if actor.user != session.starter and not actor.is_admin:
        raise StorytimeError(messages.ST_UNDO_ONLY)
    if session.busy:
        raise StorytimeError(messages.ST_UNDO_BUSY)
    if not session.lines:
        raise StorytimeError(messages.ST_UNDO_NOTHING)
    line = session.lines.pop()
    session.last_activity = now
    if line.author == MODEL:
        return line, []
    session.since_model = max(0, session.since_model - 1)
    if session.mode == "free" or line.author not in session.players:
        return line, []
    return line, _give_turn(session, line.author, now)


# --- time -----------------------------------------------------------------------------------------

def expire_turn(session: Session, limits: StorytimeLimits, now: float) -> list[str]:
    """Skip every turn whose deadline has passed (several, if the bot was down a while)."""
    told: list[str] = []
    while session.turn is not None and session.deadline is not None and session.deadline <= now:
        user, deadline = session.turn, session.deadline
        session.skips[user] = session.skips.get(user, 0) + 1
        told.append(messages.ST_SKIPPED.format(name=session.name_of(user)))
        nxt = next_player(session, user)
        if session.skips[user] >= limits.max_skips:
            told.append(messages.ST_REMOVED.format(name=session.name_of(user), skips=session.skips[user]))
            session.players.remove(user)
            session.skips.pop(user, None)
            if nxt == user:
                nxt = None
        session.turn, session.deadline = None, None
        if nxt is not None:
            told += _give_turn(session, nxt, deadline)  # the next deadline runs from the missed one
    return told


def end_reason(session: Session, limits: StorytimeLimits, now: float) -> str | None:
    """Why the session should end by itself now, or None."""
    if session.busy:
        return None
    if session.turns_left == 0:
        return messages.ST_END_TURNS
    if not session.players:
        return messages.ST_END_EMPTY
    if now - session.last_activity >= limits.idle_end_s:
        return messages.ST_END_IDLE
    return None


def next_deadline(session: Session, limits: StorytimeLimits) -> float:
    """The next moment something happens by itself: a turn or vote times out, or the session idles out."""
    times = [session.last_activity + limits.idle_end_s]
    if session.deadline is not None:
        times.append(session.deadline)
    if session.vote is not None:
        times.append(session.vote.deadline)
    return min(times)


def announcement(session: Session) -> str:
    """The session's first message: it opens the thread where the session lives."""
    return messages.ST_STARTED.format(title=session.title, genre=session.genre, mode=session.mode,
                                      starter=session.name_of(session.starter), turns=session.max_turns,
                                      timeout=describe_seconds(session.turn_timeout_s))


def describe_seconds(seconds: float) -> str:
    if seconds >= 60 and seconds % 60 == 0:
        minutes = int(seconds // 60)
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    return f"{seconds:g} s"
