"""ZClip, AGC and GradMonitor against plain-Python statements of their rules."""

from __future__ import annotations

import copy
import io
import math
import statistics

import pytest
import torch
from conftest import DEVICES, assert_close, refusing_host_syncs

import fusedclip
from fusedclip import amp
from fusedclip.stability import AGC, GradMonitor, SkipBudget, ZClip, agc_


class PythonSkipBudget:
    """At most max_skips skipped spikes in any window consecutive steps."""

    def __init__(self, max_skips=3, window=100):
        self.max_skips, self.window, self.recent = max_skips, window, []

    def take(self, spike):
        skip = spike and sum(self.recent[-(self.window - 1) :]) < self.max_skips
        self.recent.append(skip)
        return skip


class PythonZClip:
    """The published rule in plain floats (the oracle), as the reference implementation: raw
    norms start the statistics, the EMAs take the z-clipped norm, max_norm caps only the clip
    applied. fusedclip's additions, as plainly: non-finite norms neither count toward warm-up nor
    enter the EMAs and are always skipped; a norm of 0 (all-zero gradients) is no sample either,
    and left as it is; spikes are skipped within a budget."""

    def __init__(self, alpha=0.97, z_thresh=2.5, warmup_steps=25, max_norm=None, mode="adaptive"):
        self.alpha, self.z, self.warmup, self.max_norm, self.mode = (
            alpha,
            z_thresh,
            warmup_steps,
            max_norm,
            mode,
        )
        self.history, self.mean, self.var = [], None, None
        self.budget = PythonSkipBudget()

    def observe(self, norm):
        """(threshold, spike, skip) for this step's norm; skip as with skip_on_spike=True."""
        limit = math.inf if self.max_norm is None else self.max_norm
        if not math.isfinite(norm):
            self.budget.take(False)
            return min(norm, limit), False, True
        if norm == 0:
            self.budget.take(False)
            return 0.0, False, False
        if len(self.history) < self.warmup:
            clipped, spike = norm, False
            self.history.append(norm)
            if len(self.history) == self.warmup:
                self.mean = statistics.fmean(self.history)
                self.var = statistics.pvariance(self.history)
        else:
            std = max(math.sqrt(self.var), 1e-6)
            z = (norm - self.mean) / std
            spike = z > self.z
            clipped = norm
            if spike:
                clipped = (
                    self.mean + (self.z**2 / z) * std
                    if self.mode == "adaptive"
                    else self.mean + self.z * std
                )
            self.mean = self.alpha * self.mean + (1 - self.alpha) * clipped
            self.var = self.alpha * self.var + (1 - self.alpha) * (clipped - self.mean) ** 2
        return min(clipped, limit), spike, self.budget.take(spike)


class PythonSpikeRule:
    """GradMonitor's spike rule in plain floats (the oracle)."""

    def __init__(self, spike_factor, ema_weight):
        self.factor, self.weight = spike_factor, ema_weight
        self.ema, self.budget = None, PythonSkipBudget()

    def should_skip(self, norm):
        if not math.isfinite(norm):
            self.budget.take(False)
            return True
        spike = self.budget.take(self.ema is not None and norm > self.factor * self.ema)
        if not spike and norm > 0:
            self.ema = (
                norm if self.ema is None else self.weight * self.ema + (1 - self.weight) * norm
            )
        return spike


def scripted_norms():
    generator = torch.Generator().manual_seed(5)
    norms = (1.0 + 0.1 * torch.randn(60, generator=generator, dtype=torch.float64)).tolist()
    norms[3] = 1.6  # above max_norm during warm-up
    for spike in (30, 31, 45):
        norms[spike] = 6.0
    norms[50] = 0.2
    return norms


@pytest.mark.parametrize("mode", ["adaptive", "percentile"])
@pytest.mark.parametrize("max_norm", [None, 1.5])
def test_zclip_follows_the_published_rule(mode, max_norm):
    zclip = ZClip(alpha=0.97, z_thresh=2.5, warmup_steps=25, max_norm=max_norm, mode=mode)
    oracle = PythonZClip(max_norm=max_norm, mode=mode)
    direction = torch.randn(1000, dtype=torch.float64)
    direction /= direction.norm()
    spikes = []
    for step, norm in enumerate(scripted_norms()):
        grad = direction * norm
        result = zclip.step([grad])
        expected_threshold, _, _ = oracle.observe(norm)
        assert_close(
            result.threshold,
            torch.tensor(expected_threshold, dtype=torch.float64),
            rtol=1e-9,
            what=f"threshold at step {step}",
        )
        factor = 1.0 if expected_threshold >= norm else expected_threshold / (norm + 1e-6)
        expected = direction * norm * factor
        assert_close(grad, expected, rtol=1e-9, atol=1e-15, what=f"clipped gradient at step {step}")
        spikes.append(bool(result.spike))
    assert [i for i, s in enumerate(spikes) if s] == [30, 31, 45]


def test_zclip_with_inv_scale_measures_the_unscaled_norm():
    zclip, plain = ZClip(warmup_steps=2, max_norm=None), ZClip(warmup_steps=2, max_norm=None)
    for norm in (1.0, 1.1, 1.05, 9.0):
        scaled = torch.full((100,), norm / 10 * 1024.0)
        unscaled = torch.full((100,), norm / 10)
        result = zclip.step([scaled], inv_scale=1 / 1024)
        expected = plain.step([unscaled])
        assert_close(result.total_norm, expected.total_norm, rtol=1e-6, what="norm")
        assert_close(scaled, unscaled, rtol=1e-6, what="unscaled and clipped gradient")


def test_zclip_agc_and_grad_monitor_do_not_sync():
    linear = torch.nn.Linear(8, 4)
    linear(torch.randn(3, 8)).square().sum().backward()
    zclip, agc, monitor = ZClip(warmup_steps=3), AGC(linear.parameters()), GradMonitor(capacity=4)
    with refusing_host_syncs():
        for _ in range(6):
            monitor.record(zclip.step(linear.parameters()))
            agc.step()


def lasting_rise_norms():
    """Overflows during warm-up, an isolated spike, then a norm that triples for good."""
    norms = scripted_norms()[:45] + [3.0 * norm for norm in scripted_norms()[:40]]
    norms[0] = norms[4] = math.inf
    norms[2] = math.nan
    norms[60] = math.inf
    return norms


@pytest.mark.parametrize("mode", ["adaptive", "percentile"])
def test_zclip_warms_up_on_finite_norms_and_skips_within_its_budget(mode):
    norms = lasting_rise_norms()
    direction = torch.randn(100, dtype=torch.float64)
    direction /= direction.norm()
    skipping = ZClip(max_norm=None, mode=mode, skip_on_spike=True)
    plain = ZClip(max_norm=None, mode=mode)
    oracle = PythonZClip(max_norm=None, mode=mode)
    skipped = []
    for step, norm in enumerate(norms):
        result = skipping.step([direction * norm])
        unskipped = plain.step([direction * norm])
        threshold, spike, skip = oracle.observe(norm)
        if math.isfinite(norm):
            assert_close(
                result.threshold,
                torch.tensor(threshold, dtype=torch.float64),
                rtol=1e-9,
                what=f"threshold at step {step}",
            )
            assert torch.equal(result.threshold, unskipped.threshold), "skipping changes no EMA"
        assert bool(result.spike) == spike, f"spike at step {step}"
        assert bool(result.skip) == skip, f"skip at step {step}"
        assert bool(unskipped.skip) == (not math.isfinite(norm)), "without the option: overflow"
        skipped.append(bool(result.skip))
    assert [skipped[i] for i in (30, 31, 44, 45, 46)] == [True, True, False, True, False], (
        "the isolated spikes and the rise's first step spend the budget of 3 in 100 steps"
    )


def _zclip_skips(norms, **options):
    zclip, direction = ZClip(skip_on_spike=True, **options), torch.ones(4, dtype=torch.float64) / 2
    return [bool(zclip.step([direction * norm]).skip) for norm in norms]


@pytest.mark.parametrize("call", ["step", "clip_step"])
def test_a_step_without_gradients_is_no_sample_of_the_norm(call):
    """A step where no parameter has a gradient (all frozen, or none reached this step) measures
    nothing, but its norm of 0 took a warm-up slot and then pulled the EMAs toward 0: the
    statistics after it must be those of the norms that were measured."""
    norms = scripted_norms()[:40]
    zclip, oracle = ZClip(max_norm=None), PythonZClip(max_norm=None)
    direction = torch.ones(4, dtype=torch.float64) / 2
    frozen = torch.nn.Parameter(torch.ones(3))
    for step, norm in enumerate(norms):
        if step % 7 == 3:
            result = (
                zclip.step([frozen])
                if call == "step"
                else zclip.clip_step(torch.optim.SGD([frozen], lr=0.1))
            )
            assert not bool(result.skip) and not bool(result.spike), f"step {step}"
            assert float(result.total_norm) == 0.0
        threshold, _, _ = oracle.observe(norm)
        result = zclip.step([direction * norm])
        assert_close(
            result.threshold,
            torch.tensor(threshold, dtype=torch.float64),
            rtol=1e-9,
            what=f"threshold at step {step}",
        )


def test_zclip_takes_no_sample_from_a_zero_norm():
    """All-zero gradients (a masked loss after zero_grad(set_to_none=False)) have a norm of 0,
    which counted in the warm-up: 25 of them started a mean and variance of 0, and the std floor
    then called every ordinary norm a spike, clipping it to about 1e-11 for good. Zeros during
    and after warm-up: the statistics must be those of the nonzero norms alone."""
    ordinary = scripted_norms()
    norms = [0.0] * 25 + ordinary[:10] + [0.0, 0.0] + ordinary[10:40] + [0.0] + ordinary[40:]
    direction = torch.ones(4, dtype=torch.float64) / 2
    zclip, nonzero_only = ZClip(skip_on_spike=True), ZClip(skip_on_spike=True)
    oracle = PythonZClip(max_norm=1.0)
    spikes = []
    for step, norm in enumerate(norms):
        result = zclip.step([direction * norm])
        threshold, spike, skip = oracle.observe(norm)
        assert_close(
            result.threshold,
            torch.tensor(threshold, dtype=torch.float64),
            rtol=1e-9,
            what=f"threshold at step {step}",
        )
        assert (bool(result.spike), bool(result.skip)) == (spike, skip), f"step {step}"
        if norm == 0:
            assert result.clip_coef.item() == 1.0, f"a zero norm clipped at step {step}"
        else:
            nonzero_only.step([direction * norm])
        spikes.append(spike)
    assert sum(spikes) == 3, "the scripted spikes, and only they"
    state, expected = zclip.state_dict(), nonzero_only.state_dict()
    for key in ("mean", "var", "warmup_norms", "warmup_count"):
        assert torch.equal(state[key], expected[key]), key


def test_zclip_never_skips_more_than_its_budget_whatever_the_pattern():
    # In adaptive mode the variance collapses under repeated spikes: every 3.0 below stays a
    # spike for good, and skipping them all would never train on those batches.
    norms = scripted_norms()[:25] + [1.0, 3.0] * 150
    skipped = _zclip_skips(norms, max_norm=None)
    assert sum(skipped) > 0
    for start in range(len(norms) - 100):
        assert sum(skipped[start : start + 100]) <= 3, f"more than 3 skips from step {start}"


def test_zclip_with_default_max_norm_does_not_see_spikes_in_ordinary_norms():
    # The statistics take the uncapped norm: capped at max_norm=1.0 they would have no spread,
    # and every ordinary norm above 1.0 would look like a spike.
    generator = torch.Generator().manual_seed(8)
    norms = (1.2 + 0.2 * torch.randn(400, generator=generator, dtype=torch.float64)).tolist()
    zclip, direction = ZClip(), torch.ones(4, dtype=torch.float64) / 2
    spikes = sum(bool(zclip.step([direction * norm]).spike) for norm in norms)
    assert spikes <= 8, f"{spikes} of 400 normal draws called spikes"


def test_zclip_skips_a_norm_that_overflows_from_finite_gradients():
    zclip = ZClip(warmup_steps=2, max_norm=None)
    for norm in (1.0, 1.1):
        zclip.step([torch.full((4,), norm / 2)])
    result = zclip.step([torch.tensor([3e38, 3e38])])  # finite elements, infinite norm
    assert result.found_inf.item() == 0.0 and not math.isfinite(result.total_norm.item())
    assert bool(result.skip)


def test_zclip_clips_gradients_whose_float32_norm_overflows_instead_of_zeroing_them():
    """The coefficient divided by the float32 norm, inf here: the gradients became 0 where
    clip_grad_norm_ scales them to max_norm. It now comes from the float64 norm; the step still
    counts as an overflow (skip, no statistics)."""
    gradient = torch.tensor([3e38, 3e38])
    expected = gradient.clone()
    fusedclip.clip_grad_norm_([_parameter_with(expected)], 1.0)
    zclip = ZClip(warmup_steps=2, max_norm=1.0)
    result = zclip.step([gradient])
    assert torch.equal(gradient, expected) and gradient[0].item() == pytest.approx(0.5**0.5)
    assert bool(result.skip) and not bool(result.spike)
    assert zclip.state_dict()["warmup_count"].item() == 0


def _parameter_with(grad):
    parameter = torch.nn.Parameter(torch.zeros_like(grad))
    parameter.grad = grad
    return parameter


def _unwritable_gradients(kind):
    """Gradients that a write refuses: (the list, whether they are parameters' .grad)."""
    if kind == "overlap":
        storage = torch.arange(1.0, 7.0)
        return [storage, storage[1:3]]
    if kind == "expanded":
        return [torch.ones(4), torch.ones(3).expand(2, 3)]
    with torch.inference_mode():
        return [torch.ones(4), torch.ones(3)]


@pytest.mark.parametrize("kind", ["overlap", "expanded", "inference"])
@pytest.mark.parametrize("call", ["step", "clip_step"])
def test_zclip_refuses_gradients_it_cannot_write_before_its_state_changes(kind, call):
    """The gradients were measured as for a read, and the write refused them only after the
    step had entered the warm-up and the skip budget: a caller that caught the error carried a
    norm that was never applied."""
    zclip = ZClip(warmup_steps=3, skip_on_spike=True)
    zclip.step([torch.ones(2)])  # some state, so that a change would show
    before = repr(zclip.state_dict())
    grads = _unwritable_gradients(kind)
    snapshot = [grad.clone() for grad in grads]
    with pytest.raises(ValueError, match="overlap|inference"):
        if call == "step":
            zclip.step(grads)
        else:
            zclip.clip_step(torch.optim.SGD([_parameter_with(grad) for grad in grads], lr=0.1))
    assert repr(zclip.state_dict()) == before, "a refused step changed ZClip's state"
    assert all(torch.equal(g, s) for g, s in zip(grads, snapshot, strict=True))


def _twin_parameters(device, size=64):
    start = torch.randn(size, generator=torch.Generator().manual_seed(3)).to(device)
    return torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())


def _direction(seed, device, size=64):
    direction = torch.randn(size, generator=torch.Generator().manual_seed(seed))
    return (direction / direction.norm()).to(device)


def _loss_scaled(grad, scaler):
    """The gradient as backward of `scaler.scale(loss)` would produce it."""
    return grad if scaler is None else grad * scaler.scale(torch.ones((), device=grad.device))


def _adamw(parameter, fused):
    return torch.optim.AdamW([parameter], lr=1e-2, fused=fused)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaler"])
def test_zclip_clip_step_skips_spikes_like_a_torch_loop(device, fused, scaled):
    """ZClip.clip_step against torch doing the same by hand: GradScaler.unscale_, the published
    rule's factor (plain Python), and optimizer.step only when the step is neither a spike nor an
    overflow. Spikes must not back off the scale; fused optimizers must not sync."""
    norms = lasting_rise_norms()
    direction = _direction(4, device)
    parameter, twin = _twin_parameters(device)
    optimizer, twin_optimizer = _adamw(parameter, fused), _adamw(twin, fused)
    scaler, twin_scaler = (
        (torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=4) for _ in range(2))
        if scaled
        else (None, None)
    )
    zclip = ZClip(max_norm=None, skip_on_spike=True)
    oracle = PythonZClip(max_norm=None)
    for step, norm in enumerate(norms):
        parameter.grad = _loss_scaled(direction * norm, scaler)
        twin.grad = _loss_scaled(direction * norm, twin_scaler)
        with refusing_host_syncs(enabled=fused):
            result = zclip.clip_step(optimizer, scaler=scaler)

        if scaled:
            twin_scaler.unscale_(twin_optimizer)
        threshold, _, skip = oracle.observe(norm)
        if not skip:
            twin.grad.mul_(1.0 if threshold >= norm else threshold / (norm + 1e-6))
            twin_optimizer.step()
        assert bool(result.skip) == skip, f"skip at step {step}"
        assert_close(parameter, twin, rtol=1e-5, atol=1e-7, what=f"parameter after step {step}")
        if scaled:
            scaler.update()
            twin_scaler.update()
            assert scaler.get_scale() == twin_scaler.get_scale(), f"scale after step {step}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_grad_monitor_flag_skips_through_amp_step_like_a_torch_loop(device, fused):
    """unscale_clip_ -> GradMonitor.record -> amp.step(skip=...) against torch's unscale_,
    clip_grad_norm_, the spike rule in plain Python, and scaler.step only when it is not a spike."""
    # A first-step overflow and a zero norm (neither may start the EMA), an isolated spike, an
    # overflow, and a lasting rise (flagged while the budget of 3 lasts, then let through).
    norms = [math.inf, 0.0, 1.0, 1.2, 0.9, 30.0, 1.1, math.inf, 0.8] + [12.0] * 5 + [1.3]
    spike_factor, ema_weight, max_norm = 5.0, 0.98, 1.0
    direction = _direction(6, device)
    parameter, twin = _twin_parameters(device)
    optimizer, twin_optimizer = _adamw(parameter, fused), _adamw(twin, fused)
    scaler, twin_scaler = (
        torch.amp.GradScaler(device, init_scale=2.0**8, growth_interval=2) for _ in range(2)
    )
    monitor = GradMonitor(capacity=16, spike_factor=spike_factor, ema=ema_weight)
    rule = PythonSpikeRule(spike_factor, ema_weight)
    flags = []
    for step, norm in enumerate(norms):
        parameter.grad = _loss_scaled(direction * norm, scaler)
        twin.grad = _loss_scaled(direction * norm, twin_scaler)
        with refusing_host_syncs(enabled=fused):
            result = amp.unscale_clip_(scaler, optimizer, max_norm)
            skip = monitor.record(result, scaler=scaler)
            amp.step(optimizer, skip=skip, scaler=scaler)

        twin_scaler.unscale_(twin_optimizer)
        torch.nn.utils.clip_grad_norm_([twin], max_norm)
        expected_skip = rule.should_skip(norm)
        if not expected_skip:
            twin_scaler.step(twin_optimizer)
        assert bool(skip) == expected_skip, f"skip at step {step}"
        flags.append(expected_skip)
        assert_close(parameter, twin, rtol=1e-5, atol=1e-7, what=f"parameter after step {step}")
        if math.isfinite(norm):
            factor = min(1.0, max_norm / (norm + 1e-6))
            assert monitor.coefs[step].item() == pytest.approx(factor, rel=1e-6), "clip factor"
        scaler.update()
        twin_scaler.update()
        assert scaler.get_scale() == twin_scaler.get_scale(), f"scale after step {step}"
    assert [i for i, flag in enumerate(flags) if flag] == [0, 5, 7, 9, 10]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_agc_matches_its_formula_on_linear_and_conv_weights(dtype):
    """In every dtype (float64 weights once raised in the unit norm); 16-bit gradients get the
    product formed in float32 and rounded once, as the clip kernels form it: a factor rounded to
    the gradient's dtype first moved about a quarter of the bfloat16 elements off that."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(60, 40).to(dtype)
    conv = torch.nn.Conv2d(3, 50, 3).to(dtype)
    parameters = list(linear.parameters()) + list(conv.parameters())
    for parameter in parameters:
        scales = torch.logspace(-4, 1, parameter.shape[0]).view(-1, *[1] * (parameter.ndim - 1))
        parameter.grad = (torch.randn(parameter.shape) * scales).to(dtype)
    originals = [p.grad.clone() for p in parameters]
    agc_(parameters, clipping=0.05, eps=1e-3)
    for parameter, original in zip(parameters, originals, strict=True):
        units = (
            [(parameter.detach(), original)]
            if parameter.ndim <= 1
            else list(zip(parameter.detach(), original, strict=True))
        )
        expected = []
        for weight_unit, grad_unit in units:
            max_norm = 0.05 * max(weight_unit.double().norm().item(), 1e-3)
            grad_norm = grad_unit.double().norm().item()
            expected.append(
                grad_unit.double() * (max_norm / grad_norm if grad_norm > max_norm else 1.0)
            )
        expected = expected[0] if parameter.ndim <= 1 else torch.stack(expected)
        what = f"AGC {dtype} {tuple(parameter.shape)}"
        if dtype in (torch.float32, torch.float64):
            rtol = 1e-5 if dtype == torch.float32 else 1e-12
            assert_close(parameter.grad, expected, rtol=rtol, atol=1e-300, what=what)
        else:
            # The float32 factor is within 1e-6 of the float64 one: one rounding of the product
            # lands on the float64 product's rounding but for the rare near-ties.
            differs = parameter.grad != expected.to(dtype)
            assert differs.double().mean() < 1e-3, f"{what}: {int(differs.sum())} elements"


@pytest.mark.parametrize(
    "argument, value", [("clipping", 0.0), ("clipping", math.inf), ("eps", math.inf), ("eps", -1)]
)
def test_agc_rejects_a_factor_that_is_not_finite_and_positive(argument, value):
    with pytest.raises(ValueError, match=f"{argument} must be a finite number > 0"):
        AGC(torch.nn.Linear(2, 2).parameters(), **{argument: value})


def test_agc_clips_a_single_tensor_and_refuses_what_is_not_a_parameter():
    """A tensor is one parameter (as torch's clip functions take it); a (name, parameter) pair or
    a param group has no .grad and was skipped, clipping nothing."""
    linear = torch.nn.Linear(4, 4)
    (linear(torch.randn(2, 4)) * 100).sum().backward()
    unclipped = linear.weight.grad.clone()
    as_list = torch.nn.Parameter(linear.weight.detach().clone())
    as_list.grad = unclipped.clone()
    agc_([as_list])
    assert not torch.equal(as_list.grad, unclipped), "the case must clip"
    AGC(linear.weight).step()
    assert torch.equal(linear.weight.grad, as_list.grad)
    before = linear.weight.grad.clone()
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.1)
    for wrong, kind in [(linear.named_parameters(), "tuple"), (optimizer.param_groups, "dict")]:
        with pytest.raises(TypeError, match=rf"parameters\[0\] is a {kind}, not a tensor"):
            AGC(list(wrong))
    with pytest.raises(TypeError, match=r"parameters\[0\] is a tuple, not a tensor"):
        agc_(linear.named_parameters())
    assert torch.equal(linear.weight.grad, before)


def test_agc_refuses_a_gradient_it_cannot_clip_before_clipping_any():
    """AGC clips unit by unit: every gradient is checked before the first is scaled."""
    linear, embedding = torch.nn.Linear(3, 3), torch.nn.Embedding(4, 3, sparse=True)
    (linear(embedding(torch.tensor([1]))).sum() * 1000).backward()
    parameters = [*linear.parameters(), *embedding.parameters()]
    before = [p.grad.clone() for p in parameters[:2]]
    with pytest.raises(TypeError, match=r"parameters\[2\]\.grad has layout torch.sparse_coo"):
        AGC(parameters, clipping=0.01).step()
    assert all(torch.equal(p.grad, b) for p, b in zip(parameters, before, strict=False))


def test_grad_monitor_statistics_match_direct_computation():
    names = ["embedding", "layer.weight", "layer.bias"]
    monitor = GradMonitor(capacity=8, names=names, spike_factor=5.0)
    generator = torch.Generator().manual_seed(2)
    recorded = []
    for step in range(12):
        scale = 40.0 if step == 9 else 1.0
        grads = [
            torch.randn(size, generator=generator) * factor * scale
            for size, factor in ((50, 3.0), (20, 1.0), (5, 0.1))
        ]
        if step == 4:
            grads[1][0] = math.inf
        result = fusedclip.fused_clip_(grads, max_norm=9.0, per_tensor=True)
        monitor.record(result)
        recorded.append(
            (
                result.total_norm.item(),
                result.clip_coef.item(),
                result.found_inf.item(),
                result.per_tensor_norms.tolist(),
            )
        )
        if step == 9:
            assert bool(monitor.should_skip), "a 40x norm is a spike"
        if step == 8:
            assert not bool(monitor.should_skip)
    window = recorded[-8:]
    summary = monitor.summary(top_k=2)
    assert summary["steps"] == 12 and summary["window"] == 8
    assert summary["clip_frequency"] == pytest.approx(sum(c < 1 for _, c, _, _ in window) / 8)
    assert summary["overflow_steps"] == sum(f for _, _, f, _ in window)
    finite = torch.tensor([n for n, _, _, _ in window if math.isfinite(n)], dtype=torch.float64)
    assert summary["norm_p50"] == pytest.approx(torch.quantile(finite, 0.5).item())
    assert summary["norm_p90"] == pytest.approx(torch.quantile(finite, 0.9).item())
    assert summary["norm_max"] == pytest.approx(finite.max().item())
    finite_means = [
        statistics.fmean(n for n in column if math.isfinite(n))
        for column in zip(*(p for _, _, _, p in window), strict=True)
    ]
    top = sorted(range(len(names)), key=lambda i: -finite_means[i])[:2]
    assert summary["largest_norms"] == [
        (names[i], pytest.approx(finite_means[i], rel=1e-12)) for i in top
    ]
    assert summary["nonfinite_norms"] == [(names[1], 1)]  # the inf at step 4


def test_grad_monitor_ranks_a_tensor_that_was_never_finite_last():
    monitor = GradMonitor(capacity=4, names=["nan", "small", "large"])
    for _ in range(3):
        grads = [torch.full((3,), math.nan), torch.full((3,), 0.1), torch.full((3,), 5.0)]
        monitor.record(fusedclip.measure(grads, per_tensor=True))
    summary = monitor.summary(top_k=3)
    assert [name for name, _ in summary["largest_norms"]] == ["large", "small", "nan"]
    assert math.isnan(summary["largest_norms"][2][1])
    assert summary["nonfinite_norms"] == [("nan", 3)]


def test_grad_monitor_names_must_match_the_gradients():
    grads = [torch.randn(3), torch.randn(4), torch.randn(5)]
    result = fusedclip.measure(grads, per_tensor=True)
    monitor = GradMonitor(capacity=4, names=["weight", "bias"])
    with pytest.raises(ValueError, match=r"has 2 names but the result has 3 per-tensor norms"):
        monitor.record(result)
    named = GradMonitor(capacity=4, names=["a", "b", "c"])
    named.record(result)
    top = named.summary(top_k=1)["largest_norms"]
    norms = result.per_tensor_norms
    assert top == [("abc"[int(norms.argmax())], pytest.approx(float(norms.max()), rel=1e-6))]


def test_zclip_takes_the_gradients_of_plain_tensor_parameters_and_never_a_weight():
    """Leaf tensors that require grad are parameters (torch.optim takes them): one without a
    gradient this step is skipped, and a frozen weight listed beside them is not a gradient."""
    torch.manual_seed(0)
    weight = torch.randn(4, requires_grad=True)
    bias = torch.randn(4, requires_grad=True)
    frozen = torch.full((4,), 10.0)
    alone, listed = ZClip(warmup_steps=2, max_norm=0.5), ZClip(warmup_steps=2, max_norm=0.5)
    for step in range(4):
        weight.grad = torch.randn(4) * (step + 1)
        twin = weight.grad.clone()
        bias.grad = None if step % 2 else torch.randn(4)
        expected = alone.step([twin] + ([] if bias.grad is None else [bias.grad.clone()]))
        result = listed.step([weight, bias, frozen])
        assert torch.equal(result.total_norm, expected.total_norm), f"step {step}"
        assert torch.equal(weight.grad, twin), f"step {step}"
    assert torch.equal(frozen, torch.full((4,), 10.0))
    gradients = [torch.randn(3), torch.randn(5)]  # a list of gradients is still one
    originals = [g.clone() for g in gradients]
    ZClip(warmup_steps=2, max_norm=1e-3).step(gradients)
    assert not torch.equal(gradients[0], originals[0])


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: ZClip(z_thresh=torch.ones(2)), "z_thresh"),
        (lambda: ZClip(max_norm=torch.ones(2)), "max_norm"),
        (lambda: AGC([torch.nn.Parameter(torch.ones(2))], clipping=torch.ones(2)), "clipping"),
    ],
)
def test_a_tensor_of_several_elements_is_a_type_error_by_name(make, argument):
    """The README's rule: a wrong shape is a TypeError (these raised float()'s ValueError)."""
    with pytest.raises(TypeError, match=rf"^{argument} must be .*tensor of shape \(2,\)"):
        make()


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: ZClip(eps=math.nan), "eps"),
        (lambda: ZClip(eps=0.0), "eps"),
        (lambda: ZClip(eps=-1e-6), "eps"),
        (lambda: ZClip(eps=math.inf), "eps"),
        (lambda: ZClip(warmup_steps=2.5), "warmup_steps"),
        (lambda: ZClip(warmup_steps=math.nan), "warmup_steps"),
        (lambda: ZClip(skip_on_spike=True, skip_window=math.nan), "skip_window"),
        (lambda: ZClip(max_skips=1.5), "max_skips"),
        (lambda: ZClip(alpha=math.nan), "alpha"),
        (lambda: GradMonitor(spike_factor=-1.0), "spike_factor"),
        (lambda: GradMonitor(spike_factor=1.0), "spike_factor"),
        (lambda: GradMonitor(spike_factor=math.nan), "spike_factor"),
        (lambda: GradMonitor(ema=math.nan), "ema"),
        (lambda: GradMonitor(ema=1.0), "ema"),
        (lambda: GradMonitor(capacity=2.5), "capacity"),
        (lambda: GradMonitor(capacity=math.nan), "capacity"),
        (lambda: ZClip(backend="bogus"), "backend"),
        (lambda: ZClip(max_skips=2, skip_window=2), "skip_window"),
        (lambda: ZClip(skip_on_spike="no"), "skip_on_spike"),
        (lambda: ZClip(max_norm=True), "max_norm"),
        (lambda: ZClip(max_norm=10**400), "max_norm"),  # failed at the first step
        (lambda: ZClip(process_group="world"), "process_group"),
        (lambda: GradMonitor(names="abc"), "names"),
        (lambda: GradMonitor(names=[0, 1]), "names"),
        (lambda: GradMonitor().summary(top_k=-1), "top_k"),
        # Unnamed TypeErrors from a comparison, or a tensor's ambiguous truth value:
        (lambda: ZClip(alpha="x"), "alpha"),
        (lambda: ZClip(z_thresh=torch.tensor([1.0, 2.0])), "z_thresh"),
        (lambda: ZClip(eps="x"), "eps"),
        (lambda: ZClip(mode="fixed"), "mode"),
        # The reference implementation's default mode, which is the adaptive rule there, was
        # this library's fixed threshold: code ported from it changed rule without a word.
        (lambda: ZClip(mode="zscore"), "mode='zscore' is ambiguous"),
        (lambda: GradMonitor(spike_factor="x"), "spike_factor"),
        (lambda: GradMonitor(ema=[0.5]), "ema"),
        (lambda: AGC([torch.nn.Parameter(torch.ones(2))], clipping=None), "clipping"),
        (lambda: AGC([torch.nn.Parameter(torch.ones(2))], clipping=torch.ones(2)), "clipping"),
        (lambda: AGC([torch.nn.Parameter(torch.ones(2))], eps="x"), "eps"),
        # SkipBudget calls its window `window`, ZClip and GradMonitor `skip_window`:
        (lambda: SkipBudget(max_skips=3, window=3), "window"),
        (lambda: GradMonitor(max_skips=2, skip_window=2), "skip_window"),
    ],
)
def test_stability_tools_refuse_bad_arguments_when_made(make, argument):
    """Each at construction, by name: a NaN eps or ema silently disabled the spike rule, a
    spike_factor <= 1 flagged ordinary steps, a float count failed only at the first step,
    after some of the state had changed, a bad backend at the first step, and names="abc" was
    three names."""
    with pytest.raises((ValueError, TypeError), match=rf"^{argument}\b"):
        make()


def test_grad_monitor_refuses_a_changed_gradient_count_and_skips_steps_without_per_tensor():
    def result(values, per_tensor=True):
        grads = [torch.full((4,), value) for value in values]
        return fusedclip.measure(grads, per_tensor=per_tensor)

    monitor = GradMonitor(capacity=4)
    monitor.record(result([1.0, 1.0]))
    for values in ([50.0], [1.0, 1.0, 1.0]):  # a shorter list broadcast into every column
        with pytest.raises(ValueError, match=r"recorded 2 per-tensor norms per step before"):
            monitor.record(result(values))
    assert monitor.steps == 1 and monitor.summary()["norm_max"] == pytest.approx(2 * math.sqrt(2))
    monitor = GradMonitor(capacity=4)
    for per_tensor in (True, True, False, False, True):  # logging steps without them; wraps
        monitor.record(result([5.0, 1.0], per_tensor))
    assert monitor.summary()["largest_norms"] == [
        ("tensor 0", pytest.approx(10.0)),
        ("tensor 1", pytest.approx(2.0)),
    ]


def _saved_and_loaded(state: dict) -> dict:
    """What a checkpoint hands back: torch.save then torch.load (to the CPU)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu", weights_only=True)


def _zclip_and_monitor(warmup_steps=10, capacity=50):
    zclip = ZClip(warmup_steps=warmup_steps, max_norm=None, skip_on_spike=True, max_skips=2)
    monitor = GradMonitor(capacity=capacity, spike_factor=3.0, max_skips=2)
    return zclip, monitor


def _run_steps(zclip, monitor, norms, direction):
    """Each step's ZClip result and the monitor's flag, as plain values to compare exactly."""
    outcomes = []
    for norm in norms:
        result = zclip.step([direction * norm])
        gradient = direction * norm
        skip = monitor.record(fusedclip.fused_clip_([gradient], max_norm=2.0, per_tensor=True))
        outcomes.append(
            (result.threshold.item(), bool(result.spike), bool(result.skip), bool(skip))
        )
    return outcomes


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("checkpoint_at", [0, 5, 33])
def test_zclip_and_grad_monitor_resume_from_a_checkpoint_as_if_never_stopped(device, checkpoint_at):
    """Without a state_dict a resumed run restarted warm-up, the EMAs and the skip budget: the
    steps after a restart clipped and skipped differently. Step 0 saves a state never started;
    the checkpoint is loaded to the CPU, and the state follows the gradients back to `device`."""
    norms = scripted_norms()
    direction = torch.randn(8, dtype=torch.float64, device=device)
    direction /= direction.norm()
    uninterrupted = _run_steps(*_zclip_and_monitor(), norms, direction)
    zclip, monitor = _zclip_and_monitor()
    before = _run_steps(zclip, monitor, norms[:checkpoint_at], direction)
    saved = _saved_and_loaded({"zclip": zclip.state_dict(), "monitor": monitor.state_dict()})
    resumed_zclip, resumed_monitor = _zclip_and_monitor()
    resumed_zclip.load_state_dict(saved["zclip"])
    resumed_monitor.load_state_dict(saved["monitor"])
    after = _run_steps(resumed_zclip, resumed_monitor, norms[checkpoint_at:], direction)
    assert before + after == uninterrupted
    assert any(outcome[2] for outcome in uninterrupted), "the run must skip something"
    if checkpoint_at:
        assert resumed_monitor.summary() == _summary_of_uninterrupted(norms, direction)


def _summary_of_uninterrupted(norms, direction):
    zclip, monitor = _zclip_and_monitor()
    _run_steps(zclip, monitor, norms, direction)
    return monitor.summary()


@pytest.mark.parametrize(
    ("make", "state_of", "match"),
    [
        (lambda: ZClip(warmup_steps=5), lambda: ZClip(warmup_steps=6), "warmup_steps=6"),
        # Named as the ZClip's (its message said "this SkipBudget has skip_window=50"):
        (
            lambda: ZClip(skip_window=50),
            lambda: ZClip(skip_window=40),
            r"^ZClip\.load_state_dict: .* this ZClip has skip_window=50; .*skip_window=40",
        ),
        (
            lambda: GradMonitor(skip_window=50),
            lambda: GradMonitor(skip_window=40),
            r"^GradMonitor\.load_state_dict: .* this GradMonitor has skip_window=50",
        ),
        (lambda: GradMonitor(capacity=8), lambda: GradMonitor(capacity=9), "capacity=9"),
        (lambda: ZClip(), lambda: GradMonitor(), "lacks mean"),
        (lambda: GradMonitor(), lambda: ZClip(), "lacks norms"),
    ],
)
def test_load_state_dict_refuses_a_state_it_cannot_resume_and_loads_nothing(make, state_of, match):
    saver = state_of()
    target = make()
    gradient = torch.ones(3, dtype=torch.float64)
    for _ in range(3):  # both hold state, so that a partial load would show
        for tool in (saver, target):
            if isinstance(tool, ZClip):
                tool.step([gradient.clone()])
            else:
                tool.record(fusedclip.fused_clip_([gradient.clone()], max_norm=1.0))
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(saver.state_dict())
    after = target.state_dict()
    assert before.keys() == after.keys()
    assert repr(before) == repr(after), "a refused load changed the state"


def _with(state: dict, path: tuple, value) -> dict:
    state = copy.deepcopy(state)
    inner = state
    for key in path[:-1]:
        inner = inner[key]
    inner[path[-1]] = value
    return state


@pytest.mark.parametrize(
    ("make", "path", "value", "match"),
    [
        (GradMonitor, ("steps",), None, "steps must be an integer"),
        (GradMonitor, ("steps",), 0, "steps=0 with a history"),
        (GradMonitor, ("norms",), torch.zeros(3), r"norms must have shape \(8,\)"),
        (GradMonitor, ("has_per_tensor",), "no", "has_per_tensor must be"),
        # What the next record() tripped on, after writing part of its slot:
        (
            GradMonitor,
            ("per_tensor",),
            torch.zeros(4, 2, dtype=torch.float64),
            "per_tensor must have 8 rows",
        ),
        (GradMonitor, ("has_per_tensor",), [], "has_per_tensor must be a list of 8"),
        (ZClip, ("warmup_count",), None, "must all be tensors or all be None"),
        (ZClip, ("mean",), 7.0, "mean must be a tensor or None"),
        (ZClip, ("warmup_norms",), torch.zeros(2), "warmup_norms must have shape"),
        (ZClip, ("skip_budget", "recent"), torch.zeros(3, dtype=torch.bool), "recent must"),
        (ZClip, ("skip_budget",), None, "lacks window"),
        # Loaded, then failing or wrong at the next step (a bool mean could not be subtracted,
        # an int64 history truncated the norms recorded into it):
        (ZClip, ("mean",), torch.tensor(True), "mean must be a torch.float64 tensor"),
        (ZClip, ("var",), torch.zeros((), dtype=torch.complex128), "var must be a torch.float64"),
        (ZClip, ("var",), torch.zeros((), dtype=torch.float64, device="meta"), "meta tensor"),
        (ZClip, ("mean",), torch.tensor(math.nan, dtype=torch.float64), "mean must be a finite"),
        (ZClip, ("var",), torch.tensor(-1.0, dtype=torch.float64), "var must be a finite"),
        (ZClip, ("warmup_count",), torch.tensor(-5), r"warmup_count must be in \[0, "),
        (ZClip, ("warmup_count",), torch.tensor(6), r"warmup_count must be in \[0, "),
        (ZClip, ("skip_budget", "recent"), torch.zeros(100), "recent must be a torch.bool"),
        (GradMonitor, ("norms",), torch.zeros(8, dtype=torch.int64), "norms must be a torch.f"),
        (GradMonitor, ("per_tensor",), torch.zeros(8, 1, dtype=torch.int64), "per_tensor must"),
        (GradMonitor, ("found_inf",), torch.zeros(8, dtype=torch.float64), "found_inf must be"),
        (GradMonitor, ("should_skip",), None, "must all be tensors or all be None"),
    ],
)
def test_load_state_dict_checks_every_entry_before_loading_any(make, path, value, match):
    """Only the keys were checked first: a bad value further on raised after the entries before
    it had been loaded (a GradMonitor kept the new history with the old step count)."""
    tool = make(capacity=8) if make is GradMonitor else make(warmup_steps=5, skip_on_spike=True)
    gradient = torch.ones(3, dtype=torch.float64)
    for _ in range(3):
        if isinstance(tool, ZClip):
            tool.step([gradient.clone()])
        else:
            tool.record(fusedclip.fused_clip_([gradient.clone()], max_norm=1.0, per_tensor=True))
    good = tool.state_dict()
    for _ in range(2):  # so that the good state and the current one differ
        if isinstance(tool, ZClip):
            tool.step([gradient.clone() * 3])
        else:
            tool.record(
                fusedclip.fused_clip_([gradient.clone() * 3], max_norm=1.0, per_tensor=True)
            )
    before = repr(tool.state_dict())
    with pytest.raises(ValueError, match=match):
        tool.load_state_dict(_with(good, path, value))
    assert repr(tool.state_dict()) == before, "a refused load changed the state"


def test_grad_monitor_refuses_a_per_tensor_history_without_a_history():
    """A state with per-tensor norms but no norms (part started) loaded, and summary() then
    counted the next step's zeros as recorded steps."""
    monitor = GradMonitor(capacity=4)
    monitor.record(fusedclip.fused_clip_([torch.ones(3)], max_norm=1.0, per_tensor=True))
    state = monitor.state_dict()
    for key in ("norms", "coefs", "found_inf", "norm_ema", "should_skip"):
        state[key] = None
    fresh = GradMonitor(capacity=4)
    with pytest.raises(ValueError, match="per_tensor is a tensor while norms is None"):
        fresh.load_state_dict(state)
    assert fresh.state_dict()["per_tensor"] is None


@pytest.mark.parametrize(
    "inv_scale",
    [-2.0, 0.0, math.nan, "x", torch.tensor([1.0, 2.0]), torch.tensor(2, dtype=torch.int64)],
    ids=["negative", "zero", "nan", "str", "two-elements", "integer"],
)
def test_grad_monitor_refuses_a_bad_inv_scale_before_recording_anything(inv_scale):
    """record() divided the clip coefficient by any inv_scale: a negative one recorded a
    negative factor, 0 an infinite one, and a str or two-element tensor raised an unnamed error
    after the norm was written into the history."""
    monitor = GradMonitor(capacity=3)
    result = fusedclip.fused_clip_([torch.full((3,), 4.0)], max_norm=1.0)
    monitor.record(result)
    before = repr(monitor.state_dict())
    with pytest.raises((ValueError, TypeError), match="^inv_scale must be"):
        monitor.record(result, inv_scale=inv_scale)
    assert repr(monitor.state_dict()) == before


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        pytest.param(
            lambda tools: tools["zclip"].step([tools["parameter"], None]),
            TypeError,
            r"^parameters\[1\] is a NoneType without a \.grad",
            id="zclip-step-none-entry",
        ),
        pytest.param(
            lambda tools: tools["zclip"].clip_step(tools["scaler"], scaler=tools["optimizer"]),
            TypeError,
            r"^ZClip.clip_step: optimizer must be a torch.optim.Optimizer, got GradScaler",
            id="zclip-clip_step-swapped",
        ),
        pytest.param(
            lambda tools: tools["zclip"].clip_step(tools["optimizer"], scaler="x"),
            TypeError,
            r"^ZClip.clip_step: scaler must be a torch.amp.GradScaler, got str",
            id="zclip-clip_step-scaler-str",
        ),
        pytest.param(
            lambda tools: tools["monitor"].record(tools["result"], scaler=tools["optimizer"]),
            TypeError,
            r"^GradMonitor.record: scaler must be a torch.amp.GradScaler or None, got SGD",
            id="record-scaler-optimizer",
        ),
        pytest.param(
            lambda tools: tools["monitor"].record(
                tools["result"], scaler=torch.amp.GradScaler("cpu")
            ),
            ValueError,
            r"^GradMonitor.record: scaler holds no scale yet",
            id="record-scaler-before-scale",
        ),
    ],
)
def test_zclip_and_grad_monitor_name_a_wrong_argument_before_changing_anything(call, error, match):
    """Swapped or missing arguments raised AttributeErrors from deep inside, naming neither the
    argument nor the fix."""
    parameter = torch.nn.Parameter(torch.zeros(3))
    parameter.grad = torch.full((3,), 2.0)
    zclip, monitor = ZClip(warmup_steps=3), GradMonitor(capacity=4)
    zclip.step([parameter])  # some state, so that a change would show
    result = fusedclip.fused_clip_([parameter.grad], max_norm=1.0)
    monitor.record(result)
    tools = {
        "zclip": zclip,
        "monitor": monitor,
        "parameter": parameter,
        "optimizer": torch.optim.SGD([parameter], lr=0.1),
        "scaler": torch.amp.GradScaler("cpu"),
        "result": result,
    }
    before = [repr(tool.state_dict()) for tool in (zclip, monitor)]
    gradient = parameter.grad.clone()
    with pytest.raises(error, match=match):
        call(tools)
    assert [repr(tool.state_dict()) for tool in (zclip, monitor)] == before
    assert torch.equal(parameter.grad, gradient) and torch.equal(parameter, torch.zeros(3))


@pytest.mark.parametrize("init_scale", [100.0, 29.0, 1000.0, 2.0**16])
def test_grad_monitor_divides_out_the_inverse_scale_the_scaler_applied(init_scale):
    """unscale_clip_'s clip_coef holds float32(1 / scale), as GradScaler forms it, and record
    divided an inv_scale of 1 / scale by it in float64: for a scale that is no power of two an
    unclipped step recorded 1 - ulp, counted as a clip. Every way to pass the scale must record
    the factor scaler= records: exactly 1 unclipped, clip_grad_norm_'s factor clipped."""
    parameter = torch.nn.Parameter(torch.zeros(16))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)
    ways = ("scaler", "float", "float64 tensor")
    monitors = {way: GradMonitor(capacity=8) for way in ways}
    max_norm, norms, factors = 1.0, [0.5, 3.0, 0.01, 2.0, 0.9], []
    for step, norm in enumerate(norms):
        parameter.grad = _loss_scaled(_direction(step, "cpu", size=16) * norm, scaler)
        result = amp.unscale_clip_(scaler, optimizer, max_norm)
        monitors["scaler"].record(result, scaler=scaler)
        monitors["float"].record(result, inv_scale=1.0 / scaler.get_scale())
        monitors["float64 tensor"].record(result, inv_scale=1.0 / scaler._scale.double())
        factors.append(min(1.0, max_norm / (result.total_norm.item() + 1e-6)))
        scaler.step(optimizer)
        scaler.update()
    assert scaler.get_scale() == init_scale
    recorded = monitors["scaler"].coefs[: len(norms)]
    assert [recorded[i].item() for i in (0, 2, 4)] == [1.0, 1.0, 1.0], "unclipped steps"
    assert_close(recorded, torch.tensor(factors, dtype=torch.float64), rtol=1e-6, what="factors")
    for way in ways:
        assert torch.equal(monitors[way].coefs[: len(norms)], recorded), way
        assert monitors[way].summary()["clip_frequency"] == pytest.approx(2 / 5), way


@pytest.mark.parametrize("scale", [3.0, 7.0, 100.0, 1e50])
def test_grad_monitor_takes_a_float_inv_scale_as_fused_clip_took_it(scale):
    """fused_clip_ keeps a float inv_scale in float64 (1 / 3 and 1 / 7 float32 rounds up): divided
    by the rounded one, an unclipped step would record less than 1, a clip; and 1e-50, which
    float32 rounds to 0, an infinite factor."""
    monitor = GradMonitor(capacity=4)
    for norm in (0.5, 3.0):
        gradient = torch.full((4,), norm / 2 * scale, dtype=torch.float64)
        result = fusedclip.fused_clip_([gradient], max_norm=1.0, inv_scale=1 / scale)
        monitor.record(result, inv_scale=1 / scale)
    assert monitor.coefs[0].item() == 1.0
    assert monitor.coefs[1].item() == pytest.approx(1 / (3.0 + 1e-6), rel=1e-6)
    assert monitor.summary()["clip_frequency"] == 0.5


def test_grad_monitor_records_a_step_without_gradients_as_one_without_per_tensor_norms():
    """Without any gradient unscale_clip_(..., per_tensor=True) returns no per-tensor norms (a
    tensor of 0): as the first step it made the per-tensor history 0 columns wide, refusing every
    later step, and later in a run named gradients refused it. Such a step is left out of the
    per-tensor summary, as a step recorded without per-tensor norms is."""
    weight, bias = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight, bias], lr=0.1)
    unscaled = torch.amp.GradScaler("cpu", enabled=False)
    for names in (None, ["weight", "bias"]):
        monitor = GradMonitor(capacity=8, names=names)
        recorded = []
        for step, has_gradients in enumerate([False, True, True, False, True]):
            weight.grad = torch.full((3,), float(step)) if has_gradients else None
            bias.grad = torch.full((2,), 3.0) if has_gradients else None
            result = amp.unscale_clip_(unscaled, optimizer, 100.0, per_tensor=True)
            monitor.record(result)
            if has_gradients:
                recorded.append(result.per_tensor_norms.tolist())
        means = [statistics.fmean(column) for column in zip(*recorded, strict=True)]
        labels = names or ["tensor 0", "tensor 1"]
        summary = monitor.summary()
        assert summary["steps"] == 5
        assert summary["largest_norms"] == [
            (labels[i], pytest.approx(means[i], rel=1e-12))
            for i in sorted(range(2), key=lambda i: -means[i])
        ]


def test_grad_monitor_refuses_a_step_count_without_a_history():
    """steps=5 with no history loaded, and summary() then indexed the missing history."""
    state = GradMonitor(capacity=4).state_dict()
    state["steps"] = 5
    fresh = GradMonitor(capacity=4)
    with pytest.raises(ValueError, match=r"GradMonitor.load_state_dict: steps=5 with no history"):
        fresh.load_state_dict(state)
    assert fresh.steps == 0 and fresh.summary() == {"steps": 0}


def test_grad_monitor_refuses_mismatched_names_before_starting_its_history():
    monitor = GradMonitor(capacity=3, names=["a"])
    result = fusedclip.fused_clip_([torch.ones(3), torch.ones(2)], max_norm=1.0, per_tensor=True)
    with pytest.raises(ValueError, match="has 1 names but the result has 2"):
        monitor.record(result)
    assert monitor.state_dict()["norms"] is None and monitor.steps == 0


def test_a_state_dict_is_a_snapshot_that_later_steps_leave_alone():
    """state_dict handed out the live buffers, which the next steps write in place: a snapshot
    kept in memory then mixed its step count with newer history."""
    monitor = GradMonitor(capacity=8, spike_factor=3.0)
    zclip = ZClip(warmup_steps=3, skip_on_spike=True)
    gradient = torch.ones(4, dtype=torch.float64)
    for scale in (1.0, 1.0, 1.0, 1.1):
        zclip.step([gradient * scale])
        monitor.record(fusedclip.fused_clip_([gradient * scale], max_norm=10.0))
    snapshots = [tool.state_dict() for tool in (zclip, monitor)]
    expected = [repr(snapshot) for snapshot in copy.deepcopy(snapshots)]
    for scale in (50.0, 60.0, 1.0):
        zclip.step([gradient * scale])
        monitor.record(fusedclip.fused_clip_([gradient * scale], max_norm=10.0))
    assert [repr(snapshot) for snapshot in snapshots] == expected
