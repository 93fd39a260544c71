"""AMP: fused unscale-and-clip that cooperates with torch.amp.GradScaler, and clip_step.

`unscale_clip_` replaces `scaler.unscale_(optimizer); clip_grad_norm_(...)` with one fused call
(one read pass, one write pass) and leaves the scaler exactly as `unscale_` would, so
`scaler.step`, `scaler.update` and a second `scaler.unscale_` behave as usual.

`clip_step` is the one-read-pass path: the fused read measures the norm and finds infs, and a
fused optimizer (Adam, AdamW, SGD with `fused=True`) applies unscale and clip inside its own step
through its `grad_scale`/`found_inf` inputs, so fusedclip makes no write pass at all (torch's
fused kernels store the unscaled gradient back as part of the pass they make anyway).
"""

from __future__ import annotations

import torch
from torch.amp.grad_scaler import GradScaler, OptState

from fusedclip import api
from fusedclip.api import ClipResult


def _optimizer_gradients(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [
        param.grad
        for group in optimizer.param_groups
        for param in group["params"]
        if param.grad is not None
    ]


def _scaler_state(scaler: GradScaler, optimizer: torch.optim.Optimizer, funcname: str) -> dict:
    """The scaler's record for `optimizer`, after torch's own checks for `unscale_`.

    Reads the scaler's fields rather than calling its methods: torch.compile does not trace into
    torch.amp, and this keeps unscale_clip_ free of graph breaks.
    """
    if scaler._scale is None:
        raise AssertionError(
            f"Attempted {funcname} but _scale is None.  This may indicate your script did not use "
            "scaler.scale(loss or outputs) earlier in the iteration."
        )
    states = scaler._per_optimizer_states
    state = states.get(id(optimizer))
    if state is None:
        state = states[id(optimizer)] = {"stage": OptState.READY, "found_inf_per_device": {}}
    if state["stage"] is OptState.UNSCALED:
        raise RuntimeError(
            "unscale_() has already been called on this optimizer since the last update()."
        )
    if state["stage"] is OptState.STEPPED:
        raise RuntimeError("unscale_() is being called after step().")
    return state


def _inv_scale(scaler: GradScaler) -> torch.Tensor:
    # As GradScaler.unscale_: the reciprocal in float64, then float32.
    return scaler._scale.double().reciprocal().float()


def _check_not_float16(grads: list[torch.Tensor]) -> None:
    # GradScaler refuses float16 gradients (float16 parameters); so do we, with its message.
    if any(grad.dtype == torch.float16 for grad in grads):
        raise ValueError("Attempting to unscale FP16 gradients.")


def _record_found_inf(state: dict, found_inf: torch.Tensor | None, stage: OptState) -> None:
    state["found_inf_per_device"] = {} if found_inf is None else {found_inf.device: found_inf}
    state["stage"] = stage


def unscale_clip_(
    scaler: GradScaler,
    optimizer: torch.optim.Optimizer,
    max_norm: float,
    norm_type: float | str = 2.0,
    *,
    clip_value: float | None = None,
    process_group=None,
    backend: str | None = None,
) -> ClipResult:
    """`scaler.unscale_(optimizer)` then `clip_grad_norm_` (then a value clamp), fused.

    Returns the ClipResult of the unscaled gradients. The scaler records `found_inf` for the
    optimizer and marks it unscaled, so `scaler.step(optimizer)` skips the step on overflow and
    does not unscale again. With a disabled scaler this is plain clipping.
    """
    grads = _optimizer_gradients(optimizer)
    if not scaler._enabled:
        return api.fused_clip_(
            grads,
            max_norm=max_norm,
            norm_type=norm_type,
            clip_value=clip_value,
            process_group=process_group,
            backend=backend,
        )
    state = _scaler_state(scaler, optimizer, "unscale_")
    _check_not_float16(grads)
    result = api.fused_clip_(
        grads,
        max_norm=max_norm,
        norm_type=norm_type,
        clip_value=clip_value,
        inv_scale=_inv_scale(scaler),
        process_group=process_group,
        backend=backend,
    )
    _record_found_inf(state, result.found_inf if grads else None, OptState.UNSCALED)
    return result


def _is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and bool(
        optimizer.defaults.get("fused")
    )


def clip_step(
    optimizer: torch.optim.Optimizer,
    max_norm: float,
    *,
    scaler: GradScaler | None = None,
    norm_type: float | str = 2.0,
    process_group=None,
    backend: str | None = None,
) -> ClipResult:
    """Unscale, clip and step in one read of the gradients (fused optimizers), without a sync.

    For `fused=True` Adam, AdamW and SGD the gradients are read once (norm, inf check) and the
    optimizer's own kernel divides them by `grad_scale = 1 / (inv_scale * clip factor)` and skips
    the step on `found_inf`. Any other optimizer takes the three-pass path: `unscale_clip_`, then
    `scaler.step` (which, for a non-fused optimizer, is torch's one sync on found_inf). With a
    scaler, call `scaler.update()` afterwards as usual.
    """
    scaling = scaler is not None and scaler._enabled
    if not _is_fused(optimizer):
        if scaling:
            result = unscale_clip_(
                scaler, optimizer, max_norm, norm_type, process_group=process_group, backend=backend
            )
            scaler.step(optimizer)
        else:
            result = api.fused_clip_(
                _optimizer_gradients(optimizer),
                max_norm=max_norm,
                norm_type=norm_type,
                process_group=process_group,
                backend=backend,
            )
            optimizer.step()
        return result

    grads = _optimizer_gradients(optimizer)
    state = _scaler_state(scaler, optimizer, "step") if scaling else None
    if not grads:
        if state is not None:
            _record_found_inf(state, None, OptState.STEPPED)
        optimizer.step()
        return api.fused_clip_([], max_norm=max_norm)
    if scaling:
        _check_not_float16(grads)
    result = api.measure(
        grads,
        max_norm=max_norm,
        norm_type=norm_type,
        inv_scale=_inv_scale(scaler) if scaling else None,
        process_group=process_group,
        backend=backend,
    )
    # Fused optimizers divide the gradients by grad_scale: the reciprocal of the combined factor
    # (inf when the factor is 0, i.e. max_norm=0 or an infinite norm: gradients become 0, and
    # found_inf skips the step anyway on overflow).
    optimizer.grad_scale = result.clip_coef.double().reciprocal().float()
    optimizer.found_inf = result.found_inf
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale
        del optimizer.found_inf
    if state is not None:
        _record_found_inf(state, result.found_inf, OptState.STEPPED)
    return result


__all__ = ["clip_step", "unscale_clip_"]
