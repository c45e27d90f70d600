"""The worker STORYGEN_BACKEND asks for: the local engine, or the fair queue in front of remote servers."""

from __future__ import annotations

from storygen import model_thread
from storygen.config import StorygenConfig
from storygen.metrics import Metrics
from storygen.model import load_model, load_tokenizer
from storygen.queue_front import QueueFront


async def open_worker(config: StorygenConfig, metrics: Metrics | None = None) -> QueueFront:
    """Load what the backend needs (the model, or only its tokenizer) and build its worker, not yet started."""
    if config.backend == "openai":
        from storygen.remote.worker import RemoteWorker  # the HTTP client is only needed here

        lm = await model_thread.run(load_tokenizer, config)
        return RemoteWorker(lm, config, metrics)
    from storygen.worker import Worker

    lm = await model_thread.run(load_model, config)  # on the thread that will decode: see model_thread
    return Worker(lm, config, metrics)
