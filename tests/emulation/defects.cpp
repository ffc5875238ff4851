// Small kernels built against the CUDA emulator (csrc/cuda/emulator) by
// tests/test_emulator.py: each defect comes as a correct kernel and a deliberately broken
// one, and the test shows that the emulator (with AddressSanitizer and
// UndefinedBehaviorSanitizer where the defect is a memory one) catches the broken one and
// passes the correct one. Also the emulator's own checks: warp collectives against their
// definitions, and launch limits.
//
//   defects CASE good|bad SCHEDULE     prints "result v0 v1 ..." (exit 0), or the
//                                      emulator's report (exit 2)
//   defects collectives SCHEDULE       exit 0 when every collective matches
//   defects limits                     exit 0 when every launch limit is enforced
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../../csrc/cuda/common.cuh"

using namespace fused_norm::cuda_common;

namespace {

// Block sum: every thread stores its partial sum, thread 0 adds them.
template <bool kBad>
__global__ void block_sum(const float* x, int n, float* out) {
  FN_SHARED(float, part, [256]);
  float s = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
  part[threadIdx.x] = s;
  if (!kBad) __syncthreads();  // bad: the barrier is missing
  if (threadIdx.x == 0) {
    float t = 0.f;
    for (unsigned w = 0; w < blockDim.x; ++w) t += part[w];
    out[0] = t;
  }
}

// y = 2x over n elements with a grid larger than n.
template <bool kBad>
__global__ void scale(const float* x, int n, float* y) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (kBad ? i <= n : i < n) y[i] = 2.f * x[i];  // bad: the tail bound is off by one
}

// A 16-byte vector load per thread from x + offset.
template <bool kBad>
__global__ void vector_copy(const float* x, float* y) {
  float v[4];
  const int off = kBad ? 1 : 0;  // bad: 4 bytes past a 16-byte boundary
  load_vec<4>(x + off + 4 * threadIdx.x, v);
  for (int j = 0; j < 4; ++j) y[4 * threadIdx.x + j] = v[j];
}

// Pairwise sums inside half warps: only lanes < 16 take part.
template <bool kBad>
__global__ void half_warp_pairs(const float* x, float* y) {
  float v = x[threadIdx.x];
  if (threadIdx.x % 32 < 16) v += __shfl_xor_sync(kBad ? 0xffffffffu : 0x0000ffffu, v, 1);  // bad: full mask
  y[threadIdx.x] = v;
}

// The first 64 threads stage values in shared memory; everyone reads a neighbour's.
template <bool kBad>
__global__ void staged(const float* x, float* y) {
  FN_SHARED(float, buf, [128]);
  if (threadIdx.x < 64) {
    buf[threadIdx.x] = x[threadIdx.x];
    if (kBad) __syncthreads();  // bad: a barrier inside a divergent branch
  } else {
    buf[threadIdx.x] = -x[threadIdx.x];
  }
  if (!kBad) __syncthreads();
  y[threadIdx.x] = buf[(threadIdx.x + 1) % blockDim.x];
}

// Reads its shared slot, then writes it: a read before any write in the bad version.
template <bool kBad>
__global__ void read_before_write(const float* x, float* y) {
  FN_SHARED(float, buf, [64]);
  if (!kBad) buf[threadIdx.x] = x[threadIdx.x];
  __syncthreads();
  const float v = buf[threadIdx.x];
  __syncthreads();
  buf[threadIdx.x] = x[threadIdx.x];
  y[threadIdx.x] = v;
}

// Exactly sized host allocations (so AddressSanitizer sees an overrun), 16-byte aligned.
float* alloc_floats(size_t n) {
  void* p = nullptr;
  if (posix_memalign(&p, 16, n * sizeof(float)) != 0) std::abort();
  return static_cast<float*>(p);
}

std::vector<float> iota_floats(size_t n) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<float>(i % 7) + 0.25f * static_cast<float>(i % 3);
  return v;
}

int run_case(const std::string& name, bool bad) {
  std::vector<float> result;
  cudaError_t err = cudaSuccess;
  auto run = [&](auto kernel, dim3 grid, dim3 block, size_t n_in, size_t n_out, auto... extra) {
    const std::vector<float> host = iota_floats(n_in);
    float* x = alloc_floats(n_in);
    float* y = alloc_floats(n_out);
    std::memcpy(x, host.data(), n_in * sizeof(float));
    for (size_t i = 0; i < n_out; ++i) y[i] = -1.f;
    err = launch(kernel, grid, block, 0, nullptr, static_cast<const float*>(x), extra..., y);
    result.assign(y, y + n_out);
    std::free(x);
    std::free(y);
  };
  if (name == "missing_syncthreads") {
    if (bad) run(block_sum<true>, 1, 256, 1000, 1, 1000);
    else run(block_sum<false>, 1, 256, 1000, 1, 1000);
  } else if (name == "tail_off_by_one") {
    if (bad) run(scale<true>, 2, 64, 100, 100, 100);
    else run(scale<false>, 2, 64, 100, 100, 100);
  } else if (name == "misaligned_vector") {
    if (bad) run(vector_copy<true>, 1, 32, 4 * 32 + 4, 4 * 32);
    else run(vector_copy<false>, 1, 32, 4 * 32 + 4, 4 * 32);
  } else if (name == "partial_warp_shuffle") {
    if (bad) run(half_warp_pairs<true>, 1, 64, 64, 64);
    else run(half_warp_pairs<false>, 1, 64, 64, 64);
  } else if (name == "divergent_barrier") {
    if (bad) run(staged<true>, 1, 128, 128, 128);
    else run(staged<false>, 1, 128, 128, 128);
  } else if (name == "read_before_write") {
    if (bad) run(read_before_write<true>, 1, 64, 64, 64);
    else run(read_before_write<false>, 1, 64, 64, 64);
  } else {
    std::fprintf(stderr, "unknown case %s\n", name.c_str());
    return 3;
  }
  if (err != cudaSuccess) {
    std::printf("error %s\n", cudaGetErrorString(err));
    return 2;
  }
  std::printf("result");
  for (float v : result) std::printf(" %.9g", v);
  std::printf("\n");
  return 0;
}

// ---------------------------------------------------------------------------------------
// Every collective against its definition, for 64-thread blocks (two warps) and widths.
struct Wide {  // a 24-byte value, as a Moments<double>
  double a, b, c;
};

__global__ void collectives(int* failures) {
  const int lane = threadIdx.x % 32;
  int bad = 0;
  for (int width = 1; width <= 32; width *= 2) {
    const int base = lane & ~(width - 1);
    const float v = 100.f * threadIdx.x;
    for (int d = 0; d < 34; d += 3) {
      const float up = __shfl_up_sync(0xffffffffu, v, d, width);
      const float down = __shfl_down_sync(0xffffffffu, v, d, width);
      const float idx = __shfl_sync(0xffffffffu, v, d, width);
      bad += up != (lane - d >= base ? v - 100.f * d : v);
      bad += down != (lane + d < base + width ? v + 100.f * d : v);
      bad += idx != 100.f * (threadIdx.x - lane + base + d % width);
    }
    for (int m = 1; m < width; m *= 2) {
      const Wide w{1.0 * threadIdx.x, 2.0 * threadIdx.x, 3.0 * threadIdx.x};
      const Wide o = __shfl_xor_sync(0xffffffffu, w, m, width);
      const unsigned src = threadIdx.x ^ m;
      bad += o.a != 1.0 * src || o.b != 2.0 * src || o.c != 3.0 * src;
    }
  }
  const unsigned ballot = __ballot_sync(0xffffffffu, lane % 3 == 0);
  unsigned want = 0;
  for (int l = 0; l < 32; l += 3) want |= 1u << l;
  bad += ballot != want;
  bad += __any_sync(0xffffffffu, lane == 7) != 1;
  bad += __any_sync(0xffffffffu, 0) != 0;
  bad += __all_sync(0xffffffffu, lane < 32) != 1;
  bad += __all_sync(0xffffffffu, lane < 31) != 0;
  // Disjoint masks meet separately; half-warp shuffles with the half's mask.
  const unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  const int got = __shfl_down_sync(half, static_cast<int>(threadIdx.x), 1, 16);
  bad += got != (lane % 16 == 15 ? static_cast<int>(threadIdx.x) : static_cast<int>(threadIdx.x) + 1);
  __syncwarp();
  // __half and __nv_bfloat16 values.
  const __half h = __float2half_rn(static_cast<float>(lane));
  bad += __half2float(__shfl_xor_sync(0xffffffffu, h, 5)) != static_cast<float>(lane ^ 5);
  const __nv_bfloat16 b16 = __float2bfloat16_rn(static_cast<float>(lane));
  bad += __bfloat162float(__shfl_sync(0xffffffffu, b16, 3)) != 3.f;
  failures[threadIdx.x] = bad;
}

int run_collectives() {
  std::vector<int> failures(64, -1);
  const cudaError_t err = launch(collectives, 1, 64, 0, nullptr, failures.data());
  if (err != cudaSuccess) {
    std::printf("error %s\n", cudaGetErrorString(err));
    return 2;
  }
  int total = 0;
  for (int f : failures) total += f;
  std::printf("failures %d\n", total);
  return total == 0 ? 0 : 1;
}

// ---------------------------------------------------------------------------------------
// Launch limits, as the device enforces them.
__global__ void noop(int*) {}

__global__ void big_static_shared(int* out) {
  FN_SHARED(float, buf, [13 * 1024]);  // 52 KiB of static shared memory: more than 48 KiB
  buf[threadIdx.x] = 1.f;
  out[0] = static_cast<int>(buf[0]);
}

__global__ void uses_dynamic_shared(int* out) {
  FN_DYNAMIC_SHARED(smem);
  smem[threadIdx.x] = 1;
  out[0] = smem[0];
}

int run_limits() {
  int out = 0;
  int failures = 0;
  auto expect = [&](const char* what, cudaError_t got, cudaError_t want) {
    if (got != want) {
      std::printf("%s: got %s, expected %s\n", what, cudaGetErrorString(got), cudaGetErrorString(want));
      ++failures;
    }
  };
  expect("1024 threads", launch(noop, 1, 1024, 0, nullptr, &out), cudaSuccess);
  expect("1025 threads", launch(noop, 1, 1025, 0, nullptr, &out), cudaErrorInvalidConfiguration);
  expect("block (32, 33)", launch(noop, 1, dim3(32, 33), 0, nullptr, &out), cudaErrorInvalidConfiguration);
  expect("block.z 65", launch(noop, 1, dim3(1, 1, 65), 0, nullptr, &out), cudaErrorInvalidConfiguration);
  expect("grid.y 65535", launch(noop, dim3(1, 65535), 1, 0, nullptr, &out), cudaSuccess);
  expect("grid.y 65536", launch(noop, dim3(1, 65536), 1, 0, nullptr, &out), cudaErrorInvalidConfiguration);
  expect("grid.z 65536", launch(noop, dim3(1, 1, 65536), 1, 0, nullptr, &out), cudaErrorInvalidConfiguration);
  expect("empty grid", launch(noop, 0, 32, 0, nullptr, &out), cudaErrorInvalidConfiguration);
  expect("48 KiB dynamic", launch(uses_dynamic_shared, 1, 32, 48 * 1024, nullptr, &out), cudaSuccess);
  expect("49 KiB dynamic", launch(uses_dynamic_shared, 1, 32, 49 * 1024, nullptr, &out), cudaErrorInvalidValue);
  expect("opt-in", cudaFuncSetAttribute(reinterpret_cast<const void*>(uses_dynamic_shared),
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024),
         cudaSuccess);
  expect("100 KiB dynamic after opt-in", launch(uses_dynamic_shared, 1, 32, 100 * 1024, nullptr, &out), cudaSuccess);
  expect("52 KiB static", launch(big_static_shared, 1, 32, 0, nullptr, &out), cudaErrorLaunchFailure);
  expect("error cleared", cudaGetLastError(), cudaSuccess);
  int sms = 0;
  expect("SM count", cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), cudaSuccess);
  if (sms != 132) {
    std::printf("SM count %d, expected 132\n", sms);
    ++failures;
  }
  expect("bad device", cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 1), cudaErrorInvalidDevice);
  std::printf("failures %d\n", failures);
  return failures == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: defects CASE good|bad SCHEDULE | collectives SCHEDULE | limits\n");
    return 3;
  }
  const std::string name = argv[1];
  const char* schedule = name == "collectives" ? (argc > 2 ? argv[2] : "forward") : (argc > 3 ? argv[3] : "forward");
  fused_norm::emu::Schedule s;
  if (!fused_norm::emu::parse_schedule(schedule, &s)) return 3;
  fused_norm::emu::set_schedule(s);
  if (name == "collectives") return run_collectives();
  if (name == "limits") return run_limits();
  if (argc < 3) return 3;
  return run_case(name, std::string(argv[2]) == "bad");
}
