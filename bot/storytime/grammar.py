"""`/storytime …` (and Slack's `/story together …`) as text, into one command object.

    start <genre> [opening…] [title="…"] [turns=N] [turn_timeout=SECONDS] [mode=turns|free|vote] [model_every=N]
    join | leave | status | undo | list | help | add <line> | end [session id]

Discord sends typed options instead and builds the same objects.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from bot.commands import MAX_INPUT_CHARS, CommandError, leading_genre
from bot.storytime.session import StartOptions

logger = logging.getLogger(__name__)

ACTIONS = ("start", "join", "leave", "add", "status", "undo", "end", "list", "help")
_NO_ARGUMENTS = ("join", "leave", "status", "undo", "list", "help")
_OPTION = re.compile(r"(?:^|\s)(title|turns|turn_timeout|mode|model_every)=(\"[^\"]*\"|“[^”]*”|\S+)", re.IGNORECASE)
USAGE = "try `/storytime start <genre> [opening]`, `join`, `add <line>`, `status`, `undo`, `end` or `help`"


@dataclass(frozen=True)
class StorytimeCommand:
    action: str  # one of ACTIONS
    text: str = ""  # add: the line
    start: StartOptions | None = None
    session_id: str = ""  # end: a session chosen from `list`


def parse_storytime(text: str) -> StorytimeCommand:
    """Raises CommandError (one line) when the text is not a storytime command."""
    if len(text) > MAX_INPUT_CHARS:
        raise CommandError(f"that is {len(text)} characters; a command can be at most {MAX_INPUT_CHARS}")
    words = text.split(None, 1)
    if not words:
        return StorytimeCommand("help")
    action, rest = words[0].lower(), (words[1] if len(words) > 1 else "").strip()
    if action not in ACTIONS:
        raise CommandError(f"{words[0]!r} is not a storytime command; {USAGE}")
    if action in _NO_ARGUMENTS:
        if rest:
            raise CommandError(f"`{action}` takes nothing after it; try `/storytime {action}`")
        return StorytimeCommand(action)
    if action == "add":
        return StorytimeCommand("add", text=rest)
    if action == "end":
        if len(rest.split()) > 1:
            raise CommandError("`end` takes at most a session id from `/storytime list`")
        return StorytimeCommand("end", session_id=rest)
    return StorytimeCommand("start", start=parse_start(rest))


def parse_start(text: str) -> StartOptions:
    options = {m.group(1).lower(): m.group(2).strip("\"“”") for m in _OPTION.finditer(text)}
    prose = _OPTION.sub(" ", text).split()
    genre, words = leading_genre(prose)
    if genre is None:
        raise CommandError("name a genre first, e.g. `/storytime start fantasy The dragon woke`; "
                           "`/story genres` lists them")
    return StartOptions(genre, " ".join(words), options.get("title", ""),
                        _number(options, "turns", int), _number(options, "turn_timeout", float),
                        options.get("mode", "turns").lower(), _number(options, "model_every", int) or 1)


def _number(options: dict[str, str], name: str, kind: type) -> int | float | None:
    raw = options.get(name)
    if raw is None:
        return None
    try:
        return kind(raw)
    except ValueError:
        raise CommandError(f"{name}={raw!r} is not {'a whole number' if kind is int else 'a number'}") from None
