"""The fake Slack is faithful: a real bolt AsyncApp and real slack_sdk clients work against it.

HTTP mode serves the app through bolt's aiohttp adapter and posts signed requests to it;
Socket Mode runs bolt's AsyncSocketModeHandler against the fake's WebSocket. Assertions are
on what reached the fake (Web API calls, response_url posts, uploads, Socket Mode acks).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_bolt.response import BoltResponse
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from tests.fakes.bolt_http import SlackSender, serve
from tests.fakes.fake_slack import FakeSlack, fake_slack  # noqa: F401  (fixture)
from tests.fakes.slack_payloads import app_mention, event_callback, sign
from tests.fakes.workspace import (
    ALICE,
    APP_TOKEN,
    BOT_TOKEN,
    BOT_USER_ID,
    GENERAL,
    STORIES,
    TEAM_ID,
)

SIGNING_SECRET = "storybot-test-signing-secret"

CANCEL_BUTTON = {
    "type": "actions",
    "elements": [{"type": "button", "action_id": "cancel_story", "text": {"type": "plain_text", "text": "Cancel"}}],
}


def make_app(fake: FakeSlack, **options: Any) -> AsyncApp:
    client = AsyncWebClient(token=BOT_TOKEN, base_url=fake.base_url)
    return AsyncApp(name="storybot-test", client=client, signing_secret=SIGNING_SECRET, **options)


@pytest.fixture
def app(fake_slack: FakeSlack) -> AsyncApp:  # noqa: F811
    return make_app(fake_slack)


@pytest_asyncio.fixture
async def slack(app: AsyncApp) -> AsyncIterator[SlackSender]:
    """Slack's side of HTTP mode, posting to `app` served on 127.0.0.1."""
    async with serve(app) as url, SlackSender(url, SIGNING_SECRET) as sender:
        yield sender


@pytest_asyncio.fixture
async def socket_mode(fake_slack: FakeSlack, app: AsyncApp) -> AsyncIterator[AsyncSocketModeHandler]:  # noqa: F811
    """`app` connected to the fake over Socket Mode (hello received)."""
    handler = AsyncSocketModeHandler(app, app_token=APP_TOKEN)
    await handler.connect_async()
    await fake_slack.socket.wait_connected()
    yield handler
    await handler.close_async()


# ---- signing


def test_sign_reproduces_slacks_documented_example() -> None:
    # The worked example on docs.slack.dev/authentication/verifying-requests-from-slack
    body = (
        "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V"
        "&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text="
        "&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN"
        "&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
    )
    assert sign(body, "8f742231b10e8888abcd99yyyzzz85a5", 1531420618) == {
        "X-Slack-Request-Timestamp": "1531420618",
        "X-Slack-Signature": "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503",
    }


# ---- HTTP mode


async def test_slash_command_ack_text_is_the_http_response_then_post_and_update(
    fake_slack: FakeSlack, app: AsyncApp, slack: SlackSender  # noqa: F811
) -> None:
    @app.command("/story")
    async def story(ack: Any, command: dict[str, Any], client: AsyncWebClient) -> None:
        await ack("Writing your sci_fi story…")
        posted = await client.chat_postMessage(channel=command["channel_id"], text="Once upon a time")
        await client.chat_update(channel=posted["channel"], ts=posted["ts"], text="Once upon a time, the end.")

    delivery = await slack.slash_command(fake_slack.slash_command("sci_fi After the war"))

    assert (delivery.status, delivery.content_type) == (200, "text/plain")
    assert delivery.text == "Writing your sci_fi story…"
    update = await fake_slack.wait_for("chat.update")
    [post] = fake_slack.calls_to("chat.postMessage")
    # bolt's per-request client adds team_id to every call it makes
    assert post.args == {"channel": STORIES, "text": "Once upon a time", "team_id": TEAM_ID}
    assert (post.token, post.content_type) == (BOT_TOKEN, "application/json")
    assert update.args == {
        "channel": STORIES,
        "ts": post.response["ts"],
        "text": "Once upon a time, the end.",
        "team_id": TEAM_ID,
    }
    assert fake_slack.message(STORIES, post.response["ts"])["text"] == "Once upon a time, the end."
    # bolt calls auth.test once per app, on the first request, to learn the bot's user id
    assert [call.method for call in fake_slack.calls] == ["auth.test", "chat.postMessage", "chat.update"]


@pytest.mark.parametrize(
    "tamper",
    [{"signing_secret": "someone-elses-secret"}, {"signature": "v0=" + "0" * 64}, {"signature": ""}],
    ids=["wrong-secret", "forged", "missing"],
)
async def test_bad_signature_is_401_and_nothing_runs(
    fake_slack: FakeSlack, app: AsyncApp, slack: SlackSender, tamper: dict[str, str]  # noqa: F811
) -> None:
    handled: list[str] = []

    @app.command("/story")
    async def story(ack: Any) -> None:
        handled.append("story")
        await ack()

    delivery = await slack.slash_command(fake_slack.slash_command("fantasy"), **tamper)

    assert (delivery.status, delivery.json()) == (401, {"error": "invalid request"})
    assert handled == [] and len(fake_slack.calls) == 0  # verification runs before auth.test


@pytest.mark.parametrize(("age_seconds", "status"), [(4 * 60, 200), (5 * 60 + 10, 401), (-(5 * 60 + 10), 401)])
async def test_timestamps_more_than_five_minutes_off_are_401(
    fake_slack: FakeSlack, app: AsyncApp, slack: SlackSender, age_seconds: int, status: int  # noqa: F811
) -> None:
    @app.command("/story")
    async def story(ack: Any) -> None:
        await ack("ok")

    timestamp = int(time.time()) - age_seconds
    delivery = await slack.slash_command(fake_slack.slash_command("horror"), timestamp=timestamp)

    assert delivery.status == status


async def test_button_click_reaches_action_handler_and_respond_posts_to_response_url(
    fake_slack: FakeSlack, app: AsyncApp, slack: SlackSender  # noqa: F811
) -> None:
    posted = await app.client.chat_postMessage(channel=STORIES, text="A story", blocks=[CANCEL_BUTTON])
    seen: dict[str, str] = {}

    @app.action("cancel_story")
    async def cancel(ack: Any, action: dict[str, Any], body: dict[str, Any], respond: Any) -> None:
        await ack()
        seen.update(value=action["value"], ts=body["container"]["message_ts"], user=body["user"]["id"])
        await respond(text="Cancelled.", replace_original=True)

    payload = fake_slack.block_actions("cancel_story", "req-42", message=posted["message"])
    delivery = await slack.interaction(payload)

    assert (delivery.status, delivery.text) == (200, "")
    response = await fake_slack.responses.wait_for(lambda post: True)
    assert (response.url, response.status) == (payload["response_url"], 200)
    assert response.body == {"text": "Cancelled.", "replace_original": True}
    assert seen == {"value": "req-42", "ts": posted["ts"], "user": ALICE}


async def test_response_urls_the_fake_never_issued_are_404(fake_slack: FakeSlack) -> None:  # noqa: F811
    webhook = AsyncWebhookClient(url=f"{fake_slack.url}/commands/{TEAM_ID}/1/made-up")
    response = await webhook.send(text="hello?")
    assert (response.status_code, response.body) == (404, "no_service")
    assert fake_slack.responses[0].status == 404


async def test_retry_headers_reach_listeners_through_request_headers(
    fake_slack: FakeSlack, app: AsyncApp, slack: SlackSender  # noqa: F811
) -> None:
    seen: asyncio.Future[tuple[Any, Any]] = asyncio.get_running_loop().create_future()

    @app.event("app_mention")
    async def mention(request: Any) -> None:
        # bolt keeps headers lower-cased, each a list of values; nothing is copied into context
        seen.set_result((request.headers.get("x-slack-retry-num"), request.headers.get("x-slack-retry-reason")))

    delivery = await slack.event(event_callback(app_mention("a story please")), retry_num=1)

    assert (delivery.status, delivery.text) == (200, "")
    assert await asyncio.wait_for(seen, 5) == (["1"], ["http_timeout"])


async def test_middleware_can_ack_retries_without_running_listeners(
    fake_slack: FakeSlack, app: AsyncApp, slack: SlackSender  # noqa: F811
) -> None:
    mentions: asyncio.Queue[str] = asyncio.Queue()

    @app.middleware
    async def drop_retries(request: Any, next: Any) -> BoltResponse | None:
        if request.headers.get("x-slack-retry-num"):
            return BoltResponse(status=200, body="")  # acked: Slack stops retrying
        await next()
        return None

    @app.event("app_mention")
    async def mention(event: dict[str, Any]) -> None:
        await mentions.put(event["text"])

    retried = await slack.event(event_callback(app_mention("retried")), retry_num=2, retry_reason="http_error")
    fresh = await slack.event(event_callback(app_mention("fresh")))

    assert (retried.status, fresh.status) == (200, 200)
    assert await asyncio.wait_for(mentions.get(), 5) == f"<@{BOT_USER_ID}> fresh"
    assert mentions.empty()


async def test_events_from_the_bot_itself_are_acked_but_not_dispatched(
    fake_slack: FakeSlack, app: AsyncApp, slack: SlackSender  # noqa: F811
) -> None:
    # IgnoringSelfEvents compares the event's user with auth.test's user_id
    mentions: asyncio.Queue[str] = asyncio.Queue()

    @app.event("app_mention")
    async def mention(event: dict[str, Any]) -> None:
        await mentions.put(event["user"])

    own = await slack.event(event_callback(app_mention("echo", user=BOT_USER_ID)))
    human = await slack.event(event_callback(app_mention("hello", user=ALICE)))

    assert (own.status, human.status) == (200, 200)
    assert await asyncio.wait_for(mentions.get(), 5) == ALICE
    assert mentions.empty()


async def test_http_response_goes_out_at_ack_while_the_listener_keeps_running(
    fake_slack: FakeSlack, app: AsyncApp, slack: SlackSender  # noqa: F811
) -> None:
    release = asyncio.Event()

    @app.command("/story")
    async def story(ack: Any, client: AsyncWebClient) -> None:
        await ack("Queued.")
        await release.wait()  # still generating when Slack already has its answer
        await client.chat_postMessage(channel=STORIES, text="Done.")

    delivery = await slack.slash_command(fake_slack.slash_command("sci_fi"))

    assert (delivery.status, delivery.text) == (200, "Queued.")
    assert fake_slack.calls_to("chat.postMessage") == []
    release.set()
    await fake_slack.wait_for("chat.postMessage")


async def test_process_before_response_holds_the_http_response_until_the_listener_returns(
    fake_slack: FakeSlack,  # noqa: F811
) -> None:
    app = make_app(fake_slack, process_before_response=True)

    @app.command("/story")
    async def story(ack: Any, client: AsyncWebClient) -> None:
        await ack("Queued.")
        await client.chat_postMessage(channel=STORIES, text="Done.")

    async with serve(app) as url, SlackSender(url, SIGNING_SECRET) as slack:
        delivery = await slack.slash_command(fake_slack.slash_command("sci_fi"))

    assert (delivery.status, delivery.text) == (200, "Queued.")
    assert [call.args["text"] for call in fake_slack.calls_to("chat.postMessage")] == ["Done."]


async def test_a_listener_that_raises_before_ack_is_an_http_500(
    fake_slack: FakeSlack, app: AsyncApp, slack: SlackSender  # noqa: F811
) -> None:
    # (one that never calls ack() is worse: bolt waits 3 s, then answers 404 "unhandled request")
    @app.command("/story")
    async def story(ack: Any) -> None:
        raise RuntimeError("model not loaded")

    delivery = await slack.slash_command(fake_slack.slash_command("sci_fi"))

    assert (delivery.status, delivery.text) == (500, "")


# ---- Web API fidelity


@pytest.fixture
def client(fake_slack: FakeSlack) -> AsyncWebClient:  # noqa: F811
    return AsyncWebClient(token=BOT_TOKEN, base_url=fake_slack.base_url)


async def test_form_and_json_bodies_are_recorded_alike(
    fake_slack: FakeSlack, client: AsyncWebClient  # noqa: F811
) -> None:
    await client.api_call("chat.postMessage", data={"channel": STORIES, "text": "form"})
    await client.api_call("chat.postMessage", json={"channel": STORIES, "text": "json"})
    await AsyncWebClient(base_url=fake_slack.base_url).api_call(
        "chat.postMessage", data={"token": BOT_TOKEN, "channel": STORIES, "text": "legacy"}
    )

    form, json_call, legacy = fake_slack.calls_to("chat.postMessage")
    assert (form.content_type, form.args) == ("application/x-www-form-urlencoded", {"channel": STORIES, "text": "form"})
    assert (json_call.content_type, json_call.args) == ("application/json", {"channel": STORIES, "text": "json"})
    assert legacy.args == {"channel": STORIES, "text": "legacy"}
    assert form.token == json_call.token == legacy.token == BOT_TOKEN
    assert form.headers["Authorization"] == f"Bearer {BOT_TOKEN}"


async def test_unknown_methods_and_bad_tokens_fail_like_slack_and_are_recorded(
    fake_slack: FakeSlack, client: AsyncWebClient  # noqa: F811
) -> None:
    attempts = [
        client.api_call("stories.tell"),
        AsyncWebClient(base_url=fake_slack.base_url).chat_postMessage(channel=STORIES, text="x"),
        AsyncWebClient(token="not-a-token", base_url=fake_slack.base_url).auth_test(),
        AsyncWebClient(token=APP_TOKEN, base_url=fake_slack.base_url).chat_postMessage(channel=STORIES, text="x"),
        client.apps_connections_open(app_token=BOT_TOKEN),
    ]
    for attempt in attempts:
        with pytest.raises(SlackApiError):
            await attempt

    assert [(call.method, call.response["error"]) for call in fake_slack.calls] == [
        ("stories.tell", "unknown_method"),
        ("chat.postMessage", "not_authed"),
        ("auth.test", "invalid_auth"),
        ("chat.postMessage", "not_allowed_token_type"),
        ("apps.connections.open", "not_allowed_token_type"),
    ]


async def test_chat_methods_answer_and_fail_like_slack(
    fake_slack: FakeSlack, client: AsyncWebClient  # noqa: F811
) -> None:
    posted = await client.chat_postMessage(channel=STORIES, text="Once", blocks=[CANCEL_BUTTON])
    assert posted["message"]["user"] == BOT_USER_ID and posted["ts"].count(".") == 1
    updated = await client.chat_update(channel=STORIES, ts=posted["ts"], text="Once more")
    assert updated["message"]["blocks"] == [CANCEL_BUTTON]  # chat.update keeps blocks it isn't sent
    ephemeral = await client.chat_postEphemeral(channel=STORIES, user=ALICE, text="only you")
    assert float(ephemeral["message_ts"]) > float(posted["ts"])
    assert (await client.chat_delete(channel=STORIES, ts=posted["ts"]))["ts"] == posted["ts"]
    assert fake_slack.message(STORIES, posted["ts"]) is None

    failing = {
        "channel_not_found": client.chat_postMessage(channel="C0NOWHERE1", text="x"),
        "no_text": client.api_call("chat.postMessage", json={"channel": STORIES}),  # skips slack_sdk's warning
        "message_not_found": client.chat_update(channel=STORIES, ts=posted["ts"], text="gone"),
        "user_not_found": client.chat_postEphemeral(channel=STORIES, user="U0NOBODY01", text="x"),
    }
    for error, attempt in failing.items():
        with pytest.raises(SlackApiError) as raised:
            await attempt
        assert raised.value.response["error"] == error


async def test_views_and_lookups_answer_like_slack(
    fake_slack: FakeSlack, client: AsyncWebClient  # noqa: F811
) -> None:
    title = {"type": "plain_text", "text": "Settings"}
    view = {"type": "modal", "title": title, "blocks": [], "callback_id": "settings"}
    opened = await client.views_open(trigger_id="123.456.abc", view=view)
    assert opened["view"]["id"].startswith("V") and opened["view"]["callback_id"] == "settings"

    channel = await client.conversations_info(channel=GENERAL)
    user = await client.users_info(user=ALICE)
    assert (channel["channel"]["name"], user["user"]["name"]) == ("general", "alice")
    assert [call.http_verb for call in fake_slack.calls] == ["POST", "GET", "GET"]

    with pytest.raises(SlackApiError) as raised:
        await client.views_open(trigger_id="", view=view)
    assert raised.value.response["response_metadata"]["messages"] == ["[ERROR] missing required field: trigger_id"]


async def test_fail_next_ratelimited_is_429_with_retry_after_then_recovers(
    fake_slack: FakeSlack, client: AsyncWebClient  # noqa: F811
) -> None:
    fake_slack.fail_next("chat.update", "ratelimited", retry_after=7)
    fake_slack.fail_next("views.open", "expired_trigger_id")

    with pytest.raises(SlackApiError) as raised:
        await client.chat_update(channel=STORIES, ts="1.000100", text="x")
    assert raised.value.response.status_code == 429
    assert raised.value.response.headers["Retry-After"] == "7"
    with pytest.raises(SlackApiError) as raised:
        await client.views_open(trigger_id="1.2.3", view={"type": "modal"})
    assert (raised.value.response.status_code, raised.value.response["error"]) == (200, "expired_trigger_id")
    # each failure is used once; the next call gets the real answer
    with pytest.raises(SlackApiError) as raised:
        await client.chat_update(channel=STORIES, ts="1.000100", text="x")
    assert raised.value.response["error"] == "message_not_found"


async def test_rate_limit_retry_handler_waits_and_retries(fake_slack: FakeSlack) -> None:  # noqa: F811
    # AsyncWebClient only retries connection errors by default; 429s need this handler
    retry_on_429 = AsyncRateLimitErrorRetryHandler(max_retry_count=1)
    client = AsyncWebClient(token=BOT_TOKEN, base_url=fake_slack.base_url, retry_handlers=[retry_on_429])
    fake_slack.fail_next("chat.postMessage", "ratelimited", retry_after=0)

    posted = await client.chat_postMessage(channel=STORIES, text="eventually")

    assert posted["ok"]
    assert [call.status for call in fake_slack.calls_to("chat.postMessage")] == [429, 200]


async def test_files_upload_v2_records_the_file_name_and_content(
    fake_slack: FakeSlack, client: AsyncWebClient  # noqa: F811
) -> None:
    story = "Once upon a time… the end.\n"

    result = await client.files_upload_v2(
        channel=STORIES, filename="story.txt", content=story, title="The Story", initial_comment="Here you go"
    )

    [upload] = fake_slack.uploads
    assert (upload.filename, upload.content) == ("story.txt", story.encode())
    get_url = fake_slack.calls_to("files.getUploadURLExternal")[0]
    assert get_url.args == {"filename": "story.txt", "length": str(len(story.encode()))}
    complete = await fake_slack.wait_for("files.completeUploadExternal")
    assert json.loads(complete.args["files"]) == [{"id": upload.file_id, "title": "The Story"}]
    assert (complete.args["channel_id"], complete.args["initial_comment"]) == (STORIES, "Here you go")
    assert (result["file"]["id"], result["file"]["name"]) == (upload.file_id, "story.txt")


# ---- Socket Mode


async def test_socket_mode_slash_command_is_acked_and_the_handler_posts(
    fake_slack: FakeSlack, app: AsyncApp, socket_mode: AsyncSocketModeHandler  # noqa: F811
) -> None:
    @app.command("/story")
    async def story(ack: Any, command: dict[str, Any], client: AsyncWebClient) -> None:
        await ack("Writing…")
        await client.chat_postMessage(channel=command["channel_id"], text=f"Story for {command['text']}")

    ack = await fake_slack.socket.deliver("slash_commands", fake_slack.slash_command("sci_fi After the war"))

    assert ack.payload == {"text": "Writing…"}  # ack("text") travels inside the envelope ack
    assert ack.latency is not None and ack.latency < 3
    post = await fake_slack.wait_for("chat.postMessage")
    assert (post.args["text"], post.token) == ("Story for sci_fi After the war", BOT_TOKEN)
    [connections_open] = fake_slack.calls_to("apps.connections.open")
    assert connections_open.token == APP_TOKEN


async def test_socket_mode_button_click_is_acked_without_payload(
    fake_slack: FakeSlack, app: AsyncApp, socket_mode: AsyncSocketModeHandler  # noqa: F811
) -> None:
    clicked: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    @app.action("cancel_story")
    async def cancel(ack: Any, action: dict[str, Any]) -> None:
        await ack()
        clicked.set_result(action["value"])

    ack = await fake_slack.socket.deliver("interactive", fake_slack.block_actions("cancel_story", "req-7"))

    assert ack.payload is None
    assert await asyncio.wait_for(clicked, 5) == "req-7"


async def test_socket_mode_retry_attempt_becomes_retry_headers(
    fake_slack: FakeSlack, app: AsyncApp, socket_mode: AsyncSocketModeHandler  # noqa: F811
) -> None:
    seen: asyncio.Future[tuple[Any, Any]] = asyncio.get_running_loop().create_future()

    @app.event("app_mention")
    async def mention(request: Any) -> None:
        seen.set_result((request.headers.get("x-slack-retry-num"), request.headers.get("x-slack-retry-reason")))

    body = event_callback(app_mention("again"))
    await fake_slack.socket.deliver("events_api", body, retry_attempt=2, retry_reason="timeout")

    assert await asyncio.wait_for(seen, 5) == (["2"], ["timeout"])


async def test_socket_mode_reconnects_when_slack_asks(
    fake_slack: FakeSlack, app: AsyncApp, socket_mode: AsyncSocketModeHandler  # noqa: F811
) -> None:
    @app.command("/story")
    async def story(ack: Any) -> None:
        await ack()

    await fake_slack.socket.send_disconnect("refresh_requested")
    await fake_slack.socket.wait_connected(2)
    ack = await fake_slack.socket.deliver("slash_commands", fake_slack.slash_command("after reconnect"))

    assert ack.payload is None
    assert len(fake_slack.calls_to("apps.connections.open")) == 2  # each connection needs a fresh ticket
