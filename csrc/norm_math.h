// Numerics shared by the CPU and CUDA kernels: accumulation types, Welford/Chan
// merges and the closed forms of the normalization gradients. Includes no torch
// and no CUDA header, so it compiles for the host compiler and under nvcc.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FN_HD __host__ __device__ __forceinline__
#else
#define FN_HD inline
#endif

namespace fused_norm {

// Accumulate in float for float/half/bfloat16 storage, in double for double.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

FN_HD float fn_rsqrt(float v) {
#if defined(__CUDA_ARCH__)
  return ::rsqrtf(v);
#else
  return 1.0f / std::sqrt(v);
#endif
}
FN_HD double fn_rsqrt(double v) {
#if defined(__CUDA_ARCH__)
  return ::rsqrt(v);
#else
  return 1.0 / std::sqrt(v);
#endif
}

// Running moments of a set: count, mean and M2 = sum (x - mean)^2.
template <typename T>
struct Moments {
  T count;
  T mean;
  T m2;
};

template <typename T>
FN_HD Moments<T> moments_empty() {
  return Moments<T>{T(0), T(0), T(0)};
}

// The mean after merging a part of mean b, whose share of the merged count is w, into one
// of mean a, given delta = b - a: a + delta * w, or, where delta is not finite (a mean of
// inf, or a difference that overflows), the weighted sum, which keeps an infinite mean
// infinite (as a sum does) where a + delta * w would give inf - inf = NaN.
template <typename T>
FN_HD T merged_mean(T a, T b, T delta, T w) {
  return delta - delta == T(0) ? a + delta * w : a * (T(1) - w) + b * w;
}

// Welford's update with one value.
template <typename T>
FN_HD void moments_push(Moments<T>& m, T x) {
  m.count += T(1);
  const T delta = x - m.mean;
  m.mean = merged_mean(m.mean, x, delta, T(1) / m.count);
  m.m2 += delta * (x - m.mean);
}

// Chan et al.'s pairwise merge. An empty side gives the other side as it is (merging
// into empty moments would compute delta^2 * 0, NaN once delta^2 overflows).
template <typename T>
FN_HD Moments<T> moments_merge(const Moments<T>& a, const Moments<T>& b) {
  if (b.count == T(0)) return a;
  if (a.count == T(0)) return b;
  const T n = a.count + b.count;
  const T wb = b.count / n;
  const T delta = b.mean - a.mean;
  Moments<T> r;
  r.count = n;
  r.mean = merged_mean(a.mean, b.mean, delta, wb);
  r.m2 = a.m2 + b.m2 + delta * delta * a.count * wb;
  return r;
}

// The biased variance M2/count (clamped at 0; 0 for an empty set).
template <typename T>
FN_HD T moments_var(const Moments<T>& m) {
  const T var = m.count > T(0) ? m.m2 / m.count : T(0);
  return var < T(0) ? T(0) : var;
}

// 1/sqrt(var + eps) with var = moments_var(m).
template <typename T>
FN_HD T moments_rstd(const Moments<T>& m, double eps) {
  return fn_rsqrt(moments_var(m) + static_cast<T>(eps));
}

// RMSNorm's 1/sqrt(mean(x^2) + eps) from the moments of the row: mean(x^2) = M2/count +
// mean^2 (a sum of non-negative terms: no cancellation).
template <typename T>
FN_HD T moments_rms_rstd(const Moments<T>& m, double eps) {
  return fn_rsqrt(moments_var(m) + m.mean * m.mean + static_cast<T>(eps));
}

// LayerNorm input gradient for one element of a row of n columns.
//   g = dy * weight, xhat = (x - mean) * rstd,
//   sum_g = sum_j g_j, sum_gx = sum_j g_j * xhat_j  (row sums)
//   dx = rstd * (g - sum_g / n - xhat * sum_gx / n)
// c1 = sum_gx / n and c2 = sum_g / n are computed once per row.
template <typename T>
FN_HD T layer_norm_dx(T g, T xhat, T rstd, T c1, T c2) {
  return rstd * (g - c2 - xhat * c1);
}

// BatchNorm's running-stat update for one channel from the batch's Moments m (count n,
// mean, M2) with factor f (momentum, or 1/num_batches_tracked): running_var gets the
// unbiased variance M2 / (n - 1) (NaN for n == 1, as torch). In the stat dtype T.
template <typename T>
FN_HD void batch_norm_running_update(const Moments<T>& m, T f, T& running_mean, T& running_var) {
  running_mean = f * m.mean + (T(1) - f) * running_mean;
  running_var = f * (m.m2 / (m.count - T(1))) + (T(1) - f) * running_var;
}

// Per-channel scale and shift of BatchNorm's normalization y = x * scale + shift, with
// weight w (1 when absent) and bias b (0 when absent).
template <typename T>
FN_HD void batch_norm_scale_shift(T mean, T invstd, T w, T b, T& scale, T& shift) {
  scale = invstd * w;
  shift = b - mean * scale;
}

// BatchNorm (training) input gradient for one element of a channel of n values:
//   dx = (dy - sum_dy / n - (x - mean) * invstd^2 * sum_dy_xmu / n) * invstd * w
// with a = invstd * w, k = invstd^2 * sum_dy_xmu / n and mean_dy = sum_dy / n computed
// once per channel.
template <typename T>
FN_HD T batch_norm_dx(T dy, T x, T mean, T a, T k, T mean_dy) {
  return (dy - mean_dy - (x - mean) * k) * a;
}

}  // namespace fused_norm
