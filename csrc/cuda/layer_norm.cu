// Host side of the CUDA LayerNorm: vector width, tier and grid selection, dtype dispatch
// and launches of the kernels in layer_norm.cuh.
//
// Tiers by nvec = ceil(cols / VEC) vectors per row:
//   nvec <= 32 * NV_MAX          warp tier: groups of next_pow2(nvec) lanes (at most 32),
//                                each lane NV = next_pow2(ceil(nvec / 32)) vectors;
//   ceil(nvec / NV_MAX) <= 512   block tier: one row per block, NV the smallest power of
//                                two keeping the block at most 128 (forward) / 256
//                                (backward) threads, up to NV_MAX;
//   otherwise                    streaming tier.
// NV_MAX (nv_max below) bounds the registers a thread holds. With 16-byte vectors the
// resident tiers reach: forward fp32/fp16/bf16 16384 columns, fp64 4096 (warp tier up
// to 1024, fp64 256); backward fp32/fp16/bf16 8192, fp64 4096 (warp tier up to 512,
// fp64 256). Scalar (VEC 1) rows: forward 4096 (warp tier 256), backward 2048 (128).
//
// Residual add: the kernels take the residual's type R and the sum's S as template
// arguments (R = S = T without a residual); see dispatch_residual.
//
// Grids: the forward fills the GPU (rows are independent). The backward grid is a
// function of rows, cols, the vector width, the SM count and whether dweight/dbias are
// asked for only, so the partial dweight/dbias rows (one per block) are added in the
// same order on every run.
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include "launchers.h"
#include "layer_norm.cuh"

namespace fused_norm {
namespace {

using namespace cuda_common;
using ln_cuda::kBlockTierMaxThreads;
using ln_cuda::kReduceCols;
using ln_cuda::kReduceSlices;
using ln_cuda::kStreamThreads;
using ln_cuda::kWarpTierThreads;

// VEC = 16-byte vectors of T when every row-strided pointer (16-byte aligned) and its
// stride (a multiple of VEC) allow them, and the parameters (W) are aligned for their
// min(16, VEC * sizeof(W))-byte packs; else scalar. Null pointers (absent rows) pass.
// The rows of a residual add have T's size or more: their VEC elements are 16-byte packs.
template <typename T, typename W>
bool rows_vectorizable(std::initializer_list<std::pair<const void*, int64_t>> rows,
                       std::initializer_list<const void*> params) {
  constexpr int V = kMaxVec<T>;
  constexpr size_t wbytes = V * sizeof(W) < 16 ? V * sizeof(W) : 16;
  for (const auto& [ptr, stride] : rows)
    if (ptr != nullptr && (!aligned(ptr, 16) || stride % V != 0)) return false;
  for (const void* ptr : params)
    if (!aligned(ptr, wbytes)) return false;
  return true;
}

enum class Tier { kWarp, kBlock, kStream };

struct Plan {
  Tier tier;
  int group;    // warp tier: lanes per row
  int nv;       // resident tiers: vectors per thread
  int threads;  // block size
  int grid;
};

Plan make_plan(int64_t rows, int64_t cols, int vec, int nv_max, bool backward, int sms) {
  Plan pl{};
  const int64_t nvec = ceil_div(cols, vec);
  if (nvec <= 32 * nv_max) {
    pl.tier = Tier::kWarp;
    pl.group = static_cast<int>(nvec <= 32 ? next_pow2(nvec) : 32);
    pl.nv = static_cast<int>(nvec <= 32 ? 1 : next_pow2(ceil_div(nvec, 32)));
    pl.threads = kWarpTierThreads;
    const int64_t blocks = ceil_div(rows, kWarpTierThreads / pl.group);
    pl.grid = static_cast<int>(std::min<int64_t>(blocks, int64_t{sms} * (backward ? 4 : 16)));
    return pl;
  }
  const int64_t target = backward ? 256 : 128;
  int nv = 1;
  while (nv < nv_max && ceil_div(nvec, nv) > target) nv *= 2;
  const int64_t threads = ceil_div(ceil_div(nvec, nv), 32) * 32;
  if (threads <= kBlockTierMaxThreads) {
    pl.tier = Tier::kBlock;
    pl.nv = nv;
    pl.threads = static_cast<int>(threads);
    const int64_t per_sm = std::max<int64_t>(1, (backward ? 512 : 2048) / threads);
    pl.grid = static_cast<int>(std::min<int64_t>(rows, sms * per_sm));
    return pl;
  }
  pl.tier = Tier::kStream;
  pl.threads = kStreamThreads;
  pl.grid = static_cast<int>(std::min<int64_t>(rows, int64_t{sms} * (backward ? 1 : 2)));
  return pl;
}

// Largest NV of a resident tier: per thread at most 32 (forward) / 16 (backward, which
// also keeps two accumulators per column) float values, or 8 double values, and at most
// 8 / 4 vectors; beyond that the kernels spill.
template <typename T, int VEC, bool kBackward>
constexpr int nv_max() {
  constexpr int values = std::is_same_v<T, double> ? 8 : kBackward ? 16 : 32;
  constexpr int cap = kBackward ? 4 : 8;
  return values / VEC < 1 ? 1 : values / VEC > cap ? cap : values / VEC;
}

// Calls go(IntC<NV>, IntC<GROUP>) for a resident plan (GROUP 0: block per row).
template <int NV_MAX, typename Go>
cudaError_t dispatch_resident(const Plan& pl, Go&& go) {
  if (pl.tier == Tier::kWarp && pl.group < 32) {
    switch (pl.group) {
      case 1: return go(IntC<1>{}, IntC<1>{});
      case 2: return go(IntC<1>{}, IntC<2>{});
      case 4: return go(IntC<1>{}, IntC<4>{});
      case 8: return go(IntC<1>{}, IntC<8>{});
      case 16: return go(IntC<1>{}, IntC<16>{});
      default: return cudaErrorInvalidValue;
    }
  }
  auto with_nv = [&](auto group) {
    switch (pl.nv) {
      case 1: return go(IntC<1>{}, group);
      case 2:
        if constexpr (NV_MAX >= 2) return go(IntC<2>{}, group);
        break;
      case 4:
        if constexpr (NV_MAX >= 4) return go(IntC<4>{}, group);
        break;
      case 8:
        if constexpr (NV_MAX >= 8) return go(IntC<8>{}, group);
        break;
    }
    return cudaErrorInvalidValue;
  };
  return pl.tier == Tier::kWarp ? with_nv(IntC<32>{}) : with_nv(IntC<0>{});
}

// ---------------------------------------------------------------------------------------
// Forward.

template <typename T, typename W, typename R, typename S, int VEC>
cudaError_t launch_fwd(const LayerNormFwdParams& p, const Plan& pl, cudaStream_t stream) {
  if (pl.tier == Tier::kStream) {
    return launch(ln_cuda::ln_fwd_stream_kernel<T, W, R, S, VEC>, pl.grid, pl.threads, 0, stream, p);
  }
  return dispatch_resident<nv_max<T, VEC, false>()>(pl, [&](auto nv, auto group) {
    return launch(ln_cuda::ln_fwd_resident_kernel<T, W, R, S, VEC, decltype(nv)::value, decltype(group)::value>,
                  pl.grid, pl.threads, 0, stream, p);
  });
}

template <typename T, typename W, typename R, typename S>
cudaError_t run_fwd(const LayerNormFwdParams& p, int sms, cudaStream_t stream) {
  const bool vec = rows_vectorizable<T, W>({{p.x, p.x_row_stride},
                                            {p.y, p.y_row_stride},
                                            {p.residual, p.residual_row_stride},
                                            {p.sum, p.sum_row_stride}},
                                           {p.weight, p.bias});
  const Plan pl = vec ? make_plan(p.rows, p.cols, kMaxVec<T>, nv_max<T, kMaxVec<T>, false>(), false, sms)
                      : make_plan(p.rows, p.cols, 1, nv_max<T, 1, false>(), false, sms);
  return vec ? launch_fwd<T, W, R, S, kMaxVec<T>>(p, pl, stream) : launch_fwd<T, W, R, S, 1>(p, pl, stream);
}

// ---------------------------------------------------------------------------------------
// Backward. Workspace: 16 bytes of alignment slack, then `grid` partial dweight rows and
// `grid` partial dbias rows of acc_t<T>, each ws_ld = round_up(cols, 4) elements (16-byte
// aligned rows), written by the main kernel and summed by ln_bwd_param_reduce_kernel.
// The partial rows take at most kMaxPartialsBytes: for very wide rows the grid shrinks
// (each block walks more rows) instead of the workspace growing as cols x SMs.
constexpr int64_t kMaxPartialsBytes = int64_t{256} << 20;

struct BwdSetup {
  bool vec;
  Plan plan;
  int64_t ws_ld;
  int64_t ws_bytes;
};

template <typename T, typename W>
BwdSetup bwd_setup(const LayerNormBwdParams& p, int sms) {
  BwdSetup s{};
  s.vec = rows_vectorizable<T, W>({{p.dy, p.dy_row_stride},
                                   {p.x, p.x_row_stride},
                                   {p.dx, p.dx_row_stride},
                                   {p.residual, p.residual_row_stride},
                                   {p.dsum, p.dsum_row_stride},
                                   {p.dresidual, p.dresidual_row_stride}},
                                  {p.weight});
  s.plan = s.vec ? make_plan(p.rows, p.cols, kMaxVec<T>, nv_max<T, kMaxVec<T>, true>(), true, sms)
                 : make_plan(p.rows, p.cols, 1, nv_max<T, 1, true>(), true, sms);
  s.ws_ld = ceil_div(p.cols, 4) * 4;
  const bool partials = p.rows > 0 && (p.dweight != nullptr || p.dbias != nullptr);
  if (!partials) return s;
  const int64_t part_bytes = 2 * s.ws_ld * int64_t{sizeof(acc_t<T>)};  // a block's two rows
  s.plan.grid = static_cast<int>(std::min<int64_t>(s.plan.grid, std::max<int64_t>(1, kMaxPartialsBytes / part_bytes)));
  s.ws_bytes = 16 + s.plan.grid * part_bytes;
  return s;
}

template <typename T, typename W, typename R, typename S, int VEC>
cudaError_t launch_bwd(const LayerNormBwdParams& p, const BwdSetup& s, acc_t<T>* ws,
                       cudaStream_t stream) {
  using A = acc_t<T>;
  const Plan& pl = s.plan;
  if (pl.tier == Tier::kStream) {
    return launch(ln_cuda::ln_bwd_stream_kernel<T, W, R, S, VEC>, pl.grid, pl.threads, 0, stream, p, ws, s.ws_ld);
  }
  return dispatch_resident<nv_max<T, VEC, true>()>(pl, [&](auto nv, auto group) {
    constexpr int kGroup = decltype(group)::value;
    // Warp tier: the groups' partial sums meet in shared memory (at most
    // kWarpTierThreads * NV * VEC <= 128 * 16 values, 8 KiB).
    const size_t smem = kGroup > 0 && ws ? sizeof(A) * (kWarpTierThreads / kGroup) * p.cols : 0;
    return launch(ln_cuda::ln_bwd_resident_kernel<T, W, R, S, VEC, decltype(nv)::value, kGroup>, pl.grid,
                  pl.threads, smem, stream, p, ws, s.ws_ld);
  });
}

template <typename T, typename W, typename R, typename S>
cudaError_t run_bwd(const LayerNormBwdParams& p, int sms, cudaStream_t stream) {
  using A = acc_t<T>;
  const BwdSetup s = bwd_setup<T, W>(p, sms);
  A* ws = nullptr;
  if (s.ws_bytes > 0) {
    if (p.workspace == nullptr) return cudaErrorInvalidValue;
    ws = reinterpret_cast<A*>((reinterpret_cast<uintptr_t>(p.workspace) + 15) & ~uintptr_t{15});
  }
  cudaError_t err =
      s.vec ? launch_bwd<T, W, R, S, kMaxVec<T>>(p, s, ws, stream) : launch_bwd<T, W, R, S, 1>(p, s, ws, stream);
  if (err != cudaSuccess || ws == nullptr) return err;
  const dim3 block(kReduceCols, kReduceSlices);
  const auto blocks = static_cast<unsigned int>(ceil_div(p.cols, kReduceCols));
  return launch(ln_cuda::ln_bwd_param_reduce_kernel<A, W>, blocks, block, 0, stream, ws, s.plan.grid, p.cols,
                s.ws_ld, static_cast<W*>(p.dweight), static_cast<W*>(p.dbias));
}

// Calls f(Tag<R>, Tag<S>) for the residual's and the sum's storage types of an x of type
// T (params.h): both T (also without a residual), or float for half/bfloat16 x: R = S =
// float, or R = T and S = float (residual_in_fp32).
template <typename T, typename F>
cudaError_t dispatch_residual(DType r, DType s, DType t, F&& f) {
  if (r == t && s == t) return f(Tag<T>{}, Tag<T>{});
  if constexpr (sizeof(T) == 2) {
    if (r == DType::kFloat32 && s == DType::kFloat32) return f(Tag<float>{}, Tag<float>{});
    if (r == t && s == DType::kFloat32) return f(Tag<T>{}, Tag<float>{});
  }
  return cudaErrorInvalidValue;
}

// Calls f(Tag<T>, Tag<W>, Tag<R>, Tag<S>) for p's dtypes.
template <typename P, typename F>
cudaError_t dispatch_all(const P& p, F&& f) {
  return dispatch_dtypes(p.x_dtype, p.w_dtype, [&](auto t, auto w) {
    return dispatch_residual<typename decltype(t)::type>(p.r_dtype, p.s_dtype, p.x_dtype,
                                                         [&](auto r, auto s) { return f(t, w, r, s); });
  });
}

size_t dtype_size(DType t) {
  switch (t) {
    case DType::kFloat64: return 8;
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    default: return 4;
  }
}

}  // namespace

cudaError_t layer_norm_fwd_cuda(const LayerNormFwdParams& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.cols <= 0) return cudaSuccess;
  int sms = 0;
  const cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  return dispatch_all(p, [&](auto t, auto w, auto r, auto s) {
    return run_fwd<typename decltype(t)::type, typename decltype(w)::type, typename decltype(r)::type,
                   typename decltype(s)::type>(p, sms, stream);
  });
}

cudaError_t layer_norm_bwd_cuda_workspace_bytes(const LayerNormBwdParams& p, int64_t* bytes) {
  if (p.rows <= 0 || p.cols <= 0) {
    *bytes = 0;
    return cudaSuccess;
  }
  int sms = 0;
  const cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  return dispatch_dtypes(p.x_dtype, p.w_dtype, [&](auto t, auto w) {
    *bytes = bwd_setup<typename decltype(t)::type, typename decltype(w)::type>(p, sms).ws_bytes;
    return cudaSuccess;
  });
}

cudaError_t layer_norm_bwd_cuda(const LayerNormBwdParams& p, cudaStream_t stream) {
  if (p.cols <= 0) return cudaSuccess;
  if (p.rows <= 0) {
    // No rows: the column sums are zero (all-zero bits in every float format).
    const size_t bytes = dtype_size(p.w_dtype) * static_cast<size_t>(p.cols);
    for (void* out : {p.dweight, p.dbias}) {
      if (out == nullptr) continue;
      const cudaError_t err = cudaMemsetAsync(out, 0, bytes, stream);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
  int sms = 0;
  const cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  return dispatch_all(p, [&](auto t, auto w, auto r, auto s) {
    return run_bwd<typename decltype(t)::type, typename decltype(w)::type, typename decltype(r)::type,
                   typename decltype(s)::type>(p, sms, stream);
  });
}

}  // namespace fused_norm
