"""The caller's side of one request in the worker: stream it, await it, cancel it, ask where it is.

    handle = await worker.submit(request)
    async for chunk in handle: ...      # text as it is written
    story = await handle                # the finished Story, or a StorygenError
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

from storygen.stories import PreparedStory, Story


class _Owner(Protocol):
    """What a handle asks of the worker that made it."""

    def position(self, request_id: str) -> int | None: ...
    def eta_for(self, position: int) -> float: ...
    def cancel(self, request_id: str) -> bool: ...


class StoryHandle:
    """The caller's side of one request: stream it, await it, cancel it, ask where it is."""

    def __init__(self, worker: _Owner, prepared: PreparedStory, loop: asyncio.AbstractEventLoop) -> None:
        self._worker = worker
        self.request_id = prepared.request.request_id
        self.user_key = prepared.request.user_key
        self.genre = prepared.genre.name
        self.notices = prepared.notices
        self._loop = loop
        self._chunks: asyncio.Queue[str | None] = asyncio.Queue()
        self._result: asyncio.Future[Story] = loop.create_future()
        self.state = "queued"  # queued, running, done, failed, cancelled

    @property
    def position(self) -> int | None:
        """Stories that will start before this one (0: next); None once it is running."""
        return self._worker.position(self.request_id)

    @property
    def eta_s(self) -> float | None:
        """Rough seconds until it starts; None once it is running."""
        position = self.position
        return None if position is None else self._worker.eta_for(position)

    def cancel(self) -> bool:
        """Stop it: a queued request never reaches the model, a running one frees its slot next step."""
        return self._worker.cancel(self.request_id)

    def done(self) -> bool:
        return self._result.done()

    async def __aiter__(self) -> AsyncIterator[str]:
        while (chunk := await self._chunks.get()) is not None:
            yield chunk

    def __await__(self):
        return asyncio.shield(self._result).__await__()

    # Called on the event loop by the engine loop (through call_soon_threadsafe).
    def _chunk(self, text: str) -> None:
        self.state = "running"
        self._chunks.put_nowait(text)

    def _resolve(self, story: Story | None, error: BaseException | None, state: str) -> None:
        if self._result.done():
            return
        self.state = state
        if error is not None:
            self._result.set_exception(error)
            self._result.exception()  # mark retrieved: a caller that only streamed is not warned
        else:
            self._result.set_result(story)
        self._chunks.put_nowait(None)


def fan_out(chunks: list[tuple[StoryHandle, str]]) -> None:
    for handle, text in chunks:
        handle._chunk(text)
