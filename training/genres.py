"""Genre tags as the model sees them in training text: `<BOS> <sci_fi> text <EOS>`.

Genre names, aliases and their normalisation come from the one registry, `storygen.genres`,
so training never produces a genre storygen cannot serve. What is training's own is the tag
format and the words that seed each genre token's embedding.
"""

from __future__ import annotations

import logging
import re

from storygen.genres import canonical_name, find_genre

logger = logging.getLogger(__name__)

BOS_TOKEN = "<BOS>"
EOS_TOKEN = "<EOS>"
GENRE_TOKEN = "<{genre}>"

_GENRE_TOKEN_RE = re.compile(r"^<([a-z][a-z0-9_]*)>$")


def normalize_genre(raw: str) -> str:
    """`[Sci-Fi]`, `Science Fiction` and `scifi` all become `sci_fi`; unknown names pass through as identifiers."""
    return canonical_name(raw)


def is_known(genre: str) -> bool:
    """Whether storygen serves this genre name (exactly: normalise first)."""
    found = find_genre(genre)
    return found is not None and found.name == genre


def genre_token(genre: str) -> str:
    return GENRE_TOKEN.format(genre=genre)


def genre_from_token(token: str) -> str | None:
    """`<sci_fi>` -> `sci_fi`; anything else -> None."""
    match = _GENRE_TOKEN_RE.match(token)
    return match.group(1) if match else None


def genre_words(genre: str) -> str:
    """Words whose embeddings seed the genre's token: its label (`science fiction`), which means more
    to the base model than `sci_fi`, whose fragments mean little."""
    found = find_genre(genre)
    return found.label if found is not None else genre.replace("_", " ")


def to_tagged_text(genre: str, text: str) -> str:
    """The `genre_tags` prompt format shared with storygen: `<BOS> <genre> text <EOS>`."""
    return f"{BOS_TOKEN} {genre_token(genre)} {text} {EOS_TOKEN}"
