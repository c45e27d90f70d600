"""Where discord.py sends its REST calls and opens its gateway.

discord.py 2.x has no per-client setting for either, so both are class attributes:

- REST: every URL is `discord.http.Route.BASE + path`, computed when a `Route` is
  constructed. Interaction callbacks and follow-ups (discord/webhook/async_.py) import
  that same `Route`, so one assignment moves the bot's calls *and* its interaction
  responses. Attachment and avatar URLs are taken from the payloads, not from here.
- Gateway: `Client.connect()` opens `DiscordWebSocket.DEFAULT_GATEWAY` directly; it never
  asks GET /gateway/bot. `AutoShardedClient` does the same with a shard count
  (DISCORD_SHARDS=N); without one (DISCORD_SHARDS=auto) it asks GET /gateway/bot for the
  count and then opens the URL that answer names, not DEFAULT_GATEWAY.
  After READY the client resumes on the `resume_gateway_url` the gateway sent, and goes
  back to DEFAULT_GATEWAY after an invalidated session.

`__main__` calls `point_discord_at` when the DISCORD_API_URL / DISCORD_GATEWAY_URL settings
are set (a local fake Discord, a proxy). Tests point discord.py at the fake and then call
the function `point_discord_at` returns, so no test leaks the URLs into the next one.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable, Iterator

import yarl
from discord.gateway import DiscordWebSocket
from discord.http import Route

logger = logging.getLogger(__name__)

DEFAULT_API_URL = "https://discord.com/api/v10"
DEFAULT_GATEWAY_URL = "wss://gateway.discord.gg/"


def point_discord_at(base_url: str, gateway_url: str) -> Callable[[], None]:
    """Send discord.py's REST calls to `base_url` and its gateway connection to `gateway_url`.

    base_url: the REST root including the version, e.g. "http://127.0.0.1:8080/api/v10";
              a bare origin ("http://127.0.0.1:8080") gets "/api/v10" appended.
    gateway_url: a ws:// or wss:// URL, e.g. "ws://127.0.0.1:8080/gateway".

    Returns a function that puts back the URLs that were in place before this call.
    """
    api = yarl.URL(base_url)
    if api.scheme not in ("http", "https") or not api.host:
        raise ValueError(f"DISCORD_API_URL={base_url!r} is not an http(s) URL")
    gateway = yarl.URL(gateway_url)
    if gateway.scheme not in ("ws", "wss") or not gateway.host:
        raise ValueError(f"DISCORD_GATEWAY_URL={gateway_url!r} is not a ws(s) URL")
    if api.path in ("", "/"):
        api = api.with_path("/api/v10")

    previous = (Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY)
    Route.BASE = str(api).rstrip("/")
    DiscordWebSocket.DEFAULT_GATEWAY = gateway
    logger.info("discord.py pointed at %s (gateway %s)", Route.BASE, gateway)

    def restore() -> None:
        Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = previous

    return restore


def restore_discord_defaults() -> None:
    """Point discord.py back at discord.com, whatever was set before."""
    Route.BASE = DEFAULT_API_URL
    DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(DEFAULT_GATEWAY_URL)


@contextmanager
def discord_pointed_at(base_url: str, gateway_url: str) -> Iterator[None]:
    """`point_discord_at` for the length of a `with` block."""
    restore = point_discord_at(base_url, gateway_url)
    try:
        yield
    finally:
        restore()
