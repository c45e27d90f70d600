"""A model of a GPU serving engine: an OpenAI-compatible /v1/completions on loopback that streams
tokens at a fixed rate per slot, with a fixed number of slots (requests past them wait, as in
vLLM's scheduler). No model: each token is the text " w<n>".

For benchmarks/scale_bench.py and the remote-pool tests, which also use its bad modes: a server
that answers 500, stalls, sends malformed SSE, or cuts its streams. It records every request body.

    server = SimulatedServer(slots=8, tokens_per_s=50)
    await server.start()          # server.url is http://127.0.0.1:<port>/v1
    server.mode = "500"           # "ok", "500", "stall", "malformed", "cut"
    await server.stop()
"""

from __future__ import annotations

import asyncio
import json
import random
import time

from aiohttp import web

MODES = ("ok", "500", "stall", "malformed", "cut")


class SimulatedServer:
    def __init__(self, slots: int = 8, tokens_per_s: float = 50.0, model: str = "sim", owned_by: str = "vllm",
                 stop_after: int | None = None, port: int = 0, cut_after: int = 3, piece: str | None = None,
                 takes_ids: bool = True) -> None:
        self.slots = slots
        self.tokens_per_s = tokens_per_s
        self.model = model
        self.owned_by = owned_by
        self.stop_after = stop_after  # tokens after which a story "ends" (finish_reason stop); None: max_tokens
        self.cut_after = cut_after  # tokens a "cut" stream sends before the connection drops
        self.port = port
        self.piece = piece  # every token's text; None: " w<n>"
        self.takes_ids = takes_ids  # False: a prompt of token ids is refused with 400, as some servers do
        self.mode = "ok"
        self.requests: list[dict] = []
        self.completed = 0  # streams that ran to their finish
        self.aborted = 0  # streams the client closed before the finish
        self.tokens = 0
        self._slots = asyncio.Semaphore(slots)
        self._random = random.Random(port or id(self))
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_post("/v1/completions", self._completions)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and drop every open stream, as a killed process would."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _models(self, request: web.Request) -> web.Response:
        if self.mode in ("500", "stall"):
            return await self._bad(self.mode)
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 0, "owned_by": self.owned_by}]})

    async def _bad(self, mode: str) -> web.Response:
        if mode == "stall":
            await asyncio.sleep(3600)
        return web.json_response({"error": {"message": "internal error", "type": "server_error"}}, status=500)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        if self.mode in ("500", "stall"):
            return await self._bad(self.mode)
        if not self.takes_ids and not isinstance(body.get("prompt"), str):
            return web.json_response({"error": {"message": "'prompt' must be a string", "type": "invalid_request_error",
                                                "param": "prompt"}}, status=400)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        if self.mode == "malformed":
            await response.write(b'data: {"id": "x", "choices": [{"text": "w", \n\n')
            await response.write(b"data: [DONE]\n\n")
            return response
        max_tokens = int(body.get("max_tokens") or 16)
        limit = min(max_tokens, self.stop_after or max_tokens)
        meta = {"id": "cmpl-sim", "object": "text_completion", "created": int(time.time()), "model": self.model}
        sent = 0
        try:
            async with self._slots:
                for i in range(limit):
                    if self.mode == "cut" and sent >= self.cut_after:
                        request.transport.close()  # the server dies mid-stream
                        return response
                    # A GPU's step time varies with what else is in its batch: ±50 % around the mean.
                    await asyncio.sleep(self._random.uniform(0.5, 1.5) / self.tokens_per_s)
                    await _event(response, {**meta, "choices": [{"index": 0, "text": self.piece or f" w{i}", "logprobs": None,
                                                                   "finish_reason": None}]})
                    sent += 1
                    self.tokens += 1
                reason = "length" if limit == max_tokens else "stop"
                await _event(response, {**meta, "choices": [{"index": 0, "text": "", "logprobs": None,
                                                               "finish_reason": reason}]})
                if (body.get("stream_options") or {}).get("include_usage"):
                    await _event(response, {**meta, "choices": [], "usage": {
                        "prompt_tokens": len(body.get("prompt") or []), "completion_tokens": sent,
                        "total_tokens": sent}})
                await response.write(b"data: [DONE]\n\n")
                self.completed += 1
        except ConnectionResetError:  # the client closed the stream (cancelled): as vLLM does, stop writing
            self.aborted += 1
        except asyncio.CancelledError:
            self.aborted += 1
            raise
        return response


async def _event(response: web.StreamResponse, payload: dict) -> None:
    await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")


async def _serve_many(args) -> None:
    """Run `--servers` of them in this process; print their URLs as one JSON line; obey stdin."""
    import sys

    group = [SimulatedServer(args.slots, args.rate, piece=args.piece) for _ in range(args.servers)]
    for server in group:
        await server.start()
    print(json.dumps([server.url for server in group]), flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        command, *rest = line.split()
        if command == "stop":
            await group[int(rest[0])].stop()
            print("stopped", flush=True)
        elif command == "quit":
            break
    for server in group:
        await server.stop()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="simulated OpenAI-compatible servers on loopback")
    parser.add_argument("--servers", type=int, default=1)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--rate", type=float, default=50.0, help="tokens per second per slot")
    parser.add_argument("--piece", default=None, help="every token's text (default: ' w<n>')")
    asyncio.run(_serve_many(parser.parse_args()))
