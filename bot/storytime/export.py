"""A finished session as a Markdown file: title, genre, date, the story, and who wrote how much."""

from __future__ import annotations

import logging
import re
from collections import Counter
from datetime import datetime, timezone

from bot import messages
from bot.storytime.session import MODEL, Session

logger = logging.getLogger(__name__)

_MARKDOWN = re.compile(r"([\\`*_\[\]#<>|])")


def to_markdown(session: Session, ended_at: float) -> str:
    """The whole story; each line a paragraph, Markdown characters escaped so a line is shown as typed."""
    date = datetime.fromtimestamp(ended_at, tz=timezone.utc).strftime("%Y-%m-%d")
    out = [f"# {_escape(session.title)}", "", f"*{session.genre} · {date}*", ""]
    for line in session.lines:
        out += [_escape(line.text), ""]
    out += [f"## {messages.ST_EXPORT_CREDITS}", ""]
    out += [f"- {_escape(name)}: {count} {messages.plural(count, 'line', 'lines')}"
            for name, count in credits(session)]
    return "\n".join(out) + "\n"


def credits(session: Session) -> list[tuple[str, int]]:
    """(name, lines) per contributor, most lines first, then in order of their first line; the model included."""
    counts = Counter(line.author for line in session.lines)
    first = {}
    for i, line in enumerate(session.lines):
        first.setdefault(line.author, i)
    order = sorted(counts, key=lambda author: (-counts[author], first[author]))
    return [(messages.ST_EXPORT_MODEL if a == MODEL else session.name_of(a), counts[a]) for a in order]


def filename(session: Session) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", session.title.lower()).strip("-")[:40] or "story"
    return f"{slug}-{session.session_id}.md"


def _escape(text: str) -> str:
    return _MARKDOWN.sub(r"\\\1", text)
