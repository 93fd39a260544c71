"""accelerate: `Accelerator.clip_grad_norm_` / `clip_grad_value_` with the unscale fused in.

    from fusedclip.integrations.accelerate import FusedAccelerator
    accelerator = FusedAccelerator(mixed_precision="fp16")       # or: enable(Accelerator(...))

accelerate's `clip_grad_norm_` calls `scaler.unscale_` for every prepared optimizer and then
`torch.nn.utils.clip_grad_norm_`. Here, with fp16 and a GradScaler, the gradients of the one
prepared optimizer that holds exactly the given parameters are unscaled, checked for inf/NaN,
measured and clipped by one `fusedclip.amp.unscale_clip_` call, recorded in the scaler as
`unscale_` records it (so the optimizer step is skipped on overflow, and
`accelerator.optimizer_step_was_skipped` says so). The returned norm is the same number, a
float32 tensor. Without a scaler (fp32, bf16) the clip is `fusedclip.clip_grad_norm_`.

One difference, on purpose: `clip_grad_norm_(tensor)` clips that tensor's gradient, as
torch.nn.utils does (and accelerate's own `clip_grad_value_`); accelerate's `clip_grad_norm_`
iterates the tensor's rows, which have no gradients, and clips nothing.

Kept as accelerate does it: FSDP, DeepSpeed, XLA and Megatron (they clip through their own
engines), DTensor gradients, and parameters that several optimizers (or a subset of one) hold,
where accelerate's unscale of all optimizers comes first and only the clip is fusedclip's.
"""

from __future__ import annotations

import types

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor

import fusedclip
from fusedclip import api, plan

# Set-ups that clip through an engine of their own (accelerate's clip_grad_norm_ defers to it);
# every other one (one device, DDP on any device type) holds plain gradients.
_ENGINE_TYPES = (
    DistributedType.FSDP,
    DistributedType.DEEPSPEED,
    DistributedType.XLA,
    DistributedType.MEGATRON_LM,
)


def _unwrapped(optimizer) -> torch.optim.Optimizer:
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _parameters(parameters) -> list:
    """`parameters` as a list, each entry checked to have a `.grad` (a TypeError naming it, as
    fusedclip's clip gives, before anything is unscaled)."""
    parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    plan.gradients_of(parameters, "parameters")
    return parameters


def _optimizer_holding_exactly(accelerator: Accelerator, parameters: list[torch.Tensor]):
    """The one prepared optimizer whose parameters with gradients are exactly `parameters`'."""
    if len(accelerator._optimizers) != 1:
        return None
    optimizer = _unwrapped(accelerator._optimizers[0])
    held = {
        id(p) for group in optimizer.param_groups for p in group["params"] if p.grad is not None
    }
    given = {id(p) for p in parameters if p.grad is not None}
    return optimizer if held == given else None


def _fused_path(accelerator: Accelerator, parameters: list[torch.Tensor]) -> bool:
    return accelerator.distributed_type not in _ENGINE_TYPES and not any(
        isinstance(p.grad, DTensor) for p in parameters if p.grad is not None
    )


def _scaling(accelerator: Accelerator) -> bool:
    # The condition under which Accelerator.unscale_gradients unscales.
    return bool(accelerator.native_amp and accelerator.mixed_precision == "fp16")


def clip_grad_norm_(self: Accelerator, parameters, max_norm, norm_type=2):
    """Accelerator.clip_grad_norm_, with unscale and clip in one fused call where it can."""
    parameters = _parameters(parameters)
    if not _fused_path(self, parameters):
        return Accelerator.clip_grad_norm_(self, parameters, max_norm, norm_type)
    # Checked before anything is unscaled, as fusedclip.clip_grad_norm_ checks them (the fused
    # call below would take max_norm=None for "no clip").
    max_norm = api.check_bound(max_norm, "max_norm")
    norm_type = api.check_norm_type(norm_type)
    if _scaling(self):
        optimizer = _optimizer_holding_exactly(self, parameters)
        if optimizer is not None:
            return fusedclip.amp.unscale_clip_(
                self.scaler, optimizer, max_norm, norm_type
            ).total_norm
        self.unscale_gradients()
    return fusedclip.clip_grad_norm_(parameters, max_norm, norm_type)


def clip_grad_value_(self: Accelerator, parameters, clip_value):
    """Accelerator.clip_grad_value_, with unscale and clamp in one fused call where it can."""
    parameters = _parameters(parameters)
    if not _fused_path(self, parameters):
        return Accelerator.clip_grad_value_(self, parameters, clip_value)
    clip_value = api.check_bound(clip_value, "clip_value")  # as for max_norm
    if _scaling(self):
        optimizer = _optimizer_holding_exactly(self, parameters)
        if optimizer is not None:
            fusedclip.amp.unscale_clip_(self.scaler, optimizer, None, clip_value=clip_value)
            return None
        self.unscale_gradients()
    fusedclip.clip_grad_value_(parameters, clip_value)
    return None


class FusedAccelerator(Accelerator):
    """An Accelerator whose `clip_grad_norm_` and `clip_grad_value_` run fusedclip's fused
    unscale + clip (see the module's docstring for where it keeps accelerate's own path)."""

    clip_grad_norm_ = clip_grad_norm_
    clip_grad_value_ = clip_grad_value_


def enable(accelerator: Accelerator) -> Accelerator:
    """Give an existing Accelerator fusedclip's `clip_grad_norm_` and `clip_grad_value_`;
    returns it."""
    if not isinstance(accelerator, Accelerator):
        raise TypeError(
            f"accelerator is a {type(accelerator).__name__}, not an accelerate.Accelerator"
        )
    accelerator.clip_grad_norm_ = types.MethodType(clip_grad_norm_, accelerator)
    accelerator.clip_grad_value_ = types.MethodType(clip_grad_value_, accelerator)
    return accelerator
