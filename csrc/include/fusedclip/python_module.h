// The Python functions of the fusedclip._C module beside the ops: the planner's fast path
// (csrc/python_plan.cpp) and the unboxed op calls (csrc/python_ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <Python.h>
#include <fusedclip/checks.h>

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

}  // namespace fusedclip
