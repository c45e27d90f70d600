"""The static decode step that CUDA graphs replay (storygen/graphs.py), run as it is on the CPU.

What a GPU adds, the recording and the replays, benchmarks/device_check.py checks there. Here:
the static step's arithmetic equals the lean step's, the engine writes the same stories through
it while rows join, leave and outgrow its buffers, its buffers stay put from batch to batch, and
the step traces as one graph, without a break (what stops a CUDA graph stops a trace too).
"""

from __future__ import annotations

import logging

import pytest
import torch

from storygen import graphs
from storygen.config import Env, StorygenConfig
from storygen.decoder import LeanDecoder
from storygen.engine import Engine, Sequence, SequenceError
from storygen.errors import ConfigError
from storygen.model import load_model
from storygen.sampling import SamplingParams
from tests.conftest import tiny_config

PROMPTS = [[5, 6, 7], [8] * 9, [10, 11], [12, 13, 14, 15, 16], [17, 18, 19, 20], [21] * 3]


@pytest.fixture(scope="module")
def lm(tiny_dirs, tmp_path_factory):
    return load_model(tiny_config(tiny_dirs["instruct"], "instruct", tmp_path_factory.mktemp("graphs")))


def _stories(engine: Engine, params: SamplingParams, prompts: list[list[int]] = PROMPTS) -> list[list[int]]:
    """Rows joining at different times and leaving at different lengths: steps alone, padded, after leavers."""
    seqs = [Sequence(f"s{i}", prompt, SamplingParams(**{**vars(params), "length": params.length + 3 * i}))
            for i, prompt in enumerate(prompts)]
    engine.start(seqs[0])
    engine.step()  # alone: no mask
    engine.start_many(seqs[1:3])  # left-padded now
    for _ in range(4):
        engine.step()
    engine.start_many(seqs[3:])
    while engine.rows:
        engine.step()
    return [seq.generated for seq in seqs]


def test_it_is_on_only_where_a_gpu_runs_the_lean_step(lm):
    assert lm.decoder is not None and not lm.cuda_graphs  # a CPU: nothing to record
    assert not graphs.can_use(lm.decoder, torch.device("cpu"))
    assert graphs.can_use(lm.decoder, torch.device("cuda"))
    assert not graphs.can_use(lm.decoder, torch.device("cuda"), "false")
    assert not graphs.can_use(None, torch.device("cuda"))  # transformers' forward: nothing of ours to record
    assert Engine(lm, 4)._graphs is None


@pytest.mark.parametrize("params", [SamplingParams(length=12, greedy=True),
                                    SamplingParams(length=12, temperature=0.9, top_k=20, seed=3)])
def test_the_engine_writes_the_same_stories_through_it(lm, params):
    engine = Engine(lm, 8, static_decode=True)
    assert engine._graphs is not None and not engine._graphs.record
    assert _stories(engine, params) == _stories(Engine(lm, 8), params)


def test_with_the_prefix_cache_too(lm):
    params = SamplingParams(length=10, greedy=True)
    want = _stories(Engine(lm, 8), params)
    engine = Engine(lm, 8, prefix_cache_bytes=2**20, static_decode=True)
    assert _stories(engine, params) == want
    assert _stories(engine, params) == want  # the 9-token prompt starts from a cached block now
    assert engine.prefix_cache.hits


def test_its_buffers_outlive_a_batch_and_grow_only_when_outgrown(lm):
    engine = Engine(lm, 4, static_decode=True)
    runner = engine._graphs
    params = SamplingParams(length=5, greedy=True)
    _stories(engine, params, PROMPTS[:4])
    keys = runner.buffers[0][0]
    columns = keys.shape[2]
    assert keys.shape[0] == 4  # room for twice the rows that ran (3 joined a story alone), up to the cap
    assert columns >= graphs.MIN_COLUMNS and columns & (columns - 1) == 0
    _stories(engine, params, PROMPTS[:4])  # a new batch on the same buffers
    assert runner.buffers[0][0] is keys
    # A story longer than the buffers' columns: they are made again, wider, and it reads the same.
    long = [[8, 9, 10] * (columns // 3 + 5)]
    want = _stories(Engine(lm, 4), params, long)
    assert _stories(engine, params, long) == want
    assert runner.buffers[0][0].shape[2] > columns
    assert all(k.shape == runner.buffers[0][0].shape for k, _ in runner.buffers)


def test_its_rows_grow_with_the_batch_as_the_eager_steps_do(lm):
    """Room for twice the running rows, up to the cap: a few stories on a GPU with a large model do not
    hold the cap's rows of buffers."""
    params = SamplingParams(length=30, greedy=True)
    stories, rows = {}, []
    for static in (False, True):
        engine = Engine(lm, 16, static_decode=static)
        seqs = [Sequence(f"s{i}", [5 + i, 6, 7], params) for i in range(6)]
        engine.start(seqs[0])
        engine.step()
        if static:
            rows.append(engine._graphs.buffers[0][0].shape[0])
        engine.start_many(seqs[1:])
        engine.step()
        if static:
            rows.append(engine._graphs.buffers[0][0].shape[0])
        while engine.rows:
            engine.step()
        stories[static] = [seq.generated for seq in seqs]
    assert rows == [2, 12]  # one story: room for two; six: room for twelve, not the cap's sixteen
    assert stories[True] == stories[False]


def test_columns_dropped_on_the_left_are_reclaimed_before_a_larger_bucket(lm):
    """A long row leaves, the padding columns go by moving the start; the step then compacts the
    batch back to column 0 rather than read a larger bucket of columns."""
    engine = Engine(lm, 4, static_decode=True)
    reference = Engine(lm, 4)
    seqs = {}
    for name, eng in (("static", engine), ("eager", reference)):
        short = Sequence("short", [5, 6], SamplingParams(length=40, greedy=True))
        long = Sequence("long", list(range(3, 50)), SamplingParams(length=2, greedy=True))
        eng.start_many([short, long])
        while len(eng.rows) > 1:
            eng.step()
        seqs[name] = short
    layer = engine._cache.layers[0]
    assert layer._start > 0  # the long prompt's columns were dropped as padding
    while engine.rows:
        engine.step()
        reference.step()
        assert graphs.bucket(layer._start + layer.keys.shape[-2], graphs.MIN_COLUMNS) == \
            graphs.bucket(layer.keys.shape[-2], graphs.MIN_COLUMNS)
    assert seqs["static"].generated == seqs["eager"].generated


def test_one_step_gives_the_lean_steps_logits_with_padding_rows(lm):
    """Three rows run the bucket of four: the padding row changes nothing, and its logits are dropped."""
    engine, reference = Engine(lm, 8, static_decode=True), Engine(lm, 8)
    for eng in (engine, reference):
        eng.start_many([Sequence(f"r{i}", p, SamplingParams(length=20, greedy=True)) for i, p in enumerate(PROMPTS[:3])])
    with torch.inference_mode():
        got = engine._forward_decode()
        want = reference._forward_decode()
    assert got.shape == want.shape == (3, lm.vocab_size)
    assert (got - want).abs().max().item() < 1e-4


def test_a_capture_that_fails_leaves_the_steps_to_run_without_graphs(lm, caplog):
    """Here a capture fails as it would on a GPU whose driver refuses one: the CPU has no CUDA streams."""
    params = SamplingParams(length=12, greedy=True)
    want = _stories(Engine(lm, 8), params)
    engine = Engine(lm, 8, static_decode=True)
    engine._graphs.record = True
    with caplog.at_level(logging.WARNING, logger="storygen.graphs"):
        assert _stories(engine, params) == want
    assert not engine._graphs.record and engine._graphs.captures == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "storygen.graphs"]
    assert len(warnings) == 1 and "decode steps run without graphs" in warnings[0]


def test_buffers_that_do_not_fit_stop_the_static_steps_and_the_stories_go_on_eagerly(lm, caplog, monkeypatch):
    """The static step's buffers take the whole cap's rows, where the eager step makes room for the rows it
    runs: when they do not fit, that step fails as any step out of memory does, and the steps after it
    run eagerly on the same cache."""
    params = SamplingParams(length=12, greedy=True)
    prompts = [PROMPTS[0], list(range(3, 150))]  # the second outgrows the first's buffers
    seqs = {name: [Sequence(f"{name}{i}", p, params) for i, p in enumerate(prompts)] for name in ("eager", "static")}
    engines = {"eager": Engine(lm, 4), "static": Engine(lm, 4, static_decode=True)}
    runner = engines["static"]._graphs
    for name, engine in engines.items():
        engine.start(seqs[name][0])
        engine.step()
    assert runner.active and runner.buffers[0][0] is not None

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(runner, "_allocate", out_of_memory)
    with caplog.at_level(logging.WARNING, logger="storygen"):
        with pytest.raises(SequenceError, match="out of memory"):
            engines["static"].start(seqs["static"][1])  # joining needs wider buffers, which do not fit
        for name, engine in engines.items():
            engine.start(seqs[name][1])  # the worker queues it again (engine_loop._start): it joins eagerly
            while engine.rows:
                engine.step()
    assert not runner.active and runner.buffers[0][0] is None
    assert [s.generated for s in seqs["static"]] == [s.generated for s in seqs["eager"]]
    warnings = [r.getMessage() for r in caplog.records if r.name == "storygen.graphs"]
    assert len(warnings) == 1 and "do not fit in memory" in warnings[0]


def test_a_replay_must_agree_with_the_step_within_rounding():
    want = torch.tensor([[4.0, -2.0, 0.5]])
    assert graphs.agree(want.clone(), want)
    assert graphs.agree(want + 0.03, want)  # bf16 rounding of logits near 4
    assert not graphs.agree(want + torch.tensor([[0.0, 0.0, 0.2]]), want)
    assert not graphs.agree(torch.full_like(want, float("nan")), want)


def test_the_static_step_traces_as_one_graph(tiny_dirs, tmp_path):
    """torch.compile with fullgraph=True fails on what a CUDA graph can't hold: a host sync (.item(),
    .tolist()), a branch on a tensor's value, a shape taken from data."""
    # Plain linear layers, as on a GPU (not packed for oneDNN, which a trace can't see into).
    lm = load_model(tiny_config(tiny_dirs["instruct"], "instruct", tmp_path, onednn="false"))
    decoder = LeanDecoder(lm.model)  # torch ops only: no C kernels, as on a GPU
    rows, columns = 4, graphs.MIN_COLUMNS
    config = lm.model.config
    heads = config.num_key_value_heads
    dim = config.hidden_size // config.num_attention_heads
    keys = [torch.zeros(rows, heads, columns, dim) for _ in decoder.parts.layers]
    values = [torch.zeros(rows, heads, columns, dim) for _ in decoder.parts.layers]
    ids, positions = torch.tensor([3, 4, 5, 6]), torch.tensor([0, 0, 0, 0])
    mask = torch.zeros(rows, columns, dtype=torch.bool)
    mask[:, 0] = True
    column = torch.tensor([0])
    torch._dynamo.reset()
    traced = torch.compile(decoder.static_step, fullgraph=True, backend="eager")
    with torch.inference_mode():
        want = decoder.static_step(ids, positions, mask, column, keys, values)
        got = traced(ids, positions, mask, column, keys, values)
    assert torch.equal(got, want)
    torch._dynamo.reset()


def test_the_setting():
    assert StorygenConfig.from_env(Env({}, env_file=None)).cuda_graphs == "auto"
    assert StorygenConfig.from_env(Env({"STORYGEN_CUDA_GRAPHS": "false"}, env_file=None)).cuda_graphs == "false"
    with pytest.raises(ConfigError, match="STORYGEN_CUDA_GRAPHS='yes' is not allowed; choose one of: auto, false"):
        StorygenConfig.from_env(Env({"STORYGEN_CUDA_GRAPHS": "yes"}, env_file=None))
