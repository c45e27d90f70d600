"""Is the engine right on this device? Checks for a GPU machine, which CI has not got.

    python benchmarks/device_check.py                    # cuda when there is one, else cpu
    python benchmarks/device_check.py --device cpu       # what CI runs (tests/test_benchmarks.py)

The test suite runs on a CPU; what only a GPU would show (a tensor left on the wrong device, a
kernel that differs, a cap that is not 64) is checked here, on tiny random models built on the
spot, in fp32 (exact comparisons) and in the device's half precision:

- the engine's greedy stories, rows joining and leaving at different times, equal each one's alone;
- the lean forward (decoder.py, STORYGEN_LEAN_DECODE=true) writes the same stories as transformers';
- the prefix cache hits and changes nothing;
- the lean step replayed as CUDA graphs (graphs.py, on by default where the lean step serves a GPU)
  writes the same stories as without them, and graphs were recorded (on a CPU: the static step
  they record, run as it is);
- a decode step waits for the device once, to read the tokens it sampled, and once more when rows
  leave, with and without graphs (on a CPU: the operations that would wait on a GPU, counted);
- in bf16 (fp16 where the GPU lacks bf16) seeded stories are the same twice and every token is real;
- the worker's default cap on this device (64 on a GPU), and it serves more requests than that at once.

One `name: ok` line per check, or `name: FAILED` and why; the last line is `device_check: ok` or
`device_check: FAILED`, and the exit status says the same. benchmarks/gpu_check.sh runs this
first, then worker_bench.py --n 64.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import traceback
import warnings
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.launch_bench import DeviceWaits  # noqa: E402
from storygen import model_thread  # noqa: E402
from storygen.config import StorygenConfig  # noqa: E402
from storygen.engine import Engine, Sequence  # noqa: E402
from storygen.logs import quiet_libraries  # noqa: E402
from storygen.model import LoadedModel, load_model  # noqa: E402
from storygen.sampling import SamplingParams  # noqa: E402
from storygen.stories import StoryRequest  # noqa: E402
from storygen.worker import Worker  # noqa: E402
from tests.tiny import save_tiny_model  # noqa: E402

PROMPTS = [[5, 6, 7], [8] * 9, [10, 11], [12, 13, 14, 15, 16], [3, 4] * 5]


def stories(lm: LoadedModel, params: SamplingParams, engine: Engine | None = None) -> list[list[int]]:
    """Rows joining at different times, so steps run alone, aligned and left-padded; the last row
    waits for a free slot."""
    engine = engine or Engine(lm, 4)
    seqs = [Sequence(f"s{i}", prompt, replace(params, seed=i)) for i, prompt in enumerate(PROMPTS)]
    engine.start(seqs[0])
    engine.step()
    engine.start_many(seqs[1:3])
    engine.step()
    engine.start(seqs[3])
    waiting = [seqs[4]]
    while engine.rows or waiting:
        if waiting and engine.free_slots:
            engine.start(waiting.pop())
        engine.step()
    return [seq.generated for seq in seqs]


def alone(lm: LoadedModel, prompt: list[int], params: SamplingParams) -> list[int]:
    """One story with the batch to itself."""
    engine = Engine(lm, 1)
    seq = Sequence("alone", prompt, params)
    engine.start(seq)
    while not seq.done:
        engine.step()
    return seq.generated


def check_batched_greedy_equals_alone(lms: dict) -> None:
    lm, params = lms["lean"], SamplingParams(length=12, greedy=True)
    got = model_thread.call(stories, lm, params)
    want = [model_thread.call(alone, lm, prompt, replace(params, seed=i)) for i, prompt in enumerate(PROMPTS)]
    assert got == want, f"batched {got} != alone {want}"


def check_lean_forward_matches_transformers(lms: dict) -> None:
    for params in (SamplingParams(length=14, greedy=True), SamplingParams(length=14, temperature=0.9, top_k=20)):
        ours = model_thread.call(stories, lms["lean"], params)
        theirs = model_thread.call(stories, lms["transformers"], params)
        assert ours == theirs, f"{params}: lean {ours} != transformers {theirs}"


def check_prefix_cache_changes_nothing(lms: dict) -> None:
    lm, params = lms["lean"], SamplingParams(length=10, greedy=True)
    want = model_thread.call(stories, lm, params)
    engine = Engine(lm, 4, prefix_cache_bytes=2**20)
    first = model_thread.call(stories, lm, params, engine)
    again = model_thread.call(stories, lm, params, engine)
    assert first == again == want, f"with the prefix cache {first}, {again} != {want}"
    assert engine.prefix_cache.hits > 0, "the prefix cache never hit"


def check_cuda_graphs_change_nothing(lms: dict) -> None:
    lm, params = lms["lean"], SamplingParams(length=14, greedy=True)
    graphed = Engine(lm, 4, static_decode=True)
    got = model_thread.call(stories, lm, params, graphed)
    want = model_thread.call(stories, lm, params, Engine(lm, 4, static_decode=False))
    assert got == want, f"with CUDA graphs {got} != without {want}"
    if lm.device.type == "cuda":
        runner = graphed._graphs
        assert lm.cuda_graphs, "STORYGEN_CUDA_GRAPHS=auto left the lean step on this GPU without graphs"
        assert runner.record and runner.captures > 0, f"no graph replayed (record {runner.record}, {runner.captures})"


def waits_per_step(lm: LoadedModel, static: bool) -> list[tuple[int, int]]:
    """(waits for the device, rows that left) at each step of a batch of 4 after the first 3. On a
    GPU the waits are what torch's sync debug mode reports; elsewhere launch_bench.DeviceWaits counts the
    operations that would wait on a GPU. Steps that recorded a CUDA graph are left out (recording waits)."""
    engine = Engine(lm, 4, static_decode=static)
    engine.sparse_penalty = False  # as on a GPU, on any device
    for i, prompt in enumerate(PROMPTS[:4]):
        # Lengths 6 to 21: rows leave at steps 5, 10 and 15 (one left for one wait more), unless they stop sooner.
        engine.start(Sequence(f"w{i}", prompt, SamplingParams(length=6 + 5 * i, temperature=0.9, top_k=20, seed=i)))
    counted = []
    for step in range(18):
        captures = engine._graphs.captures if engine._graphs is not None else 0
        rows = len(engine.rows)
        if lm.device.type == "cuda":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    engine.step()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            waits = sum("synchroniz" in str(w.message) for w in caught)
        else:
            counter = DeviceWaits()
            with counter:
                engine.step()
            waits = len(counter.where)
        recorded = engine._graphs is not None and engine._graphs.captures != captures
        if step >= 3 and not recorded:
            counted.append((waits, rows - len(engine.rows)))
    return counted


def check_a_decode_step_waits_for_the_device_once(lms: dict) -> None:
    for static in (False, True):
        counted = model_thread.call(waits_per_step, lms["lean"], static)
        # One wait to read the sampled tokens, and one more when rows leave (the mask's columns).
        extra = [(waits, left) for waits, left in counted if waits > 1 + (left > 0)]
        assert counted and not extra, f"static_decode={static}: (waits, rows that left) {extra} of {counted}"


def check_half_precision_is_seeded_and_sane(lms: dict) -> None:
    lm = lms["half"]
    params = SamplingParams(length=16, temperature=0.9, top_k=40)
    first, second = (model_thread.call(stories, lm, params) for _ in range(2))
    assert first == second, f"{lm.dtype}: the same seeds wrote {first} then {second}"
    assert all(0 <= t < lm.vocab_size for story in first for t in story) and any(first)


def check_worker_cap_and_a_crowd(lms: dict, config: StorygenConfig) -> None:
    lm = lms["half"]
    want = 64 if lm.device.type == "cuda" else 16

    async def crowd() -> tuple[int, list]:
        cfg = replace(config, max_batch=0, max_per_user=200, max_queue=200)
        async with Worker(lm, cfg) as worker:
            requests = [StoryRequest(f"c{i}", f"api:u{i}", "drama", "Once", SamplingParams(length=8, seed=i))
                        for i in range(want + 6)]
            handles = [await worker.submit(r) for r in requests]
            return worker.capacity, await asyncio.gather(*handles)

    capacity, done = asyncio.run(crowd())
    assert capacity == want, f"the worker's cap on {lm.device.type} is {capacity}, not {want}"
    assert len(done) == want + 6 and all(s.new_tokens > 0 for s in done)


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    half = "bfloat16" if device.type != "cuda" or torch.cuda.is_bf16_supported() else "float16"
    with tempfile.TemporaryDirectory() as tmp:
        directory = save_tiny_model(Path(tmp) / "tiny", "instruct")
        config = replace(StorygenConfig(), model=str(directory), model_format="instruct", device=args.device,
                         cache_dir=Path(tmp) / "cache", settings_db=Path(tmp) / "settings.sqlite3")
        lms = {"lean": load_model(replace(config, dtype="float32", lean_decode="true")),
               "transformers": load_model(replace(config, dtype="float32", lean_decode="false")),
               "half": load_model(replace(config, dtype=half, lean_decode="true"))}
        print(f"# device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
              f"torch {torch.__version__}, half precision {half}")
        checks = [check_batched_greedy_equals_alone, check_lean_forward_matches_transformers,
                  check_prefix_cache_changes_nothing, check_cuda_graphs_change_nothing,
                  check_a_decode_step_waits_for_the_device_once,
                  check_half_precision_is_seeded_and_sane,
                  lambda lms: check_worker_cap_and_a_crowd(lms, config)]
        names = [c.__name__.removeprefix("check_") if hasattr(c, "__name__") and c.__name__ != "<lambda>"
                 else "worker_cap_and_a_crowd" for c in checks]
        failed = 0
        for name, check in zip(names, checks):
            try:
                check(lms)
                print(f"{name}: ok", flush=True)
            except Exception as error:  # one failing check must not hide the others
                failed += 1
                print(f"{name}: FAILED ({type(error).__name__}: {error})", flush=True)
                traceback.print_exc(file=sys.stderr)
    print(f"device_check: {'FAILED' if failed else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
