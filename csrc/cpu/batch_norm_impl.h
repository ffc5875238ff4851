// CPU BatchNorm kernels, compiled once per instruction set (inside the per-ISA namespace,
// see variant.h), for the two layouts of BatchNormLayout:
//
//  * kNCS: each (n, c) plane is S contiguous values of one channel. The tensor is cut
//    into runs of at most kBlock values of one plane; runs are processed in parallel.
//  * kNSC: rows of C contiguous channels. Statistics work on tiles of rows x at most
//    kBlock channels; elementwise passes on chunks of at most kBlock channels of a row.
//
// Training forward: one read of x computes exact moments per run / per tile column (two
// sweeps over L1/L2-resident data), which are merged per channel in double in a fixed
// order; the normalize pass applies one scale and shift per channel.
// Backward: per-run / per-tile sums of dy and dy * (x - mean) (double accumulators),
// added per channel in a fixed order, then one elementwise pass for dx. The partition depends only on the
// shape, never on the thread count, and there are no atomics: results are bitwise
// reproducible.
#pragma once

namespace bn {

// Elements per parallel task: enough to amortize it.
constexpr int64_t kGrainElems = 32768;

template <int64_t kStep>
using Step = std::integral_constant<int64_t, kStep>;

// kNCS runs: plane (n, c) is cut into runs of at most kBlock values.
struct NcsRuns {
  int64_t N, C, S, per_plane;
  NcsRuns(int64_t n, int64_t c, int64_t s) : N(n), C(c), S(s), per_plane((s + kBlock - 1) / kBlock) {}
  int64_t count() const { return N * C * per_plane; }
  int64_t index(int64_t n, int64_t c, int64_t k) const { return (n * C + c) * per_plane + k; }
  // f(c, offset, len, run index) for every run, in parallel.
  template <typename F>
  void parallel(F&& f) const {
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::min(S, kBlock));
    at::parallel_for(0, count(), grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t plane = r / per_plane, s0 = (r % per_plane) * kBlock;
        f(plane % C, plane * S + s0, std::min(kBlock, S - s0), r);
      }
    });
  }
  // f(run index) over channel c's runs in a fixed order.
  template <typename F>
  void channel_runs(int64_t c, F&& f) const {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < per_plane; ++k) f(index(n, c, k));
  }
};

// kNSC tiles: blocks of `rb` rows by at most `cb` channels. Partial results are stored
// per (row block, channel).
struct NscTiles {
  int64_t rows, C, cb, rb, row_blocks, col_blocks;
  NscTiles(int64_t rows_, int64_t c)
      : rows(rows_), C(c), cb(std::min(c, kBlock)), rb(std::max<int64_t>(1, kGrainElems / cb)),
        row_blocks((rows_ + rb - 1) / rb), col_blocks((c + cb - 1) / cb) {}
  int64_t partials() const { return row_blocks * C; }
  int64_t block_rows(int64_t k) const { return std::min(rb, rows - k * rb); }
  // f(row block, first row, row count, first channel, channel count), in parallel.
  template <typename F>
  void parallel(F&& f) const {
    at::parallel_for(0, row_blocks * col_blocks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t k = t / col_blocks, c0 = (t % col_blocks) * cb;
        f(k, k * rb, block_rows(k), c0, std::min(cb, C - c0));
      }
    });
  }
};

// Per-channel work over C channels, in parallel.
template <typename F>
void for_channels(int64_t C, int64_t work_per_channel, F&& f) {
  at::parallel_for(0, C, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, work_per_channel)),
                   [&](int64_t c0, int64_t c1) {
                     for (int64_t c = c0; c < c1; ++c) f(c);
                   });
}

// Every element once, in runs of at most kBlock contiguous elements, in parallel:
// f(Step<s>, offset, c, len) where element i of the run belongs to channel c + i * s.
template <typename F>
void for_each_run(int64_t N, int64_t C, int64_t S, BatchNormLayout layout, F&& f) {
  if (layout == BatchNormLayout::kNCS) {
    NcsRuns(N, C, S).parallel([&](int64_t c, int64_t off, int64_t len, int64_t) { f(Step<0>{}, off, c, len); });
    return;
  }
  at::parallel_for(0, N * S, std::max<int64_t>(1, kGrainElems / C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c0 = 0; c0 < C; c0 += kBlock) f(Step<1>{}, r * C + c0, c0, std::min(kBlock, C - c0));
  });
}

// Merges the exact moments (count, mean, M2) of disjoint parts, which each(f) passes to f
// in a fixed order, in double: the mean of the means, then the parts' M2 plus their
// spread around it (Chan's combination in two sweeps, without a division per part).
template <typename Each>
Moments<double> merge_parts(Each&& each) {
  double n = 0, sum = 0;
  each([&](auto count, auto mean, auto) {
    n += static_cast<double>(count);
    sum += static_cast<double>(count) * static_cast<double>(mean);
  });
  const double mean = sum / n;
  double m2 = 0;
  each([&](auto count, auto part_mean, auto part_m2) {
    const double d = static_cast<double>(part_mean) - mean;
    m2 += static_cast<double>(part_m2) + static_cast<double>(count) * d * d;
  });
  return Moments<double>{n, mean, m2};
}

// Exact moments of every channel: per run / tile in A, merged in double.
template <typename T, typename A = acc_t<T>>
std::vector<Moments<double>> channel_moments(const BatchNormFwdParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const int64_t C = p.C;
  std::vector<Moments<double>> out(C);
  if (p.layout == BatchNormLayout::kNCS) {
    const NcsRuns runs(p.N, C, p.S);
    std::vector<Moments<A>> part(runs.count());
    runs.parallel([&](int64_t, int64_t off, int64_t len, int64_t r) {
      alignas(64) A buf[kBlock];
      part[r] = ln::block_moments(widen(x + off, len, buf), len);
    });
    for_channels(C, p.N * runs.per_plane, [&](int64_t c) {
      out[c] = merge_parts([&](auto&& f) {
        runs.channel_runs(c, [&](int64_t r) { f(part[r].count, part[r].mean, part[r].m2); });
      });
    });
    return out;
  }
  // kNSC: per tile, the column means, then the column sums of squared deviations, each a
  // sweep over the tile's rows (the second from cache), accumulated in double.
  const NscTiles tiles(p.N * p.S, C);
  std::vector<double> part_mean(tiles.partials()), part_m2(tiles.partials());
  tiles.parallel([&](int64_t k, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
    alignas(64) A buf[kBlock], mean_a[kBlock];
    double* __restrict mean = part_mean.data() + k * C + c0;
    double* __restrict m2 = part_m2.data() + k * C + c0;
    std::fill(mean, mean + nc, 0.0);
    std::fill(m2, m2 + nc, 0.0);
    for (int64_t r = r0; r < r0 + nr; ++r) {
      const A* __restrict v = widen(x + r * C + c0, nc, buf);
      for (int64_t c = 0; c < nc; ++c) mean[c] += static_cast<double>(v[c]);
    }
    for (int64_t c = 0; c < nc; ++c) {
      mean[c] /= static_cast<double>(nr);
      mean_a[c] = static_cast<A>(mean[c]);
    }
    for (int64_t r = r0; r < r0 + nr; ++r) {
      const A* __restrict v = widen(x + r * C + c0, nc, buf);
      for (int64_t c = 0; c < nc; ++c) {
        const A d = v[c] - mean_a[c];
        m2[c] += static_cast<double>(d * d);
      }
    }
  });
  for_channels(C, tiles.row_blocks, [&](int64_t c) {
    out[c] = merge_parts([&](auto&& f) {
      for (int64_t k = 0; k < tiles.row_blocks; ++k) f(tiles.block_rows(k), part_mean[k * C + c], part_m2[k * C + c]);
    });
  });
  return out;
}

// new running stats = (1 - f) * running + f * batch, computed as torch's CPU kernel does:
// in double for float/double parameters, in float for half/bfloat16 ones.
template <typename W>
void update_running_stats(const BatchNormFwdParams& p, const std::vector<Moments<double>>& m) {
  using U = std::conditional_t<sizeof(W) == 2, float, double>;
  const U f = p.cumulative ? U(1) / static_cast<U>(*p.num_batches_tracked) : static_cast<U>(p.momentum);
  const W* rm = static_cast<const W*>(p.running_mean);
  const W* rv = static_cast<const W*>(p.running_var);
  W* new_rm = static_cast<W*>(p.new_running_mean);
  W* new_rv = static_cast<W*>(p.new_running_var);
  for (int64_t c = 0; c < p.C; ++c) {
    U mean = to_acc<U>(rm[c]), var = to_acc<U>(rv[c]);
    batch_norm_running_update(Moments<U>{static_cast<U>(m[c].count), static_cast<U>(m[c].mean),
                                         static_cast<U>(m[c].m2)},
                              f, mean, var);
    new_rm[c] = from_acc<W>(mean);
    new_rv[c] = from_acc<W>(var);
  }
}

template <int64_t kStep, typename A>
inline void scale_shift_run(const A* __restrict v, int64_t n, const A* __restrict scale, const A* __restrict shift,
                            A* __restrict out) {
  for (int64_t i = 0; i < n; ++i) out[i] = v[i] * scale[i * kStep] + shift[i * kStep];
}

template <typename T, typename W>
void forward(const BatchNormFwdParams& p) {
  using A = acc_t<T>;
  constexpr bool kDirect = std::is_same_v<T, A>;  // y can be written without narrowing
  const int64_t C = p.C;
  A* mean = static_cast<A*>(p.save_mean);
  A* invstd = static_cast<A*>(p.save_invstd);
  if (p.training) {
    const std::vector<Moments<double>> m = channel_moments<T>(p);
    for (int64_t c = 0; c < C; ++c) {
      mean[c] = static_cast<A>(m[c].mean);
      invstd[c] = static_cast<A>(moments_rstd(m[c], p.eps));
    }
    if (p.new_running_mean) update_running_stats<W>(p, m);
  } else {
    const W* rm = static_cast<const W*>(p.running_mean);
    const W* rv = static_cast<const W*>(p.running_var);
    for (int64_t c = 0; c < C; ++c) {
      mean[c] = to_acc<A>(rm[c]);
      invstd[c] = static_cast<A>(fn_rsqrt(to_acc<double>(rv[c]) + p.eps));
    }
  }
  const std::vector<A> w = ln::widen_param<A, W>(p.weight, C);
  const std::vector<A> b = ln::widen_param<A, W>(p.bias, C);
  std::vector<A> scale(C), shift(C);
  for (int64_t c = 0; c < C; ++c)
    batch_norm_scale_shift(mean[c], invstd[c], w.empty() ? A(1) : w[c], b.empty() ? A(0) : b[c], scale[c], shift[c]);

  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  for_each_run(p.N, C, p.S, p.layout, [&](auto step, int64_t off, int64_t c, int64_t len) {
    constexpr int64_t kStep = decltype(step)::value;
    alignas(64) A in_buf[kBlock];
    const A* v = widen(x + off, len, in_buf);
    if constexpr (kDirect) {
      scale_shift_run<kStep>(v, len, scale.data() + c, shift.data() + c, y + off);
    } else {
      alignas(64) A out_buf[kBlock];
      scale_shift_run<kStep>(v, len, scale.data() + c, shift.data() + c, out_buf);
      narrow(out_buf, len, y + off);
    }
  });
}

// sum dy and sum dy * (x - mean) over n values: products in A, sums in double lanes
// (long, cancelling sums stay as accurate as torch's double accumulation).
// kLanes<double> values of A, to be widened into one vec_t<double>.
template <typename A>
struct DoubleLanes;
template <>
struct DoubleLanes<float> {
  using type = float __attribute__((vector_size(kLanes<double> * sizeof(float))));
};
template <>
struct DoubleLanes<double> {
  using type = vec_t<double>;
};

template <typename A>
inline void grad_sums_run(const A* __restrict x, const A* __restrict dy, int64_t n, A mean, double& sum_dy,
                          double& sum_dyx) {
  using VA = typename DoubleLanes<A>::type;
  constexpr int64_t L = kLanes<double>;
  vec_t<double> s0 = {}, s1 = {}, sx0 = {}, sx1 = {};
  const auto sums = [&](int64_t i, vec_t<double>& s, vec_t<double>& sx) {
    VA g, xv;
    std::memcpy(&g, dy + i, sizeof(g));
    std::memcpy(&xv, x + i, sizeof(xv));
    s += __builtin_convertvector(g, vec_t<double>);
    sx += __builtin_convertvector(g * (xv - mean), vec_t<double>);
  };
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    sums(i, s0, sx0);
    sums(i + L, s1, sx1);
  }
  if (i + L <= n) {
    sums(i, s0, sx0);
    i += L;
  }
  double tail = 0, tail_x = 0;
  for (; i < n; ++i) {
    tail += static_cast<double>(dy[i]);
    tail_x += static_cast<double>(dy[i] * (x[i] - mean));
  }
  sum_dy = fold_lanes<double>(s0 + s1, tail);
  sum_dyx = fold_lanes<double>(sx0 + sx1, tail_x);
}

// Per channel: sum dy and sum dy * (x - mean), in double.
template <typename T, typename A = acc_t<T>>
void channel_grad_sums(const BatchNormBwdParams& p, std::vector<double>& sum_dy, std::vector<double>& sum_dyx) {
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const A* mean = static_cast<const A*>(p.mean);
  const int64_t C = p.C;
  if (p.layout == BatchNormLayout::kNCS) {
    const NcsRuns runs(p.N, C, p.S);
    std::vector<double> part(2 * runs.count());
    runs.parallel([&](int64_t c, int64_t off, int64_t len, int64_t r) {
      alignas(64) A x_buf[kBlock], dy_buf[kBlock];
      grad_sums_run<A>(widen(x + off, len, x_buf), widen(dy + off, len, dy_buf), len, mean[c], part[2 * r],
                       part[2 * r + 1]);
    });
    for_channels(C, p.N * runs.per_plane, [&](int64_t c) {
      double s = 0, sx = 0;
      runs.channel_runs(c, [&](int64_t r) {
        s += part[2 * r];
        sx += part[2 * r + 1];
      });
      sum_dy[c] = s;
      sum_dyx[c] = sx;
    });
    return;
  }
  const NscTiles tiles(p.N * p.S, C);
  std::vector<double> part_s(tiles.partials()), part_sx(tiles.partials());
  tiles.parallel([&](int64_t k, int64_t r0, int64_t nr, int64_t c0, int64_t nc) {
    alignas(64) A x_buf[kBlock], dy_buf[kBlock];
    double* __restrict s = part_s.data() + k * C + c0;
    double* __restrict sx = part_sx.data() + k * C + c0;
    const A* __restrict m = mean + c0;
    std::fill(s, s + nc, 0.0);
    std::fill(sx, sx + nc, 0.0);
    for (int64_t r = r0; r < r0 + nr; ++r) {
      const A* __restrict xv = widen(x + r * C + c0, nc, x_buf);
      const A* __restrict g = widen(dy + r * C + c0, nc, dy_buf);
      for (int64_t c = 0; c < nc; ++c) {
        s[c] += static_cast<double>(g[c]);
        sx[c] += static_cast<double>(g[c] * (xv[c] - m[c]));
      }
    }
  });
  for_channels(C, tiles.row_blocks, [&](int64_t c) {
    double s = 0, sx = 0;
    for (int64_t k = 0; k < tiles.row_blocks; ++k) {
      s += part_s[k * C + c];
      sx += part_sx[k * C + c];
    }
    sum_dy[c] = s;
    sum_dyx[c] = sx;
  });
}

// dx of a run; per-channel coefficients as in batch_norm_dx (norm_math.h).
template <int64_t kStep, typename A>
inline void dx_run(const A* __restrict x, const A* __restrict dy, int64_t n, const A* __restrict mean,
                   const A* __restrict a, const A* __restrict k, const A* __restrict mean_dy, A* __restrict out) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = batch_norm_dx(dy[i], x[i], mean[i * kStep], a[i * kStep], k[i * kStep], mean_dy[i * kStep]);
}

template <int64_t kStep, typename A>
inline void dx_eval_run(const A* __restrict dy, int64_t n, const A* __restrict a, A* __restrict out) {
  for (int64_t i = 0; i < n; ++i) out[i] = dy[i] * a[i * kStep];
}

// dx from the per-channel sums over n values per channel (elementwise phase).
template <typename T, typename W>
void backward_dx(const BatchNormBwdParams& p, const std::vector<double>& sum_dy, const std::vector<double>& sum_dyx,
                 double n) {
  using A = acc_t<T>;
  constexpr bool kDirect = std::is_same_v<T, A>;
  const int64_t C = p.C;
  const A* mean = static_cast<const A*>(p.mean);
  const A* invstd = static_cast<const A*>(p.invstd);
  const std::vector<A> w = ln::widen_param<A, W>(p.weight, C);
  const double inv_n = 1.0 / n;
  std::vector<A> a(C), k(C), mean_dy(C);
  for (int64_t c = 0; c < C; ++c) {
    a[c] = invstd[c] * (w.empty() ? A(1) : w[c]);
    k[c] = static_cast<A>(static_cast<double>(invstd[c]) * invstd[c] * sum_dyx[c] * inv_n);
    mean_dy[c] = static_cast<A>(sum_dy[c] * inv_n);
  }
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.dx);
  for_each_run(p.N, C, p.S, p.layout, [&](auto step, int64_t off, int64_t c, int64_t len) {
    constexpr int64_t kStep = decltype(step)::value;
    alignas(64) A x_buf[kBlock], dy_buf[kBlock], out_buf[kDirect ? 1 : kBlock];
    A* out = nullptr;
    if constexpr (kDirect) {
      out = dx + off;
    } else {
      out = out_buf;
    }
    const A* g = widen(dy + off, len, dy_buf);
    if (p.training) {
      dx_run<kStep>(widen(x + off, len, x_buf), g, len, mean + c, a.data() + c, k.data() + c, mean_dy.data() + c,
                    out);
    } else {
      dx_eval_run<kStep>(g, len, a.data() + c, out);
    }
    if constexpr (!kDirect) narrow(out, len, dx + off);
  });
}

template <typename T, typename W>
void backward(const BatchNormBwdParams& p) {
  using A = acc_t<T>;
  const int64_t C = p.C;
  const A* invstd = static_cast<const A*>(p.invstd);
  std::vector<double> sum_dy(C), sum_dyx(C);
  if (p.training || p.dweight || p.dbias) channel_grad_sums<T>(p, sum_dy, sum_dyx);
  for (int64_t c = 0; c < C; ++c) {
    if (p.dweight) static_cast<W*>(p.dweight)[c] = from_acc<W>(static_cast<A>(sum_dyx[c] * invstd[c]));
    if (p.dbias) static_cast<W*>(p.dbias)[c] = from_acc<W>(static_cast<A>(sum_dy[c]));
  }
  backward_dx<T, W>(p, sum_dy, sum_dyx, static_cast<double>(p.N * p.S));
}

// The phases on their own, for a synchronized BatchNorm (params.h).
template <typename T>
void stats(const BatchNormFwdParams& p) {
  using A = acc_t<T>;
  const std::vector<Moments<double>> m = channel_moments<T>(p);
  for (int64_t c = 0; c < p.C; ++c) {
    static_cast<A*>(p.save_mean)[c] = static_cast<A>(m[c].mean);
    static_cast<A*>(p.save_var)[c] = static_cast<A>(moments_var(m[c]));
  }
}

template <typename T>
void backward_reduce(const BatchNormBwdParams& p) {
  using A = acc_t<T>;
  std::vector<double> sum_dy(p.C), sum_dyx(p.C);
  channel_grad_sums<T>(p, sum_dy, sum_dyx);
  for (int64_t c = 0; c < p.C; ++c) {
    static_cast<A*>(p.sum_dy)[c] = static_cast<A>(sum_dy[c]);
    static_cast<A*>(p.sum_dy_xmu)[c] = static_cast<A>(sum_dyx[c]);
  }
}

template <typename T, typename W>
void backward_elemt(const BatchNormBwdParams& p) {
  using A = acc_t<T>;
  const A* s = static_cast<const A*>(p.sum_dy);
  const A* sx = static_cast<const A*>(p.sum_dy_xmu);
  backward_dx<T, W>(p, std::vector<double>(s, s + p.C), std::vector<double>(sx, sx + p.C),
                    static_cast<double>(*p.count));
}

}  // namespace bn

void batch_norm_fwd(const BatchNormFwdParams& p) {
  dispatch_storage(p.x_dtype, p.w_dtype, [&](auto t, auto w) { bn::forward<decltype(t), decltype(w)>(p); });
}

void batch_norm_bwd(const BatchNormBwdParams& p) {
  dispatch_storage(p.x_dtype, p.w_dtype, [&](auto t, auto w) { bn::backward<decltype(t), decltype(w)>(p); });
}

// Phases that do not read the parameters: one instantiation per x dtype.
void batch_norm_stats(const BatchNormFwdParams& p) {
  dispatch_storage(p.x_dtype, p.x_dtype, [&](auto t, auto) { bn::stats<decltype(t)>(p); });
}

void batch_norm_bwd_reduce(const BatchNormBwdParams& p) {
  dispatch_storage(p.x_dtype, p.x_dtype, [&](auto t, auto) { bn::backward_reduce<decltype(t)>(p); });
}

void batch_norm_bwd_elemt(const BatchNormBwdParams& p) {
  dispatch_storage(p.x_dtype, p.w_dtype, [&](auto t, auto w) { bn::backward_elemt<decltype(t), decltype(w)>(p); });
}
