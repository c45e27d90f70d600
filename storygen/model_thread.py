"""One thread for all of a process's model work: loading, warming up, and the worker's engine loop.

    lm = await model_thread.run(load_model, config)    # from asyncio
    lm = model_thread.call(load_model, config)         # from plain code

Why one thread: torch's CPU build runs its intra-op parallelism on GNU OpenMP, which gives
every thread that starts a parallel region a team of its own and keeps that team while the
thread lives. Once the teams together hold more threads than there are cores, libgomp cuts its
spin-wait from 300,000 turns to 100, so between two matmuls the helper threads fall asleep and
every region pays a futex wake-up. Loading the model in one thread and decoding in another was
enough to trigger it: on a 2-core CPU a batch-16 decode step of the default model took 87-108 ms
on the second thread against 72-78 ms when one thread did everything (benchmarks/README.md).

The worker's engine loop occupies the thread while the worker runs, so nothing else can be
queued behind it then: `call`, `run` and a second loop raise instead of waiting for ever.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_jobs: queue.SimpleQueue[tuple[Future, Callable[[], Any]]] = queue.SimpleQueue()
_thread: threading.Thread | None = None
_occupied_by: str | None = None  # the long-running loop that holds the thread, if any


def on_model_thread() -> bool:
    return threading.current_thread() is _thread


def submit(fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
    """Queue fn(*args, **kwargs) on the model thread; its Future holds the result or the exception."""
    with _lock:
        _check_free()
        return _enqueue(lambda: fn(*args, **kwargs))


def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run fn on the model thread and wait for it (inline when already there)."""
    if on_model_thread():
        return fn(*args, **kwargs)
    return submit(fn, *args, **kwargs).result()


async def run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run fn on the model thread without blocking the event loop."""
    return await asyncio.wrap_future(submit(fn, *args, **kwargs))


def start_loop(name: str, fn: Callable[[], None]) -> Future[None]:
    """Hand the thread to a loop that runs until it returns (the worker's engine loop)."""
    global _occupied_by

    def loop() -> None:
        global _occupied_by
        try:
            fn()
        finally:
            with _lock:
                _occupied_by = None

    with _lock:
        _check_free()
        _occupied_by = name
        return _enqueue(loop)


def _check_free() -> None:
    if _occupied_by is not None:
        raise RuntimeError(f"the model thread is running {_occupied_by}; stop it first "
                           "(one worker per process owns the model)")


def _enqueue(job: Callable[[], Any]) -> Future:
    global _thread
    if _thread is None:
        # A daemon, as the old engine thread was: a process that exits without stopping its
        # worker must not hang on it.
        _thread = threading.Thread(target=_serve, name="storygen-model", daemon=True)
        _thread.start()
    future: Future = Future()
    _jobs.put((future, job))
    return future


def _serve() -> None:
    while True:
        future, job = _jobs.get()
        if not future.set_running_or_notify_cancel():
            continue
        try:
            result = job()
        except BaseException as error:  # noqa: BLE001 - handed to whoever waits on the future
            future.set_exception(error)
        else:
            future.set_result(result)
