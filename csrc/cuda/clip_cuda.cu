// CUDA kernels of fusedclip::reduce, finalize and scale_ (contract: csrc/README.md; oracle:
// fusedclip/reference.py). Gradients are walked through the multi-tensor table of
// multi_tensor.cuh: one block per fixed-size chunk of one tensor, one launch per dtype group.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <fusedclip/checks.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "multi_tensor.cuh"

namespace fusedclip::cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kReadBlock = 256;
constexpr int kScaleBlock = 256;
constexpr int kCombineBlock = 512;
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

/* chunk_power[c] = sum over chunk c of |g|^p (max |g| for p = inf), float64;
 * chunk_nonfinite[c] = 1.0 if the chunk holds an inf or NaN, else 0.0.
 * Block b serves chunk chunk_offset + b. Per-thread order and the block tree are fixed by
 * kReadBlock and kUnroll, so the partial's bits depend only on the chunk's values. */
template <typename T, NormKind kKind>
__global__ void __launch_bounds__(kReadBlock)
    power_partial_kernel(MultiTensorTable table, int64_t chunk_offset, double norm_type,
                         double* __restrict__ chunk_power, double* __restrict__ chunk_nonfinite) {
  constexpr int kVec = Vector<T>::kSize;
  constexpr bool kTest = kTestElements<T, kKind>;
  const int64_t chunk = chunk_offset + blockIdx.x;
  const ChunkSpan<T> span = chunk_span<T>(table, chunk);
  const int num_vectors = (span.size - span.head) / kVec;
  const int tail_begin = span.head + num_vectors * kVec;
  const Vector<T>* vectors = reinterpret_cast<const Vector<T>*>(span.data + span.head);

  double acc[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) acc[u] = 0.0;
  bool nonfinite = false;

  for (int base = threadIdx.x; base < num_vectors; base += kReadBlock * kUnroll) {
    Vector<T> loaded[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int index = base + u * kReadBlock;
      if (index < num_vectors) {
        loaded[u] = load_read_only(vectors + index);
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
  const double chunk_value = block_reduce<kKind, kReadBlock>(thread_value);
  if constexpr (kTest) {
    nonfinite = __syncthreads_or(nonfinite);
  }
  if (threadIdx.x == 0) {
    if constexpr (!kTest) nonfinite = !isfinite(chunk_value);
    chunk_power[chunk] = chunk_value;
    chunk_nonfinite[chunk] = nonfinite ? 1.0 : 0.0;
  }
}

/* Block 0: power_sum = (+) over all chunks in chunk order (thread t takes chunks t, t + B, ...,
 * then the fixed block tree), found_inf = any chunk non-finite.
 * Blocks 1..: one warp per tensor, per_tensor_power[i] = (+) over tensor i's contiguous chunks
 * (lane l takes chunks l, l + 32, ..., then the fixed butterfly). */
template <NormKind kKind>
__global__ void __launch_bounds__(kCombineBlock)
    combine_partials_kernel(MultiTensorTable table, const double* __restrict__ chunk_power,
                            const double* __restrict__ chunk_nonfinite,
                            double* __restrict__ power_sum, float* __restrict__ found_inf,
                            double* __restrict__ per_tensor_power) {
  if (blockIdx.x == 0) {
    double acc = 0.0;
    bool nonfinite = false;
#pragma unroll 4
    for (int64_t c = threadIdx.x; c < table.num_chunks; c += kCombineBlock) {
      acc = combine<kKind>(acc, chunk_power[c]);
      nonfinite |= chunk_nonfinite[c] != 0.0;
    }
    acc = block_reduce<kKind, kCombineBlock>(acc);
    nonfinite = __syncthreads_or(nonfinite);
    if (threadIdx.x == 0) {
      *power_sum = acc;
      *found_inf = nonfinite ? 1.0f : 0.0f;
    }
    return;
  }
  const int lane = threadIdx.x % kWarpSize;
  const int64_t tensor =
      static_cast<int64_t>(blockIdx.x - 1) * (kCombineBlock / kWarpSize) + threadIdx.x / kWarpSize;
  if (tensor >= table.num_tensors) return;  // warp-uniform
  const int64_t first = table.first_chunk[tensor];
  const int64_t end = first + chunk_count(table.numels[tensor]);
  double acc = 0.0;
  for (int64_t c = first + lane; c < end; c += kWarpSize) {
    acc = combine<kKind>(acc, chunk_power[c]);
  }
  acc = warp_reduce<kKind>(acc);
  if (lane == 0) per_tensor_power[tensor] = acc;
}

template <typename Out>
__device__ __forceinline__ void store_as(void* out, double value) {
  *static_cast<Out*>(out) = static_cast<Out>(value);
}

/* total_norm = power_sum^(1/p) * |inv_scale|  (power_sum for p = inf);
 * clip_coef  = inv_scale * min(1, max_norm / (total_norm + 1e-6)), NaN-propagating; all float64,
 * rounded once to the output dtype. One thread. */
__global__ void finalize_kernel(const double* __restrict__ power_sum, double norm_type,
                                bool has_max_norm, double max_norm, const void* inv_scale,
                                bool inv_scale_is_double, bool out_is_double, void* total_norm,
                                void* clip_coef) {
  const double power = *power_sum;
  double norm;
  if (isinf(norm_type)) {
    norm = power;
  } else if (norm_type == 2.0) {
    norm = sqrt(power);
  } else if (norm_type == 1.0) {
    norm = power;
  } else {
    norm = pow(power, 1.0 / norm_type);
  }
  double inv = 1.0;
  if (inv_scale != nullptr) {
    inv = inv_scale_is_double ? *static_cast<const double*>(inv_scale)
                              : static_cast<double>(*static_cast<const float*>(inv_scale));
    norm *= fabs(inv);
  }
  double coef = 1.0;
  if (has_max_norm) {
    const double ratio = max_norm / (norm + 1e-6);
    coef = ratio > 1.0 ? 1.0 : ratio;  // keeps NaN, like clamp(max=1)
  }
  coef *= inv;
  if (out_is_double) {
    store_as<double>(total_norm, norm);
    store_as<double>(clip_coef, coef);
  } else {
    store_as<float>(total_norm, norm);
    store_as<float>(clip_coef, coef);
  }
}

template <typename C>
__device__ __forceinline__ C scale_and_clamp(C x, C coef, C clip_value) {
  const C y = x * coef;
  if (isnan(y)) return y;  // torch.clamp keeps NaN; fmin/fmax would not
  return y > clip_value ? clip_value : (y < -clip_value ? -clip_value : y);
}

/* g = clamp(g * clip_coef, -clip_value, clip_value), in float32 for 16- and 32-bit g (float64 for
 * float64), rounded to g's dtype. Each block first reads clip_coef and, when it is exactly 1 and
 * there is no clamp, returns without touching memory. */
template <typename T, bool kClamp>
__global__ void __launch_bounds__(kScaleBlock)
    scale_kernel(MultiTensorTable table, int64_t chunk_offset, const void* clip_coef,
                 bool coef_is_double, double clip_value) {
  using C = std::conditional_t<std::is_same_v<T, double>, double, float>;
  constexpr int kVec = Vector<T>::kSize;
  const double coef_stored = coef_is_double
                                 ? *static_cast<const double*>(clip_coef)
                                 : static_cast<double>(*static_cast<const float*>(clip_coef));
  if (!kClamp && coef_stored == 1.0) return;
  const C coef = static_cast<C>(coef_stored);
  const C bound = kClamp ? static_cast<C>(clip_value) : C(0);

  const ChunkSpan<T> span = chunk_span<T>(table, chunk_offset + blockIdx.x);
  const int num_vectors = (span.size - span.head) / kVec;
  const int tail_begin = span.head + num_vectors * kVec;
  Vector<T>* vectors = reinterpret_cast<Vector<T>*>(span.data + span.head);

  auto apply = [&](T x) -> T {
    const C c = to_compute(x);
    return from_compute<T>(kClamp ? scale_and_clamp<C>(c, coef, bound) : c * coef);
  };

  // Whole groups of kUnroll vectors per thread without bounds predicates, then the rest one by one.
  const int whole_groups_end = num_vectors - (kUnroll - 1) * kScaleBlock;
  int base = threadIdx.x;
  for (; base < whole_groups_end; base += kScaleBlock * kUnroll) {
    Vector<T> loaded[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) loaded[u] = load_global(vectors + base + u * kScaleBlock);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) loaded[u].elements[e] = apply(loaded[u].elements[e]);
      store_global(vectors + base + u * kScaleBlock, loaded[u]);
    }
  }
  for (int index = base; index < num_vectors; index += kScaleBlock) {
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

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) with T the device element type of dtype group `group`.
template <typename Fn>
void dispatch_group(int group, Fn&& fn) {
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
  const NormKind kind = norm_kind(norm_type);
  dispatch_norm_kind(kind, [&](auto kind_constant) {
    constexpr NormKind kKind = decltype(kind_constant)::value;
    for (int group = 0; group < kNumDtypeGroups; ++group) {
      const int64_t chunks = layout.group_chunks(group);
      if (chunks == 0) continue;
      dispatch_group(group, [&](auto tag) {
        using T = typename decltype(tag)::type;
        power_partial_kernel<T, kKind><<<static_cast<unsigned>(chunks), kReadBlock, 0, stream>>>(
            layout.table, layout.group_first_chunk[group], norm_type, chunk_power, chunk_nonfinite);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    constexpr int kTensorsPerBlock = kCombineBlock / kWarpSize;
    const int64_t per_tensor_blocks =
        per_tensor_power == nullptr
            ? 0
            : (layout.table.num_tensors + kTensorsPerBlock - 1) / kTensorsPerBlock;
    combine_partials_kernel<kKind>
        <<<static_cast<unsigned>(1 + per_tensor_blocks), kCombineBlock, 0, stream>>>(
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
        scale_kernel<T, true><<<grid, kScaleBlock, 0, stream>>>(layout.table, offset, clip_coef,
                                                                coef_is_double, *clip_value);
      } else {
        scale_kernel<T, false><<<grid, kScaleBlock, 0, stream>>>(layout.table, offset, clip_coef,
                                                                 coef_is_double, 0.0);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

void launch_finalize(const double* power_sum, double norm_type, std::optional<double> max_norm,
                     const void* inv_scale, bool inv_scale_is_double, bool out_is_double,
                     void* total_norm, void* clip_coef, cudaStream_t stream) {
  finalize_kernel<<<1, 1, 0, stream>>>(power_sum, norm_type, max_norm.has_value(),
                                       max_norm.value_or(0.0), inv_scale, inv_scale_is_double,
                                       out_is_double, total_norm, clip_coef);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Host wrappers.

void check_on_cuda(at::TensorList tensors, const char* name) {
  TORCH_CHECK(tensors[0].is_cuda(), name, "[0] is on ", tensors[0].device(),
              "; the CUDA kernels need CUDA tensors");
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
  const int64_t num_chunks = layout->table.num_chunks;
  // [0, c): chunk_power, [c, 2c): chunk_nonfinite
  at::Tensor partials = at::empty({2 * num_chunks}, f64);
  at::Tensor power_sum = at::empty({}, f64);
  at::Tensor found_inf = at::empty({}, f64.dtype(at::kFloat));
  at::Tensor per_tensor_power = at::empty({per_tensor ? layout->table.num_tensors : 0}, f64);
  double* chunk_power = partials.data_ptr<double>();
  launch_reduce(*layout, norm_type, chunk_power, chunk_power + num_chunks,
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
  launch_finalize(power.const_data_ptr<double>(), norm_type, max_norm,
                  inv_scale.has_value() ? inv_scale->const_data_ptr() : nullptr,
                  inv_scale.has_value() && inv_scale->scalar_type() == at::kDouble,
                  out_dtype == at::kDouble, total_norm.data_ptr(), clip_coef.data_ptr(),
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

}  // namespace

TORCH_LIBRARY_IMPL(fusedclip, CUDA, m) {
  m.impl("reduce", &reduce_cuda);
  m.impl("finalize", &finalize_cuda);
  m.impl("scale_", &scale_cuda);
}

}  // namespace fusedclip::cuda
