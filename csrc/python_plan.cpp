// fusedclip._C.plan_dense: the common case of fusedclip/plan.py in one C++ pass over the list
// (plan_common_case, which clip_dense_ in python_ops.cpp runs too).
//
// A Python loop over thousands of gradients costs about a microsecond each, which eager steps of
// small and MoE models feel. This function accepts only the common case (plain tensors, each dense
// and on one device, none sharing memory with another) and answers None for anything else, which
// the general path in plan.py then plans or refuses with its messages. It never raises for a
// gradient it dislikes, so the two paths cannot disagree on an error.
#include <fusedclip/checks.h>
#include <fusedclip/prefetch.h>
#include <fusedclip/python_module.h>
#include <torch/csrc/Device.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <new>
#include <optional>
#include <utility>
#include <vector>

namespace fusedclip {
namespace {

// Tensors without memory the kernels could read: wrappers inside a torch.func transform (grad,
// vmap, functionalize) and ZeroTensors. The general path refuses them by name.
const c10::DispatchKeySet kWithoutReadableMemory({c10::DispatchKey::FuncTorchGradWrapper,
                                                  c10::DispatchKey::FuncTorchBatched,
                                                  c10::DispatchKey::Functionalize,
                                                  c10::DispatchKey::ZeroTensor});

// Whether `tensor` is a gradient the kernels may take as it is, given the call's rules.
bool is_plain_dense(const at::Tensor& tensor, const at::Device& device, bool refuse_inference,
                    bool refuse_parameters, bool refuse_float16) {
  return tensor.defined() && !tensor.key_set().has_any(kWithoutReadableMemory) &&
         tensor.layout() == at::kStrided && !tensor.is_nested() &&
         is_supported_dtype(tensor.scalar_type()) &&
         !(refuse_float16 && tensor.scalar_type() == at::kHalf) && tensor.device() == device &&
         tensor.is_non_overlapping_and_dense() && !tensor.is_neg() &&
         !(refuse_inference && tensor.is_inference()) &&
         !(refuse_parameters && tensor.requires_grad() && tensor.is_leaf());
}

// A checked list of dense gradients in a C++ vector: what plan_dense hands to the unboxed op calls
// (csrc/python_ops.cpp), which take its tensors as they are. No Python list to build, copy, free
// or have the garbage collector walk. In Python, a read-only sequence of the tensors.
struct DenseGradientsObject {
  PyObject_HEAD DenseGradients gradients;
};

void dense_gradients_dealloc(PyObject* self) {
  reinterpret_cast<DenseGradientsObject*>(self)->gradients.~DenseGradients();
  Py_TYPE(self)->tp_free(self);
}

Py_ssize_t dense_gradients_length(PyObject* self) {
  return static_cast<Py_ssize_t>(
      reinterpret_cast<DenseGradientsObject*>(self)->gradients.tensors.size());
}

PyObject* dense_gradients_item(PyObject* self, Py_ssize_t index) {
  const auto& tensors = reinterpret_cast<DenseGradientsObject*>(self)->gradients.tensors;
  if (index < 0 || index >= static_cast<Py_ssize_t>(tensors.size())) {
    PyErr_SetString(PyExc_IndexError, "DenseGradients index out of range");
    return nullptr;
  }
  return THPVariable_Wrap(tensors[static_cast<size_t>(index)]);
}

PySequenceMethods dense_gradients_sequence = {
    dense_gradients_length,  // sq_length
    nullptr,                 // sq_concat
    nullptr,                 // sq_repeat
    dense_gradients_item,    // sq_item
};

PyTypeObject dense_gradients_type = {PyVarObject_HEAD_INIT(nullptr, 0)};

PyObject* new_dense_gradients(DenseGradients&& gradients) {
  auto* self = PyObject_New(DenseGradientsObject, &dense_gradients_type);
  if (self == nullptr) return nullptr;
  new (&self->gradients) DenseGradients(std::move(gradients));
  return reinterpret_cast<PyObject*>(self);
}

// The gradient `item` stands for: the tensor itself, or with of_parameters its .grad (undefined
// when it has none: skipped). False for what only Python may take (a tensor subclass; a
// non-leaf's missing .grad, which torch warns about). The gradient is returned as a reference of
// its own: THPVariable_Wrap may allocate and so run the garbage collector, whose finalizers may
// change the list and free the parameter (the caller then sees the list changed).
bool gradient_of(PyObject* item, bool of_parameters, at::Tensor& gradient) {
  if (!THPVariable_CheckExact(item)) return false;
  const at::Tensor& tensor = THPVariable_Unpack(item);
  if (!of_parameters) {
    gradient = tensor;
    return true;
  }
  // TensorImpl::grad, not Tensor::grad: that asks is_leaf on every call, for its warning.
  gradient = tensor.unsafeGetTensorImpl()->grad();
  if (!gradient.defined()) return tensor.is_leaf();    // no gradient: skipped
  PyObject* grad_object = THPVariable_Wrap(gradient);  // its Python type tells a subclass
  if (grad_object == nullptr) throw python_error();
  const bool plain = THPVariable_CheckExact(grad_object);
  Py_DECREF(grad_object);  // the parameter holds the gradient
  return plain;
}

// How many items apart the stages of prefetch_ahead work: 2 was faster than 4 or 8 at 10 000
// gradients (lines asked for too early are gone again before they are read).
constexpr Py_ssize_t kPrefetchStride = 2;

// Called before item i is planned: one link of the chain that gradient_of and is_plain_dense
// follow, for each of the next few items. The item farthest ahead gets its Python object asked
// for, the next one its TensorImpl, then (with of_parameters) its autograd metadata and its
// gradient's TensorImpl, and the nearest its storage; each stage reads only blocks that an
// earlier call asked for. Anything but a plain tensor is left to the main loop.
void prefetch_ahead(PyObject* items, Py_ssize_t i, Py_ssize_t count, bool of_parameters) {
  const Py_ssize_t stages = of_parameters ? 5 : 3;
  for (Py_ssize_t stage = 0; stage < stages; ++stage) {
    const Py_ssize_t ahead = i + (stages - stage) * kPrefetchStride;
    if (ahead >= count) continue;
    PyObject* item = PyList_GET_ITEM(items, ahead);
    if (stage == 0) {
      prefetch_bytes(item, sizeof(THPVariable));
      continue;
    }
    if (!THPVariable_CheckExact(item)) continue;
    const c10::TensorImpl* impl = THPVariable_Unpack(item).unsafeGetTensorImpl();
    if (stage == 1) {
      prefetch_bytes(impl, sizeof(c10::TensorImpl));
      continue;
    }
    if (of_parameters) {
      const c10::AutogradMetaInterface* meta = impl->autograd_meta();
      if (meta == nullptr) continue;
      if (stage == 2) {
        prefetch_bytes(meta, 2 * kCacheLine);  // the gradient's pointer is near its start
        continue;
      }
      const at::Tensor& grad = impl->grad();
      if (!grad.defined()) continue;
      impl = grad.unsafeGetTensorImpl();
      if (stage == 3) {
        prefetch_bytes(impl, sizeof(c10::TensorImpl));
        continue;
      }
    }
    prefetch_bytes(impl->unsafe_storage().unsafeGetStorageImpl(), kCacheLine);
  }
}

}  // namespace

std::optional<DensePlan> plan_common_case(PyObject* items, bool of_parameters,
                                          bool refuse_inference, bool refuse_parameters,
                                          bool refuse_float16) {
  const Py_ssize_t count = PyList_GET_SIZE(items);
  DenseGradients planned;
  std::vector<at::Tensor>& tensors = planned.tensors;
  tensors.reserve(static_cast<size_t>(count));
  planned.spans.reserve(static_cast<size_t>(count));
  std::vector<ByteSpan> ranges;  // the nonempty spans, sorted by the overlap check
  ranges.reserve(static_cast<size_t>(count));
  // Empty tensors hold no bytes to compare (their storages may all sit at address 0): two
  // views of one storage are found by the storage object instead.
  std::vector<ByteSpan> empty_storages;
  std::optional<at::Device> device;
  bool any_float64 = false;
  for (Py_ssize_t i = 0; i < count; ++i) {
    prefetch_ahead(items, i, count, of_parameters);
    at::Tensor tensor;
    if (!gradient_of(PyList_GET_ITEM(items, i), of_parameters, tensor)) return std::nullopt;
    // Python code ran (a finalizer) and changed the list: the general path plans what is there.
    if (PyList_GET_SIZE(items) != count) return std::nullopt;
    if (!tensor.defined()) continue;
    if (!device.has_value()) device = tensor.device();
    if (!is_plain_dense(tensor, *device, refuse_inference, refuse_parameters, refuse_float16)) {
      return std::nullopt;
    }
    any_float64 = any_float64 || tensor.scalar_type() == at::kDouble;
    const auto index = tensors.size();
    planned.spans.push_back(byte_span(tensor, index));
    if (tensor.numel() > 0) {
      ranges.push_back(planned.spans.back());
    } else {
      const auto storage = reinterpret_cast<uintptr_t>(tensor.storage().unsafeGetStorageImpl());
      empty_storages.push_back({storage, storage + 1, index});
    }
    tensors.push_back(std::move(tensor));
  }
  // Nothing to plan (no gradient at all), or memory listed twice: the general path decides.
  if (!device.has_value() || first_overlap(ranges) || first_overlap(empty_storages)) {
    return std::nullopt;
  }
  return DensePlan{std::move(planned), *device, any_float64};
}

namespace {

// plan_dense(items, of_parameters, refuse_inference, refuse_parameters, refuse_float16)
//   -> (DenseGradients, device, any_float64) or None
// items: a list of tensors (the gradients), or with of_parameters the parameters whose .grad to
// take (None grads skipped).
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
  HANDLE_TH_ERRORS
  std::optional<DensePlan> planned =
      plan_common_case(items, of_parameters != 0, refuse_inference != 0, refuse_parameters != 0,
                       refuse_float16 != 0);
  if (!planned.has_value()) Py_RETURN_NONE;
  PyObject* device_object = THPDevice_New(planned->device);
  if (device_object == nullptr) return nullptr;
  PyObject* gradients = new_dense_gradients(std::move(planned->gradients));
  if (gradients == nullptr) {
    Py_DECREF(device_object);
    return nullptr;
  }
  return Py_BuildValue("(NNO)", gradients, device_object,
                       planned->any_float64 ? Py_True : Py_False);
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"plan_dense", plan_dense, METH_VARARGS,
     "plan_dense(items, of_parameters, refuse_inference, refuse_parameters, refuse_float16): "
     "the common case of fusedclip.plan in one pass, or None (see csrc/python_plan.cpp)."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

PyMethodDef* python_plan_methods() { return methods; }

bool add_dense_gradients_type(PyObject* module) {
  dense_gradients_type.tp_name = "fusedclip._C.DenseGradients";
  dense_gradients_type.tp_basicsize = sizeof(DenseGradientsObject);
  dense_gradients_type.tp_dealloc = dense_gradients_dealloc;
  dense_gradients_type.tp_as_sequence = &dense_gradients_sequence;
  dense_gradients_type.tp_flags = Py_TPFLAGS_DEFAULT;
  dense_gradients_type.tp_doc =
      "The gradients fusedclip._C.plan_dense checked, for the unboxed op calls; a read-only "
      "sequence of tensors (made only by plan_dense).";
  if (PyType_Ready(&dense_gradients_type) < 0) return false;
  Py_INCREF(&dense_gradients_type);
  if (PyModule_AddObject(module, "DenseGradients",
                         reinterpret_cast<PyObject*>(&dense_gradients_type)) < 0) {
    Py_DECREF(&dense_gradients_type);
    return false;
  }
  return true;
}

const DenseGradients* dense_gradients(PyObject* object) {
  if (Py_TYPE(object) != &dense_gradients_type) return nullptr;
  return &reinterpret_cast<DenseGradientsObject*>(object)->gradients;
}

}  // namespace fusedclip
