"""The float64 oracle, and the backend of last resort.

Each function here is the specification of the `torch.ops.fusedclip` op of the same name
(csrc/README.md): simple torch code in float64, obviously right, used by the tests as the oracle
and by the dispatcher as `backend="reference"`. No function syncs with the host.
"""

from __future__ import annotations

import torch

from fusedclip.norms import clamp_by_value, clip_coefficient, combine_norms


def tensor_norm(tensor: torch.Tensor, norm_type: float) -> torch.Tensor:
    """The p-norm of one tensor in float64 (max |g| for p = inf), NaN-propagating: the norm of its
    elements' magnitudes, combined as any norms are (scaled by the max before the power, so it is
    finite whenever the norm fits float64)."""
    return combine_norms(tensor.detach().reshape(-1).to(torch.float64).abs(), norm_type)


def reduce(
    tensors: list[torch.Tensor], norm_type: float, per_tensor: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The read pass: (raw_norm float64 [], found_inf float32 [], per_tensor_norms float64 [n] or [0]).

    raw_norm = (sum over all elements of |g|^p)^(1/p) (max |g| for p = inf); found_inf = 1.0 if
    any element is inf or NaN. All tensors are on one device.
    """
    device = tensors[0].device
    norms = torch.stack([tensor_norm(t, norm_type) for t in tensors])
    nonfinite = torch.stack([~torch.isfinite(t.detach()).all() for t in tensors]).any()
    per_tensor_norms = norms if per_tensor else torch.empty(0, dtype=torch.float64, device=device)
    return combine_norms(norms, norm_type), nonfinite.to(torch.float32), per_tensor_norms


def finalize(
    raw_norm: torch.Tensor,
    max_norm: float | None,
    inv_scale: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total_norm of `out_dtype`, clip_coef float64), both 0-dim.

    total_norm = raw_norm * |inv_scale|  (the norm of the unscaled gradients: ||s*g|| = |s|*||g||);
    clip_coef = inv_scale * min(1, max_norm / (total_norm + 1e-6)), or inv_scale (or 1) without
    max_norm.
    """
    norm = raw_norm.to(torch.float64)
    if inv_scale is not None:
        norm = norm * inv_scale.to(device=norm.device, dtype=torch.float64).reshape(()).abs()
    return norm.to(out_dtype), clip_coefficient(norm, max_norm, inv_scale)


def scale_(tensors: list[torch.Tensor], clip_coef: torch.Tensor, clip_value: float | None) -> None:
    """The write pass, in place: g = clamp(g * clip_coef, -clip_value, clip_value).

    The product is formed in float64 and rounded once to the gradient's dtype (the kernels form
    it in float32 for 16- and 32-bit gradients when the coefficient is a normal float32: within an
    ulp of this).
    """
    for tensor in tensors:
        scaled = tensor.to(torch.float64) * clip_coef.to(device=tensor.device, dtype=torch.float64)
        if clip_value is not None:
            scaled = clamp_by_value(scaled, clip_value)
        tensor.copy_(scaled)
