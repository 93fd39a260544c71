"""Triton kernels of the three fusedclip ops (csrc/README.md states their contract).

The read and write passes cut every tensor into chunks of CHUNK_SIZE elements; one program handles
one chunk, BLOCK_SIZE elements per loop iteration. A pass over many tensors is one launch per dtype
group through device tables (`*_table_kernel`), or one launch per tensor when the tensors have no
addresses yet (`*_tensor_kernel`, used while torch.compile traces the ops). Both kinds run the same
chunk code and write the same partials, so they give the same bits.

The read pass has two forms (fusedclip.norms.needs_scaled_sum chooses, SCALED here):
- plain: one float64 partial per chunk, sum |g|^p (max |g| for p = inf);
- scaled: a pair per chunk, (scale, sum) with scale = max |g| and sum = sum (|g|/scale)^p, so that
  the norm scale * sum^(1/p) is finite whenever it fits float64, for every p (the ScaledSum of
  csrc/include/fusedclip/norm.h). Pairs combine by max first, then by the rescaled sums.

Scalars that must stay float64 (norm_type, max_norm, clip_value) travel as the int64 bit pattern
of the double, `*_bits`: Triton passes Python floats as float32. A bit pattern that fits in int32
arrives as int32, so kernels sign-extend it to int64 before the bitcast.
"""

import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from fusedclip.norms import FLOAT32_MAX, FLOAT32_TINY, FLOAT64_TINY, NORM_EPS

NORM_GENERAL: tl.constexpr = tl.constexpr(0)
NORM_ONE: tl.constexpr = tl.constexpr(1)
NORM_TWO: tl.constexpr = tl.constexpr(2)
NORM_INF: tl.constexpr = tl.constexpr(3)

# float32's normal range: a clip coefficient outside it (and nonzero, finite) is applied in
# float64 (norm.h's needs_float64_product; fusedclip.norms.needs_float64_product is the
# host twin). Both bounds are exact in float32 and float64.
_FLOAT32_TINY: tl.constexpr = tl.constexpr(FLOAT32_TINY)
_FLOAT32_MAX: tl.constexpr = tl.constexpr(FLOAT32_MAX)
_FLOAT64_TINY: tl.constexpr = tl.constexpr(FLOAT64_TINY)
_NORM_EPS: tl.constexpr = tl.constexpr(NORM_EPS)


@triton.jit
def _max_keeping_nan(values):
    """max(values) over axis 0, NaN when any value is NaN (tl.max alone may drop NaN)."""
    has_nan = tl.max((values != values).to(tl.int32), axis=0)
    return tl.where(has_nan > 0, float("nan"), tl.max(values, axis=0))


@triton.jit
def _decode_float64(bits):
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _is_nonfinite(magnitude):
    """inf or NaN, for magnitudes >= 0."""
    return (magnitude == float("inf")) | (magnitude != magnitude)


@triton.jit
def _is_ordinary_scale(scale):
    """A scale that rescales: positive and finite (not 0, inf or NaN)."""
    return (scale > 0.0) & (scale < float("inf"))


@triton.jit
def _magnitude_power(magnitude, norm_type, NORM_KIND: tl.constexpr):
    """|g|^p for magnitudes >= 0 and p in (0, inf): |g|, |g|*|g|, or exp2(p * log2|g|), 0^p = 0."""
    if NORM_KIND == NORM_TWO:
        power = magnitude * magnitude
    elif NORM_KIND == NORM_ONE:
        power = magnitude
    else:
        is_zero = magnitude == 0.0
        power = tl.exp2(norm_type * tl.log2(tl.where(is_zero, 1.0, magnitude)))
        power = tl.where(is_zero, 0.0, power)
    return power


@triton.jit
def _power_of_ratio(x, larger, norm_type, NORM_KIND: tl.constexpr):
    """(x / larger)^p for 0 <= x <= larger, larger > 0 finite (norm.h's power_of_ratio): the ratio
    underflows once x is more than 2^1022 below `larger`, where for a small p its power still
    counts, so such a power is taken in the log domain (p = 2 of such a ratio is below 2^-2044)."""
    ratio = x / larger
    power = _magnitude_power(ratio, norm_type, NORM_KIND)
    if NORM_KIND == NORM_GENERAL:
        underflowed = (ratio < _FLOAT64_TINY) & (x > 0.0)
        safe_x = tl.where(underflowed, x, 1.0)
        in_logs = tl.exp2(norm_type * (tl.log2(safe_x) - tl.log2(larger)))
        power = tl.where(underflowed, in_logs, power)
    return power


@triton.jit
def _root(power, norm_type, NORM_KIND: tl.constexpr):
    """power^(1/p) for p in (0, inf): sqrt for p = 2, 0 for 0; p = 1 and inf give power itself."""
    if NORM_KIND == NORM_TWO:
        norm = tl.sqrt(power)
    elif NORM_KIND == NORM_GENERAL:
        # 0^(1/p) = 0; log2(0) is avoided rather than relied on.
        is_zero = power == 0.0
        norm = tl.exp2(tl.log2(tl.where(is_zero, 1.0, power)) * (1.0 / norm_type))
        norm = tl.where(is_zero, 0.0, norm)
    else:
        norm = power
    return norm


@triton.jit
def _scaled_norm(scale, scaled_sum, norm_type, NORM_KIND: tl.constexpr):
    """The norm of a (scale, sum) pair: scale * sum^(1/p), or scale itself when it is 0, inf or
    NaN."""
    ordinary = _is_ordinary_scale(scale)
    safe_sum = tl.where(ordinary, scaled_sum, 1.0)
    root = _root(safe_sum, norm_type, NORM_KIND)
    # For a tiny p the root alone can overflow while the norm fits: then it is applied as three
    # factors (norm.h's scale_by_root says why three).
    third = tl.exp2(tl.log2(safe_sum) / norm_type / 3.0)
    in_thirds = scale * third * third * third
    norm = tl.where(root < float("inf"), scale * root, in_thirds)
    return tl.where(ordinary, norm, scale)


@triton.jit
def _merge_scaled(scale, scaled_sum, other_scale, other_sum, norm_type, NORM_KIND: tl.constexpr):
    """ScaledSum.merge of norm.h on scalars: the pair of the union of two disjoint sets.

    A zero other leaves (scale, sum); a non-finite scale on either side gives (nan_max, 1);
    otherwise the smaller side's sum is rescaled by (smaller / larger)^p onto the larger scale.
    """
    other_larger = other_scale > scale
    larger = tl.where(other_larger, other_scale, scale)
    smaller = tl.where(other_larger, scale, other_scale)
    kept_sum = tl.where(other_larger, other_sum, scaled_sum)
    moved_sum = tl.where(other_larger, scaled_sum, other_sum)
    # larger > 0 whenever it is used below (a zero other is handled first).
    safe_larger = tl.where((larger > 0.0) & (larger < float("inf")), larger, 1.0)
    moved_power = _power_of_ratio(
        tl.minimum(smaller, safe_larger), safe_larger, norm_type, NORM_KIND
    )
    merged_sum = kept_sum + moved_sum * moved_power
    either_nonfinite = _is_nonfinite(scale) | _is_nonfinite(other_scale)
    nan_max = tl.where((other_scale > scale) | (other_scale != other_scale), other_scale, scale)
    merged_scale = tl.where(either_nonfinite, nan_max, larger)
    merged_sum = tl.where(either_nonfinite, 1.0, merged_sum)
    other_is_zero = other_scale == 0.0
    return (
        tl.where(other_is_zero, scale, merged_scale),
        tl.where(other_is_zero, scaled_sum, merged_sum),
    )


@triton.jit
def _chunk_partial(
    data_ptr,
    chunk_index,
    numel,
    norm_type_bits,
    NORM_KIND: tl.constexpr,
    SCALED: tl.constexpr,
    CHUNK_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Over g = data[c * CHUNK_SIZE : min((c + 1) * CHUNK_SIZE, numel)], c = chunk_index, returns
    (scale, power, nonfinite):
    plain (SCALED false): scale = 0 (unused), power = sum_i |g_i|^p in float64 (max_i |g_i| for
    p = inf, NaN propagating);
    scaled: each loaded block b gives m_b = max |g| (NaN propagating) and s_b = sum (|g|/m_b)^p
    from the same registers; the blocks merge in order into (scale, power) = (max |g|,
    sum (|g|/max |g|)^p);
    nonfinite = 1 if any g_i is inf or NaN else 0.
    """
    chunk_start = chunk_index.to(tl.int64) * CHUNK_SIZE
    chunk_length = tl.minimum(numel - chunk_start, CHUNK_SIZE)
    is_full = chunk_length == CHUNK_SIZE
    norm_type = 0.0
    if NORM_KIND == NORM_GENERAL:
        norm_type = _decode_float64(norm_type_bits)
    elif NORM_KIND == NORM_TWO:
        norm_type = 2.0
    block = tl.arange(0, BLOCK_SIZE)
    accumulator = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
    nonfinite = tl.zeros([BLOCK_SIZE], dtype=tl.int32)
    running_scale = tl.full([], 0.0, dtype=tl.float64)
    running_sum = tl.full([], 0.0, dtype=tl.float64)
    for block_start in range(0, chunk_length, BLOCK_SIZE):
        offsets = (chunk_start + block_start) + block
        if is_full:
            # No mask, so aligned tensors get 16-byte vector loads.
            values = tl.load(data_ptr + offsets)
        else:
            # A tensor's tail chunk; masked lanes load 0, and |0|^p = 0.
            values = tl.load(data_ptr + offsets, mask=offsets < numel, other=0.0)
        magnitude = tl.abs(values.to(tl.float64))
        if SCALED:
            block_scale = _max_keeping_nan(magnitude)
            ordinary = _is_ordinary_scale(block_scale)
            powers = _power_of_ratio(
                magnitude, tl.where(ordinary, block_scale, 1.0), norm_type, NORM_KIND
            )
            block_sum = tl.sum(powers, axis=0)
            running_scale, running_sum = _merge_scaled(
                running_scale,
                running_sum,
                block_scale,
                tl.where(ordinary, block_sum, 0.0),
                norm_type,
                NORM_KIND,
            )
        elif NORM_KIND == NORM_INF:
            accumulator = tl.maximum(accumulator, magnitude, propagate_nan=tl.PropagateNan.ALL)
        else:
            accumulator += _magnitude_power(magnitude, norm_type, NORM_KIND)
        # From the elements, not the sum: a float64 sum of finite squares can overflow.
        nonfinite = tl.where(magnitude < float("inf"), nonfinite, 1)
    if SCALED:
        chunk_power = running_sum
    elif NORM_KIND == NORM_INF:
        chunk_power = _max_keeping_nan(accumulator)
    else:
        chunk_power = tl.sum(accumulator, axis=0)
    return running_scale, chunk_power, tl.max(nonfinite, axis=0)


@triton.jit(do_not_specialize=["norm_type_bits"])
def _partials_table_kernel(
    chunk_table_ptr,
    addresses_ptr,
    numels_ptr,
    chunk_scale_ptr,
    chunk_power_ptr,
    chunk_nonfinite_ptr,
    norm_type_bits,
    DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    NORM_KIND: tl.constexpr,
    SCALED: tl.constexpr,
    CHUNK_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Program k takes row k = (tensor t, chunk c of t, slot s) of chunk_table (int64 [chunks, 3]):
    chunk_scale[s] (scaled only), chunk_power[s], chunk_nonfinite[s] = _chunk_partial(tensor t's
    data at addresses[t], c, numels[t]).
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
    scale, power, nonfinite = _chunk_partial(
        data_ptr,
        chunk_index,
        numel,
        norm_type_bits,
        NORM_KIND,
        SCALED,
        CHUNK_SIZE,
        BLOCK_SIZE,
    )
    if SCALED:
        tl.store(chunk_scale_ptr + slot, scale)
    tl.store(chunk_power_ptr + slot, power)
    tl.store(chunk_nonfinite_ptr + slot, nonfinite)


@triton.jit(do_not_specialize=["norm_type_bits"])
def _partials_tensor_kernel(
    data_ptr,
    numel,
    first_slot,
    chunk_scale_ptr,
    chunk_power_ptr,
    chunk_nonfinite_ptr,
    norm_type_bits,
    NORM_KIND: tl.constexpr,
    SCALED: tl.constexpr,
    CHUNK_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One tensor, program c: the partials of slot first_slot + c = _chunk_partial(data, c, numel)."""
    chunk_index = tl.program_id(0).to(tl.int64)
    scale, power, nonfinite = _chunk_partial(
        data_ptr,
        chunk_index,
        numel,
        norm_type_bits,
        NORM_KIND,
        SCALED,
        CHUNK_SIZE,
        BLOCK_SIZE,
    )
    slot = first_slot + chunk_index
    if SCALED:
        tl.store(chunk_scale_ptr + slot, scale)
    tl.store(chunk_power_ptr + slot, power)
    tl.store(chunk_nonfinite_ptr + slot, nonfinite)


@triton.jit
def _reduce_segment(
    scale_ptr,
    power_ptr,
    nonfinite_ptr,
    begin,
    end,
    norm_type,
    NORM_KIND: tl.constexpr,
    SCALED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """The partials [begin, end) combined into one (scale, power, nonfinite); 0, 0, 0 for an empty
    segment. Fixed order: lane j takes i = begin + j, begin + j + BLOCK_SIZE, ... in sequence, then
    one fixed tree over the lanes.
    plain: power = sum power[i] (max for p = inf, NaN propagating), scale = 0 (unused);
    scaled: first scale = max scale[i] (NaN propagating), then power = sum power[i] *
    (scale[i] / scale)^p; (scale, 1) when scale is inf or NaN.
    """
    block = tl.arange(0, BLOCK_SIZE)
    accumulator = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
    nonfinite = tl.zeros([BLOCK_SIZE], dtype=tl.int32)
    if SCALED:
        largest = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
        for block_start in range(begin, end, BLOCK_SIZE):
            offsets = block_start + block
            mask = offsets < end
            scales = tl.load(scale_ptr + offsets, mask=mask, other=0.0)
            largest = tl.maximum(largest, scales, propagate_nan=tl.PropagateNan.ALL)
            nonfinite = tl.maximum(nonfinite, tl.load(nonfinite_ptr + offsets, mask=mask, other=0))
        scale = _max_keeping_nan(largest)
        ordinary = _is_ordinary_scale(scale)
        safe_scale = tl.where(ordinary, scale, 1.0)
        for block_start in range(begin, end, BLOCK_SIZE):
            offsets = block_start + block
            mask = offsets < end
            scales = tl.load(scale_ptr + offsets, mask=mask, other=0.0)
            sums = tl.load(power_ptr + offsets, mask=mask, other=0.0)
            # scales <= scale, so each ratio is in [0, 1]: the rescaled sums cannot overflow.
            accumulator += sums * _power_of_ratio(scales, safe_scale, norm_type, NORM_KIND)
        power = tl.where(ordinary, tl.sum(accumulator, axis=0), tl.where(scale == 0.0, 0.0, 1.0))
    else:
        scale = tl.full([], 0.0, dtype=tl.float64)
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
            power = _max_keeping_nan(accumulator)
        else:
            power = tl.sum(accumulator, axis=0)
    return scale, power, tl.max(nonfinite, axis=0)


@triton.jit
def _norm_of(scale, power, norm_type, NORM_KIND: tl.constexpr, SCALED: tl.constexpr):
    """The norm of a combined partial: scale * power^(1/p) (scaled), power^(1/p) (plain)."""
    if SCALED:
        norm = _scaled_norm(scale, power, norm_type, NORM_KIND)
    else:
        norm = _root(power, norm_type, NORM_KIND)
    return norm


@triton.jit
def _tensor_partial(
    chunk_scale_ptr,
    chunk_power_ptr,
    chunk_nonfinite_ptr,
    begin,
    end,
    tensor_index,
    tensor_scale_ptr,
    tensor_power_ptr,
    tensor_nonfinite_ptr,
    tensor_norm_ptr,
    norm_type_bits,
    NORM_KIND: tl.constexpr,
    SCALED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Tensor t's partial from its chunks' [begin, end), and its norm, tensor_norm[t]."""
    norm_type = _decode_float64(norm_type_bits)
    scale, power, nonfinite = _reduce_segment(
        chunk_scale_ptr,
        chunk_power_ptr,
        chunk_nonfinite_ptr,
        begin,
        end,
        norm_type,
        NORM_KIND,
        SCALED,
        BLOCK_SIZE,
    )
    if SCALED:
        tl.store(tensor_scale_ptr + tensor_index, scale)
    tl.store(tensor_power_ptr + tensor_index, power)
    tl.store(tensor_nonfinite_ptr + tensor_index, nonfinite)
    tl.store(tensor_norm_ptr + tensor_index, _norm_of(scale, power, norm_type, NORM_KIND, SCALED))


@triton.jit(do_not_specialize=["norm_type_bits"])
def _tensor_partials_table_kernel(
    chunk_scale_ptr,
    chunk_power_ptr,
    chunk_nonfinite_ptr,
    chunk_bases_ptr,
    tensor_scale_ptr,
    tensor_power_ptr,
    tensor_nonfinite_ptr,
    tensor_norm_ptr,
    norm_type_bits,
    NORM_KIND: tl.constexpr,
    SCALED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Program t: tensor t's partial and norm from the chunk partials [chunk_bases[t],
    chunk_bases[t + 1]) (a tensor's chunks have consecutive slots).
    """
    tensor_index = tl.program_id(0)
    _tensor_partial(
        chunk_scale_ptr,
        chunk_power_ptr,
        chunk_nonfinite_ptr,
        tl.load(chunk_bases_ptr + tensor_index),
        tl.load(chunk_bases_ptr + tensor_index + 1),
        tensor_index,
        tensor_scale_ptr,
        tensor_power_ptr,
        tensor_nonfinite_ptr,
        tensor_norm_ptr,
        norm_type_bits,
        NORM_KIND,
        SCALED,
        BLOCK_SIZE,
    )


@triton.jit(do_not_specialize=["norm_type_bits"])
def _tensor_partial_kernel(
    chunk_scale_ptr,
    chunk_power_ptr,
    chunk_nonfinite_ptr,
    begin,
    end,
    tensor_index,
    tensor_scale_ptr,
    tensor_power_ptr,
    tensor_nonfinite_ptr,
    tensor_norm_ptr,
    norm_type_bits,
    NORM_KIND: tl.constexpr,
    SCALED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One program: tensor t's partial and norm from the chunk partials [begin, end)."""
    _tensor_partial(
        chunk_scale_ptr,
        chunk_power_ptr,
        chunk_nonfinite_ptr,
        begin,
        end,
        tensor_index,
        tensor_scale_ptr,
        tensor_power_ptr,
        tensor_nonfinite_ptr,
        tensor_norm_ptr,
        norm_type_bits,
        NORM_KIND,
        SCALED,
        BLOCK_SIZE,
    )


@triton.jit(do_not_specialize=["norm_type_bits"])
def _total_norm_kernel(
    tensor_scale_ptr,
    tensor_power_ptr,
    tensor_nonfinite_ptr,
    num_tensors,
    raw_norm_ptr,
    found_inf_ptr,
    norm_type_bits,
    NORM_KIND: tl.constexpr,
    SCALED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One program: raw_norm = the norm of the tensors' partials combined in _reduce_segment's
    fixed order; found_inf = float32(max_t tensor_nonfinite[t]).
    """
    norm_type = _decode_float64(norm_type_bits)
    scale, power, nonfinite = _reduce_segment(
        tensor_scale_ptr,
        tensor_power_ptr,
        tensor_nonfinite_ptr,
        0,
        num_tensors,
        norm_type,
        NORM_KIND,
        SCALED,
        BLOCK_SIZE,
    )
    tl.store(raw_norm_ptr, _norm_of(scale, power, norm_type, NORM_KIND, SCALED))
    tl.store(found_inf_ptr, nonfinite.to(tl.float32))


@triton.jit(do_not_specialize=["max_norm_bits"])
def _finalize_kernel(
    raw_norm_ptr,
    inv_scale_ptr,
    total_norm_ptr,
    clip_coef_ptr,
    max_norm_bits,
    HAS_MAX_NORM: tl.constexpr,
    HAS_INV_SCALE: tl.constexpr,
):
    """One program, float64 throughout (norm.h's finalize_norm), each output rounded once:
    total_norm = raw_norm * |inv_scale|   (of total_norm's dtype)
    clip_coef = inv_scale * min(1, max_norm / (total_norm + 1e-6))   (float64; x > 1 ? 1 : x
    keeps NaN)
    """
    total_norm = tl.load(raw_norm_ptr).to(tl.float64)
    if HAS_INV_SCALE:
        inv_scale = tl.load(inv_scale_ptr).to(tl.float64)
        total_norm = total_norm * tl.abs(inv_scale)
    if HAS_MAX_NORM:
        # A float literal would be float32: the epsilon must be the float64 one.
        norm_eps = tl.full([], _NORM_EPS, dtype=tl.float64)
        ratio = _decode_float64(max_norm_bits) / (total_norm + norm_eps)
        clip_coef = tl.where(ratio > 1.0, 1.0, ratio)
    else:
        clip_coef = tl.full([], 1.0, dtype=tl.float64)
    if HAS_INV_SCALE:
        clip_coef = clip_coef * inv_scale
    tl.store(total_norm_ptr, total_norm.to(total_norm_ptr.dtype.element_ty))
    tl.store(clip_coef_ptr, clip_coef.to(tl.float64))


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
    of clip_coef and rounded once to g's dtype; NaN stays NaN through the clamp, as in
    torch.clamp.
    """
    chunk_start = chunk_index.to(tl.int64) * CHUNK_SIZE
    chunk_length = tl.minimum(numel - chunk_start, CHUNK_SIZE)
    is_full = chunk_length == CHUNK_SIZE
    if HAS_CLIP_VALUE:
        clip_value = _decode_float64(clip_value_bits).to(clip_coef.dtype)
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
            # Compares, as the C++ kernels: a NaN compares false and stays, and a zero keeps its
            # sign (maximum/minimum may return either zero of -0.0 and +0.0). The lower bound is
            # a product: triton 3.6 negates as 0 - x, which makes -(+0.0) +0.0.
            lower = clip_value * -1.0
            scaled = tl.where(scaled < lower, lower, scaled)
            scaled = tl.where(scaled > clip_value, clip_value, scaled)
        scaled = scaled.to(values.dtype)
        if is_full:
            tl.store(data_ptr + offsets, scaled)
        else:
            tl.store(data_ptr + offsets, scaled, mask=mask)


@triton.jit
def _needs_float64_product(clip_coef):
    """norm.h's needs_float64_product: nonzero, finite and outside float32's normal range."""
    magnitude = tl.abs(clip_coef.to(tl.float64))
    tiny = tl.full([], _FLOAT32_TINY, dtype=tl.float64)
    largest = tl.full([], _FLOAT32_MAX, dtype=tl.float64)
    finite = magnitude < float("inf")
    return (magnitude != 0.0) & finite & ((magnitude < tiny) | (magnitude > largest))


@triton.jit
def _scale_chunk_at_precision(
    data_ptr,
    chunk_index,
    numel,
    clip_coef_ptr,
    clip_value_bits,
    FLOAT64_TENSOR: tl.constexpr,
    HAS_CLIP_VALUE: tl.constexpr,
    CHUNK_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """_scale_chunk with the product in float64 for float64 tensors and for coefficients outside
    float32's normal range, else in float32; nothing is written when the coefficient is 1 and
    there is no clip_value.
    """
    clip_coef = tl.load(clip_coef_ptr).to(tl.float64)
    if FLOAT64_TENSOR:
        in_float64 = True
    else:
        in_float64 = _needs_float64_product(clip_coef)
    if HAS_CLIP_VALUE:
        writes = True
    else:
        # Whether the coefficient as applied is 1 (1 + 1e-12 is 1 in float32, not in float64).
        writes = tl.where(in_float64, clip_coef != 1.0, clip_coef.to(tl.float32) != 1.0)
    if writes:
        if in_float64:
            _scale_chunk(
                data_ptr,
                chunk_index,
                numel,
                clip_coef,
                clip_value_bits,
                HAS_CLIP_VALUE,
                CHUNK_SIZE,
                BLOCK_SIZE,
            )
        else:
            _scale_chunk(
                data_ptr,
                chunk_index,
                numel,
                clip_coef.to(tl.float32),
                clip_value_bits,
                HAS_CLIP_VALUE,
                CHUNK_SIZE,
                BLOCK_SIZE,
            )


@triton.jit(do_not_specialize=["clip_value_bits"])
def _scale_table_kernel(
    chunk_table_ptr,
    addresses_ptr,
    numels_ptr,
    clip_coef_ptr,
    clip_value_bits,
    DTYPE: tl.constexpr,
    FLOAT64_TENSOR: tl.constexpr,
    ALIGNED: tl.constexpr,
    HAS_CLIP_VALUE: tl.constexpr,
    CHUNK_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Program k takes row k = (tensor t, chunk c of t, slot) of chunk_table and applies
    _scale_chunk_at_precision to chunk c of tensor t.
    """
    row = chunk_table_ptr + tl.program_id(0).to(tl.int64) * 3
    tensor_index = tl.load(row)
    data_ptr = tl.load(addresses_ptr + tensor_index).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        data_ptr = tl.multiple_of(data_ptr, 16)
    _scale_chunk_at_precision(
        data_ptr,
        tl.load(row + 1),
        tl.load(numels_ptr + tensor_index),
        clip_coef_ptr,
        clip_value_bits,
        FLOAT64_TENSOR,
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
    FLOAT64_TENSOR: tl.constexpr,
    HAS_CLIP_VALUE: tl.constexpr,
    CHUNK_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One tensor, program c: _scale_chunk_at_precision on chunk c."""
    _scale_chunk_at_precision(
        data_ptr,
        tl.program_id(0),
        numel,
        clip_coef_ptr,
        clip_value_bits,
        FLOAT64_TENSOR,
        HAS_CLIP_VALUE,
        CHUNK_SIZE,
        BLOCK_SIZE,
    )


# Under TRITON_INTERPRET=1, triton.jit gives interpreter functions instead of JIT functions.
INTERPRETED = not isinstance(_chunk_partial, JITFunction)
