"""How many device operations an engine decode step makes: the lean step as it is, against it
replayed as a CUDA graph (storygen/graphs.py). A count, not a time: it holds on any machine.

    python benchmarks/launch_bench.py               # the default model, 64 and 1 rows
    python benchmarks/launch_bench.py --n 16 --model /path/to/model

On a GPU a small model's decode step is bound by launching kernels: each torch operation on the
device is one launch (a few microseconds of Python and driver time), and SmolLM2-135M's step is
microseconds of arithmetic per launch. This loads the model as a GPU runs it (the lean step in
plain torch ops, bf16, none of our CPU kernels or int4/int8 copies) on this CPU, runs engine
steps at N rows, and counts the torch operations each makes, views left out (they launch
nothing). With graphs, what the static step does inside the graph is one replay; the count is
everything else (the inputs copied into the graph's buffers, the sampling) plus that one.

Prints `name: value` lines: per step, at each N, `ops_eager_N` (of which `ops_forward_eager_N`
are the forward), `ops_graphed_N`, and `launch_ratio_N`, eager over graphed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import with_model  # noqa: E402
from storygen import model_thread  # noqa: E402
from storygen.config import StorygenConfig  # noqa: E402
from storygen.engine import Engine, Sequence  # noqa: E402
from storygen.genres import get_genre  # noqa: E402
from storygen.logs import quiet_libraries  # noqa: E402
from storygen.model import LoadedModel, load_model  # noqa: E402
from storygen.prompts import build_prompt  # noqa: E402
from storygen.sampling import SamplingParams  # noqa: E402

STEPS = 3  # steps counted at each N, after two that are not
OPENINGS = [("drama", "Once upon a time, in a kingdom far away, there lived a curious girl who"),
            ("sci_fi", "After discovering time travel, the scientist"),
            ("thriller", "The detective opened the door of the old lighthouse and saw that the lamp had been"),
            ("horror", "Nobody in the village believed the boy when he said")]


class OpCount(TorchDispatchMode):
    """Counts the torch operations that reach a kernel (views left out), and those made inside `scope`."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.inside = 0
        self.scoped = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops += 1
            self.inside += self.scoped
        return func(*args, **(kwargs or {}))

    def scope(self, fn):
        def counted(*args, **kwargs):
            self.scoped = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.scoped = False
        return counted


def count(lm: LoadedModel, n: int, static: bool, prompts: list[list[int]]) -> tuple[float, float]:
    """(operations per step, of which in the scope: the forward eagerly, the graph's static step with graphs)."""
    engine = Engine(lm, n, static_decode=static)
    params = SamplingParams(length=64, temperature=0.8, top_p=0.95, top_k=50, repetition_penalty=1.1)
    started = 0

    def fill() -> None:  # every counted step runs n rows: a story that ended is replaced first
        nonlocal started
        while len(engine.rows) < n:
            engine.start(Sequence(f"s{started}", prompts[started % len(prompts)], replace(params, seed=started)))
            started += 1

    for _ in range(2):
        fill()
        engine.step()
    counter = OpCount()
    if static:
        engine._graphs._run = counter.scope(engine._graphs._run)
    else:
        engine._forward = counter.scope(engine._forward)
    totals, scoped = [], []
    for _ in range(STEPS):
        fill()
        counter.ops = counter.inside = 0
        with counter:
            engine.step()
        totals.append(counter.ops)
        scoped.append(counter.inside)
    return statistics.mean(totals), statistics.mean(scoped)


def main(argv: list[str] | None = None) -> None:
    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="STORYGEN_MODEL (default: the built-in SmolLM2-135M)")
    parser.add_argument("--n", type=int, nargs="+", default=[64, 1], help="rows a step runs")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        config = replace(with_model(StorygenConfig.from_env(), args.model, Path(tmp)), device="cpu",
                         dtype="bfloat16", lean_decode="true", cpu_kernels="false", int8="false", int4="false",
                         onednn="false", decode_attention="false", warm_prefixes=False)
        lm = model_thread.call(load_model, config)
        # The worker's prompts, of different lengths: left-padded batches.
        prompts = [build_prompt(lm.spec, lm.tokenizer, get_genre(genre), text, 64) for genre, text in OPENINGS]
        print(f"model {lm.name} ({lm.model.config.num_hidden_layers} layers) as a GPU runs it, counted on {lm.device}")
        for n in args.n:
            eager, forward = model_thread.call(count, lm, n, False, prompts)
            graphed, inside = model_thread.call(count, lm, n, True, prompts)
            print(f"ops_eager_{n}: {eager:.0f}")
            print(f"ops_forward_eager_{n}: {forward:.0f}")
            print(f"ops_graphed_{n}: {graphed - inside + 1:.0f} (the static step's {inside:.0f} in one replay)")
            print(f"launch_ratio_{n}: {eager / (graphed - inside + 1):.1f}")


if __name__ == "__main__":
    main()
