"""Small host values onto the model's device without waiting for the device.

`torch.tensor(values, device="cuda")` copies from pageable memory and then waits until the GPU has
finished everything queued before the copy (c10's memcpy_and_sync). In a decode step that is a wait
in the middle of the step: the host stops queuing the step's sampling until the forward is done,
and the GPU then idles while it does. From pinned memory with non_blocking=True the copy is queued
like a kernel and the host goes on; torch's caching host allocator keeps the pinned block until the
copy has run. A step then waits once, where it must: to read the tokens it sampled.

On a CPU this is plain `torch.tensor`. Where pinned memory cannot be had (some virtual machines and
WSL refuse it), the copies wait, as they did before, after one warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)

_pinning = True  # False once pinning has failed in this process


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.tensor(values, dtype=dtype, device=device)`, queued on an accelerator rather than waited for."""
    global _pinning
    if device.type != "cpu" and _pinning:
        try:
            return torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)
        except RuntimeError as error:
            _pinning = False
            logger.warning("pinned host memory is not available (%s); copies to the %s wait for it", error, device.type)
    return torch.tensor(values, dtype=dtype, device=device)
