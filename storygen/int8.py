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

**int4.** The default model comes as a Q4_1 GGUF: its block layers' weights lie on a grid of
16 levels per 32 weights (a scale and a minimum per block), and dequantizing them to bf16 only
spreads those 4 bits over 16. Held as int4 again, with the same groups of 32 along the input
and one scale and zero per group, they are the same weights (the scales rounded to bf16), at a
quarter of the bytes: torch's CPU kernel for weight-only int4 (`aten._weight_int4pack_mm_for_cpu`,
the one torchao uses on CPUs) took a lone story's linear layers from ~14 to ~7 ms a step here,
and is still faster than bf16 at 16 rows (68–76 against 72–95 ms a batch-16 step), not at 20.
STORYGEN_INT4=auto holds as int4 exactly the layers that are on such a grid already (checked per layer: re-quantized, they must come back within 2 %),
so nothing is lost; the others (the Q8_0 output layer, every layer of a fine-tuned model) keep
their int8 copy. `true` makes int4 copies of every layer it can, whatever that costs (measure it
with benchmarks/int8_bench.py), `false` none.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from storygen.kernels import Int4Matmul, Int8Matmul, Kernels

logger = logging.getLogger(__name__)

SMALL_ROWS = 4  # rows per call up to which the int8 copy is used, through torch's kernel
NATIVE_INT8_ROWS = 16  # the same through ours (kernels.Int8Matmul): at 16 rows 4.1 against 8.1 ms for bf16
INT4_ROWS = 16  # rows per call up to which an int4 copy is used (measured: faster than bf16 up to 16, slower at 20)
# The same through ours (kernels.Int4Matmul, blocks of 16 rows): a prompt's 32-token pieces read a quarter
# of the bytes, and in a whole prefill (where the weights come from memory, not cache) that paid: a
# prompt after its framing, in 32-token pieces, 119 -> 86 ms; up to 64 rows gained nothing.
NATIVE_INT4_ROWS = 32
INT4_GROUP = 32  # weights per scale and zero, along the input: Q4_1's block
INT4_OUT = 16  # the kernel's packing wants the output width a multiple of this
INT4_EXACT = 0.02  # relative error within which a layer counts as already on a 4-bit grid

Grid = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # q (out, in) int32 in 0..15; scale, low (out, in / G)
Packed = tuple[torch.Tensor, ...]  # our kernels' layout of a copy (kernels.py): each tensor's rows are output rows or blocks of 16


class SmallBatchLinear(nn.Module):
    """A linear layer with a quantized copy of its weight, used for calls of at most `small_rows` rows."""

    small_rows: int
    kind: str
    tolerance: float  # relative error against the dense layer past which the kernel counts as broken

    def __init__(self, dense: nn.Linear) -> None:
        super().__init__()
        self.dense = dense
        self.in_features, self.out_features = dense.in_features, dense.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.dense.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.dense.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > self.small_rows or x.dtype != self.dense.weight.dtype:
            return self.dense(x)
        y = self._small(x.reshape(rows, self.in_features).contiguous())
        if self.dense.bias is not None:
            y = y + self.dense.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _small(self, x: torch.Tensor) -> torch.Tensor:
        """x (rows, in), contiguous: x @ weight.T through the quantized copy."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.kind} up to {self.small_rows} rows")


class DualLinear(SmallBatchLinear):
    """A linear layer with an int8 copy of its weight (one scale per output row), for calls of at most SMALL_ROWS rows."""

    small_rows = SMALL_ROWS
    kind = "int8"
    tolerance = 0.05

    def __init__(self, dense: nn.Linear, native: Int8Matmul | None = None, packed: Packed | None = None) -> None:
        """native: our int8 kernel (storygen/kernels.py), used instead of torch's for a bf16 layer whose
        widths it takes; it pays up to NATIVE_INT8_ROWS rows (its own packing of the same int8 weight).
        packed: that packing when the caller has it already (join)."""
        super().__init__(dense)
        if packed is not None and native is not None:
            self.native, self.small_rows, self.native_weight = native, NATIVE_INT8_ROWS, packed
            return
        weight = dense.weight.detach().float()
        scale = (weight.abs().amax(dim=1).clamp(min=1e-8) / 127).to(dense.weight.dtype)
        q = torch.round(weight / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        fits = dense.weight.dtype == torch.bfloat16 and self.out_features % 16 == 0 and self.in_features % 2 == 0
        self.native = native if fits else None
        if self.native is not None:
            self.small_rows = NATIVE_INT8_ROWS
            self.native_weight = Int8Matmul.pack(q, scale)
            return
        self.register_buffer("int8_weight", q, persistent=False)
        self.register_buffer("int8_scale", scale, persistent=False)

    def _small(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            return self.native(x, self.native_weight, self.out_features)
        return torch.ops.aten._weight_int8pack_mm(x, self.int8_weight, self.int8_scale)



class Int4Linear(SmallBatchLinear):
    """A linear layer with an int4 copy of its weight (groups of INT4_GROUP), for calls of at most INT4_ROWS rows
    (NATIVE_INT4_ROWS through our kernel)."""

    small_rows = INT4_ROWS
    kind = "int4"
    tolerance = 0.2  # int4 of a full-precision layer is ~10 % off (STORYGEN_INT4=true); a broken kernel more

    def __init__(self, dense: nn.Linear, grid: Grid | None = None, native: Int4Matmul | None = None,
                 packed: Packed | None = None) -> None:
        """grid: the weight's 4-bit grid when the caller has it already (_exact_int4_grid); native: our
        kernel (storygen/kernels.py), used instead of torch's for a bf16 layer (its own packing of the grid);
        packed: that packing when the caller has it already (join)."""
        super().__init__(dense)
        if packed is not None and native is not None:
            self.native, self.native_weight, self.small_rows = native, packed, NATIVE_INT4_ROWS
            return
        q, scale, low = grid if grid is not None else _int4_grid(dense.weight.detach().float())
        ours = native is not None and dense.weight.dtype == torch.bfloat16 and Int4Matmul.holds(scale, low)
        self.native = native if ours else None
        if self.native is not None:
            self.native_weight, self.small_rows = Int4Matmul.pack(q, scale, low), NATIVE_INT4_ROWS
            return
        # torch's kernel's weight is (q - 8) * scale + zero, so zero = low + 8 * scale. (in / G, out, 2).
        scales = torch.stack([scale.t(), (low + 8 * scale).t()], dim=-1).to(dense.weight.dtype).contiguous()
        self.register_buffer("int4_weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1),
                             persistent=False)
        self.register_buffer("int4_scales", scales, persistent=False)

    def _small(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            return self.native(x, self.native_weight, self.out_features)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.int4_weight, INT4_GROUP, self.int4_scales)


def join(dense: nn.Linear, parts: list[SmallBatchLinear]) -> SmallBatchLinear:
    """`dense` (the parts' weights one above the other) as a layer of the parts' kind, its quantized copy
    the parts' own joined. Where our kernels serve the parts, their copies become views of the joined
    one, so nothing is held twice (their layouts keep output rows, or blocks of 16, outermost); else the
    joined weight is quantized again, which gives the same copy: both are per output row."""
    kind, first = type(parts[0]), parts[0]
    if first.native is None or any(part.native is not first.native for part in parts):
        return kind(dense, native=first.native)
    packed = tuple(torch.cat(tensors) for tensors in zip(*(part.native_weight for part in parts)))
    start = 0
    for part in parts:
        stop = start + part.out_features
        part.native_weight = tuple(t[start * len(t) // dense.out_features:stop * len(t) // dense.out_features]
                                   for t in packed)
        start = stop
    return kind(dense, native=first.native, packed=packed)


def _int4_grid(weight: torch.Tensor) -> Grid:
    """weight (out, in) fp32 on its nearest 4-bit grid: w ≈ q * scale + low, per group of INT4_GROUP inputs."""
    out, inp = weight.shape
    groups = weight.reshape(out, inp // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-8)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
    return q.to(torch.int32).reshape(out, inp), scale, low


def _exact_int4_grid(weight: torch.Tensor) -> Grid | None:
    """The weight's 4-bit grid if it is on one already (re-quantized, it comes back within INT4_EXACT), else None."""
    w = weight.detach().float()
    q, scale, low = _int4_grid(w)
    back = (q.reshape(*scale.shape, INT4_GROUP) * scale[..., None] + low[..., None]).reshape(w.shape)
    exact = ((back - w).norm() / w.norm().clamp(min=1e-12)).item() < INT4_EXACT
    return (q, scale, low) if exact else None


def on_int4_grid(weight: torch.Tensor) -> bool:
    """Whether a weight (out, in) is already 4-bit in groups of INT4_GROUP."""
    return _exact_int4_grid(weight) is not None


def can_use_int4(device: torch.device, dtype: torch.dtype, mode: str = "auto") -> bool:
    """Whether STORYGEN_INT4=`mode` may add int4 copies for a model of `dtype` on `device` (bf16 on a CPU)."""
    return (mode != "false" and device.type == "cpu" and dtype == torch.bfloat16
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))


def can_use(device: torch.device, dtype: torch.dtype, mode: str = "auto") -> bool:
    """Whether STORYGEN_INT8=`mode` adds int8 copies for a model of `dtype` on `device`."""
    if mode == "false" or device.type != "cpu" or not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return False
    return dtype in (torch.bfloat16, torch.float32) if mode == "true" else dtype == torch.bfloat16


def add_int8_copies(model: nn.Module, int4: str = "false", int8: bool = True,
                    kernels: Kernels | None = None) -> tuple[int, int]:
    """Wrap the plain nn.Linear layers of `model` in SmallBatchLinears: (int4 copies, int8 copies) made. Checks the
    first of each kind.

    int4: STORYGEN_INT4's mode ("auto": the layers already on a 4-bit grid; "true": every layer whose
    widths fit the kernel; "false": none). The other layers get int8 copies if `int8`. kernels: ours
    (storygen/kernels.py), whose int4 and int8 matmuls then serve those copies' calls instead of torch's, or None.
    """
    native = kernels.int4 if kernels is not None else None
    native8 = kernels.int8 if kernels is not None else None
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear]
    made = {Int4Linear: [], DualLinear: []}
    for parent, name, child in targets:
        fits = int4 != "false" and child.in_features % INT4_GROUP == 0 and child.out_features % INT4_OUT == 0
        grid = _exact_int4_grid(child.weight) if fits and int4 == "auto" else None
        if fits and (int4 == "true" or grid is not None):
            layer = Int4Linear(child, grid=grid, native=native)
        elif int8:
            layer = DualLinear(child, native=native8)
        else:
            continue
        setattr(parent, name, layer)
        made[type(layer)].append((parent, name, child))
    for layers in made.values():
        if layers and not _agrees(getattr(layers[0][0], layers[0][1])):  # a broken kernel, not rounding
            for parent, name, child in layers:
                setattr(parent, name, child)
            layers.clear()
    return len(made[Int4Linear]), len(made[DualLinear])


def _agrees(layer: SmallBatchLinear) -> bool:
    x = torch.randn(1, layer.in_features, dtype=layer.weight.dtype)
    with torch.inference_mode():
        dense, quantised = layer.dense(x).float(), layer(x).float()
    error = ((dense - quantised).norm() / dense.norm().clamp(min=1e-6)).item()
    if error < layer.tolerance:
        return True
    logger.warning("%s weights disagree with the dense layer (relative error %.3f); not used", layer.kind, error)
    return False
