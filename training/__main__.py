"""`python -m training {prepare,train,evaluate} ...`: dispatch to a subcommand and configure logging."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from training.errors import TrainingError

logger = logging.getLogger(__name__)

USAGE = """usage: python -m training {prepare,train,evaluate} [--help] [options]

  prepare   read a CSV/txt/jsonl of stories, dedupe, split, write a prepared directory with stats
  train     fine-tune a causal LM with genre control tokens on a prepared directory
  evaluate  compare a fine-tuned model with its base model; writes report.md and plots
"""


def _commands() -> dict[str, Callable[[list[str]], object]]:
    # Imported lazily so that `prepare --help` does not pay for importing torch.
    def prepare(argv: list[str]) -> object:
        from training.prepare import main
        return main(argv)

    def train(argv: list[str]) -> object:
        from training.train import main
        return main(argv)

    def evaluate(argv: list[str]) -> object:
        from training.evaluate import main
        return main(argv)

    return {"prepare": prepare, "train": train, "evaluate": evaluate}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] not in commands:
        print(f"unknown command '{argv[0]}'\n\n{USAGE}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        commands[argv[0]](argv[1:])
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
