"""Prompt formats: how (genre, opening) becomes the token ids a model is fed.

- `genre_tags`: `<BOS> <genre> opening…`, the model writes until `<EOS>`. The seeds'
  pranavpsv/gpt2-genre-story-generator and every model made by `training/`.
- `instruct`: the model's chat template, asked to continue the opening as a story in
  the genre (its description, plot and tone from storygen.genres, a length in words, an
  ending); the assistant turn is pre-filled with the opening so it carries on from it.
- `plain`: a base LM; the genre is a one-line text preamble.

Whatever the format, the user's opening is encoded so that it can never become a
control token (see `encode_user_text`), and the story starts with it verbatim.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from storygen.errors import ModelLoadError, UnknownGenreError
from storygen.genres import GENRES, Genre, find_genre, get_genre

logger = logging.getLogger(__name__)

METADATA_FILE = "storygen.json"
SEED_GENRES = tuple(g.name for g in GENRES if g.seed)

# Hub ids whose format we know without metadata. Anything else is `plain` unless
# STORYGEN_FORMAT says otherwise or the model directory carries storygen.json.
KNOWN_MODELS: dict[str, dict] = {
    "pranavpsv/gpt2-genre-story-generator": {"format": "genre_tags", "genres": list(SEED_GENRES)},
    "HuggingFaceTB/SmolLM2-135M-Instruct": {"format": "instruct"},
    "HuggingFaceTB/SmolLM2-360M-Instruct": {"format": "instruct"},
    "gpt2": {"format": "plain"},
    "openai-community/gpt2": {"format": "plain"},
}


@dataclass(frozen=True)
class FormatSpec:
    """A model's prompt format; for `genre_tags`, also its control tokens and genres."""

    format: str
    genres: tuple[str, ...] = field(default_factory=tuple)  # genre_tags: the genres it was trained on
    bos_token: str = "<BOS>"
    eos_token: str = "<EOS>"
    genre_token: str = "<{genre}>"

    def allowed_genres(self) -> list[Genre]:
        if self.format != "genre_tags":
            return list(GENRES)
        return [get_genre(name) for name in self.genres if find_genre(name)]

    def check_genre(self, genre: Genre) -> None:
        """A genre_tags model is refused a genre it was not trained on."""
        if self.format == "genre_tags" and genre.name not in self.genres:
            raise UnknownGenreError(genre.name, self.genres, for_model=True)

    def to_metadata(self, **extra: object) -> dict:
        data = {"format": self.format, "genres": list(self.genres), "bos_token": self.bos_token,
                "eos_token": self.eos_token, "genre_token": self.genre_token}
        return data | extra


def read_metadata(model_dir: Path) -> dict | None:
    """The storygen.json a model made by training/ carries, or None."""
    path = model_dir / METADATA_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{path} is not valid JSON ({error}); fix it or delete it") from None
    if not isinstance(data, dict) or data.get("format") not in ("genre_tags", "instruct", "plain"):
        raise ModelLoadError(f"{path} must hold an object whose 'format' is genre_tags, instruct or plain")
    return data


def resolve_format(
    requested: str, model_id: str, metadata: dict | None, tokenizer: PreTrainedTokenizerBase
) -> FormatSpec:
    """Pick the format: STORYGEN_FORMAT, else the model's metadata, else known ids, else plain."""
    known = metadata or KNOWN_MODELS.get(model_id) or {}
    name = requested if requested != "auto" else known.get("format", "plain")
    if requested == "auto" and not known and tokenizer.chat_template:
        logger.info("model %s has a chat template; set STORYGEN_FORMAT=instruct to use it", model_id)
    spec = FormatSpec(
        format=name,
        bos_token=known.get("bos_token", "<BOS>"),
        eos_token=known.get("eos_token", "<EOS>"),
        genre_token=known.get("genre_token", "<{genre}>"),
    )
    if name == "genre_tags":
        genres = known.get("genres") or _genres_in_vocab(tokenizer, spec.genre_token)
        if not genres:
            raise ModelLoadError(
                f"{model_id} is set to the genre_tags format but its tokenizer has no genre tokens like "
                f"{spec.genre_token.format(genre='horror')}; use STORYGEN_FORMAT=plain or instruct"
            )
        spec = FormatSpec(name, tuple(genres), spec.bos_token, spec.eos_token, spec.genre_token)
    if name == "instruct" and not tokenizer.chat_template:
        raise ModelLoadError(f"{model_id} has no chat template, so it cannot use the instruct format; use plain")
    return spec


def _genres_in_vocab(tokenizer: PreTrainedTokenizerBase, template: str) -> list[str]:
    vocab = tokenizer.get_vocab()
    return [g.name for g in GENRES if template.format(genre=g.name) in vocab]


# --- Encoding ------------------------------------------------------------------------------

def control_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Texts the tokenizer would turn into a control token: special and added tokens."""
    added = [t.content for t in tokenizer.added_tokens_decoder.values()]
    return sorted({s for s in [*tokenizer.all_special_tokens, *added] if s}, key=len, reverse=True)


def control_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    return set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)


def encode_user_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Encode text a user typed so that it never yields a control token.

    Tokenizers match added tokens (`<EOS>`, `<|endoftext|>`, `<horror>`) before BPE, so
    typing one would inject it. We cut the text inside every such occurrence and encode
    the pieces apart: no piece contains the whole control string, so none can match it,
    and for byte-level BPE the ids still decode to exactly the text typed.
    """
    pieces = [text]
    for control in control_strings(tokenizer):
        if len(control) < 2:
            continue
        split: list[str] = []
        for piece in pieces:
            parts = piece.split(control)
            for i, part in enumerate(parts):
                split.append(part)
                if i < len(parts) - 1:
                    half = len(control) // 2
                    split += [control[:half], control[half:]]
        pieces = split
    ids: list[int] = []
    for piece in _merge_safe(pieces, control_strings(tokenizer)):
        ids += tokenizer.encode(piece, add_special_tokens=False)
    forbidden = control_ids(tokenizer)
    if any(i in forbidden for i in ids):  # a tokenizer we do not understand: refuse rather than inject
        raise ValueError("user text still encodes to a control token")
    return ids


def _merge_safe(pieces: Sequence[str], controls: Sequence[str]) -> list[str]:
    """Join neighbouring pieces back while that cannot recreate a control string (fewer cuts, better BPE)."""
    merged: list[str] = []
    for piece in pieces:
        if piece == "":
            continue
        if merged and not any(c in merged[-1] + piece for c in controls):
            merged[-1] += piece
        else:
            merged.append(piece)
    return merged


def encode_template_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Encode our own prompt text, where control tokens are meant."""
    return tokenizer.encode(text, add_special_tokens=False)


# Words per token of English prose for the BPE tokenizers we serve (SmolLM2's: 1.34 tokens a word on
# the dev plots), less a margin, so that a story asked for "about N words" can end within its tokens.
WORDS_PER_TOKEN = 0.45


def to_word_budget(length: int) -> int:
    """The story length to ask an instruct model for, in words, for a budget of `length` new tokens."""
    return max(10, int(round(length * WORDS_PER_TOKEN, -1)))


def instruct_messages(genre: Genre, length: int) -> list[dict[str, str]]:
    """The chat an instruct model is given: the genre's framing from the registry, then the length.

    What happens in such a story and its tone (storygen.genres) steer the model into the genre far
    more than its name alone; the length and the ask for an ending let it finish within its budget.
    The length comes last, so prompts of one genre share everything before it.
    """
    ask = (f"Write a {genre.label} story. {genre.description} In a {genre.label} story, {genre.plot}. "
           f"The tone is {genre.tone}. Carry on from the opening you are given, "
           f"in about {to_word_budget(length)} words, and give the story an ending.")
    return [
        {"role": "system", "content": "You are a storyteller who writes short, complete stories."},
        {"role": "user", "content": ask},
    ]


def build_prompt(spec: FormatSpec, tokenizer: PreTrainedTokenizerBase, genre: Genre, opening: str,
                 length: int = 200) -> list[int]:
    """Token ids for the model: the format's framing, then the user's opening, safely encoded.

    `length` is the story's budget in new tokens; the instruct format tells the model about it.
    """
    # genre_tags, as in training: "<BOS> <genre> opening"; the space before the opening belongs to its first word.
    space = " " if spec.format == "genre_tags" else ""
    return framing_ids(spec, tokenizer, genre, length) + encode_user_text(tokenizer, space + opening)


def framing_ids(spec: FormatSpec, tokenizer: PreTrainedTokenizerBase, genre: Genre, length: int = 200) -> list[int]:
    """The ids every prompt of this genre and length starts with: the format's framing, before the opening.

    The worker computes these ahead, into the prefix cache, while it is idle (worker.py).
    """
    spec.check_genre(genre)
    if spec.format == "genre_tags":
        return encode_template_text(tokenizer, f"{spec.bos_token} {spec.genre_token.format(genre=genre.name)}")
    if spec.format == "instruct":
        # The assistant turn is pre-filled with the opening, so the model carries on from it
        # rather than describing it.
        rendered = tokenizer.apply_chat_template(instruct_messages(genre, length), tokenize=False,
                                                 add_generation_prompt=True)
        return encode_template_text(tokenizer, rendered)
    return encode_template_text(tokenizer, f"A {genre.label} story. {genre.description}\n\n")


_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ue000-\uf8ff]")


def to_opening(text: str, max_chars: int) -> tuple[str, bool]:
    """Clean what a user typed into an opening: (opening, was_trimmed).

    Control and invisible characters go, runs of spaces collapse, and an over-long
    opening is cut at a word boundary under `max_chars` (the caller says so to the user).
    """
    text = _CONTROL_CHARS.sub("", text.replace("\r\n", "\n"))
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    if len(text) <= max_chars:
        return text, False
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars // 2 else cut).rstrip(), True
