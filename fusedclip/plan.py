"""Planning: from the caller's tensors to what each device's backend runs, with every refusal decided
here, before any kernel reads or writes a byte.

One entry point, `prepare`. It checks each tensor (type, dtype, layout, inference mode, a
parameter passed where its gradient belongs), applies the aliasing rule, replaces DTensors by
their local shards, groups the tensors by device and picks each device's backend.

The aliasing rule: tensors that are the same memory (one dtype over the same elements in any
view of them: g and g.view(-1), s and s.t() or s.unsqueeze(0), whichever storage objects hold
them; coalesced sparse tensors over the same indices and values) count and are scaled once; a
call that writes refuses tensors that overlap partially (a coalesced sparse tensor by its
values), each other or themselves (an `expand`), with a ValueError naming them. Empty tensors
hold no memory: never a repeat, never refused. An uncoalesced sparse tensor is written through a
coalesced copy, so it aliases nothing: only the same object repeats. A call that only reads
measures every tensor as given (an expanded tensor counts each of its elements, as torch does).
Traced (torch.compile, make_fx, torch.export: `is_tracing`), repeats of one tensor object are
dropped and `checked_when_run` checks the rest when the traced code runs, refusing the same
memory listed as two tensors.

The common case (plain contiguous tensors on one device, none aliasing another) is planned by the
C++ extension in one pass (`fusedclip._C.plan_dense`) when it is built, which hands the extension's
ops the checked tensors in a C++ vector (`fusedclip._C.DenseGradients`); everything else, and
everything traced, by the general path below. Both give the same plans and errors.
A clip or a write on the extension's own ops can have its common case planned and run in one C++
call (`prepare_and_clip`, `prepare_and_scale`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from fusedclip import dispatch, distributed
from fusedclip.layout import is_dense
from fusedclip.norms import SUPPORTED_DTYPES

_SUPPORTED_DTYPES = frozenset(SUPPORTED_DTYPES)
# GradScaler.unscale_'s words for float16 gradients (prepare's refuse_float16, and amp).
FLOAT16_UNSCALE_ERROR = "Attempting to unscale FP16 gradients."


class DeviceGroup(NamedTuple):
    device: torch.device
    backend: dispatch.Backend
    # Handed to the kernels as they are: a list, or from the C++ planner a DenseGradients (a
    # sequence of the tensors) where the backend takes one.
    dense: Sequence[torch.Tensor]
    strided: list[torch.Tensor]  # gaps (or, when only read, overlaps): through a contiguous copy
    sparse: list[torch.Tensor]  # COO: through their coalesced values
    order: Sequence[int]  # positions in the planned list, dense then strided then sparse


class Plan(NamedTuple):
    groups: list[DeviceGroup]
    out_dtype: torch.dtype
    count: int
    # Ranks holding the same elements as each tensor (replicated DTensor shards); None: all 1.
    copies: list[int] | None = None
    # For each tensor as the caller listed it, its position in the planned list, where the
    # aliasing rule dropped repeats (per-tensor norms are given per listed tensor); None: none.
    listed: list[int] | None = None
    # How messages name each planned tensor (for the check when traced code runs).
    names: TensorNames | None = None

    @property
    def device(self) -> torch.device:
        return self.groups[0].device


def prepare(
    tensors: list,
    name: str | TensorNames,
    backend: str | None,
    process_group=None,
    *,
    writes: bool,
    measured: bool = True,
    of_parameters: bool = False,
    gradients_only: bool = False,
    refuse_float16: bool = False,
    refuse_repeats: str | None = None,
):
    """(plan or None when there is nothing to do, process group).

    `tensors` are the gradients, or with `of_parameters` the parameters whose `.grad` to take
    (None skipped). `name` is how messages call them (or, for gradients a caller gathered from
    parameters itself, their TensorNames); `writes`: the call modifies the gradients;
    `measured=False`: no norm is taken (no count of the ranks holding a shard);
    `gradients_only`: refuse parameters (leaves that require grad) among the gradients;
    `refuse_float16`: refuse float16 gradients, as GradScaler.unscale_ does;
    `refuse_repeats`: refuse the same memory listed twice instead of counting it once, saying
    this (why it cannot count once, and the fix) after naming the two.
    """
    plan = _dense_plan(tensors, backend, writes, of_parameters, gradients_only, refuse_float16)
    if plan is not None:
        return plan, process_group
    dispatch.requested_backend(backend)  # an empty list must reject a bad backend too
    if of_parameters:
        tensors, positions = gradients_of(tensors, name)
        names = TensorNames(name, positions, ".grad")
    else:
        names = name if isinstance(name, TensorNames) else TensorNames(name)
    _check_tensors(tensors, names, writes, gradients_only, refuse_float16)
    if not tensors:
        return None, process_group
    copies = None
    if distributed.has_dtensor(tensors):
        if measured:
            tensors, copies, process_group = distributed.localize(tensors, process_group, names.of)
        else:
            tensors = distributed.local_shards(tensors, names.of)
    tensors, copies, listed, kept_indices = _drop_repeats(
        tensors, copies, names, writes, refuse_repeats
    )
    planned_names = names if kept_indices is None else names.of_kept(kept_indices)
    return _group(tensors, backend, copies)._replace(
        listed=listed, names=planned_names
    ), process_group


def backend_on(device: torch.device, backend: str | None) -> dispatch.Backend:
    """The backend a call with no gradients of its own uses on `device` (a rank of a sharded
    call that still finalizes the others' norm)."""
    return dispatch.select(device, backend)


class TensorNames:
    """How messages name the tensor at position i of a list being planned: `name[i]`, or for the
    gradients of the parameters named `name`, `name[j].grad` of the parameter j it came from
    (parameters without a gradient are skipped, so j is not i)."""

    __slots__ = ("name", "positions", "suffix")

    def __init__(self, name: str, positions: list[int] | None = None, suffix: str = ""):
        self.name, self.positions, self.suffix = name, positions, suffix

    def _position(self, index: int) -> int:
        return index if self.positions is None else self.positions[index]

    def of(self, index: int) -> str:
        return f"{self.name}[{self._position(index)}]{self.suffix}"

    def of_kept(self, kept_indices: list[int]) -> TensorNames:
        """The names of the tensors _drop_repeats kept, each named as first listed
        (`kept_indices`: the index of each in the list named here)."""
        return TensorNames(self.name, [self._position(i) for i in kept_indices], self.suffix)

    def all_positions(self, count: int) -> list[int]:
        return list(range(count)) if self.positions is None else self.positions


_NO_GRAD_ATTRIBUTE = object()


def gradients_of(parameters: list, name: str) -> tuple[list, list[int]]:
    """The `.grad` of each parameter that has one, and that parameter's position; like torch,
    anything with a `.grad` will do."""
    gradients, positions = [], []
    for index, parameter in enumerate(parameters):
        grad = getattr(parameter, "grad", _NO_GRAD_ATTRIBUTE)
        if grad is _NO_GRAD_ATTRIBUTE:
            raise TypeError(
                f"{name}[{index}] is a {type(parameter).__name__} without a .grad: pass the "
                "parameters (tensors) whose gradients to clip"
            )
        if grad is not None:
            gradients.append(grad)
            positions.append(index)
    return gradients, positions


def _dense_plan(
    tensors: list,
    backend: str | None,
    writes: bool,
    of_parameters: bool,
    gradients_only: bool,
    refuse_float16: bool,
):
    """The common case's plan from the C++ planner, or None to take the general path."""
    if not tensors or _C_PLAN_DENSE is None or is_tracing():
        return None
    found = _C_PLAN_DENSE(
        tensors, of_parameters, _refuses_inference(writes, False), gradients_only, refuse_float16
    )
    if found is None:
        return None
    tensors, device, any_float64 = found
    backend_ = dispatch.select(device, backend)
    if not backend_.takes_dense_gradients:
        tensors = list(tensors)
    group = DeviceGroup(device, backend_, tensors, [], [], range(len(tensors)))
    return Plan([group], torch.float64 if any_float64 else torch.float32, len(tensors))


def prepare_and_clip(
    tensors: list,
    backend: str | None,
    *,
    norm_type: float,
    max_norm: float | None,
    inv_scale: float | torch.Tensor | None,
    clip_value: float | None,
    of_parameters: bool = False,
    gradients_only: bool = False,
    refuse_float16: bool = False,
):
    """For the common case on a device whose backend is the extension's own ops: `prepare`, then
    that backend's `clip_` (no per-tensor norms), in one C++ call. Between the two, Python would
    build the plan and pick the backend: a few µs of every eager call, more once a training step
    has pushed that code out of the caches. Arguments as `prepare` and `clip_`, checked already.

    Returns clip_'s (total_norm, found_inf, clip_coef, per_tensor_norms), or None, having
    changed nothing, for anything else: then `prepare` and the backend run as usual."""
    on_cpu, on_cuda = _one_call_devices(tensors, _C_CLIP_DENSE, backend)
    if not (on_cpu or on_cuda):
        return None
    return _C_CLIP_DENSE(
        tensors,
        of_parameters,
        _refuses_inference(True, False),
        gradients_only,
        refuse_float16,
        on_cpu,
        on_cuda,
        norm_type,
        max_norm,
        inv_scale,
        clip_value,
    )


def prepare_and_scale(
    tensors: list,
    backend: str | None,
    *,
    clip_coef: float | torch.Tensor | None,
    clip_value: float | None,
    of_parameters: bool = False,
    gradients_only: bool = False,
) -> bool:
    """As `prepare_and_clip`, for the write alone: `prepare` (writes, nothing measured), then the
    backend's `scale_` with `clip_coef` (None for 1) as a float64 tensor on the device. True when
    done; False, having changed nothing, where `prepare` and the backend must run."""
    on_cpu, on_cuda = _one_call_devices(tensors, _C_SCALE_DENSE, backend)
    if not (on_cpu or on_cuda):
        return False
    done = _C_SCALE_DENSE(
        tensors,
        of_parameters,
        _refuses_inference(True, False),
        gradients_only,
        on_cpu,
        on_cuda,
        clip_coef,
        clip_value,
    )
    return done is not None


def _one_call_devices(tensors: list, function, backend: str | None) -> tuple[bool, bool]:
    """dispatch.extension_device_types for a one-call path; (False, False) where it cannot run."""
    if not tensors or function is None or is_tracing():
        return False, False
    return dispatch.extension_device_types(backend)


def _load_extension_function(name: str):
    from fusedclip import ops

    if ops.EXTENSION_ERROR is not None:
        return None
    from fusedclip import _C

    return getattr(_C, name, None)


_C_PLAN_DENSE = _load_extension_function("plan_dense")
# Read once: the dispatcher query is not traceable by torch.compile.
_HAS_DENSE_CHECK = _C_PLAN_DENSE is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "fusedclip::check_dense_aliasing", "CompositeExplicitAutograd"
)
_C_CLIP_DENSE = _load_extension_function("clip_dense_")
_C_SCALE_DENSE = _load_extension_function("scale_dense_")


def _refuses_inference(writes: bool, compiling: bool) -> bool:
    """Whether inference tensors must be refused: torch lets them be modified only inside
    inference mode. (Neither the mode nor is_inference() is traceable by torch.compile: there
    the check runs when the compiled code does, in checked_when_run's op.)
    `compiling`: torch.compiler.is_compiling(), which the caller knows already."""
    if not writes or compiling:
        return False
    return not torch.is_inference_mode_enabled()


def _wraps_other_tensors(tensor: torch.Tensor) -> bool:
    """A wrapper subclass (TwoTensor, torchao's), but a DTensor, whose local tensor is read."""
    return is_traceable_wrapper_subclass(tensor) and not distributed.has_dtensor((tensor,))


def _check_tensors(
    tensors: list, names: TensorNames, writes: bool, gradients_only: bool, refuse_float16: bool
) -> None:
    compiling = torch.compiler.is_compiling()
    refuse_inference = _refuses_inference(writes, compiling)
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor):
            if tensor is None:
                raise TypeError(
                    f"{names.of(index)} is None: a parameter without a gradient? Pass only the "
                    "gradients that exist ([p.grad for p in params if p.grad is not None]), or "
                    "use clip_grad_norm_(params, ...), which skips them"
                )
            raise TypeError(f"{names.of(index)} is a {type(tensor).__name__}, not a tensor")
        # Eagerly only: dynamo traces neither check (the tensors it traces are fake ones).
        if not compiling and torch._C._functorch.is_functorch_wrapped_tensor(tensor):
            raise TypeError(
                f"{names.of(index)} is a tensor inside a torch.func transform (grad, vmap, "
                "functionalize), which holds no memory that fusedclip's kernels could read: "
                "call fusedclip outside the transform, or torch.nn.utils' clipping inside it"
            )
        if not compiling and _wraps_other_tensors(tensor):
            raise TypeError(
                f"{names.of(index)} is a {type(tensor).__name__}, a tensor subclass that wraps "
                "others (__torch_dispatch__) and holds no memory of its own that fusedclip's "
                "kernels could read: pass its inner tensors, or use torch.nn.utils' clipping, "
                "which dispatches through the subclass"
            )
        if not compiling and tensor._is_zerotensor():
            raise TypeError(
                f"{names.of(index)} is a ZeroTensor (torch._efficientzerotensor), which holds no "
                "memory: pass torch.zeros_like(it), or leave it out (its norm is 0)"
            )
        if tensor.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(
                f"{names.of(index)} has dtype {tensor.dtype}; gradients must be float32, float16, "
                "bfloat16 or float64 (clipping integer or complex gradients is not defined)"
            )
        if tensor.is_nested:  # strided nested ones too: no kernel takes them
            raise TypeError(
                f"{names.of(index)} is a nested tensor; pass its components instead "
                "(list(t.unbind()), views of its memory)"
            )
        if tensor.layout not in (torch.strided, torch.sparse_coo):
            raise TypeError(
                f"{names.of(index)} has layout {tensor.layout}; use strided or sparse_coo"
            )
        if gradients_only and tensor.requires_grad and tensor.is_leaf:
            raise TypeError(
                f"{names.of(index)} is a parameter (a leaf tensor that requires grad), not a "
                "gradient: pass the gradients ([p.grad for p in model.parameters() if p.grad "
                "is not None]) or use clip_grad_norm_(model.parameters(), ...)"
            )
        if refuse_float16 and tensor.dtype == torch.float16:
            raise ValueError(FLOAT16_UNSCALE_ERROR)
        if refuse_inference and tensor.is_inference():
            raise ValueError(f"{names.of(index)} {_INFERENCE_TENSOR}")


# What refusing an inference tensor says after naming it (checked_when_run passes it to C++).
_INFERENCE_TENSOR = (
    "is an inference tensor, which torch allows to be modified only inside "
    "torch.inference_mode(): call there, or pass a clone made outside it"
)


def _is_memoryless(tensor: torch.Tensor) -> bool:
    """Tensors without memory (empty ones, on the meta device, fake ones) may all sit at
    address 0."""
    return tensor.numel() == 0 or tensor.device.type == "meta" or isinstance(tensor, FakeTensor)


class _Memory(NamedTuple):
    space: object  # equal for tensors whose memory may intersect
    base: int  # the address of the storage's first byte (0 for a tensor without memory)


def _memories(tensors: list[torch.Tensor]) -> list[_Memory]:
    """Where each tensor's memory lies. Real memory is compared by address: storages whose bytes
    intersect form one space, since two storage objects may wrap one buffer (torch.from_dlpack,
    torch.from_numpy, torch.frombuffer). A tensor without memory has its storage object for a
    space."""
    memories: list[_Memory | None] = [None] * len(tensors)
    ranges = []  # (device, first byte, byte count, index) of each storage with memory
    for index, tensor in enumerate(tensors):
        storage = tensor.untyped_storage()
        if _is_memoryless(tensor):
            memories[index] = _Memory(("object", storage._cdata), 0)
        else:
            device = (
                tensor.device.type,
                -1 if tensor.device.index is None else tensor.device.index,
            )
            ranges.append((device, storage.data_ptr(), storage.nbytes(), index))
    ranges.sort(key=lambda entry: entry[:2])
    space, space_end = None, 0
    for device, first, count, index in ranges:
        if space is None or device != space[0] or first >= space_end:
            space, space_end = (device, first), first + count
        else:
            space_end = max(space_end, first + count)
        memories[index] = _Memory(space, first)
    return memories


def _memory_key(tensor: torch.Tensor, memory: _Memory) -> tuple:
    """Equal for nonempty tensors that are the same memory: one dtype over the same elements in
    any view of them (g and g.view(-1), s and s.t() or s.unsqueeze(0)), whichever storage
    objects hold them."""
    address = memory.base + tensor.storage_offset() * tensor.element_size()
    return (memory.space, address, _element_layout(tensor), tensor.dtype)


def _element_layout(tensor: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """(size, stride) of each dimension that steps, from the smallest stride, with a dimension
    merged into the one before where it steps over it whole: the same for every view of the same
    elements that differ in dimension order, size-1 dimensions or how the steps are split
    (((numel, 1),) for any dense tensor)."""
    if is_dense(tensor):
        return ((tensor.numel(), 1),)
    merged: list[tuple[int, int]] = []
    for stride, size in sorted(
        (s, n) for n, s in zip(tensor.shape, tensor.stride(), strict=True) if n != 1
    ):
        if merged and stride == merged[-1][0] * merged[-1][1]:
            merged[-1] = (merged[-1][0] * size, merged[-1][1])
        else:
            merged.append((size, stride))
    return tuple(merged)


def _holds_nothing(tensor: torch.Tensor) -> bool:
    return (tensor._nnz() if tensor.is_sparse else tensor.numel()) == 0


def _has_symbolic_layout(tensor: torch.Tensor) -> bool:
    memory = tensor._values() if tensor.is_sparse else tensor
    layout = (memory.storage_offset(), *tensor.shape, *memory.stride())
    return any(isinstance(value, torch.SymInt) for value in layout)


def _byte_span(tensor: torch.Tensor, base: int) -> tuple[int, int]:
    """[first, last) addresses of the bytes that the tensor's elements touch (`base`: its
    storage's)."""
    size = tensor.element_size()
    first = base + tensor.storage_offset() * size
    if tensor.numel() == 0:
        return first, first
    last_element = sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride(), strict=True))
    return first, first + (last_element + 1) * size


def _element_offsets(tensor: torch.Tensor, base: int = 0) -> torch.Tensor:
    """Address (in bytes, from its storage's `base`) of every element, flat, without repeats; for
    the rare exact overlap test.
    Computed from the tensor's layout on real CPU tensors, also inside a FakeTensorMode or under
    torch.device("meta") (whose tensors cannot hold data-dependent shapes such as unique's)."""
    with unset_fake_temporarily():
        offsets = torch.zeros((), dtype=torch.int64, device="cpu")
        for dim, (n, s) in enumerate(zip(tensor.shape, tensor.stride(), strict=True)):
            shape = [1] * tensor.dim()
            shape[dim] = n
            offsets = offsets + torch.arange(n, dtype=torch.int64, device="cpu").view(shape) * s
        start = tensor.storage_offset()
        return ((offsets.reshape(-1) + start) * tensor.element_size() + base).unique()


def _overlaps_itself(tensor: torch.Tensor) -> bool:
    """Exact; a view whose every step clears all the smaller steps' reach (any slice with a
    step, as w[:, ::2]) is decided from its layout, without laying out its elements."""
    if tensor.is_sparse or tensor.numel() <= 1 or is_dense(tensor):
        return False
    reach = 0  # the largest element offset the smaller steps make, from the first element
    for size, stride in _element_layout(tensor):
        if stride == 0:
            return True
        if stride <= reach:
            return _element_offsets(tensor).numel() < tensor.numel()
        reach += (size - 1) * stride
    return False


def _first_overlap(
    spans: list[tuple[int, int, int]], written: list, memories: list
) -> tuple | None:
    """The positions of two tensors of one space that share a byte, or None. `spans`: their
    (first byte, last byte, position), reordered here; `written` and `memories` by position.
    Sorted, the spans fall into runs, each span intersecting one before it in its run."""
    spans.sort()
    run: list[tuple[int, int, int]] = []
    reach = 0  # the farthest last byte of the run
    for span in spans:
        if run and span[0] >= reach:
            pair = _overlap_in_run(run, written, memories)
            if pair is not None:
                return pair
            run = []
        reach = span[1] if not run else max(reach, span[1])
        run.append(span)
    return _overlap_in_run(run, written, memories)


def _overlap_in_run(run: list[tuple[int, int, int]], written: list, memories: list) -> tuple | None:
    """A dense tensor fills its span, so in a run of dense tensors the first two overlap; a run
    with a strided one (interleaved column views of one matrix are one run that shares nothing)
    by the residues of its steps where they tell, else element by element, in one sort."""
    if len(run) < 2:
        return None
    if all(is_dense(written[index]) for _, _, index in run):
        pair = (run[0][2], run[1][2])
    elif _apart_by_residue(run, written):
        return None
    else:
        pair = _shared_bytes(run, written, memories)
    return None if pair is None else (min(pair), max(pair))


def _apart_by_residue(run: list[tuple[int, int, int]], written: list) -> bool:
    """Whether the run's tensors share no byte, shown without laying out their elements (False:
    not shown). Modulo a step M, in bytes, a tensor's steps that are multiples of M leave its
    bytes where they are and its other steps reach R bytes from its first one, so its bytes lie
    in the circular interval [first mod M, first mod M + R): tensors whose intervals are
    disjoint share nothing. Two moduli are tried: the gcd of every step (a matrix's columns, a
    buffer's even and odd elements) and that of each strided tensor's largest step (a matrix's
    column blocks, as split(n, dim=1) makes them, beside dense pieces of its rows)."""
    layouts = []  # (first byte, element size, (size, step in bytes) of each dimension)
    largest_steps = 0
    for first, _, index in run:
        tensor = written[index]
        size = tensor.element_size()
        layout = [(n, s * size) for n, s in _element_layout(tensor)]
        layouts.append((first, size, layout))
        if not is_dense(tensor):
            largest_steps = math.gcd(largest_steps, max(step for _, step in layout))
    every_step = math.gcd(*(step for _, _, layout in layouts for _, step in layout))
    return any(
        modulus > 0 and _disjoint_modulo(layouts, modulus)
        for modulus in dict.fromkeys((every_step, largest_steps))
    )


def _disjoint_modulo(layouts: list, modulus: int) -> bool:
    """_apart_by_residue's test for one modulus: each tensor's circular interval, cut in two
    where it wraps, and no two of them intersecting."""
    pieces = []
    for first, size, layout in layouts:
        reach = size + sum((n - 1) * step for n, step in layout if step % modulus)
        if reach > modulus:
            return False
        start = first % modulus
        pieces.append((start, min(start + reach, modulus)))
        if start + reach > modulus:
            pieces.append((0, start + reach - modulus))
    pieces.sort()
    return all(end <= start for (_, end), (start, _) in zip(pieces, pieces[1:], strict=False))


def _shared_bytes(run: list[tuple[int, int, int]], written: list, memories: list) -> tuple | None:
    """_first_overlap's exact test of one run: every element a [first, last) byte interval (a
    dense tensor one interval in all); sorted by first byte, an interval that begins before the
    farthest end so far shares bytes with the interval that reaches there."""
    with unset_fake_temporarily():
        firsts, lasts, owners = [], [], []
        for first, last, index in run:
            tensor = written[index]
            if is_dense(tensor):
                starts = torch.tensor([first], dtype=torch.int64)
                ends = torch.tensor([last], dtype=torch.int64)
            else:
                starts = _element_offsets(tensor, memories[index].base)
                ends = starts + tensor.element_size()
            firsts.append(starts)
            lasts.append(ends)
            owners.append(torch.full_like(starts, index))
        order = torch.cat(firsts).argsort(stable=True)
        firsts_sorted = torch.cat(firsts)[order]
        reach, reached_by = torch.cummax(torch.cat(lasts)[order], 0)
        clashes = (firsts_sorted[1:] < reach[:-1]).nonzero()
        if clashes.numel() == 0:
            return None
        k = int(clashes[0]) + 1
        owners_sorted = torch.cat(owners)[order]
        return int(owners_sorted[k]), int(owners_sorted[reached_by[k - 1]])


def _drop_repeats(
    tensors: list,
    copies: list[int] | None,
    names: TensorNames,
    writes: bool,
    refuse_repeats: str | None,
):
    """The aliasing rule (module docstring), or with `refuse_repeats` (why, and the fix) a
    ValueError for a repeat. Tensors are the local ones (no DTensor here). Empty tensors hold no
    memory to share: they are kept as listed, never refused. Returns (the kept tensors, their
    copies, and where repeats were dropped: each listed tensor's position among the kept, and
    each kept one's index as listed; both None where none was).

    Traced (is_tracing), storages are not traceable: repeats are dropped by identity, which
    dynamo evaluates at trace time without an id() guard, and checked_when_run checks the rest
    when the traced code runs. So are the tensors of a list with a symbolic layout (fake ones
    with SymInt offsets or sizes, which are no numbers to compare)."""
    by_identity = is_tracing() or any(
        isinstance(tensor, FakeTensor) and _has_symbolic_layout(tensor) for tensor in tensors
    )
    kept, kept_copies, kept_indices = [], [], []
    listed: list[int] = []  # for each index in `tensors`, the position in `kept` it counts as
    seen: dict[tuple, int] = {}  # memory key -> index in `tensors` of its first listing
    # space -> (first byte, last byte, index in `tensors`) of each nonempty kept tensor
    spans: dict[object, list[tuple[int, int, int]]] = {}
    if not by_identity:
        # A coalesced sparse tensor is written through its values, and is the same gradient as
        # another over the same indices and values.
        written = [tensor._values() if tensor.is_sparse else tensor for tensor in tensors]
        sparse = [index for index, tensor in enumerate(tensors) if tensor.is_sparse]
        memories = _memories(written + [tensors[index]._indices() for index in sparse])
        index_memories = dict(zip(sparse, memories[len(tensors) :], strict=True))
    for index, tensor in enumerate(tensors):
        # An uncoalesced sparse tensor is written through a coalesced copy that then replaces
        # its indices and values: it shares no written memory, and repeats only as one object.
        if by_identity or (tensor.is_sparse and not tensor.is_coalesced()):
            first_listed = next(
                (i for other, i in zip(kept, kept_indices, strict=True) if tensor is other), None
            )
            if first_listed is not None and not _holds_nothing(tensor):
                if refuse_repeats is not None:
                    raise _repeat_error(names, first_listed, index, refuse_repeats)
                listed.append(listed[first_listed])
                continue
        elif not _holds_nothing(tensor):
            memory, (space, base) = written[index], memories[index]
            key = _memory_key(memory, memories[index])
            if tensor.is_sparse:
                indices_key = _memory_key(tensor._indices(), index_memories[index])
                key = ("sparse", indices_key, key, tuple(tensor.shape))
            if key in seen:
                if refuse_repeats is not None:
                    raise _repeat_error(names, seen[key], index, refuse_repeats)
                if copies is not None and copies[index] != copies[seen[key]]:
                    raise _repeat_error(names, seen[key], index, _COUNTED_DIFFERENTLY)
                listed.append(listed[seen[key]])
                continue
            if writes and _overlaps_itself(memory):
                raise ValueError(
                    f"{names.of(index)} overlaps itself in memory (an expanded or strided view whose "
                    f"elements share storage, shape {tuple(memory.shape)}, strides "
                    f"{tuple(memory.stride())}): it cannot be scaled in place; pass a "
                    "contiguous copy (tensor.contiguous()) and copy the result back yourself"
                )
            if writes:
                spans.setdefault(space, []).append((*_byte_span(memory, base), index))
            seen[key] = index
        listed.append(len(kept))
        kept.append(tensor)
        kept_copies.append(1 if copies is None else copies[index])
        kept_indices.append(index)
    for space_spans in spans.values():
        pair = _first_overlap(space_spans, written, memories)
        if pair is not None:
            raise ValueError(f"{names.of(pair[0])} and {names.of(pair[1])} {_OVERLAP}")
    dropped = len(kept) != len(tensors)
    return (
        kept,
        (None if copies is None else kept_copies),
        (listed if dropped else None),
        (kept_indices if dropped else None),
    )


def _repeat_error(names: TensorNames, first: int, index: int, why_and_fix: str) -> ValueError:
    return ValueError(f"{names.of(first)} and {names.of(index)} {_SAME_MEMORY}{why_and_fix}")


# What the refusals say after naming the two tensors (csrc/check_aliasing.cpp says it too).
_SAME_MEMORY = "are the same memory, "
_COUNTED_DIFFERENTLY = (
    "one held by more ranks than the other (a DTensor and its local tensor, or two DTensors "
    "placed differently), so it has no one count in the global norm; list it once"
)
_OVERLAP = (
    "overlap in memory without being the same view: scaling both in place would scale the "
    "shared elements twice; pass each gradient once (the same tensor listed twice is fine)"
)


# The refuse_repeats of a caller that writes each listed tensor itself.
REPEATS_WRITTEN_BY_CALLER = (
    "which a caller that writes each listed tensor itself (a fused optimizer's step) would "
    "scale twice: give each parameter its own gradient tensor, or use a non-fused optimizer"
)
_REPEATS_UNDER_COMPILE = (
    "listed as two tensors, which a traced call (torch.compile, make_fx, torch.export) cannot "
    "count once (the traced code does not know where its tensors' memory lies): list that "
    "gradient once, or the same tensor object twice"
)


def is_tracing() -> bool:
    """Whether this call is being traced into a graph that runs later: by torch.compile, or by
    make_fx (a proxy mode on the dispatch stack), where the tensors' memory is not the memory
    the graph will run on. Dynamo folds the first test to True and never traces the second."""
    return _is_compiling() or (
        _dispatch_stack_depth() > 0 and _get_dispatch_mode(_PROXY_MODE) is not None
    )


# Bound once: each eager call asks several times, and the lookups were half of its cost.
_is_compiling = torch.compiler.is_compiling
_dispatch_stack_depth = torch._C._len_torch_dispatch_stack
_get_dispatch_mode = torch._C._get_dispatch_mode
_PROXY_MODE = torch._C._TorchDispatchModeKey.PROXY


def checked_when_run(the_plan: Plan, value: torch.Tensor, writes: bool):
    """Traced (is_tracing), `value` as returned by an op that applies the aliasing rule to the
    planned tensors when the compiled code runs. Tracing sees tensors, not their memory: it drops
    repeats of one tensor object, but two tensors may still share memory at run time. The
    kernels that follow compute from what this returns, so the check runs before anything is
    written and the graph cannot leave it out. A repeat raises there: the compiled call cannot
    count it once. Eagerly, `value` itself (prepare applied the rule)."""
    if not is_tracing():
        return value
    tensors: list = [None] * the_plan.count  # in planned order, for the messages' positions
    for group in the_plan.groups:
        for tensor, index in zip(
            (*group.dense, *group.strided, *group.sparse), group.order, strict=True
        ):
            tensors[index] = tensor
    names = the_plan.names
    # The messages' names, as TensorNames gives them: name[positions[i]]suffix.
    naming = (names.name, names.all_positions(len(tensors)), names.suffix)
    all_dense = all(not group.strided and not group.sparse for group in the_plan.groups)
    if all_dense and _HAS_DENSE_CHECK:  # the C++ rule: no Python call when the code runs
        return torch.ops.fusedclip.check_dense_aliasing(
            tensors,
            value,
            *naming,
            writes,
            _SAME_MEMORY + _REPEATS_UNDER_COMPILE,
            _OVERLAP,
            _INFERENCE_TENSOR,
        )
    return torch.ops.fusedclip.check_aliasing(tensors, value, *naming, writes)


def _check_aliasing(
    tensors: list[torch.Tensor],
    value: torch.Tensor,
    name: str,
    positions: list[int],
    suffix: str,
    writes: bool,
) -> torch.Tensor:
    # Lists of dense tensors take check_dense_aliasing wherever the extension is built: here come
    # the others, or every list without the extension.
    names = TensorNames(name, positions, suffix)
    if _refuses_inference(writes, False):
        for index, tensor in enumerate(tensors):
            if tensor.is_inference():
                raise ValueError(f"{names.of(index)} {_INFERENCE_TENSOR}")
    _drop_repeats(tensors, None, names, writes, _REPEATS_UNDER_COMPILE)
    return value.clone()


def _check_aliasing_fake(tensors, value, name, positions, suffix, writes):
    return torch.empty_like(value)


# A plain library op, not torch.library.custom_op: that wrapper costs about twice as much per
# call (its checks walk every tensor of the list), on every step of a compiled training loop.
_LIBRARY = torch.library.Library("fusedclip", "FRAGMENT")
_LIBRARY.define(
    "check_aliasing(Tensor[] tensors, Tensor value, str name, int[] positions, str suffix, "
    "bool writes) -> Tensor"
)
_LIBRARY.impl("check_aliasing", _check_aliasing, "CompositeExplicitAutograd")
torch.library.register_fake("fusedclip::check_aliasing", _check_aliasing_fake, lib=_LIBRARY)


# torch 2.11 and 2.12's inductor miswrites an op that mutates a list holding two views of one
# buffer (DDP's gradient_as_bucket_view): it clones one view alone, then finds the view in the
# clone at its offset in the buffer, so the kernels read and write past the clone's end. Fixed in
# torch 2.13. There, traced code writes such gradients through copies that an opaque op makes
# (inductor reinplaces a plain clone away) and copies them back (see writes_through_copies).
_INDUCTOR_MISWRITES_LISTED_VIEWS = torch.torch_version.TorchVersion(torch.__version__) < (2, 13)


def writes_through_copies(dense: list[torch.Tensor]) -> bool:
    """Whether traced code writes these dense gradients through fresh copies (the inductor bug
    above): on the torch versions that have it, where two of them are views. Whether of one
    buffer is not asked (that compares bases pairwise, or by id(), which dynamo guards on): the
    copies cost one more read and write of the gradients, only there."""
    return (
        _INDUCTOR_MISWRITES_LISTED_VIEWS
        and is_tracing()
        and sum(tensor._base is not None for tensor in dense) > 1
    )


def _fresh_copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [tensor.clone() for tensor in tensors]


def _fresh_copies_fake(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.empty_like(tensor) for tensor in tensors]


_LIBRARY.define("fresh_copies(Tensor[] tensors) -> Tensor[]")
_LIBRARY.impl("fresh_copies", _fresh_copies, "CompositeExplicitAutograd")
torch.library.register_fake("fusedclip::fresh_copies", _fresh_copies_fake, lib=_LIBRARY)


def _group(tensors: list[torch.Tensor], backend: str | None, copies: list[int] | None) -> Plan:
    """Groups the tensors by device (first-seen order) and picks each device's backend."""
    by_device: dict[torch.device, tuple[list, list, list, list, list, list]] = {}
    any_double = False
    for index, tensor in enumerate(tensors):
        lists = by_device.get(tensor.device)
        if lists is None:
            lists = by_device[tensor.device] = ([], [], [], [], [], [])
        dense, dense_order, strided, strided_order, sparse, sparse_order = lists
        if tensor.is_sparse:
            sparse.append(tensor)
            sparse_order.append(index)
        elif is_dense(tensor) and (torch.compiler.is_compiling() or not tensor.is_neg()):
            dense.append(tensor)
            dense_order.append(index)
        else:  # a negative view (_neg_view) too, eagerly (dynamo cannot trace is_neg): the
            # kernels read memory, not the view
            strided.append(tensor)
            strided_order.append(index)
        any_double = any_double or tensor.dtype == torch.float64
    groups = [
        DeviceGroup(
            device,
            dispatch.select(device, backend),
            dense,
            strided,
            sparse,
            dense_order + strided_order + sparse_order,
        )
        for device, (dense, dense_order, strided, strided_order, sparse, sparse_order) in (
            by_device.items()
        )
    ]
    if copies is not None and all(count == 1 for count in copies):
        copies = None
    return Plan(groups, torch.float64 if any_double else torch.float32, len(tensors), copies)
