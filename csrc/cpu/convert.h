// Storage and accumulation types, scalar conversions and the explicit vector type the CPU
// kernels compute in, compiled once per instruction set (included inside the per-ISA
// namespace by variant.h). Vector conversions of half and bfloat16 are in vec_io.h.
#pragma once

using Half = c10::Half;
using BFloat16 = c10::BFloat16;

// Elements per block: a block of a row / plane stays in L1 between the sweeps over it.
constexpr int64_t kBlock = 2048;

// Scalar conversions, for parameters and vector tails.
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

// Kernels compute in explicit vectors of the build's register width: 64 bytes for
// AVX-512, 32 for AVX2, 16 for SSE2 (GCC/Clang vector extensions). Wider vectors than
// the registers would compute just as well, but GCC stores them through the stack.
// Sums use independent accumulators (two or four), then fold the lanes in a fixed
// order, so they are reproducible (for one instruction set: the lane count sets the
// summation order).
constexpr int kVecBytes = FN_VEC_BYTES;

template <typename A>
struct Vec;
template <>
struct Vec<float> {
  using type = float __attribute__((vector_size(kVecBytes)));
};
template <>
struct Vec<double> {
  using type = double __attribute__((vector_size(kVecBytes)));
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

// The lanes of v summed pairwise (halves added until one lane is left: log2(lanes) dependent
// adds instead of one add per lane in a chain), plus tail. The halves are shuffled out in
// registers: through an array on the stack, the compiler stored the vector and reloaded
// its lanes one by one, and perf annotate put a quarter of the bfloat16 BatchNorm
// statistics' samples (28x28 planes) on those reloads. Alone, the change measured only
// 1.00x-1.02x in-process; with four accumulators (runs_moments) it gives 1.09x-1.11x.
template <typename V, size_t... I>
inline auto add_halves(V v, std::index_sequence<I...>) {
  return __builtin_shufflevector(v, v, I...) + __builtin_shufflevector(v, v, (I + sizeof...(I))...);
}
template <typename V>
inline auto fold_vec(V v) {
  constexpr size_t n = sizeof(V) / sizeof(v[0]);
  if constexpr (n == 2) {
    return v[0] + v[1];
  } else {
    return fold_vec(add_halves(v, std::make_index_sequence<n / 2>{}));
  }
}
template <typename A>
inline A fold_lanes(vec_t<A> v, A tail) {
  return fold_vec(v) + tail;
}

// a * b + c, rounded once where the instruction set has FMA (AVX2 and AVX-512 builds), for
// sums of products. Elementwise results never use it: they round the same way in every
// build (setup.py compiles without FMA contraction).
inline vec_t<float> mul_add(vec_t<float> a, vec_t<float> b, vec_t<float> c) {
#if FN_VEC_BYTES == 64
  return _mm512_fmadd_ps(a, b, c);
#elif FN_VEC_BYTES == 32
  return _mm256_fmadd_ps(a, b, c);
#else
  return a * b + c;
#endif
}
inline vec_t<double> mul_add(vec_t<double> a, vec_t<double> b, vec_t<double> c) {
#if FN_VEC_BYTES == 64
  return _mm512_fmadd_pd(a, b, c);
#elif FN_VEC_BYTES == 32
  return _mm256_fmadd_pd(a, b, c);
#else
  return a * b + c;
#endif
}

// The type of the statistics' partial results (the moments runs_moments returns, the sums
// of the kNSC moments): double for float and double x, for which float loses digits that
// the output keeps; float for half and bfloat16 (11 and 8 significant bits), where that
// loss does not show and the conversions would cost time.
template <typename T>
using stat_sum_t = std::conditional_t<sizeof(T) == 2, float, double>;
