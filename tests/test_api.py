"""The public API against torch.nn.utils (parity) and the float64 reference (accuracy)."""

from __future__ import annotations

import fractions
import math
import os

import pytest
import torch
from conftest import NORM_RTOL, assert_close, assert_grads_close, backend_params, is_interpreted
from tolerances import INTERPRETED_SIZES, SIZES

import fusedclip
from fusedclip import reference

NORM_TYPES = [1.0, 2.0, 3.0, 0.5, math.inf, "inf", "2"]


def make_parameters(sizes, dtypes, device, scale=3.0, none_grads=()):
    """Parameters with random gradients (dtypes cycled); indices in `none_grads` get no grad."""
    parameters = []
    for index, size in enumerate(sizes):
        dtype = dtypes[index % len(dtypes)]
        parameter = torch.nn.Parameter(torch.randn(size, dtype=torch.float64).to(dtype).to(device))
        if index not in none_grads:
            parameter.grad = (torch.randn(size, dtype=torch.float64) * scale).to(dtype).to(device)
        parameters.append(parameter)
    return parameters


def clone_parameters(parameters):
    copies = []
    for parameter in parameters:
        copy = torch.nn.Parameter(parameter.detach().clone())
        copy.grad = None if parameter.grad is None else parameter.grad.clone()
        copies.append(copy)
    return copies


def reference_total_norm(grads, norm_type):
    return reference.reduce([g.cpu() for g in grads], float(norm_type), False)[0]


def sizes_for(device, backend):
    return INTERPRETED_SIZES if is_interpreted(device, backend) else SIZES


BACKENDS = backend_params()


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=lambda p: f"p{p}")
@pytest.mark.parametrize(
    "dtypes",
    [
        [torch.float32],
        [torch.float16],
        [torch.bfloat16],
        [torch.float64],
        [torch.float32, torch.bfloat16, torch.float16],
    ],
    ids=["f32", "f16", "bf16", "f64", "mixed"],
)
def test_clip_grad_norm_matches_torch_and_reference(device, backend, norm_type, dtypes):
    sizes = sizes_for(device, backend)
    if float(norm_type) == math.inf:
        sizes = [s for s in sizes if s]  # torch's inf norm raises on an empty tensor
    parameters = make_parameters(sizes, dtypes, device, none_grads=(2,))
    theirs = clone_parameters(parameters)
    originals = [None if p.grad is None else p.grad.clone() for p in parameters]
    grads = [g for g in originals if g is not None]
    expected_norm = reference_total_norm(grads, norm_type)
    max_norm = expected_norm.item() / 3  # clipping happens

    ours = fusedclip.clip_grad_norm_(parameters, max_norm, norm_type, backend=backend)
    torch_norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)

    out_dtype = torch.float64 if torch.float64 in dtypes else torch.float32
    assert ours.dtype == out_dtype and ours.shape == () and ours.device.type == device
    rtol = max(NORM_RTOL[d] for d in dtypes) * 4
    assert_close(ours, expected_norm, rtol=rtol, what="total norm vs reference")
    coef = min(1.0, max_norm / (expected_norm.item() + 1e-6))
    # torch accumulates in the gradients' dtype (float32 at best), so it is the less accurate
    # side: agree within its rounding. A 16-bit torch norm can overflow to inf (a documented
    # deviation); then only the reference counts.
    torch_rtol = 1e-2 if torch.float16 in dtypes or torch.bfloat16 in dtypes else 1e-3
    torch_comparable = math.isfinite(torch_norm.item())
    if torch_comparable:
        assert_close(
            ours, torch_norm.to(torch.float64), rtol=torch_rtol, what="total norm vs torch"
        )
    for index, (parameter, torch_parameter, original) in enumerate(
        zip(parameters, theirs, originals, strict=True)
    ):
        if original is None:
            assert parameter.grad is None
            continue
        assert_grads_close(
            parameter.grad, original.cpu().to(torch.float64) * coef, what=f"grad {index}"
        )
        if torch_comparable:
            assert_close(
                parameter.grad,
                torch_parameter.grad,
                rtol=torch_rtol,
                atol=1e-30,
                what=f"grad {index} vs torch",
            )


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_per_tensor_norms_unscale_by_an_inv_scale_read_before_the_write(device, backend):
    """Per-tensor norms were unscaled by inv_scale after the write: an inv_scale that is a view
    of a gradient had been unscaled itself by then, so they disagreed with total_norm."""
    gradient = torch.tensor([2.0, 4.0], device=device)
    other = torch.tensor([3.0], device=device)
    expected = [math.hypot(4.0, 8.0), 6.0]
    result = fusedclip.fused_clip_(
        [gradient, other], inv_scale=gradient[:1], max_norm=100.0, per_tensor=True, backend=backend
    )
    assert gradient.tolist() == [4.0, 8.0]
    assert_close(result.per_tensor_norms, torch.tensor(expected), rtol=1e-6, what="per-tensor")
    assert_close(result.total_norm, torch.tensor(math.hypot(*expected)), rtol=1e-6)


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_clip_grad_norm_no_clip_needed_leaves_grads(device, backend):
    parameters = make_parameters([100, 4095], [torch.float32], device, scale=1e-3)
    originals = [p.grad.clone() for p in parameters]
    norm = fusedclip.clip_grad_norm_(parameters, 1e6, backend=backend)
    assert norm.item() > 0
    for parameter, original in zip(parameters, originals, strict=True):
        assert torch.equal(parameter.grad, original)


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_a_norm_beyond_float32_is_inf_and_still_clips_to_max_norm(device, backend):
    """Finite float32 gradients whose norm (4.2e38) exceeds float32's range: the float32 norm
    returned is inf (as torch's), but the clip factor comes from the float64 norm, so the
    gradients are clipped to max_norm (torch's factor of 0 zeroes them); README, "Where fusedclip
    deliberately differs from torch"."""
    parameter = torch.nn.Parameter(torch.zeros(2, device=device))
    parameter.grad = torch.full((2,), 3e38, device=device)
    norm = fusedclip.clip_grad_norm_([parameter], 1.0, backend=backend)
    assert norm.dtype == torch.float32 and norm.item() == math.inf
    expected = torch.full((2,), 3e38 * (1.0 / (math.hypot(3e38, 3e38) + 1e-6)), dtype=torch.float64)
    assert_grads_close(parameter.grad, expected, "clipped to max_norm, not zeroed")


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_accepts_generator_single_tensor_and_no_grads(device, backend):
    parameters = make_parameters([10, 20], [torch.float32], device)
    theirs = clone_parameters(parameters)
    ours = fusedclip.clip_grad_norm_((p for p in parameters), 0.5, backend=backend)
    expected = torch.nn.utils.clip_grad_norm_((p for p in theirs), 0.5)
    assert_close(ours, expected, rtol=1e-6, what="generator")
    single = make_parameters([33], [torch.float32], device)[0]
    single_theirs = clone_parameters([single])[0]
    assert_close(
        fusedclip.clip_grad_norm_(single, 0.1, backend=backend),
        torch.nn.utils.clip_grad_norm_(single_theirs, 0.1),
        rtol=1e-6,
        what="single tensor",
    )
    assert_close(single.grad, single_theirs.grad, rtol=1e-6, what="single tensor grad")
    no_grads = make_parameters([5], [torch.float32], device, none_grads=(0,))
    empty = fusedclip.clip_grad_norm_(no_grads, 1.0, backend=backend)
    assert empty.item() == torch.nn.utils.clip_grad_norm_(no_grads, 1.0).item() == 0.0
    assert fusedclip.clip_grad_norm_([], 1.0, backend=backend).item() == 0.0


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("inv_scale", [0.5, math.inf], ids=["finite", "inf"])
def test_no_gradients_have_norm_zero_whatever_inv_scale(device, backend, inv_scale):
    """Nothing to unscale: torch's norm of no gradients, 0, not |inv_scale| * 0 (NaN for an
    infinite inv_scale, which error_if_nonfinite would raise on). Found by test_properties."""
    scale = torch.tensor(inv_scale, dtype=torch.float16, device=device)
    no_grads = make_parameters([5], [torch.float32], device, none_grads=(0,))
    norm = fusedclip.clip_grad_norm_(
        no_grads, 1.0, error_if_nonfinite=True, inv_scale=scale, backend=backend
    )
    assert norm.item() == 0.0
    result = fusedclip.fused_clip_([], max_norm=1.0, inv_scale=scale, backend=backend)
    assert (result.total_norm.item(), result.found_inf.item(), result.clip_coef.item()) == (0, 0, 1)


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=lambda p: f"p{p}")
def test_get_total_norm_and_clip_grads_with_norm_match_torch(device, backend, norm_type):
    parameters = make_parameters([7, 4095, 300], [torch.float32, torch.float64], device)
    theirs = clone_parameters(parameters)
    grads = [p.grad for p in parameters]
    ours = fusedclip.get_total_norm(grads, norm_type, backend=backend)
    expected = torch.nn.utils.get_total_norm([p.grad for p in theirs], norm_type)
    assert ours.dtype == torch.float64
    assert_close(ours, reference_total_norm(grads, norm_type), rtol=1e-12, what="get_total_norm")
    assert_close(
        ours, expected, rtol=1e-6, what="get_total_norm vs torch"
    )  # torch: float32 per tensor
    fusedclip.clip_grads_with_norm_(parameters, 1.0, ours, backend=backend)
    torch.nn.utils.clip_grads_with_norm_(theirs, 1.0, expected)
    for index, (mine, torch_parameter) in enumerate(zip(parameters, theirs, strict=True)):
        assert_close(mine.grad, torch_parameter.grad, rtol=1e-6, what=f"grad {index}")


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str
)
def test_clip_grad_value_matches_torch(device, backend, dtype):
    parameters = make_parameters([1, 4095, 65537], [dtype], device)
    theirs = clone_parameters(parameters)
    fusedclip.clip_grad_value_(parameters, 0.75, backend=backend)
    torch.nn.utils.clip_grad_value_(theirs, 0.75)
    for mine, torch_parameter in zip(parameters, theirs, strict=True):
        assert torch.equal(mine.grad, torch_parameter.grad)


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize(
    ("dtype", "clip_value"),
    [(torch.float16, 1e5), (torch.bfloat16, 1e39), (torch.float32, 1e39)],
    ids=str,
)
def test_a_clip_value_past_the_dtypes_range_clamps_nothing_finite(
    device, backend, dtype, clip_value
):
    """README ("deliberately differs"): torch raises a RuntimeError; a bound above every value
    is no error here, and inf and NaN stay as torch's clamp leaves them."""
    parameters = make_parameters([1, 4095], [dtype], device)
    parameters[1].grad[:3] = torch.tensor([math.inf, -math.inf, math.nan])
    before = [p.grad.clone() for p in parameters]
    with pytest.raises(RuntimeError):
        torch.nn.utils.clip_grad_value_(clone_parameters(parameters), clip_value)
    fusedclip.clip_grad_value_(parameters, clip_value, backend=backend)
    largest = torch.finfo(dtype).max
    for p, grad in zip(parameters, before, strict=True):
        expected = grad.clamp(-largest, largest).where(grad.isfinite(), grad)
        assert torch.equal(p.grad.isnan(), grad.isnan())
        assert torch.equal(p.grad.nan_to_num(0.0), expected.nan_to_num(0.0))


@pytest.mark.parametrize("call", ["clip_grad_norm_", "clip_grad_value_"])
@pytest.mark.parametrize("foreach", [None, True, False])
def test_foreach_is_accepted_and_ignored_as_a_drop_in(call, foreach):
    """README: `foreach` is accepted and ignored (every backend is multi-tensor); the result is
    torch's with the same foreach."""
    parameters = make_parameters([7, 300], [torch.float32], "cpu")
    theirs = clone_parameters(parameters)
    bound = 0.5
    ours = getattr(fusedclip, call)(parameters, bound, foreach=foreach)
    expected = getattr(torch.nn.utils, call)(theirs, bound, foreach=foreach)
    if call == "clip_grad_norm_":
        assert_close(ours, expected, rtol=NORM_RTOL[torch.float32], what="norm")
    for mine, torch_parameter in zip(parameters, theirs, strict=True):
        assert_grads_close(mine.grad, torch_parameter.grad.double(), what="gradient")


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_clip_grad_value_of_zero_keeps_the_signs_of_zeros_as_torch(device, backend, dtype):
    """A clamp to [-0.0, 0.0]: Triton's maximum/minimum gave +0.0 where torch (and the C++
    kernels' compares) give -0.0; the same bits on every backend."""
    values = [-5.0, -0.0, 0.0, 5.0, -1e-30, math.nan, -math.inf]
    parameter = torch.nn.Parameter(torch.zeros(len(values), dtype=dtype, device=device))
    parameter.grad = torch.tensor(values, dtype=dtype, device=device)
    twin = torch.nn.Parameter(parameter.detach().clone())
    twin.grad = parameter.grad.clone()
    fusedclip.clip_grad_value_([parameter], 0.0, backend=backend)
    torch.nn.utils.clip_grad_value_([twin], 0.0)
    assert torch.equal(torch.signbit(parameter.grad), torch.signbit(twin.grad)), parameter.grad
    assert torch.equal(parameter.grad.nan_to_num(7.0), twin.grad.nan_to_num(7.0)), parameter.grad


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_clip_grad_value_with_inv_scale_unscales_then_clamps(device, backend):
    parameters = make_parameters([4095, 65], [torch.float32, torch.bfloat16], device, scale=1024.0)
    originals = [p.grad.clone() for p in parameters]
    fusedclip.clip_grad_value_(parameters, 1.0, inv_scale=1 / 1024, backend=backend)
    for parameter, original in zip(parameters, originals, strict=True):
        expected = (original.cpu().to(torch.float64) / 1024).clamp(-1.0, 1.0)
        assert_grads_close(parameter.grad, expected, what=str(parameter.dtype))
    fusedclip.clip_grad_value_([], 1.0, backend=backend)  # a no-op, where torch raises


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("inv_scale_kind", ["float", "tensor"])
def test_fused_clip_unscales_measures_and_clips_in_one_call(device, backend, inv_scale_kind):
    scale = 65536.0
    grads = [
        g * scale
        for g in make_tensors([4095, 3, 0, 70001], [torch.float32, torch.bfloat16], device)
    ]
    originals = [g.clone() for g in grads]
    inv_scale = 1 / scale if inv_scale_kind == "float" else torch.tensor(1 / scale, device=device)
    unscaled64 = [g.cpu().to(torch.float64) / scale for g in originals]
    expected_norm = reference_total_norm(unscaled64, 2.0)
    max_norm = expected_norm.item() / 2
    result = fusedclip.fused_clip_(
        grads,
        max_norm=max_norm,
        inv_scale=inv_scale,
        clip_value=0.9,
        per_tensor=True,
        backend=backend,
    )
    assert_close(result.total_norm, expected_norm, rtol=4e-6, what="total_norm")
    assert result.found_inf.item() == 0.0 and result.found_inf.dtype == torch.float32
    clip_factor = min(1.0, max_norm / (expected_norm.item() + 1e-6))
    assert_close(result.clip_coef, torch.tensor(clip_factor / scale), rtol=1e-6, what="clip_coef")
    expected_per_tensor = torch.stack([reference_total_norm([g], 2.0) for g in unscaled64])
    assert_close(result.per_tensor_norms, expected_per_tensor, rtol=4e-6, what="per_tensor_norms")
    for index, (grad, original64) in enumerate(zip(grads, unscaled64, strict=True)):
        assert_grads_close(grad, (original64 * clip_factor).clamp(-0.9, 0.9), what=f"grad {index}")


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("repeat", ["same-tensor", "view"])
def test_per_tensor_norms_follow_the_list_as_given_with_a_repeat(device, backend, repeat):
    """One norm per listed gradient, a repeat the same as its first listing; the repeat counts
    once in the total and is scaled once. Dropping it shifted every later norm one place."""
    a, b, c = make_tensors([4, 9, 16], [torch.float32], device)
    originals = [t.clone() for t in (a, b, c)]
    again = a if repeat == "same-tensor" else a.view(2, 2)
    listed = [a, b, again, c]
    expected = torch.stack([reference_total_norm([t], 2.0) for t in (a, b, a, c)])
    measured = fusedclip.measure(listed, per_tensor=True, backend=backend)
    assert_close(measured.per_tensor_norms, expected, rtol=4e-6, what="measured per-tensor")
    clipped = fusedclip.fused_clip_(listed, max_norm=1e-3, per_tensor=True, backend=backend)
    assert_close(clipped.per_tensor_norms, expected, rtol=4e-6, what="clipped per-tensor")
    assert_close(
        clipped.total_norm, reference_total_norm(originals, 2.0), rtol=4e-6, what="total norm"
    )
    coef = clipped.clip_coef.item()
    for name, tensor, original in zip("abc", (a, b, c), originals, strict=True):
        assert_grads_close(tensor, original.double() * coef, what=f"gradient {name}")


def make_tensors(sizes, dtypes, device):
    return [p.grad for p in make_parameters(sizes, dtypes, device)]


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_fused_clip_measures_only_without_max_norm(device, backend):
    grads = make_tensors([100, 37], [torch.float16], device)
    originals = [g.clone() for g in grads]
    result = fusedclip.fused_clip_(grads, norm_type=math.inf, backend=backend)
    assert_close(
        result.total_norm, reference_total_norm(originals, math.inf), rtol=1e-6, what="inf norm"
    )
    assert result.per_tensor_norms is None
    assert all(torch.equal(g, o) for g, o in zip(grads, originals, strict=True))


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
@pytest.mark.parametrize("bad", [math.inf, math.nan], ids=["inf", "nan"])
def test_nonfinite_gradients_like_torch(device, backend, bad):
    parameters = make_parameters([4095, 9], [torch.float32], device)
    parameters[0].grad[-1] = bad
    theirs = clone_parameters(parameters)
    ours = fusedclip.clip_grad_norm_(parameters, 1.0, backend=backend)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert_close(ours, expected, rtol=0, what="non-finite norm")
    for mine, torch_parameter in zip(parameters, theirs, strict=True):
        assert_close(
            mine.grad, torch_parameter.grad, rtol=0, what="grads scaled by a non-finite norm"
        )
    result = fusedclip.fused_clip_(
        [p.grad for p in make_parameters([65], [torch.float32], device)]
        + [torch.tensor([bad], device=device)],
        backend=backend,
    )
    assert result.found_inf.item() == 1.0


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_error_if_nonfinite_raises_before_touching_grads(device, backend):
    parameters = make_parameters([100, 4], [torch.float32], device)
    parameters[1].grad[0] = math.nan
    originals = [p.grad.clone() for p in parameters]
    with pytest.raises(RuntimeError, match="non-finite"):
        fusedclip.clip_grad_norm_(parameters, 1.0, error_if_nonfinite=True, backend=backend)
    for parameter, original in zip(parameters, originals, strict=True):
        assert torch.equal(parameter.grad, original) or torch.equal(
            parameter.grad.isnan(), original.isnan()
        )


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_same_gradient_listed_twice_counts_once(device, backend):
    parameters = make_parameters([4095, 50], [torch.float32], device)
    originals = [p.grad.clone() for p in parameters]
    norm = fusedclip.clip_grad_norm_(
        [parameters[0], parameters[1], parameters[0]], 1.0, backend=backend
    )
    expected = reference_total_norm(originals, 2.0)
    assert_close(norm, expected, rtol=4e-6, what="norm of a repeated gradient")
    coef = min(1.0, 1.0 / (expected.item() + 1e-6))
    assert_grads_close(parameters[0].grad, originals[0].cpu().double() * coef, what="scaled once")


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_strided_and_channels_last_gradients(device, backend):
    base = torch.randn(64, 130, device=device)
    strided = base[:, ::2]  # gaps: goes through a contiguous copy and back
    transposed = torch.randn(33, 65, device=device).t()  # dense, another dim order
    channels_last = torch.randn(2, 3, 8, 9, device=device).to(memory_format=torch.channels_last)
    grads = [strided, transposed, channels_last]
    originals = [g.clone() for g in grads]
    untouched_gaps = base[:, 1::2].clone()
    expected = reference_total_norm(originals, 2.0)
    result = fusedclip.fused_clip_(grads, max_norm=1.0, backend=backend)
    assert_close(result.total_norm, expected, rtol=4e-6, what="norm")
    coef = min(1.0, 1.0 / (expected.item() + 1e-6))
    for index, (grad, original) in enumerate(zip(grads, originals, strict=True)):
        assert_grads_close(grad, original.cpu().double() * coef, what=f"grad {index}")
    assert torch.equal(base[:, 1::2], untouched_gaps)
    assert channels_last.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_sparse_gradients(device, backend):
    indices = torch.tensor([[0, 2, 2, 5], [1, 0, 0, 3]])  # (2, 0) appears twice: uncoalesced
    values = torch.tensor([3.0, -4.0, 1.0, 12.0])
    sparse = torch.sparse_coo_tensor(indices, values, (6, 4)).to(device)
    dense = torch.randn(10, device=device)
    theirs_sparse, theirs_dense = sparse.clone(), dense.clone()
    norm = fusedclip.fused_clip_([sparse, dense], max_norm=1.0, backend=backend).total_norm
    expected = reference_total_norm([theirs_sparse.to_dense(), theirs_dense], 2.0)
    assert_close(norm, expected, rtol=4e-6, what="norm with a sparse gradient")
    coef = min(1.0, 1.0 / (expected.item() + 1e-6))
    assert_close(sparse.to_dense(), theirs_sparse.to_dense() * coef, rtol=1e-6, what="sparse grad")
    fusedclip.fused_clip_([sparse], clip_value=0.01, backend=backend)
    assert sparse.to_dense().abs().max().item() <= 0.01


@pytest.mark.parametrize(("device", "backend"), BACKENDS)
def test_result_is_deterministic(device, backend):
    grads = make_tensors([70001, 3, 4095], [torch.float32, torch.float16], device)
    first = fusedclip.get_total_norm(grads, backend=backend)
    second = fusedclip.get_total_norm(grads, backend=backend)
    assert torch.equal(first, second)


def test_float16_norm_above_65504_stays_finite():
    """torch returns the norm in float16, which overflows and then zeroes every gradient."""
    grads = [torch.full((100,), 60000.0, dtype=torch.float16)]
    norm = fusedclip.clip_grad_norm_([_with_grad(g) for g in grads], 1.0)
    assert norm.dtype == torch.float32 and math.isfinite(norm.item())
    assert_close(norm, torch.tensor(600000.0), rtol=1e-6, what="fp16 norm")


def _with_grad(grad):
    parameter = torch.nn.Parameter(torch.zeros_like(grad))
    parameter.grad = grad
    return parameter


@pytest.mark.parametrize(
    ("function", "kwargs"),
    [
        ("clip_grad_norm_", {"max_norm": 1.0, "norm_type": None}),
        ("clip_grad_norm_", {"max_norm": 1.0, "norm_type": [2.0]}),
        ("clip_grad_norm_", {"max_norm": 1.0, "norm_type": 2 + 0j}),
        ("clip_grad_norm_", {"max_norm": "abc"}),
        ("clip_grad_norm_", {"max_norm": None}),
        ("clip_grad_value_", {"clip_value": "abc"}),
        ("get_total_norm", {"norm_type": "fro"}),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={v[k]!r}" for k in v),
)
def test_a_bad_argument_raises_the_class_torch_raises(function, kwargs):
    """Code written for torch.nn.utils catches what torch raises: float()'s TypeError for a value
    of the wrong type, its ValueError for a string that is no number; fusedclip's message names
    the argument. (A ValueError for norm_type=None, a TypeError for max_norm='abc' escaped such
    handlers.)"""
    raised = []
    for module in (torch.nn.utils, fusedclip):
        parameters = make_parameters([5], [torch.float32], "cpu")
        listed = [p.grad for p in parameters] if function == "get_total_norm" else parameters
        with pytest.raises((TypeError, ValueError)) as caught:
            getattr(module, function)(listed, **kwargs)
        raised.append(type(caught.value))
    assert raised[1] is raised[0], f"torch raises {raised[0].__name__}, fusedclip {raised[1]}"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_norm": -1.0}, ValueError, "max_norm"),
        # Not "a negative max_norm would flip the gradients' sign": NaN is no negative number.
        (
            {"max_norm": math.nan},
            ValueError,
            r"^max_norm must be a non-negative number, got nan(?!.*flip)",
        ),
        ({"max_norm": 1.0, "norm_type": 0.0}, ValueError, "norm_type"),
        ({"max_norm": 1.0, "norm_type": -2.0}, ValueError, "norm_type"),
        ({"max_norm": 1.0, "norm_type": math.nan}, ValueError, "norm_type"),
        ({"max_norm": 1.0, "norm_type": "fro"}, ValueError, "norm_type"),
        ({"max_norm": 1.0, "inv_scale": math.inf}, ValueError, "inv_scale"),
        ({"max_norm": 1.0, "inv_scale": -0.5}, ValueError, "inv_scale"),  # flipped every sign
        # A wrong shape or dtype is a TypeError, as the README's rule says (it was a ValueError).
        ({"max_norm": 1.0, "inv_scale": torch.ones(2)}, TypeError, "inv_scale"),
        ({"max_norm": 1.0, "inv_scale": torch.tensor(1)}, TypeError, "inv_scale"),
        ({"max_norm": 1.0, "norm_type": torch.ones(2)}, TypeError, "norm_type must be"),
        ({"max_norm": 1.0, "inv_scale": "x"}, ValueError, "inv_scale must be"),
        ({"max_norm": 1.0, "inv_scale": [0.5]}, TypeError, "inv_scale must be"),
        ({"max_norm": 1.0, "backend": "gpu"}, ValueError, "backend"),
        # Integers past float64's range raised a bare OverflowError that named no argument.
        ({"max_norm": 10**400}, ValueError, "max_norm must be .* past float64's range"),
        ({"max_norm": 1.0, "norm_type": 10**400}, ValueError, "norm_type must be .* past"),
        ({"max_norm": 1.0, "inv_scale": -(10**400)}, ValueError, "inv_scale must be .* past"),
        # An AttributeError from deep in the collective ("'str' object has no attribute").
        ({"max_norm": 1.0, "process_group": "world"}, TypeError, "process_group must be"),
    ],
    ids=lambda v: (
        str(v)
        if not isinstance(v, dict)
        else "-".join(f"{k}={v[k]}" for k in v if k != "max_norm" or len(v) == 1)
    ),
)
def test_bad_arguments_raise_and_touch_nothing(kwargs, error, match):
    parameters = make_parameters([100, 7], [torch.float32], "cpu")
    originals = [p.grad.clone() for p in parameters]
    with pytest.raises(error, match=match):
        fusedclip.clip_grad_norm_(parameters, **kwargs)
    for parameter, original in zip(parameters, originals, strict=True):
        assert torch.equal(parameter.grad, original)


def test_bad_gradients_and_values_raise_and_touch_nothing():
    parameters = make_parameters([100], [torch.float32], "cpu")
    original = parameters[0].grad.clone()
    with pytest.raises(TypeError, match="dtype"):
        fusedclip.fused_clip_(
            [parameters[0].grad, torch.zeros(3, dtype=torch.int64)], max_norm=1e-3
        )
    with pytest.raises(ValueError, match="clip_value"):
        fusedclip.clip_grad_value_(parameters, -0.5)
    with pytest.raises(ValueError, match="clip_value"):
        fusedclip.fused_clip_([parameters[0].grad], clip_value=math.nan)
    with pytest.raises(ValueError, match="clip_value must be .* past float64's range"):
        fusedclip.clip_grad_value_(parameters, 10**400)
    with pytest.raises(ValueError, match="total_norm must be .* past float64's range"):
        fusedclip.clip_grads_with_norm_(parameters, 1.0, 10**400)
    with pytest.raises(ValueError, match=r"total_norm must be a norm \(>= 0\), got -5.0"):
        fusedclip.clip_grads_with_norm_(parameters, 1.0, -5.0)  # flipped every sign
    with pytest.raises(TypeError, match="total_norm must be a number"):  # as torch's
        fusedclip.clip_grads_with_norm_(parameters, 1.0, "1.0")
    with pytest.raises(
        ValueError, match="max_norm must be .* a value of type Fraction past float64's range"
    ):
        fusedclip.clip_grad_norm_(parameters, fractions.Fraction(10**400))
    # A strided nested tensor passed the fast path's checks and failed in the dispatcher.
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    for call in (
        lambda grads: fusedclip.fused_clip_(grads, max_norm=1e-3),
        fusedclip.get_total_norm,
    ):
        with pytest.raises(TypeError, match=r"tensors\[1\] is a nested tensor"):
            call([parameters[0].grad, nested])
    assert torch.equal(nested.unbind()[0], torch.ones(2))
    assert torch.equal(parameters[0].grad, original)


@pytest.mark.parametrize(("device", "backend"), backend_params())
@pytest.mark.parametrize("call", ["clip_grad_norm_", "clip_grad_value_"])
@pytest.mark.parametrize("layout", ["dense", "strided"])
def test_a_negative_view_gradient_is_clipped_as_its_values(device, backend, call, layout):
    """A view with the negative bit (a dense one from _neg_view, a strided one z.conj().imag):
    the ops refused the dense one ("fallback doesn't currently support mutable TensorLists with
    negation inputs"), as torch's foreach path does. It is clipped through a resolved copy
    written back, as torch's per-tensor path clips it."""
    results = []
    for module in (torch.nn.utils, fusedclip):
        if layout == "dense":
            base = (torch.arange(6.0) - 2.0).to(device)
            gradient = base._neg_view()
        else:
            base = torch.complex(torch.zeros(6), torch.arange(6.0) - 2.0).to(device)
            gradient = base.conj().imag
        assert gradient.is_neg()
        parameter = torch.nn.Parameter(torch.zeros(6, device=device))
        parameter.grad = gradient
        kwargs = {"foreach": False} if module is torch.nn.utils else {"backend": backend}
        norm = getattr(module, call)([parameter], 0.5, **kwargs)
        results.append((norm, torch.view_as_real(base) if base.is_complex() else base))
    (expected_norm, expected), (norm, got) = results
    if call == "clip_grad_norm_":
        assert_close(norm, expected_norm, rtol=1e-6, what="norm of a negative view")
    assert_close(got, expected, rtol=1e-6, what="the memory under the view")


def test_unavailable_backend_raises_with_reason_and_touches_nothing():
    parameters = make_parameters([100], [torch.float32], "cpu")
    original = parameters[0].grad.clone()
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run cpu gradients"):
        fusedclip.clip_grad_norm_(parameters, 1e-3, backend="cuda")
    assert torch.equal(parameters[0].grad, original)


def test_backends_lists_what_runs_here():
    names = fusedclip.backends()
    assert "reference" in names
    assert ("cuda" in names) == (
        torch.cuda.is_available() and fusedclip.ops.has_kernel("reduce", "CUDA")
    )


def test_environment_variable_picks_the_backend(monkeypatch):
    parameters = make_parameters([100], [torch.float32], "cpu")
    monkeypatch.setenv("FUSEDCLIP_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FUSEDCLIP_BACKEND"):
        fusedclip.clip_grad_norm_(parameters, 1.0)
    monkeypatch.setenv("FUSEDCLIP_BACKEND", "reference")
    assert fusedclip.dispatch.select(torch.device("cpu"), None).name == "reference"
    monkeypatch.delenv("FUSEDCLIP_BACKEND")
    assert fusedclip.dispatch.requested_backend(None) == "auto"
    os.environ["FUSEDCLIP_BACKEND"] = "cpu"  # os.environ itself, as a script sets it
    try:
        assert fusedclip.dispatch.requested_backend(None) == "cpu"
    finally:
        del os.environ["FUSEDCLIP_BACKEND"]
    assert fusedclip.dispatch.requested_backend(None) == "auto"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
def test_gradients_on_two_devices():
    cpu_parameters = make_parameters([1000], [torch.float32], "cpu")
    cuda_parameters = make_parameters([1000], [torch.float32], "cuda")
    parameters = cuda_parameters + cpu_parameters
    theirs = clone_parameters(parameters)
    ours = fusedclip.clip_grad_norm_(parameters, 1.0)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert ours.device.type == "cuda"
    assert_close(ours, expected, rtol=1e-6, what="two-device norm")
    for mine, torch_parameter in zip(parameters, theirs, strict=True):
        assert_close(mine.grad, torch_parameter.grad, rtol=1e-6, what="two-device grad")


def test_calls_run_without_grad_and_restore_grad_mode():
    # Gradients that require grad (as after backward(create_graph=True)): the ops have no
    # derivative and refuse such inputs in grad mode, so this passes only with grad mode off.
    parameter = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    parameter.grad = torch.tensor([3.0, 4.0], requires_grad=True)
    with torch.no_grad():
        expected = parameter.grad * (1.0 / (5.0 + 1e-6))
    assert torch.is_grad_enabled()
    total = fusedclip.clip_grad_norm_([parameter], 1.0, backend="cpu")
    assert torch.is_grad_enabled()
    assert float(total) == pytest.approx(5.0)
    torch.testing.assert_close(parameter.grad.detach(), expected)
    with pytest.raises(ValueError, match="max_norm"):
        fusedclip.clip_grad_norm_([parameter], -1.0)
    assert torch.is_grad_enabled()
    with torch.no_grad():
        fusedclip.clip_grad_norm_([parameter], 1.0, backend="cpu")
        assert not torch.is_grad_enabled()


def test_measure_for_a_caller_that_writes_refuses_what_it_would_scale_twice():
    g = torch.tensor([3.0, 4.0])
    assert fusedclip.measure([g, g.view(-1)]).total_norm.item() == 5.0  # read: counted once
    with pytest.raises(ValueError, match=r"tensors\[0\] and tensors\[1\] are the same memory"):
        fusedclip.measure([g, g.view(-1)], writes_after=True)
    with pytest.raises(ValueError, match="overlap"):
        fusedclip.measure([g, g[1:]], writes_after=True)
    with torch.inference_mode():
        frozen = torch.ones(2)
    assert fusedclip.measure([frozen]).total_norm.item() == pytest.approx(2**0.5)
    with pytest.raises(ValueError, match="inference tensor"):
        fusedclip.measure([frozen], writes_after=True)
    assert torch.equal(g, torch.tensor([3.0, 4.0]))


@pytest.mark.parametrize("call", ["clip_grad_norm_", "clip_grad_value_"])
def test_a_many_element_tensor_bound_is_refused_by_name(call):
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    name = "max_norm" if call == "clip_grad_norm_" else "clip_value"
    with pytest.raises(TypeError, match=rf"{name} must be a non-negative number or a one-element"):
        getattr(fusedclip, call)([p], torch.tensor([1.0, 2.0]))
    assert torch.equal(p.grad, torch.ones(3))
    getattr(fusedclip, call)([p], torch.tensor([0.5]))  # one element: taken as its value
    assert torch.linalg.vector_norm(p.grad) <= 0.5 * 3**0.5 + 1e-6


def test_total_norm_plus_eps_above_max_norm_tells_whether_the_gradients_were_clipped():
    """The README's test for a clipped step: the factor is max_norm / (norm + 1e-6) capped at 1,
    so a norm just at or below max_norm is clipped too (a bare norm > max_norm misses those)."""
    for step in range(-30, 30):
        grad = torch.tensor([1.0 + step * 1e-7])
        before = grad.clone()
        result = fusedclip.fused_clip_([grad], max_norm=1.0)
        clipped = bool(result.total_norm + 1e-6 > 1.0)
        assert clipped == bool(result.clip_coef < 1), step
        assert clipped == (not torch.equal(grad, before)), step
