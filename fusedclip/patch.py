"""`fusedclip.patch()`: make every caller of torch.nn.utils' clipping functions run fusedclip.

Replaces `clip_grad_norm_`, `clip_grad_value_`, `get_total_norm` and `clip_grads_with_norm_`
in `torch.nn.utils` and `torch.nn.utils.clip_grad` (where torch keeps the last two as
`_get_total_norm` and `_clip_grads_with_norm_`), so `torch.nn.utils.clip_grad_norm_(...)`
calls made later run fusedclip. A framework that did `from torch.nn.utils import clip_grad_norm_`
before the patch holds torch's function in its own module globals: every already-imported
module's global bound to one of torch's four functions (under any name) is rebound too.

Undoing restores exactly what was patched: every module global that holds one of the patch's
stand-ins goes back to torch's function, including globals of modules imported while patched
(they bound the stand-in). Only the stand-ins are touched: a module that imported fusedclip's
own `clip_grad_norm_` keeps it, and a global rebound by someone else meanwhile is left alone.
Attributes outside module globals (a class attribute, a `functools.partial`) are not followed:
one that holds torch's `clip_grad_norm_` still calls torch's, but torch's looks its two halves up
in torch.nn.utils.clip_grad, so while patched it runs fusedclip's `get_total_norm` and then
`clip_grads_with_norm_` (fusedclip's results, in two passes instead of one fused call). Such a
reference to torch's function cannot be pickled while patched (pickle finds a stand-in under its
name); the stand-ins pickle as torch's names.

Patches nest: each `patch()` returns a handle; torch's functions come back when the last
handle is undone (or at once with `unpatch()`). As a decorator, `@fusedclip.patch()` patches
for each call of the function it decorates, not from the decoration on (nor a generator or async
function, whose body runs after the call returns: it is refused).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading
import types
import warnings
from collections.abc import Callable

import torch.nn.utils
import torch.nn.utils.clip_grad

from fusedclip import api

# The public names in torch.nn.utils and the fusedclip drop-in that stands in for each.
REPLACED_FUNCTIONS: dict[str, Callable] = {
    "clip_grad_norm_": api.clip_grad_norm_,
    "clip_grad_value_": api.clip_grad_value_,
    "get_total_norm": api.get_total_norm,
    "clip_grads_with_norm_": api.clip_grads_with_norm_,
}

_lock = threading.Lock()
# id(torch function) -> (torch function, its stand-in) while patched.
_stand_ins: dict[int, tuple[Callable, Callable]] = {}


def _make_stand_in(drop_in: Callable, torch_function: Callable) -> Callable:
    """A distinct function object per patch, so undoing finds exactly what the patch bound.
    It is pickled by reference as torch's name, which holds it while patched (as fusedclip's
    drop-in's name it was another object, which pickle refuses); unpickled, it is whatever that
    name holds then."""

    @functools.wraps(drop_in)
    def stand_in(*args, **kwargs):
        return drop_in(*args, **kwargs)

    stand_in.__module__ = torch_function.__module__
    stand_in.__qualname__ = torch_function.__qualname__
    stand_in.__fusedclip_patch__ = True
    return stand_in


def _modules() -> list[types.ModuleType]:
    """Every imported module but fusedclip's own (torch.nn.utils and its clip_grad among them)."""
    return [
        module
        for name, module in list(sys.modules.items())
        if isinstance(module, types.ModuleType)
        and name != "fusedclip"
        and not name.startswith("fusedclip.")
    ]


def _rebind(replacements: dict[int, Callable]) -> None:
    """In every module's globals, replace each value whose id is a key (and that is the very
    object the key was taken from) by its replacement."""
    for module in _modules():
        # vars(), not getattr: a lazy module's __getattr__ would import things.
        namespace = vars(module)
        for name, value in list(namespace.items()):
            replacement = replacements.get(id(value))
            if replacement is not None:
                namespace[name] = replacement


def _apply() -> None:
    for name, drop_in in REPLACED_FUNCTIONS.items():
        torch_function = getattr(torch.nn.utils, name)
        if getattr(torch_function, "__fusedclip_patch__", False):
            raise RuntimeError(
                f"torch.nn.utils.{name} is already a fusedclip stand-in from an earlier patch "
                "that was not undone through fusedclip; call fusedclip.unpatch() first"
            )
        _stand_ins[id(torch_function)] = (torch_function, _make_stand_in(drop_in, torch_function))
    _rebind({key: stand_in for key, (_, stand_in) in _stand_ins.items()})


def _restore() -> None:
    _rebind({id(stand_in): torch_function for torch_function, stand_in in _stand_ins.values()})
    _stand_ins.clear()


def is_patched() -> bool:
    """Whether torch.nn.utils' clipping functions are fusedclip's now."""
    return bool(_stand_ins)


class Patch:
    """What `patch()` returns: `undo()` (or leaving a `with` block) removes this patch. Used as
    a decorator it removes itself and patches each call of the decorated function instead."""

    def __init__(self) -> None:
        self._undone = False

    def undo(self) -> None:
        """Remove this patch; torch's functions come back once no other patch is open. A second
        call does nothing."""
        with _lock:
            if self._undone:
                return
            self._undone = True
            _open_handles.remove(self)
            if not _open_handles:
                _restore()

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc_info) -> None:
        self.undo()

    def __call__(self, function: Callable) -> Callable:
        self.undo()  # first: a refused decoration must not leave this patch on
        if not callable(function):
            raise TypeError(
                f"fusedclip.patch() decorates a function, got {type(function).__name__}; "
                "write `@fusedclip.patch()` above a def, or `with fusedclip.patch(): ...`"
            )
        kind, certain = _deferred_body_kind(function)
        name = getattr(function, "__qualname__", None) or repr(function)
        if kind is not None and certain:
            raise TypeError(
                f"fusedclip.patch() cannot decorate {name}, {kind} function: "
                "its body runs after the call returns, unpatched; write `with "
                "fusedclip.patch():` inside it instead"
            )
        if kind is not None:
            warnings.warn(
                f"fusedclip.patch() decorates {name}, {kind} function: where "
                "the wrapper returns that body unrun, it runs after the call returns, "
                "unpatched; write `with fusedclip.patch():` inside it instead",
                RuntimeWarning,
                stacklevel=2,
            )

        @functools.wraps(function)
        def patched_while_running(*args, **kwargs):
            with patch():
                return function(*args, **kwargs)

        return patched_while_running


_DEFERRED_BODIES = (
    (inspect.isgeneratorfunction, "a generator"),
    (inspect.iscoroutinefunction, "a coroutine"),
    (inspect.isasyncgenfunction, "an async generator"),
)


async def _async_generator():
    yield


# The code of the functions contextlib's decorators return: calling one returns a context
# manager, and the body it wraps runs when the caller enters it, after the call.
_CONTEXT_MANAGER_CODE = {
    contextlib.contextmanager(lambda: (yield)).__code__,
    contextlib.asynccontextmanager(_async_generator).__code__,
}


def _what_a_call_runs(function: Callable) -> Callable:
    """`function` itself, or for an instance of a class with `__call__` (not a function, a
    partial or a class), that method."""
    if inspect.isroutine(function) or inspect.isclass(function):
        return function
    if isinstance(function, functools.partial):
        return function
    return type(function).__call__


def _deferred_body_kind(function: Callable) -> tuple[str | None, bool]:
    """(what kind of function `function` is, "a generator", where calling it returns before its
    body runs, or None for a plain one; whether that is certain). A function that wraps one (its
    `__wrapped__`, as functools.wraps leaves it) may run the body in the call (list(f()),
    asyncio.run(f())) or return it unrun: certain only for contextlib's context managers."""
    wrappers: list[Callable] = []
    seen: set[int] = set()
    while callable(function) and id(function) not in seen:
        seen.add(id(function))
        for is_kind, kind in _DEFERRED_BODIES:
            if is_kind(_what_a_call_runs(function)):
                if not wrappers:
                    return kind, True
                certain = getattr(wrappers[0], "__code__", None) in _CONTEXT_MANAGER_CODE
                return f"a function wrapping {kind}", certain
        wrappers.append(function)
        function = getattr(function, "__wrapped__", None)
    return None, False


_open_handles: list[Patch] = []


def patch() -> Patch:
    """Make torch.nn.utils' four clipping functions, and every module global already bound to
    them, fusedclip's drop-ins. Returns a handle: `handle.undo()`, or use it as a context manager
    (`with fusedclip.patch(): trainer.fit(...)`) or a decorator (`@fusedclip.patch()`)."""
    with _lock:
        if not _open_handles:
            _apply()
        handle = Patch()
        _open_handles.append(handle)
        return handle


def unpatch() -> None:
    """Undo every open patch at once and restore torch's functions everywhere they were bound."""
    with _lock:
        for handle in _open_handles:
            handle._undone = True
        _open_handles.clear()
        if _stand_ins:
            _restore()
