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
#include <fusedclip/checks.h>
#include <fusedclip/norm.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "multi_tensor.cuh"
#include "vector_math.cuh"

namespace fusedclip::cuda {
namespace {

// One block size for every kernel: the single-launch kernel runs each pass's per-chunk code with
// the block shape the split kernels use, which keeps the two paths' results bit-identical.
constexpr int kBlock = 256;
// 16-byte vectors each thread keeps in flight per loop iteration.
constexpr int kUnroll = 4;

static_assert(kChunkElements * 2 % kVectorBytes == 0,
              "a chunk must start at the same 16-byte alignment as its tensor");

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

/* Writes the chunk's partial: accumulator word w at chunk_words[w * num_chunks + chunk], and
 * chunk_nonfinite[chunk] = 1.0 if the chunk holds an inf or NaN, else 0.0. The accumulator is a
 * plain sum of |g|^p (max |g| for p = inf) or a ScaledSum (vector_math.cuh).
 * Run by a whole block. Per-thread order and the block tree are fixed by kBlock and kUnroll, so
 * the partial's bits depend only on the chunk's values. kReadOnly loads through the non-coherent
 * path, which is allowed only when nothing writes the gradients during the kernel; otherwise
 * through L2. */
template <typename T, typename Accumulator, bool kReadOnly>
__device__ __forceinline__ void reduce_chunk(const MultiTensorTable& table, int64_t chunk,
                                             double norm_type, double* chunk_words,
                                             double* chunk_nonfinite) {
  constexpr int kVec = Vector<T>::kSize;
  constexpr bool kTest = !Accumulator::template kFiniteForFiniteElements<T>;
  const ChunkSpan<T> span = chunk_span<T>(table, chunk);
  const int num_vectors = (span.size - span.head) / kVec;
  const int tail_begin = span.head + num_vectors * kVec;
  const Vector<T>* vectors = reinterpret_cast<const Vector<T>*>(span.data + span.head);

  Accumulator acc[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) acc[u] = Accumulator::zero();
  bool nonfinite = false;

  for (int base = threadIdx.x; base < num_vectors; base += kBlock * kUnroll) {
    Vector<T> loaded[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int index = base + u * kBlock;
      if (index < num_vectors) {
        loaded[u] = kReadOnly ? load_read_only(vectors + index) : load_through_l2(vectors + index);
      } else {
        loaded[u] = Vector<T>{};  // zeros: neutral for every accumulator
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const double x = to_double(loaded[u].elements[e]);
        acc[u].add(x, norm_type);
        if constexpr (kTest) nonfinite |= !isfinite(x);
      }
    }
  }
  // Misaligned head and the tail past the last whole vector: fewer than kVec elements each.
  const int scalar_index = threadIdx.x < span.head ? threadIdx.x : tail_begin + threadIdx.x - kVec;
  if (threadIdx.x < span.head || (threadIdx.x >= kVec && scalar_index < span.size)) {
    const double x = to_double(span.data[scalar_index]);
    acc[0].add(x, norm_type);
    if constexpr (kTest) nonfinite |= !isfinite(x);
  }

  Accumulator thread_value = acc[0];
#pragma unroll
  for (int u = 1; u < kUnroll; ++u) thread_value.merge(acc[u], norm_type);
  const Accumulator chunk_value = block_reduce<Accumulator, kBlock>(thread_value, norm_type);
  if constexpr (kTest) {
    nonfinite = __syncthreads_or(nonfinite);
  }
  if (threadIdx.x == 0) {
    if constexpr (!kTest) nonfinite = !chunk_value.finite();
    chunk_value.store(chunk_words, chunk, table.num_chunks);
    chunk_nonfinite[chunk] = nonfinite ? 1.0 : 0.0;
  }
  __syncthreads();  // block_reduce's shared slots are reused by the block's next chunk
}

/* Run by a whole block: (+) over every chunk's partial in chunk order (thread t takes chunks t,
 * t + kBlock, ..., then the fixed block tree), valid in thread 0; *nonfinite (every thread) says
 * whether any chunk was flagged. Loads go to L2: other blocks of the same launch may have written
 * the partials. */
template <typename Accumulator>
__device__ __forceinline__ Accumulator combine_chunks(int64_t num_chunks, const double* chunk_words,
                                                      const double* chunk_nonfinite,
                                                      double norm_type, bool* nonfinite) {
  Accumulator acc = Accumulator::zero();
  bool any = false;
#pragma unroll 8
  for (int64_t c = threadIdx.x; c < num_chunks; c += kBlock) {
    acc.merge(Accumulator::load_l2(chunk_words, c, num_chunks), norm_type);
    any |= __ldcg(chunk_nonfinite + c) != 0.0;
  }
  acc = block_reduce<Accumulator, kBlock>(acc, norm_type);
  *nonfinite = __syncthreads_or(any);
  return acc;
}

/* Run by a whole warp: (+) over the partials of tensor's contiguous chunks (lane l takes chunks
 * l, l + 32, ..., then the fixed butterfly), valid in every lane. */
template <typename Accumulator>
__device__ __forceinline__ Accumulator combine_tensor_chunks(const MultiTensorTable& table,
                                                             int64_t tensor,
                                                             const double* chunk_words,
                                                             double norm_type) {
  const int64_t first = table.first_chunk[tensor];
  const int64_t end = first + chunk_count(table.numels[tensor]);
  Accumulator acc = Accumulator::zero();
#pragma unroll 8  // loads in flight; the merges keep their order
  for (int64_t c = first + threadIdx.x % kWarpSize; c < end; c += kWarpSize) {
    acc.merge(Accumulator::load_l2(chunk_words, c, table.num_chunks), norm_type);
  }
  return warp_reduce(acc, norm_type);
}

// The scalar epilogue's inputs and where its outputs go.
struct FinalizeArgs {
  bool has_max_norm;
  double max_norm;
  const void* inv_scale;  // nullptr: no unscaling
  bool inv_scale_is_double;
  bool total_norm_is_double;  // else float32
  void* total_norm;
  double* clip_coef;
};

// norm.h's finalize_norm, reading inv_scale on the device.
__device__ Finalized finalize_on_device(double raw_norm, const FinalizeArgs& args) {
  const bool has_inv_scale = args.inv_scale != nullptr;
  const double inv_scale =
      has_inv_scale ? load_scalar(args.inv_scale, args.inv_scale_is_double) : 1.0;
  return finalize_norm(raw_norm, args.has_max_norm, args.max_norm, has_inv_scale, inv_scale);
}

// total_norm rounded once to its dtype; clip_coef float64.
__device__ void store_finalized(const Finalized& result, const FinalizeArgs& args) {
  if (args.total_norm_is_double) {
    *static_cast<double*>(args.total_norm) = result.total_norm;
  } else {
    *static_cast<float*>(args.total_norm) = static_cast<float>(result.total_norm);
  }
  *args.clip_coef = result.clip_coef;
}

template <typename C>
__device__ __forceinline__ C scale_and_clamp(C x, C coef, C clip_value) {
  const C y = x * coef;
  if (isnan(y)) return y;  // torch.clamp keeps NaN; fmin/fmax would not
  return y > clip_value ? clip_value : (y < -clip_value ? -clip_value : y);
}

/* g = clamp(g * coef, -bound, bound) over one chunk (no clamp unless kClamp), in C (float or
 * double), rounded once to g's dtype. Run by a whole block. */
template <typename T, typename C, bool kClamp>
__device__ __forceinline__ void scale_chunk(const MultiTensorTable& table, int64_t chunk, C coef,
                                            C bound) {
  constexpr int kVec = Vector<T>::kSize;
  const ChunkSpan<T> span = chunk_span<T>(table, chunk);
  const int num_vectors = (span.size - span.head) / kVec;
  const int tail_begin = span.head + num_vectors * kVec;
  Vector<T>* vectors = reinterpret_cast<Vector<T>*>(span.data + span.head);

  auto apply = [&](T x) -> T {
    const C c = to_compute<C>(x);
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

/* The write pass of one chunk with the float64 coefficient: the product in float32 for 16- and
 * 32-bit gradients, except where needs_float64_product(clip_coef) (a coefficient float32 cannot
 * hold as a normal number), then in float64; float64 gradients always in float64. The choice
 * depends only on clip_coef, so it is uniform over the block. */
template <typename T, bool kClamp>
__device__ __forceinline__ void scale_chunk_by(const MultiTensorTable& table, int64_t chunk,
                                               double clip_coef, double clip_value) {
  if constexpr (!std::is_same_v<T, double>) {
    if (needs_float64_product(clip_coef)) {
      scale_chunk<T, double, kClamp>(table, chunk, clip_coef, clip_value);
      return;
    }
  }
  using C = ComputeType<T>;
  scale_chunk<T, C, kClamp>(table, chunk, static_cast<C>(clip_coef),
                            kClamp ? static_cast<C>(clip_value) : C(0));
}

// Split path: one block per chunk of dtype group T, chunk = chunk_offset + blockIdx.x.
template <typename T, typename Accumulator>
__global__ void __launch_bounds__(kBlock)
    partial_norm_kernel(MultiTensorTable table, int64_t chunk_offset, double norm_type,
                        double* __restrict__ chunk_words, double* __restrict__ chunk_nonfinite) {
  reduce_chunk<T, Accumulator, /*kReadOnly=*/true>(table, chunk_offset + blockIdx.x, norm_type,
                                                   chunk_words, chunk_nonfinite);
}

// Block 0: raw_norm and found_inf. Blocks 1..: one warp per tensor, per_tensor_norms[tensor].
template <typename Accumulator>
__global__ void __launch_bounds__(kBlock)
    combine_partials_kernel(MultiTensorTable table, double norm_type,
                            const double* __restrict__ chunk_words,
                            const double* __restrict__ chunk_nonfinite,
                            double* __restrict__ raw_norm, float* __restrict__ found_inf,
                            double* __restrict__ per_tensor_norms) {
  if (blockIdx.x == 0) {
    bool nonfinite;
    const Accumulator total = combine_chunks<Accumulator>(table.num_chunks, chunk_words,
                                                          chunk_nonfinite, norm_type, &nonfinite);
    if (threadIdx.x == 0) {
      *raw_norm = total.norm(norm_type);
      *found_inf = nonfinite ? 1.0f : 0.0f;
    }
    return;
  }
  constexpr int kWarps = kBlock / kWarpSize;
  const int64_t tensor = static_cast<int64_t>(blockIdx.x - 1) * kWarps + threadIdx.x / kWarpSize;
  if (tensor >= table.num_tensors) return;  // warp-uniform
  const Accumulator value =
      combine_tensor_chunks<Accumulator>(table, tensor, chunk_words, norm_type);
  if (threadIdx.x % kWarpSize == 0) per_tensor_norms[tensor] = value.norm(norm_type);
}

// One thread.
__global__ void finalize_kernel(const double* __restrict__ raw_norm, FinalizeArgs args) {
  store_finalized(finalize_on_device(*raw_norm, args), args);
}

// Split path write: each block first reads clip_coef and, when it is exactly 1 and there is no
// clamp, returns without touching memory.
template <typename T, bool kClamp>
__global__ void __launch_bounds__(kBlock)
    scale_kernel(MultiTensorTable table, int64_t chunk_offset, const void* clip_coef,
                 bool coef_is_double, double clip_value) {
  const double coef = load_scalar(clip_coef, coef_is_double);
  if (!kClamp && coef == 1.0) return;
  scale_chunk_by<T, kClamp>(table, chunk_offset + blockIdx.x, coef, clip_value);
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
  double norm_type;
  double* chunk_words;
  double* chunk_nonfinite;
  float* found_inf;
  double* per_tensor_norms;  // nullptr: not asked for
  FinalizeArgs finalize;
  double clip_value;
};

/* reduce, finalize and scale_ in one cooperative launch of co-resident blocks. Block b reduces
 * chunks b, b + gridDim.x, ...; after the grid barrier every block combines all the partials
 * itself, in combine_partials_kernel's order, so each gets the same bits and no second barrier is
 * needed; block 0 stores the results, the grid's warps combine the per-tensor partials, and each
 * block scales the chunks it reduced (for gradient sets that fit in L2 they are still there). */
template <typename Accumulator, bool kClamp>
__global__ void __launch_bounds__(kBlock) single_launch_clip_kernel(SingleLaunchArgs args) {
  const MultiTensorTable& table = args.table;
  for (int64_t chunk = blockIdx.x; chunk < table.num_chunks; chunk += gridDim.x) {
    dispatch_group(chunk_group(args.group_first_chunk, chunk), [&](auto tag) {
      using T = typename decltype(tag)::type;
      reduce_chunk<T, Accumulator, /*kReadOnly=*/false>(table, chunk, args.norm_type,
                                                        args.chunk_words, args.chunk_nonfinite);
    });
  }
  cooperative_groups::this_grid().sync();

  __shared__ double coefficient;
  bool nonfinite;
  const Accumulator total = combine_chunks<Accumulator>(
      table.num_chunks, args.chunk_words, args.chunk_nonfinite, args.norm_type, &nonfinite);
  if (threadIdx.x == 0) {
    const Finalized result = finalize_on_device(total.norm(args.norm_type), args.finalize);
    if (blockIdx.x == 0) {
      store_finalized(result, args.finalize);
      *args.found_inf = nonfinite ? 1.0f : 0.0f;
    }
    coefficient = result.clip_coef;
  }
  __syncthreads();
  const double coef = coefficient;

  if (args.per_tensor_norms != nullptr) {
    constexpr int kWarps = kBlock / kWarpSize;
    const int64_t warps_in_grid = static_cast<int64_t>(gridDim.x) * kWarps;
    for (int64_t tensor = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
         tensor < table.num_tensors; tensor += warps_in_grid) {  // warp-uniform
      const Accumulator value =
          combine_tensor_chunks<Accumulator>(table, tensor, args.chunk_words, args.norm_type);
      if (threadIdx.x % kWarpSize == 0) args.per_tensor_norms[tensor] = value.norm(args.norm_type);
    }
  }

  if (!kClamp && coef == 1.0) return;
  for (int64_t chunk = blockIdx.x; chunk < table.num_chunks; chunk += gridDim.x) {
    dispatch_group(chunk_group(args.group_first_chunk, chunk), [&](auto tag) {
      using T = typename decltype(tag)::type;
      scale_chunk_by<T, kClamp>(table, chunk, coef, args.clip_value);
    });
  }
}

// Calls fn(TypeTag<Accumulator>{}) with the read pass's accumulator for norm_type: a ScaledSum
// where needs_scaled_sum (norm.h), else the plain power sum of the norm's kind.
template <typename Fn>
void dispatch_accumulator(double norm_type, bool any_float64, Fn&& fn) {
  if (needs_scaled_sum(norm_type, any_float64)) {
    fn(TypeTag<ScaledPowerSum>{});
    return;
  }
  switch (norm_kind(norm_type)) {
    case NormKind::kOne:
      fn(TypeTag<PowerSum<NormKind::kOne>>{});
      break;
    case NormKind::kTwo:
      fn(TypeTag<PowerSum<NormKind::kTwo>>{});
      break;
    case NormKind::kInf:
      fn(TypeTag<PowerSum<NormKind::kInf>>{});
      break;
    default:
      fn(TypeTag<PowerSum<NormKind::kGeneral>>{});
      break;
  }
}

// Float64 words of one chunk's accumulator.
int accumulator_words(double norm_type, bool any_float64) {
  int words = 0;
  dispatch_accumulator(norm_type, any_float64,
                       [&](auto tag) { words = decltype(tag)::type::kWords; });
  return words;
}

// Float64 words of the chunk partials of `layout`: per chunk the accumulator's words, then a
// non-finite flag, each kind in its own [num_chunks] run.
int64_t chunk_partial_words(const MultiTensorLayout& layout, double norm_type) {
  return (accumulator_words(norm_type, layout.any_float64) + 1) * layout.table.num_chunks;
}

// Raw-pointer launchers: everything is enqueued on `stream`.

// partials: [chunk_partial_words(layout, norm_type)] float64;
// per_tensor_norms: [num_tensors] float64 or nullptr.
void launch_reduce(const MultiTensorLayout& layout, double norm_type, double* partials,
                   double* raw_norm, float* found_inf, double* per_tensor_norms,
                   cudaStream_t stream) {
  dispatch_accumulator(norm_type, layout.any_float64, [&](auto accumulator_tag) {
    using Accumulator = typename decltype(accumulator_tag)::type;
    double* chunk_nonfinite = partials + Accumulator::kWords * layout.table.num_chunks;
    for (int group = 0; group < kNumDtypeGroups; ++group) {
      const int64_t chunks = layout.group_chunks(group);
      if (chunks == 0) continue;
      dispatch_group(group, [&](auto tag) {
        using T = typename decltype(tag)::type;
        partial_norm_kernel<T, Accumulator><<<static_cast<unsigned>(chunks), kBlock, 0, stream>>>(
            layout.table, layout.group_first_chunk[group], norm_type, partials, chunk_nonfinite);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    constexpr int kTensorsPerBlock = kBlock / kWarpSize;
    const int64_t per_tensor_blocks =
        per_tensor_norms == nullptr
            ? 0
            : (layout.table.num_tensors + kTensorsPerBlock - 1) / kTensorsPerBlock;
    combine_partials_kernel<Accumulator>
        <<<static_cast<unsigned>(1 + per_tensor_blocks), kBlock, 0, stream>>>(
            layout.table, norm_type, partials, chunk_nonfinite, raw_norm, found_inf,
            per_tensor_norms);
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

void launch_finalize(const double* raw_norm, const FinalizeArgs& args, cudaStream_t stream) {
  finalize_kernel<<<1, 1, 0, stream>>>(raw_norm, args);
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

// Where fewer SMs are available than the device has (an MPS thread limit, a partitioned context),
// a grid sized by occupancy x SM count can still be refused. Per device, the smallest grid that was
// refused: launch="auto" takes the split path for grids at least that large instead of trying
// again. std::numeric_limits<int64_t>::max() until a launch is refused.
std::mutex refused_grid_mutex;
std::map<int, int64_t> refused_grid;

int64_t smallest_refused_grid(int device) {
  const std::lock_guard<std::mutex> lock(refused_grid_mutex);
  const auto it = refused_grid.find(device);
  return it == refused_grid.end() ? std::numeric_limits<int64_t>::max() : it->second;
}

void record_refused_grid(int device, int64_t grid) {
  const std::lock_guard<std::mutex> lock(refused_grid_mutex);
  auto [entry, inserted] = refused_grid.try_emplace(device, grid);
  if (!inserted) entry->second = std::min(entry->second, grid);
}

// For tests (fusedclip_testing::set_single_launch_grid): a grid size that replaces the computed
// one, so a test can make the device refuse the cooperative launch; 0: none.
std::atomic<int64_t> single_launch_grid_override{0};

enum class SingleLaunchOutcome { kLaunched, kRefused };

/* The whole clip in one cooperative launch; the grid is every chunk or every block that can be
 * resident at once, whichever is fewer. When the kernel cannot be resident or the device refuses
 * the grid (cudaErrorCooperativeLaunchTooLarge), nothing ran: returns kRefused, with the error
 * cleared (it is not sticky, but cudaGetLastError would report it at the next launch check), for
 * launch="auto" to take the split path; launch="single" raises instead. */
SingleLaunchOutcome launch_single_clip(const SingleLaunchArgs& args, bool any_float64, bool clamp,
                                       Launch launch, int device, cudaStream_t stream) {
  SingleLaunchOutcome outcome = SingleLaunchOutcome::kLaunched;
  dispatch_accumulator(args.norm_type, any_float64, [&](auto accumulator_tag) {
    using Accumulator = typename decltype(accumulator_tag)::type;
    const void* kernel =
        clamp ? reinterpret_cast<const void*>(single_launch_clip_kernel<Accumulator, true>)
              : reinterpret_cast<const void*>(single_launch_clip_kernel<Accumulator, false>);
    const int64_t resident = static_cast<int64_t>(resident_blocks_per_sm(kernel, device)) *
                             device_limits(device).sm_count;
    if (resident == 0) {
      TORCH_CHECK(launch != Launch::kSingle,
                  "the single-launch clip kernel does not fit on an SM of cuda:", text(device),
                  "; use launch='auto' or launch='split'");
      outcome = SingleLaunchOutcome::kRefused;
      return;
    }
    const int64_t override_grid = single_launch_grid_override.load();
    const int64_t grid = override_grid > 0
                             ? override_grid
                             : std::max<int64_t>(1, std::min(args.table.num_chunks, resident));
    if (launch == Launch::kAuto && grid >= smallest_refused_grid(device)) {
      outcome = SingleLaunchOutcome::kRefused;
      return;
    }
    void* params[] = {const_cast<SingleLaunchArgs*>(&args)};
    const cudaError_t error = cudaLaunchCooperativeKernel(kernel, dim3(static_cast<unsigned>(grid)),
                                                          dim3(kBlock), params, 0, stream);
    if (error == cudaErrorCooperativeLaunchTooLarge) {
      (void)cudaGetLastError();  // clears it
      record_refused_grid(device, grid);
      TORCH_CHECK(launch != Launch::kSingle, "launch='single': cuda:", text(device),
                  " cannot hold a cooperative grid of ", text(grid),
                  " blocks (fewer SMs available than it has?); use launch='auto', which falls "
                  "back to launch='split'");
      outcome = SingleLaunchOutcome::kRefused;
      return;
    }
    C10_CUDA_CHECK(error);
  });
  return outcome;
}

// Host wrappers.

void check_on_cuda(at::TensorList tensors, const char* name) {
  TORCH_CHECK(tensors[0].is_cuda(), name, "[0] is on ", tensors[0].device(),
              "; the CUDA kernels need CUDA tensors");
}

FinalizeArgs finalize_args(std::optional<double> max_norm,
                           const std::optional<at::Tensor>& inv_scale, at::Tensor& total_norm,
                           at::Tensor& clip_coef) {
  FinalizeArgs args;
  args.has_max_norm = max_norm.has_value();
  args.max_norm = max_norm.value_or(0.0);
  args.inv_scale = inv_scale.has_value() ? inv_scale->const_data_ptr() : nullptr;
  args.inv_scale_is_double = inv_scale.has_value() && inv_scale->scalar_type() == at::kDouble;
  args.total_norm_is_double = total_norm.scalar_type() == at::kDouble;
  args.total_norm = total_norm.data_ptr();
  args.clip_coef = clip_coef.data_ptr<double>();
  return args;
}

at::Tensor empty_chunk_partials(const MultiTensorLayout& layout, double norm_type,
                                const at::TensorOptions& options) {
  return at::empty({chunk_partial_words(layout, norm_type)}, options.dtype(at::kDouble));
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
  at::Tensor partials = empty_chunk_partials(*layout, norm_type, f64);
  at::Tensor raw_norm = at::empty({}, f64);
  at::Tensor found_inf = at::empty({}, f64.dtype(at::kFloat));
  at::Tensor per_tensor_norms = at::empty({per_tensor ? layout->table.num_tensors : 0}, f64);
  launch_reduce(*layout, norm_type, partials.data_ptr<double>(), raw_norm.data_ptr<double>(),
                found_inf.data_ptr<float>(),
                per_tensor ? per_tensor_norms.data_ptr<double>() : nullptr, stream.stream());
  return {raw_norm, found_inf, per_tensor_norms};
}

std::tuple<at::Tensor, at::Tensor> finalize_cuda(const at::Tensor& raw_norm,
                                                 std::optional<double> max_norm,
                                                 const std::optional<at::Tensor>& inv_scale,
                                                 at::ScalarType out_dtype) {
  TORCH_CHECK(raw_norm.is_cuda(), "raw_norm is on ", raw_norm.device(),
              "; the CUDA kernel needs a CUDA tensor");
  TORCH_CHECK(raw_norm.scalar_type() == at::kDouble,
              "raw_norm must be float64 (the output of reduce), got ", raw_norm.scalar_type());
  TORCH_CHECK(raw_norm.numel() == 1, "raw_norm must hold one element, got ",
              text(raw_norm.numel()));
  check_out_dtype(out_dtype);
  if (inv_scale.has_value()) check_scalar_tensor(*inv_scale, "inv_scale", raw_norm.device());
  const c10::cuda::CUDAGuard device_guard(raw_norm.device());
  const auto stream = c10::cuda::getCurrentCUDAStream(raw_norm.device().index());

  at::Tensor total_norm = at::empty({}, raw_norm.options().dtype(out_dtype));
  at::Tensor clip_coef = at::empty({}, raw_norm.options().dtype(at::kDouble));
  const at::Tensor raw = raw_norm.contiguous();
  launch_finalize(raw.const_data_ptr<double>(),
                  finalize_args(max_norm, inv_scale, total_norm, clip_coef), stream.stream());
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
  check_no_overlap(layout->overlap, "tensors");
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
  check_no_overlap(layout->overlap, "tensors");

  const auto f64 = tensors[0].options().dtype(at::kDouble);
  at::Tensor partials = empty_chunk_partials(*layout, norm_type, f64);
  at::Tensor raw_norm = at::empty({}, f64);
  at::Tensor found_inf = at::empty({}, f64.dtype(at::kFloat));
  at::Tensor per_tensor_norms = at::empty({per_tensor ? layout->table.num_tensors : 0}, f64);
  at::Tensor total_norm = at::empty({}, f64.dtype(out_dtype));
  at::Tensor clip_coef = at::empty({}, f64);
  double* per_tensor_out = per_tensor ? per_tensor_norms.data_ptr<double>() : nullptr;
  const FinalizeArgs finalize = finalize_args(max_norm, inv_scale, total_norm, clip_coef);

  if (single_launch_chosen(launch_mode, tensors, device.index())) {
    SingleLaunchArgs args{};
    args.table = layout->table;
    std::copy(layout->group_first_chunk.begin(), layout->group_first_chunk.end(),
              args.group_first_chunk);
    args.norm_type = norm_type;
    args.chunk_words = partials.data_ptr<double>();
    args.chunk_nonfinite = args.chunk_words + accumulator_words(norm_type, layout->any_float64) *
                                                  layout->table.num_chunks;
    args.found_inf = found_inf.data_ptr<float>();
    args.per_tensor_norms = per_tensor_out;
    args.finalize = finalize;
    args.clip_value = clip_value.value_or(0.0);
    if (launch_single_clip(args, layout->any_float64, clip_value.has_value(), launch_mode,
                           device.index(), stream.stream()) == SingleLaunchOutcome::kLaunched) {
      return {total_norm, found_inf, clip_coef, per_tensor_norms};
    }
  }
  launch_reduce(*layout, norm_type, partials.data_ptr<double>(), raw_norm.data_ptr<double>(),
                found_inf.data_ptr<float>(), per_tensor_out, stream.stream());
  launch_finalize(raw_norm.const_data_ptr<double>(), finalize, stream.stream());
  launch_scale_(*layout, clip_coef.const_data_ptr(), /*coef_is_double=*/true, clip_value,
                stream.stream());
  return {total_norm, found_inf, clip_coef, per_tensor_norms};
}

// Test hooks (fusedclip_testing): observe the table cache, force a cooperative grid.
std::vector<int64_t> cuda_table_stats() { return table_cache_stats(); }

void set_single_launch_grid(int64_t blocks) {
  TORCH_CHECK(blocks >= 0, "blocks must be >= 0 (0: the computed grid), got ", text(blocks));
  single_launch_grid_override.store(blocks);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedclip, CUDA, m) {
  m.impl("reduce", &reduce_cuda);
  m.impl("finalize", &finalize_cuda);
  m.impl("scale_", &scale_cuda);
  m.impl("clip_", &clip_cuda);
}

// Hooks for tests only (tests/test_cuda.py, tests/standalone_cuda_check.py), outside the fusedclip
// namespace so that no layer above mistakes them for ops.
TORCH_LIBRARY(fusedclip_testing, m) {
  // [tables built, captured tables alive, spare pinned buffers, pinned buffers allocated]
  m.def("cuda_table_stats() -> int[]", &cuda_table_stats);
  // A grid size for the single launch instead of the computed one; 0 restores it.
  m.def("set_single_launch_grid(int blocks) -> ()", &set_single_launch_grid);
}

}  // namespace fusedclip::cuda
