"""The HTTP application: routes, the body limit, errors in one shape, health and metrics.

FastAPI, because its pydantic bodies refuse a bad field by name before a handler runs and
it writes the OpenAPI docs at /docs from the same models; it is an ASGI app, so uvicorn
serves it inside the bot's own event loop (bot/web/server.py) beside discord.py and
slack-bolt, on the same worker.
"""

from __future__ import annotations

import logging
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bot.web import completions, playground, stories
from bot.web.context import AuthError, WebContext
from bot.web.errors import error_body, error_response, to_http_error, validation_message
from storygen.errors import StorygenError
from storygen.metrics import PROMETHEUS_CONTENT_TYPE

logger = logging.getLogger(__name__)


class BodyLimit:
    """Refuse a body over `limit` bytes with 413 before any of it is parsed, declared or chunked."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(scope, receive, send)
            return
        body, more = b"", True
        while more:  # read it all here (it is small), then hand it on in one message
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await self._refuse(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        kib = self.limit // 1024
        response = error_response(413, f"the request body is over {kib} KiB (HTTP_MAX_BODY_BYTES)",
                                  code="body_too_large", headers={"Connection": "close"})
        await response(scope, receive, send)


def create_app(web: WebContext) -> FastAPI:
    app = FastAPI(title="StoryBot", version="0.1.0", docs_url="/docs", redoc_url=None,
                  description="Genre stories from one shared model: the HTTP API beside the Discord and "
                              "Slack bots. Errors are `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`.")
    app.state.web = web
    app.include_router(stories.router)
    app.include_router(completions.router)
    app.include_router(playground.router)
    app.mount("/static", StaticFiles(directory=playground.STATIC), name="static")

    @app.get("/healthz", tags=["operations"], summary="The worker's health; 503 when it cannot serve")
    async def healthz() -> JSONResponse:
        if web.service is None:
            return JSONResponse({"status": web.state, "worker": None}, status_code=503)
        health = web.service.worker.health()
        ok = health["state"] == "running"
        return JSONResponse({"status": "ok" if ok else health["state"], "worker": health},
                            status_code=200 if ok else 503)

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics")
    async def metrics() -> Response:
        body = web.metrics.to_prometheus() if web.metrics is not None else ""
        return Response(body, media_type=PROMETHEUS_CONTENT_TYPE)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = validation_message(error)
        return error_response(400, message, param=param, code="invalid_body")

    @app.exception_handler(StorygenError)
    async def refused(request: Request, error: StorygenError) -> JSONResponse:
        if isinstance(error, AuthError):
            return JSONResponse(error_body(str(error), "authentication_error", code="invalid_api_key"),
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        status, body, headers = to_http_error(error, f"{request.method} {request.url.path}")
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path[:80]!r}; see /docs",
                   405: f"{request.method} is not allowed on {request.url.path[:80]!r}; see /docs"}.get(
            error.status_code, str(error.detail))
        return error_response(error.status_code, message, code=str(error.status_code),
                              headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        status, body, headers = to_http_error(error, f"{request.method} {request.url.path}")
        return JSONResponse(body, status_code=status, headers=headers)

    app.add_middleware(BodyLimit, limit=web.config.http_max_body_bytes)
    return app
