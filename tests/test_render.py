import pytest

from bot.render import split_text

STORY = ("The ship woke first. Its crew did not!\n\n"
         "\"Wake up,\" it said. Nobody answered… The corridors were cold and the lights flickered.\n\n"
         "Far below, the planet turned.")


@pytest.mark.parametrize("limit", [1, 5, 12, 20, 40, 80, 200])
def test_pieces_fit_and_keep_every_word(limit):
    pieces = split_text(STORY, limit)
    assert all(0 < len(p) <= limit for p in pieces)
    assert all(p == p.strip() for p in pieces)
    if limit >= 12:  # the longest word: nothing is cut mid-word
        assert " ".join(pieces).split() == STORY.split()
    assert "".join("".join(pieces).split()) == "".join(STORY.split())


def test_prefers_paragraphs_then_sentences_then_words():
    assert split_text(STORY, 60)[0] == "The ship woke first. Its crew did not!"
    assert split_text("One two three. Four five six seven eight.", 27) == ["One two three.",
                                                                           "Four five six seven eight."]
    assert split_text("\"Go.\" She went. Then more words follow here", 20) == ["\"Go.\" She went.",
                                                                               "Then more words", "follow here"]
    assert split_text("alpha beta gamma delta", 11) == ["alpha beta", "gamma delta"]


def test_short_and_empty_text():
    assert split_text("  short  ", 100) == ["short"]
    assert split_text("", 10) == [] and split_text(" \n ", 10) == []
    with pytest.raises(ValueError):
        split_text("x", 0)
