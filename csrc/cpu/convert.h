// Block conversions between storage types and the accumulation type, compiled once per
// instruction set (included inside the per-ISA namespace by variant.h). Arithmetic
// loops work on contiguous float/double blocks that the compiler vectorizes; only the
// conversions below know about half and bfloat16.
#pragma once

using Half = c10::Half;
using BFloat16 = c10::BFloat16;

// Elements per block: a block of floats and its outputs stay in L1.
constexpr int64_t kBlock = 2048;

// Widen n elements to the accumulation type. Returns src itself when no conversion is
// needed, else buf (which must hold n elements).
inline const float* widen(const float* src, int64_t n, float*) { return src; }
inline const double* widen(const double* src, int64_t n, double*) { return src; }

inline const float* widen(const BFloat16* src, int64_t n, float* buf) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(buf);
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
  return buf;
}

inline const float* widen(const Half* src, int64_t n, float* buf) {
  int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  const __m128i* s = reinterpret_cast<const __m128i*>(src);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128(s + i / 8)));
#endif
  for (; i < n; ++i) buf[i] = static_cast<float>(src[i]);
  return buf;
}

// Narrow n accumulation-type values into dst, rounding to nearest even.
inline void narrow(const float* src, int64_t n, float* dst) { std::memcpy(dst, src, n * sizeof(float)); }
inline void narrow(const double* src, int64_t n, double* dst) { std::memcpy(dst, src, n * sizeof(double)); }

inline void narrow(const float* src, int64_t n, BFloat16* dst) {
  const uint32_t* s = reinterpret_cast<const uint32_t*>(src);
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t b = s[i];
    const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
    const bool nan = (b & 0x7FFFFFFFu) > 0x7F800000u;
    d[i] = static_cast<uint16_t>(nan ? 0x7FC0u : rounded);
  }
}

inline void narrow(const float* src, int64_t n, Half* dst) {
  int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  __m128i* d = reinterpret_cast<__m128i*>(dst);
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(d + i / 8, _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < n; ++i) dst[i] = static_cast<Half>(src[i]);
}

// Scalar conversions, for parameters.
template <typename A, typename T>
inline A to_acc(T v) { return static_cast<A>(static_cast<float>(v)); }
template <>
inline double to_acc<double, double>(double v) { return v; }
template <typename T, typename A>
inline T from_acc(A v) { return static_cast<T>(v); }

// Calls f(T{}, W{}) with the storage types of x and of the parameters. The binding has
// already rejected any other combination (W is T, or float for half/bfloat16 T).
template <typename F>
inline void dispatch_storage(DType x, DType w, F&& f) {
  switch (x) {
    case DType::kFloat32: return f(float{}, float{});
    case DType::kFloat64: return f(double{}, double{});
    case DType::kFloat16: return w == DType::kFloat32 ? f(Half{}, float{}) : f(Half{}, Half{});
    case DType::kBFloat16: return w == DType::kFloat32 ? f(BFloat16{}, float{}) : f(BFloat16{}, BFloat16{});
  }
}

// Sums use explicit 64-byte vectors (GCC/Clang vector extensions; the compiler maps
// them onto SSE2, AVX2 or AVX-512 registers of the build's ISA) with two independent
// accumulators, then fold the lanes in a fixed order, so sums are reproducible.
template <typename A>
struct Vec;
template <>
struct Vec<float> {
  using type = float __attribute__((vector_size(64)));
};
template <>
struct Vec<double> {
  using type = double __attribute__((vector_size(64)));
};
template <typename A>
using vec_t = typename Vec<A>::type;
template <typename A>
constexpr int64_t kLanes = sizeof(vec_t<A>) / sizeof(A);

template <typename A>
inline vec_t<A> loadu(const A* p) {
  vec_t<A> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename A>
inline A fold_lanes(vec_t<A> v, A tail) {
  for (int64_t l = 0; l < kLanes<A>; ++l) tail += v[l];
  return tail;
}

// sum_i f(i) for i in [0, n), where f(i) returns a vector of lanes i..i+kLanes-1 for
// full vectors and fs(i) the scalar term for the tail.
template <typename A, typename F, typename FS>
inline A vec_sum(int64_t n, F&& f, FS&& fs) {
  constexpr int64_t L = kLanes<A>;
  vec_t<A> acc0 = {}, acc1 = {};
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    acc0 += f(i);
    acc1 += f(i + L);
  }
  if (i + L <= n) {
    acc0 += f(i);
    i += L;
  }
  A tail = 0;
  for (; i < n; ++i) tail += fs(i);
  return fold_lanes<A>(acc0 + acc1, tail);
}
