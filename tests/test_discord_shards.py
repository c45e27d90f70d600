"""Discord sharding. The fake gateway routes each guild's events to the shard that owns it,
`(guild_id >> 22) % shard_count`, as Discord does. Guilds are made on a chosen shard
(`add_guild(shard=...)`), so which shard delivers what is fixed, and every frame the fake
sends records its shard.
"""

from __future__ import annotations

import discord
import pytest

from tests.fakes.discord_fixtures import connected
from tests.fakes.discord_objects import shard_of
from tests.fakes.fake_discord import FakeDiscord

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
