"""What the remote-pool tests share: a free port, reading a handle to its end, waiting on a condition,
and `python -m bot` as a process of its own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
KEY = "backend-key-0123456789"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def streamed(handle) -> tuple[str, object]:
    """(the text streamed, the Story or the error it ended with)."""
    chunks = [chunk async for chunk in handle]
    try:
        return "".join(chunks), await handle
    except Exception as error:  # noqa: BLE001  (the test looks at it)
        return "".join(chunks), error


async def until(condition, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


class StoryBotProcess:
    """`python -m bot` serving /v1/completions on a port of its own."""

    def __init__(self, model_dir: Path, tmp: Path, name: str, log: bool = False, **env: str | None) -> None:
        """`env` changes the environment below (None removes a key); `log` keeps its stderr for `log()`."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "HTTP_PORT": str(self.port), "HTTP_API_KEYS": KEY,
                    "STORYGEN_MODEL": str(model_dir), "STORYGEN_FORMAT": "instruct", "STORYGEN_DEVICE": "cpu",
                    "STORYGEN_DTYPE": "float32", "STORYGEN_MAX_BATCH": "2", "STORYGEN_MAX_LENGTH": "1000",
                    "STORYGEN_SETTINGS_DB": str(tmp / f"{name}.sqlite3"), "STORYGEN_CACHE_DIR": str(tmp),
                    "BOT_SHUTDOWN_GRACE_S": "0"}
        for key in ("DISCORD_TOKEN", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "STORYGEN_BACKEND"):
            self.env.pop(key, None)
        for key, value in env.items():
            if value is None:
                self.env.pop(key, None)
            else:
                self.env[key] = value
        self.keep_log = log
        self.process: asyncio.subprocess.Process | None = None
        self.cwd = tmp

    async def start(self, http: aiohttp.ClientSession) -> dict:
        """Start it and wait until /healthz says 200; returns that answer."""
        stderr = asyncio.subprocess.PIPE if self.keep_log else asyncio.subprocess.DEVNULL
        self.process = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", cwd=self.cwd, env=self.env,
                                                            stderr=stderr)
        for _ in range(1200):
            with contextlib.suppress(aiohttp.ClientConnectionError):
                async with http.get(self.url.removesuffix("/v1") + "/healthz") as response:
                    if response.status == 200:
                        return await response.json()
            await asyncio.sleep(0.05)
        raise AssertionError(f"the StoryBot on port {self.port} did not become healthy")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)

    async def terminate(self) -> int:
        """SIGTERM, as an operator stops it; its exit code."""
        self.process.terminate()
        return await asyncio.wait_for(self.process.wait(), 30)

    async def log(self) -> str:
        return (await self.process.stderr.read()).decode()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def stories(self, http: aiohttp.ClientSession, outcome: str) -> float:
        async with http.get(self.url.removesuffix("/v1") + "/metrics") as response:
            text = await response.text()
        found = re.search(rf'storygen_stories_total{{frontend="api",outcome="{outcome}"}} (\S+)', text)
        return float(found.group(1)) if found else 0.0
