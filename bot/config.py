"""The bot's settings: chat tokens and endpoints, the HTTP server. Read with the same rules as storygen's
(environment over `.env` over defaults; a bad value fails at start-up naming the key)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlparse

from storygen.config import Env, Secret
from storygen.errors import ConfigError

logger = logging.getLogger(__name__)

DISCORD_API = "https://discord.com/api/v10"
DISCORD_GATEWAY = "wss://gateway.discord.gg"
SLACK_API = "https://slack.com/api/"
SLACK_MODES = ("auto", "socket", "http")
SHARDS_AUTO = "auto"  # DISCORD_SHARDS: as many shards as Discord's GET /gateway/bot recommends


@dataclass(frozen=True)
class BotConfig:
    discord_token: Secret = Secret("")
    discord_api_url: str = DISCORD_API
    discord_gateway_url: str = DISCORD_GATEWAY
    discord_guild_ids: tuple[int, ...] = ()  # sync commands to these guilds at once (global sync takes up to an hour)
    discord_message_content: bool = False  # the privileged intent: storytime thread replies count as lines
    # None: one plain gateway connection; "auto" or N: discord.py's AutoShardedClient, every shard in this process
    discord_shards: int | Literal["auto"] | None = None
    slack_bot_token: Secret = Secret("")
    slack_app_token: Secret = Secret("")
    slack_signing_secret: Secret = Secret("")
    slack_api_url: str = SLACK_API
    slack_mode: str = "auto"  # socket when SLACK_APP_TOKEN is set, else http
    slack_http_port: int = 3000
    slack_http_path: str = "/slack/events"
    stream_interval_s: float = 1.0  # edit a streaming message at most this often
    shutdown_grace_s: float = 30.0  # on SIGTERM, stories in hand get this long to finish
    log_level: str = "INFO"
    http_enabled: bool = True
    http_host: str = "127.0.0.1"  # the Docker image sets 0.0.0.0
    http_port: int = 8000
    http_api_keys: tuple[Secret, ...] = ()  # none: the API is open (to whoever reaches http_host)
    http_max_body_bytes: int = 64 * 1024
    http_model_name: str = "storybot"  # the model id /v1/models lists and /v1/completions accepts

    @property
    def discord_enabled(self) -> bool:
        return bool(self.discord_token)

    @property
    def slack_enabled(self) -> bool:
        return bool(self.slack_bot_token)

    @property
    def slack_socket_mode(self) -> bool:
        return self.slack_mode == "socket" or (self.slack_mode == "auto" and bool(self.slack_app_token))

    @classmethod
    def from_env(cls, env: Env | None = None) -> BotConfig:
        env = env or Env()
        config = cls(
            discord_token=env.secret("DISCORD_TOKEN"),
            discord_api_url=_url(env, "DISCORD_API_URL", DISCORD_API, ("http", "https")),
            discord_gateway_url=_url(env, "DISCORD_GATEWAY_URL", DISCORD_GATEWAY, ("ws", "wss")),
            discord_guild_ids=_ids(env, "DISCORD_GUILD_IDS"),
            discord_message_content=env.bool("DISCORD_MESSAGE_CONTENT", False),
            discord_shards=_shards(env, "DISCORD_SHARDS"),
            slack_bot_token=env.secret("SLACK_BOT_TOKEN"),
            slack_app_token=env.secret("SLACK_APP_TOKEN"),
            slack_signing_secret=env.secret("SLACK_SIGNING_SECRET"),
            slack_api_url=_url(env, "SLACK_API_URL", SLACK_API, ("http", "https")),
            slack_mode=env.choice("SLACK_MODE", "auto", SLACK_MODES),
            slack_http_port=env.int("SLACK_HTTP_PORT", 3000, 1, 65535),
            slack_http_path=env.str("SLACK_HTTP_PATH", "/slack/events"),
            stream_interval_s=env.float("BOT_STREAM_INTERVAL_S", 1.0, 0.2, 30),
            shutdown_grace_s=env.float("BOT_SHUTDOWN_GRACE_S", 30.0, 0, 3600),
            log_level=env.choice("LOG_LEVEL", "info", ("debug", "info", "warning", "error")).upper(),
            http_enabled=env.bool("HTTP_ENABLED", True),
            http_host=env.str("HTTP_HOST", "127.0.0.1"),
            http_port=env.int("HTTP_PORT", 8000, 0, 65535),
            http_api_keys=_keys(env, "HTTP_API_KEYS"),
            http_max_body_bytes=env.int("HTTP_MAX_BODY_BYTES", 64 * 1024, 1024, 16 * 1024 * 1024),
            http_model_name=env.str("HTTP_MODEL_NAME", "storybot"),
        )
        config.check()
        return config

    def off_reasons(self) -> list[str]:
        """One line per front-end that will not start, and why, for the start-up log."""
        reasons = []
        if not self.discord_enabled:
            reasons.append("Discord is off: DISCORD_TOKEN is not set")
        if not self.slack_enabled:
            reasons.append("Slack is off: SLACK_BOT_TOKEN is not set")
        if not self.http_enabled:
            reasons.append("HTTP API and playground are off: HTTP_ENABLED=false")
        return reasons

    def check(self) -> None:
        """Refuse a configuration that cannot work, naming what to fix."""
        if not self.discord_enabled and not self.slack_enabled and not self.http_enabled:
            raise ConfigError("nothing to serve: HTTP_ENABLED=false and no chat platform configured; set "
                              "DISCORD_TOKEN, or SLACK_BOT_TOKEN with SLACK_APP_TOKEN or SLACK_SIGNING_SECRET, "
                              "or turn HTTP back on; see .env.example")
        if self.slack_enabled:
            if not str(self.slack_bot_token).startswith("xoxb-"):
                raise ConfigError("SLACK_BOT_TOKEN must be a bot token starting with xoxb-")
            if self.slack_socket_mode and not str(self.slack_app_token).startswith("xapp-"):
                raise ConfigError("Socket Mode needs SLACK_APP_TOKEN, an app-level token starting with xapp-")
            if not self.slack_socket_mode and not self.slack_signing_secret:
                raise ConfigError("HTTP mode needs SLACK_SIGNING_SECRET (or set SLACK_APP_TOKEN for Socket Mode)")
        if self.http_enabled and self.slack_enabled and not self.slack_socket_mode \
                and self.slack_http_port == self.http_port:
            raise ConfigError(f"SLACK_HTTP_PORT and HTTP_PORT are both {self.http_port}; give them different ports")
        if not self.slack_http_path.startswith("/"):
            raise ConfigError(f"SLACK_HTTP_PATH={self.slack_http_path!r} must start with /")


def _url(env: Env, key: str, default: str, schemes: tuple[str, ...]) -> str:
    value = env.str(key, default)
    parsed = urlparse(value)
    if parsed.scheme not in schemes or not parsed.netloc:
        raise ConfigError(f"{key}={value!r} is not a {' or '.join(s + '://' for s in schemes)} URL")
    return value


def _ids(env: Env, key: str) -> tuple[int, ...]:
    raw = env.str(key, "")
    try:
        return tuple(int(part) for part in raw.replace(",", " ").split())
    except ValueError:
        raise ConfigError(f"{key}={raw!r} must be numeric ids separated by commas") from None


def _shards(env: Env, key: str) -> int | Literal["auto"] | None:
    """off (the default), auto, or a number of shards: Discord requires them past 2,500 servers."""
    raw = env.str(key, "off")
    if raw.lower() == "off":
        return None
    if raw.lower() == SHARDS_AUTO:
        return SHARDS_AUTO
    if re.fullmatch(r"[0-9]+", raw) and int(raw) >= 1:
        return int(raw)
    raise ConfigError(f"{key}={raw!r} is not allowed; use off, auto, or a number of shards (1 or more)")


def _keys(env: Env, key: str) -> tuple[Secret, ...]:
    keys = tuple(Secret(part.strip()) for part in env.str(key, "").split(",") if part.strip())
    for secret in keys:
        if len(str(secret)) < 8 or any(c.isspace() or not c.isprintable() for c in str(secret)):
            raise ConfigError(f"{key}: each key must be at least 8 printable characters without spaces "
                              "(comma-separated)")
    return keys
