// The byte spans that the C++ planner found disjoint, offered to the write op that runs on the
// same list.
//
// plan_dense (python_plan.cpp) accepts only gradients that share no memory, which it decides by
// sorting their byte spans; the CPU write ops check the same of every list they get
// (check_disjoint), a second sort of the same spans in every clip call. While an unboxed call
// (python_ops.cpp) runs an op on a DenseGradients, the spans planned for it are published here,
// for this thread, until the dispatcher call returns. An op whose tensors' spans all still equal
// them knows its list disjoint without sorting. It is a hint that every use checks, not trust:
// a tensor resized or re-pointed since planning (or a different list) makes the spans differ,
// and the op sorts and checks as it always does.
#pragma once

#include <ATen/core/Tensor.h>
#include <fusedclip/checks.h>

#include <cstddef>
#include <vector>

namespace fusedclip {

struct PlannedSpans {
  const at::Tensor* tensors = nullptr;  // the planned list: its spans are spans[0..count)
  const ByteSpan* spans = nullptr;      // spans[i]: byte_span of tensors[i] when planned
  size_t count = 0;
};

// What is published on this thread now (empty when nothing is).
PlannedSpans& planned_spans_of_this_thread();

// Publishes `spans` while it lives, then restores what was there.
class PublishedSpans {
 public:
  explicit PublishedSpans(const PlannedSpans& spans) : previous_(planned_spans_of_this_thread()) {
    planned_spans_of_this_thread() = spans;
  }
  ~PublishedSpans() { planned_spans_of_this_thread() = previous_; }
  PublishedSpans(const PublishedSpans&) = delete;
  PublishedSpans& operator=(const PublishedSpans&) = delete;

 private:
  PlannedSpans previous_;
};

// Whether tensors[i]'s span is spans[i] for every i, where `spans` (byte_span of each tensor, in
// list order) belong to `tensors`: then they are disjoint, as the planner found them.
inline bool spans_as_planned(at::TensorList tensors, const std::vector<ByteSpan>& spans) {
  const PlannedSpans& planned = planned_spans_of_this_thread();
  if (planned.tensors != tensors.data() || planned.count != spans.size()) return false;
  for (size_t i = 0; i < spans.size(); ++i) {
    if (spans[i].begin != planned.spans[i].begin || spans[i].end != planned.spans[i].end) {
      return false;
    }
  }
  return true;
}

}  // namespace fusedclip
