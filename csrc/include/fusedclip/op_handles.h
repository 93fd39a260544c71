// Typed handles of the fusedclip ops, for C++ that calls them through the dispatcher
// (csrc/python_ops.cpp, csrc/autograd.cpp). The signatures are the C++ types of the schemas in
// csrc/registration.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace fusedclip {

using ReduceSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(at::TensorList, double,
                                                                       bool);
using FinalizeSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&,
                                                             std::optional<double>,
                                                             const std::optional<at::Tensor>&,
                                                             at::ScalarType);
using ScaleSignature = void(at::TensorList, const at::Tensor&, std::optional<double>);
using ClipSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    at::TensorList, double, std::optional<double>, const std::optional<at::Tensor>&,
    std::optional<double>, at::ScalarType, bool, c10::string_view);

// Each op's handle, looked up on first use (after registration.cpp's TORCH_LIBRARY ran).
#define FUSEDCLIP_OP_HANDLE(function, name, Signature)                               \
  inline const c10::TypedOperatorHandle<Signature>& function() {                     \
    static const auto handle =                                                       \
        c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>(); \
    return handle;                                                                   \
  }

FUSEDCLIP_OP_HANDLE(reduce_op, "fusedclip::reduce", ReduceSignature)
FUSEDCLIP_OP_HANDLE(finalize_op, "fusedclip::finalize", FinalizeSignature)
FUSEDCLIP_OP_HANDLE(scale_op, "fusedclip::scale_", ScaleSignature)
FUSEDCLIP_OP_HANDLE(clip_op, "fusedclip::clip_", ClipSignature)
#undef FUSEDCLIP_OP_HANDLE

}  // namespace fusedclip
