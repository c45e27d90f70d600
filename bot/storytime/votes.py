"""Vote mode: the model writes two continuations and the players pick one.

Only players vote, once each; a second vote replaces the first. The vote closes when
every player has voted or its deadline passes; the option with most votes wins, and a
tie (no votes at all included) picks the first.
"""

from __future__ import annotations

import logging

from bot import messages
from bot.storytime.session import Actor, Session, StorytimeError, Vote

logger = logging.getLogger(__name__)


def open_vote(session: Session, options: list[str], timeout_s: float, now: float) -> None:
    session.vote = Vote(list(options), now + timeout_s)
    session.model = None  # the model's part is done; the players' part begins


def cast(session: Session, actor: Actor, index: int, now: float) -> str:
    """Record `actor`'s vote for option `index` (0-based); the one line to tell them."""
    vote = session.vote
    if vote is None or not 0 <= index < len(vote.options):
        raise StorytimeError(messages.ST_VOTE_CLOSED)
    if actor.user not in session.players:
        raise StorytimeError(messages.ST_VOTE_ONLY_PLAYERS)
    changed = actor.user in vote.ballots and vote.ballots[actor.user] != index
    vote.ballots[actor.user] = index
    session.last_activity = now
    wording = messages.ST_VOTE_CHANGED if changed else messages.ST_VOTE_CAST
    return wording.format(number=index + 1)


def everyone_voted(session: Session) -> bool:
    vote = session.vote
    return vote is not None and all(player in vote.ballots for player in session.players)


def tally(vote: Vote) -> tuple[int, list[int]]:
    """(winning index, votes per option): most votes wins, a tie goes to the earliest option."""
    counts = [0] * len(vote.options)
    for index in vote.ballots.values():
        counts[index] += 1
    return counts.index(max(counts)), counts


def describe_counts(counts: list[int]) -> str:
    return " to ".join(str(c) for c in counts) + (" votes" if sum(counts) != 1 else " vote")
