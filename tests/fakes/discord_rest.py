"""REST plumbing for the fake: route matching, bodies, auth, errors, rate-limit headers, recording.

The route handlers themselves live in `discord_routes`; this module only knows HTTP.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping

from aiohttp import web
from multidict import CIMultiDictProxy

from .discord_records import Log, RecordedFile, RecordedRequest

API_PREFIX = "/api/v10"


class DiscordError(Exception):
    """An error answered the way Discord does: a status plus {"message", "code"[, "errors"]}."""

    def __init__(self, status: int, code: int, message: str, errors: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status} {code} {message}")
        self.status = status
        self.body: dict[str, Any] = {"message": message, "code": code}
        if errors is not None:
            self.body["errors"] = errors


def invalid_form(path: str, error_code: str, message: str) -> DiscordError:
    """400 / 50035 with Discord's nested error tree, e.g. path "data.content"."""
    tree: dict[str, Any] = {"_errors": [{"code": error_code, "message": message}]}
    for key in reversed(path.split(".")):
        tree = {key: tree}
    return DiscordError(400, 50035, "Invalid Form Body", tree)


@dataclass(frozen=True)
class Incoming:
    """A parsed request as a handler sees it."""

    method: str
    params: Mapping[str, str]
    query: Mapping[str, str]
    headers: CIMultiDictProxy[str]
    json: Any
    files: tuple[RecordedFile, ...]


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any = None


Handler = Callable[[Incoming], Awaitable[Any]]


@dataclass
class _Route:
    method: str
    template: str
    pattern: re.Pattern[str]
    handler: Handler
    bot_auth: bool


@dataclass
class _ScriptedFailure:
    method: str
    path: re.Pattern[str]
    status: int
    body: dict[str, Any]
    headers: dict[str, str]
    times: int


@dataclass
class RestRouter:
    """Matches /api/v10 routes; unknown ones get Discord's 404 body and are still recorded."""

    token: str
    requests: Log[RecordedRequest] = field(default_factory=Log)
    _routes: list[_Route] = field(default_factory=list)
    _failures: list[_ScriptedFailure] = field(default_factory=list)

    def add(self, method: str, template: str, handler: Handler, *, bot_auth: bool = True) -> None:
        """`template` uses Discord's own placeholders: "/channels/{channel_id}/messages"."""
        regex = re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(template))
        self._routes.append(_Route(method, template, re.compile(f"^{regex}$"), handler, bot_auth))

    def fail_next(
        self,
        method: str,
        path_regex: str,
        *,
        status: int,
        body: dict[str, Any],
        headers: dict[str, str] | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next `times` matching requests with this error instead of handling them."""
        self._failures.append(_ScriptedFailure(method, re.compile(path_regex), status, body, headers or {}, times))

    async def handle(self, request: web.Request) -> web.Response:
        full_path = request.match_info.get("tail", "")
        full_path = "/" + full_path if not full_path.startswith("/") else full_path
        path = full_path[len(API_PREFIX):] if full_path.startswith(API_PREFIX + "/") else full_path
        body, files = await _read_body(request)
        route, params = self._match(request.method, path) if full_path.startswith(API_PREFIX + "/") else (None, {})
        incoming = Incoming(request.method, params, dict(request.query), request.headers, body, files)
        extra_headers: dict[str, str] = {}
        try:
            failure = self._scripted_failure(request.method, path)
            if failure is not None:
                status, payload, extra_headers = failure.status, failure.body, failure.headers
            elif route is None:
                raise DiscordError(404, 0, "404: Not Found")
            else:
                if route.bot_auth and request.headers.get("Authorization") != f"Bot {self.token}":
                    raise DiscordError(401, 0, "401: Unauthorized")
                result = await route.handler(incoming)
                status, payload = (result.status, result.body) if isinstance(result, Reply) else (200, result)
        except DiscordError as error:
            status, payload = error.status, error.body

        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=path,
                route=f"{route.method} {route.template}" if route else None,
                params=params,
                query=incoming.query,
                headers=request.headers,
                json=body,
                files=files,
                status=status,
                response=payload,
            )
        )
        headers = {**_ratelimit_headers(route.template if route else path), **extra_headers}
        if status == 204:
            return web.Response(status=204, headers=headers)
        # Exactly "application/json": discord.py compares the header verbatim and a charset
        # suffix (aiohttp's json_response default) makes it treat every body as plain text.
        headers["Content-Type"] = "application/json"
        return web.Response(body=json.dumps(payload).encode(), status=status, headers=headers)

    def _match(self, method: str, path: str) -> tuple[_Route | None, dict[str, str]]:
        for route in self._routes:
            if route.method == method and (found := route.pattern.match(path)):
                return route, found.groupdict()
        return None, {}

    def _scripted_failure(self, method: str, path: str) -> _ScriptedFailure | None:
        for failure in self._failures:
            if failure.method == method and failure.path.search(path):
                failure.times -= 1
                if failure.times <= 0:
                    self._failures.remove(failure)
                return failure
        return None


async def _read_body(request: web.Request) -> tuple[Any, tuple[RecordedFile, ...]]:
    """JSON bodies parse to objects; multipart bodies to payload_json plus their file parts."""
    if request.content_type == "multipart/form-data":
        form = await request.post()
        payload, files = None, []
        for name, value in form.items():
            if isinstance(value, web.FileField):
                files.append(RecordedFile(name, value.filename, value.content_type, value.file.read()))
            elif name == "payload_json":
                payload = json.loads(value)
        return payload, tuple(files)
    raw = await request.read()
    if not raw:
        return None, ()
    try:
        return json.loads(raw), ()
    except ValueError:
        return raw.decode(errors="replace"), ()


def _ratelimit_headers(bucket_key: str) -> dict[str, str]:
    """Headers discord.py's rate limiter reads; a roomy bucket that never runs dry."""
    return {
        "X-RateLimit-Limit": "50",
        "X-RateLimit-Remaining": "49",
        "X-RateLimit-Reset": f"{time.time() + 1:.3f}",
        "X-RateLimit-Reset-After": "1.000",
        "X-RateLimit-Bucket": hashlib.md5(bucket_key.encode()).hexdigest()[:16],
        "Via": "1.1 google",  # discord.py treats a 429 without Via as a Cloudflare ban
    }
