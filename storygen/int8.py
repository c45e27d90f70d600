"""An int8 copy of the linear weights for small batches on a CPU: a lone story reads half the bytes.

A decode step of one story is bound by reading the weights: SmolLM2-135M's bf16 weights are
270 MB per token, and its batch-1 step took ~60 ms on this 2-core CPU, where llama.cpp, reading
4-bit weights, took ~15. With each linear layer's weight also held as int8 (symmetric, one scale
per output row) and multiplied by torch's own CPU kernel for weight-only int8
(`aten._weight_int8pack_mm`, the one gpt-fast uses), the step took ~31 ms.

At 16 rows and up the bf16 matmul is as fast or faster (the weights are read once for all rows),
and prefill is many rows, so `DualLinear` picks per call: up to SMALL_ROWS rows through int8,
more through the layer as it was. Memory: the int8 copy adds half the bf16 weights again.
What it costs in quality is measured in benchmarks/int8_bench.py (perplexity, token by token).
STORYGEN_INT8=auto (on for bf16 on a CPU) | true | false.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

SMALL_ROWS = 4  # rows per call up to which the int8 copy is used


class DualLinear(nn.Module):
    """A linear layer with an int8 copy of its weight, used for calls of at most SMALL_ROWS rows."""

    def __init__(self, dense: nn.Linear) -> None:
        super().__init__()
        self.dense = dense
        self.in_features, self.out_features = dense.in_features, dense.out_features
        weight = dense.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
        self.register_buffer("int8_weight", torch.round(weight / scale[:, None]).to(torch.int8), persistent=False)
        self.register_buffer("int8_scale", scale.to(dense.weight.dtype), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.dense.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.dense.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > SMALL_ROWS or x.dtype != self.int8_scale.dtype:
            return self.dense(x)
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, self.in_features).contiguous(), self.int8_weight,
                                               self.int8_scale)
        if self.dense.bias is not None:
            y = y + self.dense.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 up to {SMALL_ROWS} rows"


def can_use(device: torch.device, dtype: torch.dtype, mode: str = "auto") -> bool:
    """Whether STORYGEN_INT8=`mode` adds int8 copies for a model of `dtype` on `device`."""
    if mode == "false" or device.type != "cpu" or not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return False
    return dtype in (torch.bfloat16, torch.float32) if mode == "true" else dtype == torch.bfloat16


def add_int8_copies(model: nn.Module) -> int:
    """Wrap every plain nn.Linear of `model` in a DualLinear; returns how many. Checks the first one."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear]
    for parent, name, child in targets:
        setattr(parent, name, DualLinear(child))
    if targets:
        first = getattr(targets[0][0], targets[0][1])
        x = torch.randn(1, first.in_features, dtype=first.weight.dtype)
        with torch.inference_mode():
            dense, quantised = first.dense(x).float(), first(x).float()
        error = ((dense - quantised).norm() / dense.norm().clamp(min=1e-6)).item()
        if not error < 0.05:  # a broken kernel, not rounding: put the layers back
            for parent, name, child in targets:
                setattr(parent, name, child)
            logger.warning("int8 weights disagree with the dense layer (relative error %.3f); not used", error)
            return 0
    return len(targets)
