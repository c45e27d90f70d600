"""The half of every worker that callers meet: the fair queue, the jobs in hand, their handles.

    handle = await worker.submit(request)
    async for chunk in handle: ...      # text as it is written
    story = await handle                # the finished Story, or a StorygenError
    handle.cancel(); handle.position; handle.eta_s

Whatever writes the tokens, the fair per-user queue, both caps, deadlines, cancellation,
queue position and ETA live here, so a story behaves the same to its user whether the
local engine writes it (worker.py) or a pool of remote servers does (remote/worker.py).
A subclass says how many stories it runs at once (`capacity`), how to wake whatever
admits them (`_wake`) and how to stop one that is running (`_abort_running`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from storygen.config import StorygenConfig
from storygen.errors import DeadlineExceededError, RequestCancelledError, StorygenError, WorkerUnavailableError
from storygen.handle import StoryHandle
from storygen.jobs import UNAVAILABLE, Job
from storygen.metrics import Metrics
from storygen.model import LoadedModel
from storygen.scheduler import FairQueue
from storygen.stories import Story, StoryRequest, TextStream, prepare

logger = logging.getLogger(__name__)


class QueueFront:
    """Many users, one fair queue in front of whatever generates. Start it inside a running event loop."""

    def __init__(self, lm: LoadedModel, config: StorygenConfig, metrics: Metrics | None = None) -> None:
        self.lm = lm
        self.config = config
        self.metrics = metrics or Metrics()
        self._queue: FairQueue[Job] = FairQueue(config.max_queue, config.max_per_user)
        self._jobs: dict[str, Job] = {}
        self._cond = threading.Condition()  # guards the queue and the jobs; generation may run on another thread
        self._tokenizer_lock = threading.Lock()  # the Rust tokenizer is shared by submit() and the generating side
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = "stopped"
        self._service_s = max(1.0, config.defaults.length * 0.05)  # EMA of one story's time in a slot
        self._faults = {"oom_events": 0, "step_failures": 0, "request_failures": 0}
        self._last_error: str | None = None

    # --- what a subclass provides ----------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Stories generated at once."""
        raise NotImplementedError

    def _wake(self) -> None:
        """Holding the lock: something was queued or must stop; wake whatever admits and runs stories."""
        raise NotImplementedError

    def _abort_running(self, request_id: str) -> None:
        """Holding the lock: stop a running story as soon as it can be; the subclass settles it."""
        raise NotImplementedError

    def _refusal(self) -> StorygenError | None:
        """Why new stories are refused right now beyond the worker's state (e.g. no server left), if they are."""
        return None

    # --- lifecycle ---------------------------------------------------------------------------

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

    def _expire_queued(self, now: float) -> None:
        """Holding the lock: drop queued requests past their deadline."""
        for key, job in list(self._queue.items()):
            if now > job.deadline:
                self._queue.remove(key)
                self._settle(job, None, DeadlineExceededError(job.deadline - job.submitted), "failed",
                             admitted=False, outcome="expired")

    def _fail_all(self, error: StorygenError) -> None:
        """Holding the lock: settle every job in hand, queued or running, with `error`."""
        for key, job in list(self._jobs.items()):
            admitted = self._queue.remove(key) is None
            self._settle(job, None, error, "failed", admitted=admitted)
        self.metrics.queue_depth = len(self._queue)

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- the asyncio side --------------------------------------------------------------------

    async def submit(self, request: StoryRequest) -> StoryHandle:
        """Check and queue a request; raises QueueFullError or TooManyRequestsError at once when it can't."""
        if self._state != "running":
            raise WorkerUnavailableError(UNAVAILABLE.get(self._state, "shutting down"))
        if (refusal := self._refusal()) is not None:
            self.metrics.outcome("refused", request.user_key)
            raise refusal
        with self._tokenizer_lock:
            prepared = prepare(request, self.lm, self.config)
        handle = StoryHandle(self, prepared, asyncio.get_running_loop())
        now = time.monotonic()
        job = Job(prepared, handle, prepared.sequence(),
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
            self._wake()
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
                self._abort_running(request_id)
        logger.info("request %s cancelled", request_id)
        return True

    def position(self, request_id: str) -> int | None:
        with self._cond:
            return self._queue.position(request_id)

    def eta_for(self, position: int) -> float:
        """Seconds until the request at `position` starts: slots free at about `capacity` per service time."""
        return (position + 1) * self._service_s / max(1, self.capacity)

    def queue_depth(self) -> int:
        return len(self._queue)

    def _observe_service(self, seconds: float) -> None:
        self._service_s = 0.8 * self._service_s + 0.2 * max(seconds, 0.01)

    def _settle(self, job: Job, story: Story | None, error: BaseException | None, state: str,
                admitted: bool = True, outcome: str | None = None) -> None:
        """Holding the lock: finish a job once, free its user's place, resolve its handle on the loop."""
        if job.finished:
            return
        job.finished = True
        request = job.prepared.request
        self._jobs.pop(request.request_id, None)
        if admitted:
            self._queue.finished(request.user_key)
        self.metrics.outcome(outcome or state, request.user_key)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(job.handle._resolve, story, error, state)
        logger.info("request %s from %s %s", request.request_id, request.user_key, state)
