"""The fair queue: one FIFO per user, served round-robin, with both caps.

A user who sends twenty stories gets one admitted per turn like everyone else, and a
newcomer with nothing running goes first, so they wait for one free slot, not for the
whole flood.
Not thread-safe: the worker holds its lock around every call.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from storygen.errors import QueueFullError, TooManyRequestsError

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class _Entry(Generic[T]):
    key: str
    user: str
    item: T


class FairQueue(Generic[T]):
    """Per-user FIFOs in a rotation. `running` counts a user's admitted items for the per-user cap."""

    def __init__(self, max_queued: int, max_per_user: int) -> None:
        self.max_queued = max_queued
        self.max_per_user = max_per_user
        self._queues: OrderedDict[str, deque[_Entry[T]]] = OrderedDict()  # rotation order: next user first
        self._running: dict[str, int] = {}
        self._served: dict[str, int] = {}  # user -> turn of their latest admission, for tie-breaks
        self._served_before: dict[str, int | None] = {}  # user -> that before their latest admission
        self._turn = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def queued(self, user: str) -> int:
        """How many of `user`'s items wait here."""
        return len(self._queues.get(user, ()))

    def in_progress(self, user: str) -> int:
        return len(self._queues.get(user, ())) + self._running.get(user, 0)

    def check(self, user: str, retry_after: Callable[[], float]) -> None:
        """Raise if `user` may not add one more item now."""
        if self.in_progress(user) >= self.max_per_user:
            raise TooManyRequestsError(self.max_per_user)
        if self._size >= self.max_queued:
            raise QueueFullError(retry_after())

    def push(self, key: str, user: str, item: T, retry_after: Callable[[], float] = lambda: 30.0) -> None:
        self.check(user, retry_after)
        self._queues.setdefault(user, deque()).append(_Entry(key, user, item))
        self._size += 1

    def push_front(self, key: str, user: str, item: T, served: bool = True) -> None:
        """Put a preempted item back at the head of its user's queue (no caps: it was admitted once).
        served=False: the admission it had does not count as the user's turn (right after `pop`)."""
        if not served:
            previous = self._served_before.get(user)
            if previous is None:
                self._served.pop(user, None)
            else:
                self._served[user] = previous
        self._queues.setdefault(user, deque()).appendleft(_Entry(key, user, item))
        self._queues.move_to_end(user, last=False)
        self._running[user] = max(0, self._running.get(user, 0) - 1)
        self._size += 1

    def peek(self) -> tuple[str, T] | None:
        """What `pop` would return next, left in place."""
        head = next(self._service_order(), None)
        return (head.key, head.item) if head is not None else None

    def pop(self) -> tuple[str, T] | None:
        """The next item in service order (see `_service_order`)."""
        for entry in self._service_order():
            queue = self._queues[entry.user]
            queue.popleft()
            self._size -= 1
            if queue:
                self._queues.move_to_end(entry.user)
            else:
                del self._queues[entry.user]
            self._running[entry.user] = self._running.get(entry.user, 0) + 1
            self._turn += 1
            self._served_before[entry.user] = self._served.get(entry.user)
            self._served[entry.user] = self._turn
            return entry.key, entry.item
        return None

    def _service_order(self) -> Iterator[_Entry[T]]:
        """The order items would be admitted in if nothing finished meanwhile.

        The user with the fewest stories running goes first; among equals, the one served
        longest ago (never served: first). With equal running counts that is round-robin,
        and a newcomer's first story is admitted at the next free slot, ahead of a
        flooder's second.
        """
        running = dict(self._running)
        served = dict(self._served)
        rotation = list(self._queues)
        depth = dict.fromkeys(rotation, 0)
        turn = self._turn
        while rotation:
            user = min(rotation, key=lambda u: (running.get(u, 0), served.get(u, -1)))
            yield self._queues[user][depth[user]]
            depth[user] += 1
            running[user] = running.get(user, 0) + 1
            turn += 1
            served[user] = turn
            rotation.remove(user)
            if depth[user] < len(self._queues[user]):
                rotation.append(user)

    def remove(self, key: str) -> T | None:
        """Take a queued item out (cancelled or expired); None if it is not queued."""
        for user, queue in self._queues.items():
            for entry in queue:
                if entry.key == key:
                    queue.remove(entry)
                    self._size -= 1
                    if not queue:
                        del self._queues[user]
                    return entry.item
        return None

    def finished(self, user: str) -> None:
        """An admitted item of `user` is done; frees one of their places."""
        left = self._running.get(user, 0) - 1
        if left > 0:
            self._running[user] = left
        else:
            self._running.pop(user, None)

    def position(self, key: str) -> int | None:
        """How many items will be admitted before this one (0: next), or None if not queued."""
        for ahead, entry in enumerate(self._service_order()):
            if entry.key == key:
                return ahead
        return None

    def items(self) -> Iterator[tuple[str, T]]:
        for queue in self._queues.values():
            for entry in queue:
                yield entry.key, entry.item
