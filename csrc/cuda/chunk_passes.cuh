// The per-chunk device code both CUDA paths share (split_launch.cu, single_launch.cu): read one
// chunk into its partial, combine the partials, finalize the norm, scale one chunk. Both paths
// call these same functions with the same block shape and combine in the same order, so their
// results are bit-identical.
#pragma once

#include <fusedclip/norm.h>

#include <cstdint>
#include <type_traits>

#include "multi_tensor.cuh"
#include "vector_math.cuh"

namespace fusedclip::cuda {

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
__device__ inline Finalized finalize_on_device(double raw_norm, const FinalizeArgs& args) {
  const bool has_inv_scale = args.inv_scale != nullptr;
  const double inv_scale =
      has_inv_scale ? load_scalar(args.inv_scale, args.inv_scale_is_double) : 1.0;
  return finalize_norm(raw_norm, args.has_max_norm, args.max_norm, has_inv_scale, inv_scale);
}

// total_norm rounded once to its dtype; clip_coef float64.
__device__ inline void store_finalized(const Finalized& result, const FinalizeArgs& args) {
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
inline int accumulator_words(double norm_type, bool any_float64) {
  int words = 0;
  dispatch_accumulator(norm_type, any_float64,
                       [&](auto tag) { words = decltype(tag)::type::kWords; });
  return words;
}

}  // namespace fusedclip::cuda
