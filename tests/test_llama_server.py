"""llama.cpp's real `llama-server` as a generation server of the remote pool, on the default model's GGUF.

Runs where LLAMA_SERVER points at the binary (`bash ../shared/peers/build-llama-server.sh` builds it
in about 4 minutes, at /tmp/llama-server/bin/llama-server); skipped with the reason elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from storygen.config import StorygenConfig
from storygen.errors import ModelLoadError, RequestCancelledError
from storygen.model import default_gguf_path, load_tokenizer
from storygen.remote.worker import RemoteWorker
from storygen.sampling import SamplingParams
from storygen.stories import StoryRequest
from tests.remote_helpers import free_port, streamed, until

BINARY = os.environ.get("LLAMA_SERVER", "")
pytestmark = pytest.mark.skipif(not (BINARY and os.access(BINARY, os.X_OK)),
                                reason="set LLAMA_SERVER to a llama-server binary "
                                       "(bash ../shared/peers/build-llama-server.sh builds one)")


@pytest.fixture(scope="module")
def gguf() -> Path:
    try:
        return default_gguf_path()
    except ModelLoadError as error:
        pytest.skip(str(error))


@pytest.fixture
async def llama_server(gguf):
    port = free_port()
    process = subprocess.Popen([BINARY, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", "2",
                                "-np", "2", "-c", "4096", "--no-webui"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(600):
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(url + "/health") as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("llama-server did not become healthy")
            yield url, http
    finally:
        process.terminate()
        process.wait(10)


async def test_stories_stream_from_llama_server_and_cancel_stops_them(llama_server, tmp_path):
    url, http = llama_server
    config = replace(StorygenConfig(), backend="openai", backend_urls=(url + "/v1",), backend_max_inflight=2,
                     backend_timeout_s=30.0, settings_db=tmp_path / "front.sqlite3")
    worker = RemoteWorker(load_tokenizer(config), config)
    await worker.start()
    try:
        assert worker.health()["backends"][0]["kind"] == "llamacpp"
        handles = [await worker.submit(StoryRequest(f"l{i}", f"api:u{i}", "sci_fi", "The last ship left Mars",
                                                    SamplingParams(length=24, seed=i))) for i in range(2)]
        results = [await streamed(h) for h in handles]
        for text, story in results:
            assert not isinstance(story, Exception), story
            assert story.text.startswith("The last ship left Mars") and len(text.split()) >= 3
            assert story.finish_reason in ("stop", "length") and 0 < story.new_tokens <= 24

        long = await worker.submit(StoryRequest("l9", "api:u9", "horror", "The cellar door", SamplingParams(length=400)))
        pieces = aiter(long)
        await anext(pieces)
        long.cancel()
        _, error = await streamed(long)
        assert isinstance(error, RequestCancelledError)

        async def idle() -> bool:
            async with http.get(url + "/slots") as response:
                slots = await response.json()
            return not any(slot.get("is_processing") for slot in slots)

        for _ in range(100):
            if await idle():
                break
            await asyncio.sleep(0.05)
        assert await idle()  # the closed stream stopped the generation on the server
        await until(lambda: worker.health()["backends"][0]["inflight"] == 0)
    finally:
        await worker.stop()
