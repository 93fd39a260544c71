"""clip_gradient: identity forward, clipped gradient backward, visible to autograd and compile."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close

import fusedclip


def reference_clip(grad, max_norm=None, clip_value=None):
    grad = grad.double()
    if max_norm is not None:
        grad = grad * min(1.0, max_norm / (grad.norm().item() + 1e-6))
    if clip_value is not None:
        grad = grad.clamp(-clip_value, clip_value)
    return grad


@pytest.mark.parametrize(
    ("max_norm", "clip_value"), [(0.1, None), (None, 0.05), (0.3, 0.02), (1e9, None)]
)
def test_forward_is_identity_and_backward_clips(max_norm, clip_value):
    x = torch.randn(7, 5, requires_grad=True)
    y = fusedclip.clip_gradient(x, max_norm=max_norm, clip_value=clip_value)
    assert torch.equal(y, x)
    upstream = torch.randn(7, 5) * 10
    y.backward(upstream)
    assert_close(
        x.grad, reference_clip(upstream, max_norm, clip_value), rtol=1e-6, atol=1e-9, what="grad"
    )


def test_complex_input_is_refused_in_the_forward_pass():
    x = torch.randn(3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(TypeError, match="complex"):
        fusedclip.clip_gradient(x, max_norm=0.1)


def test_the_output_may_be_modified_in_place():
    """The identity is a copy: autograd forbids in-place changes to a view a Function returns."""
    x = torch.randn(4, 3, requires_grad=True)
    y = fusedclip.clip_gradient(x * 1.0, max_norm=1e9)
    y.mul_(2.0)
    y.sum().backward()
    assert_close(x.grad, torch.full((4, 3), 2.0), rtol=0, what="grad through the in-place op")


def test_torch_func_grad_and_vmap_clip_as_autograd_does():
    """torch.func.grad refused the op ("must override the setup_context staticmethod"); vmap
    clips each sample's gradient by its own norm, as a loop over the samples does."""
    samples = torch.randn(3, 4) * 5

    def loss(x):
        return (fusedclip.clip_gradient(x, max_norm=0.5) * x.detach()).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss))(samples)
    for index, sample in enumerate(samples):
        assert_close(
            per_sample[index], reference_clip(sample, max_norm=0.5), rtol=1e-6, what="vmap grad"
        )


def test_forward_mode_ad_raises_rather_than_drop_the_tangent():
    """As a torch.library op the tangent came back 0 (torch.func.jvp) or None (forward_ad), with
    no error. A jvp would fix that, but dynamo cannot trace a Function with one."""
    x, tangent = torch.randn(4), torch.ones(4)
    with pytest.raises(NotImplementedError, match="jvp"):
        torch.func.jvp(lambda a: fusedclip.clip_gradient(a, max_norm=1.0), (x,), (tangent,))


def test_compiled_forward_and_backward_match_eager():
    weight = torch.randn(6, 6)

    def loss_of(x):
        hidden = torch.tanh(x @ weight)
        hidden = fusedclip.clip_gradient(hidden, max_norm=0.05)
        return (hidden @ weight).square().sum()

    eager_x = torch.randn(3, 6, requires_grad=True)
    compiled_x = eager_x.detach().clone().requires_grad_()
    loss_of(eager_x).backward()
    torch.compile(loss_of, fullgraph=True)(compiled_x).backward()
    assert_close(compiled_x.grad, eager_x.grad, rtol=1e-5, atol=1e-7, what="compiled grad")


def test_unrolled_rnn_matches_hook_based_clipping():
    """Pascanu et al.: clip each step's hidden-state gradient; compare with tensor hooks."""
    torch.manual_seed(0)
    cell = torch.nn.RNNCell(3, 8)
    inputs = torch.randn(20, 4, 3)

    def run(clip):
        cell.zero_grad()
        hidden = torch.zeros(4, 8)
        for step in range(inputs.shape[0]):
            hidden = clip(cell(inputs[step], hidden))
        hidden.square().sum().mul(100).backward()
        return [p.grad.clone() for p in cell.parameters()]

    def with_hook(hidden):
        hidden.register_hook(lambda grad: reference_clip(grad, max_norm=0.01).to(grad.dtype))
        return hidden

    ours = run(lambda h: fusedclip.clip_gradient(h, max_norm=0.01))
    expected = run(with_hook)
    for mine, theirs in zip(ours, expected, strict=True):
        assert_close(mine, theirs, rtol=1e-5, atol=1e-8, what="RNN weight gradient")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "max_norm or clip_value"),
        ({"max_norm": -1.0}, "max_norm"),
        ({"clip_value": math.nan}, "clip_value"),
        ({"max_norm": 10**400}, "max_norm must be .* past float64's range"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fusedclip.clip_gradient(torch.ones(2, requires_grad=True), **kwargs)
