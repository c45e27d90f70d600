"""Atomic, resumable checkpoints on top of transformers' Trainer.

Trainer writes checkpoint-N in place, file by file: a kill -9 in the middle leaves a directory that
looks complete to `get_last_checkpoint` and fails to load. Here every checkpoint (and the final model)
is written under <run>/.staging/ and renamed into place only once all of it is on disk; a rename
within one file system is atomic, so checkpoint-N either exists whole or not at all.

Everything else about resuming is Trainer's: weights, optimizer, scheduler, the RNG states
(rng_state.pth) and the data position (global step -> batches skipped in the current epoch).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

logger = logging.getLogger(__name__)

STAGING = ".staging"


class AtomicCheckpointTrainer(Trainer):
    """Trainer whose checkpoints appear by rename, never half-written."""

    _staging_save = False

    def _get_output_dir(self, trial: object) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING) if self._staging_save else run_dir

    def _save_checkpoint(self, model: object, trial: object) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staged = run_dir / STAGING / name
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging_save = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_save = False
        # Every rank writes its own rng_state_<rank>.pth; rename only when all have.
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish(staged, run_dir / name)
            rotate_checkpoints(str(run_dir), self.args.save_total_limit)
        self.accelerator.wait_for_everyone()


def publish(staged: Path, final: Path) -> None:
    """Make `staged` appear at `final` in one rename, after its bytes have reached the disk."""
    _fsync_tree(staged)
    if final.exists():
        # Replacing an older copy (a re-run that saves the same step): move it aside first,
        # because rename cannot replace a non-empty directory.
        old = staged.with_name(staged.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)
    _fsync_dir(final.parent)
    try:
        staged.parent.rmdir()  # .staging/ goes when nothing else is being written there
    except OSError:
        pass
    logger.info("saved %s", final)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint-N in run_dir; half-written ones never carry that name."""
    if not run_dir.is_dir():
        return None
    found = get_last_checkpoint(str(run_dir))
    return Path(found) if found else None


def discard_partial(run_dir: Path) -> None:
    """Remove what an interrupted save left under .staging/; the last renamed checkpoint is intact."""
    staging = run_dir / STAGING
    if staging.exists():
        leftovers = sorted(p.name for p in staging.iterdir())
        if leftovers:
            logger.warning("discarding unfinished saves from an interrupted run: %s", leftovers)
        shutil.rmtree(staging)
