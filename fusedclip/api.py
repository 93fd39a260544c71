"""The public API: drop-ins for torch.nn.utils' clipping functions, and `fused_clip_`.

Every call checks its arguments, has fusedclip.plan check the gradients and group them by device
(every refusal is decided there, before a byte is read or written), and runs the fused ops of each
device's backend: `reduce` (one read pass), `finalize` (the scalar epilogue) and `scale_` (one
write pass, skipped on the device when there is nothing to do), or `clip_`, the three in one op.
Nothing here syncs with the host except `error_if_nonfinite=True`, and reading a one-element
tensor passed as `max_norm` or `clip_value` (the ops take a float).
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import sys
import types
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

import torch

from fusedclip import dispatch, distributed, plan
from fusedclip.dispatch import BackendName
from fusedclip.grad_mode import without_grad
from fusedclip.norms import clip_coefficient, combine_norms, is_inf_norm

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

TensorOrTensors = torch.Tensor | Iterable[torch.Tensor]


class ClipResult(NamedTuple):
    """What one fused call measured, all on the device of the first gradient.

    total_norm: the norm of the (unscaled) gradients, float32 (float64 if any gradient is).
    found_inf: 1.0 if any gradient element was inf or NaN, else 0.0 (float32, as GradScaler).
    clip_coef: the factor the gradients were multiplied by (inv_scale times the clip factor),
        float64: a factor outside float32's range is applied exactly as it is.
    per_tensor_norms: each gradient's norm, in input order, when asked for; else None.
    """

    total_norm: torch.Tensor
    found_inf: torch.Tensor
    clip_coef: torch.Tensor
    per_tensor_norms: torch.Tensor | None


def _as_list(tensors: TensorOrTensors) -> list:
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    return tensors if type(tensors) is list else list(tensors)


def _parameters_list(parameters: TensorOrTensors) -> list:
    """As torch's clip_grad_norm_: a tensor or an iterable, and a warning for an empty generator.
    A list is taken as it is (nothing below modifies it)."""
    if isinstance(parameters, torch.Tensor):
        return [parameters]
    if type(parameters) is list:
        return parameters
    is_generator = isinstance(parameters, types.GeneratorType)
    parameters = list(parameters)
    if is_generator and not parameters:
        warnings.warn(
            "`parameters` is an empty generator, no gradient clipping will occur.",
            stacklevel=_first_caller_outside_fusedclip(),
        )
    return parameters


_PACKAGE_DIRECTORY = os.path.dirname(__file__) + os.sep


def _first_caller_outside_fusedclip() -> int:
    """The stacklevel, for a warning raised by the function calling this one, that names the
    first frame outside fusedclip: the user's call, however many of fusedclip's own frames lie
    between (fusedclip.patch's stand-in for torch's name is one more)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIRECTORY):
        frame, level = frame.f_back, level + 1
    return level


def check_backend(backend: BackendName | None) -> None:
    """A ValueError now for a backend name no call would take (for objects that keep one)."""
    if backend is not None:
        dispatch.requested_backend(backend)


def to_float(value, name: str, expected: str) -> float:
    """float(value), raising what float() raises (TypeError or ValueError, as torch would) with
    the argument named; a number past float64's range (10**400) is a ValueError too, and a
    tensor of more than one element a TypeError (a wrong shape, as the README's rule says)."""
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise TypeError(
            f"{name} must be {expected} (or a one-element tensor), got a tensor of shape "
            f"{tuple(value.shape)}"
        )
    try:
        return float(value)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{name} must be {expected}, got {value!r}") from None
    except OverflowError:  # not its repr: an int's may be longer than Python prints
        raise ValueError(
            f"{name} must be {expected}, got a value of type "
            f"{type(value).__name__} past float64's range"
        ) from None


def check_nonnegative(value, name: str, fix: str = "") -> float:
    if value is None:
        raise TypeError(f"{name} must be a non-negative number, got None{fix}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(
                f"{name} must be a non-negative number or a one-element tensor, got a tensor of "
                f"shape {tuple(value.shape)}; pass one value for all the gradients"
            )
        value = value.item()
    value = to_float(value, name, "a non-negative number")
    if value != value:  # NaN; comparisons, not math.isnan, so that a SymFloat traces
        raise ValueError(f"{name} must be a non-negative number, got nan{fix}")
    if not value >= 0:
        raise ValueError(
            f"{name} must be a non-negative number, got {value}; a negative {name} would flip "
            "the gradients' sign (torch silently does), so pass its absolute value"
        )
    return value


def check_bound(value, name: str, fix: str = "") -> float | torch.Tensor:
    """`check_nonnegative` for a max_norm or clip_value, except a one-element tensor traced by
    torch.compile or make_fx: reading it (and so checking its sign) would need the host (which
    a fullgraph=True compile cannot give) or bake its value into the graph, so it is kept as a
    0-dim tensor, as torch's clip takes it. The callers compute with it on the device."""
    if (
        isinstance(value, torch.Tensor)
        and value.numel() == 1
        and plan.is_tracing()
        and not value.is_complex()  # refused by check_nonnegative, as eagerly (dtypes trace)
    ):
        return value.reshape(())
    return check_nonnegative(value, name, fix)


def check_norm_type(norm_type: float | str) -> float:
    norm_type = to_float(norm_type, "norm_type", "a number > 0 or inf")
    if not norm_type > 0:  # NaN too; also a SymFloat under torch.compile, where math.isnan breaks
        raise ValueError(
            f"norm_type must be > 0 or inf, got {norm_type}; use 2.0 for the usual L2 norm"
        )
    return norm_type


def check_inv_scale(inv_scale: float | torch.Tensor | None) -> float | torch.Tensor | None:
    if inv_scale is None:
        return None
    if isinstance(inv_scale, torch.Tensor):
        if inv_scale.numel() != 1 or not inv_scale.is_floating_point():
            raise TypeError(
                "inv_scale must be a float or a one-element floating-point tensor (such as "
                f"1 / scaler.get_scale()), got a {inv_scale.dtype} tensor of shape {tuple(inv_scale.shape)}"
            )
        return inv_scale
    inv_scale = to_float(
        inv_scale, "inv_scale", "a finite number >= 0 or a one-element floating-point tensor"
    )
    # NaN fails too; comparisons, not math.isfinite, so that a SymFloat traces under compile.
    if not (inv_scale >= 0 and inv_scale < math.inf):
        # A negative one would flip every gradient's sign; the scaler's is always positive.
        raise ValueError(
            f"inv_scale must be a finite number >= 0 (1 / the loss scale), got {inv_scale}"
        )
    return inv_scale


def _check_total_norm(total_norm) -> torch.Tensor:
    if isinstance(total_norm, torch.Tensor):
        total_norm = distributed.plain_value(total_norm)  # torch's get_total_norm of DTensors
        # Integer and bool ones too, as torch's division takes them; complex has no order.
        if total_norm.numel() != 1 or total_norm.is_complex():
            raise TypeError(
                "total_norm must be a number or a one-element real tensor (what "
                f"get_total_norm returns), got a {total_norm.dtype} tensor of shape "
                f"{tuple(total_norm.shape)}"
            )
        return total_norm.reshape(())
    expected = "a number or a one-element tensor"
    if not isinstance(total_norm, numbers.Real):  # a TypeError, as torch's division raises
        raise TypeError(f"total_norm must be {expected}, got {total_norm!r}")
    value = to_float(total_norm, "total_norm", expected)
    if value < 0:  # a norm never is; NaN passes, as get_total_norm returns it for NaN gradients
        raise ValueError(
            f"total_norm must be a norm (>= 0), got {value}; a negative one would flip the "
            "gradients' sign (torch silently does)"
        )
    return torch.tensor(value, dtype=torch.float64)


class _KernelInputs(NamedTuple):
    tensors: list[torch.Tensor]  # what the kernels read and write, in the group's order
    # (destination, source) copies that carry a write into buffers back to the gradients
    write_backs: list[tuple[torch.Tensor, torch.Tensor]]


def _kernel_inputs(group: plan.DeviceGroup, writes: bool) -> _KernelInputs:
    """Dense gradients as they are (traced, with `writes`, as fresh copies where
    plan.writes_through_copies says so); strided ones as contiguous copies; sparse ones as their
    coalesced values (the tensor's own values when it is coalesced already, else float64 ones)."""
    copy_dense = writes and plan.writes_through_copies(group.dense)
    if not group.strided and not group.sparse and not copy_dense:
        return _KernelInputs(group.dense, [])
    if copy_dense:
        tensors = torch.ops.fusedclip.fresh_copies(group.dense)
        write_backs = list(zip(group.dense, tensors, strict=True))
    else:
        tensors = list(group.dense)
        write_backs = []
    for tensor in group.strided:
        buffer = tensor.resolve_neg().contiguous()
        tensors.append(buffer)
        write_backs.append((tensor, buffer))
    for tensor in group.sparse:
        # Duplicates are summed at float64: summed at the gradient's own precision, scaled
        # (AMP) values would overflow where the unscaled sum fits (scaler.unscale_ unscales the
        # values before anything sums them); the write back rounds once.
        coalesced = tensor if tensor.is_coalesced() else tensor.to(torch.float64).coalesce()
        values = coalesced._values()
        contiguous = values.contiguous()
        tensors.append(contiguous)
        if contiguous is not values:
            write_backs.append((values, contiguous))
        if coalesced is not tensor:
            write_backs.append((tensor, coalesced))
    return _KernelInputs(tensors, write_backs)


def _write_back(inputs: _KernelInputs) -> None:
    for destination, source in inputs.write_backs:
        destination.copy_(source)


def _in_plan_order(the_plan: plan.Plan, per_group: list[torch.Tensor]) -> torch.Tensor:
    """Per-tensor values of each group (in the group's order) in the planned list's order."""
    joined = per_group[0]
    if len(per_group) > 1:
        joined = torch.cat([values.to(the_plan.device) for values in per_group])
    order = [index for group in the_plan.groups for index in group.order]
    if order == list(range(the_plan.count)):
        return joined
    inverse = [0] * the_plan.count
    for position, index in enumerate(order):
        inverse[index] = position
    return joined[_moved_without_sync(torch.tensor(inverse), the_plan.device)]


def _moved_without_sync(host_value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host_value`, a CPU tensor made for this call, on `device`. A copy to a GPU from pageable
    memory blocks the host until it is done (a sync). One value is filled on the device instead
    (no copy; a CUDA graph captures the fill); more are copied from pinned memory, queued on the
    stream, the pinned block not reused before the copy ran. Under a capture they take the
    pageable copy, which the capture refuses: a graph must not replay from a host buffer that
    the allocator may have handed out again."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return host_value.to(device)
    if host_value.numel() == 1:
        value = host_value.reshape(()).tolist()  # a CPU tensor's value: no device sync
        return torch.full(host_value.shape, value, dtype=host_value.dtype, device=device)
    if torch.cuda.is_current_stream_capturing():
        return host_value.to(device)
    return host_value.pin_memory().to(device, non_blocking=True)


def _copies_tensor(the_plan: plan.Plan) -> torch.Tensor:
    return _moved_without_sync(torch.tensor(the_plan.copies, dtype=torch.float64), the_plan.device)


def _measure(
    the_plan: plan.Plan,
    inputs: list[_KernelInputs],
    norm_type: float,
    per_tensor: bool,
    process_group,
):
    """One read of every gradient: (raw_norm float64, found_inf float32, per-tensor raw norms)."""
    # A shard that several ranks hold counts once in the global norm (a max needs no care).
    weighted = the_plan.copies is not None and not is_inf_norm(norm_type)
    results = [
        group.backend.reduce(group_inputs.tensors, norm_type, per_tensor or weighted)
        for group, group_inputs in zip(the_plan.groups, inputs, strict=True)
    ]
    per_tensor_norms = None
    if per_tensor or weighted:
        per_tensor_norms = _in_plan_order(the_plan, [result[2] for result in results])
    if weighted:
        raw_norm = combine_norms(per_tensor_norms, norm_type, 1.0 / _copies_tensor(the_plan))
        found_inf = torch.stack([result[1].to(the_plan.device) for result in results]).amax()
    elif len(results) == 1:
        raw_norm, found_inf, _ = results[0]
    else:
        device = the_plan.device
        raw_norm = combine_norms(torch.stack([r[0].to(device) for r in results]), norm_type)
        found_inf = torch.stack([r[1].to(device) for r in results]).amax()
    if process_group is not None:
        raw_norm, found_inf = distributed.combine_across_ranks(
            raw_norm, found_inf, norm_type, process_group
        )
    return raw_norm, found_inf, per_tensor_norms if per_tensor else None


def _inv_scale_tensor(inv_scale: float | torch.Tensor | None, device: torch.device):
    if inv_scale is None:
        return None
    if isinstance(inv_scale, torch.Tensor):
        if inv_scale.dtype not in (torch.float32, torch.float64):
            inv_scale = inv_scale.to(torch.float32)
        if inv_scale.device == device and inv_scale.dim() == 0:
            return inv_scale  # what GradScaler hands over: nothing to do
        return inv_scale.to(device).reshape(())
    return torch.full((), inv_scale, dtype=torch.float64, device=device)


def _finalized(
    backend: dispatch.Backend,
    raw_norm: torch.Tensor,
    max_norm: float | torch.Tensor | None,
    inv_scale: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """backend.finalize, also for a traced tensor max_norm (check_bound), which the ops' float
    max_norm cannot take: the coefficient then comes from the float64 norm on the device."""
    if not isinstance(max_norm, torch.Tensor):
        return backend.finalize(raw_norm, max_norm, inv_scale, out_dtype)
    norm, _ = backend.finalize(raw_norm, None, inv_scale, torch.float64)
    bound = max_norm.to(device=norm.device, dtype=torch.float64)
    return norm.to(out_dtype), clip_coefficient(norm, bound, inv_scale)


def _scale(the_plan: plan.Plan, inputs: list[_KernelInputs], clip_coef, clip_value) -> None:
    """One write of every gradient: g = clamp(g * clip_coef, -clip_value, clip_value). A traced
    tensor clip_value (check_bound), which the ops' float clip_value cannot take, is applied by
    the reference backend's write, torch ops that the compiler fuses."""
    for group, group_inputs in zip(the_plan.groups, inputs, strict=True):
        writer = group.backend
        if isinstance(clip_value, torch.Tensor):
            writer = plan.backend_on(group.device, "reference")
        writer.scale_(group_inputs.tensors, clip_coef.to(group.device), clip_value)
        _write_back(group_inputs)


def _nonfinite_error(norm_type: float) -> RuntimeError:
    return RuntimeError(
        f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so "
        "it cannot be clipped. To disable this error and scale the gradients by the non-finite "
        "norm anyway, set `error_if_nonfinite=False`"
    )


def _or_empty(result: ClipResult | None, per_tensor: bool) -> ClipResult:
    """`_clip`'s result, or for a call without gradients what torch returns then: a norm of 0."""
    if result is not None:
        return result
    zero = torch.tensor(0.0)
    one = torch.tensor(1.0, dtype=torch.float64)
    return ClipResult(zero, torch.tensor(0.0), one, torch.empty(0) if per_tensor else None)


def _runs_as_one_op(the_plan: plan.Plan, process_group) -> bool:
    """Whether the whole clip can be the backend's `clip_` op: one device, nothing to combine
    across ranks or devices between the read and the write."""
    if process_group is not None or the_plan.copies is not None or len(the_plan.groups) != 1:
        return False
    return the_plan.groups[0].backend.clip_ is not None


def _clip(
    items: list,
    name: str | plan.TensorNames,
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
    of_parameters: bool = False,
    gradients_only: bool = False,
    refuse_float16: bool = False,
    writes_after: bool = False,
    refuse_repeats: bool | None = None,
    float64_norm: bool = False,
) -> ClipResult | tuple[ClipResult, torch.Tensor] | None:
    """Checks every argument, measures, then (when `apply`) scales the gradients in place; None
    when there is no gradient.

    `items` are the gradients, or with `of_parameters` the parameters whose `.grad` to take.
    `apply=False` only computes what the write pass would do, for callers that fold it into
    another kernel; with `writes_after` such a caller writes the gradients next, so they are
    checked as for a write, and (unless `refuse_repeats` is False: the caller writes through
    scale_, which scales a repeat once) the same memory listed twice is refused. `name` is how
    error messages call `items`; `gradients_only` and `refuse_float16` as `plan.prepare`.
    `float64_norm` (with `apply=False`): also returns the total norm in float64, (result, norm),
    for callers that compute from it (a float32 norm overflows where the gradients do not).
    """
    assert not (float64_norm and apply), "float64_norm is for calls that do not write"
    if refuse_repeats is None:
        refuse_repeats = writes_after
    norm_type = check_norm_type(norm_type)
    max_norm = None if max_norm is None else check_bound(max_norm, "max_norm")
    clip_value = None if clip_value is None else check_bound(clip_value, "clip_value")
    inv_scale = check_inv_scale(inv_scale)
    distributed.check_process_group(process_group)
    writes = apply and (max_norm is not None or clip_value is not None or inv_scale is not None)
    if writes and not error_if_nonfinite and not per_tensor and process_group is None:
        found = plan.prepare_and_clip(
            items,
            backend,
            norm_type=norm_type,
            max_norm=max_norm,
            inv_scale=inv_scale,
            clip_value=clip_value,
            of_parameters=of_parameters,
            gradients_only=gradients_only,
            refuse_float16=refuse_float16,
        )
        if found is not None:
            total_norm, found_inf, clip_coef, _ = found
            return ClipResult(total_norm, found_inf, clip_coef, None)
    the_plan, process_group = plan.prepare(
        items,
        name,
        backend,
        process_group,
        writes=writes or writes_after,
        of_parameters=of_parameters,
        gradients_only=gradients_only,
        refuse_float16=refuse_float16,
        refuse_repeats=plan.REPEATS_WRITTEN_BY_CALLER if refuse_repeats else None,
    )
    if the_plan is None:
        if process_group is None and of_parameters:
            # DTensor parameters without gradients here: the ranks that have some combine over
            # the default group, and wait for this one.
            process_group = distributed.group_of_dtensors(items)
        if process_group is None:
            return None
        joined = _joined_without_gradients(
            norm_type,
            max_norm,
            inv_scale,
            per_tensor,
            error_if_nonfinite,
            process_group,
            backend,
            torch.float64 if float64_norm else torch.float32,
        )
        if not float64_norm:
            return joined
        # The other ranks' norm in float64 too: a state kept from it (ZClip's) stays the same
        # on every rank.
        return joined._replace(total_norm=joined.total_norm.float()), joined.total_norm
    backend_ = the_plan.groups[0].backend
    inv_scale_tensor = _inv_scale_tensor(inv_scale, the_plan.device)
    if plan.is_tracing():
        # Every op below computes from inv_scale (1 changes nothing): it carries the check.
        if inv_scale_tensor is None:
            inv_scale_tensor = torch.ones((), dtype=torch.float64, device=the_plan.device)
        inv_scale_tensor = plan.checked_when_run(the_plan, inv_scale_tensor, writes or writes_after)
    # Per-tensor norms are unscaled after the write: by a copy of |inv_scale| taken before it,
    # since an inv_scale tensor may be a view of a gradient that the write changes.
    per_tensor_unscale = (
        inv_scale_tensor.to(torch.float64).abs()
        if per_tensor and inv_scale_tensor is not None
        else None
    )
    traced_bounds = isinstance(max_norm, torch.Tensor) or isinstance(clip_value, torch.Tensor)
    if (
        writes
        and not error_if_nonfinite
        and not traced_bounds
        and _runs_as_one_op(the_plan, process_group)
    ):
        one_group = _kernel_inputs(the_plan.groups[0], writes=True)
        total_norm, found_inf, clip_coef, per_tensor_norms = backend_.clip_(
            one_group.tensors,
            norm_type,
            max_norm,
            inv_scale_tensor,
            clip_value,
            the_plan.out_dtype,
            per_tensor,
        )
        _write_back(one_group)
        if per_tensor:
            per_tensor_norms = _in_plan_order(the_plan, [per_tensor_norms])
    else:
        inputs = [_kernel_inputs(group, writes) for group in the_plan.groups]
        raw_norm, found_inf, per_tensor_norms = _measure(
            the_plan, inputs, norm_type, per_tensor, process_group
        )
        total_norm, clip_coef = _finalized(
            backend_,
            raw_norm,
            max_norm,
            inv_scale_tensor,
            torch.float64 if float64_norm else the_plan.out_dtype,
        )
        if error_if_nonfinite and not torch.isfinite(total_norm).item():
            raise _nonfinite_error(norm_type)
        if writes:
            _scale(the_plan, inputs, clip_coef, clip_value)
    if not per_tensor:
        per_tensor_norms = None  # clip_ hands back an empty tensor
    else:
        if the_plan.listed is not None:  # a repeat has its first listing's norm
            per_tensor_norms = per_tensor_norms[
                _moved_without_sync(torch.tensor(the_plan.listed), per_tensor_norms.device)
            ]
        if per_tensor_unscale is not None:
            per_tensor_norms = per_tensor_norms * per_tensor_unscale
        per_tensor_norms = per_tensor_norms.to(the_plan.out_dtype)
    if float64_norm:
        result = ClipResult(
            total_norm.to(the_plan.out_dtype), found_inf, clip_coef, per_tensor_norms
        )
        return result, total_norm
    return ClipResult(total_norm, found_inf, clip_coef, per_tensor_norms)


def _joined_without_gradients(
    norm_type,
    max_norm,
    inv_scale,
    per_tensor,
    error_if_nonfinite,
    process_group,
    backend,
    norm_dtype: torch.dtype = torch.float32,
) -> ClipResult:
    """A rank without gradients in a sharded call: it joins the others' collective and returns
    the same norm (of `norm_dtype`), coefficient and overflow verdict as they do (raising where
    they raise)."""
    raw_norm, found_inf = distributed.join_empty(norm_type, process_group)
    inv_scale_tensor = _inv_scale_tensor(inv_scale, raw_norm.device)
    backend_ = plan.backend_on(raw_norm.device, backend)
    total_norm, clip_coef = _finalized(backend_, raw_norm, max_norm, inv_scale_tensor, norm_dtype)
    if error_if_nonfinite and not torch.isfinite(total_norm).item():
        raise _nonfinite_error(norm_type)
    per_tensor_norms = torch.empty(0, device=raw_norm.device) if per_tensor else None
    return ClipResult(total_norm, found_inf, clip_coef, per_tensor_norms)


@functools.cache
def _one(device: torch.device) -> torch.Tensor:
    """A float64 1 on `device`, the coefficient of clip_grad_value_ (only ever read). Not made
    under a dispatch mode, which would make it its own (a FakeTensorMode's fake tensor, kept for
    every later call)."""
    return torch.ones((), dtype=torch.float64, device=device)


def _in_dispatch_mode() -> bool:
    return torch._C._len_torch_dispatch_stack() > 0


def _write_only(
    items: list,
    name: str,
    clip_coef: float | torch.Tensor | None,
    clip_value: float | None,
    backend: str | None,
    *,
    of_parameters: bool,
    gradients_only: bool = False,
) -> None:
    """g = clamp(g * clip_coef, -clip_value, clip_value) in one write pass, nothing measured.

    `clip_coef` is a float64 0-dim tensor (or a float, or None for 1) on any device."""
    if plan.prepare_and_scale(
        items,
        backend,
        clip_coef=clip_coef,
        clip_value=clip_value,
        of_parameters=of_parameters,
        gradients_only=gradients_only,
    ):
        return
    the_plan, _ = plan.prepare(
        items,
        name,
        backend,
        writes=True,
        measured=False,
        of_parameters=of_parameters,
        gradients_only=gradients_only,
    )
    if the_plan is None:
        return
    if isinstance(clip_coef, torch.Tensor):
        coef = clip_coef.to(dtype=torch.float64).reshape(())
        if coef.device.type == "cpu":  # computed here from a number (clip_grads_with_norm_)
            coef = _moved_without_sync(coef, the_plan.device)
        coef = coef.to(the_plan.device)  # another device's: as torch moves it
    elif clip_coef is None and not torch.compiler.is_compiling() and not _in_dispatch_mode():
        coef = _one(the_plan.device)
    else:  # filled on the device: no host value to copy there
        value = 1.0 if clip_coef is None else clip_coef
        coef = torch.full((), value, dtype=torch.float64, device=the_plan.device)
    coef = plan.checked_when_run(the_plan, coef, True)
    inputs = [_kernel_inputs(group, writes=True) for group in the_plan.groups]
    _scale(the_plan, inputs, coef, clip_value)


@without_grad
def fused_clip_(
    tensors: TensorOrTensors,
    *,
    max_norm: float | None = None,
    norm_type: float | str = 2.0,
    clip_value: float | None = None,
    inv_scale: float | torch.Tensor | None = None,
    per_tensor: bool = False,
    process_group: ProcessGroup | None = None,
    backend: BackendName | None = None,
) -> ClipResult:
    """Unscale, measure, clip by norm, then clamp by value, in one read and one write pass.

    Args:
        tensors: the gradients themselves (a tensor or an iterable of tensors, not the
            parameters), modified in place when `inv_scale`, `max_norm` or `clip_value` is given.
        max_norm: clip so that the total norm is at most this (as `clip_grad_norm_`).
        norm_type: p of the p-norm, > 0, or inf.
        clip_value: then clamp every element to [-clip_value, clip_value].
        inv_scale: the gradients are loss-scaled by 1 / inv_scale: unscale them in the same pass.
        per_tensor: also return each gradient's norm.
        process_group: each rank holds a disjoint share of the gradients: the norm is global.
        backend: None for $FUSEDCLIP_BACKEND or "auto"; or a name from `fusedclip.backends()`.

    Returns:
        ClipResult(total_norm, found_inf, clip_coef, per_tensor_norms), tensors on the device.

    Raises:
        TypeError: a tensor is not a floating-point tensor, or is a parameter (pass its .grad).
        ValueError: a bad argument, or gradients that partially overlap in memory.
        RuntimeError: an explicit `backend` that cannot run these tensors here.
        Nothing is modified when it raises.
    """
    result = _clip(
        _as_list(tensors),
        "tensors",
        norm_type=norm_type,
        max_norm=max_norm,
        clip_value=clip_value,
        inv_scale=inv_scale,
        per_tensor=per_tensor,
        process_group=process_group,
        backend=backend,
        gradients_only=True,
    )
    return _or_empty(result, per_tensor)


@without_grad
def measure(
    tensors: TensorOrTensors,
    *,
    max_norm: float | None = None,
    norm_type: float | str = 2.0,
    inv_scale: float | torch.Tensor | None = None,
    per_tensor: bool = False,
    process_group: ProcessGroup | None = None,
    backend: BackendName | None = None,
    writes_after: bool = False,
) -> ClipResult:
    """What `fused_clip_` computes, in one read, touching nothing: for callers that fold the write
    into another kernel, such as a fused optimizer's step.

    Args and Raises: as `fused_clip_` (without `clip_value`), and
        writes_after: the caller then writes each listed tensor itself: refuse what a writing
            call refuses (gradients that partially overlap, a view that overlaps itself, an
            inference tensor outside inference mode), and the same memory listed twice, which
            that write would scale twice (ValueError).

    Returns:
        ClipResult; `clip_coef` is the factor `fused_clip_` would multiply the gradients by.
    """
    return measure_named(
        _as_list(tensors),
        "tensors",
        max_norm=max_norm,
        norm_type=norm_type,
        inv_scale=inv_scale,
        per_tensor=per_tensor,
        process_group=process_group,
        backend=backend,
        writes_after=writes_after,
    )


def measure_named(
    tensors: list[torch.Tensor],
    names: str | plan.TensorNames,
    *,
    max_norm: float | None,
    norm_type: float | str,
    inv_scale: float | torch.Tensor | None,
    per_tensor: bool,
    process_group: ProcessGroup | None,
    backend: BackendName | None,
    writes_after: bool,
) -> ClipResult:
    """`measure` of a list that messages call `names` (`plan.prepare`'s `name`), such as an
    optimizer's gradients named by their parameters."""
    result = _clip(
        tensors,
        names,
        norm_type=norm_type,
        max_norm=max_norm,
        inv_scale=inv_scale,
        per_tensor=per_tensor,
        process_group=process_group,
        backend=backend,
        apply=False,
        gradients_only=True,
        writes_after=writes_after,
    )
    return _or_empty(result, per_tensor)


def measure_before_scale(
    tensors: list[torch.Tensor],
    *,
    inv_scale: float | torch.Tensor | None,
    process_group: ProcessGroup | None,
    backend: BackendName | None,
    writes_each: bool,
    names: str | plan.TensorNames = "tensors",
) -> tuple[ClipResult, torch.Tensor]:
    """`measure(tensors, inv_scale=...)` and the total norm in float64, for a caller that
    computes its own coefficient from that norm (a float32 one overflows where the gradients do
    not), acts on it (its own state), then writes the tensors: checked as for a write here, so
    that a write refused later cannot follow state already changed. `writes_each`: the caller
    writes each listed tensor itself (a fused optimizer's step), so the same memory listed twice
    is refused too; otherwise it writes through `scale_`, which scales a repeat once. `names`:
    how messages call the tensors (`plan.prepare`'s `name`)."""
    measured = _clip(
        tensors,
        names,
        norm_type=2.0,
        max_norm=None,
        inv_scale=inv_scale,
        process_group=process_group,
        backend=backend,
        apply=False,
        gradients_only=True,
        writes_after=True,
        refuse_repeats=writes_each,
        float64_norm=True,
    )
    if measured is None:
        result = _or_empty(None, False)
        return result, result.total_norm.double()
    return measured


@without_grad
def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    inv_scale: float | torch.Tensor | None = None,
    process_group: ProcessGroup | None = None,
    backend: BackendName | None = None,
) -> torch.Tensor:
    """Drop-in for torch.nn.utils.clip_grad_norm_: clips the gradients' total norm to `max_norm`.

    Args:
        parameters: a tensor or an iterable of tensors whose `.grad` to clip (None grads skipped).
        max_norm: the largest total norm left.
        norm_type: p of the p-norm, > 0, or inf (also "inf", "2").
        error_if_nonfinite: raise, before any gradient is modified, if the norm is inf or NaN
            (the only path that syncs with the host).
        foreach: accepted and ignored: every backend is multi-tensor.
        inv_scale, process_group, backend: as `fused_clip_`.

    Returns:
        The total norm of the (unscaled) gradients, a 0-dim tensor on the first gradient's
        device: float32, or float64 if any gradient is float64.

    Raises:
        TypeError, ValueError, RuntimeError: as `fused_clip_`; RuntimeError also for a
        non-finite norm with `error_if_nonfinite`. Nothing is modified when it raises.
    """
    max_norm = check_bound(max_norm, "max_norm", "; to measure without clipping use get_total_norm")
    result = _clip(
        _parameters_list(parameters),
        "parameters",
        norm_type=norm_type,
        max_norm=max_norm,
        inv_scale=inv_scale,
        error_if_nonfinite=error_if_nonfinite,
        process_group=process_group,
        backend=backend,
        of_parameters=True,
    )
    return _or_empty(result, False).total_norm


@without_grad
def get_total_norm(
    tensors: TensorOrTensors,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    process_group: ProcessGroup | None = None,
    backend: BackendName | None = None,
) -> torch.Tensor:
    """Drop-in for torch.nn.utils.get_total_norm: the norm of all `tensors` (not their .grad).

    Args, Returns and Raises: as `clip_grad_norm_`, without clipping.
    """
    result = _clip(
        _as_list(tensors),
        "tensors",
        norm_type=norm_type,
        max_norm=None,
        error_if_nonfinite=error_if_nonfinite,
        process_group=process_group,
        backend=backend,
    )
    return _or_empty(result, False).total_norm


@without_grad
def clip_grads_with_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    total_norm: torch.Tensor | float,
    foreach: bool | None = None,
    *,
    backend: BackendName | None = None,
) -> None:
    """Drop-in for torch.nn.utils.clip_grads_with_norm_: scales the gradients by
    min(1, max_norm / (total_norm + 1e-6)), with a `total_norm` computed beforehand.

    Args:
        parameters: as `clip_grad_norm_`.
        max_norm: the largest total norm left.
        total_norm: a number or a one-element real tensor (`get_total_norm`'s result);
            the coefficient is computed from it in float64.

    Raises:
        TypeError, ValueError: a bad argument (also a negative number `total_norm`);
        RuntimeError: an explicit `backend` that cannot run these tensors here. Nothing is
        modified when it raises.
    """
    max_norm = check_bound(max_norm, "max_norm")
    total_norm = _check_total_norm(total_norm)
    clip_coef = clip_coefficient(total_norm.to(torch.float64), max_norm, None)
    _write_only(_as_list(parameters), "parameters", clip_coef, None, backend, of_parameters=True)


@without_grad
def clip_grad_value_(
    parameters: TensorOrTensors,
    clip_value: float,
    foreach: bool | None = None,
    *,
    inv_scale: float | torch.Tensor | None = None,
    backend: BackendName | None = None,
) -> None:
    """Drop-in for torch.nn.utils.clip_grad_value_: clamps every gradient element to
    [-clip_value, clip_value], after unscaling by `inv_scale` when given (one write pass).

    Raises:
        TypeError, ValueError: a bad argument; RuntimeError: an explicit `backend` that cannot
        run these tensors here. Nothing is modified when it raises.
    """
    clip_value = check_bound(clip_value, "clip_value")
    inv_scale = check_inv_scale(inv_scale)
    _write_only(
        _as_list(parameters), "parameters", inv_scale, clip_value, backend, of_parameters=True
    )


@without_grad
def scale_(
    tensors: TensorOrTensors, clip_coef: torch.Tensor, *, backend: BackendName | None = None
) -> None:
    """g *= clip_coef for every tensor, through the fused write pass (skipped on the device when
    clip_coef == 1); for callers that compute their own coefficient on the device."""
    _write_only(
        _as_list(tensors),
        "tensors",
        clip_coef,
        None,
        backend,
        of_parameters=False,
        gradients_only=True,
    )
