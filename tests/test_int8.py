"""The int8 copies of the weights for small batches (storygen/int8.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from storygen.config import Env, StorygenConfig
from storygen.errors import ConfigError
from storygen.int8 import SMALL_ROWS, DualLinear, add_int8_copies, can_use
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
    assert add_int8_copies(model) == 0 and type(model[0]) is nn.Linear


def test_the_setting():
    assert StorygenConfig.from_env(Env({}, env_file=None)).int8 == "auto"
    assert StorygenConfig.from_env(Env({"STORYGEN_INT8": "false"}, env_file=None)).int8 == "false"
    with pytest.raises(ConfigError, match="STORYGEN_INT8='yes' is not allowed; choose one of: auto, true, false"):
        StorygenConfig.from_env(Env({"STORYGEN_INT8": "yes"}, env_file=None))
