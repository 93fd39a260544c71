// The Autograd and ADInplaceOrView kernels of the fusedclip ops, for every backend.
//
// The ops have no derivative: called with grad mode on and an input that requires grad they
// refuse, before reading or writing anything, rather than hand back a norm that autograd cannot
// follow. scale_ and clip_ write their tensors in place, so, like torch's in-place ops, they bump
// each tensor's version counter (autograd then catches a saved gradient that was clipped). These
// kernels are unboxed: without them torch's boxed fallbacks run, which box every tensor of the
// list into an IValue and back, about 40 ns a tensor.
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/GradMode.h>
#include <fusedclip/checks.h>
#include <fusedclip/op_handles.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <string>

namespace fusedclip {
namespace {

[[noreturn]] void refuse_derivative(const char* op, const std::string& name) {
  TORCH_CHECK(false, "fusedclip::", op, " has no derivative, and ", name,
              " requires grad: call it under torch.no_grad() (the fusedclip API does)");
}

void check_not_differentiated(const at::Tensor& tensor, const char* op, const char* name) {
  if (c10::GradMode::is_enabled() && tensor.requires_grad()) refuse_derivative(op, name);
}

void check_not_differentiated(const std::optional<at::Tensor>& tensor, const char* op,
                              const char* name) {
  if (tensor.has_value()) check_not_differentiated(*tensor, op, name);
}

void check_not_differentiated(at::TensorList tensors, const char* op) {
  if (!c10::GradMode::is_enabled()) return;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (tensors[i].requires_grad()) refuse_derivative(op, "tensors[" + text(i) + "]");
  }
}

void bump_versions(at::TensorList tensors) {
  for (const at::Tensor& tensor : tensors) {
    if (!tensor.is_inference()) torch::autograd::impl::bump_version(tensor);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> reduce_autograd(c10::DispatchKeySet keys,
                                                               at::TensorList tensors,
                                                               double norm_type, bool per_tensor) {
  check_not_differentiated(tensors, "reduce");
  at::AutoDispatchBelowADInplaceOrView below;
  return reduce_op().redispatch(keys & c10::after_ADInplaceOrView_keyset, tensors, norm_type,
                                per_tensor);
}

std::tuple<at::Tensor, at::Tensor> finalize_autograd(c10::DispatchKeySet keys,
                                                     const at::Tensor& raw_norm,
                                                     std::optional<double> max_norm,
                                                     const std::optional<at::Tensor>& inv_scale,
                                                     at::ScalarType out_dtype) {
  check_not_differentiated(raw_norm, "finalize", "raw_norm");
  check_not_differentiated(inv_scale, "finalize", "inv_scale");
  at::AutoDispatchBelowADInplaceOrView below;
  return finalize_op().redispatch(keys & c10::after_ADInplaceOrView_keyset, raw_norm, max_norm,
                                  inv_scale, out_dtype);
}

void scale_autograd(c10::DispatchKeySet keys, at::TensorList tensors, const at::Tensor& clip_coef,
                    std::optional<double> clip_value) {
  check_not_differentiated(tensors, "scale_");
  check_not_differentiated(clip_coef, "scale_", "clip_coef");
  at::AutoDispatchBelowAutograd below;
  scale_op().redispatch(keys & c10::after_autograd_keyset, tensors, clip_coef, clip_value);
}

void scale_inplace(c10::DispatchKeySet keys, at::TensorList tensors, const at::Tensor& clip_coef,
                   std::optional<double> clip_value) {
  {
    at::AutoDispatchBelowADInplaceOrView below;
    scale_op().redispatch(keys & c10::after_ADInplaceOrView_keyset, tensors, clip_coef, clip_value);
  }
  bump_versions(tensors);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> clip_autograd(
    c10::DispatchKeySet keys, at::TensorList tensors, double norm_type,
    std::optional<double> max_norm, const std::optional<at::Tensor>& inv_scale,
    std::optional<double> clip_value, at::ScalarType out_dtype, bool per_tensor,
    c10::string_view launch) {
  check_not_differentiated(tensors, "clip_");
  check_not_differentiated(inv_scale, "clip_", "inv_scale");
  at::AutoDispatchBelowAutograd below;
  return clip_op().redispatch(keys & c10::after_autograd_keyset, tensors, norm_type, max_norm,
                              inv_scale, clip_value, out_dtype, per_tensor, launch);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> clip_inplace(
    c10::DispatchKeySet keys, at::TensorList tensors, double norm_type,
    std::optional<double> max_norm, const std::optional<at::Tensor>& inv_scale,
    std::optional<double> clip_value, at::ScalarType out_dtype, bool per_tensor,
    c10::string_view launch) {
  auto result = [&] {
    at::AutoDispatchBelowADInplaceOrView below;
    return clip_op().redispatch(keys & c10::after_ADInplaceOrView_keyset, tensors, norm_type,
                                max_norm, inv_scale, clip_value, out_dtype, per_tensor, launch);
  }();
  bump_versions(tensors);
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedclip, Autograd, m) {
  m.impl("reduce", &reduce_autograd);
  m.impl("finalize", &finalize_autograd);
  m.impl("scale_", &scale_autograd);
  m.impl("clip_", &clip_autograd);
}

TORCH_LIBRARY_IMPL(fusedclip, ADInplaceOrView, m) {
  m.impl("scale_", &scale_inplace);
  m.impl("clip_", &clip_inplace);
}

}  // namespace fusedclip
