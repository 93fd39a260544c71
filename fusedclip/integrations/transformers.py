"""The Hugging Face Trainer: its clipping (`max_grad_norm`) through fusedclip's fused unscale + clip.

    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
    fusedclip.integrations.transformers.enable(trainer)
    trainer.train()

Trainer clips with `self.accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)` and
logs the norm it returns as `grad_norm`; `enable` makes that Accelerator fusedclip's
(`fusedclip.integrations.accelerate.enable`), so the logged number is fusedclip's norm, the
value torch's clip returns (for float32 and float64 gradients; for 16-bit ones fusedclip's norm
is float32, where torch's is rounded to their dtype). A Trainer that makes itself a new
Accelerator (`hyperparameter_search` does, for every trial) gets that one enabled too.
"""

from __future__ import annotations

import transformers

from fusedclip.integrations import accelerate as fused_accelerate


def enable(trainer: transformers.Trainer) -> transformers.Trainer:
    """Route `trainer`'s gradient clipping through fusedclip; returns the trainer."""
    if not isinstance(trainer, transformers.Trainer):
        raise TypeError(f"trainer is a {type(trainer).__name__}, not a transformers.Trainer")
    fused_accelerate.enable(trainer.accelerator)
    if not getattr(trainer.create_accelerator_and_postprocess, "_fusedclip_enables", False):
        create_accelerator = trainer.create_accelerator_and_postprocess

        def create_accelerator_and_postprocess(*args, **kwargs):
            created = create_accelerator(*args, **kwargs)
            fused_accelerate.enable(trainer.accelerator)
            return created

        create_accelerator_and_postprocess._fusedclip_enables = True
        trainer.create_accelerator_and_postprocess = create_accelerator_and_postprocess
    return trainer
