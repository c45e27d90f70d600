"""Time to first token of the first story of each genre after a restart, with the genres' framings
computed ahead while the worker is idle (STORYGEN_WARM_PREFIXES, the default) and without.

    python benchmarks/first_story_bench.py                 # the default model: the real figure
    python benchmarks/first_story_bench.py --model tiny    # a CI-sized smoke run

Each round starts a fresh worker twice on the one loaded model, alternating which goes first:
A without the warm-up, B with it, after it has finished (a first user seldom comes within the
second it takes). Then one story of each genre, one at a time, as each genre's first user would
send it, at the default length, so its prompt starts with the framing B computed ahead; a story
is cancelled at its first token. Fresh openings from the dev plots each round. The last line is
the ratio of A's median time to first token to B's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import warmed, with_model  # noqa: E402
from benchmarks.worker_bench import openings  # noqa: E402
from storygen import model_thread  # noqa: E402
from storygen.config import StorygenConfig  # noqa: E402
from storygen.logs import quiet_libraries  # noqa: E402
from storygen.model import LoadedModel, load_model  # noqa: E402
from storygen.stories import StoryRequest  # noqa: E402
from storygen.worker import Worker  # noqa: E402


async def first_tokens(lm: LoadedModel, config: StorygenConfig, requests: list[StoryRequest]) -> tuple[list[float], float]:
    """Each request's time to first token on a fresh worker, one at a time, and how long the worker
    took to compute the framings ahead (0 without the warm-up)."""
    ttfts = []
    async with Worker(lm, config) as worker:
        started = time.perf_counter()
        await warmed(worker)
        warm_up = time.perf_counter() - started if config.warm_prefixes else 0.0
        for request in requests:
            sent = time.perf_counter()
            handle = await worker.submit(request)
            async for _ in handle:
                ttfts.append(time.perf_counter() - sent)
                break
            handle.cancel()
            try:
                await handle
            except Exception:  # cancelled, as asked
                pass
    return ttfts, warm_up


def main(argv: list[str] | None = None) -> None:
    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="A/B rounds, alternating which goes first")
    parser.add_argument("--model", default="default", help="'default', 'tiny', a directory or a .gguf")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        config = with_model(StorygenConfig.from_env(), args.model, Path(tmp))
        lm = model_thread.call(load_model, config)
        genres = [g.name for g in lm.spec.allowed_genres()]
        print(f"model {lm.name} on {lm.device} ({lm.dtype}), {torch.get_num_threads()} threads; "
              f"{len(genres)} genres, default length {config.defaults.length}, prefix cache {config.prefix_cache_mb} MiB, "
              f"{args.rounds} rounds")
        cold, warm, warm_ups = [], [], []
        for r in range(args.rounds):
            pairs = openings(len(genres), seed=1000 + r)
            requests = [StoryRequest(f"r{r}-{i}", f"api:user{i}", genre, opening, replace(config.defaults, seed=i))
                        for i, (genre, (_, opening)) in enumerate(zip(genres, pairs))]
            result = {}
            for on in ((False, True) if r % 2 == 0 else (True, False)):
                result[on] = asyncio.run(first_tokens(lm, replace(config, warm_prefixes=on), requests))
            cold += result[False][0]
            warm += result[True][0]
            warm_ups.append(result[True][1])
            print(f"round {r + 1}: first token p50 {statistics.median(result[False][0]) * 1000:.0f} ms without "
                  f"the warm-up, {statistics.median(result[True][0]) * 1000:.0f} ms with it "
                  f"(warm-up {result[True][1]:.2f} s)", flush=True)
    print(f"warm_up_s: {statistics.median(warm_ups):.2f}")
    print(f"first_ttft_p50_cold_ms: {statistics.median(cold) * 1000:.0f}")
    print(f"first_ttft_p50_warm_ms: {statistics.median(warm) * 1000:.0f}")
    print(f"first_ttft_ratio: {statistics.median(cold) / statistics.median(warm):.2f}")


if __name__ == "__main__":
    main()
