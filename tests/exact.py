"""Helpers for bit-exact comparisons, shared by the pytest suite and the pytest-free
standalone_cuda_check.py."""

from __future__ import annotations

import torch


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of the raw bits of a tensor, so NaN payloads and signed zeros compare too."""
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16}[tensor.element_size()]
    return tensor.detach().contiguous().view(view).clone()


def same_alignment_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy at the same offset from a 16-byte boundary: the CUDA kernels' vector loads start
    there, and with them the summation order. clone() would align the copy."""
    offset = tensor.data_ptr() % 16 // tensor.element_size()
    buffer = torch.empty(tensor.numel() + offset, dtype=tensor.dtype, device=tensor.device)
    return buffer[offset:].copy_(tensor.reshape(-1)).view(tensor.shape)
