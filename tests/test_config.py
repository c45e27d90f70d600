import pytest

from storygen.config import Env, Secret, StorygenConfig
from storygen.errors import ConfigError


def test_environment_wins_over_dotenv_over_defaults(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("STORYGEN_LENGTH=150\nSTORYGEN_TOP_K=20\n")
    config = StorygenConfig.from_env(Env({"STORYGEN_LENGTH": "120"}, env_file))
    assert config.defaults.length == 120  # environment
    assert config.defaults.top_k == 20  # .env
    assert config.defaults.temperature == 0.8  # default


@pytest.mark.parametrize("key, value, message", [
    ("STORYGEN_MAX_LENGTH", "abc", "STORYGEN_MAX_LENGTH='abc' is not an integer"),
    ("STORYGEN_TEMPERATURE", "hot", "STORYGEN_TEMPERATURE='hot' is not a number"),
    ("STORYGEN_TEMPERATURE", "nan", "not a finite number"),
    ("STORYGEN_MAX_QUEUE", "0", "STORYGEN_MAX_QUEUE='0' is out of range; it must be at least 1"),
    ("STORYGEN_FORMAT", "chat", "choose one of: auto, genre_tags, instruct, plain"),
    ("STORYGEN_DEVICE", "gpu", "choose one of"),
    ("STORYGEN_DTYPE", "fp8", "STORYGEN_DTYPE='fp8' is not allowed; choose one of: auto, float32, bfloat16, float16"),
    ("STORYGEN_ONEDNN", "maybe", "STORYGEN_ONEDNN='maybe' is not allowed; choose one of: auto, true, false"),
    ("STORYGEN_LENGTH", "900", "STORYGEN_LENGTH: length=900 is out of range; allowed: 1 to 400 tokens"),
])
def test_bad_values_name_key_and_value(key, value, message):
    with pytest.raises(ConfigError) as caught:
        StorygenConfig.from_env(Env({key: value}, env_file=None))
    assert message in str(caught.value)


def test_secret_is_masked():
    secret = Env({"DISCORD_TOKEN": "abc.def"}, env_file=None).secret("DISCORD_TOKEN")
    assert str(secret) == "abc.def"
    assert "abc" not in repr(secret) and "abc" not in repr([secret])
    assert not Secret("")


def test_blank_values_mean_default():
    assert StorygenConfig.from_env(Env({"STORYGEN_MODEL": "  "}, env_file=None)).model == "default"
