"""Stability tools that keep their state on the device and never sync per step.

ZClip (adaptive z-score clipping), AGC (unit-wise adaptive gradient clipping, NFNets) and
GradMonitor (an on-device history of norms, clip coefficients and overflows, read back only when
asked). Each takes parameters or gradients; ZClip and GradMonitor also an optional `inv_scale`,
so that they compose with AMP. AGC compares gradients with weights, so it runs on unscaled
gradients (after `amp.unscale_clip_(scaler, optimizer, None)` under a GradScaler).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch

from fusedclip import amp, api, distributed, plan
from fusedclip.grad_mode import without_grad
from fusedclip.norms import NORM_EPS, SUPPORTED_DTYPES


def _gradients(parameters) -> list[torch.Tensor]:
    """The gradients of `parameters` when it holds any parameter (those without a gradient
    skipped), else the tensors themselves: a list of gradients. Decided for the whole list, so a
    frozen weight beside the parameters is never taken for a gradient and scaled, and a parameter
    that got no gradient this step is skipped, as torch's clip_grad_norm_ skips it."""
    items = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    if any(_is_parameter(item) for item in items):
        return plan.gradients_of(items, "parameters")[0]
    return items


def _is_parameter(item) -> bool:
    """A Parameter, or a leaf tensor that requires grad or holds a .grad (a gradient computed
    with create_graph=True requires grad too, but is no leaf)."""
    if isinstance(item, torch.nn.Parameter):
        return True
    return (
        isinstance(item, torch.Tensor)
        and item.is_leaf
        and (item.requires_grad or item.grad is not None)
    )


def _check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _check_fraction(name: str, value) -> float:
    value = api.to_float(value, name, "a number in (0, 1)")
    if not 0 < value < 1:
        raise ValueError(f"{name} must be in (0, 1), got {value}")
    return value


def _copied(value: torch.Tensor | None) -> torch.Tensor | None:
    """State handed out by state_dict, or loaded from one: a copy, since later steps write the
    state in place and a state_dict may be loaded again."""
    return None if value is None else value.detach().clone()


class _SavedState:
    """A state_dict being loaded into `owner`, checked entry by entry before anything is kept:
    each check raises a ValueError that names the entry, and the caller assigns what the checks
    return only after the last one passed."""

    def __init__(self, owner, state, keys: tuple[str, ...]):
        self.kind = type(owner).__name__
        missing = [key for key in keys if key not in state] if isinstance(state, dict) else keys
        if missing:
            raise ValueError(
                f"{self.kind}.load_state_dict: state_dict lacks {', '.join(missing)}; pass what "
                f"{self.kind}.state_dict() returned"
            )
        self.state = state

    def refusal(self, what: str) -> ValueError:
        return ValueError(f"{self.kind}.load_state_dict: {what}")

    def same_argument(self, key: str, own, argument: str | None = None) -> None:
        """The argument that shaped the saved state (`argument`, stored as `key`) is `own`."""
        saved, argument = self.state[key], argument or key
        if saved != own:
            raise self.refusal(
                f"the state was saved with {argument}={saved!r} and this {self.kind} has "
                f"{argument}={own!r}; construct it with {argument}={saved!r}"
            )

    def count(self, key: str) -> int:
        value = self.state[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.refusal(f"{key} must be an integer >= 0, got {value!r}")
        return value

    def all_or_none(self, keys: tuple[str, ...]) -> None:
        """The state of `keys` is all started (tensors) or all not yet (None)."""
        started = [self.state[key] is not None for key in keys]
        if any(started) and not all(started):
            raise self.refusal(f"{', '.join(keys)} must all be tensors or all be None")

    def tensor(
        self, key: str, shape: tuple[int, ...] | None, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """A saved tensor (or None: not started), copied. `shape`: what it must be (None: any);
        `dtype`: what the owner makes it. Its device is kept; the next step moves the state to
        the gradients' device when it lies elsewhere."""
        value = self.state[key]
        if value is None:
            return None
        if not isinstance(value, torch.Tensor):
            raise self.refusal(f"{key} must be a tensor or None, got {type(value).__name__}")
        if shape is not None and tuple(value.shape) != shape:
            raise self.refusal(f"{key} must have shape {shape}, got {tuple(value.shape)}")
        if value.dtype != dtype:
            raise self.refusal(f"{key} must be a {dtype} tensor, got {value.dtype}")
        if value.device.type == "meta":
            raise self.refusal(f"{key} is a meta tensor, which holds no state")
        return _copied(value)


def _on(value: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return value if value is None or value.device == device else value.to(device)


class ZClipResult(NamedTuple):
    total_norm: torch.Tensor  # the norm before clipping (of the unscaled gradients)
    found_inf: torch.Tensor
    clip_coef: torch.Tensor  # the factor for the gradients (inv_scale included); a skipped fused
    # clip_step leaves them as they were
    threshold: torch.Tensor  # the clip threshold this step
    spike: torch.Tensor  # bool: the z-score exceeded z_thresh (never during warm-up)
    skip: torch.Tensor  # bool: skip this step (overflow; or a spike, with skip_on_spike)


class SkipBudget:
    """At most `max_skips` skipped spikes in any `window` consecutive steps, decided on the device.

    Skipping is for rare outliers. A lasting rise in the norm, or a batch that spikes every few
    steps, would be skipped forever by a rule that only looks at the norm (the skipped steps never
    move the weights that would bring it down); past the budget such spikes go through (clipped).
    """

    def __init__(self, max_skips: int = 3, window: int = 100):
        _check_skip_budget(max_skips, window, "window")
        self.max_skips, self.window = max_skips, window
        self._recent: torch.Tensor | None = None  # ring of the last `window` decisions
        # Decisions taken, on the ring's device with it: a host int would be a constant of a
        # compiled step, compiled again every step.
        self._steps: torch.Tensor | None = None

    def state_dict(self) -> dict:
        steps = 0 if self._steps is None else int(self._steps)
        return {"window": self.window, "recent": _copied(self._recent), "steps": steps}

    def load_state_dict(self, state: dict) -> None:
        self._restore(self._checked(state, "window"))

    def _restore(self, ring: tuple[torch.Tensor | None, int]) -> None:
        """Sets the state `_checked` returned."""
        self._recent, steps = ring
        self._steps = None if self._recent is None else _step_count(steps, self._recent.device)

    def _checked(self, state, window_argument: str, owner=None) -> tuple[torch.Tensor | None, int]:
        """(ring, steps) of a saved state, checked; `window_argument` is what the caller's
        constructor calls the window, `owner` what messages name (the ZClip or GradMonitor
        whose budget this is; this SkipBudget by default)."""
        saved = _SavedState(owner or self, state, ("window", "recent", "steps"))
        saved.same_argument("window", self.window, window_argument)
        return saved.tensor("recent", (self.window,), torch.bool), saved.count("steps")

    def take(self, spike: torch.Tensor) -> torch.Tensor:
        """`spike` where the budget allows skipping it; records the decision."""
        if self._recent is None:
            self._recent = torch.zeros(self.window, dtype=torch.bool, device=spike.device)
            self._steps = _step_count(0, spike.device)
        elif self._recent.device != spike.device:  # loaded from elsewhere
            self._recent, self._steps = self._recent.to(spike.device), self._steps.to(spike.device)
        slot = torch.arange(self.window, device=spike.device) == self._steps % self.window
        earlier = (self._recent & ~slot).sum()
        skip = spike & (earlier < self.max_skips)
        self._recent = torch.where(slot, skip, self._recent)
        self._steps = self._steps + 1
        return skip


def _check_skip_budget(max_skips, window, window_argument: str) -> None:
    """SkipBudget's arguments; `window_argument` is what the caller's constructor calls the
    window."""
    _check_count("max_skips", max_skips, 1)
    # A window of max_skips steps would let every step be skipped: what the budget prevents.
    _check_count(window_argument, window, max_skips + 1)


def _step_count(steps: int, device: torch.device) -> torch.Tensor:
    """A step counter on the device: indexing the state with it, unlike with a host int, leaves
    a compiled step the same graph every step."""
    return torch.tensor(steps, dtype=torch.int64, device=device)


class ZClip:
    """Adaptive clipping on the z-score of the gradient norm (Kumar et al., 2025).

    Warm-up: the gradients are clipped to `max_norm` while the first `warmup_steps` finite norms
    are recorded; their mean and variance start the EMAs (overflowed steps, common early in fp16
    training, do not count). Then each step: z = (g - mean) / std; when z > z_thresh the norm is
    clipped to g' = mean + (z_thresh^2 / z) * std ("adaptive", the paper's default) or to
    g' = mean + z_thresh * std ("percentile"), else g' = g; the EMAs are updated with g':
    mean <- alpha * mean + (1 - alpha) * g', var <- alpha * var + (1 - alpha) * (g' - mean)^2
    (with the updated mean), as the reference implementation. `max_norm`, when given, caps the
    clip applied (min(g', max_norm)) but not the statistics, again as the reference: capped
    statistics would call every step above `max_norm` a spike. Non-finite norms neither clip by z
    nor enter the EMAs; nor does a step without any gradient, which measures nothing, nor a norm
    of 0 (all-zero gradients), which is then left as it is.

    `skip_on_spike=True` also marks a spike step to be skipped (`result.skip`; `clip_step` and
    `fusedclip.amp.step` honour it on the device), within a budget of `max_skips` skipped steps
    in any `skip_window` (see SkipBudget); spikes past it are clipped, as without the option.
    `result.skip` is also set when the norm is not finite.
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        max_norm: float | None = 1.0,
        mode: str = "adaptive",
        eps: float = 1e-6,
        skip_on_spike: bool = False,
        max_skips: int = 3,
        skip_window: int = 100,
        process_group=None,
        backend: str | None = None,
    ):
        alpha = _check_fraction("alpha", alpha)
        z_thresh = api.to_float(z_thresh, "z_thresh", "a number > 0")
        if not z_thresh > 0:
            raise ValueError(f"z_thresh must be > 0, got {z_thresh}")
        if mode == "zscore":  # one name, two rules: refused rather than guessed
            raise ValueError(
                "mode='zscore' is ambiguous: the reference implementation's mode='zscore' (its "
                "default, with clip_option='adaptive_scaling') is mode='adaptive' here, and the "
                "fixed threshold mean + z_thresh * std (the reference's mode='percentile', "
                "called 'zscore' here before) is mode='percentile'"
            )
        if mode not in ("adaptive", "percentile"):
            raise ValueError(f"mode must be 'adaptive' or 'percentile', got {mode!r}")
        _check_count("warmup_steps", warmup_steps, 1)
        if max_norm is not None:
            expected = "a non-negative number or None"
            if isinstance(max_norm, bool):
                raise ValueError(f"max_norm must be {expected}, got {max_norm}")
            max_norm = api.to_float(max_norm, "max_norm", expected)
            if not max_norm >= 0:
                raise ValueError(f"max_norm must be {expected}, got {max_norm}")
        eps = api.to_float(eps, "eps", "a finite number > 0")
        if not (eps > 0 and math.isfinite(eps)):
            # The floor of the standard deviation: a NaN one would make every z-score NaN, and
            # so never a spike.
            raise ValueError(f"eps must be a finite number > 0, got {eps}")
        _check_bool("skip_on_spike", skip_on_spike)
        api.check_backend(backend)
        distributed.check_process_group(process_group)
        self.alpha, self.z_thresh, self.warmup_steps = alpha, z_thresh, warmup_steps
        self.max_norm, self.mode, self.eps, self.backend = max_norm, mode, eps, backend
        self.skip_on_spike = skip_on_spike
        _check_skip_budget(max_skips, skip_window, "skip_window")
        self._skip_budget = SkipBudget(max_skips, skip_window)
        self.process_group = process_group  # sharded gradients: every rank sees the global norm
        # All state lives on the gradients' device, created at the first step.
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None
        self._warmup_norms: torch.Tensor | None = None
        self._warmup_count: torch.Tensor | None = None  # finite, nonzero norms recorded so far

    def _z_clipped(
        self, norm: torch.Tensor, sampled: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(g', spike): the norm clipped by the z-score rule (before max_norm), and whether it was
        (never where the norm is no `sampled` one: not finite, or 0)."""
        std = self.var.sqrt().clamp(min=self.eps)
        z = (norm - self.mean) / std
        spike = (z > self.z_thresh) & sampled
        if self.mode == "adaptive":
            clipped_to = self.mean + (self.z_thresh**2 / z.clamp(min=self.z_thresh)) * std
        else:
            clipped_to = self.mean + self.z_thresh * std
        return torch.where(spike, clipped_to, norm), spike

    # Each state tensor's dtype, by attribute.
    _STATE = {
        "mean": torch.float64,
        "var": torch.float64,
        "_warmup_norms": torch.float64,
        "_warmup_count": torch.int64,
    }

    def state_dict(self) -> dict:
        """The EMAs, the warm-up so far and the skip budget's ring (copies, on their device), for
        a checkpoint; the constructor's arguments are not in it."""
        state = {name.lstrip("_"): _copied(getattr(self, name)) for name in self._STATE}
        return state | {
            "warmup_steps": self.warmup_steps,
            "skip_budget": self._skip_budget.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resumes from `state_dict()`'s state. warmup_steps and skip_window must be as saved
        (they shape the state); the other arguments are this ZClip's own. Checked whole before
        anything is loaded."""
        keys = tuple(name.lstrip("_") for name in self._STATE)
        saved = _SavedState(self, state, (*keys, "warmup_steps", "skip_budget"))
        saved.same_argument("warmup_steps", self.warmup_steps)
        ring = self._skip_budget._checked(state["skip_budget"], "skip_window", self)
        saved.all_or_none(keys)
        shapes = self._state_shapes()
        tensors = [
            saved.tensor(key, shapes.get(name, ()), dtype)
            for key, (name, dtype) in zip(keys, self._STATE.items(), strict=True)
        ]
        for key in ("mean", "var"):  # statistics of norms: a NaN or negative one skews every step
            value = tensors[keys.index(key)]
            if value is not None and not (torch.isfinite(value) & (value >= 0)).item():
                raise saved.refusal(f"{key} must be a finite number >= 0, got {value.item()}")
        count = tensors[keys.index("warmup_count")]
        if count is not None and not 0 <= count.item() <= self.warmup_steps:
            raise saved.refusal(
                f"warmup_count must be in [0, warmup_steps={self.warmup_steps}], got {count.item()}"
            )
        for name, value in zip(self._STATE, tensors, strict=True):
            setattr(self, name, value)
        self._skip_budget._restore(ring)

    def _state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each state tensor's shape where it is not (), by attribute."""
        return {"_warmup_norms": (self.warmup_steps,)}

    def _start(self, device: torch.device) -> None:
        shapes = self._state_shapes()
        for name, dtype in self._STATE.items():
            setattr(self, name, torch.zeros(shapes.get(name, ()), dtype=dtype, device=device))

    def _measure(
        self,
        grads: list[torch.Tensor],
        inv_scale: float | torch.Tensor | None,
        writes_after: bool = False,
        dtensor_group=None,
        names: str | plan.TensorNames = "tensors",
    ) -> ZClipResult:
        """One read of the gradients and the rule's update, on the device; touches no gradient,
        but checks them for the write that follows, before the state changes (`writes_after`:
        the caller writes each one itself, as `api.measure_before_scale`'s `writes_each`;
        `dtensor_group`: the group to join without `process_group`, see
        distributed.group_to_join).

        Warm-up and the rule after it are both computed and one is selected on the device, so
        that overflowed steps need not be counted on the host.
        """
        group = self.process_group if self.process_group is not None else dtensor_group
        measured, norm = api.measure_before_scale(
            grads,
            inv_scale=inv_scale,
            process_group=group,
            backend=self.backend,
            writes_each=writes_after,
            names=names,
        )
        if not grads and group is None:
            # No gradient measured (every parameter frozen or without one this step): its 0 is
            # no sample of the norm, so it neither counts in the warm-up nor moves the EMAs. A
            # rank without gradients in a group still gets the group's norm and counts it.
            nothing = torch.zeros((), dtype=torch.bool, device=norm.device)
            return ZClipResult(
                measured.total_norm, measured.found_inf, measured.clip_coef, norm, nothing, nothing
            )
        if self.mean is None:
            self._start(norm.device)
        elif self.mean.device != norm.device:  # loaded from elsewhere
            for name in self._STATE:
                setattr(self, name, _on(getattr(self, name), norm.device))
        # Finite as reported (total_norm, in the gradients' precision): a float32 norm that
        # overflows counts as an overflow. The coefficient is still computed from the float64
        # norm, so that such gradients are clipped, not zeroed.
        finite = torch.isfinite(measured.total_norm)
        # A norm of 0 (all-zero gradients: a masked loss, zero_grad(set_to_none=False)) is no
        # sample either: zeros in the warm-up would floor the std and call every later norm a spike.
        sampled = finite & (norm > 0)
        in_warmup = self._warmup_count < self.warmup_steps

        recorded = in_warmup & sampled
        slot = torch.arange(self.warmup_steps, device=norm.device) == self._warmup_count
        self._warmup_norms = torch.where(slot & recorded, norm, self._warmup_norms)
        self._warmup_count = self._warmup_count + recorded.to(torch.int64)
        warmup_ends = recorded & (self._warmup_count == self.warmup_steps)

        z_clipped, spike = self._z_clipped(norm, sampled)
        spike = spike & ~in_warmup
        updates = sampled & ~in_warmup
        mean = self.alpha * self.mean + (1 - self.alpha) * z_clipped
        var = self.alpha * self.var + (1 - self.alpha) * (z_clipped - mean) ** 2
        self.mean = torch.where(
            warmup_ends, self._warmup_norms.mean(), torch.where(updates, mean, self.mean)
        )
        self.var = torch.where(
            warmup_ends,
            self._warmup_norms.var(unbiased=False),
            torch.where(updates, var, self.var),
        )
        threshold = torch.where(in_warmup, norm, z_clipped)
        if self.max_norm is not None:
            threshold = threshold.clamp(max=self.max_norm)

        # Below the threshold the gradients are left alone (as the published rule, which clips only
        # then; min(1, threshold / (norm + 1e-6)) would scale by norm / (norm + 1e-6) each step);
        # above it, clip_grad_norm_'s factor. A NaN norm still poisons, as in clip_grad_norm_.
        clip_factor = torch.where(threshold >= norm, 1.0, threshold / (norm + NORM_EPS))
        clip_coef = clip_factor * (measured.clip_coef.to(torch.float64))
        skip = measured.found_inf.to(torch.bool) | ~finite
        if self.skip_on_spike:
            skip = skip | self._skip_budget.take(spike)
        return ZClipResult(
            measured.total_norm,
            measured.found_inf,
            clip_coef,
            threshold,
            spike,
            skip,
        )

    @without_grad
    def step(self, parameters, inv_scale: float | torch.Tensor | None = None) -> ZClipResult:
        """Clips the gradients in place (unscaling them by `inv_scale` too); steps nothing. With a
        GradScaler use `clip_step`, which also tells the scaler that the gradients are unscaled."""
        items = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        grads = _gradients(items)
        group = distributed.group_to_join(None, grads, items)
        result = self._measure(grads, inv_scale, dtensor_group=group)
        api.scale_(grads, result.clip_coef, backend=self.backend)
        return result

    @without_grad
    def clip_step(
        self, optimizer: torch.optim.Optimizer, *, scaler: torch.amp.GradScaler | None = None
    ) -> ZClipResult:
        """Unscale, clip and step, skipping the step on overflow (and on a spike, with
        `skip_on_spike`; and, as amp.clip_step, with a fused optimizer on a factor no float32
        grad_scale can apply, counted as an overflow) without a sync: with a fused optimizer (`fused=True` Adam, AdamW, SGD)
        the gradients are read once and the optimizer's own pass applies the factor and the skip;
        other optimizers get one write pass and one sync to skip, as `scaler.step`. Call
        `scaler.update()` afterwards as usual: a spike does not back off the scale."""
        amp._check_scaler_and_optimizer(scaler, optimizer, "ZClip.clip_step", scaler_optional=True)

        def measure(grads, names, inv_scale, writes_after, dtensor_group):
            result = self._measure(grads, inv_scale, writes_after, dtensor_group, names)
            return result, result.skip

        return amp._step_measured(
            optimizer, measure, scaler=scaler, backend=self.backend, funcname="ZClip.clip_step"
        )


def unitwise_norm(tensor: torch.Tensor) -> torch.Tensor:
    """Norm per output unit: over all dims but the first for matrices and conv kernels (one value
    per output row/channel, kept broadcastable); the whole tensor for vectors and scalars. In
    float32, or float64 for float64 tensors."""
    dtype = torch.promote_types(tensor.dtype, torch.float32)
    if tensor.ndim <= 1:
        return torch.linalg.vector_norm(tensor, dtype=dtype)
    return torch.linalg.vector_norm(
        tensor, dim=tuple(range(1, tensor.ndim)), keepdim=True, dtype=dtype
    )


def _check_agc_arguments(clipping: float, eps: float) -> tuple[float, float]:
    """(clipping, eps) as floats, each a finite number > 0."""
    checked = []
    for name, value in (("clipping", clipping), ("eps", eps)):
        value = api.to_float(value, name, "a finite number > 0")
        if not 0 < value < math.inf:  # NaN too
            raise ValueError(f"{name} must be a finite number > 0, got {value}")
        checked.append(value)
    return checked[0], checked[1]


@without_grad
def agc_(
    parameters: Iterable[torch.nn.Parameter], clipping: float = 0.01, eps: float = 1e-3
) -> None:
    """Unit-wise adaptive gradient clipping (Brock et al., 2021): each unit's gradient G_i is
    scaled by min(1, clipping * max(||W_i||, eps) / ||G_i||). Vectors and scalars count as one unit,
    as in the NFNets reference code. Exclude the final classifier, as the paper does.

    Raises:
        ValueError: `clipping` or `eps` is not finite and > 0 (TypeError: not a number, or a
            tensor of several elements).
        TypeError: a parameter that is not a tensor, or a parameter or gradient that is not
            dense floating point (a sparse nn.Embedding's), before any gradient is clipped.
    """
    clipping, eps = _check_agc_arguments(clipping, eps)
    for parameter, grad in _agc_pairs(_agc_parameters(parameters)):
        max_norm = clipping * unitwise_norm(parameter.detach()).clamp(min=eps)
        grad_norm = unitwise_norm(grad)
        factor = torch.where(
            grad_norm > max_norm, max_norm / grad_norm.clamp(min=1e-6), torch.ones_like(grad_norm)
        )
        if grad.dtype == factor.dtype:
            grad.mul_(factor)
        else:  # 16-bit: the product in float32, rounded once, as the clip kernels form it
            grad.copy_(grad.to(factor.dtype) * factor)


def _agc_parameters(parameters) -> list[torch.Tensor]:
    """The parameters as a list (a single tensor as torch's clip functions take it), each one a
    tensor: AGC reads the weights, so a (name, parameter) pair or a param group, which has no
    .grad, must not be skipped as a parameter without a gradient."""
    parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    for index, parameter in enumerate(parameters):
        if not isinstance(parameter, torch.Tensor):
            raise TypeError(
                f"parameters[{index}] is a {type(parameter).__name__}, not a tensor: pass "
                "model.parameters() (of named_parameters() the tensors, of param groups their "
                "'params')"
            )
    return parameters


def _agc_pairs(parameters: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, gradient) of each parameter with a gradient, every one checked before the
    first is clipped: AGC clips unit by unit, so a refusal midway would leave some clipped."""
    pairs = []
    for index, parameter in enumerate(parameters):
        grad = parameter.grad
        if grad is None:
            continue
        for what, tensor in (("", parameter), (".grad", grad)):
            if tensor.dtype not in SUPPORTED_DTYPES:
                raise TypeError(
                    f"parameters[{index}]{what} has dtype {tensor.dtype}; AGC needs float32, "
                    "float16, bfloat16 or float64 parameters and gradients"
                )
            if tensor.layout is not torch.strided:
                raise TypeError(
                    f"parameters[{index}]{what} has layout {tensor.layout}; AGC's unit-wise norms "
                    "need dense tensors: leave sparse parameters (a sparse nn.Embedding) out"
                )
        pairs.append((parameter, grad))
    return pairs


class AGC:
    """`agc_` bound to a set of parameters: `AGC(model.parameters()).step()` after backward."""

    def __init__(self, parameters, clipping: float = 0.01, eps: float = 1e-3):
        # Checked now, not at the first step.
        clipping, eps = _check_agc_arguments(clipping, eps)
        self.parameters = _agc_parameters(parameters)
        self.clipping, self.eps = clipping, eps

    def step(self) -> None:
        agc_(self.parameters, self.clipping, self.eps)


def _check_record_inv_scale(inv_scale: float | torch.Tensor) -> float | torch.Tensor:
    """GradMonitor.record's inv_scale, which it divides out of clip_coef: a float must be > 0
    (as the loss scale's reciprocal is), a tensor one floating-point element."""
    inv_scale = api.check_inv_scale(inv_scale)
    if not isinstance(inv_scale, torch.Tensor) and not inv_scale > 0:
        raise ValueError(
            f"inv_scale must be > 0 (1 / the loss scale, divided out of clip_coef), got {inv_scale}"
        )
    return inv_scale


def _without_unscale(clip_coef: torch.Tensor, inv_scale: float | torch.Tensor) -> torch.Tensor:
    """`clip_coef` (float64) with the unscale divided out: the clip factor. unscale_clip_ and
    clip_step unscale by the scaler's float32(1 / scale) (amp._inv_scale): divided by 1 / scale in
    float64, an unclipped step's factor was 1 - ulp for a scale that is no power of two, a clip as
    counted. So `inv_scale` is rounded as the scaler rounds it (kept as given where float32 has no
    normal number for it). fused_clip_ and ZClip.step keep a float inv_scale as given: an
    unclipped step's clip_coef then equals it, a factor of exactly 1 too."""
    if isinstance(inv_scale, torch.Tensor):
        given = inv_scale.to(device=clip_coef.device, dtype=torch.float64).reshape(())
    else:  # filled on the device: a number copied there from the host would sync
        given = torch.full((), inv_scale, dtype=torch.float64, device=clip_coef.device)
    rounded = given.float().double()
    in_float32 = (rounded >= torch.finfo(torch.float32).tiny) & torch.isfinite(rounded)
    divisor = torch.where(in_float32, rounded, given)
    return torch.where(clip_coef == given, 1.0, clip_coef / divisor)


class GradMonitor:
    """An on-device ring buffer of total norm, clip coefficient, found_inf (and per-tensor norms).

    `record(result)` after each clip is sync-free; `summary()` reads back only when asked. The
    spike rule flags a step whose norm exceeds `spike_factor` times the EMA of earlier unflagged
    finite, nonzero norms (NaN, so nothing is flagged, until the first such norm), within a budget
    of `max_skips` flagged steps in any `skip_window` (see SkipBudget): spikes past it are not
    flagged and enter the EMA, so the monitor adapts to a lasting rise instead of skipping it
    forever. Non-finite norms are always flagged. `should_skip` is an on-device bool for
    `fusedclip.amp.step(optimizer, skip=...)`, which skips without a sync for fused optimizers.
    """

    def __init__(
        self,
        capacity: int = 1000,
        names: list[str] | None = None,
        spike_factor: float = 10.0,
        ema: float = 0.98,
        max_skips: int = 3,
        skip_window: int = 100,
    ):
        _check_count("capacity", capacity, 1)
        if names is not None:
            # A str is an iterable of str too, one name per character.
            listed = None if isinstance(names, str) else list(names)
            if listed is None or not all(isinstance(name, str) for name in listed):
                raise TypeError(
                    f"names must be a list of str (one per gradient) or None, got {names!r}"
                )
            names = listed
        spike_factor = api.to_float(spike_factor, "spike_factor", "a number > 1")
        if not spike_factor > 1:
            raise ValueError(
                f"spike_factor must be > 1 (a spike is a norm that many times the EMA of earlier "
                f"norms), got {spike_factor}"
            )
        ema = _check_fraction("ema", ema)
        self.capacity, self.names, self.spike_factor, self.ema = capacity, names, spike_factor, ema
        _check_skip_budget(max_skips, skip_window, "skip_window")
        self._skip_budget = SkipBudget(max_skips, skip_window)
        self._steps: torch.Tensor | None = None  # steps recorded (_step_count), None before any
        self.norms = self.coefs = self.found_inf = self.per_tensor = None
        # Per slot, beside per_tensor: whether it holds that step's per-tensor norms.
        self._has_per_tensor: torch.Tensor | None = None
        self.norm_ema: torch.Tensor | None = None  # NaN until the first finite, nonzero norm
        self.should_skip: torch.Tensor | None = None

    # Each state tensor's dtype, by attribute.
    _STATE = {
        "norms": torch.float64,
        "coefs": torch.float64,
        "found_inf": torch.float32,
        "per_tensor": torch.float64,
        "norm_ema": torch.float64,
        "should_skip": torch.bool,
    }

    @property
    def steps(self) -> int:
        """The number of steps recorded (read from the device: one sync)."""
        return 0 if self._steps is None else int(self._steps)

    def state_dict(self) -> dict:
        """The history, the spike EMA and the skip budget's ring (copies, on their device), for a
        checkpoint; the constructor's arguments are not in it."""
        state = {name: _copied(getattr(self, name)) for name in self._STATE}
        has_per_tensor = [] if self._has_per_tensor is None else self._has_per_tensor.tolist()
        return state | {
            "capacity": self.capacity,
            "steps": self.steps,
            "has_per_tensor": has_per_tensor,
            "skip_budget": self._skip_budget.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resumes from `state_dict()`'s state. capacity and skip_window must be as saved (they
        shape the state); the other arguments are this monitor's own. Checked whole before
        anything is loaded."""
        keys = (*self._STATE, "capacity", "steps", "has_per_tensor", "skip_budget")
        saved = _SavedState(self, state, keys)
        saved.same_argument("capacity", self.capacity)
        ring = self._skip_budget._checked(state["skip_budget"], "skip_window", self)
        saved.all_or_none(("norms", "coefs", "found_inf", "norm_ema", "should_skip"))
        history = (self.capacity,)
        shapes = {"norms": history, "coefs": history, "found_inf": history, "per_tensor": None}
        tensors = [
            saved.tensor(name, shapes.get(name, ()), dtype) for name, dtype in self._STATE.items()
        ]
        per_tensor = tensors[list(self._STATE).index("per_tensor")]
        if per_tensor is not None and state["norms"] is None:
            raise saved.refusal("per_tensor is a tensor while norms is None (never recorded)")
        if per_tensor is not None and (per_tensor.dim() != 2 or len(per_tensor) != self.capacity):
            raise saved.refusal(
                f"per_tensor must have {self.capacity} rows (one per step of the history), got "
                f"shape {tuple(per_tensor.shape)}"
            )
        steps = saved.count("steps")
        if (steps > 0) != (state["norms"] is not None):
            recorded = "no history (norms is None)" if steps else "a history (norms)"
            raise saved.refusal(
                f"steps={steps} with {recorded}: a monitor has a history exactly when it has "
                "recorded a step; pass what GradMonitor.state_dict() returned"
            )
        has_per_tensor = state["has_per_tensor"]
        # One flag per slot exactly when there is a per-tensor history.
        flags = self.capacity if per_tensor is not None else 0
        if not (
            isinstance(has_per_tensor, list)
            and len(has_per_tensor) == flags
            and all(isinstance(flag, bool) for flag in has_per_tensor)
        ):
            raise saved.refusal(
                f"has_per_tensor must be a list of {flags} bools, got {has_per_tensor!r}"
            )
        for name, value in zip(self._STATE, tensors, strict=True):
            setattr(self, name, value)
        device = self.norms.device if self.norms is not None else torch.device("cpu")
        self._steps = _step_count(steps, device)
        self._has_per_tensor = None
        if per_tensor is not None:
            self._has_per_tensor = torch.tensor(has_per_tensor, dtype=torch.bool, device=device)
        self._skip_budget._restore(ring)

    @without_grad
    def record(
        self,
        result,
        inv_scale: float | torch.Tensor | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
    ) -> torch.Tensor:
        """Appends a ClipResult (or ZClipResult) and returns `should_skip`. With AMP pass the
        step's `inv_scale`, or its `scaler` before `scaler.update()`: the result's clip_coef
        includes the unscale, and the monitor records the clip factor alone."""
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(
                f"GradMonitor.record: scaler must be a torch.amp.GradScaler or None, got "
                f"{type(scaler).__name__}; pass the GradScaler that scaled this step's loss"
            )
        if scaler is not None and scaler._enabled:
            if inv_scale is not None:
                raise ValueError("pass inv_scale or scaler, not both")
            if scaler._scale is None:
                raise ValueError(
                    "GradMonitor.record: scaler holds no scale yet; call record after "
                    "scaler.scale(loss).backward() and before scaler.update()"
                )
            inv_scale = amp._inv_scale(scaler)
        elif inv_scale is not None:
            inv_scale = _check_record_inv_scale(inv_scale)
        norm = result.total_norm.to(torch.float64)
        per_tensor = getattr(result, "per_tensor_norms", None)
        if per_tensor is not None and per_tensor.numel() == 0:
            per_tensor = None  # no gradient this step: no per-tensor norms to record
        if (
            per_tensor is not None
            and self.names is not None
            and len(self.names) != per_tensor.numel()
        ):
            raise ValueError(
                f"GradMonitor(names=...) has {len(self.names)} names but the result has "
                f"{per_tensor.numel()} per-tensor norms: pass one name per gradient that exists, "
                "in the optimizer's order, e.g. name_of = {p: n for n, p in "
                "model.named_parameters()}; names=[name_of[p] for g in optimizer.param_groups "
                "for p in g['params'] if p.grad is not None]"
            )
        if (
            per_tensor is not None
            and self.per_tensor is not None
            and self.per_tensor.shape[1] != per_tensor.numel()
        ):
            raise ValueError(
                f"GradMonitor recorded {self.per_tensor.shape[1]} per-tensor norms per step "
                f"before, and this result has {per_tensor.numel()}: its columns are the "
                "gradients by position, so record per-tensor norms of the same gradients every "
                "step (or names=... for the ones that exist)"
            )
        # Every refusal above; from here on the state changes.
        if self.norms is None:
            for name in ("norms", "coefs", "found_inf"):
                history = torch.zeros(self.capacity, dtype=self._STATE[name], device=norm.device)
                setattr(self, name, history)
            self.norm_ema = torch.full(
                (), math.nan, dtype=self._STATE["norm_ema"], device=norm.device
            )
            self._steps = (
                _step_count(0, norm.device) if self._steps is None else self._steps.to(norm.device)
            )
        elif self.norms.device != norm.device:  # loaded from elsewhere
            for name in (*self._STATE, "_steps", "_has_per_tensor"):
                setattr(self, name, _on(getattr(self, name), norm.device))
        if per_tensor is not None and self.per_tensor is None:
            self.per_tensor = torch.zeros(
                self.capacity,
                per_tensor.numel(),
                dtype=self._STATE["per_tensor"],
                device=norm.device,
            )
            self._has_per_tensor = torch.zeros(self.capacity, dtype=torch.bool, device=norm.device)
        slot = (self._steps % self.capacity).reshape(1)  # index_copy_'s index: no sync
        self.norms.index_copy_(0, slot, norm.reshape(1))
        coef = result.clip_coef.to(torch.float64)
        if inv_scale is not None:
            coef = _without_unscale(coef, inv_scale)
        self.coefs.index_copy_(0, slot, coef.reshape(1))
        self.found_inf.index_copy_(0, slot, result.found_inf.to(self.found_inf.dtype).reshape(1))
        if per_tensor is not None:
            self.per_tensor.index_copy_(0, slot, per_tensor.to(torch.float64).reshape(1, -1))
        if self.per_tensor is not None:  # a step without them is left out of their summary
            self._has_per_tensor.index_fill_(0, slot, per_tensor is not None)
        finite = torch.isfinite(norm)
        above = finite & (norm > self.spike_factor * self.norm_ema)  # False while the EMA is NaN
        spike = self._skip_budget.take(above)
        self.should_skip = spike | ~finite
        ema = torch.where(
            self.norm_ema.isnan(), norm, self.ema * self.norm_ema + (1 - self.ema) * norm
        )
        enters = finite & ~spike & (norm > 0)
        self.norm_ema = torch.where(enters, ema, self.norm_ema)
        self._steps = self._steps + 1
        return self.should_skip

    def summary(self, top_k: int = 5) -> dict:
        """Reads the history back (one sync): clip frequency, norm percentiles, overflow steps,
        and with per-tensor norms `largest_norms`, the `top_k` (name, mean) by the mean of each
        tensor's finite norms over the window's steps that recorded them (one never finite
        ranks last, its mean NaN), and `nonfinite_norms`, the `top_k` (name, count) of tensors
        whose norm was inf or NaN."""
        _check_count("top_k", top_k, 0)
        steps = self.steps
        filled = min(steps, self.capacity)
        if filled == 0:
            return {"steps": 0}
        norms = self.norms[:filled].cpu()
        coefs = self.coefs[:filled].cpu()
        found = self.found_inf[:filled].cpu()
        finite = norms[torch.isfinite(norms)]
        quantiles = torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)
        percentiles = (
            torch.quantile(finite, quantiles).tolist() if finite.numel() else [math.nan] * 3
        )
        summary = {
            "steps": steps,
            "window": filled,
            "clip_frequency": float((coefs < 1).double().mean()),
            "overflow_steps": int(found.sum()),
            "norm_p50": percentiles[0],
            "norm_p90": percentiles[1],
            "norm_p99": percentiles[2],
            "norm_max": float(finite.max()) if finite.numel() else math.nan,
        }
        if self.per_tensor is not None:
            recorded = self._has_per_tensor[:filled].cpu()
            per_tensor = self.per_tensor[:filled].cpu()[recorded]
            is_finite = torch.isfinite(per_tensor)
            # 0/0 = NaN for a tensor whose norms were never finite: it has no mean and ranks
            # last (argsort would put NaN first).
            means = per_tensor.where(is_finite, 0).sum(dim=0) / is_finite.sum(dim=0)
            order = torch.argsort(means.nan_to_num(nan=-1.0), descending=True, stable=True)
            nonfinite = (~is_finite).sum(dim=0)
            names = self.names or [f"tensor {i}" for i in range(means.numel())]
            summary["largest_norms"] = [(names[i], float(means[i])) for i in order[:top_k]]
            summary["nonfinite_norms"] = [
                (names[i], int(nonfinite[i]))
                for i in torch.argsort(nonfinite, descending=True, stable=True)[:top_k]
                if nonfinite[i] > 0
            ]
        return summary
