"""`python -m bot`: read the config, load the model, start the worker and the front-ends.

Discord, Slack and the HTTP API with its playground run side by side in one process and
share one worker: each chat platform when its tokens are set, HTTP unless HTTP_ENABLED=false.
HTTP starts first, so /healthz answers while the model loads. SIGINT or
SIGTERM first drains the worker while the front-ends stay connected: new commands are
told the bot is shutting down, and stories in hand get BOT_SHUTDOWN_GRACE_S to finish
and be delivered. Then the front-ends stop, then the worker, then the database closes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable

from bot.config import BotConfig
from bot.service import StoryService
from bot.state import BotState
from bot.storytime.service import StorytimeService
from bot.storytime.store import SessionStore
from storygen.config import Env, StorygenConfig
from storygen.errors import ConfigError, ModelLoadError
from storygen.logs import quiet_libraries
from storygen.settings import SettingsStore
from storygen.serving import open_worker

logger = logging.getLogger("bot")


def _chat_front_ends(service: StoryService, config: BotConfig, storytime: StorytimeService | None = None) -> list:
    ends = []
    if config.discord_enabled:
        from bot.discord.adapter import DiscordFrontEnd

        ends.append(DiscordFrontEnd(service, config, storytime=storytime))
    if config.slack_enabled:
        from bot.slack.adapter import SlackFrontEnd

        ends.append(SlackFrontEnd(service, config, storytime=storytime))
    return ends


async def serve(config: BotConfig, storygen_config: StorygenConfig, stop: asyncio.Event,
                on_ready: Callable[[list], None] | None = None) -> None:
    for reason in config.off_reasons():
        logger.info("%s", reason)
    web = None
    if config.http_enabled:
        from bot.web.server import WebFrontEnd

        web = WebFrontEnd(config)
        await web.start()
    try:
        worker = await open_worker(storygen_config)
    except BaseException:
        if web is not None:
            web.failed()
            await web.stop()
        raise
    settings = SettingsStore(storygen_config.settings_db)
    state = BotState(storygen_config.settings_db)
    await worker.start()
    service = StoryService(worker, settings, state, storygen_config)
    storytime = StorytimeService(worker, SessionStore(storygen_config.settings_db))  # group sessions, same DB
    timers = asyncio.create_task(storytime.run_timers(stop))
    ends = [web] if web is not None else []
    try:
        if web is not None:
            web.serve(service)
        for end in _chat_front_ends(service, config, storytime):
            await end.start()
            ends.append(end)
        logger.info("serving on %s", ", ".join(type(e).__name__ for e in ends))
        if on_ready is not None:
            on_ready(ends)
        await stop.wait()
    finally:
        timers.cancel()
        await storytime.close()  # model turns in progress run again at the next start
        if not await worker.drain(config.shutdown_grace_s):
            logger.warning("stopping with stories unfinished after %.0f s; their users are told to retry",
                           config.shutdown_grace_s)
        for end in reversed(ends):
            await end.stop()
        await worker.stop()
        settings.close()
        state.close()
        storytime.store.close()
        logger.info("stopped")


def main() -> int:
    env = Env()
    try:
        config = BotConfig.from_env(env)
        storygen_config = StorygenConfig.from_env(env)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_libraries(debug=config.log_level == "DEBUG")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, storygen_config, stop)

    try:
        asyncio.run(run())
    except (ModelLoadError, ConfigError) as error:  # ConfigError here: a platform refused a token at start-up
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
