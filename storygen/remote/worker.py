"""The fair queue in front of a pool of remote servers (STORYGEN_BACKEND=openai).

Everything a user meets stays here, as with the local engine (queue_front.py): the fair
per-user queue, both caps, deadlines, cancellation, position and ETA. What changes is who
writes: each admitted story streams from the server in rotation with the fewest requests
in flight (pool.py), its text going straight to the story's handle.

When a server fails mid-story, the story is resumed on another from the text it already
has: the same prompt ids followed by what was written, asking for the tokens still due.
The user sees one story, each piece of text once. With no server left, new stories are
refused at once ("generation servers unavailable"); stories in hand wait for one to come
back for up to STORYGEN_BACKEND_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time

from storygen.config import StorygenConfig
from storygen.errors import (BackendsUnavailableError, DeadlineExceededError, GenerationFailedError,
                             RequestCancelledError, StorygenError, ValidationError, WorkerUnavailableError,
                             failure_reference)
from storygen.jobs import SERVING, Job
from storygen.metrics import Metrics
from storygen.model import LoadedModel
from storygen.prompts import encode_user_text
from storygen.queue_front import QueueFront
from storygen.remote.client import Backend, BackendFailure, RequestRefused
from storygen.remote.pool import PROBE_INTERVAL_S, BackendPool
from storygen.stories import finish_text

logger = logging.getLogger(__name__)

MAX_RESUMES = 4  # servers one story may move through before it fails
TICK_S = 0.5  # how often deadlines are checked when nothing else happens


class RemoteWorker(QueueFront):
    """The worker with remote servers writing. Start it inside a running event loop."""

    def __init__(self, lm: LoadedModel, config: StorygenConfig, metrics: Metrics | None = None,
                 probe_interval_s: float = PROBE_INTERVAL_S) -> None:
        super().__init__(lm, config, metrics)
        self.pool = BackendPool(config, self.metrics, self._admit, probe_interval_s)  # room may have opened
        self._tasks: dict[str, asyncio.Task] = {}  # running request id -> the task streaming it
        self._aborting: dict[str, StorygenError] = {}  # running request id -> why it is being stopped
        self._resuming = 0  # stories waiting for another server; they go before new ones
        self._clock: asyncio.Task | None = None
        self._all_down_since: float | None = None

    @property
    def capacity(self) -> int:
        return max(1, self.pool.capacity)

    def _wake(self) -> None:
        if self._loop is None:
            return
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._admit()
        else:
            self._loop.call_soon_threadsafe(self._admit)

    def _abort_running(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is not None and self._loop is not None:
            self._aborting[request_id] = RequestCancelledError()
            self._loop.call_soon_threadsafe(task.cancel)

    def _refusal(self) -> StorygenError | None:
        return None if self.pool.healthy() else BackendsUnavailableError(len(self.pool.backends))

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.pool.start()
        self._state = "running"
        self._clock = asyncio.create_task(self._tick(), name="remote worker clock")
        logger.info("worker started on %s generation servers (up to %s requests each), queue %s, %s per user; "
                    "the genre steer and the ending steer are local-only, remote stories end by the model or are trimmed",
                    len(self.pool.backends), self.config.backend_max_inflight, self.config.max_queue,
                    self.config.max_per_user)

    async def stop(self) -> None:
        """Stop admitting, close every stream; whatever is queued or running fails with a clear error."""
        with self._cond:
            if self._state not in SERVING:
                return
            self._state = "stopping"
        tasks = [*self._tasks.values(), *([self._clock] if self._clock is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with self._cond:
            self._fail_all(WorkerUnavailableError("shutting down"))
            self._state = "stopped"
        await self.pool.close()

    def health(self) -> dict:
        with self._cond:
            state = self._state
            if state == "running" and not self.pool.healthy():
                state = "unavailable"
            return {
                "state": state, "backend": "openai",
                "detail": "generation servers unavailable" if state == "unavailable" else None,
                "queued": len(self._queue), "running": len(self._tasks), "max_batch": self.capacity,
                "last_error": self._last_error, **self._faults, "backends": self.pool.describe(),
            }

    # --- admitting ---------------------------------------------------------------------------

    async def _tick(self) -> None:
        """The clock: deadlines of queued stories, and giving up without servers. Admitting is `_admit`."""
        while self._state in SERVING:
            await asyncio.sleep(TICK_S)
            with self._cond:
                now = time.monotonic()
                self._expire_queued(now)
                self._give_up_without_servers(now)
            self._admit()

    def _admit(self) -> None:
        """On the loop: start queued stories, in the fair queue's order, while a server has room.

        Called where room may have opened (a story queued, a request ended, a server came back), in
        the same turn of the loop: waking a dispatcher task instead cost a loop turn (~10 ms under
        load) per freed slot, and the slots freed meanwhile were then refilled together, in clumps.
        """
        if self._state not in SERVING:
            return
        with self._cond:
            while len(self._queue) and not self._resuming and (backend := self.pool.take()) is not None:
                _, job = self._queue.pop()
                self._tasks[job.seq.seq_id] = asyncio.create_task(self._write(job, backend),
                                                                  name=f"story {job.seq.seq_id}")
            self.metrics.queue_depth = len(self._queue)
            self.metrics.running = len(self._tasks)

    def _give_up_without_servers(self, now: float) -> None:
        """Holding the lock: with no server for a while, queued stories fail rather than wait on."""
        if self.pool.healthy():
            self._all_down_since = None
            return
        self._all_down_since = self._all_down_since or now
        if now - self._all_down_since < self.config.backend_timeout_s:
            return
        for key, job in list(self._queue.items()):
            self._queue.remove(key)
            self._settle(job, None, BackendsUnavailableError(len(self.pool.backends)), "failed", admitted=False)

    async def _another_server(self, job: Job) -> Backend:
        """A server for a story whose server failed, ahead of new stories; raises when none comes back in time."""
        self._resuming += 1
        try:
            waited_since = time.monotonic()
            while (backend := self.pool.take()) is None:
                if self.pool.healthy():
                    waited_since = time.monotonic()  # servers are up, only full: wait for room
                elif time.monotonic() - waited_since > self.config.backend_timeout_s:
                    raise BackendsUnavailableError(len(self.pool.backends))
                await asyncio.sleep(0.05)
            return backend
        finally:
            self._resuming -= 1
            self._admit()

    # --- writing -----------------------------------------------------------------------------

    async def _write(self, job: Job, backend: Backend | None) -> None:
        """Stream one story from the pool, moving it to another server if its own fails; then settle it."""
        request, prepared = job.prepared.request, job.prepared
        params = request.params
        seed = params.seed if params.seed is not None else secrets.randbits(31)
        job.seq.seed = seed
        user = "u-" + hashlib.sha256(request.user_key.encode()).hexdigest()[:16]
        written: list[str] = []  # the text after the prompt, as it came
        finish = "length"
        counted: int | None = 0  # tokens as the servers counted them; None once a segment went uncounted
        started = time.monotonic()

        def on_text(delta: str) -> None:
            if job.first_token is None:
                job.first_token = time.monotonic()
                self.metrics.observe_ttft(job.first_token - job.submitted, request.user_key)
            written.append(delta)
            job.handle._chunk(delta)

        try:
            async with asyncio.timeout(max(0.0, job.deadline - time.monotonic())):
                for attempt in range(MAX_RESUMES + 1):
                    text = "".join(written)
                    done = self._count(text)
                    if done >= params.length:
                        break
                    ids = prepared.prompt_ids + self._encode(text) if text else prepared.prompt_ids
                    try:
                        segment = await backend.complete(
                            ids, params, seed + attempt, params.length - done, self.lm.stop_ids, user, on_text,
                            lambda s, b=backend: self.metrics.backend_ttft(b.url, s), self._decode)
                        finish = segment.finish_reason
                        self.pool.succeeded(backend)
                        counted = None if counted is None or segment.completion_tokens is None else \
                            counted + segment.completion_tokens
                        break
                    except BackendFailure as failure:
                        self.pool.failed(backend, failure.kind, str(failure).split(": ", 1)[-1])
                        self.pool.release(backend)
                        backend, counted = None, None  # a cut segment's tokens are only known by re-encoding
                        if attempt == MAX_RESUMES:
                            raise GenerationFailedError(failure_reference()) from failure
                        backend = await self._another_server(job)
                        self.metrics.resumed()
                        logger.warning("request %s resumed on %s after %s tokens (%s)", request.request_id,
                                       backend.url, self._count("".join(written)), failure.kind)
        except asyncio.CancelledError:
            reason = self._aborting.pop(request.request_id, None)
            with self._cond:
                if reason is not None:
                    self._settle(job, None, reason, "cancelled")
                else:
                    self._settle(job, None, WorkerUnavailableError("shutting down"), "failed")
            return
        except TimeoutError:
            with self._cond:
                self._settle(job, None, DeadlineExceededError(job.deadline - job.submitted), "failed",
                             outcome="expired")
            return
        except RequestRefused as refused:
            logger.warning("request %s refused by %s: %s", request.request_id, backend.url if backend else "?",
                           refused)
            with self._cond:
                self._settle(job, None, ValidationError(f"the generation server refused the story: "
                                                        f"{refused.message}"), "failed")
            return
        except StorygenError as error:
            if isinstance(error, GenerationFailedError):
                self._faults["request_failures"] += 1
                self._last_error = f"request {request.request_id} failed on {MAX_RESUMES + 1} servers"
                logger.error("request %s failed on %s servers in a row (ref %s)", request.request_id,
                             MAX_RESUMES + 1, error.ref)
            with self._cond:
                self._settle(job, None, error, "failed")
            return
        finally:
            if backend is not None:
                self.pool.release(backend)
            self._tasks.pop(request.request_id, None)
            self._aborting.pop(request.request_id, None)
        self._complete(job, "".join(written), finish, seed, started, counted)

    def _complete(self, job: Job, text: str, finish: str, seed: int, started: float, counted: int | None) -> None:
        now = time.monotonic()
        first = job.first_token or now
        job.timings = {"queued_s": started - job.submitted, "total_s": now - job.submitted,
                       "ttft_s": first - job.submitted}
        self._observe_service(now - started)
        self.metrics.observe_latency(now - job.submitted, job.prepared.request.user_key)
        tokens = counted if counted is not None else self._count(text)
        self.metrics.tokens(tokens)
        try:
            story = finish_text(self.lm, job.prepared, text, finish, tokens, seed, job.timings)
        except StorygenError as error:
            with self._cond:
                self._settle(job, None, error, "failed")
            return
        with self._cond:
            self._settle(job, story, None, "done")

    def _count(self, text: str) -> int:
        return len(self._encode(text)) if text else 0

    def _decode(self, ids: list[int]) -> str:
        """A prompt as text, control tokens included, for a server that takes no token ids."""
        with self._tokenizer_lock:
            return self.lm.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _encode(self, text: str) -> list[int]:
        with self._tokenizer_lock:
            return encode_user_text(self.lm.tokenizer, text)
