"""clip_gradient: identity in the forward pass, clips the gradient flowing back into x.

For clipping inside backpropagation through time (an RNN's hidden state at every step, the
Pascanu et al. recipe) and at chosen points of a network. Registered with torch.library, so
autograd and torch.compile see it.
"""

from __future__ import annotations

import torch

from fusedclip.norms import NORM_EPS


def _check(max_norm: float | None, clip_value: float | None) -> None:
    if max_norm is None and clip_value is None:
        raise ValueError("clip_gradient needs max_norm or clip_value (or both)")
    for name, value in (("max_norm", max_norm), ("clip_value", clip_value)):
        if value is not None and not value >= 0:  # NaN too, and a SymFloat when compiled
            raise ValueError(f"{name} must be a non-negative number, got {value}")


def clipped(grad: torch.Tensor, max_norm: float | None, clip_value: float | None) -> torch.Tensor:
    """grad scaled by min(1, max_norm / (||grad||_2 + 1e-6)) (norm accumulated in float64), then
    clamped to [-clip_value, clip_value]."""
    if max_norm is not None:
        norm = torch.linalg.vector_norm(grad, dtype=torch.float64)
        coef = (max_norm / (norm + NORM_EPS)).clamp(max=1.0)
        grad = (grad.to(torch.float64) * coef).to(grad.dtype)
    if clip_value is not None:
        grad = grad.clamp(-clip_value, clip_value)
    return grad


@torch.library.custom_op("fusedclip::clip_gradient", mutates_args=())
def _clip_gradient(
    x: torch.Tensor, max_norm: float | None, clip_value: float | None
) -> torch.Tensor:
    # A custom op may not return its input: the identity is a copy.
    return x.clone()


@_clip_gradient.register_fake
def _(x, max_norm, clip_value):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    _, ctx.max_norm, ctx.clip_value = inputs


def _backward(ctx, grad):
    return clipped(grad, ctx.max_norm, ctx.clip_value), None, None


_clip_gradient.register_autograd(_backward, setup_context=_setup_context)


def clip_gradient(
    x: torch.Tensor, max_norm: float | None = None, clip_value: float | None = None
) -> torch.Tensor:
    """Returns x unchanged; in the backward pass the gradient flowing into x is clipped by its L2
    norm (to `max_norm`) and/or by value (to `clip_value`)."""
    _check(max_norm, clip_value)
    if x.is_complex():
        raise TypeError(
            f"clip_gradient: x has dtype {x.dtype}; complex gradients are not clipped (clip "
            "torch.view_as_real(x) instead)"
        )
    return _clip_gradient(
        x,
        None if max_norm is None else float(max_norm),
        None if clip_value is None else float(clip_value),
    )
