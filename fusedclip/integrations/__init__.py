"""The fused unscale + clip inside the training frameworks that call `scaler.unscale_` themselves.

Each module imports its framework, so it is importable only where that framework is installed:

- `fusedclip.integrations.lightning`: `FusedMixedPrecision`, a precision plugin for "16-mixed"
  and "bf16-mixed".
- `fusedclip.integrations.accelerate`: `FusedAccelerator` and `enable(accelerator)`.
- `fusedclip.integrations.transformers`: `enable(trainer)` for the Hugging Face Trainer.

`fusedclip.patch()` alone makes these frameworks' clipping fusedclip's, but not their unscale.
"""
