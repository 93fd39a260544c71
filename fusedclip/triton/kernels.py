"""Triton kernels of the three fusedclip ops (csrc/README.md states their contract).

The read and write passes cut every tensor into chunks of CHUNK_SIZE elements; one program handles
one chunk, BLOCK_SIZE elements per loop iteration. A pass over many tensors is one launch per dtype
group through device tables (`*_table_kernel`), or one launch per tensor when the tensors have no
addresses yet (`*_tensor_kernel`, used while torch.compile traces the ops). Both kinds run the same
chunk code and write the same partials, so they give the same bits.

Scalars that must stay float64 (norm_type, max_norm, clip_value) travel as the int64 bit pattern
of the double, `*_bits`: Triton passes Python floats as float32. A bit pattern that fits in int32
arrives as int32, so kernels sign-extend it to int64 before the bitcast.
"""

import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

NORM_GENERAL: tl.constexpr = tl.constexpr(0)
NORM_ONE: tl.constexpr = tl.constexpr(1)
NORM_TWO: tl.constexpr = tl.constexpr(2)
NORM_INF: tl.constexpr = tl.constexpr(3)


@triton.jit
def _max_keeping_nan(values):
    """max(values) over axis 0, NaN when any value is NaN (tl.max alone may drop NaN)."""
    has_nan = tl.max((values != values).to(tl.int32), axis=0)
    return tl.where(has_nan > 0, float("nan"), tl.max(values, axis=0))


@triton.jit
def _chunk_power(
    data_ptr,
    chunk_index,
    numel,
    norm_type_bits,
    NORM_KIND: tl.constexpr,
    CHUNK_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Over g = data[c * CHUNK_SIZE : min((c + 1) * CHUNK_SIZE, numel)], c = chunk_index:
    power = sum_i |g_i|^p in float64 (max_i |g_i| for p = inf, NaN propagating),
    nonfinite = 1 if any g_i is inf or NaN else 0.
    |g|^p is |g|, |g|*|g|, or exp2(p * log2|g|) with 0^p = 0 (p > 0).
    """
    chunk_start = chunk_index.to(tl.int64) * CHUNK_SIZE
    chunk_length = tl.minimum(numel - chunk_start, CHUNK_SIZE)
    is_full = chunk_length == CHUNK_SIZE
    if NORM_KIND == NORM_GENERAL:
        norm_type = norm_type_bits.to(tl.int64).to(tl.float64, bitcast=True)
    block = tl.arange(0, BLOCK_SIZE)
    accumulator = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
    nonfinite = tl.zeros([BLOCK_SIZE], dtype=tl.int32)
    for block_start in range(0, chunk_length, BLOCK_SIZE):
        offsets = (chunk_start + block_start) + block
        if is_full:
            # No mask, so aligned tensors get 16-byte vector loads.
            values = tl.load(data_ptr + offsets)
        else:
            # A tensor's tail chunk; masked lanes load 0, and |0|^p = 0.
            values = tl.load(data_ptr + offsets, mask=offsets < numel, other=0.0)
        magnitude = tl.abs(values.to(tl.float64))
        if NORM_KIND == NORM_INF:
            accumulator = tl.maximum(accumulator, magnitude, propagate_nan=tl.PropagateNan.ALL)
        elif NORM_KIND == NORM_TWO:
            accumulator += magnitude * magnitude
        elif NORM_KIND == NORM_ONE:
            accumulator += magnitude
        else:
            is_zero = magnitude == 0.0
            power = tl.exp2(norm_type * tl.log2(tl.where(is_zero, 1.0, magnitude)))
            accumulator += tl.where(is_zero, 0.0, power)
        # From the elements, not the sum: a float64 sum of finite squares can overflow.
        nonfinite = tl.where(magnitude < float("inf"), nonfinite, 1)
    if NORM_KIND == NORM_INF:
        chunk_power = _max_keeping_nan(accumulator)
    else:
        chunk_power = tl.sum(accumulator, axis=0)
    return chunk_power, tl.max(nonfinite, axis=0)


@triton.jit(do_not_specialize=["norm_type_bits"])
def _power_partials_table_kernel(
    chunk_table_ptr,
    addresses_ptr,
    numels_ptr,
    chunk_power_ptr,
    chunk_nonfinite_ptr,
    norm_type_bits,
    DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    NORM_KIND: tl.constexpr,
    CHUNK_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Program k takes row k = (tensor t, chunk c of t, slot s) of chunk_table (int64 [chunks, 3]):
    chunk_power[s], chunk_nonfinite[s] = _chunk_power(tensor t's data at addresses[t], c, numels[t]).
    """
    row = chunk_table_ptr + tl.program_id(0).to(tl.int64) * 3
    tensor_index = tl.load(row)
    chunk_index = tl.load(row + 1)
    slot = tl.load(row + 2)
    data_ptr = tl.load(addresses_ptr + tensor_index).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        # On the pointer itself: a hint on the integer address does not reach the loads.
        data_ptr = tl.multiple_of(data_ptr, 16)
    numel = tl.load(numels_ptr + tensor_index)
    power, nonfinite = _chunk_power(
        data_ptr,
        chunk_index,
        numel,
        norm_type_bits,
        NORM_KIND,
        CHUNK_SIZE,
        BLOCK_SIZE,
    )
    tl.store(chunk_power_ptr + slot, power)
    tl.store(chunk_nonfinite_ptr + slot, nonfinite)


@triton.jit(do_not_specialize=["norm_type_bits"])
def _power_partials_tensor_kernel(
    data_ptr,
    numel,
    first_slot,
    chunk_power_ptr,
    chunk_nonfinite_ptr,
    norm_type_bits,
    NORM_KIND: tl.constexpr,
    CHUNK_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One tensor, program c: chunk_power[first_slot + c], chunk_nonfinite[first_slot + c] =
    _chunk_power(data, c, numel).
    """
    chunk_index = tl.program_id(0).to(tl.int64)
    power, nonfinite = _chunk_power(
        data_ptr,
        chunk_index,
        numel,
        norm_type_bits,
        NORM_KIND,
        CHUNK_SIZE,
        BLOCK_SIZE,
    )
    tl.store(chunk_power_ptr + first_slot + chunk_index, power)
    tl.store(chunk_nonfinite_ptr + first_slot + chunk_index, nonfinite)


@triton.jit
def _reduce_segment(
    power_ptr,
    nonfinite_ptr,
    begin,
    end,
    NORM_KIND: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """sum_{begin <= i < end} power[i] (max for p = inf, NaN propagating), max nonfinite[i]; 0 and
    0 for an empty segment. Fixed order: lane j sums i = begin + j, begin + j + BLOCK_SIZE, ... in
    sequence, then one fixed tree over the lanes.
    """
    block = tl.arange(0, BLOCK_SIZE)
    accumulator = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
    nonfinite = tl.zeros([BLOCK_SIZE], dtype=tl.int32)
    for block_start in range(begin, end, BLOCK_SIZE):
        offsets = block_start + block
        mask = offsets < end
        values = tl.load(power_ptr + offsets, mask=mask, other=0.0)
        if NORM_KIND == NORM_INF:
            accumulator = tl.maximum(accumulator, values, propagate_nan=tl.PropagateNan.ALL)
        else:
            accumulator += values
        nonfinite = tl.maximum(nonfinite, tl.load(nonfinite_ptr + offsets, mask=mask, other=0))
    if NORM_KIND == NORM_INF:
        total = _max_keeping_nan(accumulator)
    else:
        total = tl.sum(accumulator, axis=0)
    return total, tl.max(nonfinite, axis=0)


@triton.jit
def _tensor_power_table_kernel(
    chunk_power_ptr,
    chunk_nonfinite_ptr,
    chunk_bases_ptr,
    tensor_power_ptr,
    tensor_nonfinite_ptr,
    NORM_KIND: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Program t: tensor_power[t], tensor_nonfinite[t] = _reduce_segment over the chunk partials
    [chunk_bases[t], chunk_bases[t + 1]) (a tensor's chunks have consecutive slots).
    """
    tensor_index = tl.program_id(0)
    begin = tl.load(chunk_bases_ptr + tensor_index)
    end = tl.load(chunk_bases_ptr + tensor_index + 1)
    power, nonfinite = _reduce_segment(
        chunk_power_ptr, chunk_nonfinite_ptr, begin, end, NORM_KIND, BLOCK_SIZE
    )
    tl.store(tensor_power_ptr + tensor_index, power)
    tl.store(tensor_nonfinite_ptr + tensor_index, nonfinite)


@triton.jit
def _tensor_power_kernel(
    chunk_power_ptr,
    chunk_nonfinite_ptr,
    begin,
    end,
    tensor_power_ptr,
    tensor_nonfinite_ptr,
    tensor_index,
    NORM_KIND: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One program: tensor_power[t], tensor_nonfinite[t] = _reduce_segment over [begin, end)."""
    power, nonfinite = _reduce_segment(
        chunk_power_ptr, chunk_nonfinite_ptr, begin, end, NORM_KIND, BLOCK_SIZE
    )
    tl.store(tensor_power_ptr + tensor_index, power)
    tl.store(tensor_nonfinite_ptr + tensor_index, nonfinite)


@triton.jit
def _total_power_kernel(
    tensor_power_ptr,
    tensor_nonfinite_ptr,
    num_tensors,
    power_sum_ptr,
    found_inf_ptr,
    NORM_KIND: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One program: power_sum = sum_t tensor_power[t] (max for p = inf), found_inf = float32(max_t
    tensor_nonfinite[t]), both in _reduce_segment's fixed order.
    """
    power, nonfinite = _reduce_segment(
        tensor_power_ptr, tensor_nonfinite_ptr, 0, num_tensors, NORM_KIND, BLOCK_SIZE
    )
    tl.store(power_sum_ptr, power)
    tl.store(found_inf_ptr, nonfinite.to(tl.float32))


@triton.jit(do_not_specialize=["norm_type_bits", "max_norm_bits"])
def _finalize_kernel(
    power_sum_ptr,
    inv_scale_ptr,
    total_norm_ptr,
    clip_coef_ptr,
    norm_type_bits,
    max_norm_bits,
    NORM_KIND: tl.constexpr,
    HAS_MAX_NORM: tl.constexpr,
    HAS_INV_SCALE: tl.constexpr,
):
    """One program, float64 throughout, each output rounded once to its dtype:
    total_norm = power_sum^(1/p) * |inv_scale|   (power_sum * |inv_scale| for p = inf)
    clip_coef = inv_scale * min(1, max_norm / (total_norm + 1e-6))   (x > 1 ? 1 : x keeps NaN)
    """
    power_sum = tl.load(power_sum_ptr).to(tl.float64)
    if NORM_KIND == NORM_TWO:
        total_norm = tl.sqrt(power_sum)
    elif NORM_KIND == NORM_GENERAL:
        # 0^(1/p) = 0; log2(0) is avoided rather than relied on.
        is_zero = power_sum == 0.0
        inverse_norm_type = 1.0 / norm_type_bits.to(tl.int64).to(tl.float64, bitcast=True)
        total_norm = tl.exp2(tl.log2(tl.where(is_zero, 1.0, power_sum)) * inverse_norm_type)
        total_norm = tl.where(is_zero, 0.0, total_norm)
    else:
        total_norm = power_sum
    if HAS_INV_SCALE:
        inv_scale = tl.load(inv_scale_ptr).to(tl.float64)
        total_norm = total_norm * tl.abs(inv_scale)
    if HAS_MAX_NORM:
        # A float literal would be float32: 1e-6 must be the float64 one.
        norm_eps = tl.full([], 1e-6, dtype=tl.float64)
        max_norm = max_norm_bits.to(tl.int64).to(tl.float64, bitcast=True)
        ratio = max_norm / (total_norm + norm_eps)
        clip_coef = tl.where(ratio > 1.0, 1.0, ratio)
    else:
        clip_coef = tl.full([], 1.0, dtype=tl.float64)
    if HAS_INV_SCALE:
        clip_coef = clip_coef * inv_scale
    tl.store(total_norm_ptr, total_norm.to(total_norm_ptr.dtype.element_ty))
    tl.store(clip_coef_ptr, clip_coef.to(clip_coef_ptr.dtype.element_ty))


@triton.jit
def _scale_chunk(
    data_ptr,
    chunk_index,
    numel,
    clip_coef,
    clip_value_bits,
    HAS_CLIP_VALUE: tl.constexpr,
    CHUNK_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """g = clamp(g * clip_coef, -clip_value, clip_value) over chunk chunk_index, formed in the dtype
    of clip_coef (float32, or float64 for float64 tensors) and rounded to g's dtype; NaN stays NaN
    through the clamp, as in torch.clamp.
    """
    chunk_start = chunk_index.to(tl.int64) * CHUNK_SIZE
    chunk_length = tl.minimum(numel - chunk_start, CHUNK_SIZE)
    is_full = chunk_length == CHUNK_SIZE
    if HAS_CLIP_VALUE:
        clip_value = clip_value_bits.to(tl.int64).to(tl.float64, bitcast=True).to(clip_coef.dtype)
    block = tl.arange(0, BLOCK_SIZE)
    for block_start in range(0, chunk_length, BLOCK_SIZE):
        offsets = (chunk_start + block_start) + block
        mask = offsets < numel
        if is_full:
            values = tl.load(data_ptr + offsets)
        else:
            values = tl.load(data_ptr + offsets, mask=mask)
        scaled = values.to(clip_coef.dtype) * clip_coef
        if HAS_CLIP_VALUE:
            scaled = tl.maximum(scaled, -clip_value, propagate_nan=tl.PropagateNan.ALL)
            scaled = tl.minimum(scaled, clip_value, propagate_nan=tl.PropagateNan.ALL)
        scaled = scaled.to(values.dtype)
        if is_full:
            tl.store(data_ptr + offsets, scaled)
        else:
            tl.store(data_ptr + offsets, scaled, mask=mask)


@triton.jit(do_not_specialize=["clip_value_bits"])
def _scale_table_kernel(
    chunk_table_ptr,
    addresses_ptr,
    numels_ptr,
    clip_coef_ptr,
    clip_value_bits,
    DTYPE: tl.constexpr,
    FLOAT64_PRODUCT: tl.constexpr,
    ALIGNED: tl.constexpr,
    HAS_CLIP_VALUE: tl.constexpr,
    CHUNK_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Program k takes row k = (tensor t, chunk c of t, slot) of chunk_table and applies
    _scale_chunk to chunk c of tensor t; it returns at once when clip_coef == 1 and there is no
    clip_value.
    """
    if FLOAT64_PRODUCT:
        clip_coef = tl.load(clip_coef_ptr).to(tl.float64)
    else:
        clip_coef = tl.load(clip_coef_ptr).to(tl.float32)
    if HAS_CLIP_VALUE:
        writes = True
    else:
        writes = clip_coef != 1.0
    if writes:
        row = chunk_table_ptr + tl.program_id(0).to(tl.int64) * 3
        tensor_index = tl.load(row)
        chunk_index = tl.load(row + 1)
        data_ptr = tl.load(addresses_ptr + tensor_index).to(tl.pointer_type(DTYPE))
        if ALIGNED:
            data_ptr = tl.multiple_of(data_ptr, 16)
        _scale_chunk(
            data_ptr,
            chunk_index,
            tl.load(numels_ptr + tensor_index),
            clip_coef,
            clip_value_bits,
            HAS_CLIP_VALUE,
            CHUNK_SIZE,
            BLOCK_SIZE,
        )


@triton.jit(do_not_specialize=["clip_value_bits"])
def _scale_tensor_kernel(
    data_ptr,
    numel,
    clip_coef_ptr,
    clip_value_bits,
    FLOAT64_PRODUCT: tl.constexpr,
    HAS_CLIP_VALUE: tl.constexpr,
    CHUNK_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One tensor, program c: _scale_chunk on chunk c; returns at once when clip_coef == 1 and
    there is no clip_value.
    """
    if FLOAT64_PRODUCT:
        clip_coef = tl.load(clip_coef_ptr).to(tl.float64)
    else:
        clip_coef = tl.load(clip_coef_ptr).to(tl.float32)
    if HAS_CLIP_VALUE:
        writes = True
    else:
        writes = clip_coef != 1.0
    if writes:
        _scale_chunk(
            data_ptr,
            tl.program_id(0),
            numel,
            clip_coef,
            clip_value_bits,
            HAS_CLIP_VALUE,
            CHUNK_SIZE,
            BLOCK_SIZE,
        )


# Under TRITON_INTERPRET=1, triton.jit gives interpreter functions instead of JIT functions.
INTERPRETED = not isinstance(_chunk_power, JITFunction)
