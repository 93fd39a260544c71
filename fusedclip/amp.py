"""AMP: fused unscale-and-clip that cooperates with torch.amp.GradScaler, and clip_step.

`unscale_clip_` replaces `scaler.unscale_(optimizer); clip_grad_norm_(...)` with one fused call
(one read pass, one write pass) and leaves the scaler exactly as `unscale_` would, so
`scaler.step`, `scaler.update` and a second `scaler.unscale_` behave as usual.

`clip_step` is the one-read-pass path: the fused read measures the norm and finds infs, and a
fused optimizer (Adam, AdamW, SGD with `fused=True`) applies unscale and clip inside its own step
through its `grad_scale`/`found_inf` inputs, so fusedclip makes no write pass at all (torch's
fused kernels store the unscaled gradient back as part of the pass they make anyway).

`step` is `scaler.step` that also skips on an on-device flag (a spike that ZClip or GradMonitor
flagged), without a sync for fused optimizers and without backing off the scale.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable

import torch
from torch.amp.grad_scaler import GradScaler, OptState

from fusedclip import api, distributed, plan
from fusedclip.api import ClipResult
from fusedclip.grad_mode import without_grad
from fusedclip.norms import FLOAT32_MAX

# How messages call an optimizer's gradients: `the optimizer's parameters[3].grad`.
OPTIMIZER_PARAMETERS = "the optimizer's parameters"


def _parameters(optimizer: torch.optim.Optimizer) -> list:
    """Every parameter of `optimizer`, in param-group order (one group's own list as it is: the
    planner only reads it)."""
    groups = optimizer.param_groups
    if len(groups) == 1:
        return groups[0]["params"]
    return list(itertools.chain.from_iterable(group["params"] for group in groups))


def _each_parameter(optimizer: torch.optim.Optimizer) -> Iterable:
    """`optimizer`'s parameters, lazily: for a test that most calls never make."""
    return itertools.chain.from_iterable(group["params"] for group in optimizer.param_groups)


def optimizer_gradients(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The gradients of `optimizer`'s parameters that have one, in param-group order."""
    return _named_gradients(optimizer)[0]


def _named_gradients(optimizer: torch.optim.Optimizer) -> tuple[list, plan.TensorNames]:
    """`optimizer_gradients`, and how messages call them: by their parameters' places."""
    grads, positions = plan.gradients_of(_parameters(optimizer), OPTIMIZER_PARAMETERS)
    return grads, plan.TensorNames(OPTIMIZER_PARAMETERS, positions, ".grad")


def _scaler_state(scaler: GradScaler, optimizer: torch.optim.Optimizer, funcname: str) -> dict:
    """The scaler's record for `optimizer`, after torch's own checks for `unscale_`: a new one
    is kept by the scaler only once `_record_found_inf` fills it, so that a call refused later
    leaves the scaler as it was.

    Reads the scaler's fields rather than calling its methods: torch.compile does not trace into
    torch.amp, and this keeps unscale_clip_ free of graph breaks.
    """
    _check_scale(scaler, funcname)
    state = scaler._per_optimizer_states.get(id(optimizer))
    if state is None:
        state = {"stage": OptState.READY, "found_inf_per_device": {}}
    if funcname == "unscale_":  # unscale_clip_ stands for unscale_: torch's own messages
        if state["stage"] is OptState.UNSCALED:
            raise RuntimeError(
                "unscale_() has already been called on this optimizer since the last update()."
            )
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
    elif state["stage"] is not OptState.READY:
        done = "stepped" if state["stage"] is OptState.STEPPED else "unscaled the gradients of"
        raise RuntimeError(
            f"{funcname}(): this optimizer's scaler already {done} it since the last "
            "scaler.update(); call scaler.update() after each step (one clip_step per update)"
        )
    return state


def _check_scale(scaler: GradScaler, funcname: str) -> None:
    # torch's own check and message (GradScaler._check_scale_growth_tracker).
    if scaler._scale is None:
        raise AssertionError(
            f"Attempted {funcname} but _scale is None.  This may indicate your script did not use "
            "scaler.scale(loss or outputs) earlier in the iteration."
        )


def _check_scaler_and_optimizer(scaler, optimizer, funcname: str, *, scaler_optional: bool) -> None:
    """Type errors that name the argument (swapped or missing arguments otherwise surface as
    AttributeErrors deep inside)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        swapped = " (scaler and optimizer swapped?)" if isinstance(optimizer, GradScaler) else ""
        raise TypeError(
            f"{funcname}: optimizer must be a torch.optim.Optimizer, got "
            f"{type(optimizer).__name__}{swapped}"
        )
    if scaler is None and scaler_optional:
        return
    if not isinstance(scaler, GradScaler):
        hint = (
            "; without AMP loss scaling call fusedclip.clip_grad_norm_ instead"
            if scaler is None
            else ""
        )
        raise TypeError(
            f"{funcname}: scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}{hint}"
        )


def _inv_scale(scaler: GradScaler) -> torch.Tensor:
    """As GradScaler.unscale_: the reciprocal in float64, then float32. Three small ops (three
    launches on a GPU) per step for a scale that changes only in scaler.update(), which writes it
    in place: the last one is kept with the scale tensor and its version. Not while traced or
    captured: a compiled function or a CUDA graph must compute it from the scale on every run
    (nor for an inference tensor, which has no version)."""
    global _last_inv_scale
    scale = scaler._scale
    if (
        plan.is_tracing()
        or (scale.is_cuda and torch.cuda.is_current_stream_capturing())
        or scale.is_inference()  # created by a first scaler.scale() in inference mode: no version
    ):
        return scale.double().reciprocal().float()
    last = _last_inv_scale  # one read: another thread may replace it
    if last is not None and last[0] is scale and last[1] == scale._version:
        return last[2]
    inv_scale = scale.double().reciprocal().float()
    _last_inv_scale = (scale, scale._version, inv_scale)
    return inv_scale


# (scale tensor, its version when the reciprocal was taken, the reciprocal): one entry, for the
# one GradScaler most programs have.
_last_inv_scale: tuple[torch.Tensor, int, torch.Tensor] | None = None


def _refuses_float16(scaler: GradScaler) -> bool:
    """GradScaler.unscale_ refuses float16 gradients (float16 parameters), with the message
    plan.FLOAT16_UNSCALE_ERROR; FSDP's ShardedGradScaler unscales them."""
    return not _sharded_scaler(scaler)[0]


def _check_not_float16(scaler: GradScaler, grads: list[torch.Tensor]) -> None:
    if _refuses_float16(scaler) and any(grad.dtype == torch.float16 for grad in grads):
        raise ValueError(plan.FLOAT16_UNSCALE_ERROR)


def _recorded_flag(scaler: GradScaler, found_inf: torch.Tensor | None) -> torch.Tensor | None:
    """What the scaler records of `found_inf` (None: nothing, no gradient here). A copy: with
    several optimizers GradScaler.update sums their flags into the first one's tensor in place,
    which would change the found_inf handed back. For a ShardedGradScaler, summed over its group
    as its own unscale_ does, so that every rank skips alike (a rank without gradients joins
    with a 0). Shaped as the scaler's own flags: update() sums them in place into the first, so
    a () flag among ShardedGradScaler's (1,) ones would not broadcast."""
    sharded, group = _sharded_scaler(scaler)
    if not sharded:
        return None if found_inf is None else found_inf.clone()
    if found_inf is None:
        flag = torch.zeros(1, device=scaler._scale.device)
    else:
        flag = found_inf.reshape(1).clone()
    distributed.sum_across_ranks_(flag, group)
    return flag


def _record_found_inf(
    scaler: GradScaler,
    optimizer: torch.optim.Optimizer,
    state: dict,
    flag: torch.Tensor | None,
    stage: OptState,
) -> None:
    """Fills `state` (from _scaler_state) and keeps it as the scaler's record for `optimizer`."""
    state["found_inf_per_device"] = {} if flag is None else {flag.device: flag}
    state["stage"] = stage
    scaler._per_optimizer_states[id(optimizer)] = state


def _sharded_scaler(scaler: GradScaler) -> tuple[bool, object]:
    """(whether it is FSDP's ShardedGradScaler, its group). The group may be None, the default
    group: torch's default argument is bound when its module is imported, often before
    init_process_group."""
    sharded_type = _sharded_scaler_type()
    if sharded_type is not None and isinstance(scaler, sharded_type):
        return True, scaler.process_group
    return False, None


@functools.cache
def _sharded_scaler_type():
    """torch's ShardedGradScaler class, imported once (not on every AMP call); None without it."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    return ShardedGradScaler


@without_grad
def unscale_clip_(
    scaler: GradScaler,
    optimizer: torch.optim.Optimizer,
    max_norm: float | None,
    norm_type: float | str = 2.0,
    *,
    clip_value: float | None = None,
    per_tensor: bool = False,
    process_group=None,
    backend: str | None = None,
) -> ClipResult:
    """`scaler.unscale_(optimizer)` then `clip_grad_norm_` (then a value clamp), fused.
    `max_norm=None` unscales (and clamps by `clip_value`) without a norm clip.

    Returns the ClipResult of the unscaled gradients. The scaler records `found_inf` for the
    optimizer and marks it unscaled, so `scaler.step(optimizer)` skips the step on overflow and
    does not unscale again. With a disabled scaler this is plain clipping.

    Raises:
        TypeError: `scaler` is not a GradScaler or `optimizer` not an Optimizer.
        RuntimeError: torch's own errors for a second unscale before `scaler.update()`.
        ValueError: float16 gradients (as `scaler.unscale_`), or a bad argument.
        AssertionError: torch's own, when `scaler.scale()` was not called in this iteration.
    """
    _check_scaler_and_optimizer(scaler, optimizer, "unscale_clip_", scaler_optional=False)
    state = _scaler_state(scaler, optimizer, "unscale_") if scaler._enabled else None
    # The planner gathers the gradients (in C++ for the common case) and refuses float16 ones
    # as scaler.unscale_ does, before anything is written.
    result = api._clip(
        _parameters(optimizer),
        OPTIMIZER_PARAMETERS,
        norm_type=norm_type,
        max_norm=max_norm,
        clip_value=clip_value,
        inv_scale=_inv_scale(scaler) if state is not None else None,
        per_tensor=per_tensor,
        process_group=process_group,
        backend=backend,
        of_parameters=True,
        refuse_float16=state is not None and _refuses_float16(scaler),
    )
    if state is not None:
        # No gradient (and no process group, whose verdict a rank without any still gets):
        # nothing is recorded, so scaler.step says "No inf checks were recorded", as torch's.
        found_inf = None if result is None else result.found_inf
        flag = _recorded_flag(scaler, found_inf)
        _record_found_inf(scaler, optimizer, state, flag, OptState.UNSCALED)
    return api._or_empty(result, per_tensor)


def _is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and bool(
        optimizer.defaults.get("fused")
    )


def _fills_momentum_on_this_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a fused SGD with momentum has no momentum buffers yet. Its first step allocates
    them uninitialized and then returns early on found_inf, leaving garbage that the next step
    reads (torch's own scaler.step has the same trap on a first-step overflow): that one step
    decides on the host instead."""
    if not isinstance(optimizer, torch.optim.SGD):
        return False
    for group in optimizer.param_groups:
        if group["momentum"] == 0:
            continue
        # torch's test: every stepped parameter lacks a buffer. Stops at the first that has one.
        stepped = False
        for param in group["params"]:
            if param.grad is None:
                continue
            if optimizer.state.get(param, {}).get("momentum_buffer") is not None:
                break
            stepped = True
        else:
            if stepped:
                return True
    return False


def _step_unless(
    optimizer: torch.optim.Optimizer,
    skip: torch.Tensor,
    grad_scale: torch.Tensor | None = None,
):
    """optimizer.step() unless `skip` (an on-device 0/1 tensor) is set; returns what it returned.

    Fused optimizers read the flag on the device through their `found_inf` input (and divide the
    gradients by `grad_scale` in the same pass); any other optimizer needs one sync to decide, as
    in GradScaler.step.
    """
    if _is_fused(optimizer):
        if _fills_momentum_on_this_step(optimizer) and bool(skip):
            return None
        # As GradScaler.step: a grad_scale the user set multiplies ours (and is taken, as there).
        user_scale = getattr(optimizer, "grad_scale", None)
        if user_scale is not None:
            grad_scale = user_scale if grad_scale is None else grad_scale * user_scale
        optimizer.grad_scale = grad_scale
        optimizer.found_inf = skip.to(torch.float32)
        try:
            return optimizer.step()
        finally:
            del optimizer.grad_scale
            del optimizer.found_inf
    if grad_scale is not None:
        raise AssertionError("grad_scale needs a fused optimizer")
    return None if bool(skip) else optimizer.step()


def _step_measured(
    optimizer: torch.optim.Optimizer,
    measure: Callable[[list[torch.Tensor], torch.Tensor | None], tuple],
    *,
    scaler: GradScaler | None = None,
    backend: str | None = None,
    funcname: str = "clip_step",
):
    """Unscale, clip and step with a rule that decides on the device.

    `measure(grads, names, inv_scale, writes_after, dtensor_group) -> (result, skip)` reads the
    gradients without writing them (`names`: how messages call them, by their parameters'
    places in the optimizer; `writes_after`: checking them as `api.measure` does for a
    caller that writes each one itself, as a fused optimizer does; `dtensor_group`: the group to
    join when no group is given, see distributed.group_to_join) and returns a result whose `clip_coef`
    (inv_scale included) and `found_inf` apply to this step, and an on-device flag to skip it.
    Fused optimizers apply the coefficient and the skip in their own pass (one read of the
    gradients by fusedclip, no sync); others get the gradients scaled in one write pass and
    decide on the skip with one sync. The scaler records `found_inf` alone (a ShardedGradScaler
    the sum over its group, which then skips here too), so a skip that is not an overflow does
    not back off the scale. Returns `result`.
    """
    scaling = scaler is not None and scaler._enabled
    grads, names = _named_gradients(optimizer)
    state = _scaler_state(scaler, optimizer, funcname) if scaling else None
    if scaling:
        _check_not_float16(scaler, grads)
    fused = _is_fused(optimizer)
    dtensor_group = distributed.group_to_join(None, grads, _each_parameter(optimizer))
    inv_scale = _inv_scale(scaler) if scaling else None
    result, skip = measure(grads, names, inv_scale, fused, dtensor_group)
    # A fused optimizer's grad_scale is float32: float64 gradients (the norm's dtype says there
    # are some) take their coefficient at their own precision in the write pass instead.
    fused_scale = fused and result.total_norm.dtype != torch.float64
    if fused_scale:
        # Fused optimizers divide the gradients by grad_scale: the reciprocal of the combined
        # factor (inf when the factor is 0, i.e. max_norm=0 or an infinite norm: gradients become
        # 0, and the skip flag covers overflow anyway). A factor below 1 / FLOAT32_MAX (a scaled
        # norm past about 3e38 times max_norm) has a reciprocal float32 cannot hold: divided by
        # inf, the gradients would step as zeros. They cannot be clipped in that pass: the step
        # counts as an overflow (found_inf), so it is skipped, seen, and the scaler backs off,
        # which doubles the next step's factor.
        grad_scale = result.clip_coef.double().reciprocal()
        beyond_float32 = torch.isfinite(grad_scale) & (grad_scale.abs() > FLOAT32_MAX)
        result = _counted_as_overflow(result, beyond_float32)
        skip = skip.to(torch.bool) | beyond_float32.to(skip.device)
    flag = _recorded_flag(scaler, result.found_inf if grads else None) if scaling else None
    if flag is not None and _sharded_scaler(scaler)[0]:  # another rank's overflow skips here too
        skip = skip.to(torch.bool) | (flag.reshape(()) > 0).to(skip.device)
    if fused_scale:
        _step_unless(optimizer, skip, grad_scale.float())
    else:
        api.scale_(grads, result.clip_coef, backend=backend)
        _step_unless(optimizer, skip)
    if state is not None:
        _record_found_inf(scaler, optimizer, state, flag, OptState.STEPPED)
    return result


def _counted_as_overflow(result, overflows: torch.Tensor):
    """`result` (a ClipResult or ZClipResult) with found_inf (and skip) set where `overflows`."""
    found_inf = torch.maximum(result.found_inf, overflows.to(result.found_inf.dtype))
    if hasattr(result, "skip"):
        return result._replace(found_inf=found_inf, skip=result.skip | overflows)
    return result._replace(found_inf=found_inf)


def clip_step(
    optimizer: torch.optim.Optimizer,
    max_norm: float,
    *,
    scaler: GradScaler | None = None,
    norm_type: float | str = 2.0,
    per_tensor: bool = False,
    process_group=None,
    backend: str | None = None,
) -> ClipResult:
    """Unscale, clip and step in one read of the gradients (fused optimizers), without a sync.

    For `fused=True` Adam, AdamW and SGD the gradients are read once (norm, inf check) and the
    optimizer's own kernel divides them by `grad_scale = 1 / (inv_scale * clip factor)` and skips
    the step on `found_inf`. Any other optimizer takes the three-pass path: `unscale_clip_`, then
    `scaler.step` (which, for a non-fused optimizer, is torch's one sync on found_inf); without a
    scaler, `fused_clip_`, then the step unless found_inf (one sync). Either way a step whose
    gradients hold inf or NaN is skipped, scaler or not; with a fused optimizer so is one whose
    factor is below 1 / FLOAT32_MAX, which no float32 grad_scale can apply: it counts as an
    overflow (found_inf 1, the scaler backs off). With a scaler, call `scaler.update()`
    afterwards as usual.

    Raises:
        TypeError: `optimizer` is not an Optimizer, or `scaler` neither None nor a GradScaler.
        RuntimeError: a second call before `scaler.update()`.
        ValueError: a bad argument, float16 gradients with a scaler (as `scaler.unscale_`), or,
            for a fused optimizer, one gradient memory listed for two parameters (its step
            would scale it twice).
        AssertionError: as `scaler.step`, when the scaler holds no scale or, for a non-fused
            optimizer, no parameter has a gradient.
        No gradient is changed when it raises.
    """
    _check_scaler_and_optimizer(scaler, optimizer, "clip_step", scaler_optional=True)
    scaling = scaler is not None and scaler._enabled
    if scaling:
        _scaler_state(scaler, optimizer, "clip_step")  # refuses a second call before update()
    if not _is_fused(optimizer):
        if scaling:
            result = unscale_clip_(
                scaler,
                optimizer,
                max_norm,
                norm_type,
                per_tensor=per_tensor,
                process_group=process_group,
                backend=backend,
            )
            scaler.step(optimizer)
        else:
            grads = optimizer_gradients(optimizer)
            result = api.fused_clip_(
                grads,
                max_norm=max_norm,
                norm_type=norm_type,
                per_tensor=per_tensor,
                process_group=distributed.group_to_join(
                    process_group, grads, _each_parameter(optimizer)
                ),
                backend=backend,
            )
            _step_unless(optimizer, result.found_inf)
        return result

    def measure(grads, names, inv_scale, writes_after, dtensor_group):
        result = api.measure_named(
            grads,
            names,
            max_norm=max_norm,
            norm_type=norm_type,
            inv_scale=inv_scale,
            per_tensor=per_tensor,
            process_group=process_group if process_group is not None else dtensor_group,
            backend=backend,
            writes_after=writes_after,
        )
        return result, result.found_inf

    return _step_measured(optimizer, measure, scaler=scaler, backend=backend)


def step(
    optimizer: torch.optim.Optimizer,
    *,
    skip: torch.Tensor | None = None,
    scaler: GradScaler | None = None,
):
    """`scaler.step(optimizer)` (or `optimizer.step()`) that also skips the step when `skip`, an
    on-device bool such as `GradMonitor.should_skip` or `ZClipResult.skip`, is set. Returns what
    `optimizer.step()` returned (None when skipped on the host).

    Fused optimizers skip on the device (no sync); others decide with one sync, as
    GradScaler.step. The scaler keeps its own found_inf: a skip that is not an overflow does not
    back off the scale (and counts toward its growth interval, as any step without overflow).
    Gradients not yet unscaled are handled as `scaler.step` does: fused optimizers unscale them
    in their own pass, others through `scaler.unscale_` first.

    Raises:
        TypeError, ValueError: `skip` is not None or a one-element tensor; nothing is unscaled.
        RuntimeError: a second step before `scaler.update()`, as `scaler.step`.
        AssertionError: as `scaler.step`: no parameter of a non-fused optimizer has a gradient.
    """
    skip = _skip_flag(skip)
    scaling = scaler is not None and scaler._enabled
    if not scaling:
        return optimizer.step() if skip is None else _step_unless(optimizer, skip)
    _check_scale(scaler, "step")
    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is OptState.STEPPED:
        raise RuntimeError("step() has already been called since the last update().")
    # Summed on the scale's device, as GradScaler.step does; moved there before anything is
    # unscaled, so a skip that cannot be moved changes nothing.
    device = scaler._scale.device
    if skip is not None:
        skip = _to_device(skip, device)
    fused = _is_fused(optimizer)
    grad_scale = None
    if state["stage"] is OptState.READY:
        if fused:
            scaler._check_inf_per_device(optimizer)
            grad_scale = scaler._scale
        else:
            scaler.unscale_(optimizer)
    overflows = [
        _to_device(overflow, device) for overflow in state["found_inf_per_device"].values()
    ]
    if not overflows and not fused:  # scaler.step raises here; a fused optimizer steps nothing
        raise AssertionError("No inf checks were recorded for this optimizer.")
    flag = sum(overflows) if overflows else torch.zeros((), device=device)
    if skip is not None:
        flag = flag + skip
    result = _step_unless(optimizer, flag.clamp(max=1).reshape(()), grad_scale)
    state["stage"] = OptState.STEPPED
    return result


def _skip_flag(skip) -> torch.Tensor | None:
    """`skip` as a 0-dim float32 0 or 1 on its device (any nonzero or NaN value sets it, as
    bool() would), checked before anything is unscaled or stepped. Fused optimizers subtract
    their found_inf from the step count and skip only on exactly 1: a count of 2 stepped there
    and moved Adam's step back, a negative one cancelled a recorded overflow."""
    if skip is None:
        return None
    if not isinstance(skip, torch.Tensor):
        raise TypeError(
            f"skip must be None or a one-element tensor (an on-device flag such as "
            f"GradMonitor.should_skip), got a {type(skip).__name__}; for a flag known on the "
            "host, call amp.step only when the step is to be taken"
        )
    if skip.numel() != 1 or skip.is_complex():
        raise TypeError(
            f"skip must be a one-element bool or real tensor, got shape {tuple(skip.shape)} and "
            f"dtype {skip.dtype}; reduce it first (for example flags.any())"
        )
    return skip.reshape(()).ne(0).to(torch.float32)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    # A copy to the host must complete before the host reads it; one to an accelerator is ordered
    # on its stream.
    return tensor.to(device, non_blocking=device.type != "cpu")


__all__ = ["clip_step", "step", "unscale_clip_"]
