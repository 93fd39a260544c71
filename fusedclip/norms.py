"""The norm maths every layer shares, in torch (csrc/include/fusedclip/norm.h is its C++ twin).

Norms travel between layers as float64 norms, never as sums of |g|^p: a norm of finite gradients
is finite whenever it fits float64, a power sum need not be (|3.0|^1000 is not). Combining norms
(devices, ranks, dense and sparse parts) rescales by their max, as LAPACK's nrm2 does.
No function here syncs with the host.
"""

from __future__ import annotations

import math

import torch

# torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing; so do we, everywhere.
NORM_EPS = 1e-6

# Up to this p, |g|^p of any float32/float16/bfloat16 value summed over 2^60 elements stays a normal
# float64, so kernels may sum it plainly; past it, or for float64 gradients with any p but 1, they
# scale (for p < 1 the sum fits, but its root can round past float64's max).
MAX_UNSCALED_NORM_TYPE = 6.0
# Below this p, too: the root multiplies the sum's rounding by 1/p (one nonzero |x|^p rounds to
# 1 + O(2^-53), and p = 1e-12 of [3, 0, 0] gave 3.0002); a scaled sum's largest term is exactly 1.
MIN_UNSCALED_NORM_TYPE = 2.0**-10

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# float32's normal range: a coefficient outside it is applied in float64 (needs_float64_product).
FLOAT32_TINY = torch.finfo(torch.float32).tiny
FLOAT32_MAX = torch.finfo(torch.float32).max
FLOAT64_TINY = torch.finfo(torch.float64).tiny


def is_inf_norm(norm_type: float) -> bool:
    """For a checked norm_type (> 0); a comparison, which torch.compile traces on a SymFloat."""
    return norm_type == math.inf


def needs_scaled_sum(norm_type: float, any_float64: bool) -> bool:
    """Whether sum |g|^p, or its root, can leave float64's normal range for finite gradients."""
    if is_inf_norm(norm_type) or norm_type == 1.0:
        return False
    return any_float64 or norm_type > MAX_UNSCALED_NORM_TYPE or norm_type < MIN_UNSCALED_NORM_TYPE


def needs_float64_product(clip_coef: float) -> bool:
    """Whether the write pass forms g * clip_coef in float64 for a 16- or 32-bit gradient: the
    coefficient is nonzero, finite and outside float32's normal range (zero, inf, NaN are exact)."""
    magnitude = abs(clip_coef)
    return (
        magnitude != 0.0
        and math.isfinite(magnitude)
        and not (FLOAT32_TINY <= magnitude <= FLOAT32_MAX)
    )


def nan_max(values: torch.Tensor) -> torch.Tensor:
    """max of a 1-D tensor, NaN if any is NaN, 0 for an empty one (a norm of nothing is 0)."""
    return values.max() if values.numel() else values.new_zeros(())


def combine_norms(
    norms: torch.Tensor, norm_type: float, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """The norm of the union of disjoint sets whose norms are `norms` (1-D, float64).

    With `weights`, set i counts weights[i] times (a replicated shard held by k ranks counts
    1/k on each). p = inf: the max (weights do not matter). NaN propagates, then inf.
    """
    norms = norms.to(torch.float64)
    largest = nan_max(norms)
    if is_inf_norm(norm_type):
        return largest
    safe = torch.where(torch.isfinite(largest) & (largest > 0), largest, torch.ones_like(largest))
    # p as a tensor: inductor (torch 2.14, dynamic=True) compiled pow(x, p) of a symbolic p as
    # x * x for the p of the first call, with no guard, so later calls got the 2-norm.
    norm_type = torch.ones_like(largest) * norm_type
    ratios = norms / safe
    # A ratio below float64's normal range has underflowed, but for a small p its power still
    # counts ((1e-300 / 1e300)^0.008 is 0.0016): such a power is taken in the log domain
    # (norm.h's power_of_ratio).
    in_logs = torch.exp2(norm_type * (norms.log2() - safe.log2()))
    powers = torch.where((ratios >= FLOAT64_TINY) | (norms == 0), ratios.pow(norm_type), in_logs)
    if weights is not None:
        powers = powers * weights.to(powers)
    combined = scale_by_root(safe, powers.sum(), norm_type)
    return torch.where(torch.isfinite(largest) & (largest > 0), combined, largest)


def scale_by_root(
    scale: torch.Tensor, power_sum: torch.Tensor, norm_type: torch.Tensor
) -> torch.Tensor:
    """scale * power_sum^(1/p) for a finite scale > 0 and a power_sum >= 1, finite whenever it fits
    float64: for a tiny p the root alone can overflow while the product fits, and then it is applied
    as three factors (norm.h's scale_by_root, which says why three). p: a float64 0-dim tensor."""
    root = power_sum.pow(1.0 / norm_type)
    third = torch.exp2(power_sum.log2() / norm_type / 3.0)
    in_thirds = scale * third * third * third
    return torch.where(torch.isfinite(root), scale * root, in_thirds)


def clamp_by_value(values: torch.Tensor, clip_value: float) -> torch.Tensor:
    """values clamped to [-clip_value, clip_value], NaN kept. The bounds are tensors: under
    torch.compile a float bound is a constant of the graph, compiled again for every value."""
    bound = torch.ones((), dtype=torch.float64, device=values.device) * clip_value
    return values.clamp(-bound, bound)


def clip_coefficient(
    total_norm: torch.Tensor, max_norm: float | None, inv_scale: torch.Tensor | None
) -> torch.Tensor:
    """inv_scale * min(1, max_norm / (total_norm + 1e-6)), float64. NaN propagates."""
    coef = torch.ones((), dtype=torch.float64, device=total_norm.device)
    if max_norm is not None:
        norm = total_norm.to(torch.float64)
        # A tensor numerator: `float / tensor` is a reciprocal and a product, rounded twice. It is
        # ones * max_norm, not new_tensor(max_norm): under torch.compile that makes a changing
        # max_norm a constant of the graph, compiled again for every value.
        # clamp(max=1) keeps NaN, as torch's clip_grad_norm_ does.
        coef = ((torch.ones_like(norm) * max_norm) / (norm + NORM_EPS)).clamp(max=1.0)
    if inv_scale is not None:
        coef = coef * inv_scale.to(device=coef.device, dtype=torch.float64).reshape(())
    return coef
