"""The errors people see, and all their wording.

Only these exceptions reach a user. Each message is one line that says what was
wrong and what is allowed, so the CLI, Discord and Slack can show `str(error)`
as it is. Anything else that escapes is a bug and is shown with a reference id
(see `failure_reference`).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable


class StorygenError(Exception):
    """Base class: an error whose message is safe and useful to show a user."""


class ConfigError(StorygenError):
    """A setting in the environment or `.env` has a value we cannot use."""


class ValidationError(StorygenError):
    """A user's input is outside what is allowed."""


class UnknownGenreError(ValidationError):
    """The genre named is not one we know, or not one this model was trained on."""

    def __init__(self, given: str, allowed: Iterable[str], *, for_model: bool = False) -> None:
        self.given = given
        self.allowed = sorted(allowed)
        where = "this model was not trained on" if for_model else "unknown genre"
        super().__init__(f"{where} {given!r}; choose one of: {', '.join(self.allowed)}")


class EmptyPromptError(ValidationError):
    """The opening text is empty once whitespace and control characters are removed."""

    def __init__(self) -> None:
        super().__init__("the story opening is empty; type a few words for the story to start with")


class SettingRangeError(ValidationError):
    """A sampling setting is outside its allowed range."""

    def __init__(self, name: str, value: object, allowed: str) -> None:
        self.name = name
        self.value = value
        self.allowed = allowed
        super().__init__(f"{name}={value!r} is out of range; allowed: {allowed}")


class UnknownSettingError(ValidationError):
    """A setting name that does not exist."""

    def __init__(self, name: str, allowed: Iterable[str]) -> None:
        self.name = name
        super().__init__(f"unknown setting {name!r}; settings are: {', '.join(allowed)}")


class ModelLoadError(StorygenError):
    """The model named by STORYGEN_MODEL could not be loaded."""


class EmptyStoryError(StorygenError):
    """The model produced no usable text for this opening."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the model wrote nothing usable ({reason}); try another opening or a higher temperature")


class QueueFullError(StorygenError):
    """The shared queue is full; the request was not accepted."""

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"the story queue is busy, try again in about {max(1, round(retry_after_s))} s")


class TooManyRequestsError(StorygenError):
    """This user already has as many stories in progress as allowed."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        noun = "story" if limit == 1 else "stories"
        super().__init__(f"you already have {limit} {noun} in progress; wait for one to finish or cancel it")


class RequestCancelledError(StorygenError):
    """The request was cancelled before it finished."""

    def __init__(self) -> None:
        super().__init__("the story was cancelled")


class DeadlineExceededError(StorygenError):
    """The request passed its deadline before it finished."""

    def __init__(self, deadline_s: float) -> None:
        super().__init__(f"the story took longer than the {deadline_s:.0f} s allowed and was stopped; try a shorter length")


class WorkerUnavailableError(StorygenError):
    """The inference worker is not running (starting up, shutting down or failed)."""

    def __init__(self, state: str) -> None:
        super().__init__(f"the story engine is {state}; try again shortly")


class BackendsUnavailableError(WorkerUnavailableError):
    """No remote generation server is answering (STORYGEN_BACKEND=openai)."""

    def __init__(self, servers: int) -> None:
        StorygenError.__init__(self, f"generation servers unavailable (none of {servers} answers); "
                                     "try again shortly")


class GenerationFailedError(StorygenError):
    """Generation failed inside the model; the message carries a reference for the logs."""

    def __init__(self, ref: str) -> None:
        self.ref = ref
        super().__init__(f"Story generation failed (ref {ref})")


def failure_reference() -> str:
    """A short id shown to the user and written to the log beside the traceback."""
    return secrets.token_hex(2)
