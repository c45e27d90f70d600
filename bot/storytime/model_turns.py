"""Running the model's turn of a session through the shared worker.

One turn at a time per session (its worker user key is the session's, so a busy session
waits its turn in the fair queue like any one user). The turn is marked in the session
row before it is submitted; a restart that finds the mark runs the turn again, once:
`attempts` counts the starts, and a turn interrupted twice is given up, not looped.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace

from bot.storytime.limits import StorytimeLimits
from bot.storytime.prompt import story_prompt
from bot.storytime.session import Session, StorytimeError
from bot.storytime.surface import Surface
from storygen.config import StorygenConfig
from storygen.errors import BackendsUnavailableError, StorygenError, WorkerUnavailableError
from storygen.prompts import to_opening
from storygen.stories import Story, StoryRequest
from storygen.queue_front import QueueFront

logger = logging.getLogger(__name__)

FRAMING_TOKENS = 64  # room for a format's framing around the story (chat template, genre tag)
_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*(?=\s|$)")


def model_request(session: Session, config: StorygenConfig, limits: StorytimeLimits,
                  max_positions: int) -> StoryRequest:
    """The worker request for the session's next model line: its prompt is the story so far, trimmed to fit."""
    length = min(limits.model_tokens, config.limits.max_length)

    def fits(text: str) -> bool:
        # Characters for the worker's prompt cap (it would cut the end, the part the model continues);
        # bytes bound the tokens of a byte-level tokenizer, so the continuation always has room.
        return len(text) <= config.max_prompt_chars and len(text.encode()) + FRAMING_TOKENS + length <= max_positions

    prompt, missing = story_prompt([line.text for line in session.lines], fits)
    if missing:
        logger.info("session %s (%s): %s lines left out of the model's prompt", session.session_id, session.key,
                    missing)
    params = replace(config.defaults, length=length, seed=None)
    return StoryRequest(f"st{uuid.uuid4().hex[:10]}", session.key, session.genre, prompt, params)


def model_line(request: StoryRequest, story: Story, config: StorygenConfig, limits: StorytimeLimits) -> str:
    """The new part of the story, as a line: a few sentences, cleaned; "" if nothing usable came."""
    shown = to_opening(request.prompt, config.max_prompt_chars)[0]
    text = story.text[len(shown):] if story.text.startswith(shown) else story.text
    return first_sentences(" ".join(to_opening(text, 100_000)[0].split()), limits.model_sentences)  # one paragraph


def first_sentences(text: str, count: int) -> str:
    for i, match in enumerate(_SENTENCE_END.finditer(text)):
        if i + 1 == count:
            return text[:match.end()].strip()
    return text.strip()


async def write_line(worker: QueueFront, surface: Surface, session: Session, label: str, request: StoryRequest,
                     limits: StorytimeLimits,
                     begun: Callable[[str], Awaitable[None]]) -> tuple[str, str | None, str | None]:
    """(the model's line, None, its message), or ("", what went wrong, None); the thread shows it as it
    is written. `begun(message id)` is awaited once its message is posted, for the caller to record;
    the caller settles the message once the line is committed, so a restart in between never leaves
    the thread showing a line the story does not have.

    Raises WorkerUnavailableError when the worker is shutting down: the turn is left for the next start.
    """
    ref = None
    try:
        handle = await worker.submit(request)
    except BackendsUnavailableError as error:  # the bot is up, its generation servers are not: the group is told
        return "", str(error), None
    except WorkerUnavailableError:
        raise
    except StorygenError as error:
        return "", str(error), None
    try:
        ref = await surface.begin(session, label)
        await begun(ref)
        await surface.stream(session, ref, label, handle)
        story = await handle
        text = model_line(request, story, worker.config, limits)
        if not text:
            raise StorytimeError("the model wrote nothing usable")
    except asyncio.CancelledError:
        handle.cancel()
        raise
    except Exception as error:
        handle.cancel()
        if not isinstance(error, StorygenError):
            logger.exception("storytime %s: model turn %s for %s failed", session.session_id, request.request_id,
                             session.key)
        if ref is not None:
            await surface.settle(session, ref, label, None)
        return "", str(error) if isinstance(error, StorygenError) else "an internal error", None
    return text, None, ref
