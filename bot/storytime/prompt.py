"""The model turn's prompt: the story so far, trimmed from the middle to fit.

The opening is always kept: it sets the story up. When everything does not fit, the
lines just after the opening go first, and a line in the prompt itself says how many
are missing, so the model reads a story with a visible gap rather than one that jumps.
The most recent lines are kept as long as they fit: they are what the model continues.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from bot import messages

logger = logging.getLogger(__name__)

SEPARATOR = "\n"


def story_prompt(lines: list[str], fits: Callable[[str], bool]) -> tuple[str, int]:
    """(prompt text, lines left out). `fits(text)` says whether a prompt is small enough.

    The result holds the first line and the longest run of final lines that fits; the
    gap between them is marked with ST_MISSING_LINES. If even the opening plus the last
    line is too big, the last line alone goes (trimmed by the worker, which says so).
    """
    whole = SEPARATOR.join(lines)
    if len(lines) <= 1 or fits(whole):
        return whole, 0
    opening, rest = lines[0], lines[1:]
    best: tuple[str, int] | None = None
    low, high = 1, len(rest)  # keep the last `k` lines; find the largest k that fits (fitting shrinks with k)
    while low <= high:
        k = (low + high) // 2
        candidate = _with_gap(opening, rest, k)
        if fits(candidate):
            best, low = (candidate, len(rest) - k), k + 1
        else:
            high = k - 1
    if best is not None:
        return best
    logger.info("prompt: not even the opening and the last line fit; using the last line alone")
    return rest[-1], len(lines) - 1


def _with_gap(opening: str, rest: list[str], keep: int) -> str:
    missing = len(rest) - keep
    parts = [opening]
    if missing:
        parts.append(messages.ST_MISSING_LINES.format(count=missing, lines=messages.plural(missing, "line", "lines")))
    return SEPARATOR.join(parts + rest[len(rest) - keep:])
