"""Group storytelling on Slack: `/storytime …` (and `/story together …`), thread replies, vote buttons.

    to_storytime_request(body) -> (Place, Actor, StorytimeCommand)   a slash command
    SlackStorytime.on_command / on_reply / on_vote                   bolt listeners (registered by the adapter)
    SlackSurface                                                     the core's voice in a session's thread

A session lives in the thread of the bot's first message: its place is `<channel>:<thread ts>`.
Slash commands cannot be typed in a thread, so they find the session by the channel it was
started in; a reply counts only in the session's own thread (events `message.channels`
and `message.groups`). Everything posted goes through `escape`, so no line can mention anyone.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot import messages
from bot.service import user_message
from bot.slack.render import escape, link_channels, unescape
from bot.storytime.grammar import StorytimeCommand, parse_storytime
from bot.storytime.rules import announcement
from bot.storytime.service import StorytimeService
from bot.storytime.session import Actor, Place, Session, StorytimeError

logger = logging.getLogger(__name__)

STORYTIME_COMMAND = "/storytime"
TOGETHER = "together"  # `/story together …` is `/storytime …`
VOTE = "storytime_vote"  # button action_ids: storytime_vote_0, storytime_vote_1
VOTE_ACTION = re.compile(rf"^{VOTE}_[0-9]$")
_ADMIN_ACTIONS = ("undo", "end", "list")


def to_storytime_request(body: dict[str, Any], text: str) -> tuple[Place, Actor, StorytimeCommand]:
    """A slash command's fields and its storytime text -> where, who, what; raises a CommandError."""
    place = Place("slack", body.get("team_id") or "", body["channel_id"])
    return place, Actor(body["user_id"], body.get("user_name") or ""), parse_storytime(unescape(text))


def thread_place(team: str, channel: str, thread_ts: str) -> Place:
    return Place("slack", team, f"{channel}:{thread_ts}")


def _split_thread(session: Session) -> tuple[str, str]:
    channel, _, thread_ts = session.thread.partition(":")
    return channel, thread_ts


class SlackSurface:
    """Posts into a session's thread with the app's Web API client."""

    def __init__(self, client: AsyncWebClient, interval_s: float) -> None:
        self.client = client
        self.interval_s = interval_s

    async def say(self, session: Session, text: str) -> None:
        channel, thread_ts = _split_thread(session)
        await self.client.chat_postMessage(channel=channel, thread_ts=thread_ts, text=escape(text))

    async def begin(self, session: Session, label: str) -> str:
        channel, thread_ts = _split_thread(session)
        posted = await self.client.chat_postMessage(channel=channel, thread_ts=thread_ts,
                                                    text=_model_text(label, "", writing=True))
        return str(posted["ts"])

    async def stream(self, session: Session, message: str, label: str, chunks: AsyncIterator[str]) -> None:
        channel, _ = _split_thread(session)
        written, last = "", time.monotonic()
        async for chunk in chunks:
            written += chunk
            if time.monotonic() - last >= self.interval_s:
                await self._edit(channel, message, _model_text(label, written, writing=True))
                last = time.monotonic()

    async def settle(self, session: Session, message: str, label: str, text: str | None) -> None:
        channel, _ = _split_thread(session)
        shown = _model_text(label, text) if text is not None else f"*{escape(label)}*: {escape(messages.STORY_STOPPED)}"
        await self._edit(channel, message, shown)

    async def offer_vote(self, session: Session) -> None:
        channel, thread_ts = _split_thread(session)
        buttons = [{"type": "button", "action_id": f"{VOTE}_{i}", "value": f"{session.session_id}:{i}",
                    "text": {"type": "plain_text", "text": messages.ST_VOTE_OPTION.format(number=i + 1)}}
                   for i in range(len(session.vote.options))]
        text = escape(messages.ST_VOTE_BUTTONS)
        await self.client.chat_postMessage(channel=channel, thread_ts=thread_ts, text=text, blocks=[
            {"type": "section", "text": {"type": "mrkdwn", "text": text}},
            {"type": "actions", "elements": buttons}])

    async def attach(self, session: Session, filename: str, content: str, text: str) -> None:
        channel, thread_ts = _split_thread(session)
        await self.client.files_upload_v2(channel=channel, thread_ts=thread_ts, content=content, filename=filename,
                                          title=session.title, initial_comment=escape(text))

    async def _edit(self, channel: str, ts: str, text: str) -> None:
        try:
            await self.client.chat_update(channel=channel, ts=ts, text=text)
        except SlackApiError as error:  # a missed edit is not worth failing the turn for
            logger.warning("storytime: chat.update in %s failed: %s", channel, error.response.get("error"))


def _model_text(label: str, text: str, writing: bool = False) -> str:
    words = " ".join(part for part in (escape(text.strip()), escape(messages.STARTED) if writing else "") if part)
    return f"*{escape(label)}*: {words}".rstrip()


class SlackStorytime:
    """The storytime listeners; the adapter registers them on its bolt app."""

    def __init__(self, storytime: StorytimeService, is_admin: Any) -> None:
        self.storytime = storytime
        self._is_admin = is_admin  # async (client, user) -> bool, the adapter's users.info check
        self._names: dict[str, str] = {}

    async def on_command(self, ack: Any, body: dict[str, Any], client: AsyncWebClient, text: str) -> None:
        """`/storytime <text>`; every answer, error or not, is the ack (only the typist sees it)."""
        try:
            place, actor, command = to_storytime_request(body, text)
            if command.action in _ADMIN_ACTIONS:
                actor = Actor(actor.user, actor.name, await self._is_admin(client, actor.user))
            reply = await self._run(client, place, actor, command)
        except Exception as error:
            reply = user_message(error, f"storytime for {body.get('team_id')}:{body.get('user_id')}")
        await ack(link_channels(escape(reply)))

    async def _run(self, client: AsyncWebClient, place: Place, actor: Actor, command: StorytimeCommand) -> str:
        storytime = self.storytime
        if command.action == "start":
            async def open_thread(session: Session) -> str:
                try:
                    first = await client.chat_postMessage(channel=place.channel, text=escape(announcement(session)))
                except SlackApiError as error:
                    logger.warning("storytime: cannot post in %s: %s", place.channel, error.response.get("error"))
                    raise StorytimeError(messages.CANT_POST) from None
                return f"{place.channel}:{first['ts']}"

            session = await storytime.start(place, actor, command.start, open_thread)
            return messages.ST_STARTED_ACK.format(title=session.title)
        if (reply := await storytime.act(place, actor, command)) is not None:
            return reply
        return messages.STORYTIME_HELP.format(reply_hint=messages.STORYTIME_REPLY_HINT)

    async def on_reply(self, event: dict[str, Any], body: dict[str, Any], client: AsyncWebClient) -> None:
        """A message in a thread: a line if the thread is a session's; refusals go to the writer alone."""
        if event.get("subtype") or event.get("bot_id") or not event.get("thread_ts") or not event.get("user"):
            return
        team = body.get("team_id") or event.get("team") or ""
        place = thread_place(team, event["channel"], event["thread_ts"])
        if self.storytime.store.find_open(place.server_key, place.channel) is None:
            return  # an ordinary thread
        actor = Actor(event["user"], await self._name(client, event["user"]))
        try:
            await self.storytime.add(place, actor, unescape(event.get("text") or ""), echo=False)
        except Exception as error:
            await self._tell(client, event["channel"], event["thread_ts"], event["user"],
                             user_message(error, f"storytime reply from slack:{team}:{event['user']}"))

    async def on_vote(self, ack: Any, body: dict[str, Any], client: AsyncWebClient) -> None:
        await ack()
        user = body["user"]["id"]
        channel = (body.get("channel") or {}).get("id") or body["container"]["channel_id"]
        session_id, _, index = body["actions"][0]["value"].partition(":")
        try:
            reply = await self.storytime.vote("slack", session_id, Actor(user, await self._name(client, user)),
                                              int(index))
        except Exception as error:
            reply = user_message(error, f"storytime vote from {user}")
        thread_ts = (body.get("message") or {}).get("thread_ts") or body["container"].get("message_ts")
        await self._tell(client, channel, thread_ts, user, reply)

    async def _tell(self, client: AsyncWebClient, channel: str, thread_ts: str | None, user: str, text: str) -> None:
        try:
            await client.chat_postEphemeral(channel=channel, user=user, thread_ts=thread_ts, text=escape(text))
        except SlackApiError as error:
            logger.warning("storytime: could not tell %s in %s: %s", user, channel, error.response.get("error"))

    async def _name(self, client: AsyncWebClient, user: str) -> str:
        """A display name for the credits (users.info, once per person per run)."""
        if user not in self._names:
            try:
                info = (await client.users_info(user=user))["user"]
                profile = info.get("profile") or {}
                self._names[user] = profile.get("display_name") or info.get("name") or user
            except SlackApiError:
                return user
        return self._names[user]
