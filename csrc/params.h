// Plain parameter blocks shared by the CPU and CUDA kernels. No torch, no CUDA:
// the binding layer fills these from tensors, the kernels only see pointers,
// sizes and strides (in elements).
#pragma once
#include <cstdint>

namespace fused_norm {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// y[r, :] = (x[r, :] - mean[r]) * rstd[r] * weight + bias over `cols` elements.
// mean/rstd are float, or double when x is double. weight/bias may be null.
// weight and bias share w_dtype, which is x_dtype or (for fp16/bf16 x) float.
struct LayerNormFwdParams {
  const void* x = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  void* y = nullptr;
  void* mean = nullptr;
  void* rstd = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t x_row_stride = 0;  // elements between rows of x; the last dim is contiguous
  int64_t y_row_stride = 0;
  double eps = 1e-5;
  DType x_dtype = DType::kFloat32;
  DType w_dtype = DType::kFloat32;
};

// dx, and the column sums dweight = sum_r dy*xhat, dbias = sum_r dy.
// dweight/dbias may be null (then not computed). dweight/dbias have w_dtype.
// workspace: scratch of the size the backend's workspace query returned (may be
// null when that size is 0).
struct LayerNormBwdParams {
  const void* dy = nullptr;
  const void* x = nullptr;
  const void* mean = nullptr;
  const void* rstd = nullptr;
  const void* weight = nullptr;
  void* dx = nullptr;
  void* dweight = nullptr;
  void* dbias = nullptr;
  void* workspace = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t dy_row_stride = 0;
  int64_t x_row_stride = 0;
  int64_t dx_row_stride = 0;
  DType x_dtype = DType::kFloat32;
  DType w_dtype = DType::kFloat32;
};

}  // namespace fused_norm
