"""clip_gradient: identity in the forward pass, clips the gradient flowing back into x.

For clipping inside backpropagation through time (an RNN's hidden state at every step, the
Pascanu et al. recipe) and at chosen points of a network. An autograd.Function, so autograd,
torch.func's reverse-mode transforms (grad, vjp, vmap) and torch.compile see it; forward mode
(jvp) raises.
"""

from __future__ import annotations

import torch

from fusedclip.api import check_bound
from fusedclip.norms import clamp_by_value, clip_coefficient


def clipped(grad: torch.Tensor, max_norm: float | None, clip_value: float | None) -> torch.Tensor:
    """grad scaled by min(1, max_norm / (||grad||_2 + 1e-6)) (norm accumulated in float64), then
    clamped to [-clip_value, clip_value]."""
    if max_norm is not None:
        norm = torch.linalg.vector_norm(grad, dtype=torch.float64)
        coef = clip_coefficient(norm, max_norm, None)
        grad = (grad.to(torch.float64) * coef).to(grad.dtype)
    if clip_value is not None:
        grad = clamp_by_value(grad, clip_value)
    return grad


class _ClipGradient(torch.autograd.Function):
    """An autograd.Function, not a torch.library op: an op's float arguments are constants of a
    compiled graph (each new max_norm compiled again), forward-mode AD passed an op silently (a
    tangent of 0), and torch.func refused it. No jvp: dynamo cannot trace a Function that has
    one, so forward-mode AD raises torch's "must implement the jvp function" instead."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, max_norm, clip_value):
        # A copy, not a view: autograd forbids in-place changes to a view a Function returns,
        # and code that clips a hidden state may well modify it in place next.
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.max_norm, ctx.clip_value = inputs

    @staticmethod
    def backward(ctx, grad):
        return clipped(grad, ctx.max_norm, ctx.clip_value), None, None


def clip_gradient(
    x: torch.Tensor, max_norm: float | None = None, clip_value: float | None = None
) -> torch.Tensor:
    """Returns x unchanged; in the backward pass the gradient flowing into x is clipped by its L2
    norm (to `max_norm`) and/or by value (to `clip_value`)."""
    if max_norm is None and clip_value is None:
        raise ValueError("clip_gradient needs max_norm or clip_value (or both)")
    if max_norm is not None:
        max_norm = check_bound(max_norm, "max_norm")
    if clip_value is not None:
        clip_value = check_bound(clip_value, "clip_value")
    if x.is_complex():
        raise TypeError(
            f"clip_gradient: x has dtype {x.dtype}; complex gradients are not clipped (clip "
            "torch.view_as_real(x) instead)"
        )
    return _ClipGradient.apply(x, max_norm, clip_value)
