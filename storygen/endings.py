"""Clean endings: turn what the model wrote into a story that ends well.

The model's output is cut at the end-of-story token by the engine. Here control
tokens left in the text are removed, whitespace is tidied, and a story that ran
out of length mid-sentence loses its dangling half-sentence.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from storygen.errors import EmptyStoryError

logger = logging.getLogger(__name__)

# A sentence ends at . ! ? or … optionally followed by closing quotes or brackets.
_SENTENCE_END = re.compile(r"""[.!?…]+["'”’)\]]*(?=\s|$)""")


def strip_controls(text: str, controls: Iterable[str]) -> str:
    """Remove any control-token text (`<EOS>`, `<|im_end|>`) the decoder left in."""
    for control in controls:
        if control:
            text = text.replace(control, "")
    return text


def tidy(text: str) -> str:
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.rstrip()


def trim_dangling(continuation: str) -> str:
    """Cut after the last complete sentence; keep the text as it is if there is none."""
    ends = list(_SENTENCE_END.finditer(continuation))
    if not ends:
        return continuation
    return continuation[: ends[-1].end()]


def finish_story(opening: str, continuation: str, ended_cleanly: bool, controls: Iterable[str] = ()) -> str:
    """The whole story: the opening verbatim, then the tidied continuation.

    `ended_cleanly` is True when the model emitted its end-of-story token; even then a
    last fragment without punctuation is dropped. With no complete sentence at all the
    text is kept and marked with an ellipsis rather than thrown away.
    """
    continuation = tidy(strip_controls(continuation, controls))
    if not continuation.strip():
        raise EmptyStoryError("it ended the story straight away" if ended_cleanly else "only whitespace")
    trimmed = trim_dangling(continuation)
    if _SENTENCE_END.search(trimmed):
        return (opening + trimmed).rstrip()
    # Not one complete sentence: keep what there is and mark the cut.
    return (opening + continuation).rstrip(" ,;:-—") + "…"
