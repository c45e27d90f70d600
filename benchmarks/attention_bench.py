"""A decode step's attention: torch's SDPA against our C kernel (storygen/kernels.py), in one run.

    python benchmarks/attention_bench.py                    # SmolLM2-135M's shapes: 30 layers, 9 heads over 3, D 64
    python benchmarks/attention_bench.py --smoke            # small shapes, a few repeats (CI)

Each case is one decode step's attention over all layers, each layer with its own cache (so
the caches come from memory, as in a real step, not from the CPU's cache), in bf16, rows
left-padded by different amounts. A and B alternate for --rounds rounds; the figures are the
medians. The last line is `attention_speedup_16`: SDPA's time over the kernel's at 16 rows.
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

from storygen.kernels import load_decode_attention  # noqa: E402


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="small shapes, for CI")
    args = parser.parse_args(argv)
    layers, kv, group, D, repeats = (2, 2, 3, 16, 2) if args.smoke else (30, 3, 3, 64, 20)
    with tempfile.TemporaryDirectory() as tmp:
        kernel = load_decode_attention(Path(tmp))
        if kernel is None:
            sys.exit("the kernel could not be built here (no C compiler?); see the log line above")
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
        print(f"attention_speedup_1: {figures[(1, 200)]:.2f}")
        print(f"attention_speedup_16: {figures[(16, 200)]:.2f}")


if __name__ == "__main__":
    main()
