// The Python functions of the fusedclip._C module beside the ops: the planner's fast path
// (csrc/python_plan.cpp) and the unboxed op calls (csrc/python_ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <Python.h>
#include <fusedclip/checks.h>

#include <optional>
#include <vector>

namespace fusedclip {

// Null-terminated method tables that registration.cpp puts in the fusedclip._C module.
PyMethodDef* python_plan_methods();
PyMethodDef* python_op_methods();

// Adds fusedclip._C.DenseGradients, what plan_dense returns, to `module`; false with a Python
// error set when that fails.
bool add_dense_gradients_type(PyObject* module);

// What a DenseGradients holds: the checked tensors, and each one's byte span when planned (in
// list order; the write ops' PlannedSpans, planned_spans.h).
struct DenseGradients {
  std::vector<at::Tensor> tensors;
  std::vector<ByteSpan> spans;
};

// A DenseGradients' contents, or nullptr when `object` is something else.
const DenseGradients* dense_gradients(PyObject* object);

// What the C++ planner found: the checked gradients, their one device, whether any is float64.
struct DensePlan {
  DenseGradients gradients;
  at::Device device;
  bool any_float64;
};

// The common case of fusedclip/plan.py planned in one pass over `items`, a Python list (with
// the GIL held); nullopt for anything else, which the general path plans or refuses
// (python_plan.cpp says what it takes).
std::optional<DensePlan> plan_common_case(PyObject* items, bool of_parameters,
                                          bool refuse_inference, bool refuse_parameters,
                                          bool refuse_float16);

}  // namespace fusedclip
