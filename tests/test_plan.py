"""fusedclip.plan: the aliasing rule, validate-before-mutate, and the C++ fast path pinned to the
general path (same plans, same errors, same results)."""

from __future__ import annotations

import re
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
from conftest import assert_close, plan_in_python

import fusedclip
from fusedclip import api, plan

needs_fast_path = pytest.mark.skipif(
    plan._C_PLAN_DENSE is None, reason="the C++ extension (fusedclip._C.plan_dense) is not built"
)


def _facts(prepared):
    the_plan, _ = prepared
    if the_plan is None:
        return None
    return (
        the_plan.out_dtype,
        the_plan.count,
        the_plan.copies,
        [
            (g.device, g.backend.name, [id(t) for t in g.dense], g.strided, g.sparse, list(g.order))
            for g in the_plan.groups
        ],
    )


def _prepare_both_ways(monkeypatch, items, **kwargs):
    """(fast path's result or error, general path's result or error) of plan.prepare."""
    outcomes = []
    for in_python in (False, True):
        with monkeypatch.context() as patch:
            if in_python:
                plan_in_python(patch)
            try:
                outcomes.append(_facts(plan.prepare(list(items), "tensors", None, **kwargs)))
            except (TypeError, ValueError) as error:
                outcomes.append((type(error), str(error)))
    return outcomes


def _parameters(*grads):
    parameters = []
    for grad in grads:
        parameter = torch.nn.Parameter(torch.zeros_like(grad))
        parameter.grad = grad
        parameters.append(parameter)
    return parameters


COMMON_GRADIENTS = [
    pytest.param(lambda: [torch.randn(3, 4)], id="one"),
    pytest.param(
        lambda: [
            torch.randn(3, 4),
            torch.randn(5, dtype=torch.float64),
            torch.randn(2, 2, dtype=torch.bfloat16),
            torch.randn(0),
            torch.randn(7, dtype=torch.float16),
        ],
        id="mixed-dtypes-and-empty",
    ),
    pytest.param(
        lambda: [torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)],
        id="channels-last",
    ),
    pytest.param(lambda: [torch.randn(4, 3).t()], id="transposed"),
    pytest.param(lambda: list(torch.randn(12).split(4)), id="adjacent-views-of-one-storage"),
]


@needs_fast_path
@pytest.mark.parametrize("make", COMMON_GRADIENTS)
@pytest.mark.parametrize("writes", [True, False], ids=["writes", "reads"])
def test_fast_path_plans_the_common_case_as_the_general_path(monkeypatch, make, writes):
    grads = make()
    fast, general = _prepare_both_ways(monkeypatch, grads, writes=writes)
    assert fast == general
    assert plan._C_PLAN_DENSE(grads, False, writes, False, False) is not None, "not the fast path"
    parameters = _parameters(*grads) + [torch.nn.Parameter(torch.zeros(2))]  # one without grad
    fast, general = _prepare_both_ways(monkeypatch, parameters, writes=writes, of_parameters=True)
    assert fast[:2] == general[:2]  # dtype, count; the gradients are the same tensors:
    assert [g[2] for g in fast[3]] == [g[2] for g in general[3]]


def _deferred_cases():
    shared = torch.randn(4, 4)
    empty = torch.ones(0)
    with torch.inference_mode():
        inference = torch.randn(3)
    leaf = torch.nn.Parameter(torch.randn(3))
    return [
        pytest.param([shared, shared], {}, id="listed-twice"),
        pytest.param([empty, torch.randn(2), empty], {}, id="empty-listed-twice"),
        pytest.param([empty, empty.view(0, 1)], {}, id="empty-and-its-view"),
        pytest.param([shared, shared.view(-1)], {}, id="same-memory-other-shape"),
        pytest.param([shared, shared[1:3]], {"writes": True}, id="partial-overlap"),
        pytest.param([torch.ones(3).expand(2, 3)], {"writes": True}, id="expanded"),
        pytest.param([torch.randn(6)[::2]], {}, id="gaps"),
        pytest.param([torch.randn(3, 3).to_sparse()], {}, id="sparse"),
        pytest.param([torch.ones(3, dtype=torch.int32)], {}, id="int"),
        pytest.param([torch.randn(3).as_subclass(torch.nn.Buffer)], {}, id="subclass"),
        pytest.param([torch.randn(3), None], {}, id="none"),
        pytest.param([inference], {"writes": True}, id="inference-tensor-written"),
        pytest.param([leaf], {"gradients_only": True}, id="parameter-as-gradient"),
        pytest.param([torch.randn(3)._neg_view()], {}, id="negative-bit-view"),
        pytest.param(
            [torch.randn(3), torch.randn(2, dtype=torch.float16)],
            {"refuse_float16": True},
            id="float16-unscaled",
        ),
    ]


@needs_fast_path
@pytest.mark.parametrize(("items", "kwargs"), _deferred_cases())
def test_fast_path_defers_the_rest_and_the_errors_are_the_general_paths(monkeypatch, items, kwargs):
    kwargs = {"writes": False, **kwargs}
    refuse_inference = kwargs["writes"]
    rules = (kwargs.get("gradients_only", False), kwargs.get("refuse_float16", False))
    assert plan._C_PLAN_DENSE(items, False, refuse_inference, *rules) is None
    fast, general = _prepare_both_ways(monkeypatch, items, **kwargs)
    assert fast == general


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(
            lambda g: fusedclip.fused_clip_([g, g, g.view(-1)], max_norm=1.0).total_norm,
            id="fused_clip_",
        ),
        pytest.param(
            lambda g: fusedclip.clip_grad_norm_(_parameters(g, g.view(-1)), max_norm=1.0),
            id="clip_grad_norm_",
        ),
    ],
)
def test_same_memory_listed_twice_counts_and_is_scaled_once(call):
    grad = torch.randn(4, 4) * 10
    expected = grad.double()
    expected_norm = torch.linalg.vector_norm(expected)
    norm = call(grad)
    assert_close(norm, expected_norm, rtol=1e-6, what="norm of the repeated gradient")
    assert_close(grad, expected / (expected_norm + 1e-6), rtol=1e-6, what="scaled once")


def _sparse_pair(case):
    """Two sparse gradients of 4 elements over the memory of one (values [3, 4]) and, for
    "values view", a dense gradient whose memory the first one's values are."""
    dense = torch.tensor([3.0, 4.0, 1.0])
    values = dense[:2] if case == "values view" else torch.tensor([3.0, 4.0])
    indices = torch.tensor([[0, 2]])
    coalesced = case != "uncoalesced"
    first = torch.sparse_coo_tensor(indices, values, (4,), is_coalesced=coalesced)
    if case == "values view":
        return [dense, first]
    other_indices = torch.tensor([[1, 3]]) if case == "values only" else indices
    return [first, torch.sparse_coo_tensor(other_indices, values, (4,), is_coalesced=coalesced)]


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case", ["same memory", "uncoalesced", "values only", "values view"])
def test_sparse_gradients_follow_the_aliasing_rule_by_their_values(backend, case):
    """Coalesced sparse gradients are written through their values: two over the same indices
    and values are one gradient (counted and scaled once), two whose values overlap otherwise
    are refused before anything is written. An uncoalesced one is written through a coalesced
    copy that replaces its memory, so it aliases nothing and counts as listed, as in torch."""
    grads = _sparse_pair(case)
    expected = [g.to_dense().double() for g in grads]
    if case in ("values only", "values view"):
        snapshot = [g.to_dense() for g in grads]
        with pytest.raises(
            ValueError, match=r"\[0\](\.grad)? and .*\[1\](\.grad)? overlap in memory"
        ):
            fusedclip.fused_clip_(grads, max_norm=1.0, backend=backend)
        assert all(torch.equal(g.to_dense(), s) for g, s in zip(grads, snapshot, strict=True))
        return
    counted = expected[:1] if case == "same memory" else expected
    expected_norm = torch.linalg.vector_norm(torch.cat(counted))
    result = fusedclip.fused_clip_(grads, max_norm=1.0, backend=backend)
    assert_close(result.total_norm, expected_norm, rtol=1e-6, what="norm")
    for got, want in zip(grads, expected, strict=True):
        assert_close(got.to_dense(), want / (expected_norm + 1e-6), rtol=1e-6, what="scaled once")


def _snapshot(tensors):
    return [t.clone() for t in tensors]


def _unchanged(tensors, snapshot):
    return all(torch.equal(t, s) for t, s in zip(tensors, snapshot, strict=True))


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda ts: fusedclip.fused_clip_(ts, max_norm=0.1), id="fused_clip_"),
        pytest.param(
            lambda ts: fusedclip.clip_grad_norm_(_parameters(*ts), 0.1), id="clip_grad_norm_"
        ),
        pytest.param(
            lambda ts: fusedclip.clip_grad_value_(_parameters(*ts), 0.1), id="clip_grad_value_"
        ),
    ],
)
def test_overlapping_gradients_are_refused_before_anything_is_written(call):
    dense = torch.ones(4)
    expanded = torch.ones(3).expand(2, 3)  # the reproduction
    with pytest.raises(ValueError, match=r"\[1\](\.grad)? overlaps itself in memory"):
        call([dense, expanded])
    assert torch.equal(dense, torch.ones(4)), "the dense gradient was written before the refusal"
    storage = torch.randn(4, 4)
    tensors = [torch.randn(5), storage, storage[1:3]]
    snapshot = _snapshot(tensors)
    with pytest.raises(ValueError, match=r"\[1\](\.grad)? and .*\[2\](\.grad)? overlap in memory"):
        call(tensors)
    assert _unchanged(tensors, snapshot)


@pytest.mark.parametrize("how", ["eager", "compiled"])
def test_a_refusal_names_the_parameter_whose_gradient_it_refuses(how):
    """Messages counted only the parameters with a gradient: with a frozen parameter first,
    parameters[1] and parameters[2]'s overlapping gradients were called "parameters'
    gradients[0] and [1]", which reads as two other parameters. They name each by the
    parameter it belongs to, eagerly and when compiled code runs the check."""
    torch._dynamo.reset()
    buffer = torch.zeros(10)
    frozen, first, second = (torch.nn.Parameter(torch.zeros(6)) for _ in range(3))
    first.grad, second.grad = buffer[0:6], buffer[4:10]
    clip = fusedclip.clip_grad_norm_
    if how == "compiled":
        clip = torch.compile(clip, fullgraph=True)
    with pytest.raises(
        ValueError, match=r"^parameters\[1\]\.grad and parameters\[2\]\.grad overlap"
    ):
        clip([frozen, first, second], 1.0)
    with torch.inference_mode():
        inference = torch.ones(6)
    second.grad = inference
    with pytest.raises(ValueError, match=r"^parameters\[2\]\.grad is an inference tensor"):
        clip([frozen, first, second], 1.0)
    assert torch.equal(buffer, torch.zeros(10)), "nothing written"


@pytest.mark.parametrize("memoryless", ["meta", "meta-default-device", "fake"])
def test_tensors_without_memory_are_told_apart_by_their_storage(memoryless):
    """Meta and fake tensors all sit at address 0: by address, any two gradients overlapped and
    were refused, where torch clips them. Their storages still tell views apart."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def run():
        device = {"meta": "meta", "meta-default-device": None, "fake": "cpu"}[memoryless]
        grads = [torch.randn(3, device=device), torch.randn(4, 5, device=device)]
        parameters = _parameters(*grads)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nor a warning that the reference is slow
            norm = fusedclip.clip_grad_norm_(parameters, 1.0)
            expected = torch.nn.utils.clip_grad_norm_(_parameters(*grads), 1.0)
        assert norm.shape == expected.shape and norm.device == expected.device
        with pytest.raises(
            ValueError, match=r"\[0\](\.grad)? and .*\[1\](\.grad)? overlap in memory"
        ):
            fusedclip.clip_grad_value_(_parameters(grads[1], grads[1][1:3]), 0.1)
        storage = torch.randn(10, device=device)
        fusedclip.fused_clip_([storage[::2], storage[1::2], storage[::2]], max_norm=1.0)

    if memoryless == "fake":
        with FakeTensorMode():
            run()
    elif memoryless == "meta-default-device":  # how meta models are built
        with torch.device("meta"):
            run()
    else:
        run()


def test_a_symbolic_trace_by_make_fx_clips_and_counts_one_object_once():
    """make_fx's symbolic tracing hands the planner fake tensors whose offsets and sizes are
    SymInts: the aliasing rule's memory keys could not even be hashed (TypeError). There the
    same object still counts once."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def clip(a, b):
        return fusedclip.fused_clip_([a, b, a], max_norm=1.0).total_norm

    traced = make_fx(clip, tracing_mode="symbolic")(torch.randn(5), torch.randn(3, 4))
    for length in (5, 7):
        a, b = torch.randn(length) * 10, torch.randn(2, 4) * 10
        expected = torch.linalg.vector_norm(torch.cat([a, b.reshape(-1)]), dtype=torch.float64)
        assert_close(traced(a.clone(), b.clone()), expected, rtol=1e-6, what="traced norm")


@pytest.mark.parametrize("backend", [None, "reference"], ids=["auto", "reference"])
@pytest.mark.parametrize("mode", ["real", "fake", "symbolic"])
def test_a_make_fx_graph_applies_the_aliasing_rule_when_run(mode, backend):
    """make_fx was not seen as tracing: its graph dropped repeats by the memory of the tensors
    it was traced with, so gm(z, z) counted z twice and the reference backend scaled it twice
    (and a symbolic trace refused views it could have checked when run). A traced graph
    checks its inputs' memory when it runs, refusing a repeat before anything is written; a
    real-mode trace runs that check on the tracing inputs too."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def clip(a, b):
        return fusedclip.fused_clip_([a, b], inv_scale=0.5, backend=backend).total_norm

    traced = make_fx(clip, tracing_mode=mode)(torch.randn(5), torch.randn(5))
    a, b = torch.full((5,), 4.0), torch.full((5,), 2.0)
    assert_close(traced(a, b), torch.tensor(5**0.5 * (2.0**2 + 1.0) ** 0.5), rtol=1e-6, what="norm")
    assert a.tolist() == [2.0] * 5 and b.tolist() == [1.0] * 5, "each scaled once"
    z = torch.full((5,), 4.0)
    for pair in ((z, z), (z, z.view(-1)), (z, z[:])):
        with pytest.raises(
            ValueError, match=r"\[0\](\.grad)? and .*\[1\](\.grad)? are the same memory"
        ):
            traced(*pair)
        assert z.tolist() == [4.0] * 5, "nothing written"

    def views(a):
        return fusedclip.fused_clip_([a, a.view(-1)], max_norm=1.0, backend=backend).total_norm

    if mode == "real":  # the check runs on the tracing inputs
        with pytest.raises(
            ValueError, match=r"\[0\](\.grad)? and .*\[1\](\.grad)? are the same memory"
        ):
            make_fx(views, tracing_mode=mode)(torch.randn(5))
        return
    traced_views = make_fx(views, tracing_mode=mode)(torch.randn(5))
    with pytest.raises(
        ValueError, match=r"\[0\](\.grad)? and .*\[1\](\.grad)? are the same memory"
    ):
        traced_views(z)
    assert z.tolist() == [4.0] * 5, "nothing written"


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_an_exported_program_applies_the_aliasing_rule_when_run(strict):
    """torch.export traces by make_fx (non-strict) or dynamo (strict): its program checks its
    inputs' memory when it runs, as a compiled function does."""

    class Clip(torch.nn.Module):
        def forward(self, a, b):
            return fusedclip.fused_clip_([a, b], inv_scale=0.5).total_norm

    exported = torch.export.export(Clip(), (torch.randn(5), torch.randn(5)), strict=strict)
    a, b = torch.full((5,), 4.0), torch.full((5,), 2.0)
    assert_close(exported.module()(a, b), torch.tensor(5.0), rtol=1e-6, what="norm")
    assert a.tolist() == [2.0] * 5 and b.tolist() == [1.0] * 5, "each scaled once"
    z = torch.full((5,), 4.0)
    try:
        with pytest.raises(
            ValueError, match=r"\[0\](\.grad)? and .*\[1\](\.grad)? are the same memory"
        ):
            exported.module()(z, z)
    finally:
        # torch's wrap_with_set_grad_enabled (the API's no_grad, exported) restores grad mode
        # only when its body returns (README, Aliasing).
        torch.set_grad_enabled(True)
    assert z.tolist() == [4.0] * 5, "nothing written"


@pytest.mark.parametrize("mode", ["real", "fake", "symbolic"])
def test_a_make_fx_graph_takes_a_tensor_bound_as_an_input(mode):
    """A one-element tensor max_norm or clip_value was read on the host while make_fx traced
    (its sign check), which make_fx refuses in every mode: it is kept as a tensor, as under
    torch.compile, so the graph takes each call's bound."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def clip(grad, max_norm, clip_value):
        fusedclip.fused_clip_([grad], clip_value=clip_value)
        return fusedclip.fused_clip_([grad], max_norm=max_norm).total_norm

    traced = make_fx(clip, tracing_mode=mode)(torch.randn(4), torch.tensor(1.0), torch.tensor(9.0))
    for max_norm, clip_value in ((3.0, 9.0), (12.0, 2.0)):
        grad = torch.full((4,), 3.0)
        theirs = torch.nn.Parameter(torch.zeros(4))
        theirs.grad = grad.clone()
        torch.nn.utils.clip_grad_value_([theirs], clip_value)
        expected_norm = torch.nn.utils.clip_grad_norm_([theirs], max_norm)
        norm = traced(grad, torch.tensor(max_norm), torch.tensor(clip_value))
        assert_close(norm, expected_norm, rtol=1e-6, what="norm")
        assert_close(grad, theirs.grad, rtol=1e-6, what="clipped by this call's bounds")


def test_a_make_fx_graph_reads_the_scalers_scale_when_run():
    """amp's inv_scale cache was used while make_fx traced, so the graph took the inverse of an
    earlier call's scale as a constant: a scale the scaler changed later was not seen."""
    from torch.fx.experimental.proxy_tensor import make_fx

    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.ones(()))  # makes the scale tensor, as the first scaled loss does
    model = torch.nn.Linear(3, 1)

    def unscale(grad, optimizer):
        model.weight.grad = grad
        model.bias.grad = None
        return fusedclip.amp.unscale_clip_(scaler, optimizer, max_norm=1e9).total_norm

    eager_optimizer = torch.optim.SGD(model.parameters())  # kept: the scaler's state is by id()
    unscale(torch.ones(1, 3), eager_optimizer)  # the cache holds 1/4
    traced_optimizer = torch.optim.SGD(model.parameters())
    traced = make_fx(lambda grad: unscale(grad, traced_optimizer), tracing_mode="fake")(
        torch.ones(1, 3)
    )
    scaler._scale.fill_(2.0)  # in place, as scaler.update() writes it
    norm = traced(torch.full((1, 3), 4.0))
    assert_close(norm, torch.tensor(2.0 * 3**0.5), rtol=1e-6, what="unscaled by the new scale")


def test_a_stepped_view_is_written_without_laying_out_its_elements(monkeypatch):
    """Whether a written strided view overlaps itself was decided by laying out and sorting all
    its elements, each call: a w[:, ::2] of a large weight cost a sort of its size. A step that
    clears the smaller steps' reach decides it from the layout; the rest stays exact, checked
    here against an oracle over random layouts."""
    calls = []
    element_offsets = plan._element_offsets
    monkeypatch.setattr(
        plan, "_element_offsets", lambda *args: calls.append(1) or element_offsets(*args)
    )
    buffer = torch.full((64, 128), 4.0)
    fusedclip.fused_clip_([buffer[:32, ::2], buffer[32::3, 1::2]], inv_scale=0.5)
    assert calls == [], "laid out"
    expected = torch.full((64, 128), 4.0)
    expected[:32, ::2] = 2.0
    expected[32::3, 1::2] = 2.0
    assert torch.equal(buffer, expected)

    generator = np.random.default_rng(0)
    for _ in range(500):
        dims = int(generator.integers(1, 4))
        shape = [int(n) for n in generator.integers(1, 5, dims)]
        stride = [int(s) for s in generator.integers(0, 7, dims)]
        view = torch.empty(128).as_strided(shape, stride)
        offsets = (np.indices(shape).reshape(dims, -1) * np.array(stride)[:, None]).sum(0)
        assert plan._overlaps_itself(view) == (len(set(offsets.tolist())) < view.numel()), (
            shape,
            stride,
        )


def test_the_overlap_check_is_exact_and_lays_out_each_tensor_once(monkeypatch):
    """The overlap check compared every pair of intersecting spans element by element: the
    columns of one matrix all intersect, so 300 of them took 10 s. Now the residues of their
    steps tell them apart, or each tensor's elements are laid out at most twice (its own overlap
    and the shared one), and a real overlap among them is still found, as a pair that shares an
    element by an oracle over element sets."""
    calls = []
    element_offsets = plan._element_offsets
    monkeypatch.setattr(
        plan, "_element_offsets", lambda *args: calls.append(1) or element_offsets(*args)
    )
    buffer = torch.arange(1.0, 12 * 40 + 1).reshape(12, 40)
    columns = [buffer[:, j] for j in range(40)]
    fusedclip.fused_clip_(columns, inv_scale=0.5)
    assert torch.equal(buffer, torch.arange(1.0, 12 * 40 + 1).reshape(12, 40) / 2), "each once"
    assert calls == [], "columns are apart by their residues"

    overlapping = columns + [buffer[3, 10:20]]
    before = buffer.clone()
    with pytest.raises(ValueError, match="overlap in memory") as refused:
        fusedclip.fused_clip_(overlapping, inv_scale=0.5)
    assert torch.equal(buffer, before), "nothing written"
    assert len(calls) <= 2 * len(overlapping), len(calls)  # the dense one: exact
    named = tuple(int(i) for i in re.findall(r"tensors\[(\d+)\]", str(refused.value)))

    def elements(tensor):
        offsets = torch.arange(buffer.numel()).reshape(buffer.shape)
        return set(
            offsets.as_strided(tensor.shape, tensor.stride(), tensor.storage_offset())
            .flatten()
            .tolist()
        )

    assert elements(overlapping[named[0]]) & elements(overlapping[named[1]]), named


def test_column_blocks_are_written_without_laying_out_their_elements(monkeypatch):
    """A matrix split along its columns (a fused QKV gradient's split(n, dim=1)) is one run of
    views whose inner steps reach past the gcd of their steps: the residue test could not tell
    them apart, and the exact test laid out every element, each call (2-4 s for the blocks of a
    2048 x 6144 gradient). Modulo the row step they are disjoint intervals, and so is a dense
    piece of a row that lies among them."""
    calls = []
    element_offsets = plan._element_offsets
    monkeypatch.setattr(
        plan, "_element_offsets", lambda *args: calls.append(1) or element_offsets(*args)
    )
    start = torch.arange(1.0, 16 * 24 + 1).reshape(16, 24)
    buffer = start.clone()
    pieces = [*buffer[:, :16].split(8, dim=1), buffer[7, 16:]]
    fusedclip.fused_clip_(pieces, inv_scale=0.5)
    assert calls == [], "laid out"
    expected = start.clone()
    expected[:, :16] /= 2
    expected[7, 16:] /= 2
    assert torch.equal(buffer, expected)

    overlapping = [*buffer[:, :16].split(8, dim=1), buffer[7, 6:14]]
    before = buffer.clone()
    with pytest.raises(ValueError, match=r"overlap in memory"):
        fusedclip.fused_clip_(overlapping, inv_scale=0.5)
    assert torch.equal(buffer, before), "nothing written"


def test_the_overlap_check_agrees_with_an_oracle_on_random_views():
    """The residue shortcut and the exact test against element sets: views that share no
    element are accepted for a write, views that share some but not all are refused."""
    generator = np.random.default_rng(1)
    buffer = torch.zeros(96)
    elements = torch.arange(96)
    decided = {"apart": 0, "overlap": 0}
    for _ in range(400):
        views = []
        while len(views) < int(generator.integers(2, 5)):
            offset = int(generator.integers(0, 40))
            if generator.integers(2):  # a block of a matrix with `row` columns
                row = int(generator.integers(4, 10))
                shape = [int(generator.integers(1, 6)), int(generator.integers(1, row + 1))]
                view = buffer.as_strided(shape, [row, 1], offset)
            else:
                dims = int(generator.integers(1, 3))
                shape = [int(n) for n in generator.integers(1, 5, dims)]
                stride = [int(s) for s in generator.integers(1, 9, dims)]
                view = buffer.as_strided(shape, stride, offset)
            if not plan._overlaps_itself(view):
                views.append(view)
        sets = [
            set(elements.as_strided(v.shape, v.stride(), v.storage_offset()).flatten().tolist())
            for v in views
        ]
        pairs = [(a, b) for a in range(len(sets)) for b in range(a + 1, len(sets))]
        if any(sets[a] == sets[b] for a, b in pairs):
            continue  # the same elements: a repeat, counted once
        shared = any(sets[a] & sets[b] for a, b in pairs)
        if shared:
            with pytest.raises(ValueError, match="overlap in memory"):
                fusedclip.measure(views, writes_after=True)
        else:
            fusedclip.measure(views, writes_after=True)
        decided["overlap" if shared else "apart"] += 1
    assert min(decided.values()) > 50, decided


@pytest.mark.parametrize("backend", [None, "reference"], ids=["auto", "reference"])
@pytest.mark.parametrize("in_python", [False, True], ids=["c++-planner", "general-path"])
@pytest.mark.parametrize("kind", ["strided", "dense"])
def test_views_of_the_same_elements_count_and_are_written_once(
    monkeypatch, backend, in_python, kind
):
    """A strided gradient and its transpose or unsqueezed view are the same elements, but the
    rule compared their shapes and strides: counted twice in the norm, and refused as an
    overlap for a write. Views that differ only in dimension order, size-1 dimensions or how
    the steps are split are the same memory; interleaved ones still share nothing."""
    if in_python:
        plan_in_python(monkeypatch)
    buffer = torch.arange(1.0, 25.0).reshape(4, 6)
    gradient = buffer[:, ::2] if kind == "strided" else buffer[1]
    views = [gradient, gradient.t(), gradient.unsqueeze(0), gradient.unsqueeze(-1).transpose(0, 1)]
    if kind == "dense":
        views.append(gradient.view(2, 3).t())
    expected = torch.linalg.vector_norm(gradient, dtype=torch.float64)
    norm = fusedclip.get_total_norm(views, backend=backend)
    assert_close(norm, expected, rtol=1e-6, what="counted once")
    before = buffer.clone()
    result = fusedclip.fused_clip_(views, inv_scale=0.5, backend=backend)
    assert_close(result.total_norm, expected / 2, rtol=1e-6, what="unscaled norm")
    expected_buffer = before.clone()
    if kind == "strided":
        expected_buffer[:, ::2] /= 2
    else:
        expected_buffer[1] /= 2
    assert torch.equal(buffer, expected_buffer), "scaled once"
    interleaved = [buffer[:, ::2].t(), buffer[:, 1::2]]
    fusedclip.fused_clip_(interleaved, clip_value=0.0, backend=backend)
    assert torch.equal(buffer, torch.zeros(4, 6)), "interleaved views share nothing"


@pytest.mark.parametrize("backend", [None, "reference"], ids=["auto", "reference"])
@pytest.mark.parametrize("in_python", [False, True], ids=["c++-planner", "general-path"])
def test_memory_wrapped_by_two_storage_objects_follows_the_aliasing_rule(
    monkeypatch, backend, in_python
):
    """torch.from_dlpack (or from_numpy, frombuffer) wraps memory in a second storage object,
    and the rule compared tensors only within one storage: the same memory was counted twice
    and scaled twice (the reference backend), a partial overlap scaled twice without an error,
    or refused by the op's own check instead of the rule's ValueError."""
    if in_python:
        plan_in_python(monkeypatch)
    gradient = torch.arange(1.0, 11.0)
    twin = torch.from_dlpack(gradient[2:])
    expected = torch.linalg.vector_norm(gradient[2:], dtype=torch.float64)
    norm = fusedclip.get_total_norm([gradient[2:], twin], backend=backend)
    assert_close(norm, expected, rtol=1e-6, what="counted once")

    gradient = torch.full((10,), 2.0)
    twins = [gradient[2:], torch.from_dlpack(gradient[2:])]
    fusedclip.fused_clip_(twins, inv_scale=0.5, backend=backend)
    assert gradient.tolist() == [2.0, 2.0] + [1.0] * 8, "scaled once"

    gradient = torch.full((10,), 2.0)
    overlapping = [gradient[:6], torch.from_dlpack(gradient[4:])]
    with pytest.raises(ValueError, match=r"\[0\](\.grad)? and .*\[1\](\.grad)? overlap in memory"):
        fusedclip.fused_clip_(overlapping, inv_scale=0.5, backend=backend)
    assert gradient.tolist() == [2.0] * 10
    with pytest.raises(ValueError, match=r"\[0\](\.grad)? and .*\[1\](\.grad)? overlap in memory"):
        fusedclip.measure(overlapping, writes_after=True, backend=backend)

    # Interleaved views over two storage objects share no element: both are clipped.
    buffer = np.full(8, 2.0, dtype=np.float32)
    evens, odds = torch.from_numpy(buffer[::2]), torch.from_numpy(buffer[1::2])
    fusedclip.fused_clip_([evens, odds], clip_value=0.5, backend=backend)
    assert buffer.tolist() == [0.5] * 8


@pytest.mark.parametrize("in_python", [False, True], ids=["c++-planner", "general-path"])
@pytest.mark.parametrize("transform", ["grad", "vmap", "functionalize", "zerotensor"])
def test_tensors_without_readable_memory_are_refused_by_name_on_both_paths(
    monkeypatch, in_python, transform
):
    """Inside torch.func.grad, vmap or functionalize, and for a ZeroTensor, the C++ planner
    raised 'Cannot access data pointer' (or passed the tensor to an op that called it not
    dense) and the general path 'Cannot access storage of TensorWrapper': neither named the
    tensor or said what to do, and the two paths disagreed."""
    if in_python:
        plan_in_python(monkeypatch)

    def calls(gradient):
        for call in (
            lambda: fusedclip.get_total_norm([gradient]),
            lambda: fusedclip.fused_clip_([gradient], max_norm=1.0),
        ):
            with pytest.raises(TypeError, match=r"^tensors\[0\] is a (tensor inside a torch.f|Ze)"):
                call()
        return gradient.sum()

    if transform == "zerotensor":
        calls(torch._efficientzerotensor(4))
    else:
        apply = getattr(torch.func, transform)
        apply(calls)(torch.randn(2, 3) if transform == "vmap" else torch.randn(3))


@pytest.mark.parametrize("in_python", [False, True], ids=["c++-planner", "general-path"])
def test_a_wrapper_subclass_gradient_is_refused_by_name_before_any_write(monkeypatch, in_python):
    """A gradient that is a wrapper subclass (TwoTensor: a __torch_dispatch__ subclass holding two
    tensors) raised 'Attempted to access the data pointer on an invalid python storage', naming
    neither the tensor nor a way out."""
    from torch.testing._internal.two_tensor import TwoTensor

    if in_python:
        plan_in_python(monkeypatch)
    dense = torch.randn(5) * 10
    before = dense.clone()
    wrapped = TwoTensor(torch.randn(3), torch.randn(3))
    parameters = [torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(3))]
    parameters[0].grad, parameters[1].grad = dense, wrapped
    refusal = r" is a TwoTensor, a tensor subclass that wraps others .* torch.nn.utils' clipping"
    for call, named in (
        (lambda: fusedclip.get_total_norm([dense, wrapped]), r"tensors\[1\]"),
        (lambda: fusedclip.fused_clip_([dense, wrapped], max_norm=0.1), r"tensors\[1\]"),
        (lambda: fusedclip.clip_grad_norm_(parameters, 0.1), r"parameters\[1\]\.grad"),
        (lambda: fusedclip.clip_grad_value_(parameters, 0.1), r"parameters\[1\]\.grad"),
    ):
        with pytest.raises(TypeError, match="^" + named + refusal):
            call()
        assert torch.equal(dense, before), "nothing is written by a call that raises"


def test_interleaved_views_do_not_overlap_and_are_clipped():
    storage = torch.randn(10) * 5
    expected = storage.clone()
    norm = fusedclip.fused_clip_([storage[::2], storage[1::2]], max_norm=1.0).total_norm
    expected_norm = torch.linalg.vector_norm(expected, dtype=torch.float64)
    assert_close(norm, expected_norm, rtol=1e-6, what="norm of interleaved views")
    assert_close(storage, expected * (1.0 / (expected_norm.item() + 1e-6)), rtol=1e-5)


@needs_fast_path
@pytest.mark.parametrize("seed", range(4))
def test_views_in_any_order_are_disjoint_until_two_overlap(seed):
    """The overlap check sorts the spans (checks.h first_overlap): any order of disjoint views
    passes, and one overlap anywhere in a shuffled list is found, by the planner and by the op
    itself, before anything is written."""
    from fusedclip import _C

    generator = torch.Generator().manual_seed(seed)
    storage = torch.randn(600)
    views = list(storage.split(3))
    order = torch.randperm(len(views), generator=generator).tolist()
    shuffled = [views[i] for i in order]
    assert plan._C_PLAN_DENSE(shuffled, False, True, False, False) is not None
    at = int(torch.randint(len(shuffled), (), generator=generator))
    # Overlaps the view that begins 3 elements after it: two spans out of order somewhere.
    overlapping = (
        shuffled[:at] + [storage[3 * order[at] + 1 : 3 * order[at] + 5]] + shuffled[at + 1 :]
    )
    if 3 * order[at] + 5 > storage.numel():
        overlapping[at] = storage[3 * order[at] - 2 : 3 * order[at] + 2]
    assert plan._C_PLAN_DENSE(overlapping, False, True, False, False) is None
    before = storage.clone()
    coef = torch.tensor(0.5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="share memory"):
        _C.call_scale_(overlapping, coef, None)
    assert torch.equal(storage, before)
    _C.call_scale_(shuffled, coef, None)
    assert torch.equal(storage, before * 0.5)


def test_a_read_only_call_measures_an_expanded_tensor_as_torch_does():
    tensors = [torch.randn(3).expand(4, 3), torch.randn(2)]
    ours = fusedclip.get_total_norm(tensors, norm_type=3.0)
    theirs = torch.nn.utils.get_total_norm([t.double() for t in tensors], norm_type=3.0)
    assert_close(ours, theirs, rtol=1e-6, what="norm of an expanded tensor")


def test_inference_tensors_are_refused_outside_inference_mode_before_any_write():
    dense = torch.ones(4) * 3
    with torch.inference_mode():
        inference_dense = torch.ones(4) * 3
        inference_strided = (torch.ones(4, 2) * 3)[:, 0]
    for tensors in ([dense, inference_dense], [dense, inference_strided]):
        with pytest.raises(ValueError, match=r"inference tensor.*torch.inference_mode\(\)"):
            fusedclip.fused_clip_(tensors, max_norm=1.0)
        assert torch.equal(dense, torch.ones(4) * 3)
    with torch.inference_mode():
        fusedclip.fused_clip_([inference_dense, inference_strided], max_norm=1.0)
    assert_close(
        torch.linalg.vector_norm(torch.cat([inference_dense, inference_strided])),
        torch.tensor(1.0),
        rtol=1e-5,
        what="clipped inside inference mode",
    )


def test_mistakes_users_make_get_errors_that_name_the_argument_and_the_fix():
    model = torch.nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match=r"tensors\[0\] is a parameter.*p.grad"):
        fusedclip.fused_clip_(model.parameters(), max_norm=1.0)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    with pytest.raises(TypeError, match=r"tensors\[1\] is None: a parameter without a gradient"):
        fusedclip.fused_clip_([model.weight.grad, None], max_norm=1.0)
    with pytest.raises(TypeError, match=r"clip_value must be a non-negative number, got None"):
        fusedclip.clip_grad_value_(model.parameters(), None)
    with pytest.raises(TypeError, match=r"max_norm must be .* got None; to measure .*get_total"):
        fusedclip.clip_grad_norm_(model.parameters(), None)


def _warnings_of(function, *args) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        function(*args)
    return [str(w.message) for w in caught]


def test_an_empty_generator_warns_where_torch_warns():
    empty = "`parameters` is an empty generator, no gradient clipping will occur."
    for clip in (torch.nn.utils.clip_grad_norm_, fusedclip.clip_grad_norm_):
        assert _warnings_of(clip, (p for p in []), 1.0) == [empty], clip
    for clip in (torch.nn.utils.clip_grads_with_norm_, fusedclip.clip_grads_with_norm_):
        assert _warnings_of(clip, (p for p in []), 1.0, torch.tensor(2.0)) == [], clip


def test_clip_grads_with_norm_takes_total_norm_at_the_gradients_precision():
    grad = torch.full((3,), 2.0, dtype=torch.float64)
    fusedclip.clip_grads_with_norm_(_parameters(grad), 1.0, 1e30)
    assert torch.equal(grad, torch.full((3,), 2.0 * (1.0 / (1e30 + 1e-6)), dtype=torch.float64))
    untouched = torch.full((3,), 7.0)
    fusedclip.clip_grads_with_norm_(_parameters(untouched), 1e30, 1e30)
    assert torch.equal(untouched, torch.full((3,), 7.0)), "max_norm == total_norm must not write"
    tensors = [torch.randn(3)]
    snapshot = _snapshot(tensors)
    with pytest.raises(TypeError, match=r"total_norm must be a number or a one-element"):
        fusedclip.clip_grads_with_norm_(_parameters(*tensors), 1.0, torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match=r"total_norm must be a number or a one-element real"):
        fusedclip.clip_grads_with_norm_(_parameters(*tensors), 1.0, torch.tensor(2.0 + 0j))
    assert _unchanged(tensors, snapshot)


@pytest.mark.parametrize("total_norm", [torch.tensor(5), torch.tensor(5, dtype=torch.int32)])
def test_clip_grads_with_norm_takes_an_integer_total_norm_as_torch_does(total_norm):
    """torch divides by any real total_norm; an integer tensor was refused as not floating."""
    ours, theirs = torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0])
    fusedclip.clip_grads_with_norm_(_parameters(ours), 1.0, total_norm)
    torch.nn.utils.clip_grads_with_norm_(_parameters(theirs), 1.0, total_norm)
    assert_close(ours, theirs, rtol=1e-6, what="clipped as torch")


def test_calls_from_several_threads_are_each_right():
    sets = [[torch.randn(4096) * (i + 1) for _ in range(8)] for i in range(8)]
    expected = [torch.linalg.vector_norm(torch.cat(grads).double()).float() for grads in sets]
    results = [None] * len(sets)

    def work(index):
        for _ in range(5):
            grads = [g.clone() for g in sets[index]]
            results[index] = fusedclip.fused_clip_(grads, max_norm=1.0).total_norm

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(sets))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, (result, want) in enumerate(zip(results, expected, strict=True)):
        assert_close(result, want, rtol=1e-6, what=f"thread {index}")


def test_parameters_are_anything_with_a_grad_as_in_torch():
    class Holder:  # not a tensor: torch's clip_grad_norm_ only reads .grad
        def __init__(self, grad):
            self.grad = grad

    grads = [torch.randn(5) * 4, torch.randn(3) * 4]
    theirs = [g.clone() for g in grads]
    ours = fusedclip.clip_grad_norm_([Holder(g) for g in grads] + [Holder(None)], 1.0)
    expected = torch.nn.utils.clip_grad_norm_([Holder(g) for g in theirs] + [Holder(None)], 1.0)
    assert_close(ours, expected, rtol=1e-6, what="norm of duck-typed parameters")
    for mine, torchs in zip(grads, theirs, strict=True):
        assert_close(mine, torchs, rtol=1e-6, what="duck-typed gradient")
    with pytest.raises(TypeError, match=r"parameters' gradients\[0\]|parameters\[0\] is a int"):
        fusedclip.clip_grad_norm_([3], 1.0)


@pytest.mark.parametrize("general", [False, True], ids=["fast-path", "general-path"])
def test_empty_tensors_are_planned_as_listed(monkeypatch, general):
    """An empty tensor holds no memory to count or write twice: never a repeat, each is planned
    as listed, and per-tensor norms are one per listed tensor."""
    if general:
        plan_in_python(monkeypatch)
    empty = torch.ones(0)
    listed = [empty, empty, empty.view(0, 1), torch.ones(2)]
    same, _ = plan.prepare(listed, "tensors", None, writes=True)
    assert (same.count, same.listed) == (4, None)
    norms = fusedclip.measure(listed, per_tensor=True).per_tensor_norms  # one per listed tensor
    assert norms.tolist() == [0.0, 0.0, 0.0, torch.tensor(2.0).sqrt().item()]
    distinct, _ = plan.prepare([torch.ones(0), torch.ones(0)], "tensors", None, writes=False)
    assert (distinct.count, distinct.listed) == (2, None)


@pytest.mark.parametrize("general", [False, True], ids=["fast-path", "general-path"])
@pytest.mark.parametrize("caller", ["measure", "amp.clip_step", "ZClip.clip_step"])
def test_empty_tensors_are_never_refused_as_repeats(monkeypatch, general, caller):
    """An empty tensor holds no memory to write twice, yet two views of one empty tensor were
    refused for a caller that writes each listed tensor itself: a fused optimizer's step over two
    empty parameters whose gradients share an empty tensor raised."""
    if general:
        plan_in_python(monkeypatch)
    empty = torch.ones(0)
    parameters = [torch.nn.Parameter(torch.zeros(n)) for n in (0, 4, 0, 0)]
    for parameter, grad in zip(
        parameters, [empty, torch.full((4,), 3.0), empty.view(0), empty], strict=True
    ):
        parameter.grad = grad
    theirs = [torch.nn.Parameter(torch.zeros(4))]
    theirs[0].grad = torch.full((4,), 3.0)
    expected_norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    if caller == "measure":
        norm = fusedclip.measure([p.grad for p in parameters], writes_after=True).total_norm
        assert_close(norm, expected_norm, rtol=1e-6, what="norm")
        return
    optimizer = torch.optim.SGD(parameters, lr=1.0, fused=True)
    if caller == "amp.clip_step":
        norm = fusedclip.amp.clip_step(optimizer, max_norm=1.0).total_norm
    else:
        norm = fusedclip.stability.ZClip(max_norm=1.0).clip_step(optimizer).total_norm
    torch.optim.SGD(theirs, lr=1.0).step()
    assert_close(norm, expected_norm, rtol=1e-6, what="norm")
    assert_close(parameters[1], theirs[0], rtol=1e-6, what="stepped parameter")


@needs_fast_path
def test_fast_path_hands_the_extension_a_dense_gradients_and_the_others_a_list():
    from fusedclip import _C

    grads = [torch.randn(3), torch.randn(2, 2), torch.ones(0)]
    found = plan._C_PLAN_DENSE(grads, False, True, False, False)
    gradients = found[0]
    assert isinstance(gradients, _C.DenseGradients)
    assert len(gradients) == 3 and all(a is b for a, b in zip(gradients, grads, strict=True))
    assert gradients[1] is grads[1]
    with pytest.raises(IndexError):
        gradients[3]
    with pytest.raises(TypeError):
        _C.DenseGradients()
    for backend, kind in (("cpu", _C.DenseGradients), ("reference", list)):
        the_plan, _ = plan.prepare(grads, "tensors", backend, writes=True)
        assert type(the_plan.groups[0].dense) is kind, backend


@needs_fast_path
@pytest.mark.parametrize("change", ["set_", "resize_"])
def test_write_ops_check_again_gradients_changed_since_planning(change):
    """The write ops skip their overlap sort for a DenseGradients whose spans are still those the
    planner found disjoint (csrc/include/fusedclip/planned_spans.h). A gradient re-pointed or
    resized after planning so that it shares memory with another must still be refused, with
    nothing written."""
    from fusedclip import _C

    storage = torch.randn(1000)
    first, second = storage[:500], storage[500:]  # disjoint views of one storage
    planned = plan._C_PLAN_DENSE([first, second], False, True, False, False)[0]
    coef = torch.tensor(0.5, dtype=torch.float64)
    if change == "set_":
        second.set_(storage.untyped_storage(), 250, (500,), (1,))  # now storage[250:750]
    else:
        first.resize_(600)  # now storage[:600]
    before = storage.clone()
    with pytest.raises(RuntimeError, match=r"tensors\[0\] and tensors\[1\] share memory"):
        _C.call_scale_(planned, coef, None)
    with pytest.raises(RuntimeError, match=r"tensors\[0\] and tensors\[1\] share memory"):
        _C.call_clip_(planned, 2.0, 1e-3, None, None, torch.float32, False, "auto")
    assert torch.equal(storage, before)
    # Unchanged since planning, the same list is scaled as planned.
    fresh = [torch.randn(4), torch.randn(3)]
    expected = [t * 0.5 for t in fresh]
    _C.call_scale_(plan._C_PLAN_DENSE(fresh, False, True, False, False)[0], coef, None)
    assert all(torch.equal(t, e) for t, e in zip(fresh, expected, strict=True))


def _one_calls():
    """Calls of the API that take plan.prepare_and_clip or plan.prepare_and_scale for the common
    case: (id, run), where run(grads) clips the gradients `grads` and returns the tensors it hands
    back."""

    def norm(**kwargs):
        return lambda grads: [fusedclip.clip_grad_norm_(_parameters(*grads), 0.5, **kwargs)]

    def fused(**kwargs):
        return lambda grads: list(fusedclip.fused_clip_(grads, **kwargs)[:3])

    def value(**kwargs):
        return lambda grads: fusedclip.clip_grad_value_(_parameters(*grads), 0.2, **kwargs) or []

    def scale(clip_coef):
        return lambda grads: api.scale_(grads, clip_coef) or []

    def with_norm(total_norm):
        return lambda grads: (
            fusedclip.clip_grads_with_norm_(_parameters(*grads), 0.5, total_norm) or []
        )

    return [
        pytest.param(norm(), id="clip_grad_norm_"),
        pytest.param(norm(norm_type="inf"), id="clip_grad_norm_-inf"),
        pytest.param(
            norm(norm_type=3.5, inv_scale=0.25), id="clip_grad_norm_-p3.5-float-inv_scale"
        ),
        pytest.param(
            fused(max_norm=0.5, inv_scale=torch.tensor(0.5)), id="fused-float32-inv_scale"
        ),
        pytest.param(
            fused(max_norm=2.0, inv_scale=torch.tensor(0.5, dtype=torch.float64), clip_value=0.1),
            id="fused-float64-inv_scale-and-clip_value",
        ),
        pytest.param(fused(clip_value=0.1, norm_type=1.0), id="fused-clip_value-only"),
        pytest.param(fused(inv_scale=0.125), id="fused-unscale-only"),
        pytest.param(value(), id="clip_grad_value_"),
        pytest.param(value(inv_scale=0.25), id="clip_grad_value_-float-inv_scale"),
        pytest.param(value(inv_scale=torch.tensor(0.25)), id="clip_grad_value_-float32-inv_scale"),
        pytest.param(scale(torch.tensor(0.3)), id="scale_-float32"),
        pytest.param(scale(torch.tensor(0.3, dtype=torch.float64)), id="scale_-float64"),
        pytest.param(with_norm(torch.tensor(4.0)), id="clip_grads_with_norm_"),
    ]


@pytest.mark.skipif(plan._C_CLIP_DENSE is None, reason="fusedclip._C.clip_dense_ is not built")
@pytest.mark.parametrize("make", COMMON_GRADIENTS)
@pytest.mark.parametrize("run", _one_calls())
def test_one_call_clips_the_common_case_as_prepare_and_the_backend_do(monkeypatch, make, run):
    """plan.prepare_and_clip and prepare_and_scale run the common case in one C++ call: results
    and gradients are those of the general path, bit for bit, and prepare() is never called."""
    grads = make()
    twins = [g.clone() for g in grads]
    with monkeypatch.context() as patch:
        patch.setattr(plan, "prepare", _refuse_to_plan)
        ours = run(grads)
    with monkeypatch.context() as patch:
        plan_in_python(patch)
        theirs = run(twins)
    for mine, expected in zip(ours + grads, theirs + twins, strict=True):
        torch.testing.assert_close(mine, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.skipif(plan._C_CLIP_DENSE is None, reason="fusedclip._C.clip_dense_ is not built")
def test_amp_unscale_clip_runs_the_common_case_as_one_call(monkeypatch):
    from fusedclip import amp

    def setup():
        torch.manual_seed(1)
        parameters = _parameters(torch.randn(5) * 64, torch.randn(2, 3) * 64)
        optimizer = torch.optim.SGD(parameters, lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
        scaler.scale(torch.ones(()))  # as scaling the loss does: the scale exists from here on
        return parameters, optimizer, scaler

    parameters, optimizer, scaler = setup()
    with monkeypatch.context() as patch:
        patch.setattr(plan, "prepare", _refuse_to_plan)
        result = amp.unscale_clip_(scaler, optimizer, 0.5)
    twins, twin_optimizer, twin_scaler = setup()
    twin_scaler.unscale_(twin_optimizer)
    expected = torch.nn.utils.clip_grad_norm_(twins, 0.5)
    assert_close(result.total_norm, expected, rtol=1e-6)
    for p, q in zip(parameters, twins, strict=True):
        assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9)
    assert result.found_inf.item() == 0.0
    scaler.step(optimizer)  # the scaler knows this optimizer was unscaled: no second unscale


def _refuse_to_plan(*args, **kwargs):
    raise AssertionError("plan.prepare was called: the common case did not run as one call")


def _one_call_declines():
    grads = [torch.randn(3), torch.randn(2, 2)]
    return [
        *(
            pytest.param(items, kwargs, {}, id=param.id)
            for param in _deferred_cases()
            for items, kwargs in [param.values]
        ),
        pytest.param(grads, {}, {"backend": "reference"}, id="reference-backend"),
        pytest.param(
            grads, {}, {"inv_scale": torch.tensor(0.5, dtype=torch.float16)}, id="float16-inv_scale"
        ),
        pytest.param(grads, {}, {"inv_scale": torch.tensor([0.5])}, id="inv_scale-of-shape-1"),
        pytest.param(
            grads, {}, {"inv_scale": torch.tensor(0.5, device="meta")}, id="inv_scale-elsewhere"
        ),
        pytest.param([], {}, {}, id="no-gradient"),
    ]


@pytest.mark.skipif(plan._C_CLIP_DENSE is None, reason="fusedclip._C.clip_dense_ is not built")
@pytest.mark.parametrize(("items", "rules", "arguments"), _one_call_declines())
def test_one_call_declines_the_rest_having_written_nothing(items, rules, arguments):
    """Anything but the common case (each of the C++ planner's deferrals, another backend, an
    inv_scale the general path must convert) gets None and unchanged gradients, so that prepare()
    and its errors take over."""
    snapshot = [t.clone() if isinstance(t, torch.Tensor) else t for t in items]
    call = {"norm_type": 2.0, "max_norm": 1e-3, "inv_scale": None, "clip_value": None, **arguments}
    backend = call.pop("backend", None)
    rules = {key: value for key, value in rules.items() if key != "writes"}
    assert plan.prepare_and_clip(list(items), backend, **call, **rules) is None
    if "refuse_float16" not in rules:  # a write alone never unscales for a GradScaler
        coef = call["inv_scale"]
        written = plan.prepare_and_scale(
            list(items), backend, clip_coef=coef, clip_value=0.5, **rules
        )
        assert written is False
    for now, before in zip(items, snapshot, strict=True):
        if isinstance(now, torch.Tensor) and not now.is_sparse:
            assert torch.equal(now, before)


@pytest.mark.skipif(plan._C_CLIP_DENSE is None, reason="fusedclip._C.clip_dense_ is not built")
def test_one_call_leaves_a_torch_function_mode_to_the_general_path():
    seen = []

    class Recording(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    grads = [torch.randn(3), torch.randn(2, 2)]
    with Recording():
        assert (
            plan.prepare_and_clip(
                grads, None, norm_type=2.0, max_norm=1.0, inv_scale=None, clip_value=None
            )
            is None
        )
        assert plan.prepare_and_scale(grads, None, clip_coef=None, clip_value=0.5) is False
        fusedclip.fused_clip_(grads, max_norm=1e-3)
        fusedclip.clip_grad_value_(_parameters(*grads), 0.5)
    assert torch.ops.fusedclip.clip_.default in seen
    assert torch.ops.fusedclip.scale_.default in seen


@pytest.mark.skipif(plan._C_CLIP_DENSE is None, reason="fusedclip._C.clip_dense_ is not built")
def test_one_call_leaves_a_dispatch_mode_to_the_general_path():
    """A dispatch mode sees every op the general path runs (the coefficient's conversions too)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passing(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    grads = [torch.randn(3), torch.randn(2, 2)]
    with Passing():
        clip = plan.prepare_and_clip(
            grads, None, norm_type=2.0, max_norm=1.0, inv_scale=None, clip_value=None
        )
        assert clip is None
        assert plan.prepare_and_scale(grads, None, clip_coef=0.5, clip_value=None) is False


@needs_fast_path
@pytest.mark.skipif(
    sys.version_info >= (3, 12),
    reason="from Python 3.12 the collector runs between bytecodes only, never inside the C++ "
    "planner's allocations, so no finalizer can run while it plans",
)
@pytest.mark.parametrize("one_call", [True, False], ids=["one-call", "plan_dense"])
def test_a_finalizer_that_empties_the_list_while_it_is_planned_is_survived(monkeypatch, one_call):
    """The C++ planner wraps each .grad that has no Python object yet (every gradient fresh from
    backward()), which may run the garbage collector and so any finalizer. One that empties the
    list being planned must not leave the planner reading freed memory: it hands the list to the
    general path, which finds nothing left to clip."""
    import gc

    if not one_call:
        monkeypatch.setattr(plan, "_C_CLIP_DENSE", None)
    items = [torch.nn.Parameter(torch.ones(2)) for _ in range(3000)]
    sum((p * p).sum() for p in items).backward()

    class EmptiesTheList:
        fired = False

        def __del__(self):
            EmptiesTheList.fired = True
            items.clear()

    threshold = gc.get_threshold()
    gc.collect()
    try:
        gc.set_threshold(50)
        trap = EmptiesTheList()
        trap.cycle = trap  # freed only by the collector
        del trap
        norm = fusedclip.clip_grad_norm_(items, 1.0)
    finally:
        gc.set_threshold(*threshold)
    assert EmptiesTheList.fired and items == []
    assert norm.item() == 0.0


@pytest.mark.parametrize("in_python", [False, True], ids=["one-call", "general-path"])
def test_a_call_under_a_fake_tensor_mode_leaves_later_calls_right(monkeypatch, in_python):
    """clip_grad_value_'s coefficient of 1 is cached per device; made under a FakeTensorMode it
    would be a fake tensor, and every later call on that device would write nothing."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if in_python:
        plan_in_python(monkeypatch)
    api._one.cache_clear()
    try:
        parameter = torch.nn.Parameter(torch.zeros(3))
        parameter.grad = torch.tensor([3.0, -3.0, 0.1])
        with FakeTensorMode(allow_non_fake_inputs=True):
            fusedclip.clip_grad_value_([parameter], 0.5)
        parameter.grad = torch.tensor([3.0, -3.0, 0.1])
        fusedclip.clip_grad_value_([parameter], 0.5)
        assert parameter.grad.tolist() == [0.5, -0.5, pytest.approx(0.1)]
    finally:
        api._one.cache_clear()
