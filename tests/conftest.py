"""Shared test set-up: seeding, the backend/device matrix, tolerances, poisoning, one assert helper."""

from __future__ import annotations

import contextlib
import os

import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter; it must be chosen
# before triton compiles anything, so before fusedclip.triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fusedclip  # noqa: E402
from fusedclip import dispatch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

# Relative tolerance of a returned norm against the float64 reference, per gradient dtype.
# The kernels accumulate in float64, so what is left is the final rounding to float32.
NORM_RTOL = {
    torch.float32: 1e-6,
    torch.float16: 1e-6,
    torch.bfloat16: 1e-6,
    torch.float64: 1e-12,
}
# Clipped gradients: within 2 ulp of the reference's result rounded to the gradient's dtype.
# For float64 the coefficient's own last bits depend on the (chunked, fixed) summation order of
# the norm (and, for general p, on exp2/log2 against pow), which differs from the
# reference's: allow 32 ulp there.
ULP = {
    torch.float32: 2.0**-23,
    torch.float16: 2.0**-10,
    torch.bfloat16: 2.0**-7,
    torch.float64: 16 * 2.0**-52,
}


def backend_params(include_reference: bool = True):
    """(device, backend) pairs that can run on this machine, as pytest params."""
    pairs = []
    for device in DEVICES:
        for name in ("cpu", "cuda", "triton") + (("reference",) if include_reference else ()):
            if dispatch.unavailable_reason(name, device) is None:
                marks = [pytest.mark.cuda] if device == "cuda" else []
                pairs.append(pytest.param(device, name, id=f"{device}-{name}", marks=marks))
    return pairs


def is_interpreted(device: str, backend: str) -> bool:
    """Triton's CPU interpreter is slow: such runs get smaller inputs."""
    return backend == "triton" and device == "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def poison_allocator(device: str) -> None:
    """Fills freed allocator blocks with NaN, so an output element no kernel wrote shows up."""
    blocks = [torch.full((n,), float("nan"), device=device) for n in (1, 64, 4096, 1 << 20)]
    del blocks


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
    """A clipped gradient against the float64 reference result: within 2 ulp of its dtype."""
    ulp = ULP[actual.dtype]
    expected = expected64.to(actual.dtype).to(torch.float64)
    tiny = torch.finfo(actual.dtype).tiny
    assert_close(actual, expected, rtol=2 * ulp, atol=tiny, what=what)


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
    "assert_close",
    "assert_grads_close",
    "backend_params",
    "fusedclip",
    "is_interpreted",
    "poison_allocator",
    "refusing_host_syncs",
]
