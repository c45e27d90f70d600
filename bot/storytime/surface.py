"""What the core asks of a front-end: speak in a session's thread. One per platform.

Everything passed in is raw text (a player's line, the model's words, a notice): the
front-end escapes it and neutralises mentions as it does for stories.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from bot.storytime.session import Session


class Surface(Protocol):
    async def say(self, session: Session, text: str) -> None:
        """A notice in the session's thread (whose turn it is, a skip, a vote result)."""

    async def begin(self, session: Session, label: str) -> str:
        """Post the message the model's line will be written in ("writing…"); returns its id."""

    async def stream(self, session: Session, message: str, label: str, chunks: AsyncIterator[str]) -> None:
        """Show the model's words in that message as they are written (edited in place, throttled)."""

    async def settle(self, session: Session, message: str, label: str, text: str | None) -> None:
        """The model's final line in that message; None: it stopped or failed (say so there). Also
        called after a restart for a message the last run left mid-line."""

    async def offer_vote(self, session: Session) -> None:
        """Buttons for each of `session.vote.options`; a click comes back as StorytimeService.vote."""

    async def attach(self, session: Session, filename: str, content: str, text: str) -> None:
        """Post `text` with the finished story attached as a file."""
