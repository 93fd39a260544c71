// The Python functions of the fusedclip._C module beside the ops: the planner's fast path
// (csrc/python_plan.cpp) and the unboxed op calls (csrc/python_ops.cpp).
#pragma once

#include <Python.h>

namespace fusedclip {

// Null-terminated method tables that registration.cpp puts in the fusedclip._C module.
PyMethodDef* python_plan_methods();
PyMethodDef* python_op_methods();

}  // namespace fusedclip
