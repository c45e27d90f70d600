"""The fake Discord is faithful enough for a real discord.py client: login, sync, interactions, resume."""

from __future__ import annotations

import asyncio
import io

import aiohttp
import discord
import pytest
from discord import app_commands
from discord.gateway import DiscordWebSocket
from discord.http import Route

from bot.discord.endpoints import DEFAULT_API_URL, point_discord_at, restore_discord_defaults
from tests.fakes.discord_fixtures import connected
from tests.fakes.discord_records import RecordedRequest
from tests.fakes.fake_discord import FakeDiscord

CALLBACK = "POST /interactions/{interaction_id}/{interaction_token}/callback"
WEBHOOK_MESSAGE = "/webhooks/{application_id}/{interaction_token}/messages/{message_id}"
FOLLOWUP = "POST /webhooks/{application_id}/{interaction_token}"


def make_client(intents: discord.Intents | None = None) -> tuple[discord.Client, app_commands.CommandTree]:
    # guild_ready_timeout: discord.py otherwise waits 2 s after the last GUILD_CREATE before on_ready.
    client = discord.Client(intents=intents or discord.Intents.default(), guild_ready_timeout=0.05)
    return client, app_commands.CommandTree(client)


def for_interaction(fake: FakeDiscord, payload: dict) -> list[RecordedRequest]:
    """The REST calls made with this interaction's token, in order."""
    return [r for r in fake.requests if payload["token"] in r.path]


async def test_client_logs_in_identifies_and_becomes_ready(fake_discord: FakeDiscord) -> None:
    client, _ = make_client()
    async with connected(client, fake_discord):
        assert client.user is not None and client.user.id == int(fake_discord.bot_user["id"])
        assert client.application_id == int(fake_discord.application_id)
        guild = client.get_guild(int(fake_discord.guild["id"]))
        assert guild is not None and guild.name == "Story Club" and guild.me is not None
        assert client.get_channel(int(fake_discord.channel["id"])).name == "general"

    login = fake_discord.requests[0]
    assert (login.method, login.path) == ("GET", "/users/@me")
    assert login.headers["Authorization"] == f"Bot {fake_discord.token}"
    assert login.headers["User-Agent"].startswith("DiscordBot (https://github.com/Rapptz/discord.py")
    assert fake_discord.gateway.connections[0].query == {"v": "10", "encoding": "json", "compress": "zlib-stream"}
    identify = next(f for f in fake_discord.frames if f.direction == "recv" and f.op == 2)
    assert identify.d["token"] == fake_discord.token
    assert identify.d["intents"] == discord.Intents.default().value
    sent_events = [f.t for f in fake_discord.frames if f.direction == "send" and f.op == 0]
    assert sent_events == ["READY", "GUILD_CREATE"]
    assert fake_discord.problems == []


async def test_tree_sync_bulk_overwrites_global_and_guild_commands(fake_discord: FakeDiscord) -> None:
    client, tree = make_client()

    @tree.command(description="Tell a story")
    @app_commands.describe(genre="What kind of story")
    @app_commands.choices(length=[app_commands.Choice(name="short", value=100),
                                  app_commands.Choice(name="long", value=400)])
    async def story(interaction: discord.Interaction, genre: str, length: int = 100) -> None: ...

    guild = discord.Object(int(fake_discord.guild["id"]))
    async with connected(client, fake_discord):
        synced = await tree.sync()
        tree.copy_global_to(guild=guild)
        guild_synced = await tree.sync(guild=guild)

    put_global, put_guild = [r for r in fake_discord.requests if r.method == "PUT"]
    assert put_global.route == "PUT /applications/{application_id}/commands"
    assert put_global.params == {"application_id": fake_discord.application_id}
    [command] = put_global.json
    assert (command["name"], command["description"], command["type"]) == ("story", "Tell a story", 1)
    assert [(o["name"], o["type"], o["required"]) for o in command["options"]] == [
        ("genre", 3, True),
        ("length", 4, False),
    ]
    assert command["options"][0]["description"] == "What kind of story"
    assert command["options"][1]["choices"] == [{"name": "short", "value": 100}, {"name": "long", "value": 400}]
    assert [c.id for c in synced] == [int(fake_discord.state.global_commands[0]["id"])]

    assert put_guild.route == "PUT /applications/{application_id}/guilds/{guild_id}/commands"
    assert put_guild.params["guild_id"] == fake_discord.guild["id"]
    assert [c.guild_id for c in guild_synced] == [guild.id]
    assert put_guild.status == put_global.status == 200


async def test_slash_command_defers_edits_and_follows_up(fake_discord: FakeDiscord) -> None:
    client, tree = make_client()
    seen: dict = {}

    @tree.command(description="Tell a story")
    async def story(interaction: discord.Interaction, genre: str, length: int = 100) -> None:
        seen.update(genre=genre, length=length, user=interaction.user.id, guild=interaction.guild_id)
        await interaction.response.defer(thinking=True)
        await interaction.edit_original_response(content=f"A {genre} story of {length} words")
        followup = await interaction.followup.send("The end.", ephemeral=True, wait=True)
        seen["followup_id"] = followup.id

    async with connected(client, fake_discord):
        await tree.sync()
        payload = fake_discord.slash_command("story", {"genre": "sci_fi", "length": 200})
        await fake_discord.interact(payload)
        await fake_discord.wait_for(lambda r: r.route == FOLLOWUP)

    assert seen["genre"] == "sci_fi" and seen["length"] == 200
    assert seen["user"] == int(fake_discord.user["id"]) and seen["guild"] == int(fake_discord.guild["id"])
    callback, edit, followup = for_interaction(fake_discord, payload)

    assert callback.route == CALLBACK
    assert callback.params == {"interaction_id": payload["id"], "interaction_token": payload["token"]}
    assert callback.query == {"with_response": "1"}
    assert callback.json == {"type": 5}
    assert "Authorization" not in callback.headers  # the token in the URL is the credential
    assert callback.response["interaction"]["response_message_loading"] is True

    assert edit.route == f"PATCH {WEBHOOK_MESSAGE}"
    assert edit.params["application_id"] == fake_discord.application_id
    assert edit.params["message_id"] == "@original"
    assert edit.json == {"content": "A sci_fi story of 200 words", "tts": False}

    assert followup.query == {"wait": "1", "with_components": "0"}
    assert followup.json == {"content": "The end.", "tts": False, "flags": 64}
    assert all(r.status == 200 for r in (callback, edit, followup))

    original = fake_discord.original_message(payload)
    assert original is not None and original["content"] == "A sci_fi story of 200 words"
    assert original["flags"] == 0  # the edit ended the "thinking..." state
    [sent] = fake_discord.followup_messages(payload)
    assert (sent["content"], sent["flags"], int(sent["id"])) == ("The end.", 64, seen["followup_id"])


async def test_followup_straight_after_a_deferral_replaces_the_thinking_message(fake_discord: FakeDiscord) -> None:
    client, tree = make_client()

    @tree.command(description="Tell a story")
    async def story(interaction: discord.Interaction) -> None:
        await interaction.response.defer(thinking=True)
        await interaction.followup.send("Once upon a time")

    async with connected(client, fake_discord):
        await tree.sync()
        payload = fake_discord.slash_command("story")
        await fake_discord.interact(payload)
        followup = await fake_discord.wait_for(lambda r: r.route == FOLLOWUP)

    # Discord's documented back-compat: no new message, the deferred one is edited.
    assert followup.response["id"] == fake_discord.interaction(payload).original_id
    assert fake_discord.followup_messages(payload) == []
    assert fake_discord.original_message(payload)["content"] == "Once upon a time"


async def test_button_click_reaches_the_view_callback(fake_discord: FakeDiscord) -> None:
    client, tree = make_client()
    clicked = asyncio.Event()

    class Again(discord.ui.View):
        @discord.ui.button(label="Another one", custom_id="story:again")
        async def again(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
            await interaction.response.edit_message(content=f"Writing another for {interaction.user.name}", view=None)
            clicked.set()

    @tree.command(description="Tell a story")
    async def story(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("Once upon a time", view=Again(timeout=30))

    async with connected(client, fake_discord):
        await tree.sync()
        command = await fake_discord.interact(fake_discord.slash_command("story"))
        await fake_discord.wait_for(lambda r: r.route == CALLBACK)
        message = fake_discord.original_message(command.payload)
        assert message["components"][0]["components"][0]["custom_id"] == "story:again"

        click = fake_discord.button_click(message, "story:again")
        await fake_discord.interact(click)
        await asyncio.wait_for(clicked.wait(), 5)
        update = await fake_discord.wait_for(lambda r: r.route == CALLBACK and click["id"] in r.path)

    assert update.json == {"type": 7, "data": {"tts": False, "content": "Writing another for alice", "components": []}}
    assert fake_discord.state.messages[message["id"]]["content"] == "Writing another for alice"


async def test_autocomplete_returns_choices(fake_discord: FakeDiscord) -> None:
    client, tree = make_client()
    genres = ["fantasy", "horror", "sci_fi", "science_fantasy"]

    @tree.command(description="Tell a story")
    async def story(interaction: discord.Interaction, genre: str) -> None: ...

    @story.autocomplete("genre")
    async def genre_choices(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return [app_commands.Choice(name=g, value=g) for g in genres if g.startswith(current)]

    async with connected(client, fake_discord):
        await tree.sync()
        payload = fake_discord.autocomplete("story", {"genre": "sc"}, focused="genre")
        assert payload["type"] == 4
        assert payload["data"]["options"] == [{"name": "genre", "type": 3, "value": "sc", "focused": True}]
        await fake_discord.interact(payload)
        callback = await fake_discord.wait_for(lambda r: r.route == CALLBACK)

    assert callback.json == {
        "type": 8,
        "data": {"choices": [{"name": "sci_fi", "value": "sci_fi"}, {"name": "science_fantasy",
                                                                     "value": "science_fantasy"}]},
    }
    assert callback.status == 200 and "resource" not in callback.response


async def test_subcommands_and_resolved_users_reach_the_callback(fake_discord: FakeDiscord) -> None:
    client, tree = make_client()
    got: asyncio.Future = asyncio.get_running_loop().create_future()
    session = app_commands.Group(name="session", description="Group storytelling")

    @session.command(description="Start a story with someone")
    async def start(interaction: discord.Interaction, partner: discord.Member, rounds: int = 3) -> None:
        got.set_result((partner.id, partner.name, rounds, interaction.command.qualified_name))
        await interaction.response.send_message("Starting", ephemeral=True)

    tree.add_command(session)
    bob = fake_discord.add_user("bob")
    async with connected(client, fake_discord):
        await tree.sync()
        payload = fake_discord.slash_command("session start", {"partner": bob, "rounds": 5})
        await fake_discord.interact(payload)
        assert await asyncio.wait_for(got, 5) == (int(bob["id"]), "bob", 5, "session start")
        callback = await fake_discord.wait_for(lambda r: r.route == CALLBACK)

    assert payload["data"]["options"] == [
        {"name": "start", "type": 1, "options": [
            {"name": "partner", "type": 6, "value": bob["id"]},
            {"name": "rounds", "type": 4, "value": 5},
        ]},
    ]
    assert callback.response["interaction"]["response_message_ephemeral"] is True


async def test_disconnect_resumes_and_replays_missed_dispatches(fake_discord: FakeDiscord) -> None:
    client, tree = make_client()
    calls: list[str] = []
    resumed = asyncio.Event()

    @client.event
    async def on_resumed() -> None:
        resumed.set()

    @tree.command(description="Tell a story")
    async def story(interaction: discord.Interaction, genre: str) -> None:
        calls.append(genre)
        await interaction.response.send_message(f"A {genre} story")

    async with connected(client, fake_discord):
        await tree.sync()
        async with fake_discord.gateway_down(code=4000):
            # The socket is closed and the client's reconnect is held, so this one is missed for sure.
            missed = fake_discord.slash_command("story", {"genre": "missed"})
            [missed_seq] = await fake_discord.dispatch("INTERACTION_CREATE", missed)
        resume = await fake_discord.wait_for_frame(lambda f: f.direction == "recv" and f.op == 6)
        await asyncio.wait_for(resumed.wait(), 5)
        await fake_discord.wait_for(lambda r: missed["id"] in r.path)

        later = fake_discord.slash_command("story", {"genre": "later"})
        [later_seq] = await fake_discord.dispatch("INTERACTION_CREATE", later)
        await fake_discord.wait_for(lambda r: later["id"] in r.path)

    assert calls == ["missed", "later"]
    assert (fake_discord.gateway.identify_count, fake_discord.gateway.resume_count) == (1, 1)
    ready = next(f for f in fake_discord.frames if f.t == "READY")
    assert resume.d["session_id"] == ready.d["session_id"]
    assert resume.d["seq"] == missed_seq - 1  # the client had seen everything before the blip
    assert fake_discord.gateway.connections[resume.connection].path == "/gateway-resume"
    on_new_socket = [f for f in fake_discord.frames if f.direction == "send" and f.connection == resume.connection]
    dispatched = [(f.t, f.s) for f in on_new_socket if f.op == 0]
    assert dispatched[0] == ("INTERACTION_CREATE", missed_seq)  # replayed with its original sequence number
    assert [s for _, s in dispatched] == list(range(missed_seq, missed_seq + len(dispatched)))
    assert {"RESUMED", "MESSAGE_CREATE"} <= {t for t, _ in dispatched[1:3]}  # MESSAGE_CREATE: the bot's answer
    assert later_seq > missed_seq + 2


async def test_op7_reconnect_is_followed_by_resume(fake_discord: FakeDiscord) -> None:
    client, tree = make_client()
    arrived = asyncio.Event()

    @client.event
    async def on_guild_channel_create(channel: discord.abc.GuildChannel) -> None:
        arrived.set()

    async with connected(client, fake_discord):
        await fake_discord.request_reconnect()
        await fake_discord.wait_for_frame(lambda f: f.direction == "recv" and f.op == 6)
        new_channel = {**fake_discord.channel, "id": "1", "name": "stories"}
        await fake_discord.dispatch("CHANNEL_CREATE", new_channel)
        await asyncio.wait_for(arrived.wait(), 5)
        assert client.get_channel(1).name == "stories"
    assert (fake_discord.gateway.identify_count, fake_discord.gateway.resume_count) == (1, 1)


async def test_invalid_session_makes_the_client_identify_again(fake_discord: FakeDiscord) -> None:
    client, _ = make_client()

    async def no_identify_delay(shard_id: int | None, *, initial: bool = False) -> None:
        pass  # discord.py sleeps 5 s before every IDENTIFY but the first

    client.before_identify_hook = no_identify_delay  # type: ignore[method-assign]
    async with connected(client, fake_discord):
        await fake_discord.invalidate_session(resumable=False)
        await fake_discord.wait_for_frame(lambda f: f.direction == "recv" and f.op == 2, count=2)
    assert (fake_discord.gateway.identify_count, fake_discord.gateway.resume_count) == (2, 0)


async def test_channel_message_with_a_file_is_recorded_and_served(fake_discord: FakeDiscord) -> None:
    client, _ = make_client()
    story = "Once upon a time, a small model dreamed of stories.\n".encode()
    async with connected(client, fake_discord):
        channel = client.get_channel(int(fake_discord.channel["id"]))
        sent = await channel.send("Your story", file=discord.File(io.BytesIO(story), filename="story.txt"))
        assert await sent.attachments[0].read() == story  # the attachment URL points at the fake's CDN

    post = next(r for r in fake_discord.requests if r.method == "POST")
    assert post.route == "POST /channels/{channel_id}/messages"
    assert post.params == {"channel_id": fake_discord.channel["id"]}
    assert post.headers["Content-Type"].startswith("multipart/form-data")
    assert post.json["content"] == "Your story"
    assert post.json["attachments"] == [{"id": 0, "filename": "story.txt"}]
    assert post.response["nonce"] == post.json["nonce"]  # discord.py sends a nonce with every channel message
    [upload] = post.files
    assert (upload.field, upload.filename, upload.data) == ("files[0]", "story.txt", story)
    assert sent.attachments[0].filename == "story.txt" and sent.attachments[0].size == len(story)
    assert fake_discord.messages_in()[0]["attachments"][0]["content_type"] == "text/plain; charset=utf-8"


async def test_followup_with_a_file_is_multipart(fake_discord: FakeDiscord) -> None:
    client, tree = make_client()

    @tree.command(description="Tell a story")
    async def story(interaction: discord.Interaction) -> None:
        await interaction.response.defer(thinking=True)
        await interaction.edit_original_response(content="Done")
        await interaction.followup.send(file=discord.File(io.BytesIO(b"The end."), filename="story.md"))

    async with connected(client, fake_discord):
        await tree.sync()
        await fake_discord.interact(fake_discord.slash_command("story"))
        followup = await fake_discord.wait_for(lambda r: r.route == FOLLOWUP)

    assert followup.json["attachments"] == [{"id": 0, "filename": "story.md"}]
    assert [(f.field, f.data) for f in followup.files] == [("files[0]", b"The end.")]
    assert followup.response["attachments"][0]["filename"] == "story.md"


async def test_discord_rules_surface_as_discord_errors(fake_discord: FakeDiscord) -> None:
    client, tree = make_client()
    errors: list[BaseException] = []
    done = asyncio.Event()

    @tree.command(description="Tell a story")
    async def story(interaction: discord.Interaction) -> None:
        try:
            await interaction.response.send_message("x" * 2001)
        except discord.HTTPException as error:
            errors.append(error)
        await interaction.response.send_message("short")
        try:
            await interaction.followup.send("")
        except discord.HTTPException as error:
            errors.append(error)
        done.set()

    async with connected(client, fake_discord):
        await tree.sync()
        await fake_discord.interact(fake_discord.slash_command("story"))
        await asyncio.wait_for(done.wait(), 5)

    too_long, empty = errors
    assert (too_long.status, too_long.code) == (400, 50035)
    assert "data.content" in str(too_long) and "2000 or fewer" in str(too_long)
    assert (empty.status, empty.code) == (400, 50006)


async def test_a_response_after_the_deadline_gets_unknown_interaction() -> None:
    client, tree = make_client()
    errors: list[discord.HTTPException] = []
    done = asyncio.Event()

    @tree.command(description="Tell a story")
    async def story(interaction: discord.Interaction) -> None:
        await asyncio.sleep(0.3)
        try:
            await interaction.response.defer(thinking=True)
        except discord.HTTPException as error:
            errors.append(error)
        done.set()

    async with FakeDiscord(callback_deadline=0.1) as strict:
        restore = point_discord_at(strict.api_url, strict.gateway_url)
        try:
            async with connected(client, strict):
                await tree.sync()
                payload = strict.slash_command("story")
                await strict.interact(payload)
                await asyncio.wait_for(done.wait(), 5)
        finally:
            restore()

    [late] = errors
    assert isinstance(late, discord.NotFound) and late.code == 10062  # "Unknown interaction"
    strict_record = strict.interaction(payload)
    assert strict_record.callback is None


async def test_rate_limited_request_is_retried(fake_discord: FakeDiscord) -> None:
    client, _ = make_client()
    fake_discord.rate_limit_next("POST", r"^/channels/\d+/messages$", retry_after=0.05)
    async with connected(client, fake_discord):
        await client.get_channel(int(fake_discord.channel["id"])).send("hello")
    limited, sent = [r for r in fake_discord.requests if r.method == "POST"]
    assert (limited.status, sent.status) == (429, 200)


async def test_unknown_routes_get_404_and_are_recorded(fake_discord: FakeDiscord) -> None:
    client, _ = make_client()
    async with connected(client, fake_discord):
        with pytest.raises(discord.NotFound):
            await client.http.request(Route("GET", "/guilds/{guild_id}/audit-logs", guild_id=1))
    assert fake_discord.problems == ["unknown route GET /guilds/1/audit-logs"]
    assert fake_discord.requests[-1].response == {"message": "404: Not Found", "code": 0}


async def test_user_messages_are_blank_without_the_message_content_intent(fake_discord: FakeDiscord) -> None:
    client, _ = make_client()  # default intents: no message_content
    seen: asyncio.Queue[str] = asyncio.Queue()

    @client.event
    async def on_message(message: discord.Message) -> None:
        await seen.put(message.content)

    async with connected(client, fake_discord):
        await fake_discord.user_message("tell me a story")
        await fake_discord.user_message(f"<@{fake_discord.bot_user['id']}> tell me a story")
        assert [await asyncio.wait_for(seen.get(), 5) for _ in range(2)] == [
            "",
            f"<@{fake_discord.bot_user['id']}> tell me a story",
        ]


def test_point_discord_at_moves_rest_webhooks_and_gateway_and_restores() -> None:
    before = (Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY)
    restore = point_discord_at("http://127.0.0.1:9", "ws://127.0.0.1:9/gateway")
    try:
        assert Route.BASE == "http://127.0.0.1:9/api/v10"
        assert str(DiscordWebSocket.DEFAULT_GATEWAY) == "ws://127.0.0.1:9/gateway"
        # Interaction callbacks and follow-ups are built from the very same Route class.
        from discord.webhook import async_ as webhook_async

        assert webhook_async.Route is Route
        assert Route("POST", "/interactions/{id}/{token}/callback", id=1, token="t").url.startswith(
            "http://127.0.0.1:9/api/v10/"
        )
    finally:
        restore()
    assert (Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY) == before
    with pytest.raises(ValueError, match="DISCORD_GATEWAY_URL='http://x' is not a ws"):
        point_discord_at("http://x", "http://x")
    restore_discord_defaults()
    assert Route.BASE == DEFAULT_API_URL


async def test_select_menu_and_modal_round_trip(fake_discord: FakeDiscord) -> None:
    client, tree = make_client()
    submitted: asyncio.Future = asyncio.get_running_loop().create_future()

    class Prompt(discord.ui.Modal, title="Start a story"):
        opening = discord.ui.TextInput(label="Opening line", custom_id="opening")

        async def on_submit(self, interaction: discord.Interaction) -> None:
            submitted.set_result(self.opening.value)
            await interaction.response.send_message("Got it", ephemeral=True)

    class GenrePicker(discord.ui.View):
        @discord.ui.select(custom_id="story:genre", options=[discord.SelectOption(label=g) for g in ("fantasy", "sci")])
        async def pick(self, interaction: discord.Interaction, select: discord.ui.Select) -> None:
            await interaction.response.send_modal(Prompt(custom_id=f"story:prompt:{select.values[0]}"))

    @tree.command(description="Tell a story")
    async def story(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("Pick a genre", view=GenrePicker())

    async with connected(client, fake_discord):
        await tree.sync()
        command = await fake_discord.interact(fake_discord.slash_command("story"))
        await fake_discord.wait_for(lambda r: r.route == CALLBACK)
        message = fake_discord.original_message(command.payload)
        await fake_discord.interact(fake_discord.select_menu(message, "story:genre", ["sci"]))
        modal = await fake_discord.wait_for(lambda r: r.route == CALLBACK and r.json["type"] == 9)
        assert modal.json["data"]["custom_id"] == "story:prompt:sci"
        assert modal.json["data"]["title"] == "Start a story"
        await fake_discord.interact(fake_discord.modal_submit("story:prompt:sci", {"opening": "The stars went out"}))
        assert await asyncio.wait_for(submitted, 5) == "The stars went out"


async def test_the_fake_enforces_one_response_per_interaction(fake_discord: FakeDiscord) -> None:
    client, tree = make_client()

    @tree.command(description="Tell a story")
    async def story(interaction: discord.Interaction) -> None:
        await interaction.response.defer()

    async with connected(client, fake_discord):
        await tree.sync()
        payload = fake_discord.slash_command("story")
        await fake_discord.interact(payload)
        await fake_discord.wait_for(lambda r: r.route == CALLBACK)
        # discord.py refuses a second response locally; a raw one must fail at "Discord" too.
        url = f"{fake_discord.api_url}/interactions/{payload['id']}/{payload['token']}/callback"
        again = {"type": 4, "data": {"content": "again"}}
        async with aiohttp.ClientSession() as session, session.post(url, json=again) as response:
            body = await response.json()
        assert response.status == 400
        assert body == {"message": "Interaction has already been acknowledged.", "code": 40060}
        with pytest.raises(discord.HTTPException) as bad_sync:
            await client.http.bulk_upsert_global_commands(client.application_id, [{"name": "Bad Name"}])
    # discord.py flattens Discord's nested error tree into "In <path>: <message>".
    assert bad_sync.value.code == 50035 and "In 0.name: Command name is invalid" in bad_sync.value.text
