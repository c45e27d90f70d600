"""Two StoryBots (`python -m bot`, HTTP only, the tiny model) serve a third as its generation servers.

Real processes on loopback and our real client: stories spread over both, cancelling closes the
stream on the server, and a server killed with SIGKILL mid-run costs no story, each finished once
with its text continuous; restarted, it is probed back into rotation.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import replace

import aiohttp
import pytest

from storygen.endings import finish_story
from storygen.errors import RequestCancelledError
from storygen.model import load_tokenizer
from storygen.remote.worker import RemoteWorker
from storygen.sampling import SamplingParams
from storygen.stories import StoryRequest
from tests.conftest import tiny_config
from tests.remote_helpers import KEY, StoryBotProcess, streamed, until



@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def storybots(tiny_dirs, tmp_path, http):
    bots = [StoryBotProcess(tiny_dirs["instruct"], tmp_path, f"backend{i}") for i in range(2)]
    try:
        await asyncio.gather(*(bot.start(http) for bot in bots))
        yield bots
    finally:
        await asyncio.gather(*(bot.stop() for bot in bots))


@contextlib.asynccontextmanager
async def front(tiny_dirs, tmp_path, bots):
    config = replace(tiny_config(tiny_dirs["instruct"], "instruct", tmp_path / "front"), backend="openai",
                     backend_urls=tuple(b.url for b in bots), backend_max_inflight=4, backend_timeout_s=5.0,
                     max_per_user=20, max_queue=100)
    from storygen.config import Secret

    config = replace(config, backend_api_key=Secret(KEY))
    worker = RemoteWorker(load_tokenizer(config), config, probe_interval_s=0.2)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()


def story_request(i: int, length: int) -> StoryRequest:
    return StoryRequest(f"s{i}", f"discord:g:{i % 3}", "sci_fi", f"Captain {i} woke",
                        SamplingParams(length=length, temperature=1.0))


async def test_stories_spread_over_two_storybots_and_cancel_closes_the_stream(tiny_dirs, tmp_path, storybots, http):
    async with front(tiny_dirs, tmp_path, storybots) as worker:
        assert [b["kind"] for b in worker.health()["backends"]] == ["storybot", "storybot"]
        handles = [await worker.submit(story_request(i, 40)) for i in range(6)]
        results = await asyncio.gather(*(streamed(h) for h in handles))
        assert all(not isinstance(story, Exception) for _, story in results), results
        done = [await bot.stories(http, "done") for bot in storybots]
        assert all(n >= 1 for n in done) and sum(done) == 6, done

        handle = await worker.submit(story_request(9, 400))
        chunks = aiter(handle)
        await anext(chunks)  # it is streaming from one of them
        handle.cancel()
        _, error = await streamed(handle)
        assert isinstance(error, RequestCancelledError)
        cancelled = [await bot.stories(http, "cancelled") for bot in storybots]
        for _ in range(100):
            if sum(cancelled) == 1:
                break
            await asyncio.sleep(0.05)
            cancelled = [await bot.stories(http, "cancelled") for bot in storybots]
        assert sum(cancelled) == 1  # the server stopped writing it: its stream was closed


async def test_a_storybot_killed_mid_run_costs_no_story_and_is_probed_back(tiny_dirs, tmp_path, storybots, http):
    async with front(tiny_dirs, tmp_path, storybots) as worker:
        lm = worker.lm
        handles = [await worker.submit(story_request(i, 400)) for i in range(8)]
        pieces: dict[str, list[str]] = {h.request_id: [] for h in handles}

        async def follow(handle):
            async for chunk in handle:
                pieces[handle.request_id].append(chunk)
            return await handle

        followers = [asyncio.create_task(follow(h)) for h in handles]
        await until(lambda: sum(bool(p) for p in pieces.values()) >= 4, timeout=30)
        storybots[0].kill()
        stories = await asyncio.wait_for(asyncio.gather(*followers), 120)

        assert len({s.request_id for s in stories}) == 8  # every story, each once
        for story, handle in zip(stories, handles):
            text = "".join(pieces[handle.request_id])
            opening = f"Captain {handle.request_id[1:]} woke"
            # The story is exactly the pieces its user saw, in order, finished as a local story would be.
            assert story.text == finish_story(opening, text, story.finish_reason == "stop", lm.controls)
        snapshot = worker.metrics.to_prometheus()
        resumed = float(re.search(r"^storygen_resumed_total (\S+)$", snapshot, re.M).group(1))
        assert resumed >= 1  # stories in flight on the dead one went on elsewhere
        assert worker.health()["backends"][0]["up"] is False

        await storybots[0].stop()
        await storybots[0].start(http)  # the same port again
        await until(lambda: worker.health()["backends"][0]["up"], timeout=30)
        after = await worker.submit(story_request(20, 20))
        assert (await after).text.startswith("Captain 20 woke")
