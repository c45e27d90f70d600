"""The lean decode step for Llama-family models (storygen/decoder.py) against transformers' forward."""

from __future__ import annotations

import shutil

import pytest
import torch

from storygen import decoder, kernels
from storygen.config import Env, StorygenConfig
from storygen.engine import Engine, Sequence
from storygen.errors import ConfigError
from storygen.kvcache import new_cache
from storygen.model import load_model
from storygen.sampling import SamplingParams
from tests.conftest import tiny_config

PROMPTS = [[5, 6, 7], [8] * 9, [10, 11], [12, 13, 14, 15, 16]]


def _stories(lm, params: SamplingParams, engine: Engine | None = None) -> list[list[int]]:
    """Rows joining at different times, so steps run alone, aligned and left-padded."""
    engine = engine or Engine(lm, 4)
    seqs = [Sequence(f"s{i}", prompt, params) for i, prompt in enumerate(PROMPTS)]
    engine.start(seqs[0])
    engine.step()  # alone: no mask
    engine.start_many(seqs[1:3])  # the batch is left-padded now
    engine.step()
    engine.start(seqs[3])
    while engine.rows:
        engine.step()
    return [seq.generated for seq in seqs]


def _left_padded(lm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three prompts of different lengths, left-padded to one width: input ids, attention mask, position ids."""
    rows = [[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14]]
    width = max(map(len, rows))
    ids = torch.tensor([[lm.pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


@pytest.fixture(scope="module")
def lms(tiny_dirs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lean")
    return {mode: load_model(tiny_config(tiny_dirs["instruct"], "instruct", tmp, lean_decode=mode))
            for mode in ("auto", "false")}


def test_it_serves_llama_models_and_only_where_asked(lms, tiny_lms):
    assert isinstance(lms["auto"].decoder, decoder.LeanDecoder)
    assert lms["false"].decoder is None
    assert tiny_lms["genre_tags"].decoder is None  # GPT-2: transformers' forward
    assert not decoder.supports(tiny_lms["genre_tags"].model)


def test_one_step_gives_transformers_logits_for_left_padded_rows_at_different_positions(lms):
    lm = lms["auto"]
    model = lm.model
    ids, mask, positions = _left_padded(lm)
    with torch.inference_mode():
        ours, theirs = new_cache(model.config), new_cache(model.config)
        for cache in (ours, theirs):
            model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        step = {"input_ids": torch.tensor([[20], [21], [22]]), "position_ids": mask.sum(1, keepdim=True),
                "attention_mask": torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)}
        want = model(**step, cache=theirs, use_cache=True).logits
        got = lm.decoder(**step, cache=ours).logits
        assert got.shape == want.shape == (3, 1, lm.vocab_size)
        assert (got - want).abs().max().item() < 1e-4
        for mine, reference in zip(ours.layers, theirs.layers):  # the step appended the same keys and values
            assert torch.allclose(mine.keys, reference.keys, atol=1e-5)
            assert torch.allclose(mine.values, reference.values, atol=1e-5)


@pytest.mark.parametrize("params", [SamplingParams(length=14, greedy=True),
                                    SamplingParams(length=14, temperature=0.9, top_k=20, seed=3)])
def test_the_engine_writes_the_same_stories_with_it(lms, params):
    assert _stories(lms["auto"], params) == _stories(lms["false"], params)


def test_with_the_prefix_cache_too(lms):
    params = SamplingParams(length=10, greedy=True)
    want = _stories(lms["false"], params)
    engine = Engine(lms["auto"], 4, prefix_cache_bytes=2**20)
    assert _stories(lms["auto"], params, engine) == want
    assert engine.prefix_cache.hits == 0 and len(engine.prefix_cache)
    assert _stories(lms["auto"], params, engine) == want  # now the 9-token prompt starts from a cached block
    assert engine.prefix_cache.hits == 8


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("prefix", [[], [3, 4, 5, 6]])
def test_a_prefill_gives_transformers_logits_and_cache(lms, padded, prefix):
    """A prompt's forward (S tokens a row), left-padded or not, after a cached prefix or from nothing."""
    lm = lms["auto"]
    model = lm.model
    rows = [[7, 8, 9, 10, 11], [12, 13], [14, 15, 16]] if padded else [[7, 8, 9], [12, 13, 14], [17, 18, 19]]
    P, S = len(prefix), max(map(len, rows))
    ids = torch.tensor([[lm.pad_id] * (S - len(r)) + r for r in rows])
    mask = torch.cat([torch.ones(3, P, dtype=torch.long),
                      torch.tensor([[0] * (S - len(r)) + [1] * len(r) for r in rows])], dim=1)  # (3, P+S)
    positions = (mask.cumsum(1) - 1).clamp(min=0)[:, -S:]
    step = {"input_ids": ids, "position_ids": positions, "attention_mask": mask if padded else None}
    with torch.inference_mode():
        ours, theirs = new_cache(model.config), new_cache(model.config)
        if prefix:
            for cache in (ours, theirs):
                model(input_ids=torch.tensor([prefix] * 3), cache=cache, use_cache=True)
        want = model(**step, cache=theirs, use_cache=True, logits_to_keep=1).logits
        got = lm.decoder(**step, cache=ours).logits
    assert got.shape == want.shape == (3, 1, lm.vocab_size)
    assert (got - want).abs().max().item() < 1e-4
    real = mask.bool()[:, None, :, None]  # padding's keys and values are never read (the engine zeroes them)
    for mine, reference in zip(ours.layers, theirs.layers):
        assert mine.keys.shape == reference.keys.shape
        assert mine.keys.shape[:3] == (3, model.config.num_key_value_heads, P + S)
        assert torch.allclose(mine.keys * real, reference.keys * real, atol=1e-5)
        assert torch.allclose(mine.values * real, reference.values * real, atol=1e-5)


def test_in_bf16_it_stays_within_rounding_of_transformers(tiny_dirs, tmp_path):
    lm = load_model(tiny_config(tiny_dirs["instruct"], "instruct", tmp_path, dtype="bfloat16"))
    assert lm.decoder is not None
    model = lm.model
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.inference_mode():
        caches = [new_cache(model.config), new_cache(model.config)]
        for cache in caches:
            model(input_ids=ids, cache=cache, use_cache=True)
        step = {"input_ids": torch.tensor([[9]]), "position_ids": torch.tensor([[5]])}
        want = model(**step, cache=caches[1], use_cache=True).logits.float()
        got = lm.decoder(**step, cache=caches[0]).logits.float()
        assert (got - want).abs().max().item() < 0.05 * want.abs().max().item()
        prompt = {"input_ids": torch.tensor([[5, 9, 3, 8, 2, 7, 4]] * 2), "position_ids": torch.arange(7).expand(2, 7)}
        want = model(**prompt, cache=new_cache(model.config), use_cache=True, logits_to_keep=1).logits.float()
        got = lm.decoder(**prompt, cache=new_cache(model.config)).logits.float()
        assert (got - want).abs().max().item() < 0.05 * want.abs().max().item()
    if shutil.which("cc") or shutil.which("gcc"):
        assert lm.decoder.ops is not None  # the C layer ops (kernels.LayerOps) did this arithmetic


def test_the_setting():
    assert StorygenConfig.from_env(Env({}, env_file=None)).lean_decode == "auto"
    assert StorygenConfig.from_env(Env({"STORYGEN_LEAN_DECODE": "false"}, env_file=None)).lean_decode == "false"
    with pytest.raises(ConfigError, match="STORYGEN_LEAN_DECODE='fast' is not allowed"):
        StorygenConfig.from_env(Env({"STORYGEN_LEAN_DECODE": "fast"}, env_file=None))


def test_auto_serves_cpus_and_leaves_gpus_to_transformers_until_one_has_run_it(lms, tiny_lms):
    model = lms["auto"].model
    assert decoder.can_use(model, torch.device("cpu")) and decoder.can_use(model, torch.device("cuda"), "true")
    assert not decoder.can_use(model, torch.device("cuda")) and not decoder.can_use(model, torch.device("cpu"), "false")
    assert not decoder.can_use(tiny_lms["genre_tags"].model, torch.device("cpu"), "true")  # GPT-2


def test_fused_layers_compute_their_parts_side_by_side_on_shared_weights():
    from storygen.int8 import DualLinear, Int4Linear, _int4_grid

    torch.manual_seed(0)
    x = torch.randn(3, 64, dtype=torch.bfloat16)

    def on_grid(out: int) -> torch.nn.Linear:  # a layer whose weight is 4-bit already, as a Q4_1 GGUF's are
        layer = torch.nn.Linear(64, out, bias=False, dtype=torch.bfloat16)
        q, scale, low = _int4_grid(layer.weight.float())
        layer.weight.data = (q.reshape(out, 2, 32) * scale[..., None] + low[..., None]).reshape(out, 64).bfloat16()
        return layer

    for make in (lambda out: torch.nn.Linear(64, out, bias=False, dtype=torch.bfloat16),
                 lambda out: DualLinear(torch.nn.Linear(64, out, bias=False, dtype=torch.bfloat16)),
                 lambda out: Int4Linear(on_grid(out))):
        parts = [make(32), make(16), make(16)]
        with torch.inference_mode():
            want = torch.cat([part(x) for part in parts], dim=-1)
            fused = decoder.fuse(parts)
            got = fused(x)
            assert type(fused) is type(parts[0])
            assert torch.equal(got, want)  # the same arithmetic row by row, not merely close
            assert torch.equal(torch.cat([part(x) for part in parts], dim=-1), want)  # the parts still work
        dense = fused.dense if isinstance(fused, (DualLinear, Int4Linear)) else fused
        storage = dense.weight.untyped_storage().data_ptr()
        assert all((p.dense if hasattr(p, "dense") else p).weight.untyped_storage().data_ptr() == storage
                   for p in parts)  # no weight held twice

    mixed = [torch.nn.Linear(64, 16, bias=False), torch.nn.Linear(64, 16, bias=True)]
    with torch.inference_mode():
        assert torch.equal(decoder.fuse(mixed)(x.float()), torch.cat([m(x.float()) for m in mixed], dim=-1))


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")) or "avx512_bf16" not in (kernels.cpu_flags() or ()),
                    reason="our int4 and int8 kernels need a C compiler and AVX-512 BF16")
@pytest.mark.parametrize("int4", ["true", "false"])  # every block layer int4, or every one int8
def test_a_step_in_one_call_is_the_layer_loop_bit_for_bit(tiny_dirs, tmp_path, int4):
    lm = load_model(tiny_config(tiny_dirs["instruct"], "instruct", tmp_path, dtype="bfloat16", int4=int4))
    lean = lm.decoder
    assert lean._table is not None  # every layer's parts are on our kernels, so steps take the one call
    calls, stack = [], lean.stack
    lean.stack = lambda *args: (calls.append(args[1].shape[0]), stack(*args))[1]
    model = lm.model
    ids, mask, positions = _left_padded(lm)
    with torch.inference_mode():
        caches = [new_cache(model.config), new_cache(model.config)]
        for cache in caches:
            lean(input_ids=ids, position_ids=positions, cache=cache, attention_mask=mask)
        token, table = torch.tensor([[20], [21], [22]]), lean._table
        for step in range(4):
            mask = torch.cat([mask, mask.new_ones(3, 1)], dim=1)
            positions = positions[:, -1:] + 1
            one = lean(input_ids=token, position_ids=positions, cache=caches[0], attention_mask=mask).logits
            lean._table = None  # the Python loop over layers, part by part
            try:
                loop = lean(input_ids=token, position_ids=positions, cache=caches[1], attention_mask=mask).logits
            finally:
                lean._table = table
            assert torch.equal(one, loop), step
            token = one[:, -1].argmax(-1, keepdim=True)
    assert calls == [3] * 4
    for ours, theirs in zip(*(cache.layers for cache in caches)):
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
    # And the engine writes the same stories with it as without it.
    params = SamplingParams(length=12, temperature=0.9, top_k=20, seed=4)
    want = _stories(lm, params)
    lean._table = None
    assert _stories(lm, params) == want
