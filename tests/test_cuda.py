"""What only a GPU can show: no host sync, CUDA-graph capture, kernel registration, the CUDA
metadata cache and the cooperative launch's fallback."""

from __future__ import annotations

import gc
import math
import time

import pytest
import torch
from conftest import assert_close, assert_grads_close
from exact import bits, same_alignment_copy
from tolerances import NORM_RTOL, RAW_NORM_RTOL

import fusedclip
from fusedclip import ops, reference

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_BACKENDS = [
    pytest.param(name, id=name, marks=pytest.mark.cuda) for name in ("cuda", "triton", "reference")
]


@pytest.mark.parametrize("op", ops.OP_NAMES)
def test_every_op_has_a_cuda_kernel_when_built_with_a_toolkit(op):
    if ops.EXTENSION_ERROR is not None:
        pytest.skip(ops.EXTENSION_ERROR)
    if not ops.has_kernel("reduce", "CUDA"):
        pytest.skip("the extension was built without a CUDA toolkit")
    assert ops.has_kernel(op, "CUDA"), f"fusedclip::{op} has no CUDA kernel"
    assert ops.has_kernel(op, "CPU"), f"fusedclip::{op} has no CPU kernel"


def _gradients(device="cuda"):
    sizes = [(1 << 20) + 3, 4095, 0, 65537, 1]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.float64]
    return [torch.randn(n, device=device, dtype=d) * 3 for n, d in zip(sizes, dtypes, strict=True)]


CLIP_OUTPUTS = ("total_norm", "found_inf", "clip_coef", "per_tensor_norms")


def _available(backend):
    reason = fusedclip.dispatch.unavailable_reason(backend, "cuda")
    if reason is not None:
        pytest.skip(reason)


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_no_host_sync(backend):
    _available(backend)
    grads = _gradients()
    fusedclip.fused_clip_(grads, max_norm=1.0, inv_scale=0.5, backend=backend)  # warm-up, caches
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fusedclip.fused_clip_(grads, max_norm=1.0, inv_scale=0.5, clip_value=0.1, backend=backend)
        parameters = [torch.nn.Parameter(torch.empty_like(g)) for g in grads]
        for parameter, grad in zip(parameters, grads, strict=True):
            parameter.grad = grad
        fusedclip.clip_grad_norm_(parameters, 1.0, backend=backend)
        fusedclip.clip_grad_value_(parameters, 1.0, inv_scale=2.0, backend=backend)
        fusedclip.get_total_norm(grads, float("inf"), backend=backend)
        # The general path's values made on the host (a coefficient from a number, the index
        # of repeats and of planned order) reach the device from pinned memory, queued.
        fusedclip.clip_grads_with_norm_(parameters, 1.0, 5.0, backend=backend)
        strided = torch.randn(64, device="cuda")[::2]
        holder = torch.nn.Parameter(torch.empty_like(strided))
        holder.grad = strided
        fusedclip.clip_grad_value_([holder], 1.0, inv_scale=0.5, backend=backend)
        fusedclip.fused_clip_([grads[0], grads[0]], max_norm=1.0, per_tensor=True, backend=backend)
        mixed = [grads[0], strided, grads[1]]
        fusedclip.fused_clip_(mixed, max_norm=1.0, per_tensor=True, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_clip_captured_in_a_cuda_graph_replays_correctly(backend):
    _available(backend)
    grads = _gradients()
    inv_scale = torch.tensor(0.25, device="cuda")
    fusedclip.fused_clip_(grads, max_norm=1.0, inv_scale=inv_scale, backend=backend)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fusedclip.fused_clip_(grads, max_norm=1.0, inv_scale=inv_scale, backend=backend)
    for replay in range(3):
        fresh = _gradients()
        for grad, value in zip(grads, fresh, strict=True):
            grad.copy_(value)
        if replay == 2:
            grads[0][5] = math.inf
        inv_scale.fill_(0.5 ** (replay + 1))
        graph.replay()
        torch.cuda.synchronize()
        expected_norm = reference.reduce([f.cpu() for f in fresh], 2.0, False)[0] * 0.5 ** (
            replay + 1
        )
        if replay == 2:
            assert result.found_inf.item() == 1.0
            continue
        assert result.found_inf.item() == 0.0
        assert_close(result.total_norm, expected_norm, rtol=4e-6, what=f"replay {replay} norm")
        coef = min(1.0, 1.0 / (expected_norm.item() + 1e-6)) * 0.5 ** (replay + 1)
        for grad, value in zip(grads, fresh, strict=True):
            assert_grads_close(grad, value.cpu().double() * coef, what=f"replay {replay}")


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_single_tensor_above_2_to_the_31_elements(backend):
    _available(backend)
    if backend == "reference":
        pytest.skip("the reference needs a float64 copy of 2^31 elements")
    free, _ = torch.cuda.mem_get_info()
    count = (1 << 31) + 1025
    if free < count * 2 * 3:
        pytest.skip("not enough GPU memory")
    big = torch.ones(count, dtype=torch.bfloat16, device="cuda")
    coef = 1.0 / (count + 1 + 1e-6)
    expected_tail = torch.tensor([coef, coef, 2 * coef]).to(torch.bfloat16)
    # The CUDA backend also runs the single launch, which fused_clip_ takes only below L2 size.
    launches = ("auto", "single") if backend == "cuda" else ("auto",)
    for launch in launches:
        big.fill_(1.0)
        big[-1] = 2.0
        if launch == "auto":
            total_norm = fusedclip.fused_clip_(
                [big], max_norm=1.0, norm_type=1.0, backend=backend
            ).total_norm
        else:
            total_norm = ops.clip_([big], 1.0, 1.0, None, None, torch.float32, False, launch)[0]
        assert_close(total_norm, torch.tensor(float(count + 1)), rtol=1e-6, what=f"{launch} norm")
        assert_close(big[-3:].float(), expected_tail, rtol=0, what=f"{launch} tail")
    del big


@needs_gpu
@pytest.mark.cuda
def test_clip_step_captured_in_a_cuda_graph_matches_eager():
    """The one-read AMP path (norm + found_inf, then fused AdamW's own step) in a graph."""

    def setup():
        torch.manual_seed(0)
        parameters = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in (4097, 65, 3000)]
        optimizer = torch.optim.AdamW(parameters, lr=1e-2, fused=True, capturable=True)
        return parameters, optimizer

    grads = [torch.randn(n, device="cuda") * 50 for n in (4097, 65, 3000)]
    eager_parameters, eager_optimizer = setup()
    graph_parameters, graph_optimizer = setup()
    for parameter, grad in zip(eager_parameters + graph_parameters, grads + grads, strict=True):
        parameter.grad = grad.clone()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: optimizer state, metadata caches
        fusedclip.amp.clip_step(graph_optimizer, 1.0)
    torch.cuda.current_stream().wait_stream(side)
    fusedclip.amp.clip_step(eager_optimizer, 1.0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fusedclip.amp.clip_step(graph_optimizer, 1.0)
    for _ in range(3):
        graph.replay()
        expected = fusedclip.amp.clip_step(eager_optimizer, 1.0)
    torch.cuda.synchronize()
    assert_close(result.total_norm, expected.total_norm, rtol=1e-6, what="norm")
    for mine, theirs in zip(graph_parameters, eager_parameters, strict=True):
        assert_close(mine, theirs, rtol=1e-5, atol=1e-7, what="parameters after replays")


@needs_gpu
@pytest.mark.cuda
def test_unscale_clip_captured_in_a_cuda_graph_follows_the_scale_on_replay():
    """amp keeps the scaler's reciprocal between eager calls; a captured graph must compute it
    from the scale on every replay, not read the eager call's tensor."""
    parameter = torch.nn.Parameter(torch.zeros(4, device="cuda"))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    scaler = torch.amp.GradScaler("cuda", init_scale=4.0)
    scaler.scale(torch.zeros((), device="cuda"))  # creates the scale tensor
    parameter.grad = torch.full((4,), 8.0, device="cuda")
    fusedclip.amp.unscale_clip_(scaler, optimizer, 1e9)  # eager: the reciprocal 1/4 is kept
    torch.testing.assert_close(parameter.grad, torch.full((4,), 2.0, device="cuda"))
    scaler._per_optimizer_states.clear()  # as update() does, without changing the scale
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fusedclip.amp.unscale_clip_(scaler, optimizer, 1e9)
    scaler._scale.fill_(2.0)
    parameter.grad.fill_(8.0)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(parameter.grad, torch.full((4,), 4.0, device="cuda"))


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.5, 10.0], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("clip_value", [None, 0.002], ids=lambda v: f"value{v}")
@pytest.mark.parametrize("with_float64", [True, False], ids=["with-float64", "no-float64"])
def test_single_launch_is_bit_identical_to_split_beyond_one_wave(
    norm_type, clip_value, with_float64
):
    """More chunks than resident blocks (each block serves several), thousands of tensors (the
    grid's warps loop over them for per-tensor norms), every dtype, misaligned views; with a
    float64 tensor every p > 1 takes the scaled sum, without one only p = 10 does."""
    _available("cuda")
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    dtypes.append(torch.float64 if with_float64 else torch.float32)
    sizes = [(1 << 26) + 5, 3, 65537 * 7 + 1] + [1 + (i * 37) % 3000 for i in range(3000)]
    grads = [
        torch.randn(n + 1, device="cuda", dtype=dtypes[i % 4])[1:] * 3 for i, n in enumerate(sizes)
    ]
    grads[1][2] = math.nan if clip_value is None else 1.0
    inv_scale = torch.tensor(2.0**-8, device="cuda")
    results = {}
    for launch in ("single", "split"):
        copies = [g.clone() for g in grads]
        outputs = ops.clip_(
            copies, norm_type, 0.5, inv_scale, clip_value, torch.float64, True, launch
        )
        results[launch] = (outputs, copies)
    (single, single_grads), (split, split_grads) = results["single"], results["split"]
    for name, a, b in zip(CLIP_OUTPUTS, single, split, strict=True):
        assert torch.equal(bits(a), bits(b)), name
    for index, (a, b) in enumerate(zip(single_grads, split_grads, strict=True)):
        assert torch.equal(bits(a), bits(b)), f"gradient {index}"
    assert single[1].item() == (1.0 if clip_value is None else 0.0)


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("launch", ["single", "split"])
def test_each_launch_captured_in_a_cuda_graph(launch):
    _available("cuda")
    grads = _gradients()
    inv_scale = torch.tensor(0.25, device="cuda")
    ops.clip_(grads, 2.0, 1.0, inv_scale, None, torch.float32, True, launch)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = ops.clip_(grads, 2.0, 1.0, inv_scale, None, torch.float32, True, launch)
    for replay in range(2):
        fresh = _gradients()
        for grad, value in zip(grads, fresh, strict=True):
            grad.copy_(value)
        expected = [f.clone() for f in fresh]
        expected_outputs = ops.clip_(
            expected, 2.0, 1.0, inv_scale, None, torch.float32, True, "split"
        )
        graph.replay()
        torch.cuda.synchronize()
        for name, a, b in zip(CLIP_OUTPUTS, outputs, expected_outputs, strict=True):
            assert torch.equal(bits(a), bits(b)), f"replay {replay}: {name}"
        for grad, want in zip(grads, expected, strict=True):
            assert torch.equal(bits(grad), bits(want)), f"replay {replay}"


@needs_gpu
@pytest.mark.cuda
def test_single_launch_rejects_other_devices_tensors_untouched():
    _available("cuda")
    grads = _gradients()
    originals = [g.clone() for g in grads]
    with pytest.raises(RuntimeError, match="launch"):
        ops.clip_(grads, 2.0, 1.0, None, None, torch.float32, False, "one")
    for grad, original in zip(grads, originals, strict=True):
        assert torch.equal(grad, original)


# Norms whose |g|^p leaves float64's range (#14 item 4): (values, dtype, p).
EXTREME_NORMS = [
    pytest.param([3e38], torch.float32, 10.0, id="p10-3e38"),
    pytest.param([1e4, 1e4], torch.float32, 100.0, id="p100-1e4x2"),
    pytest.param([3.0], torch.float32, 1000.0, id="p1000-3"),
    pytest.param([1e-6], torch.float32, 100.0, id="p100-1e-6"),
    pytest.param([1e200] * 1000, torch.float64, 2.0, id="p2-float64-1e200"),
    pytest.param([1e-200] * 1000, torch.float64, 2.0, id="p2-float64-1e-200"),
]


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize(("values", "dtype", "norm_type"), EXTREME_NORMS)
def test_norm_is_finite_and_accurate_for_large_p(backend, values, dtype, norm_type):
    _available(backend)
    grad = torch.tensor(values, dtype=dtype, device="cuda")
    neighbour = torch.randn(70_000, device="cuda")  # more than one chunk beside it
    expected = reference.reduce([neighbour.cpu(), grad.cpu()], norm_type, False)[0]
    assert math.isfinite(expected.item())
    total_norm = fusedclip.get_total_norm([neighbour, grad], norm_type, backend=backend)
    assert_close(total_norm, expected, rtol=NORM_RTOL[dtype], what=f"{backend} p={norm_type}")
    result = fusedclip.fused_clip_(
        [neighbour, grad], max_norm=1e300, norm_type=norm_type, backend=backend
    )
    assert result.found_inf.item() == 0.0, "an overflowing power is not a non-finite gradient"
    assert torch.isfinite(grad).all(), "the gradients were zeroed or poisoned"


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize(("values", "dtype", "norm_type"), EXTREME_NORMS)
def test_reduce_op_norms_for_large_p_single_equals_split(values, dtype, norm_type):
    """The scaled sum at the op level: norms against the oracle, single launch == split."""
    _available("cuda")
    grads = [torch.tensor(values, dtype=dtype, device="cuda"), torch.randn(5, device="cuda")]
    raw_norm, found_inf, per_tensor_norms = ops.reduce(grads, norm_type, True)
    want = reference.reduce([g.cpu() for g in grads], norm_type, True)
    assert_close(raw_norm, want[0], rtol=RAW_NORM_RTOL, what="raw_norm")
    assert_close(per_tensor_norms, want[2], rtol=RAW_NORM_RTOL, what="per_tensor_norms")
    assert found_inf.item() == 0.0
    outputs = {}
    for launch in ("single", "split"):
        copies = [g.clone() for g in grads]
        outputs[launch] = ops.clip_(copies, norm_type, 1.0, None, None, torch.float64, True, launch)
    for name, a, b in zip(CLIP_OUTPUTS, outputs["single"], outputs["split"], strict=True):
        assert torch.equal(bits(a), bits(b)), name


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_coefficients_outside_float32(backend):
    """#14 item 5: a float64 gradient in the call lets max_norm=1e-20 give a coefficient below
    float32's range; inv_scale=1e300 on zeros. Kernels agree with the oracle within 2 ulp."""
    _available(backend)
    big = torch.tensor([1e30, -3e38, 1.0, 0.0], device="cuda")
    small64 = torch.tensor([1e-3, 2.0], dtype=torch.float64, device="cuda")
    originals = [big.clone(), small64.clone()]
    fusedclip.fused_clip_([big, small64], max_norm=1e-20, backend=backend)
    raw_norm = reference.reduce([o.cpu() for o in originals], 2.0, False)[0]
    _, coef = reference.finalize(raw_norm, 1e-20, None, torch.float64)
    for grad, original in zip((big, small64), originals, strict=True):
        assert_grads_close(grad, original.cpu().double() * coef, what=f"{backend} max_norm=1e-20")
    assert big[0].item() != 0.0, "1e30 * 3e-59 = 3e-29 is a normal float32, not 0"

    zeros = torch.zeros(70_000, device="cuda")
    inv_scale = torch.tensor(1e300, dtype=torch.float64, device="cuda")
    result = fusedclip.fused_clip_([zeros], inv_scale=inv_scale, backend=backend)
    assert result.found_inf.item() == 0.0
    assert torch.equal(bits(zeros), bits(torch.zeros_like(zeros))), "0 * 1e300 is 0, not NaN"


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_the_same_memory_listed_twice_is_scaled_once(backend):
    """#14 item 12: the planning rule keeps the CUDA and Triton write kernels race-free."""
    _available(backend)
    grad = torch.randn(300_001, device="cuda") * 3
    original = grad.clone()
    fusedclip.fused_clip_([grad, grad.view(-1), grad[:]], max_norm=1.0, backend=backend)
    once = original.clone()
    fusedclip.fused_clip_([once], max_norm=1.0, backend=backend)
    assert_close(grad, once, rtol=0, what="scaled once")


def _table_stats():
    """[tables built, captured tables alive, spare pinned buffers, pinned buffers allocated]."""
    return list(torch.ops.fusedclip_testing.cuda_table_stats())


@needs_gpu
@pytest.mark.cuda
def test_unchanged_gradient_set_reuses_its_device_table():
    """#17: same addresses, no rebuild and no copy, whichever op reads the table."""
    _available("cuda")
    grads = _gradients()
    ops.reduce(grads, 2.0, True)
    fusedclip.fused_clip_(grads, max_norm=1.0, backend="cuda")  # the API may pass another list
    built = _table_stats()[0]
    for launch in ("auto", "split", "single"):
        raw_norm, _, _ = ops.reduce(grads, 2.0, True)
        _, clip_coef = ops.finalize(raw_norm, 1.0, None, torch.float32)
        ops.scale_(grads, clip_coef, None)
        ops.clip_(grads, 2.0, 1.0, None, 0.5, torch.float32, False, launch)
        fusedclip.fused_clip_(grads, max_norm=1.0, backend="cuda")
    assert _table_stats()[0] == built, "an unchanged gradient set rebuilt its table"
    ops.reduce([g.clone() for g in grads], 2.0, True)
    assert _table_stats()[0] == built + 1, "new addresses must build a new table"


def _settled_table_stats():
    """The stats once graphs dropped earlier (by other tests too) have released their tables."""
    gc.collect()
    torch.cuda.synchronize()
    previous, current = None, _table_stats()
    while current != previous:
        time.sleep(0.05)
        previous, current = current, _table_stats()
    return current


def _wait_for_captured_tables(count, timeout_s=10.0):
    # The graph releases its tables through a CUDA user object, destroyed on a CUDA thread.
    deadline = time.monotonic() + timeout_s
    while _table_stats()[1] > count and time.monotonic() < deadline:
        time.sleep(0.01)
    return _table_stats()[1]


@needs_gpu
@pytest.mark.cuda
def test_captured_tables_are_freed_with_their_graph():
    """#14 item 10: 30 graphs made and dropped in turn leave no table behind and reuse one pinned
    buffer; 5 graphs alive at once keep 5 tables that replay correctly."""
    _available("cuda")
    grads = _gradients()
    inv_scale = torch.tensor(0.25, device="cuda")
    ops.clip_(grads, 2.0, 1.0, inv_scale, None, torch.float32, True, "split")  # warm-up
    _, alive, _, pinned = _settled_table_stats()
    for cycle in range(30):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ops.clip_(grads, 2.0, 1.0, inv_scale, None, torch.float32, True, "split")
        assert _table_stats()[1] == alive + 1, f"cycle {cycle}"
        graph.replay()
        torch.cuda.synchronize()
        del graph
        gc.collect()
        assert _wait_for_captured_tables(alive) == alive, f"cycle {cycle}: table outlived graph"
    assert _table_stats()[3] - pinned <= 1, "each capture allocated its own pinned buffer"

    graphs, outputs = [], []
    for _ in range(5):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs.append(ops.clip_(grads, 2.0, 1.0, inv_scale, None, torch.float32, True, "auto"))
        graphs.append(graph)
    assert _table_stats()[1] == alive + 5
    for graph, output in zip(graphs, outputs, strict=True):
        fresh = _gradients()
        for grad, value in zip(grads, fresh, strict=True):
            grad.copy_(value)
        expected = [f.clone() for f in fresh]
        want = ops.clip_(expected, 2.0, 1.0, inv_scale, None, torch.float32, True, "auto")
        graph.replay()
        torch.cuda.synchronize()
        for name, a, b in zip(CLIP_OUTPUTS, output, want, strict=True):
            assert torch.equal(bits(a), bits(b)), name
        for grad, value in zip(grads, expected, strict=True):
            assert torch.equal(bits(grad), bits(value))
    del graphs, outputs, graph, output
    gc.collect()
    torch.cuda.synchronize()
    assert _wait_for_captured_tables(alive) == alive


@needs_gpu
@pytest.mark.cuda
def test_single_launch_falls_back_when_the_cooperative_grid_is_refused():
    """#14 item 11: a grid the device cannot hold (as under an MPS thread limit), forced through
    the test hook. launch='auto' takes the split path with its bits and leaves no error behind;
    launch='single' raises before writing anything."""
    _available("cuda")
    grads = _gradients()
    expected = [same_alignment_copy(g) for g in grads]
    want = ops.clip_(expected, 3.0, 0.5, None, 0.01, torch.float64, True, "split")
    torch.ops.fusedclip_testing.set_single_launch_grid(1 << 24)
    try:
        got = ops.clip_(grads, 3.0, 0.5, None, 0.01, torch.float64, True, "auto")
        torch.cuda.synchronize()
        before = [bits(g) for g in grads]
        with pytest.raises(RuntimeError, match="launch='auto'"):
            ops.clip_(grads, 3.0, 0.5, None, 0.01, torch.float64, True, "single")
        for grad, saved in zip(grads, before, strict=True):
            assert torch.equal(bits(grad), saved), "a refused single launch wrote"
    finally:
        torch.ops.fusedclip_testing.set_single_launch_grid(0)
    for name, a, b in zip(CLIP_OUTPUTS, got, want, strict=True):
        assert torch.equal(bits(a), bits(b)), name
    for grad, value in zip(grads, expected, strict=True):
        assert torch.equal(bits(grad), bits(value))
    ops.clip_(grads, 3.0, 0.5, None, None, torch.float64, True, "single")  # still launches
    torch.cuda.synchronize()
