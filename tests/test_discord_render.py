"""How a story looks on Discord; bot/render.py's split_text is tested in tests/test_render.py."""

import pytest

from bot.discord.render import MAX_PAGES, PAGE_CHARS, StoryProgress, neutralise, to_discord_messages


@pytest.mark.parametrize("raw, safe", [
    ("hi @everyone and @here", "hi @\u200beveryone and @\u200bhere"),
    ("@Everyone", "@\u200bEveryone"),
    ("<@123> <@!456> <@&789> <#1011>", "<@\u200b123> <@!\u200b456> <@&\u200b789> <#1011>"),
    ("<@alice> @someone a@b.c <#general>", "<@alice> @someone a@b.c <#general>"),  # not mentions: untouched
])
def test_neutralise(raw, safe):
    assert neutralise(raw) == safe
    assert neutralise(safe) == safe  # twice is the same as once


def _done(text: str, **changes) -> StoryProgress:
    return StoryProgress("abc123", "sci_fi", "done", text, footer="sci_fi · 9 tokens · seed 1", **changes)


def test_a_finished_story_is_one_embed_with_buttons():
    [message] = to_discord_messages(_done("Once upon a time <@1>.", notices=("genre auto → sci_fi (space)",)))
    [embed] = message.embeds
    assert (embed.title, embed.description, embed.footer.text) == ("📖 science fiction", "Once upon a time <@\u200b1>.",
                                                                   "sci_fi · 9 tokens · seed 1")
    assert message.content == "genre auto → sci_fi (space)"
    assert [item.custom_id for item in message.view.children] == ["story:continue:abc123", "story:regenerate:abc123"]
    assert message.view.timeout is None and not message.files


def test_a_long_story_is_pages_then_a_file():
    sentence = "The road went on and on. "
    pages = to_discord_messages(_done(sentence * (PAGE_CHARS // len(sentence) + 5), continued=True))
    assert [m.embeds[0].title for m in pages] == ["📖 science fiction (1/2)", "📖 science fiction (2/2)"]
    assert [m.view is None for m in pages] == [True, False] and pages[0].embeds[0].footer.text is None
    assert all(len(m.embeds[0].description) <= PAGE_CHARS for m in pages)

    text = sentence * (MAX_PAGES * PAGE_CHARS // len(sentence) + 5)
    [message] = to_discord_messages(_done(text))
    [story_file] = message.files
    assert story_file.filename == "story-abc123.txt" and story_file.fp.read().decode() == text
    assert message.embeds[0].description.endswith(" …") and len(message.embeds[0].description) <= PAGE_CHARS


@pytest.mark.parametrize("state, status, content, buttons", [
    ("queued", "⏳ queued, #2 in line (about 3 s)", "⏳ queued, #2 in line (about 3 s)", ["story:cancel:abc123"]),
    ("writing", "", "✍️ writing… 14 characters so far", ["story:cancel:abc123"]),
    ("cancelled", "", "🛑 cancelled", []),
    ("failed", "Story generation failed (ref 1a2b)", "⚠️ Story generation failed (ref 1a2b)", []),
])
def test_a_story_on_its_way(state, status, content, buttons):
    [message] = to_discord_messages(StoryProgress("abc123", "horror", state, "The door @here" if state != "queued"
                                                  else "", status))
    assert message.content == content
    assert ([item.custom_id for item in message.view.children] if message.view else []) == buttons
    if state != "queued":
        assert message.embeds[0].description == "The door @\u200bhere"
