"""Genre tokens and packing: tags stay whole, no story is cut without its tag, EOS is learned."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.training_fixtures import make_records, tiny_base  # noqa: F401 (fixture)
from training.genres import BOS_TOKEN, EOS_TOKEN, genre_token
from training.modeling import add_genre_tokens, load_model
from training.packing import IGNORE, EncodedStory, encode_stories, pack

GENRES = ["action", "drama", "horror", "sci_fi"]


@pytest.fixture(scope="module")
def tagged(tiny_base: Path):  # noqa: F811, ANN201 (model, tokenizer)
    model, tokenizer = load_model(str(tiny_base))
    add_genre_tokens(model, tokenizer, GENRES)
    return model, tokenizer


def test_genre_tokens_are_whole_and_seeded_from_words(tiny_base: Path, tagged) -> None:  # noqa: F811, ANN001
    model, tokenizer = tagged
    base_tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    base_model = AutoModelForCausalLM.from_pretrained(tiny_base)
    ids = tokenizer("<BOS> <sci_fi> the robot <EOS>", add_special_tokens=False)["input_ids"]
    body = base_tokenizer(" the robot", add_special_tokens=False)["input_ids"]
    assert ids == [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("<sci_fi>"), *body, tokenizer.eos_token_id]
    assert (tokenizer.bos_token, tokenizer.eos_token) == (BOS_TOKEN, EOS_TOKEN)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    # <sci_fi> starts as the mean of " science fiction"'s embeddings in the base model.
    words = base_tokenizer(" science fiction", add_special_tokens=False)["input_ids"]
    expected = base_model.get_input_embeddings().weight[words].mean(dim=0)
    got = model.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("<sci_fi>")]
    assert torch.allclose(got, expected)
    # Old rows are untouched by the resize.
    old = base_model.get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight[: old.shape[0]], old)


def _random_stories(count: int, seed: int) -> list[EncodedStory]:
    rng = random.Random(seed)
    stories = []
    for _ in range(count):
        genre_id = rng.choice([10, 11, 12])
        body = [rng.randint(20, 99) for _ in range(rng.randint(1, 150))]
        stories.append(EncodedStory([1, genre_id, *body, 2], genre_id))
    return stories


def _unpack(blocks: list[dict[str, list[int]]]) -> list[list[int]]:
    """Rebuild the story token lists from blocks, dropping carried tags and padding."""
    stories: list[list[int]] = []
    for block in blocks:
        segments: list[list[int]] = []
        for token, position in zip(block["input_ids"], block["position_ids"]):
            if position == 0:
                segments.append([])
            segments[-1].append(token)
        for segment in segments:
            if segment[0] == 1:  # a story starts: <BOS> <genre> …
                stories.append(segment)
            elif segment[0] in (10, 11, 12):  # a continuation: carried genre tag, then the token before the cut
                assert stories and stories[-1][1] == segment[0], "continuation without its own genre tag"
                assert stories[-1][-1] != 2, "continuation of a story that had ended"
                assert segment[1] == stories[-1][-1], "continuation does not resume at the cut"
                stories[-1] += segment[2:]
            else:
                assert set(segment) == {0}, "only padding may start without a tag"
    return stories


@pytest.mark.parametrize("block_size", [4, 5, 16, 64, 257])
@pytest.mark.parametrize("seed", [0, 1])
def test_packing_invariants(block_size: int, seed: int) -> None:
    stories = _random_stories(40, seed)
    blocks = pack(stories, block_size, pad_id=0)
    assert all(len(b[key]) == block_size for b in blocks for key in ("input_ids", "labels", "position_ids"))
    for block in blocks:  # every block opens with a story start or a carried tag
        assert block["input_ids"][0] in (1, 10, 11, 12)
    assert _unpack(blocks) == [s.ids for s in stories]  # nothing cut, dropped or reordered
    labels = [label for b in blocks for label in b["labels"]]
    tokens = [token for b in blocks for token in b["input_ids"]]
    assert labels.count(2) == len(stories)  # every EOS is in the loss
    positions = [p for b in blocks for p in b["position_ids"]]
    for i, (token, label) in enumerate(zip(tokens, labels)):
        # Unlearned: <BOS>, tags, padding, and the context token right after a carried tag.
        after_carried_tag = positions[i] == 1 and tokens[i - 1] in (10, 11, 12)
        unlearned = token in (0, 1, 10, 11, 12) or after_carried_tag
        assert label == (IGNORE if unlearned else token)
    learned = [label for label in labels if label != IGNORE]
    assert learned == [t for s in stories for t in s.ids[2:]]  # each story token learned exactly once


def test_labels_come_from_masks_even_when_pad_is_eos() -> None:
    stories = [EncodedStory([1, 10, 50, 51, 2], 10)]
    (block,) = pack(stories, block_size=12, pad_id=2)
    assert block["input_ids"] == [1, 10, 50, 51, 2, 2, 2, 2, 2, 2, 2, 2]
    assert block["labels"] == [IGNORE, IGNORE, 50, 51, 2] + [IGNORE] * 7
    assert block["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]


def test_story_that_spills_carries_its_tag() -> None:
    stories = [EncodedStory([1, 10, 50, 51, 52, 53, 2], 10), EncodedStory([1, 11, 60, 2], 11)]
    blocks = pack(stories, block_size=5, pad_id=0)
    assert [b["input_ids"] for b in blocks] == [[1, 10, 50, 51, 52], [10, 52, 53, 2, 0], [1, 11, 60, 2, 0]]
    assert blocks[1]["labels"] == [IGNORE, IGNORE, 53, 2, IGNORE]
    assert blocks[1]["position_ids"] == [0, 1, 2, 3, 0]


def test_encode_stories_matches_tagged_text(tagged) -> None:  # noqa: ANN001
    _, tokenizer = tagged
    (story,) = encode_stories(tokenizer, [{"genre": "horror", "text": "the ghost"}])
    assert story.genre_id == tokenizer.convert_tokens_to_ids(genre_token("horror"))
    assert tokenizer.decode(story.ids) == "<BOS><horror> the ghost<EOS>"


def test_packed_stories_do_not_attend_to_each_other(tagged) -> None:  # noqa: ANN001
    model, tokenizer = tagged
    model.eval()
    first, second = encode_stories(tokenizer, make_records(2, seed=5, min_words=5, max_words=8))
    (block,) = pack([first, second], block_size=len(first.ids) + len(second.ids) + 3, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        # use_cache=False as under Trainer: transformers builds the per-story mask only without a cache.
        packed = model(input_ids=torch.tensor([block["input_ids"]]), use_cache=False,
                       position_ids=torch.tensor([block["position_ids"]])).logits[0]
        alone = model(input_ids=torch.tensor([second.ids])).logits[0]
    start = len(first.ids)
    assert torch.allclose(packed[start:start + len(second.ids)], alone, atol=1e-5)
