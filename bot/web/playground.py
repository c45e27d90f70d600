"""The web playground: a page at `/` where anyone types the chat commands and watches the story.

    GET  /               the page (static files in bot/web/static/, no build step)
    POST /v1/commands    {"text": "/story sci_fi After discovering time travel"}
                         or a button: {"action": "continue|regenerate|cancel", "request_id": "..."}

A command that starts a story answers with Server-Sent Events (its queue position, the text as
it is written, the story, with its id for the buttons); any other command answers
`{"reply": "..."}` with the same wording and errors as Slack, since both go through
bot/commands.py and bot/service.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import APIRouter, Depends
from starlette.responses import FileResponse, JSONResponse, StreamingResponse

from bot.commands import SimpleCommand, StoryCommand, parse_command_text
from bot.service import ChatContext, Started, StoryService
from bot.web.context import WebContext, playground_caller, web_context
from bot.web.errors import error_response
from bot.web.schemas import CommandBody
from bot.web.stories import story_stream
from storygen.prompts import to_opening

logger = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
COMMAND_NAMES = ("/story", "/storysettings")

router = APIRouter(tags=["playground"])


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def _command_text(text: str) -> tuple[str, str]:
    """("/story", "sci_fi After…"): which command, and the text after it. A bare line is /story's."""
    stripped = text.strip()
    head, _, rest = stripped.partition(" ")
    if head.lower() in COMMAND_NAMES:
        return head.lower(), rest
    if head.startswith("/"):
        return head, rest
    return "/story", stripped


@router.post("/v1/commands", summary="A chat command as typed, or a story button")
async def command(body: CommandBody, ctx: ChatContext = Depends(playground_caller),
                  web: WebContext = Depends(web_context)):
    service = web.ready_service()
    started: Started | None = None
    if body.action is not None:
        if not body.request_id:
            return error_response(400, f"{body.action} needs the story's request_id", param="request_id")
        if body.action == "cancel":
            return {"reply": service.cancel(ctx, body.request_id)}
        if body.action == "continue":
            started = await service.continue_story(ctx, body.request_id)
        else:
            started = await service.regenerate(ctx, body.request_id)
    else:
        name, rest = _command_text(body.text)
        if name == "/storysettings":
            rest = f"settings {rest}"
        elif name != "/story":
            return error_response(400, f"unknown command {name[:30]!r}; the playground knows /story and "
                                       "/storysettings (try /story help)", param="text")
        parsed = parse_command_text(rest, ctx.channel)
        if isinstance(parsed, StoryCommand):
            started = await service.story(ctx, parsed)
        elif parsed == SimpleCommand("continue"):
            started = await service.continue_last(ctx)
        else:
            return JSONResponse({"reply": service.answer(ctx, parsed)})
    return StreamingResponse(_events(service, ctx, started, web), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def _events(service: StoryService, ctx: ChatContext, started: Started, web: WebContext):
    opening, _ = to_opening(started.request.prompt, service.config.max_prompt_chars)
    first = {"type": "start", "id": started.request.request_id, "genre": started.handle.genre,
             "notices": list(started.handle.notices),
             # what to show before the first chunk: the earlier story for a continuation
             "text": started.previous_text or opening}

    def record(story) -> None:
        service.record(ctx, started, story)

    return story_stream(started, web, first, record)
