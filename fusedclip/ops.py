"""Typed wrappers over `torch.ops.fusedclip.*` (the C++/CUDA extension) and their fake impls.

Importing this module loads the extension if it was built; `EXTENSION_ERROR` says why not
otherwise. The op contracts are in csrc/README.md; fusedclip/reference.py specifies them.

The ops that take a list of gradients are called eagerly through `fusedclip._C.call_*`, the same
dispatcher call without boxing the list (csrc/python_ops.cpp: about 40 ns a tensor less); they
answer NotImplemented where torch.ops has more to do, and under torch.compile torch.ops is what
gets traced.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

from fusedclip import build_info

# Read once: what the build recorded (None without one). Read again while torch.compile traces, a
# file would break the graph.
BUILD_RECORD = build_info.read_build_record()

try:
    # An extension compiled against another torch can crash or misbehave: refuse it unloaded.
    if (torch_mismatch := build_info.torch_mismatch(BUILD_RECORD)) is not None:
        raise ImportError(torch_mismatch)
    from fusedclip import _C  # registers torch.ops.fusedclip.*

    EXTENSION_ERROR: str | None = None
except ImportError as error:
    _C = None
    if (
        importlib.util.find_spec("fusedclip._C") is None
    ):  # a pure-Python install (FUSEDCLIP_SKIP_EXT=1)
        EXTENSION_ERROR = (
            "the fusedclip._C extension is not built (pip install without FUSEDCLIP_SKIP_EXT=1)"
        )
    else:  # built, but it does not load: say so once
        EXTENSION_ERROR = f"the fusedclip._C extension does not load ({error})"
        if torch_mismatch is None:  # another cause, such as a build from before build records
            EXTENSION_ERROR += f"; {build_info.REBUILD_HINT}"
        warnings.warn(f"fusedclip: {EXTENSION_ERROR}; using the fallback backends", stacklevel=2)


OP_NAMES = ("reduce", "finalize", "scale_", "clip_")
# Read once: the dispatcher query is not traceable by torch.compile, and registrations happen
# when the extension loads.
_REGISTERED_KERNELS = {
    (name, key): EXTENSION_ERROR is None
    and torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedclip::{name}", key)
    for name in OP_NAMES
    for key in ("CPU", "CUDA")
}


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether the extension registered a kernel of `fusedclip::op_name` for `dispatch_key`."""
    return _REGISTERED_KERNELS.get((op_name, dispatch_key), False)


def _unboxed(name: str):
    """fusedclip._C's unboxed call of op `name`, or None where only torch.ops is there."""
    return getattr(_C, f"call_{name}", None)


_CALL_REDUCE, _CALL_SCALE_, _CALL_CLIP_ = (_unboxed(name) for name in ("reduce", "scale_", "clip_"))


def _call(unboxed, op, *args):
    """`op(*args)`, eagerly through its unboxed call where that takes the arguments."""
    if unboxed is not None and not torch.compiler.is_compiling():
        result = unboxed(*args)
        if result is not NotImplemented:
            return result
    return op(*args)


def reduce(
    tensors: list[torch.Tensor], norm_type: float, per_tensor: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _call(_CALL_REDUCE, torch.ops.fusedclip.reduce.default, tensors, norm_type, per_tensor)


def finalize(
    raw_norm: torch.Tensor,
    max_norm: float | None,
    inv_scale: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.fusedclip.finalize.default(raw_norm, max_norm, inv_scale, out_dtype)


def scale_(tensors: list[torch.Tensor], clip_coef: torch.Tensor, clip_value: float | None) -> None:
    _call(_CALL_SCALE_, torch.ops.fusedclip.scale_.default, tensors, clip_coef, clip_value)


def clip_(
    tensors: list[torch.Tensor],
    norm_type: float,
    max_norm: float | None,
    inv_scale: torch.Tensor | None,
    clip_value: float | None,
    out_dtype: torch.dtype,
    per_tensor: bool,
    launch: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """reduce, finalize and scale_ in one call: (total_norm, found_inf, clip_coef,
    per_tensor_norms). `launch` ("auto", "single", "split") picks how CUDA runs the passes."""
    return _call(
        _CALL_CLIP_,
        torch.ops.fusedclip.clip_.default,
        tensors,
        norm_type,
        max_norm,
        inv_scale,
        clip_value,
        out_dtype,
        per_tensor,
        launch,
    )


if EXTENSION_ERROR is None:

    @torch.library.register_fake("fusedclip::reduce")
    def _reduce_fake(tensors, norm_type, per_tensor):
        device = tensors[0].device
        raw_norm = tensors[0].new_empty((), dtype=torch.float64)
        found_inf = tensors[0].new_empty((), dtype=torch.float32)
        per_tensor_norms = torch.empty(
            len(tensors) if per_tensor else 0, dtype=torch.float64, device=device
        )
        return raw_norm, found_inf, per_tensor_norms

    @torch.library.register_fake("fusedclip::finalize")
    def _finalize_fake(raw_norm, max_norm, inv_scale, out_dtype):
        return raw_norm.new_empty((), dtype=out_dtype), raw_norm.new_empty((), dtype=torch.float64)

    @torch.library.register_fake("fusedclip::scale_")
    def _scale_fake(tensors, clip_coef, clip_value):
        return None

    @torch.library.register_fake("fusedclip::check_dense_aliasing")
    def _check_dense_aliasing_fake(
        tensors, value, name, positions, suffix, writes, same_memory, overlap, inference_tensor
    ):
        return torch.empty_like(value)

    @torch.library.register_fake("fusedclip::clip_")
    def _clip_fake(
        tensors, norm_type, max_norm, inv_scale, clip_value, out_dtype, per_tensor, launch="auto"
    ):
        _, found_inf, per_tensor_norms = _reduce_fake(tensors, norm_type, per_tensor)
        total_norm = tensors[0].new_empty((), dtype=out_dtype)
        clip_coef = tensors[0].new_empty((), dtype=torch.float64)
        return total_norm, found_inf, clip_coef, per_tensor_norms
