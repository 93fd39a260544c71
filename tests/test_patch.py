"""fusedclip.patch(): torch.nn.utils' clipping functions, and module globals bound to them, run
fusedclip while patched and are torch's again, exactly, after undo."""

from __future__ import annotations

import contextlib
import functools
import importlib
import pickle
import sys
import types
import warnings

import pytest
import torch
import torch.nn.utils
import torch.nn.utils.clip_grad

import fusedclip

# The module, not the function fusedclip.patch that the package exports under the same name.
patch_module = importlib.import_module("fusedclip.patch")

NAMES = tuple(patch_module.REPLACED_FUNCTIONS)
# torch's functions, kept out of module globals (the patch would rebind a global bound to them).
TORCH_FUNCTIONS = types.MappingProxyType({name: getattr(torch.nn.utils, name) for name in NAMES})
# Where torch.nn.utils.clip_grad keeps them (the last two under private names).
CLIP_GRAD_NAMES = {
    "clip_grad_norm_": "clip_grad_norm_",
    "clip_grad_value_": "clip_grad_value_",
    "get_total_norm": "_get_total_norm",
    "clip_grads_with_norm_": "_clip_grads_with_norm_",
}


@pytest.fixture(autouse=True)
def _always_unpatched():
    fusedclip.unpatch()
    yield
    fusedclip.unpatch()
    for name in NAMES:
        assert getattr(torch.nn.utils, name) is TORCH_FUNCTIONS[name], name


def _framework_module(name: str = "fake_framework") -> types.ModuleType:
    """A module that imported torch's functions by name, as many frameworks do."""
    module = types.ModuleType(name)
    exec(
        "from torch.nn.utils import clip_grad_norm_, clip_grad_value_\n"
        "from torch.nn.utils import get_total_norm as total_norm\n"
        "from torch.nn.utils.clip_grad import _clip_grads_with_norm_ as with_norm\n"
        "def clip(parameters, max_norm):\n"
        "    return clip_grad_norm_(parameters, max_norm)\n",
        module.__dict__,
    )
    sys.modules[name] = module
    return module


def _calls_recorded(monkeypatch) -> list[str]:
    """Records which fusedclip drop-in ran: patches made after this call wrap recording ones."""
    calls = []
    for name, drop_in in patch_module.REPLACED_FUNCTIONS.items():

        def recording(*args, _name=name, _drop_in=drop_in, **kwargs):
            calls.append(_name)
            return _drop_in(*args, **kwargs)

        monkeypatch.setitem(patch_module.REPLACED_FUNCTIONS, name, recording)
    return calls


def _parameters(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    parameters = [torch.nn.Parameter(torch.randn(n, generator=generator)) for n in (5, 300, 1)]
    for parameter in parameters:
        parameter.grad = 10 * torch.randn(parameter.shape, generator=generator)
    return parameters


def test_patch_replaces_the_functions_in_both_torch_modules_and_undo_restores_them():
    handle = fusedclip.patch()
    for name in NAMES:
        stand_in = getattr(torch.nn.utils, name)
        assert stand_in is not TORCH_FUNCTIONS[name], name
        assert getattr(torch.nn.utils.clip_grad, CLIP_GRAD_NAMES[name]) is stand_in, name
        assert stand_in.__wrapped__ is patch_module.REPLACED_FUNCTIONS[name]
    assert patch_module.is_patched()
    handle.undo()
    for name in NAMES:
        assert getattr(torch.nn.utils, name) is TORCH_FUNCTIONS[name], name
        assert getattr(torch.nn.utils.clip_grad, CLIP_GRAD_NAMES[name]) is TORCH_FUNCTIONS[name]
    assert not patch_module.is_patched()


def test_patched_calls_run_fusedclip_and_give_torchs_results(monkeypatch):
    calls = _calls_recorded(monkeypatch)
    expected = _parameters(1)
    torch_norm = TORCH_FUNCTIONS["clip_grad_norm_"](expected, 1.0)
    with fusedclip.patch():
        actual = _parameters(1)
        norm = torch.nn.utils.clip_grad_norm_(actual, 1.0)
        torch.nn.utils.clip_grad.clip_grad_value_(actual, 0.05)
        measured = torch.nn.utils.get_total_norm([p.grad for p in actual])
        torch.nn.utils.clip_grads_with_norm_(actual, 0.01, measured)
    assert calls == list(NAMES)
    torch.testing.assert_close(norm, torch_norm)
    TORCH_FUNCTIONS["clip_grad_value_"](expected, 0.05)
    torch_measured = TORCH_FUNCTIONS["get_total_norm"]([p.grad for p in expected])
    torch.testing.assert_close(measured, torch_measured)
    TORCH_FUNCTIONS["clip_grads_with_norm_"](expected, 0.01, torch_measured)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got.grad, want.grad)


def test_a_module_that_imported_the_functions_before_the_patch_sees_fusedclip(monkeypatch):
    framework = _framework_module()
    try:
        calls = _calls_recorded(monkeypatch)
        with fusedclip.patch():
            framework.clip(_parameters(2), 1.0)
            framework.clip_grad_value_(_parameters(2), 1.0)
            framework.total_norm([torch.ones(3)])
            framework.with_norm(_parameters(2), 1.0, torch.tensor(2.0))
        assert calls == list(NAMES)
        # Undone exactly: the module's own names are torch's functions again.
        assert framework.clip_grad_norm_ is TORCH_FUNCTIONS["clip_grad_norm_"]
        assert framework.clip_grad_value_ is TORCH_FUNCTIONS["clip_grad_value_"]
        assert framework.total_norm is TORCH_FUNCTIONS["get_total_norm"]
        assert framework.with_norm is TORCH_FUNCTIONS["clip_grads_with_norm_"]
        calls.clear()
        framework.clip(_parameters(2), 1.0)
        assert calls == []
    finally:
        del sys.modules["fake_framework"]


def test_a_module_imported_while_patched_is_restored_too():
    with fusedclip.patch():
        framework = _framework_module("fake_framework_late")
        assert framework.clip_grad_norm_ is torch.nn.utils.clip_grad_norm_
        assert framework.clip_grad_norm_ is not TORCH_FUNCTIONS["clip_grad_norm_"]
    try:
        assert framework.clip_grad_norm_ is TORCH_FUNCTIONS["clip_grad_norm_"]
        assert framework.total_norm is TORCH_FUNCTIONS["get_total_norm"]
    finally:
        del sys.modules["fake_framework_late"]


def test_undo_leaves_fusedclips_own_functions_and_foreign_rebindings_alone():
    module = types.ModuleType("fake_user_code")
    module.fused = fusedclip.clip_grad_norm_
    sys.modules["fake_user_code"] = module
    try:
        handle = fusedclip.patch()
        # Someone else replaces the function while patched: undo must not clobber that.
        sentinel = object()
        module.replaced = sentinel
        handle.undo()
        assert module.fused is fusedclip.clip_grad_norm_
        assert module.replaced is sentinel
    finally:
        del sys.modules["fake_user_code"]


def test_patches_nest_and_unpatch_undoes_all():
    outer = fusedclip.patch()
    inner = fusedclip.patch()
    stand_in = torch.nn.utils.clip_grad_norm_
    inner.undo()
    assert torch.nn.utils.clip_grad_norm_ is stand_in, "the outer patch is still open"
    inner.undo()  # a second undo does nothing
    assert torch.nn.utils.clip_grad_norm_ is stand_in
    outer.undo()
    assert torch.nn.utils.clip_grad_norm_ is TORCH_FUNCTIONS["clip_grad_norm_"]

    fusedclip.patch()
    with fusedclip.patch():
        fusedclip.unpatch()
        assert torch.nn.utils.clip_grad_norm_ is TORCH_FUNCTIONS["clip_grad_norm_"]
    assert torch.nn.utils.clip_grad_norm_ is TORCH_FUNCTIONS["clip_grad_norm_"]


def test_the_context_manager_undoes_on_an_exception():
    with pytest.raises(ZeroDivisionError), fusedclip.patch():
        assert torch.nn.utils.clip_grad_norm_ is not TORCH_FUNCTIONS["clip_grad_norm_"]
        1 / 0  # noqa: B018
    assert torch.nn.utils.clip_grad_norm_ is TORCH_FUNCTIONS["clip_grad_norm_"]


def test_torchs_deprecated_clip_grad_norm_runs_fusedclip_while_patched(monkeypatch):
    # torch.nn.utils.clip_grad_norm (no underscore) calls its module's clip_grad_norm_ global.
    calls = _calls_recorded(monkeypatch)
    with fusedclip.patch(), pytest.warns(FutureWarning):
        torch.nn.utils.clip_grad_norm(_parameters(3), 1.0)
    assert calls == ["clip_grad_norm_"]


def test_patch_as_a_decorator_patches_each_call_of_the_function(monkeypatch):
    calls = _calls_recorded(monkeypatch)

    @fusedclip.patch()
    def train_step(parameters, fail=False):
        assert patch_module.is_patched()
        norm = torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        if fail:
            raise ZeroDivisionError
        return norm

    assert not patch_module.is_patched(), "decorating alone left the patch on"
    expected = _parameters(4)
    torch_norm = TORCH_FUNCTIONS["clip_grad_norm_"](expected, 1.0)
    actual = _parameters(4)
    torch.testing.assert_close(train_step(actual), torch_norm)
    assert calls == ["clip_grad_norm_"] and not patch_module.is_patched()
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got.grad, want.grad)
    with pytest.raises(ZeroDivisionError):
        train_step(_parameters(5), fail=True)
    assert calls == ["clip_grad_norm_"] * 2 and not patch_module.is_patched()
    with pytest.raises(TypeError, match=r"decorates a function, got int"):
        fusedclip.patch()(3)


def test_torchs_clip_grad_norm_held_outside_module_globals_runs_fusedclips_halves(monkeypatch):
    """The patch does not follow a functools.partial; torch's function it holds looks up its
    two halves in torch.nn.utils.clip_grad, which are fusedclip's while patched."""
    calls = _calls_recorded(monkeypatch)
    held = functools.partial(TORCH_FUNCTIONS["clip_grad_norm_"], max_norm=1.0)
    fused, through_held = _parameters(6), _parameters(6)
    with fusedclip.patch():
        norm = held(through_held)
        assert calls == ["get_total_norm", "clip_grads_with_norm_"]
    expected_norm = fusedclip.clip_grad_norm_(fused, 1.0)
    assert torch.equal(norm, expected_norm)
    for got, want in zip(through_held, fused, strict=True):
        assert torch.equal(got.grad, want.grad)
    held(_parameters(7))  # torch's own again after undo
    assert calls == ["get_total_norm", "clip_grads_with_norm_"]
    # The handoff is torch's: a float32 norm past float32's range is inf, and its factor 0 zeroes
    # the gradients, as torch does, where fusedclip's one-pass call clips them to max_norm.
    huge = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    for p in huge:
        p.grad = torch.full((1,), 3e38)
    with fusedclip.patch():
        assert torch.isinf(held(huge))
    assert all(torch.equal(p.grad, torch.zeros(1)) for p in huge)


def test_a_refused_decoration_leaves_nothing_patched():
    """patch() applies when called, and a decoration it refused raised before undoing it: the
    patch stayed on for good. A generator or async function is refused too: its body runs after
    the call returns, where a patch for the call was already undone."""

    def generator():
        yield torch.nn.utils.clip_grad_norm_

    async def coroutine():
        return torch.nn.utils.clip_grad_norm_

    async def async_generator():
        yield torch.nn.utils.clip_grad_norm_

    with pytest.raises(TypeError, match=r"decorates a function, got int"):
        fusedclip.patch()(3)
    assert not patch_module.is_patched(), "a refused decoration left the patch on"
    for function, kind in (
        (generator, "a generator"),
        (coroutine, "a coroutine"),
        (async_generator, "an async generator"),
    ):
        with pytest.raises(TypeError, match=rf"cannot decorate .*{function.__name__}, {kind}"):
            fusedclip.patch()(function)
        assert not patch_module.is_patched(), kind


def test_a_partial_or_callable_object_of_a_deferred_body_is_refused_by_name():
    """A functools.partial of a generator or async function was refused with an AttributeError
    (no __qualname__ for the message); an object whose __call__ is a generator was accepted and
    its body ran unpatched, after the call."""

    def generator():
        yield torch.nn.utils.clip_grad_norm_

    async def coroutine():
        return torch.nn.utils.clip_grad_norm_

    class CallsAGenerator:
        def __call__(self):
            yield torch.nn.utils.clip_grad_norm_

    for function, kind, shown in (
        (functools.partial(generator), "a generator", r"functools\.partial\(<function .*generator"),
        (functools.partial(coroutine), "a coroutine", r"functools\.partial\(<function .*coroutine"),
        (CallsAGenerator(), "a generator", r"<.*CallsAGenerator object at"),
    ):
        with pytest.raises(TypeError, match=rf"cannot decorate {shown}.*, {kind} function"):
            fusedclip.patch()(function)
        assert not patch_module.is_patched(), kind


def test_a_context_manager_is_refused_and_other_wrappers_of_a_deferred_body_warn():
    """contextlib's context managers are plain functions whose body (the wrapped generator) runs
    when the caller enters the context, after the call: it was accepted and ran unpatched. Other
    functools.wraps wrappers of a generator or coroutine may run it inside the call (list(f()),
    asyncio.run(f())) or return it unrun: they are patched, with a warning."""

    def passing_through(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            return function(*args, **kwargs)

        return wrapper

    def consuming(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            return list(function(*args, **kwargs))

        return wrapper

    @contextlib.contextmanager
    def context():
        yield torch.nn.utils.clip_grad_norm_

    @contextlib.asynccontextmanager
    async def async_context():
        yield torch.nn.utils.clip_grad_norm_

    for function, kind in ((context, "a generator"), (async_context, "an async generator")):
        with pytest.raises(
            TypeError, match=rf"cannot decorate .*{function.__name__}, a function wrapping {kind}"
        ):
            fusedclip.patch()(function)
        assert not patch_module.is_patched(), function.__name__

    @passing_through
    async def coroutine():
        return torch.nn.utils.clip_grad_norm_

    @consuming
    def generator():
        yield torch.nn.utils.clip_grad_norm_

    for function, kind in ((coroutine, "a coroutine"), (generator, "a generator")):
        with pytest.warns(RuntimeWarning, match=rf"decorates .*, a function wrapping {kind}"):
            patched = fusedclip.patch()(function)
        assert not patch_module.is_patched(), function.__name__
        assert patched is not function
    (seen,) = patched()  # the consuming wrapper ran the body inside the call: patched
    assert seen is not TORCH_FUNCTIONS["clip_grad_norm_"]
    assert torch.nn.utils.clip_grad_norm_ is TORCH_FUNCTIONS["clip_grad_norm_"]

    @fusedclip.patch()
    @passing_through
    def plain():
        return torch.nn.utils.clip_grad_norm_

    assert plain() is not TORCH_FUNCTIONS["clip_grad_norm_"]


def test_the_stand_ins_pickle_as_torchs_names():
    """A stand-in carried fusedclip's drop-in's name but was another object, so pickling it
    (torch.nn.utils.clip_grad_norm_ while patched, say in a saved config) raised."""
    with fusedclip.patch():
        for name in NAMES:
            stand_in = getattr(torch.nn.utils, name)
            assert pickle.loads(pickle.dumps(stand_in)) is stand_in, name
    for name in NAMES:  # unpatched, the same bytes' name is torch's function again
        assert pickle.loads(pickle.dumps(TORCH_FUNCTIONS[name])) is TORCH_FUNCTIONS[name], name


@pytest.mark.parametrize("patched", [False, True], ids=["fusedclip", "patched-torch-name"])
def test_the_empty_generator_warning_names_the_callers_line(patched):
    """Patched, the stand-in is one frame more between the caller and the warning, which then
    named fusedclip/patch.py instead of the line that called torch.nn.utils.clip_grad_norm_."""
    with fusedclip.patch() if patched else contextlib.nullcontext():
        clip = torch.nn.utils.clip_grad_norm_ if patched else fusedclip.clip_grad_norm_
        assert getattr(clip, "__fusedclip_patch__", False) == patched
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            clip((p for p in []), 1.0)
    (warning,) = caught
    assert (warning.filename, warning.lineno) == (__file__, _line_of("clip((p for p in [])")), (
        warning.filename,
        warning.lineno,
    )


def _line_of(text: str) -> int:
    with open(__file__) as handle:
        (line,) = [number for number, line in enumerate(handle, 1) if line.strip().startswith(text)]
    return line
