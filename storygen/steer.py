"""The genre steer: the words a genre's stories are made of, a little likelier while a story is written.

The instruct framing (storygen/prompts.py) tells the model what a genre's story contains, and a
135M model listens only so far: asked for an action story it often writes a quiet drama. So each
genre has a list of its words (storygen.genres, `words`), and while a story of that genre is
written the logits of those words' tokens rise by STORYGEN_GENRE_STEER nats (default 2.5; 0 turns
it off), each only until the story has used it (storygen/engine.py), so the steer brings the
genre's words in and never makes the model loop on one. The figures are in the README's "Story quality".

Remote backends do not get it: OpenAI's `logit_bias` (which vLLM and llama.cpp take) is one
constant bias for the whole completion, and a constant bias of 3 nats made the default model loop
("Technology. Technology. Technology.") in the measurement that led to the "until used" rule.

Only a word that is one token with its leading space counts (" soldier", " Soldier"), so the steer
never pushes the first half of a word the model then has to finish.
"""

from __future__ import annotations

from functools import lru_cache

from transformers import PreTrainedTokenizerBase

from storygen.genres import Genre


def steer_ids(tokenizer: PreTrainedTokenizerBase, genre: Genre) -> tuple[int, ...]:
    """The token ids of the genre's words, lower-case and capitalised, where each is a single token."""
    return _steer_ids(tokenizer, genre.words)


@lru_cache(maxsize=128)
def _steer_ids(tokenizer: PreTrainedTokenizerBase, words: tuple[str, ...]) -> tuple[int, ...]:
    ids: set[int] = set()
    for word in words:
        for form in {word, word.capitalize()}:
            encoded = tokenizer.encode(" " + form, add_special_tokens=False)
            if len(encoded) == 1:
                ids.add(encoded[0])
    return tuple(sorted(ids))
