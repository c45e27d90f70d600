import asyncio
import time
from dataclasses import replace

import pytest
from prometheus_client.parser import text_string_to_metric_families
import torch

from storygen import model_thread
from storygen.engine import Engine
from storygen.errors import (DeadlineExceededError, GenerationFailedError, QueueFullError, RequestCancelledError,
                             TooManyRequestsError, WorkerUnavailableError)
from storygen.sampling import SamplingParams
from storygen.stories import StoryRequest, generate_story, prepare
from storygen.worker import Worker
from tests.conftest import tiny_config, until
from tests.model_hooks import endless, gate  # noqa: F401  (fixtures)

GREEDY = SamplingParams(length=20, greedy=True, repetition_penalty=1.0)


@pytest.fixture
def lm(tiny_lms):
    return tiny_lms["instruct"]


def _config(lm, tmp_path, **changes):
    return tiny_config(lm.name, "instruct", tmp_path, **changes)


def _request(i, user="api:u", prompt=None, params=GREEDY, **kw):
    return StoryRequest(f"r{i}", user, "drama", prompt or f"Once upon a time number {i}", params, **kw)


async def test_streams_then_resolves(lm, tmp_path):
    async with Worker(lm, _config(lm, tmp_path)) as worker:
        handle = await worker.submit(_request(1, params=SamplingParams(length=25, seed=4)))
        chunks = [chunk async for chunk in handle]
        story = await handle
    assert chunks and story.text.startswith("Once upon a time number 1")
    assert handle.state == "done" and story.seed == 4 and story.new_tokens <= 25


async def test_batched_worker_matches_sequential_greedy(lm, tmp_path):
    config = _config(lm, tmp_path, max_per_user=10)
    lengths = [20, 9, 30, 14, 25, 5]
    requests = [_request(i, params=replace(GREEDY, length=n)) for i, n in enumerate(lengths)]
    expected = [generate_story(Engine(lm, 1), prepare(r, lm, config)).text for r in requests]
    async with Worker(lm, replace(config, max_batch=4)) as worker:
        handles = [await worker.submit(r) for r in requests]
        stories = await asyncio.gather(*handles)
    assert [s.text for s in stories] == expected
    for handle, story in zip(handles, stories):
        assert story.request_id == handle.request_id


async def test_queued_prompts_are_prefilled_together_within_the_token_budget(lm, tmp_path, gate):
    # Without the prefix cache: the gate records what each prefill computes, here the whole prompts.
    async with Worker(lm, _config(lm, tmp_path, max_per_user=10, prefix_cache_mb=0)) as worker:
        gate.open.clear()  # the first request holds the engine in its prefill while the rest queue
        handles = [await worker.submit(_request(0))]
        await until(gate.entered.is_set)
        for i in range(1, 7):
            handles.append(await worker.submit(_request(i, prompt="Once " + "upon a time " * i)))
        lengths = [len(worker._jobs[h.request_id].seq.prompt_ids) for h in handles[1:]]
        worker.prefill_tokens = lengths[0] + lengths[1]  # room for the first two queued, not three
        gate.open.set()
        await asyncio.gather(*handles)
    queued_groups = gate.groups[1:]  # the first group is request 0 alone
    assert [n for group in queued_groups for n in group] == lengths  # FIFO order, each prefilled once
    assert queued_groups[0] == lengths[:2]  # two shared one pass; the third did not fit
    assert all(len(group) == 1 or sum(group) <= worker.prefill_tokens for group in queued_groups)


async def test_fair_order_newcomer_waits_one_slot(lm, tmp_path, gate):
    config = _config(lm, tmp_path, max_batch=1, max_per_user=30, prefix_cache_mb=0)  # whole prompts reach the gate
    async with Worker(lm, config) as worker:
        gate.open.clear()  # hold the engine while the queue fills
        flood = [await worker.submit(_request(i, "api:x", params=replace(GREEDY, length=3))) for i in range(6)]
        await until(lambda: len(gate.seen) == 1)  # x's first story is in the model
        newcomer = await worker.submit(_request(99, "api:y", params=replace(GREEDY, length=3)))
        assert newcomer.position == 0 and newcomer.eta_s > 0
        assert [h.position for h in flood[1:]] == [1, 2, 3, 4, 5]
        gate.open.set()
        await asyncio.gather(newcomer, *flood)
    prompts = [lm.tokenizer.decode(ids) for ids in gate.seen]
    assert "number 0" in prompts[0] and "number 99" in prompts[1]


async def test_a_flooders_long_prompt_goes_in_pieces_and_a_newcomer_waits_for_one_piece(lm, tmp_path, gate):
    config = _config(lm, tmp_path, max_batch=1, max_per_user=30)  # the prefix cache holds the pieces
    long = "Once upon a time " * 6
    flood = [_request(i, "api:x", prompt=f"{long}number {i}", params=replace(GREEDY, length=3)) for i in range(3)]
    newcomer = _request(99, "api:y", prompt=f"{long}and a newcomer", params=replace(GREEDY, length=3))
    expected = [generate_story(Engine(lm, 1), prepare(r, lm, config)).text for r in (*flood, newcomer)]
    gate.seen.clear()
    gate.groups.clear()
    async with Worker(lm, config) as worker:
        worker.prefill_tokens, worker.prefill_piece = 16, 8  # the tiny model's prompts are ~50 tokens
        gate.open.clear()  # hold the engine in x's first forward while y arrives
        handles = [await worker.submit(r) for r in flood]
        await until(gate.entered.is_set)
        handles.append(await worker.submit(newcomer))
        gate.open.set()
        stories = await asyncio.gather(*handles)
    newcomer_ids = prepare(newcomer, lm, config).prompt_ids
    assert gate.groups[0] == [8]  # a piece of x's first prompt, not the whole of it
    assert gate.seen[1] == newcomer_ids[-len(gate.seen[1]):] and len(gate.seen[1]) > 16  # then y's, whole
    assert [s.text for s in stories] == expected  # pieces change nothing in what is written


async def test_per_user_cap(lm, tmp_path, gate):
    async with Worker(lm, _config(lm, tmp_path, max_per_user=2)) as worker:
        gate.open.clear()
        first = await worker.submit(_request(1))
        await worker.submit(_request(2))
        with pytest.raises(TooManyRequestsError, match="you already have 2 stories in progress"):
            await worker.submit(_request(3))
        other = await worker.submit(_request(4, user="api:other"))  # others are not affected
        gate.open.set()
        await first
        await worker.submit(_request(5))  # a place is free again
        await other


async def test_global_queue_cap_answers_at_once(lm, tmp_path, gate):
    async with Worker(lm, _config(lm, tmp_path, max_batch=1, max_queue=2)) as worker:
        gate.open.clear()
        await worker.submit(_request(0, user="api:a"))
        await until(lambda: len(gate.seen) == 1)  # running, so not in the queue
        await worker.submit(_request(1, user="api:b"))
        await worker.submit(_request(2, user="api:c"))
        started = time.monotonic()
        with pytest.raises(QueueFullError, match=r"busy, try again in about \d+ s"):
            await worker.submit(_request(3, user="api:d"))
        assert time.monotonic() - started < 1  # no waiting for a place
        assert worker.metrics.snapshot()["requests"]["refused"] == 1
        gate.open.set()


async def test_cancelled_while_queued_never_reaches_the_model(lm, tmp_path, gate):
    async with Worker(lm, _config(lm, tmp_path, max_batch=1)) as worker:
        gate.open.clear()
        running = await worker.submit(_request(1, user="api:a"))
        await until(lambda: len(gate.seen) == 1)
        queued = await worker.submit(_request(2, user="api:b", prompt="A cancelled story about pelicans"))
        assert queued.cancel()
        with pytest.raises(RequestCancelledError):
            await queued
        gate.open.set()
        await running
    assert not any("pelicans" in lm.tokenizer.decode(ids) for ids in gate.seen)
    assert queued.state == "cancelled" and not queued.cancel()


async def test_cancelled_while_running_frees_the_slot(lm, tmp_path, endless):
    async with Worker(lm, _config(lm, tmp_path, max_batch=1)) as worker:
        long = await worker.submit(_request(1, params=SamplingParams(length=250, temperature=1.0, top_k=0,
                                                                     repetition_penalty=1.0)))
        await until(lambda: long.state == "running")
        waiting = await worker.submit(_request(2, user="api:b"))
        long.cancel()
        with pytest.raises(RequestCancelledError, match="cancelled"):
            await long
        await waiting  # got the slot
        assert worker.engine.rows == []


async def test_deadline_while_queued_and_while_running(lm, tmp_path, gate, endless):
    async with Worker(lm, _config(lm, tmp_path, max_batch=1)) as worker:
        gate.open.clear()
        first = await worker.submit(_request(1, user="api:a"))
        await until(lambda: len(gate.seen) == 1)
        late = await worker.submit(_request(2, user="api:b", prompt="An expired story about walruses",
                                            deadline=time.monotonic() + 0.05))
        await asyncio.sleep(0.1)
        gate.open.set()
        with pytest.raises(DeadlineExceededError, match="longer than"):
            await late
        await first
        gate.fail_when = lambda ids: time.sleep(0.01)  # 250 steps take seconds
        slow = await worker.submit(_request(3, params=SamplingParams(length=250, temperature=1.0, top_k=0),
                                            deadline=time.monotonic() + 0.3))
        with pytest.raises(DeadlineExceededError):
            await slow
    assert not any("walruses" in lm.tokenizer.decode(ids) for ids in gate.seen)


async def test_a_failing_prefill_fails_only_its_request(lm, tmp_path, gate, caplog):
    poison = lm.tokenizer.encode("zebra", add_special_tokens=False)[0]
    gate.fail_when = lambda ids: RuntimeError("boom") if ids.shape[1] > 1 and poison in ids[0].tolist() else None
    async with Worker(lm, _config(lm, tmp_path)) as worker:
        bad = await worker.submit(_request(1, user="api:a", prompt="zebra zebra zebra"))
        good = await worker.submit(_request(2, user="api:b"))
        with pytest.raises(GenerationFailedError, match=r"Story generation failed \(ref [0-9a-f]{4}\)") as caught:
            await bad
        assert (await good).text
        assert (await (await worker.submit(_request(3, user="api:c")))).text  # still serving
        health = worker.health()
    assert health["request_failures"] == 1 and health["state"] == "running"
    assert caught.value.ref in caplog.text and "boom" in caplog.text  # the log has the ref and the traceback


async def test_a_failing_decode_step_fails_that_batch_and_goes_on(lm, tmp_path, gate):
    calls = {"n": 0}

    def fail_third_decode(ids):
        if ids.shape[1] == 1:
            calls["n"] += 1
            if calls["n"] == 3:
                return RuntimeError("decode failed")
        return None

    gate.fail_when = fail_third_decode
    async with Worker(lm, _config(lm, tmp_path)) as worker:
        victim = await worker.submit(_request(1))
        with pytest.raises(GenerationFailedError):
            await victim
        assert (await (await worker.submit(_request(2)))).text
        assert worker.health()["step_failures"] == 1


async def test_out_of_memory_lowers_the_cap_retries_and_later_raises_it(lm, tmp_path, gate):
    gate.fail_when = lambda ids: torch.OutOfMemoryError("CUDA out of memory") if ids.shape[0] > 2 else None
    config = _config(lm, tmp_path, max_batch=4, max_per_user=10)
    async with Worker(lm, config) as worker:
        handles = [await worker.submit(_request(i, params=replace(GREEDY, length=15))) for i in range(4)]
        stories = await asyncio.gather(*handles)
        lowered = worker.health()
        gate.fail_when = None  # memory is free again
        worker.cap_recovery_steps = 5
        more = [await worker.submit(_request(10 + i, params=replace(GREEDY, length=15))) for i in range(4)]
        await asyncio.gather(*more)
        recovered = worker.health()
    assert all(s.text for s in stories)
    assert lowered["oom_events"] >= 1 and lowered["max_batch"] <= 2
    assert recovered["max_batch"] > lowered["max_batch"] and recovered["oom_events"] == lowered["oom_events"]


async def test_bad_requests_are_refused_before_queueing(lm, tmp_path):
    async with Worker(lm, _config(lm, tmp_path)) as worker:
        from storygen.errors import EmptyPromptError, SettingRangeError

        with pytest.raises(EmptyPromptError):
            await worker.submit(_request(1, prompt="   "))
        with pytest.raises(SettingRangeError):
            await worker.submit(_request(2, params=SamplingParams(length=0)))
        assert worker.queue_depth() == 0


async def test_stop_fails_what_is_left_and_refuses_new(lm, tmp_path, gate):
    worker = Worker(lm, _config(lm, tmp_path, max_batch=1))
    await worker.start()
    gate.open.clear()
    handles = [await worker.submit(_request(i, user=f"api:{i}")) for i in range(3)]
    await until(lambda: len(gate.seen) == 1)
    gate.open.set()
    await worker.stop()
    results = await asyncio.gather(*handles, return_exceptions=True)
    assert any(isinstance(r, WorkerUnavailableError) for r in results)
    with pytest.raises(WorkerUnavailableError):
        await worker.submit(_request(9))


async def test_metrics_after_some_stories(lm, tmp_path):
    async with Worker(lm, _config(lm, tmp_path, max_per_user=5)) as worker:
        await asyncio.gather(*[await worker.submit(_request(i)) for i in range(3)])
        snapshot = worker.metrics.snapshot()
        text = worker.metrics.to_prometheus()
    assert snapshot["requests"]["done"] == 3 and snapshot["tokens_total"] > 0
    assert snapshot["ttft_p50_s"] is not None and snapshot["latency_p95_s"] >= snapshot["ttft_p50_s"]
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["storygen_queue_depth"].samples[0].value == 0
    ttft = {(s.name, s.labels.get("frontend"), s.labels.get("le")): s.value for s in families["storygen_ttft_seconds"].samples}
    assert ttft[("storygen_ttft_seconds_bucket", "api", "+Inf")] == 3  # the requests' user keys are api:...
    stories = {(s.labels["frontend"], s.labels["outcome"]): s.value for s in families["storygen_stories"].samples
               if s.name == "storygen_stories_total"}
    assert stories[("api", "done")] == 3
    assert families["storygen_tokens_generated"].samples[0].value == snapshot["tokens_total"]


async def test_drain_refuses_newcomers_and_lets_stories_in_hand_finish(lm, tmp_path, gate):
    async with Worker(lm, _config(lm, tmp_path, max_per_user=5)) as worker:
        gate.open.clear()
        running = await worker.submit(_request(1))
        queued = await worker.submit(_request(2))
        await until(gate.entered.is_set)
        draining = asyncio.create_task(worker.drain(30))
        await until(lambda: worker.health()["state"] == "draining")
        with pytest.raises(WorkerUnavailableError, match="shutting down; try again shortly"):
            await worker.submit(_request(3))
        gate.open.set()
        assert await draining is True
        assert (await running).text and (await queued).text


async def test_drain_gives_up_after_its_grace_and_stop_fails_the_rest(lm, tmp_path, gate):
    async with Worker(lm, _config(lm, tmp_path)) as worker:
        gate.open.clear()
        stuck = await worker.submit(_request(1))
        await until(gate.entered.is_set)
        assert await worker.drain(0.2) is False
        asyncio.get_running_loop().call_later(0.2, gate.open.set)  # after stop() has begun
    with pytest.raises(WorkerUnavailableError, match="shutting down"):
        await stuck


async def test_a_crashed_engine_loop_fails_what_waits_and_refuses_new_requests(lm, tmp_path, gate, monkeypatch,
                                                                               caplog):
    async with Worker(lm, _config(lm, tmp_path, max_batch=1, max_per_user=5)) as worker:
        gate.open.clear()
        running = await worker.submit(_request(1))
        queued = await worker.submit(_request(2))
        await until(gate.entered.is_set)

        def broken(*args):
            raise KeyError("a bookkeeping bug")

        monkeypatch.setattr(worker, "_expire_and_abort", broken)  # the loop's next turn raises outside any request
        gate.open.set()
        for handle in (running, queued):
            with pytest.raises(WorkerUnavailableError, match="down after an internal error"):
                await handle
        assert worker.health()["state"] == "failed" and "KeyError" in worker.health()["last_error"]
        with pytest.raises(WorkerUnavailableError, match="down after an internal error"):
            await worker.submit(_request(3))
    assert "the engine loop crashed" in caplog.text and "a bookkeeping bug" in caplog.text
    assert model_thread.call(len, "free") == 4  # the model thread is free for a new worker
