"""Worker throughput against one-at-a-time `generate`, on the same model and prompts.

    python benchmarks/worker_bench.py                 # the default model: the real figure
    python benchmarks/worker_bench.py --model tiny    # a CI-sized smoke run

A: the naive baseline, each request alone through `model.generate` with the same
sampling settings, in fp32 as the seeds ran it (the same model object when the worker's
is fp32, else an fp32 copy loaded the same way). B: the worker, fed the same N requests
at once, in STORYGEN_DTYPE. A and B alternate for --rounds rounds in this one process;
the last line is the median ratio of B's tokens/s to A's.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import DynamicCache

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storygen import model_thread  # noqa: E402
from benchmarks.common import warmed, with_model  # noqa: E402
from storygen.config import StorygenConfig  # noqa: E402
from storygen.logs import quiet_libraries  # noqa: E402
from storygen.engine import Engine, Sequence  # noqa: E402
from storygen.kvcache import cache_argument  # noqa: E402
from storygen.model import LoadedModel, load_model  # noqa: E402
from storygen.sampling import SamplingParams  # noqa: E402
from storygen.stories import StoryRequest, prepare  # noqa: E402
from storygen.worker import Worker  # noqa: E402

DEV_PLOTS = ROOT.parent / "shared" / "data" / "genre_plots_dev.txt"
FALLBACK = ["After discovering time travel,", "The door at the end of the hall", "A magic castle stood",
            "The detective looked at the clue and", "Nobody expected the goat to", "When the ship landed on Mars,"]


def openings(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(genre, opening) pairs: seeded picks from the dev plots, cut to different lengths."""
    rng = random.Random(seed)
    if DEV_PLOTS.is_file():
        rows = [line.split(" ", 2) for line in DEV_PLOTS.read_text(encoding="utf-8").splitlines()]
        picks = rng.sample(rows, n)
        return [(tag.strip("<>"), " ".join(text.split()[: rng.randint(8, 40)])) for _, tag, text in picks]
    return [("auto", FALLBACK[i % len(FALLBACK)]) for i in range(n)]


def load(model: str, tmp: Path) -> tuple[LoadedModel, LoadedModel, StorygenConfig]:
    """The worker's model, the baseline's fp32 model (the same one when the worker's is fp32), the config."""
    config = with_model(StorygenConfig.from_env(), model, tmp)
    lm = model_thread.call(load_model, config)
    if lm.dtype == torch.float32:
        return lm, lm, config
    return lm, model_thread.call(load_model, replace(config, dtype="float32")), config


def run_baseline(lm: LoadedModel, prepared: list, params: SamplingParams) -> tuple[int, float]:
    """A: one request at a time through generate()."""
    tokens, started = 0, time.perf_counter()
    for i, p in enumerate(prepared):
        ids = torch.tensor([p.prompt_ids], device=lm.device)
        torch.manual_seed(i)
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=params.length,
                                do_sample=True, temperature=params.temperature, top_p=params.top_p,
                                top_k=params.top_k, repetition_penalty=params.repetition_penalty,
                                eos_token_id=sorted(lm.stop_ids), pad_token_id=lm.pad_id)
        tokens += out.shape[1] - ids.shape[1]
    return tokens, time.perf_counter() - started


async def run_worker(worker: Worker, requests: list[StoryRequest]) -> tuple[int, float, list]:
    """B: all requests at once through the worker."""
    started = time.perf_counter()
    handles = [await worker.submit(r) for r in requests]
    stories = await asyncio.gather(*handles)
    elapsed = time.perf_counter() - started
    return sum(s.new_tokens for s in stories), elapsed, stories


async def fairness(worker: Worker, params: SamplingParams, flood: int) -> tuple[float, float]:
    """X floods, then Y sends one: Y's wait in service times and in slot turnovers."""
    pairs = openings(flood + 1, seed=99)
    x = [await worker.submit(StoryRequest(f"x{i}", "api:x", g, o, replace(params, seed=i)))
         for i, (g, o) in enumerate(pairs[:flood])]
    await asyncio.sleep(0)
    y = await worker.submit(StoryRequest("y", "api:y", pairs[-1][0], pairs[-1][1], params))
    y_story, *x_stories = await asyncio.gather(y, *x)
    service = statistics.mean(s.timings["total_s"] - s.timings["ttft_s"] for s in x_stories)
    wait = y_story.timings["queued_s"]
    turnover = service / worker.engine.max_batch
    return wait / service, wait / turnover


def step_overhead(lm: LoadedModel, prompt_ids: list[int], steps: int = 48) -> float:
    """Worker decode step at batch 1 against a bare forward pass with the KV cache."""
    with torch.inference_mode():
        ids = torch.tensor([prompt_ids], device=lm.device)
        cache = {cache_argument(lm.model): DynamicCache(config=lm.model.config)}
        out = lm.model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        started = time.perf_counter()
        for _ in range(steps):
            out = lm.model(input_ids=token, use_cache=True, **cache)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        bare = time.perf_counter() - started
    engine = Engine(lm, 1)
    # Stop tokens are not suppressed; a row that ends early would make the engine look cheap, so re-start it.
    params = SamplingParams(length=steps + 1, temperature=0.8, top_p=0.95, top_k=50, repetition_penalty=1.1, seed=1)
    done, started = 0, time.perf_counter()
    while done < steps:
        seq = Sequence(f"s{done}", prompt_ids, params)
        first = time.perf_counter()
        engine.start(seq)
        started += time.perf_counter() - first  # the prefill is not a decode step
        while not seq.done and done < steps:
            engine.step()
            done += 1
        engine.abort_all()
    return (time.perf_counter() - started) / bare


def main(argv: list[str] | None = None) -> None:
    quiet_libraries()  # no progress bars or library warnings between the figures
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16, help="concurrent requests per round")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--rounds", type=int, default=3, help="A/B rounds, alternating")
    parser.add_argument("--model", default="default", help="'default', 'tiny', a directory or a .gguf")
    parser.add_argument("--flood", type=int, default=20, help="requests user X floods in the fairness scenario")
    parser.add_argument("--baseline-requests", type=int, default=0,
                        help="time A on the first K of the N requests only (its rate is per request, one at a "
                             "time; on a GPU 64 take minutes); 0: all")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        lm, baseline, config = load(args.model, Path(tmp))
        config = replace(config, max_per_user=max(args.n, args.flood) + 1, max_queue=max(64, args.n + args.flood + 1),
                         max_batch=config.max_batch or max(args.n, 1))
        params = SamplingParams(length=args.new_tokens, temperature=0.8, top_p=0.95, top_k=50, repetition_penalty=1.1)
        pairs = openings(args.n)
        print(f"model {lm.name} on {lm.device} ({lm.dtype}), {torch.get_num_threads()} threads; "
              f"N={args.n}, {args.new_tokens} new tokens, {args.rounds} rounds, worker slots {config.max_batch}; "
              f"baseline generate() in {baseline.dtype}; decode step: "
              f"{'lean' if lm.decoder is not None else 'transformers'}{', CUDA graphs' if lm.cuda_graphs else ''}")
        asyncio.run(_rounds(lm, baseline, config, params, pairs, args))


async def _rounds(lm: LoadedModel, baseline: LoadedModel, config: StorygenConfig, params: SamplingParams,
                  pairs: list, args) -> None:
    ratios, ttfts = [], []
    for r in range(args.rounds):
        requests = [StoryRequest(f"r{r}-{i}", f"api:user{i}", g, o, replace(params, seed=i))
                    for i, (g, o) in enumerate(pairs)]
        prepared = [prepare(q, lm, config) for q in requests]
        # All torch work runs on the model thread, as in the bot; so A's generate() does too, and
        # the worker, which holds that thread while it runs, is started after A is done.
        a_tokens, a_time = model_thread.call(run_baseline, baseline, prepared[:args.baseline_requests or None], params)
        async with Worker(lm, config) as worker:
            b_tokens, b_time, stories = await run_worker(worker, requests)
        ttfts += [s.timings["ttft_s"] for s in stories]
        a_rate, b_rate = a_tokens / a_time, b_tokens / b_time
        ratios.append(b_rate / a_rate)
        print(f"round {r + 1}: generate one at a time {a_rate:7.1f} tok/s ({a_tokens} tokens) | "
              f"worker {b_rate:7.1f} tok/s ({b_tokens} tokens) | ratio {b_rate / a_rate:.2f}", flush=True)
    ttfts.sort()
    print(f"worker TTFT p50 {ttfts[len(ttfts) // 2]:.2f} s, p95 {ttfts[int(0.95 * (len(ttfts) - 1))]:.2f} s")
    async with Worker(lm, config) as worker:  # just started: the genres' framings are being computed
        in_service, in_turnovers = await fairness(worker, params, args.flood)
    print(f"fairness: X floods {args.flood}, then Y sends 1: Y waited {in_service:.2f} service times "
          f"= {in_turnovers:.2f} slot turnovers")
    async with Worker(lm, config) as worker:  # up for a while: they are in the prefix cache
        await warmed(worker)
        in_service, in_turnovers = await fairness(worker, params, args.flood)
    print(f"fairness_warm: the same once the framings are computed ahead: {in_service:.2f} service times "
          f"= {in_turnovers:.2f} slot turnovers")
    overhead = model_thread.call(step_overhead, lm, prepare(StoryRequest("o", "api:o", pairs[0][0], pairs[0][1], params), lm,
                                         config).prompt_ids)
    print(f"batch-1 decode step vs bare forward with KV cache: {overhead:.2f}x")
    print(f"throughput_ratio: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
