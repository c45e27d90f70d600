"""All model work in a process runs on one thread: loading, generate(), and the worker's engine loop."""

import threading

import pytest

from storygen import model_thread
from storygen.sampling import SamplingParams
from storygen.stories import StoryRequest
from storygen.worker import Worker
from tests.conftest import tiny_config


@pytest.fixture
def lm(tiny_lms):
    return tiny_lms["instruct"]


def test_calls_run_on_one_named_thread_and_raise_there():
    first = model_thread.call(threading.current_thread)
    assert first is not threading.current_thread() and first.name == "storygen-model"
    assert model_thread.call(threading.current_thread) is first
    assert model_thread.call(lambda: model_thread.call(model_thread.on_model_thread))  # nested: inline, no deadlock
    with pytest.raises(ZeroDivisionError):
        model_thread.call(lambda: 1 / 0)
    assert model_thread.call(sum, [1, 2], start=3) == 6  # the thread survived the exception


async def test_run_awaits_without_blocking_the_loop():
    assert await model_thread.run(lambda: threading.current_thread().name) == "storygen-model"


async def test_the_worker_decodes_on_the_model_thread_and_holds_it(lm, tmp_path):
    threads = set()
    hooks = [m.register_forward_pre_hook(lambda *_: threads.add(threading.current_thread().name))
             for m in (lm.model, lm.decoder) if m is not None]  # the lean forward (decoder.py) runs instead where set
    config = tiny_config(lm.name, "instruct", tmp_path)
    try:
        async with Worker(lm, config) as worker:
            request = StoryRequest("r1", "api:u", "drama", "Once", SamplingParams(length=5, seed=1))
            story = await (await worker.submit(request))
            with pytest.raises(RuntimeError, match="one worker per process owns the model"):
                model_thread.call(len, "waits for ever otherwise")
            second = Worker(lm, config)
            with pytest.raises(RuntimeError, match="the model thread is running the engine loop of worker"):
                await second.start()
            assert second.health()["state"] == "stopped"
    finally:
        for hook in hooks:
            hook.remove()
    assert story.new_tokens > 0 and threads == {"storygen-model"}
    assert model_thread.call(len, "free again") == 10  # stop() gave the thread back
