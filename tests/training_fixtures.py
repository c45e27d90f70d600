"""Small real things for the training tests: generated genre stories, a tiny tokenizer and GPT-2.

Import the fixtures into a test module (`from tests.training_fixtures import tiny_base`); they are
session-scoped so that the tokenizer and model are built once.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

GENRE_VOCAB = {
    "drama": "family letter mother tears secret wedding".split(),
    "horror": "ghost blood cellar scream candle grave".split(),
    "sci_fi": "robot planet laser orbit android starship".split(),
    "action": "chase explosion rooftop punch convoy rifle".split(),
}
COMMON = "the a and then she he walked saw found it was night town".split()


def make_story(genre: str, rng: random.Random, words: int) -> str:
    """A story whose words give its genre away, so a classifier and a tiny model can tell them apart."""
    pool = GENRE_VOCAB[genre] * 2 + COMMON
    return " ".join(rng.choice(pool) for _ in range(words)).capitalize() + "."


def make_records(count: int, seed: int = 0, min_words: int = 20, max_words: int = 70) -> list[dict[str, str]]:
    rng = random.Random(seed)
    genres = sorted(GENRE_VOCAB)
    return [
        {"genre": genres[i % len(genres)], "text": make_story(genres[i % len(genres)], rng, rng.randint(min_words, max_words))}
        for i in range(count)
    ]


def write_tagged_txt(path: Path, records: list[dict[str, str]]) -> Path:
    path.write_text("".join(f"<BOS> <{r['genre']}> {r['text']} <EOS>\n" for r in records), encoding="utf-8")
    return path


def build_tiny_base(directory: Path, dropout: float = 0.1) -> Path:
    """A GPT-2 with vocab ~300, n_embd 32, 2 layers and a byte-level BPE trained on the spot.

    Like GPT-2 it knows only <|endoftext|>; training adds <BOS>, <EOS> and the genre tags.
    Dropout is on so that resuming has RNG state that matters.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [r["text"] for r in make_records(200, seed=99)]
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    config = GPT2Config(
        vocab_size=len(fast), n_positions=256, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
    )
    import torch

    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared directory of 80 generated stories in four genres."""
    from training.prepare import PrepareArguments, prepare

    root = tmp_path_factory.mktemp("prepared")
    source = write_tagged_txt(root / "stories.txt", make_records(80))
    prepare(PrepareArguments(input=source, out=root / "data", validation_share=0.25))
    return root / "data"


def train_argv(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """Flags for a run of a few seconds on the tiny model."""
    return [
        "--base", str(base), "--data", str(data), "--out", str(out),
        "--block_size", "64", "--batch_size", "4", "--learning_rate", "1e-3",
        "--logging_steps", "1", "--save_steps", "3", "--sample_steps", "4",
        "--sample_max_new_tokens", "8", *extra,
    ]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, prepared: Path) -> Path:
    """One finished tiny run; returns its runs/<name> directory."""
    from training.train import main

    out = tmp_path_factory.mktemp("runs") / "tiny"
    main(train_argv(tiny_base, prepared, out, "--max_steps", "8"))
    return out
