// Shared pieces of the binding layer: dtype mapping, argument checks shared by the
// ops, and the helper that runs a kernel on the tensor's device (CPU, or CUDA under
// a device guard on the current stream; or, in an emulation build with emulation on,
// the CUDA kernels under the CPU emulator for CPU tensors).
#pragma once
#include <ATen/ATen.h>
#include <c10/core/ScalarType.h>

#ifdef FUSED_NORM_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif
#if defined(FUSED_NORM_WITH_CUDA) || defined(FN_CUDA_EMULATION)
#include "../cuda/launchers.h"
#endif

#include "../cpu/kernels.h"
#include "../params.h"

namespace fused_norm {

inline const char* device_tag(const at::Tensor& t) { return t.is_cuda() ? "CUDA" : "CPU"; }

// The storage types the kernels take; anything else is "not implemented", as in torch.
inline DType to_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK_NOT_IMPLEMENTED(false, "\"", op, "\" not implemented for '",
                                  c10::toString(t), "'");
  }
}
inline DType to_dtype(const at::Tensor& t, const char* op) { return to_dtype(t.scalar_type(), op); }

inline bool is_reduced_float(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// Dtype of the affine parameters (weight/bias), checked the way torch does: either all
// of input's dtype, or (for fp16/bf16 input) all float32.
inline at::ScalarType param_dtype(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                  const c10::optional<at::Tensor>& bias) {
  const at::ScalarType x = input.scalar_type();
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();
  const bool mixed = (has_w && weight->scalar_type() != x) || (has_b && bias->scalar_type() != x);
  if (!mixed) return x;
  const bool all_float = (!has_w || weight->scalar_type() == at::kFloat) &&
                         (!has_b || bias->scalar_type() == at::kFloat);
  // fp16/bf16 input, a weight of its dtype and a float32 bias: torch names the mismatch.
  TORCH_CHECK(!(is_reduced_float(x) && has_w && has_b && weight->scalar_type() == x &&
                bias->scalar_type() == at::kFloat),
              "expected scalar type ", x, " but found Float");
  TORCH_CHECK(is_reduced_float(x) && all_float, "mixed dtype (", device_tag(input),
              "): expect parameter to have scalar type of Float");
  return at::kFloat;
}

inline void check_same_device(const at::Tensor& input, const c10::optional<at::Tensor>& t,
                              const char* name) {
  if (t.has_value() && t->defined()) {
    TORCH_CHECK(t->device() == input.device(), "Expected all tensors to be on the same device, but ",
                name, " is on ", t->device(), " and input is on ", input.device());
  }
}

inline const void* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr() : nullptr;
}

// An uninitialized output tensor (y, dx) in `format`: large CPU outputs come from reused
// huge-page mappings (output_alloc.cpp), others from torch's allocator.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format);

#ifdef FN_CUDA_EMULATION
// Whether CPU tensors go to the emulated CUDA kernels (emulation.cpp; initially the
// FUSED_NORM_EMULATE_CUDA environment variable), and the emulator's report of the last
// kernel that failed.
bool cuda_emulation_enabled();
void set_cuda_emulation(bool on);
std::string cuda_emulation_report();
#endif

// The CUDA half of a run_on_device call: compiled only in a CUDA or emulation build.
#if defined(FUSED_NORM_WITH_CUDA) || defined(FN_CUDA_EMULATION)
#define FN_CUDA_LAUNCH(...) __VA_ARGS__

// Scratch memory for one launch, of the size query(p, &bytes) asks for, on like's
// device: sets p.workspace (null for 0 bytes) and keeps the tensor in *keep while the
// launch is queued. Returns the query's error.
template <typename P>
cudaError_t cuda_workspace(const at::Tensor& like, cudaError_t (*query)(const P&, int64_t*), P& p,
                           at::Tensor* keep) {
  int64_t bytes = 0;
  const cudaError_t err = query(p, &bytes);
  if (err != cudaSuccess) return err;
  p.workspace = nullptr;
  if (bytes > 0) {
    *keep = at::empty({bytes}, like.options().dtype(at::kByte));
    p.workspace = keep->mutable_data_ptr();
  }
  return cudaSuccess;
}
#else
#define FN_CUDA_LAUNCH(...) nullptr
#endif

// Runs `cpu()` on CPU tensors, or `cuda(stream)` on CUDA tensors under a device guard,
// with the current stream, checking the cudaError_t it returns. Pass the CUDA lambda
// through FN_CUDA_LAUNCH(...).
template <typename CpuFn, typename CudaFn>
void run_on_device(const at::Tensor& t, CpuFn&& cpu, CudaFn&& cuda) {
  if (t.is_cpu()) {
#ifdef FN_CUDA_EMULATION
    if (cuda_emulation_enabled()) {
      const cudaError_t err = cuda(cudaStream_t{nullptr});
      if (err != cudaSuccess) (void)cudaGetLastError();  // cleared, as C10_CUDA_CHECK does
      TORCH_CHECK(err == cudaSuccess, "CUDA error (emulated): ", cudaGetErrorString(err),
                  err == cudaErrorLaunchFailure ? "\n" + cuda_emulation_report() : std::string());
      return;
    }
#endif
    cpu();
    return;
  }
#ifdef FUSED_NORM_WITH_CUDA
  if (t.is_cuda()) {
    const c10::cuda::CUDAGuard guard(t.device());
    C10_CUDA_CHECK(cuda(c10::cuda::getCurrentCUDAStream(t.device().index()).stream()));
    return;
  }
#else
  (void)cuda;
#endif
  TORCH_CHECK(false, "fused_norm: tensors on ", t.device(), " are not supported by this build");
}

}  // namespace fused_norm
