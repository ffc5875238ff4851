// CUDA LayerNorm kernels. Rows of `cols` contiguous elements at a row stride; one row
// is handled by a group of threads, in three tiers chosen by the row length:
//
//  * resident, warp groups (GROUP = 1..32 lanes per row, several rows per block): the row
//    lives in registers, reductions are shuffle butterflies inside the group;
//  * resident, block per row (GROUP == 0): the row lives in the registers of one block,
//    reductions go through shared memory;
//    both resident tiers read x (and dy) from memory once and compute exact two-pass
//    statistics (the mean, then the sum of squared deviations) over the registers;
//  * streaming, block per row: rows too long for the registers. Each thread merges the
//    exact moments of its vectors with Chan's formula, the block merges the threads'
//    moments in a fixed order, and a second sweep re-reads x to write y.
//
// Residual add (add_layer_norm / add_rms_norm, params.h): the rows normalized are
// s = x + residual, formed as the rows are read (Rows below) and rounded to the sum's
// storage type S; the forward stores s (the new residual) in the same sweep that reads
// it, unless it is not wanted (post-norm); the streaming tier forms s again in its second
// sweep rather than reading back what it stored. The backward forms s the same way from
// input and residual (post-norm) or reads the stored one, adds the new residual's
// gradient to dx as it writes it, and writes that dx in the residual's dtype too when it
// differs from the input's. Without a residual, R = S = T and x is read as it is.
//
// RMSNorm (p.rms, params.h) runs the same kernels: the resident tiers skip the mean (0)
// and its reduction, the streaming tier takes mean(x^2) from the merged moments
// (moments_rms_rstd); the weight gets p.weight_offset added, and the backward drops the
// sum(g) term.
//
// Accesses are vectors of VEC elements (16 bytes when the host found every pointer and
// row stride aligned for it, else VEC == 1) and scalar where a vector would cross the
// end of the row. Every reduction has a fixed order, so results are bitwise
// reproducible. The backward's dweight/dbias are column sums without atomics: each
// block accumulates its rows into fp32 (fp64) partial rows in the workspace, and
// ln_bwd_param_reduce_kernel adds the partial rows in a fixed order.
#pragma once
#include <cstdint>

#include "common.cuh"

namespace fused_norm {
namespace ln_cuda {

using namespace cuda_common;

constexpr int kWarpTierThreads = 128;     // block size of the warp-group tier
constexpr int kBlockTierMaxThreads = 512;  // largest block of the block-per-row tier
constexpr int kStreamThreads = 512;        // block size of the streaming tier
constexpr int kReduceCols = 32;            // param reduction: columns per block
constexpr int kReduceSlices = 8;           // param reduction: slices of partial rows

// ---------------------------------------------------------------------------------------
// N storage values of type T held in registers, 16-bit types packed two per 32-bit
// register (as separate values they would take a register each). get(j) widens element
// j to the accumulation type; put(j, a) narrows into it and must be called for j = 0,
// 1, ..., N-1 in order. load/store move the N elements at p (aligned as for load_vec);
// the _slot versions take the number n (any value) of those elements that lie inside
// the row: one vector access when all do, element accesses otherwise, and elements past
// the row read as zero.
template <typename T, int N, bool kPacked = sizeof(T) == 2 && N % 2 == 0>
struct Vec {
  T v[N];
  FN_DEV acc_t<T> get(int j) const { return to_acc(v[j]); }
  FN_DEV void put(int j, acc_t<T> a) { v[j] = from_acc<T>(a); }
  FN_DEV void load(const T* p) { load_vec<N>(p, v); }
  FN_DEV void store(T* p) const { store_vec<N>(p, v); }
  FN_DEV void load_slot(const T* p, int n) {
    if (n >= N) {
      load(p);
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j) v[j] = j < n ? p[j] : from_acc<T>(acc_t<T>(0));
    }
  }
  FN_DEV void store_slot(T* p, int n) const {
    if (n >= N) {
      store(p);
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j)
        if (j < n) p[j] = v[j];
    }
  }
};

template <typename T, int N>
struct Vec<T, N, true> {
  uint32_t u[N / 2];
  FN_DEV float get(int j) const { return j % 2 ? Bits<T>::hi(u[j / 2]) : Bits<T>::lo(u[j / 2]); }
  FN_DEV void put(int j, float a) {
    const uint32_t b = Bits<T>::of(from_acc<T>(a));
    u[j / 2] = j % 2 ? u[j / 2] | (b << 16) : b;
  }
  FN_DEV void load(const T* p) { load_vec<N / 2>(reinterpret_cast<const uint32_t*>(p), u); }
  FN_DEV void store(T* p) const { store_vec<N / 2>(reinterpret_cast<uint32_t*>(p), u); }
  FN_DEV void load_slot(const T* p, int n) {
    if (n >= N) {
      load(p);
    } else {
#pragma unroll
      for (int i = 0; i < N / 2; ++i)
        u[i] = (2 * i < n ? Bits<T>::of(p[2 * i]) : 0u) | (2 * i + 1 < n ? Bits<T>::of(p[2 * i + 1]) << 16 : 0u);
    }
  }
  FN_DEV void store_slot(T* p, int n) const {
    if (n >= N) {
      store(p);
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j)
        if (j < n) p[j] = Bits<T>::make(j % 2 ? u[j / 2] >> 16 : u[j / 2]);
    }
  }
};

// ---------------------------------------------------------------------------------------
// The rows a kernel normalizes: x itself, whose storage type is then S (T in the forward,
// the stored sum's type in the backward), or, with a residual, x (T) + residual (R),
// added in the accumulation type and rounded to S.
template <typename T, typename R, typename S>
struct Rows {
  const void* x;
  const R* res;  // null: no residual
  int64_t x_rs;
  int64_t r_rs;

  // The VEC elements of row `row` from column c, as Vec::load_slot (n of them in the row).
  template <int VEC>
  FN_DEV void load_slot(Vec<S, VEC>& v, int64_t row, int64_t c, int n) const {
    if (res == nullptr) {
      v.load_slot(static_cast<const S*>(x) + row * x_rs + c, n);
      return;
    }
    Vec<T, VEC> a;
    Vec<R, VEC> b;
    a.load_slot(static_cast<const T*>(x) + row * x_rs + c, n);
    b.load_slot(res + row * r_rs + c, n);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v.put(j, a.get(j) + b.get(j));
  }
  // Whole vectors only.
  template <int VEC>
  FN_DEV void load(Vec<S, VEC>& v, int64_t row, int64_t c) const {
    load_slot(v, row, c, VEC);
  }
  // One element, widened.
  FN_DEV acc_t<S> at(int64_t row, int64_t c) const {
    if (res == nullptr) return to_acc(static_cast<const S*>(x)[row * x_rs + c]);
    return to_acc(from_acc<S>(to_acc(static_cast<const T*>(x)[row * x_rs + c]) + to_acc(res[row * r_rs + c])));
  }
};

template <typename T, typename R, typename S, typename P>
FN_DEV Rows<T, R, S> rows_of(const P& p) {
  return Rows<T, R, S>{p.x, static_cast<const R*>(p.residual), p.x_row_stride, p.residual_row_stride};
}

// ---------------------------------------------------------------------------------------
// Row reductions. Sums of N values over the threads sharing a row: a shuffle butterfly
// inside an aligned group of GROUP lanes (GROUP <= 32), or over the block (GROUP == 0).
// Every thread ends with the same bits: a butterfly partner adds the same two values
// (a + b == b + a exactly), and in the block version every thread adds the warps'
// sums in warp order. The block version alternates between two shared buffers, so one
// barrier per call suffices: a buffer is rewritten two calls later, after a barrier
// that every thread reaches only once it has read that buffer.
template <int GROUP, typename A, int N>
struct RowReduce {
  FN_DEV void sum(A (&v)[N]) {
#pragma unroll
    for (int off = GROUP / 2; off > 0; off /= 2)
#pragma unroll
      for (int i = 0; i < N; ++i) v[i] += __shfl_xor_sync(0xffffffffu, v[i], off);
  }
};

template <typename A, int N>
struct RowReduce<0, A, N> {
  int phase = 0;
  FN_DEV void sum(A (&v)[N]) {
    FN_SHARED(A, buf, [2][N][32]);
    RowReduce<32, A, N>().sum(v);
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) {
#pragma unroll
      for (int i = 0; i < N; ++i) buf[phase][i][warp] = v[i];
    }
    __syncthreads();
    const int warps = blockDim.x / 32;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      A s = buf[phase][i][0];
      for (int w = 1; w < warps; ++w) s += buf[phase][i][w];
      v[i] = s;
    }
    phase ^= 1;
  }
};

// Chan merge of every thread's moments over the block, in a fixed tree order inside each
// warp and warp order across warps; every thread gets the same result. Same two-buffer
// scheme as RowReduce<0>.
template <typename A>
struct BlockMoments {
  int phase = 0;
  FN_DEV Moments<A> merge(Moments<A> m) {
    FN_SHARED(Moments<A>, buf, [2][32]);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      Moments<A> o;
      o.count = __shfl_down_sync(0xffffffffu, m.count, off);
      o.mean = __shfl_down_sync(0xffffffffu, m.mean, off);
      o.m2 = __shfl_down_sync(0xffffffffu, m.m2, off);
      m = moments_merge(m, o);  // lane 0 ends with the warp's moments
    }
    if (threadIdx.x % 32 == 0) buf[phase][threadIdx.x / 32] = m;
    __syncthreads();
    const int warps = blockDim.x / 32;
    Moments<A> r = buf[phase][0];
    for (int w = 1; w < warps; ++w) r = moments_merge(r, buf[phase][w]);
    phase ^= 1;
    return r;
  }
};

// ---------------------------------------------------------------------------------------
// Forward, resident tiers. A group of `gsize` threads holds a row: thread `lane` holds the
// vectors lane, lane + gsize, ..., NV of them, as storage values. Warp tier: blocks of
// kWarpTierThreads threads, 128/GROUP groups, each group a row. Block tier: one row per
// block of blockDim.x (a multiple of 32) threads. Grid-stride over rows; the loop bound
// is uniform over the block. The row is held as S values (the sum, with a residual).
template <typename T, typename W, typename R, typename S, int VEC, int NV, int GROUP>
__global__ void __launch_bounds__(GROUP > 0 ? kWarpTierThreads : kBlockTierMaxThreads, GROUP > 0 ? 4 : 1)
    ln_fwd_resident_kernel(const LayerNormFwdParams p) {
  using A = acc_t<T>;
  const Rows<T, R, S> src = rows_of<T, R, S>(p);
  S* __restrict__ sum = static_cast<S*>(p.sum);
  const W* __restrict__ w = static_cast<const W*>(p.weight);
  const W* __restrict__ b = static_cast<const W*>(p.bias);
  T* __restrict__ y = static_cast<T*>(p.y);
  A* __restrict__ mean_out = static_cast<A*>(p.mean);
  A* __restrict__ rstd_out = static_cast<A*>(p.rstd);
  const int cols = static_cast<int>(p.cols);
  const int gsize = GROUP > 0 ? GROUP : static_cast<int>(blockDim.x);
  const int lane = static_cast<int>(threadIdx.x) % gsize;
  const int rows_per_block = static_cast<int>(blockDim.x) / gsize;
  const int group = static_cast<int>(threadIdx.x) / gsize;
  const A woff = static_cast<A>(p.weight_offset);
  RowReduce<GROUP, A, 1> reduce;

  for (int64_t base = static_cast<int64_t>(blockIdx.x) * rows_per_block; base < p.rows;
       base += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t row = base + group;
    const bool valid = row < p.rows;
    Vec<S, VEC> v[NV];
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int c = (k * gsize + lane) * VEC;
      const int n = valid ? cols - c : 0;
      src.load_slot(v[k], valid ? row : 0, c, n);
      if (sum && n > 0) v[k].store_slot(sum + row * p.sum_row_stride + c, n);
    }
    A mean = A(0);
    if (!p.rms) {  // uniform over the block
      A s[1] = {A(0)};
#pragma unroll
      for (int k = 0; k < NV; ++k)
#pragma unroll
        for (int j = 0; j < VEC; ++j) s[0] += v[k].get(j);
      reduce.sum(s);
      mean = s[0] / static_cast<A>(cols);
    }
    A q[1] = {A(0)};
#pragma unroll
    for (int k = 0; k < NV; ++k)
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const A d = v[k].get(j) - mean;
        if ((k * gsize + lane) * VEC + j < cols) q[0] += d * d;
      }
    reduce.sum(q);
    const A rstd = moments_rstd(Moments<A>{static_cast<A>(cols), mean, q[0]}, p.eps);
    if (!valid) continue;  // only the last iteration of a warp-tier loop has invalid rows
    if (lane == 0) {
      if (mean_out) mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
    T* yr = y + row * p.y_row_stride;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int c = (k * gsize + lane) * VEC;
      const int n = cols - c;
      if (n <= 0) continue;
      Vec<W, VEC> wv, bv;
      if (w) wv.load_slot(w + c, n);
      if (b) bv.load_slot(b + c, n);
      Vec<T, VEC> o;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        A t = (v[k].get(j) - mean) * rstd;
        if (p.round_xhat) t = to_acc(from_acc<T>(t));
        if (w) t *= wv.get(j) + woff;
        if (b) t += bv.get(j);
        o.put(j, t);
      }
      o.store_slot(yr + c, n);
    }
  }
}

// Forward, streaming tier: one row per block of kStreamThreads threads. Thread t owns the
// vectors t, t + blockDim, ... (U1 in flight in the first sweep, U2 in the second, which
// also loads the parameters); the last cols % VEC elements are done element-wise.
template <typename T, typename W, typename R, typename S, int VEC>
__global__ void __launch_bounds__(kStreamThreads, 1) ln_fwd_stream_kernel(const LayerNormFwdParams p) {
  using A = acc_t<T>;
  constexpr int U1 = 4;
  constexpr int U2 = 2;
  const Rows<T, R, S> src = rows_of<T, R, S>(p);
  const W* __restrict__ w = static_cast<const W*>(p.weight);
  const W* __restrict__ b = static_cast<const W*>(p.bias);
  T* __restrict__ y = static_cast<T*>(p.y);
  const int64_t cols = p.cols;
  const int64_t vec_end = cols / VEC * VEC;  // elements covered by whole vectors
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;
  const int64_t first = static_cast<int64_t>(threadIdx.x) * VEC;
  const A woff = static_cast<A>(p.weight_offset);
  BlockMoments<A> block_moments;

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    S* sumr = p.sum ? static_cast<S*>(p.sum) + row * p.sum_row_stride : nullptr;
    Moments<A> m = moments_empty<A>();
#pragma unroll 1
    for (int64_t c0 = first; c0 < vec_end; c0 += U1 * step) {
      Vec<S, VEC> v[U1];
#pragma unroll
      for (int u = 0; u < U1; ++u) {
        const int64_t c = c0 + u * step;
        if (c >= vec_end) break;
        src.load(v[u], row, c);
        if (sumr) v[u].store(sumr + c);
      }
#pragma unroll
      for (int u = 0; u < U1; ++u) {
        if (c0 + u * step >= vec_end) break;
        A s = 0;
#pragma unroll
        for (int j = 0; j < VEC; ++j) s += v[u].get(j);
        const A mu = s * (A(1) / A(VEC));  // exact: VEC is a power of two
        A q = 0;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const A d = v[u].get(j) - mu;
          q += d * d;
        }
        m = moments_merge(m, Moments<A>{A(VEC), mu, q});
      }
    }
    for (int64_t c = vec_end + threadIdx.x; c < cols; c += blockDim.x) {
      const A s = src.at(row, c);
      if (sumr) sumr[c] = from_acc<S>(s);
      moments_push(m, s);
    }
    m = block_moments.merge(m);
    const A mean = p.rms ? A(0) : m.mean;
    const A rstd = p.rms ? moments_rms_rstd(m, p.eps) : moments_rstd(m, p.eps);
    if (threadIdx.x == 0) {
      if (p.mean) static_cast<A*>(p.mean)[row] = mean;
      static_cast<A*>(p.rstd)[row] = rstd;
    }

    // The rows again, from x (and the residual), which are read-only: reading back the
    // stored sum in the same kernel would need loads that bypass the read-only cache.
    T* yr = y + row * p.y_row_stride;
#pragma unroll 1
    for (int64_t c0 = first; c0 < vec_end; c0 += U2 * step) {
      Vec<S, VEC> v[U2];
      Vec<W, VEC> wv[U2], bv[U2];
#pragma unroll
      for (int u = 0; u < U2; ++u) {
        const int64_t c = c0 + u * step;
        if (c >= vec_end) break;
        src.load(v[u], row, c);
        if (w) wv[u].load(w + c);
        if (b) bv[u].load(b + c);
      }
#pragma unroll
      for (int u = 0; u < U2; ++u) {
        const int64_t c = c0 + u * step;
        if (c >= vec_end) break;
        Vec<T, VEC> o;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          A t = (v[u].get(j) - mean) * rstd;
          if (p.round_xhat) t = to_acc(from_acc<T>(t));
          if (w) t *= wv[u].get(j) + woff;
          if (b) t += bv[u].get(j);
          o.put(j, t);
        }
        o.store(yr + c);
      }
    }
    for (int64_t c = vec_end + threadIdx.x; c < cols; c += blockDim.x) {
      A t = (src.at(row, c) - mean) * rstd;
      if (p.round_xhat) t = to_acc(from_acc<T>(t));
      if (w) t *= to_acc(w[c]) + woff;
      if (b) t += to_acc(b[c]);
      yr[c] = from_acc<T>(t);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Backward, resident tiers (same groups as the forward). Per row: x and dy are read once
// into registers; the first sweep computes sum(g) and sum(g * xhat) and adds dy * xhat
// and dy into per-thread column accumulators (a thread keeps the same columns for every
// row); the second writes dx. At the end, the block writes its partial dweight/dbias
// rows into the workspace: ws[blockIdx.x] and ws[gridDim.x + blockIdx.x], rows of ws_ld
// elements. In the warp tier the block's groups hold partial sums of the same columns;
// they are added in group order through shared memory (rows_per_block * cols values).
template <typename T, typename W, typename R, typename S, int VEC, int NV, int GROUP>
__global__ void __launch_bounds__(GROUP > 0 ? kWarpTierThreads : kBlockTierMaxThreads, GROUP > 0 ? 4 : 1)
    ln_bwd_resident_kernel(const LayerNormBwdParams p, acc_t<T>* __restrict__ ws, int64_t ws_ld) {
  using A = acc_t<T>;
  const Rows<T, R, S> src = rows_of<T, R, S>(p);
  const S* __restrict__ dsum = static_cast<const S*>(p.dsum);
  R* __restrict__ dres = static_cast<R*>(p.dresidual);
  const T* __restrict__ dy = static_cast<const T*>(p.dy);
  const W* __restrict__ w = static_cast<const W*>(p.weight);
  const A* __restrict__ mean_in = static_cast<const A*>(p.mean);
  const A* __restrict__ rstd_in = static_cast<const A*>(p.rstd);
  T* __restrict__ dx = static_cast<T*>(p.dx);
  const int cols = static_cast<int>(p.cols);
  const int gsize = GROUP > 0 ? GROUP : static_cast<int>(blockDim.x);
  const int lane = static_cast<int>(threadIdx.x) % gsize;
  const int rows_per_block = static_cast<int>(blockDim.x) / gsize;
  const int group = static_cast<int>(threadIdx.x) / gsize;
  const A inv_cols = A(1) / static_cast<A>(cols);
  const A woff = static_cast<A>(p.weight_offset);
  const bool partials = ws != nullptr;
  RowReduce<GROUP, A, 2> reduce;
  A dw_acc[NV][VEC], db_acc[NV][VEC];
#pragma unroll
  for (int k = 0; k < NV; ++k)
#pragma unroll
    for (int j = 0; j < VEC; ++j) dw_acc[k][j] = db_acc[k][j] = A(0);

  for (int64_t base = static_cast<int64_t>(blockIdx.x) * rows_per_block; base < p.rows;
       base += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t row = base + group;
    const bool valid = row < p.rows;
    const T* dyr = dy + (valid ? row : 0) * p.dy_row_stride;
    // Invalid rows and columns past the row read x = dy = 0 and add nothing below.
    Vec<S, VEC> xv[NV];
    Vec<T, VEC> dv[NV];
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int c = (k * gsize + lane) * VEC;
      src.load_slot(xv[k], valid ? row : 0, c, valid ? cols - c : 0);
      dv[k].load_slot(dyr + c, valid ? cols - c : 0);
    }
    const A mean = valid && mean_in ? mean_in[row] : A(0);
    const A rstd = valid ? rstd_in[row] : A(0);
    A s[2] = {A(0), A(0)};  // sum(g), sum(g * xhat)
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int c = (k * gsize + lane) * VEC;
      Vec<W, VEC> wv;
      if (w) wv.load_slot(w + c, cols - c);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const A xh = (xv[k].get(j) - mean) * rstd;
        const A d = dv[k].get(j);
        const A g = w ? d * (wv.get(j) + woff) : d;
        s[0] += g;
        s[1] += g * xh;
        if (partials) {
          dw_acc[k][j] += d * xh;
          db_acc[k][j] += d;
        }
      }
    }
    reduce.sum(s);
    const A c1 = s[1] * inv_cols;
    const A c2 = p.rms ? A(0) : s[0] * inv_cols;
    if (!valid) continue;  // only the last iteration of a warp-tier loop has invalid rows
    T* dxr = dx + row * p.dx_row_stride;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int c = (k * gsize + lane) * VEC;
      const int n = cols - c;
      if (n <= 0) continue;
      Vec<W, VEC> wv;
      if (w) wv.load_slot(w + c, n);
      Vec<S, VEC> dsv;
      if (dsum) dsv.load_slot(dsum + row * p.dsum_row_stride + c, n);
      Vec<T, VEC> o;
      Vec<R, VEC> ro;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const A xh = (xv[k].get(j) - mean) * rstd;
        const A d = dv[k].get(j);
        const A g = w ? d * (wv.get(j) + woff) : d;
        A t = layer_norm_dx(g, xh, rstd, c1, c2);
        if (dsum) t += dsv.get(j);
        o.put(j, t);
        if (dres) ro.put(j, t);
      }
      o.store_slot(dxr + c, n);
      if (dres) ro.store_slot(dres + row * p.dresidual_row_stride + c, n);
    }
  }
  if (!partials) return;

  A* ws_w = ws + static_cast<int64_t>(blockIdx.x) * ws_ld;
  A* ws_b = ws + static_cast<int64_t>(gridDim.x + blockIdx.x) * ws_ld;
  if constexpr (GROUP > 0) {
    FN_DYNAMIC_SHARED(ln_smem);
    A* part = reinterpret_cast<A*>(ln_smem);  // [rows_per_block][cols]
#pragma unroll
    for (int which = 0; which < 2; ++which) {
      if (which) __syncthreads();  // every thread has read the dweight sums
#pragma unroll
      for (int k = 0; k < NV; ++k)
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const int c = (k * GROUP + lane) * VEC + j;
          if (c < cols) part[group * cols + c] = which ? db_acc[k][j] : dw_acc[k][j];
        }
      __syncthreads();
      A* out = which ? ws_b : ws_w;
      for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        A t = part[c];
        for (int g = 1; g < rows_per_block; ++g) t += part[g * cols + c];
        out[c] = t;
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int c = (k * gsize + lane) * VEC;
      Vec<A, VEC> pw, pb;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        pw.put(j, dw_acc[k][j]);
        pb.put(j, db_acc[k][j]);
      }
      pw.store_slot(ws_w + c, cols - c);
      pb.store_slot(ws_b + c, cols - c);
    }
  }
}

// Backward, streaming tier: one row per block, two sweeps over x and dy (the first for
// the row sums, the second for dx). The block adds dy * xhat and dy into its own
// workspace rows ws[blockIdx.x] and ws[gridDim.x + blockIdx.x] (stored by its first row,
// read-modify-written by the next ones, each column always by the same thread).
template <typename T, typename W, typename R, typename S, int VEC>
__global__ void __launch_bounds__(kStreamThreads, 1)
    ln_bwd_stream_kernel(const LayerNormBwdParams p, acc_t<T>* __restrict__ ws, int64_t ws_ld) {
  using A = acc_t<T>;
  // Vectors in flight per thread, first sweep: fewer for float rows of a 16-bit input
  // (the residual forms), whose registers would spill at 4.
  constexpr int U1 = sizeof(S) > sizeof(T) ? 2 : 4;
  constexpr int U2 = 1;  // second sweep, which also moves the partial rows (more spills)
  const Rows<T, R, S> src = rows_of<T, R, S>(p);
  const T* __restrict__ dy = static_cast<const T*>(p.dy);
  const W* __restrict__ w = static_cast<const W*>(p.weight);
  T* __restrict__ dx = static_cast<T*>(p.dx);
  const int64_t cols = p.cols;
  const int64_t vec_end = cols / VEC * VEC;  // elements covered by whole vectors
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;
  const int64_t first_col = static_cast<int64_t>(threadIdx.x) * VEC;
  const A inv_cols = A(1) / static_cast<A>(cols);
  const A woff = static_cast<A>(p.weight_offset);
  A* ws_w = ws ? ws + static_cast<int64_t>(blockIdx.x) * ws_ld : nullptr;
  A* ws_b = ws ? ws + static_cast<int64_t>(gridDim.x + blockIdx.x) * ws_ld : nullptr;
  RowReduce<0, A, 2> reduce;

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const bool first = row == blockIdx.x;
    const T* dyr = dy + row * p.dy_row_stride;
    const S* dsr = p.dsum ? static_cast<const S*>(p.dsum) + row * p.dsum_row_stride : nullptr;
    R* dresr = p.dresidual ? static_cast<R*>(p.dresidual) + row * p.dresidual_row_stride : nullptr;
    const A mean = p.mean ? static_cast<const A*>(p.mean)[row] : A(0);
    const A rstd = static_cast<const A*>(p.rstd)[row];
    A s[2] = {A(0), A(0)};  // sum(g), sum(g * xhat)
#pragma unroll 1
    for (int64_t c0 = first_col; c0 < vec_end; c0 += U1 * step) {
      Vec<S, VEC> xv[U1];
      Vec<T, VEC> dv[U1];
      Vec<W, VEC> wv[U1];
#pragma unroll
      for (int u = 0; u < U1; ++u) {
        const int64_t c = c0 + u * step;
        if (c >= vec_end) break;
        src.load(xv[u], row, c);
        dv[u].load(dyr + c);
        if (w) wv[u].load(w + c);
      }
#pragma unroll
      for (int u = 0; u < U1; ++u) {
        if (c0 + u * step >= vec_end) break;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const A d = dv[u].get(j);
          const A g = w ? d * (wv[u].get(j) + woff) : d;
          s[0] += g;
          s[1] += g * ((xv[u].get(j) - mean) * rstd);
        }
      }
    }
    for (int64_t c = vec_end + threadIdx.x; c < cols; c += blockDim.x) {
      const A d = to_acc(dyr[c]);
      const A g = w ? d * (to_acc(w[c]) + woff) : d;
      s[0] += g;
      s[1] += g * ((src.at(row, c) - mean) * rstd);
    }
    reduce.sum(s);
    const A c1 = s[1] * inv_cols;
    const A c2 = p.rms ? A(0) : s[0] * inv_cols;

    T* dxr = dx + row * p.dx_row_stride;
#pragma unroll 1
    for (int64_t c0 = first_col; c0 < vec_end; c0 += U2 * step) {
      Vec<S, VEC> xv[U2], dsv[U2];
      Vec<T, VEC> dv[U2];
      Vec<W, VEC> wv[U2];
      Vec<A, VEC> pw[U2], pb[U2];
#pragma unroll
      for (int u = 0; u < U2; ++u) {
        const int64_t c = c0 + u * step;
        if (c >= vec_end) break;
        src.load(xv[u], row, c);
        dv[u].load(dyr + c);
        if (w) wv[u].load(w + c);
        if (dsr) dsv[u].load(dsr + c);
        if (ws && !first) {
          pw[u].load(ws_w + c);
          pb[u].load(ws_b + c);
        }
      }
#pragma unroll
      for (int u = 0; u < U2; ++u) {
        const int64_t c = c0 + u * step;
        if (c >= vec_end) break;
        Vec<T, VEC> o;
        Vec<R, VEC> ro;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const A xh = (xv[u].get(j) - mean) * rstd;
          const A d = dv[u].get(j);
          const A g = w ? d * (wv[u].get(j) + woff) : d;
          A t = layer_norm_dx(g, xh, rstd, c1, c2);
          if (dsr) t += dsv[u].get(j);
          o.put(j, t);
          if (dresr) ro.put(j, t);
          pw[u].v[j] = first ? d * xh : pw[u].v[j] + d * xh;
          pb[u].v[j] = first ? d : pb[u].v[j] + d;
        }
        o.store(dxr + c);
        if (dresr) ro.store(dresr + c);
        if (ws) {
          pw[u].store(ws_w + c);
          pb[u].store(ws_b + c);
        }
      }
    }
    for (int64_t c = vec_end + threadIdx.x; c < cols; c += blockDim.x) {
      const A xh = (src.at(row, c) - mean) * rstd;
      const A d = to_acc(dyr[c]);
      const A g = w ? d * (to_acc(w[c]) + woff) : d;
      A t = layer_norm_dx(g, xh, rstd, c1, c2);
      if (dsr) t += to_acc(dsr[c]);
      dxr[c] = from_acc<T>(t);
      if (dresr) dresr[c] = from_acc<R>(t);
      if (ws) {
        ws_w[c] = first ? d * xh : ws_w[c] + d * xh;
        ws_b[c] = first ? d : ws_b[c] + d;
      }
    }
  }
}

// dweight/dbias from the partial rows: block (kReduceCols, kReduceSlices) covers
// kReduceCols columns; slice t adds the partial rows [parts*t/S, parts*(t+1)/S) in order,
// then the slices' sums are added in slice order. ws holds `parts` dweight partial rows
// followed by `parts` dbias partial rows, ws_ld elements apart.
template <typename A, typename W>
__global__ void __launch_bounds__(kReduceCols * kReduceSlices)
    ln_bwd_param_reduce_kernel(const A* __restrict__ ws, int parts, int64_t cols, int64_t ws_ld,
                               W* __restrict__ dweight, W* __restrict__ dbias) {
  FN_SHARED(A, red, [2][kReduceSlices][kReduceCols + 1]);
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kReduceCols + threadIdx.x;
  const int lo = static_cast<int>(static_cast<int64_t>(parts) * threadIdx.y / kReduceSlices);
  const int hi = static_cast<int>(static_cast<int64_t>(parts) * (threadIdx.y + 1) / kReduceSlices);
  A sw = 0, sb = 0;
  if (c < cols) {
    const A* pw = ws + c;
    const A* pb = ws + static_cast<int64_t>(parts) * ws_ld + c;
#pragma unroll 4
    for (int i = lo; i < hi; ++i) {
      sw += pw[i * ws_ld];
      sb += pb[i * ws_ld];
    }
  }
  red[0][threadIdx.y][threadIdx.x] = sw;
  red[1][threadIdx.y][threadIdx.x] = sb;
  __syncthreads();
  if (threadIdx.y != 0 || c >= cols) return;
  sw = red[0][0][threadIdx.x];
  sb = red[1][0][threadIdx.x];
#pragma unroll
  for (int t = 1; t < kReduceSlices; ++t) {
    sw += red[0][t][threadIdx.x];
    sb += red[1][t][threadIdx.x];
  }
  if (dweight) dweight[c] = from_acc<W>(sw);
  if (dbias) dbias[c] = from_acc<W>(sb);
}

}  // namespace ln_cuda
}  // namespace fused_norm
