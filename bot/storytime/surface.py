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

    async def stream(self, session: Session, label: str, chunks: AsyncIterator[str]) -> object:
        """Post the model's words as they are written (edited in place, throttled); returns a
        reference to the message for `settle`."""

    async def settle(self, session: Session, ref: object, label: str, text: str | None) -> None:
        """The model's final line in the message `stream` posted; None: it failed (say so there)."""

    async def offer_vote(self, session: Session) -> None:
        """Buttons for each of `session.vote.options`; a click comes back as StorytimeService.vote."""

    async def attach(self, session: Session, filename: str, content: str, text: str) -> None:
        """Post `text` with the finished story attached as a file."""
