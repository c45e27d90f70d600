"""What Slack sends to an app: slash commands, button clicks, events, Socket Mode envelopes.

Shapes follow Slack's docs field for field (including the deprecated `token`), and `sign()`
is Slack's v0 scheme byte for byte, so the real bolt app verifies and parses them unchanged.
Builders return plain dicts; `form_body` / `interaction_body` / `json.dumps` turn them into
the HTTP bodies Slack posts, and Socket Mode carries the same dicts inside an envelope.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
import uuid
from typing import Any
from urllib.parse import quote_plus, urlencode

from tests.fakes.workspace import (
    ALICE,
    APP_ID,
    BOT_ID,
    BOT_USER_ID,
    STORIES,
    TEAM_DOMAIN,
    TEAM_ID,
    new_id,
    new_trigger_id,
)

VERIFICATION_TOKEN = "fakeVerificationToken0001"  # deprecated field Slack still sends; bolt ignores it
SLACK_USER_AGENT = "Slackbot 1.0 (+https://api.slack.com/robots)"


def sign(body: str | bytes, secret: str, timestamp: int | None = None) -> dict[str, str]:
    """Slack's request signing: `v0=` + hex HMAC-SHA256 of `v0:<timestamp>:<raw body>`."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    raw = body.encode() if isinstance(body, str) else body
    digest = hmac.new(secret.encode(), b"v0:" + ts.encode() + b":" + raw, hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": f"v0={digest}"}


def retry_headers(num: int, reason: str = "http_timeout") -> dict[str, str]:
    """Headers Slack adds when it redelivers an Events API request (num 1..3).

    Reasons Slack uses: http_timeout, too_many_redirects, connection_failed, ssl_error,
    http_error, unknown_error. Slash commands and interactions are never retried.
    """
    return {"X-Slack-Retry-Num": str(num), "X-Slack-Retry-Reason": reason}


def fake_response_url(kind: str = "commands") -> str:
    """A hooks.slack.com-shaped URL; pass FakeSlack.response_url() instead to record respond()."""
    return f"https://hooks.slack.com/{kind}/{TEAM_ID}/{secrets.randbelow(10**12)}/{secrets.token_urlsafe(18)}"


def slash_command(
    text: str = "",
    *,
    command: str = "/story",
    user_id: str = ALICE,
    user_name: str = "alice",
    channel_id: str = STORIES,
    channel_name: str = "stories",
    team_id: str = TEAM_ID,
    response_url: str | None = None,
    trigger_id: str | None = None,
) -> dict[str, str]:
    """The fields of a slash command, in the order Slack posts them (all strings)."""
    return {
        "token": VERIFICATION_TOKEN,
        "team_id": team_id,
        "team_domain": TEAM_DOMAIN,
        "channel_id": channel_id,
        "channel_name": channel_name,
        "user_id": user_id,
        "user_name": user_name,
        "command": command,
        "text": text,
        "api_app_id": APP_ID,
        "is_enterprise_install": "false",
        "response_url": response_url or fake_response_url("commands"),
        "trigger_id": trigger_id or new_trigger_id(),
    }


def bot_message(text: str, ts: str, blocks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A message the bot posted, as it appears inside interaction payloads."""
    message: dict[str, Any] = {
        "type": "message",
        "user": BOT_USER_ID,
        "bot_id": BOT_ID,
        "app_id": APP_ID,
        "team": TEAM_ID,
        "text": text,
        "ts": ts,
    }
    if blocks:
        message["blocks"] = blocks
    return message


def block_actions(
    action_id: str,
    value: str | None = None,
    *,
    message: dict[str, Any] | None = None,
    channel_id: str = STORIES,
    user_id: str = ALICE,
    user_name: str = "alice",
    block_id: str | None = None,
    button_text: str = "Button",
    response_url: str | None = None,
    trigger_id: str | None = None,
) -> dict[str, Any]:
    """A button click on a message (`message` as returned by chat.postMessage, or a stand-in)."""
    now = f"{time.time():.6f}"
    message = message or bot_message("A story", now)
    action: dict[str, Any] = {
        "type": "button",
        "action_id": action_id,
        "block_id": block_id or new_id("", 5).lower(),
        "text": {"type": "plain_text", "text": button_text, "emoji": True},
        "action_ts": now,
    }
    if value is not None:
        action["value"] = value
    return {
        "type": "block_actions",
        "user": {"id": user_id, "username": user_name, "name": user_name, "team_id": TEAM_ID},
        "api_app_id": APP_ID,
        "token": VERIFICATION_TOKEN,
        "container": {"type": "message", "message_ts": message["ts"], "channel_id": channel_id, "is_ephemeral": False},
        "trigger_id": trigger_id or new_trigger_id(),
        "team": {"id": TEAM_ID, "domain": TEAM_DOMAIN},
        "enterprise": None,
        "is_enterprise_install": False,
        "channel": {"id": channel_id, "name": "stories" if channel_id == STORIES else channel_id.lower()},
        "message": message,
        "state": {"values": {}},
        "response_url": response_url or fake_response_url("actions"),
        "actions": [action],
    }


def app_mention(text: str, *, user: str = ALICE, channel: str = STORIES) -> dict[str, Any]:
    """An `app_mention` event (wrap it with `event_callback`)."""
    ts = f"{time.time():.6f}"
    return {
        "type": "app_mention",
        "user": user,
        "text": f"<@{BOT_USER_ID}> {text}",
        "ts": ts,
        "channel": channel,
        "event_ts": ts,
        "team": TEAM_ID,
    }


def message_event(text: str, *, user: str = ALICE, channel: str = STORIES, thread_ts: str | None = None,
                  channel_type: str = "channel") -> dict[str, Any]:
    """A `message` event (message.channels; message.groups with channel_type "group"): a person's
    message, a thread reply when `thread_ts` is the parent's ts. Wrap it with `event_callback`."""
    ts = f"{time.time():.6f}"
    event: dict[str, Any] = {
        "type": "message",
        "user": user,
        "text": text,
        "ts": ts,
        "channel": channel,
        "event_ts": ts,
        "channel_type": channel_type,
        "team": TEAM_ID,
        "client_msg_id": str(uuid.uuid4()),
    }
    if thread_ts is not None:
        event["thread_ts"] = thread_ts
        event["parent_user_id"] = BOT_USER_ID
    return event


def event_callback(event: dict[str, Any], *, event_id: str | None = None) -> dict[str, Any]:
    """The Events API outer body around one event."""
    return {
        "token": VERIFICATION_TOKEN,
        "team_id": TEAM_ID,
        "api_app_id": APP_ID,
        "event": event,
        "type": "event_callback",
        "event_id": event_id or new_id("Ev"),
        "event_time": int(time.time()),
        "authorizations": [
            {
                "enterprise_id": None,
                "team_id": TEAM_ID,
                "user_id": BOT_USER_ID,
                "is_bot": True,
                "is_enterprise_install": False,
            }
        ],
        "is_ext_shared_channel": False,
        "event_context": f"4-{secrets.token_urlsafe(24)}",
    }


def form_body(fields: dict[str, str]) -> str:
    """application/x-www-form-urlencoded, as Slack posts slash commands (`/` -> %2F, space -> +)."""
    return urlencode(fields)


def interaction_body(payload: dict[str, Any]) -> str:
    """Interactivity posts one form field, `payload`, holding the JSON."""
    return "payload=" + quote_plus(json.dumps(payload, separators=(",", ":")))


# Socket Mode: which payloads let the app answer inside its ack (`accepts_response_payload`).
_INTERACTIVE_ACCEPTING = {"view_submission", "block_suggestion", "dialog_suggestion", "dialog_submission"}


def envelope(
    envelope_type: str,
    payload: dict[str, Any],
    *,
    envelope_id: str | None = None,
    accepts_response_payload: bool | None = None,
    retry_attempt: int | None = None,
    retry_reason: str | None = None,
) -> dict[str, Any]:
    """A Socket Mode envelope; `envelope_type` is slash_commands, interactive or events_api."""
    if accepts_response_payload is None:
        accepts_response_payload = envelope_type == "slash_commands" or (
            envelope_type == "interactive" and payload.get("type") in _INTERACTIVE_ACCEPTING
        )
    message: dict[str, Any] = {
        "envelope_id": envelope_id or str(uuid.uuid4()),
        "payload": payload,
        "type": envelope_type,
        "accepts_response_payload": accepts_response_payload,
    }
    if envelope_type == "events_api":
        message["retry_attempt"] = retry_attempt or 0
        message["retry_reason"] = retry_reason or ""
    return message
