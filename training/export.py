"""The final directory storygen loads: save_pretrained model + tokenizer + storygen.json."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from training.genres import BOS_TOKEN, EOS_TOKEN, GENRE_TOKEN

logger = logging.getLogger(__name__)

METADATA_FILE = "storygen.json"
TRAINING_LOG_FILE = "training_log.json"  # Trainer's log history, for evaluate's loss curve


def storygen_metadata(genres: list[str], base_model: str) -> dict:
    """What storygen needs to pick the `genre_tags` prompt format and refuse untrained genres."""
    return {
        "format": "genre_tags",
        "genres": sorted(genres),
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "genre_token": GENRE_TOKEN,
        "base_model": base_model,
        "created_by": "training",
    }


def write_metadata(directory: Path, genres: list[str], base_model: str, log_history: list[dict]) -> None:
    metadata = storygen_metadata(genres, base_model)
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    (directory / TRAINING_LOG_FILE).write_text(json.dumps(log_history, indent=1) + "\n", encoding="utf-8")


def read_metadata(directory: Path) -> dict | None:
    path = directory / METADATA_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
