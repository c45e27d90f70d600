"""INTERACTION_CREATE payloads as Discord sends them over the gateway.

Options are typed from the command schema the bot synced, when there is one, so a test
writes `{"genre": "sci_fi", "length": 200}` and gets Discord's typed option list. Objects
passed as option values (a user, channel, role or attachment dict) go into `resolved`,
with only their id in the option, exactly as Discord splits them.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from typing import Any, Mapping

from . import discord_objects as obj

APPLICATION_COMMAND, MESSAGE_COMPONENT, AUTOCOMPLETE, MODAL_SUBMIT = 2, 3, 4, 5
SUB_COMMAND, SUB_COMMAND_GROUP, STRING, INTEGER, BOOLEAN, USER, CHANNEL, ROLE, MENTIONABLE, NUMBER, ATTACHMENT = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
)
BUTTON, STRING_SELECT, TEXT_INPUT = 2, 3, 4
_RESOLVED_KEY = {USER: "users", CHANNEL: "channels", ROLE: "roles", ATTACHMENT: "attachments"}


@dataclass(frozen=True)
class InteractionContext:
    """Where the interaction happens and who triggers it."""

    application_id: str
    channel: dict[str, Any]
    user: dict[str, Any]
    guild: dict[str, Any] | None = None  # None: a DM
    member_permissions: str = obj.MEMBER_PERMISSIONS
    app_permissions: str = obj.MEMBER_PERMISSIONS
    locale: str = "en-US"


def application_command(
    ctx: InteractionContext,
    name: str,
    options: Mapping[str, Any] | None = None,
    *,
    command: dict[str, Any] | None = None,
    focused: str | None = None,
) -> dict[str, Any]:
    """A slash command; `name` may name a subcommand path, e.g. "story new"."""
    root, *sub_path = name.split()
    resolved: dict[str, dict[str, Any]] = {}
    leaf_schema, wrap = _walk_subcommands((command or {}).get("options"), sub_path)
    leaf = [_option(n, v, leaf_schema, ctx, resolved, focused=n == focused) for n, v in (options or {}).items()]
    data: dict[str, Any] = {
        "id": command["id"] if command else obj.snowflake(),
        "name": root,
        "type": 1,
        "options": wrap(leaf),
    }
    if command and command.get("guild_id"):
        data["guild_id"] = command["guild_id"]
    if resolved:
        data["resolved"] = resolved
    return _base(ctx, AUTOCOMPLETE if focused else APPLICATION_COMMAND, data)


def component(
    ctx: InteractionContext,
    message: dict[str, Any],
    custom_id: str,
    *,
    component_type: int = BUTTON,
    values: list[str] | None = None,
) -> dict[str, Any]:
    """A click on a button (or a choice in a select menu) on `message`."""
    data: dict[str, Any] = {"custom_id": custom_id, "component_type": component_type}
    if values is not None:
        data["values"] = values
    payload = _base(ctx, MESSAGE_COMPONENT, data)
    payload["message"] = message
    return payload


def modal_submit(
    ctx: InteractionContext, custom_id: str, fields: Mapping[str, str], *, message: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A submitted modal; `fields` maps each text input's custom_id to what the user typed."""
    rows = [{"type": 1, "components": [{"type": TEXT_INPUT, "custom_id": k, "value": v}]} for k, v in fields.items()]
    payload = _base(ctx, MODAL_SUBMIT, {"custom_id": custom_id, "components": rows})
    if message is not None:
        payload["message"] = message
    return payload


def interaction_token(interaction_id: str) -> str:
    """Shaped like Discord's: url-safe base64 of "interaction:<id>:<secret>"."""
    raw = f"interaction:{interaction_id}:{secrets.token_urlsafe(48)}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _base(ctx: InteractionContext, kind: int, data: dict[str, Any]) -> dict[str, Any]:
    interaction_id = obj.snowflake()
    payload: dict[str, Any] = {
        "id": interaction_id,
        "application_id": ctx.application_id,
        "type": kind,
        "data": data,
        "token": interaction_token(interaction_id),
        "version": 1,
        "app_permissions": ctx.app_permissions,
        "locale": ctx.locale,
        "entitlements": [],
        "attachment_size_limit": 10 * 1024 * 1024,
        "channel_id": ctx.channel["id"],
        "channel": {**ctx.channel, "permissions": ctx.member_permissions},
    }
    if ctx.guild is None:
        payload.update(user=ctx.user, context=1, authorizing_integration_owners={"0": "0"})
        return payload
    member = next((m for m in ctx.guild["members"] if m["user"]["id"] == ctx.user["id"]), None)
    payload.update(
        guild_id=ctx.guild["id"],
        guild={"id": ctx.guild["id"], "locale": ctx.guild["preferred_locale"], "features": ctx.guild["features"]},
        guild_locale=ctx.guild["preferred_locale"],
        member={**(member or obj.member(ctx.user)), "permissions": ctx.member_permissions},
        context=0,
        authorizing_integration_owners={"0": ctx.guild["id"]},
    )
    return payload


def _walk_subcommands(schema: list[dict[str, Any]] | None, sub_path: list[str]) -> tuple[list[dict[str, Any]], Any]:
    """Follow "group sub" through the schema; returns the leaf's option schema and a wrapper for the leaf options."""
    wrappers = []
    for depth, name in enumerate(sub_path):
        found = next((o for o in schema or [] if o["name"] == name), None)
        kind = found["type"] if found else (SUB_COMMAND if depth == len(sub_path) - 1 else SUB_COMMAND_GROUP)
        wrappers.append((name, kind))
        schema = (found or {}).get("options")

    def wrap(leaf: list[dict[str, Any]]) -> list[dict[str, Any]]:
        options = leaf
        for name, kind in reversed(wrappers):
            options = [{"name": name, "type": kind, "options": options}]
        return options

    return schema or [], wrap


def _option(
    name: str,
    value: Any,
    schema: list[dict[str, Any]],
    ctx: InteractionContext,
    resolved: dict[str, dict[str, Any]],
    *,
    focused: bool,
) -> dict[str, Any]:
    declared = next((o for o in schema if o["name"] == name), None)
    kind = declared["type"] if declared else _infer_type(value)
    if focused:
        # Autocomplete sends what the user has typed so far, always as a string.
        return {"name": name, "type": kind, "value": str(value), "focused": True}
    if isinstance(value, dict):
        if kind == MENTIONABLE:
            kind_for_resolved = USER if "username" in value else ROLE
        else:
            kind_for_resolved = kind
        _resolve(kind_for_resolved, value, ctx, resolved)
        value = value["id"]
    return {"name": name, "type": kind, "value": value}


def _infer_type(value: Any) -> int:
    if isinstance(value, bool):
        return BOOLEAN
    if isinstance(value, int):
        return INTEGER
    if isinstance(value, float):
        return NUMBER
    if isinstance(value, dict):
        if "username" in value:
            return USER
        if "filename" in value:
            return ATTACHMENT
        if "permissions" in value and "color" in value:
            return ROLE
        return CHANNEL
    return STRING


def _resolve(kind: int, value: dict[str, Any], ctx: InteractionContext, resolved: dict[str, dict[str, Any]]) -> None:
    if kind == CHANNEL:
        value = {"permissions": ctx.member_permissions, **value}
    resolved.setdefault(_RESOLVED_KEY[kind], {})[value["id"]] = value
    if kind == USER and ctx.guild is not None:
        member = next((m for m in ctx.guild["members"] if m["user"]["id"] == value["id"]), None) or obj.member(value)
        partial = {k: v for k, v in member.items() if k != "user"}
        resolved.setdefault("members", {})[value["id"]] = {**partial, "permissions": ctx.member_permissions}
