"""What the worker does when something breaks: a failed request, running out of memory, a crashed loop.

A request's own failure fails that request alone, with a ref the user sees and the log keeps
with the traceback. Running out of memory lowers the running cap and re-queues the newest
rows, which resume from their tokens; the cap climbs back once memory allows. A crash of the
engine loop itself fails everyone waiting and marks the worker failed.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future

import torch

from storygen.errors import GenerationFailedError, WorkerUnavailableError, failure_reference
from storygen.jobs import UNAVAILABLE, Job

logger = logging.getLogger(__name__)

# After running out of memory lowered the running cap, this many steps without another OOM
# raise it by one, back up to the configured cap: stories get shorter, memory frees up.
CAP_RECOVERY_STEPS = 256


class FaultHandling:
    """The fault half of Worker (a mixin: Worker holds the state it uses)."""

    def _engine_loop_ended(self, future: Future[None]) -> None:
        """A bug in the loop itself, not a request's failure: say so to everyone waiting, and refuse new ones."""
        if (error := future.exception()) is None:
            return
        self._last_error = f"engine loop crashed: {type(error).__name__}"
        logger.critical("the engine loop crashed; the worker is down", exc_info=error)
        with self._cond:
            self._state = "failed"
            self._fail_all(WorkerUnavailableError(UNAVAILABLE["failed"]))


    def _fail(self, job: Job, error: BaseException) -> None:
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

