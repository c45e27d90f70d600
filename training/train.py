"""`python -m training train`: fine-tune a causal LM on a prepared directory with genre control tokens.

Built on transformers' Trainer, which gives gradient accumulation, bf16/fp16, the progress bar,
multi-GPU under torchrun or `accelerate launch`, and resuming weights, optimizer, scheduler, RNG and
data position. What it could not do is added here: atomic checkpoints (checkpoints.py), packing with
the genre tag carried across blocks (packing.py), a wall-clock budget and per-genre samples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import (
    HfArgumentParser, TrainerCallback, TrainerControl, TrainerState, TrainingArguments, default_data_collator, set_seed,
)

from training.checkpoints import STAGING, AtomicCheckpointTrainer, discard_partial, latest_checkpoint, publish
from training.errors import TrainingError
from training.export import write_metadata
from training.modeling import add_genre_tokens, load_model
from training.packing import build_blocks
from training.prepare import load_split
from training.samples import SampleCallback

logger = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"
# Flags that change which blocks are built or how they are stepped through: a resumed run must match.
_RESUME_MUST_MATCH = ("base", "block_size", "batch_size", "gradient_accumulation_steps", "seed", "data_sha256")


@dataclass
class TrainArguments:
    base: str = field(metadata={"help": "Base causal LM: a save_pretrained directory, a .gguf file, or a hub id."})
    data: Path = field(metadata={"help": "Directory written by `python -m training prepare`."})
    out: Path = field(metadata={"help": "Run directory, e.g. runs/<name>: checkpoints, samples/, final/."})
    block_size: int = field(default=512, metadata={"help": "Tokens per packed training block."})
    batch_size: int = field(default=8, metadata={"help": "Blocks per device per forward pass."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Forward passes per optimizer step."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate (AdamW, linear decay)."})
    warmup_steps: float = field(default=0.03, metadata={"help": "Warm-up: steps, or a share of all steps if < 1."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the training blocks."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (overrides --epochs)."})
    max_minutes: float = field(
        default=0.0, metadata={"help": "Wall-clock budget of this invocation; saves a checkpoint and stops. 0: none."}
    )
    precision: str = field(
        default="auto", metadata={"help": "auto (bf16, else fp16 on GPU; fp32 on CPU), bf16, fp16 or fp32."}
    )
    save_steps: int = field(default=200, metadata={"help": "Save a resumable checkpoint every N optimizer steps."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept; older ones are deleted."})
    eval_steps: int = field(default=0, metadata={"help": "Validation loss every N steps; 0: only at the end."})
    logging_steps: int = field(default=10, metadata={"help": "Log the training loss every N steps."})
    sample_steps: int = field(default=200, metadata={"help": "Write samples/step-N.md every N steps; 0: never."})
    sample_max_new_tokens: int = field(default=96, metadata={"help": "Length cap of those samples."})
    resume: str = field(
        default="no", metadata={"help": "no; auto (newest complete checkpoint in --out); or a checkpoint directory."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of the block order, dropout and the samples."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for memory."})


class TimeBudgetCallback(TrainerCallback):
    """Stops training, with a checkpoint, once `minutes` of wall-clock time have passed."""

    def __init__(self, minutes: float) -> None:
        self.seconds = minutes * 60
        self.start = time.monotonic()

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: object
    ) -> None:
        self.start = time.monotonic()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: object
    ) -> TrainerControl:
        if self.seconds > 0 and time.monotonic() - self.start >= self.seconds:
            logger.info("time budget of %.1f minutes spent at step %d; saving and stopping",
                        self.seconds / 60, state.global_step)
            control.should_save = True
            control.should_training_stop = True
        return control


def main(argv: list[str] | None = None, callbacks: list[TrainerCallback] | None = None) -> Path:
    """Train; returns the final directory. `callbacks` are extra Trainer callbacks (tests use them)."""
    parser = HfArgumentParser(TrainArguments, prog="python -m training train")
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    train_records = load_split(args.data, "train")
    genres = sorted({r["genre"] for r in train_records})
    # A genre seen only in validation gets no token: the model could not have learned it.
    validation_records = [r for r in load_split(args.data, "validation") if r["genre"] in genres]
    resume_from = _resume_point(args, _data_sha256(args.data))
    set_seed(args.seed)
    model, tokenizer = load_model(args.base)
    add_genre_tokens(model, tokenizer, genres)
    train_blocks = build_blocks(tokenizer, train_records, args.block_size, args.seed)
    eval_blocks = build_blocks(tokenizer, validation_records, args.block_size, args.seed) or None
    trainer = AtomicCheckpointTrainer(
        model=model, args=_training_arguments(args, eval_blocks is not None), data_collator=default_data_collator,
        train_dataset=train_blocks, eval_dataset=eval_blocks, processing_class=tokenizer,
        callbacks=[
            TimeBudgetCallback(args.max_minutes),
            SampleCallback(tokenizer, genres, args.out / "samples", args.sample_steps,
                           args.sample_max_new_tokens, args.seed),
            *(callbacks or []),
        ],
    )
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if eval_blocks is not None:
        trainer.evaluate()
    return _save_final(trainer, args, genres)


def _resume_point(args: TrainArguments, data_sha256: str) -> Path | None:
    """Where to resume from, after checking the run directory was started with matching flags."""
    config = {**{k: str(v) for k, v in asdict(args).items()}, "data_sha256": data_sha256}
    config_path = args.out / RUN_CONFIG
    if args.resume == "no":
        if latest_checkpoint(args.out):
            raise TrainingError(f"--out {args.out} already has checkpoints; pass --resume auto to continue "
                                "from the newest, or choose a new --out")
        checkpoint = None
    else:
        checkpoint = latest_checkpoint(args.out) if args.resume == "auto" else Path(args.resume)
        if checkpoint is not None and not (checkpoint / "trainer_state.json").is_file():
            raise TrainingError(f"--resume {args.resume}: {checkpoint} is not a checkpoint directory")
        if checkpoint is not None and config_path.is_file():
            _check_same_run(json.loads(config_path.read_text()), config, args.out)
    if checkpoint is None:
        logger.info("starting a new run in %s", args.out)
    else:
        logger.info("resuming from %s", checkpoint)
    if _is_main_process():
        discard_partial(args.out)
        args.out.mkdir(parents=True, exist_ok=True)
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    return checkpoint


def _check_same_run(saved: dict, current: dict, out: Path) -> None:
    changed = [k for k in _RESUME_MUST_MATCH if saved.get(k) != current.get(k)]
    if changed:
        details = ", ".join(
            f"--{k} was {saved.get(k)!r}, now {current.get(k)!r}" if k != "data_sha256"
            else "--data: its train.jsonl changed" for k in changed
        )
        raise TrainingError(f"--resume: {out} was started differently ({details}); "
                            "pass the original values or choose a new --out")


def _data_sha256(data_dir: Path) -> str:
    return hashlib.sha256((data_dir / "train.jsonl").read_bytes()).hexdigest()


def _is_main_process() -> bool:
    # Read from the launcher's environment: the process group does not exist yet when this runs.
    return int(os.environ.get("RANK", "0")) == 0


def _training_arguments(args: TrainArguments, has_eval: bool) -> TrainingArguments:
    bf16, fp16 = _precision(args.precision)
    eval_strategy = "steps" if has_eval and args.eval_steps > 0 else "no"
    return TrainingArguments(
        output_dir=str(args.out), per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, num_train_epochs=args.epochs,
        max_steps=args.max_steps, bf16=bf16, fp16=fp16, save_strategy="steps", save_steps=args.save_steps,
        save_total_limit=args.save_total_limit, eval_strategy=eval_strategy,
        eval_steps=args.eval_steps if args.eval_steps > 0 else None, logging_steps=args.logging_steps,
        logging_first_step=True, seed=args.seed, report_to="none",
        activation_checkpointing=args.gradient_checkpointing, dataloader_pin_memory=torch.cuda.is_available(),
    )


def _precision(choice: str) -> tuple[bool, bool]:
    """(bf16, fp16) for TrainingArguments; mixed precision only where a GPU supports it."""
    if choice not in ("auto", "bf16", "fp16", "fp32"):
        raise TrainingError(f"--precision {choice}: use auto, bf16, fp16 or fp32")
    cuda = torch.cuda.is_available()
    if choice in ("bf16", "fp16") and not cuda:
        raise TrainingError(f"--precision {choice} needs a GPU; use --precision fp32 (or auto) on CPU")
    if choice == "auto":
        choice = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    return choice == "bf16", choice == "fp16"


def _save_final(trainer: AtomicCheckpointTrainer, args: TrainArguments, genres: list[str]) -> Path:
    """runs/<name>/final: what STORYGEN_MODEL points at. Written aside and renamed, like checkpoints."""
    final, staged = args.out / "final", args.out / STAGING / "final"
    trainer.model.config.use_cache = True  # Trainer turned it off for training; generation wants it
    trainer.save_model(str(staged))  # model and, as processing_class, the tokenizer
    if trainer.args.should_save:
        write_metadata(staged, genres, args.base, trainer.state.log_history)
        publish(staged, final)
    trainer.accelerator.wait_for_everyone()
    return final
