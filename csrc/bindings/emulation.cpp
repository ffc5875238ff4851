// The switch that sends ops on CPU tensors to the CUDA kernels running under the CPU
// emulator (csrc/cuda/emulator), in builds made with FUSED_NORM_CUDA_EMULATION=1. While
// it is on, every CPU allocation is filled with 0xff bytes (NaN in every float format),
// so an output element or workspace entry a kernel never writes, or reads before writing,
// shows in the results instead of stale values from an earlier run.
#ifdef FN_CUDA_EMULATION
#include <Python.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include <c10/core/CPUAllocator.h>

#include "common.h"
// After the torch headers: the emulator defines threadIdx and friends as macros.
#include "../cuda/emulator/emulator.h"

namespace fused_norm {
namespace {

class PoisoningAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr p = base->allocate(n);
    if (n > 0) std::memset(p.get(), 0xff, n);
    return p;
  }
  c10::DeleterFnPtr raw_deleter() const override { return base->raw_deleter(); }
  void copy_data(void* dest, const void* src, size_t count) const override { base->copy_data(dest, src, count); }
  c10::Allocator* base = nullptr;
};

std::mutex mutex;
std::atomic<bool> enabled{false};
PoisoningAllocator poisoning;

bool env_enabled() {
  const char* v = std::getenv("FUSED_NORM_EMULATE_CUDA");
  return v != nullptr && std::strcmp(v, "") != 0 && std::strcmp(v, "0") != 0;
}

// Applied when the extension loads.
const bool initial = [] {
  if (env_enabled()) set_cuda_emulation(true);
  return true;
}();

}  // namespace

bool cuda_emulation_enabled() { return enabled.load(std::memory_order_relaxed); }

void set_cuda_emulation(bool on) {
  std::lock_guard<std::mutex> lock(mutex);
  if (on == enabled) return;
  if (on) {
    poisoning.base = c10::GetCPUAllocator();
    c10::SetCPUAllocator(&poisoning, /*priority=*/255);
  } else {
    c10::SetCPUAllocator(poisoning.base, /*priority=*/255);
  }
  enabled = on;
}

std::string cuda_emulation_report() { return emu::last_error_message(); }

// ---------------------------------------------------------------------------------------
// fused_norm._C functions for fused_norm.testing.
namespace {

PyObject* py_set_enabled(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  set_cuda_emulation(on != 0);
  Py_RETURN_NONE;
}

PyObject* py_enabled(PyObject*, PyObject*) { return PyBool_FromLong(cuda_emulation_enabled()); }

PyObject* py_set_schedule(PyObject*, PyObject* arg) {
  const char* text = PyUnicode_AsUTF8(arg);
  if (text == nullptr) return nullptr;
  emu::Schedule s;
  if (!emu::parse_schedule(text, &s)) {
    PyErr_Format(PyExc_ValueError, "unknown schedule '%s': expected 'forward', 'reverse' or 'random:SEED'", text);
    return nullptr;
  }
  emu::set_schedule(s);
  Py_RETURN_NONE;
}

PyObject* py_schedule(PyObject*, PyObject*) {
  const emu::Schedule s = emu::schedule();
  switch (s.order) {
    case emu::Order::kForward: return PyUnicode_FromString("forward");
    case emu::Order::kReverse: return PyUnicode_FromString("reverse");
    case emu::Order::kRandom: return PyUnicode_FromFormat("random:%llu", static_cast<unsigned long long>(s.seed));
  }
  Py_RETURN_NONE;
}

PyObject* py_set_sms(PyObject*, PyObject* arg) {
  const long n = PyLong_AsLong(arg);
  if (n == -1 && PyErr_Occurred()) return nullptr;
  if (n <= 0 || n > 1 << 20) {
    PyErr_SetString(PyExc_ValueError, "the SM count must be in [1, 2**20]");
    return nullptr;
  }
  emu::set_sm_count(static_cast<int>(n));
  Py_RETURN_NONE;
}

PyObject* py_sms(PyObject*, PyObject*) { return PyLong_FromLong(emu::sm_count()); }

PyObject* py_launches(PyObject*, PyObject*) { return PyLong_FromLongLong(emu::launches()); }

PyObject* py_fail_device_queries(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  emu::set_fail_device_queries(on != 0);
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"set_cuda_emulation", py_set_enabled, METH_O, "Run ops on CPU tensors through the emulated CUDA kernels (bool)."},
    {"cuda_emulation", py_enabled, METH_NOARGS, "Whether ops on CPU tensors run the emulated CUDA kernels."},
    {"set_emulated_schedule", py_set_schedule, METH_O, "Thread order: 'forward', 'reverse' or 'random:SEED'."},
    {"emulated_schedule", py_schedule, METH_NOARGS, "The emulator's thread order."},
    {"set_emulated_sms", py_set_sms, METH_O, "The emulated device's multiprocessor count."},
    {"emulated_sms", py_sms, METH_NOARGS, "The emulated device's multiprocessor count."},
    {"emulated_launches", py_launches, METH_NOARGS, "Kernels launched under the emulator so far."},
    {"set_emulated_device_failure", py_fail_device_queries, METH_O,
     "Make the emulated cudaGetDevice fail (cudaErrorNoDevice), to test error reporting."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

int add_emulation_functions(PyObject* module) { return PyModule_AddFunctions(module, methods); }

}  // namespace fused_norm
#endif  // FN_CUDA_EMULATION
