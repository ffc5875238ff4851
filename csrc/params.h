// Plain parameter blocks shared by the CPU and CUDA kernels. No torch, no CUDA:
// the binding layer fills these from tensors, the kernels only see pointers,
// sizes and strides (in elements).
#pragma once
#include <cstdint>

namespace fused_norm {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// y[r, :] = (s[r, :] - mean[r]) * rstd[r] * weight + bias over `cols` elements, where the
// normalized rows s are x itself, or, with a residual (add_layer_norm), the sum
// x + residual added in the accumulation type and rounded to s_dtype (the new residual
// stream; written to `sum` unless it is null, the post-norm form). y has x_dtype.
// mean/rstd are float, or double when x is double. weight/bias may be null.
// weight and bias share w_dtype, which is x_dtype or (for fp16/bf16 x) float.
// r_dtype and s_dtype are x_dtype, or float for fp16/bf16 x (s_dtype is float when
// r_dtype is); without a residual both are x_dtype.
//
// RMSNorm is the same row machinery without the mean (rms = true): mean and bias are
// null, rstd = 1 / sqrt(sum(x^2) / cols + eps) and
//   y = xhat * (weight + weight_offset),  xhat = x * rstd,
// in the accumulation type, rounded once to x_dtype (torch's rms_norm; Gemma's x_hat *
// (1 + w) is weight_offset = 1). With round_xhat, xhat is rounded to x_dtype before the
// weight multiplies it, and the product rounded again (Hugging Face's Llama family:
// weight * xhat.to(input_dtype)); a no-op for float32/float64 x.
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
  bool rms = false;
  double weight_offset = 0.0;  // RMSNorm only (0 for LayerNorm)
  bool round_xhat = false;     // RMSNorm only
  DType x_dtype = DType::kFloat32;
  DType w_dtype = DType::kFloat32;
  // Residual add: null for a plain LayerNorm.
  const void* residual = nullptr;
  void* sum = nullptr;  // null: the sum is not stored (post-norm)
  int64_t residual_row_stride = 0;
  int64_t sum_row_stride = 0;
  DType r_dtype = DType::kFloat32;
  DType s_dtype = DType::kFloat32;
};

// dx, and the column sums dweight = sum_r dy*xhat, dbias = sum_r dy.
// dweight/dbias may be null (then not computed). dweight/dbias have w_dtype.
// The normalized rows s are x (in s_dtype), or, when residual is set, x (input, x_dtype)
// + residual (r_dtype) rounded to s_dtype as in the forward (recomputed, for the
// post-norm form that stored no sum). dsum (s_dtype, may be null) is the gradient of
// the forward's sum output: it is added to dx. dx has x_dtype (dy's); dresidual, when
// set, gets the same values in r_dtype (in the same sweep). Dtypes as in the forward;
// without residual terms r_dtype = s_dtype = x_dtype.
// workspace: scratch of the size the backend's workspace query returned (may be
// null when that size is 0).
// RMSNorm (rms = true; mean and dbias null): the same with mean = 0, g = dy * (weight +
// weight_offset) and no sum(g) term: dx = rstd * (g - xhat * sum(g * xhat) / cols).
// (The forward's round_xhat is not seen here: its rounding has a zero derivative almost
// everywhere, and the gradient is that of the unrounded function, as torch's autograd
// of the cast gives.)
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
  bool rms = false;
  double weight_offset = 0.0;
  DType x_dtype = DType::kFloat32;
  DType w_dtype = DType::kFloat32;
  // Residual add: null for a plain LayerNorm.
  const void* residual = nullptr;
  const void* dsum = nullptr;
  void* dresidual = nullptr;
  int64_t residual_row_stride = 0;
  int64_t dsum_row_stride = 0;
  int64_t dresidual_row_stride = 0;
  DType r_dtype = DType::kFloat32;
  DType s_dtype = DType::kFloat32;
};

// ---------------------------------------------------------------------------------------
// BatchNorm. The input is seen as (N, C, S): N batch, C channels, S = product of the
// spatial dims (1 for an (N, C) input). x, y, dy and dx of one call share one layout:
enum class BatchNormLayout : int {
  // element (n, c, s) at (n * C + c) * S + s: contiguous (N,C,L), NCHW, NCDHW.
  kNCS = 0,
  // element (n, c, s) at (n * S + s) * C + c: (N,C), channels_last (N,H,W,C),
  // channels_last_3d, and (N,C,L) stored as (N,L,C). Also used for any layout when S == 1.
  kNSC = 1,
};
// Per-channel vectors (weight, bias, running stats, save_mean/save_invstd, gradients)
// are contiguous, C elements. "Stat dtype" is float, or double when x is double.
// weight, bias, running_mean and running_var all have w_dtype, which is x_dtype or
// (for fp16/bf16 x) float. Offsets are 64-bit: N * C * S may exceed 2^31.
//
// Forward, with n = N * S values per channel and f the update factor:
//   training:  mean = sum x / n, m2 = sum (x - mean)^2 (exact: Welford/Chan merges),
//              save_mean = mean, save_invstd = 1 / sqrt(m2 / n + eps) (biased variance);
//              when running_mean != null:
//                new_running_mean = (1 - f) * running_mean + f * mean
//                new_running_var  = (1 - f) * running_var + f * m2 / (n - 1)  (unbiased;
//                                   NaN for n == 1 as torch), computed in the stat dtype
//                                   (see batch_norm_running_update in norm_math.h) and
//                                   rounded to w_dtype;
//              f = momentum, or 1 / *num_batches_tracked when cumulative (momentum=None).
//   eval:      save_mean = running_mean, save_invstd = 1 / sqrt(running_var + eps)
//              (both converted to the stat dtype); running_mean/var are non-null.
//   both:      y = x * scale + shift with scale = save_invstd * weight and
//              shift = bias - save_mean * scale per channel (weight 1 / bias 0 if null).
// Statistics alone (batch_norm_stats, the local half of a synchronized BatchNorm): reads
// x, N, C, S, layout, x_dtype and the workspace (the forward's size); writes save_mean =
// mean and save_var = M2 / n (the biased variance, as Moments' merges compute it) and
// nothing else.
// The binding never calls with n == 0 or C == 0.
struct BatchNormFwdParams {
  const void* x = nullptr;
  const void* weight = nullptr;        // may be null
  const void* bias = nullptr;          // may be null
  const void* running_mean = nullptr;  // null iff running_var is null; non-null in eval
  const void* running_var = nullptr;
  // One int64 in the tensors' memory (device memory for CUDA: read it in a kernel, never
  // on the host). Non-null and read only when cumulative && training && running_mean.
  const int64_t* num_batches_tracked = nullptr;
  void* y = nullptr;                 // x's dtype and layout
  void* save_mean = nullptr;         // C, stat dtype; always written
  void* save_invstd = nullptr;       // C, stat dtype; always written
  void* new_running_mean = nullptr;  // C, w_dtype; non-null iff training && running_mean
  void* new_running_var = nullptr;   // C, w_dtype; non-null iff training && running_mean
  void* save_var = nullptr;          // C, stat dtype; batch_norm_stats only (see below)
  void* workspace = nullptr;  // scratch of the backend's workspace query size (null if 0)
  int64_t N = 0;
  int64_t C = 0;
  int64_t S = 1;
  BatchNormLayout layout = BatchNormLayout::kNCS;
  bool training = true;     // batch statistics (true) or running statistics (false)
  bool cumulative = false;  // momentum=None: f = 1 / *num_batches_tracked
  double momentum = 0.1;    // f when !cumulative
  double eps = 1e-5;
  DType x_dtype = DType::kFloat32;
  DType w_dtype = DType::kFloat32;
};

// Backward, from the forward's save_mean/save_invstd (mean, invstd) and n = N * S:
//   sum_dy = sum dy, sum_dy_xmu = sum dy * (x - mean)                  (per channel)
//   dbias = sum_dy;  dweight = sum_dy_xmu * invstd
//   training: dx = batch_norm_dx(dy, x, mean, weight * invstd, invstd^2 * sum_dy_xmu / n,
//                                sum_dy / n)   (norm_math.h)
//   eval:     dx = dy * invstd * weight   (the statistics do not depend on x)
// The per-channel sums are needed only for dweight/dbias, and for dx when training.
// Reductions run in the stat dtype in a fixed order (bitwise reproducible).
//
// The same two phases apart, for a synchronized BatchNorm whose sums are added across
// processes in between:
//   batch_norm_bwd_reduce: writes sum_dy and sum_dy_xmu (stat dtype, C each) and nothing
//                          else (weight, dx, dweight, dbias, invstd unused);
//   batch_norm_bwd_elemt:  the training dx above from the given sum_dy / sum_dy_xmu, with
//                          n = *count instead of N * S (dweight, dbias unused).
struct BatchNormBwdParams {
  const void* dy = nullptr;      // x's dtype and layout
  const void* x = nullptr;
  const void* weight = nullptr;  // may be null (1)
  const void* mean = nullptr;    // C, stat dtype
  const void* invstd = nullptr;  // C, stat dtype
  void* dx = nullptr;            // x's dtype and layout; never null
  void* dweight = nullptr;       // C, w_dtype; null: not computed
  void* dbias = nullptr;         // C, w_dtype; null: not computed
  void* sum_dy = nullptr;        // C, stat dtype: output of bwd_reduce, input of bwd_elemt
  void* sum_dy_xmu = nullptr;
  // One int64 in the tensors' memory (device memory for CUDA): the values per channel over
  // which the sums were taken (all processes). Read by batch_norm_bwd_elemt only.
  const int64_t* count = nullptr;
  void* workspace = nullptr;     // scratch of the backend's workspace query size (null if 0)
  int64_t N = 0;
  int64_t C = 0;
  int64_t S = 1;
  BatchNormLayout layout = BatchNormLayout::kNCS;
  bool training = true;
  DType x_dtype = DType::kFloat32;
  DType w_dtype = DType::kFloat32;
};

}  // namespace fused_norm
