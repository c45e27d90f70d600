"""HTTP mode from Slack's side: serve a bolt AsyncApp on 127.0.0.1 and post signed requests to it.

The app is served by bolt's own aiohttp adapter (`AsyncApp.web_app()`, which wraps
`slack_bolt.adapter.aiohttp.to_bolt_request` / `to_aiohttp_response`), so the request
goes through the same verification and dispatch it would behind a real Request URL.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from slack_bolt.async_app import AsyncApp

from tests.fakes.slack_payloads import SLACK_USER_AGENT, form_body, interaction_body, retry_headers, sign

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"


@asynccontextmanager
async def serve(app: AsyncApp, path: str = "/slack/events") -> AsyncIterator[str]:
    """Run `app` on an ephemeral port; yields its Request URL."""
    runner = web.AppRunner(app.web_app(path=path), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}{path}"
    finally:
        await runner.cleanup()


@dataclass(frozen=True)
class Delivery:
    """The app's HTTP answer to one request from 'Slack'."""

    status: int
    text: str
    content_type: str
    seconds: float  # Slack gives up (and, for events, retries) after 3 seconds

    def json(self) -> Any:
        return json.loads(self.text)


class SlackSender:
    """Posts to an app the way Slack does: signed, with Slack's content types and user agent."""

    def __init__(self, url: str, signing_secret: str) -> None:
        self.url = url
        self.signing_secret = signing_secret
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> SlackSender:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def slash_command(self, fields: dict[str, str], **options: Any) -> Delivery:
        return await self.post(form_body(fields), content_type=FORM, **options)

    async def interaction(self, payload: dict[str, Any], **options: Any) -> Delivery:
        return await self.post(interaction_body(payload), content_type=FORM, **options)

    async def event(
        self, body: dict[str, Any], *, retry_num: int | None = None, retry_reason: str = "http_timeout", **options: Any
    ) -> Delivery:
        """An Events API delivery; `retry_num` adds Slack's X-Slack-Retry-* headers."""
        headers = retry_headers(retry_num, retry_reason) if retry_num is not None else {}
        return await self.post(json.dumps(body), content_type=JSON, headers=headers, **options)

    async def post(
        self,
        body: str,
        *,
        content_type: str,
        timestamp: int | None = None,
        signing_secret: str | None = None,
        signature: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Delivery:
        """Low level: sign `body` (with another secret, timestamp or a literal signature if asked) and POST it."""
        assert self._session is not None, "use `async with SlackSender(...)`"
        signed = sign(body, signing_secret or self.signing_secret, timestamp)
        if signature is not None:
            signed["X-Slack-Signature"] = signature
        all_headers = {"Content-Type": content_type, "User-Agent": SLACK_USER_AGENT, **signed, **(headers or {})}
        started = time.monotonic()
        async with self._session.post(self.url, data=body.encode(), headers=all_headers) as response:
            text = await response.text()
            return Delivery(
                status=response.status,
                text=text,
                content_type=response.content_type,
                seconds=time.monotonic() - started,
            )
