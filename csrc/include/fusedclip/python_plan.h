// The Python functions of fusedclip._C beside the ops (csrc/python_plan.cpp).
#pragma once

#include <Python.h>

namespace fusedclip {

// Null-terminated method table that registration.cpp puts in the fusedclip._C module.
PyMethodDef* python_plan_methods();

}  // namespace fusedclip
