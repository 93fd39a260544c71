"""The three fused ops of every backend against fusedclip.reference, their specification."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    NORM_RTOL,
    assert_close,
    assert_grads_close,
    backend_params,
    is_interpreted,
    poison_allocator,
)
from exact import bits, same_alignment_copy

from fusedclip import dispatch, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
NORM_TYPES = [1.0, 2.0, 3.0, 0.5, math.inf]
# 65537 is one past a power of two, 4095 one short: both leave a tail that no vector width
# divides; the large size spans several chunks of every backend.
SIZES = [0, 1, 3, 4095, 65537, (1 << 20) + 5]
INTERPRETED_SIZES = [0, 1, 3, 4095, 70001]


def sizes_for(device, backend):
    return INTERPRETED_SIZES if is_interpreted(device, backend) else SIZES


def random_gradients(sizes, dtypes, device, scale=3.0):
    """One tensor per size, dtypes cycled, values of mixed magnitude (not zeros)."""
    tensors = []
    for index, size in enumerate(sizes):
        dtype = dtypes[index % len(dtypes)]
        values = torch.randn(size, dtype=torch.float64) * scale
        tensors.append(values.to(dtype).to(device))
    return tensors


def reference_reduce(tensors, norm_type, per_tensor=True):
    return reference.reduce([t.cpu() for t in tensors], norm_type, per_tensor)


def norm_rtol(tensors):
    return max(NORM_RTOL[t.dtype] for t in tensors) * 4


@pytest.mark.parametrize(("device", "backend"), backend_params(include_reference=False))
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=lambda p: f"p{p}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reduce_matches_reference(device, backend, norm_type, dtype):
    ops = dispatch.select(torch.device(device), backend)
    tensors = random_gradients(sizes_for(device, backend), [dtype], device)
    poison_allocator(device)
    power_sum, found_inf, per_tensor_power = ops.reduce(tensors, norm_type, True)
    expected_sum, expected_inf, expected_per_tensor = reference_reduce(tensors, norm_type)
    assert power_sum.dtype == torch.float64 and power_sum.shape == ()
    assert found_inf.dtype == torch.float32 and found_inf.shape == ()
    assert per_tensor_power.shape == (len(tensors),)
    assert_close(power_sum, expected_sum, rtol=1e-12, what="power_sum")
    assert_close(per_tensor_power, expected_per_tensor, rtol=1e-12, what="per_tensor_power")
    assert found_inf.item() == expected_inf.item() == 0.0


@pytest.mark.parametrize(("device", "backend"), backend_params(include_reference=False))
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=lambda p: f"p{p}")
def test_reduce_mixed_dtypes_in_one_call(device, backend, norm_type):
    ops = dispatch.select(torch.device(device), backend)
    sizes = [17, 0, 65537, 3, 1000, 5, 4095, 1]
    tensors = random_gradients(sizes, DTYPES, device)
    power_sum, found_inf, per_tensor_power = ops.reduce(tensors, norm_type, True)
    expected_sum, _, expected_per_tensor = reference_reduce(tensors, norm_type)
    assert_close(power_sum, expected_sum, rtol=1e-12, what="power_sum")
    assert_close(per_tensor_power, expected_per_tensor, rtol=1e-12, what="per_tensor_power")
    empty = ops.reduce(tensors, norm_type, False)[2]
    assert empty.shape == (0,) and empty.dtype == torch.float64


@pytest.mark.parametrize(("device", "backend"), backend_params(include_reference=False))
def test_reduce_float64_sum_of_finite_squares_does_not_overflow(device, backend):
    ops = dispatch.select(torch.device(device), backend)
    # |g| = 1e19 squares to 1e38 (finite in float64, overflow for a float32 accumulator).
    tensors = [torch.full((1000,), 1e19, dtype=torch.float32, device=device)]
    power_sum, found_inf, _ = ops.reduce(tensors, 2.0, False)
    assert_close(
        power_sum, torch.tensor(1000 * 1e38, dtype=torch.float64), rtol=1e-6, what="power_sum"
    )
    assert found_inf.item() == 0.0


@pytest.mark.parametrize(("device", "backend"), backend_params(include_reference=False))
@pytest.mark.parametrize("bad_value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("where", ["first", "last", "tail", "second_chunk"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reduce_flags_nonfinite_anywhere(device, backend, bad_value, where, dtype):
    ops = dispatch.select(torch.device(device), backend)
    size = 70001 if is_interpreted(device, backend) else (1 << 20) + 7
    tensors = random_gradients([0, size, 3], [dtype], device)
    position = {"first": 0, "last": size - 1, "tail": size - 3, "second_chunk": size // 2 + 1}[
        where
    ]
    tensors[1][position] = bad_value
    for norm_type in (2.0, math.inf):
        power_sum, found_inf, per_tensor_power = ops.reduce(tensors, norm_type, True)
        assert found_inf.item() == 1.0
        if math.isnan(bad_value):
            assert math.isnan(power_sum.item()), f"p={norm_type}: NaN must propagate"
        else:
            assert power_sum.item() == math.inf
        assert math.isfinite(per_tensor_power[2].item())


@pytest.mark.parametrize(("device", "backend"), backend_params(include_reference=False))
def test_reduce_is_deterministic(device, backend):
    ops = dispatch.select(torch.device(device), backend)
    sizes = [70001, 5, 4095] if is_interpreted(device, backend) else [(1 << 21) + 3, 5, 4095, 65537]
    tensors = random_gradients(sizes, [torch.float32, torch.bfloat16], device)
    threads = torch.get_num_threads()
    try:
        first = ops.reduce(tensors, 2.0, True)
        torch.set_num_threads(1)
        second = ops.reduce(tensors, 2.0, True)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b), "same input, different bits"


@pytest.mark.parametrize(("device", "backend"), backend_params())
@pytest.mark.parametrize("norm_type", [2.0, 3.0, math.inf], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("max_norm", [None, 0.0, 1.0, 1e30], ids=lambda m: f"max{m}")
@pytest.mark.parametrize("inv_scale", [None, 2.0**-10], ids=lambda s: f"inv{s}")
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64], ids=str)
def test_finalize_matches_reference(device, backend, norm_type, max_norm, inv_scale, out_dtype):
    ops = dispatch.select(torch.device(device), backend)
    power_sum = torch.tensor(12345.678, dtype=torch.float64, device=device)
    inv = None if inv_scale is None else torch.tensor(inv_scale, device=device)
    total_norm, clip_coef = ops.finalize(power_sum, norm_type, max_norm, inv, out_dtype)
    expected_norm, expected_coef = reference.finalize(
        power_sum.cpu(), norm_type, max_norm, None if inv is None else inv.cpu(), out_dtype
    )
    assert total_norm.dtype == clip_coef.dtype == out_dtype
    assert total_norm.shape == clip_coef.shape == ()
    assert total_norm.device.type == device
    assert_close(total_norm, expected_norm, rtol=1e-15, what="total_norm")
    assert_close(clip_coef, expected_coef, rtol=1e-15, what="clip_coef")


@pytest.mark.parametrize(("device", "backend"), backend_params())
@pytest.mark.parametrize("power", [math.inf, math.nan], ids=["inf", "nan"])
def test_finalize_propagates_nonfinite_like_torch(device, backend, power):
    ops = dispatch.select(torch.device(device), backend)
    total_norm, clip_coef = ops.finalize(
        torch.tensor(power, dtype=torch.float64, device=device), 2.0, 1.0, None, torch.float32
    )
    # torch: clamp(1 / (inf + 1e-6), max=1) = 0; NaN stays NaN.
    if math.isnan(power):
        assert math.isnan(total_norm.item()) and math.isnan(clip_coef.item())
    else:
        assert total_norm.item() == math.inf and clip_coef.item() == 0.0


@pytest.mark.parametrize(("device", "backend"), backend_params(include_reference=False))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("coef", [0.37, 2.0**-16], ids=["coef0.37", "coef2^-16"])
@pytest.mark.parametrize("clip_value", [None, 0.5], ids=lambda v: f"value{v}")
def test_scale_matches_reference(device, backend, dtype, coef, clip_value):
    ops = dispatch.select(torch.device(device), backend)
    tensors = random_gradients(sizes_for(device, backend), [dtype], device)
    originals = [t.clone() for t in tensors]
    coef_tensor = torch.tensor(coef, dtype=torch.float32, device=device)
    ops.scale_(tensors, coef_tensor, clip_value)
    for index, (tensor, original) in enumerate(zip(tensors, originals, strict=True)):
        expected = original.cpu().to(torch.float64) * coef_tensor.item()
        if clip_value is not None:
            expected = expected.clamp(-clip_value, clip_value)
        assert_grads_close(tensor, expected, what=f"tensor {index} ({tensor.numel()} elements)")


@pytest.mark.parametrize(("device", "backend"), backend_params(include_reference=False))
def test_scale_mixed_dtypes_and_float64_coef(device, backend):
    ops = dispatch.select(torch.device(device), backend)
    tensors = random_gradients([4095, 3, 0, 65537, 1, 17, 100, 9], DTYPES, device)
    originals = [t.clone() for t in tensors]
    ops.scale_(tensors, torch.tensor(0.123456789, dtype=torch.float64, device=device), 1.5)
    for index, (tensor, original) in enumerate(zip(tensors, originals, strict=True)):
        expected = (original.cpu().to(torch.float64) * 0.123456789).clamp(-1.5, 1.5)
        assert_grads_close(tensor, expected, what=f"tensor {index} ({tensor.dtype})")


@pytest.mark.parametrize(("device", "backend"), backend_params(include_reference=False))
def test_scale_by_one_leaves_every_bit(device, backend):
    ops = dispatch.select(torch.device(device), backend)
    tensors = random_gradients([4095, 65537, 3], DTYPES, device)
    tensors[0][7] = math.nan
    tensors[1][0] = -math.inf
    originals = [t.clone() for t in tensors]
    ops.scale_(tensors, torch.ones((), device=device), None)
    for tensor, original in zip(tensors, originals, strict=True):
        assert torch.equal(bits(tensor), bits(original))


@pytest.mark.parametrize(("device", "backend"), backend_params(include_reference=False))
def test_scale_propagates_nan_through_clamp(device, backend):
    ops = dispatch.select(torch.device(device), backend)
    tensor = torch.tensor([1.0, math.nan, -math.inf, math.inf, -3.0], device=device)
    ops.scale_([tensor], torch.tensor(0.5, device=device), 1.0)
    expected = torch.tensor([1.0, math.nan, -math.inf, math.inf, -3.0]).mul(0.5).clamp(-1.0, 1.0)
    assert_close(tensor, expected, rtol=0, what="clamped")
    nan_coef = torch.tensor([1.0, -2.0], device=device)
    ops.scale_([nan_coef], torch.tensor(math.nan, device=device), None)
    assert torch.isnan(nan_coef).all()


@pytest.mark.parametrize(("device", "backend"), backend_params(include_reference=False))
def test_ops_reject_bad_inputs(device, backend):
    ops = dispatch.select(torch.device(device), backend)
    with pytest.raises((RuntimeError, ValueError), match="tensors"):
        ops.reduce([torch.zeros(3, dtype=torch.int32, device=device)], 2.0, False)
    with pytest.raises((RuntimeError, ValueError), match="(?i)tensors"):
        ops.reduce([], 2.0, False)


@pytest.mark.parametrize(("device", "backend"), backend_params(include_reference=False))
def test_opcheck(device, backend):
    """Schemas, fake impls, autograd registration and mutation declarations of every op."""
    prefix = "triton_" if backend == "triton" else ""
    namespace = torch.ops.fusedclip
    tensors = random_gradients([5, 0, 129], [torch.float32, torch.bfloat16], device)
    coef = torch.tensor(0.5, device=device)
    power_sum = torch.tensor(4.0, dtype=torch.float64, device=device)
    inv_scale = torch.tensor(0.25, device=device)
    cases = [
        (getattr(namespace, prefix + "reduce"), (tensors, 2.0, True)),
        (getattr(namespace, prefix + "reduce"), (tensors, math.inf, False)),
        (getattr(namespace, prefix + "finalize"), (power_sum, 2.0, 1.0, inv_scale, torch.float32)),
        (getattr(namespace, prefix + "finalize"), (power_sum, 2.0, None, None, torch.float64)),
        (getattr(namespace, prefix + "scale_"), (tensors, coef, 0.1)),
    ]
    if not prefix:
        cases += [
            (namespace.clip_, (tensors, 2.0, 1.0, inv_scale, 0.1, torch.float32, True)),
            (namespace.clip_, (tensors, math.inf, None, None, 0.1, torch.float64, False, "split")),
        ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def clip_op_params():
    """(device, backend, launch) for every backend with a fused clip_ op; CUDA runs each launch."""
    params = []
    for param in backend_params(include_reference=False):
        device, backend = param.values
        if dispatch.select(torch.device(device), backend).clip_ is None:
            continue
        launches = ("auto", "single", "split") if device == "cuda" else ("auto",)
        for launch in launches:
            params.append(
                pytest.param(device, backend, launch, id=f"{param.id}-{launch}", marks=param.marks)
            )
    return params


CLIP_CASES = {  # (max_norm, clip_value, inv_scale)
    "norm": (1.0, None, None),
    "unscale-norm": (1.0, None, 2.0**-10),
    "unscale-norm-value": (0.5, 0.01, 0.25),
    "value-only": (None, 0.05, None),
    "unscale-only": (None, None, 0.5),
    "no-clip-needed": (1e9, None, None),
}


@pytest.mark.parametrize(("device", "backend", "launch"), clip_op_params())
@pytest.mark.parametrize("case", list(CLIP_CASES))
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0], ids=lambda p: f"p{p}")
def test_clip_op_equals_reduce_finalize_scale(device, backend, launch, case, norm_type):
    """clip_ is reduce -> finalize -> scale_: every output and every gradient bit agrees."""
    ops = dispatch.select(torch.device(device), backend)
    max_norm, clip_value, inv_scale = CLIP_CASES[case]
    sizes = [17, 0, 65537, 3, 1000, 5, 4095, 1, 200003]
    tensors = random_gradients(sizes, DTYPES, device)
    tensors.append(torch.randn(4097, device=device)[1:])  # dense but not 16-byte aligned
    expected = [same_alignment_copy(t) for t in tensors]
    originals = [t.clone() for t in tensors]
    inv_scale_tensor = None if inv_scale is None else torch.tensor(inv_scale, device=device)
    out_dtype = torch.float64
    poison_allocator(device)
    total_norm, found_inf, clip_coef, per_tensor_power = ops.clip_(
        tensors, norm_type, max_norm, inv_scale_tensor, clip_value, out_dtype, True, launch
    )
    power_sum, expected_inf, expected_per_tensor = ops.reduce(expected, norm_type, True)
    expected_norm, expected_coef = ops.finalize(
        power_sum, norm_type, max_norm, inv_scale_tensor, out_dtype
    )
    ops.scale_(expected, expected_coef, clip_value)
    for name, got, want in [
        ("total_norm", total_norm, expected_norm),
        ("found_inf", found_inf, expected_inf),
        ("clip_coef", clip_coef, expected_coef),
        ("per_tensor_power", per_tensor_power, expected_per_tensor),
    ]:
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(bits(got), bits(want)), f"{name}: {got} != {want}"
    for index, (tensor, want) in enumerate(zip(tensors, expected, strict=True)):
        assert torch.equal(bits(tensor), bits(want)), f"tensor {index} ({tensor.dtype})"
    reference_norm = reference.power_to_norm(reference_reduce(originals, norm_type)[0], norm_type)
    if inv_scale is not None:
        reference_norm = reference_norm * inv_scale
    assert_close(total_norm, reference_norm, rtol=1e-12, what="total_norm against float64")


@pytest.mark.parametrize(("device", "backend", "launch"), clip_op_params())
def test_clip_op_flags_nonfinite_and_propagates_it(device, backend, launch):
    ops = dispatch.select(torch.device(device), backend)
    tensors = random_gradients([65537 * 3, 100], [torch.bfloat16, torch.float32], device)
    tensors[0][65537 * 2 + 11] = math.inf
    total_norm, found_inf, clip_coef, per_tensor_power = ops.clip_(
        tensors, 2.0, 1.0, None, None, torch.float32, False, launch
    )
    assert found_inf.item() == 1.0 and total_norm.item() == math.inf and clip_coef.item() == 0.0
    assert per_tensor_power.shape == (0,)
    assert torch.isnan(tensors[0][65537 * 2 + 11]).item()  # inf * 0, as torch does


@pytest.mark.parametrize(("device", "backend", "launch"), clip_op_params())
def test_clip_op_rejects_bad_arguments_and_leaves_gradients(device, backend, launch):
    ops = dispatch.select(torch.device(device), backend)
    tensors = random_gradients([100, 7], [torch.float32], device)
    originals = [t.clone() for t in tensors]
    bad_calls = {
        "launch": (tensors, 2.0, 1.0, None, None, torch.float32, False, "fastest"),
        "clip_value": (tensors, 2.0, 1.0, None, -1.0, torch.float32, False, launch),
        "out_dtype": (tensors, 2.0, 1.0, None, None, torch.float16, False, launch),
        "inv_scale": (
            tensors,
            2.0,
            1.0,
            torch.ones(2, device=device),
            None,
            torch.float32,
            False,
            launch,
        ),
        "norm_type": (tensors, -1.0, 1.0, None, None, torch.float32, False, launch),
    }
    for name, args in bad_calls.items():
        with pytest.raises(RuntimeError, match=name):
            ops.clip_(*args)
        for tensor, original in zip(tensors, originals, strict=True):
            assert torch.equal(tensor, original), f"a bad {name} changed a gradient"
