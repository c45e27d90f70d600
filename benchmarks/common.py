"""What the benchmarks share: which model `--model` names, and waiting for a worker's warm-up."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from storygen.config import StorygenConfig

if TYPE_CHECKING:
    from storygen.worker import Worker


def with_model(config: StorygenConfig, model: str, tmp: Path) -> StorygenConfig:
    """`config` pointed at `--model`: "default" leaves it as it is, "tiny" a random instruct model built
    in `tmp` (once), anything else a directory or a .gguf file."""
    if model == "tiny":
        from tests.tiny import save_tiny_model

        directory = tmp / "tiny"
        if not (directory / "config.json").is_file():
            save_tiny_model(directory, "instruct")
        return replace(config, model=str(directory), model_format="instruct")
    return config if model == "default" else replace(config, model=model)


async def warmed(worker: Worker) -> None:
    """Return once the worker has computed the genres' framings ahead (at once where it has none to do)."""
    while worker.warming:
        await asyncio.sleep(0.005)
