// The CUDA implementations of fusedclip::reduce, finalize, scale_ and clip_ (contract:
// csrc/README.md; oracle: fusedclip/reference.py): argument checks, the device guard, the
// multi-tensor table (multi_tensor.cuh) and outputs, then the launchers of launch.cuh. Gradients
// are walked in fixed-size chunks of one tensor. The split path (split_launch.cu) runs one block
// per chunk, one launch per dtype group and pass; clip_'s single-launch path (single_launch.cu)
// runs every pass in one cooperative launch. Both compute each chunk with the same device
// functions (chunk_passes.cuh) and combine in the same order, so their results are bit-identical.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <fusedclip/checks.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "launch.cuh"
#include "multi_tensor.cuh"

namespace fusedclip::cuda {
namespace {

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
