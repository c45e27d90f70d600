"""Clean endings: turn what the model wrote into a story that ends well.

The model's output is cut at the end-of-story token by the engine. Here control
tokens left in the text are removed, whitespace is tidied, and a story that ran
out of length mid-sentence loses its dangling half-sentence.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from transformers import PreTrainedTokenizerBase

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


def sentence_end_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[frozenset[int], frozenset[int]]:
    """(ids of tokens that end a sentence, ids of tokens that are only whitespace), for the ending steer.

    A text stands at a sentence end when its last token that is not whitespace ends one.
    """
    # Decoding all ~50k tokens one by one takes seconds; only tokens with sentence marks or without
    # any ASCII letter or digit (whitespace, "…" in byte-level form) can be either kind.
    raw = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    ids = [i for i, token in enumerate(raw) if token is not None and (
        any(mark in token for mark in ".!?") or not any(c.isascii() and c.isalnum() for c in token))]
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    ends = frozenset(i for i, text in zip(ids, texts) if text.strip() and ends_sentence(text))
    blank = frozenset(i for i, text in zip(ids, texts) if text and not text.strip())
    return ends, blank


def ends_sentence(text: str) -> bool:
    """Whether the text ends a sentence: . ! ? or …, perhaps then closing quotes or brackets."""
    text = text.rstrip()
    return any(match.end() == len(text) for match in _SENTENCE_END.finditer(text))


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
