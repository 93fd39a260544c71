"""What only a GPU can show: no host sync, CUDA-graph capture, kernel registration."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close, assert_grads_close
from exact import bits

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


CLIP_OUTPUTS = ("total_norm", "found_inf", "clip_coef", "per_tensor_power")


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
        expected_norm = reference.power_to_norm(
            reference.reduce([f.cpu() for f in fresh], 2.0, False)[0], 2.0
        ) * 0.5 ** (replay + 1)
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
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.5], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("clip_value", [None, 0.002], ids=lambda v: f"value{v}")
def test_single_launch_is_bit_identical_to_split_beyond_one_wave(norm_type, clip_value):
    """More chunks than resident blocks (each block serves several), thousands of tensors (the
    grid's warps loop over them for per-tensor norms), every dtype, misaligned views."""
    _available("cuda")
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
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
