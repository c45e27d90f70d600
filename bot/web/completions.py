"""OpenAI-compatible `POST /v1/completions` and `GET /v1/models`, so OpenAI clients and load tools work.

The prompt is a story's opening and the completion is the rest of the story, in the genre
named by the extra field `genre` (default: the caller's default genre). Responses and
stream chunks have the fields OpenAI's and vLLM's servers send. `stop` strings end the
completion where one first appears (the story is then stopped, not run to its length).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import StreamingResponse

from bot.commands import StoryCommand
from bot.service import ChatContext, Started
from bot.web.context import WebContext, api_caller, fingerprint, web_context
from bot.web.errors import error_response, to_http_error
from bot.web.schemas import CompletionBody
from bot.web.streams import DONE, SSE_HEADERS, await_story, events, sse
from storygen.prompts import to_opening
from storygen.stories import Story

logger = logging.getLogger(__name__)

router = APIRouter(tags=["openai"])


def _model(web: WebContext) -> dict[str, Any]:
    return {"id": web.config.http_model_name, "object": "model", "created": 0, "owned_by": "storybot"}


@router.get("/v1/models", summary="The one model this server writes with")
async def models(web: WebContext = Depends(web_context), _: ChatContext = Depends(api_caller)):
    return {"object": "list", "data": [_model(web)]}


class _StopWatch:
    """Cuts the completion at the first stop string; holds back text that might be the start of one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.text = ""  # all the completion text so far
        self.sent = 0  # how much of it has gone out
        self.stopped = False

    def push(self, chunk: str) -> str:
        self.text += chunk
        if not self.stops:
            out, self.sent = self.text[self.sent:], len(self.text)
            return out
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            cut = min(hits)
            out, self.sent = self.text[self.sent:cut], cut
            return out
        # keep back a tail that could still grow into a stop string
        hold = max(len(s) - 1 for s in self.stops)
        safe = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent:safe], safe
        return out

    def final(self, text: str) -> tuple[str, bool]:
        """The whole completion (from the finished story), cut at a stop string."""
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return (text[:min(hits)], True) if hits else (text, False)


def _completion_text(story: Story, opening: str) -> str:
    return story.text[len(opening):] if story.text.startswith(opening) else story.text


@router.post("/v1/completions", summary="OpenAI-compatible completion: the rest of a story")
async def completions(body: CompletionBody, request: Request, ctx: ChatContext = Depends(api_caller),
                      web: WebContext = Depends(web_context)):
    if body.model != web.config.http_model_name:
        return error_response(404, f"model {body.model!r} does not exist; this server serves "
                                   f"{web.config.http_model_name!r} (see /v1/models)", param="model",
                              code="model_not_found")
    service = web.ready_service()
    if body.user and web.config.http_api_keys:  # a trusted caller's own end user: their own place in the queue
        ctx = ChatContext(ctx.platform, ctx.user, ctx.channel, fingerprint(body.user))
    if (ids := body.token_ids()) is not None:
        if body.echo:
            return error_response(400, "echo is not supported with a prompt of token ids; send the prompt as "
                                       "text to have it echoed", param="echo", code="invalid_body")
        started, opening = await service.completion(ctx, ids, body.overrides()), ""
    else:
        started = await service.story(ctx, StoryCommand(body.opening(), body.genre, body.overrides()))
        opening, _ = to_opening(body.opening(), service.config.max_prompt_chars)
    meta = {"id": f"cmpl-{started.request.request_id}", "created": int(time.time()),
            "model": web.config.http_model_name}
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_stream(started, web, body, opening, meta, include_usage),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    story = await await_story(request, started, web.live)
    text, stopped = _StopWatch(body.stops()).final(_completion_text(story, opening))
    return {**meta, "object": "text_completion",
            "choices": [{"index": 0, "text": (opening if body.echo else "") + text, "logprobs": None,
                         "finish_reason": "stop" if stopped else _finish_reason(story)}],
            "usage": _usage(story)}


def _finish_reason(story: Story) -> str:
    return "length" if story.finish_reason == "length" else "stop"


def _usage(story: Story) -> dict[str, int]:
    return {"prompt_tokens": story.prompt_tokens, "completion_tokens": story.new_tokens,
            "total_tokens": story.prompt_tokens + story.new_tokens}


def _chunk(meta: dict[str, Any], text: str, finish_reason: str | None) -> dict[str, Any]:
    return {**meta, "object": "text_completion",
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


async def _stream(started: Started, web: WebContext, body: CompletionBody, opening: str, meta: dict[str, Any],
                  include_usage: bool) -> AsyncIterator[str]:
    watch = _StopWatch(body.stops())
    if body.echo:
        yield sse(_chunk(meta, opening, None))
    async with aclosing(events(started, web.live)) as happenings:
        async for event in happenings:
            if isinstance(event, Story):
                # The finished story may end earlier than the stream did (a dangling sentence trimmed);
                # what was sent stands, as with any streaming server.
                text, stopped = watch.final(_completion_text(event, opening))
                if len(text) > watch.sent and not watch.stopped:
                    yield sse(_chunk(meta, text[watch.sent:], None))
                yield sse(_chunk(meta, "", "stop" if stopped or watch.stopped else _finish_reason(event)))
                if include_usage:
                    yield sse({**meta, "object": "text_completion", "choices": [], "usage": _usage(event)})
            elif isinstance(event, BaseException):
                _, error, _ = to_http_error(event, f"completion {started.request.request_id}")
                yield sse(error)
            elif event["type"] == "chunk" and not watch.stopped:
                if out := watch.push(event["text"]):
                    yield sse(_chunk(meta, out, None))
                if watch.stopped:
                    started.handle.cancel()  # its text is already cut; no need to write the rest
                    yield sse(_chunk(meta, "", "stop"))
                    break
    yield DONE

