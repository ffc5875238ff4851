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

// A vector of accumulation values in its storage format: the same vector for float and
// double, 16 rounded 16-bit values for bfloat16 and half.
template <typename A>
inline vec_t<A> to_storage(A*, vec_t<A> v) {
  return v;
}

// Round to nearest even; NaN stays a (quiet) NaN.
inline u16x16 to_storage(BFloat16*, vec_t<float> v) {
  u32x16 bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const u32x16 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const u32x16 nan = (u32x16)((bits & 0x7FFFFFFFu) > 0x7F800000u);  // all ones where NaN
  return __builtin_convertvector((rounded & ~nan) | (0x7FC0u & nan), u16x16);
}

inline u16x16 to_storage(Half*, vec_t<float> v) {
  u16x16 h;
#if defined(__F16C__) && defined(__AVX__)
  __m256 lo, hi;
  std::memcpy(&lo, &v, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  const __m128i parts[2] = {_mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT), _mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT)};
  std::memcpy(&h, parts, sizeof(h));
#else
  Half out[kLanes<float>];
  for (int64_t l = 0; l < kLanes<float>; ++l) out[l] = static_cast<Half>(v[l]);
  std::memcpy(&h, out, sizeof(h));
#endif
  return h;
}

template <typename T>
inline void store_vec(T* p, vec_t<acc_t<T>> v) {
  const auto s = to_storage(p, v);
  std::memcpy(p, &s, sizeof(s));
}

// Stores bypassing the caches (non-temporal), for outputs too large to stay in them: no
// read for ownership, so a written line costs one transfer instead of two. The
// destination is aligned to 64 bytes; sfence() orders these stores before the thread's
// later ones (call it when the thread has written its part).
constexpr int64_t kStreamAlign = 64;

template <typename V>
inline void stream_bytes(void* p, const V& v) {
  static_assert(sizeof(V) % 16 == 0, "streamed in 16-byte pieces or wider");
#if defined(__x86_64__) || defined(__i386__)
#if defined(__AVX512F__)
  if constexpr (sizeof(V) % 64 == 0) {
    for (size_t k = 0; k < sizeof(V); k += 64) {
      __m512i piece;
      std::memcpy(&piece, reinterpret_cast<const char*>(&v) + k, 64);
      _mm512_stream_si512(reinterpret_cast<__m512i*>(static_cast<char*>(p) + k), piece);
    }
    return;
  }
#endif
#if defined(__AVX__)
  if constexpr (sizeof(V) % 32 == 0) {
    for (size_t k = 0; k < sizeof(V); k += 32) {
      __m256i piece;
      std::memcpy(&piece, reinterpret_cast<const char*>(&v) + k, 32);
      _mm256_stream_si256(reinterpret_cast<__m256i*>(static_cast<char*>(p) + k), piece);
    }
    return;
  }
#endif
  for (size_t k = 0; k < sizeof(V); k += 16) {
    __m128i piece;
    std::memcpy(&piece, reinterpret_cast<const char*>(&v) + k, 16);
    _mm_stream_si128(reinterpret_cast<__m128i*>(static_cast<char*>(p) + k), piece);
  }
#else
  std::memcpy(p, &v, sizeof(v));
#endif
}

inline void sfence() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_sfence();
#endif
}

// Calls f(std::bool_constant<b>{}) for a run-time b, to make a flag a template argument.
template <typename F>
inline void with_flag(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Whether a call that reads and writes `bytes` should stream its output (kernels.h).
inline bool stream_output(int64_t bytes) { return bytes > stream_threshold_bytes(); }

// out[i] for i in [0, n): vec(i) gives the accumulation values of elements i..i+L-1,
// scalar(i) that of element i alone (the same arithmetic, lane by lane). With kStream,
// the elements before the first 64-byte boundary of out are stored one by one and the
// vectors after it bypass the caches (vectors then start on boundaries: L elements of T
// are 32 or 64 bytes).
template <bool kStream, typename T, typename FV, typename FS>
inline void store_loop(T* __restrict out, int64_t n, FV&& vec, FS&& scalar) {
  constexpr int64_t L = kLanes<acc_t<T>>;
  int64_t i = 0;
  if constexpr (kStream) {
    const int64_t misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out) % kStreamAlign);
    const int64_t head = misalign % static_cast<int64_t>(sizeof(T)) == 0
                             ? (kStreamAlign - misalign) % kStreamAlign / static_cast<int64_t>(sizeof(T))
                             : n;  // not even element-aligned: no vector is streamed
    for (; i < std::min(head, n); ++i) out[i] = from_acc<T>(scalar(i));
    for (; i + L <= n; i += L) stream_bytes(out + i, to_storage(out, vec(i)));
  }
  for (; i + L <= n; i += L) store_vec(out + i, vec(i));
  for (; i < n; ++i) out[i] = from_acc<T>(scalar(i));
}
