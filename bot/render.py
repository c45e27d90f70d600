"""Text shaping every chat front-end needs: cut a long story into messages that fit.

Platform-neutral: Discord calls `split_text(text, 4096)` for embed pages, Slack the
same with its own limit. Platform-specific escaping stays in each adapter.
"""

from __future__ import annotations

import logging
import re

logger = logging.getLogger(__name__)

# Where a cut may go, best first. Each pattern matches the separator; the text before
# it ends one piece and the text after it starts the next.
_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
_LINE = re.compile(r"\n\s*")
_SENTENCE = re.compile(r"(?<=[.!?…])[\"'”’)\]]*\s+")
_WORD = re.compile(r"\s+")


def split_text(text: str, limit: int) -> list[str]:
    """Cut `text` into pieces of at most `limit` characters, at paragraph, then line,
    then sentence, then word boundaries; a single word longer than `limit` is cut hard.

    Whitespace at a cut is dropped; nothing else is. A boundary in the first half of a
    piece is passed over for a weaker one later on, so no piece is needlessly short.
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
    """(end of this piece, start of the next) at the best boundary within `limit`."""
    window = text[: limit + 1]  # a separator may start right at the limit
    for pattern, earliest in ((_PARAGRAPH, limit // 2), (_LINE, limit // 2), (_SENTENCE, limit // 2), (_WORD, 1)):
        cuts = [(_end_of_piece(m), m.end()) for m in pattern.finditer(window)]
        cuts = [(end, start) for end, start in cuts if earliest <= end <= limit]
        if cuts:
            return cuts[-1]
    return limit, limit


def _end_of_piece(match: re.Match[str]) -> int:
    """A sentence keeps its closing quotes and brackets; other separators are dropped whole."""
    separator = match.group(0)
    return match.start() + len(separator) - len(separator.lstrip("\"'”’)]"))
