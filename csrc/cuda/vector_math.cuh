// The device maths of the CUDA kernels (chunk_passes.cuh): 16-byte vector loads and stores, dtype
// conversions, the read pass's accumulators (a plain float64 power sum, or norm.h's ScaledSum) and
// their fixed-order warp and block reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fusedclip/norm.h"

namespace fusedclip::cuda {

constexpr int kWarpSize = 32;
constexpr int kVectorBytes = 16;

template <typename T>
struct alignas(kVectorBytes) Vector {
  static constexpr int kSize = kVectorBytes / sizeof(T);
  T elements[kSize];
};

// The tables hold data pointers as integers, so the compiler cannot tell they are global and would
// emit generic 128-bit accesses; these say so (LDG.E.128 / STG.E.128).
template <typename T>
__device__ __forceinline__ Vector<T> load_read_only(const Vector<T>* address) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(address));  // nothing writes it meanwhile
  Vector<T> value;
  static_assert(sizeof(value) == sizeof(raw), "vector size");
  memcpy(&value, &raw, sizeof(raw));
  return value;
}

// Coherent at L2 (the single launch later writes what it reads here); unlike the volatile asm
// below, the compiler may predicate and schedule these loads.
template <typename T>
__device__ __forceinline__ Vector<T> load_through_l2(const Vector<T>* address) {
  const uint4 raw = __ldcg(reinterpret_cast<const uint4*>(address));
  Vector<T> value;
  memcpy(&value, &raw, sizeof(raw));
  return value;
}

// For scale_, which writes what it reads, so not through the read-only (non-coherent) path. The
// asm is volatile to keep program order: a thread's loads are all issued before its stores.
template <typename T>
__device__ __forceinline__ Vector<T> load_global(const Vector<T>* address) {
  uint4 raw;
  asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(raw.x), "=r"(raw.y), "=r"(raw.z), "=r"(raw.w)
               : "l"(address));
  Vector<T> value;
  memcpy(&value, &raw, sizeof(raw));
  return value;
}

template <typename T>
__device__ __forceinline__ void store_global(Vector<T>* address, const Vector<T>& value) {
  uint4 raw;
  memcpy(&raw, &value, sizeof(raw));
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(address), "r"(raw.x), "r"(raw.y),
               "r"(raw.z), "r"(raw.w)
               : "memory");
}

__device__ __forceinline__ double to_double(float x) { return static_cast<double>(x); }
__device__ __forceinline__ double to_double(double x) { return x; }
__device__ __forceinline__ double to_double(__half x) {
  return static_cast<double>(__half2float(x));
}
__device__ __forceinline__ double to_double(__nv_bfloat16 x) {
  return static_cast<double>(__bfloat162float(x));
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// The write pass's arithmetic type: float32 for 16- and 32-bit gradients, float64 for float64
// (and for any gradient when the coefficient needs it: norm.h's needs_float64_product).
template <typename T>
using ComputeType = std::conditional_t<std::is_same_v<T, double>, double, float>;

// x in the arithmetic type C (float or double): exact.
template <typename C, typename T>
__device__ __forceinline__ C to_compute(T x) {
  if constexpr (std::is_same_v<T, double>) {
    return x;
  } else {
    return static_cast<C>(to_float(x));
  }
}

// A float32 or float64 result rounded once to the gradient's dtype T.
template <typename T>
__device__ __forceinline__ T from_compute(float y) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(y);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(y);
  } else {
    return y;
  }
}
template <typename T>
__device__ __forceinline__ T from_compute(double y) {
  if constexpr (std::is_same_v<T, __half>) {
    return __double2half(y);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __double2bfloat16(y);
  } else {
    return static_cast<T>(y);
  }
}

// A float32 or float64 scalar behind `value`, as float64.
__device__ __forceinline__ double load_scalar(const void* value, bool is_double) {
  return is_double ? *static_cast<const double*>(value)
                   : static_cast<double>(*static_cast<const float*>(value));
}

/* The read pass's accumulators. Each holds kWords float64 words and provides:
 *   zero()                      the neutral value
 *   add(x, p)                   (+)= |x|^p for one element x
 *   merge(other, p)             (+)= other, deterministic for a fixed order
 *   shuffle_xor(lane_mask)      the value of lane (lane ^ lane_mask), whole warp
 *   store(words, i, stride) / load(words, i, stride) / load_l2(...)
 *                               word w of element i at words[w * stride + i]
 *   norm(p)                     the p-norm it stands for
 *   finite()                    whether it is finite, i.e. (where kFiniteForFiniteElements)
 *                               whether every element was
 */

// The plain float64 power sum: sum |g|^p (max |g| for p = inf), used where
// needs_scaled_sum(p, any_float64) is false: the hot path.
template <NormKind kKind>
struct PowerSum {
  static constexpr int kWords = 1;
  // Without a scaled sum, float64 gradients come only with p = 1 or p = inf: a sum of finite
  // float64 |g|^p can overflow (a max cannot), so their elements are tested one by one. For 16-
  // and 32-bit gradients the chunk's sum is finite exactly when its elements are (norm.h,
  // kMaxUnscaledNormType).
  template <typename T>
  static constexpr bool kFiniteForFiniteElements = !(sizeof(T) == 8 && kKind != NormKind::kInf);

  double power;

  __device__ __forceinline__ static PowerSum zero() { return {0.0}; }

  __device__ __forceinline__ void add(double x, double norm_type) {
    if constexpr (kKind == NormKind::kTwo) {
      power = fma(x, x, power);
    } else if constexpr (kKind == NormKind::kOne) {
      power += fabs(x);
    } else if constexpr (kKind == NormKind::kInf) {
      power = nan_max(power, fabs(x));
    } else {
      power += pow(fabs(x), norm_type);
    }
  }

  __device__ __forceinline__ void merge(const PowerSum& other, double /*norm_type*/) {
    if constexpr (kKind == NormKind::kInf) {
      power = nan_max(power, other.power);
    } else {
      power += other.power;
    }
  }

  __device__ __forceinline__ PowerSum shuffle_xor(int lane_mask) const {
    return {__shfl_xor_sync(0xffffffffu, power, lane_mask)};
  }

  __device__ __forceinline__ void store(double* words, int64_t index, int64_t /*stride*/) const {
    words[index] = power;
  }
  __device__ __forceinline__ static PowerSum load(const double* words, int64_t index,
                                                  int64_t /*stride*/) {
    return {words[index]};
  }
  // Through L2: other blocks of the same launch may have written the words.
  __device__ __forceinline__ static PowerSum load_l2(const double* words, int64_t index,
                                                     int64_t /*stride*/) {
    return {__ldcg(words + index)};
  }

  __device__ __forceinline__ double norm(double norm_type) const {
    return power_to_norm(power, kKind, norm_type);
  }
  __device__ __forceinline__ bool finite() const { return isfinite(power); }
};

// sum |g|^p as norm.h's ScaledSum (scale = max |g|, sum = sum (|g| / scale)^p), used where
// needs_scaled_sum(p, any_float64): finite for every finite input. Its scale is inf or NaN exactly
// when an element is, so no element needs a separate test.
struct ScaledPowerSum {
  static constexpr int kWords = 2;
  template <typename T>
  static constexpr bool kFiniteForFiniteElements = true;

  ScaledSum value;

  __device__ __forceinline__ static ScaledPowerSum zero() { return {ScaledSum{0.0, 0.0}}; }

  __device__ __forceinline__ void add(double x, double norm_type) { value.add(fabs(x), norm_type); }
  __device__ __forceinline__ void merge(const ScaledPowerSum& other, double norm_type) {
    value.merge(other.value, norm_type);
  }

  __device__ __forceinline__ ScaledPowerSum shuffle_xor(int lane_mask) const {
    return {ScaledSum{__shfl_xor_sync(0xffffffffu, value.scale, lane_mask),
                      __shfl_xor_sync(0xffffffffu, value.sum, lane_mask)}};
  }

  __device__ __forceinline__ void store(double* words, int64_t index, int64_t stride) const {
    words[index] = value.scale;
    words[stride + index] = value.sum;
  }
  __device__ __forceinline__ static ScaledPowerSum load(const double* words, int64_t index,
                                                        int64_t stride) {
    return {ScaledSum{words[index], words[stride + index]}};
  }
  __device__ __forceinline__ static ScaledPowerSum load_l2(const double* words, int64_t index,
                                                           int64_t stride) {
    return {ScaledSum{__ldcg(words + index), __ldcg(words + stride + index)}};
  }

  __device__ __forceinline__ double norm(double norm_type) const { return value.norm(norm_type); }
  __device__ __forceinline__ bool finite() const { return isfinite(value.scale); }
};

// Fixed butterfly: every lane ends with the same value, whatever the scheduling.
template <typename Accumulator>
__device__ __forceinline__ Accumulator warp_reduce(Accumulator value, double norm_type) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value.merge(value.shuffle_xor(offset), norm_type);
  }
  return value;
}

// Fixed-order tree over the block; the result is valid in thread 0. Every thread must call it,
// and the block must __syncthreads() before calling it again (the shared slots are reused).
template <typename Accumulator, int kBlock>
__device__ __forceinline__ Accumulator block_reduce(Accumulator value, double norm_type) {
  static_assert(kBlock % kWarpSize == 0 && kBlock <= kWarpSize * kWarpSize, "block size");
  constexpr int kWarps = kBlock / kWarpSize;
  // Raw words: a __shared__ array may not have a constructor, and ScaledSum has one.
  __shared__ double warp_words[Accumulator::kWords * kWarps];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  value = warp_reduce(value, norm_type);
  if (lane == 0) value.store(warp_words, warp, kWarps);
  __syncthreads();
  if (warp == 0) {
    value = lane < kWarps ? Accumulator::load(warp_words, lane, kWarps) : Accumulator::zero();
    value = warp_reduce(value, norm_type);
  }
  return value;
}

}  // namespace fusedclip::cuda
