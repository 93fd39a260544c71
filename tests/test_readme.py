"""Every ```python block of README.md runs here, and where it replaces a torch loop it is compared
with that loop step by step.

How a snippet is registered: put `<!-- snippet: NAME -->` on the line right above its ```python
fence (an HTML comment: GitHub does not show it), and register a runner here with
`@runs("NAME")`: a function that takes the snippet's code, executes it with `exec` in a namespace
that holds what the README assumes (`model`, `optimizer`, `scaler`, `loss`, ...; see `_amp_run`)
and compares what it did with the torch code it replaces. A block without a marker, a marker
without a runner, or a runner whose snippet is gone fails `test_every_snippet_has_a_runner`.
Snippets name the GPU ("cuda"); without one they run on the CPU (`_on_this_machine`).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import tempfile
import textwrap
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from conftest import HAS_CUDA

import fusedclip

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
MARKER = re.compile(r"<!--\s*snippet:\s*([A-Za-z0-9_-]+)\s*-->")
# The README's snippets clip to this norm, as the torch loops they replace do.
MAX_NORM = 1.0
STEPS = 4
# The AMP runs make this step's loss infinite: the step must be skipped and the scale backed off.
OVERFLOW_STEP = 1
# fusedclip's norm accumulates in float64, torch's in float32: the clip factors, and through
# them the weights, differ in the last bits.
WEIGHT_RTOL = 1e-5


class Snippet(NamedTuple):
    name: str | None
    code: str
    line: int  # of the ```python fence, 1-based


def readme_snippets() -> list[Snippet]:
    """The README's ```python blocks, each with the name on the marker line above it (or None)."""
    with open(README) as file:
        lines = file.read().splitlines()
    snippets = []
    index = 0
    while index < len(lines):
        if lines[index].strip() == "```python":
            fence = index
            index += 1
            body = []
            while lines[index].strip() != "```":
                body.append(lines[index])
                index += 1
            above = fence - 1
            while above >= 0 and not lines[above].strip():
                above -= 1
            marker = MARKER.fullmatch(lines[above].strip()) if above >= 0 else None
            name = marker.group(1) if marker else None
            snippets.append(Snippet(name, textwrap.dedent("\n".join(body)) + "\n", fence + 1))
        index += 1
    return snippets


RUNNERS: dict[str, Callable[[str], None]] = {}


def runs(name: str, *marks):
    """Registers the runner of README snippet `name` (marks: pytest marks for its test)."""

    def register(runner):
        RUNNERS[name] = runner
        runner.marks = marks
        return runner

    return register


def _on_this_machine(code: str) -> str:
    return code if HAS_CUDA else code.replace('"cuda"', '"cpu"')


# The torch loops the snippets replace, and the runs that compare them ----------------------------

TORCH_AMP_STEP = """\
scaler.scale(loss).backward()
scaler.unscale_(optimizer)
torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
scaler.step(optimizer)
scaler.update()
"""


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    # Targets far from the outputs: norms well above MAX_NORM, so every step clips.
    return torch.randn(16, 8, generator=generator), 10 * torch.randn(16, 4, generator=generator)


def _loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    inputs, targets = _batch(step)
    return torch.nn.functional.mse_loss(model(inputs), targets)


def _amp_run(step_code: str, *, fused_optimizer: bool = False) -> list[dict]:
    """`step_code` as the body of an AMP training loop (after the forward pass): the weights and
    the loss scale after each step."""
    model = _model()
    if fused_optimizer:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")
    namespace = {"torch": torch, "fusedclip": fusedclip, "model": model}
    namespace.update(optimizer=optimizer, scaler=scaler)
    history = []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = _loss(model, step)
        namespace["loss"] = loss * float("inf") if step == OVERFLOW_STEP else loss
        exec(step_code, namespace)
        weights = [p.detach().clone() for p in model.parameters()]
        history.append({"weights": weights, "scale": scaler.get_scale()})
    return history


def _assert_same_training(actual: list[dict], expected: list[dict], rtol: float) -> None:
    assert len(actual) == len(expected)
    for step, (got, want) in enumerate(zip(actual, expected, strict=True)):
        assert got["scale"] == want["scale"], f"step {step}: loss scale"
        for index, (got_weight, want_weight) in enumerate(
            zip(got["weights"], want["weights"], strict=True)
        ):
            torch.testing.assert_close(
                got_weight, want_weight, rtol=rtol, atol=1e-7, msg=f"step {step} weight {index}"
            )
    # The overflow was there to be skipped: unchanged weights, a smaller scale.
    before, after = expected[OVERFLOW_STEP - 1], expected[OVERFLOW_STEP]
    assert after["scale"] < before["scale"]
    for got_weight, want_weight in zip(after["weights"], before["weights"], strict=True):
        assert torch.equal(got_weight, want_weight)


def _model_with_gradients() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A model after one backward, and an identical twin for the torch side."""
    model, twin = _model(), _model()
    for module in (model, twin):
        _loss(module, 0).backward()
    return model, twin


def _assert_same_gradients(model: torch.nn.Module, twin: torch.nn.Module) -> None:
    for index, (got, want) in enumerate(zip(model.parameters(), twin.parameters(), strict=True)):
        torch.testing.assert_close(got.grad, want.grad, rtol=WEIGHT_RTOL, atol=0, msg=f"{index}")


# Runners ------------------------------------------------------------------------------------------


@runs("overview")
def _overview(code: str) -> None:
    # Two uses in one block: the drop-in (no AMP), then the AMP clipping of a training step.
    drop_in, amp_step = code.split("\n# AMP", 1)
    model, twin = _model_with_gradients()
    namespace = {"model": model}
    exec(drop_in, namespace)
    expected = torch.nn.utils.clip_grad_norm_(twin.parameters(), MAX_NORM)
    torch.testing.assert_close(namespace["total_norm"], expected)
    _assert_same_gradients(model, twin)
    step = "import fusedclip\nscaler.scale(loss).backward()\n# AMP" + amp_step
    _assert_same_training(_amp_run(step), _amp_run(TORCH_AMP_STEP), WEIGHT_RTOL)


@runs("amp-before")
def _amp_before(code: str) -> None:
    # The README's "before" is torch's loop itself: bit for bit.
    _assert_same_training(_amp_run(code), _amp_run(TORCH_AMP_STEP), rtol=0)


@runs("amp-after")
def _amp_after(code: str) -> None:
    _assert_same_training(_amp_run(code), _amp_run(TORCH_AMP_STEP), WEIGHT_RTOL)


@runs("amp-clip-step")
def _amp_clip_step(code: str) -> None:
    _assert_same_training(
        _amp_run(code, fused_optimizer=True),
        _amp_run(TORCH_AMP_STEP, fused_optimizer=True),
        WEIGHT_RTOL,
    )


@runs("patch")
def _patch(code: str) -> None:
    patch_module = importlib.import_module("fusedclip.patch")
    model, twin = _model_with_gradients()
    torch_clip = torch.nn.utils.clip_grad_norm_
    calls = []
    real = patch_module.REPLACED_FUNCTIONS["clip_grad_norm_"]

    def recording(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setitem(patch_module.REPLACED_FUNCTIONS, "clip_grad_norm_", recording)
        exec(code, {"torch": torch, "fusedclip": fusedclip, "model": model})
    assert len(calls) == 1, "the patched call did not run fusedclip"
    assert torch.nn.utils.clip_grad_norm_ is torch_clip, "the with block did not undo the patch"
    torch_clip(twin.parameters(), MAX_NORM)
    _assert_same_gradients(model, twin)


class _LightningCase:
    """A tiny LightningModule and the settings the README's trainer is compared under."""

    @staticmethod
    def module():
        import lightning

        class Module(lightning.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = _model()

            def training_step(self, batch, batch_idx):
                inputs, targets = batch
                return torch.nn.functional.mse_loss(self.net(inputs).float(), targets)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

            def train_dataloader(self):
                inputs, targets = (
                    torch.cat(p) for p in zip(*map(_batch, range(STEPS)), strict=True)
                )
                dataset = torch.utils.data.TensorDataset(inputs, targets)
                return torch.utils.data.DataLoader(dataset, batch_size=16)

        return Module()


@runs("lightning")
def _lightning(code: str) -> None:
    lightning = pytest.importorskip("lightning")
    from lightning.pytorch.plugins.precision import MixedPrecision

    device = "cuda" if HAS_CUDA else "cpu"
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    # The snippet's trainer keeps Lightning's logger and checkpoints: they write in a scratch cwd.
    with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch):
        namespace = {"lightning": lightning}
        exec(_on_this_machine(code), namespace)
        trainer = namespace["trainer"]
        trainer.fit_loop.max_epochs = 1
        fused_module = _LightningCase.module()
        trainer.fit(fused_module)
        stock = lightning.Trainer(
            plugins=[MixedPrecision("16-mixed", device)],
            gradient_clip_val=MAX_NORM,
            gradient_clip_algorithm="norm",
            max_epochs=1,
            enable_model_summary=False,
            **quiet,
        )
        stock_module = _LightningCase.module()
        stock.fit(stock_module)
    assert trainer.precision_plugin.last_result is not None, "the fused clip did not run"
    for got, want in zip(fused_module.parameters(), stock_module.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=WEIGHT_RTOL, atol=1e-7)


@contextlib.contextmanager
def _fresh_accelerate_state():
    state = importlib.import_module("accelerate.state")
    state.AcceleratorState._reset_state(True)
    try:
        yield
    finally:
        state.AcceleratorState._reset_state(True)


@runs("accelerate")
def _accelerate(code: str) -> None:
    accelerate = pytest.importorskip("accelerate")
    results = []
    stock_code = (
        "accelerator = accelerate.Accelerator(mixed_precision='fp16')\n"
        "model, optimizer = accelerator.prepare(model, optimizer)\n"
        "accelerator.backward(loss)\n"
        "total_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm=1.0)\n"
        "optimizer.step()\n"
    )
    for step_code in (_on_this_machine(code), stock_code):
        with _fresh_accelerate_state():
            model = _model()
            namespace = {"accelerate": accelerate, "model": model, "loss": _loss(model, 0)}
            namespace["optimizer"] = torch.optim.SGD(model.parameters(), lr=0.1)
            exec(step_code, namespace)
            results.append((namespace["total_norm"], list(namespace["model"].parameters())))
    (norm, weights), (stock_norm, stock_weights) = results
    torch.testing.assert_close(norm, stock_norm, rtol=1e-6, atol=0)
    for got, want in zip(weights, stock_weights, strict=True):
        torch.testing.assert_close(got, want, rtol=WEIGHT_RTOL, atol=1e-7)


@runs("transformers")
def _transformers(code: str) -> None:
    transformers = pytest.importorskip("transformers")
    output_dir = tempfile.mkdtemp(prefix="readme-transformers-")
    runs_done = []
    for fused in (True, False):
        with _fresh_accelerate_state():
            torch.manual_seed(0)
            config = transformers.GPT2Config(
                vocab_size=64,
                n_positions=16,
                n_embd=16,
                n_layer=1,
                n_head=2,
                bos_token_id=0,
                eos_token_id=0,
            )
            model = transformers.GPT2LMHeadModel(config)
            tokens = torch.randint(0, 64, (12, 12), generator=torch.Generator().manual_seed(3))
            args = transformers.TrainingArguments(
                output_dir=output_dir,
                max_steps=3,
                per_device_train_batch_size=4,
                learning_rate=0.5,
                optim="sgd",
                max_grad_norm=0.3,  # below every step's norm: each step clips
                logging_steps=1,
                save_strategy="no",
                report_to=[],
                use_cpu=not HAS_CUDA,
                seed=0,
                disable_tqdm=True,
            )
            namespace = {"transformers": transformers, "fusedclip": fusedclip, "args": args}
            namespace["model"] = model
            namespace["dataset"] = [{"input_ids": row, "labels": row} for row in tokens]
            if fused:
                exec(code, namespace)
            else:
                exec(
                    code.replace("fusedclip.integrations.transformers.enable(trainer)", ""),
                    namespace,
                )
            history = namespace["trainer"].state.log_history
            runs_done.append(
                ([e["grad_norm"] for e in history if "grad_norm" in e], list(model.parameters()))
            )
    (norms, weights), (stock_norms, stock_weights) = runs_done
    assert norms == pytest.approx(stock_norms, rel=1e-6) and len(norms) == 3
    assert min(norms) > 0.3, "a step did not clip: the comparison would show less"
    for got, want in zip(weights, stock_weights, strict=True):
        torch.testing.assert_close(got, want, rtol=WEIGHT_RTOL, atol=1e-7)


@contextlib.contextmanager
def _single_process_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


@runs("distributed-group")
def _distributed_group(code: str) -> None:
    model, twin = _model_with_gradients()
    with _single_process_group() as dist:
        namespace = {"fusedclip": fusedclip, "dp_group": dist.group.WORLD}
        namespace["my_shards"] = list(model.parameters())
        exec(code, namespace)
    torch.testing.assert_close(
        namespace["norm"], torch.nn.utils.clip_grad_norm_(twin.parameters(), MAX_NORM)
    )
    _assert_same_gradients(model, twin)


@runs("distributed-fsdp2")
def _distributed_fsdp2(code: str) -> None:
    from torch.distributed.fsdp import fully_shard

    model, twin = _model(), _model()
    _loss(twin, 0).backward()
    expected = torch.nn.utils.clip_grad_norm_(twin.parameters(), MAX_NORM)

    class LossOfTheShardedModel:
        """`loss` in the snippet: the forward pass of the model as it is when backward runs."""

        def backward(self):
            _loss(namespace["model"], 0).backward()

    with _single_process_group():
        namespace = {"fusedclip": fusedclip, "fully_shard": fully_shard, "model": model}
        namespace["loss"] = LossOfTheShardedModel()
        exec(code, namespace)
        norm = namespace["norm"]
        torch.testing.assert_close(norm, expected)
        for got, want in zip(namespace["model"].parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(got.grad.full_tensor(), want.grad, rtol=WEIGHT_RTOL, atol=0)


@runs("stability")
def _stability(code: str) -> None:
    # A showcase of several tools, not a replacement of one torch loop: it must run as written,
    # and clip_gradient must be the identity in the forward pass.
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.body = torch.nn.Linear(8, 8)
    model.head = torch.nn.Linear(8, 4)
    cell = torch.nn.RNNCell(8, 8)
    # Two groups in another order than the model's: the monitor's names must follow the
    # optimizer's (names in the model's order labelled the wrong layers).
    groups = [{"params": model.head.parameters()}, {"params": model.body.parameters()}]
    optimizer = torch.optim.SGD(groups, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    x_t, hidden = torch.randn(3, 8), torch.randn(3, 8, requires_grad=True)
    expected_hidden = cell(x_t, hidden)
    loss = model.head(model.body(x_t)).square().mean() + expected_hidden.square().mean()
    scaler.scale(loss).backward()
    namespace = {"fusedclip": fusedclip, "torch": torch, "model": model, "cell": cell}
    namespace.update(optimizer=optimizer, scaler=scaler, x_t=x_t, hidden=hidden)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code, namespace)
    torch.testing.assert_close(namespace["hidden"], expected_hidden, rtol=0, atol=0)
    assert printed.getvalue().strip(), "monitor.summary() printed nothing"
    name_of = {p: n for n, p in model.named_parameters()}
    in_optimizer_order = [name_of[p] for g in optimizer.param_groups for p in g["params"]]
    per_tensor = namespace["result"].per_tensor_norms.tolist()
    recorded = dict(zip(in_optimizer_order, per_tensor, strict=True))
    largest = namespace["monitor"].summary()["largest_norms"]
    assert largest and all(norm == pytest.approx(recorded[name]) for name, norm in largest)


# Tests --------------------------------------------------------------------------------------------


def test_every_snippet_has_a_runner():
    snippets = readme_snippets()
    assert snippets, "no ```python block found in README.md"
    unmarked = [snippet.line for snippet in snippets if snippet.name is None]
    assert not unmarked, (
        f"README.md lines {unmarked}: a ```python block without a `<!-- snippet: NAME -->` line "
        "right above it; add one and register a runner for NAME in tests/test_readme.py"
    )
    names = [snippet.name for snippet in snippets]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    assert not duplicated, f"README snippet names used twice: {duplicated}"
    no_runner = sorted(set(names) - set(RUNNERS))
    assert not no_runner, f"README snippets without a runner in tests/test_readme.py: {no_runner}"
    stale = sorted(set(RUNNERS) - set(names))
    assert not stale, f"runners in tests/test_readme.py whose README snippet is gone: {stale}"


@pytest.mark.parametrize(
    "snippet",
    [
        pytest.param(
            snippet,
            id=snippet.name or f"line-{snippet.line}",
            marks=getattr(RUNNERS.get(snippet.name), "marks", ()),
        )
        for snippet in readme_snippets()
    ],
)
def test_readme_snippet(snippet: Snippet):
    if snippet.name not in RUNNERS:
        pytest.fail(
            f"README.md line {snippet.line}: no runner (see test_every_snippet_has_a_runner)"
        )
    RUNNERS[snippet.name](snippet.code)
