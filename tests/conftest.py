"""Shared test set-up: seeding, the backend/device matrix, NaN-poisoned fresh memory, one assert
helper. Sizes and tolerances live in tolerances.py (re-exported here for the tests that import
them from conftest)."""

from __future__ import annotations

import contextlib
import math
import os

import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter; it must be chosen
# before triton compiles anything, so before fusedclip.triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from tolerances import GRAD_ULPS, NORM_RTOL, ULP  # noqa: E402

import fusedclip  # noqa: E402
from fusedclip import dispatch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def backend_params(include_reference: bool = True):
    """(device, backend) pairs that can run on this machine, as pytest params."""
    pairs = []
    for device in DEVICES:
        for name in ("cpu", "cuda", "triton") + (("reference",) if include_reference else ()):
            if dispatch.unavailable_reason(name, device) is None:
                marks = [pytest.mark.cuda] if device == "cuda" else []
                pairs.append(pytest.param(device, name, id=f"{device}-{name}", marks=marks))
    return pairs


def plan_in_python(monkeypatch) -> None:
    """Turns the C++ planner off (its plan, plan_dense, and its one-call clip and write,
    clip_dense_ and scale_dense_), so that the general path of fusedclip/plan.py plans every
    call."""
    from fusedclip import plan

    monkeypatch.setattr(plan, "_C_PLAN_DENSE", None)
    monkeypatch.setattr(plan, "_C_CLIP_DENSE", None)
    monkeypatch.setattr(plan, "_C_SCALE_DENSE", None)


def is_interpreted(device: str, backend: str) -> bool:
    """Triton's CPU interpreter is slow: such runs get smaller inputs."""
    return backend == "triton" and device == "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _grad_mode_restored(request):
    """Every call restores grad mode, also when it raises: a test that left it off made every
    later test that needs autograd fail far from the cause."""
    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail(f"{request.node.nodeid} left grad mode off")


def poison_allocator(device: str) -> None:
    """Fills freed allocator blocks with NaN, so an output element no kernel wrote shows up.

    For kernels that allocate in C++ (at::empty), which the patch below cannot reach; it rarely
    reaches a large output on the CPU, whose allocator returns large blocks to the OS.
    """
    blocks = [torch.full((n,), float("nan"), device=device) for n in (1, 64, 4096, 1 << 20)]
    del blocks


# Backends whose outputs are allocated from Python (torch.empty and friends), where patching the
# allocation functions poisons every fresh output.
PYTHON_ALLOCATING_BACKENDS = ("triton", "reference")


def _poisoned(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_floating_point() or tensor.is_complex():
        with torch.no_grad():
            tensor.fill_(math.nan)
    return tensor


@contextlib.contextmanager
def nan_poisoned_empty():
    """Inside, torch.empty, torch.empty_like and Tensor.new_empty return NaN-filled floating-point
    tensors: an output element that a kernel never writes stays NaN and fails the comparison."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def poisoned_empty(*args, **kwargs):
        return _poisoned(empty(*args, **kwargs))

    def poisoned_empty_like(*args, **kwargs):
        return _poisoned(empty_like(*args, **kwargs))

    def poisoned_new_empty(self, *args, **kwargs):
        return _poisoned(new_empty(self, *args, **kwargs))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "empty", poisoned_empty)
        patch.setattr(torch, "empty_like", poisoned_empty_like)
        patch.setattr(torch.Tensor, "new_empty", poisoned_new_empty)
        yield


@pytest.fixture
def poisoned_fresh_memory(request):
    """NaN-poisons fresh memory (nan_poisoned_empty) for a test whose `backend` parameter
    allocates from Python; other tests run unchanged. A module opts in with
    `pytestmark = pytest.mark.usefixtures("poisoned_fresh_memory")`."""
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend") if callspec is not None else None
    if backend in PYTHON_ALLOCATING_BACKENDS:
        with nan_poisoned_empty():
            yield
    else:
        yield


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float = 0.0, what: str = ""
) -> None:
    """Like torch.testing.assert_close, but says which elements differ and by how much."""
    actual64 = actual.detach().to("cpu", torch.float64)
    expected64 = expected.detach().to("cpu", torch.float64)
    assert actual64.shape == expected64.shape, (
        f"{what}: shape {actual64.shape} != {expected64.shape}"
    )
    same_nan = torch.isnan(actual64) == torch.isnan(expected64)
    both_finite = torch.isfinite(actual64) & torch.isfinite(expected64)
    error = (actual64 - expected64).abs()
    bound = atol + rtol * expected64.abs()
    bad = (
        ~same_nan
        | (both_finite & (error > bound))
        | (~both_finite & ~torch.isnan(expected64) & (actual64 != expected64))
    )
    if bad.any():
        index = bad.nonzero()[:5].tolist()
        rows = [
            f"  at {i}: got {actual64[tuple(i)].item()!r}, expected {expected64[tuple(i)].item()!r}"
            for i in index
        ]
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ (rtol={rtol}, atol={atol}):\n"
            + "\n".join(rows)
        )


def assert_grads_close(actual: torch.Tensor, expected64: torch.Tensor, what: str = "") -> None:
    """A clipped gradient against the float64 reference result: within GRAD_ULPS ulp of its
    dtype (and within the dtype's smallest normal, where the result is subnormal)."""
    expected = expected64.to(actual.dtype).to(torch.float64)
    tiny = torch.finfo(actual.dtype).tiny
    assert_close(actual, expected, rtol=GRAD_ULPS * ULP[actual.dtype], atol=tiny, what=what)


@contextlib.contextmanager
def refusing_host_syncs(enabled: bool = True):
    """Any read of a tensor's value on the host (item, bool) inside fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a host sync")

    with pytest.MonkeyPatch.context() as patch:
        if enabled:
            patch.setattr(torch.Tensor, "item", refuse)
            patch.setattr(torch.Tensor, "__bool__", refuse)
        yield


__all__ = [
    "DEVICES",
    "HAS_CUDA",
    "NORM_RTOL",
    "ULP",
    "assert_close",
    "assert_grads_close",
    "backend_params",
    "fusedclip",
    "is_interpreted",
    "nan_poisoned_empty",
    "poison_allocator",
    "refusing_host_syncs",
]
