"""An append-only log of what a fake server saw, which a test can await."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT = 5.0


class Recording(Generic[T]):
    """A list that servers append to and tests read, iterate or `await wait_for(...)` on.

    Everything runs on one event loop, so appends and waits need no locking.
    """

    def __init__(self, what: str) -> None:
        self._what = what  # used in timeout messages: "no API call matched ..."
        self._items: list[T] = []
        self._waiters: list[tuple[Callable[[T], bool], asyncio.Future[T]]] = []

    def append(self, item: T) -> None:
        self._items.append(item)
        for predicate, future in list(self._waiters):
            if future.done():
                continue
            try:
                if predicate(item):
                    future.set_result(item)
            except Exception as error:  # a broken predicate is the test's bug: surface it there
                future.set_exception(error)

    async def wait_for(self, predicate: Callable[[T], bool], timeout: float = DEFAULT_TIMEOUT) -> T:
        """Return the first item (already seen or still to come) matching `predicate`."""
        for item in self._items:
            if predicate(item):
                return item
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        waiter = (predicate, future)
        self._waiters.append(waiter)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            seen = "\n  ".join(str(item) for item in self._items) or "(nothing)"
            raise AssertionError(f"no {self._what} matched within {timeout}s; saw:\n  {seen}") from None
        finally:
            self._waiters.remove(waiter)

    def clear(self) -> None:
        self._items.clear()

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> T:
        return self._items[index]

    def __repr__(self) -> str:
        return f"Recording({self._what}, {len(self._items)} items)"
