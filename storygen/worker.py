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

The fair queue and the caller's side are shared with the remote pool (queue_front.py);
this module holds the local engine's lifecycle, the loop is in engine_loop.py, what
happens when something breaks in faults.py, and the caller's handle in handle.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Future

from storygen import model_thread
from storygen.config import StorygenConfig
from storygen.engine import Engine
from storygen.engine_loop import MAX_PREFILL_GROUP, EngineLoop
from storygen.errors import RequestCancelledError, StorygenError, WorkerUnavailableError
from storygen.faults import CAP_RECOVERY_STEPS, FaultHandling
from storygen.handle import StoryHandle
from storygen.jobs import SERVING, Job
from storygen.metrics import Metrics
from storygen.model import LoadedModel
from storygen.prompts import framing_ids
from storygen.queue_front import QueueFront
from storygen.stories import Story

__all__ = ["Worker", "StoryHandle", "MAX_PREFILL_GROUP"]

logger = logging.getLogger(__name__)

CPU_MAX_BATCH = 16  # past this a 2-core CPU gains little throughput and every story slows down
GPU_MAX_BATCH = 64
# Prompt tokens prefilled per engine turn (at least one request; at most MAX_PREFILL_GROUP).
# Prompts admitted in the same turn share one forward pass, which is cheaper than one each, but
# running stories wait for it and so does a newcomer who arrives meanwhile: on a 2-core CPU a
# group of four ~60-token prompts took ~0.17 s, and a newcomer behind a flood then waited up to
# 2.6 slot turnovers for its first token; about 128 tokens kept that near one. 64 since the genres'
# framings are computed ahead (STORYGEN_WARM_PREFIXES): prompts are then mostly short openings, 128
# tokens took three or four of them in one pass, and a newcomer behind a flood waited 1.97-2.60 slot
# turnovers; with 64, 1.15-1.39 (1.39-1.48 just after a start), for 1-4 % less throughput in a burst
# of 16 (benchmarks/README.md).
CPU_PREFILL_TOKENS = 64
GPU_PREFILL_TOKENS = 8192
# A prompt over that budget, alone or from a user with more waiting, is prefilled in pieces of this
# many tokens (engine_loop.py, _admit): a newcomer behind a flood waited for two whole ~150-token
# prefills, now for a piece and their own. 32, not 64, since decoding got faster than prefill: the
# newcomer's wait went from 1.49-1.94 to 1.43-1.56 slot turnovers, with the same throughput and a
# lone prompt's time to first token the same within noise (benchmarks/README.md).
CPU_PREFILL_PIECE = 32
GPU_PREFILL_PIECE = 0  # prompts never exceed the GPU's budget


class Worker(QueueFront, EngineLoop, FaultHandling):
    """Many users, one local model. Start it inside a running event loop."""

    def __init__(self, lm: LoadedModel, config: StorygenConfig, metrics: Metrics | None = None) -> None:
        super().__init__(lm, config, metrics)
        on_gpu = lm.device.type == "cuda"
        default_batch = GPU_MAX_BATCH if on_gpu else CPU_MAX_BATCH
        self.prefill_tokens = GPU_PREFILL_TOKENS if on_gpu else CPU_PREFILL_TOKENS
        self.prefill_piece = GPU_PREFILL_PIECE if on_gpu else CPU_PREFILL_PIECE
        self.engine = Engine(lm, config.max_batch or default_batch, prefix_cache_bytes=config.prefix_cache_mb * 2**20,
                             genre_steer=config.genre_steer)
        self.metrics.watch_prefix_cache(lambda: self.engine.prefix_cache)
        self.full_batch = self.engine.max_batch  # the cap an OOM lowers the engine's from, for a while
        self.cap_recovery_steps = CAP_RECOVERY_STEPS
        self._clean_steps = 0  # decode steps since the last OOM, while the cap is lowered
        self._aborts: dict[str, StorygenError] = {}  # running request id -> why it must stop
        self._engine_loop: Future[None] | None = None
        self._last_step = 0.0
        self._last_work = 0.0  # when the engine loop last admitted or stepped (or started): the framings wait for quiet
        self._framings = self._framings_to_warm()  # the engine loop's, from start() on

    def _framings_to_warm(self) -> list[list[int]]:
        """Each genre's framing at the default length (prompts.framing_ids), for the engine loop to compute
        into the prefix cache while it is idle: after a restart, the first story of each genre then
        prefills only its opening (for the default model ~10-40 tokens, not ~120)."""
        cache, lm = self.engine.prefix_cache, self.lm
        if not self.config.warm_prefixes or cache is None:
            return []
        length = self.config.defaults.length
        ids = [framing_ids(lm.spec, lm.tokenizer, genre, length) for genre in lm.spec.allowed_genres()]
        return [framing for framing in ids if len(framing) >= cache.block_tokens]

    @property
    def warming(self) -> bool:
        """Whether some genre's framing is still to be computed ahead."""
        return bool(self._framings)

    @property
    def capacity(self) -> int:
        return self.engine.max_batch

    def _wake(self) -> None:
        self._cond.notify()

    def _abort_running(self, request_id: str) -> None:
        self._aborts[request_id] = RequestCancelledError()
        self._cond.notify()

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._state = "running"
        self._last_step = self._last_work = time.monotonic()
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
            self._fail_all(WorkerUnavailableError("shutting down"))
            self._state = "stopped"

    def health(self) -> dict:
        with self._cond:
            stalled = self._state in SERVING and self.engine.rows and time.monotonic() - self._last_step > 60
            return {
                "state": "stalled" if stalled else self._state, "backend": "local",
                "queued": len(self._queue), "running": len(self.engine.rows), "max_batch": self.engine.max_batch,
                "last_error": self._last_error, **self._faults,
            }

    def _settle(self, job: Job, story: Story | None, error: BaseException | None, state: str,
                admitted: bool = True, outcome: str | None = None) -> None:
        self._aborts.pop(job.prepared.request.request_id, None)
        super()._settle(job, story, error, state, admitted, outcome)
