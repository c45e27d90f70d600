"""Our C kernels (storygen/kernels.py) against torch's, in one run, on a decode step's shapes.

    python benchmarks/kernels_bench.py              # SmolLM2-135M's shapes: 30 layers, 9 heads over 3, D 64
    python benchmarks/kernels_bench.py --smoke      # small shapes, a few repeats (CI)

Attention: one decode step's attention over all layers, each layer with its own cache (so the
caches come from memory, as in a real step, not from the CPU's cache), bf16, rows left-padded
by different amounts; torch's SDPA against ours. int4 matmul: one decode step's linear layers
(q/k/v, o, gate/up and down of every layer, each its own weight on a 4-bit grid) at 1, 8 and
16 rows; torch's `_weight_int4pack_mm_for_cpu` against ours, where this CPU has AVX-512 BF16.
int8 matmul: the output layer (49152 x 576, int8 with a scale per row) at 1, 8 and 16 rows; ours
against what served it before, torch's `_weight_int8pack_mm` (up to 4 rows) and the bf16 layer
(above). Layer ops: the norms (with the residual add), rotary embedding and silu(gate) * up of
all layers, at a decode step's 16 rows and a prompt's 150; torch's operators (as decoder.py calls
them without our kernels) against ours. A and B alternate for --rounds rounds; the figures are the medians, and each `*_speedup_*`
line is torch's time over ours.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn.functional import scaled_dot_product_attention as sdpa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storygen.int8 import Int4Linear, _int4_grid  # noqa: E402
from storygen.kernels import load  # noqa: E402


def _layers(layers: int, B: int, T: int, kv: int, group: int, D: int) -> tuple[torch.Tensor, list, torch.Tensor]:
    q = torch.randn(B, kv, group, D, dtype=torch.bfloat16)
    caches = [(torch.randn(B, kv, T + 64, D, dtype=torch.bfloat16)[:, :, :T],
               torch.randn(B, kv, T + 64, D, dtype=torch.bfloat16)[:, :, :T]) for _ in range(layers)]
    mask = torch.ones(B, T, dtype=torch.bool)
    for b in range(B):
        mask[b, : (b * 11) % (T // 2)] = False
    return q, caches, mask


def _time(run, repeats: int) -> float:
    run()
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - started) / repeats * 1000


def _int4_layers(layers: int, shapes: list[tuple[int, int]], native) -> list[Int4Linear]:
    made = []
    for _ in range(layers):
        for out, inp in shapes:
            q, scale, low = _int4_grid(torch.randn(out, inp))
            dense = torch.nn.Linear(inp, out, bias=False, dtype=torch.bfloat16)
            dense.weight.data = (q.reshape(out, -1, 32) * scale[..., None] + low[..., None]).reshape(out, inp).bfloat16()
            made.append(Int4Linear(dense, grid=(q, scale, low), native=native))
    return made


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="small shapes, for CI")
    args = parser.parse_args(argv)
    layers, kv, group, D, repeats = (2, 2, 3, 16, 2) if args.smoke else (30, 3, 3, 64, 20)
    with tempfile.TemporaryDirectory() as tmp:
        kernels = load(Path(tmp))
        if kernels is None or kernels.attention is None:
            sys.exit("the kernels could not be built here (no C compiler?); see the log line above")
        kernel = kernels.attention
        print(f"{layers} layers, {kv * group} query heads over {kv}, head dim {D}, bf16, "
              f"{torch.get_num_threads()} threads; medians of {args.rounds} rounds")
        figures = {}
        for B, T in ((1, 200), (16, 200), (16, 400)):
            q, caches, mask = _layers(layers, B, T, kv, group, D)
            sdpa_mask = mask[:, None, None, :]
            a, b = [], []
            with torch.inference_mode():
                for _ in range(args.rounds):
                    a.append(_time(lambda: [sdpa(q, k, v, attn_mask=sdpa_mask) for k, v in caches], repeats))
                    b.append(_time(lambda: [kernel(q, k, v, mask, D ** -0.5) for k, v in caches], repeats))
            sdpa_ms, kernel_ms = statistics.median(a), statistics.median(b)
            figures[(B, T)] = sdpa_ms / kernel_ms
            print(f"sdpa_ms_{B}x{T}: {sdpa_ms:.2f}")
            print(f"kernel_ms_{B}x{T}: {kernel_ms:.2f}")
        hidden = kv * group * D
        if kernels.int4 is None:
            print("int4: this CPU has no AVX-512 BF16, so torch's int4 kernel is the only one")
        else:
            shapes = [(hidden + 2 * kv * D, hidden), (hidden, hidden), (2 * 1536, hidden), (hidden, 1536)] if not args.smoke \
                else [(64, 32), (32, 64)]
            linears = _int4_layers(layers, shapes, kernels.int4)  # ours
            theirs = [Int4Linear(m.dense) for m in linears]  # torch's kernel, the same weights
            for rows in (1, 8, 16):
                xs = {layer.in_features: torch.randn(rows, layer.in_features, dtype=torch.bfloat16) for layer in linears}
                ops = torch.ops.aten._weight_int4pack_mm_for_cpu
                a, b = [], []
                with torch.inference_mode():
                    for _ in range(args.rounds):
                        a.append(_time(lambda: [ops(xs[t.in_features], t.int4_weight, 32, t.int4_scales)
                                                for t in theirs], repeats))
                        b.append(_time(lambda: [m.native(xs[m.in_features], m.native_weight, m.out_features)
                                                for m in linears], repeats))
                torch_ms, ours_ms = statistics.median(a), statistics.median(b)
                print(f"int4_torch_ms_{rows}: {torch_ms:.2f}")
                print(f"int4_ours_ms_{rows}: {ours_ms:.2f}")
                figures[rows] = torch_ms / ours_ms
            print(f"int4_speedup_8: {figures[8]:.2f}")
            print(f"int4_speedup_16: {figures[16]:.2f}")
        if kernels.int8 is not None:
            vocab = 512 if args.smoke else 49152
            weight = torch.randn(vocab, hidden)
            scale = (weight.abs().amax(dim=1) / 127).bfloat16()
            q = torch.round(weight / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
            packed, dense = kernels.int8.pack(q, scale), (q.float() * scale.float()[:, None]).bfloat16()
            for rows in (1, 8, 16):
                x = torch.randn(rows, weight.shape[1], dtype=torch.bfloat16)
                before = (lambda: torch.ops.aten._weight_int8pack_mm(x, q, scale)) if rows <= 4 else \
                    (lambda: torch.nn.functional.linear(x, dense))
                a, b = [], []
                with torch.inference_mode():
                    for _ in range(args.rounds):
                        a.append(_time(before, repeats))
                        b.append(_time(lambda: kernels.int8(x, packed, vocab), repeats))
                print(f"int8_before_ms_{rows}: {statistics.median(a):.2f}")
                print(f"int8_ours_ms_{rows}: {statistics.median(b):.2f}")
                figures[f"int8_{rows}"] = statistics.median(a) / statistics.median(b)
            print(f"int8_speedup_1: {figures['int8_1']:.2f}")
            print(f"int8_speedup_16: {figures['int8_16']:.2f}")
        if kernels.layer is not None:
            ops = kernels.layer
            inter = 1536 if not args.smoke else 64
            for rows in (16, 150):
                x = torch.randn(rows, hidden, dtype=torch.bfloat16)
                delta = torch.randn(rows, hidden, dtype=torch.bfloat16)
                qkv = torch.randn(rows, (kv * group + 2 * kv) * D, dtype=torch.bfloat16)
                gate_up = torch.randn(rows, 2 * inter, dtype=torch.bfloat16)
                cos, sin = torch.randn(rows, D, dtype=torch.bfloat16), torch.randn(rows, D, dtype=torch.bfloat16)
                weight = torch.rand(hidden, dtype=torch.bfloat16)
                heads, half = kv * group + kv, D // 2

                def with_torch():
                    for _ in range(layers):
                        for _ in range(2):
                            h = x + delta
                            weight * torch.nn.functional.rms_norm(h.float(), (hidden,), eps=1e-5).to(torch.bfloat16)
                        qk = qkv[:, : heads * D].view(rows, heads, D)
                        qk * cos[:, None] + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin[:, None]
                        gate, up = gate_up.chunk(2, dim=-1)
                        torch.nn.functional.silu(gate) * up

                def with_ours():
                    for _ in range(layers):
                        for _ in range(2):
                            ops.add_rms_norm(x.clone(), delta, weight, 1e-5)
                        ops.rotary_(qkv, heads, cos, sin)
                        ops.silu_mul(gate_up)

                a, b = [], []
                with torch.inference_mode():
                    for _ in range(args.rounds):
                        a.append(_time(with_torch, repeats))
                        b.append(_time(with_ours, repeats))
                print(f"layer_ops_torch_ms_{rows}: {statistics.median(a):.2f}")
                print(f"layer_ops_ours_ms_{rows}: {statistics.median(b):.2f}")
                figures[f"ops_{rows}"] = statistics.median(a) / statistics.median(b)
            print(f"layer_ops_speedup_16: {figures['ops_16']:.2f}")
            print(f"layer_ops_speedup_150: {figures['ops_150']:.2f}")
        print(f"attention_speedup_1: {figures[(1, 200)]:.2f}")
        print(f"attention_speedup_16: {figures[(16, 200)]:.2f}")


if __name__ == "__main__":
    main()
