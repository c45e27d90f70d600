"""Small host values onto the model's device without waiting for the device.

`torch.tensor(values, device="cuda")` copies from pageable memory and then waits until the GPU has
finished everything queued before the copy (c10's memcpy_and_sync). In a decode step that is a wait
in the middle of the step: the host stops queuing the step's sampling until the forward is done,
and the GPU then idles while it does. From pinned memory with non_blocking=True the copy is queued
like a kernel and the host goes on; torch's caching host allocator keeps the pinned block until the
copy has run. A step then waits once, where it must: to read the tokens it sampled.

On a CPU this is plain `torch.tensor`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.tensor(values, dtype=dtype, device=device)`, queued on a CUDA device rather than waited for."""
    if device.type == "cuda":
        return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
    return torch.tensor(values, dtype=dtype, device=device)
