"""The mapping from free-text genre labels (the Kaggle CSV's Genre column) to model genres.

The file format is documented at the top of `genre_map.toml` beside this module.
"""

from __future__ import annotations

import logging
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from training.errors import DataFormatError
from storygen.genres import genre_names, to_identifier

logger = logging.getLogger(__name__)

DEFAULT_GENRE_MAP = Path(__file__).with_name("genre_map.toml")

_PART_SPLIT_RE = re.compile(r"\s*(?:[,/;|]|\band\b|&)\s*")


@dataclass(frozen=True)
class GenreMap:
    phrases: dict[str, str]
    priority: tuple[str, ...]

    def to_genre(self, raw: str) -> str | None:
        """The model genre for a free-text label, or None when no part of it maps."""
        whole = to_identifier(raw)
        if whole in self.phrases:
            return self.phrases[whole]
        found: list[str] = []
        for part in _PART_SPLIT_RE.split(raw.lower()):
            key = to_identifier(part)
            if not key:
                continue
            if key in self.phrases:
                found.append(self.phrases[key])
                continue
            found.extend(self.phrases[w] for w in key.split("_") if w in self.phrases)
        if not found:
            return None
        return min(found, key=self._rank)

    def _rank(self, genre: str) -> int:
        return self.priority.index(genre) if genre in self.priority else len(self.priority)


def load_genre_map(path: Path = DEFAULT_GENRE_MAP) -> GenreMap:
    """Read and check a mapping file; every target must be a genre storygen knows."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataFormatError(f"--genre-map {path}: file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise DataFormatError(f"--genre-map {path}: not valid TOML ({exc})") from None
    phrases = raw.get("phrases")
    if not isinstance(phrases, dict) or not phrases:
        raise DataFormatError(f"--genre-map {path}: needs a [phrases] table of 'label = \"genre\"' lines")
    unknown = sorted({g for g in phrases.values() if g not in genre_names()})
    if unknown:
        raise DataFormatError(
            f"--genre-map {path}: targets {unknown} are not known genres; use one of {genre_names()}"
        )
    priority = tuple(raw.get("priority", ()))
    return GenreMap({to_identifier(k): v for k, v in phrases.items()}, priority)
