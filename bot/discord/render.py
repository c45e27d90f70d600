"""How a story looks on Discord: neutralised text, embed pages, a .txt for very long
stories, and the Continue / Regenerate / Cancel buttons.

`to_discord_messages(progress)` is the one way a story becomes Discord messages, at
every stage from "queued" to "done"; `bot.discord.delivery` decides the stage and
where the messages go. Nothing here talks to Discord.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import discord

from bot import messages
from bot.render import split_text
from storygen.genres import find_genre

logger = logging.getLogger(__name__)

CONTENT_CHARS = 2000  # a message's content
PAGE_CHARS = 4096  # an embed's description: one page of a story
MAX_PAGES = 3  # a longer story is attached as a .txt instead of filling the channel
NO_MENTIONS = discord.AllowedMentions.none()
ZWSP = "\u200b"

_EVERYONE = re.compile(r"@(?=(?:everyone|here)\b)", re.IGNORECASE)
_MENTION = re.compile(r"<(@[!&]?)(?=\d)")  # <@user>, <@!user>, <@&role>; <#channel> notifies nobody


def neutralise(text: str) -> str:
    """Make @everyone, @here and user and role mentions inert text (a <#channel> link pings nobody).

    A zero-width space after the sigil keeps them readable but stops Discord from
    parsing them; allowed_mentions=none on every send is the second lock on the door.
    """
    return _MENTION.sub(lambda m: f"<{m.group(1)}{ZWSP}", _EVERYONE.sub(f"@{ZWSP}", text))


def to_discord_line(text: str) -> str:
    """A one-line reply (which may echo what a user typed), inert and within the content limit."""
    text = neutralise(text)
    return text if len(text) <= CONTENT_CHARS else text[: CONTENT_CHARS - 1] + "…"


# --- buttons -------------------------------------------------------------------------------------

_BUTTONS = {
    "continue": (messages.BUTTON_CONTINUE, discord.ButtonStyle.primary),
    "regenerate": (messages.BUTTON_REGENERATE, discord.ButtonStyle.secondary),
    "cancel": (messages.BUTTON_CANCEL, discord.ButtonStyle.danger),
}


class StoryButton(discord.ui.DynamicItem[discord.ui.Button],
                  template=r"story:(?P<action>continue|regenerate|cancel):(?P<request_id>[0-9a-f]{1,32})"):
    """A button whose custom_id names the action and the story, so it works after a restart."""

    def __init__(self, action: str, request_id: str) -> None:
        label, style = _BUTTONS[action]
        super().__init__(discord.ui.Button(label=label, style=style, custom_id=f"story:{action}:{request_id}"))
        self.action = action
        self.request_id = request_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button,
                             match: re.Match[str]) -> StoryButton:
        return cls(match["action"], match["request_id"])

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.client.on_story_button(interaction)  # type: ignore[attr-defined]  (StoryClient)


def story_buttons(request_id: str, actions: tuple[str, ...]) -> discord.ui.View | None:
    if not actions:
        return None
    view = discord.ui.View(timeout=None)
    for action in actions:
        view.add_item(StoryButton(action, request_id))
    return view


# --- stories -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StoryProgress:
    """Where one story is, as the delivery sees it."""

    request_id: str
    genre: str
    state: str  # queued, writing, done, cancelled, failed
    text: str = ""  # what to show of the story (for a continuation, only the new part)
    status: str = ""  # queued: the queue line; failed: the error line
    notices: tuple[str, ...] = ()
    footer: str = ""  # done: genre, tokens, seed
    continued: bool = False


@dataclass
class DiscordMessage:
    content: str | None = None
    embeds: list[discord.Embed] = field(default_factory=list)
    view: discord.ui.View | None = None
    files: list[discord.File] = field(default_factory=list)

    def edit_kwargs(self) -> dict[str, Any]:
        """For edit_original_response / Message.edit: replaces everything, buttons included."""
        kwargs: dict[str, Any] = dict(content=self.content, embeds=self.embeds, view=self.view,
                                      allowed_mentions=NO_MENTIONS)
        if self.files:
            kwargs["attachments"] = self.files
        return kwargs

    def send_kwargs(self) -> dict[str, Any]:
        """For followup.send / channel.send."""
        kwargs: dict[str, Any] = dict(content=self.content, embeds=self.embeds, allowed_mentions=NO_MENTIONS)
        if self.files:
            kwargs["files"] = self.files
        if self.view is not None:
            kwargs["view"] = self.view
        return kwargs

    def signature(self) -> tuple:
        """What the user would see; an edit that would not change it is skipped."""
        buttons = [item.custom_id for item in self.view.children] if self.view else []  # type: ignore[attr-defined]
        return self.content, [e.to_dict() for e in self.embeds], buttons, len(self.files)


def to_discord_messages(progress: StoryProgress) -> list[DiscordMessage]:
    """The message(s) showing a story at its current stage; the first one replaces the last shown."""
    text = neutralise(progress.text)
    notices = neutralise("\n".join(progress.notices)) or None
    if progress.state == "queued":
        return [DiscordMessage(_join(progress.status, notices), view=story_buttons(progress.request_id, ("cancel",)))]
    if progress.state == "writing":
        status = messages.STORY_WRITING.format(chars=len(progress.text)) if text else messages.STARTED
        return [DiscordMessage(_join(status, notices), _preview(progress, text),
                               story_buttons(progress.request_id, ("cancel",)))]
    if progress.state == "cancelled":
        return [DiscordMessage(messages.STORY_CANCELLED, _preview(progress, text))]
    if progress.state == "failed":
        return [DiscordMessage(messages.STORY_FAILED.format(error=to_discord_line(progress.status)),
                               _preview(progress, text))]
    return _finished(progress, text, notices)


def _finished(progress: StoryProgress, text: str, notices: str | None) -> list[DiscordMessage]:
    buttons = story_buttons(progress.request_id, ("continue", "regenerate"))
    pages = split_text(text, PAGE_CHARS)
    if len(pages) > MAX_PAGES:
        story_file = discord.File(io.BytesIO(progress.text.encode()), filename=f"story-{progress.request_id}.txt")
        content = _join(notices, messages.STORY_IN_FILE.format(chars=len(progress.text)))
        return [DiscordMessage(content, _preview(progress, text, footer=True), buttons, [story_file])]
    result = []
    for number, page in enumerate(pages, 1):
        embed = discord.Embed(title=_title(progress, number, len(pages)), description=page)
        if number == len(pages):
            embed.set_footer(text=progress.footer)
        result.append(DiscordMessage(notices if number == 1 else None, [embed],
                                     buttons if number == len(pages) else None))
    return result


def _preview(progress: StoryProgress, text: str, *, footer: bool = False) -> list[discord.Embed]:
    """The story's first page, marked as unfinished when there is more."""
    if not text:
        return []
    pages = split_text(text, PAGE_CHARS - 2)
    embed = discord.Embed(title=_title(progress, 1, 1), description=pages[0] + (" …" if len(pages) > 1 else ""))
    if footer and progress.footer:
        embed.set_footer(text=progress.footer)
    return [embed]


def _title(progress: StoryProgress, page: int, pages: int) -> str:
    found = find_genre(progress.genre)
    genre = found.label if found else progress.genre
    if pages > 1:
        return messages.STORY_TITLE_PAGE.format(genre=genre, page=page, pages=pages)
    return (messages.STORY_TITLE_CONTINUED if progress.continued else messages.STORY_TITLE).format(genre=genre)


def _join(*lines: str | None) -> str | None:
    return "\n".join(line for line in lines if line) or None
