"""The public API: drop-ins for torch.nn.utils' clipping functions, and `fused_clip_`.

Every call checks all its arguments before it touches a gradient, groups the gradients by device,
and runs the three fused ops of the device's backend: `reduce` (one read pass), `finalize` (the
scalar epilogue) and `scale_` (one write pass, skipped on the device when there is nothing to do).
Nothing here syncs with the host except `error_if_nonfinite=True`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from typing import NamedTuple

import torch

from fusedclip import dispatch, distributed, reference
from fusedclip.layout import is_dense

TensorOrTensors = torch.Tensor | Iterable[torch.Tensor]

SUPPORTED_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16, torch.float64))


class ClipResult(NamedTuple):
    """What one fused call measured, all on the device of the first gradient.

    total_norm: the norm of the (unscaled) gradients, float32 (float64 if any gradient is).
    found_inf: 1.0 if any gradient element was inf or NaN, else 0.0 (float32, as GradScaler).
    clip_coef: the factor the gradients were multiplied by (inv_scale times the clip factor).
    per_tensor_norms: each gradient's norm, in input order, when asked for; else None.
    """

    total_norm: torch.Tensor
    found_inf: torch.Tensor
    clip_coef: torch.Tensor
    per_tensor_norms: torch.Tensor | None


def _as_tensor_list(tensors: TensorOrTensors) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    return list(tensors)


def _gradients(parameters: TensorOrTensors) -> list[torch.Tensor]:
    return [p.grad for p in _as_tensor_list(parameters) if p.grad is not None]


def _unique(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Drops repeats of the same tensor, so a gradient listed twice is counted and scaled once."""
    seen: set[int] = set()
    unique = []
    for tensor in tensors:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            unique.append(tensor)
    return unique


def _check_tensors(tensors: list[torch.Tensor], name: str) -> None:
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}[{index}] is a {type(tensor).__name__}, not a tensor")
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{name}[{index}] has dtype {tensor.dtype}; gradients must be float32, float16, "
                "bfloat16 or float64 (clipping integer or complex gradients is not defined)"
            )


def _check_nonnegative(value: float, name: str) -> float:
    if isinstance(value, torch.Tensor):
        value = value.item()
    value = float(value)
    if math.isnan(value) or value < 0:
        raise ValueError(
            f"{name} must be a non-negative number, got {value}; a negative {name} would flip "
            "the gradients' sign (torch silently does), so pass its absolute value"
        )
    return value


def _check_norm_type(norm_type: float | str) -> float:
    try:
        norm_type = float(norm_type)
    except (TypeError, ValueError):
        raise ValueError(f"norm_type must be a number > 0 or inf, got {norm_type!r}") from None
    if math.isnan(norm_type) or norm_type <= 0:
        raise ValueError(
            f"norm_type must be > 0 or inf, got {norm_type}; use 2.0 for the usual L2 norm"
        )
    return norm_type


def _check_inv_scale(inv_scale: float | torch.Tensor | None) -> float | torch.Tensor | None:
    if inv_scale is None:
        return None
    if isinstance(inv_scale, torch.Tensor):
        if inv_scale.numel() != 1 or not inv_scale.is_floating_point():
            raise ValueError(
                "inv_scale must be a float or a one-element floating-point tensor (such as "
                f"1 / scaler.get_scale()), got a {inv_scale.dtype} tensor of shape {tuple(inv_scale.shape)}"
            )
        return inv_scale
    inv_scale = float(inv_scale)
    if not math.isfinite(inv_scale):
        raise ValueError(f"inv_scale must be finite, got {inv_scale}")
    return inv_scale


class _DeviceGroup(NamedTuple):
    device: torch.device
    backend: dispatch.Backend
    dense: list[torch.Tensor]  # handed to the kernels as they are
    strided: list[torch.Tensor]  # gaps or overlaps: processed through a contiguous copy
    sparse: list[torch.Tensor]  # COO: processed through their coalesced values
    order: list[int]  # positions in the caller's list, dense then strided then sparse


class _Plan(NamedTuple):
    groups: list[_DeviceGroup]
    out_dtype: torch.dtype
    count: int
    # Ranks holding the same elements as each tensor (replicated DTensor shards); None: all 1.
    copies: list[int] | None = None

    @property
    def device(self) -> torch.device:
        return self.groups[0].device


def _plan(
    tensors: list[torch.Tensor], backend: str | None, copies: list[int] | None = None
) -> _Plan:
    """Groups the tensors by device (first-seen order) and picks each device's backend.

    One tight pass: with thousands of gradients, per-tensor Python work is the cost to watch.
    """
    by_device: dict[torch.device, tuple[list, list, list, list, list, list]] = {}
    any_double = False
    for index, tensor in enumerate(tensors):
        device = tensor.device
        lists = by_device.get(device)
        if lists is None:
            lists = by_device[device] = ([], [], [], [], [], [])
        dense, dense_order, strided, strided_order, sparse, sparse_order = lists
        if tensor.is_sparse:
            sparse.append(tensor)
            sparse_order.append(index)
        elif tensor.layout != torch.strided:
            raise TypeError(
                f"gradient {index} has layout {tensor.layout}; use strided or sparse_coo"
            )
        elif is_dense(tensor):
            dense.append(tensor)
            dense_order.append(index)
        else:
            strided.append(tensor)
            strided_order.append(index)
        any_double = any_double or tensor.dtype == torch.float64
    groups = []
    for device, (
        dense,
        dense_order,
        strided,
        strided_order,
        sparse,
        sparse_order,
    ) in by_device.items():
        order = dense_order + strided_order + sparse_order
        groups.append(
            _DeviceGroup(device, dispatch.select(device, backend), dense, strided, sparse, order)
        )
    if copies is not None and all(count == 1 for count in copies):
        copies = None
    return _Plan(groups, torch.float64 if any_double else torch.float32, len(tensors), copies)


def _localized_plan(
    tensors: list[torch.Tensor], backend: str | None, process_group, *, measured: bool = True
):
    """(plan, process group): DTensor gradients are planned as their local shards.

    `measured=False` is for write-only callers: no norm, so no count of the ranks holding a shard.
    """
    if distributed.has_dtensor(tensors):
        if not measured:
            return _plan(distributed.local_shards(tensors), backend), process_group
        tensors, copies, process_group = distributed.localize(tensors, process_group)
        return _plan(tensors, backend, copies), process_group
    return _plan(tensors, backend), process_group


_PLAIN_TENSOR_TYPES = frozenset((torch.Tensor, torch.nn.Parameter))
_device_of = operator.attrgetter("device")
_dtype_of = operator.attrgetter("dtype")
_layout_of = operator.attrgetter("layout")


def _common_case_plan(tensors: list[torch.Tensor], backend: str | None) -> _Plan | None:
    """The plan of the common case, found in a few C-level passes (a Python loop costs about a
    microsecond per gradient, which eager steps on small models feel): plain tensors, each listed
    once, all contiguous, on one device, of supported dtypes. None for anything else, which the
    general path plans or rejects with its errors."""
    if torch.compiler.is_compiling() or not tensors:
        return None
    if not set(map(type, tensors)) <= _PLAIN_TENSOR_TYPES:
        return None
    devices = set(map(_device_of, tensors))
    dtypes = set(map(_dtype_of, tensors))
    if len(devices) != 1 or not dtypes <= SUPPORTED_DTYPES:
        return None
    if set(map(_layout_of, tensors)) != {torch.strided}:
        return None
    if not all(map(torch.Tensor.is_contiguous, tensors)):
        return None
    if len(set(map(id, tensors))) != len(tensors):
        return None
    (device,) = devices
    backend_ = dispatch.select(device, backend)
    group = _DeviceGroup(device, backend_, tensors, [], [], list(range(len(tensors))))
    out_dtype = torch.float64 if torch.float64 in dtypes else torch.float32
    return _Plan([group], out_dtype, len(tensors))


def _prepare(
    tensors: list[torch.Tensor],
    name: str,
    backend: str | None,
    process_group=None,
    *,
    measured: bool = True,
):
    """(plan, process group) for the gradients after every check and with repeats dropped; the
    plan is None when there is nothing to do. `name` is how error messages call `tensors`."""
    plan = _common_case_plan(tensors, backend)  # dispatch.select validates `backend` there
    if plan is not None:
        return plan, process_group
    dispatch.requested_backend(backend)  # an empty list must reject a bad backend too
    tensors = _unique(tensors)
    _check_tensors(tensors, name)
    if not tensors:
        return None, process_group
    return _localized_plan(tensors, backend, process_group, measured=measured)


def _reduce_group(group: _DeviceGroup, norm_type: float, per_tensor: bool):
    """(power_sum, found_inf, per_tensor_power or None) of one device's gradients."""
    parts = []
    if group.dense or group.strided:
        kernel_inputs = group.dense + [t.contiguous() for t in group.strided]
        parts.append(group.backend.reduce(kernel_inputs, norm_type, per_tensor))
    if group.sparse:
        values = [t.coalesce()._values() for t in group.sparse]
        parts.append(reference.reduce(values, norm_type, per_tensor))
    if len(parts) == 1:
        power_sum, found_inf, per_tensor_power = parts[0]
    else:
        power_sum = reference.combine_powers(torch.stack([p[0] for p in parts]), norm_type)
        found_inf = torch.stack([p[1] for p in parts]).amax()
        per_tensor_power = torch.cat([p[2] for p in parts])
    return power_sum, found_inf, per_tensor_power if per_tensor else None


def _per_tensor_in_input_order(plan: _Plan, powers: list[torch.Tensor]) -> torch.Tensor:
    order = [index for group in plan.groups for index in group.order]
    joined = powers[0] if len(powers) == 1 else torch.cat([p.to(plan.device) for p in powers])
    if order == list(range(plan.count)):
        return joined
    inverse = [0] * plan.count
    for position, index in enumerate(order):
        inverse[index] = position
    return joined[torch.tensor(inverse, device=plan.device)]


def _copies_tensor(plan: _Plan) -> torch.Tensor:
    copies = torch.tensor(plan.copies, dtype=torch.float64)
    if plan.device.type == "cuda":
        copies = copies.pin_memory()
    return copies.to(plan.device, non_blocking=True)


def _measure(plan: _Plan, norm_type: float, per_tensor: bool, process_group=None):
    """One read of every gradient: (power_sum float64, found_inf float32, per_tensor_power)."""
    # A shard that several ranks hold counts once in the global sum (a max needs no care).
    weighted = plan.copies is not None and not reference.is_inf_norm(norm_type)
    results = [_reduce_group(group, norm_type, per_tensor or weighted) for group in plan.groups]
    if len(results) == 1:
        power_sum, found_inf, _ = results[0]
    else:
        device = plan.device
        power_sum = reference.combine_powers(
            torch.stack([r[0].to(device) for r in results]), norm_type
        )
        found_inf = torch.stack([r[1].to(device) for r in results]).amax()
    per_tensor_power = None
    if per_tensor or weighted:
        per_tensor_power = _per_tensor_in_input_order(plan, [r[2] for r in results])
    if weighted:
        power_sum = (per_tensor_power / _copies_tensor(plan)).sum()
    if process_group is not None:
        power_sum, found_inf = distributed.all_reduce_norm_state(
            power_sum, found_inf, norm_type, process_group
        )
    return power_sum, found_inf, per_tensor_power if per_tensor else None


def _inv_scale_tensor(inv_scale: float | torch.Tensor | None, device: torch.device):
    if inv_scale is None:
        return None
    if isinstance(inv_scale, torch.Tensor):
        if inv_scale.dtype not in (torch.float32, torch.float64):
            inv_scale = inv_scale.to(torch.float32)
        return inv_scale.to(device).reshape(())
    return torch.full((), inv_scale, dtype=torch.float64, device=device)


def _apply(plan: _Plan, clip_coef: torch.Tensor, clip_value: float | None) -> None:
    """One write of every gradient: g = clamp(g * clip_coef, -clip_value, clip_value)."""
    for group in plan.groups:
        coef = clip_coef.to(group.device)
        if group.dense:
            group.backend.scale_(group.dense, coef, clip_value)
        for tensor in group.strided:
            buffer = tensor.contiguous()
            group.backend.scale_([buffer], coef, clip_value)
            tensor.copy_(buffer)
        for tensor in group.sparse:
            coalesced = tensor.coalesce()
            reference.scale_([coalesced._values()], coef, clip_value)
            tensor.copy_(coalesced)


def _nonfinite_error(norm_type: float) -> RuntimeError:
    return RuntimeError(
        f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so "
        "it cannot be clipped. To disable this error and scale the gradients by the non-finite "
        "norm anyway, set `error_if_nonfinite=False`"
    )


def _empty_result(per_tensor: bool) -> ClipResult:
    zero = torch.tensor(0.0)
    return ClipResult(
        zero, torch.tensor(0.0), torch.tensor(1.0), torch.empty(0) if per_tensor else None
    )


def _runs_as_one_op(plan: _Plan, process_group) -> bool:
    """Whether the whole clip can be the backend's `clip_` op: one device, every gradient dense,
    nothing to combine across ranks or devices between the read and the write."""
    if process_group is not None or plan.copies is not None or len(plan.groups) != 1:
        return False
    group = plan.groups[0]
    return group.backend.clip_ is not None and not group.strided and not group.sparse


def _clip(
    tensors: list[torch.Tensor],
    name: str,
    *,
    norm_type: float | str,
    max_norm: float | None,
    clip_value: float | None = None,
    inv_scale: float | torch.Tensor | None = None,
    per_tensor: bool = False,
    error_if_nonfinite: bool = False,
    process_group=None,
    backend: str | None = None,
    apply: bool = True,
) -> ClipResult:
    """Checks every argument, measures, then (when `apply`) scales the gradients in place.

    `apply=False` only computes what the write pass would do, for callers that fold it into
    another kernel. `name` is how error messages call `tensors`.
    """
    norm_type = _check_norm_type(norm_type)
    max_norm = None if max_norm is None else _check_nonnegative(max_norm, "max_norm")
    clip_value = None if clip_value is None else _check_nonnegative(clip_value, "clip_value")
    inv_scale = _check_inv_scale(inv_scale)
    plan, process_group = _prepare(tensors, name, backend, process_group)
    if plan is None:
        return _empty_result(per_tensor)
    first = plan.groups[0]
    inv_scale_tensor = _inv_scale_tensor(inv_scale, plan.device)
    writes = apply and (max_norm is not None or clip_value is not None or inv_scale is not None)
    if writes and not error_if_nonfinite and _runs_as_one_op(plan, process_group):
        total_norm, found_inf, clip_coef, per_tensor_power = first.backend.clip_(
            first.dense,
            norm_type,
            max_norm,
            inv_scale_tensor,
            clip_value,
            plan.out_dtype,
            per_tensor,
        )
    else:
        power_sum, found_inf, per_tensor_power = _measure(
            plan, norm_type, per_tensor, process_group
        )
        total_norm, clip_coef = first.backend.finalize(
            power_sum, norm_type, max_norm, inv_scale_tensor, plan.out_dtype
        )
        if error_if_nonfinite and not torch.isfinite(total_norm).item():
            raise _nonfinite_error(norm_type)
        if writes:
            _apply(plan, clip_coef, clip_value)
    per_tensor_norms = None
    if per_tensor:
        per_tensor_norms = reference.power_to_norm(per_tensor_power, norm_type)
        if inv_scale_tensor is not None:
            per_tensor_norms = per_tensor_norms * inv_scale_tensor.to(torch.float64).abs()
        per_tensor_norms = per_tensor_norms.to(plan.out_dtype)
    return ClipResult(total_norm, found_inf, clip_coef, per_tensor_norms)


@torch.no_grad()
def fused_clip_(
    tensors: TensorOrTensors,
    *,
    max_norm: float | None = None,
    norm_type: float | str = 2.0,
    clip_value: float | None = None,
    inv_scale: float | torch.Tensor | None = None,
    per_tensor: bool = False,
    process_group=None,
    backend: str | None = None,
) -> ClipResult:
    """Unscale, measure, clip by norm, then clamp by value, in one read and one write pass.

    `tensors` are the gradients themselves (a tensor or an iterable of tensors), modified in
    place when `inv_scale`, `max_norm` or `clip_value` is given.
    """
    return _clip(
        _as_tensor_list(tensors),
        "tensors",
        norm_type=norm_type,
        max_norm=max_norm,
        clip_value=clip_value,
        inv_scale=inv_scale,
        per_tensor=per_tensor,
        process_group=process_group,
        backend=backend,
    )


@torch.no_grad()
def measure(
    tensors: TensorOrTensors,
    *,
    max_norm: float | None = None,
    norm_type: float | str = 2.0,
    inv_scale: float | torch.Tensor | None = None,
    per_tensor: bool = False,
    process_group=None,
    backend: str | None = None,
) -> ClipResult:
    """What `fused_clip_` computes (norm, found_inf, clip_coef), in one read, touching nothing:
    for callers that fold the write into another kernel, such as a fused optimizer's step."""
    return _clip(
        _as_tensor_list(tensors),
        "tensors",
        norm_type=norm_type,
        max_norm=max_norm,
        inv_scale=inv_scale,
        per_tensor=per_tensor,
        process_group=process_group,
        backend=backend,
        apply=False,
    )


@torch.no_grad()
def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    inv_scale: float | torch.Tensor | None = None,
    process_group=None,
    backend: str | None = None,
) -> torch.Tensor:
    """Drop-in for torch.nn.utils.clip_grad_norm_: clips the gradients' total norm to `max_norm`.

    Returns the total norm of the (unscaled) gradients as a 0-dim tensor on the first gradient's
    device. `foreach` is accepted and ignored: every backend is multi-tensor.
    """
    return _clip(
        _gradients(parameters),
        "parameters' gradients",
        norm_type=norm_type,
        max_norm=max_norm,
        inv_scale=inv_scale,
        error_if_nonfinite=error_if_nonfinite,
        process_group=process_group,
        backend=backend,
    ).total_norm


@torch.no_grad()
def get_total_norm(
    tensors: TensorOrTensors,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    process_group=None,
    backend: str | None = None,
) -> torch.Tensor:
    """Drop-in for torch.nn.utils.get_total_norm: the norm of all `tensors` (not their .grad)."""
    return _clip(
        _as_tensor_list(tensors),
        "tensors",
        norm_type=norm_type,
        max_norm=None,
        error_if_nonfinite=error_if_nonfinite,
        process_group=process_group,
        backend=backend,
    ).total_norm


@torch.no_grad()
def clip_grads_with_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    total_norm: torch.Tensor,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
) -> None:
    """Drop-in for torch.nn.utils.clip_grads_with_norm_: scales the gradients by
    min(1, max_norm / (total_norm + 1e-6)), with a `total_norm` computed beforehand."""
    max_norm = _check_nonnegative(max_norm, "max_norm")
    plan, _ = _prepare(_gradients(parameters), "parameters' gradients", backend, measured=False)
    if plan is None:
        return
    total_norm = torch.as_tensor(total_norm, device=plan.device)
    clip_coef = reference.clip_coefficient(total_norm, max_norm, None).to(plan.out_dtype)
    _apply(plan, clip_coef, None)


@torch.no_grad()
def clip_grad_value_(
    parameters: TensorOrTensors,
    clip_value: float,
    foreach: bool | None = None,
    *,
    inv_scale: float | torch.Tensor | None = None,
    backend: str | None = None,
) -> None:
    """Drop-in for torch.nn.utils.clip_grad_value_: clamps every gradient element to
    [-clip_value, clip_value], after unscaling by `inv_scale` when given (one write pass)."""
    clip_value = _check_nonnegative(clip_value, "clip_value")
    inv_scale = _check_inv_scale(inv_scale)
    plan, _ = _prepare(_gradients(parameters), "parameters' gradients", backend, measured=False)
    if plan is None:
        return
    clip_coef = _inv_scale_tensor(inv_scale, plan.device)
    if clip_coef is None:
        clip_coef = torch.ones((), dtype=plan.out_dtype, device=plan.device)
    _apply(plan, clip_coef, clip_value)


@torch.no_grad()
def scale_(
    tensors: TensorOrTensors, clip_coef: torch.Tensor, *, backend: str | None = None
) -> None:
    """g *= clip_coef for every tensor, through the fused write pass (skipped on the device when
    clip_coef == 1); for callers that compute their own coefficient on the device."""
    plan, _ = _prepare(_as_tensor_list(tensors), "tensors", backend, measured=False)
    if plan is None:
        return
    _apply(plan, clip_coef.to(plan.out_dtype), None)
