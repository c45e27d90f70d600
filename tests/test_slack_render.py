import re

import pytest

from bot import messages
from bot.slack.render import (CANCEL, CONTINUE, REGENERATE, SlackLimits, StoryView, escape, needs_file,
                              to_slack_blocks, unescape)

ALICE = "U0ALICE001"
NASTY = "Hi <!channel> <!here> <!everyone> <@U0BOB00001> <#C0GENERAL1> <https://x.test|click> & @here @channel @Everyone"


def _all_text(rendered) -> str:
    parts = []
    for message in rendered:
        parts.append(message.text)
        for block in message.blocks:
            if block["type"] == "section":
                parts.append(block["text"]["text"])
            elif block["type"] == "context":
                parts.extend(e["text"] for e in block["elements"])
    return "\n".join(parts)


def test_escape_neutralises_mentions_links_and_broadcasts():
    escaped = escape(NASTY)
    assert "<" not in escaped and ">" not in escaped
    assert "&lt;!channel&gt;" in escaped and "&lt;@U0BOB00001&gt;" in escaped and " &amp; " in escaped
    assert not re.search(r"@(here|channel|everyone)\b", escaped, re.IGNORECASE)
    assert escape("a && b") == "a &amp;&amp; b"
    assert unescape("&lt;b&gt; &amp;amp;") == "<b> &amp;"


def test_story_text_and_fallback_are_escaped_and_only_the_requester_is_mentioned():
    rendered = to_slack_blocks(StoryView(NASTY, "r1", ALICE))
    text = _all_text(rendered)
    assert re.findall(r"<[^>]*>", text) == [f"<@{ALICE}>"]
    [message] = rendered
    assert message.blocks[0]["text"] == {"type": "mrkdwn", "text": escape(NASTY), "verbatim": True}
    assert to_slack_blocks(StoryView("x", "r1", "<!channel>"))[0].blocks[1]["elements"][0]["text"] == "✍️ writing…"


def test_buttons_follow_the_state_and_carry_the_request_id():
    def buttons(state):
        blocks = to_slack_blocks(StoryView("Once.", "req-9", ALICE, state, "sci_fi · 3 tokens · seed 1"))[-1].blocks
        actions = [b for b in blocks if b["type"] == "actions"]
        return [(e["action_id"], e["value"]) for a in actions for e in a["elements"]]

    assert buttons("writing") == [(CANCEL, "req-9")]
    assert buttons("done") == [(CONTINUE, "req-9"), (REGENERATE, "req-9")]
    assert buttons("cancelled") == buttons("stopped") == []


@pytest.mark.parametrize("chars", [2_999, 3_001, 30_000, 200_000])
def test_long_stories_split_within_slacks_limits(chars):
    text = ("All work and no play makes a dull story. " * (chars // 41 + 1))[:chars]
    limits = SlackLimits()
    rendered = to_slack_blocks(StoryView(text, "r1", ALICE, "done", "footer"), limits)
    for message in rendered:
        sections = [b["text"]["text"] for b in message.blocks if b["type"] == "section"]
        assert len(message.blocks) <= 50
        assert all(len(s) <= 3000 for s in sections)
        assert sum(map(len, sections)) <= limits.message_chars
    assert [b["type"] for b in rendered[-1].blocks][-2:] == ["context", "actions"]
    if needs_file(text, limits):
        [preview] = rendered
        assert preview.blocks[1]["text"]["text"] == escape(messages.STORY_ATTACHED)
    else:
        joined = " ".join(b["text"]["text"] for m in rendered for b in m.blocks if b["type"] == "section")
        assert joined.split() == text.split()
    assert needs_file(text, limits) == (chars > 4 * 12_000)


def test_escaping_that_grows_a_piece_still_fits():
    text = "&" * 5_000  # each & becomes &amp;
    sections = [b["text"]["text"] for m in to_slack_blocks(StoryView(text, "r", ALICE)) for b in m.blocks
                if b["type"] == "section"]
    assert all(len(s) <= 3000 for s in sections) and "".join(sections) == "&amp;" * 5_000


def test_blocks_per_message_cap():
    limits = SlackLimits(section_chars=10, message_chars=10_000, message_blocks=5, max_messages=100)
    rendered = to_slack_blocks(StoryView("word " * 40, "r", ALICE, "done"), limits)
    assert all(len(m.blocks) <= 5 for m in rendered) and len(rendered) > 1
