// Vector loads and stores that convert between a storage type T and its accumulation
// type's vector (vec_t<acc_t<T>>) in registers, so kernels need no widened copy of their
// data. n-element scalar tails use to_acc / from_acc.
#pragma once

// kLanes<float> 16- and 32-bit lanes.
using u16xL = uint16_t __attribute__((vector_size(kVecBytes / 2)));
using u32xL = uint32_t __attribute__((vector_size(kVecBytes)));

template <typename A>
inline vec_t<A> load_vec(const A* p) {
  return loadu(p);
}

// bfloat16 -> float: the 16 bits become the high half of the float's. With AVX-512 and
// AVX2 the widening is spelled out: g++ splits a generic u16 -> u32 conversion of a
// full register into halves (four instructions instead of one).
inline vec_t<float> load_vec(const BFloat16* p) {
  vec_t<float> v;
#if FN_VEC_BYTES == 64
  const __m512i bits = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
  std::memcpy(&v, &bits, sizeof(v));
#elif FN_VEC_BYTES == 32
  const __m256i bits = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
  std::memcpy(&v, &bits, sizeof(v));
#else
  u16xL h;
  std::memcpy(&h, p, sizeof(h));
  const u32xL bits = __builtin_convertvector(h, u32xL) << 16;
  std::memcpy(&v, &bits, sizeof(v));
#endif
  return v;
}

// half <-> float: one F16C / AVX-512 conversion of the whole register. (Converting
// 8-lane pieces into parts of the vector went through the stack, where the part stores
// could not be forwarded to the full-width reload: half sums ran at 1.2 elements/ns,
// bfloat16 ones at 8.6.)
#if FN_F16C && FN_VEC_BYTES != 32 && FN_VEC_BYTES != 64
#error "F16C conversions are written for 32- and 64-byte vectors"
#endif
inline vec_t<float> load_vec(const Half* p) {
  vec_t<float> v;
#if FN_F16C && FN_VEC_BYTES == 64
  const __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  std::memcpy(&v, &f, sizeof(v));
#elif FN_F16C
  const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  std::memcpy(&v, &f, sizeof(v));
#else
  for (int64_t l = 0; l < kLanes<float>; ++l) v[l] = static_cast<float>(p[l]);
#endif
  return v;
}

// 2 * kLanes<A> values at p as two vectors, for sums in which the order of the values does
// not matter (the lanes of the two vectors hold them in some fixed permutation, the same for
// every tensor, so products of two tensors' values still pair them up).
template <typename T, typename A = acc_t<T>>
inline void load_pair(const T* p, vec_t<A>& a, vec_t<A>& b) {
  a = load_vec(p);
  b = load_vec(p + kLanes<A>);
}

// bfloat16: one register of 2 * kLanes<float> values; each 32-bit lane holds two, the even
// one in its low half (shifted up, it is a float) and the odd one in its high half (a float
// once the low half is cleared): two instructions instead of two widenings and two shifts.
inline void load_pair(const BFloat16* p, vec_t<float>& a, vec_t<float>& b) {
  u32xL w;
  std::memcpy(&w, p, sizeof(w));
  const u32xL even = w << 16, odd = w & 0xFFFF0000u;
  std::memcpy(&a, &even, sizeof(a));
  std::memcpy(&b, &odd, sizeof(b));
}

// Asks for the 64-byte lines of [p, p + bytes).
inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b);
}

// Asks for the lines of bytes [kSumAhead, kSumAhead + bytes) past p. The sums over one
// contiguous run (runs_moments, grad_sums_runs) call it as they read: their runs of a few
// KiB are too short for the hardware prefetcher to get far enough ahead. Side by side
// (alternating processes, 2-core Xeon, bfloat16 (32, 256, 28, 28) NCHW) against the code
// before load_pair, mul_add and this prefetch: the BatchNorm statistics went from 0.76 to
// 0.67 ms with the first two alone and from 0.68 to 0.47 ms with all three; the backward
// sums from 0.95 to 0.71 ms.
constexpr int64_t kSumAhead = 2048;
template <typename T>
inline void prefetch_ahead(const T* p, int64_t bytes) {
  prefetch_bytes(reinterpret_cast<const char*>(p) + kSumAhead, bytes);
}

// A vector of accumulation values in its storage format: the same vector for float and
// double, its lanes rounded to 16-bit values for bfloat16 and half.
template <typename A>
inline vec_t<A> to_storage(A*, vec_t<A> v) {
  return v;
}

// Round to nearest even; NaN stays a (quiet) NaN: 0x7FC0, as c10::BFloat16 gives.
inline u16xL to_storage(BFloat16*, vec_t<float> v) {
#if FN_AVX512BF16
  // One instruction, which rounds the same way except that it flushes denormals to zero
  // and keeps NaN payloads: vectors holding either (rare) take the exact path below.
  __m512 f;
  std::memcpy(&f, &v, sizeof(f));
  constexpr int kNanOrDenormal = 0x01 | 0x20 | 0x80;  // quiet NaN, denormal, signaling NaN
  if (__builtin_expect(_mm512_fpclass_ps_mask(f, kNanOrDenormal) == 0, 1)) {
    const __m256bh h = _mm512_cvtneps_pbh(f);
    u16xL out;
    std::memcpy(&out, &h, sizeof(out));
    return out;
  }
#endif
  u32xL bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const u32xL rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;  // at most 0xFFFF
  const u32xL nan = (u32xL)(v != v);  // all ones where NaN: one unordered compare
  const u32xL out = (rounded & ~nan) | (0x7FC0u & nan);
  u16xL h;
#if FN_VEC_BYTES == 64
  __m512i wide;  // one narrowing instruction (g++ splits the generic conversion)
  std::memcpy(&wide, &out, sizeof(wide));
  const __m256i narrow = _mm512_cvtepi32_epi16(wide);
  std::memcpy(&h, &narrow, sizeof(h));
  return h;
#elif FN_VEC_BYTES == 32
  // The lanes fit in 16 bits, so the saturating pack narrows them exactly (the generic
  // conversion masks them first).
  __m256i wide;
  std::memcpy(&wide, &out, sizeof(wide));
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(wide, wide), 0xD8);
  std::memcpy(&h, &packed, sizeof(h));
  return h;
#else
  return __builtin_convertvector(out, u16xL);
#endif
}

inline u16xL to_storage(Half*, vec_t<float> v) {
  u16xL h;
#if FN_F16C && FN_VEC_BYTES == 64
  __m512 f;
  std::memcpy(&f, &v, sizeof(f));
  const __m256i rounded = _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT);
  std::memcpy(&h, &rounded, sizeof(h));
#elif FN_F16C
  __m256 f;
  std::memcpy(&f, &v, sizeof(f));
  const __m128i rounded = _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT);
  std::memcpy(&h, &rounded, sizeof(h));
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

// The bytes of v (one vector: 8 to 64 bytes) as a register R, stored non-temporally by st.
template <typename R, typename V, typename Store>
inline void stream_as(void* p, const V& v, Store st) {
  R r;
  std::memcpy(&r, &v, sizeof(r));
  st(static_cast<R*>(p), r);
}

template <typename V>
inline void stream_bytes(void* p, const V& v) {
#if defined(__x86_64__)
  if constexpr (sizeof(V) == 64) {
    stream_as<__m512i>(p, v, [](__m512i* d, __m512i r) { _mm512_stream_si512(d, r); });
  } else if constexpr (sizeof(V) == 32) {
    stream_as<__m256i>(p, v, [](__m256i* d, __m256i r) { _mm256_stream_si256(d, r); });
  } else if constexpr (sizeof(V) == 16) {
    stream_as<__m128i>(p, v, [](__m128i* d, __m128i r) { _mm_stream_si128(d, r); });
  } else {
    static_assert(sizeof(V) == 8, "one vector of 8 to 64 bytes");  // SSE2 bfloat16/half: 4 lanes
    stream_as<long long>(p, v, [](long long* d, long long r) { _mm_stream_si64(d, r); });
  }
#else
  std::memcpy(p, &v, sizeof(v));
#endif
}

inline void sfence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

// Outputs written in short runs (a row, a plane) that are not whole 64-byte lines are not
// streamed: store_loop writes the elements before a run's first and after its last whole
// line one by one, a large share of such a run. Streamed against cached, side by side on a
// 2-core AVX-512 Intel Xeon (BatchNorm eval NCHW, medians of 3 x 200 calls): planes of 7x7
// float32 (196 bytes) 0.56x, 14x14 bfloat16 (392 bytes) 0.37x, 14x14 float32 (784 bytes)
// 0.89x-1.21x; 28x28 bfloat16 (1568 bytes) 0.98x, 28x28 float32 (3136 bytes) 1.18x.
constexpr int64_t kStreamMinRunBytes = 2048;

// Whether a call that reads and writes `bytes`, its output in contiguous runs of
// `run_bytes`, should stream the output (kernels.h).
inline bool stream_output(int64_t bytes, int64_t run_bytes) {
  const bool ragged = run_bytes % kStreamAlign != 0 && run_bytes < kStreamMinRunBytes;
  return !ragged && bytes >= stream_threshold_bytes();
}

// at::parallel_for(begin, end, grain) for a call that reads and writes `bytes`, writing
// its output in runs of `run_bytes`: each task runs f(stream, r0, r1), stream being
// std::bool_constant<stream_output(bytes, run_bytes)> (for
// store_loop<decltype(stream)::value>), and ends with sfence() when streaming.
template <typename F>
inline void parallel_for_output(int64_t bytes, int64_t run_bytes, int64_t begin, int64_t end, int64_t grain, F&& f) {
  auto run = [&](auto stream) {
    at::parallel_for(begin, end, grain, [&](int64_t r0, int64_t r1) {
      f(stream, r0, r1);
      if constexpr (decltype(stream)::value) sfence();
    });
  };
  if (stream_output(bytes, run_bytes)) {
    run(std::true_type{});
  } else {
    run(std::false_type{});
  }
}

// out[i] for i in [0, n): vec(i) gives the accumulation values of elements i..i+L-1,
// scalar(i) that of element i alone (the same arithmetic, lane by lane). With kStream,
// the elements before the first 64-byte boundary of out are stored one by one and the
// whole 64-byte lines after it bypass the caches (each vector then starts on a multiple
// of its own size: L elements of T are 8 to 64 bytes, a power of two); the rest is
// stored normally. A line only partly written by non-temporal stores costs far more than
// a whole one: side by side (one process, streaming on and off), the bfloat16 dx pass of
// a (32, 250, 28, 28) channels_last BatchNorm ran at 1.4-1.6 elements/ns with its rows'
// last half line streamed and 3.8-4.3 without streaming.
template <bool kStream, typename T, typename FV, typename FS>
inline void store_loop(T* __restrict out, int64_t n, FV&& vec, FS&& scalar) {
  constexpr int64_t L = kLanes<acc_t<T>>;
  int64_t i = 0;
  if constexpr (kStream) {
    constexpr int64_t kLine = kStreamAlign / static_cast<int64_t>(sizeof(T));
    const int64_t misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out) % kStreamAlign);
    const int64_t head = misalign % static_cast<int64_t>(sizeof(T)) == 0
                             ? std::min(n, (kStreamAlign - misalign) % kStreamAlign / static_cast<int64_t>(sizeof(T)))
                             : n;  // not even element-aligned: no vector is streamed
    const int64_t lines_end = head + (n - head) / kLine * kLine;
    for (; i < head; ++i) out[i] = from_acc<T>(scalar(i));
    for (; i < lines_end; i += L) stream_bytes(out + i, to_storage(out, vec(i)));
  }
  for (; i + L <= n; i += L) store_vec(out + i, vec(i));
  for (; i < n; ++i) out[i] = from_acc<T>(scalar(i));
}

// The lanes of v added to the kLanes<A> / kLanes<S> vectors of S at acc.
inline void add_lanes(vec_t<double>* acc, vec_t<double> v) { acc[0] += v; }
inline void add_lanes(vec_t<float>* acc, vec_t<float> v) { acc[0] += v; }
// The float lanes are widened in registers: one conversion per half with AVX-512 and
// AVX2, for which g++'s generic conversion takes four instructions (and copying the
// halves out through memory put the callers' sums on the stack).
inline void add_lanes(vec_t<double>* acc, vec_t<float> v) {
  vec_t<double> lo, hi;
#if FN_VEC_BYTES == 64
  __m512 f;
  std::memcpy(&f, &v, sizeof(f));
  const __m512d l = _mm512_cvtps_pd(_mm512_castps512_ps256(f));
  const __m512d h = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1)));
#elif FN_VEC_BYTES == 32
  __m256 f;
  std::memcpy(&f, &v, sizeof(f));
  const __m256d l = _mm256_cvtps_pd(_mm256_castps256_ps128(f));
  const __m256d h = _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1));
#else
  const vec_t<double> l = __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1), vec_t<double>);
  const vec_t<double> h = __builtin_convertvector(__builtin_shufflevector(v, v, 2, 3), vec_t<double>);
#endif
  std::memcpy(&lo, &l, sizeof(lo));
  std::memcpy(&hi, &h, sizeof(hi));
  acc[0] += lo;
  acc[1] += hi;
}
template <typename A>
constexpr int64_t kDoubleVecs = kLanes<A> / kLanes<double>;
