// The raw-pointer launchers behind clip_cuda.cu's ops, in two files so that they compile in
// parallel: the split path (split_launch.cu: one launch per dtype group and pass) and the single
// cooperative launch (single_launch.cu). Everything is enqueued on `stream`.
#pragma once

#include <ATen/core/Tensor.h>
#include <fusedclip/checks.h>

#include <cstdint>
#include <optional>

#include "chunk_passes.cuh"
#include "multi_tensor.cuh"

namespace fusedclip::cuda {

// Float64 words of the chunk partials of `layout`: per chunk the accumulator's words, then a
// non-finite flag, each kind in its own [num_chunks] run.
inline int64_t chunk_partial_words(const MultiTensorLayout& layout, double norm_type) {
  return (accumulator_words(norm_type, layout.any_float64) + 1) * layout.table.num_chunks;
}

// The split path.

// partials: [chunk_partial_words(layout, norm_type)] float64;
// per_tensor_norms: [num_tensors] float64 or nullptr.
void launch_reduce(const MultiTensorLayout& layout, double norm_type, double* partials,
                   double* raw_norm, float* found_inf, double* per_tensor_norms,
                   cudaStream_t stream);
void launch_finalize(const double* raw_norm, const FinalizeArgs& args, cudaStream_t stream);
void launch_scale_(const MultiTensorLayout& layout, const void* clip_coef, bool coef_is_double,
                   std::optional<double> clip_value, cudaStream_t stream);

// The single launch.

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

// Whether clip_ takes the single launch for `tensors` on `device` under `launch`; raises where
// launch="single" cannot be honoured.
bool single_launch_chosen(Launch launch, at::TensorList tensors, int device);

enum class SingleLaunchOutcome { kLaunched, kRefused };

/* The whole clip in one cooperative launch; the grid is every chunk or every block that can be
 * resident at once, whichever is fewer. When the kernel cannot be resident or the device refuses
 * the grid (cudaErrorCooperativeLaunchTooLarge), nothing ran: returns kRefused, with the error
 * cleared (it is not sticky, but cudaGetLastError would report it at the next launch check), for
 * launch="auto" to take the split path; launch="single" raises instead. */
SingleLaunchOutcome launch_single_clip(const SingleLaunchArgs& args, bool any_float64, bool clamp,
                                       Launch launch, int device, cudaStream_t stream);

// For tests (fusedclip_testing::set_single_launch_grid): a grid size for the single launch
// instead of the computed one, so a test can make the device refuse it; 0 restores it.
void set_single_launch_grid(int64_t blocks);

}  // namespace fusedclip::cuda
