"""What the HTTP routes share: the service (once the model is loaded), the config, who is calling.

Every route goes through the same StoryService as the chat front-ends, so the worker's
per-user caps and fair queue hold for the API too. A caller is `api:key-<fingerprint>`
with an API key (a hash, so no key reaches a log line) or `api:<client address>`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass, field

from fastapi import Request

from bot.config import BotConfig
from bot.service import ChatContext, StoryService
from bot.web.streams import LiveStories
from storygen.errors import StorygenError, WorkerUnavailableError
from storygen.genres import GENRES, Genre
from storygen.metrics import Metrics

logger = logging.getLogger(__name__)


class AuthError(StorygenError):
    """A request without a valid API key, where keys are required."""

    def __init__(self) -> None:
        super().__init__("missing or invalid API key; send the header `Authorization: Bearer <key>`")


@dataclass
class WebContext:
    config: BotConfig
    service: StoryService | None = None  # None until the model is loaded
    metrics: Metrics | None = None
    live: LiveStories = field(default_factory=LiveStories)
    state: str = "starting"  # starting, serving, failed

    def ready_service(self) -> StoryService:
        if self.service is None:
            raise WorkerUnavailableError("starting up (loading the model)" if self.state == "starting"
                                         else "not available (the model failed to load; the operator has the log)")
        return self.service

    def allowed_genres(self) -> tuple[Genre, ...]:
        if self.service is None:
            return GENRES
        return tuple(self.service.worker.lm.spec.allowed_genres())


def web_context(request: Request) -> WebContext:
    return request.app.state.web


def fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def _caller(request: Request, channel: str) -> ChatContext:
    web: WebContext = request.app.state.web
    keys = web.config.http_api_keys
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    given = given.strip() if scheme.lower() == "bearer" else ""
    if keys:
        if not given or not any(hmac.compare_digest(given.encode(), str(k).encode()) for k in keys):
            raise AuthError()
        return ChatContext("api", "", channel, f"key-{fingerprint(given)}")
    host = request.client.host if request.client else "unknown"
    return ChatContext("api", "", channel, host)


def api_caller(request: Request) -> ChatContext:
    return _caller(request, "http")


def playground_caller(request: Request) -> ChatContext:
    return _caller(request, "playground")
