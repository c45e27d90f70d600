"""Packing tokenized stories into fixed-length training blocks.

Stories are laid end to end. A story that does not fit in what is left of a block is not cut short:
it goes on in the next block, which starts with the story's genre tag again, so every token is
trained with its genre in view. The tag is followed by the last token of the previous block, as
context only: otherwise the model would be taught to predict a mid-sentence fragment right after a
bare genre tag, and would start stories mid-sentence when prompted with `<BOS> <genre>`.
Each block carries:

- input_ids     (block_size,)  the tokens; the last block is padded with the pad id
- labels        (block_size,)  the token where it is learned, -100 elsewhere. Built from a mask, never
                               by comparing with the pad id: with pad=EOS that would hide EOS from the
                               loss and the model would never learn to stop.
- position_ids  (block_size,)  restart at 0 for each story. transformers reads the restarts as sequence
                               boundaries and builds a block-diagonal causal mask, so a story never
                               attends to the one before it. That needs no attention_mask and no KV
                               cache; Trainer turns the cache off (TrainingArguments.use_cache=False).

Learned tokens are the story text and its <EOS>. <BOS> and the genre tag are given, never predicted:
storygen always supplies them in the prompt.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from training.genres import genre_token, to_tagged_text

logger = logging.getLogger(__name__)

IGNORE = -100  # the label value transformers' loss skips
_PROMPT_TOKENS = 2  # <BOS> <genre>
_MIN_START_ROOM = _PROMPT_TOKENS + 1  # don't open a story in a block with no room for its first word
_CARRIED = 2  # a continuation opens with <genre> and the token before the cut, neither learned


@dataclass(frozen=True)
class EncodedStory:
    ids: list[int]  # <BOS> <genre> text… <EOS>
    genre_id: int


def encode_stories(
    tokenizer: PreTrainedTokenizerBase, records: Iterable[dict[str, str]]
) -> list[EncodedStory]:
    """Tokenize prepared records exactly as storygen will write prompts: one tagged string each."""
    records = list(records)
    texts = [to_tagged_text(r["genre"], r["text"]) for r in records]
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    stories = []
    for record, text, ids in zip(records, texts, encoded):
        genre_id = tokenizer.convert_tokens_to_ids(genre_token(record["genre"]))
        if ids[:2] != [tokenizer.bos_token_id, genre_id] or ids[-1] != tokenizer.eos_token_id:
            raise ValueError(f"tokenizer splits the tags of {text[:40]!r}; call add_genre_tokens first")
        stories.append(EncodedStory(ids, genre_id))
    return stories


class _BlockBuilder:
    """Accumulates one block at a time; `blocks` holds the finished ones."""

    def __init__(self, block_size: int, pad_id: int) -> None:
        self.block_size, self.pad_id = block_size, pad_id
        self.blocks: list[dict[str, list[int]]] = []
        self._new()

    def _new(self) -> None:
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.positions: list[int] = []

    @property
    def room(self) -> int:
        return self.block_size - len(self.ids)

    def add(self, ids: list[int], learned: list[bool], first_position: int) -> None:
        self.ids += ids
        self.labels += [t if keep else IGNORE for t, keep in zip(ids, learned)]
        self.positions += range(first_position, first_position + len(ids))

    def flush(self) -> None:
        if not self.ids:
            return
        pad = self.room
        # Padding is its own sequence (positions from 0) so that no story attends to it.
        self.add([self.pad_id] * pad, [False] * pad, 0)
        self.blocks.append({"input_ids": self.ids, "labels": self.labels, "position_ids": self.positions})
        self._new()


def pack(stories: list[EncodedStory], block_size: int, pad_id: int) -> list[dict[str, list[int]]]:
    """Lay stories end to end in blocks of block_size; a spilling story re-carries its genre tag."""
    if block_size <= _CARRIED + 1:
        raise ValueError(f"block_size {block_size} is too small; use at least {_CARRIED + 2}")
    builder = _BlockBuilder(block_size, pad_id)
    for story in stories:
        if builder.room < _MIN_START_ROOM:
            builder.flush()
        learned = [False] * _PROMPT_TOKENS + [True] * (len(story.ids) - _PROMPT_TOKENS)
        start, position = 0, 0
        while True:
            take = min(builder.room, len(story.ids) - start)
            builder.add(story.ids[start:start + take], learned[start:start + take], position)
            start, position = start + take, position + take
            if start == len(story.ids):
                break
            # The story spills: it goes on in a fresh block that opens with its genre tag.
            builder.flush()
            builder.add([story.genre_id, story.ids[start - 1]], [False] * _CARRIED, 0)
            position = _CARRIED
    builder.flush()
    return builder.blocks


def build_blocks(
    tokenizer: PreTrainedTokenizerBase, records: list[dict[str, str]], block_size: int, seed: int
) -> list[dict[str, list[int]]]:
    """Shuffle (seeded, so a resumed run packs the same blocks), encode and pack."""
    records = list(records)
    random.Random(seed).shuffle(records)
    blocks = pack(encode_stories(tokenizer, records), block_size, tokenizer.pad_token_id)
    learned = sum(label != IGNORE for block in blocks for label in block["labels"])
    logger.info("packed %d stories into %d blocks of %d tokens (%d learned tokens)",
                len(records), len(blocks), block_size, learned)
    return blocks
