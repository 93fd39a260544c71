"""The fused ops of every backend against fusedclip.reference, their specification, and against
exact oracles written here (large p, extreme coefficients)."""

from __future__ import annotations

import decimal
import math
from collections import Counter
from fractions import Fraction

import pytest
import torch
from conftest import (
    assert_close,
    assert_grads_close,
    backend_params,
    is_interpreted,
    poison_allocator,
)
from exact import bits, same_alignment_copy
from tolerances import (
    FINALIZE_RTOL,
    INTERPRETED_MULTI_CHUNK_SIZE,
    INTERPRETED_SIZES,
    MULTI_CHUNK_SIZE,
    PARALLEL_SIZE,
    RAW_NORM_RTOL,
    SIZES,
)

import fusedclip
from fusedclip import dispatch, norms, reference

# Triton and the reference allocate their outputs from Python: fresh memory is NaN there.
pytestmark = pytest.mark.usefixtures("poisoned_fresh_memory")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
NORM_TYPES = [1.0, 2.0, 3.0, 0.5, math.inf, 10.0]


def sizes_for(device, backend):
    return INTERPRETED_SIZES if is_interpreted(device, backend) else SIZES


def multi_chunk_size(device, backend):
    return INTERPRETED_MULTI_CHUNK_SIZE if is_interpreted(device, backend) else MULTI_CHUNK_SIZE


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


def exact_norm(tensors, norm_type):
    """(sum |g|^p)^(1/p) over every element, for an integer p (max |g| for inf), from the README's
    definition and nothing of fusedclip: each element is an exact rational, the sum of powers is
    exact, and the root is taken with 60 significant digits, then rounded to float64 once."""
    counts = Counter()
    for tensor in tensors:
        counts.update(abs(value) for value in tensor.detach().cpu().to(torch.float64).tolist())
    if math.isinf(norm_type):
        return max(counts, default=0.0)
    assert norm_type == int(norm_type), "the exact oracle takes integer p"
    power = sum(
        (Fraction(value) ** int(norm_type) * count for value, count in counts.items()), Fraction(0)
    )
    if power == 0:
        return 0.0
    with decimal.localcontext() as context:
        context.prec = 60
        context.Emax, context.Emin = decimal.MAX_EMAX, decimal.MIN_EMIN
        power_decimal = decimal.Decimal(power.numerator) / decimal.Decimal(power.denominator)
        return float((power_decimal.ln() / decimal.Decimal(int(norm_type))).exp())


@pytest.mark.parametrize(("device", "backend"), backend_params(include_reference=False))
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=lambda p: f"p{p}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reduce_matches_reference(device, backend, norm_type, dtype):
    ops = dispatch.select(torch.device(device), backend)
    tensors = random_gradients(sizes_for(device, backend), [dtype], device)
    poison_allocator(device)
    raw_norm, found_inf, per_tensor_norms = ops.reduce(tensors, norm_type, True)
    expected_norm, expected_inf, expected_per_tensor = reference_reduce(tensors, norm_type)
    assert raw_norm.dtype == torch.float64 and raw_norm.shape == ()
    assert found_inf.dtype == torch.float32 and found_inf.shape == ()
    assert per_tensor_norms.dtype == torch.float64 and per_tensor_norms.shape == (len(tensors),)
    assert_close(raw_norm, expected_norm, rtol=RAW_NORM_RTOL, what="raw_norm")
    assert_close(per_tensor_norms, expected_per_tensor, rtol=RAW_NORM_RTOL, what="per_tensor_norms")
    assert found_inf.item() == expected_inf.item() == 0.0


@pytest.mark.parametrize(("device", "backend"), backend_params(include_reference=False))
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 3.0, 10.0], ids=lambda p: f"p{p}")
def test_reduce_mixed_dtypes_in_one_call(device, backend, norm_type):
    """With a float64 tensor in the call every p > 1 takes the scaled path, float32 ones too."""
    ops = dispatch.select(torch.device(device), backend)
    sizes = [17, 0, 65537, 3, 1000, 5, 4095, 1]
    tensors = random_gradients(sizes, DTYPES, device)
    raw_norm, _, per_tensor_norms = ops.reduce(tensors, norm_type, True)
    expected_norm, _, expected_per_tensor = reference_reduce(tensors, norm_type)
    assert_close(raw_norm, expected_norm, rtol=RAW_NORM_RTOL, what="raw_norm")
    assert_close(per_tensor_norms, expected_per_tensor, rtol=RAW_NORM_RTOL, what="per_tensor_norms")
    empty = ops.reduce(tensors, norm_type, False)[2]
    assert empty.shape == (0,) and empty.dtype == torch.float64


@pytest.mark.parametrize(("device", "backend"), backend_params(include_reference=False))
def test_reduce_float32_sum_of_finite_squares_does_not_overflow(device, backend):
    ops = dispatch.select(torch.device(device), backend)
    # |g| = 1e19 squares to 1e38 (finite in float64, overflow for a float32 accumulator).
    tensors = [torch.full((1000,), 1e19, dtype=torch.float32, device=device)]
    raw_norm, found_inf, _ = ops.reduce(tensors, 2.0, False)
    expected = exact_norm(tensors, 2.0)
    assert_close(
        raw_norm, torch.tensor(expected, dtype=torch.float64), rtol=RAW_NORM_RTOL, what="raw_norm"
    )
    assert found_inf.item() == 0.0


def f32(*values):
    return torch.tensor(values, dtype=torch.float32)


def f64(*values):
    return torch.tensor(values, dtype=torch.float64)


def palette_tensor(size, magnitudes, dtype, seed):
    """`size` elements drawn from ±`magnitudes` (few distinct values, so the exact oracle is fast)."""
    generator = torch.Generator().manual_seed(seed)
    palette = torch.tensor(magnitudes, dtype=torch.float64)
    index = torch.randint(len(magnitudes), (size,), generator=generator)
    sign = torch.randint(2, (size,), generator=generator) * 2.0 - 1.0
    return (palette[index] * sign).to(dtype)


# (tensors, p): norms whose powers leave float64's range (issue #14 item 4), denormals, huge and
# tiny together. Each norm is finite in float64 (and in float32 where the gradients are float32).
LARGE_P_CASES = {
    "p10-3e38": (lambda n: [f32(3e38)], 10.0),
    "p100-1e4-twice": (lambda n: [f32(1e4, 1e4)], 100.0),
    "p1000-3": (lambda n: [f32(3.0)], 1000.0),
    "p100-1e-6": (lambda n: [f32(1e-6)], 100.0),
    "p70-float16-max": (lambda n: [torch.full((5,), 65504.0, dtype=torch.float16)], 70.0),
    "p2-float64-1e200": (lambda n: [torch.full((5,), 1e200, dtype=torch.float64)], 2.0),
    "p3-float64-1e200": (lambda n: [torch.full((5,), 1e200, dtype=torch.float64)], 3.0),
    "p2-float64-1e-200": (lambda n: [torch.full((7,), -1e-200, dtype=torch.float64)], 2.0),
    "p2-float64-denormals": (lambda n: [f64(5e-324, -1e-310, 2e-320)], 2.0),
    "p3-float64-denormals": (lambda n: [f64(5e-324, 1e-310, 0.0)], 3.0),
    "p10-float32-denormals": (lambda n: [f32(1e-45, -1e-40, 3e-39)], 10.0),
    "p2-huge-and-tiny": (lambda n: [f64(1e300, -1e-300, 5e-324), f32(3e38, 1e-40)], 2.0),
    "p10-huge-and-tiny": (lambda n: [f32(3e38, -1e-40, 1e-45), f32(-1e-30)], 10.0),
    "p9-several-chunks": (
        lambda n: [palette_tensor(n, [3e38, 1e30, 1e-20, 1e-45, 0.0], torch.float32, 1)],
        9.0,
    ),
    "p2-float64-several-chunks": (
        lambda n: [
            palette_tensor(n, [1e200, 3e199, 1e-300, 5e-324], torch.float64, 2),
            palette_tensor(n // 3, [1e-310, 2.0], torch.float64, 3),
        ],
        2.0,
    ),
    "p8-bfloat16-several-chunks": (
        lambda n: [
            palette_tensor(n, [1e30, 3e38, 1e-38], torch.bfloat16, 4),
            torch.zeros(0, dtype=torch.bfloat16),
            palette_tensor(1000, [1e-30, 7.0], torch.float16, 5),
        ],
        8.0,
    ),
    "p4-float64-and-float32-several-chunks": (
        lambda n: [
            palette_tensor(n, [1e-100, 1e-150], torch.float64, 6),
            palette_tensor(n, [1e-30, 3.0], torch.float32, 7),
        ],
        4.0,
    ),
}


@pytest.mark.parametrize(("device", "backend"), backend_params())
@pytest.mark.parametrize("case", list(LARGE_P_CASES))
def test_reduce_large_p_and_extreme_values_against_exact_oracle(device, backend, case):
    """Issue #14 item 4: |g|^p overflowed or underflowed float64 (p=10 of 3e38 was inf, p=100 of
    1e-6 was 0, with found_inf=0); the norm must be finite and accurate, per tensor too."""
    ops = dispatch.select(torch.device(device), backend)
    make, norm_type = LARGE_P_CASES[case]
    tensors = [t.to(device) for t in make(multi_chunk_size(device, backend))]
    raw_norm, found_inf, per_tensor_norms = ops.reduce(tensors, norm_type, True)
    expected = torch.tensor(exact_norm(tensors, norm_type), dtype=torch.float64)
    assert math.isfinite(expected.item()) and expected.item() > 0.0, "the case is not extreme"
    assert_close(raw_norm, expected, rtol=RAW_NORM_RTOL, what=f"raw_norm (p={norm_type})")
    expected_per_tensor = torch.tensor(
        [exact_norm([t], norm_type) for t in tensors], dtype=torch.float64
    )
    assert_close(per_tensor_norms, expected_per_tensor, rtol=RAW_NORM_RTOL, what="per_tensor_norms")
    assert found_inf.item() == 0.0, "found_inf is for inf/NaN elements, not for a large power"


@pytest.mark.parametrize(("device", "backend"), backend_params())
@pytest.mark.parametrize("norm_type", [1e17, 1e20, 1e300])
def test_reduce_huge_p_is_the_largest_magnitude(device, backend, norm_type):
    """For p this large (sum |g|^p)^(1/p) is max |g| to within count^(1/p) - 1 < 1e-15. The cpu
    kernel scales by max * (1 / max), which rounds to 1 - 2^-53 for some maxima (25232.552734375
    among them): to the power 1e20 every term was 0, and so was the norm."""
    ops = dispatch.select(torch.device(device), backend)
    palette = [25232.552734375, -3.0, 1e-20, 25232.552734375]
    tensors = [
        f32(25232.552734375, 1.0).to(device),
        palette_tensor(multi_chunk_size(device, backend), palette, torch.float32, 8).to(device),
    ]
    raw_norm, found_inf, per_tensor_norms = ops.reduce(tensors, norm_type, True)
    assert_close(raw_norm, torch.tensor(25232.552734375, dtype=torch.float64), rtol=1e-15)
    assert_close(
        per_tensor_norms, torch.full((2,), 25232.552734375, dtype=torch.float64), rtol=1e-15
    )
    assert found_inf.item() == 0.0


@pytest.mark.parametrize(("device", "backend"), backend_params())
@pytest.mark.parametrize("norm_type", [1e-300, 1e-16, 1e-12, 1e-9, 2.0**-11, 1e-3, 0.3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reduce_tiny_p_of_one_nonzero_element_is_its_magnitude(device, backend, norm_type, dtype):
    """(|x|^p)^(1/p) = |x| for any p > 0, zeros adding nothing. Summed plainly, |x|^p rounds to
    1 + O(2^-53) and the root magnifies that 1/p times: p = 1e-12 of [3, 0, 0] gave 3.0002, and
    p = 1e-16 gave 1. Past that, several nonzero elements make the norm overflow (2^(1/p))."""
    ops = dispatch.select(torch.device(device), backend)
    zeros = torch.zeros(multi_chunk_size(device, backend), dtype=dtype, device=device)
    value = torch.tensor(-3.0, dtype=dtype, device=device)
    zeros[len(zeros) // 2 + 1] = value
    tensors = [torch.zeros(5, dtype=dtype, device=device), zeros]
    raw_norm, found_inf, per_tensor_norms = ops.reduce(tensors, norm_type, True)
    assert_close(
        raw_norm, torch.tensor(3.0, dtype=torch.float64), rtol=RAW_NORM_RTOL, what="raw_norm"
    )
    assert_close(per_tensor_norms, f64(0.0, 3.0), rtol=RAW_NORM_RTOL, what="per_tensor_norms")
    assert found_inf.item() == 0.0


# Two equal magnitudes x at p: the norm is x * 2^(1/p), finite here though 2^(1/p) is not.
TINY_P_OVERFLOWING_ROOT_CASES = {
    "float64-p2^-10": (torch.float64, 2.0**-40, 2.0**-10),
    "float64-p2^-11-subnormal": (torch.float64, 2.0**-1074, 2.0**-11),
    "float32-p0.00095": (torch.float32, 2.0**-126, 0.00095),
}


@pytest.mark.parametrize(("device", "backend"), backend_params())
@pytest.mark.parametrize("case", list(TINY_P_OVERFLOWING_ROOT_CASES))
def test_reduce_tiny_p_norm_is_finite_when_only_the_root_overflows(device, backend, case):
    """A scaled sum's norm is scale * sum^(1/p): for a tiny p the root alone passed float64's max
    and the norm came back inf ([3.2e-9, 2.4e-9] at p = 0.000975, whose norm is 1.55e300)."""
    ops = dispatch.select(torch.device(device), backend)
    dtype, magnitude, norm_type = TINY_P_OVERFLOWING_ROOT_CASES[case]
    spread = torch.zeros(multi_chunk_size(device, backend), dtype=dtype, device=device)
    spread[3] = magnitude
    spread[-2] = -magnitude
    raw_norm, found_inf, per_tensor_norms = ops.reduce([spread], norm_type, True)
    expected = 2.0 ** (1.0 / norm_type + math.log2(magnitude))
    assert math.isfinite(expected) and 1.0 / norm_type >= 1024, "2^(1/p) must overflow"
    expected_tensor = torch.tensor([expected], dtype=torch.float64)
    assert_close(raw_norm.reshape(1), expected_tensor, rtol=RAW_NORM_RTOL, what="raw_norm")
    assert_close(per_tensor_norms, expected_tensor, rtol=RAW_NORM_RTOL, what="per_tensor_norms")
    assert found_inf.item() == 0.0


@pytest.mark.parametrize(("device", "backend"), backend_params())
@pytest.mark.parametrize("layout", ["one-block", "several-chunks", "separate-tensors"])
@pytest.mark.parametrize("small_count", [1, 100])
def test_reduce_small_p_counts_elements_whose_ratio_to_the_max_underflows(
    device, backend, layout, small_count
):
    """(1e-300 / 1e300) underflows to 0, but its 0.008th power is 0.0016: a scaled sum that
    rescaled by the ratio dropped such terms (the norm of [1e300, 1e-300] came back 1e300, not
    1.00198e300), within a block, across chunks, and combining tensors (the reference too)."""
    import mpmath

    ops = dispatch.select(torch.device(device), backend)
    norm_type, values = 0.008, [1e300] + [-1e-300] * small_count
    if layout == "separate-tensors":
        tensors = [f64(value) for value in values]
    else:
        step = 1 if layout == "one-block" else multi_chunk_size(device, backend) // len(values)
        spread = torch.zeros(step * len(values), dtype=torch.float64)
        spread[::step] = torch.tensor(values, dtype=torch.float64)
        tensors = [spread]
    tensors = [t.to(device) for t in tensors]
    raw_norm, found_inf, _ = ops.reduce(tensors, norm_type, False)
    with mpmath.workdps(60):
        exact = mpmath.fsum(mpmath.mpf(abs(v)) ** norm_type for v in values) ** (1 / norm_type)
    expected = torch.tensor(float(exact), dtype=torch.float64)
    assert_close(raw_norm, expected, rtol=RAW_NORM_RTOL, what=f"raw_norm ({layout})")
    assert found_inf.item() == 0.0


@pytest.mark.parametrize(("device", "backend"), backend_params())
@pytest.mark.parametrize("norm_type", [1e-310, 5e-324], ids=["subnormal", "smallest"])
def test_reduce_subnormal_p_of_two_nonzero_elements_overflows_to_inf_not_nan(
    device, backend, norm_type
):
    """(1 + 0.5^p)^(1/p) with 1/p = inf is inf. Applied in three factors, log2(sum) / p = inf
    made exp2(inf - inf) a NaN, and a NaN norm poisons every gradient (inf clips them to 0)."""
    ops = dispatch.select(torch.device(device), backend)
    tensors = [f64(1.0, -0.5).to(device), f64(2.0, 0.0, 2.0).to(device)]
    raw_norm, found_inf, per_tensor_norms = ops.reduce(tensors, norm_type, True)
    assert raw_norm.item() == math.inf
    assert per_tensor_norms.tolist() == [math.inf, math.inf]
    assert found_inf.item() == 0.0


@pytest.mark.parametrize(("device", "backend"), backend_params(include_reference=False))
@pytest.mark.parametrize("bad_value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("where", ["first", "last", "tail", "second_chunk"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reduce_flags_nonfinite_anywhere(device, backend, bad_value, where, dtype):
    ops = dispatch.select(torch.device(device), backend)
    size = INTERPRETED_MULTI_CHUNK_SIZE if is_interpreted(device, backend) else PARALLEL_SIZE
    tensors = random_gradients([0, size, 3], [dtype], device)
    position = {"first": 0, "last": size - 1, "tail": size - 3, "second_chunk": size // 2 + 1}[
        where
    ]
    tensors[1][position] = bad_value
    # 2 and inf take the plain sum for 16/32-bit gradients, 10 (and float64's 2) the scaled one.
    for norm_type in (2.0, math.inf, 10.0):
        raw_norm, found_inf, per_tensor_norms = ops.reduce(tensors, norm_type, True)
        assert found_inf.item() == 1.0
        if math.isnan(bad_value):
            assert math.isnan(raw_norm.item()), f"p={norm_type}: NaN must propagate"
            assert math.isnan(per_tensor_norms[1].item())
        else:
            assert raw_norm.item() == math.inf, f"p={norm_type}"
            assert per_tensor_norms[1].item() == math.inf
        assert math.isfinite(per_tensor_norms[2].item())


@pytest.mark.parametrize(("device", "backend"), backend_params(include_reference=False))
@pytest.mark.parametrize(
    ("dtypes", "norm_type"),
    [
        ([torch.float32, torch.bfloat16], 2.0),  # the plain float64 sum
        ([torch.float64, torch.float32], 2.0),  # the scaled sum, because of the float64 tensor
        ([torch.float32, torch.bfloat16], 10.0),  # the scaled sum, because p > 6
    ],
    ids=["plain-p2", "scaled-float64-p2", "scaled-p10"],
)
def test_reduce_is_deterministic(device, backend, dtypes, norm_type):
    """Same bits twice, and with 1 and 2 threads (the CPU splits the chunks between them)."""
    ops = dispatch.select(torch.device(device), backend)
    if is_interpreted(device, backend):
        sizes = [INTERPRETED_MULTI_CHUNK_SIZE, 5, 4095]
    else:
        sizes = [PARALLEL_SIZE, 5, 4095, 65537]
    tensors = random_gradients(sizes, dtypes, device, scale=1e30)  # |g|^p leaves float64
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = ops.reduce(tensors, norm_type, True)
        again = ops.reduce(tensors, norm_type, True)
        torch.set_num_threads(1)
        single = ops.reduce(tensors, norm_type, True)
    finally:
        torch.set_num_threads(threads)
    for name, a, b, c in zip(
        ("raw_norm", "found_inf", "per_tensor_norms"), first, again, single, strict=True
    ):
        assert torch.equal(bits(a), bits(b)), f"{name}: same input, different bits"
        assert torch.equal(bits(a), bits(c)), f"{name}: different bits with 1 and 2 threads"
    assert math.isfinite(first[0].item())


# The CPU read pass's summation order, as clip_cpu.cpp's file comment documents it: chunks of 64K
# elements; in a chunk, element k goes to float64 lane k % 16 (in the scaled path, of each block
# of 1024, whose terms are divided by the block's max |g|); lanes combine in a fixed tree; blocks,
# chunks, then tensors combine in order (ScaledSum.merge of fusedclip/norm.h in the scaled path).
CPU_CHUNK_SIZE = 65536
CPU_SCALED_BLOCK = 1024
CPU_LANES = 16


def power_term(x: float, norm_type: float) -> float:
    """|x|^p as the kernels form it: a product for p = 2 (as C++ x * x), libm's pow past that."""
    if norm_type == 2:
        return x * x
    return abs(x) if norm_type == 1 else abs(x) ** norm_type


def lanes_sum(terms) -> float:
    lanes = [0.0] * CPU_LANES
    for k, term in enumerate(terms):
        lanes[k % CPU_LANES] += term
    pairs = [lanes[j] + lanes[j + 8] for j in range(8)]
    quads = [pairs[j] + pairs[j + 4] for j in range(4)]
    return (quads[0] + quads[2]) + (quads[1] + quads[3])


def chunks_of(tensor, size):
    values = tensor.to(torch.float64).reshape(-1).tolist()
    return [values[start : start + size] for start in range(0, len(values), size)]


def cpu_order_norms(tensors, norm_type: float) -> list[float]:
    """The plain path (p = 1, or p = 2 without float64 gradients): per tensor, the float64 sum of
    |g|^p, then its root; last, the total's."""
    norms, total = [], 0.0
    for tensor in tensors:
        tensor_power = 0.0
        for chunk in chunks_of(tensor, CPU_CHUNK_SIZE):
            tensor_power += lanes_sum(power_term(x, norm_type) for x in chunk)
        total += tensor_power
        norms.append(tensor_power)
    root = math.sqrt if norm_type == 2 else float
    return [root(power) for power in [*norms, total]]


def cpu_order_scaled_norms(tensors, norm_type: float) -> list[float]:
    """The scaled path, for finite gradients none all zero: ScaledSums (scale, sum), merged."""

    def merge(into, other):
        (scale, total), (other_scale, other_sum) = into, other
        if other_scale == 0.0:
            return into
        if other_scale > scale:
            rest = 0.0 if scale == 0.0 else total * (scale / other_scale) ** norm_type
            return other_scale, other_sum + rest
        return scale, total + other_sum * (other_scale / scale) ** norm_type

    sums, grand = [], (0.0, 0.0)
    for tensor in tensors:
        tensor_sum = (0.0, 0.0)
        for chunk in chunks_of(tensor, CPU_CHUNK_SIZE):
            chunk_sum = (0.0, 0.0)
            for start in range(0, len(chunk), CPU_SCALED_BLOCK):
                block = chunk[start : start + CPU_SCALED_BLOCK]
                block_max = max(abs(x) for x in block)
                reciprocal = 1.0 / block_max
                power = lanes_sum(power_term(x * reciprocal, norm_type) for x in block)
                chunk_sum = merge(chunk_sum, (block_max, power))
            tensor_sum = merge(tensor_sum, chunk_sum)
        grand = merge(grand, tensor_sum)
        sums.append(tensor_sum)
    return [scale * total ** (1.0 / norm_type) for scale, total in [*sums, grand]]


def wide_range_gradients(sizes, dtypes, device):
    """Values whose magnitudes span 2^-40 to 2^40: their float64 sums of |g| and g^2 round
    differently in any other order, which sums of normal float32 values seldom do."""
    generator = torch.Generator().manual_seed(17)
    tensors = []
    for index, size in enumerate(sizes):
        mantissas = torch.randn(size, dtype=torch.float64, generator=generator)
        exponents = torch.randint(-40, 41, (size,), generator=generator).to(torch.float64)
        values = mantissas * 2.0**exponents
        tensors.append(values.to(dtypes[index % len(dtypes)]).to(device))
    return tensors


@pytest.mark.skipif(
    dispatch.unavailable_reason("cpu", "cpu") is not None, reason="the CPU kernels are not built"
)
@pytest.mark.parametrize(
    ("dtypes", "norm_type", "oracle", "values"),
    [
        ([torch.float64], 1.0, cpu_order_norms, random_gradients),
        ([torch.float32, torch.bfloat16, torch.float16], 2.0, cpu_order_norms, random_gradients),
        ([torch.float32, torch.bfloat16], 1.0, cpu_order_norms, wide_range_gradients),
        ([torch.float32, torch.bfloat16], 2.0, cpu_order_norms, wide_range_gradients),
        ([torch.float64], 2.0, cpu_order_scaled_norms, random_gradients),
        ([torch.float32, torch.bfloat16], 9.0, cpu_order_scaled_norms, random_gradients),
    ],
    ids=[
        "plain-float64-p1",
        "plain-p2",
        "plain-wide-p1",
        "plain-wide-p2",
        "scaled-float64-p2",
        "scaled-p9",
    ],
)
def test_cpu_read_pass_sums_in_its_documented_order(dtypes, norm_type, oracle, values):
    """Bit for bit, per tensor and in total, on whichever clone of the loops this CPU runs. Sums
    of normal float32 values in float64 are nearly exact in any order, and a square root can hide
    a sum's last bit; the float64, wide-range and scaled cases tell: a build that regrouped the
    lanes failed the two float64 cases; one whose float32 loop alone fed elements to the wrong
    lanes (an AVX2 variant, tried) failed plain-wide-p1 only; one whose compiler fused multiplies
    into adds (FMA contraction) failed scaled-p9."""
    ops = dispatch.select(torch.device("cpu"), "cpu")
    sizes = [1, 15, 16, 17, 1000, 1023, 1025, 4096, 2 * CPU_CHUNK_SIZE + 37] * 2
    tensors = values(sizes, dtypes, "cpu")
    raw_norm, _, per_tensor_norms = ops.reduce(tensors, norm_type, True)
    found = torch.cat([per_tensor_norms, raw_norm.reshape(1)])
    expected = torch.tensor(oracle(tensors, norm_type), dtype=torch.float64)
    assert torch.equal(bits(found), bits(expected)), (found - expected).nonzero().flatten()


@pytest.mark.parametrize(("device", "backend"), backend_params())
@pytest.mark.parametrize("raw_norm", [12345.678, 1e30, 0.0], ids=lambda n: f"norm{n}")
@pytest.mark.parametrize("max_norm", [None, 0.0, 1.0, 1e-20, 1e30], ids=lambda m: f"max{m}")
@pytest.mark.parametrize("inv_scale", [None, 2.0**-10, 1e300, -0.5], ids=lambda s: f"inv{s}")
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64], ids=str)
def test_finalize_matches_reference(device, backend, raw_norm, max_norm, inv_scale, out_dtype):
    ops = dispatch.select(torch.device(device), backend)
    raw = torch.tensor(raw_norm, dtype=torch.float64, device=device)
    # A float64 inv_scale where float32 cannot hold it.
    inv_dtype = torch.float64 if inv_scale == 1e300 else torch.float32
    inv = None if inv_scale is None else torch.tensor(inv_scale, dtype=inv_dtype, device=device)
    total_norm, clip_coef = ops.finalize(raw, max_norm, inv, out_dtype)
    expected_norm, expected_coef = reference.finalize(
        raw.cpu(), max_norm, None if inv is None else inv.cpu(), out_dtype
    )
    assert total_norm.dtype == out_dtype and clip_coef.dtype == torch.float64
    assert total_norm.shape == clip_coef.shape == ()
    assert total_norm.device.type == clip_coef.device.type == device
    assert_close(total_norm, expected_norm, rtol=FINALIZE_RTOL, what="total_norm")
    assert_close(clip_coef, expected_coef, rtol=FINALIZE_RTOL, what="clip_coef")


@pytest.mark.parametrize(("device", "backend"), backend_params())
@pytest.mark.parametrize("raw_norm", [math.inf, math.nan], ids=["inf", "nan"])
def test_finalize_propagates_nonfinite_like_torch(device, backend, raw_norm):
    ops = dispatch.select(torch.device(device), backend)
    total_norm, clip_coef = ops.finalize(
        torch.tensor(raw_norm, dtype=torch.float64, device=device), 1.0, None, torch.float32
    )
    # torch: clamp(1 / (inf + 1e-6), max=1) = 0; NaN stays NaN.
    if math.isnan(raw_norm):
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
@pytest.mark.parametrize(
    ("dtype", "ulps"),
    [(torch.float32, 1.5), (torch.bfloat16, 0.5 + 2.0**-15), (torch.float16, 0.5 + 2.0**-12)],
    ids=str,
)
def test_scale_by_a_float64_factor_is_within_the_documented_ulps(device, backend, dtype, ulps):
    """The README's bound: the factor rounded to float32 (half a float32 ulp of it), then the
    product rounded to the dtype: at most 1.5 ulp of the float64 product for float32 gradients
    (a result just below a power of two takes the factor's error at twice its own ulp), about
    half an ulp for 16-bit ones. The factor is no float32 (test_scale_matches_reference's are,
    which hides the first rounding): just above 0.25, where a float32 ulp is largest against
    the value, and nearly half an ulp from the nearest float32. Triton's CPU interpreter truncates float32 -> bfloat16
    (a GPU rounds, and make gpu-check runs this there): 1 ulp allowed for it."""
    if dtype == torch.bfloat16 and is_interpreted(device, backend):
        ulps = 1.0
    ops = dispatch.select(torch.device(device), backend)
    tensors = random_gradients(sizes_for(device, backend), [dtype], device)
    originals = [t.clone() for t in tensors]
    coef = 0.25 + 1.4999 * 2.0**-25  # float32 ulp at 0.25: 2^-25
    ops.scale_(tensors, torch.tensor(coef, dtype=torch.float64, device=device), None)
    worst = 0.0
    for tensor, original in zip(tensors, originals, strict=True):
        expected = original.cpu().to(torch.float64) * coef
        _, exponent = torch.frexp(expected)  # |expected| = m * 2^exponent, 0.5 <= m < 1
        significand_bits = 1 - math.log2(torch.finfo(dtype).eps)
        ulp = torch.pow(2.0, exponent.to(torch.float64) - significand_bits)
        errors = (tensor.cpu().to(torch.float64) - expected).abs() / ulp
        normal = errors[expected.abs() >= torch.finfo(dtype).tiny]
        worst = max([worst, *normal.tolist()])
    assert worst <= ulps, f"{worst} ulp"


# Coefficients outside float32's normal range (issue #14 item 5): below FLT_MIN, float32
# subnormal, above FLT_MAX; negative (a negative inv_scale). Each is finite in float64.
EXTREME_COEFFICIENTS = [7.07e-51, -1e-45, 1e-40, 2.0**-149, 1e-300, 1e39, -3e300, 1e300]


@pytest.mark.parametrize(("device", "backend"), backend_params(include_reference=False))
@pytest.mark.parametrize("coef", EXTREME_COEFFICIENTS, ids=lambda c: f"coef{c}")
@pytest.mark.parametrize("coef_dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("clip_value", [None, 1e-30], ids=lambda v: f"value{v}")
def test_scale_by_coefficients_outside_float32_matches_reference(
    device, backend, coef, coef_dtype, clip_value
):
    """The product is formed in float64 where the coefficient is outside float32's normal range:
    1e30 * 7e-51 is 7e-21, not 0, and 0 * 1e300 is 0, not NaN (0 * inf)."""
    ops = dispatch.select(torch.device(device), backend)
    coef_tensor = torch.tensor(coef, dtype=coef_dtype, device=device)
    if coef_dtype == torch.float32 and not (0 < abs(coef_tensor.item()) < math.inf):
        pytest.skip("not a finite nonzero float32")
    tensors = random_gradients([1000, 3, 4095, 65537], DTYPES, device, scale=1e30)
    for tensor in tensors:
        tensor[:3] = torch.tensor([0.0, -0.0, 1e-30], dtype=tensor.dtype)
    originals = [t.clone() for t in tensors]
    ops.scale_(tensors, coef_tensor, clip_value)
    for index, (tensor, original) in enumerate(zip(tensors, originals, strict=True)):
        if (
            tensor.dtype == torch.bfloat16
            and is_interpreted(device, backend)
            and norms.needs_float64_product(coef_tensor.item())
        ):
            # Triton 3.8's interpreter casts float64 -> bfloat16 wrongly (1.0 becomes 9.2e-41, an
            # upstream bug; through float32 it is right): the GPU run of this test checks it.
            continue
        expected = [original.cpu()]
        reference.scale_(expected, coef_tensor.cpu(), clip_value)
        assert not torch.isnan(tensor).any(), f"tensor {index} ({tensor.dtype}): a NaN appeared"
        assert_grads_close(tensor, expected[0].to(torch.float64), what=f"tensor {index}")


@pytest.mark.parametrize(("device", "backend"), backend_params())
def test_tiny_clip_coefficient_reaches_float32_gradients(device, backend):
    """Issue #14 item 5: with a float64 gradient in the call and max_norm=1e-20, a 1e30 float32
    gradient became 0 (the coefficient 7e-51 rounded to float32 is 0); it is 7.07e-21."""
    ops = dispatch.select(torch.device(device), backend)
    tensors = [f64(1e30).to(device), f32(1e30, 0.0, -1e30).to(device)]
    originals = [t.clone() for t in tensors]
    fused = [t.clone() for t in tensors]
    raw_norm, found_inf, _ = ops.reduce(tensors, 2.0, False)
    _, clip_coef = ops.finalize(raw_norm, 1e-20, None, torch.float64)
    ops.scale_(tensors, clip_coef, None)
    coef = 1e-20 / (exact_norm(originals, 2.0) + 1e-6)  # about 5.8e-51, below float32's range
    assert_close(clip_coef, torch.tensor(coef, dtype=torch.float64), rtol=1e-15, what="clip_coef")
    for index, (tensor, original) in enumerate(zip(tensors, originals, strict=True)):
        expected = original.cpu().to(torch.float64) * coef
        assert_grads_close(tensor, expected, what=f"gradient {index} ({tensor.dtype})")
    assert tensors[1][0].item() > 5e-21 and found_inf.item() == 0.0
    if ops.clip_ is not None:
        ops.clip_(fused, 2.0, 1e-20, None, None, torch.float64, False)
        for got, want in zip(fused, tensors, strict=True):
            assert torch.equal(bits(got), bits(want)), "clip_ differs from its three ops"


@pytest.mark.parametrize(("device", "backend"), backend_params())
def test_huge_inv_scale_leaves_zero_gradients_zero(device, backend):
    """Issue #14 item 5: inv_scale=1e300 turned a 0 float32 gradient into NaN (0 * inf)."""
    ops = dispatch.select(torch.device(device), backend)
    tensors = [f32(0.0, -0.0, 1e-30, 0.0).to(device)]
    inv_scale = torch.tensor(1e300, dtype=torch.float64, device=device)
    raw_norm, found_inf, _ = ops.reduce(tensors, 2.0, False)
    _, clip_coef = ops.finalize(raw_norm, None, inv_scale, torch.float32)
    ops.scale_(tensors, clip_coef, None)
    expected = f32(0.0, -0.0, math.inf, 0.0)  # 1e270 overflows float32, as in the reference
    assert torch.equal(bits(tensors[0]), bits(expected.to(device))), tensors[0]
    assert found_inf.item() == 0.0


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
@pytest.mark.parametrize("coef_dtype", [torch.float32, torch.float64], ids=str)
def test_scale_by_one_leaves_every_bit(device, backend, coef_dtype):
    ops = dispatch.select(torch.device(device), backend)
    tensors = random_gradients([4095, 65537, 3], DTYPES, device)
    tensors[0][7] = math.nan
    tensors[1][0] = -math.inf
    originals = [t.clone() for t in tensors]
    ops.scale_(tensors, torch.ones((), dtype=coef_dtype, device=device), None)
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


# Every backend's write op refuses tensors that share memory (the API never passes any): scaled
# in parallel, they raced (issue #14 items 2 and 12). The CUDA and Triton ops decide it when they
# build a list's device table, so a table found again in their cache costs nothing more.
@pytest.mark.parametrize(("device", "backend"), backend_params(include_reference=False))
@pytest.mark.parametrize("overlap", ["same-memory", "view", "partial"])
def test_write_ops_refuse_tensors_that_share_memory(device, backend, overlap):
    ops = dispatch.select(torch.device(device), backend)
    size = 3000 if is_interpreted(device, backend) else 300000  # several chunks on the CPU
    base = torch.randn(size, device=device)
    others = random_gradients([5, 100], [torch.float32], device)
    shared = {
        "same-memory": [base, base],
        "view": [base, base.view(size // 500, 500)],
        "partial": [base[: 2 * size // 3], base[size // 3 :]],
    }[overlap]
    tensors = [others[0], shared[0], others[1], shared[1]]
    originals = [t.clone() for t in tensors]
    coef = torch.tensor(0.5, device=device)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] and tensors\[3\] share memory"):
        ops.scale_(tensors, coef, None)
    if ops.clip_ is not None:  # Triton has none: the API runs reduce, finalize and scale_
        with pytest.raises(RuntimeError, match=r"tensors\[1\] and tensors\[3\] share memory"):
            ops.clip_(tensors, 2.0, 1e-3, None, None, torch.float32, False)
    # Alone the pair is in address order, which the check takes without sorting.
    with pytest.raises(RuntimeError, match=r"tensors\[0\] and tensors\[1\] share memory"):
        ops.scale_(shared, coef, None)
    for index, (tensor, original) in enumerate(zip(tensors, originals, strict=True)):
        assert torch.equal(tensor, original), f"tensor {index} changed before the refusal"
    # Disjoint slices of one storage are separate gradients.
    halves = [base[: size // 2], base[size // 2 :]]
    expected = base.clone().to(torch.float64) * 0.5
    ops.scale_(halves, coef, None)
    assert_grads_close(base, expected, what="disjoint slices")


@pytest.mark.parametrize(("device", "backend"), backend_params(include_reference=False))
def test_opcheck(device, backend):
    """Schemas, fake impls, autograd registration and mutation declarations of every op."""
    prefix = "triton_" if backend == "triton" else ""
    namespace = torch.ops.fusedclip
    tensors = random_gradients([5, 0, 129], [torch.float32, torch.bfloat16], device)
    coef = torch.tensor(0.5, device=device)
    tiny_coef = torch.tensor(1e-50, dtype=torch.float64, device=device)
    raw_norm = torch.tensor(4.0, dtype=torch.float64, device=device)
    inv_scale = torch.tensor(0.25, device=device)
    cases = [
        (getattr(namespace, prefix + "reduce"), (tensors, 2.0, True)),
        (getattr(namespace, prefix + "reduce"), (tensors, math.inf, False)),
        (getattr(namespace, prefix + "reduce"), (tensors, 10.0, True)),
        (getattr(namespace, prefix + "finalize"), (raw_norm, 1.0, inv_scale, torch.float32)),
        (getattr(namespace, prefix + "finalize"), (raw_norm, None, None, torch.float64)),
        (getattr(namespace, prefix + "scale_"), (tensors, coef, 0.1)),
        (getattr(namespace, prefix + "scale_"), (tensors, tiny_coef, None)),
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
    "coef-below-float32": (1e-40, None, None),  # the product is formed in float64
}


@pytest.mark.parametrize(("device", "backend", "launch"), clip_op_params())
@pytest.mark.parametrize("case", list(CLIP_CASES))
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0, 10.0], ids=lambda p: f"p{p}")
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
    total_norm, found_inf, clip_coef, per_tensor_norms = ops.clip_(
        tensors, norm_type, max_norm, inv_scale_tensor, clip_value, out_dtype, True, launch
    )
    raw_norm, expected_inf, expected_per_tensor = ops.reduce(expected, norm_type, True)
    expected_norm, expected_coef = ops.finalize(raw_norm, max_norm, inv_scale_tensor, out_dtype)
    ops.scale_(expected, expected_coef, clip_value)
    for name, got, want in [
        ("total_norm", total_norm, expected_norm),
        ("found_inf", found_inf, expected_inf),
        ("clip_coef", clip_coef, expected_coef),
        ("per_tensor_norms", per_tensor_norms, expected_per_tensor),
    ]:
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(bits(got), bits(want)), f"{name}: {got} != {want}"
    for index, (tensor, want) in enumerate(zip(tensors, expected, strict=True)):
        assert torch.equal(bits(tensor), bits(want)), f"tensor {index} ({tensor.dtype})"
    reference_norm = reference_reduce(originals, norm_type)[0]
    if inv_scale is not None:
        reference_norm = reference_norm * inv_scale
    assert_close(total_norm, reference_norm, rtol=RAW_NORM_RTOL, what="total_norm against float64")


@pytest.mark.parametrize(("device", "backend", "launch"), clip_op_params())
def test_clip_op_flags_nonfinite_and_propagates_it(device, backend, launch):
    ops = dispatch.select(torch.device(device), backend)
    tensors = random_gradients([65537 * 3, 100], [torch.bfloat16, torch.float32], device)
    tensors[0][65537 * 2 + 11] = math.inf
    total_norm, found_inf, clip_coef, per_tensor_norms = ops.clip_(
        tensors, 2.0, 1.0, None, None, torch.float32, False, launch
    )
    assert found_inf.item() == 1.0 and total_norm.item() == math.inf and clip_coef.item() == 0.0
    assert per_tensor_norms.shape == (0,)
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


# The extension's ops, called eagerly through fusedclip._C's unboxed bindings (fusedclip/ops.py)
# and through torch.ops: one dispatcher, so the same results, errors and side effects.
EXTENSION_OPS = [p for p in backend_params(include_reference=False) if p.values[1] != "triton"]


def _op_calls(device):
    tensors = random_gradients([5, 0, 129, 70000], [torch.float32, torch.bfloat16], device)
    coef = torch.tensor(0.5, dtype=torch.float64, device=device)
    inv_scale = torch.tensor(0.25, device=device)
    return tensors, [
        ("reduce", (2.0, True)),
        ("reduce", (10.0, False)),
        ("scale_", (coef, 0.1)),
        ("clip_", (2.0, 1.0, inv_scale, 0.1, torch.float32, True, "auto")),
        ("clip_", (math.inf, None, None, None, torch.float64, False, "auto")),
    ]


@pytest.mark.parametrize(("device", "backend"), EXTENSION_OPS)
def test_unboxed_calls_match_torch_ops(device, backend):
    from fusedclip import ops

    assert ops._CALL_CLIP_ is not None, "the extension has no unboxed calls"
    tensors, calls = _op_calls(device)
    for name, args in calls:
        unboxed = [t.clone() for t in tensors]
        boxed = [t.clone() for t in tensors]
        direct = getattr(ops, f"_CALL_{name.upper()}")(unboxed, *args)
        assert direct is not NotImplemented, name
        through_torch = getattr(torch.ops.fusedclip, name).default(boxed, *args)
        if name == "scale_":
            assert direct is None and through_torch is None
        else:
            for x, y in zip(direct, through_torch, strict=True):
                assert torch.equal(bits(x), bits(y)), name
        for x, y in zip(unboxed, boxed, strict=True):
            assert torch.equal(bits(x), bits(y)), name
    bad = [torch.zeros(3, dtype=torch.int32, device=device)]
    messages = []
    for call in (ops._CALL_REDUCE, torch.ops.fusedclip.reduce.default):
        with pytest.raises(RuntimeError) as error:
            call(bad, 2.0, False)
        messages.append(str(error.value).splitlines()[0])
    assert messages[0] == messages[1]


@pytest.mark.parametrize(("device", "backend"), EXTENSION_OPS)
def test_unboxed_calls_leave_subclasses_and_torch_function_modes_to_torch_ops(device, backend):
    from torch.overrides import TorchFunctionMode

    from fusedclip import ops

    seen = []

    class Recorder(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    tensors = [torch.randn(7, device=device)]
    assert ops._CALL_REDUCE(tensors, 2.0, False) is not NotImplemented
    with Recorder():
        assert ops._CALL_REDUCE(tensors, 2.0, False) is NotImplemented
        ops.reduce(tensors, 2.0, False)
    assert torch.ops.fusedclip.reduce.default in seen
    subclass = [torch.randn(7, device=device).as_subclass(torch.nn.Buffer)]
    assert ops._CALL_REDUCE(subclass, 2.0, False) is NotImplemented
    norm, _, _ = ops.reduce(subclass, 2.0, False)
    torch.testing.assert_close(norm, torch.linalg.vector_norm(subclass[0].double()))


@pytest.mark.parametrize(("device", "backend"), EXTENSION_OPS)
def test_writing_ops_bump_version_counters_as_in_place_ops_do(device, backend):
    """So autograd catches a gradient that was saved for backward and then clipped, as it does
    after torch's clip_grad_norm_ (which scales with _foreach_mul_)."""
    from fusedclip import ops

    tensors = [torch.randn(5, device=device), torch.randn(3, device=device)]
    coef = torch.tensor(0.5, dtype=torch.float64, device=device)
    versions = [t._version for t in tensors]
    ops.scale_(tensors, coef, None)
    torch.ops.fusedclip.scale_.default(tensors, coef, None)
    ops.clip_(tensors, 2.0, 1.0, None, None, torch.float32, False)
    assert [t._version for t in tensors] == [v + 3 for v in versions]
    ops.reduce(tensors, 2.0, False)  # reads only
    assert [t._version for t in tensors] == [v + 3 for v in versions]

    weight = torch.randn(4, device=device, requires_grad=True)
    saved = torch.randn(4, device=device)
    loss = (weight * saved).sum()  # saves `saved` for backward
    fusedclip.fused_clip_([saved], max_norm=1e-3)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize(("device", "backend"), EXTENSION_OPS)
def test_each_writing_call_bumps_each_version_once_and_a_refused_op_none(device, backend):
    """Through the C++ planner's one call or the general path: once per call; an op that
    refuses its list bumps nothing (the bump follows the write, csrc/autograd.cpp)."""
    params = [torch.nn.Parameter(torch.zeros(n, device=device)) for n in (5, 3)]
    for p in params:
        p.grad = torch.randn(p.shape, device=device)
    grads = [p.grad for p in params]
    versions = [g._version for g in grads]
    fusedclip.clip_grad_norm_(params, 1e-3, backend=backend)  # the C++ planner's one call
    fusedclip.clip_grad_value_(params, 1e-4, backend=backend)
    fusedclip.fused_clip_(grads, max_norm=1e-5, per_tensor=True, backend=backend)  # general path
    assert [g._version for g in grads] == [v + 3 for v in versions]

    buffer = torch.randn(6, device=device)
    overlapping = [buffer[:4], buffer[2:]]
    before = [t._version for t in overlapping]
    coef = torch.tensor(0.5, dtype=torch.float64, device=device)
    with pytest.raises(RuntimeError, match="share memory"):
        torch.ops.fusedclip.scale_.default(overlapping, coef, None)
    assert [t._version for t in overlapping] == before


@pytest.mark.parametrize(("device", "backend"), EXTENSION_OPS)
def test_ops_refuse_to_be_differentiated_before_writing(device, backend):
    from fusedclip import ops

    leaf = torch.randn(5, device=device, requires_grad=True)
    plain = torch.randn(5, device=device)
    original = plain.clone()
    coef = torch.tensor(0.5, dtype=torch.float64, device=device)
    with pytest.raises(RuntimeError, match=r"fusedclip::reduce has no derivative.*tensors\[0\]"):
        ops.reduce([leaf], 2.0, False)
    with pytest.raises(RuntimeError, match=r"fusedclip::clip_ has no derivative.*tensors\[1\]"):
        ops.clip_([plain, leaf], 2.0, 1e-3, None, None, torch.float32, False)
    with pytest.raises(RuntimeError, match="fusedclip::scale_ has no derivative.*clip_coef"):
        ops.scale_([plain], coef.clone().requires_grad_(), None)
    assert torch.equal(plain, original)
    raw_norm = torch.tensor(4.0, dtype=torch.float64, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="fusedclip::finalize has no derivative.*raw_norm"):
        ops.finalize(raw_norm, 1.0, None, torch.float32)
    with torch.no_grad():  # where the API calls them
        norm, _, _ = ops.reduce([leaf], 2.0, False)
        total_norm, _ = ops.finalize(raw_norm, 1.0, None, torch.float32)
    torch.testing.assert_close(norm, torch.linalg.vector_norm(leaf.detach().double()))
    assert float(total_norm) == 4.0
