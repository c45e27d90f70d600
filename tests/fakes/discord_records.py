"""What the fake Discord saw: every REST request and every gateway frame, awaitable."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Mapping, TypeVar

from multidict import CIMultiDictProxy

T = TypeVar("T")


@dataclass(frozen=True)
class RecordedFile:
    """One file part of a multipart request (`files[0]`, `files[1]`, ...)."""

    field: str
    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class RecordedRequest:
    """One REST call as it arrived, and what the fake answered."""

    method: str
    path: str  # below the API root, e.g. "/channels/1/messages"; full path when outside /api/v10
    route: str | None  # the matched template, e.g. "POST /channels/{channel_id}/messages"; None if unknown
    params: Mapping[str, str]  # path parameters of the matched route
    query: Mapping[str, str]
    headers: CIMultiDictProxy[str]  # case-insensitive
    json: Any  # the JSON body, or payload_json of a multipart body, or None
    files: tuple[RecordedFile, ...]
    status: int
    response: Any

    @property
    def is_multipart(self) -> bool:
        return bool(self.files)


@dataclass(frozen=True)
class GatewayFrame:
    """One gateway payload, in either direction, on one websocket connection."""

    connection: int  # 0 for the first connection, 1 for the next, ...
    direction: str  # "recv" (client -> fake) or "send" (fake -> client)
    op: int
    t: str | None = None
    s: int | None = None
    d: Any = None
    shard: int | None = None  # the shard id the connection's session identified as; None: unsharded or not yet


@dataclass
class Log(Generic[T]):
    """An append-only list that tests can await on."""

    items: list[T] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def append(self, item: T) -> None:
        self.items.append(item)
        self._changed.set()

    def find(self, predicate: Callable[[T], bool]) -> list[T]:
        return [item for item in self.items if predicate(item)]

    async def wait_for(self, predicate: Callable[[T], bool], *, timeout: float = 5.0, count: int = 1) -> T:
        """The `count`-th item (past or future) matching `predicate`; TimeoutError lists what did arrive."""

        async def _wait() -> T:
            while True:
                matches = self.find(predicate)
                if len(matches) >= count:
                    return matches[count - 1]
                self._changed.clear()
                await self._changed.wait()

        try:
            return await asyncio.wait_for(_wait(), timeout)
        except TimeoutError:
            seen = "\n  ".join(_describe(item) for item in self.items[-20:]) or "(nothing)"
            raise TimeoutError(f"no match after {timeout}s; last items seen:\n  {seen}") from None


def _describe(item: Any) -> str:
    if isinstance(item, RecordedRequest):
        return f"{item.method} {item.path} -> {item.status}"
    if isinstance(item, GatewayFrame):
        shard = "" if item.shard is None else f" shard {item.shard}"
        return f"[conn {item.connection}{shard}] {item.direction} op={item.op} t={item.t} s={item.s}"
    return repr(item)
