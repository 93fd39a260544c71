"""The float64 oracle, and the backend of last resort.

Each function here is the specification of the `torch.ops.fusedclip` op of the same name
(csrc/README.md): simple torch code in float64, obviously right, used by the tests as the oracle
and by the dispatcher as `backend="reference"`. No function syncs with the host.
"""

from __future__ import annotations

import math

import torch

# torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing; so do we, everywhere.
NORM_EPS = 1e-6


def is_inf_norm(norm_type: float) -> bool:
    return math.isinf(norm_type)


def _nan_propagating_max(values: torch.Tensor) -> torch.Tensor:
    # torch.max propagates NaN; an empty tensor has max 0 (a norm of nothing is 0).
    return values.max() if values.numel() else values.new_zeros(())


def tensor_power(tensor: torch.Tensor, norm_type: float) -> torch.Tensor:
    """sum(|g|^p) of one tensor in float64, or max(|g|) for p = inf (NaN propagates)."""
    magnitudes = tensor.detach().reshape(-1).to(torch.float64).abs()
    if is_inf_norm(norm_type):
        return _nan_propagating_max(magnitudes)
    return magnitudes.pow(norm_type).sum()


def combine_powers(powers: torch.Tensor, norm_type: float) -> torch.Tensor:
    """Combines per-tensor (or per-device, per-rank) powers: a sum, or a max for p = inf."""
    if is_inf_norm(norm_type):
        return _nan_propagating_max(powers)
    return powers.sum()


def power_to_norm(power: torch.Tensor, norm_type: float) -> torch.Tensor:
    return power if is_inf_norm(norm_type) else power.pow(1.0 / norm_type)


def reduce(
    tensors: list[torch.Tensor], norm_type: float, per_tensor: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The read pass: (power_sum float64 [], found_inf float32 [], per_tensor_power float64 [n] or [0]).

    power_sum = sum over all elements of |g|^p (max |g| for p = inf); found_inf = 1.0 if any
    element is inf or NaN. All tensors are on one device.
    """
    device = tensors[0].device
    powers = torch.stack([tensor_power(t, norm_type) for t in tensors])
    nonfinite = torch.stack([~torch.isfinite(t.detach()).all() for t in tensors]).any()
    power_sum = combine_powers(powers, norm_type)
    per_tensor_power = powers if per_tensor else torch.empty(0, dtype=torch.float64, device=device)
    return power_sum, nonfinite.to(torch.float32), per_tensor_power


def clip_coefficient(
    total_norm: torch.Tensor, max_norm: float | None, inv_scale: torch.Tensor | None
) -> torch.Tensor:
    """inv_scale * min(1, max_norm / (total_norm + 1e-6)), computed in float64. NaN propagates."""
    coef = torch.ones((), dtype=torch.float64, device=total_norm.device)
    if max_norm is not None:
        # clamp(max=1) keeps NaN, as torch's clip_grad_norm_ does.
        coef = (max_norm / (total_norm.to(torch.float64) + NORM_EPS)).clamp(max=1.0)
    if inv_scale is not None:
        coef = coef * inv_scale.to(device=coef.device, dtype=torch.float64).reshape(())
    return coef


def finalize(
    power_sum: torch.Tensor,
    norm_type: float,
    max_norm: float | None,
    inv_scale: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total_norm, clip_coef), both 0-dim of `out_dtype` (float32 or float64).

    total_norm = power_sum^(1/p) * |inv_scale|  (the norm of the unscaled gradients: the scale
    factors out of the sum since ||s*g|| = |s| * ||g||);
    clip_coef = inv_scale * min(1, max_norm / (total_norm + 1e-6)), or inv_scale (or 1) without
    max_norm.
    """
    norm = power_to_norm(power_sum.to(torch.float64), norm_type)
    if inv_scale is not None:
        norm = norm * inv_scale.to(device=norm.device, dtype=torch.float64).reshape(()).abs()
    coef = clip_coefficient(norm, max_norm, inv_scale)
    return norm.to(out_dtype), coef.to(out_dtype)


def scale_(tensors: list[torch.Tensor], clip_coef: torch.Tensor, clip_value: float | None) -> None:
    """The write pass, in place: g = clamp(g * clip_coef, -clip_value, clip_value).

    The product is formed in float64 and rounded once to the gradient's dtype (the kernels form
    it in float32 for 16- and 32-bit gradients: within an ulp of this).
    """
    for tensor in tensors:
        scaled = tensor.to(torch.float64) * clip_coef.to(device=tensor.device, dtype=torch.float64)
        if clip_value is not None:
            scaled = scaled.clamp(-clip_value, clip_value)
        tensor.copy_(scaled)
