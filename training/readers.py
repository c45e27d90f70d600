"""Input formats for `prepare`: each reader yields a Story or a Dropped row, never raises on a bad row.

A bad row is reported with its line number and reading goes on, so one stray quote or tag does not
cost the rest of the file. Only a problem with the whole file (missing, wrong header) raises.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from training.errors import DataFormatError
from training.genre_map import GenreMap
from training.genres import BOS_TOKEN, EOS_TOKEN, is_known, normalize_genre

logger = logging.getLogger(__name__)

FORMATS = ("csv", "txt", "jsonl")
_EXTENSIONS = {".csv": "csv", ".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl"}
CSV_GENRE_COLUMN = "Genre"
CSV_TEXT_COLUMN = "Plot"

_TAGGED_RE = re.compile(
    r"^(?P<bos><BOS>\s*)?(?:<(?P<angle>[^<>]*)>|\[(?P<square>[^\[\]]*)\])?\s*(?P<text>.*?)\s*(?P<eos><EOS>)?$"
)
_CITATION_RE = re.compile(r"\[\d+\]")
_SPACE_RE = re.compile(r"\s+")


@dataclass(frozen=True)
class Story:
    text: str
    genre: str
    line: int  # 1-based line of the input where the row starts


@dataclass(frozen=True)
class Dropped:
    line: int
    reason: str  # a short category, counted in the stats: "malformed row", "unmapped genre", ...
    detail: str  # what exactly, for the log and the first examples kept in stats.json


Row = Story | Dropped


def guess_format(path: Path) -> str:
    fmt = _EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise DataFormatError(
            f"--input {path}: cannot guess the format from '{path.suffix}'; pass --format csv|txt|jsonl"
        )
    return fmt


def clean_text(text: str) -> str:
    """One line of plain prose: Wikipedia's [1] citation marks go, runs of whitespace become one space."""
    return _SPACE_RE.sub(" ", _CITATION_RE.sub("", text)).strip()


def read_rows(path: Path, fmt: str, genre_map: GenreMap, default_genre: str | None) -> Iterator[Row]:
    if not path.is_file():
        raise DataFormatError(f"--input {path}: file not found")
    if fmt == "csv":
        return read_csv(path, genre_map)
    if fmt == "jsonl":
        return read_jsonl(path)
    if fmt == "txt":
        return read_txt(path, default_genre)
    raise DataFormatError(f"--format {fmt}: unknown; use one of {', '.join(FORMATS)}")


def read_txt(path: Path, default_genre: str | None) -> Iterator[Row]:
    """One story a line, tagged `<BOS> <genre> … <EOS>`, `<genre> …`, `[Genre] …`, or untagged."""
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield _parse_tagged_line(line.strip(), number, default_genre)


def _parse_tagged_line(line: str, number: int, default_genre: str | None) -> Row:
    match = _TAGGED_RE.match(line)
    assert match is not None  # every part of the pattern is optional
    tag = match.group("angle") if match.group("angle") is not None else match.group("square")
    text = match.group("text")
    if BOS_TOKEN in text or EOS_TOKEN in text:
        return Dropped(number, "malformed row", f"line {number}: {BOS_TOKEN} or {EOS_TOKEN} inside the story")
    if tag is None:
        if match.group("bos"):
            return Dropped(number, "malformed row", f"line {number}: {BOS_TOKEN} is not followed by a <genre> tag")
        if default_genre is None:
            return Dropped(number, "untagged", f"line {number}: no genre tag; pass --default-genre to keep it")
        tag = default_genre
    return _to_story(clean_text(text), tag, number)


def _to_story(text: str, raw_genre: str, number: int) -> Row:
    genre = normalize_genre(raw_genre)
    if not genre:
        return Dropped(number, "malformed row", f"line {number}: empty genre tag")
    if not is_known(genre):
        return Dropped(number, "unknown genre", f"line {number}: genre '{raw_genre}' is not one storygen knows")
    if not text:
        return Dropped(number, "empty story", f"line {number}: no story text")
    return Story(text, genre, number)


def read_jsonl(path: Path) -> Iterator[Row]:
    """One JSON object a line with string fields "text" and "genre"."""
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield Dropped(number, "malformed row", f"line {number}: not valid JSON ({exc.msg})")
                continue
            if not isinstance(record, dict) or not all(
                isinstance(record.get(key), str) for key in ("text", "genre")
            ):
                yield Dropped(number, "malformed row", f'line {number}: needs string fields "text" and "genre"')
                continue
            yield _to_story(clean_text(record["text"]), record["genre"], number)


def read_csv(path: Path, genre_map: GenreMap) -> Iterator[Row]:
    """The Kaggle "Wikipedia Movie Plots" CSV; Genre goes through the mapping file."""
    # Plots run to tens of thousands of characters, past the csv module's default field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [c for c in (CSV_GENRE_COLUMN, CSV_TEXT_COLUMN) if c not in header]
        if missing:
            raise DataFormatError(
                f"--input {path}: CSV header lacks {missing} (found {header}); expected the Kaggle "
                "'Wikipedia Movie Plots' columns, or use --format txt|jsonl"
            )
        start = reader.line_num + 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield Dropped(start, "malformed row", f"line {start}: unreadable CSV ({exc}); stopped reading here")
                return
            yield _csv_row(row, start, genre_map)
            start = reader.line_num + 1


def _csv_row(row: dict[str | None, str | None], number: int, genre_map: GenreMap) -> Row:
    # DictReader puts surplus fields under the key None and fills missing ones with None.
    if None in row or any(value is None for value in row.values()):
        return Dropped(number, "malformed row", f"line {number}: wrong number of fields")
    raw_genre = (row[CSV_GENRE_COLUMN] or "").strip()
    genre = genre_map.to_genre(raw_genre)
    if genre is None:
        return Dropped(number, "unmapped genre", raw_genre or "(empty)")
    text = clean_text(row[CSV_TEXT_COLUMN] or "")
    if not text:
        return Dropped(number, "empty story", f"line {number}: empty Plot")
    return Story(text, genre, number)
