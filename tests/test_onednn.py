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
    dense = load_model(tiny_config(tiny_dirs[fmt], "auto", tmp_path, onednn="false"))
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


def test_packing_is_for_a_cpu_and_bf16_only_when_asked():
    cpu = torch.device("cpu")
    assert can_pack(cpu, torch.float32) and can_pack(cpu, torch.float32, "true")
    assert not can_pack(cpu, torch.float32, "false")
    assert not can_pack(cpu, torch.bfloat16)  # auto: bf16 weights stay dense until packing them is measured
    assert can_pack(cpu, torch.bfloat16, "true") == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert not can_pack(cpu, torch.float16, "true")
    assert not can_pack(torch.device("cuda"), torch.float32, "true")
    assert pack_linears(nn.Sequential(nn.Embedding(4, 8), nn.LayerNorm(8))) == 0


@pytest.mark.parametrize("value, mode", [(None, "auto"), ("auto", "auto"), ("true", "true"), ("1", "true"),
                                         ("false", "false"), ("off", "false")])
def test_operator_chooses_what_is_packed(value, mode):
    env = {} if value is None else {"STORYGEN_ONEDNN": value}
    assert StorygenConfig.from_env(Env(env, env_file=None)).onednn == mode
    with pytest.raises(ConfigError, match="STORYGEN_ONEDNN='maybe' is not allowed; choose one of: auto, true, false"):
        StorygenConfig.from_env(Env({"STORYGEN_ONEDNN": "maybe"}, env_file=None))


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no bf16 in this CPU's oneDNN")
def test_packed_bf16_model_writes_what_the_dense_bf16_model_writes(tiny_dirs, tmp_path):
    dense = load_model(tiny_config(tiny_dirs["instruct"], "auto", tmp_path, dtype="bfloat16"))
    packed = load_model(tiny_config(tiny_dirs["instruct"], "auto", tmp_path, dtype="bfloat16", onednn="true"))
    assert not any(isinstance(m, PackedLinear) for m in dense.model.modules())
    assert not any(type(m) is nn.Linear for m in packed.model.modules())
    ids = dense.tokenizer("Once upon a time, in a kingdom far away", return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = [lm.model(ids).logits.float() for lm in (dense, packed)]
        assert torch.allclose(*logits, atol=2e-2)
        greedy = [lm.model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=lm.pad_id)
                  for lm in (dense, packed)]
    assert torch.equal(*greedy)


def test_a_layer_that_packs_badly_stays_dense(monkeypatch):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    real = torch._C._nn.mkldnn_linear
    monkeypatch.setattr(torch._C._nn, "mkldnn_linear", lambda x, w, b: real(x, w, b) * 1.01)  # 1 % off
    assert pack_linears(model) == 0
    assert [type(m) for m in model] == [nn.Linear, nn.Linear]


def test_a_build_whose_onednn_fails_keeps_the_dense_layers(monkeypatch):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))

    def broken(*args):
        raise RuntimeError("mkldnn_linear: unsupported platform")

    monkeypatch.setattr(torch._C._nn, "mkldnn_linear", broken)
    assert pack_linears(model) == 0
    assert [type(m) for m in model] == [nn.Linear, nn.Linear]
