"""A story under way, as the HTTP side sees it: Server-Sent Events, or one awaited result.

SSE as OpenAI's and vLLM's servers send it: `data: {...}` lines, `data: [DONE]` at the end.
A client that goes away cancels its story at once: Starlette cancels the streaming body
when the connection closes, and `events` cancels the handle on its way out; `await_story`
polls the connection while it waits.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from bot.service import Started
from storygen.errors import StorygenError, WorkerUnavailableError
from storygen.stories import Story

logger = logging.getLogger(__name__)

POSITION_POLL_S = 0.5  # how often a waiting story's queue position is re-read
DISCONNECT_POLL_S = 0.25
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no buffering in nginx and the like


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


DONE = sse("[DONE]")


@dataclass
class LiveStories:
    """The stories the HTTP side is waiting on, so a shutdown can tell them why they stop."""

    handles: set[Any] = field(default_factory=set)
    closing: bool = False
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # set by stop_all: answer now, don't wait

    def stop_all(self) -> int:
        """After the drain's grace: cancel what is left, and answer them now that the bot is shutting
        down (a cancelled row leaves the batch at the next step, which a loaded CPU may take a while to reach)."""
        self.closing = True
        self.closed.set()
        left = [h for h in self.handles if not h.done()]
        for handle in left:
            handle.cancel()
        return len(left)

    def error_for(self, error: BaseException) -> BaseException:
        return WorkerUnavailableError("shutting down") if self.closing else error


async def events(started: Started, live: LiveStories) -> AsyncIterator[dict[str, Any] | Story | BaseException]:
    """What happens to a story, in order: {"type": "queued", ...} while it waits, {"type": "running"}
    when it leaves the queue, {"type": "chunk", "text"} as it is written, then the finished Story,
    or the exception it ended with."""
    handle = started.handle
    live.handles.add(handle)
    chunks = handle.__aiter__()
    pending: asyncio.Future[str] | None = None
    closed = asyncio.ensure_future(live.closed.wait())
    last_position: int | None = None
    try:
        while True:
            position = handle.position
            if position is not None and position != last_position:
                yield {"type": "queued", "position": position + 1, "eta_s": round(handle.eta_s or 0, 1)}
            elif position is None and last_position is not None and not handle.done():
                yield {"type": "running"}
            last_position = position
            if pending is None:
                pending = asyncio.ensure_future(anext(chunks))
            done, _ = await asyncio.wait({pending, closed}, timeout=POSITION_POLL_S if position is not None else None,
                                         return_when=asyncio.FIRST_COMPLETED)
            if live.closed.is_set():
                yield WorkerUnavailableError("shutting down")
                return
            if pending not in done:
                continue
            try:
                text = pending.result()
            except StopAsyncIteration:
                break
            finally:
                if pending.done():
                    pending = None
            yield {"type": "chunk", "text": text}
        try:
            yield await handle
        except StorygenError as error:
            yield live.error_for(error)
    finally:
        closed.cancel()
        if pending is not None:
            pending.cancel()
        if not handle.done():  # the client went away, or the bot is stopping
            handle.cancel()
            logger.info("story %s for %s cancelled: %s", started.request.request_id, started.request.user_key,
                        "the bot is stopping" if live.closing else "the HTTP client went away")
        live.handles.discard(handle)


async def await_story(request: Request, started: Started, live: LiveStories) -> Story:
    """The finished story; cancels it if the client disconnects while waiting."""
    handle = started.handle
    live.handles.add(handle)

    async def wait() -> Story:
        return await handle

    task = asyncio.ensure_future(wait())
    closed = asyncio.ensure_future(live.closed.wait())
    try:
        while not task.done():
            await asyncio.wait({task, closed}, timeout=DISCONNECT_POLL_S, return_when=asyncio.FIRST_COMPLETED)
            if live.closed.is_set() and not task.done():
                raise WorkerUnavailableError("shutting down")
            if not task.done() and await request.is_disconnected():
                handle.cancel()
                logger.info("story %s for %s cancelled: the HTTP client went away",
                            started.request.request_id, started.request.user_key)
        try:
            return task.result()
        except StorygenError as error:
            raise live.error_for(error) from None
    finally:
        closed.cancel()
        if not task.done():
            task.cancel()
        live.handles.discard(handle)
