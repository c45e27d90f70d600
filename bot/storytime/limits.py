"""The caps and defaults of group storytelling, in one frozen object the operator may change."""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

MODES = ("turns", "free", "vote")  # turns: in join order; free: anyone, any time; vote: turns, model offers two


@dataclass(frozen=True)
class StorytimeLimits:
    max_players: int = 8  # per session, the starter included
    max_turns: int = 30  # human lines per session (the opening included); a session may ask for fewer
    max_line_chars: int = 400  # one human line
    max_sessions: int = 5  # open sessions per server (Discord guild, Slack workspace)
    turn_timeout_s: float = 300.0  # default; a session may set 30 s to 1 h
    vote_timeout_s: float = 60.0
    idle_end_s: float = 3600.0  # a session with no line, join or vote for this long ends by itself
    max_skips: int = 3  # skipped turns in a row before a player is moved out of the order
    model_tokens: int = 60  # new tokens in one model turn: a few sentences
    model_sentences: int = 3  # the model's line is cut after this many sentences
    status_chars: int = 1500  # `/storytime status` shows at most this much of the story


TURN_TIMEOUT_RANGE = (30.0, 3600.0)
MODEL_EVERY_RANGE = (1, 10)
