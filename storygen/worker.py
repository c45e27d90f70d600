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
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from storygen import model_thread
from storygen.config import StorygenConfig
from storygen.engine import Engine, Sequence, SequenceError, StepOutput
from storygen.errors import (DeadlineExceededError, GenerationFailedError, RequestCancelledError, StorygenError,
                             WorkerUnavailableError, failure_reference)
from storygen.metrics import Metrics
from storygen.model import LoadedModel
from storygen.scheduler import FairQueue
from storygen.stories import PreparedStory, Story, StoryRequest, TextStream, finish, prepare

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
MAX_PREFILL_GROUP = 16
# After running out of memory lowered the running cap, this many steps without another OOM
# raise it by one, back up to the configured cap: stories get shorter, memory frees up.
CAP_RECOVERY_STEPS = 256


class StoryHandle:
    """The caller's side of one request: stream it, await it, cancel it, ask where it is."""

    def __init__(self, worker: Worker, prepared: PreparedStory, loop: asyncio.AbstractEventLoop) -> None:
        self._worker = worker
        self.request_id = prepared.request.request_id
        self.user_key = prepared.request.user_key
        self.genre = prepared.genre.name
        self.notices = prepared.notices
        self._loop = loop
        self._chunks: asyncio.Queue[str | None] = asyncio.Queue()
        self._result: asyncio.Future[Story] = loop.create_future()
        self.state = "queued"  # queued, running, done, failed, cancelled

    @property
    def position(self) -> int | None:
        """Stories that will start before this one (0: next); None once it is running."""
        return self._worker.position(self.request_id)

    @property
    def eta_s(self) -> float | None:
        """Rough seconds until it starts; None once it is running."""
        position = self.position
        return None if position is None else self._worker.eta_for(position)

    def cancel(self) -> bool:
        """Stop it: a queued request never reaches the model, a running one frees its slot next step."""
        return self._worker.cancel(self.request_id)

    def done(self) -> bool:
        return self._result.done()

    async def __aiter__(self) -> AsyncIterator[str]:
        while (chunk := await self._chunks.get()) is not None:
            yield chunk

    def __await__(self):
        return asyncio.shield(self._result).__await__()

    # Called on the event loop by the engine loop (through call_soon_threadsafe).
    def _chunk(self, text: str) -> None:
        self.state = "running"
        self._chunks.put_nowait(text)

    def _resolve(self, story: Story | None, error: BaseException | None, state: str) -> None:
        if self._result.done():
            return
        self.state = state
        if error is not None:
            self._result.set_exception(error)
            self._result.exception()  # mark retrieved: a caller that only streamed is not warned
        else:
            self._result.set_result(story)
        self._chunks.put_nowait(None)


def _fan_out(chunks: list[tuple[StoryHandle, str]]) -> None:
    for handle, text in chunks:
        handle._chunk(text)


@dataclass
class _Job:
    prepared: PreparedStory
    handle: StoryHandle
    seq: Sequence
    stream: TextStream
    submitted: float
    deadline: float
    first_token: float | None = None
    finished: bool = False
    timings: dict[str, float] = field(default_factory=dict)


_SERVING = ("running", "draining")  # states in which the engine loop goes on
_UNAVAILABLE = {"stopped": "starting up", "failed": "down after an internal error (the operator has the log)"}


class Worker:
    """Many users, one model. Start it inside a running event loop."""

    def __init__(self, lm: LoadedModel, config: StorygenConfig, metrics: Metrics | None = None) -> None:
        self.lm = lm
        self.config = config
        self.metrics = metrics or Metrics()
        on_gpu = lm.device.type == "cuda"
        default_batch = GPU_MAX_BATCH if on_gpu else CPU_MAX_BATCH
        self.prefill_tokens = GPU_PREFILL_TOKENS if on_gpu else CPU_PREFILL_TOKENS
        self.engine = Engine(lm, config.max_batch or default_batch)
        self.full_batch = self.engine.max_batch  # the cap an OOM lowers the engine's from, for a while
        self.cap_recovery_steps = CAP_RECOVERY_STEPS
        self._clean_steps = 0  # decode steps since the last OOM, while the cap is lowered
        self._queue: FairQueue[_Job] = FairQueue(config.max_queue, config.max_per_user)
        self._jobs: dict[str, _Job] = {}
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
            if self._state not in _SERVING:
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
            raise WorkerUnavailableError(_UNAVAILABLE.get(self._state, "shutting down"))
        with self._tokenizer_lock:
            prepared = prepare(request, self.lm, self.config)
        handle = StoryHandle(self, prepared, asyncio.get_running_loop())
        now = time.monotonic()
        job = _Job(prepared, handle, Sequence(request.request_id, prepared.prompt_ids, request.params),
                   TextStream(self.lm, prepared), now, request.deadline or now + self.config.deadline_s)
        with self._cond:
            if request.request_id in self._jobs:
                raise ValueError(f"request id {request.request_id} is already in use")
            try:
                self._queue.push(request.request_id, request.user_key, job, lambda: self.eta_for(len(self._queue)))
            except StorygenError:
                self.metrics.outcome("rejected")
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
            stalled = self._state in _SERVING and self.engine.rows and time.monotonic() - self._last_step > 60
            return {
                "state": "stalled" if stalled else self._state,
                "queued": len(self._queue), "running": len(self.engine.rows), "max_batch": self.engine.max_batch,
                "last_error": self._last_error, **self._faults,
            }

    # --- the engine loop, on the model thread ------------------------------------------------

    def _engine_loop_ended(self, future: Future[None]) -> None:
        """A bug in the loop itself, not a request's failure: say so to everyone waiting, and refuse new ones."""
        if (error := future.exception()) is None:
            return
        self._last_error = f"engine loop crashed: {type(error).__name__}"
        logger.critical("the engine loop crashed; the worker is down", exc_info=error)
        with self._cond:
            self._state = "failed"
            for key, job in list(self._jobs.items()):
                admitted = self._queue.remove(key) is None
                self._settle(job, None, WorkerUnavailableError(_UNAVAILABLE["failed"]), "failed", admitted=admitted)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._state in _SERVING and not len(self._queue) and not self.engine.rows:
                    self._cond.wait()
                if self._state not in _SERVING:
                    return
                self._expire_and_abort(time.monotonic())
                admitted = self._admit()
            if admitted:
                self._start(admitted)
            if self.engine.rows:
                self._step()

    def _expire_and_abort(self, now: float) -> None:
        """Holding the lock: drop queued requests past their deadline, stop running ones that must stop."""
        for key, job in list(self._queue.items()):
            if now > job.deadline:
                self._queue.remove(key)
                self._settle(job, None, DeadlineExceededError(job.deadline - job.submitted), "failed",
                             admitted=False, outcome="expired")
        for seq in list(self.engine.rows):
            job = self._jobs[seq.seq_id]
            reason = self._aborts.pop(seq.seq_id, None)
            if reason is None and now > job.deadline:
                reason = DeadlineExceededError(job.deadline - job.submitted)
            if reason is not None:
                self.engine.abort(seq.seq_id)
                state = "cancelled" if isinstance(reason, RequestCancelledError) else "failed"
                self._settle(job, None, reason, state,
                             outcome="cancelled" if state == "cancelled" else "expired")
        self.metrics.queue_depth = len(self._queue)

    def _admit(self) -> list[_Job]:
        """Holding the lock: the next jobs in fair order that fit the free slots and the prefill budget."""
        admitted, tokens = [], 0
        room = min(self.engine.free_slots, MAX_PREFILL_GROUP)
        while len(admitted) < room and (peeked := self._queue.peek()) is not None:
            head = peeked[1]
            cost = len(head.seq.prompt_ids) + len(head.seq.generated)
            if admitted and tokens + cost > self.prefill_tokens:
                break
            self._queue.pop()
            admitted.append(head)
            tokens += cost
        self.metrics.queue_depth = len(self._queue)
        return admitted

    def _start(self, jobs: list[_Job]) -> None:
        """Prefill the admitted jobs together; each one that fails, fails alone."""
        results = self.engine.start_many([job.seq for job in jobs])
        outputs, no_room = [], []
        for job, result in zip(jobs, results):
            if not isinstance(result, SequenceError):
                outputs.append(result)
            elif isinstance(result.error, torch.OutOfMemoryError) and self.engine.rows:
                no_room.append(job)
            else:
                self._fail(job, result.error)
        if no_room:  # keep the cap at what fits; they wait, first in line, for a free slot
            self._lower_cap(len(self.engine.rows))
            with self._cond:
                for job in reversed(no_room):
                    self._queue.push_front(job.seq.seq_id, job.prepared.request.user_key, job)
        self._deliver(outputs)

    def _step(self) -> None:
        # 1. One decode step for the whole batch.
        try:
            outputs = self.engine.step()
        except torch.OutOfMemoryError:
            self._shrink_after_oom()
            return
        except Exception as error:  # fails the rows of this batch only; the worker goes on
            self._faults["step_failures"] += 1
            for seq in self.engine.abort_all():
                self._fail(self._jobs[seq.seq_id], error)
            return
        # 2. Book-keeping for ETAs, health and a cap that an OOM lowered.
        self._last_step = time.monotonic()
        self._recover_cap()
        self.metrics.running = len(self.engine.rows)
        # 3. Fan the new text out to each request's handle.
        self._deliver(outputs)

    def _deliver(self, outputs: list[StepOutput]) -> None:
        now = time.monotonic()
        chunks: list[tuple[StoryHandle, str]] = []
        finished: list[_Job] = []
        with self._tokenizer_lock:
            for out in outputs:
                job = self._jobs[out.seq_id]
                if out.token_id is not None:
                    if job.first_token is None:
                        job.first_token = now
                        self.metrics.observe_ttft(now - job.submitted)
                    if delta := job.stream.push(out.token_id):
                        chunks.append((job.handle, delta))
                if out.finish_reason is not None:
                    finished.append(job)
        if chunks:  # one wake-up of the event loop per step, not one per row
            self._loop.call_soon_threadsafe(_fan_out, chunks)
        self.metrics.tokens(sum(out.token_id is not None for out in outputs))
        for job in finished:
            self._complete(job, now)

    def _complete(self, job: _Job, now: float) -> None:
        job.timings = {"queued_s": (job.first_token or now) - job.submitted, "total_s": now - job.submitted,
                       "ttft_s": (job.first_token or now) - job.submitted}
        service = now - (job.first_token or now)
        self._service_s = 0.8 * self._service_s + 0.2 * max(service, 0.01)
        self.metrics.observe_latency(now - job.submitted)
        try:
            with self._tokenizer_lock:
                story = finish(self.lm, job.prepared, job.seq, job.stream, job.timings)
        except StorygenError as error:
            with self._cond:
                self._settle(job, None, error, "failed")
            return
        with self._cond:
            self._settle(job, story, None, "done")

    def _fail(self, job: _Job, error: BaseException) -> None:
        ref = failure_reference()
        request = job.prepared.request
        logger.error("request %s from %s failed (ref %s)", request.request_id, request.user_key, ref,
                     exc_info=error)
        self._faults["request_failures"] += 1
        self._last_error = f"{type(error).__name__} (ref {ref})"
        with self._cond:
            self._settle(job, None, GenerationFailedError(ref), "failed")

    def _shrink_after_oom(self) -> None:
        """Halve the running cap, put the newest rows back at the head of their queues, and retry."""
        rows = self.engine.rows
        new_cap = max(1, len(rows) // 2)
        if len(rows) == 1:  # even one story does not fit: fail it rather than loop
            self._faults["oom_events"] += 1
            self._fail(self._jobs[rows[0].seq_id], torch.OutOfMemoryError("out of memory with a single story"))
            self.engine.abort_all()
            return
        self._lower_cap(new_cap)
        with self._cond:
            for seq in list(reversed(rows[new_cap:])):
                self.engine.abort(seq.seq_id)
                seq.finish_reason = None  # it resumes from its tokens so far when re-admitted
                self._queue.push_front(seq.seq_id, self._jobs[seq.seq_id].prepared.request.user_key,
                                       self._jobs[seq.seq_id])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _lower_cap(self, cap: int) -> None:
        self._faults["oom_events"] += 1
        self._clean_steps = 0
        logger.warning("out of memory with %s rows running; running cap lowered to %s", len(self.engine.rows), cap)
        self.engine.max_batch = cap

    def _recover_cap(self) -> None:
        if self.engine.max_batch >= self.full_batch:
            return
        self._clean_steps += 1
        if self._clean_steps >= self.cap_recovery_steps:
            self._clean_steps = 0
            self.engine.max_batch += 1
            logger.info("running cap raised to %s after %s steps without running out of memory",
                        self.engine.max_batch, self.cap_recovery_steps)

    def _settle(self, job: _Job, story: Story | None, error: BaseException | None, state: str,
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
        self.metrics.outcome(outcome or {"done": "ok"}.get(state, state))
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(job.handle._resolve, story, error, state)
        logger.info("request %s from %s %s", request.request_id, request.user_key, state)
