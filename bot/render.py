"""Platform-neutral text rendering: cut a long story into pieces a chat message can hold."""

from __future__ import annotations

import logging
import re

logger = logging.getLogger(__name__)

# Where a piece may end, best first. Each pattern matches the whitespace after a boundary.
_BOUNDARIES = (
    re.compile(r"\n\s*\n\s*"),  # a paragraph
    re.compile(r"(?<=[.!?…])[\"'”’)\]]*\s+"),  # a sentence (with its closing quotes or brackets)
    re.compile(r"\s+"),  # a word
)


def split_text(text: str, limit: int) -> list[str]:
    """Cut `text` into pieces of at most `limit` characters, at paragraph, then sentence,
    then word boundaries; a word longer than `limit` is cut where it must be.

    The whitespace at each cut is dropped, so every piece is non-empty and
    `" ".join(pieces).split() == text.split()`.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    pieces: list[str] = []
    rest = text.strip()
    while len(rest) > limit:
        end, start = _cut(rest, limit)
        pieces.append(rest[:end].rstrip())
        rest = rest[start:].lstrip()
    if rest:
        pieces.append(rest)
    return pieces


def _cut(text: str, limit: int) -> tuple[int, int]:
    """(end of this piece, start of the next) for the best boundary within `limit`."""
    for pattern in _BOUNDARIES:
        # Prefer a coarse boundary only if it does not leave a piece under half full.
        least = limit // 2 if pattern is not _BOUNDARIES[-1] else 1
        best = None
        for match in pattern.finditer(text, 0, limit + 1):
            if match.start() > limit:
                break
            if match.start() >= least:
                best = match
        if best is not None:
            if pattern is _BOUNDARIES[1]:
                end = best.start() + len(best.group().rstrip())  # keep the closing quote with its sentence
                if end > limit:
                    continue
                return end, best.end()
            return best.start(), best.end()
    return limit, limit
