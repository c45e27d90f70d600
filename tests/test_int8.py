"""The int8 copies of the weights for small batches (storygen/int8.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from storygen.config import Env, StorygenConfig
from storygen.errors import ConfigError
from storygen.int8 import (INT4_GROUP, INT4_ROWS, SMALL_ROWS, DualLinear, Int4Linear, add_int8_copies, can_use,
                           can_use_int4, on_int4_grid)
from storygen.model import load_model
from tests.conftest import tiny_config


def test_small_calls_go_through_int8_and_big_ones_through_the_layer_as_it_was():
    torch.manual_seed(0)
    dense = nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    dual = DualLinear(dense)
    small = torch.randn(1, SMALL_ROWS, 64, dtype=torch.bfloat16)
    big = torch.randn(2, SMALL_ROWS, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(dual(big), dense(big))  # more rows: exactly the dense layer
        got, want = dual(small).float(), dense(small).float()
    assert got.shape == want.shape == (1, SMALL_ROWS, 48)
    assert not torch.equal(got, want)  # it did take the int8 path
    assert ((got - want).norm() / want.norm()).item() < 0.02  # per-row int8: within rounding
    assert dual.weight is dense.weight and dual.out_features == 48


def test_it_is_used_where_asked_and_the_model_still_writes(tiny_dirs, tmp_path):
    cpu = torch.device("cpu")
    assert can_use(cpu, torch.bfloat16) and not can_use(cpu, torch.float32)
    assert can_use(cpu, torch.float32, "true") and not can_use(cpu, torch.bfloat16, "false")
    assert not can_use(torch.device("cuda"), torch.bfloat16)
    lm = load_model(tiny_config(tiny_dirs["instruct"], "instruct", tmp_path, dtype="bfloat16"))
    layers = [m for m in lm.model.modules() if isinstance(m, DualLinear)]
    assert layers and lm.vocab_size == 300  # lm_head wrapped too, still answers for the vocabulary
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.inference_mode():
        logits = lm.model(input_ids=ids[:, :1]).logits
    assert torch.isfinite(logits.float()).all()
    plain = load_model(tiny_config(tiny_dirs["instruct"], "instruct", tmp_path, dtype="bfloat16", int8="false"))
    assert not any(isinstance(m, DualLinear) for m in plain.model.modules())


def test_a_layer_that_disagrees_is_left_alone(monkeypatch):
    model = nn.Sequential(nn.Linear(32, 32).to(torch.bfloat16))
    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", lambda x, w, s: torch.zeros(x.shape[0], 32,
                                                                                            dtype=x.dtype))
    assert add_int8_copies(model) == (0, 0) and type(model[0]) is nn.Linear


def test_the_setting():
    assert StorygenConfig.from_env(Env({}, env_file=None)).int8 == "auto"
    assert StorygenConfig.from_env(Env({"STORYGEN_INT8": "false"}, env_file=None)).int8 == "false"
    with pytest.raises(ConfigError, match="STORYGEN_INT8='yes' is not allowed; choose one of: auto, true, false"):
        StorygenConfig.from_env(Env({"STORYGEN_INT8": "yes"}, env_file=None))


def _on_grid(out: int, inp: int) -> torch.Tensor:
    """A weight as a Q4_1 GGUF holds it: per 32 inputs, q * scale + minimum with q in 0..15 (all 16 used)."""
    torch.manual_seed(1)
    q = torch.randint(0, 16, (out, inp // INT4_GROUP, INT4_GROUP)).float()
    q[..., 0], q[..., 1] = 0, 15
    scale = torch.rand(out, inp // INT4_GROUP, 1) * 0.01 + 0.001
    low = -torch.rand(out, inp // INT4_GROUP, 1) * 0.05
    return (q * scale + low).reshape(out, inp)


def test_a_layer_already_on_a_4_bit_grid_is_held_as_int4_with_nothing_lost():
    dense = nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        dense.weight.copy_(_on_grid(48, 64))
    assert on_int4_grid(dense.weight) and not on_int4_grid(torch.randn(48, 64))
    four = Int4Linear(dense)
    small = torch.randn(1, INT4_ROWS, 64, dtype=torch.bfloat16)
    big = torch.randn(1, INT4_ROWS + 1, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(four(big), dense(big))  # more rows: the dense layer
        got, want = four(small).float(), dense(small).float()
    assert not torch.equal(got, want)  # it took the int4 kernel
    assert ((got - want).norm() / want.norm()).item() < 0.01  # the same weights: bf16 rounding only
    assert four.weight is dense.weight and "int4" in repr(four)


def test_auto_makes_int4_copies_only_of_layers_on_a_grid_and_int8_of_the_rest():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 300), nn.Linear(64, 32)).to(torch.bfloat16)
    with torch.no_grad():
        model[0].weight.copy_(_on_grid(32, 64))
    assert add_int8_copies(model, "auto") == (1, 2)
    assert [type(m) for m in model] == [Int4Linear, DualLinear, DualLinear]
    again = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 300)).to(torch.bfloat16)
    assert add_int8_copies(again, "true", int8=False) == (1, 0)  # 300 outputs don't fit the kernel: left dense
    assert [type(m) for m in again] == [Int4Linear, nn.Linear]
    with torch.inference_mode():
        x = torch.randn(2, 64, dtype=torch.bfloat16)
        assert ((again[0](x) - again[0].dense(x)).float().norm() / again[0].dense(x).float().norm()) < 0.2
    cpu = torch.device("cpu")
    assert can_use_int4(cpu, torch.bfloat16) and not can_use_int4(cpu, torch.float32, "true")
    assert not can_use_int4(cpu, torch.bfloat16, "false") and not can_use_int4(torch.device("cuda"), torch.bfloat16)


def test_the_engine_writes_with_int4_copies(tiny_dirs, tmp_path):
    lm = load_model(tiny_config(tiny_dirs["instruct"], "instruct", tmp_path, dtype="bfloat16", int4="true"))
    assert any(type(m) is Int4Linear for m in lm.model.modules())
    from storygen.engine import Engine, Sequence
    from storygen.sampling import SamplingParams
    engine = Engine(lm, 2)
    seqs = [Sequence(f"s{i}", [5, 6, 7 + i], SamplingParams(length=6, seed=i)) for i in range(2)]
    engine.start_many(seqs)
    while engine.rows:
        engine.step()
    assert all(seq.generated for seq in seqs)


def test_the_int4_setting():
    assert StorygenConfig.from_env(Env({}, env_file=None)).int4 == "auto"
    with pytest.raises(ConfigError, match="STORYGEN_INT4='4' is not allowed; choose one of: auto, true, false"):
        StorygenConfig.from_env(Env({"STORYGEN_INT4": "4"}, env_file=None))
