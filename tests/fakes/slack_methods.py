"""The Web API methods the fake answers, written as Slack documents them.

Each handler takes the parsed arguments and returns the `ok: true` body, or raises
`SlackError` with the error code Slack would send. Arguments may arrive form-encoded
(all strings, JSON fields as strings) or as JSON, so handlers go through `_json_arg`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.fakes.workspace import (
    ALICE,
    APP_ID,
    BOT_ID,
    BOT_USER_ID,
    TEAM_DOMAIN,
    TEAM_ID,
    TEAM_NAME,
    StoredFile,
    Workspace,
    new_id,
)


class SlackError(Exception):
    """An `ok: false` answer: `error` is Slack's code, `extra` goes into the body too."""

    def __init__(self, error: str, **extra: Any) -> None:
        super().__init__(error)
        self.error = error
        self.extra = extra


@dataclass
class MethodContext:
    """What a handler may need besides its arguments."""

    workspace: Workspace
    token: str
    issue_upload_url: Callable[[str], str]  # file_id -> URL the fake serves for the bytes
    issue_socket_url: Callable[[], str]  # -> ws:// URL with a fresh ticket


Handler = Callable[[MethodContext, dict[str, Any]], dict[str, Any]]


def _require(args: dict[str, Any], *names: str) -> None:
    missing = [name for name in names if args.get(name) in (None, "")]
    if missing:
        messages = [f"[ERROR] missing required field: {name}" for name in missing]
        raise SlackError("invalid_arguments", response_metadata={"messages": messages})


def _json_arg(args: dict[str, Any], name: str, error: str = "invalid_arguments") -> Any:
    value = args.get(name)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise SlackError(error) from None
    return value


def _channel(ctx: MethodContext, args: dict[str, Any], name: str = "channel") -> str:
    channel = args.get(name)
    if not channel or channel not in ctx.workspace.channels:
        raise SlackError("channel_not_found")
    return str(channel)


def _bot_message(text: str, ts: str, args: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {
        "type": "message",
        "user": BOT_USER_ID,
        "bot_id": BOT_ID,
        "app_id": APP_ID,
        "team": TEAM_ID,
        "text": text,
        "ts": ts,
    }
    blocks = _json_arg(args, "blocks", "invalid_blocks_format")
    if blocks:
        message["blocks"] = blocks
    if args.get("thread_ts"):
        message["thread_ts"] = args["thread_ts"]
    return message


def _text_of(args: dict[str, Any]) -> str:
    if not (args.get("text") or args.get("blocks") or args.get("attachments")):
        raise SlackError("no_text")
    return str(args.get("text") or "")


def auth_test(ctx: MethodContext, args: dict[str, Any]) -> dict[str, Any]:
    is_bot = ctx.token.startswith("xoxb-")
    return {
        "url": f"https://{TEAM_DOMAIN}.slack.com/",
        "team": TEAM_NAME,
        "user": "storybot" if is_bot else "alice",
        "team_id": TEAM_ID,
        "user_id": BOT_USER_ID if is_bot else ALICE,
        **({"bot_id": BOT_ID} if is_bot else {}),
        "is_enterprise_install": False,
    }


def chat_post_message(ctx: MethodContext, args: dict[str, Any]) -> dict[str, Any]:
    channel = _channel(ctx, args)
    text = _text_of(args)
    ts = ctx.workspace.next_ts()
    message = _bot_message(text, ts, args)
    ctx.workspace.messages[(channel, ts)] = message
    return {"channel": channel, "ts": ts, "message": message}


def chat_update(ctx: MethodContext, args: dict[str, Any]) -> dict[str, Any]:
    channel = _channel(ctx, args)
    _require(args, "ts")
    old = ctx.workspace.messages.get((channel, str(args["ts"])))
    if old is None:
        raise SlackError("message_not_found")
    text = _text_of(args)
    message = {**_bot_message(text, old["ts"], args), "edited": {"user": BOT_USER_ID, "ts": ctx.workspace.next_ts()}}
    # chat.update keeps the old blocks unless the call sends `blocks` (`[]` removes them)
    if "blocks" not in args and "blocks" in old:
        message["blocks"] = old["blocks"]
    if "thread_ts" in old:
        message["thread_ts"] = old["thread_ts"]
    ctx.workspace.messages[(channel, old["ts"])] = message
    return {"channel": channel, "ts": old["ts"], "text": text, "message": message}


def chat_post_ephemeral(ctx: MethodContext, args: dict[str, Any]) -> dict[str, Any]:
    _channel(ctx, args)
    if args.get("user") not in ctx.workspace.users:
        raise SlackError("user_not_found")
    _text_of(args)
    return {"message_ts": ctx.workspace.next_ts()}  # ephemeral: never stored in history


def chat_delete(ctx: MethodContext, args: dict[str, Any]) -> dict[str, Any]:
    channel = _channel(ctx, args)
    _require(args, "ts")
    if ctx.workspace.messages.pop((channel, str(args["ts"])), None) is None:
        raise SlackError("message_not_found")
    return {"channel": channel, "ts": str(args["ts"])}


def views_open(ctx: MethodContext, args: dict[str, Any]) -> dict[str, Any]:
    _require(args, "trigger_id", "view")
    view = _json_arg(args, "view")
    if not isinstance(view, dict) or view.get("type") not in ("modal", "home"):
        raise SlackError("invalid_arguments")
    view_id = new_id("V")
    return {
        "view": {
            "id": view_id,
            "team_id": TEAM_ID,
            "app_id": APP_ID,
            "bot_id": BOT_ID,
            "root_view_id": view_id,
            "previous_view_id": None,
            "hash": new_id("", 16).lower(),
            "state": {"values": {}},
            "private_metadata": "",
            "callback_id": "",
            "external_id": "",
            **view,
        }
    }


def conversations_info(ctx: MethodContext, args: dict[str, Any]) -> dict[str, Any]:
    return {"channel": ctx.workspace.channels[_channel(ctx, args)]}


def users_info(ctx: MethodContext, args: dict[str, Any]) -> dict[str, Any]:
    user = ctx.workspace.users.get(str(args.get("user")))
    if user is None:
        raise SlackError("user_not_found")
    return {"user": user}


def files_get_upload_url_external(ctx: MethodContext, args: dict[str, Any]) -> dict[str, Any]:
    _require(args, "filename", "length")
    try:
        length = int(args["length"])
    except ValueError:
        raise SlackError("invalid_arguments") from None
    file_id = new_id("F")
    ctx.workspace.files[file_id] = StoredFile(id=file_id, filename=str(args["filename"]), length=length)
    return {"upload_url": ctx.issue_upload_url(file_id), "file_id": file_id}


def files_complete_upload_external(ctx: MethodContext, args: dict[str, Any]) -> dict[str, Any]:
    _require(args, "files")
    entries = _json_arg(args, "files")
    if not isinstance(entries, list) or not entries:
        raise SlackError("invalid_arguments")
    channel_id = _channel(ctx, args, "channel_id") if args.get("channel_id") else None
    completed = []
    for entry in entries:
        stored = ctx.workspace.files.get(str(entry.get("id")))
        if stored is None or stored.content is None:
            raise SlackError("file_not_found")
        stored.title = entry.get("title") or stored.filename
        stored.channel_id = channel_id
        stored.initial_comment = args.get("initial_comment")
        stored.thread_ts = args.get("thread_ts")
        stored.completed = True
        completed.append(_file_object(stored))
    return {"files": completed}


def _file_object(stored: StoredFile) -> dict[str, Any]:
    return {
        "id": stored.id,
        "name": stored.filename,
        "title": stored.title,
        "mimetype": "text/plain" if stored.filename.endswith(".txt") else "application/octet-stream",
        "filetype": "text" if stored.filename.endswith(".txt") else "binary",
        "size": len(stored.content or b""),
        "user": BOT_USER_ID,
        "is_public": True,
        "url_private": f"https://files.slack.com/files-pri/{TEAM_ID}-{stored.id}/{stored.filename}",
        "permalink": f"https://{TEAM_DOMAIN}.slack.com/files/{BOT_USER_ID}/{stored.id}/{stored.filename}",
        "channels": [stored.channel_id] if stored.channel_id else [],
    }


def apps_connections_open(ctx: MethodContext, args: dict[str, Any]) -> dict[str, Any]:
    return {"url": ctx.issue_socket_url()}


METHODS: dict[str, Handler] = {
    "auth.test": auth_test,
    "chat.postMessage": chat_post_message,
    "chat.update": chat_update,
    "chat.postEphemeral": chat_post_ephemeral,
    "chat.delete": chat_delete,
    "views.open": views_open,
    "conversations.info": conversations_info,
    "users.info": users_info,
    "files.getUploadURLExternal": files_get_upload_url_external,
    "files.completeUploadExternal": files_complete_upload_external,
    "apps.connections.open": apps_connections_open,
}

APP_TOKEN_METHODS = {"apps.connections.open"}  # these take an xapp- token and nothing else


def check_token(method: str, token: str | None) -> None:
    """Slack's token rules: none -> not_authed, wrong kind for the method -> not_allowed_token_type."""
    if not token:
        raise SlackError("not_authed")
    if not token.startswith(("xoxb-", "xoxp-", "xapp-")):
        raise SlackError("invalid_auth")
    if (method in APP_TOKEN_METHODS) != token.startswith("xapp-"):
        raise SlackError("not_allowed_token_type")
