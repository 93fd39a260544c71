// fusedclip._C.plan_dense: the common case of fusedclip/plan.py in one C++ pass over the list.
//
// A Python loop over thousands of gradients costs about a microsecond each, which eager steps of
// small and MoE models feel. This function accepts only the common case (plain tensors, each dense
// and on one device, none sharing memory with another) and answers None for anything else, which
// the general path in plan.py then plans or refuses with its messages. It never raises for a
// gradient it dislikes, so the two paths cannot disagree on an error.
#include <fusedclip/checks.h>
#include <fusedclip/python_module.h>
#include <torch/csrc/Device.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace fusedclip {
namespace {

// Whether `tensor` is a gradient the kernels may take as it is, given the call's rules.
bool is_plain_dense(const at::Tensor& tensor, const at::Device& device, bool refuse_inference,
                    bool refuse_parameters, bool refuse_float16) {
  return tensor.defined() && tensor.layout() == at::kStrided &&
         is_supported_dtype(tensor.scalar_type()) &&
         !(refuse_float16 && tensor.scalar_type() == at::kHalf) && tensor.device() == device &&
         tensor.is_non_overlapping_and_dense() && !tensor.is_neg() &&
         !(refuse_inference && tensor.is_inference()) &&
         !(refuse_parameters && tensor.requires_grad() && tensor.is_leaf());
}

// plan_dense(items, of_parameters, refuse_inference, refuse_parameters, refuse_float16)
//   -> (tensors, device, any_float64) or None
// items: a list of tensors (the gradients), or with of_parameters the parameters whose .grad to
// take (None grads skipped). tensors: the gradients, in order (the list itself when not gathering).
PyObject* plan_dense(PyObject* /*module*/, PyObject* args) {
  PyObject* items = nullptr;
  int of_parameters = 0;
  int refuse_inference = 0;
  int refuse_parameters = 0;
  int refuse_float16 = 0;
  if (!PyArg_ParseTuple(args, "O!pppp", &PyList_Type, &items, &of_parameters, &refuse_inference,
                        &refuse_parameters, &refuse_float16)) {
    return nullptr;
  }
  PyObject* tensors = items;
  if (of_parameters) {
    tensors = PyList_New(0);
    if (tensors == nullptr) return nullptr;
  }
  // Releases `tensors` when it is this call's own list, on every early return.
  auto drop = [&]() {
    if (tensors != items) Py_DECREF(tensors);
  };
  try {
    const Py_ssize_t count = PyList_GET_SIZE(items);
    std::vector<ByteSpan> ranges;
    ranges.reserve(static_cast<size_t>(count));
    // Empty tensors hold no bytes to compare (their storages may all sit at address 0): two
    // views of one storage are found by the storage object instead.
    std::vector<ByteSpan> empty_storages;
    std::optional<at::Device> device;
    bool any_float64 = false;
    for (Py_ssize_t i = 0; i < count; ++i) {
      PyObject* item = PyList_GET_ITEM(items, i);
      if (!THPVariable_CheckExact(item)) {
        drop();
        Py_RETURN_NONE;
      }
      const at::Tensor* tensor = &THPVariable_Unpack(item);
      if (of_parameters) {
        if (!tensor->is_leaf()) {  // torch warns about .grad of a non-leaf: let Python do it
          drop();
          Py_RETURN_NONE;
        }
        const at::Tensor& grad = tensor->grad();
        if (!grad.defined()) continue;
        PyObject* grad_object = THPVariable_Wrap(grad);
        if (grad_object == nullptr) {
          drop();
          return nullptr;
        }
        const bool plain = THPVariable_CheckExact(grad_object);
        const int appended = plain ? PyList_Append(tensors, grad_object) : 0;
        Py_DECREF(grad_object);  // the list holds it, and the parameter holds the tensor
        if (!plain || appended != 0) {
          drop();
          if (appended != 0) return nullptr;
          Py_RETURN_NONE;
        }
        tensor = &grad;
      }
      if (!device.has_value()) device = tensor->device();
      if (!is_plain_dense(*tensor, *device, refuse_inference, refuse_parameters, refuse_float16)) {
        drop();
        Py_RETURN_NONE;
      }
      any_float64 = any_float64 || tensor->scalar_type() == at::kDouble;
      const int64_t bytes = tensor->numel() * static_cast<int64_t>(tensor->element_size());
      if (bytes > 0) {
        const auto begin = reinterpret_cast<uintptr_t>(tensor->const_data_ptr());
        ranges.push_back({begin, begin + static_cast<uintptr_t>(bytes), static_cast<size_t>(i)});
      } else {
        const auto storage = reinterpret_cast<uintptr_t>(tensor->storage().unsafeGetStorageImpl());
        empty_storages.push_back({storage, storage + 1, static_cast<size_t>(i)});
      }
    }
    if (first_overlap(ranges) ||
        first_overlap(empty_storages)) {  // the general path decides repeats
      drop();
      Py_RETURN_NONE;
    }
    if (!device.has_value()) {  // nothing to plan: no gradient at all
      drop();
      Py_RETURN_NONE;
    }
    PyObject* device_object = THPDevice_New(*device);
    if (device_object == nullptr) {
      drop();
      return nullptr;
    }
    if (tensors == items) Py_INCREF(tensors);
    return Py_BuildValue("(NNO)", tensors, device_object, any_float64 ? Py_True : Py_False);
  } catch (const std::exception& error) {
    drop();
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"plan_dense", plan_dense, METH_VARARGS,
     "plan_dense(items, of_parameters, refuse_inference, refuse_parameters, refuse_float16): "
     "the common case "
     "of fusedclip.plan in one pass, or None (see csrc/python_plan.cpp)."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

PyMethodDef* python_plan_methods() { return methods; }

}  // namespace fusedclip
