// A CUDA emulator for running this project's kernels on the CPU, with the checks that
// compute-sanitizer's memcheck, racecheck and synccheck make on a GPU. Torch-free. The
// host compiler builds the unchanged kernel headers and launchers against it: common.cuh
// includes this header instead of the CUDA runtime when FN_CUDA_EMULATION is defined.
//
// Model:
//  * Every CUDA thread of a block is a fiber with its own stack (guard page below it).
//    The blocks of a launch run one after another on the calling OS thread. Inside a
//    block the fibers run one at a time, each until it blocks (barrier, warp collective)
//    or exits; which runnable fiber goes next is the schedule (forward, reverse, or a
//    seeded random order), so a missing barrier shows as results that differ between
//    schedules. There is no lockstep inside a warp.
//  * __syncthreads releases when every live thread of the block has arrived at the same
//    call site. A divergent barrier, a thread exiting while others wait, and a state where
//    nothing can run (deadlock) are errors.
//  * Warp collectives (__shfl*_sync, __syncwarp, __ballot_sync, __any_sync, __all_sync)
//    meet per warp: one completes when every lane of its mask has arrived with the same
//    operation, mask, width and call site. A caller outside its own mask, a mask lane that
//    has exited or waits elsewhere, and reading a source lane outside the mask are errors.
//  * Shared memory (FN_SHARED / FN_DYNAMIC_SHARED in common.cuh) is allocated per block,
//    each array exactly sized (AddressSanitizer sees overruns) and filled with 0xff bytes
//    (NaN in every float format) so a read before a write shows in the results. Static
//    plus dynamic shared memory is checked against the device limit.
//  * Launch configurations are checked as the device does (block <= 1024 threads,
//    grid.y/z <= 65535, shared memory); the device answers as an H100 with a settable
//    SM count.
// An error stops the launch: the launch returns cudaErrorLaunchFailure and
// last_error_message() says what happened, where, and the state of every thread.
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <source_location>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// The CUDA headers define the execution-space qualifiers as nothing for a host compiler
// (__shared__ included, which would silently turn shared arrays into per-thread ones).
// Redefine them; shared memory goes through FN_SHARED / FN_DYNAMIC_SHARED instead.
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __launch_bounds__
#undef __align__
#undef __forceinline__
#define __global__
#define __device__
#define __host__
#define __shared__ static_assert(false, "use FN_SHARED for shared memory");
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __forceinline__ inline

namespace fused_norm {
namespace emu {

// ---------------------------------------------------------------------------------------
// Configuration (process-wide; read from the environment at first use:
// FUSED_NORM_EMULATE_CUDA_SCHEDULE=forward|reverse|random:SEED, FUSED_NORM_EMULATE_CUDA_SMS=N).
enum class Order { kForward, kReverse, kRandom };
struct Schedule {
  Order order = Order::kForward;
  uint64_t seed = 0;
};
// Parses "forward", "reverse" or "random:SEED"; false if malformed.
bool parse_schedule(const char* text, Schedule* out);
void set_schedule(const Schedule& s);
Schedule schedule();
void set_sm_count(int sms);  // the device's multiprocessor count (default 132, as an H100)
int sm_count();
// Makes cudaGetDevice fail with cudaErrorNoDevice (to test the callers' error paths).
void set_fail_device_queries(bool fail);
// Kernels launched so far (every launch that ran, including failed ones).
int64_t launches();
// The report of the last launch that failed in the emulator ("" if none yet).
std::string last_error_message();

// ---------------------------------------------------------------------------------------
// What a fiber sees.
struct ThreadCtx {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
const ThreadCtx& this_thread();

using Where = std::source_location;

void syncthreads(const Where& where);

enum class WarpOp { kSyncwarp, kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll };
// One warp collective: `in` (bytes) from the calling lane, result into `out`. arg is the
// source lane / delta / lane mask of a shuffle, or the predicate of a vote.
void warp_collective(WarpOp op, unsigned mask, const void* in, void* out, size_t bytes, int arg, int width,
                     const Where& where);
unsigned active_mask();

// Shared memory of the running block: the static array identified by `key` (allocated
// and poisoned on the block's first request), and the launch's dynamic shared memory.
void* shared_static(const void* key, size_t bytes, size_t align, const Where& where);
void* shared_dynamic();

template <typename T, typename Tag>
T& shared_array(Tag, const Where& where = Where::current()) {
  static const char key = 0;  // one per (type, declaration): Tag is a distinct lambda type
  return *static_cast<T*>(shared_static(&key, sizeof(T), alignof(T), where));
}

template <typename T>
T shuffle(WarpOp op, unsigned mask, const T& v, int arg, int width, const Where& where) {
  static_assert(std::is_trivially_copyable_v<T>, "warp shuffles move trivially copyable values");
  T out;
  warp_collective(op, mask, &v, &out, sizeof(T), arg, width, where);
  return out;
}

// ---------------------------------------------------------------------------------------
// Launches.
struct LaunchSpec {
  const void* kernel;  // identifies the kernel (cudaFuncSetAttribute)
  dim3 grid, block;
  size_t dynamic_smem;
  std::function<void()> body;  // runs the kernel for the current fiber's thread
};
cudaError_t launch_kernel(const LaunchSpec& spec);

template <typename... P, typename... A>
cudaError_t launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A&&... args) {
  // Kernel parameters are copies, as the device gets them.
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  return launch_kernel(LaunchSpec{reinterpret_cast<const void*>(kernel), grid, block, smem,
                                  [&params, kernel] { std::apply(kernel, params); }});
}

}  // namespace emu
}  // namespace fused_norm

// ---------------------------------------------------------------------------------------
// The device-side names the kernels use.
#define threadIdx (::fused_norm::emu::this_thread().thread_idx)
#define blockIdx (::fused_norm::emu::this_thread().block_idx)
#define blockDim (::fused_norm::emu::this_thread().block_dim)
#define gridDim (::fused_norm::emu::this_thread().grid_dim)
constexpr int warpSize = 32;

inline void __syncthreads(const std::source_location& w = std::source_location::current()) {
  ::fused_norm::emu::syncthreads(w);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const std::source_location& w = std::source_location::current()) {
  ::fused_norm::emu::warp_collective(::fused_norm::emu::WarpOp::kSyncwarp, mask, nullptr, nullptr, 0, 0, 32, w);
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32,
              const std::source_location& w = std::source_location::current()) {
  return ::fused_norm::emu::shuffle(::fused_norm::emu::WarpOp::kShflIdx, mask, v, src, width, w);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32,
                 const std::source_location& w = std::source_location::current()) {
  return ::fused_norm::emu::shuffle(::fused_norm::emu::WarpOp::kShflUp, mask, v, static_cast<int>(delta), width, w);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32,
                   const std::source_location& w = std::source_location::current()) {
  return ::fused_norm::emu::shuffle(::fused_norm::emu::WarpOp::kShflDown, mask, v, static_cast<int>(delta), width, w);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32,
                  const std::source_location& w = std::source_location::current()) {
  return ::fused_norm::emu::shuffle(::fused_norm::emu::WarpOp::kShflXor, mask, v, lane_mask, width, w);
}
inline unsigned __ballot_sync(unsigned mask, int pred,
                              const std::source_location& w = std::source_location::current()) {
  unsigned out = 0;
  ::fused_norm::emu::warp_collective(::fused_norm::emu::WarpOp::kBallot, mask, nullptr, &out, sizeof(out), pred != 0,
                                     32, w);
  return out;
}
inline int __any_sync(unsigned mask, int pred, const std::source_location& w = std::source_location::current()) {
  unsigned out = 0;
  ::fused_norm::emu::warp_collective(::fused_norm::emu::WarpOp::kAny, mask, nullptr, &out, sizeof(out), pred != 0, 32,
                                     w);
  return static_cast<int>(out);
}
inline int __all_sync(unsigned mask, int pred, const std::source_location& w = std::source_location::current()) {
  unsigned out = 0;
  ::fused_norm::emu::warp_collective(::fused_norm::emu::WarpOp::kAll, mask, nullptr, &out, sizeof(out), pred != 0, 32,
                                     w);
  return static_cast<int>(out);
}
inline unsigned __activemask() { return ::fused_norm::emu::active_mask(); }

// Device intrinsics the kernels use that the host headers lack.
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
