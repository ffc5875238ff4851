// CPU LayerNorm kernels, compiled once per instruction set (inside the per-ISA namespace,
// see variant.h). Rows are split over threads; each row is processed in L1-sized
// blocks of float (double for double) values.
//
// Forward: one read of the row from memory computes exact per-block moments (two passes
// over the L1-resident block) merged across blocks with Chan's formula; a second sweep
// writes y (from the same block when the row fits in one).
// Backward: per row, one sweep for sum(g) and sum(g*xhat) with g = dy*weight, a second
// writes dx and accumulates dweight/dbias into per-group partial rows, which are summed
// in a fixed order at the end (no atomics; bitwise reproducible).
#pragma once

namespace ln {

template <typename A>
inline Moments<A> block_moments(const A* v, int64_t n) {
  const A mean = vec_sum<A>(n, [&](int64_t i) { return loadu(v + i); }, [&](int64_t i) { return v[i]; }) /
                 static_cast<A>(n);
  const A m2 = vec_sum<A>(
      n,
      [&](int64_t i) {
        const vec_t<A> d = loadu(v + i) - mean;
        return d * d;
      },
      [&](int64_t i) { return (v[i] - mean) * (v[i] - mean); });
  return Moments<A>{static_cast<A>(n), mean, m2};
}

template <typename A>
inline void normalize_block(const A* __restrict v, int64_t n, A mean, A rstd, const A* __restrict w,
                            const A* __restrict b, A* __restrict out) {
  if (w && b) {
    for (int64_t i = 0; i < n; ++i) out[i] = (v[i] - mean) * rstd * w[i] + b[i];
  } else if (w) {
    for (int64_t i = 0; i < n; ++i) out[i] = (v[i] - mean) * rstd * w[i];
  } else if (b) {
    for (int64_t i = 0; i < n; ++i) out[i] = (v[i] - mean) * rstd + b[i];
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = (v[i] - mean) * rstd;
  }
}

// Parameters widened to the accumulation type once per call (empty when absent).
template <typename A, typename W>
std::vector<A> widen_param(const void* p, int64_t n) {
  std::vector<A> out;
  if (p) {
    const W* w = static_cast<const W*>(p);
    out.resize(n);
    for (int64_t i = 0; i < n; ++i) out[i] = to_acc<A>(w[i]);
  }
  return out;
}

template <typename A>
inline const A* data_or_null(const std::vector<A>& v) {
  return v.empty() ? nullptr : v.data();
}

// Asks for the next row while this one is computed: rows are short streams, too short
// for the hardware prefetcher to run ahead on its own.
template <typename T>
inline void prefetch_row(const T* row, int64_t cols) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = std::min<int64_t>(cols * static_cast<int64_t>(sizeof(T)), 16384);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off);
}

// Rows per parallel task: enough elements to amortize the task.
inline int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 32768 / cols); }

template <typename T, typename W>
void forward(const LayerNormFwdParams& p) {
  using A = acc_t<T>;
  constexpr bool kDirect = std::is_same_v<T, A>;  // y can be written without narrowing
  const int64_t cols = p.cols;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  A* mean_out = static_cast<A*>(p.mean);
  A* rstd_out = static_cast<A*>(p.rstd);
  const std::vector<A> w = widen_param<A, W>(p.weight, cols);
  const std::vector<A> b = widen_param<A, W>(p.bias, cols);
  const A* wp = data_or_null(w);
  const A* bp = data_or_null(b);
  const int64_t block = std::min(cols, kBlock);
  const bool one_block = cols <= kBlock;

  at::parallel_for(0, p.rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
    std::vector<A> in_buf(block), out_buf(kDirect ? 0 : block);
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * p.x_row_stride;
      T* yr = y + r * p.y_row_stride;
      if (r + 1 < r1) prefetch_row(xr + p.x_row_stride, cols);
      Moments<A> m = moments_empty<A>();
      const A* v = nullptr;
      for (int64_t c = 0; c < cols; c += kBlock) {
        const int64_t n = std::min(kBlock, cols - c);
        v = widen(xr + c, n, in_buf.data());
        m = moments_merge(m, block_moments(v, n));
      }
      const A mean = m.mean;
      const A rstd = moments_rstd(m, p.eps);
      mean_out[r] = mean;
      rstd_out[r] = rstd;
      for (int64_t c = 0; c < cols; c += kBlock) {
        const int64_t n = std::min(kBlock, cols - c);
        if (!one_block) v = widen(xr + c, n, in_buf.data());
        A* out = nullptr;
        if constexpr (kDirect) {
          out = yr + c;
        } else {
          out = out_buf.data();
        }
        normalize_block(v, n, mean, rstd, wp ? wp + c : nullptr, bp ? bp + c : nullptr, out);
        if constexpr (!kDirect) narrow(out, n, yr + c);
      }
    }
  });
}

// sum(g) and sum(g * (x - mean)) over a block in one sweep, g = dy * w (dy when w is null).
template <typename A>
inline void grad_sums(const A* __restrict x, const A* __restrict dy, const A* __restrict w, int64_t n, A mean,
                      A& sum_g, A& sum_gx) {
  constexpr int64_t L = kLanes<A>;
  vec_t<A> acc_g = {}, acc_gx = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const vec_t<A> g = w ? loadu(dy + i) * loadu(w + i) : loadu(dy + i);
    acc_g += g;
    acc_gx += g * (loadu(x + i) - mean);
  }
  A tail_g = 0, tail_gx = 0;
  for (; i < n; ++i) {
    const A g = w ? dy[i] * w[i] : dy[i];
    tail_g += g;
    tail_gx += g * (x[i] - mean);
  }
  sum_g += fold_lanes<A>(acc_g, tail_g);
  sum_gx += fold_lanes<A>(acc_gx, tail_gx);
}

// dx of a block, and (kPartial) dy*xhat and dy added to the partial dweight/dbias rows.
template <bool kWeight, bool kPartial, typename A>
inline void dx_block(const A* __restrict x, const A* __restrict dy, const A* __restrict w, int64_t n, A mean,
                     A rstd, A c1, A c2, A* __restrict out, A* __restrict pw, A* __restrict pb) {
  for (int64_t i = 0; i < n; ++i) {
    const A xhat = (x[i] - mean) * rstd;
    out[i] = layer_norm_dx(kWeight ? dy[i] * w[i] : dy[i], xhat, rstd, c1, c2);
    if constexpr (kPartial) {
      pw[i] += dy[i] * xhat;
      pb[i] += dy[i];
    }
  }
}

template <typename T, typename W>
void backward(const LayerNormBwdParams& p) {
  using A = acc_t<T>;
  constexpr bool kDirect = std::is_same_v<T, A>;
  const int64_t cols = p.cols, rows = p.rows;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.dx);
  const A* mean_in = static_cast<const A*>(p.mean);
  const A* rstd_in = static_cast<const A*>(p.rstd);
  const std::vector<A> w = widen_param<A, W>(p.weight, cols);
  const A* wp = data_or_null(w);
  const bool want_dw = p.dweight != nullptr, want_db = p.dbias != nullptr;

  // Row groups, each with its own partial dweight/dbias rows. The grouping depends only
  // on the shape and the thread count, so repeated runs sum in the same order.
  const int64_t groups = std::max<int64_t>(
      1, std::min({rows, static_cast<int64_t>(at::get_num_threads()), rows * cols / 32768}));
  std::vector<A> partial((want_dw || want_db) ? groups * 2 * cols : 0, A(0));
  const int64_t block = std::min(cols, kBlock);
  const bool one_block = cols <= kBlock;
  const A inv_cols = A(1) / static_cast<A>(cols);

  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    std::vector<A> x_buf(block), dy_buf(block), out_buf(kDirect ? 0 : block);
    for (int64_t g = g0; g < g1; ++g) {
      // Both partial rows are accumulated when either gradient is wanted.
      A* pw = partial.empty() ? nullptr : partial.data() + g * 2 * cols;
      A* pb = pw ? pw + cols : nullptr;
      for (int64_t r = rows * g / groups; r < rows * (g + 1) / groups; ++r) {
        const T* xr = x + r * p.x_row_stride;
        const T* dyr = dy + r * p.dy_row_stride;
        T* dxr = dx + r * p.dx_row_stride;
        const A mean = mean_in[r], rstd = rstd_in[r];
        A sum_g = 0, sum_gx = 0;
        const A *xv = nullptr, *dv = nullptr;
        for (int64_t c = 0; c < cols; c += kBlock) {
          const int64_t n = std::min(kBlock, cols - c);
          xv = widen(xr + c, n, x_buf.data());
          dv = widen(dyr + c, n, dy_buf.data());
          grad_sums(xv, dv, wp ? wp + c : nullptr, n, mean, sum_g, sum_gx);
        }
        const A c1 = sum_gx * rstd * inv_cols;  // mean of g * xhat
        const A c2 = sum_g * inv_cols;          // mean of g
        for (int64_t c = 0; c < cols; c += kBlock) {
          const int64_t n = std::min(kBlock, cols - c);
          if (!one_block) {
            xv = widen(xr + c, n, x_buf.data());
            dv = widen(dyr + c, n, dy_buf.data());
          }
          A* out = nullptr;
          if constexpr (kDirect) {
            out = dxr + c;
          } else {
            out = out_buf.data();
          }
          const A* wc = wp ? wp + c : nullptr;
          if (pw && wc) {
            dx_block<true, true>(xv, dv, wc, n, mean, rstd, c1, c2, out, pw + c, pb + c);
          } else if (pw) {
            dx_block<false, true>(xv, dv, wc, n, mean, rstd, c1, c2, out, pw + c, pb + c);
          } else if (wc) {
            dx_block<true, false>(xv, dv, wc, n, mean, rstd, c1, c2, out, pw, pb);
          } else {
            dx_block<false, false>(xv, dv, wc, n, mean, rstd, c1, c2, out, pw, pb);
          }
          if constexpr (!kDirect) narrow(out, n, dxr + c);
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

}  // namespace ln

void layer_norm_fwd(const LayerNormFwdParams& p) {
  dispatch_storage(p.x_dtype, p.w_dtype, [&](auto t, auto w) { ln::forward<decltype(t), decltype(w)>(p); });
}

void layer_norm_bwd(const LayerNormBwdParams& p) {
  dispatch_storage(p.x_dtype, p.w_dtype, [&](auto t, auto w) { ln::backward<decltype(t), decltype(w)>(p); });
}
