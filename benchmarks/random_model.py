"""A model directory shaped like STORYGEN_MODEL, with random weights: for speed runs where the weights can't go.

    python benchmarks/random_model.py skeleton .gpu/model    # here: the model's config and tokenizer, no weights
    python benchmarks/random_model.py weights /tmp/model      # there: seeded random weights for that skeleton

A GPU machine lent for a device run (benchmarks/gpu_check.sh) reaches no network and takes 64 MiB
along at most; the default model's GGUF is 98 MB. A forward pass costs the same whatever the
weights' values, so the speed figures of a model of the same architecture, vocabulary and
tokenizer with random weights are the default model's. What differs: such a model seldom writes
an end-of-story token, so its stories run to their length (in the baseline and in the worker alike).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storygen.config import StorygenConfig  # noqa: E402
from storygen.logs import quiet_libraries  # noqa: E402


def skeleton(out: Path) -> None:
    """STORYGEN_MODEL's config, generation config and tokenizer (chat template included) into `out`."""
    from storygen.model import load_model

    lm = load_model(StorygenConfig.from_env())
    out.mkdir(parents=True, exist_ok=True)
    lm.model.config.save_pretrained(out)
    lm.model.generation_config.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    print(f"skeleton of {lm.name} ({lm.spec.format} format): {out}")


def weights(directory: Path, seed: int) -> None:
    """Random weights for the skeleton in `directory`, as the architecture initialises them (seeded), in bf16."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    print(f"random weights ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters): {directory}")


def main(argv: list[str] | None = None) -> None:
    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("skeleton", "weights"))
    parser.add_argument("directory", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    skeleton(args.directory) if args.step == "skeleton" else weights(args.directory, args.seed)


if __name__ == "__main__":
    main()
