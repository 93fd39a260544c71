// fusedclip._C.call_reduce / call_scale_ / call_clip_: the list-taking ops called from Python
// through the C++ dispatcher, unboxed.
//
// torch.ops.fusedclip.clip_(tensors, ...) boxes a Python list of N tensors into IValues and
// unboxes it again into the kernel's vector: about 40 ns per tensor, more than the CPU kernels
// spend on a small gradient. These bindings build the vector once from the list and make the
// same typed dispatcher call (from the planner's DenseGradients, with no copy at all), so every
// dispatch key (CPU, CUDA, Python modes, autograd) still
// sees the op. Where torch.ops would do more than that (a tensor subclass that may override
// __torch_function__, an active torch function mode) they answer NotImplemented and
// fusedclip/ops.py calls torch.ops instead.
//
// clip_dense_ and scale_dense_ are the C++ planner's common case and call_clip_ / call_scale_ on
// what it planned in one call, for fusedclip/plan.py's prepare_and_clip and prepare_and_scale.
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/ops/full.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <fusedclip/op_handles.h>
#include <fusedclip/planned_spans.h>
#include <fusedclip/python_module.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

namespace fusedclip {
namespace {

// The tensors of `object`: a DenseGradients' own (no copy), or a list's plain tensors copied into
// `storage`; nullopt where torch.ops must take the call (see the file comment).
std::optional<at::TensorList> tensor_list(PyObject* object, std::vector<at::Tensor>& storage) {
  if (at::impl::torch_function_mode_enabled()) return std::nullopt;
  if (const DenseGradients* planned = dense_gradients(object)) return planned->tensors;
  if (!PyList_CheckExact(object)) return std::nullopt;
  const Py_ssize_t count = PyList_GET_SIZE(object);
  storage.reserve(static_cast<size_t>(count));
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* item = PyList_GET_ITEM(object, i);
    if (!THPVariable_CheckExact(item)) return std::nullopt;
    storage.push_back(THPVariable_Unpack(item));
  }
  return storage;
}

// The spans a write op may find its tensors disjoint by (planned_spans.h): those planned for a
// DenseGradients, none for a list.
PlannedSpans planned_spans(const DenseGradients& planned) {
  return {planned.tensors.data(), planned.spans.data(), planned.spans.size()};
}

PlannedSpans planned_spans(PyObject* object) {
  const DenseGradients* planned = dense_gradients(object);
  return planned == nullptr ? PlannedSpans{} : planned_spans(*planned);
}

// A plain tensor, or nullopt for None; `ok` false for anything torch.ops must see.
std::optional<at::Tensor> optional_tensor(PyObject* object, bool& ok) {
  ok = object == Py_None || THPVariable_CheckExact(object);
  if (!ok || object == Py_None) return std::nullopt;
  return THPVariable_Unpack(object);
}

// None or a float (an int converts); nullopt with a Python error set when it is neither.
std::optional<double> optional_double(PyObject* object, bool& ok) {
  ok = true;
  if (object == Py_None) return std::nullopt;
  const double value = PyFloat_AsDouble(object);
  ok = !(value == -1.0 && PyErr_Occurred());
  return value;
}

// Runs the dispatcher call without the GIL, as torch.ops does, so other Python threads go on
// while the kernels run.
class ReleasedGil {
 public:
  ReleasedGil() : state_(PyEval_SaveThread()) {}
  ~ReleasedGil() { PyEval_RestoreThread(state_); }
  ReleasedGil(const ReleasedGil&) = delete;
  ReleasedGil& operator=(const ReleasedGil&) = delete;

 private:
  PyThreadState* state_;
};

PyObject* wrap(at::Tensor tensor) { return THPVariable_Wrap(std::move(tensor)); }

// call_reduce(tensors, norm_type, per_tensor) -> (raw_norm, found_inf, per_tensor_norms)
PyObject* call_reduce(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* list = nullptr;
  double norm_type = 0.0;
  int per_tensor = 0;
  if (!PyArg_ParseTuple(args, "Odp", &list, &norm_type, &per_tensor)) return nullptr;
  std::vector<at::Tensor> storage;
  const auto tensors = tensor_list(list, storage);
  if (!tensors) Py_RETURN_NOTIMPLEMENTED;
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result;
  {
    ReleasedGil released;
    result = reduce_op().call(*tensors, norm_type, per_tensor != 0);
  }
  return Py_BuildValue("(NNN)", wrap(std::move(std::get<0>(result))),
                       wrap(std::move(std::get<1>(result))), wrap(std::move(std::get<2>(result))));
  END_HANDLE_TH_ERRORS
}

// scale_ on checked arguments, unboxed.
void run_scale(at::TensorList tensors, const PlannedSpans& spans, const at::Tensor& clip_coef,
               std::optional<double> clip_value) {
  ReleasedGil released;
  PublishedSpans published(spans);
  scale_op().call(tensors, clip_coef, clip_value);
}

// call_scale_(tensors, clip_coef, clip_value) -> None
PyObject* call_scale_(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* list = nullptr;
  PyObject* coef_object = nullptr;
  PyObject* clip_value_object = nullptr;
  if (!PyArg_ParseTuple(args, "OOO", &list, &coef_object, &clip_value_object)) return nullptr;
  bool ok = false;
  const std::optional<double> clip_value = optional_double(clip_value_object, ok);
  if (!ok) return nullptr;
  std::vector<at::Tensor> storage;
  const auto tensors = tensor_list(list, storage);
  if (!tensors || !THPVariable_CheckExact(coef_object)) Py_RETURN_NOTIMPLEMENTED;
  run_scale(*tensors, planned_spans(list), THPVariable_Unpack(coef_object), clip_value);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// clip_ on checked arguments, unboxed, as a Python tuple (total_norm, found_inf, clip_coef,
// per_tensor_norms).
PyObject* run_clip(at::TensorList tensors, const PlannedSpans& spans, double norm_type,
                   std::optional<double> max_norm, const std::optional<at::Tensor>& inv_scale,
                   std::optional<double> clip_value, at::ScalarType out_dtype, bool per_tensor,
                   std::string_view launch) {
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> result;
  {
    ReleasedGil released;
    PublishedSpans published(spans);
    result = clip_op().call(tensors, norm_type, max_norm, inv_scale, clip_value, out_dtype,
                            per_tensor, launch);
  }
  return Py_BuildValue("(NNNN)", wrap(std::move(std::get<0>(result))),
                       wrap(std::move(std::get<1>(result))), wrap(std::move(std::get<2>(result))),
                       wrap(std::move(std::get<3>(result))));
}

// call_clip_(tensors, norm_type, max_norm, inv_scale, clip_value, out_dtype, per_tensor, launch)
//   -> (total_norm, found_inf, clip_coef, per_tensor_norms)
PyObject* call_clip_(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* list = nullptr;
  double norm_type = 0.0;
  PyObject* max_norm_object = nullptr;
  PyObject* inv_scale_object = nullptr;
  PyObject* clip_value_object = nullptr;
  PyObject* dtype_object = nullptr;
  int per_tensor = 0;
  const char* launch = nullptr;
  if (!PyArg_ParseTuple(args, "OdOOOO!ps", &list, &norm_type, &max_norm_object, &inv_scale_object,
                        &clip_value_object, &THPDtypeType, &dtype_object, &per_tensor, &launch)) {
    return nullptr;
  }
  bool ok = false;
  const std::optional<double> max_norm = optional_double(max_norm_object, ok);
  if (!ok) return nullptr;
  const std::optional<double> clip_value = optional_double(clip_value_object, ok);
  if (!ok) return nullptr;
  const std::optional<at::Tensor> inv_scale = optional_tensor(inv_scale_object, ok);
  std::vector<at::Tensor> storage;
  const auto tensors = tensor_list(list, storage);
  if (!tensors || !ok) Py_RETURN_NOTIMPLEMENTED;
  const at::ScalarType out_dtype = reinterpret_cast<THPDtype*>(dtype_object)->scalar_type;
  return run_clip(*tensors, planned_spans(list), norm_type, max_norm, inv_scale, clip_value,
                  out_dtype, per_tensor != 0, launch);
  END_HANDLE_TH_ERRORS
}

// What clip_dense_ and scale_dense_ run on: the common case of `items` planned, on a device whose
// backend is these ops; nullopt for anything else, and under a torch function or dispatch mode
// (a mode must see every op the general path runs, and the tensors this makes are its own).
std::optional<DensePlan> plan_for_these_ops(PyObject* items, int of_parameters,
                                            int refuse_inference, int refuse_parameters,
                                            int refuse_float16, int on_cpu, int on_cuda) {
  if (at::impl::torch_function_mode_enabled() || c10::impl::TorchDispatchModeTLS::any_modes_set()) {
    return std::nullopt;
  }
  std::optional<DensePlan> planned =
      plan_common_case(items, of_parameters != 0, refuse_inference != 0, refuse_parameters != 0,
                       refuse_float16 != 0);
  if (!planned.has_value()) return std::nullopt;
  const at::Device& device = planned->device;
  if (!(device.is_cpu() ? on_cpu != 0 : device.is_cuda() && on_cuda != 0)) return std::nullopt;
  return planned;
}

// A plain tensor of one element and no dimensions on `device`, float32 or float64; nullopt
// (with `ok` false) for anything else that is not None.
std::optional<at::Tensor> scalar_on(PyObject* object, const at::Device& device, bool& ok) {
  std::optional<at::Tensor> tensor = optional_tensor(object, ok);
  ok = ok && tensor.has_value() && tensor->dim() == 0 && tensor->device() == device &&
       (tensor->scalar_type() == at::kFloat || tensor->scalar_type() == at::kDouble);
  return ok ? tensor : std::nullopt;
}

at::Tensor float64_scalar(double value, const at::Device& device) {
  return at::full({}, value, at::TensorOptions(at::kDouble).device(device));
}

// A float64 1 on the CPU, made once (only ever read), as fusedclip/api.py's _one. Called with the
// GIL held, which guards it; never freed. (On a GPU, scale_dense_ leaves a write without a
// coefficient to the general path and its _one: a 1 first made while a CUDA graph is captured
// lives in the graph's memory, and two caches could disagree on when that happened.)
at::Tensor cpu_float64_one() {
  static auto* one = new at::Tensor(float64_scalar(1.0, at::Device(at::kCPU)));
  return *one;
}

// clip_dense_(items, of_parameters, refuse_inference, refuse_parameters, refuse_float16, on_cpu,
//             on_cuda, norm_type, max_norm, inv_scale, clip_value)
//   -> (total_norm, found_inf, clip_coef, per_tensor_norms) or None
// fusedclip/plan.py's prepare_and_clip: plan_dense, then clip_ (launch "auto", no per-tensor
// norms) on what it planned, when that is on a device whose backend is these ops (on_cpu,
// on_cuda). inv_scale as the general path hands it to clip_: None, a float (a float64 tensor on
// the device), or a 0-dim float32/float64 tensor on the device. None, having written nothing, for
// anything else: the caller then plans and calls as usual. The arguments are checked already;
// the op checks them again.
PyObject* clip_dense_(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* items = nullptr;
  int of_parameters = 0;
  int refuse_inference = 0;
  int refuse_parameters = 0;
  int refuse_float16 = 0;
  int on_cpu = 0;
  int on_cuda = 0;
  double norm_type = 0.0;
  PyObject* max_norm_object = nullptr;
  PyObject* inv_scale_object = nullptr;
  PyObject* clip_value_object = nullptr;
  if (!PyArg_ParseTuple(args, "O!ppppppdOOO", &PyList_Type, &items, &of_parameters,
                        &refuse_inference, &refuse_parameters, &refuse_float16, &on_cpu, &on_cuda,
                        &norm_type, &max_norm_object, &inv_scale_object, &clip_value_object)) {
    return nullptr;
  }
  bool ok = false;
  const std::optional<double> max_norm = optional_double(max_norm_object, ok);
  if (!ok) return nullptr;
  const std::optional<double> clip_value = optional_double(clip_value_object, ok);
  if (!ok) return nullptr;
  const std::optional<DensePlan> planned = plan_for_these_ops(
      items, of_parameters, refuse_inference, refuse_parameters, refuse_float16, on_cpu, on_cuda);
  if (!planned.has_value()) Py_RETURN_NONE;
  const at::Device& device = planned->device;
  std::optional<at::Tensor> inv_scale;
  if (PyFloat_CheckExact(inv_scale_object)) {
    inv_scale = float64_scalar(PyFloat_AS_DOUBLE(inv_scale_object), device);
  } else if (inv_scale_object != Py_None) {
    inv_scale = scalar_on(inv_scale_object, device, ok);
    if (!ok) Py_RETURN_NONE;
  }
  const DenseGradients& gradients = planned->gradients;
  return run_clip(gradients.tensors, planned_spans(gradients), norm_type, max_norm, inv_scale,
                  clip_value, planned->any_float64 ? at::kDouble : at::kFloat, /*per_tensor=*/false,
                  "auto");
  END_HANDLE_TH_ERRORS
}

// scale_dense_(items, of_parameters, refuse_inference, refuse_parameters, on_cpu, on_cuda,
//              clip_coef, clip_value) -> True or None
// fusedclip/plan.py's prepare_and_scale: plan_dense, then scale_ on what it planned, as
// clip_dense_ does clip_. clip_coef as fusedclip/api.py's _write_only makes it: None (1), a
// float, or a 0-dim float32/float64 tensor on the device, each as a float64 tensor there (None on
// the CPU only).
PyObject* scale_dense_(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* items = nullptr;
  int of_parameters = 0;
  int refuse_inference = 0;
  int refuse_parameters = 0;
  int on_cpu = 0;
  int on_cuda = 0;
  PyObject* coef_object = nullptr;
  PyObject* clip_value_object = nullptr;
  if (!PyArg_ParseTuple(args, "O!pppppOO", &PyList_Type, &items, &of_parameters, &refuse_inference,
                        &refuse_parameters, &on_cpu, &on_cuda, &coef_object, &clip_value_object)) {
    return nullptr;
  }
  bool ok = false;
  const std::optional<double> clip_value = optional_double(clip_value_object, ok);
  if (!ok) return nullptr;
  const std::optional<DensePlan> planned =
      plan_for_these_ops(items, of_parameters, refuse_inference, refuse_parameters,
                         /*refuse_float16=*/0, on_cpu, on_cuda);
  if (!planned.has_value()) Py_RETURN_NONE;
  const at::Device& device = planned->device;
  at::Tensor clip_coef;
  if (coef_object == Py_None) {
    if (!device.is_cpu()) Py_RETURN_NONE;
    clip_coef = cpu_float64_one();
  } else if (PyFloat_CheckExact(coef_object)) {
    clip_coef = float64_scalar(PyFloat_AS_DOUBLE(coef_object), device);
  } else {
    std::optional<at::Tensor> coef = scalar_on(coef_object, device, ok);
    if (!ok) Py_RETURN_NONE;
    clip_coef = coef->to(at::kDouble);
  }
  const DenseGradients& gradients = planned->gradients;
  run_scale(gradients.tensors, planned_spans(gradients), clip_coef, clip_value);
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"call_reduce", call_reduce, METH_VARARGS,
     "call_reduce(tensors, norm_type, per_tensor): torch.ops.fusedclip.reduce, unboxed, or "
     "NotImplemented (see csrc/python_ops.cpp)."},
    {"call_scale_", call_scale_, METH_VARARGS,
     "call_scale_(tensors, clip_coef, clip_value): torch.ops.fusedclip.scale_, unboxed, or "
     "NotImplemented."},
    {"call_clip_", call_clip_, METH_VARARGS,
     "call_clip_(tensors, norm_type, max_norm, inv_scale, clip_value, out_dtype, per_tensor, "
     "launch): torch.ops.fusedclip.clip_, unboxed, or NotImplemented."},
    {"clip_dense_", clip_dense_, METH_VARARGS,
     "clip_dense_(items, of_parameters, refuse_inference, refuse_parameters, refuse_float16, "
     "on_cpu, on_cuda, norm_type, max_norm, inv_scale, clip_value): plan_dense and clip_ in one "
     "call, or None (see csrc/python_ops.cpp)."},
    {"scale_dense_", scale_dense_, METH_VARARGS,
     "scale_dense_(items, of_parameters, refuse_inference, refuse_parameters, on_cpu, on_cuda, "
     "clip_coef, clip_value): plan_dense and scale_ in one call: True, or None (see "
     "csrc/python_ops.cpp)."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

PyMethodDef* python_op_methods() { return methods; }

PlannedSpans& planned_spans_of_this_thread() {
  thread_local PlannedSpans spans;
  return spans;
}

}  // namespace fusedclip
