"""The Discord front-end: discord.py events in, rendered results out.

    to_story_request(interaction) -> (ChatContext, command)    every slash command and button
    DiscordFrontEnd.handle(interaction)                       the one handler between them
    bot.discord.delivery / bot.discord.render                  a story's messages

Commands parse and validate in bot/commands.py and bot/service.py, shared with Slack;
the slash commands' schema is in bot/discord/commands.py. The gateway only brings
interactions in: every reply goes out over REST with the interaction's token, so a
reconnect or resume loses nothing. With DISCORD_SHARDS the client is discord.py's
AutoShardedClient: several gateway connections in this process, one client, one handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, replace

import discord
from discord import app_commands

from bot import messages
from bot.commands import (AdminCommand, Command, CommandError, SettingsCommand, SimpleCommand, StoryCommand,
                          parse_command_text)
from bot.config import DISCORD_API, DISCORD_GATEWAY, SHARDS_AUTO, BotConfig
from bot.discord.commands import add_commands, add_storytime_commands
from bot.discord.delivery import TOKEN_TTL_S, StoryDelivery, mark_interrupted
from bot.discord.endpoints import point_discord_at
from bot.discord.render import NO_MENTIONS, StoryButton, to_discord_line
from bot.discord.storytime import DiscordStorytime, DiscordSurface, StorytimeVote
from bot.service import ChatContext, Started, StoryService, user_message
from bot.storytime.service import StorytimeService
from storygen.errors import ConfigError, UnknownGenreError
from storygen.genres import AUTO, find_genre, genre_names, is_auto
from storygen.sampling import USER_SETTINGS
from storygen.settings import SAVED_SETTINGS

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0  # start() returns after this even if Discord is slow; the client keeps trying


@dataclass(frozen=True)
class ButtonPress:
    action: str  # continue, regenerate, cancel
    request_id: str


DiscordCommand = Command | ButtonPress | AdminCommand


# --- interaction -> (ChatContext, command) -----------------------------------------------------------

def to_chat_context(interaction: discord.Interaction) -> ChatContext:
    return ChatContext("discord", str(interaction.guild_id or "dm"), str(interaction.channel_id),
                       str(interaction.user.id), is_admin=interaction.permissions.manage_guild)


def to_story_request(interaction: discord.Interaction) -> tuple[ChatContext, DiscordCommand]:
    """Any of our slash commands or buttons as a platform-neutral command; raises a ValidationError."""
    ctx = to_chat_context(interaction)
    if interaction.type is discord.InteractionType.component:
        match = StoryButton.__discord_ui_compiled_template__.fullmatch(interaction.data["custom_id"])
        return ctx, ButtonPress(match["action"], match["request_id"])
    name = interaction.command.qualified_name  # type: ignore[union-attr]
    options = interaction.namespace
    if name == "story":
        chosen = {key: getattr(options, key) for key in USER_SETTINGS if getattr(options, key) is not None}
        return ctx, to_story_command(options.genre or "", options.prompt or "", chosen)
    if name.startswith("settings "):
        action = name.split()[1]
        values = {key: str(getattr(options, key)) for key in SAVED_SETTINGS if getattr(options, key) is not None}
        if action == "set" and not values:
            raise CommandError(messages.SETTINGS_NOTHING_TO_SET)
        return ctx, SettingsCommand(action, values if action == "set" else {})
    if name == "storyadmin":
        return ctx, AdminCommand(
            str(options.allow_channel.id) if options.allow_channel else None,
            str(options.disallow_channel.id) if options.disallow_channel else None,
            options.all_channels, options.max_length, options.max_temperature, options.cooldown)
    return ctx, SimpleCommand(name)


def to_story_command(genre: str, prompt: str, options: dict[str, object]) -> Command:
    """/story's genre and prompt boxes as one command.

    Discord puts what someone types after `/story ` into the first box, genre. So:
    a genre (name, alias or auto) there takes the prompt box as the opening; anything
    else there is read as the whole command text, `sci_fi After discovering time
    travel` included, with the prompt box appended. One unknown word in the genre box
    next to a filled prompt box is a mistyped genre. Typed options win over `name=value`
    ones written in the text.
    """
    genre, prompt = genre.strip(), prompt.strip()
    found = find_genre(genre)
    named = AUTO if genre and is_auto(genre) else (found.name if found else None)
    if named and prompt:
        return StoryCommand(prompt, named, options)
    if prompt and len(genre.split()) == 1:
        raise UnknownGenreError(genre[:40], [*genre_names(), AUTO])
    command = parse_command_text(f"{genre} {prompt}".strip())
    if isinstance(command, AdminCommand) and command != AdminCommand():
        raise CommandError("change the server's story settings with /storyadmin")
    if isinstance(command, StoryCommand):
        return replace(command, overrides={**command.overrides, **options})
    return command


# --- the client -----------------------------------------------------------------------------------------

class StoryClient(discord.Client):
    """No privileged intents unless DISCORD_MESSAGE_CONTENT: slash commands and buttons arrive as
    interactions whatever the intents; storytime's thread replies need guild messages and their content."""

    def __init__(self, front_end: DiscordFrontEnd, message_content: bool = False, **options: object) -> None:
        intents = discord.Intents(guilds=True, guild_messages=message_content, message_content=message_content)
        super().__init__(intents=intents, allowed_mentions=NO_MENTIONS, **options)
        self.front_end = front_end
        self.tree = app_commands.CommandTree(self)

    async def setup_hook(self) -> None:
        self.add_dynamic_items(StoryButton, StorytimeVote)  # buttons on messages from before a restart still work
        await self.front_end.sync_commands()

    async def on_message(self, message: discord.Message) -> None:
        if self.front_end.storytime is not None:
            await self.front_end.storytime.on_message(message)

    async def on_storytime_vote(self, interaction: discord.Interaction, session_id: str, index: int) -> None:
        if self.front_end.storytime is not None:
            await self.front_end.storytime.on_vote(interaction, session_id, index)

    async def on_ready(self) -> None:
        logger.info("Discord: logged in as %s in %s servers, %s", self.user, len(self.guilds), self.gateway_summary)

    @property
    def gateway_summary(self) -> str:
        return "one gateway connection (DISCORD_SHARDS=off)"

    async def on_resumed(self) -> None:
        logger.info("Discord: gateway session resumed")

    async def on_story_button(self, interaction: discord.Interaction) -> None:
        await self.front_end.handle(interaction)


class ShardedStoryClient(StoryClient, discord.AutoShardedClient):
    """StoryClient over several gateway connections (shards) in this process, for DISCORD_SHARDS.

    Discord sends each shard the events of the servers it owns, `(guild_id >> 22) % shard_count`;
    discord.py merges them into this one client, so interactions reach the same handler and
    StoryService whichever shard brought them. on_ready fires once every shard is ready (each
    waits guild_ready_timeout after its last GUILD_CREATE); shards after the first identify 5 s
    apart (discord.py's before_identify_hook), Discord's limit for most bots.
    """

    @property
    def gateway_summary(self) -> str:
        return f"{self.shard_count} shards"

    async def on_shard_ready(self, shard_id: int) -> None:
        logger.debug("Discord: shard %s of %s ready", shard_id, self.shard_count)

    async def on_resumed(self) -> None:
        pass  # on_shard_resumed says which one

    async def on_shard_resumed(self, shard_id: int) -> None:
        logger.info("Discord: gateway session of shard %s resumed", shard_id)


def to_client(front_end: DiscordFrontEnd, config: BotConfig, guild_ready_timeout: float) -> StoryClient:
    """The plain client, or the sharded one with DISCORD_SHARDS (auto: the count GET /gateway/bot recommends)."""
    if config.discord_shards is None:
        return StoryClient(front_end, config.discord_message_content, guild_ready_timeout=guild_ready_timeout)
    shard_count = None if config.discord_shards == SHARDS_AUTO else config.discord_shards
    return ShardedStoryClient(front_end, config.discord_message_content, shard_count=shard_count,
                              guild_ready_timeout=guild_ready_timeout)


class DiscordFrontEnd:
    def __init__(self, service: StoryService, config: BotConfig, *, token_ttl_s: float = TOKEN_TTL_S,
                 guild_ready_timeout: float = 2.0, storytime: StorytimeService | None = None) -> None:
        self.service = service
        self.config = config
        self.token_ttl_s = token_ttl_s
        self.client = to_client(self, config, guild_ready_timeout)
        self.tree = self.client.tree
        self.tree.on_error = self._on_tree_error  # type: ignore[method-assign]
        add_commands(self.tree, self, service.config.limits)
        self.storytime = DiscordStorytime(storytime, config.discord_message_content) if storytime else None
        if storytime is not None:
            add_storytime_commands(self.tree, self, storytime.limits.max_turns, storytime.limits.max_line_chars)
        self._deliveries: set[asyncio.Task] = set()
        self._runner: asyncio.Task | None = None
        self._restore_endpoints = None

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Log in, sync the slash commands, connect to the gateway, and wait (a while) for READY."""
        if (self.config.discord_api_url, self.config.discord_gateway_url) != (DISCORD_API, DISCORD_GATEWAY):
            self._restore_endpoints = point_discord_at(self.config.discord_api_url, self.config.discord_gateway_url)
        self._runner = asyncio.create_task(self.client.start(str(self.config.discord_token)), name="discord-client")
        ready = asyncio.create_task(self.client.wait_until_ready())
        await asyncio.wait({self._runner, ready}, timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if self._runner.done():
            error = self._runner.exception()
            if isinstance(error, discord.LoginFailure):
                raise ConfigError("DISCORD_TOKEN was refused by Discord; copy the bot token again "
                                  "(see docs/DISCORD.md)") from error
            raise error or RuntimeError("the Discord client stopped during start-up")
        if not self.client.is_ready():
            logger.warning("Discord: not ready after %.0f s; still trying in the background", START_TIMEOUT_S)
        await mark_interrupted(self.client, self.service.state)  # over REST: the gateway need not be up
        if self.storytime is not None:  # sessions a restart left open carry on (over REST: no cache needed)
            self.storytime.storytime.attach("discord", DiscordSurface(self.client, self.config.stream_interval_s))
            await self.storytime.storytime.resume("discord")

    async def stop(self) -> None:
        for task in list(self._deliveries):
            task.cancel()
        await asyncio.gather(*self._deliveries, return_exceptions=True)
        await self.client.close()
        if self._runner is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._runner, 5)
        if self._restore_endpoints is not None:
            self._restore_endpoints()
            self._restore_endpoints = None

    async def sync_commands(self) -> None:
        """To the servers in DISCORD_GUILD_IDS at once, or globally (Discord may take a while to show those)."""
        try:
            if not self.config.discord_guild_ids:
                synced = await self.tree.sync()
                logger.info("Discord: %s commands synced globally", len(synced))
            for guild_id in self.config.discord_guild_ids:
                guild = discord.Object(guild_id)
                self.tree.copy_global_to(guild=guild)
                synced = await self.tree.sync(guild=guild)
                logger.info("Discord: %s commands synced to server %s", len(synced), guild_id)
        except discord.HTTPException as error:
            logger.error("Discord: could not sync the slash commands (%s %s: %s); was the bot invited with the "
                         "applications.commands scope?", error.status, error.code, error.text)

    # --- the handler ---------------------------------------------------------------------------------

    async def handle(self, interaction: discord.Interaction) -> None:
        """Every slash command and button: translate, act, then answer once."""
        try:
            ctx, command = to_story_request(interaction)
            logger.info("discord %s from %s in %s", type(command).__name__, ctx.user_key, ctx.channel_key)
            result = await self._act(ctx, command)
        except Exception as error:
            await self._reply(interaction, user_message(error, f"for discord user {interaction.user.id}"))
            return
        if isinstance(result, str):
            await self._reply(interaction, result)
        else:
            await self._deliver(interaction, ctx, result)

    async def handle_storytime(self, interaction: discord.Interaction) -> None:
        """/storytime's subcommands (registered only when the bot has a StorytimeService)."""
        await self.storytime.handle(interaction)  # type: ignore[union-attr]

    async def _deliver(self, interaction: discord.Interaction, ctx: ChatContext, started: Started) -> None:
        # The checks and queueing before this take milliseconds, so a refusal could still be an
        # ephemeral line; the story itself is written after the acknowledgement.
        try:
            await interaction.response.defer(thinking=True)
        except discord.HTTPException as error:
            logger.warning("story %s for %s: could not acknowledge (%s %s); cancelled", started.request.request_id,
                           ctx.user_key, error.status, error.code)
            started.handle.cancel()
            return
        delivery = StoryDelivery(interaction, started, on_done=lambda story: self.service.record(ctx, started, story),
                                 max_prompt_chars=self.service.config.max_prompt_chars,
                                 interval=self.config.stream_interval_s, token_ttl_s=self.token_ttl_s,
                                 state=self.service.state)
        task = asyncio.create_task(delivery.run(), name=f"discord-story-{started.request.request_id}")
        self._deliveries.add(task)
        task.add_done_callback(self._delivered)

    def _delivered(self, task: asyncio.Task) -> None:
        self._deliveries.discard(task)
        if not task.cancelled() and task.exception() is not None:
            user_message(task.exception(), task.get_name())  # logs it with a ref; the user saw the last update

    async def _act(self, ctx: ChatContext, command: DiscordCommand) -> Started | str:
        service = self.service
        match command:
            case StoryCommand():
                return await service.story(ctx, command)
            case ButtonPress(action="continue"):
                return await service.continue_story(ctx, command.request_id)
            case ButtonPress(action="regenerate"):
                return await service.regenerate(ctx, command.request_id)
            case ButtonPress(action="cancel"):
                return service.cancel(ctx, command.request_id)
            case SimpleCommand(name="continue"):
                return await service.continue_last(ctx)
            case SimpleCommand(name="cancel"):
                return service.cancel(ctx)
            case SimpleCommand(name="queue"):
                return service.queue(ctx)
            case SimpleCommand(name="genres"):
                return messages.genres_text()
            case SettingsCommand():
                return service.user_settings(ctx, command)
            case AdminCommand():
                return service.admin(ctx, **command.changes(service.state.server(ctx.server_key)))
        return messages.DISCORD_HELP

    async def _reply(self, interaction: discord.Interaction, line: str) -> None:
        """One ephemeral line: only the person who asked sees it."""
        if interaction.response.is_done():
            await interaction.followup.send(to_discord_line(line), ephemeral=True, allowed_mentions=NO_MENTIONS)
        else:
            await interaction.response.send_message(to_discord_line(line), ephemeral=True,
                                                    allowed_mentions=NO_MENTIONS)

    async def _on_tree_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        """What escaped a command before our handler ran (e.g. a value discord.py could not convert)."""
        await self._reply(interaction, user_message(getattr(error, "original", error),
                                                    f"for discord user {interaction.user.id}"))

    # --- autocomplete --------------------------------------------------------------------------------

    async def genre_choices(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        """Genres whose name or alias starts with what was typed; none once it reads as an opening."""
        typed = current.strip().lower().replace("-", "_")
        allowed = self.service.worker.lm.spec.allowed_genres()
        options = [(AUTO, messages.DISCORD_AUTO_CHOICE, ("auto",))]
        options += [(g.name, f"{g.name}: {g.description}", (g.name, g.label, *g.aliases)) for g in allowed]
        return [app_commands.Choice(name=label[:100], value=value) for value, label, keys in options
                if any(key.lower().replace("-", "_").replace(" ", "_").startswith(typed.replace(" ", "_"))
                       for key in keys)][:25]
