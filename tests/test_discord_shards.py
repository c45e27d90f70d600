"""Discord sharding (DISCORD_SHARDS). The fake gateway routes each guild's events to the shard that owns it,
`(guild_id >> 22) % shard_count`, as Discord does; the real front-end, with its shards in one process on one
worker, answers /story on every shard. Guilds are made on a chosen shard (`add_guild(shard=...)`), so which
shard delivers what is fixed, and every frame the fake sends records its shard.
"""

from __future__ import annotations

import contextlib
import json
import logging

import discord
import pytest

from bot.config import BotConfig
from bot.discord.adapter import DiscordFrontEnd, StoryClient
from storygen.config import Env
from tests.conftest import running_service, tiny_config
from tests.fakes.discord_fixtures import connected
from tests.fakes.discord_objects import shard_of
from tests.fakes.fake_discord import FakeDiscord
from tests.scripted_model import model, scripted_lm  # noqa: F401  (fixtures)

CALLBACK = "POST /interactions/{interaction_id}/{interaction_token}/callback"
EDIT = "PATCH /webhooks/{application_id}/{interaction_token}/messages/{message_id}"
STORY = "The ship drifted. Stars went out. Nobody answered."
IDENTIFY = 2


@pytest.fixture
def shard_guilds(fake_discord: FakeDiscord) -> list[dict]:
    """One guild on each of two shards (besides "Story Club", on either); the fake recommends two shards."""
    fake_discord.recommended_shards = 2
    return [fake_discord.add_guild(f"Shard {i} Club", shard=(i, 2)) for i in (0, 1)]


async def no_identify_delay(shard_id: int | None, *, initial: bool = False) -> None:
    pass  # discord.py sleeps 5 s before each IDENTIFY but the first: Discord's rate for most bots


def general(fake: FakeDiscord, guild: dict) -> dict:
    return fake.state.channels[guild["channels"][0]["id"]]


def sent(fake: FakeDiscord, event: str, shard: int | None) -> list[dict]:
    return [f.d for f in fake.frames if f.direction == "send" and f.t == event and f.shard == shard]


def identified_shards(fake: FakeDiscord) -> list:
    return [f.d.get("shard") for f in fake.frames if f.direction == "recv" and f.op == IDENTIFY]


# --- the fake gateway --------------------------------------------------------------------------------------

async def test_each_shard_gets_only_its_own_guilds_and_dms_go_to_shard_0(fake_discord, shard_guilds):
    client = discord.AutoShardedClient(intents=discord.Intents.default(), guild_ready_timeout=0.05)
    client.before_identify_hook = no_identify_delay  # type: ignore[method-assign]
    async with connected(client, fake_discord):
        assert client.shard_count == 2
        assert {g.id for g in client.guilds} == {int(g) for g in fake_discord.state.guilds}
        assert [client.get_guild(int(g["id"])).shard_id for g in shard_guilds] == [0, 1]
        await fake_discord.user_message("in a server", channel=general(fake_discord, shard_guilds[1]))
        await fake_discord.user_message("in a DM", channel=fake_discord.dm_channel())

    assert [r.path for r in fake_discord.requests if r.path.startswith("/gateway")] == ["/gateway/bot"]
    assert identified_shards(fake_discord) == [[0, 2], [1, 2]]
    for shard in (0, 1):
        owned = {g for g in fake_discord.state.guilds if shard_of(g, 2) == shard}
        [ready] = sent(fake_discord, "READY", shard)
        assert ready["shard"] == [shard, 2] and {g["id"] for g in ready["guilds"]} == owned
        assert {g["id"] for g in sent(fake_discord, "GUILD_CREATE", shard)} == owned
    assert [m["content"] for m in sent(fake_discord, "MESSAGE_CREATE", 0)] == ["in a DM"]
    assert [m["content"] for m in sent(fake_discord, "MESSAGE_CREATE", 1)] == [""]  # no Message Content intent
    assert fake_discord.problems == []


async def test_a_shard_outside_the_count_is_refused_with_4010(fake_discord):
    client = discord.Client(intents=discord.Intents.default(), shard_id=2, shard_count=2)
    async with client:
        with pytest.raises(discord.ConnectionClosed) as closed:
            await client.start(fake_discord.token)
    assert closed.value.code == 4010
    assert fake_discord.problems == ["gateway close 4010: IDENTIFY with an invalid shard: [2, 2]"]


# --- the front-end -----------------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def storybot(fake: FakeDiscord, lm, tmp_path, shards: str):
    """The bot's Discord side as `python -m bot` builds it from DISCORD_SHARDS, pointed at the fake."""
    bot_config = BotConfig.from_env(Env({"DISCORD_TOKEN": fake.token, "DISCORD_API_URL": fake.api_url,
                                         "DISCORD_GATEWAY_URL": fake.gateway_url, "DISCORD_SHARDS": shards,
                                         "BOT_STREAM_INTERVAL_S": "0.2"}, env_file=None))
    async with running_service(lm, tiny_config(lm.name, "instruct", tmp_path)) as service:
        front = DiscordFrontEnd(service, bot_config, guild_ready_timeout=0.05)
        front.client.before_identify_hook = no_identify_delay  # type: ignore[method-assign]
        await front.start()
        try:
            yield front
        finally:
            await front.stop()


async def story(fake: FakeDiscord, guild: dict, opening: str) -> dict:
    payload = fake.slash_command("story", {"genre": "sci_fi", "prompt": opening}, channel=general(fake, guild))
    await fake.interact(payload)
    return payload


async def finished_story(fake: FakeDiscord, payload: dict) -> str:
    """The story text of the edit that carries the finished story's Continue button."""
    done = await fake.wait_for(lambda r: r.route == EDIT and payload["token"] in r.path
                               and "story:continue:" in json.dumps(r.json), timeout=10)
    return done.json["embeds"][0]["description"]


@pytest.mark.parametrize("shards, delivered_on, gateway_asked, summary", [
    ("off", [[None], [None]], 0, "in 3 servers, one gateway connection (DISCORD_SHARDS=off)"),
    ("2", [[0], [1]], 0, "in 3 servers, 2 shards"),
    ("auto", [[0], [1]], 1, "in 3 servers, 2 shards"),  # the fake recommends 2
], ids=["off", "2", "auto"])
async def test_each_shard_answers_its_own_guilds_stories(fake_discord, shard_guilds, scripted_lm, model, tmp_path,
                                                         caplog, shards, delivered_on, gateway_asked, summary):
    caplog.set_level(logging.INFO, logger="bot.discord.adapter")
    async with storybot(fake_discord, scripted_lm, tmp_path, shards) as front:
        assert isinstance(front.client, StoryClient)
        assert isinstance(front.client, discord.AutoShardedClient) is (shards != "off")
        payloads = [await story(fake_discord, guild, f"Shard {i} opening.") for i, guild in enumerate(shard_guilds)]
        texts = [await finished_story(fake_discord, p) for p in payloads]

    assert texts == [f"Shard {i} opening. {STORY}" for i in (0, 1)]
    assert [fake_discord.delivered_on(p) for p in payloads] == delivered_on
    for payload in payloads:
        [callback] = [r for r in fake_discord.requests if r.route == CALLBACK and payload["id"] in r.path]
        assert callback.json == {"type": 5}  # deferred once, on whichever shard it came
    assert identified_shards(fake_discord) == ([None] if shards == "off" else [[0, 2], [1, 2]])
    assert len([r for r in fake_discord.requests if r.path == "/gateway/bot"]) == gateway_asked
    [logged_in] = [r.getMessage() for r in caplog.records if "logged in as" in r.getMessage()]
    assert logged_in.endswith(summary)
    assert fake_discord.problems == []


async def test_a_story_asked_while_the_gateway_was_down_comes_back_on_its_shard(
        fake_discord, shard_guilds, scripted_lm, model, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="bot.discord.adapter")
    async with storybot(fake_discord, scripted_lm, tmp_path, "2"):
        async with fake_discord.gateway_down():
            payload = await story(fake_discord, shard_guilds[1], "Missed.")
        assert await finished_story(fake_discord, payload) == f"Missed. {STORY}"

    assert fake_discord.delivered_on(payload) == [1]  # replayed by shard 1's RESUME
    assert (fake_discord.gateway.identify_count, fake_discord.gateway.resume_count) == (2, 2)
    resumed = sorted(r.getMessage() for r in caplog.records if "resumed" in r.getMessage())
    assert resumed == [f"Discord: gateway session of shard {i} resumed" for i in (0, 1)]
    assert fake_discord.problems == []
