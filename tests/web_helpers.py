"""The HTTP front-end on 127.0.0.1 (a free port) over the tiny model, and an SSE reader for tests."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace

import aiohttp

from bot.config import BotConfig
from bot.web.server import WebFrontEnd
from tests.conftest import running_service, tiny_config


@contextlib.asynccontextmanager
async def web_front_end(lm, tmp_path, *, storygen=None, **config):
    """A started WebFrontEnd serving a running StoryService; stopped afterwards."""
    bot_config = replace(BotConfig(), http_port=0, **config)
    storygen_config = storygen or tiny_config(lm.name, "instruct", tmp_path)
    async with running_service(lm, storygen_config) as service:
        web = WebFrontEnd(bot_config)
        await web.start()
        web.serve(service)
        try:
            yield web
        finally:
            await web.stop()


async def read_sse(response: aiohttp.ClientResponse) -> list[dict | str]:
    """Every `data:` payload of an SSE response, JSON-decoded, "[DONE]" as the string."""
    events: list[dict | str] = []
    buffer = b""
    async for chunk in response.content.iter_any():
        buffer += chunk
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            for line in block.decode().splitlines():
                if line.startswith("data: "):
                    payload = line[6:]
                    events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
