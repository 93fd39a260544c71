"""The integrations against the real frameworks: a tiny model trained a few steps with the
framework's own unscale + clip and with fusedclip's, weights, norms and loss scales compared step
by step, with an injected overflow that both must skip. Nothing is downloaded: models come from
configs, data from a seeded generator."""

from __future__ import annotations

import math

import pytest
import torch

# Both runs clip the same gradients; only the norm's accumulation differs (fusedclip: float64,
# torch: float32), so the clip factor, and through it the weights, differ in the last bits.
WEIGHT_RTOL = 1e-5
NORM_RTOL = 1e-6
# The batch whose loss is made infinite: its step must be skipped and the loss scale backed off.
OVERFLOW_BATCH = 2


def _tiny_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _batches(count: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(6, 8, generator=generator), torch.randn(6, 4, generator=generator))
        for _ in range(count)
    ]


def _assert_same_run(stock: list[dict], fused: list[dict]) -> None:
    assert len(stock) == len(fused) > 0
    for step, (want, got) in enumerate(zip(stock, fused, strict=True)):
        assert want.keys() == got.keys(), f"step {step}"
        for name, value in want.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(
                    got[name], value, rtol=WEIGHT_RTOL, atol=1e-7, msg=f"step {step} {name}"
                )
            elif isinstance(value, float) and not math.isfinite(value):
                assert not math.isfinite(got[name]), f"step {step} {name}: {got[name]}"
            elif isinstance(value, float):
                assert got[name] == pytest.approx(value, rel=NORM_RTOL), f"step {step} {name}"
            else:
                assert got[name] == value, f"step {step} {name}"


# Lightning ---------------------------------------------------------------------------------------


def _lightning_module_type(lightning, batch_count: int, overflows):
    """A LightningModule class training _tiny_net with SGD on `batch_count` batches of 6, its
    loss made infinite where `overflows(module, batch_idx)`."""
    inputs, targets = (torch.cat(parts) for parts in zip(*_batches(batch_count), strict=True))
    batches = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(inputs, targets), batch_size=6, shuffle=False
    )

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _tiny_net()

        def training_step(self, batch, batch_idx):
            inputs, targets = batch
            loss = torch.nn.functional.mse_loss(self.net(inputs).float(), targets)
            return loss * float("inf") if overflows(self, batch_idx) else loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

        def train_dataloader(self):
            return batches

    return Module


def _lightning_run(
    *,
    fused: bool,
    precision: str,
    algorithm: str,
    accumulate: int,
    extra_callbacks=(),
    monkeypatch,
    clipping_override=None,
    before_clip_gradients=None,
) -> list[dict]:
    """`clipping_override(module, optimizer, clip_val, algorithm)`: the module's
    configure_gradient_clipping (it records what it needs; no norms are recorded here then).
    `before_clip_gradients(module)`: runs in the module's clip_gradients override, before
    Lightning's own."""
    lightning = pytest.importorskip("lightning")
    from lightning.pytorch.plugins.precision import MixedPrecision

    from fusedclip.integrations.lightning import FusedMixedPrecision

    def overflows(module, batch_idx):
        return batch_idx == OVERFLOW_BATCH and precision == "16-mixed"

    class Module(_lightning_module_type(lightning, 6, overflows)):
        if clipping_override is not None:

            def configure_gradient_clipping(
                self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
            ):
                clipping_override(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

        if before_clip_gradients is not None:

            def clip_gradients(
                self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
            ):
                before_clip_gradients(self)
                super().clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    record_norms = clipping_override is None
    norms: list[float] = []
    if not fused and record_norms:
        torch_clip = torch.nn.utils.clip_grad_norm_

        def recording_clip(*args, **kwargs):
            norm = torch_clip(*args, **kwargs)
            norms.append(norm.item())
            return norm

        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)

    history: list[dict] = []

    class Record(lightning.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if (batch_idx + 1) % accumulate:
                return
            plugin = trainer.precision_plugin
            entry = {f"weight {n}": p.detach().clone() for n, p in module.named_parameters()}
            if plugin.scaler is not None:
                entry["loss scale"] = plugin.scaler.get_scale()
            if fused and algorithm == "norm" and record_norms:
                norms.append(plugin.last_result.total_norm.item())
            history.append(entry)

    # An explicit plugin: Lightning's precision="16-mixed" on a CPU silently becomes bf16-mixed.
    plugin_type = FusedMixedPrecision if fused else MixedPrecision
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        plugins=[plugin_type(precision, "cpu")],
        gradient_clip_val=0.05 if algorithm == "norm" else 0.002,
        gradient_clip_algorithm=algorithm,
        accumulate_grad_batches=accumulate,
        callbacks=[Record(), *extra_callbacks],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Module())
    monkeypatch.undo()
    for entry, norm in zip(history, norms, strict=algorithm == "norm" and record_norms):
        entry["norm"] = norm
    return history


@pytest.mark.parametrize(
    "precision, algorithm, accumulate",
    [
        pytest.param("16-mixed", "norm", 1, id="fp16-norm"),
        pytest.param("16-mixed", "value", 1, id="fp16-value"),
        pytest.param("16-mixed", "norm", 2, id="fp16-norm-accumulate2"),
        pytest.param("bf16-mixed", "norm", 2, id="bf16-norm-accumulate2"),
        pytest.param("bf16-mixed", "value", 1, id="bf16-value"),
    ],
)
def test_lightning_plugin_matches_lightnings_own_clipping(
    precision, algorithm, accumulate, monkeypatch
):
    unscale_calls = []
    torch_unscale = torch.amp.GradScaler.unscale_

    def counting_unscale(self, optimizer):
        unscale_calls.append(optimizer)
        return torch_unscale(self, optimizer)

    monkeypatch.setattr(torch.amp.GradScaler, "unscale_", counting_unscale)
    settings = dict(precision=precision, algorithm=algorithm, accumulate=accumulate)
    stock = _lightning_run(fused=False, monkeypatch=monkeypatch, **settings)
    monkeypatch.setattr(torch.amp.GradScaler, "unscale_", counting_unscale)
    stock_unscales = len(unscale_calls)
    unscale_calls.clear()
    fused = _lightning_run(fused=True, monkeypatch=monkeypatch, **settings)
    _assert_same_run(stock, fused)
    if precision == "16-mixed":
        assert stock_unscales == len(stock) and not unscale_calls, "fusedclip did the unscale"
        # The injected overflow: the step was skipped (weights unchanged) and the scale halved.
        overflow_step = OVERFLOW_BATCH // accumulate
        before, after = stock[overflow_step - 1], stock[overflow_step]
        assert after["loss scale"] == before["loss scale"] / 2
        for name, value in before.items():
            if name.startswith("weight"):
                assert torch.equal(after[name], value), name


def test_lightning_plugin_unscales_first_when_a_hook_reads_the_gradients(monkeypatch):
    lightning = pytest.importorskip("lightning")
    seen = []

    class ReadsGradients(lightning.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            seen.append(sum(p.grad.double().square().sum() for p in module.parameters()).item())

    settings = dict(precision="16-mixed", algorithm="norm", accumulate=1)
    stock = _lightning_run(
        fused=False, monkeypatch=monkeypatch, extra_callbacks=[ReadsGradients()], **settings
    )
    stock_seen = list(seen)
    seen.clear()
    fused = _lightning_run(
        fused=True, monkeypatch=monkeypatch, extra_callbacks=[ReadsGradients()], **settings
    )
    _assert_same_run(stock, fused)
    # The hook saw unscaled gradients in both runs (inf on the overflowed batch).
    assert seen == pytest.approx(stock_seen, rel=1e-12, nan_ok=True)


def _stock_and_fused_runs(seen: list, monkeypatch, **options) -> tuple[list[dict], list]:
    """A stock and a fused 16-mixed run with `options` (their hooks append to `seen`), checked to
    train alike; returns the stock run and what it appended. `seen` then holds the fused run's."""
    settings = dict(precision="16-mixed", algorithm="norm", accumulate=1)
    stock = _lightning_run(fused=False, monkeypatch=monkeypatch, **settings, **options)
    stock_seen = list(seen)
    seen.clear()
    fused = _lightning_run(fused=True, monkeypatch=monkeypatch, **settings, **options)
    _assert_same_run(stock, fused)
    return stock, stock_seen


@pytest.mark.parametrize("clips_with", ["torch", "lightning-wrapper", "reads-then-clip_gradients"])
def test_lightning_plugin_unscales_first_for_a_configure_gradient_clipping_override(
    clips_with, monkeypatch
):
    """An override may read or clip the gradients itself (or pass Lightning's optimizer wrapper):
    in stock Lightning they are unscaled by then, so they are here too."""
    seen: list[float] = []

    def override(module, optimizer, clip_val, algorithm):
        seen.append(sum(p.grad.double().square().sum() for p in module.parameters()).item())
        if clips_with == "torch":
            seen.append(torch.nn.utils.clip_grad_norm_(module.parameters(), clip_val).item())
        elif clips_with == "lightning-wrapper":
            module.clip_gradients(module.optimizers(), clip_val, algorithm)
        else:
            module.clip_gradients(optimizer, clip_val, algorithm)

    _, stock_seen = _stock_and_fused_runs(seen, monkeypatch, clipping_override=override)
    assert seen == pytest.approx(stock_seen, rel=1e-6, nan_ok=True)


def test_lightning_plugin_unscales_first_for_a_clip_gradients_override(monkeypatch):
    """A module's clip_gradients override that reads the gradients before calling Lightning's
    sees them unscaled in stock Lightning, so it does here too."""
    seen: list[float] = []

    def read_gradients(module):
        seen.append(sum(p.grad.double().square().sum() for p in module.parameters()).item())

    stock, stock_seen = _stock_and_fused_runs(
        seen, monkeypatch, before_clip_gradients=read_gradients
    )
    assert len(seen) == len(stock) and seen == pytest.approx(stock_seen, rel=1e-6, nan_ok=True)


@pytest.mark.parametrize(
    "saved_by, resumed_by", [("stock", "fused"), ("fused", "stock"), ("fused", "fused")]
)
def test_a_checkpoint_resumes_its_loss_scale_under_either_plugin(saved_by, resumed_by, tmp_path):
    """Lightning files the plugin's state (the scaler's) under the plugin's class name: a run
    saved with one plugin and resumed with the other restarted at the initial loss scale."""
    lightning = pytest.importorskip("lightning")
    from lightning.pytorch.plugins.precision import MixedPrecision

    from fusedclip.integrations.lightning import FusedMixedPrecision

    plugin_types = {"stock": MixedPrecision, "fused": FusedMixedPrecision}

    def overflows(module, batch_idx):  # once, in the first run's epoch
        return module.current_epoch == 0 and batch_idx == OVERFLOW_BATCH

    Module = _lightning_module_type(lightning, 4, overflows)
    scales_at_start: list[float] = []

    class Record(lightning.Callback):
        def on_train_start(self, trainer, module):
            scales_at_start.append(trainer.precision_plugin.scaler.get_scale())

    def trainer(kind: str, epochs: int):
        return lightning.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=epochs,
            plugins=[plugin_types[kind]("16-mixed", "cpu")],
            gradient_clip_val=0.05,
            callbacks=[Record()],
            default_root_dir=tmp_path,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )

    first = trainer(saved_by, 1)
    first.fit(Module())
    saved_scale = first.precision_plugin.scaler.get_scale()
    assert saved_scale == scales_at_start[0] / 2, "the overflow backs the scale off"
    first.save_checkpoint(tmp_path / "run.ckpt")
    second = trainer(resumed_by, 2)
    second.fit(Module(), ckpt_path=tmp_path / "run.ckpt")
    assert scales_at_start[1] == saved_scale


# accelerate --------------------------------------------------------------------------------------


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; each run here sets its own mixed precision."""
    state = pytest.importorskip("accelerate.state")
    state.AcceleratorState._reset_state(True)
    yield
    state.AcceleratorState._reset_state(True)


def _new_accelerator(fused: bool, mixed_precision: str, **kwargs):
    """An Accelerator on the CPU; for "fp16" with a CPU GradScaler, which accelerate only
    creates on GPUs (set before `prepare`, which hands it to the wrapped optimizer)."""
    import accelerate

    from fusedclip.integrations.accelerate import FusedAccelerator

    accelerate.state.AcceleratorState._reset_state(True)
    accelerator_type = FusedAccelerator if fused else accelerate.Accelerator
    accelerator = accelerator_type(cpu=True, mixed_precision=mixed_precision, **kwargs)
    if mixed_precision == "fp16":
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu")
    return accelerator


def _accelerate_run(*, fused: bool, mixed_precision: str, clip: str, accumulate: int):
    accelerator = _new_accelerator(fused, mixed_precision, gradient_accumulation_steps=accumulate)
    model = _tiny_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer = accelerator.prepare(model, optimizer)
    history = []
    for index, (inputs, targets) in enumerate(_batches(6)):
        with accelerator.accumulate(model):
            loss = torch.nn.functional.mse_loss(model(inputs).float(), targets)
            if index == OVERFLOW_BATCH and mixed_precision == "fp16":
                loss = loss * float("inf")
            accelerator.backward(loss)
            entry = {}
            if accelerator.sync_gradients:
                if clip == "norm":
                    entry["norm"] = accelerator.clip_grad_norm_(model.parameters(), 0.05).item()
                else:
                    accelerator.clip_grad_value_(model.parameters(), 0.002)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            entry.update({f"weight {n}": p.detach().clone() for n, p in model.named_parameters()})
            entry["skipped"] = accelerator.optimizer_step_was_skipped
            if accelerator.scaler is not None:
                entry["loss scale"] = accelerator.scaler.get_scale()
            history.append(entry)
    return history


@pytest.mark.parametrize(
    "mixed_precision, clip, accumulate",
    [
        pytest.param("fp16", "norm", 1, id="fp16-norm"),
        pytest.param("fp16", "value", 1, id="fp16-value"),
        pytest.param("fp16", "norm", 2, id="fp16-norm-accumulate2"),
        pytest.param("bf16", "norm", 1, id="bf16-norm"),
        pytest.param("no", "norm", 2, id="fp32-norm-accumulate2"),
    ],
)
def test_accelerator_matches_accelerates_own_clipping(
    mixed_precision, clip, accumulate, fresh_accelerate_state, monkeypatch
):
    settings = dict(mixed_precision=mixed_precision, clip=clip, accumulate=accumulate)
    stock = _accelerate_run(fused=False, **settings)
    unscale_calls = []
    torch_unscale = torch.amp.GradScaler.unscale_

    def counting_unscale(self, optimizer):
        unscale_calls.append(optimizer)
        return torch_unscale(self, optimizer)

    monkeypatch.setattr(torch.amp.GradScaler, "unscale_", counting_unscale)
    fused = _accelerate_run(fused=True, **settings)
    _assert_same_run(stock, fused)
    assert not unscale_calls, "fusedclip did the unscale"
    if mixed_precision == "fp16":
        overflow_step = OVERFLOW_BATCH // accumulate
        assert [entry["skipped"] for entry in stock].count(True) == 1
        assert stock[overflow_step]["skipped"]
        assert stock[overflow_step]["loss scale"] == stock[overflow_step - 1]["loss scale"] / 2


def test_enable_gives_an_existing_accelerator_the_fused_clip(fresh_accelerate_state, monkeypatch):
    from fusedclip.integrations import accelerate as fused_accelerate

    accelerator = fused_accelerate.enable(_new_accelerator(False, "fp16"))
    model = _tiny_net()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    unscale_calls = []
    monkeypatch.setattr(torch.amp.GradScaler, "unscale_", lambda *args: unscale_calls.append(1))
    inputs, targets = _batches(1)[0]
    accelerator.backward(torch.nn.functional.mse_loss(model(inputs).float(), targets))
    expected = torch.nn.utils.get_total_norm(
        [p.grad / accelerator.scaler.get_scale() for p in model.parameters()]
    )
    norm = accelerator.clip_grad_norm_(model.parameters(), 1e-3)
    torch.testing.assert_close(norm, expected, rtol=NORM_RTOL, atol=0)
    assert not unscale_calls
    with pytest.raises(TypeError, match="accelerator is a"):
        fused_accelerate.enable(model)


def test_a_subset_of_the_optimizers_parameters_keeps_accelerates_unscale(fresh_accelerate_state):
    # Clipping part of what the optimizer holds: the fused call would clip all of it, so the
    # unscale of every optimizer runs first, as in accelerate, and only the clip is fusedclip's.
    runs = []
    for fused in (False, True):
        accelerator = _new_accelerator(fused, "fp16")
        model = _tiny_net()
        model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        inputs, targets = _batches(1)[0]
        accelerator.backward(torch.nn.functional.mse_loss(model(inputs).float(), targets))
        norm = accelerator.clip_grad_norm_(model[0].parameters(), 1e-3)
        runs.append((norm, [p.grad.clone() for p in model.parameters()]))
    (stock_norm, stock_grads), (fused_norm, fused_grads) = runs
    torch.testing.assert_close(fused_norm, stock_norm, rtol=NORM_RTOL, atol=0)
    for got, want in zip(fused_grads, stock_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=WEIGHT_RTOL, atol=0)


@pytest.mark.parametrize(
    "clip, arguments, error, message",
    [
        pytest.param("norm", ([None], 1.0), TypeError, r"parameters\[0\] is a NoneType", id="None"),
        pytest.param("value", ("names", 1.0), TypeError, r"parameters\[0\] is a str", id="names"),
        pytest.param(
            "norm", ("all", None), TypeError, r"max_norm must be a .*got None", id="no-max"
        ),
        pytest.param("value", ("all", None), TypeError, r"clip_value must be .*None", id="no-clip"),
        pytest.param("norm", ("first", -1.0), ValueError, r"max_norm must be a non-neg", id="neg"),
        pytest.param("norm", ("first", 1.0, 0), ValueError, r"norm_type must be > 0", id="p0"),
        pytest.param("value", ("first", float("nan")), ValueError, r"clip_value .*nan", id="nan"),
    ],
)
@pytest.mark.parametrize("mixed_precision", ["no", "fp16"])
def test_a_bad_argument_is_refused_before_anything_is_unscaled(
    mixed_precision, clip, arguments, error, message, fresh_accelerate_state
):
    """As fusedclip's own functions refuse them, in every precision mode, before the gradients
    or the scaler change. Found: a non-tensor entry raised an AttributeError from inside;
    max_norm=None under fp16 clipped nothing, silently; a bad max_norm for a subset of the
    optimizer's parameters was refused after the gradients had been unscaled."""
    accelerator = _new_accelerator(True, mixed_precision)
    model = _tiny_net()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    inputs, targets = _batches(1)[0]
    accelerator.backward(torch.nn.functional.mse_loss(model(inputs).float(), targets))
    before = [p.grad.clone() for p in model.parameters()]
    which, *rest = arguments
    named = {"all": model.parameters(), "first": model[0].parameters()}
    named["names"] = dict(model.named_parameters())
    parameters = named[which] if isinstance(which, str) else which
    method = accelerator.clip_grad_norm_ if clip == "norm" else accelerator.clip_grad_value_
    with pytest.raises(error, match=message):
        method(parameters, *rest)
    for got, want in zip((p.grad for p in model.parameters()), before, strict=True):
        assert torch.equal(got, want)
    if accelerator.scaler is not None:
        stages = [s["stage"] for s in accelerator.scaler._per_optimizer_states.values()]
        assert all(stage is torch.amp.grad_scaler.OptState.READY for stage in stages), stages


@pytest.mark.parametrize("clip", ["norm", "value"])
@pytest.mark.parametrize("mixed_precision", ["no", "fp16"])
def test_a_single_tensor_is_clipped_as_torch_nn_utils_clips_it(
    mixed_precision, clip, fresh_accelerate_state
):
    """Decision: `clip_grad_norm_(weight)` clips that weight, as torch.nn.utils and accelerate's
    own clip_grad_value_ do (accelerate's clip_grad_norm_ iterates a tensor's rows)."""
    accelerator = _new_accelerator(True, mixed_precision)
    model = _tiny_net()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    inputs, targets = _batches(1)[0]
    accelerator.backward(torch.nn.functional.mse_loss(model(inputs).float(), targets))
    weight = model[0].weight
    expected = torch.nn.Parameter(weight.detach().clone())
    scale = accelerator.scaler.get_scale() if mixed_precision == "fp16" else 1.0
    expected.grad = weight.grad / scale  # a power of two: exact
    if clip == "norm":
        torch_norm = torch.nn.utils.clip_grad_norm_(expected, 1e-3)
        norm = accelerator.clip_grad_norm_(weight, 1e-3)
        torch.testing.assert_close(norm, torch_norm, rtol=NORM_RTOL, atol=0)
    else:
        torch.nn.utils.clip_grad_value_(expected, 1e-5)
        assert accelerator.clip_grad_value_(weight, 1e-5) is None
    torch.testing.assert_close(weight.grad, expected.grad, rtol=WEIGHT_RTOL, atol=0)


# Hugging Face Trainer ----------------------------------------------------------------------------


def _trainer_run(*, fused: bool, precision: str, tmp_path) -> tuple[list[dict], list[float]]:
    transformers = pytest.importorskip("transformers")
    from fusedclip.integrations import transformers as fused_transformers

    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 64, (24, 12), generator=generator)
    dataset = [{"input_ids": row, "labels": row} for row in tokens]

    class OverflowingTrainer(transformers.Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            if self.state.global_step == OVERFLOW_BATCH and precision == "fp16":
                loss = loss * float("inf")
            return loss

    history: list[dict] = []

    class Record(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            entry = {f"weight {n}": p.detach().clone() for n, p in model.named_parameters()}
            if trainer.accelerator.scaler is not None:
                entry["loss scale"] = trainer.accelerator.scaler.get_scale()
            history.append(entry)

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / ("fused" if fused else "stock")),
        max_steps=5,
        per_device_train_batch_size=4,
        learning_rate=0.05,
        lr_scheduler_type="constant",
        optim="sgd",
        max_grad_norm=0.1,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = OverflowingTrainer(
        model=model, args=args, train_dataset=dataset, callbacks=[Record()]
    )
    if precision == "fp16":  # accelerate makes a GradScaler only on GPUs
        trainer.accelerator.native_amp = True
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    if fused:
        fused_transformers.enable(trainer)
    trainer.train()
    logged = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    return history, logged


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_trainer_matches_its_own_clipping_and_logs_the_same_grad_norm(
    precision, fresh_accelerate_state, tmp_path, monkeypatch
):
    stock_history, stock_norms = _trainer_run(fused=False, precision=precision, tmp_path=tmp_path)
    unscale_calls = []
    torch_unscale = torch.amp.GradScaler.unscale_

    def counting_unscale(self, optimizer):
        unscale_calls.append(optimizer)
        return torch_unscale(self, optimizer)

    monkeypatch.setattr(torch.amp.GradScaler, "unscale_", counting_unscale)
    fused_history, fused_norms = _trainer_run(fused=True, precision=precision, tmp_path=tmp_path)
    assert not unscale_calls, "fusedclip did the unscale"
    _assert_same_run(stock_history, fused_history)
    assert len(stock_norms) == len(fused_norms) == len(stock_history)
    for step, (got, want) in enumerate(zip(fused_norms, stock_norms, strict=True)):
        if math.isfinite(want):
            assert got == pytest.approx(want, rel=NORM_RTOL), f"step {step}"
        else:
            assert not math.isfinite(got), f"step {step}: {got}"
    if precision == "fp16":
        assert not math.isfinite(stock_norms[OVERFLOW_BATCH])
        assert stock_history[OVERFLOW_BATCH]["loss scale"] < stock_history[0]["loss scale"]


def test_enable_carries_over_to_an_accelerator_the_trainer_makes_anew(
    fresh_accelerate_state, tmp_path, monkeypatch
):
    """hyperparameter_search makes a new Accelerator for every trial
    (create_accelerator_and_postprocess); it must clip through fusedclip too."""
    transformers = pytest.importorskip("transformers")
    import fusedclip
    from fusedclip.integrations import transformers as fused_transformers

    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    tokens = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(2))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, max_grad_norm=0.1,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=transformers.GPT2LMHeadModel(config),
        args=args,
        train_dataset=[{"input_ids": row, "labels": row} for row in tokens],
    )
    fused_transformers.enable(fused_transformers.enable(trainer))  # twice: still one wrapper
    trainer.create_accelerator_and_postprocess()  # what every hyperparameter_search trial does
    clips = []
    fused_clip = fusedclip.clip_grad_norm_

    def recording_clip(*call_args, **kwargs):
        clips.append(kwargs)
        return fused_clip(*call_args, **kwargs)

    monkeypatch.setattr(fusedclip, "clip_grad_norm_", recording_clip)
    trainer.train()
    assert len(clips) == 2, "the new Accelerator clipped through accelerate's own path"


def test_enable_refuses_what_is_not_a_trainer():
    pytest.importorskip("transformers")
    from fusedclip.integrations import transformers as fused_transformers

    with pytest.raises(TypeError, match="trainer is a"):
        fused_transformers.enable(object())
