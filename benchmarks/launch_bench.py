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

It also counts the times a step would make the host wait for a GPU (DeviceWaits): reading a
value back, or copying a list over from pageable memory. One is needed, to read the tokens the step
sampled; a row that leaves costs one more. Each other wait stops the host queuing the step's work
until the GPU has caught up, and the GPU then idles while the host queues the rest.

Prints `name: value` lines: per step, at each N, `ops_eager_N` (of which `ops_forward_eager_N`
are the forward), `ops_graphed_N`, `launch_ratio_N`, eager over graphed, and `waits_eager_N` and
`waits_graphed_N`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import traceback
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import with_model  # noqa: E402
from storygen import model_thread, transfer  # noqa: E402
from storygen.config import StorygenConfig  # noqa: E402
from storygen.engine import Engine, Sequence  # noqa: E402
from storygen.genres import get_genre  # noqa: E402
from storygen.logs import quiet_libraries  # noqa: E402
from storygen.model import LoadedModel, load_model  # noqa: E402
from storygen.prompts import build_prompt  # noqa: E402
from storygen.sampling import SamplingParams  # noqa: E402

STEPS = 3  # steps whose operations are counted at each N, after two that are not
WAIT_STEPS = 32  # steps whose waits are counted after those: long enough for stories to end and rows to leave
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


class DeviceWaits(TorchDispatchMode):
    """Counts, on any device, the operations that would make the host wait for a GPU:

    - reads of device values: `.tolist()`, `.item()`/`int()`/`bool()` (`_local_scalar_dense`),
      `nonzero` and indexing with a boolean mask (both must count their result first);
    - a Python list made a device tensor by plain `torch.tensor(..., device=...)`, a copy from pageable
      memory that waits for the device (storygen/transfer.py). Made by `transfer.to_device`, it is queued
      instead, and scalars (`x[i] = 0`) are filled on the device; neither counts.

    `where` names the last storygen line of each.
    """

    READS = {"aten.nonzero.default", "aten.nonzero_numpy.default", "aten._local_scalar_dense.default",
             "aten.masked_select.default"}

    def __init__(self) -> None:
        super().__init__()
        self.where: list[str] = []

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(tensor):
            counter._note()
            return counter._tolist(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if name in self.READS or (name.startswith("aten.index") and _has_mask(args)):
            self._note()
        elif name == "aten.lift_fresh.default" and out.dim() > 0 and not _inside(transfer.to_device):
            self._note()
        return out

    def _note(self) -> None:
        frames = [f for f in traceback.extract_stack() if f"{os.sep}storygen{os.sep}" in f.filename]
        self.where.append(f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?")


def _has_mask(args) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def _inside(function) -> bool:
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code is function.__code__:
            return True
        frame = frame.f_back
    return False


def count(lm: LoadedModel, n: int, static: bool, prompts: list[list[int]]) -> tuple[float, float, float]:
    """(operations per step, of which in the scope: the forward eagerly, the graph's static step with graphs;
    waits for the device per step)."""
    engine = Engine(lm, n, static_decode=static)
    engine.sparse_penalty = False  # as on a GPU (sampling.penalise)
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
    waits = DeviceWaits()
    for _ in range(WAIT_STEPS):
        fill()
        with waits:
            engine.step()
    return statistics.mean(totals), statistics.mean(scoped), len(waits.where) / WAIT_STEPS


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
            eager, forward, waits_eager = model_thread.call(count, lm, n, False, prompts)
            graphed, inside, waits_graphed = model_thread.call(count, lm, n, True, prompts)
            print(f"ops_eager_{n}: {eager:.0f}")
            print(f"ops_forward_eager_{n}: {forward:.0f}")
            print(f"ops_graphed_{n}: {graphed - inside + 1:.0f} (the static step's {inside:.0f} in one replay)")
            print(f"launch_ratio_{n}: {eager / (graphed - inside + 1):.1f}")
            print(f"waits_eager_{n}: {waits_eager:.1f}")
            print(f"waits_graphed_{n}: {waits_graphed:.1f}")


if __name__ == "__main__":
    main()
