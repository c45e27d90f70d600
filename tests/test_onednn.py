"""Linear layers packed for oneDNN compute what the dense ones do, and only where they should."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from storygen.config import Env, StorygenConfig
from storygen.errors import ConfigError
from storygen.model import load_model
from storygen.onednn import PackedLinear, can_pack, pack_linears
from tests.conftest import tiny_config

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("layer", [nn.Linear(32, 48), nn.Linear(32, 48, bias=False), Conv1D(48, 32)])
def test_packed_layer_computes_the_dense_layer(layer):
    if layer.bias is not None:
        nn.init.normal_(layer.bias)  # Conv1D starts with zero bias; a bias must really be added
    x = torch.randn(3, 5, 32)  # (B, T, in): the shape a decoder feeds it
    with torch.inference_mode():
        expected, got = layer(x), PackedLinear.from_dense(layer)(x)
    assert got.shape == (3, 5, 48) and torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("fmt", ["genre_tags", "instruct"])  # GPT-2 (Conv1D) and Llama (nn.Linear)
def test_packed_model_writes_what_the_dense_model_writes(tiny_dirs, tmp_path, fmt):
    dense = load_model(tiny_config(tiny_dirs[fmt], "auto", tmp_path, onednn=False))
    packed = load_model(tiny_config(tiny_dirs[fmt], "auto", tmp_path))
    assert not any(isinstance(m, PackedLinear) for m in dense.model.modules())
    assert not any(type(m) in (nn.Linear, Conv1D) for m in packed.model.modules())
    assert packed.vocab_size == dense.vocab_size
    ids = dense.tokenizer("Once upon a time, in a kingdom far away", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.allclose(packed.model(ids).logits, dense.model(ids).logits, atol=1e-4)
        greedy = [lm.model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=lm.pad_id)
                  for lm in (dense, packed)]
    assert torch.equal(*greedy)


def test_packing_is_for_fp32_on_a_cpu_only():
    assert can_pack(torch.device("cpu"), torch.float32)
    assert not can_pack(torch.device("cpu"), torch.bfloat16)
    assert not can_pack(torch.device("cuda"), torch.float32)
    assert pack_linears(nn.Sequential(nn.Embedding(4, 8), nn.LayerNorm(8))) == 0


def test_operator_can_turn_it_off():
    assert StorygenConfig.from_env(Env({}, env_file=None)).onednn
    assert not StorygenConfig.from_env(Env({"STORYGEN_ONEDNN": "false"}, env_file=None)).onednn
    with pytest.raises(ConfigError, match="STORYGEN_ONEDNN='maybe' is not a boolean"):
        StorygenConfig.from_env(Env({"STORYGEN_ONEDNN": "maybe"}, env_file=None))


def test_a_build_whose_onednn_fails_keeps_the_dense_layers(monkeypatch):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))

    def broken(*args):
        raise RuntimeError("mkldnn_linear: unsupported platform")

    monkeypatch.setattr(torch._C._nn, "mkldnn_linear", broken)
    assert pack_linears(model) == 0
    assert [type(m) for m in model] == [nn.Linear, nn.Linear]
