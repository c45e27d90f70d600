"""The story routes: POST /v1/stories (JSON or SSE), GET /v1/genres, and the seeds' shapes.

    POST /v1/stories   {"genre", "prompt", settings..., "stream"}  -> the story, or SSE
    POST /             {"input": "<BOS> <genre> prompt"}           -> {"output": "..."}  (the seeds' Flask API)
    POST /generate     {"prompt", "genre", "length"}               -> the story
    GET  /v1/genres                                                -> the genres with their examples
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import StreamingResponse

from bot.commands import StoryCommand
from bot.service import ChatContext, Started
from bot.web.context import WebContext, api_caller, web_context
from bot.web.errors import to_http_error
from bot.web.schemas import GenerateBody, LegacyInputBody, StoryBody
from bot.web.streams import DONE, SSE_HEADERS, await_story, events, sse
from storygen.genres import GENRES, genre_names
from storygen.stories import Story

logger = logging.getLogger(__name__)

router = APIRouter()

# The seeds' input: "<BOS> <genre> prompt" (either tag optional).
_LEGACY = re.compile(r"^\s*(?:<BOS>\s*)?(?:<([A-Za-z_\-]{1,40})>\s*)?(.*)$", re.DOTALL)


def to_story_json(story: Story, started: Started) -> dict[str, Any]:
    text = started.previous_text + started.new_text(story) if started.previous_text else story.text
    return {"id": story.request_id, "text": text, "genre": story.genre, "finish_reason": story.finish_reason,
            "tokens": story.new_tokens, "prompt_tokens": story.prompt_tokens, "seed": story.seed,
            "notices": list(story.notices), "timings": {k: round(v, 3) for k, v in story.timings.items()}}


async def story_stream(started: Started, web: WebContext, first: dict[str, Any] | None = None,
                       on_story: Any = None) -> AsyncIterator[str]:
    """SSE: optional `first` event, queue positions, text chunks, then the story (or an error); [DONE]."""
    if first is not None:
        yield sse(first)
    async for event in events(started, web.live):
        if isinstance(event, Story):
            if on_story is not None:
                on_story(event)
            yield sse({"type": "story", "story": to_story_json(event, started)})
        elif isinstance(event, BaseException):
            status, body, _ = to_http_error(event, f"story {started.request.request_id}")
            yield sse({"type": "error", "status": status, **body})
        else:
            yield sse(event)
    yield DONE


async def _start(web: WebContext, ctx: ChatContext, command: StoryCommand) -> Started:
    return await web.ready_service().story(ctx, command)


@router.post("/v1/stories", summary="Write a story", tags=["stories"])
async def create_story(body: StoryBody, request: Request, ctx: ChatContext = Depends(api_caller),
                       web: WebContext = Depends(web_context)):
    started = await _start(web, ctx, StoryCommand(body.prompt, body.genre, body.overrides()))

    def record(story: Story) -> None:
        web.ready_service().record(ctx, started, story)

    if body.stream:
        start = {"type": "start", "id": started.request.request_id, "genre": started.handle.genre,
                 "notices": list(started.handle.notices)}
        return StreamingResponse(story_stream(started, web, start, record), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    story = await await_story(request, started, web.live)
    record(story)
    return to_story_json(story, started)


@router.post("/", summary="The seeds' Flask API: {\"input\": \"<BOS> <genre> prompt\"}", tags=["compatibility"])
async def legacy_input(body: LegacyInputBody, request: Request, ctx: ChatContext = Depends(api_caller),
                       web: WebContext = Depends(web_context)):
    match = _LEGACY.match(body.input)
    genre, prompt = match.group(1), match.group(2).strip()
    started = await _start(web, ctx, StoryCommand(prompt, genre))
    story = await await_story(request, started, web.live)
    return {"output": story.text}


@router.post("/generate", summary="The other seed's shape: {\"prompt\", \"genre\", \"length\"}",
             tags=["compatibility"])
async def generate(body: GenerateBody, request: Request, ctx: ChatContext = Depends(api_caller),
                   web: WebContext = Depends(web_context)):
    overrides = {"length": body.length} if body.length is not None else {}
    started = await _start(web, ctx, StoryCommand(body.prompt, body.genre, overrides))
    story = await await_story(request, started, web.live)
    return to_story_json(story, started)


@router.get("/v1/genres", summary="The genres", tags=["stories"])
async def genres(web: WebContext = Depends(web_context)):
    served = set(genre_names(web.allowed_genres()))
    return {"genres": [{"name": g.name, "label": g.label, "description": g.description, "example": g.example,
                        "aliases": list(g.aliases), "served": g.name in served} for g in GENRES],
            "auto": "auto detects the genre from the opening"}
