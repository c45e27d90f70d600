"""A fake Slack on 127.0.0.1: Web API, file upload URLs, response_urls and Socket Mode.

Point a real client at it and assert on what arrived::

    async with FakeSlack() as fake:
        client = AsyncWebClient(token=BOT_TOKEN, base_url=fake.base_url)
        posted = await client.chat_postMessage(channel=STORIES, text="Once upon a time")
        call = await fake.wait_for("chat.postMessage")
        assert call.args["text"] == "Once upon a time" and call.token == BOT_TOKEN

Like Slack, the Web API answers HTTP 200 with `{"ok": false, "error": ...}` for errors,
except `ratelimited`, which is HTTP 429 with Retry-After. Every request is recorded,
including unknown methods and failures, in the order the fake answered them.
"""

from __future__ import annotations

import json
import secrets
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from tests.fakes import slack_payloads
from tests.fakes.fake_socket_mode import FakeSocketMode
from tests.fakes.recording import DEFAULT_TIMEOUT, Recording
from tests.fakes.slack_methods import METHODS, MethodContext, SlackError, check_token
from tests.fakes.workspace import BOT_SCOPES, TEAM_ID, Workspace


@dataclass(frozen=True)
class ApiCall:
    """One Web API request and the fake's answer."""

    method: str  # "chat.postMessage"
    args: dict[str, Any]  # query + form or JSON body, merged; the token is taken out
    token: str | None  # from `Authorization: Bearer ...`, or a form/query `token`
    http_verb: str
    content_type: str  # "application/json", "application/x-www-form-urlencoded", ...
    headers: CIMultiDictProxy[str]
    status: int
    response: dict[str, Any]

    @property
    def ok(self) -> bool:
        return bool(self.response.get("ok"))

    def __str__(self) -> str:
        outcome = "ok" if self.ok else self.response.get("error")
        return f"{self.method} {self.args!r:.120} -> {self.status} {outcome}"


@dataclass(frozen=True)
class ResponseUrlPost:
    """A POST to a response_url (what bolt's `respond()` sends)."""

    url: str
    body: dict[str, Any]
    headers: CIMultiDictProxy[str]
    status: int  # 200, or 404 for a URL the fake never handed out

    def __str__(self) -> str:
        return f"POST {self.url} {self.body!r:.120} -> {self.status}"


@dataclass(frozen=True)
class Upload:
    """Bytes posted to an upload_url from files.getUploadURLExternal."""

    file_id: str
    filename: str
    content: bytes

    def __str__(self) -> str:
        return f"upload {self.file_id} {self.filename} ({len(self.content)} bytes)"


@dataclass(frozen=True)
class _Failure:
    error: str
    status: int
    retry_after: int


class FakeSlack:
    """Slack's servers in one aiohttp app; use `async with FakeSlack() as fake`."""

    def __init__(self) -> None:
        self.workspace = Workspace()
        self.calls: Recording[ApiCall] = Recording("API call")
        self.responses: Recording[ResponseUrlPost] = Recording("response_url post")
        self.uploads: Recording[Upload] = Recording("file upload")
        self.socket = FakeSocketMode()
        self.url = ""  # http://127.0.0.1:PORT once started
        self._failures: defaultdict[str, deque[_Failure]] = defaultdict(deque)
        self._response_url_paths: set[str] = set()
        self._upload_keys: dict[str, str] = {}  # upload URL key -> file_id
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        """For `AsyncWebClient(base_url=...)`; ends with a slash like https://slack.com/api/."""
        return f"{self.url}/api/"

    # ---- lifecycle

    async def start(self) -> None:
        app = web.Application()
        app.add_routes(
            [
                web.route("*", "/api/{method}", self._handle_api),
                web.post("/upload/v1/{key}", self._handle_upload),
                web.post("/commands/{tail:.+}", self._handle_response_url),
                web.post("/actions/{tail:.+}", self._handle_response_url),
                web.get("/link/", self.socket.handle),
            ]
        )

        async def close_websockets(_: web.Application) -> None:
            await self.socket.close_all()  # else graceful shutdown waits on open sockets

        app.on_shutdown.append(close_websockets)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        except BaseException:
            await self.stop()
            raise
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeSlack:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ---- what tests call

    def fail_next(
        self, method: str, error: str, *, times: int = 1, retry_after: int = 1, status: int | None = None
    ) -> None:
        """Make the next `times` calls to `method` fail with `error`.

        "ratelimited" answers HTTP 429 with `Retry-After: <retry_after>`, as Slack does;
        any other error is HTTP 200 `{"ok": false, "error": error}` unless `status` says otherwise.
        """
        http_status = status if status is not None else (429 if error == "ratelimited" else 200)
        for _ in range(times):
            self._failures[method].append(_Failure(error, http_status, retry_after))

    def response_url(self, kind: str = "commands") -> str:
        """A response_url on the fake (kind "commands" or "actions"); posts to it are recorded."""
        path = f"/{kind}/{TEAM_ID}/{secrets.randbelow(10**12)}/{secrets.token_urlsafe(18)}"
        self._response_url_paths.add(path)
        return self.url + path

    def calls_to(self, method: str) -> list[ApiCall]:
        return [call for call in self.calls if call.method == method]

    async def wait_for(self, match: str | Callable[[ApiCall], bool], timeout: float = DEFAULT_TIMEOUT) -> ApiCall:
        """The first call matching a method name or predicate, waiting up to `timeout` seconds."""
        predicate = (lambda call: call.method == match) if isinstance(match, str) else match
        return await self.calls.wait_for(predicate, timeout)

    def message(self, channel: str, ts: str) -> dict[str, Any] | None:
        """The message as it stands now (after chat.update), or None if never posted / deleted."""
        return self.workspace.messages.get((channel, ts))

    def slash_command(self, text: str = "", **fields: Any) -> dict[str, str]:
        """slack_payloads.slash_command with a response_url on this fake."""
        fields.setdefault("response_url", self.response_url("commands"))
        return slack_payloads.slash_command(text, **fields)

    def block_actions(self, action_id: str, value: str | None = None, **fields: Any) -> dict[str, Any]:
        """slack_payloads.block_actions with a response_url on this fake."""
        fields.setdefault("response_url", self.response_url("actions"))
        return slack_payloads.block_actions(action_id, value, **fields)

    # ---- handlers

    async def _handle_api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        token: str | None = None
        args: dict[str, Any] = {}
        try:
            args, token = await _read_args(request)
            status, body, headers = self._answer(method, args, token)
        except SlackError as error:  # the body itself was unreadable
            status, body, headers = 200, {"ok": False, "error": error.error}, {}
        if token and token.startswith("xoxb-"):
            headers["X-OAuth-Scopes"] = BOT_SCOPES  # bolt reads the bot's scopes from auth.test's header
        self.calls.append(
            ApiCall(
                method=method,
                args=args,
                token=token,
                http_verb=request.method,
                content_type=request.content_type,
                headers=CIMultiDictProxy(CIMultiDict(request.headers)),
                status=status,
                response=body,
            )
        )
        return web.json_response(body, status=status, headers=headers)

    def _answer(
        self, method: str, args: dict[str, Any], token: str | None
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        failures = self._failures.get(method)
        if failures:
            failure = failures.popleft()
            headers = {"Retry-After": str(failure.retry_after)} if failure.status == 429 else {}
            return failure.status, {"ok": False, "error": failure.error}, headers
        handler = METHODS.get(method)
        if handler is None:
            return 200, {"ok": False, "error": "unknown_method"}, {}
        try:
            check_token(method, token)
            context = MethodContext(
                workspace=self.workspace,
                token=token or "",
                issue_upload_url=self._issue_upload_url,
                issue_socket_url=lambda: self.socket.issue_url(self.url.replace("http://", "ws://", 1)),
            )
            return 200, {"ok": True, **handler(context, args)}, {}
        except SlackError as error:
            return 200, {"ok": False, "error": error.error, **error.extra}, {}

    def _issue_upload_url(self, file_id: str) -> str:
        key = secrets.token_urlsafe(24)
        self._upload_keys[key] = file_id
        return f"{self.url}/upload/v1/{key}"

    async def _handle_upload(self, request: web.Request) -> web.Response:
        file_id = self._upload_keys.get(request.match_info["key"])
        if file_id is None:
            return web.Response(status=404, text="invalid_upload_url")
        if request.content_type.startswith("multipart/"):  # Slack also takes a form with a `file` part
            form = await request.post()
            part = form.get("file")
            content = part.file.read() if isinstance(part, web.FileField) else str(part or "").encode()
        else:
            content = await request.read()
        stored = self.workspace.files[file_id]
        stored.content = content
        self.uploads.append(Upload(file_id=file_id, filename=stored.filename, content=content))
        return web.Response(text=f"OK - {len(content)}", content_type="text/plain")

    async def _handle_response_url(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.text())
            status, text = (200, "ok") if request.path in self._response_url_paths else (404, "no_service")
        except json.JSONDecodeError:
            body, status, text = {}, 400, "invalid_payload"
        headers = CIMultiDictProxy(CIMultiDict(request.headers))
        self.responses.append(ResponseUrlPost(url=str(request.url), body=body, headers=headers, status=status))
        return web.Response(status=status, text=text, content_type="text/plain")


async def _read_args(request: web.Request) -> tuple[dict[str, Any], str | None]:
    """Merge query and body arguments the way Slack reads them; return (args, token)."""
    args: dict[str, Any] = dict(request.query)
    is_json = request.content_type == "application/json"
    if request.body_exists:
        if is_json:
            try:
                body = await request.json()
            except json.JSONDecodeError:
                raise SlackError("invalid_json") from None
            if isinstance(body, dict):
                args.update(body)
        else:
            form = await request.post()
            args.update({key: value for key, value in form.items() if isinstance(value, str)})
    authorization = request.headers.get("Authorization", "")
    token = authorization.removeprefix("Bearer ").strip() if authorization.startswith("Bearer ") else None
    if not is_json and "token" in args:  # Slack reads a token argument only from forms and query strings
        form_token = str(args.pop("token"))
        token = token or form_token
    return args, token


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")


@pytest_asyncio.fixture
async def fake_slack(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeSlack]:
    """A started FakeSlack, stopped after the test. Import it into a test module to use it."""
    # slack_sdk clients read these at construction and would send 127.0.0.1 traffic to a proxy
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    async with FakeSlack() as fake:
        yield fake
