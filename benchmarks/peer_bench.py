"""Our worker against an OpenAI-compatible peer server (llama.cpp's llama-server) at the same N.

    LLAMA_SERVER=/tmp/llama-server/bin/llama-server python benchmarks/peer_bench.py   # the real figure
    python benchmarks/peer_bench.py --peer-url http://127.0.0.1:8082                  # a server already up
    python benchmarks/peer_bench.py --smoke ...                                         # CI-sized

Ours: storygen's Worker in this process, with the model and config the service loads (from
the environment, as the bot reads it). Peer: a server on loopback, sent the same prompts as
token ids (built by our own `prepare`) on /v1/completions. At each N of --n, rounds alternate
ours, peer, ours, peer…; every round draws fresh openings, so no server ever sees a prompt
twice. Both sides stream, so time to first token is measured at the client, and both write
exactly --tokens tokens (ignore_eos on the peer; on ours stop tokens no longer end a story).
Token counts are what each side reports, so a peer that ignores ignore_eos still gets a fair
rate. The last lines are ours over the peer's tokens/s at N=16 and N=1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

import aiohttp
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storygen import model_thread  # noqa: E402
from benchmarks.common import warmed, with_model  # noqa: E402
from storygen.config import StorygenConfig  # noqa: E402
from storygen.logs import quiet_libraries  # noqa: E402
from storygen.errors import StorygenError  # noqa: E402
from storygen.model import LoadedModel, default_gguf_path, load_model  # noqa: E402
from storygen.stories import StoryRequest, prepare  # noqa: E402
from storygen.worker import Worker  # noqa: E402

DEV_PLOTS = ROOT.parent / "shared" / "data" / "genre_plots_dev.txt"
NO_PEER = ("no peer to compare with: build llama-server (bash ../shared/peers/build-llama-server.sh) and set "
           "LLAMA_SERVER=/tmp/llama-server/bin/llama-server, or pass --peer-url URL of a running server")
WORDS = ("the", "old", "lighthouse", "keeper", "found", "a", "letter", "under", "floor", "of", "her", "kitchen",
         "while", "storm", "rolled", "in", "from", "sea", "and", "nobody", "village", "could", "explain", "why",
         "clocks", "had", "stopped", "at", "midnight", "on", "day", "strangers", "came", "across", "frozen",
         "river", "with", "lanterns")


def openings(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """`count` different (genre, opening) pairs: dev plots cut to 8-40 words, else varied made-up text."""
    rng = random.Random(seed)
    rows: list[tuple[str, str]] = []
    if DEV_PLOTS.is_file():
        for line in DEV_PLOTS.read_text(encoding="utf-8").splitlines():
            parts = line.split(" ", 2)
            if len(parts) == 3:
                rows.append((parts[1].strip("<>"), parts[2]))
        rng.shuffle(rows)
    seen: set[str] = set()
    picks: list[tuple[str, str]] = []
    while len(picks) < count:
        if rows:  # each plot once, then the same plots cut at other lengths
            genre, text = rows[len(picks) % len(rows)]
        else:
            genre, text = "auto", " ".join(rng.choice(WORDS) for _ in range(40)).capitalize()
        opening = " ".join(text.split()[: rng.randint(8, 40)])
        if opening not in seen:
            seen.add(opening)
            picks.append((genre, opening))
        elif len(seen) > 50 * count:
            raise SystemExit(f"cannot draw {count} different openings")
    return picks


@dataclass
class Round:
    """One side's round: tokens written, wall time, and per request TTFT and prompt cache use."""

    tokens: int = 0
    elapsed: float = 0.0
    ttfts: list[float] = field(default_factory=list)
    failures: int = 0
    prompt_tokens: int = 0  # as the peer reported them
    cached_tokens: int = 0  # prompt tokens the peer's cache held
    mismatched: int = 0  # requests whose prompt the peer read at a different length than ours

    @property
    def rate(self) -> float:
        return self.tokens / self.elapsed if self.elapsed else 0.0


@dataclass(frozen=True)
class Item:
    """One prompt, as both sides get it."""

    request: StoryRequest
    prompt_ids: list[int]


def load(model: str, tmp: Path) -> tuple[LoadedModel, StorygenConfig]:
    """The model and config as the service loads them; 'tiny' builds a random one (as worker_bench.py)."""
    config = with_model(StorygenConfig.from_env(), model, tmp)
    return model_thread.call(load_model, config), config


async def run_ours(worker: Worker, items: list[Item]) -> Round:
    """All of a round's requests at once through the worker, each streamed."""
    result = Round()

    async def one(item: Item) -> None:
        sent, first = time.perf_counter(), None
        handle = await worker.submit(item.request)
        async for _ in handle:
            first = first or time.perf_counter()
        if first is not None:
            result.ttfts.append(first - sent)
        try:
            result.tokens += (await handle).new_tokens
        except StorygenError:  # e.g. a story the model ended at once: no tokens
            result.failures += 1

    started = time.perf_counter()
    await asyncio.gather(*(one(item) for item in items))
    result.elapsed = time.perf_counter() - started
    return result


def peer_body(item: Item, model: str, mode: str, no_cache: bool) -> dict:
    """The /v1/completions body. ids: llama-server's and vLLM's fields; text: this project's own server."""
    params = item.request.params
    body = {"model": model, "max_tokens": params.length, "temperature": params.temperature, "top_p": params.top_p,
            "top_k": params.top_k, "seed": params.seed, "stream": True, "stream_options": {"include_usage": True}}
    if mode == "text":  # storybot's /v1/completions: the opening and its genre; no ignore_eos, ids or min_p
        return {**body, "prompt": item.request.prompt, "genre": item.request.genre,
                "repetition_penalty": params.repetition_penalty}
    # llama-server reads repeat_penalty, vLLM repetition_penalty; each ignores the other's. min_p 0 as ours.
    body.update(prompt=[item.prompt_ids], repeat_penalty=params.repetition_penalty,
                repetition_penalty=params.repetition_penalty, min_p=0.0, ignore_eos=True)
    if no_cache:
        body["cache_prompt"] = False
    return body


async def _stream_one(session: aiohttp.ClientSession, url: str, body: dict, item: Item, result: Round) -> None:
    sent, first, chunks, usage = time.perf_counter(), None, 0, None
    async with session.post(url + "/v1/completions", json=body) as response:
        if response.status != 200:
            raise SystemExit(f"the peer refused a request: {response.status} {(await response.text())[:300]}")
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                result.failures += 1
                continue
            if any(c.get("text") for c in event.get("choices", [])):
                chunks += 1
                first = first or time.perf_counter()
            usage = event.get("usage") or usage
    if first is not None:
        result.ttfts.append(first - sent)
    usage = usage or {}
    result.tokens += usage.get("completion_tokens", chunks)
    if "prompt_tokens" in usage:
        result.prompt_tokens += usage["prompt_tokens"]
        result.mismatched += usage["prompt_tokens"] != len(item.prompt_ids)
        result.cached_tokens += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)


async def run_peer(session: aiohttp.ClientSession, url: str, items: list[Item], bodies: list[dict]) -> Round:
    """All of a round's requests at once to the peer, each streamed."""
    result = Round()
    started = time.perf_counter()
    await asyncio.gather(*(_stream_one(session, url, b, i, result) for i, b in zip(items, bodies)))
    result.elapsed = time.perf_counter() - started
    return result


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def llama_server(binary: str, gguf: Path, slots: int, context: int, threads: int) -> Iterator[str]:
    """llama-server on a free loopback port, up once /health says so; stopped on the way out."""
    port = _free_port()
    command = [binary, "-m", str(gguf), "-t", str(threads), "-np", str(slots), "-c", str(context),
               "--no-webui", "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_until_up(server, url, log, command)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _wait_until_up(server: subprocess.Popen, url: str, log: IO[bytes], command: list[str]) -> None:
    deadline = time.monotonic() + 180
    while True:
        if server.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            tail = log.read().decode(errors="replace").splitlines()[-15:]
            raise SystemExit(f"llama-server did not come up ({' '.join(command)}):\n" + "\n".join(tail))
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/health", timeout=2) as response:
            if response.status == 200:  # 503 while it loads the model
                return
        time.sleep(0.2)


def _peer_gguf(args: argparse.Namespace) -> Path:
    if args.peer_gguf:
        return Path(args.peer_gguf)
    if args.model == "default":
        return default_gguf_path()
    if args.model.endswith(".gguf"):
        return Path(args.model)
    raise SystemExit(f"llama-server needs the GGUF of --model {args.model!r}: pass --peer-gguf PATH")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default="1,16,32", help="concurrent requests per round, a comma-separated list")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per side at each N, alternating")
    parser.add_argument("--model", default="default", help="ours: 'default', 'tiny', a directory or a .gguf")
    parser.add_argument("--peer-url", help="an OpenAI-compatible server already running (LLAMA_SERVER is then unused)")
    parser.add_argument("--peer-model", help="the model name to send (default: the first of the peer's /v1/models)")
    parser.add_argument("--peer-gguf", help="the GGUF llama-server loads (default: the one --model was loaded from)")
    parser.add_argument("--peer-threads", type=int, default=torch.get_num_threads(),
                        help="llama-server's -t (default: torch's thread count, which ours uses)")
    parser.add_argument("--peer-prompt", choices=("ids", "text"), default="ids",
                        help="ids: our prompt's token ids, ignore_eos on both sides; text: the opening and "
                             "genre as this project's own /v1/completions takes them, and both sides may stop early")
    parser.add_argument("--peer-no-cache", action="store_true",
                        help="send cache_prompt=false: llama-server then reuses no shared prompt prefix")
    parser.add_argument("--smoke", action="store_true", help="N=1,16, 8 tokens, 1 round: checks the script works")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    quiet_libraries()  # no progress bars or library warnings between the figures
    if args.smoke:
        args.n, args.tokens, args.rounds = "1,16", 8, 1
    ns = sorted({int(n) for n in args.n.split(",")})
    binary = os.environ.get("LLAMA_SERVER")
    if not args.peer_url and not binary:
        raise SystemExit(NO_PEER)
    gguf = None if args.peer_url else _peer_gguf(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the server we started is stopped

    with tempfile.TemporaryDirectory() as tmp:
        lm, config = load(args.model, Path(tmp))
        config = replace(config, max_queue=max(config.max_queue, max(ns) + 1))
        params = replace(config.defaults, length=args.tokens)
        config = replace(config, defaults=params)  # the length the worker computes the genres' framings at
        sizes = [1] + [n for n in ns for _ in range(args.rounds)]  # a warm-up request first
        pairs = iter(openings(sum(sizes)))
        items, serial = [], 0
        for size in sizes:
            batch = []
            for _ in range(size):
                genre, opening = next(pairs)
                request = StoryRequest(f"b{serial}", f"api:bench{serial}", genre, opening, replace(params, seed=serial))
                batch.append(Item(request, prepare(request, lm, config).prompt_ids))
                serial += 1
            items.append(batch)
        with contextlib.ExitStack() as stack:
            if args.peer_url:
                url = args.peer_url.rstrip("/")
            else:
                context = max(ns) * (max(len(i.prompt_ids) for b in items for i in b) + args.tokens + 8)
                url = stack.enter_context(llama_server(binary, gguf, max(ns), context, args.peer_threads))
            asyncio.run(_bench(lm, config, items, ns, url, args))


async def _peer_model(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url + "/v1/models") as response:
        if response.status != 200:
            raise SystemExit(f"{url}/v1/models answered {response.status}: is it an OpenAI-compatible server?")
        return (await response.json())["data"][0]["id"]


async def _bench(lm: LoadedModel, config: StorygenConfig, items: list[list[Item]], ns: list[int], url: str,
                 args: argparse.Namespace) -> None:
    # Both sides write exactly --tokens tokens in ids mode: the peer by ignore_eos, ours by having no stop tokens.
    ours_lm = replace(lm, stop_ids=frozenset()) if args.peer_prompt == "ids" else lm
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with Worker(ours_lm, config) as worker, aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(limit=max(ns) + 1)) as session:
        model = args.peer_model or await _peer_model(session, url)
        print(f"# ours: Worker in-process, model {lm.name} on {lm.device} ({lm.dtype}), {torch.get_num_threads()} "
              f"threads, {worker.engine.max_batch} slots, prefix cache {config.prefix_cache_mb} MiB | peer: {url} "
              f"({model}), prompts as {args.peer_prompt}", flush=True)
        print(f"# N={','.join(map(str, ns))}, {args.tokens} tokens, rounds a side at each N: {args.rounds}", flush=True)
        bodies = [[peer_body(i, model, args.peer_prompt, args.peer_no_cache) for i in b] for b in items]
        await warmed(worker)  # the genres' framings, computed while the worker is idle: not in the peer's rounds
        await run_ours(worker, items[0])  # warm-up, one request each, not counted
        await run_peer(session, url, items[0], bodies[0])
        results: dict[int, list[tuple[Round, Round]]] = {n: [] for n in ns}
        for batch, batch_bodies in zip(items[1:], bodies[1:]):
            n = len(batch)
            ours = await run_ours(worker, batch)
            peer = await run_peer(session, url, batch, batch_bodies)
            results[n].append((ours, peer))
            print(f"# N={n} round {len(results[n])}: ours {ours.rate:7.1f} tok/s ({ours.tokens} tokens) | "
                  f"peer {peer.rate:7.1f} tok/s ({peer.tokens} tokens) | ratio {_ratio(ours, peer):.2f}", flush=True)
    report(results)


def _ratio(ours: Round, peer: Round) -> float:
    return ours.rate / peer.rate if peer.rate else float("nan")


def _p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(results: dict[int, list[tuple[Round, Round]]]) -> None:
    """`name: value` lines; the ratios last, larger N first, so N=16 and N=1 end the output."""
    peers = [peer for rounds in results.values() for _, peer in rounds]
    for n, rounds in results.items():
        print(f"ours_tok_s_{n}: {statistics.median(o.rate for o, _ in rounds):.1f}")
        print(f"peer_tok_s_{n}: {statistics.median(p.rate for _, p in rounds):.1f}")
        print(f"ours_ttft_p50_{n}: {_p50([t for o, _ in rounds for t in o.ttfts]):.3f}")
        print(f"peer_ttft_p50_{n}: {_p50([t for _, p in rounds for t in p.ttfts]):.3f}")
    failures = sum(o.failures for rounds in results.values() for o, _ in rounds), sum(p.failures for p in peers)
    print(f"failed_requests: ours {failures[0]}, peer {failures[1]}")
    prompt_tokens = sum(p.prompt_tokens for p in peers)
    if prompt_tokens:
        print(f"peer_cached_prompt_share: {sum(p.cached_tokens for p in peers) / prompt_tokens:.2f}")
    if mismatched := sum(p.mismatched for p in peers):
        print(f"# warning: the peer read {mismatched} prompts at another length than ours (another tokenizer?)")
    for n in sorted(results, reverse=True):
        print(f"peer_ratio_{n}: {statistics.median(_ratio(o, p) for o, p in results[n]):.2f}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the server it started is already stopped (llama_server's finally)
        sys.exit("interrupted")
