"""pytest fixtures and helpers for running a real discord.py client against FakeDiscord."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

import discord
import pytest

from bot.discord.endpoints import point_discord_at

from .fake_discord import FakeDiscord


@pytest.fixture
async def fake_discord() -> AsyncIterator[FakeDiscord]:
    """A running FakeDiscord with discord.py pointed at it; both undone afterwards."""
    async with FakeDiscord() as fake:
        restore = point_discord_at(fake.api_url, fake.gateway_url)
        try:
            yield fake
        finally:
            restore()


@contextlib.asynccontextmanager
async def connected(client: discord.Client, fake: FakeDiscord, *, timeout: float = 5.0) -> AsyncIterator[None]:
    """Log `client` in to `fake`, wait for on_ready, and close it on exit.

    Build the client with a small `guild_ready_timeout` (e.g. 0.05): discord.py waits that
    long after the last GUILD_CREATE before it fires on_ready (2 s by default).
    """
    async with client:
        runner = asyncio.create_task(client.start(fake.token), name="discord-client")
        ready = asyncio.create_task(client.wait_until_ready())
        try:
            await asyncio.wait({runner, ready}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not ready.done():
                ready.cancel()
                failure = runner.exception() if runner.done() else None
                problems = fake.problems
                raise TimeoutError(f"client did not become ready within {timeout}s; fake saw: {problems}") from failure
            yield
        finally:
            await client.close()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(runner, timeout)
