// Building blocks shared by the CUDA kernels and their launchers: the CUDA headers (or,
// with FN_CUDA_EMULATION, the CPU emulator that stands in for them), conversions
// between storage and accumulation types, 16-byte vector packs, shared-memory
// declarations, the SM-count query, dtype dispatch and the launch helper.
#pragma once

#ifdef FN_CUDA_EMULATION
#include "emulator/emulator.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <atomic>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "../norm_math.h"
#include "../params.h"

#define FN_DEV __device__ __forceinline__

// Shared memory. FN_SHARED(T, name, dims) declares the block's array `T name dims` (dims
// like [2][32]); FN_DYNAMIC_SHARED(name) the launch's dynamic shared memory as a 16-byte
// aligned unsigned char array. Under the emulator they are per-block allocations, poisoned
// at the start of every block.
#ifdef FN_CUDA_EMULATION
#define FN_SHARED(T, name, dims) auto& name = ::fused_norm::emu::shared_array<T dims>([] {})
#define FN_DYNAMIC_SHARED(name) unsigned char* name = static_cast<unsigned char*>(::fused_norm::emu::shared_dynamic())
#else
#define FN_SHARED(T, name, dims) __shared__ T name dims
#define FN_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace fused_norm {
namespace cuda_common {

// Elements in a 16-byte vector.
template <typename T>
constexpr int kMaxVec = static_cast<int>(16 / sizeof(T));

// ---------------------------------------------------------------------------------------
// Conversions between storage and accumulation types.
FN_DEV float to_acc(float v) { return v; }
FN_DEV double to_acc(double v) { return v; }
FN_DEV float to_acc(__half v) { return __half2float(v); }
FN_DEV float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> struct Narrow;
template <> struct Narrow<float> {
  static FN_DEV float from(float v) { return v; }
};
template <> struct Narrow<double> {
  static FN_DEV double from(double v) { return v; }
};
template <> struct Narrow<__half> {
  static FN_DEV __half from(float v) { return __float2half_rn(v); }
};
template <> struct Narrow<__nv_bfloat16> {
  static FN_DEV __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};
template <typename T, typename A>
FN_DEV T from_acc(A v) { return Narrow<T>::from(v); }

// 16-bit storage types as the low 16 bits of a word.
template <typename T> struct Bits;
template <> struct Bits<__half> {
  static FN_DEV float lo(uint32_t u) { return __half2float(__ushort_as_half(static_cast<unsigned short>(u))); }
  static FN_DEV float hi(uint32_t u) { return lo(u >> 16); }
  static FN_DEV uint32_t of(__half v) { return __half_as_ushort(v); }
  static FN_DEV __half make(uint32_t u) { return __ushort_as_half(static_cast<unsigned short>(u)); }
};
template <> struct Bits<__nv_bfloat16> {
  static FN_DEV float lo(uint32_t u) { return __uint_as_float(u << 16); }
  static FN_DEV float hi(uint32_t u) { return __uint_as_float(u & 0xffff0000u); }
  static FN_DEV uint32_t of(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
  static FN_DEV __nv_bfloat16 make(uint32_t u) { return __ushort_as_bfloat16(static_cast<unsigned short>(u)); }
};

// ---------------------------------------------------------------------------------------
// Vector accesses. N consecutive elements at p, which is aligned to min(16, N*sizeof(U))
// bytes; moved as 16-byte (or smaller when N*sizeof(U) < 16) packs.
template <typename U, int N>
struct alignas(sizeof(U) * N) Pack {
  U v[N];
};

template <int N, typename U>
FN_DEV void load_vec(const U* p, U (&out)[N]) {
  constexpr int C = N < kMaxVec<U> ? N : kMaxVec<U>;
#pragma unroll
  for (int i = 0; i < N; i += C) {
    const Pack<U, C> pk = *reinterpret_cast<const Pack<U, C>*>(p + i);
#pragma unroll
    for (int j = 0; j < C; ++j) out[i + j] = pk.v[j];
  }
}

template <int N, typename U>
FN_DEV void store_vec(U* p, const U (&in)[N]) {
  constexpr int C = N < kMaxVec<U> ? N : kMaxVec<U>;
#pragma unroll
  for (int i = 0; i < N; i += C) {
    Pack<U, C> pk;
#pragma unroll
    for (int j = 0; j < C; ++j) pk.v[j] = in[i + j];
    *reinterpret_cast<Pack<U, C>*>(p + i) = pk;
  }
}

// ---------------------------------------------------------------------------------------
// Host side.

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t next_pow2(int64_t v) {
  int64_t r = 1;
  while (r < v) r *= 2;
  return r;
}

inline bool aligned(const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// Multiprocessor count of the current device, cached per device on a GPU (the
// emulator's count can change between launches, so there it is asked every time).
inline cudaError_t sm_count(int* out) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
#ifndef FN_CUDA_EMULATION
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];
  const bool cacheable = dev >= 0 && dev < kMaxDevices;
  if (cacheable && (*out = cache[dev].load(std::memory_order_relaxed)) > 0) return cudaSuccess;
#endif
  int n = 0;
  err = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  *out = n > 0 ? n : 1;
#ifndef FN_CUDA_EMULATION
  if (cacheable) cache[dev].store(*out, std::memory_order_relaxed);
#endif
  return cudaSuccess;
}

template <int N>
using IntC = std::integral_constant<int, N>;

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>, Tag<W>) for the supported (x, parameter) dtype pairs.
template <typename F>
cudaError_t dispatch_dtypes(DType x_dtype, DType w_dtype, F&& f) {
  switch (x_dtype) {
    case DType::kFloat32:
      if (w_dtype == DType::kFloat32) return f(Tag<float>{}, Tag<float>{});
      break;
    case DType::kFloat64:
      if (w_dtype == DType::kFloat64) return f(Tag<double>{}, Tag<double>{});
      break;
    case DType::kFloat16:
      if (w_dtype == DType::kFloat16) return f(Tag<__half>{}, Tag<__half>{});
      if (w_dtype == DType::kFloat32) return f(Tag<__half>{}, Tag<float>{});
      break;
    case DType::kBFloat16:
      if (w_dtype == DType::kBFloat16) return f(Tag<__nv_bfloat16>{}, Tag<__nv_bfloat16>{});
      if (w_dtype == DType::kFloat32) return f(Tag<__nv_bfloat16>{}, Tag<float>{});
      break;
  }
  return cudaErrorInvalidValue;
}

// Launches kernel<<<grid, block, smem, stream>>>(args...) and returns cudaGetLastError();
// under the emulator, runs it on the CPU (synchronously; the stream is not used).
template <typename... P, typename... A>
cudaError_t launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, A&&... args) {
#ifdef FN_CUDA_EMULATION
  (void)stream;
  emu::launch(kernel, grid, block, smem, std::forward<A>(args)...);
#else
  kernel<<<grid, block, smem, stream>>>(std::forward<A>(args)...);
#endif
  return cudaGetLastError();
}

}  // namespace cuda_common
}  // namespace fused_norm
