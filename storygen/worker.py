"""The shared inference worker: a fair queue in front of one batched engine.

    handle = await worker.submit(request)
    async for chunk in handle: ...      # text as it is written
    story = await handle                # the finished Story, or a StorygenError
    handle.cancel(); handle.position; handle.eta_s

One engine loop owns the model, like vLLM's: on the process's model thread (see
model_thread.py for why that is one thread for all torch work), each turn it applies
cancellations and deadlines, admits queued requests into free slots (round-robin
across users), steps the batch once, and fans the new text out to each request's
handle on the asyncio side, which never blocks on the model.

This module holds the lifecycle and the asyncio side; the loop is in engine_loop.py,
what happens when something breaks in faults.py, and the caller's handle in handle.py.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future

from storygen import model_thread
from storygen.config import StorygenConfig
from storygen.engine import Engine, Sequence
from storygen.engine_loop import MAX_PREFILL_GROUP, EngineLoop
from storygen.errors import RequestCancelledError, StorygenError, WorkerUnavailableError
from storygen.faults import CAP_RECOVERY_STEPS, FaultHandling
from storygen.handle import StoryHandle
from storygen.jobs import SERVING, UNAVAILABLE, Job
from storygen.metrics import Metrics
from storygen.model import LoadedModel
from storygen.scheduler import FairQueue
from storygen.stories import Story, StoryRequest, TextStream, prepare

__all__ = ["Worker", "StoryHandle", "MAX_PREFILL_GROUP"]

logger = logging.getLogger(__name__)

CPU_MAX_BATCH = 16  # past this a 2-core CPU gains little throughput and every story slows down
GPU_MAX_BATCH = 64
# Prompt tokens prefilled per engine turn (at least one request; at most MAX_PREFILL_GROUP).
# Prompts admitted in the same turn share one forward pass, which is cheaper than one each, but
# running stories wait for it and so does a newcomer who arrives meanwhile: on a 2-core CPU a
# group of four ~60-token prompts took ~0.17 s, and a newcomer behind a flood then waited up to
# 2.6 slot turnovers for its first token; about 128 tokens keeps that near one.
CPU_PREFILL_TOKENS = 128
GPU_PREFILL_TOKENS = 8192


class Worker(EngineLoop, FaultHandling):
    """Many users, one model. Start it inside a running event loop."""

    def __init__(self, lm: LoadedModel, config: StorygenConfig, metrics: Metrics | None = None) -> None:
        self.lm = lm
        self.config = config
        self.metrics = metrics or Metrics()
        on_gpu = lm.device.type == "cuda"
        default_batch = GPU_MAX_BATCH if on_gpu else CPU_MAX_BATCH
        self.prefill_tokens = GPU_PREFILL_TOKENS if on_gpu else CPU_PREFILL_TOKENS
        self.engine = Engine(lm, config.max_batch or default_batch, prefix_cache_bytes=config.prefix_cache_mb * 2**20)
        self.full_batch = self.engine.max_batch  # the cap an OOM lowers the engine's from, for a while
        self.cap_recovery_steps = CAP_RECOVERY_STEPS
        self._clean_steps = 0  # decode steps since the last OOM, while the cap is lowered
        self._queue: FairQueue[Job] = FairQueue(config.max_queue, config.max_per_user)
        self._jobs: dict[str, Job] = {}
        self._aborts: dict[str, StorygenError] = {}  # running request id -> why it must stop
        self._cond = threading.Condition()
        self._tokenizer_lock = threading.Lock()  # the Rust tokenizer is shared by submit() and the engine loop
        self._engine_loop: Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = "stopped"
        self._service_s = max(1.0, config.defaults.length * 0.05)  # EMA of one story's time in the batch
        self._last_step = 0.0
        self._faults = {"oom_events": 0, "step_failures": 0, "request_failures": 0}
        self._last_error: str | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._state = "running"
        self._last_step = time.monotonic()
        try:
            self._engine_loop = model_thread.start_loop(f"the engine loop of worker {id(self):#x}", self._run)
        except RuntimeError:
            self._state = "stopped"
            raise
        self._engine_loop.add_done_callback(self._engine_loop_ended)
        logger.info("worker started: %s slots, queue %s, %s per user",
                    self.engine.max_batch, self.config.max_queue, self.config.max_per_user)

    async def stop(self) -> None:
        """Stop the engine loop; whatever is queued or running fails with a clear error."""
        with self._cond:
            if self._state not in SERVING:
                self._state = "stopped" if self._state == "failed" else self._state
                return
            self._state = "stopping"
            self._cond.notify_all()
        if self._engine_loop is not None:
            await asyncio.wait([asyncio.wrap_future(self._engine_loop)])  # a crash was logged when it happened
        with self._cond:
            for key, job in list(self._jobs.items()):
                admitted = self._queue.remove(key) is None
                self._settle(job, None, WorkerUnavailableError("shutting down"), "failed", admitted=admitted)
            self._state = "stopped"

    async def drain(self, grace_s: float) -> bool:
        """Refuse new requests ("shutting down") and give those in hand up to grace_s to finish.

        Returns whether all of them did; `stop()` then fails whatever is left.
        """
        with self._cond:
            if self._state != "running":
                return not self._jobs
            self._state = "draining"
            waiting = len(self._jobs)
        logger.info("draining: %s stories in hand, up to %.0f s", waiting, grace_s)
        deadline = time.monotonic() + grace_s
        while self._jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self._jobs

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- the asyncio side --------------------------------------------------------------------

    async def submit(self, request: StoryRequest) -> StoryHandle:
        """Check and queue a request; raises QueueFullError or TooManyRequestsError at once when it can't."""
        if self._state != "running":
            raise WorkerUnavailableError(UNAVAILABLE.get(self._state, "shutting down"))
        with self._tokenizer_lock:
            prepared = prepare(request, self.lm, self.config)
        handle = StoryHandle(self, prepared, asyncio.get_running_loop())
        now = time.monotonic()
        job = Job(prepared, handle, Sequence(request.request_id, prepared.prompt_ids, request.params),
                   TextStream(self.lm, prepared), now, request.deadline or now + self.config.deadline_s)
        with self._cond:
            if request.request_id in self._jobs:
                raise ValueError(f"request id {request.request_id} is already in use")
            try:
                self._queue.push(request.request_id, request.user_key, job, lambda: self.eta_for(len(self._queue)))
            except StorygenError:
                self.metrics.outcome("refused", request.user_key)
                raise
            self._jobs[request.request_id] = job
            self.metrics.queue_depth = len(self._queue)
            self._cond.notify()
        logger.info("request %s from %s queued (%s, %s tokens)", request.request_id, request.user_key,
                    prepared.genre.name, len(prepared.prompt_ids))
        return handle

    def cancel(self, request_id: str) -> bool:
        with self._cond:
            job = self._jobs.get(request_id)
            if job is None or job.finished:
                return False
            if self._queue.remove(request_id) is not None:
                self._settle(job, None, RequestCancelledError(), "cancelled", admitted=False)
                self.metrics.queue_depth = len(self._queue)
            else:
                self._aborts[request_id] = RequestCancelledError()
                self._cond.notify()
        logger.info("request %s cancelled", request_id)
        return True

    def position(self, request_id: str) -> int | None:
        with self._cond:
            return self._queue.position(request_id)

    def eta_for(self, position: int) -> float:
        """Seconds until the request at `position` starts: slots free at about max_batch per service time."""
        return (position + 1) * self._service_s / max(1, self.engine.max_batch)

    def queue_depth(self) -> int:
        return len(self._queue)

    def health(self) -> dict:
        with self._cond:
            stalled = self._state in SERVING and self.engine.rows and time.monotonic() - self._last_step > 60
            return {
                "state": "stalled" if stalled else self._state,
                "queued": len(self._queue), "running": len(self.engine.rows), "max_batch": self.engine.max_batch,
                "last_error": self._last_error, **self._faults,
            }

    def _settle(self, job: Job, story: Story | None, error: BaseException | None, state: str,
                admitted: bool = True, outcome: str | None = None) -> None:
        """Holding the lock: finish a job once, free its user's place, resolve its handle on the loop."""
        if job.finished:
            return
        job.finished = True
        request = job.prepared.request
        self._jobs.pop(request.request_id, None)
        self._aborts.pop(request.request_id, None)
        if admitted:
            self._queue.finished(request.user_key)
        self.metrics.outcome(outcome or state, request.user_key)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(job.handle._resolve, story, error, state)
        logger.info("request %s from %s %s", request.request_id, request.user_key, state)
