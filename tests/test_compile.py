"""torch.compile(fullgraph=True) traces through the public API into the fused ops."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import assert_close, backend_params

import fusedclip
from fusedclip import plan


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))


@pytest.mark.parametrize(("device", "backend"), backend_params())
def test_compiled_clip_grad_norm_matches_eager(device, backend):
    eager_model, compiled_model = _model().to(device), _model().to(device)
    inputs = torch.randn(16, 32, device=device)
    for model in (eager_model, compiled_model):
        model(inputs).square().sum().backward()

    def clip(model):
        return fusedclip.clip_grad_norm_(model.parameters(), 0.5, backend=backend)

    expected = clip(eager_model)
    actual = torch.compile(clip, fullgraph=True)(compiled_model)
    assert_close(actual, expected, rtol=1e-6, what="compiled norm")
    for eager_parameter, compiled_parameter in zip(
        eager_model.parameters(), compiled_model.parameters(), strict=True
    ):
        assert_close(
            compiled_parameter.grad,
            eager_parameter.grad,
            rtol=1e-6,
            atol=1e-9,
            what="compiled grad",
        )


@pytest.mark.parametrize(("device", "backend"), backend_params())
def test_fused_clip_compiles_without_graph_breaks(device, backend):
    grads = [
        torch.randn(100, device=device) * 10,
        torch.randn(7, device=device, dtype=torch.bfloat16),
    ]

    def clip(tensors):
        result = fusedclip.fused_clip_(
            tensors, max_norm=1.0, inv_scale=0.5, per_tensor=True, backend=backend
        )
        return result.total_norm, result.found_inf, result.per_tensor_norms

    explanation = torch._dynamo.explain(clip)([g.clone() for g in grads])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    eager_grads = [g.clone() for g in grads]
    compiled_grads = [g.clone() for g in grads]
    expected = clip(eager_grads)
    actual = torch.compile(clip, fullgraph=True)(compiled_grads)
    for a, e in zip(actual, expected, strict=True):
        assert_close(a, e, rtol=1e-6, what="compiled result")
    for a, e in zip(compiled_grads, eager_grads, strict=True):
        assert_close(a, e, rtol=1e-6, what="compiled grads")


def test_amp_unscale_clip_compiles_without_graph_breaks():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    scaler.scale(model(torch.randn(4, 32)).square().sum()).backward()
    grads = [p.grad.clone() for p in model.parameters()]

    def unscale_clip():
        return fusedclip.amp.unscale_clip_(scaler, optimizer, 0.5).total_norm

    explanation = torch._dynamo.explain(unscale_clip)()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    # explain ran it once: start again from the scaled gradients and a fresh scaler state.
    for parameter, grad in zip(model.parameters(), grads, strict=True):
        parameter.grad.copy_(grad)
    scaler._per_optimizer_states.clear()
    norm = torch.compile(unscale_clip, fullgraph=True)()
    expected = reference_norm([g / 256.0 for g in grads])
    assert_close(norm, expected, rtol=1e-5, what="compiled unscale_clip_ norm")
    scaler.step(optimizer)  # the recorded state is what torch's step expects
    scaler.update()


def reference_norm(tensors):
    return torch.stack([t.double().norm() for t in tensors]).norm()


def _train_step_counting_compiles(clip, steps: int = 20):
    """Runs `steps` training steps, each calling a compiled `clip(model, optimizer, scaler)`, with
    gradients freed by zero_grad() each step (new tensors every step); returns how many graphs
    dynamo compiled, and the last norm of the compiled run and of an eager twin."""
    torch._dynamo.reset()
    inputs = torch.randn(8, 32)

    def run(clip):
        model = _model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for _ in range(steps):
            optimizer.zero_grad()  # set_to_none
            scaler.scale((model(inputs) * 10).square().sum()).backward()
            norm = clip(model, optimizer, scaler)
            scaler.step(optimizer)
            scaler.update()
        return norm

    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled_norm = run(torch.compile(clip, fullgraph=True))
    graphs = counters["stats"]["unique_graphs"]
    return graphs, compiled_norm, run(clip)


@pytest.mark.parametrize(
    "clip",
    [
        pytest.param(
            lambda model, optimizer, scaler: fusedclip.clip_grad_norm_(model.parameters(), 1.0),
            id="clip_grad_norm_",
        ),
        pytest.param(
            lambda model, optimizer, scaler: (
                fusedclip.fused_clip_([p.grad for p in model.parameters()], max_norm=1.0).total_norm
            ),
            id="fused_clip_",
        ),
        pytest.param(
            lambda model, optimizer, scaler: (
                fusedclip.amp.unscale_clip_(scaler, optimizer, 1.0).total_norm
            ),
            id="amp.unscale_clip_",
        ),
    ],
)
def test_a_compiled_training_step_compiles_once(clip):
    graphs, compiled_norm, eager_norm = _train_step_counting_compiles(clip)
    assert graphs == 1, f"compiled {graphs} graphs in 20 steps (a recompile per step?)"
    assert_close(compiled_norm, eager_norm, rtol=1e-5, what="norm after 20 steps")


@pytest.mark.parametrize("fullgraph", [False, True], ids=["graph-breaks-allowed", "fullgraph"])
@pytest.mark.parametrize("tool", ["GradMonitor", "ZClip-skip_on_spike"])
def test_a_compiled_step_with_a_stability_tool_compiles_at_most_twice(tool, fullgraph):
    """Their step counters were host ints, which a compiled step reads as constants: every step
    compiled again, up to dynamo's recompile limit (then eager, or with fullgraph=True an error
    at step 8). 20 steps, each state against an eager twin's."""
    from torch._dynamo.testing import CompileCounter

    from fusedclip.stability import GradMonitor, ZClip

    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(0)
    spikes = {9, 13}  # flagged by both tools (the second one past a budget of one skip)
    steps = [
        [torch.randn(4, 3, generator=generator) * (50 if step in spikes else 1) for _ in "ab"]
        for step in range(20)
    ]

    def make():
        parameters = [torch.nn.Parameter(torch.zeros(4, 3)) for _ in "ab"]
        if tool == "GradMonitor":
            return GradMonitor(capacity=8, max_skips=1), parameters
        return ZClip(warmup_steps=3, skip_on_spike=True, max_skips=1), parameters

    def step(monitor, parameters):
        if tool == "GradMonitor":
            grads = [p.grad for p in parameters]
            return monitor.record(fusedclip.fused_clip_(grads, max_norm=1.0, per_tensor=True))
        return monitor.step(parameters).skip

    counter = CompileCounter()
    (eager_tool, eager_parameters), (compiled_tool, compiled_parameters) = make(), make()
    # Held as a training script's globals: dynamo guards a global's int attributes by value (a
    # closure's it had made symbolic, which hid the recompiles of ZClip's skip budget).
    script = {"step": step, "tool": compiled_tool, "parameters": compiled_parameters}
    exec("def train_step():\n    return step(tool, parameters)\n", script)
    compiled = torch.compile(script["train_step"], backend=counter, fullgraph=fullgraph)
    skips = []
    for grads in steps:
        for parameters in (eager_parameters, compiled_parameters):
            for parameter, grad in zip(parameters, grads, strict=True):
                parameter.grad = grad.clone()
        eager = step(eager_tool, eager_parameters)
        skips.append(bool(compiled()))
        assert skips[-1] == bool(eager)
    assert counter.frame_count <= 2, f"compiled {counter.frame_count} frames in 20 steps"
    assert skips.count(True) == 1, "the budget of one skip was not exercised"
    compiled_state, eager_state = compiled_tool.state_dict(), eager_tool.state_dict()
    for name, value in eager_state.items():
        if isinstance(value, torch.Tensor):
            assert_close(compiled_state[name], value, rtol=1e-12, what=name)
        elif name != "skip_budget":
            assert compiled_state[name] == value, name
    assert compiled_state["skip_budget"]["steps"] == eager_state["skip_budget"]["steps"] == 20
    assert torch.equal(
        compiled_state["skip_budget"]["recent"], eager_state["skip_budget"]["recent"]
    )


@pytest.mark.parametrize("case", ["expanded gradient", "max_norm past float64"])
def test_compiled_refusals_still_come_before_anything_is_written(case):
    """As the README says: under compile some refusals are dynamo's own errors, not fusedclip's
    ValueError, but still raised before any gradient byte changes."""
    torch._dynamo.reset()
    gradients = [torch.ones(4), torch.ones(3).expand(2, 3)]
    max_norm = 0.1
    if case == "max_norm past float64":
        gradients, max_norm = [torch.full((4,), 2.0)], 10**400
    before = [g.clone() for g in gradients]
    clip = torch.compile(lambda grads: fusedclip.fused_clip_(grads, max_norm=max_norm))
    with pytest.raises(Exception):  # noqa: B017 - dynamo's error types are its own
        clip(gradients)
    for got, want in zip(gradients, before, strict=True):
        assert torch.equal(got, want)


def test_a_compiled_clip_of_a_wrapper_subclass_dispatches_through_it():
    """The README's limit: traced, a wrapper subclass looks like a plain tensor, so the call is
    not refused and reaches the op through __torch_dispatch__, which clips each inner tensor by
    its own norm (eager refuses it with a TypeError)."""
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")
    torch._dynamo.reset()

    def clip(grads):
        return fusedclip.fused_clip_(grads, max_norm=1.0).total_norm

    with pytest.raises(TypeError, match="wraps others"):
        clip([two_tensor.TwoTensor(torch.tensor([3.0, 4.0]), torch.tensor([30.0, 40.0]))])
    gradient = two_tensor.TwoTensor(torch.tensor([3.0, 4.0]), torch.tensor([30.0, 40.0]))
    torch.compile(clip, backend="aot_eager")([gradient])
    for inner in (gradient.a, gradient.b):
        assert_close(inner, torch.tensor([0.6, 0.8]), rtol=1e-6, what="inner tensor")


def _aliasing_case(case):
    """(the gradients of two parameters, the buffer they live in): one memory as two views, or
    two views that overlap in part."""
    buffer = torch.tensor([3.0, 4.0, 0.0])
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    p.grad = buffer[:2]
    q.grad = buffer[:2].view(-1) if case == "same memory" else buffer[1:]
    return [p, q], buffer


@pytest.mark.parametrize(("device", "backend"), backend_params())
@pytest.mark.parametrize("case", ["same memory", "overlap"])
@pytest.mark.parametrize("call", ["clip_grad_norm_", "clip_grad_value_", "get_total_norm"])
def test_compiled_calls_refuse_aliasing_gradients_as_eager_does(device, backend, case, call):
    """Tracing sees tensors, not memory: the aliasing rule is checked when the compiled code
    runs, before anything is written. A compiled call cannot count one memory once, so it
    refuses what eager counts once; a call that only reads accepts a partial overlap, as eager."""
    if device != "cpu":
        pytest.skip("the check is the same on every device; the CPU case shows it")
    torch._dynamo.reset()  # each case traced afresh: guards need not tell their aliasing apart

    def run(parameters):
        if call == "clip_grad_norm_":
            return fusedclip.clip_grad_norm_(parameters, 1.0, backend=backend)
        if call == "clip_grad_value_":
            return fusedclip.clip_grad_value_(parameters, 1.0, backend=backend)
        return fusedclip.get_total_norm([p.grad for p in parameters], backend=backend)

    parameters, buffer = _aliasing_case(case)
    compiled = torch.compile(run, fullgraph=True)
    if call == "get_total_norm" and case == "overlap":
        expected = run(_aliasing_case(case)[0])
        assert_close(compiled(parameters), expected, rtol=1e-6, what="norm of overlapping views")
        return
    # A partial overlap may be named as either: where inputs that the compiled code writes
    # overlap, torch hands it views of one merged base, whose layout need not be the caller's.
    match = "same memory" if case == "same memory" else "overlap in memory|same memory"
    with pytest.raises(ValueError, match=match):
        compiled(parameters)
    assert torch.equal(buffer, torch.tensor([3.0, 4.0, 0.0]))


@pytest.mark.parametrize("route", ["as-installed", "through-copies"])
@pytest.mark.parametrize("call", ["clip_grad_norm_", "clip_grad_value_"])
@pytest.mark.parametrize(("device", "backend"), backend_params())
def test_compiled_clip_takes_disjoint_views_of_one_buffer(
    device, backend, call, route, monkeypatch
):
    """Gradients that are views of one flat buffer (DDP's gradient_as_bucket_view) share a
    storage but no element: the check when the compiled code runs lets them through, and they are
    written as eagerly. On torch 2.11 and 2.12 inductor miswrote them in place (read and wrote
    past a copy of one view), so there they go through copies (plan.writes_through_copies):
    "through-copies" takes that route on every torch, and the graph shows which one ran."""
    if route == "through-copies":
        monkeypatch.setattr(plan, "_INDUCTOR_MISWRITES_LISTED_VIEWS", True)
    through_copies = plan._INDUCTOR_MISWRITES_LISTED_VIEWS

    def clip(parameters):
        if call == "clip_grad_norm_":
            return fusedclip.clip_grad_norm_(parameters, 1.0, backend=backend)
        fusedclip.clip_grad_value_(parameters, 0.5, backend=backend)
        return parameters[0].grad.sum()

    def views_of_one_buffer():
        buffer = torch.tensor([9.0, 3.0, 4.0, 0.0, 1.0, -2.0, 0.25], device=device)
        sizes = (2, 3, 1)  # every view but the first at an offset, as a bucket's views are
        parameters = [torch.nn.Parameter(torch.zeros(n, device=device)) for n in sizes]
        offset = 1
        for parameter, size in zip(parameters, sizes, strict=True):
            parameter.grad = buffer[offset : offset + size]
            offset += size
        return buffer, parameters

    graphs = []

    def inductor_recording_graphs(graph_module, example_inputs):
        graphs.append(graph_module)
        return torch._inductor.compile(graph_module, example_inputs)

    torch._dynamo.reset()
    eager_buffer, eager_parameters = views_of_one_buffer()
    eager_result = clip(eager_parameters)
    compiled_buffer, compiled_parameters = views_of_one_buffer()
    compiled_result = torch.compile(clip, fullgraph=True, backend=inductor_recording_graphs)(
        compiled_parameters
    )
    assert_close(compiled_result, eager_result, rtol=1e-6, what="result")
    assert_close(compiled_buffer, eager_buffer, rtol=1e-6, what="clipped buffer")
    (graph,) = graphs
    fresh_copies = (torch.ops.fusedclip.fresh_copies, torch.ops.fusedclip.fresh_copies.default)
    copies = [node for node in graph.graph.nodes if node.target in fresh_copies]
    assert len(copies) == (1 if through_copies else 0)


def _outcomes_of_both_checks(tensors: list, writes: bool) -> list[tuple]:
    """What check_aliasing (the Python rule) and check_dense_aliasing (C++) return or raise,
    naming each tensor as the gradient of a parameter listed at 10 i + 3 (TensorNames)."""
    value = torch.tensor(0.5, dtype=torch.float64)
    naming = ("p", [10 * i + 3 for i in range(len(tensors))], ".grad")
    outcomes = []
    for check in (
        lambda: torch.ops.fusedclip.check_aliasing(tensors, value, *naming, writes),
        lambda: torch.ops.fusedclip.check_dense_aliasing(
            tensors,
            value,
            *naming,
            writes,
            plan._SAME_MEMORY + plan._REPEATS_UNDER_COMPILE,
            plan._OVERLAP,
            plan._INFERENCE_TENSOR,
        ),
    ):
        try:
            outcomes.append(("returned", check().item()))
        except ValueError as error:
            outcomes.append(("refused", str(error)))
    return outcomes


@pytest.mark.skipif(not plan._HAS_DENSE_CHECK, reason="needs the extension's check_dense_aliasing")
@pytest.mark.parametrize("writes", [False, True])
@pytest.mark.parametrize(
    "case", ["disjoint", "same memory", "overlap", "three, one repeat", "inference"]
)
def test_the_dense_check_at_run_time_says_what_the_python_rule_says(case, writes):
    """check_dense_aliasing (C++, dense lists) and check_aliasing (the Python rule) decide and
    word every case alike: the compiled code takes one or the other by the traced layouts."""
    buffer = torch.arange(8.0)
    with torch.inference_mode():
        inference = torch.arange(3.0)
    tensors = {
        "disjoint": [buffer[:3], buffer[3:]],
        "same memory": [buffer[:4], buffer[:4].view(2, 2)],
        "overlap": [buffer[:4], buffer[2:6]],
        "three, one repeat": [buffer[6:], buffer[:3], buffer[6:].clone(), buffer[:3].view(-1)],
        "inference": [buffer, inference],
    }[case]
    outcomes = _outcomes_of_both_checks(tensors, writes)
    assert outcomes[0] == outcomes[1]
    refused = case in ("same memory", "three, one repeat") or (
        case in ("overlap", "inference") and writes
    )
    assert outcomes[0][0] == ("refused" if refused else "returned"), outcomes[0]
    if refused:
        named = {"three, one repeat": "p[13].grad and p[33].grad", "inference": "p[13].grad"}
        assert outcomes[0][1].startswith(named.get(case, "p[3].grad and p[13].grad")), outcomes


@pytest.mark.skipif(not plan._HAS_DENSE_CHECK, reason="needs the extension's check_dense_aliasing")
@pytest.mark.parametrize("writes", [False, True])
@pytest.mark.parametrize("order", list(itertools.permutations(range(3))), ids=str)
def test_the_dense_check_finds_a_repeat_around_another_dtypes_view(order, writes):
    """Another dtype's view of the same bytes, sorted between a repeat's two listings, hid the
    repeat from check_dense_aliasing: g and g.view(2, 4) were counted twice."""
    buffer = torch.arange(8.0)
    views = [buffer, buffer.view(torch.bfloat16), buffer.view(2, 4)]
    outcomes = _outcomes_of_both_checks([views[i] for i in order], writes)
    assert outcomes[0] == outcomes[1]
    assert outcomes[1][0] == "refused" and "same memory" in outcomes[1][1], outcomes[1]


def test_a_compiled_call_with_a_strided_gradient_checks_with_the_python_rule():
    torch._dynamo.reset()
    buffer = torch.arange(12.0).reshape(3, 4)
    parameters = [torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(4))]
    parameters[0].grad = buffer.t()  # strided: not the dense check's
    parameters[1].grad = buffer[0]  # shares buffer[0, :] with the first

    def clip(parameters):
        return fusedclip.clip_grad_norm_(parameters, 1.0)

    with pytest.raises(ValueError, match="overlap in memory"):
        torch.compile(clip, fullgraph=True)(parameters)
    assert torch.equal(buffer, torch.arange(12.0).reshape(3, 4))


@pytest.mark.parametrize(("device", "backend"), backend_params())
@pytest.mark.parametrize("layout", ["transposed", "channels-last", "stepped"])
def test_compiled_clip_of_a_non_contiguous_gradient_matches_eager(device, backend, layout):
    """Tracing cannot walk a .grad's strides in every layout (fusedclip.layout.is_dense): such
    gradients take the strided path there, with the same result."""
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        torch.manual_seed(3)
        if layout == "transposed":
            grad = torch.randn(5, 7, device=device).t()
        elif layout == "channels-last":
            grad = torch.randn(2, 3, 4, 5, device=device).to(memory_format=torch.channels_last)
        else:
            grad = torch.randn(6, 8, device=device)[:, ::2]
        parameter = torch.nn.Parameter(torch.zeros(grad.shape, device=device))
        parameter.grad = grad

        def clip(parameters):
            return fusedclip.clip_grad_norm_(parameters, 1.0, backend=backend)

        norm = (torch.compile(clip, fullgraph=True) if compiled else clip)([parameter])
        results.append((norm, parameter.grad))
    (eager_norm, eager_grad), (compiled_norm, compiled_grad) = results
    assert_close(compiled_norm, eager_norm, rtol=1e-6, what="norm")
    assert_close(compiled_grad, eager_grad, rtol=1e-6, atol=1e-9, what="clipped gradient")


@pytest.mark.parametrize(("device", "backend"), backend_params())
def test_a_changing_max_norm_neither_breaks_the_graph_nor_recompiles_in_plain_torch(
    device, backend
):
    """Dynamo makes a float that changes between calls symbolic: the argument check must not
    break the graph on it (math.isnan does), and the backend in plain torch then reuses it."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    parameter = torch.nn.Parameter(torch.zeros(4, device=device))
    clip = torch.compile(
        lambda ps, m: fusedclip.clip_grad_norm_(ps, m, backend=backend),
        backend=counter,
        fullgraph=True,
    )
    for step in range(5):
        parameter.grad = torch.ones(4, device=device)
        max_norm = 0.5 + 0.01 * step
        clip([parameter], max_norm)
        assert_close(
            torch.linalg.vector_norm(parameter.grad),
            torch.tensor(max_norm, device=device),
            rtol=1e-5,
            what=f"clipped norm at step {step}",
        )
    if backend == "reference":  # the ops of the other backends take a float as a constant
        assert counter.frame_count <= 2
    # The NaN fails the guard the check left (max_norm >= 0): traced again, it raises there
    # (fullgraph=True would wrap the ValueError in dynamo's own error).
    lenient = torch.compile(lambda ps, m: fusedclip.clip_grad_norm_(ps, m, backend=backend))
    lenient([parameter], 0.5)
    lenient([parameter], 0.6)
    with pytest.raises(ValueError, match="max_norm must be a non-negative number"):
        lenient([parameter], float("nan"))


_TENSOR_BOUND_CALLS = {
    "clip_grad_norm_": lambda ps, bound, backend: fusedclip.clip_grad_norm_(
        ps, bound, backend=backend
    ),
    "clip_grad_value_": lambda ps, bound, backend: fusedclip.clip_grad_value_(
        ps, bound, backend=backend
    ),
    "fused_clip_": lambda ps, bound, backend: (
        fusedclip.fused_clip_(
            [p.grad for p in ps], max_norm=bound, clip_value=bound / 3, backend=backend
        ).total_norm
    ),
    "clip_grads_with_norm_": lambda ps, bound, backend: fusedclip.clip_grads_with_norm_(
        ps, bound, torch.tensor(7.0), backend=backend
    ),
}


@pytest.mark.parametrize(("device", "backend"), backend_params())
@pytest.mark.parametrize("call", list(_TENSOR_BOUND_CALLS))
def test_a_tensor_max_norm_or_clip_value_compiles_once_with_fullgraph(device, backend, call):
    """A one-element tensor bound was read with .item() and checked on the host: fullgraph=True
    failed ("Could not guard on data-dependent expression"), where torch's own clip compiles.
    Kept on the device, it compiles once for every value, and clips as the same float does
    eagerly."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    function = _TENSOR_BOUND_CALLS[call]
    compiled = torch.compile(function, backend=counter, fullgraph=True)
    gradient = torch.linspace(-3.0, 4.0, 12, device=device)
    for step in range(4):
        bound = 0.5 + 0.25 * step
        eager, traced = torch.nn.Parameter(gradient.clone()), torch.nn.Parameter(gradient.clone())
        eager.grad, traced.grad = gradient.clone(), gradient.clone()
        expected = function([eager], bound, backend)
        actual = compiled([traced], torch.tensor(bound, device=device), backend)
        assert_close(traced.grad, eager.grad, rtol=1e-6, atol=1e-9, what=f"step {step}")
        if expected is not None:
            assert_close(actual, expected, rtol=1e-6, what=f"norm at step {step}")
    assert counter.frame_count == 1


@pytest.mark.parametrize("call", ["clip_grad_norm_", "clip_grad_value_"])
def test_a_changing_limit_compiles_twice_with_inductor_on_the_reference_backend(call):
    """The reference coefficient made max_norm a tensor with new_tensor, and its clamp took
    clip_value as a float: inductor's graph held either as a constant, and every new value
    compiled again. (The ops of the other backends take them as float arguments, constants too:
    README, "torch.compile".)"""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    parameter = torch.nn.Parameter(torch.zeros(4))
    clip = getattr(fusedclip, call)
    compiled = torch.compile(lambda ps, m: clip(ps, m, backend="reference"), fullgraph=True)
    for step in range(4):
        parameter.grad = torch.ones(4)
        limit = 0.5 + 0.01 * step
        compiled([parameter], limit)
        expected = torch.tensor(limit) * (1.0 if call == "clip_grad_norm_" else 2.0)
        assert_close(
            torch.linalg.vector_norm(parameter.grad),
            expected,
            rtol=1e-5,
            what=f"clipped norm at step {step}",
        )
    assert counters["stats"]["unique_graphs"] <= 2, "a changing limit compiled again"


@pytest.mark.parametrize(("device", "backend"), backend_params())
@pytest.mark.parametrize("layout", ["dense", "strided"])
@pytest.mark.parametrize("in_inference_mode", [False, True], ids=["outside", "inside"])
def test_compiled_calls_treat_inference_gradients_as_eager_does(
    device, backend, layout, in_inference_mode
):
    """Inference tensors may be modified only inside inference mode: tracing cannot ask whether
    a tensor is one, so the check runs when the compiled code does, before anything is written."""
    if device != "cpu":
        pytest.skip("the check is the same on every device; the CPU case shows it")
    torch._dynamo.reset()

    def gradients():
        with torch.inference_mode():
            dense = torch.full((4,), 3.0)
            other = torch.full((2, 4), 4.0)
            return [dense, other if layout == "dense" else other.t()]

    def clip(grads):
        return fusedclip.fused_clip_(grads, max_norm=1.0, backend=backend)

    outcomes = []
    for run in (clip, torch.compile(clip, fullgraph=True)):
        grads = gradients()
        before = [g.clone() for g in grads]
        try:
            if in_inference_mode:
                with torch.inference_mode():
                    run(grads)
            else:
                run(grads)
            outcomes.append(("clipped", grads))
        except ValueError as error:
            assert all(torch.equal(g, b) for g, b in zip(grads, before, strict=True))
            outcomes.append((str(error), None))
    (eager, eager_grads), (compiled, compiled_grads) = outcomes
    assert compiled == eager
    assert (eager == "clipped") == in_inference_mode, eager
    if in_inference_mode:
        for got, expected in zip(compiled_grads, eager_grads, strict=True):
            assert_close(got, expected, rtol=1e-6, what="clipped inference gradient")


@pytest.mark.parametrize(("device", "backend"), backend_params())
@pytest.mark.parametrize("call", ["clip_grad_norm_", "fused_clip_", "get_total_norm"])
def test_dynamic_compiles_take_norm_type_as_eager_does(device, backend, call):
    """dynamic=True makes the floats symbolic, norm_type too: its check must trace (math.isnan
    on a SymFloat does not), for the default and for a norm_type that changes between calls."""
    torch._dynamo.reset()

    def run(parameters, norm_type):
        if call == "clip_grad_norm_":
            return fusedclip.clip_grad_norm_(parameters, 1.0, norm_type, backend=backend)
        grads = [p.grad for p in parameters]
        if call == "fused_clip_":
            return fusedclip.fused_clip_(
                grads, max_norm=1.0, norm_type=norm_type, backend=backend
            ).total_norm
        return fusedclip.get_total_norm(grads, norm_type, backend=backend)

    compiled = torch.compile(run, fullgraph=True, dynamic=True)
    for norm_type in (2.0, 3.0, 1.0, float("inf"), 2.0):
        results = []
        for function in (run, compiled):
            parameter = torch.nn.Parameter(torch.zeros(5, device=device))
            parameter.grad = torch.arange(5.0, device=device) - 1.5
            results.append((function([parameter], norm_type), parameter.grad))
        (eager, eager_grad), (got, got_grad) = results
        assert_close(got, eager, rtol=1e-6, what=f"result at norm_type={norm_type}")
        assert_close(got_grad, eager_grad, rtol=1e-6, what=f"gradient at norm_type={norm_type}")
    default = torch.compile(
        lambda ps: fusedclip.clip_grad_norm_(ps, 1.0, backend=backend), fullgraph=True, dynamic=True
    )
    parameter = torch.nn.Parameter(torch.zeros(5, device=device))
    parameter.grad = torch.arange(5.0, device=device)
    assert_close(
        default([parameter]),
        torch.linalg.vector_norm(torch.arange(5.0)).to(device),
        rtol=1e-6,
        what="norm with the default norm_type",
    )


@pytest.mark.parametrize("dynamic", [None, True], ids=["default", "dynamic"])
def test_compiles_of_clip_gradient_take_a_symbolic_max_norm_and_clip_value(dynamic):
    """Both limits stay symbolic: a float clamp bound, or a torch.library op's float argument,
    was a constant of the graph, and every new limit compiled again."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()

    def loss(x, limit):
        return (fusedclip.clip_gradient(x, max_norm=limit, clip_value=limit) * x.detach()).sum()

    compiled = torch.compile(loss, fullgraph=True, dynamic=dynamic)
    for limit in (0.5, 0.7, 3.0, 0.9):
        grads = []
        for function in (loss, compiled):
            x = torch.arange(4.0, requires_grad=True)
            function(x, limit).backward()
            grads.append(x.grad)
        assert_close(grads[1], grads[0], rtol=1e-6, what=f"clipped gradient at limit={limit}")
    assert counters["stats"]["unique_graphs"] <= (1 if dynamic else 2), "compiled per limit"


@pytest.mark.parametrize(
    "max_norm, clip_value", [(0.5, None), (None, 0.1), (0.5, 0.2)], ids=["norm", "value", "both"]
)
def test_clip_gradient_takes_one_element_tensor_limits_in_a_fullgraph_compile(max_norm, clip_value):
    """clip_gradient read a tensor limit on the host (.item()), which a fullgraph compile refuses
    ("Could not guard on data-dependent expression"); like clip_grad_norm_'s, it now stays on the
    device while traced."""
    torch._dynamo.reset()

    def loss(x, max_norm, clip_value):
        clipped = fusedclip.clip_gradient(x, max_norm=max_norm, clip_value=clip_value)
        return (clipped * x.detach()).sum()

    limits = [None if limit is None else torch.tensor(limit) for limit in (max_norm, clip_value)]
    grads = []
    for function in (loss, torch.compile(loss, fullgraph=True)):
        x = torch.arange(-2.0, 3.0, requires_grad=True)
        function(x, *limits).backward()
        grads.append(x.grad)
    assert_close(grads[1], grads[0], rtol=1e-6, what="clipped gradient, compiled")
    expected = torch.arange(-2.0, 3.0, dtype=torch.float64)  # the gradient flowing into x
    if max_norm is not None:
        expected = expected * min(1.0, max_norm / (expected.norm().item() + 1e-6))
    if clip_value is not None:
        expected = expected.clamp(-clip_value, clip_value)
    assert_close(grads[0], expected.float(), rtol=1e-6, what="clipped gradient, eager")


@pytest.mark.parametrize(("device", "backend"), backend_params())
@pytest.mark.parametrize("call", ["clip_grad_norm_", "clip_grad_value_", "fused_clip_"])
def test_a_changing_float_inv_scale_keeps_the_graph_whole(device, backend, call):
    """Dynamo makes an inv_scale float that changes between calls symbolic: its check must
    trace (math.isfinite does not), so a fullgraph compile unscales by each new value."""
    torch._dynamo.reset()

    def run(parameters, inv_scale):
        if call == "fused_clip_":
            grads = [p.grad for p in parameters]
            return fusedclip.fused_clip_(
                grads, max_norm=100.0, inv_scale=inv_scale, backend=backend
            )
        clip = getattr(fusedclip, call)
        return clip(parameters, 100.0, inv_scale=inv_scale, backend=backend)

    compiled = torch.compile(run, fullgraph=True)
    for inv_scale in (1 / 65536, 1 / 32768, 0.25):
        parameter = torch.nn.Parameter(torch.zeros(4, device=device))
        parameter.grad = torch.full((4,), 8.0, device=device)
        compiled([parameter], inv_scale)
        assert_close(
            parameter.grad,
            torch.full((4,), 8.0 * inv_scale, device=device),
            rtol=1e-6,
            what=f"unscaled by {inv_scale}",
        )
