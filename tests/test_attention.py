"""A decode step's grouped query heads packed for SDPA on a CPU (storygen/attention.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from storygen import attention
from storygen.config import Env, StorygenConfig
from storygen.engine import Engine, Sequence
from storygen.errors import ConfigError
from storygen.model import load_model
from storygen.sampling import SamplingParams
from tests.conftest import tiny_config


class _Module(nn.Module):
    num_key_value_groups = 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_query_token_matches_sdpa_with_and_without_a_padding_mask(dtype):
    torch.manual_seed(0)
    B, H, KV, T, D = 5, 9, 3, 37, 16
    query = torch.randn(B, H, 1, D, dtype=dtype)
    key = torch.randn(B, KV, T + 8, D, dtype=dtype)[:, :, :T]  # a view of a larger buffer, as the KV cache is
    value = torch.randn(B, KV, T + 8, D, dtype=dtype)[:, :, :T]
    mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
    mask[1, ..., :10] = False  # left-padded rows
    mask[3, ..., :30] = False
    module = _Module().eval()
    for m in (None, mask):
        with torch.inference_mode():
            got, _ = attention.decode_attention(module, query, key, value, m, scaling=0.25)
            want, _ = sdpa_attention_forward(module, query.float(), key.float(), value.float(), m, scaling=0.25)
        assert got.shape == want.shape == (B, 1, H, D) and got.dtype == dtype
        assert (got.float() - want).abs().max().item() < (1e-5 if dtype == torch.float32 else 2e-2)


def test_anything_but_one_plain_query_token_goes_to_transformers_sdpa(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **k: calls.append(k) or ("sdpa", None))
    module = _Module().eval()
    key = value = torch.randn(1, 3, 4, 8)
    one = torch.randn(1, 9, 1, 8)
    assert attention.decode_attention(module, torch.randn(1, 9, 2, 8), key, value, None)[0] == "sdpa"  # prefill
    assert attention.decode_attention(module, one, key, value, None, sliding_window=2)[0] == "sdpa"
    assert attention.decode_attention(module, one, torch.randn(1, 9, 4, 8), torch.randn(1, 9, 4, 8),
                                      None)[0] == "sdpa"  # no grouped heads
    assert len(calls) == 3
    assert attention.decode_attention(module, one, key, value, None)[0].shape == (1, 1, 9, 8)


def test_the_engine_writes_the_same_stories_with_it(tiny_dirs, tmp_path):
    """Greedy stories, alone and in a left-padded batch: the same tokens with and without it."""
    def stories(mode: str) -> list[list[int]]:
        lm = load_model(tiny_config(tiny_dirs["instruct"], "instruct", tmp_path, decode_attention=mode))
        assert (lm.model.config._attn_implementation == attention.NAME) == (mode == "true")
        engine = Engine(lm, 4)
        params = SamplingParams(length=12, greedy=True)
        seqs = [Sequence(f"s{i}", prompt, params) for i, prompt in enumerate([[5, 6, 7], [8] * 9, [10, 11]])]
        engine.start(seqs[0])
        engine.step()  # alone: no mask
        engine.start_many(seqs[1:])  # joins later: the batch is left-padded, so the mask is used
        while engine.rows:
            engine.step()
        return [seq.generated for seq in seqs]

    assert stories("true") == stories("false")


def test_the_setting():
    assert StorygenConfig.from_env(Env({}, env_file=None)).decode_attention == "auto"
    assert StorygenConfig.from_env(Env({"STORYGEN_DECODE_ATTENTION": "false"}, env_file=None)).decode_attention == "false"
    with pytest.raises(ConfigError, match="STORYGEN_DECODE_ATTENTION='fast' is not allowed"):
        StorygenConfig.from_env(Env({"STORYGEN_DECODE_ATTENTION": "fast"}, env_file=None))
    cpu = torch.device("cpu")
    model = nn.Module()
    model.config = type("Config", (), {"_attn_implementation": "sdpa"})()
    assert attention.can_use(model, cpu) and not attention.can_use(model, torch.device("cuda"))
    assert attention.can_use(model, torch.device("cuda"), "true") and not attention.can_use(model, cpu, "false")
    model.config._attn_implementation = "eager"
    assert not attention.can_use(model, cpu, "true")
