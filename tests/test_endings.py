import pytest

from storygen.endings import finish_story, trim_dangling
from storygen.errors import EmptyStoryError


@pytest.mark.parametrize("continuation, expected", [
    (" It worked. Then the", " It worked."),
    (' "Run!" she said. And then', ' "Run!" she said.'),
    (" Was it? Yes… and so", " Was it? Yes…"),
    (" (They left.) The end came", " (They left.)"),
    (" No ending here", " No ending here"),
])
def test_trim_dangling(continuation, expected):
    assert trim_dangling(continuation) == expected


def test_story_starts_with_opening_and_ends_on_punctuation():
    story = finish_story("After time travel,", " she went home. She slept. Then", ended_cleanly=False)
    assert story == "After time travel, she went home. She slept."


def test_control_tokens_are_stripped():
    story = finish_story("Hi", " there.<EOS><|endoftext|>", ended_cleanly=True, controls=["<EOS>", "<|endoftext|>"])
    assert story == "Hi there."


def test_no_sentence_is_kept_and_marked():
    assert finish_story("Once", " upon a time, in", ended_cleanly=False) == "Once upon a time, in…"


@pytest.mark.parametrize("continuation", ["", "   \n ", "<EOS>"])
def test_empty_story_says_why(continuation):
    with pytest.raises(EmptyStoryError, match="wrote nothing usable"):
        finish_story("Once", continuation, ended_cleanly=True, controls=["<EOS>"])


def test_blank_lines_collapse():
    assert finish_story("A.", "\n\n\n\nB.  \n", ended_cleanly=True) == "A.\n\nB."
