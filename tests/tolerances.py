"""The one home of the test suite's sizes, tolerances and ulp tables (pytest-free, so that
standalone_cuda_check.py can import it too). Each number says where it comes from."""

from __future__ import annotations

import torch

# Gradient sizes of the op and API tests: 0 and 1; 3, a tail that no vector width divides; 4095,
# one short of a power of two; 65537, one past one (and one past a CPU chunk); and one that spans
# several chunks of every backend.
SIZES = [0, 1, 3, 4095, 65537, (1 << 20) + 5]
# Triton's CPU interpreter is slow: the same shapes, the largest only a few Triton chunks long.
INTERPRETED_SIZES = [0, 1, 3, 4095, 70001]
# Spans more than one chunk of every backend (CPU 65536, Triton 16384 elements) and fits the
# interpreter: for tests that need several chunks of one tensor but not a large input.
MULTI_CHUNK_SIZE = 3 * 65536 + 5
INTERPRETED_MULTI_CHUNK_SIZE = 70001
# Large enough that the CPU kernels split the chunks between threads (at::parallel_for gives a task
# at least 65536 elements of a large tensor), and odd.
PARALLEL_SIZE = (1 << 21) + 3

# reduce's raw_norm and per_tensor_norms against an exact or float64 oracle (csrc/README.md):
# a few float64 ulp times log2 of the element count, for every p and every backend.
RAW_NORM_RTOL = 1e-12

# A norm returned in the output dtype (the API's total_norm) against the float64 oracle, per
# gradient dtype: the kernels accumulate in float64, so what is left is the rounding to float32
# (or, for float64 gradients, float64 summation-order differences).
NORM_RTOL = {
    torch.float32: 1e-6,
    torch.float16: 1e-6,
    torch.bfloat16: 1e-6,
    torch.float64: 1e-12,
}

# One unit in the last place, per gradient dtype (2^-mantissa bits).
ULP = {
    torch.float32: 2.0**-23,
    torch.float16: 2.0**-10,
    torch.bfloat16: 2.0**-7,
    # A float64 gradient is clipped by a coefficient whose last bits depend on the (chunked, fixed)
    # summation order of the norm and on pow against the reference's formula: 16 ulp of it.
    torch.float64: 16 * 2.0**-52,
}
# Clipped gradients: within this many ULP of the oracle's result rounded to the gradient's dtype
# (the kernels form the product in float32 where the reference forms it in float64 and rounds).
GRAD_ULPS = 2

# finalize's outputs against the reference: both compute the same float64 formula, in the same
# order; 1e-15 leaves room for nothing but a libm difference.
FINALIZE_RTOL = 1e-15
