// The split path of the CUDA ops (launch.cuh): one block per chunk, one launch per dtype group
// and pass (read, combine, finalize, scale).
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <optional>

#include "chunk_passes.cuh"
#include "launch.cuh"
#include "multi_tensor.cuh"

namespace fusedclip::cuda {
namespace {

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

}  // namespace

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

}  // namespace fusedclip::cuda
