"""Lightning: a precision plugin whose unscale + clip is one `fusedclip.amp.unscale_clip_` call.

    from fusedclip.integrations.lightning import FusedMixedPrecision

    trainer = lightning.Trainer(plugins=[FusedMixedPrecision("16-mixed", "cuda")],
                                gradient_clip_val=1.0, gradient_clip_algorithm="norm")

Lightning's own `MixedPrecision` unscales every step right after backward and clips later, when
the LightningModule's `configure_gradient_clipping` calls `clip_gradients`. This plugin holds the
unscale back and does it inside that clip, fused; what the loop observes stays the same:

- `gradient_clip_val` and `gradient_clip_algorithm` ("norm" or "value") are honoured.
- Gradient accumulation: Lightning calls the plugin once per optimizer step, after the last
  micro-batch, so unscale and clip run once on the accumulated gradients.
- Overflow: the scaler records `found_inf` as `unscale_` would, so `scaler.step` skips the step
  and `scaler.update` backs off.
- Where holding the unscale back could be seen, the plugin unscales as Lightning does and only the
  clip is fusedclip's: an `on_before_optimizer_step` hook (of the module or a callback) reads the
  gradients between unscale and clip; a `configure_gradient_clipping` override (it may read the
  gradients, or clip them with torch or through another optimizer object than the one it was
  given; its `self.clip_gradients(...)` still runs fusedclip's clip); a `clip_gradients` override
  (it may read the gradients before it calls Lightning's); manual optimization;
  optimizers that unscale inside their step (fused Adam: Lightning refuses to clip those); a
  step without clipping.

Checkpoints hold the scaler's state under the key Lightning's `MixedPrecision` uses, so a run
saved with either plugin resumes with its loss scale under the other.

"bf16-mixed" has no scaler; its clip is fusedclip's fused clip. `last_result` is the
`fusedclip.ClipResult` of the latest fused clip (norm, found_inf, clip_coef on the device).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import GradClipAlgorithmType
from lightning.pytorch.utilities.model_helpers import is_overridden

import fusedclip
from fusedclip.amp import optimizer_gradients
from fusedclip.api import ClipResult


class FusedMixedPrecision(MixedPrecision):
    """Lightning's `MixedPrecision` with the unscale and the clip fused into one fusedclip call.

    Takes the same arguments: `precision` ("16-mixed" or "bf16-mixed"), `device` (autocast's
    device type) and an optional `scaler` (a `torch.amp.GradScaler`).
    """

    def __init__(self, precision: str, device: str, scaler: Any = None) -> None:
        super().__init__(precision, device, scaler)
        # ids of optimizers whose gradients are still loss-scaled in the current step.
        self._unscale_pending: set[int] = set()
        self.last_result: ClipResult | None = None

    # Lightning files a precision plugin's state (here the scaler's) under the plugin's class
    # name. The state is MixedPrecision's, so it is filed under MixedPrecision's name too: a run
    # resumes with its loss scale whichever of the two plugins saved or loads the checkpoint (and
    # an earlier fusedclip, which reads its own name only, still finds it).
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint.get(type(self).__qualname__)
        if state is not None:
            checkpoint[MixedPrecision.__qualname__] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if MixedPrecision.__qualname__ in checkpoint and type(self).__qualname__ not in checkpoint:
            self.load_state_dict(checkpoint[MixedPrecision.__qualname__])

    def _can_hold_back_unscale(self, optimizer: Any, model: LightningModule) -> bool:
        if not model.automatic_optimization or _optimizer_handles_unscaling(optimizer):
            return False
        # Hooks that may read the gradients, or clip them without clip_gradients(optimizer).
        for hook in ("on_before_optimizer_step", "configure_gradient_clipping", "clip_gradients"):
            if is_overridden(hook, model, LightningModule):
                return False
        return not any(
            is_overridden("on_before_optimizer_step", callback, Callback)
            for callback in model.trainer.callbacks
        )

    def optimizer_step(self, optimizer: Any, model: Any, closure: Any, **kwargs: Any) -> Any:
        if (
            self.scaler is None
            or isinstance(optimizer, torch.optim.LBFGS)
            or not isinstance(model, LightningModule)
            or not self._can_hold_back_unscale(optimizer, model)
        ):
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        closure_result = closure()
        # As MixedPrecision: a training_step that returned None skipped backward; no step then.
        skip_step = closure_result is None
        if not skip_step:
            self._unscale_pending.add(id(optimizer))
        try:
            self._after_closure(model, optimizer)  # hooks, then configure_gradient_clipping
        finally:
            still_scaled = id(optimizer) in self._unscale_pending
            self._unscale_pending.discard(id(optimizer))
        if skip_step:
            return closure_result
        if still_scaled:  # nothing clipped this step: the plain unscale
            self.scaler.unscale_(optimizer)
        step_output = self.scaler.step(optimizer, **kwargs)
        self.scaler.update()
        return step_output

    def clip_gradients(
        self,
        optimizer: torch.optim.Optimizer,
        clip_val: int | float = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        if clip_val > 0 and _optimizer_handles_unscaling(optimizer):
            # MixedPrecision's own refusal, with its message.
            return super().clip_gradients(optimizer, clip_val, gradient_clip_algorithm)
        if clip_val <= 0:
            return None
        by_value = gradient_clip_algorithm == GradClipAlgorithmType.VALUE
        max_norm = None if by_value else float(clip_val)
        clip_value = float(clip_val) if by_value else None
        if id(optimizer) in self._unscale_pending:
            self._unscale_pending.discard(id(optimizer))
            self.last_result = fusedclip.amp.unscale_clip_(
                self.scaler, optimizer, max_norm, clip_value=clip_value
            )
        else:
            self.last_result = fusedclip.fused_clip_(
                optimizer_gradients(optimizer), max_norm=max_norm, clip_value=clip_value
            )
        return None
