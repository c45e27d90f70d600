"""The fake's gateway: v10, JSON encoding, optional zlib-stream transport compression.

It follows https://discord.com/developers/docs/events/gateway: HELLO on connect,
HEARTBEAT -> HEARTBEAT_ACK, IDENTIFY -> READY + one GUILD_CREATE per guild,
RESUME -> the missed dispatches (original sequence numbers) + RESUMED, and the close
codes Discord uses for protocol errors (4001-4014).

Sharding (https://discord.com/developers/docs/events/gateway#sharding): an IDENTIFY may carry
`shard: [id, count]`. That session's READY then carries the same `shard`, and it gets READY's
guild list, GUILD_CREATE and every other event of a guild only where
`(guild_id >> 22) % count == id`; events outside any guild (DMs) go to shard 0 only. A session
without `shard` is shard 0 of 1 and gets everything. Every frame records the shard of its
connection's session, so a test can tell which shard delivered an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import zlib
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol

from aiohttp import WSMsgType, web

from .discord_objects import shard_of
from .discord_records import GatewayFrame, Log

logger = logging.getLogger(__name__)

# Opcodes.
DISPATCH, HEARTBEAT, IDENTIFY, PRESENCE_UPDATE, VOICE_STATE_UPDATE = 0, 1, 2, 3, 4
RESUME, RECONNECT, REQUEST_GUILD_MEMBERS, INVALID_SESSION, HELLO, HEARTBEAT_ACK = 6, 7, 8, 9, 10, 11

# Intents the fake filters on, and the privileged ones an app must be approved for.
GUILD_MEMBERS, GUILD_PRESENCES, GUILD_MESSAGES, DIRECT_MESSAGES, MESSAGE_CONTENT = (
    1 << 1, 1 << 8, 1 << 9, 1 << 12, 1 << 15,
)
PRIVILEGED_INTENTS = GUILD_MEMBERS | GUILD_PRESENCES | MESSAGE_CONTENT

# Close codes the client may resume after; discord.py treats every other 4xxx as fatal.
RESUMABLE_CLOSE = 4000
INVALID_SHARD = 4010

# Events whose payload is the guild itself, so its id is "id", not "guild_id".
_GUILD_OBJECT_EVENTS = frozenset({"GUILD_CREATE", "GUILD_UPDATE", "GUILD_DELETE"})


class GatewayWorld(Protocol):
    """What the gateway needs to know about the fake's guilds and bot."""

    token: str
    allowed_intents: int

    def ready(self, session_id: str, resume_gateway_url: str) -> dict[str, Any]: ...
    def guild_creates(self) -> list[dict[str, Any]]: ...
    def guild_members(self, guild_id: str) -> list[dict[str, Any]]: ...


@dataclass
class GatewayConnection:
    """One websocket; Discord compresses all of a connection's frames with one zlib stream."""

    index: int
    path: str
    query: dict[str, str]
    ws: web.WebSocketResponse
    compressor: Any | None
    session: GatewaySession | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    closed_by_fake: bool = False

    async def close(self, code: int, reason: str) -> None:
        self.closed_by_fake = True
        await self.ws.close(code=code, message=reason[:120].encode())

    @property
    def open(self) -> bool:
        return not self.ws.closed


@dataclass
class GatewaySession:
    """A session outlives connections: RESUME re-attaches a new one and replays what it missed."""

    session_id: str
    intents: int
    shard: tuple[int, int] | None = None  # (id, count) from IDENTIFY; None: unsharded, i.e. shard 0 of 1
    seq: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    connection: GatewayConnection | None = None

    @property
    def shard_id(self) -> int | None:
        return None if self.shard is None else self.shard[0]

    def owns(self, guild_id: str | None) -> bool:
        """Whether Discord sends this session the events of `guild_id` (None: outside any guild, e.g. a DM)."""
        shard_id, count = self.shard or (0, 1)
        return shard_id == 0 if guild_id is None else shard_of(guild_id, count) == shard_id


class FakeGateway:
    def __init__(self, world: GatewayWorld, *, heartbeat_interval_ms: int = 41250) -> None:
        self.world = world
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.ack_heartbeats = True  # False simulates a zombie connection
        self.frames: Log[GatewayFrame] = Log()
        self.connections: list[GatewayConnection] = []
        self.sessions: dict[str, GatewaySession] = {}
        self.problems: list[str] = []
        self.resume_url = ""  # set by the server once it knows its port
        self._accepting = asyncio.Event()
        self._accepting.set()

    # -- counts tests assert on ------------------------------------------------

    @property
    def identify_count(self) -> int:
        return len(self.frames.find(lambda f: f.direction == "recv" and f.op == IDENTIFY))

    @property
    def resume_count(self) -> int:
        return len(self.frames.find(lambda f: f.direction == "recv" and f.op == RESUME))

    # -- driving the client ------------------------------------------------------

    async def dispatch(
        self, event: str, data: Any | Callable[[int], Any], *, intent: int | None = None
    ) -> list[int]:
        """Send a DISPATCH to every session that owns its guild (and subscribed to `intent`); returns the
        sequence numbers.

        `data` may be a function of the session's intents, for events Discord redacts per intent.
        The guild is the payload's "guild_id" (its "id" for GUILD_CREATE/UPDATE/DELETE).
        A session whose socket is down still gets a sequence number and the event is replayed on RESUME.
        """
        if not self.sessions:
            raise RuntimeError(f"cannot dispatch {event}: no client has identified with the fake gateway")
        sequences = []
        for session in list(self.sessions.values()):
            if intent is None or session.intents & intent:
                payload = data(session.intents) if callable(data) else data
                if session.owns(_guild_of(event, payload)):
                    sequences.append(await self._dispatch(session, event, payload))
        return sequences

    async def disconnect(self, code: int = RESUMABLE_CLOSE, reason: str = "fake disconnect") -> None:
        """Drop every open socket, as a Discord-side network blip or gateway restart would."""
        for session in self.sessions.values():
            session.connection = None  # from here on, dispatches wait in history for a RESUME
        for conn in self.connections:
            if conn.open:
                await conn.close(code, reason)

    @contextlib.asynccontextmanager
    async def down(self, code: int = RESUMABLE_CLOSE) -> AsyncIterator[None]:
        """Disconnect, and keep new connections waiting for HELLO until the block ends.

        Whatever is dispatched inside the block is missed by the client for certain and
        must come back through RESUME's replay.
        """
        self._accepting.clear()
        try:
            await self.disconnect(code)
            yield
        finally:
            self._accepting.set()

    async def send_op(self, op: int, d: Any = None) -> None:
        """Send a bare opcode (RECONNECT, HEARTBEAT request, INVALID_SESSION) on every open socket."""
        for conn in self.connections:
            if conn.open and conn.session is not None:
                await self._send(conn, {"op": op, "d": d})

    async def invalidate_sessions(self, *, resumable: bool = False) -> None:
        """Op 9. With resumable=False the sessions are gone and the client must IDENTIFY again."""
        await self.send_op(INVALID_SESSION, resumable)
        if not resumable:
            self.sessions.clear()

    async def close(self) -> None:
        self._accepting.set()
        for conn in self.connections:
            if conn.open:
                await conn.close(1001, "fake discord shutting down")

    # -- the websocket endpoint -------------------------------------------------

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        query = dict(request.query)
        compress = query.get("compress")
        conn = GatewayConnection(
            index=len(self.connections),
            path=request.path,
            query=query,
            ws=ws,
            compressor=zlib.compressobj() if compress == "zlib-stream" else None,
        )
        self.connections.append(conn)
        if query.get("v") != "10":
            return await self._fail(conn, 4012, f"fake speaks gateway v10 only, got v={query.get('v')}")
        if query.get("encoding", "json") != "json":
            return await self._fail(conn, 4002, f"fake speaks encoding=json only, got {query['encoding']}")
        if compress not in (None, "zlib-stream"):
            # discord.py picks zstd-stream when `zstandard` is importable; this fake does not compress zstd.
            return await self._fail(conn, 4000, f"fake supports compress=zlib-stream only, got {compress}")

        await self._accepting.wait()
        await self._send(conn, {"op": HELLO, "d": {"heartbeat_interval": self.heartbeat_interval_ms}})
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                await self._fail(conn, 4002, f"expected a text frame, got {msg.type.name}")
                break
            await self._receive(conn, msg.data)
        # A client that closes with 1000/1001 ends its session; any other close leaves it resumable.
        logger.debug("gateway connection %s closed with %s", conn.index, ws.close_code)
        if conn.session is not None and not conn.closed_by_fake and ws.close_code in (1000, 1001):
            self.sessions.pop(conn.session.session_id, None)
        return ws

    async def _receive(self, conn: GatewayConnection, raw: str) -> None:
        try:
            payload = json.loads(raw)
            op, d = payload["op"], payload.get("d")
        except (ValueError, KeyError, TypeError):
            await self._fail(conn, 4002, f"could not decode payload: {raw[:200]!r}")
            return
        self.frames.append(GatewayFrame(conn.index, "recv", op, d=d, shard=_shard_id(conn)))

        if op == HEARTBEAT:
            if self.ack_heartbeats:
                await self._send(conn, {"op": HEARTBEAT_ACK})
        elif op == IDENTIFY:
            await self._identify(conn, d)
        elif op == RESUME:
            await self._resume(conn, d)
        elif conn.session is None:
            await self._fail(conn, 4003, f"op {op} sent before IDENTIFY/RESUME")
        elif op == REQUEST_GUILD_MEMBERS:
            await self._send_member_chunk(conn.session, d)
        elif op not in (PRESENCE_UPDATE, VOICE_STATE_UPDATE):
            await self._fail(conn, 4001, f"unknown opcode {op}")

    async def _identify(self, conn: GatewayConnection, d: dict[str, Any]) -> None:
        if conn.session is not None:
            await self._fail(conn, 4005, "IDENTIFY on an already identified connection")
            return
        if d.get("token") != self.world.token:
            await self._fail(conn, 4004, "IDENTIFY with the wrong token")
            return
        intents = d.get("intents")
        if not isinstance(intents, int):
            await self._fail(conn, 4013, f"IDENTIFY without valid intents: {intents!r}")
            return
        if intents & PRIVILEGED_INTENTS & ~self.world.allowed_intents:
            await self._fail(conn, 4014, f"privileged intents not enabled for this app: {intents:#x}")
            return
        shard = d.get("shard")
        if shard is not None and not _valid_shard(shard):
            await self._fail(conn, INVALID_SHARD, f"IDENTIFY with an invalid shard: {shard!r}")
            return
        session = GatewaySession(session_id=secrets.token_hex(16), intents=intents,
                                 shard=tuple(shard) if shard is not None else None)
        self.sessions[session.session_id] = session
        self._attach(session, conn)
        ready = self.world.ready(session.session_id, self.resume_url)
        ready["guilds"] = [guild for guild in ready["guilds"] if session.owns(guild["id"])]
        if session.shard is not None:
            ready["shard"] = list(session.shard)
        await self._dispatch(session, "READY", ready)
        for guild in self.world.guild_creates():
            if session.owns(guild["id"]):
                await self._dispatch(session, "GUILD_CREATE", guild)

    async def _resume(self, conn: GatewayConnection, d: dict[str, Any]) -> None:
        session = self.sessions.get(d.get("session_id", ""))
        if session is None or d.get("token") != self.world.token:
            # Discord answers an unknown or expired session with op 9 d=false.
            await self._send(conn, {"op": INVALID_SESSION, "d": False})
            return
        old = session.connection
        self._attach(session, conn)
        if old is not None and old is not conn and old.open:
            await old.close(RESUMABLE_CLOSE, "session resumed elsewhere")
        last_seen = d.get("seq") or 0
        for frame in session.history:
            if frame["s"] > last_seen:
                await self._send(conn, frame)
        # d must be an object: discord.py writes its shard id into it.
        await self._dispatch(session, "RESUMED", {"_trace": ['["fake-discord",{"micros":0}]']})

    async def _send_member_chunk(self, session: GatewaySession, d: dict[str, Any]) -> None:
        guild_id = str(d["guild_id"])
        chunk = {
            "guild_id": guild_id,
            "members": self.world.guild_members(guild_id),
            "chunk_index": 0,
            "chunk_count": 1,
            "not_found": [],
        }
        if "nonce" in d:
            chunk["nonce"] = d["nonce"]
        await self._dispatch(session, "GUILD_MEMBERS_CHUNK", chunk)

    # -- plumbing ------------------------------------------------------------------

    @staticmethod
    def _attach(session: GatewaySession, conn: GatewayConnection) -> None:
        session.connection = conn
        conn.session = session

    async def _dispatch(self, session: GatewaySession, event: str, data: Any) -> int:
        session.seq += 1
        frame = {"op": DISPATCH, "t": event, "s": session.seq, "d": data}
        session.history.append(frame)
        conn = session.connection
        if conn is not None and conn.open:
            await self._send(conn, frame)
        return session.seq

    async def _send(self, conn: GatewayConnection, payload: dict[str, Any]) -> None:
        raw = json.dumps(payload, separators=(",", ":")).encode()
        # One lock per socket: the zlib stream must be written in the order it was compressed.
        async with conn.lock:
            if not conn.open:
                return
            self.frames.append(GatewayFrame(conn.index, "send", payload["op"], payload.get("t"), payload.get("s"),
                                            payload.get("d"), shard=_shard_id(conn)))
            try:
                if conn.compressor is None:
                    await conn.ws.send_str(raw.decode())
                else:
                    # zlib-stream: one shared context, each message ends with a Z_SYNC_FLUSH (00 00 ff ff).
                    await conn.ws.send_bytes(conn.compressor.compress(raw) + conn.compressor.flush(zlib.Z_SYNC_FLUSH))
            except ConnectionError:
                logger.debug("gateway connection %s went away while sending op %s", conn.index, payload["op"])

    async def _fail(self, conn: GatewayConnection, code: int, problem: str) -> web.WebSocketResponse:
        self.problems.append(f"gateway close {code}: {problem}")
        logger.warning("fake gateway closing connection %s with %s: %s", conn.index, code, problem)
        await conn.close(code, problem)
        return conn.ws


def _guild_of(event: str, payload: Any) -> str | None:
    if not isinstance(payload, dict):
        return None
    guild_id = payload.get("id") if event in _GUILD_OBJECT_EVENTS else payload.get("guild_id")
    return None if guild_id is None else str(guild_id)


def _valid_shard(shard: Any) -> bool:
    """[id, count] with 0 <= id < count, as Discord accepts it (else it closes with 4010)."""
    return (isinstance(shard, list) and len(shard) == 2 and all(type(n) is int for n in shard)
            and 0 <= shard[0] < shard[1])


def _shard_id(conn: GatewayConnection) -> int | None:
    return None if conn.session is None else conn.session.shard_id
