"""fusedclip: fused gradient clipping and AMP unscaling for PyTorch.

One read and one write pass over the gradients, a fixed number of launches, no host sync.
"""

from fusedclip import amp, stability
from fusedclip.api import (
    ClipResult,
    clip_grad_norm_,
    clip_grad_value_,
    clip_grads_with_norm_,
    fused_clip_,
    get_total_norm,
    measure,
)
from fusedclip.autograd import clip_gradient
from fusedclip.dispatch import backends

__all__ = [
    "ClipResult",
    "backends",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "fused_clip_",
    "get_total_norm",
    "measure",
    "amp",
    "clip_gradient",
    "stability",
]
__version__ = "0.1.0"
