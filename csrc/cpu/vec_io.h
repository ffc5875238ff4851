// Vector loads and stores that convert between a storage type T and its accumulation
// type's 64-byte vector (vec_t<acc_t<T>>) in registers, so kernels need no widened
// copy of their data. n-element scalar tails use to_acc / from_acc.
#pragma once

using u16x16 = uint16_t __attribute__((vector_size(32)));
using u32x16 = uint32_t __attribute__((vector_size(64)));

template <typename A>
inline vec_t<A> load_vec(const A* p) {
  return loadu(p);
}

inline vec_t<float> load_vec(const BFloat16* p) {
  u16x16 h;
  std::memcpy(&h, p, sizeof(h));
  const u32x16 bits = __builtin_convertvector(h, u32x16) << 16;
  vec_t<float> v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

inline vec_t<float> load_vec(const Half* p) {
  vec_t<float> v;
#if defined(__F16C__) && defined(__AVX__)
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p) + 1));
  std::memcpy(&v, &lo, sizeof(lo));
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof(lo), &hi, sizeof(hi));
#else
  for (int64_t l = 0; l < kLanes<float>; ++l) v[l] = static_cast<float>(p[l]);
#endif
  return v;
}

template <typename A>
inline void store_vec(A* p, vec_t<A> v) {
  std::memcpy(p, &v, sizeof(v));
}

// Round to nearest even; NaN stays a (quiet) NaN.
inline void store_vec(BFloat16* p, vec_t<float> v) {
  u32x16 bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const u32x16 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const u32x16 nan = (u32x16)((bits & 0x7FFFFFFFu) > 0x7F800000u);  // all ones where NaN
  const u16x16 h = __builtin_convertvector((rounded & ~nan) | (0x7FC0u & nan), u16x16);
  std::memcpy(p, &h, sizeof(h));
}

inline void store_vec(Half* p, vec_t<float> v) {
#if defined(__F16C__) && defined(__AVX__)
  __m256 lo, hi;
  std::memcpy(&lo, &v, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  __m128i* d = reinterpret_cast<__m128i*>(p);
  _mm_storeu_si128(d, _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT));
  _mm_storeu_si128(d + 1, _mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT));
#else
  for (int64_t l = 0; l < kLanes<float>; ++l) p[l] = static_cast<Half>(v[l]);
#endif
}
