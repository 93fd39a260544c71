"""The Triton backend: `fusedclip::triton_reduce`, `triton_finalize`, `triton_scale_`.

Same contracts as `reduce`, `finalize`, `scale_` (csrc/README.md, fusedclip/reference.py). Each op
is a `torch.library.triton_op` whose kernels launch through `wrap_triton`; torch.compile sees the
ops and keeps them opaque in its graphs (see the end of this file for why).

In eager mode a pass over many tensors is one launch per (dtype, 16-byte aligned) group, driven by
int64 device tables built on the host without a sync and cached per tensor list (gradients keep
their addresses from step to step). Tensors without addresses (fake tensors, when shapes are
propagated) take a per-tensor path through the same chunk code, which writes the same partials.

Every launch and table build runs with the tensors' CUDA device selected, whatever the current
device. The table cache is shared by threads (one lock) and knows CUDA-graph capture: a table
built while a stream is captured belongs to that graph, never to the eager cache.
"""

import contextlib
import itertools
import struct
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode
from torch.library import triton_op, wrap_triton

from fusedclip.layout import is_dense
from fusedclip.norms import is_inf_norm, needs_scaled_sum

from . import kernels

# Elements per program in the read and write passes. Fixed: the partials, hence the result bits,
# depend on it, never on the device. Tests may use it to size tensors that span several chunks.
CHUNK_SIZE = 16384

# Launch parameters. On an H100 these reach 96-99% of the copy-bandwidth floor on sets of 1 GB and
# more (bench/results/). BLOCK_SIZE must divide CHUNK_SIZE (a full chunk is read without a mask),
# and both BLOCK_SIZE values must be powers of two.
# Changing any of them changes the summation order, so the result bits, but not determinism.
BLOCK_SIZE = 2048  # elements per loop iteration of a read/write program
NUM_WARPS = 8  # of a read/write program
SEGMENT_BLOCK_SIZE = 1024  # partials per loop iteration when combining them
SEGMENT_NUM_WARPS = 4
if kernels.INTERPRETED:
    # The interpreter pays milliseconds per jit-function call and little per element: one loop
    # iteration per chunk. Tests can set a smaller BLOCK_SIZE to cover the loop.
    BLOCK_SIZE = CHUNK_SIZE

# Tensor lists whose device tables are kept; a training loop needs one or two.
TABLE_CACHE_SIZE = 8

assert CHUNK_SIZE % BLOCK_SIZE == 0

_TRITON_DTYPES = {
    torch.float32: triton.language.float32,
    torch.float16: triton.language.float16,
    torch.bfloat16: triton.language.bfloat16,
    torch.float64: triton.language.float64,
}


@dataclass(frozen=True)
class _DtypeGroup:
    dtype: torch.dtype
    aligned: bool  # every data_ptr of the group is a multiple of 16 bytes
    num_chunks: int
    chunk_table: torch.Tensor  # int64 [num_chunks, 3]: (tensor index, chunk of that tensor, slot)


@dataclass(frozen=True)
class _Tables:
    addresses: torch.Tensor  # int64 [n]: data_ptr of each tensor
    numels: torch.Tensor  # int64 [n]
    chunk_bases: torch.Tensor  # int64 [n + 1]: tensor t's partials are slots [bases[t], bases[t+1])
    groups: tuple[_DtypeGroup, ...]
    # Two nonempty tensors that share memory (positions in the list), which the write kernel
    # refuses: their chunks would be scaled twice, by two programs at once. The cache key holds
    # every tensor's span, so tables found again have the same answer.
    overlap: tuple[int, int] | None
    # The host buffer the device tables were copied from. A graph's copy node reads it at every
    # replay, so tables keep it while they live (for eager ones that only delays its reuse).
    host_buffer: torch.Tensor


@dataclass
class _Capture:
    """A CUDA-graph capture under way on one stream, and the tables built during it."""

    graph: "weakref.ref[torch.cuda.CUDAGraph]"
    tables: dict = field(default_factory=dict)


# Every structure below is guarded by _cache_lock: ops may be called from several threads.
_cache_lock = threading.Lock()
_table_cache: "OrderedDict[tuple, _Tables]" = OrderedDict()
# Captures under way, by (device, stream id of the capturing stream).
_captures: "dict[tuple[torch.device, int], _Capture]" = {}
# Tables built during a capture whose graph object is unknown (a capture not begun through
# torch.cuda.CUDAGraph, or a torch without capture hooks): that graph may replay them at any
# time, so they live as long as the process.
_unowned_captured_tables: list[_Tables] = []


def _num_chunks(numel: int) -> int:
    return (numel + CHUNK_SIZE - 1) // CHUNK_SIZE


def _float64_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _norm_kind(norm_type: float) -> int:
    if is_inf_norm(norm_type):
        return kernels.NORM_INF.value
    if norm_type == 2.0:
        return kernels.NORM_TWO.value
    if norm_type == 1.0:
        return kernels.NORM_ONE.value
    return kernels.NORM_GENERAL.value


def _on_device(device: torch.device):
    """Selects `device` for what runs inside: Triton launches on the current device's stream, and
    tables and intermediates must be on the tensors' device (gradients on cuda:1 while cuda:0 is
    current)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _build_tables(tensors: list[torch.Tensor], device: torch.device) -> _Tables:
    counts = torch.tensor([_num_chunks(t.numel()) for t in tensors], dtype=torch.int64)
    chunk_bases = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    members: dict[tuple[torch.dtype, bool], list[int]] = {}
    for index, tensor in enumerate(tensors):
        if tensor.numel():
            key = (tensor.dtype, tensor.data_ptr() % 16 == 0)
            members.setdefault(key, []).append(index)
    parts = [
        torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64),
        torch.tensor([t.numel() for t in tensors], dtype=torch.int64),
        chunk_bases,
    ]
    group_shapes = []
    for (dtype, aligned), indices in members.items():
        index = torch.tensor(indices, dtype=torch.int64)
        group_counts = counts[index]
        tensor_index = torch.repeat_interleave(index, group_counts)
        group_starts = torch.cumsum(group_counts, 0) - group_counts
        chunk_index = torch.arange(len(tensor_index)) - torch.repeat_interleave(
            group_starts, group_counts
        )
        slot = chunk_bases[tensor_index] + chunk_index
        parts.append(torch.stack([tensor_index, chunk_index, slot], dim=1).reshape(-1))
        group_shapes.append((dtype, aligned, len(tensor_index)))
    # One host buffer, one copy to the device; the tables are views of it.
    host = torch.cat(parts)
    if device.type == "cuda":
        host = host.pin_memory()
        table = host.to(device, non_blocking=True)
    else:
        table = host.to(device)
    n = len(tensors)
    views = list(torch.split(table, [p.numel() for p in parts]))
    groups = tuple(
        _DtypeGroup(dtype, aligned, num_chunks, view.view(num_chunks, 3))
        for (dtype, aligned, num_chunks), view in zip(group_shapes, views[3:], strict=True)
    )
    return _Tables(views[0], views[1], views[2].view(n + 1), groups, _first_overlap(tensors), host)


def _first_overlap(tensors: list[torch.Tensor]) -> tuple[int, int] | None:
    """The positions of two nonempty tensors whose bytes intersect, or None (each tensor is dense,
    so it spans numel * element_size bytes from data_ptr)."""
    spans = sorted(
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), i)
        for i, t in enumerate(tensors)
        if t.numel()
    )
    for (_, previous_end, previous), (begin, _, index) in itertools.pairwise(spans):
        if begin < previous_end:
            return min(previous, index), max(previous, index)
    return None


def _captured_tables_for(
    key: tuple, tensors: list[torch.Tensor], device: torch.device, stream: int
) -> _Tables:
    """Tables for a launch being captured into a CUDA graph (caller holds _cache_lock).

    An eager table may be evicted and freed while the graph still replays, and a table built in
    another capture holds its data only once that graph has replayed; so each capture builds its
    own (shared by the ops of that capture), whose host->device copy is a node of this graph, and
    the graph keeps them, host buffer included, until it is destroyed or reset.
    """
    capture = _captures.get((device, stream))
    graph = capture.graph() if capture is not None else None
    if graph is not None:
        tables = capture.tables.get(key)
        if tables is None:
            tables = _build_tables(tensors, device)
            capture.tables[key] = tables
            # Released after the streams the graph replayed on have finished with it.
            graph.retain_object(tables, synchronize_before_release=True)
        return tables
    tables = _build_tables(tensors, device)
    _unowned_captured_tables.append(tables)
    return tables


def _tables_for(tensors: list[torch.Tensor], device: torch.device) -> _Tables:
    # A table copied on one CUDA stream is only known to be ready on that stream.
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (device, stream, tuple((t.data_ptr(), t.numel(), t.dtype) for t in tensors))
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    with _cache_lock:
        if capturing:
            return _captured_tables_for(key, tensors, device, stream)
        tables = _table_cache.get(key)
        if tables is None:
            tables = _build_tables(tensors, device)
            _table_cache[key] = tables
            if len(_table_cache) > TABLE_CACHE_SIZE:
                _table_cache.popitem(last=False)
        else:
            _table_cache.move_to_end(key)
        return tables


def _capture_began(graph: torch.cuda.CUDAGraph) -> None:
    # Runs with the capture live on the current stream: only host bookkeeping here.
    stream = torch.cuda.current_stream()
    with _cache_lock:
        _captures[(stream.device, stream.cuda_stream)] = _Capture(weakref.ref(graph))


def _capture_ended(graph: torch.cuda.CUDAGraph) -> None:
    with _cache_lock:
        for where, capture in list(_captures.items()):
            if capture.graph() is graph or capture.graph() is None:
                del _captures[where]


# torch 2.14 tells every capture's start and end and lets a graph keep objects alive; without
# that, tables built during captures fall back to living as long as the process.
if hasattr(torch.cuda.graphs, "register_graph_capture_start_hook") and hasattr(
    torch.cuda.CUDAGraph, "retain_object"
):
    torch.cuda.graphs.register_graph_capture_start_hook(_capture_began)
    torch.cuda.graphs.register_graph_capture_end_hook(_capture_ended)


def _has_addresses(tensors: list[torch.Tensor]) -> bool:
    """False while a graph is traced: fake and functional tensors have no data_ptr."""
    return not any(
        isinstance(t, (FakeTensor, FunctionalTensor))
        or torch._is_functional_tensor(t)
        or t.device.type == "meta"
        for t in tensors
    )


def _launch(kernel, grid: tuple, args: tuple, traced: bool, **meta) -> None:
    if kernels.INTERPRETED:
        # The interpreter needs real memory: a fake run only has to produce the outputs'
        # metadata, so it launches nothing. An interpreted kernel launches as itself (torch 2.14's
        # wrap_triton hands it back unwrapped, torch 2.11's refuses it).
        if not traced:
            kernel[grid](*args, **meta)
        return
    wrap_triton(kernel)[grid](*args, **meta)


def _check_device(device: torch.device) -> None:
    if device.type == "cuda" or device.type == "meta":
        return
    if device.type == "cpu" and kernels.INTERPRETED:
        return
    raise RuntimeError(
        f"the Triton kernels need CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device}"
    )


def _check_gradient_list(tensors: list[torch.Tensor], name: str) -> None:
    if not tensors:
        raise RuntimeError(
            f"{name} must hold at least one tensor; skip the call when there is none"
        )
    device = tensors[0].device
    _check_device(device)
    for i, t in enumerate(tensors):
        if t.device != device:
            raise RuntimeError(
                f"{name}[{i}] is on {t.device} but {name}[0] is on {device}; group the tensors by device"
            )
        if t.dtype not in _TRITON_DTYPES:
            raise RuntimeError(
                f"{name}[{i}] has dtype {t.dtype}; use float32, float16, bfloat16 or float64"
            )
        if t.layout != torch.strided:
            raise RuntimeError(f"{name}[{i}] is not a strided (dense) tensor")
        if not is_dense(t):
            raise RuntimeError(
                f"{name}[{i}] is not dense and non-overlapping; pass a contiguous copy"
            )


def _check_scalar_tensor(t: torch.Tensor, name: str, device: torch.device) -> None:
    if t.numel() != 1:
        raise RuntimeError(f"{name} must hold one element, got {t.numel()}")
    if t.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"{name} must be float32 or float64, got {t.dtype}")
    if t.device != device:
        raise RuntimeError(f"{name} is on {t.device} but must be on {device}")


@triton_op("fusedclip::triton_reduce", mutates_args=())
def triton_reduce(
    tensors: list[torch.Tensor], norm_type: float, per_tensor: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The read pass: (raw_norm float64 [], found_inf float32 [], per_tensor_norms float64 [n] or
    [0]), norms rather than power sums.

    Chunk partials go to slots in input order (tensor t's chunks are consecutive), are combined
    per tensor, then over tensors, each in a fixed order: the same bits on every run and device,
    and whether or not per_tensor is asked. The partials are plain float64 sums of |g|^p, or
    (scale, sum) pairs where those could leave float64's range (norms.needs_scaled_sum).
    """
    _check_gradient_list(tensors, "tensors")
    if not norm_type > 0.0:
        raise RuntimeError(f"norm_type must be > 0 (or inf), got {norm_type}")
    device = tensors[0].device
    with _on_device(device):
        return _reduce(tensors, norm_type, per_tensor, device)


def _reduce(
    tensors: list[torch.Tensor], norm_type: float, per_tensor: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_tensors = len(tensors)
    counts = [_num_chunks(t.numel()) for t in tensors]
    num_chunks = sum(counts)
    scaled = needs_scaled_sum(norm_type, any(t.dtype == torch.float64 for t in tensors))
    float64 = dict(dtype=torch.float64, device=device)
    chunk_power = torch.empty(num_chunks, **float64)
    # Plain partials have no scale; their kernels never touch the scale argument.
    chunk_scale = torch.empty(num_chunks, **float64) if scaled else chunk_power
    chunk_nonfinite = torch.empty(num_chunks, dtype=torch.int32, device=device)
    tensor_power = torch.empty(num_tensors, **float64)
    tensor_scale = torch.empty(num_tensors, **float64) if scaled else tensor_power
    tensor_nonfinite = torch.empty(num_tensors, dtype=torch.int32, device=device)
    tensor_norms = torch.empty(num_tensors, **float64)
    raw_norm = torch.empty((), **float64)
    found_inf = torch.empty((), dtype=torch.float32, device=device)
    norm_kind = _norm_kind(norm_type)
    norm_type_bits = _float64_bits(norm_type)
    read_meta = dict(
        NORM_KIND=norm_kind,
        SCALED=scaled,
        CHUNK_SIZE=CHUNK_SIZE,
        BLOCK_SIZE=BLOCK_SIZE,
        num_warps=NUM_WARPS,
    )
    segment_meta = dict(
        NORM_KIND=norm_kind,
        SCALED=scaled,
        BLOCK_SIZE=SEGMENT_BLOCK_SIZE,
        num_warps=SEGMENT_NUM_WARPS,
    )
    chunk_partials = (chunk_scale, chunk_power, chunk_nonfinite)
    tensor_outputs = (tensor_scale, tensor_power, tensor_nonfinite, tensor_norms)

    traced = not _has_addresses(tensors)
    if not traced:
        tables = _tables_for(tensors, device)
        for group in tables.groups:
            _launch(
                kernels._partials_table_kernel,
                (group.num_chunks,),
                (
                    group.chunk_table,
                    tables.addresses,
                    tables.numels,
                    *chunk_partials,
                    norm_type_bits,
                ),
                traced,
                DTYPE=_TRITON_DTYPES[group.dtype],
                ALIGNED=group.aligned,
                **read_meta,
            )
        _launch(
            kernels._tensor_partials_table_kernel,
            (num_tensors,),
            (*chunk_partials, tables.chunk_bases, *tensor_outputs, norm_type_bits),
            traced,
            **segment_meta,
        )
    else:
        first_slot = 0
        for index, (tensor, count) in enumerate(zip(tensors, counts, strict=True)):
            if count:
                _launch(
                    kernels._partials_tensor_kernel,
                    (count,),
                    (tensor, tensor.numel(), first_slot, *chunk_partials, norm_type_bits),
                    traced,
                    **read_meta,
                )
            _launch(
                kernels._tensor_partial_kernel,
                (1,),
                (
                    *chunk_partials,
                    first_slot,
                    first_slot + count,
                    index,
                    *tensor_outputs,
                    norm_type_bits,
                ),
                traced,
                **segment_meta,
            )
            first_slot += count
    _launch(
        kernels._total_norm_kernel,
        (1,),
        (
            tensor_scale,
            tensor_power,
            tensor_nonfinite,
            num_tensors,
            raw_norm,
            found_inf,
            norm_type_bits,
        ),
        traced,
        **segment_meta,
    )
    if per_tensor:
        per_tensor_norms = tensor_norms
    else:
        per_tensor_norms = torch.empty(0, **float64)
    return raw_norm, found_inf, per_tensor_norms


@triton_op("fusedclip::triton_finalize", mutates_args=())
def triton_finalize(
    raw_norm: torch.Tensor,
    max_norm: float | None,
    inv_scale: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total_norm of out_dtype, clip_coef float64), both 0-dim, from one program in float64:
    total_norm = raw_norm * |inv_scale|, clip_coef = inv_scale * min(1, max_norm / (total_norm +
    1e-6))."""
    device = raw_norm.device
    _check_device(device)
    if raw_norm.numel() != 1 or raw_norm.dtype != torch.float64:
        raise RuntimeError(
            f"raw_norm must be one float64 element (reduce's raw_norm), got {raw_norm.numel()} "
            f"of {raw_norm.dtype}"
        )
    if out_dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"out_dtype must be float32 or float64, got {out_dtype}")
    if inv_scale is not None:
        _check_scalar_tensor(inv_scale, "inv_scale", device)
    with _on_device(device):
        total_norm = torch.empty((), dtype=out_dtype, device=device)
        clip_coef = torch.empty((), dtype=torch.float64, device=device)
        _launch(
            kernels._finalize_kernel,
            (1,),
            (
                raw_norm,
                raw_norm if inv_scale is None else inv_scale,
                total_norm,
                clip_coef,
                _float64_bits(0.0 if max_norm is None else max_norm),
            ),
            not _has_addresses([raw_norm] if inv_scale is None else [raw_norm, inv_scale]),
            HAS_MAX_NORM=max_norm is not None,
            HAS_INV_SCALE=inv_scale is not None,
            num_warps=1,
        )
    return total_norm, clip_coef


@triton_op("fusedclip::triton_scale_", mutates_args={"tensors"})
def triton_scale_(
    tensors: list[torch.Tensor], clip_coef: torch.Tensor, clip_value: float | None
) -> None:
    """In place: g = clamp(g * clip_coef, -clip_value, clip_value); the product in float32 for 16-
    and 32-bit tensors, in float64 for float64 tensors and for coefficients outside float32's
    normal range (needs_float64_product). Programs read clip_coef on the device and write nothing
    when it is 1 and there is no clip_value.
    """
    _check_gradient_list(tensors, "tensors")
    device = tensors[0].device
    _check_scalar_tensor(clip_coef, "clip_coef", device)
    if clip_value is not None and not clip_value >= 0.0:
        raise RuntimeError(f"clip_value must be >= 0, got {clip_value}")
    clip_value_bits = _float64_bits(0.0 if clip_value is None else clip_value)
    write_meta = dict(
        HAS_CLIP_VALUE=clip_value is not None,
        CHUNK_SIZE=CHUNK_SIZE,
        BLOCK_SIZE=BLOCK_SIZE,
        num_warps=NUM_WARPS,
    )
    traced = not _has_addresses([*tensors, clip_coef])
    with _on_device(device):
        if not traced:
            tables = _tables_for(tensors, device)
            if tables.overlap is not None:
                first, second = tables.overlap
                raise RuntimeError(
                    f"tensors[{first}] and tensors[{second}] share memory, so scaling in place "
                    "would scale it twice; list each gradient once (the fusedclip API drops "
                    "repeats)"
                )
            for group in tables.groups:
                _launch(
                    kernels._scale_table_kernel,
                    (group.num_chunks,),
                    (
                        group.chunk_table,
                        tables.addresses,
                        tables.numels,
                        clip_coef,
                        clip_value_bits,
                    ),
                    traced,
                    DTYPE=_TRITON_DTYPES[group.dtype],
                    FLOAT64_TENSOR=group.dtype == torch.float64,
                    ALIGNED=group.aligned,
                    **write_meta,
                )
        else:
            for tensor in tensors:
                count = _num_chunks(tensor.numel())
                if count:
                    _launch(
                        kernels._scale_tensor_kernel,
                        (count,),
                        (tensor, tensor.numel(), clip_coef, clip_value_bits),
                        traced,
                        FLOAT64_TENSOR=tensor.dtype == torch.float64,
                        **write_meta,
                    )


def _keep_opaque(mode, op, types, args, kwargs):
    return mode.__torch_dispatch__(op, types, args, kwargs)


# torch.compile would decompose a triton_op into its kernels under FunctionalTensorMode. Traced
# tensors have no addresses, so that decomposition launches once per tensor instead of once per
# dtype group through the pointer tables; torch 2.11's inductor also fails to generate code for it
# on CUDA ('int' object has no attribute 'xreplace'), and under the interpreter wrap_triton returns
# untraceable kernels. So the ops stay opaque in the graph and run their table-driven launches.
for _op in (triton_reduce, triton_finalize, triton_scale_):
    _op.register_torch_dispatch(FunctionalTensorMode, _keep_opaque)
