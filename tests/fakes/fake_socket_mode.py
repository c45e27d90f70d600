"""The Socket Mode side of the fake: the WebSocket that apps.connections.open points at.

Protocol, as slack_sdk's aiohttp SocketModeClient expects it: the app calls
apps.connections.open with an xapp- token, connects to the returned URL (one-use ticket),
gets `{"type": "hello", ...}`, then receives envelopes and answers each with
`{"envelope_id": ..., "payload": {...}?}` within 3 seconds. `{"type": "disconnect"}`
makes the client fetch a new URL and reconnect. Pings are answered by aiohttp.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from tests.fakes.recording import DEFAULT_TIMEOUT, Recording
from tests.fakes.slack_payloads import envelope
from tests.fakes.workspace import APP_ID

_DEBUG_HOST = "applink-fake-0"


@dataclass(frozen=True)
class SocketConnection:
    """One accepted WebSocket; `number` counts from 1 over the fake's life."""

    number: int
    ticket: str


@dataclass(frozen=True)
class SocketAck:
    """What the app sent back for an envelope."""

    envelope_id: str | None
    payload: dict[str, Any] | None  # the ack()'s response body, when the app gave one
    latency: float | None  # seconds from push to ack (Slack wants < 3); None for unknown ids
    raw: str

    def __str__(self) -> str:
        return f"ack {self.envelope_id} payload={self.payload!r}"


class FakeSocketMode:
    """Accepts Socket Mode connections, pushes envelopes to the newest one, records acks."""

    def __init__(self) -> None:
        self.connections: Recording[SocketConnection] = Recording("Socket Mode connection")
        self.acks: Recording[SocketAck] = Recording("Socket Mode ack")
        self._tickets: set[str] = set()
        self._open: list[web.WebSocketResponse] = []
        self._pushed_at: dict[str, float] = {}

    def issue_url(self, ws_base: str) -> str:
        """What apps.connections.open returns: a ws URL with a fresh one-use ticket."""
        ticket = str(uuid.uuid4())
        self._tickets.add(ticket)
        return f"{ws_base}/link/?ticket={ticket}&app_id={APP_ID}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ticket = request.query.get("ticket", "")
        if ticket not in self._tickets:
            return web.Response(status=401, text="invalid_ticket")
        self._tickets.discard(ticket)
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self._open.append(ws)
        try:
            await ws.send_json(
                {
                    "type": "hello",
                    "num_connections": len(self._open),
                    "debug_info": {"host": _DEBUG_HOST, "build_number": 1, "approximate_connection_time": 18060},
                    "connection_info": {"app_id": APP_ID},
                }
            )
            self.connections.append(SocketConnection(number=len(self.connections) + 1, ticket=ticket))
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    self._record_ack(message.data)
        finally:
            self._open.remove(ws)
        return ws

    def _record_ack(self, raw: str) -> None:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            data = {}
        envelope_id = data.get("envelope_id") if isinstance(data, dict) else None
        pushed_at = self._pushed_at.pop(envelope_id, None) if envelope_id else None
        latency = asyncio.get_running_loop().time() - pushed_at if pushed_at is not None else None
        payload = data.get("payload") if isinstance(data, dict) else None
        self.acks.append(SocketAck(envelope_id=envelope_id, payload=payload, latency=latency, raw=raw))

    async def wait_connected(self, count: int = 1, timeout: float = DEFAULT_TIMEOUT) -> SocketConnection:
        """Wait until `count` connections have been accepted (and sent hello)."""
        return await self.connections.wait_for(lambda c: c.number >= count, timeout)

    def _newest(self) -> web.WebSocketResponse:
        live = [ws for ws in self._open if not ws.closed]
        if not live:
            raise RuntimeError("no Socket Mode client is connected to the fake")
        return live[-1]

    async def push(self, envelope_type: str, payload: dict[str, Any], **envelope_options: Any) -> str:
        """Send one envelope (see slack_payloads.envelope) and return its envelope_id."""
        message = envelope(envelope_type, payload, **envelope_options)
        self._pushed_at[message["envelope_id"]] = asyncio.get_running_loop().time()
        await self._newest().send_json(message)
        return str(message["envelope_id"])

    async def deliver(
        self, envelope_type: str, payload: dict[str, Any], *, timeout: float = DEFAULT_TIMEOUT, **envelope_options: Any
    ) -> SocketAck:
        """Push an envelope and wait for the app's ack of it."""
        envelope_id = await self.push(envelope_type, payload, **envelope_options)
        return await self.acks.wait_for(lambda ack: ack.envelope_id == envelope_id, timeout)

    async def send_disconnect(self, reason: str = "refresh_requested") -> None:
        """Ask the client to reconnect, as Slack does every few hours ("refresh_requested")."""
        await self._newest().send_json({"type": "disconnect", "reason": reason, "debug_info": {"host": _DEBUG_HOST}})

    async def close_all(self) -> None:
        for ws in list(self._open):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
