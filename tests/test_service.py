import pytest

from bot.commands import SettingsCommand, StoryCommand
from bot.service import ChatContext, NotAllowedError
from storygen.errors import TooManyRequestsError

ALICE = ChatContext("discord", "g1", "c1", "alice")
BOB = ChatContext("discord", "g1", "c1", "bob")
ADMIN = ChatContext("discord", "g1", "c1", "root", is_admin=True)


@pytest.fixture
def lm(tiny_lms):
    return tiny_lms["instruct"]  # the story_service's model


async def test_story_continue_and_regenerate(story_service):
    # Continue and Regenerate draw new seeds; a story may not end before it wrote something
    # (Engine._bar_empty), so whichever seed comes, the user gets a story.
    started = await story_service.story(ALICE, StoryCommand("Once upon a time", "fantasy", {"length": 20}))
    story = await started.handle
    story_service.record(ALICE, started, story)
    assert started.request.user_key == "discord:g1:alice" and story.genre == "fantasy"
    more = await story_service.continue_last(ALICE)
    continued = await more.handle
    assert continued.text.startswith(more.shown) and more.shown  # the model reread the end of the story
    story_service.record(ALICE, more, continued)
    whole = story_service.state.last_story(ALICE.user_key, ALICE.channel_key)
    assert whole.text == story.text + more.new_text(continued)
    again = await story_service.regenerate(ALICE, started.request.request_id)
    assert again.request.prompt == "Once upon a time" and again.request.params.length == 20
    await again.handle
    reroll = await story_service.regenerate(ALICE, more.request.request_id)  # the continuation, again
    assert reroll.previous_text == story.text and reroll.shown == more.shown
    await reroll.handle


async def test_continue_without_a_story(story_service):
    with pytest.raises(NotAllowedError, match="no story of yours in this channel"):
        await story_service.continue_last(BOB)


async def test_only_the_requester_cancels(story_service):
    started = await story_service.story(ALICE, StoryCommand("A long tale", "drama", {"length": 300}))
    with pytest.raises(NotAllowedError, match="Only the person who asked"):
        story_service.cancel(BOB, started.request.request_id)
    assert story_service.cancel(BOB) == "You have no story in progress."
    assert story_service.cancel(ALICE, started.request.request_id) == "🛑 Cancelled your story."


async def test_per_user_cap_through_the_service(story_service):
    for _ in range(2):
        await story_service.story(ALICE, StoryCommand("Tale", "drama", {"length": 300}))
    with pytest.raises(TooManyRequestsError, match="you already have 2 stories in progress"):
        await story_service.story(ALICE, StoryCommand("Tale", "drama"))


async def test_settings_show_set_reset(story_service):
    text = story_service.user_settings(ALICE, SettingsCommand("set", {"temperature": "1.1", "genre": "horror"}))
    assert "temperature = 1.1  (your default)" in text and "genre = horror  (your default)" in text
    started = await story_service.story(ALICE, StoryCommand("The door", None, {"length": 5}))
    assert started.request.genre == "horror" and started.request.params.temperature == 1.1
    assert "(server default)" in story_service.user_settings(ALICE, SettingsCommand("reset"))


async def test_admin_rules(story_service):
    with pytest.raises(NotAllowedError, match="Manage Server"):
        story_service.admin(ALICE, cooldown_s=5)
    story_service.admin(ADMIN, allowed_channels=("c2",), max_length=50, cooldown_s=60)
    with pytest.raises(NotAllowedError, match="not enabled in this channel; .* <#c2>"):
        await story_service.story(ALICE, StoryCommand("Tale", "drama"))
    elsewhere = ChatContext("discord", "g1", "c2", "alice")
    from storygen.errors import SettingRangeError

    with pytest.raises(SettingRangeError, match="1 to 50 tokens"):
        await story_service.story(elsewhere, StoryCommand("Tale", "drama", {"length": 80}))
    await story_service.story(elsewhere, StoryCommand("Tale", "drama", {"length": 10}))
    with pytest.raises(NotAllowedError, match="cooldown: try again in"):
        await story_service.story(elsewhere, StoryCommand("Tale", "drama"))
    other_server = ChatContext("discord", "g2", "c1", "alice")
    await story_service.story(other_server, StoryCommand("Tale", "drama", {"length": 80}))


async def test_queue_status(story_service):
    assert "no story in progress" in story_service.queue(ALICE)
    await story_service.story(ALICE, StoryCommand("Tale", "drama", {"length": 300}))
    status = story_service.queue(ALICE)
    assert "being written now" in status or "in line" in status


async def test_any_story_in_progress_can_be_cancelled_by_id(story_service):
    first = await story_service.story(ALICE, StoryCommand("A long tale", "drama", {"length": 300}))
    await story_service.story(ALICE, StoryCommand("Another tale", "drama", {"length": 300}))
    assert story_service.cancel(ALICE, first.request.request_id) == "🛑 Cancelled your story."


def test_messages_in_flight_survive_a_restart_until_untracked(tmp_path):
    from bot.state import BotState, InFlight

    state = BotState(tmp_path / "bot.sqlite3")
    state.track("r1", "slack", "C1", ["1.1", "1.2"], "slack:T:U", "Once upon")
    state.track("r1", "slack", "C1", ["1.1", "1.2"], "slack:T:U", "Once upon a time")  # a later edit
    state.track("r2", "discord", "c9", ["m"], "discord:g:u", "Far away", {"genre": "drama", "token": "t"})
    state.close()
    again = BotState(tmp_path / "bot.sqlite3")
    assert again.in_flight("slack") == [InFlight("r1", "C1", ("1.1", "1.2"), "slack:T:U", "Once upon a time")]
    again.untrack("r1")
    assert again.in_flight("slack") == []
    assert again.in_flight("discord") == [InFlight("r2", "c9", ("m",), "discord:g:u", "Far away",
                                                   {"genre": "drama", "token": "t"})]


def test_a_state_file_from_before_in_flight_details_is_brought_up_to_date(tmp_path):
    import sqlite3

    from bot.state import BotState, InFlight

    old = sqlite3.connect(tmp_path / "bot.sqlite3")
    old.execute("CREATE TABLE in_flight (request_id TEXT PRIMARY KEY, platform TEXT NOT NULL, channel TEXT NOT NULL,"
                " messages TEXT NOT NULL, user_key TEXT NOT NULL, text TEXT NOT NULL, updated_at REAL NOT NULL)")
    old.execute("INSERT INTO in_flight VALUES ('r1', 'slack', 'C1', '[\"1.1\"]', 'slack:T:U', 'Once', 0)")
    old.commit()
    old.close()
    state = BotState(tmp_path / "bot.sqlite3")
    assert state.in_flight("slack") == [InFlight("r1", "C1", ("1.1",), "slack:T:U", "Once")]
    state.track("r2", "discord", "c9", ["m"], "discord:g:u", "Far", {"moved": True})
    assert state.in_flight("discord")[0].details == {"moved": True}
