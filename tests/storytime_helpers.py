"""For the storytime tests: a clock a test moves by hand, a Surface that records what the thread
was told, and StorytimeService on a running worker with the tiny model, restartable mid-test."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
import pytest_asyncio

from bot.storytime.limits import StorytimeLimits
from bot.storytime.service import StorytimeService
from bot.storytime.store import SessionStore
from storygen.worker import Worker
from tests.conftest import tiny_config
from tests.model_hooks import endless, gate  # noqa: F401  (fixtures, re-exported)

_MESSAGE_IDS = itertools.count(1)
LIMITS = StorytimeLimits(model_tokens=6, turn_timeout_s=100, vote_timeout_s=60)


class Clock:
    """Wall-clock time as the test says it is."""

    def __init__(self, now: float = 1_764_763_200.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class RecordingSurface:
    said: list[str] = field(default_factory=list)
    begun: list[str] = field(default_factory=list)  # labels of the messages posted for model lines
    settled_messages: list[str] = field(default_factory=list)
    streamed: list[tuple[str, str]] = field(default_factory=list)  # (label, what arrived as chunks)
    settled: list[tuple[str, str | None]] = field(default_factory=list)
    offered: list[list[str]] = field(default_factory=list)
    files: list[tuple[str, str, str]] = field(default_factory=list)  # (filename, content, message)

    async def say(self, session, text: str) -> None:
        self.said.append(text)

    async def begin(self, session, label: str) -> str:
        self.begun.append(label)
        return f"m{next(_MESSAGE_IDS)}"  # unique across restarts, as a platform's message ids are

    async def stream(self, session, message: str, label: str, chunks) -> None:
        written = "".join([chunk async for chunk in chunks])
        self.streamed.append((label, written))

    async def settle(self, session, message: str, label: str, text: str | None) -> None:
        self.settled.append((label, text))
        self.settled_messages.append(message)

    async def offer_vote(self, session) -> None:
        self.offered.append(list(session.vote.options))

    async def attach(self, session, filename: str, content: str, text: str) -> None:
        self.files.append((filename, content, text))


@pytest.fixture
def lm(tiny_lms):
    return tiny_lms["instruct"]


@pytest.fixture
def storygen_config(lm, tmp_path):
    # Without the prefix cache: tests read the model turns' prompts from what the gate saw computed.
    return tiny_config(lm.name, "instruct", tmp_path, prefix_cache_mb=0)


@pytest_asyncio.fixture
async def worker(lm, storygen_config, endless):  # noqa: F811
    async with Worker(lm, storygen_config) as running:
        yield running


class Bot:
    """The storytime side of a bot process; `restart()` drops it as a crash would and starts another."""

    def __init__(self, worker: Worker, path, clock: Clock, limits: StorytimeLimits) -> None:
        self.worker, self.path, self.clock, self.limits = worker, path, clock, limits
        self.surface = RecordingSurface()
        self.service = self._new()

    def _new(self) -> StorytimeService:
        service = StorytimeService(self.worker, SessionStore(self.path), self.limits, self.clock)
        service.attach("slack", self.surface)
        return service

    async def restart(self) -> None:
        """The process dies: tasks in flight stop where they are and nothing more is written."""
        await self.service.close()
        self.service.store.close()
        self.surface = RecordingSurface()
        self.service = self._new()
        await self.service.resume("slack")

    async def stop(self) -> None:
        await self.service.close()
        self.service.store.close()


@pytest_asyncio.fixture
async def bot(worker, storygen_config):
    running = Bot(worker, storygen_config.settings_db, Clock(), LIMITS)
    yield running
    await running.stop()
