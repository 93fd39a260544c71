// The one place where the extension's op schemas live. Backend files add kernels with
// TORCH_LIBRARY_IMPL(fusedclip, <DispatchKey>, m); csrc/README.md states each op's contract.
// (fusedclip/plan.py adds fusedclip::check_aliasing, which runs without the extension too.)
#include <Python.h>
#include <fusedclip/python_module.h>
#include <torch/library.h>

#include <vector>

extern "C" {
// Importing fusedclip._C runs the static registrations below; the module itself holds the
// planner's fast path with its DenseGradients (csrc/python_plan.cpp) and the unboxed op calls
// (csrc/python_ops.cpp).
PyObject* PyInit__C(void) {
  static std::vector<PyMethodDef> methods = [] {
    std::vector<PyMethodDef> all;
    for (PyMethodDef* table : {fusedclip::python_plan_methods(), fusedclip::python_op_methods()}) {
      for (; table->ml_name != nullptr; ++table) all.push_back(*table);
    }
    all.push_back({nullptr, nullptr, 0, nullptr});
    return all;
  }();
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods.data()};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && !fusedclip::add_dense_gradients_type(module)) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

TORCH_LIBRARY(fusedclip, m) {
  m.def(
      "reduce(Tensor[] tensors, float norm_type, bool per_tensor) -> "
      "(Tensor raw_norm, Tensor found_inf, Tensor per_tensor_norms)");
  m.def(
      "finalize(Tensor raw_norm, float? max_norm, Tensor? inv_scale, ScalarType out_dtype) -> "
      "(Tensor total_norm, Tensor clip_coef)");
  m.def("scale_(Tensor(a!)[] tensors, Tensor clip_coef, float? clip_value) -> ()");
  m.def(
      "clip_(Tensor(a!)[] tensors, float norm_type, float? max_norm, Tensor? inv_scale, "
      "float? clip_value, ScalarType out_dtype, bool per_tensor, str launch=\"auto\") -> "
      "(Tensor total_norm, Tensor found_inf, Tensor clip_coef, Tensor per_tensor_norms)");
  m.def(
      "check_dense_aliasing(Tensor[] tensors, Tensor value, str name, int[] positions, "
      "str suffix, bool writes, str same_memory, str overlap, str inference_tensor) -> Tensor");
}
