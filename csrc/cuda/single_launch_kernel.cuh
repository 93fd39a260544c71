// The single-launch kernel of the CUDA clip_ op (launched by single_launch.cu). Its instantiations
// with and without the clamp are compiled in two files of their own,
// single_launch_kernel_clamp.cu and single_launch_kernel_no_clamp.cu: this kernel is most of the
// extension's device code, and two files build in parallel.
#pragma once

#include <cooperative_groups.h>

#include <cstdint>

#include "chunk_passes.cuh"
#include "launch.cuh"
#include "multi_tensor.cuh"

namespace fusedclip::cuda {

// The dtype group that owns `chunk`: groups hold consecutive ranges of chunks.
__device__ __forceinline__ int chunk_group(const int64_t* group_first_chunk, int64_t chunk) {
  int group = 0;
  while (group + 1 < kNumDtypeGroups && chunk >= group_first_chunk[group + 1]) ++group;
  return group;
}

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

// The host stub of the single-launch kernel for norm_type's accumulator (dispatch_accumulator), to
// launch with cudaLaunchCooperativeKernel.
template <bool kClamp>
const void* single_launch_kernel(double norm_type, bool any_float64) {
  const void* kernel = nullptr;
  dispatch_accumulator(norm_type, any_float64, [&](auto accumulator_tag) {
    using Accumulator = typename decltype(accumulator_tag)::type;
    kernel = reinterpret_cast<const void*>(single_launch_clip_kernel<Accumulator, kClamp>);
  });
  return kernel;
}

// Instantiated only in single_launch_kernel_clamp.cu and single_launch_kernel_no_clamp.cu.
extern template const void* single_launch_kernel<true>(double norm_type, bool any_float64);
extern template const void* single_launch_kernel<false>(double norm_type, bool any_float64);

}  // namespace fusedclip::cuda
