"""A decode step's layers in one C call (kernels.DecodeLayers) against decoder.py's loop over them;
or, with --compare graphs, the lean step replayed as CUDA graphs (graphs.py) against it run eagerly.

    python benchmarks/step_bench.py                                   # the default model
    python benchmarks/step_bench.py --model tiny --steps 4 --rounds 1  # smoke run
    STORYGEN_LEAN_DECODE=true python benchmarks/step_bench.py --compare graphs --rows 1 16 64  # on a GPU

With --compare graphs the last lines are `graph_speedup_N: X.XX` for each row count, largest first:
the eager step's time over the graphed one's. A graph is recorded in the steps before the timing.
On a CPU there is nothing to record, and the static step runs in plain torch ops where the eager
step has our C kernels: the figures only show that it runs.

The engine's decode steps at 1, 4 and 16 rows, on one model in this one process: the rows are the
worker benchmark's prompts with room for 400 tokens, so none ends during the timing. For each row
count, --rounds rounds alternate the one-call path and the loop (the same arithmetic, bit for bit:
tests/test_decoder.py); the figures are medians. The steps run on the model thread, as the worker's do. The last lines are `step_speedup_16: X.XX` and
`step_speedup_1: X.XX`: the loop's time over the one call's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.worker_bench import load, openings  # noqa: E402
from storygen import model_thread  # noqa: E402
from storygen.engine import Engine, Sequence  # noqa: E402
from storygen.logs import quiet_libraries  # noqa: E402
from storygen.model import LoadedModel  # noqa: E402
from storygen.sampling import SamplingParams  # noqa: E402
from storygen.stories import StoryRequest, prepare  # noqa: E402

ROWS = (1, 4, 16)
PATHS = {"stack": ("one_call", "loop"), "graphs": ("graphs", "eager")}  # --compare: (the new path, the baseline)


def step_ms(lm: LoadedModel, prompts: list[list[int]], rows: int, steps: int, static: bool | None = None) -> float:
    """Milliseconds per engine decode step with `rows` rows, after two steps to settle (and record graphs).
    static: Engine's static_decode (graphs), None for the model's own setting. Each step ends by reading
    its tokens on the host, so a step's time is its device's too."""
    params = SamplingParams(length=400, temperature=0.8, top_p=0.95, top_k=50, repetition_penalty=1.1)
    engine = Engine(lm, rows, static_decode=static)
    engine.start_many([Sequence(f"s{i}", prompts[i % len(prompts)], params) for i in range(rows)])
    for _ in range(2):
        engine.step()
    started = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return (time.perf_counter() - started) / steps * 1000


def main(argv: list[str] | None = None) -> None:
    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="'default', 'tiny', a directory or a .gguf")
    parser.add_argument("--steps", type=int, default=30, help="decode steps timed per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per row count, alternating the two paths")
    parser.add_argument("--compare", choices=tuple(PATHS), default="stack",
                        help="stack: one C call against the loop (a CPU); graphs: CUDA graphs against eager steps")
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS), help="the row counts timed")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        lm, _, config = load(args.model, Path(tmp))
    lean = lm.decoder
    if args.compare == "graphs" and lean is None:
        sys.exit("the lean decode step is off for this model here: CUDA graphs record it (STORYGEN_LEAN_DECODE=true)")
    if args.compare == "stack" and (lean is None or lean._table is None):
        sys.exit("the one-call path is off for this model here: it needs the lean decoder and every layer on our "
                 "int4 or int8 kernels (bf16 on a CPU with AVX-512 BF16 and a C compiler); see the log")
    request = SamplingParams(length=400)
    prompts = [prepare(StoryRequest(f"p{i}", "api:bench", genre, opening, request), lm, config).prompt_ids
               for i, (genre, opening) in enumerate(openings(16))]
    print(f"model {lm.name} on {lm.device} ({lm.dtype}), {torch.get_num_threads()} threads; "
          f"{args.steps} steps a round, medians of {args.rounds} rounds")
    # On the model thread, as the worker runs: decoding on a thread other than the one that loaded the
    # model gives libgomp two teams, and its helpers sleep between regions (storygen/model_thread.py).
    speedups = model_thread.call(compare, lm, prompts, args.steps, args.rounds, args.compare, args.rows)
    if args.compare == "graphs":
        for rows in sorted(speedups, reverse=True):
            print(f"graph_speedup_{rows}: {speedups[rows]:.2f}")
    else:
        print(f"step_speedup_16: {speedups[16]:.2f}")
        print(f"step_speedup_1: {speedups[1]:.2f}")


def compare(lm: LoadedModel, prompts: list[list[int]], steps: int, rounds: int, what: str = "stack",
            row_counts: tuple[int, ...] | list[int] = ROWS) -> dict[int, float]:
    """Each row count's step time on the two paths of `what` (PATHS), printed; the baseline's over the new one's."""
    lean, speedups = lm.decoder, {}
    table = lean._table
    new, baseline = PATHS[what]
    with torch.inference_mode():
        for rows in row_counts:
            times = {new: [], baseline: []}
            for _ in range(rounds):
                for path in times:
                    if what == "stack":
                        lean._table = table if path == new else None
                    try:
                        times[path].append(step_ms(lm, prompts, rows, steps,
                                                   static=path == new if what == "graphs" else None))
                    finally:
                        lean._table = table
            fast, slow = statistics.median(times[new]), statistics.median(times[baseline])
            print(f"step_ms_{new}_{rows}: {fast:.2f}", flush=True)
            print(f"step_ms_{baseline}_{rows}: {slow:.2f}", flush=True)
            speedups[rows] = slow / fast
    return speedups


if __name__ == "__main__":
    main()
