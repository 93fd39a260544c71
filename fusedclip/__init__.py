"""fusedclip: fused gradient clipping and AMP unscaling for PyTorch.

One read and one write pass over the gradients, a fixed number of launches, no host sync.
"""

from fusedclip import amp, stability
from fusedclip._version import __version__
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
from fusedclip.build_info import BuildInfo, build_info
from fusedclip.dispatch import backends
from fusedclip.patch import Patch, patch, unpatch

__all__ = [
    "BuildInfo",
    "ClipResult",
    "Patch",
    "__version__",
    "amp",
    "backends",
    "build_info",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "clip_gradient",
    "fused_clip_",
    "get_total_norm",
    "measure",
    "patch",
    "stability",
    "unpatch",
]
