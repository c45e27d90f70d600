from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

# Nothing in the test run may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from storygen.config import StorygenConfig  # noqa: E402
from storygen.model import LoadedModel, load_model  # noqa: E402
from tests.tiny import save_tiny_model  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEV_PLOTS = SHARED_DATA / "genre_plots_dev.txt"


async def until(predicate, timeout: float = 10.0) -> None:
    """Wait, polling, until predicate() is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        "genre_tags": save_tiny_model(root / "genre_tags", "genre_tags", "gpt2"),
        "instruct": save_tiny_model(root / "instruct", "instruct", "llama"),
        "plain": save_tiny_model(root / "plain", "plain", "llama"),
    }


def tiny_config(directory: Path, fmt: str, tmp: Path, **changes: object) -> StorygenConfig:
    # fp32 unless a test asks otherwise: STORYGEN_DTYPE=auto means bf16 on some CPUs, and the
    # suite should compute the same everywhere (tests/test_dtype.py covers bf16). No framings
    # computed ahead while idle, so a test sees only its own requests' forward passes
    # (tests/test_worker.py covers that).
    changes = {"dtype": "float32", "warm_prefixes": False, **changes}
    return replace(StorygenConfig(), model=str(directory), model_format=fmt, device="cpu",
                   cache_dir=tmp / "cache", settings_db=tmp / "settings.sqlite3", **changes)


@pytest.fixture(scope="session")
def tiny_lms(tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedModel]:
    tmp = tmp_path_factory.mktemp("cfg")
    # genre_tags comes from storygen.json (format auto); the others are named, as an operator would.
    return {
        "genre_tags": load_model(tiny_config(tiny_dirs["genre_tags"], "auto", tmp)),
        "instruct": load_model(tiny_config(tiny_dirs["instruct"], "instruct", tmp)),
        "plain": load_model(tiny_config(tiny_dirs["plain"], "auto", tmp)),
    }


@pytest.fixture(params=["genre_tags", "instruct", "plain"])
def fmt(request: pytest.FixtureRequest) -> str:
    return request.param


from tests.fakes.discord_fixtures import fake_discord  # noqa: E402,F401  (fixture)


@contextlib.asynccontextmanager
async def running_service(lm: LoadedModel, config: StorygenConfig):
    """The bot's shared service on a running worker; stopped and closed afterwards."""
    from bot.service import StoryService
    from bot.state import BotState
    from storygen.settings import SettingsStore
    from storygen.worker import Worker

    worker = Worker(lm, config)
    await worker.start()
    settings, state = SettingsStore(config.settings_db), BotState(config.settings_db)
    try:
        yield StoryService(worker, settings, state, config)
    finally:
        await worker.stop()
        settings.close()
        state.close()


@pytest.fixture
async def story_service(tiny_lms, tmp_path):
    """The bot's shared service on a running worker with the tiny instruct model."""
    lm = tiny_lms["instruct"]
    async with running_service(lm, tiny_config(lm.name, "instruct", tmp_path)) as service:
        yield service
