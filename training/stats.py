"""Statistics of a prepared data set: what was kept, how long it is, what was dropped and why."""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from training.readers import Dropped, Story

logger = logging.getLogger(__name__)

PERCENTILES = (10, 50, 90, 99)


def length_percentiles(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    values = np.percentile(np.asarray(lengths), PERCENTILES)
    result = {f"p{p}": float(v) for p, v in zip(PERCENTILES, values)}
    result.update(mean=float(np.mean(lengths)), max=float(max(lengths)))
    return result


def build_stats(
    kept: dict[str, list[Story]], dropped: list[Dropped], unmapped: Counter[str], examples: int
) -> dict:
    genres = sorted({s.genre for stories in kept.values() for s in stories})
    per_genre = {
        genre: {split: sum(s.genre == genre for s in stories) for split, stories in kept.items()}
        for genre in genres
    }
    all_stories = [s for stories in kept.values() for s in stories]
    return {
        "genres": genres,
        "stories": {split: len(stories) for split, stories in kept.items()},
        "per_genre": per_genre,
        "length_words": length_percentiles([len(s.text.split()) for s in all_stories]),
        "length_chars": length_percentiles([len(s.text) for s in all_stories]),
        "dropped": dict(Counter(d.reason for d in dropped).most_common()),
        "dropped_examples": [d.detail for d in dropped if d.reason != "unmapped genre"][:examples],
        "unmapped_genres": dict(unmapped.most_common(examples)),
    }


def to_markdown(stats: dict) -> str:
    lines = [f"# Prepared data from `{stats.get('source', '?')}`", ""]
    lines += ["| genre | train | validation |", "| --- | ---: | ---: |"]
    for genre, counts in stats["per_genre"].items():
        lines.append(f"| {genre} | {counts.get('train', 0)} | {counts.get('validation', 0)} |")
    stories = stats["stories"]
    lines.append(f"| **all** | {stories.get('train', 0)} | {stories.get('validation', 0)} |")
    lines += ["", "Length in words: " + _format_percentiles(stats["length_words"]), ""]
    lines += ["## Dropped", ""]
    if not stats["dropped"]:
        lines.append("Nothing was dropped.")
    for reason, count in stats["dropped"].items():
        lines.append(f"- {reason}: {count}")
    if stats["unmapped_genres"]:
        lines += ["", "Most common unmapped Genre values (extend the genre map to keep them):", ""]
        lines += [f"- `{value}`: {count}" for value, count in stats["unmapped_genres"].items()]
    if stats["dropped_examples"]:
        lines += ["", "First problems:", ""] + [f"- {detail}" for detail in stats["dropped_examples"]]
    return "\n".join(lines) + "\n"


def _format_percentiles(values: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.0f}" for key, value in values.items())
