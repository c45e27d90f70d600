"""Small helpers the remote-pool tests share: a free port, reading a handle to its end, waiting on a condition."""

from __future__ import annotations

import asyncio
import socket


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
