"""`python -m training prepare`: read stories in any supported format, clean, dedupe, split, write.

Output in --out: train.jsonl and validation.jsonl ({"text", "genre", "line"} a line), stats.json
(counts per genre and split, length percentiles, rows dropped and why) and stats.md (the same, to read).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from training.errors import DataFormatError
from training.genre_map import DEFAULT_GENRE_MAP, load_genre_map
from training.readers import FORMATS, Dropped, Story, guess_format, read_rows
from training.stats import build_stats, to_markdown

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation")
_EXAMPLES_KEPT = 20  # dropped-row details kept in stats.json; the log has them all


@dataclass
class PrepareArguments:
    input: Path = field(metadata={"help": "Stories to prepare: Kaggle movie-plots CSV, txt (one a line) or jsonl."})
    out: Path = field(metadata={"help": "Directory to write train.jsonl, validation.jsonl, stats.json, stats.md."})
    format: str | None = field(
        default=None, metadata={"help": "csv, txt or jsonl; guessed from the extension when left out."}
    )
    genre_map: Path = field(
        default=DEFAULT_GENRE_MAP,
        metadata={"help": "TOML file mapping the CSV's free-text Genre column to model genres."},
    )
    default_genre: str | None = field(
        default=None, metadata={"help": "Genre for untagged txt lines; without it they are dropped and counted."}
    )
    validation_share: float = field(
        default=0.1, metadata={"help": "Share of stories in the validation split, chosen by hash of the text."}
    )
    min_words: int = field(default=20, metadata={"help": "Stories shorter than this many words are dropped."})


def split_of(text: str, validation_share: float) -> str:
    """Deterministic: the same story lands in the same split on every machine and every run."""
    digest = hashlib.sha256(_dedupe_key(text).encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2**64
    return "validation" if bucket < validation_share else "train"


def _dedupe_key(text: str) -> str:
    return " ".join(text.lower().split())


def prepare(args: PrepareArguments) -> dict:
    """Run the whole preparation; returns the stats it wrote."""
    _check(args)
    fmt = args.format or guess_format(args.input)
    genre_map = load_genre_map(args.genre_map) if fmt == "csv" else None
    kept: dict[str, list[Story]] = {split: [] for split in SPLITS}
    dropped: list[Dropped] = []
    unmapped: Counter[str] = Counter()
    seen: set[str] = set()
    rows_read = 0
    for row in read_rows(args.input, fmt, genre_map, args.default_genre):
        rows_read += 1
        if isinstance(row, Story):
            row = _filter(row, seen, args.min_words)
        if isinstance(row, Dropped):
            dropped.append(row)
            if row.reason == "unmapped genre":
                unmapped[row.detail] += 1
            elif row.reason == "malformed row":
                logger.warning("dropped %s", row.detail)
            else:
                logger.debug("dropped %s", row.detail)
            continue
        kept[split_of(row.text, args.validation_share)].append(row)
    if not any(kept.values()):
        reasons = Counter(d.reason for d in dropped)
        raise DataFormatError(
            f"--input {args.input}: no usable stories ({rows_read} rows read, dropped: {dict(reasons)})"
        )
    stats = build_stats(kept, dropped, unmapped, _EXAMPLES_KEPT)
    stats.update(source=str(args.input), format=fmt, rows_read=rows_read, validation_share=args.validation_share)
    _write(args.out, kept, stats)
    return stats


def _check(args: PrepareArguments) -> None:
    if args.format is not None and args.format not in FORMATS:
        raise DataFormatError(f"--format {args.format}: unknown; use one of {', '.join(FORMATS)}")
    if not 0.0 <= args.validation_share < 1.0:
        raise DataFormatError(f"--validation_share {args.validation_share}: must be in [0, 1)")


def _filter(story: Story, seen: set[str], min_words: int) -> Story | Dropped:
    key = _dedupe_key(story.text)
    if key in seen:
        return Dropped(story.line, "duplicate", f"line {story.line}: same text as an earlier story")
    seen.add(key)
    words = len(story.text.split())
    if words < min_words:
        return Dropped(story.line, "too short", f"line {story.line}: {words} words < --min_words {min_words}")
    return story


def _write(out: Path, kept: dict[str, list[Story]], stats: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split, stories in kept.items():
        with (out / f"{split}.jsonl").open("w", encoding="utf-8") as handle:
            for story in stories:
                record = {"text": story.text, "genre": story.genre, "line": story.line}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    (out / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "stats.md").write_text(to_markdown(stats), encoding="utf-8")
    logger.info("wrote %s: %s", out, {split: len(stories) for split, stories in kept.items()})


def load_split(data_dir: Path, split: str) -> list[dict]:
    """Read one split of a prepared directory; the error says how to make one."""
    path = data_dir / f"{split}.jsonl"
    if not path.is_file():
        raise DataFormatError(
            f"--data {data_dir}: no {split}.jsonl; make it with "
            "`python -m training prepare --input FILE --out DIR` and pass that DIR"
        )
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def main(argv: list[str] | None = None) -> dict:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(PrepareArguments, prog="python -m training prepare")
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    stats = prepare(args)
    print(to_markdown(stats))
    return stats
