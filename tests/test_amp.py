"""fusedclip.amp against torch's own AMP loop: scaler.unscale_ + clip_grad_norm_ + scaler.step."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES, assert_close, plan_in_python, refusing_host_syncs

from fusedclip import amp
from fusedclip.stability import ZClip

OVERFLOW_STEPS = {2, 5}
MAX_NORM = 0.5


def _model(device, dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(
        device=device, dtype=dtype
    )


def _optimizer(kind, params, fused):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=fused)
    return torch.optim.AdamW(params, lr=1e-2, fused=fused)


def _train(device, path, kind, fused, steps=8, dtype=torch.float32):
    """Runs `path` for `steps` steps with overflows injected; returns parameters, scales, norms."""
    model = _model(device, dtype)
    optimizer = _optimizer(kind, model.parameters(), fused)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**12, growth_interval=3)
    generator = torch.Generator().manual_seed(1)
    scales, norms = [], []
    for step in range(steps):
        inputs = torch.randn(8, 16, generator=generator).to(device=device, dtype=dtype)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(model(inputs).float().square().mean()).backward()
        if step in OVERFLOW_STEPS:
            next(model.parameters()).grad.view(-1)[3] = math.inf
        if path == "torch":
            scaler.unscale_(optimizer)
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).float())
            scaler.step(optimizer)
        elif path == "unscale_clip_":
            norms.append(amp.unscale_clip_(scaler, optimizer, MAX_NORM).total_norm)
            scaler.step(optimizer)
        elif path == "amp.step":
            norms.append(amp.unscale_clip_(scaler, optimizer, MAX_NORM).total_norm)
            amp.step(optimizer, scaler=scaler)
        else:
            norms.append(amp.clip_step(optimizer, MAX_NORM, scaler=scaler).total_norm)
        scaler.update()
        scales.append(scaler.get_scale())
    return [p.detach().clone() for p in model.parameters()], scales, norms


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["unscale_clip_", "amp.step", "clip_step"])
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_training_follows_torch_step_for_step(device, path, kind, fused):
    expected_params, expected_scales, expected_norms = _train(device, "torch", kind, fused)
    params, scales, norms = _train(device, path, kind, fused)
    assert scales == expected_scales, "the scale must back off and grow exactly as torch's"
    for step, (norm, expected) in enumerate(zip(norms, expected_norms, strict=True)):
        if step in OVERFLOW_STEPS:
            assert not math.isfinite(norm.item()) and not math.isfinite(expected.item())
        else:
            assert_close(norm, expected, rtol=1e-5, what=f"norm at step {step}")
    for index, (param, expected) in enumerate(zip(params, expected_params, strict=True)):
        assert_close(param, expected, rtol=1e-5, atol=1e-6, what=f"parameter {index}")


@pytest.mark.parametrize("path", ["unscale_clip_", "clip_step"])
def test_overflow_skips_the_step_and_backs_off(path):
    model = _model("cpu")
    optimizer = _optimizer("adamw", model.parameters(), fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(torch.randn(4, 16)).square().sum()).backward()
    next(model.parameters()).grad[0, 0] = math.nan
    if path == "unscale_clip_":
        result = amp.unscale_clip_(scaler, optimizer, 1.0)
        scaler.step(optimizer)
    else:
        result = amp.clip_step(optimizer, 1.0, scaler=scaler)
    scaler.update()
    assert result.found_inf.item() == 1.0
    assert scaler.get_scale() == 2.0**9
    for param, original in zip(model.parameters(), before, strict=True):
        assert torch.equal(param, original)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_gradients(device):
    # torch's CUDA unscale kernel has no bfloat16: its CPU path is the reference for every device.
    expected_params, expected_scales, _ = _train(
        "cpu", "torch", "adamw", False, dtype=torch.bfloat16, steps=4
    )
    params, scales, _ = _train(
        device, "unscale_clip_", "adamw", False, dtype=torch.bfloat16, steps=4
    )
    assert scales == expected_scales
    for param, expected in zip(params, expected_params, strict=True):
        assert_close(param.cpu(), expected, rtol=2e-2, atol=2e-3, what="bf16 parameter")


def test_unscale_twice_raises_torchs_error():
    model = _model("cpu")
    optimizer = _optimizer("sgd", model.parameters(), fused=False)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randn(2, 16)).sum()).backward()
    amp.unscale_clip_(scaler, optimizer, 1.0)
    with pytest.raises(
        RuntimeError, match=r"unscale_\(\) has already been called on this optimizer"
    ):
        scaler.unscale_(optimizer)
    with pytest.raises(
        RuntimeError, match=r"unscale_\(\) has already been called on this optimizer"
    ):
        amp.unscale_clip_(scaler, optimizer, 1.0)
    scaler.step(optimizer)
    with pytest.raises(RuntimeError, match=r"unscale_\(\) is being called after step\(\)"):
        amp.unscale_clip_(scaler, optimizer, 1.0)


def test_unscale_clip_runs_without_grad_as_clip_grad_norm():
    # Gradients that require grad (backward(create_graph=True)) in grad mode: the ops have no
    # derivative, so this works only because unscale_clip_ turns grad mode off for the call.
    model = _model("cpu")
    optimizer = _optimizer("sgd", model.parameters(), fused=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(model(torch.randn(2, 16)).pow(2).sum()).backward(create_graph=True)
    grads = [p.grad for p in model.parameters()]
    assert all(grad.requires_grad for grad in grads)
    with torch.no_grad():
        expected = [grad / 4.0 for grad in grads]
    result = amp.unscale_clip_(scaler, optimizer, None)
    assert torch.is_grad_enabled()
    assert result.found_inf.item() == 0.0
    for grad, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(grad.detach(), want)


def test_optimizer_without_gradients_behaves_like_torch():
    def run(unscale):
        model = _model("cpu")
        optimizer = _optimizer("sgd", model.parameters(), fused=False)
        scaler = torch.amp.GradScaler("cpu")
        scaler.scale(torch.zeros((), requires_grad=True))
        unscale(scaler, optimizer)
        with pytest.raises(AssertionError, match="No inf checks were recorded") as error:
            scaler.step(optimizer)
        return str(error.value)

    assert run(lambda s, o: amp.unscale_clip_(s, o, 1.0)) == run(lambda s, o: s.unscale_(o))


def test_float16_gradients_are_refused_like_torch():
    model = _model("cpu", torch.float16)
    optimizer = _optimizer("sgd", model.parameters(), fused=False)
    scaler = torch.amp.GradScaler("cpu")
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    scaler.scale(torch.zeros(()))
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        amp.unscale_clip_(scaler, optimizer, 1.0)
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler.unscale_(optimizer)


@pytest.mark.parametrize(
    "call",
    [
        lambda s, o: amp.unscale_clip_(s, o, max_norm=math.nan),
        lambda s, o: amp.unscale_clip_(s, o, 1.0, norm_type=0.0),
        lambda s, o: amp.unscale_clip_(s, o, 1.0, backend="nope"),
        lambda s, o: amp.clip_step(o, -1.0, scaler=s),
    ],
    ids=["max_norm", "norm_type", "backend", "clip_step"],
)
def test_a_refused_call_leaves_the_scaler_without_a_record(call):
    """The scaler's record for the optimizer was made before the arguments were checked: a
    refused call left one behind (READY, as torch's defaultdict would make it, but the scaler
    was not as before the call)."""
    model = _model("cpu")
    optimizer = _optimizer("sgd", model.parameters(), fused=False)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.ones(3, 16)).square().sum()).backward()
    with pytest.raises(ValueError):
        call(scaler, optimizer)
    assert dict(scaler._per_optimizer_states) == {}


@pytest.mark.parametrize("fast_planner", [True, False], ids=["c++-planner", "python-planner"])
def test_several_param_groups_match_torch_and_a_float16_one_changes_nothing(
    monkeypatch, fast_planner
):
    if not fast_planner:
        plan_in_python(monkeypatch)

    def setup():
        model = _model("cpu")
        first, second = list(model[0].parameters()), list(model[2].parameters())
        optimizer = torch.optim.SGD([{"params": first}, {"params": second, "lr": 0.5}], lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
        scaler.scale(model(torch.ones(3, 16)).square().sum()).backward()
        return model, optimizer, scaler

    model, optimizer, scaler = setup()
    norm = amp.unscale_clip_(scaler, optimizer, 0.1).total_norm
    twin, twin_optimizer, twin_scaler = setup()
    twin_scaler.unscale_(twin_optimizer)
    assert_close(norm, torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.1), rtol=1e-6)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9)

    model, optimizer, scaler = setup()
    half = torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))
    half.grad = torch.ones_like(half)
    optimizer.add_param_group({"params": [half]})
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        amp.unscale_clip_(scaler, optimizer, 0.1)
    for p, original in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.grad, original)


def test_disabled_scaler_is_plain_clipping():
    model, reference_model = _model("cpu"), _model("cpu")
    for m in (model, reference_model):
        m(torch.ones(3, 16)).sum().backward()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    optimizer = _optimizer("sgd", model.parameters(), fused=False)
    result = amp.unscale_clip_(scaler, optimizer, 0.1)
    expected = torch.nn.utils.clip_grad_norm_(reference_model.parameters(), 0.1)
    assert_close(result.total_norm, expected, rtol=1e-6, what="norm")
    for param, ref in zip(model.parameters(), reference_model.parameters(), strict=True):
        assert_close(param.grad, ref.grad, rtol=1e-6, what="grad")


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_clip_step_without_scaler_matches_clip_then_step(kind):
    model, reference_model = _model("cpu"), _model("cpu")
    optimizer = _optimizer(kind, model.parameters(), fused=True)
    reference_optimizer = _optimizer(kind, reference_model.parameters(), fused=True)
    for _ in range(3):
        inputs = torch.randn(5, 16)
        for m in (model, reference_model):
            m.zero_grad()
            m(inputs).square().sum().backward()
        amp.clip_step(optimizer, 0.2)
        torch.nn.utils.clip_grad_norm_(reference_model.parameters(), 0.2)
        reference_optimizer.step()
    for param, ref in zip(model.parameters(), reference_model.parameters(), strict=True):
        assert_close(param, ref, rtol=1e-5, atol=1e-7, what="parameter")


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_amp_step_unscales_first_and_refuses_a_second_step_like_scaler_step(fused):
    """Without unscale_clip_ before it, amp.step is scaler.step: torch's unscale_, then the step."""
    runs = []
    for step in (amp.step, lambda optimizer, scaler: scaler.step(optimizer)):
        model = _model("cpu")
        optimizer = _optimizer("adamw", model.parameters(), fused)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
        scaler.scale(model(torch.ones(3, 16)).square().sum()).backward()
        step(optimizer, scaler=scaler)
        with pytest.raises(RuntimeError, match=r"step\(\) has already been called"):
            step(optimizer, scaler=scaler)
        scaler.update()
        runs.append([p.detach().clone() for p in model.parameters()])
    for param, expected in zip(*runs, strict=True):
        assert torch.equal(param, expected)


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_clip_step_returns_per_tensor_norms(fused):
    model = _model("cpu")
    model(torch.ones(3, 16)).square().sum().backward()
    expected = [torch.linalg.vector_norm(p.grad) for p in model.parameters()]
    optimizer = _optimizer("sgd", model.parameters(), fused)
    result = amp.clip_step(optimizer, MAX_NORM, per_tensor=True)
    assert_close(result.per_tensor_norms, torch.stack(expected), rtol=1e-6, what="per-tensor norms")


def test_a_skipped_first_step_leaves_fused_sgd_momentum_as_foreach_does():
    # torch's fused SGD allocates its momentum buffers uninitialized on the first step and returns
    # early on found_inf: a first step skipped on the device would leave garbage behind.
    runs = []
    for fused in (False, True):
        model = _model("cpu")
        optimizer = _optimizer("sgd", model.parameters(), fused)
        for step in range(3):
            model.zero_grad()
            model(torch.ones(2, 16)).square().sum().backward()
            amp.step(optimizer, skip=torch.tensor(step == 0))
        runs.append([p.detach().clone() for p in model.parameters()])
    for param, expected in zip(*runs, strict=True):
        assert_close(param, expected, rtol=1e-6, atol=1e-7, what="parameter after a skipped start")


def test_amp_step_lets_fused_optimizers_unscale_float16_as_scaler_step_does():
    runs = []
    for step in (amp.step, lambda optimizer, scaler: scaler.step(optimizer)):
        model = _model("cpu", torch.float16)
        optimizer = _optimizer("adamw", model.parameters(), fused=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
        scaler.scale(
            model(torch.ones(3, 16, dtype=torch.float16)).float().square().sum()
        ).backward()
        step(optimizer, scaler=scaler)
        runs.append([p.detach().clone() for p in model.parameters()])
    for param, expected in zip(*runs, strict=True):
        assert torch.equal(param, expected)


def test_fused_sgd_with_a_frozen_group_decides_on_the_device_after_its_first_step():
    model = _model("cpu")
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9, fused=True)
    model[2].requires_grad_(False)  # its group never has gradients, hence never a buffer
    for step in range(3):
        model.zero_grad()
        model(torch.ones(2, 16)).square().sum().backward()
        with refusing_host_syncs(enabled=step > 0):
            amp.step(optimizer, skip=torch.tensor(False))


def test_mistaken_arguments_get_errors_that_name_them():
    model = _model("cpu")
    optimizer = _optimizer("sgd", model.parameters(), fused=False)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randn(2, 16)).sum()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(TypeError, match=r"scaler must be a torch.amp.GradScaler, got NoneType"):
        amp.unscale_clip_(None, optimizer, 1.0)
    with pytest.raises(
        TypeError, match=r"optimizer must be .*GradScaler \(scaler and optimizer swapped"
    ):
        amp.unscale_clip_(optimizer, scaler, 1.0)
    with pytest.raises(TypeError, match=r"clip_step: optimizer must be a torch.optim.Optimizer"):
        amp.clip_step(scaler, 1.0)
    for parameter, grad in zip(model.parameters(), grads, strict=True):
        assert torch.equal(parameter.grad, grad), "a refused call changed a gradient"


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_clip_step_twice_before_update_names_clip_step(fused):
    model = _model("cpu")
    optimizer = _optimizer("adamw", model.parameters(), fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
    scaler.scale(model(torch.ones(3, 16)).square().sum()).backward()
    amp.clip_step(optimizer, 1.0, scaler=scaler)
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"clip_step\(\): .*call scaler.update\(\)"):
        amp.clip_step(optimizer, 1.0, scaler=scaler)
    for parameter, weight in zip(model.parameters(), weights, strict=True):
        assert torch.equal(parameter, weight), "a refused clip_step moved the weights"
    scaler.update()
    scaler.scale(model(torch.ones(3, 16)).square().sum()).backward()
    amp.clip_step(optimizer, 1.0, scaler=scaler)  # after update() it works again


def test_an_earlier_optimizers_found_inf_survives_the_scalers_update():
    # GradScaler.update sums every optimizer's recorded flag into the first one in place.
    for path in ("unscale_clip_", "clip_step"):
        a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
        optimizers = [torch.optim.AdamW([p], fused=True) for p in (a, b)]
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
        scaler.scale(torch.ones(()))  # makes the scale tensor, as scaling the loss does
        a.grad, b.grad = torch.ones(3), torch.tensor([1.0, math.inf, 1.0])
        if path == "unscale_clip_":
            results = [amp.unscale_clip_(scaler, o, 1.0) for o in optimizers]
            for o in optimizers:
                scaler.step(o)
        else:
            results = [amp.clip_step(o, 1.0, scaler=scaler) for o in optimizers]
        scaler.update()
        assert [r.found_inf.item() for r in results] == [0.0, 1.0], path
        assert scaler.get_scale() == 1.0  # the overflow still backed the scale off


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
@pytest.mark.parametrize(
    "skip, error",
    [(True, TypeError), (1.0, TypeError), (torch.tensor([0.0, 1.0]), TypeError)],
    ids=["bool", "float", "two-elements"],
)
def test_amp_step_refuses_a_bad_skip_before_unscaling(fused, skip, error):
    model = _model("cpu")
    optimizer = _optimizer("adamw", model.parameters(), fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
    scaler.scale(model(torch.ones(3, 16)).square().sum()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match="skip must be"):
        amp.step(optimizer, skip=skip, scaler=scaler)
    for p, grad, weight in zip(model.parameters(), grads, weights, strict=True):
        assert torch.equal(p.grad, grad) and torch.equal(p.detach(), weight)
    amp.step(optimizer, scaler=scaler)  # the scaler was left ready: the step runs as usual


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_clip_step_without_scaler_skips_a_nonfinite_step_fused_or_not(kind, fused):
    model = _model("cpu")
    optimizer = _optimizer(kind, model.parameters(), fused)
    model(torch.ones(2, 16)).square().sum().backward()
    next(model.parameters()).grad.view(-1)[0] = math.nan
    weights = [p.detach().clone() for p in model.parameters()]
    result = amp.clip_step(optimizer, MAX_NORM)
    assert result.found_inf.item() == 1.0
    for param, weight in zip(model.parameters(), weights, strict=True):
        assert torch.equal(param.detach(), weight)
    for state in optimizer.state.values():  # a skipped fused step may set up zeroed state
        assert all(not torch.is_tensor(v) or not v.any() for v in state.values()), state


def _sharing_gradients(case):
    """Two parameters whose gradients are one tensor, overlap partly, or a self-overlapping view."""
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    if case == "shared":
        a.grad = b.grad = torch.full((4,), 8.0)
    elif case == "overlapping":
        buffer = torch.full((6,), 8.0)
        a.grad, b.grad = buffer[0:4], buffer[2:6]
    else:  # expanded: four elements over one
        a.grad, b.grad = torch.full((1,), 8.0).expand(4), torch.full((4,), 8.0)
    return a, b


@pytest.mark.parametrize("case", ["shared", "overlapping", "expanded"])
@pytest.mark.parametrize("rule", ["clip_step", "zclip"])
def test_fused_clip_step_refuses_gradients_it_would_scale_twice(rule, case):
    """A fused optimizer divides each parameter's gradient itself: memory listed twice would be
    unscaled twice, and overlaps written twice. Refused before anything changes."""
    from fusedclip.stability import ZClip

    a, b = _sharing_gradients(case)
    optimizer = torch.optim.SGD([a, b], lr=1.0, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(torch.ones(()))
    grads = [a.grad.clone(), b.grad.clone()]
    match = "same memory" if case == "shared" else "overlap"
    with pytest.raises(ValueError, match=match):
        if rule == "clip_step":
            amp.clip_step(optimizer, 0.1, scaler=scaler)
        else:
            ZClip(warmup_steps=2).clip_step(optimizer, scaler=scaler)
    assert torch.equal(a.grad, grads[0]) and torch.equal(b.grad, grads[1])
    assert not a.detach().any() and not b.detach().any()
    assert id(optimizer) not in scaler._per_optimizer_states  # nothing recorded as unscaled


def test_clip_step_scales_a_shared_gradient_once_with_a_non_fused_optimizer():
    a, b = _sharing_gradients("shared")
    optimizer = torch.optim.SGD([a, b], lr=1.0, fused=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(torch.ones(()))
    amp.clip_step(optimizer, 0.1, scaler=scaler)
    expected = -torch.full((4,), 0.05)  # unscaled to 1 (norm 2), clipped to norm 0.1, once
    assert_close(a.detach(), expected, rtol=1e-5, what="a")
    assert_close(b.detach(), expected, rtol=1e-5, what="b")


SKIP_VALUES = {
    "count-2": (torch.tensor(2), True),
    "half": (torch.tensor(0.5), True),
    "nan": (torch.tensor(math.nan), True),
    "negative": (torch.tensor(-1.0), True),
    "shape-1x1": (torch.tensor([[1.0]]), True),
    "bool-true": (torch.tensor(True), True),
    "zero": (torch.tensor(0.0), False),
    "bool-false-1x1": (torch.tensor([[False]]), False),
}


def _adam_after_a_step(fused):
    """An AdamW that has stepped once, with a new gradient ready."""
    torch.manual_seed(0)
    model = _model("cpu")
    optimizer = _optimizer("adamw", model.parameters(), fused)
    model(torch.ones(3, 16)).square().sum().backward()
    optimizer.step()
    model(torch.ones(3, 16)).square().sum().backward()
    return model, optimizer


@pytest.mark.parametrize("value", list(SKIP_VALUES))
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaler"])
def test_amp_step_skips_on_any_nonzero_skip_fused_or_not(value, fused, scaled):
    """Any nonzero (or NaN) skip skips, as bool() decides for a non-fused optimizer. A fused one
    subtracts its found_inf from the step count and skips only on exactly 1: a count of 2
    stepped and moved Adam's step back, 0.5 and NaN corrupted it, a (1, 1) skip failed midway
    after the parameters had moved, and a negative one cancelled a recorded overflow."""
    skip, skips = SKIP_VALUES[value]
    model, optimizer = _adam_after_a_step(fused)
    twin_model, twin = _adam_after_a_step(fused)
    scaler = None
    if scaled:  # a scale of 1: the gradients are as the scaler would have scaled them
        scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
        scaler.scale(torch.ones(()))
        if value == "negative":  # and an overflow, which the negative skip must not cancel
            next(model.parameters()).grad.view(-1)[0] = math.inf
            skips = True
    amp.step(optimizer, skip=skip, scaler=scaler)
    if not skips:
        twin.step()
    for param, expected in zip(model.parameters(), twin_model.parameters(), strict=True):
        assert torch.equal(param.detach(), expected.detach()), value
    for state, expected in zip(optimizer.state.values(), twin.state.values(), strict=True):
        assert torch.equal(state["step"], expected["step"]), f"{value}: step {state['step']}"


def test_amp_step_moves_skip_to_the_scales_device_before_unscaling():
    """A skip that cannot reach the scale's device raises before the gradients are unscaled:
    once it raised after, with the scaler marked unscaled."""
    model = _model("cpu")
    optimizer = _optimizer("sgd", model.parameters(), False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(model(torch.ones(3, 16)).square().sum()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(NotImplementedError):
        amp.step(optimizer, skip=torch.zeros((), device="meta"), scaler=scaler)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    amp.step(optimizer, scaler=scaler)  # still ready: it unscales and steps as usual


def test_amp_step_multiplies_a_grad_scale_the_user_set_as_scaler_step_does():
    results = []
    for use_amp_step in (False, True):
        param = torch.nn.Parameter(torch.ones(3))
        optimizer = torch.optim.SGD([param], lr=0.1, fused=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
        scaler.scale(param.square().sum()).backward()
        optimizer.grad_scale = torch.tensor(2.0)
        (amp.step(optimizer, scaler=scaler) if use_amp_step else scaler.step(optimizer))
        results.append(param.detach().clone())
    assert torch.equal(results[1], results[0]), results


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
@pytest.mark.parametrize("how", ["step", "clip_step"])
def test_a_step_without_gradients_does_what_scaler_step_does(fused, how):
    """scaler.step raises for an optimizer whose parameters have no gradient, except a fused
    one, which it steps (changing nothing)."""
    outcomes = []
    for ours in (False, True):
        param = torch.nn.Parameter(torch.ones(3))
        optimizer = torch.optim.AdamW([param], fused=fused)
        scaler = torch.amp.GradScaler("cpu")
        scaler.scale(torch.ones(()))  # a scale exists, but no parameter has a gradient
        try:
            if not ours:
                scaler.step(optimizer)
            elif how == "step":
                amp.step(optimizer, scaler=scaler)
            else:
                amp.clip_step(optimizer, MAX_NORM, scaler=scaler)
            outcome = ("stepped", torch.equal(param.detach(), torch.ones(3)))
        except AssertionError as error:
            outcome = ("raised", str(error))
        outcomes.append((outcome, scaler._per_optimizer_states[id(optimizer)]["stage"]))
    assert outcomes[1] == outcomes[0]


@pytest.mark.parametrize("scale", [None, 2.0**16], ids=["unscaled", "scaled"])
def test_a_fused_step_whose_factor_float32_cannot_invert_counts_as_an_overflow(scale):
    """grad_scale = 1 / factor is float32: for a factor below 1 / FLOAT32_MAX (gradients whose
    norm is 2e36 as they are, scaled or not, against max_norm 1e-3) the fused optimizer divided
    by inf and stepped on zeroed gradients (AdamW counting the step, its moments decaying). The
    step now counts as an overflow: skipped, found_inf 1 (a skip the caller sees), and the scaler
    backs off, which doubles the next factor; a foreach optimizer clips it exactly. A norm 100x
    smaller steps fused as it does foreach."""
    outcomes = {}
    for magnitude in (1e36, 1e34):
        for fused in (False, True):
            param = torch.nn.Parameter(torch.ones(4))
            optimizer = torch.optim.AdamW([param], lr=1e-2, fused=fused)
            scaler = None
            if scale is not None:
                scaler = torch.amp.GradScaler("cpu", init_scale=scale)
                scaler.scale(torch.ones(()))
            param.grad = torch.full((4,), magnitude)  # scaled or not: the factor is 5e-40
            result = amp.clip_step(optimizer, 1e-3, scaler=scaler)
            new_scale = None
            if scaler is not None:
                scaler.update()
                new_scale = scaler.get_scale()
            steps = [int(state["step"]) for state in optimizer.state.values()]
            outcomes[magnitude, fused] = (
                param.detach().clone(),
                steps,
                result.found_inf.item(),
                new_scale,
            )
    skipped, stepped = outcomes[1e36, True], outcomes[1e36, False]
    assert torch.equal(skipped[0], torch.ones(4)) and skipped[1] in ([], [0]), skipped
    assert skipped[2] == 1.0 and stepped[2] == 0.0
    assert stepped[1] == [1] and not torch.equal(stepped[0], torch.ones(4))
    if scale is not None:
        assert skipped[3] == scale / 2 and stepped[3] == scale  # backed off, as an overflow
    for fused in (False, True):
        assert outcomes[1e34, fused][1] == [1] and outcomes[1e34, fused][2] == 0.0
    assert_close(outcomes[1e34, True][0], outcomes[1e34, False][0], rtol=1e-6, what="param")


def test_zclip_clip_step_marks_a_fused_step_float32_cannot_invert_as_skipped():
    """The same limit through ZClip.clip_step: result.skip and found_inf say so."""
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([param], lr=1e-2, fused=True)
    param.grad = torch.full((4,), 1e36)
    result = ZClip(max_norm=1e-3).clip_step(optimizer)
    assert bool(result.skip) and result.found_inf.item() == 1.0
    assert torch.equal(param.detach(), torch.ones(4))


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_fused_clip_step_applies_float64_gradients_at_float64(kind):
    """A fused optimizer's grad_scale is float32: float64 gradients get the factor in the write
    pass instead, as exact as unscale_clip_ then scaler.step (3e-8 off through grad_scale)."""
    params = []
    for path in ("unscale_clip_", "clip_step"):
        param = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        optimizer = torch.optim.SGD([param], lr=1.0, fused=True)
        if kind == "adamw":
            optimizer = torch.optim.AdamW([param], lr=1.0, fused=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        scaler.scale(torch.ones(()))
        param.grad = torch.tensor([3.0, 4.0, 1e-3], dtype=torch.float64) * 1024
        if path == "unscale_clip_":
            amp.unscale_clip_(scaler, optimizer, 1.0)
            scaler.step(optimizer)
        else:
            amp.clip_step(optimizer, 1.0, scaler=scaler)
        params.append(param.detach())
    assert_close(params[1], params[0], rtol=1e-15, what="float64 parameter")


def test_amp_step_without_a_scale_raises_scaler_steps_assertion():
    errors = []
    for step in (torch.amp.GradScaler.step, lambda s, o: amp.step(o, scaler=s)):
        param = torch.nn.Parameter(torch.ones(3))
        param.grad = torch.ones(3)
        scaler = torch.amp.GradScaler("cpu")  # scaler.scale() never called: no scale yet
        with pytest.raises(AssertionError) as caught:
            step(scaler, torch.optim.SGD([param], lr=0.1))
        errors.append(str(caught.value))
    assert errors[1] == errors[0]


def test_a_scale_created_in_inference_mode_unscales_as_torch_does():
    grads = []
    for ours in (False, True):
        param = torch.nn.Parameter(torch.ones(3))
        optimizer = torch.optim.SGD([param], lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
        with torch.inference_mode():
            scaler.scale(torch.ones(()))  # the scale tensor is made here: an inference tensor
        param.grad = torch.tensor([8.0, 16.0, 24.0])
        if ours:
            amp.unscale_clip_(scaler, optimizer, 1.0)
        else:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([param], 1.0)
        grads.append(param.grad.clone())
    assert_close(grads[1], grads[0], rtol=1e-6, what="gradient")


def test_uncoalesced_sparse_gradients_do_not_overflow_where_the_unscaled_sum_fits():
    """scaler.unscale_ unscales a float32 sparse gradient's values before anything sums its
    duplicates; fusedclip sums them at float64, so no false overflow skips the step."""
    outcomes = []
    for ours in (False, True):
        embedding = torch.nn.Embedding(4, 2, sparse=True)
        optimizer = torch.optim.SparseAdam(embedding.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        scaler.scale(torch.ones(()))
        values = torch.tensor([[3e38, 0.0], [3e38, 1.0]])  # scaled; duplicates of row 0
        embedding.weight.grad = torch.sparse_coo_tensor([[0, 0]], values, (4, 2))
        if ours:
            norm = amp.unscale_clip_(scaler, optimizer, 1.0).total_norm.item()
        else:
            scaler.unscale_(optimizer)
            norm = None  # torch's float32 norm of these overflows: the oracle's is below
        found_inf = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        outcomes.append((sum(flag.item() for flag in found_inf.values()), norm))
        scaler.step(optimizer)
        scaler.update()
        outcomes[-1] += (scaler.get_scale(),)
    (torch_found, _, torch_scale), (found, norm, scale) = outcomes
    assert found == torch_found == 0.0 and scale == torch_scale
    assert norm == pytest.approx(math.hypot(2 * 3e38 / 2**16, 1 / 2**16), rel=1e-6)


_OPTIMIZER_CALLS = {
    "unscale_clip_": lambda optimizer, scaler: amp.unscale_clip_(scaler, optimizer, 1.0),
    "clip_step": lambda optimizer, scaler: amp.clip_step(optimizer, 1.0, scaler=scaler),
    "ZClip.clip_step": lambda optimizer, scaler: ZClip().clip_step(optimizer, scaler=scaler),
}


@pytest.mark.parametrize("fused", [False, True], ids=["for-loop", "fused"])
@pytest.mark.parametrize("call", list(_OPTIMIZER_CALLS))
@pytest.mark.parametrize("shared", [False, True], ids=["overlapping", "one-tensor-twice"])
def test_a_refused_optimizer_gradient_is_named_by_its_parameter(fused, call, shared):
    """clip_step with a fused optimizer and ZClip.clip_step named refused gradients `tensors[0]`
    and `tensors[1]`, counting only the parameters with a gradient (here parameters[0] has
    none), where unscale_clip_ names `the optimizer's parameters[1].grad`."""
    if shared and not (fused and call != "unscale_clip_"):
        pytest.skip("the same tensor listed twice is refused only where each is written apart")
    parameters = [torch.nn.Parameter(torch.zeros(n)) for n in (4, 5, 5 if shared else 2)]
    buffer = torch.randn(5)
    parameters[1].grad = buffer
    parameters[2].grad = buffer if shared else buffer[1:3]
    before = buffer.clone()
    optimizer = torch.optim.SGD(parameters, lr=0.1, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))
    why = "are the same memory" if shared else "overlap in memory"
    names = r"^the optimizer's parameters\[1\]\.grad and the optimizer's parameters\[2\]\.grad "
    with pytest.raises(ValueError, match=names + why):
        _OPTIMIZER_CALLS[call](optimizer, scaler)
    assert torch.equal(buffer, before) and scaler.get_scale() == 1024.0
