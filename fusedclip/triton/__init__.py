"""The Triton backend of fusedclip: ops `fusedclip::triton_reduce`, `triton_finalize`, `triton_scale_`.

Importing this package never fails for want of Triton: `is_available()` is then False,
`unavailable_reason` says why, and no op is registered. The kernels run on CUDA tensors, or on CPU
tensors under TRITON_INTERPRET=1 (slow; for tests).
"""

import torch

unavailable_reason = ""

try:
    import triton  # noqa: F401
except ImportError as error:
    unavailable_reason = f"triton is not importable: {error}"

if unavailable_reason:
    ops = None
elif not hasattr(torch.library, "triton_op"):
    ops = None
    unavailable_reason = f"torch {torch.__version__} has no torch.library.triton_op"
else:
    # Bound on this branch only: after `ops = None`, `from . import ops` would return that None.
    from . import ops


def is_available() -> bool:
    """True when the ops `torch.ops.fusedclip.triton_*` are registered."""
    return ops is not None


def supports_device(device: torch.device) -> bool:
    """True when the kernels can run on tensors of `device`."""
    if ops is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and ops.kernels.INTERPRETED)
