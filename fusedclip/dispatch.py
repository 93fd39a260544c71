"""Backend choice: which implementation of the three ops (reduce, finalize, scale_) runs a device's
gradients, and whether it also has `clip_`, the three in one call.

`backend=None` means the FUSEDCLIP_BACKEND environment variable, else "auto": CUDA tensors go to
the CUDA extension if it was built with CUDA kernels, else to Triton, else to the reference; CPU
tensors go to the C++ CPU kernels, else to the reference. An explicit backend that cannot run on
the tensors' device raises and says why.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Literal, NamedTuple, get_args

import torch

from fusedclip import ops, reference

BackendName = Literal["auto", "cuda", "triton", "cpu", "reference"]
BACKEND_NAMES: tuple[str, ...] = get_args(BackendName)


class Backend(NamedTuple):
    name: str
    reduce: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    finalize: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    scale_: Callable[..., None]
    # reduce -> finalize -> scale_ in one op (the CUDA kernels can then run them in one launch);
    # None where the backend has only the three.
    clip_: Callable[..., tuple[torch.Tensor, ...]] | None = None
    # Whether its ops take the planner's fusedclip._C.DenseGradients for a list of tensors.
    takes_dense_gradients: bool = False


@functools.cache
def _triton_ops():
    """Imports the Triton backend on first use (importing triton costs about a second)."""
    from fusedclip import triton as triton_backend

    return triton_backend


def _built_without_cuda() -> str:
    """Why the extension has no CUDA kernels, as its build recorded it."""
    skipped = (ops.BUILD_RECORD or {}).get("cuda_skipped")
    why = f" ({skipped})" if skipped else ""
    return (
        f"the extension was built without the CUDA kernels{why}: rebuild with CUDA_HOME naming "
        "a CUDA toolkit, and without FUSEDCLIP_SKIP_CUDA=1"
    )


def unavailable_reason(name: str, device_type: str | None = None) -> str | None:
    """None if backend `name` can run (on `device_type` tensors, when given), else the reason."""
    if name == "reference":
        return None
    if name == "cpu":
        if not ops.has_kernel("reduce", "CPU"):
            return ops.EXTENSION_ERROR or "the extension was built without CPU kernels"
        if device_type not in (None, "cpu"):
            return f"it runs CPU tensors only, not {device_type} tensors"
        return None
    if name == "cuda":
        if not ops.has_kernel("reduce", "CUDA"):
            return ops.EXTENSION_ERROR or _built_without_cuda()
        if device_type is None and not torch.cuda.is_available():
            return "no CUDA device is available"
        if device_type not in (None, "cuda"):
            return f"it runs CUDA tensors only, not {device_type} tensors"
        return None
    if name == "triton":
        triton_backend = _triton_ops()
        if not triton_backend.is_available():
            return triton_backend.unavailable_reason
        if device_type is None:
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        if not triton_backend.supports_device(torch.device(device_type)):
            return (
                f"Triton cannot run {device_type} tensors (CPU tensors need TRITON_INTERPRET=1, "
                "set before fusedclip.triton is imported)"
            )
        return None
    return f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}"


def backends() -> list[str]:
    """The backends that can run here (for some device present), best first."""
    return [name for name in BACKEND_NAMES[1:] if unavailable_reason(name) is None]


# os.environ.get encodes the key and decodes the value on every call, about 1 µs of every
# fusedclip call. CPython's os.environ keeps its encoded mapping, current through every change
# made in Python, in `_data`: read there where it exists. (Neither sees a putenv() made in C.)
_ENCODED_ENVIRON = getattr(os.environ, "_data", None)
_ENCODED_BACKEND_KEY = (
    os.environ.encodekey("FUSEDCLIP_BACKEND") if _ENCODED_ENVIRON is not None else None
)


def _environment_backend() -> str:
    """$FUSEDCLIP_BACKEND, else "auto"."""
    if _ENCODED_ENVIRON is None:
        return os.environ.get("FUSEDCLIP_BACKEND", "auto")
    value = _ENCODED_ENVIRON.get(_ENCODED_BACKEND_KEY)
    return "auto" if value is None else os.environ.decodevalue(value)


def requested_backend(backend: str | None) -> str:
    """The backend name asked for: the argument, else FUSEDCLIP_BACKEND, else "auto"; validated."""
    name = backend if backend is not None else _environment_backend()
    if name not in BACKEND_NAMES:
        source = "backend" if backend is not None else "FUSEDCLIP_BACKEND"
        raise ValueError(
            f"{source}={name!r} is not a backend; choose one of {', '.join(BACKEND_NAMES)}"
        )
    return name


# What "auto" tries for each device type, best first, before the reference: the extension's own
# ops (the backend named as the device type) lead.
_AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}
# Device types whose tensors hold no data (shape-only dry runs): the reference is all they need.
_DATALESS_DEVICE_TYPES = ("meta",)


def _auto_name(device_type: str) -> str:
    for name in _AUTO_ORDER.get(device_type, ()):
        if unavailable_reason(name, device_type) is None:
            return name
    if device_type not in _DATALESS_DEVICE_TYPES:
        _warn_reference_fallback(device_type)
    return "reference"


def extension_device_types(backend: str | None) -> tuple[bool, bool]:
    """(CPU, CUDA): whether select() gives that device type's gradients to the extension's own
    ops, the "cpu" or "cuda" backend, when `backend` is asked for (for plan.prepare_and_clip and
    prepare_and_scale, which call those ops without select())."""
    name = requested_backend(backend)
    types = _extension_device_types.get(name)
    if types is None:
        types = _extension_device_types[name] = (
            _runs_extension_ops(name, "cpu"),
            _runs_extension_ops(name, "cuda"),
        )
    return types


# Remembered as select() remembers its choices (_selected): they do not change while the
# process lives, and the answer is asked for on every clip.
_extension_device_types: dict[str, tuple[bool, bool]] = {}


def _runs_extension_ops(name: str, device_type: str) -> bool:
    first_choice = _AUTO_ORDER[device_type][0] if name == "auto" else name
    return first_choice == device_type and unavailable_reason(device_type, device_type) is None


@functools.cache
def _warn_reference_fallback(device_type: str) -> None:
    """Once per device type: the float64 reference is an oracle, several times slower than torch."""
    fast_backend = "cuda" if device_type == "cuda" else "cpu"
    warnings.warn(
        f"fusedclip: no fast backend for {device_type} gradients "
        f"({unavailable_reason(fast_backend, device_type)}); running the float64 reference, "
        "which is slower than torch. Build the extension with `pip install --no-build-isolation .` "
        "in a fusedclip checkout (CUDA kernels need CUDA_HOME), or install triton for CUDA "
        "tensors; fusedclip.build_info() says what is there",
        stacklevel=2,
    )


def select(device: torch.device, backend: str | None) -> Backend:
    """The backend that runs `device`'s gradients; raises ValueError/RuntimeError with the reason."""
    name = requested_backend(backend)
    # Under torch.compile the choice is made at trace time; the dict would only add guards.
    remembers = not torch.compiler.is_compiling()
    selected = _selected.get((name, device)) if remembers else None
    if selected is not None:
        return selected
    if name == "auto":
        selected = _backend(_auto_name(device.type))
    else:
        reason = unavailable_reason(name, device.type)
        if reason is not None:
            raise RuntimeError(f"backend={name!r} cannot run {device} gradients: {reason}")
        selected = _backend(name)
    if remembers:
        _selected[(name, device)] = selected
    return selected


# (requested name, device) -> the Backend that select() chose: what can run here does not change
# while the process lives, and select() runs on every call. Keyed by the device itself, not its
# type: torch.device.type builds a new string on every read (about 0.3 µs of every call).
_selected: dict[tuple[str, torch.device], Backend] = {}


@functools.cache
def _backend(name: str) -> Backend:
    if name in ("cpu", "cuda"):
        return Backend(name, ops.reduce, ops.finalize, ops.scale_, ops.clip_, True)
    if name == "triton":
        _triton_ops()  # registers the ops
        namespace = torch.ops.fusedclip
        return Backend(
            name,
            namespace.triton_reduce.default,
            namespace.triton_finalize.default,
            namespace.triton_scale_.default,
        )
    return Backend(name, reference.reduce, reference.finalize, reference.scale_)
