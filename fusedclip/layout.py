"""Tensor layout facts shared by the Python layers and the Triton ops."""

from __future__ import annotations

import torch


def is_dense(tensor: torch.Tensor) -> bool:
    """True when the elements fill their storage span exactly once, in any dim order
    (contiguous, channels-last, transposed): a kernel may walk the span as a flat array."""
    if tensor.is_contiguous():
        return True
    if torch.compiler.is_compiling():
        # Dynamo cannot walk the strides of some inputs (a parameter's .grad: "Cannot construct
        # ConstantVariable for SymInt"), so tracing asks only for the layouts it can: the rest
        # take the strided path (a contiguous copy, written back), which is as exact.
        return (tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last)) or (
            tensor.dim() == 5 and tensor.is_contiguous(memory_format=torch.channels_last_3d)
        )
    expected_stride = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride(), strict=True), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected_stride:
            return False
        expected_stride *= size
    return True
