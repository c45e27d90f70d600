"""Linear layers with their weights packed once for oneDNN, for inference on a CPU.

torch's CPU build multiplies an fp32 `nn.Linear` through MKL's sgemm, which handles the
shapes of batched decoding badly: with 16 rows, SmolLM2's 576 x 49,152 output layer took
15 ms through MKL and 6 ms through oneDNN with a packed weight, and a whole decode step went
from about 80 ms to about 50 ms (benchmarks/README.md). The arithmetic is still fp32; only the
order of the additions differs (logits within 2e-4 of MKL's, greedy text unchanged).

A bf16 `nn.Linear` already runs through oneDNN, reordering its weight on every call; packing
saves that reorder, but nobody has measured whether it pays, so STORYGEN_ONEDNN=auto packs
fp32 weights only and `true` packs bf16 ones as well. Either way the first layer is checked
against its dense self at load, and nothing is packed where it disagrees.

This is what torch.utils.mkldnn.to_mkldnn does, as a plain module rather than a TorchScript
one, so forward hooks still work; GPT-2's Conv1D layers are packed too.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

logger = logging.getLogger(__name__)


class PackedLinear(nn.Module):
    """y = x @ W.T + b with W held in oneDNN's blocked layout. Inference only."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("packed_weight", weight.detach().contiguous().to_mkldnn(), persistent=False)
        self.register_buffer("packed_bias", bias.detach().contiguous().to_mkldnn() if bias is not None else None,
                             persistent=False)

    @classmethod
    def from_dense(cls, layer: nn.Module) -> PackedLinear:
        if isinstance(layer, Conv1D):  # GPT-2's "linear" keeps its weight as (in, out)
            return cls(layer.weight.t(), layer.bias)
        return cls(layer.weight, layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._C._nn.mkldnn_linear(x.contiguous().to_mkldnn(), self.packed_weight, self.packed_bias)
        return y.to_dense()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN"


def can_pack(device: torch.device, dtype: torch.dtype, mode: str = "auto") -> bool:
    """Whether STORYGEN_ONEDNN=`mode` packs a model of `dtype` on `device`."""
    if mode == "false" or device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and mode == "true" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pack_linears(model: nn.Module) -> int:
    """Swap every nn.Linear and Conv1D in an eval-mode model for a PackedLinear; returns how many.

    The first layer is tried against its dense self first; where this torch build's oneDNN
    can't run it (or disagrees), nothing is swapped and the model stays as it was.
    """
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) in (nn.Linear, Conv1D)]
    if not targets or not _works(targets[0][2]):
        return 0
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear.from_dense(child))
    return len(targets)


def _works(layer: nn.Module) -> bool:
    """Packed and dense agree: the packed layer is no further from an fp32 reference than the dense one."""
    in_features = layer.weight.shape[0 if isinstance(layer, Conv1D) else 1]
    x = torch.randn(2, 3, in_features).to(layer.weight.dtype)
    try:
        with torch.inference_mode():
            packed, dense = PackedLinear.from_dense(layer)(x), layer(x)
            exact = copy.deepcopy(layer).float()(x.float())
    except RuntimeError as error:
        logger.warning("oneDNN can't run the model's linear layers here (%s); keeping them dense", error)
        return False
    # In fp32 dense is the reference, so this asks for agreement within 1e-4 of the output's scale;
    # in bf16 both round, and packed may be off by as much as dense is, twice over.
    dense_error, packed_error = (dense.float() - exact).abs().max(), (packed.float() - exact).abs().max()
    if not packed_error <= 2 * dense_error + 1e-4 * exact.abs().max():
        logger.warning("oneDNN's linear layers disagree with the dense ones here; keeping them dense")
        return False
    return True
