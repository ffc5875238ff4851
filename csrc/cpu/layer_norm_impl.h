// CPU LayerNorm kernels, compiled once per instruction set (inside the per-ISA namespace,
// see variant.h). Rows are split over threads; each row is processed in L1-sized blocks,
// loading storage values straight into float (double for double) vector registers.
//
// Forward: one read of the row from memory computes per-block moments (one sweep of
// shifted sums, see runs_moments) merged across blocks with Chan's formula; a last sweep
// writes y (from cache when the row fits in L1/L2). RMSNorm (p.rms) reads the row once
// for sum(x^2) (the unshifted sums) and writes y as LayerNorm with a mean of 0.
// Residual add (add_layer_norm): the rows normalized are s = x + residual. Each L1 block
// of x and residual is read once from memory; the sum, added in registers and rounded to
// its storage type, is stored to the new residual output (when wanted) and to a scratch
// row, from which (in L1) the block's moments and the last sweep's y are computed: s is
// the very value stored as the new residual, so the output is LayerNorm of that tensor,
// as the unfused composition. The backward forms s the same way (post-norm: the sum was
// not stored) or reads the stored one, adds the new residual's gradient to dx in the dx
// sweep and stores dx in the residual's dtype too when it differs from the input's.
// Backward: per row, one sweep for sum(g) and sum(g*xhat) with g = dy*weight that also
// accumulates dweight/dbias into per-group partial rows (summed in a fixed order at the
// end: no atomics, bitwise reproducible); a second sweep writes dx.
#pragma once

namespace ln {

// d is scaled by this power of two (exactly) in a second sweep of the shifted sums when
// the first one overflowed the accumulation type A (float: |d| from about 1e19 on, sooner
// than torch's Welford statistics), so that finite data keep their exact moments. Small
// enough that no sum of scaled squares of finite A values overflows; the values it
// flushes to zero are negligible beside the ones that overflowed.
template <typename A>
constexpr A kOverflowScale = sizeof(A) == 4 ? A(0x1p-100) : A(0x1p-600);

// Moments of `runs` runs of n values (n, runs >= 1), run r starting at x + r * stride, in
// one sweep of sums shifted by the first value a: with d = x - a, mean = a + sum(d) / count
// and m2 = sum(d*d) - sum(d) * (sum(d) / count). The shift is a sample of the data, so the
// cancellation costs about (mean - a)^2 / variance of m2's precision (the same shift as the
// kNSC statistics). The sums are in A; the moments are returned in stat_sum_t<T>: with
// each run's mean rounded to float before the merge, float32 BatchNorm data of mean 200
// and spread 1-2 ((4, 3, 2100), one sample at +4) gave 60x torch's error in the running
// variance. A non-finite a would turn every d into NaN; the shift is then 0, and the
// inf/NaN propagates as it does in torch (mean inf, variance NaN). Sums that overflowed
// A are summed again with d scaled by kOverflowScale; an m2 beyond the range of
// stat_sum_t<T> (bfloat16 data only) becomes NaN rather than an infinite variance,
// which would make every output a plausible 0.
// step(i) runs once per step of four vectors (i: the step's first value in its run), so
// that a caller can interleave an elementwise pass with the sums (bn::StepStores).
struct NoStep {
  void operator()(int64_t) const {}
};

// The shifted sums of runs_moments, (sum d, sum d*d) with d = x - a, times
// kOverflowScale when kScaled. Without kLinear, only sum x*x (a must be 0; the first sum
// is returned as 0): RMSNorm's statistics, without the subtractions and additions of d.
template <bool kScaled, bool kLinear = true, typename T, typename Step>
inline std::pair<stat_sum_t<T>, stat_sum_t<T>> shifted_sums(const T* x, int64_t runs, int64_t stride, int64_t n,
                                                            acc_t<T> a, Step&& step) {
  using A = acc_t<T>;
  using S = stat_sum_t<T>;
  constexpr int64_t L = kLanes<A>, kPairBytes = 2 * L * static_cast<int64_t>(sizeof(T));
  const vec_t<A> av = vec_t<A>{} + a;
  // Four independent accumulators, in two pairs of vectors per step: with two, each
  // chain's add latency per pair was as long as the pair's conversions and arithmetic.
  // Together with fold_lanes in registers, in-process against both changes undone (8
  // interleaved rounds, 2-core Xeon): bfloat16 BatchNorm statistics (32, 256, 28, 28)
  // 0.382 -> 0.351 ms, cache-resident (4, 256, 28, 28) on one thread 1.11x, its training
  // forward 1.03x-1.04x; LayerNorm forward (4096, 1024), (8192, 768) 1.02x-1.06x.
  vec_t<A> s[4] = {}, q[4] = {};
  auto add = [&](int j, vec_t<A> v) {
    vec_t<A> d = v;
    if constexpr (kLinear) d -= av;
    if constexpr (kScaled) d *= kOverflowScale<A>;
    if constexpr (kLinear) s[j] += d;
    q[j] = mul_add(d, d, q[j]);
  };
  A s_tail = 0, q_tail = 0;
  for (int64_t r = 0; r < runs; ++r) {
    const T* xr = x + r * stride;
    int64_t i = 0;
    vec_t<A> v0, v1, v2, v3;
    for (; i + 4 * L <= n; i += 4 * L) {
      if (runs == 1) prefetch_ahead(xr + i, 2 * kPairBytes);
      load_pair(xr + i, v0, v1);
      load_pair(xr + i + 2 * L, v2, v3);
      step(i);
      add(0, v0);
      add(1, v1);
      add(2, v2);
      add(3, v3);
    }
    if (i + 2 * L <= n) {
      load_pair(xr + i, v0, v1);
      add(0, v0);
      add(1, v1);
      i += 2 * L;
    }
    if (i + L <= n) {
      add(0, load_vec(xr + i));
      i += L;
    }
    for (; i < n; ++i) {
      A d = to_acc<A>(xr[i]) - a;
      if constexpr (kScaled) d *= kOverflowScale<A>;
      s_tail += d;
      q_tail += d * d;
    }
  }
  return {fold_lanes<A>((s[0] + s[2]) + (s[1] + s[3]), s_tail), fold_lanes<A>((q[0] + q[2]) + (q[1] + q[3]), q_tail)};
}

template <typename T, typename Step = NoStep>
inline Moments<stat_sum_t<T>> runs_moments(const T* x, int64_t runs, int64_t stride, int64_t n, Step&& step = {}) {
  using A = acc_t<T>;
  using S = stat_sum_t<T>;
  const A first = to_acc<A>(x[0]);
  const A a = std::isfinite(first) ? first : A(0);
  auto [sd, sq] = shifted_sums<false>(x, runs, stride, n, a, step);
  S unscale = 1;
  if (!(std::isfinite(sd) && std::isfinite(sq))) {  // overflowed, or non-finite data (NaN again)
    std::tie(sd, sq) = shifted_sums<true>(x, runs, stride, n, a, NoStep{});
    unscale = S(1) / S(kOverflowScale<A>);
  }
  const S count = static_cast<S>(runs * n);
  const S shift = sd / count, m2 = (sq - sd * shift) * unscale * unscale;
  if (std::isinf(m2)) return Moments<S>{count, a + shift * unscale, std::numeric_limits<S>::quiet_NaN()};
  return Moments<S>{count, a + shift * unscale, m2 < 0 ? S(0) : m2};  // keeps a NaN m2
}

// Moments of n contiguous values (n >= 1).
template <typename T>
inline Moments<stat_sum_t<T>> block_moments(const T* x, int64_t n) {
  return runs_moments(x, 1, 0, n);
}

// v rounded to T's precision, lane-wise (the identity when T is its own accumulation type).
template <typename T>
inline vec_t<acc_t<T>> round_to_storage(vec_t<acc_t<T>> v) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return v;
  } else {
    T tmp[kLanes<acc_t<T>>];
    store_vec(tmp, v);
    return load_vec(tmp);
  }
}

// y = (x - mean) * rstd [rounded to T: kRound] [* w] [+ b] for n values (kStream: see
// store_loop). x is T, or the residual sum's storage type (whose accumulation type is T's).
template <bool kWeight, bool kBias, bool kStream, bool kRound = false, typename X, typename T, typename A>
inline void normalize_block(const X* __restrict x, int64_t n, A mean, A rstd, const A* __restrict w,
                            const A* __restrict b, T* __restrict y) {
  store_loop<kStream>(
      y, n,
      [&](int64_t i) {
        vec_t<A> v = (load_vec(x + i) - mean) * rstd;
        if constexpr (kRound) v = round_to_storage<T>(v);
        if constexpr (kWeight) v *= loadu(w + i);
        if constexpr (kBias) v += loadu(b + i);
        return v;
      },
      [&](int64_t i) {
        A v = (to_acc<A>(x[i]) - mean) * rstd;
        if constexpr (kRound) v = to_acc<A>(from_acc<T>(v));
        if constexpr (kWeight) v *= w[i];
        if constexpr (kBias) v += b[i];
        return v;
      });
}

// Parameters widened to the accumulation type once per call, plus `offset` (RMSNorm's
// weight offset; empty when absent).
template <typename A, typename W>
std::vector<A> widen_param(const void* p, int64_t n, double offset = 0.0) {
  std::vector<A> out;
  if (p) {
    const W* w = static_cast<const W*>(p);
    out.resize(n);
    for (int64_t i = 0; i < n; ++i) out[i] = offset == 0.0 ? to_acc<A>(w[i]) : to_acc<A>(w[i]) + A(offset);
  }
  return out;
}

// Asks for the next row while this one is computed: rows are short streams, too short
// for the hardware prefetcher to run ahead on its own. (Forward only: in the backward,
// which streams two inputs, it measured slower than the hardware prefetcher alone.)
template <typename T>
inline void prefetch_row(const T* row, int64_t cols) {
  prefetch_bytes(row, std::min<int64_t>(cols * static_cast<int64_t>(sizeof(T)), 16384));
}

// Elements per parallel task (forward rows, backward row groups): enough to amortize the
// task, few enough that small shapes (128x256) run on two threads, as torch's do.
constexpr int64_t kRowGrainElems = 8192;

// Rows per parallel task.
inline int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, kRowGrainElems / cols); }

// s = x + residual for n values, added in the accumulation type and rounded to S, into
// scratch and (when not null) sum, the new residual output (kStream: see store_loop).
template <bool kStream, typename T, typename R, typename S>
inline void add_residual(const T* __restrict x, const R* __restrict res, int64_t n, S* __restrict scratch,
                         S* __restrict sum) {
  using A = acc_t<T>;
  auto vec = [&](int64_t i) {
    const vec_t<A> v = load_vec(x + i) + load_vec(res + i);
    store_vec(scratch + i, v);
    return v;
  };
  auto scalar = [&](int64_t i) {
    const A v = to_acc<A>(x[i]) + to_acc<A>(res[i]);
    scratch[i] = from_acc<S>(v);
    return v;
  };
  if (sum) {
    store_loop<kStream>(sum, n, vec, scalar);
    return;
  }
  constexpr int64_t L = kLanes<A>;
  int64_t i = 0;
  for (; i + L <= n; i += L) vec(i);
  for (; i < n; ++i) scalar(i);
}

// T: x and y; R: the residual; S: the normalized rows (T without a residual, else the
// sum's storage type); W: the parameters.
template <typename T, typename R, typename S, typename W>
void forward(const LayerNormFwdParams& p) {
  using A = acc_t<T>;
  const int64_t cols = p.cols;
  const T* x = static_cast<const T*>(p.x);
  const R* res = static_cast<const R*>(p.residual);
  S* sum = static_cast<S*>(p.sum);
  T* y = static_cast<T*>(p.y);
  A* mean_out = static_cast<A*>(p.mean);
  A* rstd_out = static_cast<A*>(p.rstd);
  const std::vector<A> w = widen_param<A, W>(p.weight, cols, p.weight_offset);
  const std::vector<A> b = widen_param<A, W>(p.bias, cols);
  const bool round = p.round_xhat && !std::is_same_v<T, A>;
  const int64_t row_bytes = cols * static_cast<int64_t>(sizeof(T));
  const int64_t elem_bytes = 2 * static_cast<int64_t>(sizeof(T)) + (res ? static_cast<int64_t>(sizeof(R)) : 0) +
                             (sum ? static_cast<int64_t>(sizeof(S)) : 0);
  parallel_for_output(p.rows * cols * elem_bytes, row_bytes, 0, p.rows, row_grain(cols),
                      [&](auto stream, int64_t r0, int64_t r1) {
    constexpr bool kStream = decltype(stream)::value;
    auto normalize = [&](const S* xr, T* yr, A mean, A rstd) {
      const A* wp = w.data();
      const A* bp = b.data();
      if (round) {  // RMSNorm only: no bias
        if (!w.empty()) {
          normalize_block<true, false, kStream, true>(xr, cols, mean, rstd, wp, bp, yr);
        } else {
          normalize_block<false, false, kStream, true>(xr, cols, mean, rstd, wp, bp, yr);
        }
      } else if (!w.empty() && !b.empty()) {
        normalize_block<true, true, kStream>(xr, cols, mean, rstd, wp, bp, yr);
      } else if (!w.empty()) {
        normalize_block<true, false, kStream>(xr, cols, mean, rstd, wp, bp, yr);
      } else if (!b.empty()) {
        normalize_block<false, true, kStream>(xr, cols, mean, rstd, wp, bp, yr);
      } else {
        normalize_block<false, false, kStream>(xr, cols, mean, rstd, wp, bp, yr);
      }
    };
    std::vector<S> scratch(res ? cols : 0);
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * p.x_row_stride;
      if (r + 1 < r1) prefetch_row(xr + p.x_row_stride, cols);
      A mean = 0, rstd;
      Moments<stat_sum_t<S>> m = moments_empty<stat_sum_t<S>>();
      const S* sr = nullptr;
      if (res) {
        const R* rr = res + r * p.residual_row_stride;
        if (r + 1 < r1) prefetch_row(rr + p.residual_row_stride, cols);
        S* sumr = sum ? sum + r * p.sum_row_stride : nullptr;
        for (int64_t c = 0; c < cols; c += kBlock) {
          const int64_t n = std::min(kBlock, cols - c);
          add_residual<kStream>(xr + c, rr + c, n, scratch.data() + c, sumr ? sumr + c : nullptr);
          if (!p.rms) m = moments_merge(m, block_moments(scratch.data() + c, n));
        }
        sr = scratch.data();
      } else if constexpr (std::is_same_v<S, T>) {
        if (!p.rms) {
          for (int64_t c = 0; c < cols; c += kBlock)
            m = moments_merge(m, block_moments(xr + c, std::min(kBlock, cols - c)));
        }
        sr = xr;
      }
      if (p.rms) {
        // Mean square in stat_sum_t, as torch's float32 mean of x^2 but without its
        // rounding of each square: an overflowing sum gives rstd 0, as torch's. (With a
        // residual, a second sweep over the sum in the scratch row.)
        const stat_sum_t<S> sq = shifted_sums<false, false>(sr, 1, 0, cols, A(0), NoStep{}).second;
        rstd = static_cast<A>(fn_rsqrt(sq / static_cast<stat_sum_t<S>>(cols) + static_cast<stat_sum_t<S>>(p.eps)));
      } else {
        mean = static_cast<A>(m.mean);
        rstd = static_cast<A>(moments_rstd(m, p.eps));
        mean_out[r] = mean;
      }
      rstd_out[r] = rstd;
      normalize(sr, y + r * p.y_row_stride, mean, rstd);
    }
  });
}

// sum(g) and sum(g * (x - mean)) over a row in one sweep, g = dy * w (dy when w is null),
// and (kPartial) dy*xhat and (kBias) dy added to the partial dweight/dbias rows. The partial rows
// are updated in this load-only sweep rather than in the dx sweep: next to the dx stores,
// their read-modify-write made the backward 1.1-2x slower (float32 768 columns, 43 to
// 11000 rows, AVX-512 Intel Xeon, cached stores).
template <bool kPartial, bool kBias = true, typename X, typename T, typename A>
inline void grad_sums(const X* __restrict x, const T* __restrict dy, const A* __restrict w, int64_t n, A mean,
                      A rstd, A* __restrict pw, A* __restrict pb, A& sum_g, A& sum_gx) {
  constexpr int64_t L = kLanes<A>;
  vec_t<A> acc_g = {}, acc_gx = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const vec_t<A> d = load_vec(dy + i);
    const vec_t<A> g = w ? d * loadu(w + i) : d;
    const vec_t<A> xc = load_vec(x + i) - mean;
    acc_g += g;
    acc_gx += g * xc;
    if constexpr (kPartial) {
      store_vec(pw + i, loadu(pw + i) + d * (xc * rstd));
      if constexpr (kBias) store_vec(pb + i, loadu(pb + i) + d);
    }
  }
  A tail_g = 0, tail_gx = 0;
  for (; i < n; ++i) {
    const A d = to_acc<A>(dy[i]);
    const A g = w ? d * w[i] : d;
    const A xc = to_acc<A>(x[i]) - mean;
    tail_g += g;
    tail_gx += g * xc;
    if constexpr (kPartial) {
      pw[i] += d * (xc * rstd);
      if constexpr (kBias) pb[i] += d;
    }
  }
  sum_g = fold_lanes<A>(acc_g, tail_g);
  sum_gx = fold_lanes<A>(acc_gx, tail_gx);
}

// dx of a row, passed through add (see ResidualGrad) before it is stored.
template <bool kWeight, bool kStream, typename X, typename T, typename A, typename Add>
inline void dx_row(const X* __restrict x, const T* __restrict dy, const A* __restrict w, int64_t n, A mean, A rstd,
                   A c1, A c2, T* __restrict dx, const Add& add) {
  store_loop<kStream>(
      dx, n,
      [&](int64_t i) {
        const vec_t<A> xhat = (load_vec(x + i) - mean) * rstd;
        const vec_t<A> g = kWeight ? load_vec(dy + i) * loadu(w + i) : load_vec(dy + i);
        return add(i, vec_t<A>(rstd * (g - c2 - xhat * c1)));  // layer_norm_dx, lane-wise
      },
      [&](int64_t i) {
        const A d = to_acc<A>(dy[i]);
        const A xhat = (to_acc<A>(x[i]) - mean) * rstd;
        return add(i, layer_norm_dx(kWeight ? d * w[i] : d, xhat, rstd, c1, c2));
      });
}

// The residual terms of dx (add_layer_norm): the new residual's gradient ds added (when
// not null), and the result also stored in the residual's dtype (dres, when not null),
// from registers. A plain LayerNorm passes dx through.
template <typename S, typename R>
struct ResidualGrad {
  const S* ds;
  R* dres;
  template <typename V>
  V operator()(int64_t i, V v) const {
    if constexpr (std::is_arithmetic_v<V>) {
      if (ds) v += to_acc<V>(ds[i]);
      if (dres) dres[i] = from_acc<R>(v);
    } else {
      if (ds) v += load_vec(ds + i);
      if (dres) store_vec(dres + i, v);
    }
    return v;
  }
};
struct NoResidualGrad {
  template <typename V>
  V operator()(int64_t, V v) const {
    return v;
  }
};

// T: dy and dx; R: the residual; S: the normalized rows (x, or x + residual); W: the
// parameters.
template <typename T, typename R, typename S, typename W>
void backward(const LayerNormBwdParams& p) {
  using A = acc_t<T>;
  const int64_t cols = p.cols, rows = p.rows;
  const R* res = static_cast<const R*>(p.residual);
  const S* ds = static_cast<const S*>(p.dsum);
  R* dres = static_cast<R*>(p.dresidual);
  const bool residual_terms = res || ds || dres;
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.dx);
  const A* mean_in = static_cast<const A*>(p.mean);  // null for RMSNorm (mean 0)
  const A* rstd_in = static_cast<const A*>(p.rstd);
  const std::vector<A> w = widen_param<A, W>(p.weight, cols, p.weight_offset);
  const A* wp = w.empty() ? nullptr : w.data();
  const bool want_dw = p.dweight != nullptr, want_db = p.dbias != nullptr;

  // Row groups, each with its own partial dweight/dbias rows (both accumulated when either
  // is wanted). The grouping depends only on the shape and the thread count, so repeated
  // runs sum in the same order.
  const int64_t groups = std::max<int64_t>(
      1, std::min({rows, static_cast<int64_t>(at::get_num_threads()), rows * cols / kRowGrainElems}));
  std::vector<A> partial((want_dw || want_db) ? groups * 2 * cols : 0, A(0));
  const A inv_cols = A(1) / static_cast<A>(cols);

  const int64_t elem_bytes = 3 * static_cast<int64_t>(sizeof(T)) + (res ? static_cast<int64_t>(sizeof(R)) : 0) +
                             (ds ? static_cast<int64_t>(sizeof(S)) : 0) + (dres ? static_cast<int64_t>(sizeof(R)) : 0);
  const int64_t row_bytes = cols * static_cast<int64_t>(sizeof(T));
  parallel_for_output(rows * cols * elem_bytes, row_bytes, 0, groups, 1, [&](auto stream, int64_t g0, int64_t g1) {
    constexpr bool kStream = decltype(stream)::value;
    std::vector<S> scratch(res ? cols : 0);
    for (int64_t g = g0; g < g1; ++g) {
      A* pw = partial.empty() ? nullptr : partial.data() + g * 2 * cols;
      A* pb = pw ? pw + cols : nullptr;
      const int64_t r_end = rows * (g + 1) / groups;
      for (int64_t r = rows * g / groups; r < r_end; ++r) {
        const S* xr;
        if (res) {  // the post-norm sum, formed again as the forward did
          add_residual<false>(static_cast<const T*>(p.x) + r * p.x_row_stride, res + r * p.residual_row_stride,
                              cols, scratch.data(), static_cast<S*>(nullptr));
          xr = scratch.data();
        } else {
          xr = static_cast<const S*>(p.x) + r * p.x_row_stride;
        }
        const T* dyr = dy + r * p.dy_row_stride;
        const A mean = mean_in ? mean_in[r] : A(0), rstd = rstd_in[r];
        A sum_g = 0, sum_gx = 0;
        if (pw && want_db) {
          grad_sums<true>(xr, dyr, wp, cols, mean, rstd, pw, pb, sum_g, sum_gx);
        } else if (pw) {  // dweight only (RMSNorm, LayerNorm without bias)
          grad_sums<true, false>(xr, dyr, wp, cols, mean, rstd, pw, pb, sum_g, sum_gx);
        } else {
          grad_sums<false>(xr, dyr, wp, cols, mean, rstd, pw, pb, sum_g, sum_gx);
        }
        const A c1 = sum_gx * rstd * inv_cols;  // mean of g * xhat
        const A c2 = p.rms ? A(0) : sum_g * inv_cols;  // mean of g (RMSNorm: no mean term)
        T* dxr = dx + r * p.dx_row_stride;
        auto write_dx = [&](const auto& add) {
          if (wp) {
            dx_row<true, kStream>(xr, dyr, wp, cols, mean, rstd, c1, c2, dxr, add);
          } else {
            dx_row<false, kStream>(xr, dyr, wp, cols, mean, rstd, c1, c2, dxr, add);
          }
        };
        if (residual_terms) {
          write_dx(ResidualGrad<S, R>{ds ? ds + r * p.dsum_row_stride : nullptr,
                                      dres ? dres + r * p.dresidual_row_stride : nullptr});
        } else {
          write_dx(NoResidualGrad{});
        }
      }
    }
  });

  if (!want_dw && !want_db) return;
  W* dw = static_cast<W*>(p.dweight);
  W* db = static_cast<W*>(p.dbias);
  at::parallel_for(0, cols, 4096, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      A sw = 0, sb = 0;
      for (int64_t g = 0; g < groups; ++g) {
        sw += partial[g * 2 * cols + c];
        sb += partial[g * 2 * cols + cols + c];
      }
      if (want_dw) dw[c] = from_acc<W>(sw);
      if (want_db) db[c] = from_acc<W>(sb);
    }
  });
}

// Calls f(R{}, S{}) with the storage types of the residual and of the normalized rows
// for x of type T (see LayerNormFwdParams): T itself, or float for half/bfloat16 x.
template <typename T, typename F>
inline void dispatch_residual(DType r, DType s, F&& f) {
  if constexpr (sizeof(T) == 2) {
    if (r == DType::kFloat32) return f(float{}, float{});
    if (s == DType::kFloat32) return f(T{}, float{});
  }
  f(T{}, T{});
}

}  // namespace ln

void layer_norm_fwd(const LayerNormFwdParams& p) {
  dispatch_storage(p.x_dtype, p.w_dtype, [&](auto t, auto w) {
    using T = decltype(t);
    ln::dispatch_residual<T>(p.r_dtype, p.s_dtype, [&](auto r, auto s) {
      ln::forward<T, decltype(r), decltype(s), decltype(w)>(p);
    });
  });
}

void layer_norm_bwd(const LayerNormBwdParams& p) {
  dispatch_storage(p.x_dtype, p.w_dtype, [&](auto t, auto w) {
    using T = decltype(t);
    ln::dispatch_residual<T>(p.r_dtype, p.s_dtype, [&](auto r, auto s) {
      ln::backward<T, decltype(r), decltype(s), decltype(w)>(p);
    });
  });
}
