"""Scale-out by simulation: the worker's fair queue over 1, 2, 4 and 8 remote generation servers.

One 2-core machine cannot hold GPU servers, so each server is a model of one
(benchmarks/simulated_server.py): a fixed number of slots, each streaming tokens at a fixed
rate, on loopback, in a separate process so that this process's CPU time is the router's
alone. A flood of users keeps every slot busy through a RemoteWorker (STORYGEN_BACKEND=openai,
STORYGEN_BACKEND_MAX_INFLIGHT = the slots, so the queue is ours). Reported per server count:

    stories_per_s_<n>        finished stories per second in the measuring window
    ideal_stories_per_s_<n>  n × slots × rate / tokens per story (what the servers could do)
    efficiency_<n>           stories_per_s_<n> / (n × stories_per_s_1)
    router_cpu_us_per_token_<n>  this process's CPU time per streamed token
    lone_start_turnovers_<n> a newcomer's wait for a slot behind the flood, in slot turnovers
                             (1 / stories_per_s: the time between two slots freeing); its wait
                             for first text adds the server's own first-token time
    failover_*               4 servers, one stopped mid-run: stories lost, duplicated, resumed

Last line `scale_efficiency_8: X.XX`. Run on a quiet machine:

    python benchmarks/scale_bench.py            # about 2 minutes
    python benchmarks/scale_bench.py --smoke    # seconds: checks the script works
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import with_model  # noqa: E402
from storygen.config import StorygenConfig  # noqa: E402
from storygen.logs import quiet_libraries  # noqa: E402
from storygen.model import load_tokenizer  # noqa: E402
from storygen.remote.worker import RemoteWorker  # noqa: E402
from storygen.sampling import SamplingParams  # noqa: E402
from storygen.stories import StoryRequest  # noqa: E402

PIECE = " the"  # one token in the default model's tokenizer: a story's token count is exact


class Servers:
    """N simulated servers in a child process."""

    def __init__(self, n: int, slots: int, rate: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks" / "simulated_server.py"), "--servers", str(n), "--slots",
             str(slots), "--rate", str(rate), "--piece", PIECE],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.urls = json.loads(self.process.stdout.readline())

    def stop_one(self, i: int) -> None:
        self.process.stdin.write(f"stop {i}\n")
        self.process.stdin.flush()
        self.process.stdout.readline()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def config_for(base: StorygenConfig, urls: list[str], slots: int) -> StorygenConfig:
    return replace(base, backend="openai", backend_urls=tuple(urls), backend_max_inflight=slots,
                   backend_timeout_s=5.0, max_queue=100_000, max_per_user=2, deadline_s=3600)


class Flood:
    """Users who each keep two stories in hand, resubmitting as each finishes."""

    def __init__(self, worker: RemoteWorker, users: int, tokens: int, story_s: float) -> None:
        self.worker, self.tokens, self.story_s = worker, tokens, story_s
        self.finished: list[tuple[float, object]] = []  # (when, Story or error)
        self.seen: dict[str, int] = {}
        self.running = True
        self._n = 0
        self.tasks = [asyncio.create_task(self._user(u, lane)) for u in range(users) for lane in range(2)]

    def request(self, user: str) -> StoryRequest:
        self._n += 1
        return StoryRequest(f"f{self._n}", user, "sci_fi", f"Ship {self._n} drifted",
                            SamplingParams(length=self.tokens, temperature=1.0))

    async def _user(self, u: int, lane: int) -> None:
        # Start spread over one story's time, as real users do: slots then free one at a time, not in waves.
        await asyncio.sleep(random.uniform(0, self.story_s))
        while self.running:
            handle = await self.worker.submit(self.request(f"flood:{u}"))
            async for _ in handle:
                pass
            try:
                result = await handle
            except Exception as error:  # noqa: BLE001  (counted as lost)
                result = error
            self.seen[handle.request_id] = self.seen.get(handle.request_id, 0) + 1
            self.finished.append((time.monotonic(), result))

    async def stop(self) -> None:
        self.running = False
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def lone_wait(worker: RemoteWorker, tokens: int, i: int) -> tuple[float, float]:
    """(seconds until a newcomer's story has a slot, seconds until its first text)."""
    started = time.monotonic()
    handle = await worker.submit(StoryRequest(f"lone{i}", f"lone:{i}", "drama", "A letter came",
                                              SamplingParams(length=tokens)))
    while handle.request_id not in worker._tasks and not handle.done():  # O(1): `position` walks the queue
        await asyncio.sleep(0.001)
    admitted = time.monotonic() - started
    async for _ in handle:
        break
    first = time.monotonic() - started
    handle.cancel()
    return admitted, first


async def measure(base: StorygenConfig, lm, n: int, args) -> dict[str, float]:
    servers = Servers(n, args.slots, args.rate)
    try:
        worker = RemoteWorker(lm, config_for(base, servers.urls, args.slots))
        await worker.start()
        users = max(1, n * args.slots)  # two stories each: twice the slots, so none ever idles
        flood = Flood(worker, users, args.tokens, args.tokens / args.rate)
        await asyncio.sleep(args.warmup + args.tokens / args.rate)
        cpu0, t0, done0 = time.process_time(), time.monotonic(), len(flood.finished)
        tokens0 = worker.metrics.tokens_total
        waits = []
        for i in range(args.lone):
            await asyncio.sleep(args.window / (args.lone + 1))
            waits.append(await lone_wait(worker, args.tokens, i))
        await asyncio.sleep(max(0.0, t0 + args.window - time.monotonic()))
        cpu, span = time.process_time() - cpu0, time.monotonic() - t0
        stories = len(flood.finished) - done0
        tokens = worker.metrics.tokens_total - tokens0
        await flood.stop()
        await worker.stop()
    finally:
        servers.close()
    rate = stories / span
    admitted = statistics.median(w[0] for w in waits)
    return {"stories_per_s": rate, "cpu_us_per_token": 1e6 * cpu / max(tokens, 1),
            "lone_start_turnovers": admitted * rate, "lone_start_s": admitted,
            "lone_first_text_s": statistics.median(w[1] for w in waits)}


async def failover(base: StorygenConfig, lm, args) -> dict[str, float]:
    servers = Servers(4, args.slots, args.rate)
    try:
        worker = RemoteWorker(lm, config_for(base, servers.urls, args.slots))
        await worker.start()
        flood = Flood(worker, 4 * args.slots, args.tokens, args.tokens / args.rate)
        await asyncio.sleep(args.warmup + args.tokens / args.rate + args.window / 2)
        in_flight = worker.pool.backends[1].inflight
        servers.stop_one(1)  # its streams drop mid-story, as a killed server's do
        await asyncio.sleep(args.window / 2)
        flood.running = False
        await asyncio.wait_for(asyncio.gather(*flood.tasks, return_exceptions=True), 120)  # let them finish
        resumed = re.search(r"^storygen_resumed_total (\S+)$", worker.metrics.to_prometheus(), re.M).group(1)
        await worker.stop()
    finally:
        servers.close()
    stories = [r for _, r in flood.finished if not isinstance(r, Exception)]
    lost = sum(isinstance(r, Exception) for _, r in flood.finished)
    # Every token is one word " the": a story with more words than tokens asked for repeated some, fewer lost some.
    words = [len(s.text[s.text.index("drifted") + 7:].rstrip("…").split()) for s in stories]
    wrong_length = [n for n in words if n != args.tokens]
    duplicated = sum(count - 1 for count in flood.seen.values()) + len(wrong_length)
    return {"stories": len(flood.finished), "in_flight_on_the_dead_one": in_flight, "lost": lost,
            "duplicated": duplicated, "resumed": float(resumed)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", default="1,2,4,8")
    parser.add_argument("--slots", type=int, default=8, help="slots per simulated server")
    parser.add_argument("--rate", type=float, default=40.0, help="tokens per second per slot")
    parser.add_argument("--tokens", type=int, default=48, help="tokens per story")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--window", type=float, default=12.0, help="seconds measured per server count")
    parser.add_argument("--lone", type=int, default=7, help="newcomers timed per server count")
    parser.add_argument("--model", default="default", help="whose tokenizer builds the prompts; 'tiny' for a smoke run")
    parser.add_argument("--smoke", action="store_true", help="a few seconds, to check the script works")
    args = parser.parse_args()
    if args.smoke:
        args.servers, args.slots, args.rate, args.tokens, args.warmup, args.window, args.lone = \
            "1,2", 2, 100.0, 8, 0.5, 2.0, 1
    quiet_libraries()
    tmp = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    base = with_model(StorygenConfig(), args.model, tmp)
    lm = load_tokenizer(base)
    counts = [int(n) for n in args.servers.split(",")]
    print(f"# {args.slots} slots × {args.rate:g} tok/s per server, {args.tokens} tokens per story, "
          f"{args.window:g} s windows")
    results = {}
    for n in counts:
        results[n] = await measure(base, lm, n, args)
        one = results[counts[0]]["stories_per_s"] / counts[0]
        r = results[n]
        print(f"stories_per_s_{n}: {r['stories_per_s']:.2f}")
        print(f"ideal_stories_per_s_{n}: {n * args.slots * args.rate / args.tokens:.2f}")
        print(f"efficiency_{n}: {r['stories_per_s'] / (n * one):.2f}")
        print(f"router_cpu_us_per_token_{n}: {r['cpu_us_per_token']:.0f}")
        print(f"lone_start_s_{n}: {r['lone_start_s']:.3f}")
        print(f"lone_first_text_s_{n}: {r['lone_first_text_s']:.3f}")
        print(f"lone_start_turnovers_{n}: {r['lone_start_turnovers']:.2f}", flush=True)
    fail = await failover(base, lm, args)
    for key, value in fail.items():
        print(f"failover_{key}: {value:g}")
    top = max(counts)
    print(f"scale_efficiency_{top}: {results[top]['stories_per_s'] / (top * results[counts[0]]['stories_per_s'] / counts[0]):.2f}")


if __name__ == "__main__":
    asyncio.run(main())
