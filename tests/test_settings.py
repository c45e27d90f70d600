from dataclasses import replace

import pytest

from storygen.config import StorygenConfig
from storygen.errors import SettingRangeError, UnknownGenreError, UnknownSettingError
from storygen.sampling import SamplingLimits
from storygen.settings import REQUEST, SERVER, USER, SettingsStore

CONFIG = StorygenConfig()


def test_settings_survive_a_restart(tmp_path):
    path = tmp_path / "state" / "settings.sqlite3"
    store = SettingsStore(path)
    store.update("discord:1:2", {"temperature": "1.1", "length": "150", "genre": "Sci-Fi"}, CONFIG)
    store.close()
    reopened = SettingsStore(path)
    assert reopened.get("discord:1:2") == {"temperature": 1.1, "length": 150, "genre": "sci_fi"}
    assert reopened.get("slack:T1:U1") == {}


def test_precedence_request_then_user_then_server(tmp_path):
    store = SettingsStore(tmp_path / "s.sqlite3")
    store.update("u", {"temperature": 1.2, "length": 100}, CONFIG)
    effective = store.effective("u", {"length": 50, "top_k": None}, CONFIG)
    assert effective.params.length == 50 and effective.sources["length"] == REQUEST
    assert effective.params.temperature == 1.2 and effective.sources["temperature"] == USER
    assert effective.params.top_p == CONFIG.defaults.top_p and effective.sources["top_p"] == SERVER
    assert effective.genre == "auto" and effective.sources["genre"] == SERVER
    lines = effective.describe()
    assert "length = 50  (this request)" in lines and "temperature = 1.2  (your default)" in lines


def test_caps_bound_everything(tmp_path):
    store = SettingsStore(tmp_path / "s.sqlite3")
    with pytest.raises(SettingRangeError, match="allowed: 0 to 2"):
        store.update("u", {"temperature": "9"}, CONFIG)
    with pytest.raises(SettingRangeError, match="1 to 400 tokens"):
        store.effective("u", {"length": 1000}, CONFIG)
    store.update("u", {"length": 300}, CONFIG)
    lowered = replace(CONFIG, limits=SamplingLimits(max_length=200))
    effective = store.effective("u", {}, lowered)  # the operator lowered the cap since
    assert effective.params.length == CONFIG.defaults.length
    assert "your saved 300 is outside 1 to 200 tokens" in effective.sources["length"]


@pytest.mark.parametrize("values, error", [
    ({"volume": "11"}, UnknownSettingError), ({"seed": "5"}, UnknownSettingError),
    ({"genre": "nope"}, UnknownGenreError), ({"length": "many"}, SettingRangeError)])
def test_bad_updates_change_nothing(tmp_path, values, error):
    store = SettingsStore(tmp_path / "s.sqlite3")
    store.update("u", {"length": 120}, CONFIG)
    with pytest.raises(error):
        store.update("u", {"top_k": 10, **values}, CONFIG)
    assert store.get("u") == {"length": 120}


def test_reset(tmp_path):
    store = SettingsStore(tmp_path / "s.sqlite3")
    store.update("u", {"length": 120}, CONFIG)
    store.reset("u")
    assert store.get("u") == {} and store.effective("u", {}, CONFIG).sources["length"] == SERVER
