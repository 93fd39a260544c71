"""The Triton backend's own behaviour: the op contract on inputs that stress it (large p, extreme
coefficients), determinism, every output written, the thread-safe table cache, and on a GPU the
device guard and CUDA-graph ownership of tables.

Without a GPU the kernels run through Triton's interpreter (conftest sets TRITON_INTERPRET=1), so
sizes stay small. The interpreter of triton 3.8 truncates float32 -> bfloat16 instead of
rounding and mangles subnormals: no bit-exact expectation here involves either.
"""

from __future__ import annotations

import gc
import math
import os
import subprocess
import sys
import threading
import weakref

import pytest
import torch
from conftest import DEVICES, HAS_CUDA, assert_close, assert_grads_close
from exact import bits
from torch.utils._python_dispatch import TorchDispatchMode

from fusedclip import dispatch, norms, reference
from fusedclip.norms import NORM_EPS

TRITON_DEVICES = [
    pytest.param(device, id=device, marks=[pytest.mark.cuda] if device == "cuda" else [])
    for device in DEVICES
    if dispatch.unavailable_reason("triton", device) is None
]
if not TRITON_DEVICES:
    pytest.skip("the Triton backend cannot run here", allow_module_level=True)

from fusedclip.triton import ops as triton_ops  # noqa: E402

reduce = torch.ops.fusedclip.triton_reduce.default
finalize = torch.ops.fusedclip.triton_finalize.default
scale_ = torch.ops.fusedclip.triton_scale_.default

CHUNK = triton_ops.CHUNK_SIZE
# The norms are float64 against a float64 oracle: a few ulp times log2 of the element count.
NORM_RTOL = 1e-12

needs_two_gpus = pytest.mark.skipif(
    not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"
)
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def assert_reduce_matches_reference(tensors, norm_type, what=""):
    raw_norm, found_inf, per_tensor_norms = reduce(tensors, norm_type, True)
    expected_norm, expected_inf, expected_per_tensor = reference.reduce(
        [t.cpu() for t in tensors], norm_type, True
    )
    assert raw_norm.dtype == torch.float64 and raw_norm.shape == ()
    assert found_inf.dtype == torch.float32 and found_inf.shape == ()
    assert per_tensor_norms.dtype == torch.float64 and per_tensor_norms.shape == (len(tensors),)
    assert_close(raw_norm, expected_norm, rtol=NORM_RTOL, what=f"{what} raw_norm")
    assert_close(per_tensor_norms, expected_per_tensor, rtol=NORM_RTOL, what=f"{what} per tensor")
    assert found_inf.item() == expected_inf.item(), what
    return raw_norm, found_inf, per_tensor_norms


# Issue #14 item 4: an unscaled float64 sum of |g|^p overflows (inf, found_inf 0: every gradient
# zeroed) or underflows (0) on these, though each norm is an ordinary number.
LARGE_P_CASES = [
    pytest.param(10.0, [3e38], torch.float32, id="p10-3e38"),
    pytest.param(100.0, [1e4, 1e4], torch.float32, id="p100-1e4x2"),
    pytest.param(1000.0, [3.0], torch.float32, id="p1000-3"),
    pytest.param(100.0, [1e-6], torch.float32, id="p100-1e-6"),
    pytest.param(2.0, [1e200], torch.float64, id="p2-f64-1e200"),
    pytest.param(2.0, [1e-200, -3e-200], torch.float64, id="p2-f64-1e-200"),
    pytest.param(7.0, [3e38, -3e38, 1.0, 0.0], torch.float32, id="p7-near-max"),
    pytest.param(1e4, [2.0, 1.999, 0.5], torch.float32, id="p1e4"),
    pytest.param(3.0, [1e300, 2e300], torch.float64, id="p3-f64-1e300"),
]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(("norm_type", "values", "dtype"), LARGE_P_CASES)
def test_large_norm_types_give_finite_accurate_norms(device, norm_type, values, dtype):
    tensors = [torch.tensor(values, dtype=dtype, device=device)]
    raw_norm, found_inf, _ = assert_reduce_matches_reference(tensors, norm_type)
    assert torch.isfinite(raw_norm) and raw_norm > 0
    assert found_inf.item() == 0.0


def mixed_magnitude_tensors(device, sizes, dtypes, seed=0):
    """Values spread over many decades, so the running max changes inside and across chunks."""
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for index, size in enumerate(sizes):
        dtype = dtypes[index % len(dtypes)]
        limit = {torch.float64: 250, torch.float32: 30}.get(dtype, 3)
        exponents = torch.randint(-limit, limit, (size,), generator=generator)
        magnitudes = torch.pow(10.0, exponents.to(torch.float64))
        values = (torch.randn(size, generator=generator, dtype=torch.float64) * magnitudes).to(
            dtype
        )
        assert torch.isfinite(values).all()
        tensors.append(values.to(device))
    return tensors


# More than one chunk per tensor, a zero-size neighbour, a one-element tail chunk.
MULTI_CHUNK_SIZES = [CHUNK + 1, 0, 3, 2 * CHUNK + 5]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("norm_type", [3.0, 10.0, 100.0, 1000.0], ids=lambda p: f"p{p:g}")
@pytest.mark.parametrize(
    "dtypes",
    [[torch.float32], [torch.float64, torch.float16], [torch.bfloat16, torch.float32]],
    ids=lambda d: "-".join(str(t).removeprefix("torch.") for t in d),
)
def test_scaled_and_plain_sums_over_several_chunks(device, norm_type, dtypes):
    tensors = mixed_magnitude_tensors(device, MULTI_CHUNK_SIZES, dtypes)
    assert_reduce_matches_reference(tensors, norm_type, f"p={norm_type}")


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("norm_type", [2.0, 100.0], ids=lambda p: f"p{p:g}")
def test_blocks_merge_inside_a_chunk(device, norm_type, monkeypatch):
    """Several loop iterations per chunk: the scaled path merges each block's (max, sum) into the
    program's running pair, with the maximum both early and late in the chunk."""
    monkeypatch.setattr(triton_ops, "BLOCK_SIZE", CHUNK // 4)
    tensors = mixed_magnitude_tensors(device, [CHUNK, CHUNK - 7], [torch.float64])
    tensors[0][CHUNK // 4 * 3 + 5] = 1e280  # a new maximum in the last block
    tensors[1][2] = -1e281  # the maximum in the first block
    assert_reduce_matches_reference(tensors, norm_type)


NONFINITE_CASES = [
    pytest.param([[1.0, math.inf, 2.0]], id="inf"),
    pytest.param([[math.nan, math.inf]], id="nan-and-inf"),
    pytest.param([[math.inf], [1.0, math.nan]], id="inf-then-nan-tensor"),
    pytest.param([[1e30, -math.inf], [0.0]], id="inf-large"),
]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("norm_type", [2.0, 10.0, 1.0, math.inf], ids=lambda p: f"p{p:g}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("values", NONFINITE_CASES)
def test_nan_beats_inf_and_sets_found_inf(device, norm_type, dtype, values):
    tensors = [torch.tensor(v, dtype=dtype, device=device) for v in values]
    raw_norm, found_inf, _ = assert_reduce_matches_reference(tensors, norm_type)
    assert found_inf.item() == 1.0
    assert not torch.isfinite(raw_norm)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_nonfinite_element_in_a_later_chunk_than_the_maximum(device):
    tensor = torch.ones(2 * CHUNK + 3, dtype=torch.float64, device=device)
    tensor[5] = 1e300
    tensor[CHUNK + 9] = math.nan
    assert_reduce_matches_reference([tensor], 3.0)
    tensor[CHUNK + 9] = -math.inf
    assert_reduce_matches_reference([tensor], 3.0)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("norm_type", [2.0, 3.0, 100.0, math.inf], ids=lambda p: f"p{p:g}")
def test_same_bits_every_run_and_with_or_without_per_tensor(device, norm_type):
    tensors = mixed_magnitude_tensors(device, MULTI_CHUNK_SIZES, [torch.float32, torch.float64])
    first = reduce(tensors, norm_type, True)
    second = reduce(tensors, norm_type, True)
    without = reduce(tensors, norm_type, False)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(bits(a), bits(b))
    assert torch.equal(bits(first[0]), bits(without[0]))
    assert without[2].shape == (0,) and without[2].dtype == torch.float64


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("norm_type", [2.0, 100.0], ids=lambda p: f"p{p:g}")
def test_per_tensor_launches_write_the_table_launches_bits(device, norm_type, monkeypatch):
    """The per-tensor kernels (the path of tensors without addresses, while torch.compile traces)
    run here on real tensors: same partials, same bits as the table-driven launches."""
    tensors = mixed_magnitude_tensors(device, MULTI_CHUNK_SIZES, [torch.float32, torch.float64])
    table_outputs = reduce(tensors, norm_type, True)
    scaled = [t.clone() for t in tensors]
    coef = torch.tensor(0.3, dtype=torch.float64, device=device)
    scale_(scaled, coef, 1e10)
    monkeypatch.setattr(triton_ops, "_has_addresses", lambda tensors: False)
    # The ops launch nothing on traced tensors under the interpreter (it cannot trace); these are
    # real tensors, so let them launch.
    launch = triton_ops._launch
    monkeypatch.setattr(
        triton_ops,
        "_launch",
        lambda kernel, grid, args, traced, **meta: launch(kernel, grid, args, False, **meta),
    )
    tensor_outputs = reduce(tensors, norm_type, True)
    for table_output, tensor_output in zip(table_outputs, tensor_outputs, strict=True):
        assert torch.equal(bits(table_output), bits(tensor_output))
    rescaled = [t.clone() for t in tensors]
    scale_(rescaled, coef, 1e10)
    for a, b in zip(scaled, rescaled, strict=True):
        assert torch.equal(bits(a), bits(b))


class PoisonedAllocations(TorchDispatchMode):
    """Every tensor the Triton ops allocate starts as NaN (integers as 1, a false 'non-finite'),
    so an output element no kernel wrote shows up. The ops' bodies run inside the mode (torch
    hands a custom op to a mode whole, so its allocations would not be seen otherwise)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fusedclip":
            body = getattr(triton_ops, func._opname)._init_fn
            with self:
                return body(*args, **kwargs)
        result = func(*args, **kwargs)
        if func is torch.ops.aten.empty.memory_format:
            result.fill_(math.nan if result.is_floating_point() else 1)
        return result


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("norm_type", [2.0, 100.0, math.inf], ids=lambda p: f"p{p:g}")
def test_every_output_element_is_written(device, norm_type):
    tensors = mixed_magnitude_tensors(
        device, [0, 5, CHUNK + 2, 0], [torch.float64, torch.float32, torch.float16]
    )
    with PoisonedAllocations():
        raw_norm, found_inf, per_tensor_norms = reduce(tensors, norm_type, True)
        total_norm, clip_coef = finalize(raw_norm, 1.0, None, torch.float32)
    expected = reference.reduce([t.cpu() for t in tensors], norm_type, True)
    assert_close(raw_norm, expected[0], rtol=NORM_RTOL, what="raw_norm")
    assert found_inf.item() == 0.0
    assert_close(per_tensor_norms, expected[2], rtol=NORM_RTOL, what="per tensor")
    expected_total, expected_coef = reference.finalize(expected[0], 1.0, None, torch.float32)
    assert_close(total_norm, expected_total, rtol=1e-7, what="total_norm")
    assert_close(clip_coef, expected_coef, rtol=NORM_RTOL, what="clip_coef")


RAW_NORMS = [0.0, 1e-300, 2.5, 3e38, 1e300, math.inf, math.nan]
INV_SCALES = [
    None,
    (0.5, torch.float32),
    (2.0**-16, torch.float32),
    (1e300, torch.float64),
    (1e-300, torch.float64),
    (-3.0, torch.float64),
]


def finalize_norm(raw_norm, max_norm, inv_scale):
    """norm.h's finalize_norm in Python floats: IEEE doubles, each operation rounded once."""
    total_norm = raw_norm if inv_scale is None else raw_norm * abs(inv_scale)
    clip_coef = 1.0
    if max_norm is not None:
        ratio = max_norm / (total_norm + NORM_EPS)
        clip_coef = 1.0 if ratio > 1.0 else ratio  # keeps NaN
    if inv_scale is not None:
        clip_coef *= inv_scale
    return total_norm, clip_coef


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64], ids=str)
def test_finalize_is_norm_h_formula_bit_for_bit(device, out_dtype):
    """float64 throughout, one rounding per operation, then total_norm rounded once to out_dtype.
    (reference.finalize may differ in the coefficient's last bit: torch computes
    float / tensor as reciprocal and product.)"""
    for raw in RAW_NORMS:
        raw_norm = torch.tensor(raw, dtype=torch.float64, device=device)
        for max_norm in (None, 0.0, 1.0, 1e-20, 1e30):
            for inv in INV_SCALES:
                inv_scale = (
                    None if inv is None else torch.tensor(inv[0], dtype=inv[1], device=device)
                )
                total_norm, clip_coef = finalize(raw_norm, max_norm, inv_scale, out_dtype)
                expected_total, expected_coef = finalize_norm(
                    raw, max_norm, None if inv_scale is None else inv_scale.item()
                )
                expected_total = torch.tensor(expected_total, dtype=torch.float64).to(out_dtype)
                expected_coef = torch.tensor(expected_coef, dtype=torch.float64)
                what = f"raw_norm={raw} max_norm={max_norm} inv_scale={inv}"
                assert total_norm.dtype == out_dtype and total_norm.shape == (), what
                assert clip_coef.dtype == torch.float64 and clip_coef.shape == (), what
                assert torch.equal(bits(total_norm.cpu()), bits(expected_total)), what
                assert torch.equal(bits(clip_coef.cpu()), bits(expected_coef)), what
                reference_total, reference_coef = reference.finalize(
                    raw_norm.cpu(),
                    max_norm,
                    None if inv_scale is None else inv_scale.cpu(),
                    out_dtype,
                )
                assert torch.equal(bits(total_norm.cpu()), bits(reference_total)), what
                assert_close(clip_coef, reference_coef, rtol=2**-51, what=what)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_finalize_rejects_a_power_sum_of_the_old_contract(device):
    with pytest.raises(RuntimeError, match="raw_norm must be one float64"):
        finalize(torch.tensor(4.0, device=device), 1.0, None, torch.float32)


# Issue #14 item 5, and the bounds of float32's normal range on either side.
COEFFICIENTS = [
    0.1,
    -2.5,
    7e-51,  # below float32's range: 1e30 * 7e-51 = 7e-21, not 0
    1e300,  # above it: 0 * 1e300 = 0, not NaN (0 * inf)
    1e-39,  # a float32 subnormal: in float64, not rounded to a subnormal
    torch.finfo(torch.float32).tiny,  # the smallest normal float32: float32 product
    torch.finfo(torch.float32).max,  # float32 product
    4e38,
    0.0,
    math.inf,
    math.nan,
]


def expected_scaled(gradient, coef, coef_dtype):
    """What scale_ writes: the product in float32 for a 16/32-bit gradient (float64 for float64
    gradients and needs_float64_product), rounded once."""
    applied = torch.tensor(coef, dtype=coef_dtype).item()
    if gradient.dtype == torch.float64 or norms.needs_float64_product(applied):
        product = gradient.cpu().to(torch.float64) * applied
    else:
        product = gradient.cpu().to(torch.float32) * torch.tensor(applied, dtype=torch.float32)
    return product.to(gradient.dtype)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("coef_dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("coef", COEFFICIENTS, ids=lambda c: f"{c:g}")
def test_scale_forms_the_product_at_the_contract_precision(device, coef, dtype, coef_dtype):
    finite_max = torch.finfo(dtype).max
    values = [1e30, 0.0, -0.0, 1.5, -3.0, 0.1234567, finite_max, math.inf, math.nan]
    gradient = torch.tensor(values, dtype=torch.float64).clamp(-finite_max, finite_max)
    gradient = torch.cat([gradient, torch.randn(41, dtype=torch.float64)]).to(dtype).to(device)
    expected = expected_scaled(gradient, coef, coef_dtype)
    if device == "cpu" and dtype != torch.float64:
        # The interpreter mangles subnormal results (an upstream bug); a GPU checks them too.
        normal_or_zero = (expected == 0) | ~(expected.abs() < torch.finfo(dtype).tiny)
        gradient, expected = gradient[normal_or_zero].clone(), expected[normal_or_zero]
    scale_([gradient], torch.tensor(coef, dtype=coef_dtype, device=device), None)
    assert torch.equal(bits(gradient.cpu()), bits(expected)), (gradient, expected)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("coef", [7e-51, 1e300, 0.37, 1e-39], ids=lambda c: f"{c:g}")
def test_scale_agrees_with_the_reference_for_extreme_coefficients(device, coef):
    """Item 5: a float64 gradient in the call does not change how float32 ones are scaled."""
    gradients = [
        torch.tensor([1e30, 0.0, 3.0, -2e20], dtype=torch.float32, device=device),
        torch.tensor([1e200, -1.0, 0.0], dtype=torch.float64, device=device),
    ]
    expected = [g.cpu().clone() for g in gradients]
    coef_tensor = torch.tensor(coef, dtype=torch.float64, device=device)
    reference.scale_(expected, coef_tensor.cpu(), None)
    scale_(gradients, coef_tensor, None)
    for gradient, oracle in zip(gradients, expected, strict=True):
        if device == "cpu" and gradient.dtype == torch.float32:
            tiny = torch.finfo(torch.float32).tiny
            keep = (oracle == 0) | ~(oracle.abs() < tiny)  # see the subnormal note above
            gradient, oracle = gradient.cpu()[keep], oracle[keep]
        assert_grads_close(gradient.cpu(), oracle.to(torch.float64), what=f"coef={coef}")
    assert gradients[0][1].item() == 0.0 and not torch.isnan(gradients[0]).any()


def signaling_nans(dtype, count, device):
    """NaNs whose quiet bit is clear: any arithmetic on them (x * 1) sets it, so their bits show
    whether a kernel wrote them back."""
    pattern = {
        torch.float32: (0x7F800001, torch.int32),
        torch.float64: (0x7FF0000000000001, torch.int64),
    }
    value, int_dtype = pattern[dtype]
    return torch.full((count,), value, dtype=int_dtype).view(dtype).to(device)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_scale_writes_nothing_when_the_applied_coefficient_is_one(device):
    float32_tensor = signaling_nans(torch.float32, 7, device)
    float64_tensor = signaling_nans(torch.float64, 7, device)
    written = float32_tensor.cpu() * 1.0
    assert not torch.equal(bits(written), bits(float32_tensor.cpu())), "x * 1 keeps sNaN here"
    one_plus = 1.0 + 1e-12  # 1 in float32, not in float64
    for coef, coef_dtype in ((1.0, torch.float64), (1.0, torch.float32), (one_plus, torch.float64)):
        before = bits(float32_tensor.cpu())
        scale_([float32_tensor], torch.tensor(coef, dtype=coef_dtype, device=device), None)
        assert torch.equal(bits(float32_tensor.cpu()), before), coef
    before64 = bits(float64_tensor.cpu())
    scale_([float64_tensor], torch.tensor(1.0, dtype=torch.float64, device=device), None)
    assert torch.equal(bits(float64_tensor.cpu()), before64)
    scale_([float64_tensor], torch.tensor(one_plus, dtype=torch.float64, device=device), None)
    assert not torch.equal(bits(float64_tensor.cpu()), before64), "1 + 1e-12 must be applied"


def test_needs_float64_product_is_norm_h_rule():
    tiny, largest = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
    assert not any(
        norms.needs_float64_product(c)
        for c in (0.0, -0.0, math.inf, -math.inf, math.nan, tiny, -tiny, largest, 1.0, -0.5)
    )
    assert all(
        norms.needs_float64_product(c)
        for c in (tiny / 2, -1e-300, math.nextafter(largest, math.inf), 1e300, -4e38)
    )


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_table_cache_is_safe_under_threads(device, monkeypatch):
    """Issue #14 item 7: threads hammering _tables_for (no launches: the interpreter is not
    thread-safe; on a GPU the same calls run the kernels) with more tensor lists than the cache
    holds. No error, the bound holds, every table describes its own list, and results are right
    afterwards."""
    lists = [
        [
            torch.randn(3 + i, device=device),
            torch.randn(CHUNK + i, dtype=torch.float64, device=device),
            torch.zeros(0, device=device),
        ]
        for i in range(3 * triton_ops.TABLE_CACHE_SIZE)
    ]
    device = torch.device(device)
    monkeypatch.setattr(triton_ops, "_table_cache", type(triton_ops._table_cache)())
    previous_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    errors: list[BaseException] = []
    wrong: list[int] = []

    def hammer(worker):
        try:
            for step in range(400):
                tensors = lists[(worker * 7 + step) % len(lists)]
                tables = triton_ops._tables_for(tensors, device)
                if tables.addresses.tolist() != [t.data_ptr() for t in tensors]:
                    wrong.append(step)
                if len(triton_ops._table_cache) > triton_ops.TABLE_CACHE_SIZE:
                    wrong.append(-1)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=hammer, args=(worker,)) for worker in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(previous_interval)
    assert not errors, repr(errors[:3])
    assert not wrong
    assert len(triton_ops._table_cache) <= triton_ops.TABLE_CACHE_SIZE
    for tensors in lists[:2]:
        assert_reduce_matches_reference(tensors, 2.0)


@needs_gpu
@pytest.mark.cuda
def test_ops_from_several_threads_on_a_gpu():
    """Item 7 with the kernels launched (the interpreter is not thread-safe, so this runs on a
    GPU only): 8 threads, each clipping its own lists, more lists than the cache holds."""
    lists = [
        [torch.randn(CHUNK + 5 * i, device="cuda"), torch.randn(3 + i, device="cuda").double()]
        for i in range(2 * triton_ops.TABLE_CACHE_SIZE)
    ]
    expected = [reference_clip(tensors) for tensors in lists]
    errors: list[BaseException] = []
    norms: dict[int, torch.Tensor] = {}

    def worker(first):
        try:
            for index in range(first, len(lists), 8):
                norms[index] = run_clip(lists[index])[0]
            torch.cuda.current_stream().synchronize()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(first,)) for first in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    torch.cuda.synchronize()
    assert not errors, repr(errors[:3])
    for index, (expected_norm, expected_tensors) in enumerate(expected):
        assert_close(norms[index], expected_norm, rtol=1e-6, what=f"list {index} total_norm")
        for tensor, oracle in zip(lists[index], expected_tensors, strict=True):
            assert_grads_close(tensor.cpu(), oracle.to(torch.float64), what=f"list {index}")


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph in the host-side bookkeeping test: keeps what it is
    asked to retain."""

    def __init__(self):
        self.retained = []

    def retain_object(self, obj, *, synchronize_before_release=False):
        self.retained.append((obj, synchronize_before_release))


def test_captured_tables_belong_to_their_graph_not_to_the_eager_cache(monkeypatch):
    """The host side of item 9 (the GPU tests below check it with real captures): tables built
    during a capture are shared by that capture's ops, are kept by that graph, are never put in
    the eager cache, and are not shared with another capture."""
    device, stream = torch.device("cpu"), 1234
    monkeypatch.setattr(triton_ops, "_table_cache", type(triton_ops._table_cache)())
    monkeypatch.setattr(triton_ops, "_captures", {})
    monkeypatch.setattr(triton_ops, "_unowned_captured_tables", [])
    tensors = [torch.randn(5), torch.randn(7, dtype=torch.float64)]
    key = (device, stream, tuple((t.data_ptr(), t.numel(), t.dtype) for t in tensors))
    eager = triton_ops._tables_for(tensors, device)

    first_graph, second_graph = FakeGraph(), FakeGraph()
    with triton_ops._cache_lock:
        triton_ops._captures[(device, stream)] = triton_ops._Capture(weakref.ref(first_graph))
        first = triton_ops._captured_tables_for(key, tensors, device, stream)
        again = triton_ops._captured_tables_for(key, tensors, device, stream)
        triton_ops._captures[(device, stream)] = triton_ops._Capture(weakref.ref(second_graph))
        second = triton_ops._captured_tables_for(key, tensors, device, stream)
    assert first is again, "the ops of one capture share its table"
    assert first is not eager and second is not first and second is not eager
    assert [obj for obj, _ in first_graph.retained] == [first]
    assert [obj for obj, _ in second_graph.retained] == [second]
    assert all(synchronize for _, synchronize in first_graph.retained + second_graph.retained)
    assert list(triton_ops._table_cache.values()) == [eager]
    assert triton_ops._unowned_captured_tables == []
    assert first.addresses.tolist() == [t.data_ptr() for t in tensors]

    # A capture whose graph is unknown keeps its tables for the life of the process.
    with triton_ops._cache_lock:
        triton_ops._captures.clear()
        unowned = triton_ops._captured_tables_for(key, tensors, device, stream)
    assert triton_ops._unowned_captured_tables == [unowned]
    assert list(triton_ops._table_cache.values()) == [eager]


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_opcheck(device):
    """Schemas, fake impls and mutation declarations of the three ops."""
    tensors = [torch.randn(5, device=device), torch.randn(0, device=device)]
    tensors.append(torch.randn(129, dtype=torch.float64, device=device))
    raw_norm = torch.tensor(4.0, dtype=torch.float64, device=device)
    cases = [
        (reduce, (tensors, 2.0, True)),
        (reduce, (tensors[:2], 100.0, False)),
        (finalize, (raw_norm, 1.0, torch.tensor(0.25, device=device), torch.float32)),
        (finalize, (raw_norm, None, None, torch.float64)),
        (scale_, (tensors, torch.tensor(0.5, dtype=torch.float64, device=device), 0.1)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def run_clip(tensors, max_norm=1.0, inv_scale=None, norm_type=2.0):
    raw_norm, found_inf, _ = reduce(tensors, norm_type, False)
    total_norm, clip_coef = finalize(raw_norm, max_norm, inv_scale, torch.float32)
    scale_(tensors, clip_coef, None)
    return total_norm, found_inf


def reference_clip(tensors, max_norm=1.0, inv_scale=None, norm_type=2.0):
    copies = [t.detach().cpu().clone() for t in tensors]
    raw_norm, _, _ = reference.reduce(copies, norm_type, False)
    inv = None if inv_scale is None else inv_scale.cpu()
    total_norm, clip_coef = reference.finalize(raw_norm, max_norm, inv, torch.float32)
    reference.scale_(copies, clip_coef, None)
    return total_norm, copies


@needs_two_gpus
@pytest.mark.cuda
def test_ops_run_on_the_tensors_device_whatever_the_current_device():
    """Issue #14 item 8: gradients on cuda:1 while cuda:0 is current."""
    torch.cuda.set_device(0)
    tensors = [
        torch.randn(CHUNK * 3 + 1, device="cuda:1"),
        torch.randn(17, dtype=torch.float64, device="cuda:1"),
    ]
    inv_scale = torch.tensor(0.5, device="cuda:1")
    expected_norm, expected = reference_clip(tensors, inv_scale=inv_scale)
    # A busy non-default stream on cuda:1 is current there: the ops must order on it.
    stream = torch.cuda.Stream(device="cuda:1")
    with torch.cuda.stream(stream):
        torch.cuda.set_device(0)
        total_norm, _ = run_clip(tensors, inv_scale=inv_scale)
        assert torch.cuda.current_device() == 0
        torch.cuda.synchronize(1)
    assert total_norm.device == torch.device("cuda:1")
    assert_close(total_norm, expected_norm, rtol=1e-6, what="total_norm")
    for tensor, oracle in zip(tensors, expected, strict=True):
        assert_grads_close(tensor.cpu(), oracle.to(torch.float64), what="scaled on cuda:1")


def capture(tensors, inv_scale):
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = run_clip(tensors, inv_scale=inv_scale)
    return graph, outputs


def warm_up(sizes_and_dtypes):
    """Compiles the kernels on other tensors (other addresses), so no table of the captured lists
    exists before their capture."""
    run_clip([torch.randn(n, dtype=d, device="cuda") for n, d in sizes_and_dtypes])
    torch.cuda.synchronize()


SHAPES = [(CHUNK * 2 + 3, torch.float32), (100, torch.bfloat16), (5, torch.float64)]


@needs_gpu
@pytest.mark.cuda
def test_a_graph_keeps_its_tables_when_the_eager_cache_evicts_them():
    """Item 9: tables read by a captured graph survive 2x the cache's worth of other lists and
    the reuse of the freed memory."""
    warm_up(SHAPES)
    tensors = [torch.randn(n, dtype=d, device="cuda") for n, d in SHAPES]
    originals = [t.clone() for t in tensors]
    inv_scale = torch.tensor(0.5, device="cuda")
    run_clip(tensors, inv_scale=inv_scale)  # an eager table for this very list
    eager_keys = list(triton_ops._table_cache)
    graph, (total_norm, _) = capture(tensors, inv_scale)
    assert list(triton_ops._table_cache) == eager_keys, "a captured table entered the eager cache"
    for _ in range(2 * triton_ops.TABLE_CACHE_SIZE):
        run_clip([torch.randn(n, dtype=d, device="cuda") for n, d in SHAPES])
    torch.cuda.empty_cache()
    junk = torch.full((1 << 22,), -1, dtype=torch.int64, device="cuda")  # reuses freed blocks
    for tensor, original in zip(tensors, originals, strict=True):
        tensor.copy_(original)
    graph.replay()
    torch.cuda.synchronize()
    expected_norm, expected = reference_clip(originals, inv_scale=inv_scale)
    assert_close(total_norm, expected_norm, rtol=1e-6, what="replayed total_norm")
    for tensor, oracle in zip(tensors, expected, strict=True):
        assert_grads_close(tensor.cpu(), oracle.to(torch.float64), what="replayed gradients")
    del junk


@needs_gpu
@pytest.mark.cuda
def test_a_second_capture_replayed_first_reads_its_own_tables():
    """Item 9: a second capture of the same list must not reuse the first capture's table, whose
    data arrives only when the first graph replays."""
    warm_up(SHAPES)
    tensors = [torch.randn(n, dtype=d, device="cuda") for n, d in SHAPES]
    originals = [t.clone() for t in tensors]
    inv_scale = torch.tensor(0.25, device="cuda")
    first_graph, _ = capture(tensors, inv_scale)
    second_graph, (total_norm, _) = capture(tensors, inv_scale)
    second_graph.replay()
    torch.cuda.synchronize()
    expected_norm, expected = reference_clip(originals, inv_scale=inv_scale)
    assert_close(total_norm, expected_norm, rtol=1e-6, what="second graph's total_norm")
    for tensor, oracle in zip(tensors, expected, strict=True):
        assert_grads_close(tensor.cpu(), oracle.to(torch.float64), what="second graph")
    del first_graph


@needs_gpu
@pytest.mark.cuda
def test_a_graph_releases_its_tables_when_destroyed(monkeypatch):
    warm_up(SHAPES)
    built = []
    build = triton_ops._build_tables

    def recording_build(tensors, device):
        tables = build(tensors, device)
        built.append(weakref.ref(tables))
        return tables

    monkeypatch.setattr(triton_ops, "_build_tables", recording_build)
    tensors = [torch.randn(n, dtype=d, device="cuda") for n, d in SHAPES]
    graph, _ = capture(tensors, None)
    graph.replay()
    torch.cuda.synchronize()
    assert len(built) == 1, "reduce and scale_ of one capture share one table"
    assert built[0]() is not None, "the graph keeps its table"
    assert not triton_ops._unowned_captured_tables
    assert not triton_ops._captures, "the capture's record ends with it"
    del graph
    gc.collect()
    assert built[0]() is None, "the destroyed graph released its table"


# Compiled for an H100/H200 (sm_90) with no GPU present: the interpreter runs the kernels' Python,
# not Triton's compiler, so type and lowering errors would otherwise first show on a GPU. One
# variant of each kernel, chosen where this backend's code branches.
COMPILE_CHECK = r"""
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import fusedclip.triton.kernels as K

assert not K.INTERPRETED
F64, I64, I32 = "*fp64", "*i64", "*i32"
READ = dict(CHUNK_SIZE=16384, BLOCK_SIZE=2048)
SEGMENT = {"chunk_scale_ptr": F64, "chunk_power_ptr": F64, "chunk_nonfinite_ptr": I32}
TENSOR_OUT = {"tensor_scale_ptr": F64, "tensor_power_ptr": F64, "tensor_nonfinite_ptr": I32,
              "tensor_norm_ptr": F64, "norm_type_bits": "i64"}
TABLE = {"chunk_table_ptr": I64, "addresses_ptr": I64, "numels_ptr": I64}
variants = [
    (K._partials_table_kernel, {**TABLE, **SEGMENT, "norm_type_bits": "i64"},
     dict(DTYPE=tl.float32, ALIGNED=True, NORM_KIND=0, SCALED=True, **READ)),
    (K._partials_tensor_kernel, {"data_ptr": "*bf16", "numel": "i64", "first_slot": "i32",
                                 **SEGMENT, "norm_type_bits": "i64"},
     dict(NORM_KIND=2, SCALED=True, **READ)),
    (K._partials_table_kernel, {**TABLE, **SEGMENT, "norm_type_bits": "i64"},
     dict(DTYPE=tl.float16, ALIGNED=False, NORM_KIND=2, SCALED=False, **READ)),
    (K._tensor_partials_table_kernel, {**SEGMENT, "chunk_bases_ptr": I64, **TENSOR_OUT},
     dict(NORM_KIND=0, SCALED=True, BLOCK_SIZE=1024)),
    (K._total_norm_kernel, {"tensor_scale_ptr": F64, "tensor_power_ptr": F64,
                            "tensor_nonfinite_ptr": I32, "num_tensors": "i32", "raw_norm_ptr": F64,
                            "found_inf_ptr": "*fp32", "norm_type_bits": "i64"},
     dict(NORM_KIND=2, SCALED=True, BLOCK_SIZE=1024)),
    (K._finalize_kernel, {"raw_norm_ptr": F64, "inv_scale_ptr": "*fp32",
                          "total_norm_ptr": "*fp32", "clip_coef_ptr": F64, "max_norm_bits": "i64"},
     dict(HAS_MAX_NORM=True, HAS_INV_SCALE=True)),
    (K._scale_table_kernel, {**TABLE, "clip_coef_ptr": F64, "clip_value_bits": "i64"},
     dict(DTYPE=tl.float32, FLOAT64_TENSOR=False, ALIGNED=True, HAS_CLIP_VALUE=False, **READ)),
    (K._scale_tensor_kernel, {"data_ptr": "*fp16", "numel": "i64", "clip_coef_ptr": "*fp32",
                              "clip_value_bits": "i64"},
     dict(FLOAT64_TENSOR=False, HAS_CLIP_VALUE=True, **READ)),
]
for kernel, signature, constexprs in variants:
    source = ASTSource(kernel, {**signature, **{k: "constexpr" for k in constexprs}}, constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    assert "ptx" in compiled.asm, kernel
print("compiled", len(variants))
"""


@pytest.mark.skipif(HAS_CUDA, reason="a GPU runs the compiled kernels themselves")
def test_kernels_compile_for_a_gpu_without_one(tmp_path):
    from triton.backends import backends as triton_backends  # triton may be absent: see the top

    if "nvidia" not in triton_backends:
        pytest.skip("this Triton has no NVIDIA backend to compile with")
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from a cache
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environment["PYTHONPATH"] = os.pathsep.join([root, environment.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_CHECK],
        cwd=root,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled 8" in result.stdout
