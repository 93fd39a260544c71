"""The Triton backend: `fusedclip::triton_reduce`, `triton_finalize`, `triton_scale_`.

Same contracts as `reduce`, `finalize`, `scale_` (csrc/README.md, fusedclip/reference.py). Each op
is a `torch.library.triton_op` whose kernels launch through `wrap_triton`; torch.compile sees the
ops and keeps them opaque in its graphs (see the end of this file for why).

In eager mode a pass over many tensors is one launch per (dtype, 16-byte aligned) group, driven by
int64 device tables built on the host without a sync and cached per tensor list (gradients keep
their addresses from step to step). Tensors without addresses (fake tensors, when shapes are
propagated) take a per-tensor path through the same chunk code, which writes the same partials.
"""

import math
import struct
from collections import OrderedDict
from dataclasses import dataclass

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode
from torch.library import triton_op, wrap_triton

from fusedclip.layout import is_dense

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


_table_cache: "OrderedDict[tuple, _Tables]" = OrderedDict()


def _num_chunks(numel: int) -> int:
    return (numel + CHUNK_SIZE - 1) // CHUNK_SIZE


def _float64_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _norm_kind(norm_type: float) -> int:
    if math.isinf(norm_type):
        return kernels.NORM_INF.value
    if norm_type == 2.0:
        return kernels.NORM_TWO.value
    if norm_type == 1.0:
        return kernels.NORM_ONE.value
    return kernels.NORM_GENERAL.value


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
        table = host.pin_memory().to(device, non_blocking=True)
    else:
        table = host.to(device)
    n = len(tensors)
    views = list(torch.split(table, [p.numel() for p in parts]))
    groups = tuple(
        _DtypeGroup(dtype, aligned, num_chunks, view.view(num_chunks, 3))
        for (dtype, aligned, num_chunks), view in zip(group_shapes, views[3:], strict=True)
    )
    return _Tables(views[0], views[1], views[2].view(n + 1), groups)


def _tables_for(tensors: list[torch.Tensor], device: torch.device) -> _Tables:
    # A table copied on one CUDA stream is only known to be ready on that stream.
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (device, stream, tuple((t.data_ptr(), t.numel(), t.dtype) for t in tensors))
    tables = _table_cache.get(key)
    if tables is None:
        tables = _build_tables(tensors, device)
        _table_cache[key] = tables
        if len(_table_cache) > TABLE_CACHE_SIZE:
            _table_cache.popitem(last=False)
    else:
        _table_cache.move_to_end(key)
    return tables


def _has_addresses(tensors: list[torch.Tensor]) -> bool:
    """False while a graph is traced: fake and functional tensors have no data_ptr."""
    return not any(
        isinstance(t, (FakeTensor, FunctionalTensor))
        or torch._is_functional_tensor(t)
        or t.device.type == "meta"
        for t in tensors
    )


def _launch(kernel, grid: tuple, args: tuple, traced: bool, **meta) -> None:
    # The interpreter needs real memory, and torch's wrap_triton hands back interpreted kernels
    # unwrapped; a fake run only has to produce the outputs' metadata, so it launches nothing.
    if kernels.INTERPRETED and traced:
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
    """The read pass: (power_sum float64 [], found_inf float32 [], per_tensor_power float64 [n] or [0]).

    Chunk partials go to slots in input order (tensor t's chunks are consecutive), are summed per
    tensor, then over tensors, each in a fixed order: the same bits on every run and device, and
    whether or not per_tensor is asked.
    """
    _check_gradient_list(tensors, "tensors")
    if not norm_type > 0.0:
        raise RuntimeError(f"norm_type must be > 0 (or inf), got {norm_type}")
    device = tensors[0].device
    num_tensors = len(tensors)
    counts = [_num_chunks(t.numel()) for t in tensors]
    num_chunks = sum(counts)
    chunk_power = torch.empty(num_chunks, dtype=torch.float64, device=device)
    chunk_nonfinite = torch.empty(num_chunks, dtype=torch.int32, device=device)
    tensor_power = torch.empty(num_tensors, dtype=torch.float64, device=device)
    tensor_nonfinite = torch.empty(num_tensors, dtype=torch.int32, device=device)
    power_sum = torch.empty((), dtype=torch.float64, device=device)
    found_inf = torch.empty((), dtype=torch.float32, device=device)
    norm_kind = _norm_kind(norm_type)
    norm_type_bits = _float64_bits(norm_type)
    read_meta = dict(
        NORM_KIND=norm_kind, CHUNK_SIZE=CHUNK_SIZE, BLOCK_SIZE=BLOCK_SIZE, num_warps=NUM_WARPS
    )
    segment_meta = dict(
        NORM_KIND=norm_kind, BLOCK_SIZE=SEGMENT_BLOCK_SIZE, num_warps=SEGMENT_NUM_WARPS
    )

    traced = not _has_addresses(tensors)
    if not traced:
        tables = _tables_for(tensors, device)
        for group in tables.groups:
            _launch(
                kernels._power_partials_table_kernel,
                (group.num_chunks,),
                (
                    group.chunk_table,
                    tables.addresses,
                    tables.numels,
                    chunk_power,
                    chunk_nonfinite,
                    norm_type_bits,
                ),
                traced,
                DTYPE=_TRITON_DTYPES[group.dtype],
                ALIGNED=group.aligned,
                **read_meta,
            )
        _launch(
            kernels._tensor_power_table_kernel,
            (num_tensors,),
            (chunk_power, chunk_nonfinite, tables.chunk_bases, tensor_power, tensor_nonfinite),
            traced,
            **segment_meta,
        )
    else:
        first_slot = 0
        for index, (tensor, count) in enumerate(zip(tensors, counts, strict=True)):
            if count:
                _launch(
                    kernels._power_partials_tensor_kernel,
                    (count,),
                    (
                        tensor,
                        tensor.numel(),
                        first_slot,
                        chunk_power,
                        chunk_nonfinite,
                        norm_type_bits,
                    ),
                    traced,
                    **read_meta,
                )
            _launch(
                kernels._tensor_power_kernel,
                (1,),
                (
                    chunk_power,
                    chunk_nonfinite,
                    first_slot,
                    first_slot + count,
                    tensor_power,
                    tensor_nonfinite,
                    index,
                ),
                traced,
                **segment_meta,
            )
            first_slot += count
    _launch(
        kernels._total_power_kernel,
        (1,),
        (tensor_power, tensor_nonfinite, num_tensors, power_sum, found_inf),
        traced,
        **segment_meta,
    )
    if per_tensor:
        per_tensor_power = tensor_power
    else:
        per_tensor_power = torch.empty(0, dtype=torch.float64, device=device)
    return power_sum, found_inf, per_tensor_power


@triton_op("fusedclip::triton_finalize", mutates_args=())
def triton_finalize(
    power_sum: torch.Tensor,
    norm_type: float,
    max_norm: float | None,
    inv_scale: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total_norm, clip_coef), both 0-dim of out_dtype, from one program in float64."""
    device = power_sum.device
    _check_device(device)
    if power_sum.numel() != 1:
        raise RuntimeError(f"power_sum must hold one element, got {power_sum.numel()}")
    if not norm_type > 0.0:
        raise RuntimeError(f"norm_type must be > 0 (or inf), got {norm_type}")
    if out_dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"out_dtype must be float32 or float64, got {out_dtype}")
    if inv_scale is not None:
        _check_scalar_tensor(inv_scale, "inv_scale", device)
    total_norm = torch.empty((), dtype=out_dtype, device=device)
    clip_coef = torch.empty((), dtype=out_dtype, device=device)
    _launch(
        kernels._finalize_kernel,
        (1,),
        (
            power_sum,
            power_sum if inv_scale is None else inv_scale,
            total_norm,
            clip_coef,
            _float64_bits(norm_type),
            _float64_bits(0.0 if max_norm is None else max_norm),
        ),
        not _has_addresses([power_sum] if inv_scale is None else [power_sum, inv_scale]),
        NORM_KIND=_norm_kind(norm_type),
        HAS_MAX_NORM=max_norm is not None,
        HAS_INV_SCALE=inv_scale is not None,
        num_warps=1,
    )
    return total_norm, clip_coef


@triton_op("fusedclip::triton_scale_", mutates_args={"tensors"})
def triton_scale_(
    tensors: list[torch.Tensor], clip_coef: torch.Tensor, clip_value: float | None
) -> None:
    """In place: g = clamp(g * clip_coef, -clip_value, clip_value); the product in float32 (float64
    for float64 tensors). Programs read clip_coef on the device and write nothing when it is 1 and
    there is no clip_value.
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
    if not traced:
        tables = _tables_for(tensors, device)
        for group in tables.groups:
            _launch(
                kernels._scale_table_kernel,
                (group.num_chunks,),
                (group.chunk_table, tables.addresses, tables.numels, clip_coef, clip_value_bits),
                traced,
                DTYPE=_TRITON_DTYPES[group.dtype],
                FLOAT64_PRODUCT=group.dtype == torch.float64,
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
                    FLOAT64_PRODUCT=tensor.dtype == torch.float64,
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
