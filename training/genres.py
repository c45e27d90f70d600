"""Genre names and tags as the model sees them.

Genre names are lower-case snake_case identifiers (`sci_fi`). In text they appear as control tokens
(`<sci_fi>`) after `<BOS>`. The lead will later point `normalize_genre` at `storygen.genres`; until then
this module keeps the registry's list so that training never produces a genre storygen cannot serve.
"""

from __future__ import annotations

import logging
import re

logger = logging.getLogger(__name__)

BOS_TOKEN = "<BOS>"
EOS_TOKEN = "<EOS>"
GENRE_TOKEN = "<{genre}>"

# The registry storygen knows; a genre outside it could be trained but never requested.
KNOWN_GENRES: tuple[str, ...] = (
    "superhero", "sci_fi", "horror", "action", "thriller",
    "drama", "fantasy", "romance", "mystery", "comedy",
)

_ALIASES = {
    "scifi": "sci_fi",
    "science_fiction": "sci_fi",
    "super_hero": "superhero",
}

# Words whose embeddings seed each genre token; a short phrase beats the bare identifier
# because `sci_fi` tokenizes into fragments that mean little to the base model.
GENRE_WORDS = {
    "sci_fi": "science fiction",
    "superhero": "superhero",
}

_GENRE_TOKEN_RE = re.compile(r"^<([a-z][a-z0-9_]*)>$")


def normalize_genre(raw: str) -> str:
    """`[Sci-Fi]`, `Science Fiction` and `scifi` all become `sci_fi`; unknown names pass through."""
    name = raw.strip().strip("[]<>").strip().lower()
    name = re.sub(r"[\s\-]+", "_", name)
    name = re.sub(r"_+", "_", name).strip("_")
    return _ALIASES.get(name, name)


def is_known(genre: str) -> bool:
    return genre in KNOWN_GENRES


def genre_token(genre: str) -> str:
    return GENRE_TOKEN.format(genre=genre)


def genre_from_token(token: str) -> str | None:
    """`<sci_fi>` -> `sci_fi`; anything else -> None."""
    match = _GENRE_TOKEN_RE.match(token)
    return match.group(1) if match else None


def genre_words(genre: str) -> str:
    return GENRE_WORDS.get(genre, genre.replace("_", " "))


def to_tagged_text(genre: str, text: str) -> str:
    """The `genre_tags` prompt format shared with storygen: `<BOS> <genre> text <EOS>`."""
    return f"{BOS_TOKEN} {genre_token(genre)} {text} {EOS_TOKEN}"
