"""The prefix cache: longest cached prefix, blocks chained to their parents, a memory bound with LRU
eviction, and stories identical with and without it."""

import asyncio
import logging

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from storygen.config import Env, StorygenConfig
from storygen.errors import ConfigError
from storygen.engine import Engine, Sequence
from storygen.genres import get_genre
from storygen.prefix_cache import PrefixCache
from storygen.prompts import build_prompt, framing_ids
from storygen.sampling import SamplingParams
from storygen import engine_loop
from storygen.worker import Worker
from storygen.stories import StoryRequest, prepare
from tests.conftest import tiny_config, until
from tests.model_hooks import ModelGate

B = 4  # block size in the unit tests
LAYERS, HEADS, DIM = 2, 1, 3
BLOCK_BYTES = LAYERS * 2 * HEADS * B * DIM * 4


def kv_for(ids: list[int]) -> torch.Tensor:
    """Fake KV whose values name their token and position, so a test can see which blocks came back."""
    values = torch.tensor([[t * 1000 + i for i, t in enumerate(ids)]], dtype=torch.float32)  # (1, n)
    return values[None, None, :, :, None].expand(LAYERS, 2, HEADS, len(ids), DIM).clone()


def filled(ids: list[int], max_bytes: int = 10**6) -> PrefixCache:
    cache = PrefixCache(max_bytes, block_tokens=B)
    cache.insert(ids, kv_for(ids), 0)
    return cache


def test_the_longest_cached_prefix_comes_back_leaving_the_last_token():
    ids = list(range(1, 11))  # 10 tokens: blocks [1..4], [5..8]; [9, 10] is not full
    cache = filled(ids)
    assert len(cache) == 2 and cache.bytes == 2 * BLOCK_BYTES
    n, kv = cache.lookup(ids + [42, 43])
    assert n == 8 and torch.equal(kv, kv_for(ids)[:, :, :, :8])
    assert cache.lookup(ids[:8])[0] == 4  # the last token is always computed, so the second block is not used
    assert cache.lookup([1, 2, 3, 4, 99, 6, 7, 8, 9])[0] == 4  # differs in the second block
    assert cache.lookup([9, 9, 9, 9, 5, 6, 7, 8, 9]) == (0, None)  # second block's tokens, but after another first


def test_insert_after_a_hit_adds_only_the_new_blocks():
    cache = filled([1, 2, 3, 4, 5])
    row = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    n, _ = cache.lookup(row)
    assert n == 4
    cache.insert(row, kv_for(row)[:, :, :, n:], n)  # the KV of row[n:], as a prefill computes it
    assert len(cache) == 3
    n, kv = cache.lookup(row + [14])
    assert n == 12 and torch.equal(kv, kv_for(row)[:, :, :, :12])


def test_eviction_keeps_the_bound_and_takes_least_recently_used_leaves_first():
    cache = PrefixCache(3 * BLOCK_BYTES, block_tokens=B)
    a = [1, 1, 1, 1, 2, 2, 2, 2, 3]  # blocks a1, a2
    b = [1, 1, 1, 1, 5, 5, 5, 5, 6]  # shares a1, adds b2
    cache.insert(a, kv_for(a), 0)
    cache.insert(b, kv_for(b)[:, :, :, 4:], 4)
    assert len(cache) == 3
    cache.lookup(a)  # a is now the most recent; b2 the least
    c = [7, 7, 7, 7, 8]
    cache.insert(c, kv_for(c), 0)
    assert cache.bytes <= 3 * BLOCK_BYTES
    assert cache.lookup(a)[0] == 8 and cache.lookup(b)[0] == 4 and cache.lookup(c + [0])[0] == 4


def test_blocks_added_before_a_copy_runs_out_of_memory_can_still_be_evicted(monkeypatch):
    from storygen import prefix_cache

    real, made = prefix_cache._Block, []

    def second_fails(*args):
        if len(made) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        made.append(real(*args))
        return made[-1]

    cache = PrefixCache(BLOCK_BYTES, block_tokens=B)
    row = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    monkeypatch.setattr(prefix_cache, "_Block", second_fails)
    with pytest.raises(torch.OutOfMemoryError):
        cache.insert(row, kv_for(row), 0)
    monkeypatch.setattr(prefix_cache, "_Block", real)
    assert len(cache) == 1 and cache.bytes == BLOCK_BYTES
    other = [7, 7, 7, 7, 8]
    cache.insert(other, kv_for(other), 0)  # the bound holds one block: the first one goes
    assert len(cache) == 1 and cache.bytes == BLOCK_BYTES and cache.lookup(row)[0] == 0


def test_a_prefill_goes_on_when_its_blocks_do_not_fit_in_the_cache(tiny_lms, monkeypatch, caplog):
    lm = tiny_lms["instruct"]
    prompts = [build_prompt(lm.spec, lm.tokenizer, get_genre("drama"), o) for o in OPENINGS]
    expected, _ = _stories(lm, prompts, 0)

    def out_of_memory(self, ids, kv, start):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(PrefixCache, "insert", out_of_memory)
    with caplog.at_level(logging.WARNING, logger="storygen.engine"):
        got, engine = _stories(lm, prompts, 1 << 20)
    assert got == expected and len(engine.prefix_cache) == 0
    assert "not added to the prefix cache" in caplog.text


def test_a_chain_broken_since_the_lookup_is_not_extended():
    cache = PrefixCache(BLOCK_BYTES, block_tokens=B)
    row = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    cache.insert(row[:4], kv_for(row[:4]), 0)
    assert cache.lookup(row)[0] == 4
    cache.insert([7, 7, 7, 7], kv_for([7, 7, 7, 7]), 0)  # evicts the first block
    cache.insert(row, kv_for(row)[:, :, :, 4:], 4)  # its parent is gone: nothing to hang it on
    assert cache.lookup(row)[0] == 0 and cache.bytes <= BLOCK_BYTES


# --- in the engine: the same stories with and without it ------------------------------------------

OPENINGS = ["Once upon a time, in a kingdom far away, there lived a curious girl.",
            "Once upon a time, in a kingdom far away, there lived a curious girl. Then it ran away!",
            "Once upon a time, in a kingdom far away",
            "After discovering time travel, the scientist warned herself",
            "Once upon a time, in a kingdom far away, there lived a curious girl who said: \"We have to go now.\""]
PARAMS = [SamplingParams(length=14, greedy=True), SamplingParams(length=9, greedy=True, repetition_penalty=1.3),
          SamplingParams(length=20, greedy=True), SamplingParams(length=11, greedy=True, repetition_penalty=1.1),
          SamplingParams(length=16, temperature=0.9, seed=5)]


def _stories(lm, prompts, prefix_cache_bytes: int) -> tuple[list[list[int]], Engine]:
    """Two waves through one engine: a row alone, then the rest prefilled together while it runs."""
    engine = Engine(lm, max_batch=8, prefix_cache_bytes=prefix_cache_bytes)
    first = [Sequence("w0", prompts[0], PARAMS[0])]
    engine.start_many(first)
    engine.step()
    second = [Sequence(f"w{i}", ids, p) for i, (ids, p) in enumerate(zip(prompts[1:], PARAMS[1:]), start=1)]
    engine.start_many(second)
    while engine.rows:
        engine.step()
    third = [Sequence(f"again{i}", ids, p) for i, (ids, p) in enumerate(zip(prompts, PARAMS))]
    engine.start_many(third[:2])  # the same prompts again: now most of each is cached
    engine.start_many(third[2:])
    while engine.rows:
        engine.step()
    return [s.generated for s in first + second + third], engine


@pytest.mark.parametrize("kind", ["instruct", "genre_tags"])  # Llama (RoPE) and GPT-2 (learned positions)
def test_greedy_stories_are_the_same_with_and_without_the_cache(tiny_lms, kind):
    lm = tiny_lms[kind]
    prompts = [build_prompt(lm.spec, lm.tokenizer, get_genre("drama"), o) for o in OPENINGS]
    expected, _ = _stories(lm, prompts, 0)
    got, engine = _stories(lm, prompts, 1 << 20)
    assert got == expected
    assert engine.prefix_cache.hits >= 3 * 8  # it really reused blocks, in different rows of one prefill
    assert engine.prefill_cost(Sequence("x", prompts[1], PARAMS[0])) < len(prompts[1])


def test_a_cache_too_small_for_the_prompts_evicts_and_changes_nothing(tiny_lms):
    lm = tiny_lms["instruct"]
    prompts = [build_prompt(lm.spec, lm.tokenizer, get_genre("horror"), o) for o in OPENINGS]
    expected, _ = _stories(lm, prompts, 0)
    block = Engine(lm, 1, prefix_cache_bytes=1).prefix_cache.block_tokens
    kv = lm.model.config
    block_bytes = kv.num_hidden_layers * 2 * kv.num_key_value_heads * block * (kv.hidden_size // kv.num_attention_heads) * 4
    got, engine = _stories(lm, prompts, 3 * block_bytes)
    assert got == expected
    assert 0 < engine.prefix_cache.bytes <= 3 * block_bytes


def test_the_setting_and_the_worker(tiny_lms, tmp_path):
    assert StorygenConfig.from_env(Env({}, env_file=None)).prefix_cache_mb == 64
    assert StorygenConfig.from_env(Env({"STORYGEN_PREFIX_CACHE_MB": "0"}, env_file=None)).prefix_cache_mb == 0
    assert StorygenConfig.from_env(Env({"STORYGEN_PREFIX_CACHE_MB": "64"}, env_file=None)).prefix_cache_mb == 64
    lm = tiny_lms["instruct"]
    assert Worker(lm, tiny_config(lm.name, "instruct", tmp_path, prefix_cache_mb=0)).engine.prefix_cache is None
    assert Worker(lm, tiny_config(lm.name, "instruct", tmp_path)).engine.prefix_cache.max_bytes == 64 << 20
    worker = Worker(lm, tiny_config(lm.name, "instruct", tmp_path, prefix_cache_mb=8))
    assert worker.engine.prefix_cache.max_bytes == 8 << 20


async def test_stories_through_the_worker_are_the_same_with_the_cache(tiny_lms, tmp_path):
    lm = tiny_lms["instruct"]

    async def write(prefix_cache_mb: int) -> list[str]:
        config = tiny_config(lm.name, "instruct", tmp_path, prefix_cache_mb=prefix_cache_mb, max_per_user=10)
        async with Worker(lm, config) as worker:
            handles = [await worker.submit(StoryRequest(f"r{i}", "api:u", "drama", o, SamplingParams(length=12, seed=i)))
                       for i, o in enumerate(OPENINGS * 2)]
            return [(await h).text for h in handles]

    assert await write(4) == await write(0)


# --- The genres' framings, computed ahead while the worker is idle ------------------------------

def test_a_framing_is_what_every_prompt_of_its_genre_starts_with(tiny_lms):
    for kind, lm in tiny_lms.items():
        for genre in lm.spec.allowed_genres():
            framing = framing_ids(lm.spec, lm.tokenizer, genre, 120)
            prompt = build_prompt(lm.spec, lm.tokenizer, genre, "The moon <EOS> fell", 120)
            assert framing and prompt[:len(framing)] == framing and len(prompt) > len(framing), (kind, genre.name)


def test_cache_prefix_computes_whole_blocks_in_pieces_and_then_nothing(tiny_lms):
    lm = tiny_lms["instruct"]
    engine = Engine(lm, 1, prefix_cache_bytes=1 << 20)
    block = engine.prefix_cache.block_tokens
    ids = framing_ids(lm.spec, lm.tokenizer, get_genre("drama"))
    for length in (len(ids) // block * block, len(ids)):  # a whole number of blocks, then not
        engine.prefix_cache.clear()
        done = [engine.cache_prefix(ids[:length], 2 * block) for _ in range(length // (2 * block) + 2)]
        assert sum(done) == length // block * block and done[-1] == 0 and set(done[:-2]) == {2 * block}
        assert engine.prefix_cache.peek(ids[:length] + [0]) == length // block * block
        assert engine.prefix_cache.lookups == 0  # the metrics count prompts, not work done ahead
    # The KV computed ahead is the KV a prompt computes itself: the story is the same.
    prompt = build_prompt(lm.spec, lm.tokenizer, get_genre("drama"), OPENINGS[0])
    cold = Engine(lm, 1)
    stories = []
    for e in (engine, cold):
        seq = Sequence("s", prompt, PARAMS[0])
        e.start_many([seq])
        while e.rows:
            e.step()
        stories.append(seq.generated)
    assert engine.prefix_cache.hits >= len(ids) // block * block
    assert stories[0] == stories[1] and stories[0]


def _warm_config(lm, tmp_path, **changes):
    return tiny_config(lm.name, "instruct", tmp_path, warm_prefixes=True, max_per_user=10, **changes)


async def test_an_idle_worker_computes_each_genres_framing_and_stories_start_from_it(tiny_lms, tmp_path):
    lm = tiny_lms["instruct"]
    genres = lm.spec.allowed_genres()
    framings = [framing_ids(lm.spec, lm.tokenizer, g, 10) for g in genres]  # at the default length, as the stories'
    defaults = SamplingParams(length=10)
    requests = [StoryRequest(f"r{i}", "api:u", g.name, OPENINGS[i % len(OPENINGS)], SamplingParams(length=10, seed=i))
                for i, g in enumerate(genres[:4])]

    async def write(config) -> tuple[list[str], Worker]:
        async with Worker(lm, config) as worker:
            await until(lambda: not worker.warming)
            return [(await h).text for h in [await worker.submit(r) for r in requests]], worker

    cold, cold_worker = await write(tiny_config(lm.name, "instruct", tmp_path, max_per_user=10, defaults=defaults))
    warm, worker = await write(_warm_config(lm, tmp_path, defaults=defaults))
    assert warm == cold  # nothing changes but when the work is done
    cache, block = worker.engine.prefix_cache, worker.engine.prefix_cache.block_tokens
    assert all(cache.peek(f + [0]) == len(f) // block * block for f in framings)
    # Each story's prompt found its whole framing's blocks, where the cold worker's first of each genre did not.
    assert cache.hits >= sum(len(f) // block * block for f in framings[:4]) > cold_worker.engine.prefix_cache.hits


async def test_a_request_waits_for_one_piece_of_a_framing_not_all_of_them(tiny_lms, tmp_path, caplog):
    lm = tiny_lms["instruct"]
    gate = ModelGate(lm.model, lm.decoder)
    try:
        caplog.set_level(logging.INFO, logger="storygen")
        gate.open.clear()  # hold the engine in its first piece of a framing
        worker = Worker(lm, _warm_config(lm, tmp_path))
        worker.prefill_piece = 8
        async with worker:
            await until(gate.entered.is_set)
            pieces_before = len(worker._framings)
            request = StoryRequest("r", "api:u", "drama", OPENINGS[0], SamplingParams(length=5, seed=1))
            handle = await worker.submit(request)
            gate.open.set()
            await handle
            assert gate.groups[0] == [8] and len(gate.groups[1]) == 1  # one piece, then the request's prefill
            assert pieces_before >= 2
            await until(lambda: not worker.warming)  # and after it, the rest of the framings
        assert "framings are in the prefix cache" in caplog.text
    finally:
        gate.close()


async def test_the_framings_wait_for_a_quiet_spell_so_a_burst_at_start_goes_first(tiny_lms, tmp_path, monkeypatch):
    lm = tiny_lms["instruct"]
    monkeypatch.setattr(engine_loop, "WARM_AFTER_QUIET_S", 1.0)
    first = lm.spec.allowed_genres()[0]
    assert first.name != "drama"
    async with Worker(lm, _warm_config(lm, tmp_path)) as worker:
        framing = framing_ids(lm.spec, lm.tokenizer, first, worker.config.defaults.length)
        cache, block = worker.engine.prefix_cache, worker.engine.prefix_cache.block_tokens
        requests = [StoryRequest(f"r{i}", f"api:u{i}", "drama", OPENINGS[i], SamplingParams(length=4, seed=i))
                    for i in range(2)]
        await asyncio.sleep(0.3)  # a burst soon after the start: with no wait, the framings would be done by now
        await asyncio.gather(*[await worker.submit(r) for r in requests])
        during = cache.peek(framing + [0])
        await until(lambda: not worker.warming)
        after = cache.peek(framing + [0])
    prompt = prepare(requests[0], lm, worker.config).prompt_ids
    shared = next(i for i, (a, b) in enumerate(zip(framing, prompt)) if a != b)  # the chat template's start
    assert during <= shared // block * block  # only what the drama stories computed: no framing went first
    assert after == len(framing) // block * block  # and in the quiet after them, it was computed


async def test_framings_take_at_most_half_the_cache_and_a_failure_leaves_them_to_stories(tiny_lms, tmp_path, caplog):
    lm = tiny_lms["instruct"]
    worker = Worker(lm, _warm_config(lm, tmp_path))
    framings = list(worker._framings)
    cache = worker.engine.prefix_cache
    kv = lm.model.config
    block_bytes = (kv.num_hidden_layers * 2 * kv.num_key_value_heads * cache.block_tokens
                   * (kv.hidden_size // kv.num_attention_heads) * 4)
    cache.max_bytes = 2 * (len(framings[0]) + 2 * cache.block_tokens) // cache.block_tokens * block_bytes
    async with worker:
        await until(lambda: not worker.warming)
    assert cache.peek(framings[0] + [0]) > 0 and cache.peek(framings[-1] + [0]) < len(framings[-1]) - cache.block_tokens
    assert cache.bytes <= cache.max_bytes // 2 + worker.prefill_piece // cache.block_tokens * block_bytes  # a piece over

    gate = ModelGate(lm.model, lm.decoder)
    gate.fail_when = lambda ids: RuntimeError("boom")
    try:
        worker = Worker(lm, _warm_config(lm, tmp_path))
        async with worker:
            await until(lambda: not worker.warming)
            gate.fail_when = None
            story = await (await worker.submit(StoryRequest("r", "api:u", "drama", OPENINGS[0],
                                                            SamplingParams(length=5, seed=1))))
        assert story.text.startswith(OPENINGS[0]) and len(worker.engine.prefix_cache) > 0  # the story's own blocks
        assert "computing the genres' framings ahead failed (RuntimeError('boom'))" in caplog.text
    finally:
        gate.close()


def test_the_warm_up_setting():
    assert StorygenConfig.from_env(Env({}, env_file=None)).warm_prefixes is True
    assert StorygenConfig.from_env(Env({"STORYGEN_WARM_PREFIXES": "false"}, env_file=None)).warm_prefixes is False
    with pytest.raises(ConfigError, match="STORYGEN_WARM_PREFIXES='later' is not a boolean; use true or false"):
        StorygenConfig.from_env(Env({"STORYGEN_WARM_PREFIXES": "later"}, env_file=None))


async def test_the_prefix_cache_is_reported_to_prometheus(tiny_lms, tmp_path):
    lm = tiny_lms["instruct"]
    requests = [StoryRequest(f"r{i}", "api:u", "drama", o, SamplingParams(length=4, seed=i))
                for i, o in enumerate(OPENINGS[:3])]

    async def scrape(prefix_cache_mb: int) -> tuple[dict[str, float], Worker]:
        async with Worker(lm, tiny_config(lm.name, "instruct", tmp_path, prefix_cache_mb=prefix_cache_mb)) as worker:
            for request in requests:  # one at a time: each later prompt finds the framing the first computed
                await (await worker.submit(request))
            text = worker.metrics.to_prometheus()
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name.startswith("storygen_prefix_cache")}, worker

    figures, worker = await scrape(4)
    prompts = [prepare(r, lm, worker.config).prompt_ids for r in requests]
    assert figures["storygen_prefix_cache_queried_tokens_total"] == sum(map(len, prompts))
    assert 0 < figures["storygen_prefix_cache_hit_tokens_total"] == worker.engine.prefix_cache.hits
    assert figures["storygen_prefix_cache_bytes"] == worker.engine.prefix_cache.bytes > 0
    assert (await scrape(0))[0] == {}  # no cache, no figures
