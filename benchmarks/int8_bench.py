"""What the int8 and int4 copies of the weights (storygen/int8.py) buy a lone story, and what they cost.

Token by token at batch 1, as a lone story decodes, over the dev plots: the perplexity and the step
time with the copies (STORYGEN_INT8, STORYGEN_INT4) and without, on the same model in one run.

    python benchmarks/int8_bench.py                 # default model, 12 plots × 96 tokens
    python benchmarks/int8_bench.py --model tiny --plots 2 --tokens 12    # smoke run

Last lines `perplexity_ratio: X.XXXX` (with the copies over bf16) and `step_speedup: X.XX`.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.perplexity_bench import plots, token_rows  # noqa: E402
from storygen import model_thread  # noqa: E402
from benchmarks.common import with_model  # noqa: E402
from storygen.config import StorygenConfig  # noqa: E402
from storygen.int8 import SmallBatchLinear  # noqa: E402
from storygen.kvcache import cache_argument, new_cache  # noqa: E402
from storygen.model import load_model  # noqa: E402


def use_int8(model: torch.nn.Module, on: bool) -> None:
    """Switch every SmallBatchLinear to its int8 or int4 copy (on) or its dense layer (off) for any number of rows."""
    for module in model.modules():
        if isinstance(module, SmallBatchLinear):
            module.forward = module.__class__.forward.__get__(module) if on else module.dense.forward


@torch.inference_mode()
def decode_score(lm, rows: list[list[int]]) -> tuple[float, int, float]:
    """(summed NLL, tokens scored, seconds in decode steps), feeding one token at a time."""
    nll, count, seconds = 0.0, 0, 0.0
    name = cache_argument(lm.model)
    for row in rows:
        cache = new_cache(lm.model.config)
        logits = lm.model(input_ids=torch.tensor([row[:1]]), **{name: cache}, use_cache=True).logits
        for position in range(1, len(row)):
            if position > 1:
                nll += float(torch.nn.functional.cross_entropy(logits[0, -1:].float(), torch.tensor([row[position]])))
                count += 1
            started = time.perf_counter()
            logits = lm.model(input_ids=torch.tensor([[row[position]]]), **{name: cache}, use_cache=True).logits
            seconds += time.perf_counter() - started
    return nll, count, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="'default', 'tiny', or a directory")
    parser.add_argument("--plots", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=96)
    args = parser.parse_args()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="int8-bench-"))
    config = with_model(replace(StorygenConfig(), dtype="bfloat16", int8="true"), args.model, tmp)
    lm = model_thread.call(load_model, config)
    wrapped = sum(isinstance(m, SmallBatchLinear) for m in lm.model.modules())
    rows = token_rows(lm, plots(args.plots), args.tokens)
    results = {}
    for label, on in (("bf16", False), ("int8", True), ("bf16_again", False)):
        use_int8(lm.model, on)
        results[label] = model_thread.call(decode_score, lm, rows)
    print(f"# {lm.name}, {wrapped} linear layers with int8 or int4 copies, {len(rows)} plots, token by token at batch 1")
    ppl = {k: math.exp(nll / count) for k, (nll, count, _) in results.items()}
    step = {k: 1000 * s / max(count, 1) for k, (_, count, s) in results.items()}
    print(f"tokens_scored: {results['bf16'][1]}")
    for k in results:
        print(f"perplexity_{k}: {ppl[k]:.4f}")
        print(f"step_ms_{k}: {step[k]:.1f}")
    print(f"perplexity_ratio: {ppl['int8'] / ppl['bf16']:.4f}")
    print(f"step_speedup: {(step['bf16'] + step['bf16_again']) / 2 / step['int8']:.2f}")


if __name__ == "__main__":
    main()
