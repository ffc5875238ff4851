// The Python module fused_norm._C: importing it registers the ops (TORCH_LIBRARY
// blocks in this directory) and exposes the CPU kernels' instruction-set selection
// and their streaming-store threshold (and, in an emulation build, the CUDA emulator's
// switches: emulation.cpp).
#include <Python.h>
#include <torch/library.h>

#include "../cpu/kernels.h"

TORCH_LIBRARY(fused_norm, m) {}

namespace {

PyObject* get_cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(fused_norm::cpu_capability());
}

PyObject* set_cpu_capability(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  if (!fused_norm::set_cpu_capability(name)) {
    PyErr_Format(PyExc_ValueError,
                 "fused_norm: CPU capability '%s' is unknown or not supported by this processor", name);
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* get_stream_threshold(PyObject*, PyObject*) {
  return PyLong_FromLongLong(fused_norm::stream_threshold_bytes());
}

PyObject* set_stream_threshold(PyObject*, PyObject* arg) {
  const long long bytes = PyLong_AsLongLong(arg);
  if (bytes == -1 && PyErr_Occurred()) return nullptr;
  fused_norm::set_stream_threshold_bytes(bytes);
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"get_cpu_capability", get_cpu_capability, METH_NOARGS,
     "Instruction set the CPU kernels use: 'baseline', 'avx2' or 'avx512'."},
    {"set_cpu_capability", set_cpu_capability, METH_O,
     "Select the CPU kernels' instruction set ('baseline', 'avx2', 'avx512')."},
    {"get_stream_threshold", get_stream_threshold, METH_NOARGS,
     "Footprint in bytes above which the CPU kernels write their outputs with non-temporal stores."},
    {"set_stream_threshold", set_stream_threshold, METH_O,
     "Set that footprint (0: always stream; -1: the default, the last-level cache size). For tests."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace

#ifdef FN_CUDA_EMULATION
namespace fused_norm {
int add_emulation_functions(PyObject* module);  // emulation.cpp
}
#endif

PyMODINIT_FUNC PyInit__C() {
  PyObject* module = PyModule_Create(&module_def);
#ifdef FN_CUDA_EMULATION
  if (module != nullptr && fused_norm::add_emulation_functions(module) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
#endif
  return module;
}
