"""One storytelling session: its settings, players, lines, and what it is waiting for.

A `Session` is plain data that `store.py` writes to SQLite as it is; the rules that
change it live in rules.py and votes.py. Times are wall-clock seconds (time.time()),
so a deadline still means the same moment after a restart.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from storygen.errors import StorygenError

logger = logging.getLogger(__name__)

MODEL = "model"  # the author of the model's lines


class StorytimeError(StorygenError):
    """A storytime command was refused by a rule or a limit; the message says which."""


@dataclass(frozen=True)
class Place:
    """Where a command came from: a Discord guild or Slack workspace, and a channel or thread."""

    platform: str
    workspace: str
    channel: str

    @property
    def server_key(self) -> str:
        return f"{self.platform}:{self.workspace}"


@dataclass(frozen=True)
class Actor:
    """Who typed a command: a user id, the name to credit them by, and whether they are an admin."""

    user: str
    name: str = ""
    is_admin: bool = False


@dataclass(frozen=True)
class StartOptions:
    """`/storytime start genre:<g> [opening] [title] [turns] [turn_timeout] [mode] [model_every]`."""

    genre: str
    opening: str = ""
    title: str = ""
    turns: int | None = None
    turn_timeout_s: float | None = None
    mode: str = "turns"
    model_every: int = 1


@dataclass
class Line:
    author: str  # a user id, or MODEL
    text: str


@dataclass
class Vote:
    """Two continuations the players choose between, until `deadline`."""

    options: list[str]
    deadline: float
    ballots: dict[str, int] = field(default_factory=dict)  # user -> option index; a new vote replaces the old


@dataclass
class ModelTurn:
    """The model turn in hand. `attempts` survives restarts, so a turn is run again once, not forever."""

    kind: str  # "line" or "vote"
    attempts: int = 0
    options: list[str] = field(default_factory=list)  # vote: the continuations written so far
    message: str = ""  # the platform's id of the message showing the line being written


@dataclass
class Session:
    session_id: str
    platform: str
    workspace: str
    channel: str  # where it was started
    thread: str  # where it lives: a Discord thread id, a Slack channel:thread_ts
    starter: str
    genre: str
    title: str
    mode: str
    max_turns: int
    turn_timeout_s: float
    model_every: int
    created_at: float
    last_activity: float
    players: list[str] = field(default_factory=list)  # turn order: the order people joined
    names: dict[str, str] = field(default_factory=dict)  # user -> display name, for credits
    lines: list[Line] = field(default_factory=list)
    turn: str | None = None  # whose turn it is (turns and vote modes); None while the model writes
    deadline: float | None = None  # when that turn times out
    skips: dict[str, int] = field(default_factory=dict)  # skipped turns in a row, per player
    since_model: int = 0  # human lines since the model last wrote
    model: ModelTurn | None = None
    vote: Vote | None = None
    status: str = "open"  # open, ended
    ended_reason: str = ""

    @property
    def key(self) -> str:
        """The worker's user key for this session's model turns."""
        return f"storytime:{self.platform}:{self.workspace}:{self.thread}"

    @property
    def server_key(self) -> str:
        return f"{self.platform}:{self.workspace}"

    @property
    def human_turns(self) -> int:
        return sum(1 for line in self.lines if line.author != MODEL)

    @property
    def turns_left(self) -> int:
        return max(0, self.max_turns - self.human_turns)

    @property
    def busy(self) -> bool:
        """The model is writing, or the players are choosing between its lines."""
        return self.model is not None or self.vote is not None

    def name_of(self, user: str) -> str:
        return self.names.get(user) or user

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Session:
        data = dict(data)
        data["lines"] = [Line(**line) for line in data.get("lines", [])]
        data["model"] = ModelTurn(**data["model"]) if data.get("model") else None
        vote = data.get("vote")
        data["vote"] = Vote(vote["options"], vote["deadline"], {k: int(v) for k, v in vote["ballots"].items()}) \
            if vote else None
        return cls(**data)
