"""The slash commands Discord shows: names, options, ranges and descriptions.

Each callback only hands the interaction to `DiscordFrontEnd.handle`, which reads the
options from `interaction.namespace`. The signatures are the schema: discord.py reads
option types and ranges from the annotations, and the ranges are the operator's caps,
known only at run time. That is why this module, unlike the others, does not use
`from __future__ import annotations` (string annotations could not see `limits`).
A server's own lower caps are checked by StoryService, with a one-line reply.
"""

import logging
from typing import Optional, Protocol

import discord
from discord import app_commands
from discord.app_commands import Range

from bot.commands import MAX_INPUT_CHARS
from bot.messages import DISCORD_COMMANDS, DISCORD_OPTIONS
from storygen.sampling import SEED_MAX, SamplingLimits

logger = logging.getLogger(__name__)

MAX_COOLDOWN_S = 86_400.0
SAMPLING = ("length", "temperature", "top_p", "top_k", "repetition_penalty")


class Handler(Protocol):
    """What the commands hand their interactions to (the adapter's DiscordFrontEnd)."""

    async def handle(self, interaction: discord.Interaction) -> None: ...
    async def genre_choices(self, interaction: discord.Interaction,
                            current: str) -> list[app_commands.Choice[str]]: ...
    async def handle_storytime(self, interaction: discord.Interaction) -> None: ...


def _describe(*names: str, **renamed: str):
    """Option descriptions from bot/messages.py; `renamed` maps an option to another key there."""
    return app_commands.describe(**{name: DISCORD_OPTIONS[name] for name in names},
                                 **{name: DISCORD_OPTIONS[key] for name, key in renamed.items()})


def add_commands(tree: app_commands.CommandTree, front: Handler, limits: SamplingLimits) -> None:
    Text = Range[str, 1, MAX_INPUT_CHARS]
    Length = Range[int, 1, limits.max_length]
    Temperature = Range[float, 0.0, limits.max_temperature]
    TopP = Range[float, 0.01, 1.0]
    TopK = Range[int, 0, limits.max_top_k]
    Penalty = Range[float, 1.0, limits.max_repetition_penalty]

    @tree.command(name="story", description=DISCORD_COMMANDS["story"])
    @app_commands.guild_only()
    @_describe("genre", "prompt", *SAMPLING, "seed")
    async def story(interaction: discord.Interaction, genre: Text, prompt: Optional[Text] = None,
                    length: Optional[Length] = None, temperature: Optional[Temperature] = None,
                    top_p: Optional[TopP] = None, top_k: Optional[TopK] = None,
                    repetition_penalty: Optional[Penalty] = None,
                    seed: Optional[Range[int, 0, SEED_MAX]] = None) -> None:
        await front.handle(interaction)

    story.autocomplete("genre")(front.genre_choices)

    @tree.command(name="continue", description=DISCORD_COMMANDS["continue"])
    @app_commands.guild_only()
    async def continue_(interaction: discord.Interaction) -> None:
        await front.handle(interaction)

    @tree.command(name="genres", description=DISCORD_COMMANDS["genres"])
    @app_commands.guild_only()
    async def genres(interaction: discord.Interaction) -> None:
        await front.handle(interaction)

    @tree.command(name="queue", description=DISCORD_COMMANDS["queue"])
    @app_commands.guild_only()
    async def queue(interaction: discord.Interaction) -> None:
        await front.handle(interaction)

    @tree.command(name="cancel", description=DISCORD_COMMANDS["cancel"])
    @app_commands.guild_only()
    async def cancel(interaction: discord.Interaction) -> None:
        await front.handle(interaction)

    settings = app_commands.Group(name="settings", description=DISCORD_COMMANDS["settings"])
    app_commands.guild_only()(settings)

    @settings.command(name="show", description=DISCORD_COMMANDS["settings show"])
    async def settings_show(interaction: discord.Interaction) -> None:
        await front.handle(interaction)

    @settings.command(name="set", description=DISCORD_COMMANDS["settings set"])
    @_describe(*SAMPLING, genre="default_genre")
    async def settings_set(interaction: discord.Interaction, genre: Optional[Range[str, 1, 100]] = None,
                           length: Optional[Length] = None, temperature: Optional[Temperature] = None,
                           top_p: Optional[TopP] = None, top_k: Optional[TopK] = None,
                           repetition_penalty: Optional[Penalty] = None) -> None:
        await front.handle(interaction)

    settings_set.autocomplete("genre")(front.genre_choices)

    @settings.command(name="reset", description=DISCORD_COMMANDS["settings reset"])
    async def settings_reset(interaction: discord.Interaction) -> None:
        await front.handle(interaction)

    tree.add_command(settings)

    @tree.command(name="storyadmin", description=DISCORD_COMMANDS["storyadmin"])
    @app_commands.guild_only()
    @app_commands.default_permissions(manage_guild=True)  # hidden from others; StoryService checks it too
    @_describe("allow_channel", "disallow_channel", "all_channels", "max_length", "max_temperature", "cooldown")
    async def storyadmin(interaction: discord.Interaction, allow_channel: Optional[discord.TextChannel] = None,
                         disallow_channel: Optional[discord.TextChannel] = None,
                         all_channels: Optional[bool] = None, max_length: Optional[Length] = None,
                         max_temperature: Optional[Temperature] = None,
                         cooldown: Optional[Range[float, 0.0, MAX_COOLDOWN_S]] = None) -> None:
        await front.handle(interaction)



def add_storytime_commands(tree: app_commands.CommandTree, front: Handler, max_turns: int,
                           max_line_chars: int) -> None:
    """The /storytime group; every subcommand goes to `front.handle_storytime`."""
    group = app_commands.Group(name="storytime", description=DISCORD_COMMANDS["storytime"])
    app_commands.guild_only()(group)

    def sub(name: str):
        return group.command(name=name, description=DISCORD_COMMANDS[f"storytime {name}"])

    @sub("start")
    @_describe("genre", "opening", "title", "turns", "turn_timeout", "mode", "model_every")
    @app_commands.choices(mode=[app_commands.Choice(name=m, value=m) for m in ("turns", "free", "vote")])
    async def start(interaction: discord.Interaction, genre: Range[str, 1, 100],
                    opening: Optional[Range[str, 1, max_line_chars]] = None, title: Optional[Range[str, 1, 80]] = None,
                    turns: Optional[Range[int, 1, max_turns]] = None,
                    turn_timeout: Optional[Range[int, 30, 3600]] = None, mode: Optional[str] = None,
                    model_every: Optional[Range[int, 1, 10]] = None) -> None:
        await front.handle_storytime(interaction)

    start.autocomplete("genre")(front.genre_choices)

    @sub("add")
    @_describe("text")
    async def add(interaction: discord.Interaction, text: Range[str, 1, max_line_chars]) -> None:
        await front.handle_storytime(interaction)

    @sub("end")
    @_describe("session")
    async def end(interaction: discord.Interaction, session: Optional[Range[str, 1, 32]] = None) -> None:
        await front.handle_storytime(interaction)

    for name in ("join", "leave", "status", "undo", "list", "help"):
        async def simple(interaction: discord.Interaction) -> None:
            await front.handle_storytime(interaction)

        sub(name)(simple)
    tree.add_command(group)
