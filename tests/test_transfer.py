import logging

import torch

from storygen import transfer


def test_on_a_cpu_it_is_torch_tensor():
    got = transfer.to_device([[1, 2], [3, 4]], torch.long, torch.device("cpu"))
    assert torch.equal(got, torch.tensor([[1, 2], [3, 4]])) and got.dtype == torch.long


def test_where_pinned_memory_cannot_be_had_it_copies_plainly_after_one_warning(monkeypatch, caplog):
    """This machine has no accelerator, so pinning fails here as it does on hosts that refuse it; the
    `meta` device stands in for the accelerator."""
    monkeypatch.setattr(transfer, "_pinning", True)
    meta = torch.device("meta")
    with caplog.at_level(logging.WARNING, logger="storygen.transfer"):
        first = transfer.to_device([1.0, 2.0, 3.0], torch.float32, meta)
        second = transfer.to_device([True, False], torch.bool, meta)
    assert first.device == meta and first.shape == (3,) and first.dtype == torch.float32
    assert second.device == meta and second.dtype == torch.bool
    assert caplog.text.count("pinned host memory is not available") == 1
