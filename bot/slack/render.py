"""Slack's side of rendering: escaping, and a story as Block Kit messages.

Everything the bot sends to Slack goes through `escape`, so neither the model nor
an echoed prompt can write a mention (`<!channel>`, `<@U…>`) or a link. The only
mention we write is the requester's, built from their user id.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from bot import messages
from bot.render import split_text

logger = logging.getLogger(__name__)

CONTINUE, REGENERATE, CANCEL = "story_continue", "story_regenerate", "story_cancel"  # button action_ids
FALLBACK_CHARS = 150  # the notification text of a story message

_BROADCAST = re.compile(r"@(channel|here|everyone)\b", re.IGNORECASE)
_USER_ID = re.compile(r"[UW][A-Z0-9]{2,}")


@dataclass(frozen=True)
class SlackLimits:
    """What one Slack message can hold."""

    section_chars: int = 3000  # a section block's text
    message_chars: int = 12_000  # all blocks of a message: ~13,000 is refused (msg_blocks_too_long)
    message_blocks: int = 50
    max_messages: int = 4  # a longer story is posted as a preview plus a file


@dataclass(frozen=True)
class StoryView:
    """One story as the channel should see it now."""

    text: str  # the story so far (raw, unescaped)
    request_id: str
    user: str  # the requester's Slack user id
    state: str = "writing"  # writing, done, cancelled, stopped, interrupted (by a crash, marked at the next start)
    footer: str = ""  # messages.footer(...) once done


@dataclass(frozen=True)
class SlackMessage:
    text: str  # the notification fallback
    blocks: list[dict[str, Any]] = field(default_factory=list)


def escape(text: str) -> str:
    """Slack's three escapes, and a zero-width space that keeps `@channel` from notifying anyone."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _BROADCAST.sub("@\u200b\\1", text)


_ESCAPED_CHANNEL = re.compile(r"&lt;#([A-Z0-9]+)&gt;")


def link_channels(escaped: str) -> str:
    """Turn escaped <#C123> references back into channel links (they notify nobody)."""
    return _ESCAPED_CHANNEL.sub(r"<#\1>", escaped)


def unescape(text: str) -> str:
    """Slack sends &, < and > escaped in a command's text; the model should see them plain."""
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def needs_file(text: str, limits: SlackLimits = SlackLimits()) -> bool:
    """Too long for `max_messages` messages: post a preview and attach the whole story."""
    return len(_pages(list(_sections(text, limits.section_chars)), limits)) > limits.max_messages


def to_slack_blocks(view: StoryView, limits: SlackLimits = SlackLimits()) -> list[SlackMessage]:
    """The messages that show `view`: its text in section blocks, then a status line and buttons."""
    sections = list(_sections(view.text, limits.section_chars)) or ["…"]
    pages = _pages(sections, limits)
    if len(pages) > limits.max_messages:
        pages = [[sections[0], escape(messages.STORY_ATTACHED)]]
    fallback = escape(_excerpt(view.text)) or "…"
    rendered = [SlackMessage(fallback, [_section(text) for text in page]) for page in pages]
    rendered[-1].blocks.append(_status(view))
    if buttons := _buttons(view):
        rendered[-1].blocks.append({"type": "actions", "elements": buttons})
    return rendered


def _sections(text: str, limit: int, raw_limit: int | None = None) -> Iterator[str]:
    """Escaped pieces of at most `limit` characters; a piece that escaping made too long is cut smaller."""
    raw_limit = raw_limit or limit
    for piece in split_text(text, raw_limit):
        escaped = escape(piece)
        if len(escaped) <= limit:
            yield escaped
        else:
            yield from _sections(piece, limit, max(1, raw_limit * limit // len(escaped)))


def _pages(sections: list[str], limits: SlackLimits) -> list[list[str]]:
    room = limits.message_blocks - 2  # the status line and the buttons
    pages: list[list[str]] = [[]]
    size = 0
    for text in sections:
        if pages[-1] and (size + len(text) > limits.message_chars or len(pages[-1]) >= room):
            pages.append([])
            size = 0
        pages[-1].append(text)
        size += len(text)
    return pages


def _section(text: str) -> dict[str, Any]:
    # verbatim: Slack does no link or mention parsing of its own on the story
    return {"type": "section", "text": {"type": "mrkdwn", "text": text, "verbatim": True}}


def _status(view: StoryView) -> dict[str, Any]:
    line = {"writing": messages.STARTED, "done": view.footer, "cancelled": messages.STORY_CANCELLED,
            "stopped": messages.STORY_STOPPED, "interrupted": messages.STORY_INTERRUPTED}[view.state]
    parts = [escape(line)] if line else []
    if _USER_ID.fullmatch(view.user):
        parts.append(escape(messages.REQUESTED_BY).format(user=f"<@{view.user}>"))
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": " · ".join(parts) or "…"}]}


def _buttons(view: StoryView) -> list[dict[str, Any]]:
    if view.state == "writing":
        return [_button(messages.BUTTON_CANCEL, CANCEL, view.request_id, style="danger")]
    if view.state == "done":
        return [_button(messages.BUTTON_CONTINUE, CONTINUE, view.request_id, style="primary"),
                _button(messages.BUTTON_REGENERATE, REGENERATE, view.request_id)]
    return []


def _button(label: str, action_id: str, request_id: str, style: str | None = None) -> dict[str, Any]:
    # The value is the request id alone, so a click still works after a restart.
    button = {"type": "button", "action_id": action_id, "value": request_id,
              "text": {"type": "plain_text", "text": label, "emoji": True}}
    if style:
        button["style"] = style
    return button


def _excerpt(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= FALLBACK_CHARS else text[:FALLBACK_CHARS - 1].rstrip() + "…"
