"""Our C kernels (storygen/kernels.py, storygen/csrc/): decode attention, int4 matmul and the layer ops."""

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
def library(tmp_path_factory):
    built = kernels.load(tmp_path_factory.mktemp("kernels"))
    assert built is not None, "the kernels did not build (see the log)"
    return built


@pytest.fixture(scope="module")
def kernel(library):
    assert library.attention is not None, "the attention kernel disagreed with SDPA (see the log)"
    return library.attention


def _has_avx512_bf16() -> bool:
    return "avx512_bf16" in (kernels.cpu_flags() or ())


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
# bf16 with D a multiple of 32 takes the AVX-512 path: 16 keys at a time (a partial last block, whole blocks
# of padding skipped: row 6 of 7 is padded 42) and query heads 16 / (D / 16) at a time (G=5 at D=64: 4 + 1).
@pytest.mark.parametrize("B,KV,G,T,D", [(1, 1, 1, 1, 8), (3, 3, 3, 37, 64), (5, 2, 8, 130, 32), (2, 4, 1, 300, 128),
                                        (7, 1, 5, 100, 64)])
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


@needs_cc
def test_the_int4_kernel_is_there_exactly_where_the_cpu_has_avx512_bf16(library):
    assert (library.int4 is not None) == _has_avx512_bf16()


@needs_cc
@pytest.mark.skipif(not _has_avx512_bf16(), reason="this CPU has no AVX-512 BF16: int4 matmuls stay with torch's")
@pytest.mark.parametrize("M", [1, 5, 8, 9, 16, 17, 32, 45])  # past 16: blocks of 16 rows and a rest
@pytest.mark.parametrize("N,K", [(16, 32), (48, 96), (160, 64)])
def test_int4_matmul_matches_the_dequantised_weight_and_torchs_kernel(library, M, N, K):
    from storygen.int8 import Int4Linear, _int4_grid

    g = torch.Generator().manual_seed(M * 1000 + N + K)
    q, scale, low = _int4_grid(torch.randn(N, K, generator=g))
    weight = (q.reshape(N, K // 32, 32) * scale[..., None] + low[..., None]).reshape(N, K)  # exactly on the grid
    x = torch.randn(M, K, generator=g).bfloat16()
    want = x.float() @ weight.t()
    got = library.int4(x, library.int4.pack(q, scale, low), N)
    assert got.shape == (M, N) and got.dtype == torch.bfloat16
    assert ((got.float() - want).norm() / want.norm()).item() < 1e-2  # bf16 output rounding
    dense = torch.nn.Linear(K, N, bias=False, dtype=torch.bfloat16)
    dense.weight.data = weight.bfloat16()
    theirs = Int4Linear(dense, grid=(q, scale, low))._small(x).float()  # torch's int4 kernel
    assert ((got.float() - theirs).norm() / theirs.norm()).item() < 1e-2


@needs_cc
@pytest.mark.skipif(not _has_avx512_bf16(), reason="this CPU has no AVX-512 BF16: int4 matmuls stay with torch's")
def test_an_int4_layer_uses_it_for_up_to_thirty_two_rows_in_bf16(library, monkeypatch):
    from storygen.int8 import Int4Linear

    calls = []
    native = library.int4
    monkeypatch.setattr(type(native), "__call__", lambda self, *a: calls.append(a[0].shape[0])
                        or torch.zeros(a[0].shape[0], a[2], dtype=torch.bfloat16))
    layer = Int4Linear(torch.nn.Linear(64, 32, bias=False, dtype=torch.bfloat16), native=native)
    assert not hasattr(layer, "int4_weight")  # torch's packing is not kept beside ours
    with torch.inference_mode():
        for rows in (1, 4, 16, 32, 33):
            layer(torch.randn(rows, 64, dtype=torch.bfloat16))
    assert calls == [1, 4, 16, 32]  # 33 rows: the dense bf16 layer
    fp32 = Int4Linear(torch.nn.Linear(64, 32, bias=False), native=native)
    assert fp32.native is None and hasattr(fp32, "int4_weight")  # the kernel takes bf16 only
    assert fp32.small_rows == 16  # torch's int4 kernel: slower than bf16 past 16 rows


@needs_cc
@pytest.mark.skipif(not _has_avx512_bf16(), reason="this CPU has no AVX-512 BF16: int8 matmuls stay with torch's")
@pytest.mark.parametrize("M", [1, 4, 7, 16])
@pytest.mark.parametrize("N,K", [(16, 34), (48, 96), (160, 576)])
def test_int8_matmul_matches_the_int8_weight_and_torchs_kernel(library, M, N, K):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    scale = (torch.rand(N, generator=g) / 50).bfloat16()
    x = torch.randn(M, K, generator=g).bfloat16()
    want = (x.float() @ q.float().t()) * scale.float()
    got = library.int8(x, library.int8.pack(q, scale), N)
    assert got.shape == (M, N) and got.dtype == torch.bfloat16
    assert ((got.float() - want).norm() / want.norm()).item() < 1e-2  # bf16 output rounding
    if K % 32 == 0:  # torch's kernel is wrong for other widths here (K = 34 gave 1e35): no reference there
        theirs = torch.ops.aten._weight_int8pack_mm(x, q, scale).float()
        assert ((got.float() - theirs).norm() / theirs.norm()).item() < 1e-2


@needs_cc
@pytest.mark.skipif(not _has_avx512_bf16(), reason="this CPU has no AVX-512 BF16: int8 matmuls stay with torch's")
def test_an_int8_layer_uses_it_for_up_to_sixteen_rows_in_bf16_and_keeps_it_when_fused(library):
    from storygen.decoder import fuse
    from storygen.int8 import DualLinear

    dense = torch.nn.Linear(64, 32, bias=False, dtype=torch.bfloat16)
    layer = DualLinear(dense, native=library.int8)
    assert layer.small_rows == 16 and not hasattr(layer, "int8_weight")  # torch's copy is not kept beside ours
    twin = torch.nn.Linear(64, 32, bias=False, dtype=torch.bfloat16)
    twin.weight.data = dense.weight.data.clone()
    plain = DualLinear(twin)  # torch's int8 kernel
    with torch.inference_mode():
        for rows in (1, 4):  # both serve these rows, from the same int8 weight
            x = torch.randn(rows, 64, dtype=torch.bfloat16)
            assert ((layer(x).float() - plain(x).float()).norm() / plain(x).float().norm()).item() < 1e-2
        x = torch.randn(16, 64, dtype=torch.bfloat16)
        assert ((layer(x).float() - dense(x).float()).norm() / dense(x).float().norm()).item() < 0.03
    assert plain.small_rows == 4 and DualLinear(torch.nn.Linear(64, 32), native=library.int8).native is None  # fp32
    fused = fuse([DualLinear(torch.nn.Linear(64, 16, bias=False, dtype=torch.bfloat16), native=library.int8)
                  for _ in range(2)])
    assert type(fused) is DualLinear and fused.native is library.int8


def _ulps(got: torch.Tensor, want: torch.Tensor) -> int:
    """The largest distance between two bf16 tensors in units of the last place."""
    def ordered(t):  # bf16 bit patterns as integers that count up with the value
        bits = t.contiguous().view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)
    return int((ordered(got) - ordered(want)).abs().max())


@pytest.fixture(scope="module")
def ops(library):
    assert library.layer is not None, "the layer kernels disagreed with torch (see the log)"
    return library.layer


@needs_cc
@pytest.mark.parametrize("rows", [1, 16, 200])  # 200 x 576: enough for both threads
def test_add_rms_norm_is_llamas_norm_bit_for_bit_and_adds_in_place(ops, rows):
    g = torch.Generator().manual_seed(rows)
    x, delta = (torch.randn(rows, 576, generator=g).bfloat16() for _ in range(2))
    weight = (torch.rand(576, generator=g) + 0.5).bfloat16()
    summed = x + delta
    want = weight * torch.nn.functional.rms_norm(summed.float(), (576,), eps=1e-5).bfloat16()
    got = ops.add_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(x, summed) and _ulps(got, want) == 0
    assert _ulps(ops.add_rms_norm(x, None, weight, 1e-5), want) == 0  # no delta: x is left as it is
    assert torch.equal(x, summed)


@needs_cc
def test_the_ops_take_strided_rows_in_place(ops):
    g = torch.Generator().manual_seed(5)
    stream = torch.randn(3, 7, 64, generator=g).bfloat16()
    last = stream[:, -1:]  # (3, 1, 64): rows 7 * 64 apart, as a prefill's last positions are
    delta = torch.randn(3, 1, 64, generator=g).bfloat16()
    want_x = last + delta
    want = torch.nn.functional.rms_norm(want_x.float(), (64,), eps=1e-6).bfloat16()
    got = ops.add_rms_norm(last, delta, torch.ones(64, dtype=torch.bfloat16), 1e-6)
    assert torch.equal(stream[:, -1:], want_x) and _ulps(got, want) == 0 and got.shape == (3, 1, 64)
    qkv = torch.randn(4, 5, 3 * 32, generator=g).bfloat16()  # (B, S, (H + 2 KV) D), H = KV = 1, D = 32
    angles = torch.rand(4, 5, 16, generator=g) * 50
    cos, sin = torch.cat([angles.cos()] * 2, -1).bfloat16(), torch.cat([angles.sin()] * 2, -1).bfloat16()
    qk = qkv[..., :64].view(4, 5, 2, 32)
    want = qk * cos[:, :, None] + torch.cat((-qk[..., 16:], qk[..., :16]), -1) * sin[:, :, None]
    values = qkv[..., 64:].clone()
    ops.rotary_(qkv, 2, cos, sin)
    assert _ulps(qkv[..., :64].view(4, 5, 2, 32), want) == 0 and torch.equal(qkv[..., 64:], values)


@needs_cc
@pytest.mark.parametrize("rows", [1, 16, 145])
def test_silu_mul_is_within_a_rounding_of_torch(ops, rows):
    gate_up = (torch.randn(rows, 2 * 1536, generator=torch.Generator().manual_seed(rows)) * 4).bfloat16()
    want = torch.nn.functional.silu(gate_up[:, :1536]) * gate_up[:, 1536:]
    got = ops.silu_mul(gate_up)
    # expf's last fp32 bit may round silu's bf16 the other way, and the product carries that on
    assert got.shape == (rows, 1536) and _ulps(got, want) <= 2
    assert (got != want).float().mean().item() < 0.01


@needs_cc
def test_fits_wants_bf16_rows_of_one_stride(ops):
    x = torch.zeros(4, 6, 8, dtype=torch.bfloat16)
    assert ops.fits(x, x[:, -1:], x[1:3]) and not ops.fits(x.float()) and not ops.fits(x.transpose(1, 2))
    assert not ops.fits(x[:, :3, :])  # (4, 3, 8) of a (4, 6, 8): rows are not one stride apart


@pytest.mark.parametrize("cc,said", [("/nonexistent/cc", "could not be built"), ("false", "could not be built")])
def test_without_a_working_compiler_it_is_none_and_says_so_once(tmp_path, monkeypatch, caplog, cc, said):
    monkeypatch.setenv("CC", cc)
    with caplog.at_level(logging.INFO, logger="storygen.kernels"):
        assert kernels.load(tmp_path) is None
    assert said in caplog.text and "torch's are used" in caplog.text
    assert len(caplog.records) == 1


def test_the_setting_and_where_it_applies():
    assert StorygenConfig.from_env(Env({}, env_file=None)).cpu_kernels == "auto"
    with pytest.raises(ConfigError, match="STORYGEN_CPU_KERNELS='yes' is not allowed"):
        StorygenConfig.from_env(Env({"STORYGEN_CPU_KERNELS": "yes"}, env_file=None))
    cpu = torch.device("cpu")
    assert kernels.can_use(cpu, torch.bfloat16) and not kernels.can_use(cpu, torch.float32)
    assert kernels.can_use(cpu, torch.float32, "true") and not kernels.can_use(cpu, torch.bfloat16, "false")
    assert not kernels.can_use(torch.device("cuda"), torch.bfloat16, "true")


@needs_cc
@pytest.mark.skipif(not _has_avx512_bf16(), reason="this CPU has no AVX-512 BF16: our int4 and int8 kernels stay off")
def test_fused_layers_on_our_kernels_share_their_parts_copies(library):
    from storygen.decoder import fuse
    from storygen.int8 import DualLinear, Int4Linear

    torch.manual_seed(0)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    for make in (lambda out: Int4Linear(torch.nn.Linear(64, out, bias=False, dtype=torch.bfloat16), native=library.int4),
                 lambda out: DualLinear(torch.nn.Linear(64, out, bias=False, dtype=torch.bfloat16), native=library.int8)):
        parts = [make(32), make(16), make(48)]
        with torch.inference_mode():
            want = [part(x) for part in parts]
            fused = fuse(parts)
            assert type(fused) is type(parts[0]) and fused.native is parts[0].native
            assert torch.equal(fused(x), torch.cat(want, dim=-1))  # the same copies, row by row
            assert all(torch.equal(part(x), w) for part, w in zip(parts, want))  # the parts still work
        for i, tensor in enumerate(fused.native_weight):  # each part's copy lies inside the fused one's
            storage = tensor.untyped_storage().data_ptr()
            assert all(part.native_weight[i].untyped_storage().data_ptr() == storage for part in parts)


@needs_cc
@pytest.mark.skipif(not _has_avx512_bf16(), reason="this CPU has no AVX-512 BF16: int4 matmuls stay with torch's")
def test_int4_scales_are_held_in_fp16_and_a_grid_past_its_range_stays_with_torch(library):
    from storygen.int8 import Int4Linear, _int4_grid

    dense = torch.nn.Linear(64, 32, bias=False, dtype=torch.bfloat16)
    layer = Int4Linear(dense, native=library.int4)
    assert layer.native is not None and {t.dtype for t in layer.native_weight[1:]} == {torch.float16}
    q, scale, low = _int4_grid(dense.weight.float())
    huge = Int4Linear(dense, grid=(q, scale, low - 70000), native=library.int4)  # minimums fp16 can't hold
    assert huge.native is None and hasattr(huge, "int4_weight")


def _shaped(logits, seen, penalty, ends, bias):
    """sampling.py's torch path for the penalty and the steer."""
    out = logits.clone()
    if seen is not None:
        penalised = torch.where(out > 0, out / penalty[:, None], out * penalty[:, None])
        out = torch.where(seen, penalised, out)
    if ends is not None:
        out[:, ends] += bias[:, None]
    return out


@needs_cc
@pytest.mark.parametrize("B,V,k", [(1, 49152, 50), (5, 1000, 1), (16, 3000, 200), (3, 64, 64), (2, 37, 5)])
@pytest.mark.parametrize("penalise,steer", [(True, True), (False, False), (True, False)])
def test_the_sampler_gives_torchs_penalty_steer_and_topk(library, B, V, k, penalise, steer):
    g = torch.Generator().manual_seed(B * V + k)
    logits = torch.randn(B, V, generator=g) * 4
    seen = torch.rand(B, V, generator=g) < 0.1 if penalise else None
    penalty = 1 + torch.rand(B, generator=g)
    penalty[0] = 1.0  # a row without a penalty
    ends, bias = (torch.tensor([0, V - 1]), torch.rand(B, generator=g) * 10) if steer else (None, None)
    want = _shaped(logits, seen, penalty, ends, bias)
    want_values, want_ids = torch.topk(want, k, dim=-1)
    got = logits.clone()
    values, ids = library.sampler(got, seen, penalty, ends, bias, k)
    assert torch.equal(values, want_values) and torch.equal(ids, want_ids)
    assert torch.equal(got, want)  # the penalty and the steer were applied in place, bit for bit


@needs_cc
def test_the_sampler_orders_equal_logits_by_token_as_argmax_does(library):
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 3.0, 0.5, 2.0, 3.0] * 3])  # bf16 logits tie often
    values, ids = library.sampler(logits.clone(), None, torch.ones(1), None, None, 6)
    assert values.tolist() == [[3.0] * 6] and ids.tolist() == [[1, 3, 4, 7, 9, 11]]
    assert ids[0, 0] == logits.argmax()
    values, ids = library.sampler(logits.clone(), None, torch.ones(1), None, None, 16)
    assert ids[0].tolist() == [1, 3, 4, 7, 9, 11, 12, 15, 17, 19, 20, 23, 2, 6, 10, 14]  # the 3.0s, then 2.0s


@needs_cc
def test_sample_next_draws_the_same_tokens_with_the_sampler(library):
    import random

    from storygen.sampling import RowKnobs, SamplingParams, sample_next

    g = torch.Generator().manual_seed(1)
    V = 5000
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, repetition_penalty=r, greedy=greedy)
              for t, k, p, r, greedy in [(0.8, 50, 0.95, 1.1, False), (1.3, 5, 1.0, 1.5, False), (0.5, 200, 0.5, 1.0, False),
                                         (0.8, 50, 0.95, 1.2, True), (2.0, 1, 0.9, 1.1, False)]]
    knobs = RowKnobs.from_params(params, V, torch.device("cpu"))
    for step in range(20):
        logits = torch.randn(len(params), V, generator=g) * 3
        seen = torch.rand(len(params), V, generator=g) < 0.02
        ends, bias = torch.tensor([3, 4]), torch.rand(len(params), generator=g) * 8 * (step % 2)
        tokens = [sample_next(logits, knobs, seen, [random.Random(step * 10 + i) for i in range(len(params))], ends,
                              bias, sampler=sampler) for sampler in (None, library.sampler)]
        assert torch.equal(*tokens)
    assert not library.sampler.fits(logits, 2000, None)  # top-k past MAX_K (or off) stays with torch
    assert not library.sampler.fits(logits.bfloat16(), 50, None)
