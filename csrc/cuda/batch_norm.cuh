// CUDA BatchNorm kernels. The input is (N, C, S) in one of two layouts (params.h); the
// host side (batch_norm.cu) first rewrites it into one of two canonical shapes:
//
//  * NCS: planes of S contiguous elements, plane p = n * C + c holds channel c;
//  * NSC: M = N * S rows of C contiguous channels.
//
// (S == 1 is NSC; C == 1 is NCS with one plane of N * S elements: the memory is the
// same.) Every kernel runs kThreads threads per block and walks its work in grid-stride
// loops with 64-bit indices; the only work in gridDim.y is a number of splits the host
// chose (at most a few thousand), so no grid dimension grows with N.
//
// Reductions (training statistics; the backward's sum(dy) and sum(dy * (x - mean))) are
// written once for both, as "reduce ops" (StatsOp, BwdSumOp) plugged into two layout
// kernels:
//
//  * bn_reduce_ncs_kernel: one channel per block (a grid-stride loop over channels). The
//    channel's N x nvs vectors (nvs = S / VEC) may be cut into splits = sn x ss blocks
//    (plane ranges x vector ranges) along gridDim.y when C is too small to fill the GPU.
//    A block walks its planes x vectors range as one flat sequence (consecutive threads
//    on consecutive vectors, wrapping to the next plane), so small and large S both
//    coalesce and keep every lane busy.
//  * bn_reduce_nsc_kernel: channels across threads. Block (bx, by), bx a power of two
//    <= 32 lanes each holding VEC consecutive channels, by rows of threads; the block
//    walks the rows of its split (gridDim.y) and tile of bx * VEC channels (gridDim.x).
//
// Per thread the reduce op accumulates one slot per vector element (Welford with one
// reciprocal per vector for the statistics, plain sums for the backward); then the
// partials ("parts": Moments or Sums) are merged in a fixed tree across lanes with warp
// shuffles, in warp order across the warps through shared memory, and, with several
// splits, in a fixed order across blocks: each block writes its part to the workspace
// ws[split * C + c] and bn_finalize_kernel merges the splits of a channel in split order
// (contiguous slices per thread row, then a fixed shared-memory tree). No atomics, no
// "last block" counters: the result bits depend only on the shape, the dtypes, the
// vector width and the SM count.
//
// The elementwise passes (y, and dx) are "elementwise ops" (per-channel coefficients
// computed once per channel, then one apply per element) plugged into two layout kernels
// that move 16-byte vectors when every pointer allows it:
//
//  * bn_ew_ncs_kernel: the tensor as a flat sequence of VEC-element vectors; each thread
//    tracks the (position in plane, channel) of its vectors incrementally (no division
//    per element), and a vector that straddles two planes (S % VEC != 0) uses the
//    coefficients of both channels. The last total % VEC elements are scalar.
//  * bn_ew_nsc_kernel: the flat sequence again, with a grid whose stride (in elements)
//    is a multiple of C (or that covers everything in one sweep), so each thread sees
//    the same VEC channels for all its vectors and computes their coefficients once.
#pragma once
#include <cstdint>

#include "common.cuh"

namespace fused_norm {
namespace bn_cuda {

using namespace cuda_common;

constexpr int kThreads = 256;             // threads per block, every kernel
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;                // vectors in flight per thread

// ---------------------------------------------------------------------------------------
// Parts: what a thread, warp, block or split contributes for one channel.
//   Moments<A> (norm_math.h): count, mean, M2 of the values seen (statistics);
//   Sums<A>: sum(dy) and sum(dy * (x - mean)) (backward).
template <typename A>
struct Sums {
  A dy;
  A dyxmu;
};

template <typename P> struct PartTraits;
template <typename A> struct PartTraits<Moments<A>> {
  static FN_DEV Moments<A> empty() { return Moments<A>{A(0), A(0), A(0)}; }
  static FN_DEV Moments<A> merge(const Moments<A>& a, const Moments<A>& b) { return moments_merge(a, b); }
  static FN_DEV Moments<A> shfl_down(const Moments<A>& m, int off) {
    Moments<A> o;
    o.count = __shfl_down_sync(0xffffffffu, m.count, off);
    o.mean = __shfl_down_sync(0xffffffffu, m.mean, off);
    o.m2 = __shfl_down_sync(0xffffffffu, m.m2, off);
    return o;
  }
};
template <typename A> struct PartTraits<Sums<A>> {
  static FN_DEV Sums<A> empty() { return Sums<A>{A(0), A(0)}; }
  static FN_DEV Sums<A> merge(const Sums<A>& a, const Sums<A>& b) {
    return Sums<A>{a.dy + b.dy, a.dyxmu + b.dyxmu};
  }
  static FN_DEV Sums<A> shfl_down(const Sums<A>& s, int off) {
    Sums<A> o;
    o.dy = __shfl_down_sync(0xffffffffu, s.dy, off);
    o.dyxmu = __shfl_down_sync(0xffffffffu, s.dyxmu, off);
    return o;
  }
};

// ---------------------------------------------------------------------------------------
// Reduce ops. Interface used by the reduce kernels:
//   A, Part, Acc (per-thread accumulator of VEC slots), kInputs (1: in0; 2: in0, in1),
//   init(Acc&), ctx(c) (per-channel value the pushes need), push(Acc&, in0[VEC],
//   in1[VEC], ctx[VEC]), slot(Acc, j) -> Part, finish(c, Part) (the channel's total).

// Training statistics of x (in0). finish writes save_mean, save_invstd and save_var when
// non-null (the forward: save_invstd; batch_norm_stats: save_var) and, when asked, the
// updated running statistics. The moments are of x - shift with a per-channel shift, the
// channel's first value (0 if not finite): for data whose mean is large against its
// spread, float Welford updates of x itself lose digits in the deviations; shifted, the
// mean is small. Every part of a channel has the same shift; finish adds it back.
template <typename T, typename W, int VEC>
struct StatsOp {
  using A = acc_t<T>;
  using Part = Moments<A>;
  static constexpr int kInputs = 1;
  // Welford per slot with a shared count: one reciprocal per vector.
  struct Acc {
    A count;
    A mean[VEC];
    A m2[VEC];
  };

  const T* x;              // the input, for the shifts
  int64_t channel_stride;  // elements between the first values of channels c and c + 1
  A* save_mean;
  A* save_invstd;  // may be null
  A* save_var;     // may be null
  const W* running_mean;  // null: no running-stat update
  const W* running_var;
  W* new_running_mean;
  W* new_running_var;
  const int64_t* num_batches_tracked;  // read when cumulative
  bool cumulative;
  A momentum;
  A count;  // n = N * S, the exact per-channel count (rounded once to A)
  double eps;

  FN_DEV void init(Acc& a) const {
    a.count = A(0);
#pragma unroll
    for (int j = 0; j < VEC; ++j) a.mean[j] = a.m2[j] = A(0);
  }
  FN_DEV A ctx(int64_t c) const {  // the shift
    const A v = to_acc(x[c * channel_stride]);
    return v - v == A(0) ? v : A(0);
  }
  FN_DEV void push(Acc& a, const T (&in)[VEC], const T (&)[VEC], const A (&shift)[VEC]) const {
    a.count += A(1);
    const A inv = A(1) / a.count;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A v = to_acc(in[j]) - shift[j];
      const A d = v - a.mean[j];
      a.mean[j] = merged_mean(a.mean[j], v, d, inv);
      a.m2[j] += d * (v - a.mean[j]);
    }
  }
  FN_DEV Part slot(const Acc& a, int j) const { return Part{a.count, a.mean[j], a.m2[j]}; }
  FN_DEV void finish(int64_t c, Part m) const {
    m.count = count;  // the merged float counts are exact only up to 2^24 (fp32)
    if (count > A(0)) m.mean += ctx(c);  // (no value to read for an empty batch)
    save_mean[c] = m.mean;
    if (save_invstd != nullptr) save_invstd[c] = moments_rstd(m, eps);
    if (save_var != nullptr) save_var[c] = moments_var(m);
    if (new_running_mean == nullptr) return;
    A rm = to_acc(running_mean[c]);
    A rv = to_acc(running_var[c]);
    if (count > A(0)) {  // an empty batch leaves the running statistics alone
      const A f = cumulative ? A(1) / static_cast<A>(*num_batches_tracked) : momentum;
      batch_norm_running_update(m, f, rm, rv);
    }
    new_running_mean[c] = from_acc<W>(rm);
    new_running_var[c] = from_acc<W>(rv);
  }
};

// Backward sums of dy (in0) and dy * (x - mean) (x: in1). finish writes the sums (stat
// dtype, for the dx pass) and dweight = invstd * sum(dy * (x - mean)), dbias = sum(dy).
template <typename T, typename W, int VEC>
struct BwdSumOp {
  using A = acc_t<T>;
  using Part = Sums<A>;
  static constexpr int kInputs = 2;
  struct Acc {
    A dy[VEC];
    A dyxmu[VEC];
  };

  const A* mean;
  const A* invstd;
  A* sum_dy;     // null: not kept
  A* sum_dyxmu;
  W* dweight;    // null: not computed
  W* dbias;

  FN_DEV void init(Acc& a) const {
#pragma unroll
    for (int j = 0; j < VEC; ++j) a.dy[j] = a.dyxmu[j] = A(0);
  }
  FN_DEV A ctx(int64_t c) const { return mean[c]; }
  FN_DEV void push(Acc& a, const T (&dy)[VEC], const T (&x)[VEC], const A (&mu)[VEC]) const {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A d = to_acc(dy[j]);
      a.dy[j] += d;
      a.dyxmu[j] += d * (to_acc(x[j]) - mu[j]);
    }
  }
  FN_DEV Part slot(const Acc& a, int j) const { return Part{a.dy[j], a.dyxmu[j]}; }
  FN_DEV void finish(int64_t c, Part s) const {
    if (sum_dy != nullptr) {
      sum_dy[c] = s.dy;
      sum_dyxmu[c] = s.dyxmu;
    }
    if (dweight != nullptr) dweight[c] = from_acc<W>(s.dyxmu * invstd[c]);
    if (dbias != nullptr) dbias[c] = from_acc<W>(s.dy);
  }
};

// ---------------------------------------------------------------------------------------
// Reduction, NCS. Block (kThreads), grid (channel blocks, splits). Split y covers planes
// [yn * pn, +pn) x vectors [ys * ps, +ps) of its channel, yn = y / ss, ys = y % ss.
struct NcsReduceGeom {
  int64_t N, C, S;
  int64_t nvs;     // vectors per plane: S / VEC
  int64_t pn, ps;  // planes and vectors per split
  int ss;          // splits along the vectors of a plane
  int splits;      // sn * ss == gridDim.y
};

template <typename T, int VEC, typename Op>
__global__ void __launch_bounds__(kThreads)
    bn_reduce_ncs_kernel(const T* __restrict__ in0, const T* __restrict__ in1, const Op op,
                         typename Op::Part* __restrict__ ws, const NcsReduceGeom g) {
  using A = typename Op::A;
  using Part = typename Op::Part;
  using PT = PartTraits<Part>;
  FN_SHARED(Part, red, [kWarps]);
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int y = static_cast<int>(blockIdx.y);
  const int64_t n_lo = static_cast<int64_t>(y / g.ss) * g.pn;
  const int64_t n_hi = n_lo + g.pn < g.N ? n_lo + g.pn : g.N;
  const int64_t s_lo = static_cast<int64_t>(y % g.ss) * g.ps;
  const int64_t s_hi = s_lo + g.ps < g.nvs ? s_lo + g.ps : g.nvs;
  const int64_t width = s_hi - s_lo;  // vectors of a plane in this split
  const bool any = n_lo < n_hi && width > 0;
  // Thread tid starts at item tid of the flat (plane, vector) sequence of the split and
  // advances by kThreads items: dn planes and dv vectors (+1 plane on wrap).
  int64_t n0 = 0, v0 = 0, dn = 0, dv = 0;
  if (any) {
    n0 = n_lo + tid / width;
    v0 = tid % width;
    dn = kThreads / width;
    dv = kThreads % width;
  }

  for (int64_t c = blockIdx.x; c < g.C; c += gridDim.x) {
    A ctx[VEC];
    {
      const A cv = op.ctx(c);
#pragma unroll
      for (int j = 0; j < VEC; ++j) ctx[j] = cv;
    }
    typename Op::Acc acc;
    op.init(acc);
    if (any) {
      int64_t n = n0, v = v0;
      while (n < n_hi) {
        T a[kUnroll][VEC], b[kUnroll][VEC];
        bool ok[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          ok[u] = n < n_hi;
          if (ok[u]) {
            const int64_t off = (n * g.C + c) * g.S + (s_lo + v) * VEC;
            load_vec<VEC>(in0 + off, a[u]);
            if constexpr (Op::kInputs > 1) load_vec<VEC>(in1 + off, b[u]);
          }
          v += dv;
          n += dn;
          if (v >= width) {
            v -= width;
            ++n;
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if (ok[u]) op.push(acc, a[u], b[u], ctx);
      }
    }
    // Slots in order, then lanes (tree), then warps (in order).
    Part part = op.slot(acc, 0);
#pragma unroll
    for (int j = 1; j < VEC; ++j) part = PT::merge(part, op.slot(acc, j));
#pragma unroll
    for (int off = 16; off > 0; off /= 2) part = PT::merge(part, PT::shfl_down(part, off));
    if (lane == 0) red[warp] = part;
    __syncthreads();
    if (tid == 0) {
      Part r = red[0];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) r = PT::merge(r, red[w]);
      if (g.splits == 1)
        op.finish(c, r);
      else
        ws[static_cast<int64_t>(y) * g.C + c] = r;
    }
    __syncthreads();  // red is rewritten by the next channel
  }
}

// Reduction, NSC. Block (bx, by) with bx * by == kThreads and bx a power of two <= 32;
// grid (channel tiles, splits). Thread (tx, ty) holds channels [(tile * bx + tx) * VEC,
// +VEC) and the rows r_lo + ty, r_lo + ty + by, ... of split y: [y * rps, +rps).
struct NscReduceGeom {
  int64_t M, C;
  int64_t nvc;    // vector columns: C / VEC
  int64_t tiles;  // ceil(nvc / bx)
  int64_t rps;    // rows per split
  int splits;     // gridDim.y
};

template <typename T, int VEC, typename Op>
__global__ void __launch_bounds__(kThreads)
    bn_reduce_nsc_kernel(const T* __restrict__ in0, const T* __restrict__ in1, const Op op,
                         typename Op::Part* __restrict__ ws, const NscReduceGeom g) {
  using A = typename Op::A;
  using Part = typename Op::Part;
  using PT = PartTraits<Part>;
  FN_SHARED(Part, red, [kWarps][32][VEC]);
  const int bx = static_cast<int>(blockDim.x);
  const int by = static_cast<int>(blockDim.y);
  const int tx = static_cast<int>(threadIdx.x);
  const int ty = static_cast<int>(threadIdx.y);
  const int tid = ty * bx + tx;
  const int lane = tid % 32;  // == tx + bx * (ty % (32 / bx))
  const int warp = tid / 32;
  const int y = static_cast<int>(blockIdx.y);
  const int64_t r_lo = static_cast<int64_t>(y) * g.rps;
  const int64_t r_hi = r_lo + g.rps < g.M ? r_lo + g.rps : g.M;

  for (int64_t tile = blockIdx.x; tile < g.tiles; tile += gridDim.x) {
    const int64_t cv = tile * bx + tx;
    const bool active = cv < g.nvc;
    const int64_t c0 = cv * VEC;
    A ctx[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) ctx[j] = active ? op.ctx(c0 + j) : A(0);
    typename Op::Acc acc;
    op.init(acc);
    if (active) {
      for (int64_t r = r_lo + ty; r < r_hi; r += static_cast<int64_t>(kUnroll) * by) {
        T a[kUnroll][VEC], b[kUnroll][VEC];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t rr = r + static_cast<int64_t>(u) * by;
          if (rr < r_hi) {
            const int64_t off = rr * g.C + c0;
            load_vec<VEC>(in0 + off, a[u]);
            if constexpr (Op::kInputs > 1) load_vec<VEC>(in1 + off, b[u]);
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if (r + static_cast<int64_t>(u) * by < r_hi) op.push(acc, a[u], b[u], ctx);
      }
    }
    // Lanes of the same channels are bx apart: tree over them, lanes < bx end with the
    // warp's parts; then the warps in order.
    Part part[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) part[j] = op.slot(acc, j);
    for (int off = 16; off >= bx; off /= 2)
#pragma unroll
      for (int j = 0; j < VEC; ++j) part[j] = PT::merge(part[j], PT::shfl_down(part[j], off));
    if (lane < bx)
#pragma unroll
      for (int j = 0; j < VEC; ++j) red[warp][lane][j] = part[j];
    __syncthreads();
    if (ty == 0 && active) {  // warp 0, lane tx
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        Part r = red[0][tx][j];
        for (int w = 1; w < kWarps; ++w) r = PT::merge(r, red[w][tx][j]);
        if (g.splits == 1)
          op.finish(c0 + j, r);
        else
          ws[static_cast<int64_t>(y) * g.C + c0 + j] = r;
      }
    }
    __syncthreads();  // red is rewritten by the next tile
  }
}

// Merge of the splits' parts ws[i * C + c], i < splits, per channel in a fixed order:
// block (fx, fy) (powers of two, fx * fy <= kThreads) holds fx channels; thread row t
// merges splits [splits * t / fy, splits * (t + 1) / fy) in order, then the rows meet in
// a fixed shared-memory tree. splits == 0 finishes every channel with an empty part.
template <typename Op>
__global__ void __launch_bounds__(kThreads)
    bn_finalize_kernel(const typename Op::Part* __restrict__ ws, int splits, int64_t C, const Op op) {
  using Part = typename Op::Part;
  using PT = PartTraits<Part>;
  FN_SHARED(Part, red, [kThreads]);
  const int fx = static_cast<int>(blockDim.x);
  const int fy = static_cast<int>(blockDim.y);
  const int tx = static_cast<int>(threadIdx.x);
  const int ty = static_cast<int>(threadIdx.y);
  const int lo = splits * ty / fy;  // splits < 65536 and ty < 256: no overflow
  const int hi = splits * (ty + 1) / fy;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * fx; base < C;
       base += static_cast<int64_t>(gridDim.x) * fx) {
    const int64_t c = base + tx;
    Part p = PT::empty();
    if (c < C)
      for (int i = lo; i < hi; ++i) p = PT::merge(p, ws[static_cast<int64_t>(i) * C + c]);
    red[ty * fx + tx] = p;
    for (int h = fy / 2; h > 0; h /= 2) {
      __syncthreads();
      if (ty < h) red[ty * fx + tx] = PT::merge(red[ty * fx + tx], red[(ty + h) * fx + tx]);
    }
    __syncthreads();
    if (ty == 0 && c < C) op.finish(c, red[tx]);
    __syncthreads();  // red is rewritten by the next channels
  }
}

// ---------------------------------------------------------------------------------------
// Elementwise ops. Interface used by the elementwise kernels:
//   A, Coef, kInputs (1: in0; 2: in0, in1), kPrologue, coef(c) -> Coef,
//   apply(Coef, a0, a1) -> A (the output in the stat dtype), prologue(c) (per channel,
//   once, when kPrologue).

// y = x * scale + shift from the batch statistics save_mean / save_invstd.
template <typename T, typename W>
struct FwdTrainEw {
  using A = acc_t<T>;
  static constexpr int kInputs = 1;
  static constexpr bool kPrologue = false;
  struct Coef {
    A scale, shift;
  };
  const A* mean;
  const A* invstd;
  const W* weight;  // may be null
  const W* bias;    // may be null
  FN_DEV Coef coef(int64_t c) const {
    const A w = weight != nullptr ? to_acc(weight[c]) : A(1);
    const A b = bias != nullptr ? to_acc(bias[c]) : A(0);
    Coef k;
    batch_norm_scale_shift(mean[c], invstd[c], w, b, k.scale, k.shift);
    return k;
  }
  FN_DEV A apply(const Coef& k, A x, A) const { return x * k.scale + k.shift; }
  FN_DEV void prologue(int64_t) const {}
};

// Eval: the same from the running statistics; the prologue writes save_mean (the running
// mean) and save_invstd = 1 / sqrt(running_var + eps), the same values coef uses.
template <typename T, typename W>
struct FwdEvalEw {
  using A = acc_t<T>;
  static constexpr int kInputs = 1;
  static constexpr bool kPrologue = true;
  struct Coef {
    A scale, shift;
  };
  const W* running_mean;
  const W* running_var;
  const W* weight;
  const W* bias;
  A* save_mean;
  A* save_invstd;
  double eps;
  FN_DEV A mean_of(int64_t c) const { return to_acc(running_mean[c]); }
  FN_DEV A invstd_of(int64_t c) const {
    return fn_rsqrt(to_acc(running_var[c]) + static_cast<A>(eps));
  }
  FN_DEV Coef coef(int64_t c) const {
    const A w = weight != nullptr ? to_acc(weight[c]) : A(1);
    const A b = bias != nullptr ? to_acc(bias[c]) : A(0);
    Coef k;
    batch_norm_scale_shift(mean_of(c), invstd_of(c), w, b, k.scale, k.shift);
    return k;
  }
  FN_DEV A apply(const Coef& k, A x, A) const { return x * k.scale + k.shift; }
  FN_DEV void prologue(int64_t c) const {
    save_mean[c] = mean_of(c);
    save_invstd[c] = invstd_of(c);
  }
};

// Training dx from dy (in0) and x (in1) with the channel sums of the reduction, over n
// values per channel, or *count (device memory) when count is non-null.
template <typename T, typename W>
struct BwdTrainEw {
  using A = acc_t<T>;
  static constexpr int kInputs = 2;
  static constexpr bool kPrologue = false;
  struct Coef {
    A mean, a, k, mean_dy;
  };
  const A* mean;
  const A* invstd;
  const W* weight;  // may be null
  const A* sum_dy;
  const A* sum_dyxmu;
  A n;  // N * S
  const int64_t* count;  // may be null
  FN_DEV Coef coef(int64_t c) const {
    const A is = invstd[c];
    const A w = weight != nullptr ? to_acc(weight[c]) : A(1);
    const A nc = count != nullptr ? static_cast<A>(*count) : n;
    Coef k;
    k.mean = mean[c];
    k.a = is * w;
    k.k = is * is * sum_dyxmu[c] / nc;
    k.mean_dy = sum_dy[c] / nc;
    return k;
  }
  FN_DEV A apply(const Coef& k, A dy, A x) const {
    return batch_norm_dx(dy, x, k.mean, k.a, k.k, k.mean_dy);
  }
  FN_DEV void prologue(int64_t) const {}
};

// Eval dx = dy * invstd * weight (dy: in0).
template <typename T, typename W>
struct BwdEvalEw {
  using A = acc_t<T>;
  static constexpr int kInputs = 1;
  static constexpr bool kPrologue = false;
  struct Coef {
    A a;
  };
  const A* invstd;
  const W* weight;  // may be null
  FN_DEV Coef coef(int64_t c) const {
    const A w = weight != nullptr ? to_acc(weight[c]) : A(1);
    return Coef{invstd[c] * w};
  }
  FN_DEV A apply(const Coef& k, A dy, A) const { return dy * k.a; }
  FN_DEV void prologue(int64_t) const {}
};

// ---------------------------------------------------------------------------------------
// Elementwise, NCS: total = N * C * S elements as nvec = total / VEC vectors and a scalar
// tail. VEC > 1 only when every pointer is 16-byte aligned and S >= VEC, so a vector
// spans at most two planes.
struct NcsEwGeom {
  int64_t total, nvec, C, S;
  int64_t ds, dc;  // a thread's next vector: ds elements further in the plane, dc channels
                   // further (+1 on wrap); from the grid stride in elements
};

template <typename T, int VEC, typename Op>
__global__ void __launch_bounds__(kThreads)
    bn_ew_ncs_kernel(const T* __restrict__ in0, const T* __restrict__ in1, T* out, const Op op,
                     const NcsEwGeom g) {
  using A = typename Op::A;
  using Coef = typename Op::Coef;
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if constexpr (Op::kPrologue) {
#pragma unroll 1
    for (int64_t c = gid; c < g.C; c += stride) op.prologue(c);
  }

  if (gid < g.nvec) {
    // Cursor of vector v: element v * VEC is at position s of the plane of channel c.
    int64_t s, c;
    {
      const int64_t e0 = gid * VEC;
      const int64_t plane = e0 / g.S;
      s = e0 - plane * g.S;
      c = plane % g.C;
    }
    const int64_t ds = g.ds;
    const int64_t dc = g.dc;
    int64_t cached = -1;
    Coef kc{};
    for (int64_t v = gid; v < g.nvec; v += static_cast<int64_t>(kUnroll) * stride) {
      T a[kUnroll][VEC], b[kUnroll][VEC];
      int64_t su[kUnroll], cu[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t vv = v + u * stride;
        su[u] = s;
        cu[u] = c;
        if (vv < g.nvec) {
          load_vec<VEC>(in0 + vv * VEC, a[u]);
          if constexpr (Op::kInputs > 1) load_vec<VEC>(in1 + vv * VEC, b[u]);
        }
        s += ds;
        c += dc;
        if (s >= g.S) {
          s -= g.S;
          ++c;
        }
        if (c >= g.C) c -= g.C;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t vv = v + u * stride;
        if (vv >= g.nvec) continue;
        if (cu[u] != cached) {
          kc = op.coef(cu[u]);
          cached = cu[u];
        }
        T o[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const A in1v = Op::kInputs > 1 ? to_acc(b[u][j]) : A(0);
          o[j] = from_acc<T>(op.apply(kc, to_acc(a[u][j]), in1v));
        }
        // A vector crossing a plane end: elements [split, VEC) are in the next channel.
        if (VEC > 1 && su[u] + VEC > g.S) {
          const int split = static_cast<int>(g.S - su[u]);
          const Coef kb = op.coef(cu[u] + 1 == g.C ? 0 : cu[u] + 1);
#pragma unroll
          for (int j = 1; j < VEC; ++j) {
            if (j < split) continue;
            const A in1v = Op::kInputs > 1 ? to_acc(b[u][j]) : A(0);
            o[j] = from_acc<T>(op.apply(kb, to_acc(a[u][j]), in1v));
          }
        }
        store_vec<VEC>(out + vv * VEC, o);
      }
    }
  }
  // Scalar tail: the last total % VEC (< VEC <= S) elements, all in the last plane,
  // whose channel is C - 1.
  if constexpr (VEC > 1) {
    const int64_t e = g.nvec * VEC + gid;
    if (gid < VEC && e < g.total) {
      const Coef k = op.coef(g.C - 1);
      const A in1v = Op::kInputs > 1 ? to_acc(in1[e]) : A(0);
      out[e] = from_acc<T>(op.apply(k, to_acc(in0[e]), in1v));
    }
  }
}

// Elementwise, NSC: total = M * C elements as nvec = total / VEC vectors and a scalar
// tail. The host makes stride * VEC a multiple of C, or stride >= nvec, so the channels
// of a thread's vectors are always (gid * VEC + j) % C.
struct NscEwGeom {
  int64_t total, nvec, C;
};

template <typename T, int VEC, typename Op>
__global__ void __launch_bounds__(kThreads)
    bn_ew_nsc_kernel(const T* __restrict__ in0, const T* __restrict__ in1, T* out, const Op op,
                     const NscEwGeom g) {
  using A = typename Op::A;
  using Coef = typename Op::Coef;
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if constexpr (Op::kPrologue) {
#pragma unroll 1
    for (int64_t c = gid; c < g.C; c += stride) op.prologue(c);
  }

  if (gid < g.nvec) {
    Coef k[VEC];
    {
      int64_t c = (gid * VEC) % g.C;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        k[j] = op.coef(c);
        if (++c == g.C) c = 0;
      }
    }
    for (int64_t v = gid; v < g.nvec; v += static_cast<int64_t>(kUnroll) * stride) {
      T a[kUnroll][VEC], b[kUnroll][VEC];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t vv = v + u * stride;
        if (vv < g.nvec) {
          load_vec<VEC>(in0 + vv * VEC, a[u]);
          if constexpr (Op::kInputs > 1) load_vec<VEC>(in1 + vv * VEC, b[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t vv = v + u * stride;
        if (vv >= g.nvec) continue;
        T o[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const A in1v = Op::kInputs > 1 ? to_acc(b[u][j]) : A(0);
          o[j] = from_acc<T>(op.apply(k[j], to_acc(a[u][j]), in1v));
        }
        store_vec<VEC>(out + vv * VEC, o);
      }
    }
  }
  if constexpr (VEC > 1) {
    const int64_t e = g.nvec * VEC + gid;
    if (gid < VEC && e < g.total) {
      const Coef k = op.coef(e % g.C);
      const A in1v = Op::kInputs > 1 ? to_acc(in1[e]) : A(0);
      out[e] = from_acc<T>(op.apply(k, to_acc(in0[e]), in1v));
    }
  }
}

}  // namespace bn_cuda
}  // namespace fused_norm
