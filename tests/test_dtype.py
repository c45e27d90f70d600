"""STORYGEN_DTYPE: auto serves bf16 on CPUs that multiply it in hardware, fp32 elsewhere; bf16 serves correctly."""

import pytest
import torch

import storygen.engine
from storygen.config import Env, StorygenConfig
from storygen.engine import Engine, Sequence
from storygen.model import cpu_has_bf16, load_model, pick_dtype
from storygen.sampling import SamplingParams
from tests.conftest import tiny_config

CPU = torch.device("cpu")
SAPPHIRE_RAPIDS = "fpu vme avx2 avx512f avx512bw amx_bf16 amx_tile amx_int8 avx512_bf16"
COOPER_LAKE = "fpu vme avx2 avx512f avx512bw avx512_bf16"
SKYLAKE = "fpu vme avx2 avx512f avx512bw avx512vl"


def _cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    return path


@pytest.mark.parametrize("flags, expected", [(SAPPHIRE_RAPIDS, True), (COOPER_LAKE, True), (SKYLAKE, False)])
def test_bf16_is_detected_from_the_cpu_flags(tmp_path, monkeypatch, flags, expected):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert cpu_has_bf16(_cpuinfo(tmp_path, flags)) is expected


def test_no_bf16_where_torch_does_not_use_avx512(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # e.g. ATEN_CPU_CAPABILITY=avx2
    assert not cpu_has_bf16(_cpuinfo(tmp_path, SAPPHIRE_RAPIDS))


def test_auto_follows_the_cpu_and_an_explicit_dtype_wins(monkeypatch):
    monkeypatch.setattr("storygen.model.cpu_has_bf16", lambda: True)
    assert pick_dtype("auto", CPU) == torch.bfloat16
    assert pick_dtype("float32", CPU) == torch.float32
    monkeypatch.setattr("storygen.model.cpu_has_bf16", lambda: False)
    assert pick_dtype("auto", CPU) == torch.float32
    assert pick_dtype("bfloat16", CPU) == torch.bfloat16 and pick_dtype("float16", CPU) == torch.float16


def test_dtype_setting():
    assert StorygenConfig.from_env(Env({}, env_file=None)).dtype == "auto"
    assert StorygenConfig.from_env(Env({"STORYGEN_DTYPE": "BFloat16"}, env_file=None)).dtype == "bfloat16"


@pytest.fixture(scope="module")
def bf16_lm(tiny_dirs, tmp_path_factory):
    return load_model(tiny_config(tiny_dirs["instruct"], "instruct", tmp_path_factory.mktemp("bf16"),
                                  dtype="bfloat16"))


def test_a_bf16_model_serves_through_the_engine(bf16_lm, monkeypatch):
    lm = bf16_lm
    assert lm.dtype == torch.bfloat16 and next(lm.model.parameters()).dtype == torch.bfloat16
    sampled_from = []

    def sample_next(logits, *args, **kwargs):
        sampled_from.append(logits.dtype)
        return real(logits, *args, **kwargs)

    real = storygen.engine.sample_next
    monkeypatch.setattr(storygen.engine, "sample_next", sample_next)
    engine = Engine(lm, max_batch=3)
    prompts = [lm.tokenizer(text).input_ids for text in ("Once upon a time", "The door", "After discovering time")]
    seqs = [Sequence(f"s{i}", ids, SamplingParams(length=12, temperature=0.9, seed=i)) for i, ids in enumerate(prompts)]
    engine.start_many(seqs)  # left-padded: prompts differ in length
    assert all(layer.keys.dtype == torch.bfloat16 for layer in engine._cache.layers)
    while engine.rows:
        engine.step()
    assert all(s.done and all(0 <= t < lm.vocab_size for t in s.generated) for s in seqs)
    assert sampled_from and set(sampled_from) == {torch.float32}  # top-p sums in bf16 would be coarse


def test_bf16_logits_stay_close_to_fp32(bf16_lm, tiny_lms):
    ids = bf16_lm.tokenizer("Once upon a time, in a kingdom far away", return_tensors="pt").input_ids
    with torch.inference_mode():
        half = bf16_lm.model(ids).logits.float()
        full = tiny_lms["instruct"].model(ids).logits
    assert (half - full).abs().max() < 0.05 * full.abs().max()
