"""The worker's engine loop, on the model thread: admit, prefill, step, fan out.

Like vLLM's engine core: each turn it applies cancellations and deadlines, admits queued
requests into free slots (in the fair queue's order, within a prefill budget), steps the
batch once, and hands the new text to each request's handle on the asyncio side.
`EngineLoop` is the half of `Worker` that runs there; it works on the worker's queue,
jobs and lock, which `worker.py` sets up.
"""

from __future__ import annotations

import logging
import time

import torch

from storygen.engine import SequenceError, StepOutput
from storygen.errors import DeadlineExceededError, RequestCancelledError, StorygenError
from storygen.handle import StoryHandle, fan_out
from storygen.jobs import SERVING, Job
from storygen.stories import finish

logger = logging.getLogger(__name__)

MAX_PREFILL_GROUP = 16  # prompts prefilled together in one turn, at most
# The genres' framings are computed ahead only after this long with nothing queued or running, so a
# burst of requests (at a start, say) is never behind a piece of them: with a piece in progress when
# a flood came, a newcomer behind it waited 1.65-2.04 slot turnovers, against 1.41-1.57 without.
WARM_AFTER_QUIET_S = 0.5


class EngineLoop:
    """The engine-loop half of Worker (a mixin: Worker holds the state it uses)."""

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._state in SERVING and not len(self._queue) and not self.engine.rows:
                    quiet = time.monotonic() - self._last_work
                    if self._framings and quiet >= WARM_AFTER_QUIET_S:
                        break
                    self._cond.wait(WARM_AFTER_QUIET_S - quiet if self._framings else None)
                if self._state not in SERVING:
                    return
                self._expire_and_abort(time.monotonic())
                admitted, piece = self._admit()
                idle = not admitted and not len(self._queue) and not self.engine.rows
            if admitted:
                self._start(admitted, piece)
            if self.engine.rows:
                self._step()
            if not idle:
                self._last_work = time.monotonic()
            elif self._framings:
                self._warm_framing()

    def _warm_framing(self) -> None:
        """Nothing has waited or run for a while: a piece of the next genre's framing into the prefix cache
        (as big as a long prompt's, so a request that comes meanwhile waits no longer than behind a flood).
        Framings take at most half the prefix cache, so they never push out what stories put there."""
        cache = self.engine.prefix_cache
        if cache is None or cache.bytes > cache.max_bytes // 2:
            self._framings.clear()
            return
        try:
            done = self.engine.cache_prefix(self._framings[0], self.prefill_piece or len(self._framings[0]))
        except Exception as error:  # stories fill the cache as they come, as they would without this
            logger.warning("computing the genres' framings ahead failed (%r); stories will compute them", error)
            self._framings.clear()
            return
        if not done:
            self._framings.pop(0)
            if not self._framings:
                logger.info("the genres' framings are in the prefix cache: %d blocks, %.1f MB",
                            len(cache), cache.bytes / 2**20)

    def _expire_and_abort(self, now: float) -> None:
        """Holding the lock: drop queued requests past their deadline, stop running ones that must stop."""
        self._expire_queued(now)
        for seq in list(self.engine.rows):
            job = self._jobs[seq.seq_id]
            reason = self._aborts.pop(seq.seq_id, None)
            if reason is None and now > job.deadline:
                reason = DeadlineExceededError(job.deadline - job.submitted)
            if reason is not None:
                self.engine.abort(seq.seq_id)
                self._settle_stopped(job, reason)
        self.metrics.queue_depth = len(self._queue)

    def _settle_stopped(self, job: Job, reason: StorygenError) -> None:
        """Holding the lock: an admitted job that had to stop (cancelled, or past its deadline) is settled."""
        state = "cancelled" if isinstance(reason, RequestCancelledError) else "failed"
        self._settle(job, None, reason, state, outcome="cancelled" if state == "cancelled" else "expired")

    def _admit(self) -> tuple[list[Job], int]:
        """Holding the lock: the next jobs in fair order that fit the free slots and the prefill budget, and
        how many of the lone job's prompt tokens to prefill now (0: all of them).

        A prompt over the budget is prefilled whole, unless nobody else waits or its user has more
        waiting (a flood): then a piece first (Engine.prefill_part), and the job goes back to the head of
        its user's queue. A newcomer who arrives meanwhile waits for the piece, not the whole prompt,
        and is next in fair order; their own prompt runs whole, as their user has nothing else waiting.
        """
        admitted, tokens = [], 0
        room = min(self.engine.free_slots, MAX_PREFILL_GROUP)
        while len(admitted) < room and (peeked := self._queue.peek()) is not None:
            head = peeked[1]
            cost = self.engine.prefill_cost(head.seq)  # a cached prefix is not computed again
            if admitted and tokens + cost > self.prefill_tokens:
                break
            self._queue.pop()
            admitted.append(head)
            tokens += cost
        self.metrics.queue_depth = len(self._queue)
        piece = 0
        if len(admitted) == 1 and self.prefill_piece and tokens > self.prefill_tokens:
            if not len(self._queue) or self._queue.queued(admitted[0].prepared.request.user_key):
                piece = self.prefill_piece
        return admitted, piece

    def _start(self, jobs: list[Job], piece: int = 0) -> None:
        """Prefill the admitted jobs together; each one that fails, fails alone. piece: prefill only that
        many prompt tokens of the one job, then queue it again (see _admit)."""
        if piece and self._prefill_piece(jobs[0], piece):
            return
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

    def _prefill_piece(self, job: Job, tokens: int) -> bool:
        """A piece of the job's prompt into the prefix cache, and the job back at the head of its user's
        queue (or settled, if it was cancelled meanwhile). False: no piece was computed; start it whole."""
        try:
            if not self.engine.prefill_part(job.seq, tokens):
                return False
        except Exception as error:  # its whole prefill, next, fails or succeeds for it alone
            logger.warning("a piece of request %s's prompt failed (%r); prefilling it whole", job.seq.seq_id, error)
            return False
        with self._cond:
            reason = self._aborts.pop(job.seq.seq_id, None)
            if reason is None:
                # A flooder's piece was their turn, so whoever came meanwhile goes first; a lone
                # request's was not, so it keeps its place ahead of those who came after it.
                user = job.prepared.request.user_key
                self._queue.push_front(job.seq.seq_id, user, job, served=bool(self._queue.queued(user)))
                self.metrics.queue_depth = len(self._queue)
                return True
            self._settle_stopped(job, reason)
        return True

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
        finished: list[Job] = []
        with self._tokenizer_lock:
            for out in outputs:
                job = self._jobs[out.seq_id]
                if out.token_id is not None:
                    if job.first_token is None:
                        job.first_token = now
                        self.metrics.observe_ttft(now - job.submitted, job.prepared.request.user_key)
                    if delta := job.stream.push(out.token_id):
                        chunks.append((job.handle, delta))
                if out.finish_reason is not None:
                    finished.append(job)
        if chunks:  # one wake-up of the event loop per step, not one per row
            self._loop.call_soon_threadsafe(fan_out, chunks)
        self.metrics.tokens(sum(out.token_id is not None for out in outputs))
        for job in finished:
            self._complete(job, now)

    def _complete(self, job: Job, now: float) -> None:
        job.timings = {"queued_s": (job.first_token or now) - job.submitted, "total_s": now - job.submitted,
                       "ttft_s": (job.first_token or now) - job.submitted}
        service = now - (job.first_token or now)
        self._observe_service(service)
        self.metrics.observe_latency(now - job.submitted, job.prepared.request.user_key)
        try:
            with self._tokenizer_lock:
                story = finish(self.lm, job.prepared, job.seq, job.stream, job.timings)
        except StorygenError as error:
            with self._cond:
                self._settle(job, None, error, "failed")
            return
        with self._cond:
            self._settle(job, story, None, "done")

