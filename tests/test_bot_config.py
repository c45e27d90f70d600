import pytest

from bot.config import BotConfig
from storygen.config import Env
from storygen.errors import ConfigError


def _config(**values):
    return BotConfig.from_env(Env(values, env_file=None))


@pytest.mark.parametrize("values, fragment", [
    ({"HTTP_ENABLED": "false"}, "nothing to serve: HTTP_ENABLED=false and no chat platform configured"),
    ({"HTTP_PORT": "http"}, "HTTP_PORT='http' is not an integer"),
    ({"HTTP_ENABLED": "maybe"}, "HTTP_ENABLED='maybe' is not a boolean"),
    ({"HTTP_API_KEYS": "short"}, "HTTP_API_KEYS: each key must be at least 8 printable characters"),
    ({"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_SIGNING_SECRET": "s", "SLACK_HTTP_PORT": "8000"},
     "SLACK_HTTP_PORT and HTTP_PORT are both 8000"),
    ({"SLACK_BOT_TOKEN": "abc"}, "SLACK_BOT_TOKEN must be a bot token starting with xoxb-"),
    ({"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_MODE": "socket"}, "Socket Mode needs SLACK_APP_TOKEN"),
    ({"SLACK_BOT_TOKEN": "xoxb-1"}, "HTTP mode needs SLACK_SIGNING_SECRET"),
    ({"DISCORD_TOKEN": "t", "DISCORD_API_URL": "discord.com"}, "DISCORD_API_URL='discord.com' is not a http"),
    ({"DISCORD_TOKEN": "t", "DISCORD_GATEWAY_URL": "https://x"}, "is not a ws:// or wss:// URL"),
    ({"DISCORD_TOKEN": "t", "DISCORD_GUILD_IDS": "12,abc"}, "DISCORD_GUILD_IDS='12,abc' must be numeric ids"),
    ({"DISCORD_TOKEN": "t", "SLACK_HTTP_PORT": "99999"}, "SLACK_HTTP_PORT='99999' is out of range"),
])
def test_operator_mistakes_are_named(values, fragment):
    with pytest.raises(ConfigError) as caught:
        _config(**values)
    assert fragment in str(caught.value)


def test_modes_and_masking():
    config = _config(DISCORD_TOKEN="secret.token", SLACK_BOT_TOKEN="xoxb-1", SLACK_APP_TOKEN="xapp-2",
                     DISCORD_GUILD_IDS="1, 2")
    assert config.discord_enabled and config.slack_enabled and config.slack_socket_mode
    assert config.discord_guild_ids == (1, 2)
    assert "secret.token" not in repr(config) and "xoxb-1" not in repr(config)
    http = _config(SLACK_BOT_TOKEN="xoxb-1", SLACK_SIGNING_SECRET="s")
    assert not http.slack_socket_mode and http.slack_http_path == "/slack/events"


def test_no_chat_tokens_serves_http_alone_and_says_why_the_rest_is_off():
    config = _config()
    assert config.http_enabled and not config.discord_enabled and not config.slack_enabled
    assert (config.http_host, config.http_port, config.http_max_body_bytes) == ("127.0.0.1", 8000, 65536)
    assert config.off_reasons() == ["Discord is off: DISCORD_TOKEN is not set",
                                    "Slack is off: SLACK_BOT_TOKEN is not set"]


def test_api_keys_are_masked():
    config = _config(HTTP_API_KEYS="key-one-1234, key-two-5678")
    assert [str(k) for k in config.http_api_keys] == ["key-one-1234", "key-two-5678"]
    assert "key-one-1234" not in repr(config)


@pytest.mark.parametrize("raw, expected", [(None, False), ("true", True), ("false", False)])
def test_discord_message_content_is_off_unless_asked_for(raw, expected):
    values = {"DISCORD_TOKEN": "t"} | ({"DISCORD_MESSAGE_CONTENT": raw} if raw is not None else {})
    assert _config(**values).discord_message_content is expected


def test_a_bad_message_content_flag_is_named():
    with pytest.raises(ConfigError, match="DISCORD_MESSAGE_CONTENT"):
        _config(DISCORD_TOKEN="t", DISCORD_MESSAGE_CONTENT="perhaps")


@pytest.mark.parametrize("raw, expected", [(None, None), ("", None), ("off", None), ("OFF", None),
                                           ("auto", "auto"), ("Auto", "auto"), ("2", 2), (" 1 ", 1)])
def test_discord_shards_off_auto_or_a_count(raw, expected):
    values = {"DISCORD_TOKEN": "t"} | ({"DISCORD_SHARDS": raw} if raw is not None else {})
    assert _config(**values).discord_shards == expected


@pytest.mark.parametrize("raw", ["0", "-1", "two", "2.5", "+2"])
def test_a_bad_shard_count_is_one_line_naming_the_key_and_what_is_allowed(raw):
    with pytest.raises(ConfigError) as caught:
        _config(DISCORD_TOKEN="t", DISCORD_SHARDS=raw)
    assert str(caught.value) == (f"DISCORD_SHARDS={raw!r} is not allowed; use off, auto, "
                                 "or a number of shards (1 or more)")
