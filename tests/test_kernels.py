"""Our C kernel for a decode step's attention (storygen/kernels.py, storygen/csrc/decode_attention.c)."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention as sdpa

from storygen import attention, kernels
from storygen.config import Env, StorygenConfig
from storygen.errors import ConfigError

needs_cc = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")),
                              reason="no C compiler here: the kernel falls back to SDPA (tested below)")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    built = kernels.load_decode_attention(tmp_path_factory.mktemp("kernels"))
    assert built is not None, "the kernel did not build or disagreed with SDPA (see the log)"
    return built


def _case(B, KV, G, T, D, dtype, spare=5, seed=0):
    """q (B, KV, G, D); k, v views into larger buffers, as the KV cache's are; a left-padding mask (B, T)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, KV, G, D, generator=g).to(dtype)
    k = torch.randn(B, KV, T + spare, D, generator=g).to(dtype)[:, :, :T]
    v = torch.randn(B, KV, T + spare, D, generator=g).to(dtype)[:, :, :T]
    mask = torch.ones(B, T, dtype=torch.bool)
    for b in range(B):
        mask[b, : (b * 7) % T] = False  # row b is left-padded by a different amount
    return q, k, v, mask


@needs_cc
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("B,KV,G,T,D", [(1, 1, 1, 1, 8), (3, 3, 3, 37, 64), (5, 2, 8, 130, 32), (2, 4, 1, 300, 128)])
def test_it_matches_sdpa_with_and_without_a_padding_mask(kernel, B, KV, G, T, D, dtype, tol):
    q, k, v, mask = _case(B, KV, G, T, D, dtype)
    for m in (None, mask):
        want = sdpa(q.float(), k.float(), v.float(), attn_mask=None if m is None else m[:, None, None, :])
        got = kernel(q, k, v, m, D ** -0.5)
        assert got.shape == want.shape and got.dtype == dtype
        assert (got.float() - want).abs().max().item() < tol


@needs_cc
def test_it_writes_into_a_given_output_and_honours_the_scale(kernel):
    q, k, v, mask = _case(2, 3, 3, 20, 16, torch.float32)
    out = torch.full((2, 1, 9, 16), float("nan"))
    kernel(q, k, v, mask, 0.5, out=out.view(2, 3, 3, 16))
    want = sdpa(q, k, v, attn_mask=mask[:, None, None, :], scale=0.5)  # (2, 3, 3, 16)
    assert torch.allclose(out.view(2, 3, 3, 16), want, atol=1e-5)


@needs_cc
def test_what_it_does_not_take_is_said_by_fits(kernel):
    q, k, v, mask = _case(2, 3, 3, 20, 16, torch.float32)
    assert kernel.fits(q, k, v, mask) and kernel.fits(q, k, v, None)
    assert not kernel.fits(q.half(), k.half(), v.half(), mask)  # fp16: SDPA's
    assert not kernel.fits(q, k, v, mask.float())  # an additive mask
    assert not kernel.fits(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, mask)  # last dim strided
    big = torch.randn(2, 3, 40, 16)  # more query heads per group than the kernel holds
    assert not kernel.fits(big, k, v, mask)


@needs_cc
def test_attention_hands_single_token_calls_to_it_and_agrees_with_sdpa(kernel):
    class Module(torch.nn.Module):
        num_key_value_groups = 3

    torch.manual_seed(0)
    query = torch.randn(4, 9, 1, 16, dtype=torch.bfloat16)  # (B, H, 1, D)
    key = torch.randn(4, 3, 30, 16, dtype=torch.bfloat16)
    value = torch.randn(4, 3, 30, 16, dtype=torch.bfloat16)
    mask = torch.ones(4, 1, 1, 30, dtype=torch.bool)
    mask[1, ..., :12] = False
    module = Module().eval()
    for m in (None, mask):
        got, _ = attention.native_decode_attention(kernel, module, query, key, value, m, scaling=0.25)
        want, _ = attention.decode_attention(module, query, key, value, m, scaling=0.25)
        assert got.shape == want.shape == (4, 1, 9, 16)
        assert (got.float() - want.float()).abs().max().item() < 2e-2


@needs_cc
def test_a_second_load_reuses_the_built_library(tmp_path):
    first = kernels._build(shutil.which("cc") or shutil.which("gcc"), tmp_path)
    made = first.stat().st_mtime_ns
    again = kernels._build(shutil.which("cc") or shutil.which("gcc"), tmp_path)
    assert again == first and again.stat().st_mtime_ns == made
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [first.name]  # no temporary files left


@pytest.mark.parametrize("cc,said", [("/nonexistent/cc", "could not be built"), ("false", "could not be built")])
def test_without_a_working_compiler_it_is_none_and_says_so_once(tmp_path, monkeypatch, caplog, cc, said):
    monkeypatch.setenv("CC", cc)
    with caplog.at_level(logging.INFO, logger="storygen.kernels"):
        assert kernels.load_decode_attention(tmp_path) is None
    assert said in caplog.text and "SDPA" in caplog.text
    assert len(caplog.records) == 1


def test_the_setting_and_where_it_applies():
    assert StorygenConfig.from_env(Env({}, env_file=None)).native_attention == "auto"
    with pytest.raises(ConfigError, match="STORYGEN_NATIVE_ATTENTION='yes' is not allowed"):
        StorygenConfig.from_env(Env({"STORYGEN_NATIVE_ATTENTION": "yes"}, env_file=None))
    cpu = torch.device("cpu")
    assert kernels.can_use(cpu, torch.bfloat16) and not kernels.can_use(cpu, torch.float32)
    assert kernels.can_use(cpu, torch.float32, "true") and not kernels.can_use(cpu, torch.bfloat16, "false")
    assert not kernels.can_use(torch.device("cuda"), torch.bfloat16, "true")
