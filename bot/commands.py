"""Platform-neutral commands: parse what a user typed into a plain command object.

Slack sends `/story sci_fi After discovering time travel length=150` as one string;
Discord sends typed options. Both end up as the same objects here, so parsing,
validation and wording are shared. Nothing in this module imports a chat library.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from bot.state import ServerSettings
from storygen.errors import UnknownSettingError, ValidationError
from storygen.genres import AUTO, find_genre, is_auto
from storygen.sampling import USER_SETTINGS, parse_setting
from storygen.settings import SAVED_SETTINGS

logger = logging.getLogger(__name__)

SUBCOMMANDS = ("help", "genres", "settings", "queue", "cancel", "continue", "admin")
_OPTION = re.compile(r"^([A-Za-z_][A-Za-z0-9_\-]{0,30})=(\S*)$")
MAX_INPUT_CHARS = 4000  # Slack allows 4,000 characters of command text; anything longer is not a typo


@dataclass(frozen=True)
class StoryCommand:
    """Write a story. genre None: the user's default genre."""

    prompt: str
    genre: str | None = None
    overrides: dict[str, object] = field(default_factory=dict)  # typed, not yet range-checked


@dataclass(frozen=True)
class SettingsCommand:
    action: str  # show, set, reset
    values: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SimpleCommand:
    name: str  # help, genres, queue, cancel, continue


@dataclass(frozen=True)
class AdminCommand:
    """A server admin's limits (Discord's /storyadmin, Slack's `/story admin`); None leaves one as it is."""

    allow_channel: str | None = None
    disallow_channel: str | None = None
    all_channels: bool | None = None
    max_length: int | None = None
    max_temperature: float | None = None
    cooldown_s: float | None = None

    def changes(self, current: ServerSettings) -> dict[str, object]:
        """An allow-list: an empty one means every channel."""
        channels = None
        if self.all_channels:
            channels = ()
        if self.allow_channel or self.disallow_channel:
            kept = [] if self.all_channels else list(current.allowed_channels)
            if self.allow_channel and self.allow_channel not in kept:
                kept.append(self.allow_channel)
            if self.disallow_channel in kept:
                kept.remove(self.disallow_channel)
            channels = tuple(kept)
        return {"allowed_channels": channels, "max_length": self.max_length,
                "max_temperature": self.max_temperature, "cooldown_s": self.cooldown_s}


Command = StoryCommand | SettingsCommand | SimpleCommand | AdminCommand


class CommandError(ValidationError):
    """The command text could not be understood."""


def _to_overrides(pairs: list[tuple[str, str]]) -> dict[str, object]:
    overrides: dict[str, object] = {}
    for name, raw in pairs:
        key = name.lower().replace("-", "_")
        if key not in (*USER_SETTINGS, "greedy"):
            raise UnknownSettingError(name, USER_SETTINGS)
        overrides[key] = parse_setting(key, raw)
    return overrides


def _split_trailing_options(words: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """`name=value` words at the end are options; the same shape inside the prose stays prose."""
    options: list[tuple[str, str]] = []
    while words and (match := _OPTION.match(words[-1])):
        options.insert(0, (match.group(1), match.group(2)))
        words = words[:-1]
    return words, options


def leading_genre(words: list[str]) -> tuple[str | None, list[str]]:
    """A genre named by the first one or two words ("sci_fi", "science fiction", "auto")."""
    for width in (2, 1):
        if len(words) > width - 1:
            head = " ".join(words[:width])
            if is_auto(head) and head.strip():
                return AUTO, words[width:]
            genre = find_genre(head)
            if genre is not None:
                return genre.name, words[width:]
    return None, words


def parse_command_text(text: str, channel: str = "") -> Command:
    """Parse the text after `/story` (typed in `channel`); raises CommandError or a ValidationError, one line."""
    if len(text) > MAX_INPUT_CHARS:
        raise CommandError(f"that is {len(text)} characters; a command can be at most {MAX_INPUT_CHARS}")
    words = text.split()
    if not words:
        return SimpleCommand("help")
    first = words[0].lower().lstrip("/")
    if first in SUBCOMMANDS and first not in ("settings", "admin"):
        if len(words) > 1 and first != "continue":
            raise CommandError(f"`{first}` takes nothing after it; try `/story {first}`")
        return SimpleCommand(first)
    if first == "settings":
        return parse_settings_words(words[1:])
    if first == "admin":
        return parse_admin_words(words[1:], channel)
    words, options = _split_trailing_options(words)
    genre, words = leading_genre(words)
    prompt = " ".join(words)
    if not prompt:
        raise CommandError("add an opening after the genre, e.g. `/story sci_fi After discovering time travel`")
    return StoryCommand(_keep_line_breaks(text, prompt), genre, _to_overrides(options))


def parse_settings_words(words: list[str]) -> SettingsCommand:
    if not words or words == ["show"]:
        return SettingsCommand("show")
    if words == ["reset"]:
        return SettingsCommand("reset")
    if words[0] == "set":
        words = words[1:]
    values: dict[str, str] = {}
    for word in words:
        match = _OPTION.match(word)
        if not match:
            raise CommandError(f"settings are written name=value, e.g. `temperature=1.1 length=150`; got {word!r}")
        name = match.group(1).lower().replace("-", "_")
        if name not in SAVED_SETTINGS:
            raise UnknownSettingError(match.group(1), SAVED_SETTINGS)
        values[name] = match.group(2)
    if not values:
        raise CommandError("nothing to set; e.g. `/story settings temperature=1.1 length=150`")
    return SettingsCommand("set", values)


ADMIN_USAGE = ("`/story admin` shows the server's limits; change them with `allow` or `disallow` (this channel), "
               "`everywhere`, `max_length=N`, `max_temperature=T`, `cooldown=SECONDS`")
_ADMIN_NUMBERS = {"max_length": (int, "a whole number"), "max_temperature": (float, "a number"),
                  "cooldown": (float, "a number of seconds")}


def parse_admin_words(words: list[str], channel: str) -> AdminCommand:
    """`/story admin [allow|disallow|everywhere] [max_length=N max_temperature=T cooldown=S]`.

    allow and disallow act on `channel`, the one the command was typed in: no channel names
    to resolve, and an admin sees at once where stories are on.
    """
    if words in ([], ["show"]):
        return AdminCommand()
    changes: dict[str, object] = {}
    for word in words:
        lowered = word.lower()
        if lowered == "allow":
            changes["allow_channel"] = channel
        elif lowered == "disallow":
            changes["disallow_channel"] = channel
        elif lowered in ("everywhere", "all_channels"):
            changes["all_channels"] = True
        elif (match := _OPTION.match(word)) and match.group(1).lower() in _ADMIN_NUMBERS:
            name, raw = match.group(1).lower(), match.group(2)
            kind, wording = _ADMIN_NUMBERS[name]
            try:
                value = kind(raw)
            except ValueError:
                raise CommandError(f"{name}={raw!r} is not {wording}") from None
            changes["cooldown_s" if name == "cooldown" else name] = value
        else:
            raise CommandError(f"{word!r} is not an admin setting. {ADMIN_USAGE}")
    return AdminCommand(**changes)


def _keep_line_breaks(original: str, joined: str) -> str:
    """Splitting on whitespace lost the user's line breaks; find the prompt in the original instead."""
    pattern = r"\s+".join(re.escape(w) for w in joined.split())
    match = re.search(pattern, original)
    return match.group(0) if match else joined
