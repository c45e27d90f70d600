import pytest

from bot.commands import AdminCommand, CommandError, SettingsCommand, SimpleCommand, StoryCommand, parse_command_text
from storygen.errors import SettingRangeError, UnknownSettingError


@pytest.mark.parametrize("text, expected", [
    ("sci_fi After discovering time travel", StoryCommand("After discovering time travel", "sci_fi")),
    ("auto a magic castle", StoryCommand("a magic castle", "auto")),
    ("After discovering time travel", StoryCommand("After discovering time travel", None)),
    ("science fiction The ship", StoryCommand("The ship", "sci_fi")),
    ("Sci-Fi The ship", StoryCommand("The ship", "sci_fi")),
    ("horror The door creaked length=150 temperature=1.1",
     StoryCommand("The door creaked", "horror", {"length": 150, "temperature": 1.1})),
    ("drama He said x=5 and left", StoryCommand("He said x=5 and left", "drama")),
    ("drama Line one\n\nLine two seed=3", StoryCommand("Line one\n\nLine two", "drama", {"seed": 3})),
    ("", SimpleCommand("help")),
    ("help", SimpleCommand("help")), ("genres", SimpleCommand("genres")), ("queue", SimpleCommand("queue")),
    ("cancel", SimpleCommand("cancel")), ("continue", SimpleCommand("continue")),
    ("settings", SettingsCommand("show")), ("settings reset", SettingsCommand("reset")),
    ("settings temperature=1.1 length=150", SettingsCommand("set", {"temperature": "1.1", "length": "150"})),
    ("settings genre=horror", SettingsCommand("set", {"genre": "horror"})),
])
def test_parses(text, expected):
    assert parse_command_text(text) == expected


@pytest.mark.parametrize("text, error, fragment", [
    ("horror", CommandError, "add an opening after the genre"),
    ("horror The door lenght=150", UnknownSettingError, "unknown setting 'lenght'; settings are: length"),
    ("horror The door length=many", SettingRangeError, "a whole number"),
    ("horror The door temperature=hot", SettingRangeError, "a number"),
    ("settings temperature", CommandError, "name=value"),
    ("settings volume=11", UnknownSettingError, "unknown setting 'volume'"),
    ("help me", CommandError, "takes nothing after it"),
    ("x" * 5000, CommandError, "at most 4000"),
])
def test_errors_are_one_clear_line(text, error, fragment):
    with pytest.raises(error) as caught:
        parse_command_text(text)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("text, expected", [
    ("admin", AdminCommand()),
    ("admin show", AdminCommand()),
    ("admin allow max_length=50 cooldown=30", AdminCommand(allow_channel="C1", max_length=50, cooldown_s=30.0)),
    ("admin disallow", AdminCommand(disallow_channel="C1")),
    ("admin everywhere max_temperature=1.2", AdminCommand(all_channels=True, max_temperature=1.2)),
])
def test_admin_grammar_acts_on_the_channel_it_is_typed_in(text, expected):
    assert parse_command_text(text, channel="C1") == expected


def test_admin_typed_in_discords_genre_box_points_at_storyadmin():
    from bot.discord.adapter import to_story_command

    assert to_story_command("admin", "", {}) == AdminCommand()  # showing is harmless
    with pytest.raises(CommandError, match="with /storyadmin"):
        to_story_command("admin allow", "", {})  # the whole command typed in the genre box
