// fusedclip::check_dense_aliasing: the aliasing rule of fusedclip/plan.py applied when compiled
// code runs, for lists of dense tensors (plan.checked_when_run says why it is an op, and runs the
// Python rule, fusedclip::check_aliasing, for any other list).
//
// A dense tensor fills its byte span exactly, so two of them share an element exactly when
// their spans intersect, and are the same memory exactly when their spans and dtypes are equal:
// one sort of the spans decides the rule, with no Python call per step of a compiled loop.
// (Empty tensors hold no bytes and are left out: listed twice they change no norm and no byte.)
// The messages' texts come from plan.py, so both rules word their refusals alike. Inference
// tensors are refused here too (when writing outside inference mode): tracing cannot see them.
#include <c10/core/InferenceMode.h>
#include <fusedclip/checks.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

namespace fusedclip {
namespace {

// How the messages name tensors[i], as plan.TensorNames does: name[positions[i]]suffix.
struct TensorNames {
  std::string_view name;
  c10::ArrayRef<int64_t> positions;
  std::string_view suffix;

  std::string of(size_t index) const {
    std::string label(name);
    label += "[" + text(positions[index]) + "]";
    label += suffix;
    return label;
  }
};

[[noreturn]] void refuse(const TensorNames& names, size_t a, size_t b, std::string_view reason) {
  TORCH_CHECK_VALUE(false, names.of(std::min(a, b)), " and ", names.of(std::max(a, b)), " ",
                    reason);
}

at::Tensor check_dense_aliasing(at::TensorList tensors, const at::Tensor& value,
                                c10::string_view name, c10::IntArrayRef positions,
                                c10::string_view suffix, bool writes, c10::string_view same_memory,
                                c10::string_view overlap, c10::string_view inference_tensor) {
  TORCH_CHECK(positions.size() == tensors.size(),
              "fusedclip::check_dense_aliasing: ", text(positions.size()), " positions for ",
              text(tensors.size()), " tensors");
  const TensorNames names{name, positions, suffix};
  // As eager torch: inference tensors are written only inside inference mode.
  const bool refuse_inference = writes && !c10::InferenceMode::is_enabled();
  std::vector<ByteSpan> spans;
  spans.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& tensor = tensors[i];
    TORCH_CHECK(tensor.is_non_overlapping_and_dense(),
                "fusedclip::check_dense_aliasing: ", names.of(i),
                " is not dense; fusedclip::check_aliasing takes such lists");
    TORCH_CHECK_VALUE(!(refuse_inference && tensor.is_inference()), names.of(i), " ",
                      inference_tensor);
    if (tensor.numel() > 0) spans.push_back(byte_span(tensor, i));
  }
  const auto dtype = [&](const ByteSpan& span) { return tensors[span.index].scalar_type(); };
  // By dtype too: the same memory sorts next to itself even among other dtypes' views of it.
  std::sort(spans.begin(), spans.end(), [&](const ByteSpan& a, const ByteSpan& b) {
    return std::make_tuple(a.begin, a.end, dtype(a), a.index) <
           std::make_tuple(b.begin, b.end, dtype(b), b.index);
  });
  const auto same = [&](const ByteSpan& a, const ByteSpan& b) {
    return a.begin == b.begin && a.end == b.end && dtype(a) == dtype(b);
  };
  // Repeats sort next to each other; an overlap shows against the farthest-reaching span.
  std::optional<ByteSpan> farthest;
  for (size_t k = 0; k < spans.size(); ++k) {
    const ByteSpan& span = spans[k];
    if (k > 0 && same(spans[k - 1], span))
      refuse(names, spans[k - 1].index, span.index, same_memory);
    if (writes && farthest.has_value() && span.begin < farthest->end) {
      refuse(names, farthest->index, span.index, same(*farthest, span) ? same_memory : overlap);
    }
    if (!farthest.has_value() || span.end > farthest->end) farthest = span;
  }
  return value.clone();
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedclip, CompositeExplicitAutograd, m) {
  m.impl("check_dense_aliasing", &check_dense_aliasing);
}

}  // namespace fusedclip
