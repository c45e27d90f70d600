"""The servers in rotation: who is up, who takes the next story, who is probed back in.

A story goes to the server in rotation with the fewest requests in flight, under each
server's limit (STORYGEN_BACKEND_MAX_INFLIGHT). A server that fails (refuses connections,
times out, answers 5xx, sends a malformed stream) is taken out at once; a prober asks every
server out of rotation for its /models every few seconds and brings it back when it answers.
A server that fails again after coming back waits twice as long before its next probe (up to
a minute), so one that answers probes but breaks every stream does not take story after story.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp

from storygen.config import StorygenConfig
from storygen.metrics import Metrics
from storygen.remote.client import Backend, shared_session

logger = logging.getLogger(__name__)

PROBE_INTERVAL_S = 2.0
MAX_HOLD_S = 60.0  # the longest a failing server waits for its next probe


class BackendPool:
    """Routing and health of the remote servers. Only the asyncio loop touches it."""

    def __init__(self, config: StorygenConfig, metrics: Metrics, on_change: Callable[[], None],
                 probe_interval_s: float = PROBE_INTERVAL_S) -> None:
        self.metrics = metrics
        self.probe_interval_s = probe_interval_s
        self._on_change = on_change  # room may have opened: a server came back or a request ended
        self._connections = config.backend_max_inflight * len(config.backend_urls) + len(config.backend_urls)
        self._session: aiohttp.ClientSession | None = None
        self.backends = [Backend(url, config.backend_model, str(config.backend_api_key), config.backend_timeout_s,
                                 config.backend_max_inflight) for url in config.backend_urls]
        self._next = 0  # ties in load go round the servers
        self._prober: asyncio.Task | None = None
        for backend in self.backends:
            self._publish(backend)

    async def start(self) -> None:
        """Probe every server once, then keep probing those out of rotation."""
        self._session = shared_session(self._connections)  # streams, plus a probe each
        for backend in self.backends:
            backend.session = self._session
        await asyncio.gather(*(self._probe(b) for b in self.backends))
        up = [b.url for b in self.backends if b.up]
        logger.info("generation servers: %s of %s in rotation%s", len(up), len(self.backends),
                    f" ({', '.join(up)})" if up else "; stories are refused until one answers")
        self._prober = asyncio.create_task(self._probe_loop(), name="backend prober")

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    # --- routing -----------------------------------------------------------------------------

    def healthy(self) -> list[Backend]:
        return [b for b in self.backends if b.up]

    @property
    def capacity(self) -> int:
        """Requests the servers in rotation take at once."""
        return sum(b.max_inflight for b in self.healthy())

    def has_room(self) -> bool:
        return any(b.inflight < b.max_inflight for b in self.healthy())

    def take(self) -> Backend | None:
        """The server for the next request (counted in flight), or None when every one in rotation is full."""
        open_ = [b for b in self.healthy() if b.inflight < b.max_inflight]
        if not open_:
            return None
        n = len(self.backends)
        chosen = min(open_, key=lambda b: (b.inflight, (self.backends.index(b) - self._next) % n))
        self._next = (self.backends.index(chosen) + 1) % n
        chosen.inflight += 1
        self.metrics.backend_request(chosen.url)
        self._publish(chosen)
        return chosen

    def release(self, backend: Backend) -> None:
        backend.inflight -= 1
        self._publish(backend)
        self._on_change()

    # --- health ------------------------------------------------------------------------------

    def failed(self, backend: Backend, kind: str, detail: str) -> None:
        """A request to `backend` failed because of the server: take it out of rotation."""
        self.metrics.backend_error(backend.url, kind)
        backend.last_error = f"{kind}: {detail}"
        backend.failures += 1
        backend.hold_until = time.monotonic() + min(MAX_HOLD_S, self.probe_interval_s * 2 ** min(backend.failures, 10))
        if backend.up:
            backend.up = False
            backend.down_since = time.monotonic()
            logger.warning("generation server %s taken out of rotation (%s: %s); %s of %s left", backend.url,
                           kind, detail, len(self.healthy()), len(self.backends))
        self._publish(backend)

    def succeeded(self, backend: Backend) -> None:
        """A request to `backend` ran to its end: its failures are forgiven."""
        backend.failures = 0

    async def _probe(self, backend: Backend) -> None:
        problem = await backend.probe()
        if problem is None and not backend.up:
            was_down = time.monotonic() - (backend.down_since or time.monotonic())
            backend.up, backend.down_since, backend.last_error = True, None, None
            logger.info("generation server %s in rotation (%s, model %r)%s", backend.url, backend.dialect,
                        backend.model, f" after {was_down:.0f} s out" if was_down >= 1 else "")
            self._publish(backend)
            self._on_change()
        elif problem is not None:
            if backend.last_error != problem:
                logger.warning("generation server %s is out of rotation: %s", backend.url, problem)
            backend.last_error = problem

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval_s)
            now = time.monotonic()
            down = [b for b in self.backends if not b.up and now >= b.hold_until]
            if down:
                await asyncio.gather(*(self._probe(b) for b in down))

    def _publish(self, backend: Backend) -> None:
        self.metrics.backend_state(backend.url, backend.up, backend.inflight)

    def describe(self) -> list[dict]:
        now = time.monotonic()
        return [{"url": b.url, "up": b.up, "kind": b.dialect, "model": b.model, "inflight": b.inflight,
                 "failures": b.failures, "max_inflight": b.max_inflight, "last_error": b.last_error,
                 "down_s": None if b.down_since is None else round(now - b.down_since, 1)} for b in self.backends]
