"""A request's record inside the worker, and the worker's states."""

from __future__ import annotations

from dataclasses import dataclass, field

from storygen.engine import Sequence
from storygen.handle import StoryHandle
from storygen.stories import PreparedStory, TextStream



@dataclass
class Job:
    prepared: PreparedStory
    handle: StoryHandle
    seq: Sequence
    stream: TextStream
    submitted: float
    deadline: float
    first_token: float | None = None
    finished: bool = False
    timings: dict[str, float] = field(default_factory=dict)


SERVING = ("running", "draining")  # states in which the engine loop goes on
UNAVAILABLE = {"stopped": "starting up", "failed": "down after an internal error (the operator has the log)"}
