// The Python functions of the fusedclip._C module beside the ops: the planner's fast path
// (csrc/python_plan.cpp) and the unboxed op calls (csrc/python_ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <Python.h>

#include <vector>

namespace fusedclip {

// Null-terminated method tables that registration.cpp puts in the fusedclip._C module.
PyMethodDef* python_plan_methods();
PyMethodDef* python_op_methods();

// Adds fusedclip._C.DenseGradients, what plan_dense returns, to `module`; false with a Python
// error set when that fails.
bool add_dense_gradients_type(PyObject* module);

// The tensors of a DenseGradients, or nullptr when `object` is something else.
const std::vector<at::Tensor>* dense_gradients_tensors(PyObject* object);

}  // namespace fusedclip
