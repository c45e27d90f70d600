"""One remote OpenAI-compatible server: probe it, stream one completion from it.

Over aiohttp (one pooled session for all servers; already what discord.py and slack-bolt's
async client run on), with its timeouts: connecting, and silence on an open stream. It
retries nothing by itself: a failed server's stories move to another, which the pool and
the worker decide. The stream is read as Server-Sent Events, a `data:` line per event.
The official `openai` client did the same at about 0.3 ms of CPU per token in its
response models (benchmarks/scale_bench.py), the most of the router's cost; a line and a
json.loads are enough here.

The prompt goes as token ids, built and guarded here, which vLLM, llama.cpp and StoryBot
all take. Sampling settings go under the names each server reads; one it has no name for
is said once in the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from storygen.sampling import SamplingParams

logger = logging.getLogger(__name__)

# What each kind of server calls the settings the OpenAI API lacks (None: it has no such setting).
# The kind comes from `owned_by` in its /v1/models.
DIALECTS: dict[str, dict[str, str | None]] = {
    "vllm": {"top_k": "top_k", "repetition_penalty": "repetition_penalty", "stop_token_ids": "stop_token_ids"},
    "llamacpp": {"top_k": "top_k", "repetition_penalty": "repeat_penalty", "stop_token_ids": None},
    "storybot": {"top_k": "top_k", "repetition_penalty": "repetition_penalty", "stop_token_ids": None},
    "openai": {"top_k": None, "repetition_penalty": None, "stop_token_ids": None},
}
PROBE_TIMEOUT_S = 5.0


class BackendFailure(Exception):
    """The server failed, not the request: take it out of rotation and resume the story elsewhere."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind  # refused, timeout, status, malformed, cut


class RequestRefused(Exception):
    """The server refused this request as wrong (a 4xx other than 408/429): no server would take it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


@dataclass
class Segment:
    """How one request to one server ended (its text went to `on_text` as it came)."""

    finish_reason: str  # "stop" or "length"
    completion_tokens: int | None  # as the server counted them, when it said


def shared_session(max_connections: int) -> aiohttp.ClientSession:
    """The one connection pool every server's requests share. Create it inside the running loop."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max_connections, limit_per_host=0),
                                 raise_for_status=False)


class Backend:
    """One server and what we know of it. Only the asyncio loop touches it."""

    def __init__(self, url: str, model: str, api_key: str, timeout_s: float, max_inflight: int) -> None:
        self.url = url
        self.configured_model = model
        self.model = model
        self.max_inflight = max_inflight
        self.timeout_s = timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.session: aiohttp.ClientSession | None = None  # the pool's, set when it starts
        self.dialect = "openai"
        self.text_prompts = False  # it refused token ids: prompts go as text
        self.up = False
        self.inflight = 0
        self.last_error: str | None = None
        self.failures = 0  # in a row, since its last request that ran to the end
        self.hold_until = 0.0  # monotonic time before which it is not probed again
        self.down_since: float | None = time.monotonic()  # not in rotation until a probe answers
        self._said: set[str] = set()

    def __repr__(self) -> str:
        return f"Backend({self.url}, {'up' if self.up else 'down'}, {self.inflight} in flight)"

    async def probe(self) -> str | None:
        """Ask the server for its models; None when it answers and serves ours, else what is wrong."""
        timeout = aiohttp.ClientTimeout(total=min(self.timeout_s, PROBE_TIMEOUT_S))
        try:
            async with self.session.get(self.url + "/models", headers=self.headers, timeout=timeout) as response:
                if response.status != 200:
                    return f"/models answered {response.status}"
                listing = await response.json(content_type=None)
            models = [m for m in listing["data"] if isinstance(m.get("id"), str)]
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError, AttributeError) as error:
            return f"/models failed: {type(error).__name__}: {error}"
        if not models:
            return "/models lists no model"
        names = [m["id"] for m in models]
        if self.configured_model and self.configured_model not in names:
            return f"it serves {', '.join(names)}, not STORYGEN_BACKEND_MODEL={self.configured_model!r}"
        chosen = next(m for m in models if not self.configured_model or m["id"] == self.configured_model)
        self.model = chosen["id"]
        owner = str(chosen.get("owned_by") or "").lower()
        self.dialect = owner if owner in DIALECTS else "openai"
        return None

    def request_body(self, prompt_ids: list[int], params: SamplingParams, seed: int, max_tokens: int,
                     stop_ids: frozenset[int], user: str) -> dict:
        """The completions request, with the extra settings under this server's names."""
        names = DIALECTS[self.dialect]
        body = {"model": self.model, "prompt": prompt_ids, "max_tokens": max_tokens,
                "temperature": params.temperature, "top_p": params.top_p, "seed": seed, "user": user,
                "stream": True, "stream_options": {"include_usage": True}}
        wanted = {"top_k": params.top_k, "repetition_penalty": params.repetition_penalty,
                  "stop_token_ids": sorted(stop_ids)}
        neutral = {"top_k": 0, "repetition_penalty": 1.0}
        for key, value in wanted.items():
            if names[key] is not None:
                body[names[key]] = value
            elif key in neutral and value != neutral[key]:
                self._say_once(key, f"{self.url} ({self.dialect}) has no {key} setting; stories there are "
                               f"sampled without it")
        return body

    def _say_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            logger.warning("%s", message)

    async def complete(self, prompt_ids: list[int], params: SamplingParams, seed: int, max_tokens: int,
                       stop_ids: frozenset[int], user: str, on_text: Callable[[str], None],
                       on_first: Callable[[float], None] | None = None,
                       decode: Callable[[list[int]], str] | None = None) -> Segment:
        """Stream one completion, handing each piece of text to `on_text`.

        Raises BackendFailure when the server fails (refused, timed out, 5xx, a malformed or cut
        stream) and RequestRefused when it says the request is wrong. Cancelling the task that
        awaits this closes the stream, which aborts the request on vLLM, llama.cpp and StoryBot.
        A server that refuses a prompt of token ids gets the prompt as text (`decode`) from then on.
        """
        body = self.request_body(prompt_ids, params, seed, max_tokens, stop_ids, user)
        if self.text_prompts and decode is not None:
            body["prompt"] = decode(prompt_ids)
            return await self._stream(body, on_text, on_first)
        try:
            return await self._stream(body, on_text, on_first)
        except RequestRefused as refused:
            if decode is None or refused.status not in (400, 422) or self.text_prompts:
                raise
            self.text_prompts = True
            logger.warning("%s refused a prompt of token ids (%s); sending prompts as text from now on: a "
                           "control token typed by a user then reaches it as text its tokenizer may read as "
                           "that token", self.url, refused.message)
            body["prompt"] = decode(prompt_ids)
            return await self._stream(body, on_text, on_first)

    async def _stream(self, body: dict, on_text: Callable[[str], None],
                      on_first: Callable[[float], None] | None) -> Segment:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(self.timeout_s, 5.0), sock_read=self.timeout_s)
        started = time.monotonic()
        pieces, finish, usage = 0, None, None
        try:
            async with self.session.post(self.url + "/completions", json=body, headers=self.headers,
                                         timeout=timeout) as response:
                if response.status != 200:
                    message = _message(await response.text())
                    if 400 <= response.status < 500 and response.status not in (408, 429):
                        raise RequestRefused(response.status, message)
                    raise BackendFailure("status", f"answered {response.status}: {message}")
                async for line in response.content:
                    if not line.startswith(b"data:"):
                        continue  # blank separators, comments, `event:` lines
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        raise BackendFailure("status", f"error in the stream: {_message(event)}")
                    if event.get("usage"):
                        usage = event["usage"].get("completion_tokens")
                    for choice in event.get("choices") or ():
                        if text := choice.get("text"):
                            if not pieces and on_first is not None:
                                on_first(time.monotonic() - started)
                            pieces += 1
                            on_text(text)
                        if choice.get("finish_reason"):
                            finish = choice["finish_reason"]
        except asyncio.TimeoutError as error:
            raise BackendFailure("timeout", f"no answer within {self.timeout_s:g} s") from error
        except aiohttp.ClientConnectorError as error:
            raise BackendFailure("refused", str(error)) from error
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as error:
            raise BackendFailure("cut", f"{type(error).__name__}: {error}") from error
        except aiohttp.ClientError as error:
            raise BackendFailure("refused", f"{type(error).__name__}: {error}") from error
        except (ValueError, TypeError, AttributeError, KeyError) as error:
            raise BackendFailure("malformed", f"{type(error).__name__}: {error}") from error
        if finish is None:
            raise BackendFailure("cut", f"the stream ended after {pieces} pieces without a finish reason")
        return Segment("length" if finish == "length" else "stop", usage)


def _message(body: str | dict) -> str:
    """The `message` of an OpenAI-shaped error body, or the start of the body."""
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            return body[:300]
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"][:300]
        if isinstance(body.get("message"), str):
            return body["message"][:300]
    return str(body)[:300]
