// Host side of the CUDA BatchNorm: layout canonicalization, vector width, grid and
// workspace planning, dtype dispatch and launches of the kernels in batch_norm.cuh.
//
// Forward, training: reduce kernel (NCS or NSC) -> [bn_finalize_kernel when split] ->
//   elementwise y. Eval: one elementwise kernel (its prologue writes save_mean/invstd).
// Backward: [reduce kernel -> [finalize]] when training or dweight/dbias is asked ->
//   elementwise dx.
// The phases of a synchronized BatchNorm: batch_norm_stats is the forward's reduction
// alone, batch_norm_bwd_reduce the backward's, batch_norm_bwd_elemt its training dx pass.
// They read no parameter and run the kernels instantiated for W = T.
//
// Reduction splits: the reduce kernel gets C (NCS) or ceil(C / VEC / bx) (NSC) blocks
// in gridDim.x; when that is below kBlocksPerSm blocks per SM, each channel's data is cut
// into `splits` pieces along gridDim.y (at most 2 * kBlocksPerSm * SMs, far below
// 65535), no smaller than kMinItemsPerThread vectors per thread. The splits' parts go to
// the workspace and are merged in split order. The plan depends only on the shape, the
// dtypes, the vector width and the device's SM count, so repeated runs merge in the same
// order (bitwise reproducible results). Workspace sizes take the larger plan of the two
// vector widths, so the size query does not depend on the pointers.
//
// Workspace layout (16 bytes of alignment slack first):
//   forward:  parts Moments<A>[splits][C]                          (only when splits > 1)
//   backward: sum_dy A[C], sum_dyxmu A[C] (16-byte rounded), parts Sums<A>[splits][C]
//             (bwd_reduce: the same layout, the sums going to its outputs instead)
#include <algorithm>
#include <climits>
#include <cstdint>
#include <numeric>

#include "batch_norm.cuh"
#include "launchers.h"

namespace fused_norm {
namespace {

using namespace cuda_common;
using bn_cuda::kThreads;

constexpr int64_t kBlocksPerSm = 8;        // blocks of kThreads per SM the grids aim at
constexpr int64_t kMinItemsPerThread = 8;  // reduce: vectors (rows) per thread per split
constexpr int64_t kMaxGridX = INT_MAX;

int64_t round16(int64_t bytes) { return ceil_div(bytes, 16) * 16; }

bool aligned16(const void* ptr) { return aligned(ptr, 16); }

// ---------------------------------------------------------------------------------------
// Canonical shape. ncs: N planes-per-channel groups, (n * C + c) * S + s. !ncs: N rows of
// C channels (S == 1). The same memory either way; n = N * S values per channel.
struct Shape {
  bool ncs;
  int64_t N, C, S;
  int64_t per_channel() const { return N * S; }
  int64_t total() const { return N * C * S; }
};

Shape canonical(int64_t N, int64_t C, int64_t S, BatchNormLayout layout) {
  if (C == 1) return Shape{true, 1, 1, N * S};
  if (layout == BatchNormLayout::kNSC || S == 1) return Shape{false, N * S, C, 1};
  return Shape{true, N, C, S};
}

// Whether the reduction over x (and dy) can use VEC-element vectors.
template <typename T>
bool reduce_vec_ok(const Shape& sh) {
  constexpr int V = kMaxVec<T>;
  return sh.ncs ? sh.S % V == 0 : sh.C % V == 0;
}

// ---------------------------------------------------------------------------------------
// Reduction plan (needs per_channel() > 0).
struct ReducePlan {
  bool ncs;
  dim3 grid, block;
  int splits;
  bn_cuda::NcsReduceGeom ncs_g;
  bn_cuda::NscReduceGeom nsc_g;
  dim3 fin_grid, fin_block;  // bn_finalize_kernel, when splits > 1
};

dim3 finalize_block(int64_t C, int splits) {
  const int64_t fx = std::min<int64_t>(32, next_pow2(C));
  const int64_t fy = std::min<int64_t>(kThreads / fx, next_pow2(std::max(1, splits)));
  return dim3(static_cast<unsigned>(fx), static_cast<unsigned>(fy));
}

dim3 finalize_grid(int64_t C, const dim3& block) {
  return dim3(static_cast<unsigned>(std::min<int64_t>(ceil_div(C, block.x), kMaxGridX)));
}

ReducePlan plan_reduce(const Shape& sh, int vec, int sms) {
  ReducePlan pl{};
  pl.ncs = sh.ncs;
  const int64_t target = int64_t{sms} * kBlocksPerSm;
  if (sh.ncs) {
    const int64_t nvs = sh.S / vec;
    const int64_t grid_x = std::min(sh.C, kMaxGridX);
    int64_t sn = 1, ss = 1, pn = sh.N, ps = nvs;
    if (grid_x < target) {
      int64_t want = ceil_div(target, grid_x);
      want = std::min(want, std::max<int64_t>(1, ceil_div(sh.N * nvs, kThreads * kMinItemsPerThread)));
      sn = std::min(sh.N, want);
      ss = std::max<int64_t>(1, std::min(ceil_div(want, sn), ceil_div(nvs, kThreads)));
      pn = ceil_div(sh.N, sn);
      sn = ceil_div(sh.N, pn);
      ps = ceil_div(nvs, ss);
      ss = ceil_div(nvs, ps);
    }
    pl.splits = static_cast<int>(sn * ss);
    pl.ncs_g = bn_cuda::NcsReduceGeom{sh.N, sh.C, sh.S, nvs, pn, ps, static_cast<int>(ss), pl.splits};
    pl.grid = dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(pl.splits));
    pl.block = dim3(kThreads);
  } else {
    const int64_t M = sh.N;
    const int64_t nvc = sh.C / vec;
    const int64_t bx = std::min<int64_t>(32, next_pow2(nvc));
    const int64_t by = kThreads / bx;
    const int64_t tiles = ceil_div(nvc, bx);
    const int64_t grid_x = std::min(tiles, kMaxGridX);
    int64_t splits = 1;
    if (grid_x < target) {
      splits = ceil_div(target, grid_x);
      splits = std::min(splits, std::max<int64_t>(1, ceil_div(M, by * kMinItemsPerThread)));
    }
    const int64_t rps = ceil_div(M, splits);
    splits = ceil_div(M, rps);
    pl.splits = static_cast<int>(splits);
    pl.nsc_g = bn_cuda::NscReduceGeom{M, sh.C, nvc, tiles, rps, pl.splits};
    pl.grid = dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(pl.splits));
    pl.block = dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by));
  }
  pl.fin_block = finalize_block(sh.C, pl.splits);
  pl.fin_grid = finalize_grid(sh.C, pl.fin_block);
  return pl;
}

// Bytes of split parts of `part_bytes` each for the larger of the two vector plans.
template <typename T>
int64_t max_parts_bytes(const Shape& sh, int64_t part_bytes, int sms) {
  int64_t best = 0;
  for (int vec : {1, kMaxVec<T>}) {
    if (vec > 1 && !reduce_vec_ok<T>(sh)) continue;
    const ReducePlan pl = plan_reduce(sh, vec, sms);
    if (pl.splits > 1) best = std::max(best, int64_t{pl.splits} * sh.C * part_bytes);
  }
  return best;
}

// Launches the layout's reduce kernel with `op` and, when split, the merge of the parts.
template <typename T, int VEC, typename Op>
cudaError_t launch_reduce(const ReducePlan& pl, const void* in0, const void* in1, const Op& op,
                          typename Op::Part* parts, int64_t C, cudaStream_t stream) {
  if (pl.splits > 1 && parts == nullptr) return cudaErrorInvalidValue;
  const T* a = static_cast<const T*>(in0);
  const T* b = static_cast<const T*>(in1);
  const cudaError_t err =
      pl.ncs
          ? launch(bn_cuda::bn_reduce_ncs_kernel<T, VEC, Op>, pl.grid, pl.block, 0, stream, a, b, op, parts, pl.ncs_g)
          : launch(bn_cuda::bn_reduce_nsc_kernel<T, VEC, Op>, pl.grid, pl.block, 0, stream, a, b, op, parts, pl.nsc_g);
  if (err != cudaSuccess || pl.splits <= 1) return err;
  return launch(bn_cuda::bn_finalize_kernel<Op>, pl.fin_grid, pl.fin_block, 0, stream, parts, pl.splits, C, op);
}

// Every channel finished with an empty part (no values): the n == 0 case.
template <typename Op>
cudaError_t launch_finish_empty(const Op& op, int64_t C, cudaStream_t stream) {
  const dim3 block = finalize_block(C, 0);
  return launch(bn_cuda::bn_finalize_kernel<Op>, finalize_grid(C, block), block, 0, stream, nullptr, 0, C, op);
}

// ---------------------------------------------------------------------------------------
// Elementwise passes.
template <typename T, int VEC, typename Op>
cudaError_t launch_ew(const Shape& sh, const void* in0, const void* in1, void* out, const Op& op,
                      int sms, cudaStream_t stream) {
  const T* a = static_cast<const T*>(in0);
  const T* b = static_cast<const T*>(in1);
  T* o = static_cast<T*>(out);
  const int64_t total = sh.total();
  const int64_t nvec = total / VEC;
  const int64_t target = int64_t{sms} * kBlocksPerSm;
  const int64_t one_pass = std::max<int64_t>(1, ceil_div(nvec, kThreads));
  if (sh.ncs && total > 0) {
    const int64_t grid = std::min(one_pass, target);
    const int64_t step = grid * kThreads * VEC;  // elements between a thread's vectors
    const bn_cuda::NcsEwGeom g{total, nvec, sh.C, sh.S, step % sh.S, (step / sh.S) % sh.C};
    return launch(bn_cuda::bn_ew_ncs_kernel<T, VEC, Op>, static_cast<unsigned>(grid), kThreads, 0, stream, a, b, o,
                  op, g);
  }
  // NSC (and any empty input, for the prologue): a grid that covers all vectors in one
  // sweep, or whose stride in elements is a multiple of C.
  int64_t grid = one_pass;
  if (one_pass > target) {
    const int64_t base = sh.C / std::gcd(sh.C, int64_t{kThreads} * VEC);
    grid = std::min(one_pass, base * std::max<int64_t>(1, target / base));
  }
  if (grid > kMaxGridX) return cudaErrorInvalidConfiguration;
  return launch(bn_cuda::bn_ew_nsc_kernel<T, VEC, Op>, static_cast<unsigned>(grid), kThreads, 0, stream, a, b, o, op,
                bn_cuda::NscEwGeom{total, nvec, sh.C});
}

// 16-byte vectors when every pointer is 16-byte aligned (and, for NCS, S >= VEC so a
// vector spans at most two planes); scalar otherwise.
template <typename T, typename Op>
cudaError_t run_ew(const Shape& sh, const void* in0, const void* in1, void* out, const Op& op,
                   int sms, cudaStream_t stream) {
  constexpr int V = kMaxVec<T>;
  const bool vec = sh.total() >= V && aligned16(in0) && (in1 == nullptr || aligned16(in1)) &&
                   aligned16(out) && (!sh.ncs || sh.S >= V);
  return vec ? launch_ew<T, V>(sh, in0, in1, out, op, sms, stream)
             : launch_ew<T, 1>(sh, in0, in1, out, op, sms, stream);
}

// Start of the workspace, 16-byte aligned.
unsigned char* ws_base(void* workspace) {
  return reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(workspace) + 15) & ~uintptr_t{15});
}

// ---------------------------------------------------------------------------------------
// Forward.

template <typename T, typename W>
int64_t fwd_ws_bytes(const BatchNormFwdParams& p, int sms) {
  const Shape sh = canonical(p.N, p.C, p.S, p.layout);
  if (sh.per_channel() <= 0) return 0;
  const int64_t parts = max_parts_bytes<T>(sh, sizeof(Moments<acc_t<T>>), sms);
  return parts > 0 ? 16 + parts : 0;
}

template <typename T, typename W, int VEC>
bn_cuda::StatsOp<T, W, VEC> make_stats_op(const BatchNormFwdParams& p, const Shape& sh) {
  using A = acc_t<T>;
  bn_cuda::StatsOp<T, W, VEC> op{};
  op.x = static_cast<const T*>(p.x);
  op.channel_stride = sh.ncs ? sh.S : 1;
  op.save_mean = static_cast<A*>(p.save_mean);
  op.save_invstd = static_cast<A*>(p.save_invstd);
  op.save_var = static_cast<A*>(p.save_var);
  const bool update = p.new_running_mean != nullptr && p.new_running_var != nullptr &&
                      p.running_mean != nullptr && p.running_var != nullptr;
  op.running_mean = update ? static_cast<const W*>(p.running_mean) : nullptr;
  op.running_var = update ? static_cast<const W*>(p.running_var) : nullptr;
  op.new_running_mean = update ? static_cast<W*>(p.new_running_mean) : nullptr;
  op.new_running_var = update ? static_cast<W*>(p.new_running_var) : nullptr;
  op.num_batches_tracked = p.num_batches_tracked;
  op.cumulative = p.cumulative;
  op.momentum = static_cast<A>(p.momentum);
  op.count = static_cast<A>(sh.per_channel());
  op.eps = p.eps;
  return op;
}

// The statistics reduction (StatsOp's finish writes what p asks for).
template <typename T, typename W>
cudaError_t reduce_stats(const BatchNormFwdParams& p, const Shape& sh, int sms, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t n = sh.per_channel();
  if (n == 0) return launch_finish_empty(make_stats_op<T, W, 1>(p, sh), sh.C, stream);
  auto go = [&](auto vec) {
    constexpr int V = decltype(vec)::value;
    const ReducePlan pl = plan_reduce(sh, V, sms);
    Moments<A>* parts = p.workspace ? reinterpret_cast<Moments<A>*>(ws_base(p.workspace)) : nullptr;
    return launch_reduce<T, V>(pl, p.x, nullptr, make_stats_op<T, W, V>(p, sh), parts, sh.C, stream);
  };
  const bool vec = reduce_vec_ok<T>(sh) && aligned16(p.x);
  return vec ? go(IntC<kMaxVec<T>>{}) : go(IntC<1>{});
}

template <typename T, typename W>
cudaError_t run_fwd(const BatchNormFwdParams& p, int sms, cudaStream_t stream) {
  using A = acc_t<T>;
  const Shape sh = canonical(p.N, p.C, p.S, p.layout);
  if (p.save_mean == nullptr || p.save_invstd == nullptr) return cudaErrorInvalidValue;

  if (!p.training) {
    if (p.running_mean == nullptr || p.running_var == nullptr) return cudaErrorInvalidValue;
    bn_cuda::FwdEvalEw<T, W> op{};
    op.running_mean = static_cast<const W*>(p.running_mean);
    op.running_var = static_cast<const W*>(p.running_var);
    op.weight = static_cast<const W*>(p.weight);
    op.bias = static_cast<const W*>(p.bias);
    op.save_mean = static_cast<A*>(p.save_mean);
    op.save_invstd = static_cast<A*>(p.save_invstd);
    op.eps = p.eps;
    return run_ew<T>(sh, p.x, nullptr, p.y, op, sms, stream);
  }
  if (p.new_running_mean != nullptr && p.cumulative && p.num_batches_tracked == nullptr)
    return cudaErrorInvalidValue;

  const cudaError_t err = reduce_stats<T, W>(p, sh, sms, stream);
  if (err != cudaSuccess || sh.total() == 0) return err;

  bn_cuda::FwdTrainEw<T, W> op{};
  op.mean = static_cast<const A*>(p.save_mean);
  op.invstd = static_cast<const A*>(p.save_invstd);
  op.weight = static_cast<const W*>(p.weight);
  op.bias = static_cast<const W*>(p.bias);
  return run_ew<T>(sh, p.x, nullptr, p.y, op, sms, stream);
}

template <typename T>
cudaError_t run_stats(const BatchNormFwdParams& p, int sms, cudaStream_t stream) {
  if (p.save_mean == nullptr || p.save_var == nullptr || p.save_invstd != nullptr || p.new_running_mean != nullptr)
    return cudaErrorInvalidValue;
  return reduce_stats<T, T>(p, canonical(p.N, p.C, p.S, p.layout), sms, stream);
}

// ---------------------------------------------------------------------------------------
// Backward.

template <typename T>
int64_t bwd_sums_bytes(int64_t C) {
  return round16(2 * C * static_cast<int64_t>(sizeof(acc_t<T>)));
}

template <typename T, typename W>
int64_t bwd_ws_bytes(const BatchNormBwdParams& p, int sms) {
  const Shape sh = canonical(p.N, p.C, p.S, p.layout);
  if (sh.per_channel() <= 0) return 0;
  return 16 + bwd_sums_bytes<T>(sh.C) + max_parts_bytes<T>(sh, sizeof(bn_cuda::Sums<acc_t<T>>), sms);
}

// sum(dy) and sum(dy * (x - mean)) per channel (BwdSumOp): into sum_dy / sum_dyxmu and
// dweight / dbias, each when non-null. parts: the splits' scratch (needed when n > 0).
template <typename T, typename W>
cudaError_t reduce_bwd_sums(const BatchNormBwdParams& p, const Shape& sh, acc_t<T>* sum_dy, acc_t<T>* sum_dyxmu,
                            W* dweight, W* dbias, bn_cuda::Sums<acc_t<T>>* parts, int sms, cudaStream_t stream) {
  using A = acc_t<T>;
  auto make_op = [&](auto vec) {
    constexpr int V = decltype(vec)::value;
    bn_cuda::BwdSumOp<T, W, V> op{};
    op.mean = static_cast<const A*>(p.mean);
    op.invstd = static_cast<const A*>(p.invstd);
    op.sum_dy = sum_dy;
    op.sum_dyxmu = sum_dyxmu;
    op.dweight = dweight;
    op.dbias = dbias;
    return op;
  };
  if (sh.per_channel() == 0) return launch_finish_empty(make_op(IntC<1>{}), sh.C, stream);
  auto go = [&](auto vec) {
    constexpr int V = decltype(vec)::value;
    const ReducePlan pl = plan_reduce(sh, V, sms);
    return launch_reduce<T, V>(pl, p.dy, p.x, make_op(vec), parts, sh.C, stream);
  };
  const bool vec = reduce_vec_ok<T>(sh) && aligned16(p.dy) && aligned16(p.x);
  return vec ? go(IntC<kMaxVec<T>>{}) : go(IntC<1>{});
}

// Training dx from the sums (BwdTrainEw; p.count, when set, gives n).
template <typename T, typename W>
cudaError_t train_dx(const BatchNormBwdParams& p, const Shape& sh, const acc_t<T>* sum_dy, const acc_t<T>* sum_dyxmu,
                     int sms, cudaStream_t stream) {
  using A = acc_t<T>;
  bn_cuda::BwdTrainEw<T, W> op{};
  op.mean = static_cast<const A*>(p.mean);
  op.invstd = static_cast<const A*>(p.invstd);
  op.weight = static_cast<const W*>(p.weight);
  op.sum_dy = sum_dy;
  op.sum_dyxmu = sum_dyxmu;
  op.n = static_cast<A>(sh.per_channel());
  op.count = p.count;
  return run_ew<T>(sh, p.dy, p.x, p.dx, op, sms, stream);
}

template <typename T, typename W>
cudaError_t run_bwd(const BatchNormBwdParams& p, int sms, cudaStream_t stream) {
  using A = acc_t<T>;
  const Shape sh = canonical(p.N, p.C, p.S, p.layout);
  const bool needs_sums = p.training || p.dweight != nullptr || p.dbias != nullptr;
  A* sum_dy = nullptr;
  A* sum_dyxmu = nullptr;

  if (needs_sums) {
    bn_cuda::Sums<A>* parts = nullptr;
    if (sh.per_channel() > 0) {
      if (p.workspace == nullptr) return cudaErrorInvalidValue;
      unsigned char* base = ws_base(p.workspace);
      sum_dy = reinterpret_cast<A*>(base);
      sum_dyxmu = sum_dy + sh.C;
      parts = reinterpret_cast<bn_cuda::Sums<A>*>(base + bwd_sums_bytes<T>(sh.C));
    }
    const cudaError_t err =
        reduce_bwd_sums<T, W>(p, sh, p.training ? sum_dy : nullptr, p.training ? sum_dyxmu : nullptr,
                              static_cast<W*>(p.dweight), static_cast<W*>(p.dbias), parts, sms, stream);
    if (err != cudaSuccess) return err;
  }
  if (sh.total() == 0) return cudaSuccess;

  if (p.training) return train_dx<T, W>(p, sh, sum_dy, sum_dyxmu, sms, stream);
  bn_cuda::BwdEvalEw<T, W> op{};
  op.invstd = static_cast<const A*>(p.invstd);
  op.weight = static_cast<const W*>(p.weight);
  return run_ew<T>(sh, p.dy, nullptr, p.dx, op, sms, stream);
}

// Workspace: batch_norm_bwd_cuda_workspace_bytes (the parts at the backward's offset).
template <typename T>
cudaError_t run_bwd_reduce(const BatchNormBwdParams& p, int sms, cudaStream_t stream) {
  using A = acc_t<T>;
  if (p.sum_dy == nullptr || p.sum_dy_xmu == nullptr) return cudaErrorInvalidValue;
  const Shape sh = canonical(p.N, p.C, p.S, p.layout);
  bn_cuda::Sums<A>* parts = nullptr;
  if (sh.per_channel() > 0) {
    if (p.workspace == nullptr) return cudaErrorInvalidValue;
    parts = reinterpret_cast<bn_cuda::Sums<A>*>(ws_base(p.workspace) + bwd_sums_bytes<T>(sh.C));
  }
  return reduce_bwd_sums<T, T>(p, sh, static_cast<A*>(p.sum_dy), static_cast<A*>(p.sum_dy_xmu), nullptr, nullptr,
                               parts, sms, stream);
}

template <typename T, typename W>
cudaError_t run_bwd_elemt(const BatchNormBwdParams& p, int sms, cudaStream_t stream) {
  using A = acc_t<T>;
  if (p.sum_dy == nullptr || p.sum_dy_xmu == nullptr || p.count == nullptr) return cudaErrorInvalidValue;
  const Shape sh = canonical(p.N, p.C, p.S, p.layout);
  if (sh.total() == 0) return cudaSuccess;
  return train_dx<T, W>(p, sh, static_cast<const A*>(p.sum_dy), static_cast<const A*>(p.sum_dy_xmu), sms, stream);
}

bool sizes_ok(int64_t N, int64_t C, int64_t S) { return N >= 0 && C > 0 && S >= 0; }

// The checks every entry point starts with; then run(SM count).
template <typename P, typename F>
cudaError_t checked(const P& p, F&& run) {
  if (p.C == 0) return cudaSuccess;
  if (!sizes_ok(p.N, p.C, p.S)) return cudaErrorInvalidValue;
  int sms = 0;
  const cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  return run(sms);
}

// Calls f(Tag<T>) for x's storage type (the phases that read no parameter).
template <typename F>
cudaError_t dispatch_x(DType x_dtype, F&& f) {
  switch (x_dtype) {
    case DType::kFloat32: return f(Tag<float>{});
    case DType::kFloat64: return f(Tag<double>{});
    case DType::kFloat16: return f(Tag<__half>{});
    case DType::kBFloat16: return f(Tag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t batch_norm_fwd_cuda_workspace_bytes(const BatchNormFwdParams& p, int64_t* bytes) {
  *bytes = 0;
  return checked(p, [&](int sms) {
    return dispatch_dtypes(p.x_dtype, p.w_dtype, [&](auto t, auto w) {
      *bytes = fwd_ws_bytes<typename decltype(t)::type, typename decltype(w)::type>(p, sms);
      return cudaSuccess;
    });
  });
}

cudaError_t batch_norm_fwd_cuda(const BatchNormFwdParams& p, cudaStream_t stream) {
  return checked(p, [&](int sms) {
    return dispatch_dtypes(p.x_dtype, p.w_dtype, [&](auto t, auto w) {
      return run_fwd<typename decltype(t)::type, typename decltype(w)::type>(p, sms, stream);
    });
  });
}

cudaError_t batch_norm_bwd_cuda_workspace_bytes(const BatchNormBwdParams& p, int64_t* bytes) {
  *bytes = 0;
  return checked(p, [&](int sms) {
    return dispatch_dtypes(p.x_dtype, p.w_dtype, [&](auto t, auto w) {
      *bytes = bwd_ws_bytes<typename decltype(t)::type, typename decltype(w)::type>(p, sms);
      return cudaSuccess;
    });
  });
}

cudaError_t batch_norm_bwd_cuda(const BatchNormBwdParams& p, cudaStream_t stream) {
  return checked(p, [&](int sms) {
    return dispatch_dtypes(p.x_dtype, p.w_dtype, [&](auto t, auto w) {
      return run_bwd<typename decltype(t)::type, typename decltype(w)::type>(p, sms, stream);
    });
  });
}

cudaError_t batch_norm_stats_cuda(const BatchNormFwdParams& p, cudaStream_t stream) {
  return checked(p, [&](int sms) {
    return dispatch_x(p.x_dtype, [&](auto t) { return run_stats<typename decltype(t)::type>(p, sms, stream); });
  });
}

cudaError_t batch_norm_bwd_reduce_cuda(const BatchNormBwdParams& p, cudaStream_t stream) {
  return checked(p, [&](int sms) {
    return dispatch_x(p.x_dtype, [&](auto t) { return run_bwd_reduce<typename decltype(t)::type>(p, sms, stream); });
  });
}

cudaError_t batch_norm_bwd_elemt_cuda(const BatchNormBwdParams& p, cudaStream_t stream) {
  return checked(p, [&](int sms) {
    return dispatch_dtypes(p.x_dtype, p.w_dtype, [&](auto t, auto w) {
      return run_bwd_elemt<typename decltype(t)::type, typename decltype(w)::type>(p, sms, stream);
    });
  });
}

}  // namespace fused_norm
