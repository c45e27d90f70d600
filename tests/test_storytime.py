"""Group storytelling's rules as plain functions: turn order, joining and leaving, timeouts and
skips, free mode, undo, votes, caps, the model's prompt, the grammar, the store and the export.
Time is a number the test passes in; nothing sleeps. tests/test_storytime_service.py runs the
same rules through the service, the worker and simulated restarts.
"""

from __future__ import annotations

import pytest

from bot import messages
from bot.commands import CommandError
from bot.storytime import rules, votes
from bot.storytime.export import credits, filename, to_markdown
from bot.storytime.grammar import parse_storytime
from bot.storytime.limits import StorytimeLimits
from bot.storytime.model_turns import first_sentences
from bot.storytime.prompt import story_prompt
from bot.storytime.session import MODEL, Actor, Place, Session, StartOptions, StorytimeError
from bot.storytime.store import SessionStore

LIMITS = StorytimeLimits(turn_timeout_s=100, vote_timeout_s=60, idle_end_s=3600)
PLACE = Place("slack", "T1", "C1")
ALICE, BOB, CAROL, DAVE = (Actor(u, u.title()) for u in ("alice", "bob", "carol", "dave"))
ADMIN = Actor("root", "Root", is_admin=True)
T0 = 1_000_000.0


def started(mode: str = "turns", opening: str = "", limits: StorytimeLimits = LIMITS, **options) -> Session:
    return rules.new_session("s1", PLACE, "C1:1.0", ALICE, StartOptions("fantasy", opening, mode=mode, **options),
                             limits, T0)


def with_players(*actors: Actor, mode: str = "turns", **options) -> Session:
    session = started(mode, **options)
    for actor in actors:
        rules.join(session, actor, LIMITS, T0)
    return session


def model_writes(session: Session, text: str = "The model wrote.", now: float = T0) -> list[str]:
    assert session.model is not None and session.model.kind == "line"
    return rules.add_model_line(session, text, now)


# ---- starting and turn order


def test_the_opening_is_the_starters_first_line_and_the_model_goes_next():
    session = started(opening="  The dragon   woke.  ")
    assert [(line.author, line.text) for line in session.lines] == [("alice", "The dragon woke.")]
    assert session.model is not None and session.turn is None and session.deadline is None
    assert session.players == ["alice"] and session.turns_left == LIMITS.max_turns - 1


def test_without_an_opening_the_starter_goes_first_with_a_deadline():
    session = started()
    assert (session.turn, session.deadline, session.lines, session.model) == ("alice", T0 + 100, [], None)


def test_turns_go_in_join_order_with_the_model_after_every_line():
    session = with_players(BOB, CAROL)
    order = []
    for _ in range(6):
        user = session.turn
        order.append(user)
        rules.add_line(session, Actor(user), f"{user} wrote.", T0)
        told = model_writes(session)
        assert told == [messages.ST_NEXT.format(name=session.name_of(session.turn), timeout="100 s")]
    assert order == ["alice", "bob", "carol"] * 2
    assert [line.author for line in session.lines] == ["alice", MODEL, "bob", MODEL, "carol", MODEL] * 2


def test_model_every_n_lines():
    session = with_players(BOB, model_every=2)
    rules.add_line(session, ALICE, "one", T0)
    assert session.model is None and session.turn == "bob"
    rules.add_line(session, BOB, "two", T0)
    assert session.model is not None
    model_writes(session)
    assert session.turn == "alice" and session.since_model == 0


@pytest.mark.parametrize("actor, error", [(BOB, messages.ST_NOT_YOUR_TURN.format(name="Alice")),
                                          (DAVE, messages.ST_NOT_A_PLAYER)])
def test_out_of_turn_lines_are_refused_saying_whose_turn_it_is(actor, error):
    session = with_players(BOB)
    with pytest.raises(StorytimeError, match=error.replace("(", r"\(")):
        rules.check_can_add(session, actor)


def test_no_line_while_the_model_writes_or_a_vote_is_open():
    session = started(opening="Once.")
    with pytest.raises(StorytimeError, match="model is writing"):
        rules.check_can_add(session, ALICE)
    votes.open_vote(session, ["a", "b"], 60, T0)
    with pytest.raises(StorytimeError, match="choosing"):
        rules.check_can_add(session, ALICE)


# ---- joining and leaving mid-session


def test_joining_mid_session_goes_to_the_end_of_the_order():
    session = with_players(BOB)
    rules.add_line(session, ALICE, "a", T0)
    model_writes(session)
    assert session.turn == "bob"
    assert rules.join(session, CAROL, LIMITS, T0) == [messages.ST_JOINED.format(name="Carol", position=3)]
    rules.add_line(session, BOB, "b", T0)
    model_writes(session)
    assert session.turn == "carol"


def test_leaving_on_your_turn_passes_it_on():
    session = with_players(BOB, CAROL)
    rules.add_line(session, ALICE, "a", T0)
    model_writes(session, now=T0)
    assert session.turn == "bob"
    told = rules.leave(session, BOB, T0 + 5)
    assert told == [messages.ST_LEFT.format(name="Bob"), messages.ST_NEXT.format(name="Carol", timeout="100 s")]
    assert (session.players, session.turn, session.deadline) == (["alice", "carol"], "carol", T0 + 105)


def test_leaving_off_turn_keeps_the_turn_and_the_last_to_leave_empties_the_session():
    session = with_players(BOB)
    assert rules.leave(session, BOB, T0) == [messages.ST_LEFT.format(name="Bob")]
    assert session.turn == "alice"
    rules.leave(session, ALICE, T0)
    assert session.players == [] and session.turn is None
    assert rules.end_reason(session, LIMITS, T0) == messages.ST_END_EMPTY
    with pytest.raises(StorytimeError, match="not in this session"):
        rules.leave(session, ALICE, T0)


def test_joining_twice_and_the_player_cap():
    session = started(limits=StorytimeLimits(max_players=2))
    with pytest.raises(StorytimeError, match="already in"):
        rules.join(session, ALICE, StorytimeLimits(max_players=2), T0)
    rules.join(session, BOB, StorytimeLimits(max_players=2), T0)
    with pytest.raises(StorytimeError) as refused:
        rules.join(session, CAROL, StorytimeLimits(max_players=2), T0)
    assert str(refused.value) == messages.ST_TOO_MANY_PLAYERS.format(limit=2)


# ---- timeouts and skips


def test_a_timed_out_turn_is_skipped_and_the_thread_told_who_is_next():
    session = with_players(BOB)
    assert rules.expire_turn(session, LIMITS, T0 + 99.9) == []
    told = rules.expire_turn(session, LIMITS, T0 + 100)
    assert told == [messages.ST_SKIPPED.format(name="Alice"), messages.ST_NEXT.format(name="Bob", timeout="100 s")]
    assert (session.turn, session.deadline, session.skips) == ("bob", T0 + 200, {"alice": 1})


def test_a_long_outage_skips_every_turn_it_covered_counting_from_each_deadline():
    session = with_players(BOB, CAROL)
    told = rules.expire_turn(session, LIMITS, T0 + 250)  # alice at +100, bob at +200; carol's runs to +300
    assert told[0::2] == [messages.ST_SKIPPED.format(name="Alice"), messages.ST_SKIPPED.format(name="Bob")]
    assert (session.turn, session.deadline) == ("carol", T0 + 300)


def test_three_skips_in_a_row_move_a_player_out_of_the_order():
    session = with_players(BOB)
    now = T0
    for _ in range(2):  # alice skips twice; bob writes each time
        now = session.deadline
        rules.expire_turn(session, LIMITS, now)
        rules.add_line(session, BOB, "bob", now)
        model_writes(session, now=now)
    assert session.skips == {"alice": 2} and session.turn == "alice"
    told = rules.expire_turn(session, LIMITS, session.deadline)
    assert messages.ST_REMOVED.format(name="Alice", skips=3) in told
    assert (session.players, session.turn, session.skips) == (["bob"], "bob", {})


def test_a_line_resets_the_skips_in_a_row():
    session = with_players(BOB)
    rules.expire_turn(session, LIMITS, T0 + 100)  # alice skipped
    rules.add_line(session, BOB, "b", T0 + 150)
    model_writes(session, now=T0 + 150)
    rules.add_line(session, ALICE, "a", T0 + 160)
    assert session.skips == {}


def test_no_turn_timeouts_in_free_mode_but_an_idle_hour_ends_it():
    session = with_players(BOB, mode="free")
    assert session.turn is None and session.deadline is None
    assert rules.expire_turn(session, LIMITS, T0 + 10_000) == []
    assert rules.end_reason(session, LIMITS, T0 + 3599) is None
    assert rules.end_reason(session, LIMITS, T0 + 3600) == messages.ST_END_IDLE
    assert rules.next_deadline(session, LIMITS) == T0 + 3600


# ---- free mode


def test_in_free_mode_anyone_adds_at_any_time_and_becomes_a_player():
    session = started(mode="free")
    for actor in (DAVE, DAVE, ALICE):
        rules.check_can_add(session, actor)
        assert rules.add_line(session, actor, f"{actor.user} wrote.", T0) == []
        assert model_writes(session) == [messages.ST_NEXT_FREE]
    assert session.players == ["alice", "dave"]
    assert [line.author for line in session.lines if line.author != MODEL] == ["dave", "dave", "alice"]


# ---- undo


def test_undo_removes_the_model_line_then_the_human_line_giving_the_turn_back():
    session = with_players(BOB)
    rules.add_line(session, ALICE, "Alice's line.", T0)
    model_writes(session, "Model's line.")
    assert session.turn == "bob"
    line, told = rules.undo(session, ALICE, T0 + 10)
    assert (line.author, line.text, told) == (MODEL, "Model's line.", []) and session.turn == "bob"
    line, told = rules.undo(session, ADMIN, T0 + 20)
    assert (line.author, session.lines, session.turn, session.deadline) == ("alice", [], "alice", T0 + 120)
    assert told == [messages.ST_NEXT.format(name="Alice", timeout="100 s")]
    assert session.turns_left == LIMITS.max_turns


@pytest.mark.parametrize("situation, error", [("not starter", "starter or an admin"), ("empty", "no line"),
                                              ("model writing", "Wait for")])
def test_undo_refusals(situation, error):
    session = with_players(BOB)
    actor = BOB if situation == "not starter" else ALICE
    if situation == "model writing":
        rules.add_line(session, ALICE, "a", T0)
    with pytest.raises(StorytimeError, match=error):
        rules.undo(session, actor, T0)


# ---- votes


def test_vote_a_changed_vote_replaces_the_old_one():
    session = with_players(BOB, CAROL, mode="vote")
    rules.add_line(session, ALICE, "a", T0)
    assert session.model.kind == "vote"
    votes.open_vote(session, ["first", "second"], 60, T0)
    assert votes.cast(session, BOB, 1, T0) == messages.ST_VOTE_CAST.format(number=2)
    assert votes.cast(session, BOB, 0, T0) == messages.ST_VOTE_CHANGED.format(number=1)
    assert votes.cast(session, BOB, 0, T0) == messages.ST_VOTE_CAST.format(number=1)
    assert session.vote.ballots == {"bob": 0} and not votes.everyone_voted(session)
    votes.cast(session, CAROL, 1, T0)
    votes.cast(session, ALICE, 1, T0)
    assert votes.everyone_voted(session) and votes.tally(session.vote) == (1, [1, 2])


@pytest.mark.parametrize("ballots, winner", [({}, 0), ({"a": 1, "b": 0}, 0), ({"a": 1}, 1), ({"a": 1, "b": 1, "c": 0}, 1)])
def test_most_votes_win_and_a_tie_or_no_vote_picks_the_first(ballots, winner):
    vote = votes.Vote(["x", "y"], T0, dict(ballots))
    assert votes.tally(vote)[0] == winner


def test_only_players_vote_and_only_while_it_is_open():
    session = with_players(BOB, mode="vote")
    with pytest.raises(StorytimeError, match="already over"):
        votes.cast(session, BOB, 0, T0)
    votes.open_vote(session, ["x", "y"], 60, T0)
    with pytest.raises(StorytimeError, match="Only players"):
        votes.cast(session, DAVE, 0, T0)
    with pytest.raises(StorytimeError, match="already over"):
        votes.cast(session, BOB, 2, T0)
    assert rules.next_deadline(session, LIMITS) == T0 + 60


# ---- caps and options


def test_line_length_cap_and_control_characters():
    limits = StorytimeLimits(max_line_chars=10)
    assert rules.clean_line("a\u200bb\x00c  d", limits) == "abc d"
    with pytest.raises(StorytimeError) as refused:
        rules.clean_line("x" * 11, limits)
    assert str(refused.value) == messages.ST_LINE_TOO_LONG.format(chars=11, limit=10)
    with pytest.raises(StorytimeError, match="Add some text"):
        rules.clean_line(" \u200b ", limits)


@pytest.mark.parametrize("options, error", [
    ({"turns": 31}, "turns=31 is out of range; allowed: 1 to 30"),
    ({"turns": 0}, "turns=0 is out of range; allowed: 1 to 30"),
    ({"turn_timeout_s": 5.0}, "turn_timeout=5.0 is out of range; allowed: 30 to 3600 seconds"),
    ({"mode": "chaos"}, "mode='chaos' is not a mode; choose one of: turns, free, vote"),
    ({"model_every": 11}, "model_every=11 is out of range; allowed: 1 to 10"),
])
def test_bad_start_options_are_one_line(options, error):
    with pytest.raises(StorytimeError) as refused:
        started(**options)
    assert str(refused.value) == error


def test_turns_run_out():
    session = with_players(BOB, turns=2)
    rules.add_line(session, ALICE, "a", T0)
    model_writes(session)
    rules.add_line(session, BOB, "b", T0)
    assert session.turns_left == 0 and session.model is None
    assert rules.end_reason(session, LIMITS, T0) == messages.ST_END_TURNS


# ---- the model's prompt


def test_the_whole_story_when_it_fits():
    assert story_prompt(["Once.", "Then.", "After."], lambda t: True) == ("Once.\nThen.\nAfter.", 0)


def test_trimming_drops_the_middle_keeps_the_opening_and_says_so():
    lines = ["OPENING"] + [f"line {i:02d}" for i in range(20)]
    prompt, missing = story_prompt(lines, lambda text: len(text) <= 120)
    kept = prompt.split("\n")
    assert kept[0] == "OPENING" and len(prompt) <= 120
    assert kept[1] == messages.ST_MISSING_LINES.format(count=missing, lines="lines")
    assert kept[2:] == lines[len(lines) - len(kept) + 2:] and kept[-1] == "line 19"  # the latest lines, in order
    assert missing == 20 - len(kept[2:]) and missing > 0
    one_more = "\n".join(["OPENING", messages.ST_MISSING_LINES.format(count=missing - 1, lines="lines"),
                          lines[-len(kept) + 1], *kept[2:]])
    assert len(one_more) > 120  # the most that fits: one more line would not


def test_one_missing_line_is_singular_and_the_last_line_alone_when_nothing_else_fits():
    prompt, missing = story_prompt(["A" * 10, "b" * 60, "c"], lambda text: len(text) <= 70)
    assert missing == 1 and messages.ST_MISSING_LINES.format(count=1, lines="line") in prompt
    assert story_prompt(["A" * 50, "b" * 50, "c" * 5], lambda text: len(text) <= 10) == ("c" * 5, 2)


def test_the_model_line_is_cut_after_a_few_sentences():
    assert first_sentences("One. Two! Three? Four.", 3) == "One. Two! Three?"
    assert first_sentences("No end yet", 3) == "No end yet"
    assert first_sentences('"Go." She went. He stayed. Then', 2) == '"Go." She went.'


# ---- grammar


@pytest.mark.parametrize("text, action, detail", [
    ("", "help", None), ("join", "join", None), ("LEAVE", "leave", None),
    ("add The door opened.", "add", "The door opened."), ("end", "end", ""), ("end ab12cd34", "end", "ab12cd34"),
])
def test_grammar_simple_commands(text, action, detail):
    command = parse_storytime(text)
    assert command.action == action
    if action == "add":
        assert command.text == detail
    if action == "end":
        assert command.session_id == detail


def test_grammar_start_with_options_anywhere():
    command = parse_storytime('start science fiction The ship woke. It\'s cold title="The Cold Ship" turns=5 '
                              'turn_timeout=60 mode=vote model_every=2')
    assert command.start == StartOptions("sci_fi", "The ship woke. It's cold", "The Cold Ship", 5, 60.0, "vote", 2)
    assert parse_storytime("start horror").start == StartOptions("horror")


@pytest.mark.parametrize("text, error", [("dance", "not a storytime command"), ("join now", "takes nothing"),
                                         ("start The door", "name a genre"), ("start horror turns=x", "turns='x'"),
                                         ("end a b", "at most a session id")])
def test_grammar_errors_are_one_line(text, error):
    with pytest.raises(CommandError, match=error):
        parse_storytime(text)


# ---- the store and the export


def test_the_store_round_trips_every_field(tmp_path):
    session = with_players(BOB, mode="vote", opening="Once.")
    session.model.attempts, session.model.options = 1, ["first"]
    store = SessionStore(tmp_path / "db.sqlite3")
    store.save(session)
    store.close()
    again = SessionStore(tmp_path / "db.sqlite3")
    assert again.get("s1") == session
    assert again.find_open("slack:T1", "C1") == session and again.find_open("slack:T1", "C1:1.0") == session
    assert again.find_open("slack:T1", "C2") is None and again.find_open("discord:T1", "C1") is None
    votes.open_vote(session, ["x", "y"], 60, T0)
    session.vote.ballots["bob"] = 1
    session.status = "ended"
    again.save(session)
    assert again.get("s1") == session and again.find_open("slack:T1", "C1") is None
    assert again.open_sessions() == []


def test_markdown_export_has_title_genre_date_story_and_credits():
    session = with_players(BOB, opening="The *dragon* woke.", title="Dragon Days")
    model_writes(session, "It was hungry.")
    rules.add_line(session, BOB, "Bob fed it <cake>.", T0)
    model_writes(session, "It slept.")
    assert credits(session) == [("StoryBot (the model)", 2), ("Alice", 1), ("Bob", 1)]
    assert to_markdown(session, 1_764_763_200).splitlines() == [
        "# Dragon Days", "", "*fantasy · 2025-12-03*", "",
        r"The \*dragon\* woke.", "", "It was hungry.", "", r"Bob fed it \<cake\>.", "", "It slept.", "",
        "## Credits", "", "- StoryBot (the model): 2 lines", "- Alice: 1 line", "- Bob: 1 line"]
    assert filename(session) == "dragon-days-s1.md"
