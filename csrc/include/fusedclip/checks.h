// Argument checks shared by every backend's host wrappers. Messages name the argument and the fix.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace fusedclip {

// Numbers enter messages as strings. Formatting them through an ostream compiled into this
// library crashed (SIGSEGV in num_put) where the extension's compiler was newer than the
// libstdc++ loaded at run time (seen on the GPU machine: GCC 13 headers, torch 2.11).
template <typename Number>
std::string text(Number value) {
  return std::to_string(value);
}

// The dtypes every backend supports, in the order of the CUDA dtype groups (multi_tensor.cuh
// checks the match at compile time); fusedclip/norms.py SUPPORTED_DTYPES is the Python twin.
inline constexpr std::array<at::ScalarType, 4> kSupportedDtypes = {at::kFloat, at::kHalf,
                                                                   at::kBFloat16, at::kDouble};

inline bool is_supported_dtype(at::ScalarType dtype) {
  return std::find(kSupportedDtypes.begin(), kSupportedDtypes.end(), dtype) !=
         kSupportedDtypes.end();
}

// Every kernel walks a tensor's storage span as one flat array, so the tensor must be dense and
// non-overlapping (contiguous, channels-last and transposed gradients all are); the Python layer
// copies anything else to a contiguous buffer first. check_gradient is one tensor of the list.
inline void check_gradient(const at::Tensor& t, size_t i, const at::Device& device,
                           const char* name) {
  TORCH_CHECK(t.device() == device, name, "[", text(i), "] is on ", t.device(), " but ", name,
              "[0] is on ", device, "; group the tensors by device");
  TORCH_CHECK(is_supported_dtype(t.scalar_type()), name, "[", text(i), "] has dtype ",
              t.scalar_type(), "; use float32, float16, bfloat16 or float64");
  TORCH_CHECK(t.layout() == at::kStrided, name, "[", text(i), "] is not a strided (dense) tensor");
  TORCH_CHECK(t.is_non_overlapping_and_dense(), name, "[", text(i),
              "] is not dense and non-overlapping; pass a contiguous copy");
}

inline void check_not_empty(at::TensorList tensors, const char* name) {
  TORCH_CHECK(!tensors.empty(), name,
              " must hold at least one tensor; skip the call when there is none");
}

inline void check_gradient_list(at::TensorList tensors, const char* name) {
  check_not_empty(tensors, name);
  const auto device = tensors[0].device();
  for (size_t i = 0; i < tensors.size(); ++i) check_gradient(tensors[i], i, device, name);
}

// The write pass scales every listed tensor in place, chunks in parallel: two tensors that share
// memory would be scaled twice, by two threads at once. The Python layer lists the same memory
// once and refuses partial overlaps (fusedclip/plan.py); this keeps a direct op call as safe.
// Call after check_gradient_list (each tensor dense, so it spans numel * element_size bytes).
// A tensor's bytes [begin, end) and its position in the caller's list.
struct ByteSpan {
  uintptr_t begin;
  uintptr_t end;
  size_t index;
};

// The indices of two spans that intersect, or nullopt when all are disjoint. Sorts `spans` by
// begin, unless they are in that order already (gradients often sit in memory in list order).
inline std::optional<std::pair<size_t, size_t>> first_overlap(std::vector<ByteSpan>& spans) {
  const auto by_begin = [](const ByteSpan& a, const ByteSpan& b) { return a.begin < b.begin; };
  if (!std::is_sorted(spans.begin(), spans.end(), by_begin)) {
    std::sort(spans.begin(), spans.end(), by_begin);
  }
  for (size_t k = 1; k < spans.size(); ++k) {
    if (spans[k].begin < spans[k - 1].end) {
      return std::make_pair(std::min(spans[k - 1].index, spans[k].index),
                            std::max(spans[k - 1].index, spans[k].index));
    }
  }
  return std::nullopt;
}

// Raises for the pair of positions first_overlap found, if any.
inline void check_no_overlap(const std::optional<std::pair<size_t, size_t>>& overlap,
                             const char* name) {
  TORCH_CHECK(!overlap.has_value(), name, "[", text(overlap ? overlap->first : 0), "] and ", name,
              "[", text(overlap ? overlap->second : 0),
              "] share memory, so scaling in place would scale it twice; list each gradient "
              "once (the fusedclip API drops repeats)");
}

// `spans`: the byte spans of the list's nonempty tensors (reordered by the check).
inline void check_disjoint(std::vector<ByteSpan>& spans, const char* name) {
  check_no_overlap(first_overlap(spans), name);
}

// A tensor's bytes, for check_disjoint; call after check_gradient (a dense tensor spans
// numel * element_size bytes from its data pointer).
inline ByteSpan byte_span(const void* data, int64_t bytes, size_t index) {
  const auto begin = reinterpret_cast<uintptr_t>(data);
  return {begin, begin + static_cast<uintptr_t>(bytes), index};
}

inline ByteSpan byte_span(const at::Tensor& t, size_t index) {
  return byte_span(t.const_data_ptr(), t.numel() * static_cast<int64_t>(t.element_size()), index);
}

inline void check_norm_type(double norm_type) {
  TORCH_CHECK(norm_type > 0.0, "norm_type must be > 0 (or inf), got ", text(norm_type));
}

inline void check_scalar_tensor(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.numel() == 1, name, " must hold one element, got ", text(t.numel()));
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, name, " is on ", t.device(), " but must be on ", device);
}

inline void check_clip_value(std::optional<double> clip_value) {
  TORCH_CHECK(!clip_value.has_value() || *clip_value >= 0.0, "clip_value must be >= 0, got ",
              text(clip_value.value_or(0.0)));
}

inline void check_out_dtype(at::ScalarType out_dtype) {
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kDouble,
              "out_dtype must be float32 or float64, got ", out_dtype);
}

// clip_'s `launch`: how a backend runs the three passes. "single" (one cooperative launch) and
// "split" (one launch per pass) only mean something to the CUDA kernels; "auto" lets them choose.
enum class Launch { kAuto, kSingle, kSplit };

inline Launch parse_launch(c10::string_view launch) {
  if (launch == "auto") return Launch::kAuto;
  if (launch == "single") return Launch::kSingle;
  if (launch == "split") return Launch::kSplit;
  TORCH_CHECK(false, "launch must be 'auto', 'single' or 'split', got '", std::string(launch),
              "'; 'auto' picks the fastest");
}

}  // namespace fusedclip
