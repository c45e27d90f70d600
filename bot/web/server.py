"""The HTTP front-end: uvicorn serving bot.web's app inside the bot's event loop.

It starts before the model loads, so /healthz answers (503, "starting") while it does and
the playground page is there at once; story routes say the engine is starting up until
`serve(service)` hands it the service. The bot, not uvicorn, owns SIGINT and SIGTERM: it
drains first, then calls `stop()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn

from bot.config import BotConfig
from bot.service import StoryService
from bot.web.app import create_app
from bot.web.context import WebContext
from storygen.errors import ConfigError
from storygen.metrics import Metrics

logger = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 3.0  # after the drain: open streams get this long to send their last event


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the bot's own handlers drain first; uvicorn must not take them
        yield


class WebFrontEnd:
    def __init__(self, config: BotConfig) -> None:
        self.config = config
        self.web = WebContext(config)
        self.app = create_app(self.web)
        self.url = ""
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    def serve(self, service: StoryService, metrics: Metrics | None = None) -> None:
        """The model is loaded: start answering story routes."""
        self.web.service, self.web.metrics, self.web.state = service, metrics or service.worker.metrics, "serving"

    def failed(self) -> None:
        self.web.state = "failed"

    async def start(self) -> None:
        sock = _listen(self.config.http_host, self.config.http_port)
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=SHUTDOWN_TIMEOUT_S, ws="none")
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http server")
        while not self._server.started:
            if self._task.done():  # it failed to start; say why
                self._task.result()
                raise ConfigError(f"the HTTP server on {self.config.http_host}:{self.config.http_port} did not start")
            await asyncio.sleep(0.01)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}"
        logger.info("HTTP: serving the API and the playground on %s/ (docs at %s/docs)", self.url, self.url)

    async def stop(self) -> None:
        if (left := self.web.live.stop_all()):
            logger.info("HTTP: %s stories still open at shutdown are told so", left)
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._server = self._task = None


def _listen(host: str, port: int) -> socket.socket:
    """Bind here, so a port in use is one clear line instead of uvicorn's exit."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise ConfigError(f"HTTP_HOST={host!r} is not an address this machine has ({error.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise ConfigError(f"HTTP_PORT={port}: cannot listen on {host}:{port} ({error.strerror}); "
                          "set HTTP_PORT to a free port, or HTTP_ENABLED=false") from None
    sock.listen(512)
    sock.setblocking(False)
    return sock
