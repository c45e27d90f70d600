"""One remote OpenAI-compatible server: probe it, stream one completion from it.

Through the official `openai` client (one pooled HTTP client for all servers, no retries of
its own: a failed server's stories move to another, which the pool and the worker decide).
The prompt goes as token ids, built and guarded here, which vLLM, llama.cpp and StoryBot
all take. Sampling settings go under the names each server reads; one it has no name for
is said once in the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx2
import openai

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
    """What one request to one server wrote."""

    text: str
    finish_reason: str  # "stop" or "length"
    completion_tokens: int | None  # as the server counted them, when it said


def shared_http_client(max_connections: int) -> httpx2.AsyncClient:
    """The one connection pool every server's client shares."""
    return openai.DefaultAsyncHttpxClient(limits=httpx2.Limits(max_connections=max_connections,
                                                               max_keepalive_connections=max_connections))


class Backend:
    """One server and what we know of it. Only the asyncio loop touches it."""

    def __init__(self, url: str, model: str, api_key: str, timeout_s: float, http_client: httpx2.AsyncClient,
                 max_inflight: int) -> None:
        self.url = url
        self.configured_model = model
        self.model = model
        self.max_inflight = max_inflight
        self.timeout_s = timeout_s
        self.client = openai.AsyncOpenAI(base_url=url, api_key=api_key or "none", max_retries=0,
                                         timeout=httpx2.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
                                         http_client=http_client)
        self.dialect = "openai"
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
        try:
            page = await self.client.models.list(timeout=min(self.timeout_s, PROBE_TIMEOUT_S))
            models = list(page.data)
        except openai.APIStatusError as error:
            return f"/models answered {error.status_code}"
        except (openai.APIError, ValueError, TypeError, AttributeError) as error:
            return f"/models failed: {type(error).__name__}: {error}"
        if not models:
            return "/models lists no model"
        names = [m.id for m in models]
        if self.configured_model and self.configured_model not in names:
            return f"it serves {', '.join(names)}, not STORYGEN_BACKEND_MODEL={self.configured_model!r}"
        chosen = next(m for m in models if not self.configured_model or m.id == self.configured_model)
        self.model = chosen.id
        owner = str(getattr(chosen, "owned_by", "") or "").lower()
        self.dialect = owner if owner in DIALECTS else "openai"
        return None

    def request_body(self, prompt_ids: list[int], params: SamplingParams, seed: int, max_tokens: int,
                     stop_ids: frozenset[int], user: str) -> tuple[dict, dict]:
        """(the standard arguments, extra_body) for this server's kind."""
        names = DIALECTS[self.dialect]
        extra: dict = {}
        wanted = {"top_k": params.top_k, "repetition_penalty": params.repetition_penalty,
                  "stop_token_ids": sorted(stop_ids)}
        neutral = {"top_k": 0, "repetition_penalty": 1.0, "stop_token_ids": None}
        for key, value in wanted.items():
            if names[key] is not None:
                extra[names[key]] = value
            elif key != "stop_token_ids" and value != neutral[key]:
                self._say_once(key, f"{self.url} ({self.dialect}) has no {key} setting; stories there are "
                               f"sampled without it")
        standard = {"model": self.model, "prompt": prompt_ids, "max_tokens": max_tokens,
                    "temperature": params.temperature, "top_p": params.top_p, "seed": seed, "user": user}
        return standard, extra

    def _say_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            logger.warning("%s", message)

    async def complete(self, prompt_ids: list[int], params: SamplingParams, seed: int, max_tokens: int,
                       stop_ids: frozenset[int], user: str, on_text: Callable[[str], None],
                       on_first: Callable[[float], None] | None = None) -> Segment:
        """Stream one completion, handing each piece of text to `on_text`.

        Raises BackendFailure when the server fails (refused, timed out, 5xx, a malformed or cut
        stream) and RequestRefused when it says the request is wrong. Cancelling the task that
        awaits this closes the stream, which aborts the request on vLLM, llama.cpp and StoryBot.
        """
        standard, extra = self.request_body(prompt_ids, params, seed, max_tokens, stop_ids, user)
        started = time.monotonic()
        text, finish, usage, first = [], None, None, True
        try:
            stream = await self.client.completions.create(
                **standard, stream=True, stream_options={"include_usage": True}, extra_body=extra)
            async with stream:
                async for chunk in stream:
                    if chunk.usage is not None:
                        usage = chunk.usage.completion_tokens
                    for choice in chunk.choices or ():
                        if choice.text:
                            if first and on_first is not None:
                                on_first(time.monotonic() - started)
                            first = False
                            text.append(choice.text)
                            on_text(choice.text)
                        if choice.finish_reason:
                            finish = choice.finish_reason
        except openai.APITimeoutError as error:
            raise BackendFailure("timeout", f"no answer within {self.timeout_s:g} s") from error
        except openai.APIConnectionError as error:
            raise BackendFailure("refused", str(error.__cause__ or error)) from error
        except openai.APIStatusError as error:
            if 400 <= error.status_code < 500 and error.status_code not in (408, 429):
                raise RequestRefused(error.status_code, _message(error)) from error
            raise BackendFailure("status", f"answered {error.status_code}: {_message(error)}") from error
        except openai.APIError as error:  # an error event inside the stream
            raise BackendFailure("status", f"error in the stream: {error.message}") from error
        except (ValueError, TypeError, AttributeError, KeyError, httpx2.HTTPError) as error:
            raise BackendFailure("malformed", f"{type(error).__name__}: {error}") from error
        if finish is None:
            raise BackendFailure("cut", f"the stream ended after {len(text)} pieces without a finish reason")
        return Segment("".join(text), "length" if finish == "length" else "stop", usage)


def _message(error: openai.APIStatusError) -> str:
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"][:300]
        if isinstance(body.get("message"), str):
            return body["message"][:300]
    return str(error.message)[:300]
