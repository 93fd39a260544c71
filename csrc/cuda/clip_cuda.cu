// CUDA kernels of fusedclip::reduce, finalize, scale_ and clip_ (contract: csrc/README.md;
// oracle: fusedclip/reference.py). Gradients are walked through the multi-tensor table of
// multi_tensor.cuh in fixed-size chunks of one tensor. The split path runs one block per chunk,
// one launch per dtype group and pass; clip_'s single-launch path runs every pass in one
// cooperative launch. Both compute each chunk with the same device functions and combine in the
// same order, so their results are bit-identical.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <fusedclip/checks.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

#include "multi_tensor.cuh"

namespace fusedclip::cuda {
namespace {

constexpr int kWarpSize = 32;
// One block size for every kernel: the single-launch kernel runs each pass's per-chunk code with
// the block shape the split kernels use, which keeps the two paths' results bit-identical.
constexpr int kBlock = 256;
// 16-byte vectors each thread keeps in flight per loop iteration.
constexpr int kUnroll = 4;
constexpr int kVectorBytes = 16;

static_assert(kChunkElements * 2 % kVectorBytes == 0,
              "a chunk must start at the same 16-byte alignment as its tensor");

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

template <typename T>
__device__ __forceinline__ T from_compute(float x);
template <>
__device__ __forceinline__ float from_compute<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_compute<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_compute<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
__device__ __forceinline__ double to_compute(double x) { return x; }
template <typename T>
__device__ __forceinline__ float to_compute(T x) {
  return to_float(x);
}
template <typename T>
__device__ __forceinline__ T from_compute(double x) {
  return x;
}

enum class NormKind { kOne, kTwo, kInf, kGeneral };

NormKind norm_kind(double norm_type) {
  if (std::isinf(norm_type)) return NormKind::kInf;
  if (norm_type == 2.0) return NormKind::kTwo;
  if (norm_type == 1.0) return NormKind::kOne;
  return NormKind::kGeneral;
}

// max that keeps NaN (fmax would drop it); a is the running value.
__device__ __forceinline__ double nan_max(double a, double b) {
  return (b > a || isnan(b)) ? b : a;
}

template <NormKind kKind>
__device__ __forceinline__ double combine(double a, double b) {
  if constexpr (kKind == NormKind::kInf) {
    return nan_max(a, b);
  } else {
    return a + b;
  }
}

// acc (+)= |x|^p, with (+) the max for p = inf.
template <NormKind kKind>
__device__ __forceinline__ double accumulate(double acc, double x, double norm_type) {
  if constexpr (kKind == NormKind::kTwo) {
    return fma(x, x, acc);
  } else if constexpr (kKind == NormKind::kOne) {
    return acc + fabs(x);
  } else if constexpr (kKind == NormKind::kInf) {
    return nan_max(acc, fabs(x));
  } else {
    return acc + pow(fabs(x), norm_type);
  }
}

// Fixed butterfly: every lane ends with the same bits, whatever the scheduling.
template <NormKind kKind>
__device__ __forceinline__ double warp_reduce(double value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value = combine<kKind>(value, __shfl_xor_sync(0xffffffffu, value, offset));
  }
  return value;
}

// Fixed-order tree over the block; the result is valid in thread 0. Every thread must call it.
template <NormKind kKind, int kBlock>
__device__ __forceinline__ double block_reduce(double value) {
  static_assert(kBlock % kWarpSize == 0 && kBlock <= kWarpSize * kWarpSize, "block size");
  __shared__ double warp_values[kBlock / kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  value = warp_reduce<kKind>(value);
  if (lane == 0) warp_values[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < kBlock / kWarpSize ? warp_values[lane] : 0.0;  // 0 is neutral: |g|^p >= 0
    value = warp_reduce<kKind>(value);
  }
  return value;
}

// The slice of one tensor that block `chunk` owns: data, element count (<= kChunkElements) and
// the number of leading elements before the first 16-byte boundary.
template <typename T>
struct ChunkSpan {
  T* data;
  int size;
  int head;
};

template <typename T>
__device__ __forceinline__ ChunkSpan<T> chunk_span(const MultiTensorTable& table, int64_t chunk) {
  constexpr int kVec = Vector<T>::kSize;
  const int tensor = table.chunk_tensor[chunk];
  const int64_t start = (chunk - table.first_chunk[tensor]) * kChunkElements;  // 64-bit offsets
  const int64_t remaining = table.numels[tensor] - start;
  ChunkSpan<T> span;
  span.data = reinterpret_cast<T*>(table.data_ptrs[tensor]) + start;
  span.size = static_cast<int>(remaining < kChunkElements ? remaining : kChunkElements);
  const int misaligned = static_cast<int>(reinterpret_cast<uintptr_t>(span.data) % kVectorBytes) /
                         static_cast<int>(sizeof(T));
  span.head = misaligned == 0 ? 0 : min(kVec - misaligned, span.size);
  return span;
}

// Sums of |g|^p of 16- and 32-bit values in float64 cannot overflow for p <= 2 (and a max never
// does), so there the partial itself says whether an element was inf or NaN; otherwise (float64
// input, or p > 2 where |g|^p of a finite g can overflow) each element is tested.
template <typename T, NormKind kKind>
constexpr bool kTestElements =
    kKind == NormKind::kGeneral || (sizeof(T) == 8 && kKind != NormKind::kInf);

template <typename T>
struct TypeTag {
  using type = T;
};

// The arithmetic type of the write pass: float32 for 16- and 32-bit gradients, float64 for float64.
template <typename T>
using ComputeType = std::conditional_t<std::is_same_v<T, double>, double, float>;

/* chunk_power[chunk] = sum over the chunk of |g|^p (max |g| for p = inf), float64;
 * chunk_nonfinite[chunk] = 1.0 if the chunk holds an inf or NaN, else 0.0.
 * Run by a whole block. Per-thread order and the block tree are fixed by kBlock and kUnroll, so
 * the partial's bits depend only on the chunk's values. kReadOnly loads through the non-coherent
 * path, which is allowed only when nothing writes the gradients during the kernel; otherwise
 * through L2. */
template <typename T, NormKind kKind, bool kReadOnly>
__device__ __forceinline__ void reduce_chunk(const MultiTensorTable& table, int64_t chunk,
                                             double norm_type, double* chunk_power,
                                             double* chunk_nonfinite) {
  constexpr int kVec = Vector<T>::kSize;
  constexpr bool kTest = kTestElements<T, kKind>;
  const ChunkSpan<T> span = chunk_span<T>(table, chunk);
  const int num_vectors = (span.size - span.head) / kVec;
  const int tail_begin = span.head + num_vectors * kVec;
  const Vector<T>* vectors = reinterpret_cast<const Vector<T>*>(span.data + span.head);

  double acc[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) acc[u] = 0.0;
  bool nonfinite = false;

  for (int base = threadIdx.x; base < num_vectors; base += kBlock * kUnroll) {
    Vector<T> loaded[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int index = base + u * kBlock;
      if (index < num_vectors) {
        loaded[u] = kReadOnly ? load_read_only(vectors + index) : load_through_l2(vectors + index);
      } else {
        loaded[u] = Vector<T>{};  // zeros: neutral for every kind
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const double x = to_double(loaded[u].elements[e]);
        acc[u] = accumulate<kKind>(acc[u], x, norm_type);
        if constexpr (kTest) nonfinite |= !isfinite(x);
      }
    }
  }
  // Misaligned head and the tail past the last whole vector: fewer than kVec elements each.
  const int scalar_index = threadIdx.x < span.head ? threadIdx.x : tail_begin + threadIdx.x - kVec;
  if (threadIdx.x < span.head || (threadIdx.x >= kVec && scalar_index < span.size)) {
    const double x = to_double(span.data[scalar_index]);
    acc[0] = accumulate<kKind>(acc[0], x, norm_type);
    if constexpr (kTest) nonfinite |= !isfinite(x);
  }

  double thread_value = acc[0];
#pragma unroll
  for (int u = 1; u < kUnroll; ++u) thread_value = combine<kKind>(thread_value, acc[u]);
  const double chunk_value = block_reduce<kKind, kBlock>(thread_value);
  if constexpr (kTest) {
    nonfinite = __syncthreads_or(nonfinite);
  }
  if (threadIdx.x == 0) {
    if constexpr (!kTest) nonfinite = !isfinite(chunk_value);
    chunk_power[chunk] = chunk_value;
    chunk_nonfinite[chunk] = nonfinite ? 1.0 : 0.0;
  }
  __syncthreads();  // block_reduce's shared slots are reused by the block's next chunk
}

/* Run by a whole block: (+) over every chunk's partial in chunk order (thread t takes chunks t,
 * t + kBlock, ..., then the fixed block tree), valid in thread 0; *nonfinite (every thread) says
 * whether any chunk was flagged. Loads go to L2: other blocks of the same launch may have written
 * the partials. */
template <NormKind kKind>
__device__ __forceinline__ double combine_chunks(int64_t num_chunks, const double* chunk_power,
                                                 const double* chunk_nonfinite, bool* nonfinite) {
  double acc = 0.0;
  bool any = false;
#pragma unroll 8
  for (int64_t c = threadIdx.x; c < num_chunks; c += kBlock) {
    acc = combine<kKind>(acc, __ldcg(chunk_power + c));
    any |= __ldcg(chunk_nonfinite + c) != 0.0;
  }
  acc = block_reduce<kKind, kBlock>(acc);
  *nonfinite = __syncthreads_or(any);
  return acc;
}

/* Run by a whole warp: (+) over the partials of tensor's contiguous chunks (lane l takes chunks
 * l, l + 32, ..., then the fixed butterfly), valid in every lane. */
template <NormKind kKind>
__device__ __forceinline__ double combine_tensor_chunks(const MultiTensorTable& table,
                                                        int64_t tensor, const double* chunk_power) {
  const int64_t first = table.first_chunk[tensor];
  const int64_t end = first + chunk_count(table.numels[tensor]);
  double acc = 0.0;
#pragma unroll 8  // loads in flight; the additions keep their order
  for (int64_t c = first + threadIdx.x % kWarpSize; c < end; c += kWarpSize) {
    acc = combine<kKind>(acc, __ldcg(chunk_power + c));
  }
  return warp_reduce<kKind>(acc);
}

// The scalar epilogue's inputs and where its outputs go.
struct FinalizeArgs {
  double norm_type;
  bool has_max_norm;
  double max_norm;
  const void* inv_scale;  // nullptr: no unscaling
  bool inv_scale_is_double;
  bool out_is_double;  // total_norm and clip_coef are float64, else float32
  void* total_norm;
  void* clip_coef;
};

// Both already rounded to the output dtype (held as double).
struct Finalized {
  double norm;
  double coef;
};

/* total_norm = power_sum^(1/p) * |inv_scale|  (power_sum for p = inf);
 * clip_coef  = inv_scale * min(1, max_norm / (total_norm + 1e-6)), NaN-propagating; all float64,
 * rounded once to the output dtype. */
__device__ Finalized finalize_values(double power, const FinalizeArgs& args) {
  double norm;
  if (isinf(args.norm_type)) {
    norm = power;
  } else if (args.norm_type == 2.0) {
    norm = sqrt(power);
  } else if (args.norm_type == 1.0) {
    norm = power;
  } else {
    norm = pow(power, 1.0 / args.norm_type);
  }
  double inv = 1.0;
  if (args.inv_scale != nullptr) {
    inv = args.inv_scale_is_double
              ? *static_cast<const double*>(args.inv_scale)
              : static_cast<double>(*static_cast<const float*>(args.inv_scale));
    norm *= fabs(inv);
  }
  double coef = 1.0;
  if (args.has_max_norm) {
    const double ratio = args.max_norm / (norm + 1e-6);
    coef = ratio > 1.0 ? 1.0 : ratio;  // keeps NaN, like clamp(max=1)
  }
  coef *= inv;
  if (args.out_is_double) return {norm, coef};
  return {static_cast<float>(norm), static_cast<float>(coef)};
}

__device__ void store_finalized(const Finalized& result, const FinalizeArgs& args) {
  if (args.out_is_double) {
    *static_cast<double*>(args.total_norm) = result.norm;
    *static_cast<double*>(args.clip_coef) = result.coef;
  } else {
    *static_cast<float*>(args.total_norm) = static_cast<float>(result.norm);
    *static_cast<float*>(args.clip_coef) = static_cast<float>(result.coef);
  }
}

template <typename C>
__device__ __forceinline__ C scale_and_clamp(C x, C coef, C clip_value) {
  const C y = x * coef;
  if (isnan(y)) return y;  // torch.clamp keeps NaN; fmin/fmax would not
  return y > clip_value ? clip_value : (y < -clip_value ? -clip_value : y);
}

/* g = clamp(g * coef, -bound, bound) over one chunk (no clamp unless kClamp), in ComputeType<T>,
 * rounded to g's dtype. Run by a whole block. */
template <typename T, bool kClamp>
__device__ __forceinline__ void scale_chunk(const MultiTensorTable& table, int64_t chunk,
                                            ComputeType<T> coef, ComputeType<T> bound) {
  using C = ComputeType<T>;
  constexpr int kVec = Vector<T>::kSize;
  const ChunkSpan<T> span = chunk_span<T>(table, chunk);
  const int num_vectors = (span.size - span.head) / kVec;
  const int tail_begin = span.head + num_vectors * kVec;
  Vector<T>* vectors = reinterpret_cast<Vector<T>*>(span.data + span.head);

  auto apply = [&](T x) -> T {
    const C c = to_compute(x);
    return from_compute<T>(kClamp ? scale_and_clamp<C>(c, coef, bound) : c * coef);
  };

  // Whole groups of kUnroll vectors per thread without bounds predicates, then the rest one by one.
  const int whole_groups_end = num_vectors - (kUnroll - 1) * kBlock;
  int base = threadIdx.x;
  for (; base < whole_groups_end; base += kBlock * kUnroll) {
    Vector<T> loaded[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) loaded[u] = load_global(vectors + base + u * kBlock);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) loaded[u].elements[e] = apply(loaded[u].elements[e]);
      store_global(vectors + base + u * kBlock, loaded[u]);
    }
  }
  for (int index = base; index < num_vectors; index += kBlock) {
    Vector<T> loaded = load_global(vectors + index);
#pragma unroll
    for (int e = 0; e < kVec; ++e) loaded.elements[e] = apply(loaded.elements[e]);
    store_global(vectors + index, loaded);
  }
  const int scalar_index = threadIdx.x < span.head ? threadIdx.x : tail_begin + threadIdx.x - kVec;
  if (threadIdx.x < span.head || (threadIdx.x >= kVec && scalar_index < span.size)) {
    span.data[scalar_index] = apply(span.data[scalar_index]);
  }
}

// Split path: one block per chunk of dtype group T, chunk = chunk_offset + blockIdx.x.
template <typename T, NormKind kKind>
__global__ void __launch_bounds__(kBlock)
    power_partial_kernel(MultiTensorTable table, int64_t chunk_offset, double norm_type,
                         double* __restrict__ chunk_power, double* __restrict__ chunk_nonfinite) {
  reduce_chunk<T, kKind, /*kReadOnly=*/true>(table, chunk_offset + blockIdx.x, norm_type,
                                             chunk_power, chunk_nonfinite);
}

// Block 0: power_sum and found_inf. Blocks 1..: one warp per tensor, per_tensor_power[tensor].
template <NormKind kKind>
__global__ void __launch_bounds__(kBlock)
    combine_partials_kernel(MultiTensorTable table, const double* __restrict__ chunk_power,
                            const double* __restrict__ chunk_nonfinite,
                            double* __restrict__ power_sum, float* __restrict__ found_inf,
                            double* __restrict__ per_tensor_power) {
  if (blockIdx.x == 0) {
    bool nonfinite;
    const double total =
        combine_chunks<kKind>(table.num_chunks, chunk_power, chunk_nonfinite, &nonfinite);
    if (threadIdx.x == 0) {
      *power_sum = total;
      *found_inf = nonfinite ? 1.0f : 0.0f;
    }
    return;
  }
  constexpr int kWarps = kBlock / kWarpSize;
  const int64_t tensor = static_cast<int64_t>(blockIdx.x - 1) * kWarps + threadIdx.x / kWarpSize;
  if (tensor >= table.num_tensors) return;  // warp-uniform
  const double value = combine_tensor_chunks<kKind>(table, tensor, chunk_power);
  if (threadIdx.x % kWarpSize == 0) per_tensor_power[tensor] = value;
}

// One thread.
__global__ void finalize_kernel(const double* __restrict__ power_sum, FinalizeArgs args) {
  store_finalized(finalize_values(*power_sum, args), args);
}

__device__ __forceinline__ double load_coefficient(const void* clip_coef, bool coef_is_double) {
  return coef_is_double ? *static_cast<const double*>(clip_coef)
                        : static_cast<double>(*static_cast<const float*>(clip_coef));
}

// Split path write: each block first reads clip_coef and, when it is exactly 1 and there is no
// clamp, returns without touching memory.
template <typename T, bool kClamp>
__global__ void __launch_bounds__(kBlock)
    scale_kernel(MultiTensorTable table, int64_t chunk_offset, const void* clip_coef,
                 bool coef_is_double, double clip_value) {
  using C = ComputeType<T>;
  const double coef = load_coefficient(clip_coef, coef_is_double);
  if (!kClamp && coef == 1.0) return;
  scale_chunk<T, kClamp>(table, chunk_offset + blockIdx.x, static_cast<C>(coef),
                         kClamp ? static_cast<C>(clip_value) : C(0));
}

// Calls fn(TypeTag<T>{}) with T the element type of dtype group `group` (the order of
// dtype_group in multi_tensor_table.cu). Host launchers and the single-launch kernel share it.
#pragma nv_exec_check_disable
template <typename Fn>
__host__ __device__ __forceinline__ void dispatch_group(int group, Fn&& fn) {
  switch (group) {
    case 0:
      fn(TypeTag<float>{});
      break;
    case 1:
      fn(TypeTag<__half>{});
      break;
    case 2:
      fn(TypeTag<__nv_bfloat16>{});
      break;
    default:
      fn(TypeTag<double>{});
      break;
  }
}

// The dtype group that owns `chunk`: groups hold consecutive ranges of chunks.
__device__ __forceinline__ int chunk_group(const int64_t* group_first_chunk, int64_t chunk) {
  int group = 0;
  while (group + 1 < kNumDtypeGroups && chunk >= group_first_chunk[group + 1]) ++group;
  return group;
}

struct SingleLaunchArgs {
  MultiTensorTable table;
  int64_t group_first_chunk[kNumDtypeGroups + 1];
  double* chunk_power;
  double* chunk_nonfinite;
  float* found_inf;
  double* per_tensor_power;  // nullptr: not asked for
  FinalizeArgs finalize;
  double clip_value;
};

/* reduce, finalize and scale_ in one cooperative launch of co-resident blocks. Block b reduces
 * chunks b, b + gridDim.x, ...; after the grid barrier every block combines all the partials
 * itself, in combine_partials_kernel's order, so each gets the same bits and no second barrier is
 * needed; block 0 stores the results, the grid's warps combine the per-tensor partials, and each
 * block scales the chunks it reduced (for gradient sets that fit in L2 they are still there). */
template <NormKind kKind, bool kClamp>
__global__ void __launch_bounds__(kBlock) single_launch_clip_kernel(SingleLaunchArgs args) {
  const MultiTensorTable& table = args.table;
  for (int64_t chunk = blockIdx.x; chunk < table.num_chunks; chunk += gridDim.x) {
    dispatch_group(chunk_group(args.group_first_chunk, chunk), [&](auto tag) {
      using T = typename decltype(tag)::type;
      reduce_chunk<T, kKind, /*kReadOnly=*/false>(table, chunk, args.finalize.norm_type,
                                                  args.chunk_power, args.chunk_nonfinite);
    });
  }
  cooperative_groups::this_grid().sync();

  __shared__ double coefficient;
  bool nonfinite;
  const double power =
      combine_chunks<kKind>(table.num_chunks, args.chunk_power, args.chunk_nonfinite, &nonfinite);
  if (threadIdx.x == 0) {
    const Finalized result = finalize_values(power, args.finalize);
    if (blockIdx.x == 0) {
      store_finalized(result, args.finalize);
      *args.found_inf = nonfinite ? 1.0f : 0.0f;
    }
    coefficient = result.coef;
  }
  __syncthreads();
  const double coef = coefficient;

  if (args.per_tensor_power != nullptr) {
    constexpr int kWarps = kBlock / kWarpSize;
    const int64_t warps_in_grid = static_cast<int64_t>(gridDim.x) * kWarps;
    for (int64_t tensor = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
         tensor < table.num_tensors; tensor += warps_in_grid) {  // warp-uniform
      const double value = combine_tensor_chunks<kKind>(table, tensor, args.chunk_power);
      if (threadIdx.x % kWarpSize == 0) args.per_tensor_power[tensor] = value;
    }
  }

  if (!kClamp && coef == 1.0) return;
  for (int64_t chunk = blockIdx.x; chunk < table.num_chunks; chunk += gridDim.x) {
    dispatch_group(chunk_group(args.group_first_chunk, chunk), [&](auto tag) {
      using T = typename decltype(tag)::type;
      using C = ComputeType<T>;
      scale_chunk<T, kClamp>(table, chunk, static_cast<C>(coef),
                             kClamp ? static_cast<C>(args.clip_value) : C(0));
    });
  }
}

template <typename Fn>
void dispatch_norm_kind(NormKind kind, Fn&& fn) {
  switch (kind) {
    case NormKind::kOne:
      fn(std::integral_constant<NormKind, NormKind::kOne>{});
      break;
    case NormKind::kTwo:
      fn(std::integral_constant<NormKind, NormKind::kTwo>{});
      break;
    case NormKind::kInf:
      fn(std::integral_constant<NormKind, NormKind::kInf>{});
      break;
    default:
      fn(std::integral_constant<NormKind, NormKind::kGeneral>{});
      break;
  }
}

// Raw-pointer launchers: everything is enqueued on `stream`.

// chunk_power, chunk_nonfinite: [layout.table.num_chunks] float64 each;
// per_tensor_power: [num_tensors] float64 or nullptr.
void launch_reduce(const MultiTensorLayout& layout, double norm_type, double* chunk_power,
                   double* chunk_nonfinite, double* power_sum, float* found_inf,
                   double* per_tensor_power, cudaStream_t stream) {
  dispatch_norm_kind(norm_kind(norm_type), [&](auto kind_constant) {
    constexpr NormKind kKind = decltype(kind_constant)::value;
    for (int group = 0; group < kNumDtypeGroups; ++group) {
      const int64_t chunks = layout.group_chunks(group);
      if (chunks == 0) continue;
      dispatch_group(group, [&](auto tag) {
        using T = typename decltype(tag)::type;
        power_partial_kernel<T, kKind><<<static_cast<unsigned>(chunks), kBlock, 0, stream>>>(
            layout.table, layout.group_first_chunk[group], norm_type, chunk_power, chunk_nonfinite);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    constexpr int kTensorsPerBlock = kBlock / kWarpSize;
    const int64_t per_tensor_blocks =
        per_tensor_power == nullptr
            ? 0
            : (layout.table.num_tensors + kTensorsPerBlock - 1) / kTensorsPerBlock;
    combine_partials_kernel<kKind>
        <<<static_cast<unsigned>(1 + per_tensor_blocks), kBlock, 0, stream>>>(
            layout.table, chunk_power, chunk_nonfinite, power_sum, found_inf, per_tensor_power);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_scale_(const MultiTensorLayout& layout, const void* clip_coef, bool coef_is_double,
                   std::optional<double> clip_value, cudaStream_t stream) {
  for (int group = 0; group < kNumDtypeGroups; ++group) {
    const int64_t chunks = layout.group_chunks(group);
    if (chunks == 0) continue;
    dispatch_group(group, [&](auto tag) {
      using T = typename decltype(tag)::type;
      const dim3 grid(static_cast<unsigned>(chunks));
      const int64_t offset = layout.group_first_chunk[group];
      if (clip_value.has_value()) {
        scale_kernel<T, true><<<grid, kBlock, 0, stream>>>(layout.table, offset, clip_coef,
                                                           coef_is_double, *clip_value);
      } else {
        scale_kernel<T, false>
            <<<grid, kBlock, 0, stream>>>(layout.table, offset, clip_coef, coef_is_double, 0.0);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

void launch_finalize(const double* power_sum, const FinalizeArgs& args, cudaStream_t stream) {
  finalize_kernel<<<1, 1, 0, stream>>>(power_sum, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// What the single-launch path needs to know of a device.
struct DeviceLimits {
  int sm_count;
  bool cooperative_launch;
  int64_t l2_bytes;
};

const DeviceLimits& device_limits(int device) {
  static std::mutex mutex;
  static std::map<int, DeviceLimits> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  auto [entry, inserted] = cache.try_emplace(device);
  if (inserted) {
    int cooperative = 0;
    int l2_bytes = 0;
    C10_CUDA_CHECK(
        cudaDeviceGetAttribute(&entry->second.sm_count, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device));
    entry->second.cooperative_launch = cooperative != 0;
    entry->second.l2_bytes = l2_bytes;
  }
  return entry->second;
}

// How many blocks of `kernel` fit on one SM at once (a cooperative grid may hold no more than
// this times the SM count); queried once per kernel and device.
int resident_blocks_per_sm(const void* kernel, int device) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  auto [entry, inserted] = cache.try_emplace({kernel, device}, 0);
  if (inserted) {
    C10_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&entry->second, kernel, kBlock, 0));
  }
  return entry->second;
}

// The whole clip in one cooperative launch; the grid is every chunk or every block that can be
// resident at once, whichever is fewer.
void launch_single_clip(const SingleLaunchArgs& args, bool clamp, double norm_type, int device,
                        cudaStream_t stream) {
  dispatch_norm_kind(norm_kind(norm_type), [&](auto kind_constant) {
    constexpr NormKind kKind = decltype(kind_constant)::value;
    const void* kernel =
        clamp ? reinterpret_cast<const void*>(single_launch_clip_kernel<kKind, true>)
              : reinterpret_cast<const void*>(single_launch_clip_kernel<kKind, false>);
    const int64_t resident = static_cast<int64_t>(resident_blocks_per_sm(kernel, device)) *
                             device_limits(device).sm_count;
    TORCH_CHECK(resident > 0,
                "the single-launch clip kernel does not fit on an SM of cuda:", text(device),
                "; use launch='split'");
    const int64_t grid = std::max<int64_t>(1, std::min(args.table.num_chunks, resident));
    void* params[] = {const_cast<SingleLaunchArgs*>(&args)};
    C10_CUDA_CHECK(cudaLaunchCooperativeKernel(kernel, dim3(static_cast<unsigned>(grid)),
                                               dim3(kBlock), params, 0, stream));
  });
}

// Host wrappers.

void check_on_cuda(at::TensorList tensors, const char* name) {
  TORCH_CHECK(tensors[0].is_cuda(), name, "[0] is on ", tensors[0].device(),
              "; the CUDA kernels need CUDA tensors");
}

FinalizeArgs finalize_args(double norm_type, std::optional<double> max_norm,
                           const std::optional<at::Tensor>& inv_scale, at::Tensor& total_norm,
                           at::Tensor& clip_coef) {
  FinalizeArgs args;
  args.norm_type = norm_type;
  args.has_max_norm = max_norm.has_value();
  args.max_norm = max_norm.value_or(0.0);
  args.inv_scale = inv_scale.has_value() ? inv_scale->const_data_ptr() : nullptr;
  args.inv_scale_is_double = inv_scale.has_value() && inv_scale->scalar_type() == at::kDouble;
  args.out_is_double = total_norm.scalar_type() == at::kDouble;
  args.total_norm = total_norm.data_ptr();
  args.clip_coef = clip_coef.data_ptr();
  return args;
}

// [0, c): chunk_power, [c, 2c): chunk_nonfinite, for the c chunks of `layout`.
at::Tensor empty_chunk_partials(const MultiTensorLayout& layout, const at::TensorOptions& options) {
  return at::empty({2 * layout.table.num_chunks}, options.dtype(at::kDouble));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> reduce_cuda(at::TensorList tensors, double norm_type,
                                                           bool per_tensor) {
  check_gradient_list(tensors, "tensors");
  check_on_cuda(tensors, "tensors");
  check_norm_type(norm_type);
  const c10::cuda::CUDAGuard device_guard(tensors[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream(tensors[0].device().index());
  const auto layout = get_multi_tensor_layout(tensors, stream);

  const auto f64 = tensors[0].options().dtype(at::kDouble);
  at::Tensor partials = empty_chunk_partials(*layout, f64);
  at::Tensor power_sum = at::empty({}, f64);
  at::Tensor found_inf = at::empty({}, f64.dtype(at::kFloat));
  at::Tensor per_tensor_power = at::empty({per_tensor ? layout->table.num_tensors : 0}, f64);
  double* chunk_power = partials.data_ptr<double>();
  launch_reduce(*layout, norm_type, chunk_power, chunk_power + layout->table.num_chunks,
                power_sum.data_ptr<double>(), found_inf.data_ptr<float>(),
                per_tensor ? per_tensor_power.data_ptr<double>() : nullptr, stream.stream());
  return {power_sum, found_inf, per_tensor_power};
}

std::tuple<at::Tensor, at::Tensor> finalize_cuda(const at::Tensor& power_sum, double norm_type,
                                                 std::optional<double> max_norm,
                                                 const std::optional<at::Tensor>& inv_scale,
                                                 at::ScalarType out_dtype) {
  TORCH_CHECK(power_sum.is_cuda(), "power_sum is on ", power_sum.device(),
              "; the CUDA kernel needs a CUDA tensor");
  TORCH_CHECK(power_sum.scalar_type() == at::kDouble,
              "power_sum must be float64 (the output of reduce), got ", power_sum.scalar_type());
  TORCH_CHECK(power_sum.numel() == 1, "power_sum must hold one element, got ",
              text(power_sum.numel()));
  check_norm_type(norm_type);
  check_out_dtype(out_dtype);
  if (inv_scale.has_value()) check_scalar_tensor(*inv_scale, "inv_scale", power_sum.device());
  const c10::cuda::CUDAGuard device_guard(power_sum.device());
  const auto stream = c10::cuda::getCurrentCUDAStream(power_sum.device().index());

  const auto options = power_sum.options().dtype(out_dtype);
  at::Tensor total_norm = at::empty({}, options);
  at::Tensor clip_coef = at::empty({}, options);
  const at::Tensor power = power_sum.contiguous();
  launch_finalize(power.const_data_ptr<double>(),
                  finalize_args(norm_type, max_norm, inv_scale, total_norm, clip_coef),
                  stream.stream());
  return {total_norm, clip_coef};
}

void scale_cuda(at::TensorList tensors, const at::Tensor& clip_coef,
                std::optional<double> clip_value) {
  check_gradient_list(tensors, "tensors");
  check_on_cuda(tensors, "tensors");
  check_scalar_tensor(clip_coef, "clip_coef", tensors[0].device());
  check_clip_value(clip_value);
  const c10::cuda::CUDAGuard device_guard(tensors[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream(tensors[0].device().index());
  const auto layout = get_multi_tensor_layout(tensors, stream);
  launch_scale_(*layout, clip_coef.const_data_ptr(), clip_coef.scalar_type() == at::kDouble,
                clip_value, stream.stream());
}

// launch="auto" takes the single launch up to two thirds of L2, where the write pass still finds
// the gradients in L2 beside whatever else lives there. The single launch saves the split path's
// three kernel boundaries and, in eager mode, three host launches: on an H100 (50 MB L2) it ran
// 1.1-1.5x faster eager and 0.96-1.3x in graph replay up to 32 MB, and 0.90-0.94x in replay at
// 48 MB (python -m bench.launch; bench/results/launch-*.json).
bool single_launch_chosen(Launch launch, at::TensorList tensors, int device) {
  if (launch == Launch::kSplit) return false;
  const DeviceLimits& limits = device_limits(device);
  if (launch == Launch::kSingle) {
    TORCH_CHECK(limits.cooperative_launch,
                "launch='single' needs cooperative launch, which cuda:", text(device),
                " does not support; use launch='auto'");
    return true;
  }
  if (!limits.cooperative_launch) return false;
  int64_t bytes = 0;
  for (const auto& t : tensors) bytes += t.numel() * static_cast<int64_t>(t.element_size());
  return 3 * bytes <= 2 * limits.l2_bytes;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> clip_cuda(
    at::TensorList tensors, double norm_type, std::optional<double> max_norm,
    const std::optional<at::Tensor>& inv_scale, std::optional<double> clip_value,
    at::ScalarType out_dtype, bool per_tensor, c10::string_view launch) {
  const Launch launch_mode = parse_launch(launch);
  check_gradient_list(tensors, "tensors");
  check_on_cuda(tensors, "tensors");
  check_norm_type(norm_type);
  check_clip_value(clip_value);
  check_out_dtype(out_dtype);
  if (inv_scale.has_value()) check_scalar_tensor(*inv_scale, "inv_scale", tensors[0].device());
  const auto device = tensors[0].device();
  const c10::cuda::CUDAGuard device_guard(device);
  const auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  const auto layout = get_multi_tensor_layout(tensors, stream);

  const auto f64 = tensors[0].options().dtype(at::kDouble);
  at::Tensor partials = empty_chunk_partials(*layout, f64);
  at::Tensor found_inf = at::empty({}, f64.dtype(at::kFloat));
  at::Tensor per_tensor_power = at::empty({per_tensor ? layout->table.num_tensors : 0}, f64);
  at::Tensor total_norm = at::empty({}, f64.dtype(out_dtype));
  at::Tensor clip_coef = at::empty({}, f64.dtype(out_dtype));
  double* chunk_power = partials.data_ptr<double>();
  double* chunk_nonfinite = chunk_power + layout->table.num_chunks;
  double* per_tensor_out = per_tensor ? per_tensor_power.data_ptr<double>() : nullptr;
  const FinalizeArgs finalize =
      finalize_args(norm_type, max_norm, inv_scale, total_norm, clip_coef);

  if (single_launch_chosen(launch_mode, tensors, device.index())) {
    SingleLaunchArgs args{};
    args.table = layout->table;
    std::copy(layout->group_first_chunk.begin(), layout->group_first_chunk.end(),
              args.group_first_chunk);
    args.chunk_power = chunk_power;
    args.chunk_nonfinite = chunk_nonfinite;
    args.found_inf = found_inf.data_ptr<float>();
    args.per_tensor_power = per_tensor_out;
    args.finalize = finalize;
    args.clip_value = clip_value.value_or(0.0);
    launch_single_clip(args, clip_value.has_value(), norm_type, device.index(), stream.stream());
  } else {
    at::Tensor power_sum = at::empty({}, f64);
    launch_reduce(*layout, norm_type, chunk_power, chunk_nonfinite, power_sum.data_ptr<double>(),
                  found_inf.data_ptr<float>(), per_tensor_out, stream.stream());
    launch_finalize(power_sum.const_data_ptr<double>(), finalize, stream.stream());
    launch_scale_(*layout, clip_coef.const_data_ptr(), out_dtype == at::kDouble, clip_value,
                  stream.stream());
  }
  return {total_norm, found_inf, clip_coef, per_tensor_power};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedclip, CUDA, m) {
  m.impl("reduce", &reduce_cuda);
  m.impl("finalize", &finalize_cuda);
  m.impl("scale_", &scale_cuda);
  m.impl("clip_", &clip_cuda);
}

}  // namespace fusedclip::cuda
