"""The implementations compared, per op, on one prepared gradient set (a `Case`).

Ops: norm (measure only), clip (clip by norm), unscale_clip (AMP unscale + inf check + clip),
clip_value (clamp), clip_step (unscale + clip + fused AdamW step), and amp_unscale_clip (what
`scaler.unscale_(optimizer)` + `clip_grad_norm_` do, through the GradScaler: bench.host times its
host cost). Every provider returns the norm it computed (None for clip_value), which the harness
checks against the float64 norm of the gradients, computed here.

Peers: torch's default (foreach) path, the baseline of every ratio; torch's per-tensor loop;
torch.compile (inductor) of torch's path, compiled once per gradient set and timed warm; NVIDIA
apex when installed; each fusedclip backend that runs on the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import fusedclip

OPS = ("norm", "clip", "unscale_clip", "clip_value", "clip_step", "amp_unscale_clip")
MAIN_OPS = OPS[:5]  # what `python -m bench` times unless --ops says otherwise
LOSS_SCALE = 65536.0
# Passes over the gradient bytes that the cheapest correct implementation must make, for the
# floor: norm reads once; clip and unscale_clip read, then read and write; clip_value reads and
# writes. clip_step: one norm read, then the fused AdamW step reads grad, param, exp_avg,
# exp_avg_sq and writes the last three (fp32 state the size of the gradients).
FLOOR_PASSES = {
    "norm": 1,
    "clip": 3,
    "unscale_clip": 3,
    "clip_value": 2,
    "clip_step": 8,
    "amp_unscale_clip": 3,
}
OPTIMIZER_OPS = ("clip_step", "amp_unscale_clip")  # need parameters, an optimizer, a scaler
TORCH_BASELINE = "torch"
TORCH_COMPILE = "torch-compile"


@dataclass
class Case:
    """A gradient set, its pristine copy and what the ops need; restored before every sample."""

    grads: list[torch.Tensor]
    saved: list[torch.Tensor]
    holders: list[torch.Tensor]  # whose .grad is each gradient (parameters with an optimizer)
    inv_scale: torch.Tensor
    found_inf: torch.Tensor
    norm: float  # float64 reference norm of the saved (loss-scaled) gradients
    optimizer: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None

    @property
    def unscaled_norm(self) -> float:
        return self.norm / LOSS_SCALE

    @property
    def max_norm(self) -> float:
        """Half the norm: every clip really clips (fusedclip skips the write when nothing would)."""
        return self.norm / 2

    @property
    def unscaled_max_norm(self) -> float:
        return self.unscaled_norm / 2

    @property
    def clip_value(self) -> float:
        return LOSS_SCALE * 0.5

    def restore(self) -> None:
        torch._foreach_copy_(self.grads, self.saved)
        self.found_inf.zero_()
        if self.scaler is not None:
            # What scaler.update() does at its end: every optimizer back to "not unscaled yet",
            # so that the next sample may unscale again without timing an update().
            self.scaler._per_optimizer_states.clear()


def reference_norm(tensors: list[torch.Tensor], norm_type: float = 2.0) -> float:
    """The float64 p-norm of all `tensors` together, on their device (the check of every row)."""
    per_tensor = torch.stack(
        [torch.linalg.vector_norm(t.detach().double(), norm_type) for t in tensors]
    )
    return float(torch.linalg.vector_norm(per_tensor, norm_type))


def make_case(tensors: list[torch.Tensor], with_optimizer: bool) -> Case:
    """Loss-scales `tensors` (in place) into the saved copy and prepares the live gradients."""
    saved = [t.mul_(LOSS_SCALE) for t in tensors]
    grads = [t.clone() for t in saved]
    device = grads[0].device
    case = Case(
        grads=grads,
        saved=saved,
        holders=[_grad_holder(g) for g in grads],
        inv_scale=torch.full((), 1.0 / LOSS_SCALE, device=device),
        found_inf=torch.zeros(1, device=device),
        norm=reference_norm(saved),
    )
    if with_optimizer:
        parameters = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for parameter, grad in zip(parameters, grads, strict=True):
            parameter.grad = grad
        case.holders = parameters
        case.optimizer = torch.optim.AdamW(parameters, lr=1e-4, fused=True)
        # A fixed scale: growth would change the work between samples.
        case.scaler = torch.amp.GradScaler(
            device.type, init_scale=LOSS_SCALE, growth_interval=1 << 30
        )
        case.scaler.scale(
            torch.zeros((), device=device)
        )  # creates its scale tensor, as scale(loss) would
    return case


def _grad_holder(grad: torch.Tensor) -> torch.Tensor:
    """Stands in for a parameter: a tensor of the gradient's shape on one element of storage (an
    expanded scalar), whose .grad is the gradient. The drop-ins accept only tensors and read only
    their .grad, so no parameter-sized memory is needed."""
    holder = torch.empty((), dtype=grad.dtype, device=grad.device).expand(grad.shape)
    holder.grad = grad
    return holder


def _torch_unscale(case: Case) -> None:
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for grad in case.grads:
        by_dtype.setdefault(grad.dtype, []).append(grad)
    for grads in by_dtype.values():
        torch._amp_foreach_non_finite_check_and_unscale_(grads, case.found_inf, case.inv_scale)


def torch_provider(foreach: bool | None) -> dict[str, Callable[[Case], torch.Tensor | None]]:
    def norm(case):
        return torch.nn.utils.get_total_norm(case.grads, foreach=foreach)

    def clip(case):
        return torch.nn.utils.clip_grad_norm_(case.holders, case.max_norm, foreach=foreach)

    def unscale_clip(case):
        _torch_unscale(case)
        return torch.nn.utils.clip_grad_norm_(case.holders, case.unscaled_max_norm, foreach=foreach)

    def clip_value(case):
        torch.nn.utils.clip_grad_value_(case.holders, case.clip_value, foreach=foreach)

    def clip_step(case):
        case.scaler.unscale_(case.optimizer)
        total = torch.nn.utils.clip_grad_norm_(
            case.holders, case.unscaled_max_norm, foreach=foreach
        )
        case.scaler.step(case.optimizer)
        case.scaler.update()
        return total

    def amp_unscale_clip(case):
        case.scaler.unscale_(case.optimizer)
        return torch.nn.utils.clip_grad_norm_(case.holders, case.unscaled_max_norm, foreach=foreach)

    return {
        "norm": norm,
        "clip": clip,
        "unscale_clip": unscale_clip,
        "clip_value": clip_value,
        "clip_step": clip_step,
        "amp_unscale_clip": amp_unscale_clip,
    }


def _torch_clip_path(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """clip_grad_norm_'s own steps (get_total_norm, then clip_grads_with_norm_'s foreach multiply)
    written over the gradient list, so that torch.compile guards on tensors, not on holders."""
    total = torch.nn.utils.get_total_norm(grads)
    torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


def _torch_unscale_clip_path(grads, found_inf, inv_scale, max_norm: float) -> torch.Tensor:
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
    return _torch_clip_path(grads, max_norm)


def torch_compile_provider() -> dict[str, Callable[[Case], torch.Tensor | None]]:
    """torch.compile (inductor, default mode) of torch's AMP unscale + clip path, the one path
    users would compile instead of adopting fusedclip (compiling takes tens of seconds per
    gradient set on a small CPU, about 0.3 s per gradient tensor on 2 busy cores). Each provider
    dict holds its own compiled function: the harness makes a new one per gradient set (after
    torch._dynamo.reset()), so that sets never share guards or hit the recompile limit."""
    compiled_unscale_clip = torch.compile(_torch_unscale_clip_path)

    def unscale_clip(case):
        return compiled_unscale_clip(
            case.grads, case.found_inf, case.inv_scale, case.unscaled_max_norm
        )

    return {"unscale_clip": unscale_clip}


def fusedclip_provider(backend: str) -> dict[str, Callable[[Case], torch.Tensor | None]]:
    def norm(case):
        return fusedclip.get_total_norm(case.grads, backend=backend)

    def clip(case):
        return fusedclip.clip_grad_norm_(case.holders, case.max_norm, backend=backend)

    def unscale_clip(case):
        result = fusedclip.fused_clip_(
            case.grads, max_norm=case.unscaled_max_norm, inv_scale=case.inv_scale, backend=backend
        )
        return result.total_norm

    def clip_value(case):
        fusedclip.clip_grad_value_(case.holders, case.clip_value, backend=backend)

    ops = {"norm": norm, "clip": clip, "unscale_clip": unscale_clip, "clip_value": clip_value}
    try:
        from fusedclip.amp import clip_step as fused_clip_step
    except ImportError:
        return ops

    from fusedclip.amp import unscale_clip_

    def clip_step(case):
        result = fused_clip_step(case.optimizer, case.unscaled_max_norm, scaler=case.scaler)
        case.scaler.update()
        return result.total_norm

    def amp_unscale_clip(case):
        return unscale_clip_(
            case.scaler, case.optimizer, case.unscaled_max_norm, backend=backend
        ).total_norm

    ops["clip_step"] = clip_step
    ops["amp_unscale_clip"] = amp_unscale_clip
    return ops


def apex_provider() -> dict[str, Callable[[Case], torch.Tensor | None]] | None:
    """NVIDIA apex's multi-tensor l2norm + scale, the two-call path frameworks wrap; None if absent."""
    try:
        import amp_C
        from apex.multi_tensor_apply import multi_tensor_applier
    except ImportError:
        return None

    def norm(case):
        overflow = torch.zeros(1, dtype=torch.int, device=case.grads[0].device)
        total, _ = multi_tensor_applier(amp_C.multi_tensor_l2norm, overflow, [case.grads], False)
        return total

    def clip(case):
        total = norm(case)
        coef = (case.max_norm / (total + 1e-6)).clamp(max=1.0)
        overflow = torch.zeros(1, dtype=torch.int, device=case.grads[0].device)
        multi_tensor_applier(amp_C.multi_tensor_scale, overflow, [case.grads, case.grads], coef)
        return total

    return {"norm": norm, "clip": clip}


def providers(device: str, compiled: bool = False) -> dict[str, dict[str, Callable]]:
    """Provider name -> {op: function}. The torch default path is the baseline of every ratio.
    `compiled` adds torch.compile of torch's path (fresh compiled functions on every call)."""
    found = {
        "torch-loop": torch_provider(foreach=False),
        TORCH_BASELINE: torch_provider(foreach=None),
    }
    if compiled:
        found[TORCH_COMPILE] = torch_compile_provider()
    apex = apex_provider() if device == "cuda" else None
    if apex is not None:
        found["apex"] = apex
    for backend in fusedclip.backends():
        if (
            backend == "reference"
            or fusedclip.dispatch.unavailable_reason(backend, device) is not None
        ):
            continue
        if backend == "triton" and device == "cpu":
            continue  # the interpreter is for tests, not timings
        found[f"fusedclip-{backend}"] = fusedclip_provider(backend)
    return found


def expected_norm(case: Case, op: str) -> float | None:
    """The float64 reference value of what `op` returns on the restored gradients."""
    if op == "norm" or op == "clip":
        return case.norm
    if op in ("unscale_clip", "clip_step", "amp_unscale_clip"):
        return case.unscaled_norm
    return None
