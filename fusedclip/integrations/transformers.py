"""The Hugging Face Trainer: its clipping (`max_grad_norm`) through fusedclip's fused unscale + clip.

    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
    fusedclip.integrations.transformers.enable(trainer)
    trainer.train()

Trainer clips with `self.accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)` and
logs the norm it returns as `grad_norm`; `enable` makes that Accelerator fusedclip's
(`fusedclip.integrations.accelerate.enable`), so the logged number is fusedclip's norm, the same
value torch's clip returns.
"""

from __future__ import annotations

import transformers

from fusedclip.integrations import accelerate as fused_accelerate


def enable(trainer: transformers.Trainer) -> transformers.Trainer:
    """Route `trainer`'s gradient clipping through fusedclip; returns the trainer."""
    if not isinstance(trainer, transformers.Trainer):
        raise TypeError(f"trainer is a {type(trainer).__name__}, not a transformers.Trainer")
    fused_accelerate.enable(trainer.accelerator)
    return trainer
