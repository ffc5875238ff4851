// CPU BatchNorm kernels, compiled once per instruction set (inside the per-ISA namespace,
// see variant.h), for the two layouts of BatchNormLayout:
//
//  * kNCS: each (n, c) plane is S contiguous values of one channel. The tensor is cut
//    into runs of at most kBlock values of one plane; runs are processed in parallel.
//  * kNSC: rows of C contiguous channels. Reductions work on blocks of kBlockRows rows,
//    swept row by row; elementwise passes on chunks of at most kBlock channels of a row.
//
// Training forward: one read of x computes exact moments per run / per row block (one
// vectorized sweep of sums shifted by the run's / block's first value), which are merged
// per channel in double in a fixed order; the normalize pass applies one scale and shift
// per channel. Half and bfloat16 are converted in registers (vec_io.h), never copied.
// Backward: per-run / per-row-block sums of dy and dy * (x - mean) (products in the
// accumulation type, sums in double lanes), added per channel in a fixed order, then one
// elementwise pass for dx. A large kNCS tensor is done in blocks of channels instead,
// both passes over a block while it is in cache (ChannelBlocks), with the same bits.
// The partition depends only on the shape, never on the thread count, and there are no
// atomics: results are bitwise reproducible.
#pragma once

namespace bn {

// Elements per parallel task: enough to amortize it.
constexpr int64_t kGrainElems = 32768;

template <int64_t kStep>
using Step = std::integral_constant<int64_t, kStep>;

// kNCS runs: plane (n, c) is cut into runs of at most kBlock values. For the reductions
// (group_planes), a run of a short plane (fewer than kShortPlane values) also covers the
// next planes of its channel ((n + 1, c), ...: `planes` of them, at most kBlock values in
// all), so that short planes are summed and folded per group, not plane by plane: side by
// side, BatchNorm2d bfloat16 8x2048x7x7 training forward 1.57-1.65x faster. Longer planes
// are not grouped: their runs are then read in memory order, and grouping them (28x28
// planes, planes of 1024 values) measured 0.8x.
constexpr int64_t kShortPlane = 256;
struct NcsRuns {
  int64_t N, C, S, per_plane, planes, plane_blocks;
  NcsRuns(int64_t n, int64_t c, int64_t s, bool group_planes = false)
      : N(n), C(c), S(s), per_plane((s + kBlock - 1) / kBlock),
        planes(group_planes && s < kShortPlane ? std::min(n, kBlock / s) : 1),
        plane_blocks((n + planes - 1) / planes) {}
  int64_t count() const { return plane_blocks * C * per_plane; }
  int64_t index(int64_t nb, int64_t c, int64_t k) const { return (nb * C + c) * per_plane + k; }
  // Offset between a run's consecutive planes.
  int64_t plane_stride() const { return C * S; }
  // Runs per parallel task.
  int64_t grain() const { return std::max<int64_t>(1, kGrainElems / (std::min(S, kBlock) * planes)); }
  // f(c, offset, len, run index, planes in the run) for runs [r0, r1). Run r is piece k of
  // plane block nb, channel c; the indices are stepped, not divided out per run (runs of
  // short planes are only a few vectors long).
  template <typename F>
  void runs(int64_t r0, int64_t r1, F&& f) const {
    if (r0 >= r1) return;
    int64_t k = r0 % per_plane, c = r0 / per_plane % C, nb = r0 / per_plane / C;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t s0 = k * kBlock, n0 = nb * planes;
      f(c, (n0 * C + c) * S + s0, std::min(kBlock, S - s0), r, std::min(planes, N - n0));
      if (++k == per_plane) {
        k = 0;
        if (++c == C) {
          c = 0;
          ++nb;
        }
      }
    }
  }
  // The same for every run, in parallel.
  template <typename F>
  void parallel(F&& f) const {
    at::parallel_for(0, count(), grain(), [&](int64_t r0, int64_t r1) { runs(r0, r1, f); });
  }
  // runs() over the runs of channels [c0, c1), plane block by plane block (memory order).
  template <typename F>
  void channel_block_runs(int64_t c0, int64_t c1, F&& f) const {
    for (int64_t nb = 0; nb < plane_blocks; ++nb) runs(index(nb, c0, 0), index(nb, c1, 0), f);
  }
  // f(run index) over channel c's runs in a fixed order.
  template <typename F>
  void channel_runs(int64_t c, F&& f) const {
    for (int64_t nb = 0; nb < plane_blocks; ++nb)
      for (int64_t k = 0; k < per_plane; ++k) f(index(nb, c, k));
  }
};

// kNSC row blocks of at most kBlockRows rows. The partial results per (row block,
// channel) are 1/256 of the data; column sums of at most 256 rows can be kept in float.
constexpr int64_t kBlockRows = 256;
struct NscBlocks {
  int64_t rows, C, rb, count;
  NscBlocks(int64_t rows_, int64_t c)
      : rows(rows_), C(c), rb(std::max<int64_t>(1, std::min(kBlockRows, rows_))), count((rows_ + rb - 1) / rb) {}
  int64_t partials() const { return count * C; }
  int64_t block_rows(int64_t k) const { return std::min(rb, rows - k * rb); }
};

// Values summed in A before one widening add into the double lanes (amortizes the
// conversion; a sum of 4 loses nothing that matters).
constexpr int64_t kWidenGroup = 4;

// kNSC row sweeps (backward sums; statistics): a thread sweeps a row block
// kWidenGroup rows at a time, a channel vector of all of them, then the next vector, so
// the group's rows are read interleaved, which the hardware prefetcher follows badly
// (single thread, from memory: 1.2-1.4 elements/ns against 3.4-3.9 for the same sums over
// contiguous kNCS planes). RowSweep::chunks runs f(partial, c, last) over the channel
// vectors of a row (partial: std::true_type for the last `last` < L channels) and first
// asks for each full vector's share of the group kPrefetchAhead bytes ahead, in every
// tensor given: in-process switch, backward sums 1.4x-1.7x on bf16 (8192, 1024),
// (32768, 256) and (32, 256, 28, 28) channels_last, 1.4x-1.6x on float channels_last,
// 0.92x-1.03x on float (8192, 1024), small C unchanged.
constexpr int64_t kPrefetchAhead = 16 << 10;
template <typename T, typename A>
struct RowSweep {
  static constexpr int64_t L = kLanes<A>, kGroupBytes = kWidenGroup * static_cast<int64_t>(sizeof(T));
  int64_t rows, C, ahead_rows;
  RowSweep(int64_t rows_, int64_t c)
      : rows(rows_), C(c), ahead_rows(kWidenGroup * std::max<int64_t>(1, kPrefetchAhead / (kGroupBytes * c))) {}
  // Channel vectors of the group starting at row r (of the whole tensor).
  template <size_t kTensors, typename F>
  void chunks(int64_t r, const std::array<const T*, kTensors>& prefetch, F&& f) const {
    const bool ahead = r + ahead_rows + kWidenGroup <= rows;
    int64_t c = 0;
    for (; c + L <= C; c += L) {
      if (ahead) {
        // Bytes [c, c + L) * kGroupBytes of the group ahead_rows rows on.
        const int64_t off = (r + ahead_rows) * C * static_cast<int64_t>(sizeof(T)) + c * kGroupBytes;
        for (int64_t b = 0; b < L * kGroupBytes; b += 64)
          for (const T* t : prefetch) __builtin_prefetch(reinterpret_cast<const char*>(t) + off + b);
      }
      f(std::false_type{}, c, L);
    }
    if (c < C) f(std::true_type{}, c, C - c);
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
// f(Step<s>, Stream<b>, offset, c, len) where element i of the run belongs to channel
// c + i * s, and the run's output (of T) is streamed (store_loop) when b: when the call
// reads and writes `bytes` in all and its runs are not short partial lines (stream_output).
template <typename T, typename F>
void for_each_run(int64_t N, int64_t C, int64_t S, BatchNormLayout layout, int64_t bytes, F&& f) {
  const int64_t run_bytes = std::min(kBlock, layout == BatchNormLayout::kNCS ? S : C) * static_cast<int64_t>(sizeof(T));
  if (layout == BatchNormLayout::kNCS) {
    const NcsRuns runs(N, C, S);
    parallel_for_output(bytes, run_bytes, 0, runs.count(), runs.grain(), [&](auto stream, int64_t r0, int64_t r1) {
      runs.runs(r0, r1, [&](int64_t c, int64_t off, int64_t len, int64_t, int64_t) {
        f(Step<0>{}, stream, off, c, len);
      });
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kGrainElems / C);
  parallel_for_output(bytes, run_bytes, 0, N * S, grain, [&](auto stream, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c0 = 0; c0 < C; c0 += kBlock) f(Step<1>{}, stream, r * C + c0, c0, std::min(kBlock, C - c0));
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

// A per-channel coefficient for a run whose element i belongs to channel c + i * kStep
// (p points at channel c's): vec(i) gives lanes i..i+L-1, one broadcast channel (kStep 0)
// or consecutive channels (kStep 1). The broadcast is made once, before the run's loop:
// read through p at every vector, it was reloaded after each store (stores go through
// memcpy, which may alias p).
template <int64_t kStep, typename A>
struct Coef {
  const A* p;
  vec_t<A> broadcast;
  explicit Coef(const A* q) : p(q), broadcast(vec_t<A>{} + q[0]) {}
  vec_t<A> vec(int64_t i) const {
    if constexpr (kStep == 0) {
      return broadcast;
    } else {
      return loadu(p + i);
    }
  }
};

// The first n (< kLanes) values at p in a vector, the other lanes zero.
template <typename T, typename A = acc_t<T>>
inline vec_t<A> load_part(const T* p, int64_t n) {
  T buf[kLanes<A>] = {};
  std::copy(p, p + n, buf);
  return load_vec(buf);
}

// Loads vector j of a column chunk of a kNSC row; with kPartial, the chunk is one vector
// with `last` valid lanes.
template <bool kPartial, typename T>
inline auto load_chunk(const T* p, int64_t j, int64_t last) {
  if constexpr (kPartial) {
    return load_part(p, last);
  } else {
    return load_vec(p + j * kLanes<acc_t<T>>);
  }
}

// kNSC sums of two per-element terms over the rows of row block k, per channel, into
// s0[c] and s1[c]. Each thread sweeps its row blocks row by row, all channels (sequential
// reads, RowSweep's prefetch of the tensors in `prefetch`; the partial sums live in
// memory): the terms of kWidenGroup rows are summed in A, then added into S (double, or
// float for the statistics of 16-bit types), in an order fixed by the shape.
// terms(partial, c, last) gives, for the channel vector at c, a function row(q, t0, t1)
// adding row q's two terms to t0 and t1.
// Measured side by side on this project's benchmark machine for the backward sums
// against sweeping tile by tile (a chunk of channels down 256 rows, sums in registers;
// same sums in the same order): 1.3x-2.0x faster on (8192, 1024) float, 1.2x-1.6x on
// bfloat16 (8192, 1024), (32768, 256) and (32, 256, 28, 28) channels_last, no slower on
// small tensors.
template <typename T, typename A, typename S, size_t kTensors, typename F>
void nsc_block_sums(const NscBlocks& blocks, const RowSweep<T, A>& sweep, int64_t k,
                    const std::array<const T*, kTensors>& prefetch, S* s0, S* s1, F&& terms) {
  constexpr int64_t D = kLanes<A> / kLanes<S>, LD = kLanes<S>;
  const int64_t C = blocks.C;
  std::fill(s0, s0 + C, S(0));
  std::fill(s1, s1 + C, S(0));
  const int64_t r0 = k * blocks.rb, r1 = r0 + blocks.block_rows(k);
  for (int64_t r = r0; r < r1; r += kWidenGroup) {
    const int64_t q1 = std::min(r1, r + kWidenGroup);
    sweep.chunks(r, prefetch, [&](auto partial, int64_t c, int64_t last) {
      constexpr bool kPartial = decltype(partial)::value;
      const auto row = terms(partial, c, last);
      vec_t<A> t0 = {}, t1 = {};
      for (int64_t q = r; q < q1; ++q) row(q, t0, t1);
      vec_t<S> d0[D], d1[D];
      for (int64_t d = 0; d < D; ++d) {
        d0[d] = kPartial ? vec_t<S>{} : loadu(s0 + c + d * LD);
        d1[d] = kPartial ? vec_t<S>{} : loadu(s1 + c + d * LD);
      }
      add_lanes(d0, t0);
      add_lanes(d1, t1);
      if constexpr (kPartial) {
        for (int64_t i = 0; i < last; ++i) {
          s0[c + i] += d0[i / LD][i % LD];
          s1[c + i] += d1[i / LD][i % LD];
        }
      } else {
        for (int64_t d = 0; d < D; ++d) {
          store_vec(s0 + c + d * LD, d0[d]);
          store_vec(s1 + c + d * LD, d1[d]);
        }
      }
    });
  }
}

// kNSC moments of each row block (blocks.rb rows) and channel, in one sweep
// (nsc_block_sums): sums of d = x - a and d * d, shifted by the block's first row a, so
// that mean = a + sum d / n and M2 = sum d^2 - (sum d)^2 / n, as ln::runs_moments does
// for kNCS runs. For float and double x the sums are added in double every kWidenGroup
// rows: summed in float down a block of 256 rows, the cancellation of that M2 gave 10x
// torch's error in y on float (300, 2100). For 16-bit x (8 or 11 significant bits),
// float sums lose nothing that matters and take no conversions. Against the previous
// two sweeps (column sums for a shift at the block mean, then the sums of d from L2), one
// thread, medians of 4 alternating processes: bf16 (32, 256, 28, 28) channels_last
// 0.85 -> 0.59 ms, (8192, 1024) 1.37 -> 0.90 ms, cache-resident (2048, 256) 0.076 ->
// 0.058 ms; float (32, 256, 28, 28) channels_last 1.93 -> 1.34 ms, (8192, 1024) 3.55 ->
// 2.89 ms, cache-resident unchanged.
template <typename T, typename A>
void nsc_moments(const NscBlocks& blocks, const T* x, double* part_mean, double* part_m2) {
  using S = stat_sum_t<T>;
  const int64_t C = blocks.C;
  const RowSweep<T, A> sweep(blocks.rows, C);
  at::parallel_for(0, blocks.count, 1, [&](int64_t k0, int64_t k1) {
    std::vector<A> shift(C);
    std::vector<S> sums(4 * C);  // sum d and sum d*d, then the same of d scaled
    S* sd = sums.data();
    S* sdd = sd + C;
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r0 = k * blocks.rb;
      // A non-finite shift would turn every d into NaN: 0 instead lets an inf reach the
      // mean as in torch (mean inf, variance NaN).
      for (int64_t c = 0; c < C; ++c) {
        const A a = to_acc<A>(x[r0 * C + c]);
        shift[c] = std::isfinite(a) ? a : A(0);
      }
      // With d times ln::kOverflowScale when scaled, as ln::runs_moments; a channel whose
      // first sums are finite keeps them (scaled, its small squares would underflow).
      auto sweep_sums = [&](auto scaled, S* s0, S* s1) {
        nsc_block_sums(blocks, sweep, k, std::array<const T*, 1>{x}, s0, s1, [&](auto partial, int64_t c,
                                                                               int64_t last) {
          constexpr bool kP = decltype(partial)::value;
          const vec_t<A> a = load_chunk<kP>(shift.data() + c, 0, last);
          return [=](int64_t q, vec_t<A>& t0, vec_t<A>& t1) {
            vec_t<A> d = load_chunk<kP>(x + q * C + c, 0, last) - a;
            if constexpr (decltype(scaled)::value) d *= ln::kOverflowScale<A>;
            t0 += d;
            t1 += d * d;
          };
        });
      };
      auto finite = [&](int64_t c) { return std::isfinite(sd[c]) && std::isfinite(sdd[c]); };
      sweep_sums(std::false_type{}, sd, sdd);
      bool rescaled = false;
      for (int64_t c = 0; c < C && !rescaled; ++c) rescaled = !finite(c);
      if (rescaled) sweep_sums(std::true_type{}, sdd + C, sdd + 2 * C);  // overflowed, or non-finite data
      const double n = static_cast<double>(blocks.block_rows(k));
      for (int64_t c = 0; c < C; ++c) {
        const bool scaled = !finite(c);
        const double u = scaled ? 1 / static_cast<double>(ln::kOverflowScale<A>) : 1.0;
        const double s = static_cast<double>(scaled ? sdd[C + c] : sd[c]), s1 = s * u;
        const double m2 = (static_cast<double>(scaled ? sdd[2 * C + c] : sdd[c]) - s * (s / n)) * u * u;
        part_mean[k * C + c] = static_cast<double>(shift[c]) + s1 / n;
        // keeps a NaN; beyond double's range (double data only): NaN, as ln::runs_moments
        part_m2[k * C + c] = std::isinf(m2) ? std::numeric_limits<double>::quiet_NaN() : m2 < 0 ? 0.0 : m2;
      }
    }
  });
}

// Channel c's moments from the moments of its kNCS runs, merged in channel_runs order.
template <typename S>
Moments<double> merge_runs(const NcsRuns& runs, const std::vector<Moments<S>>& part, int64_t c) {
  return merge_parts([&](auto&& f) {
    runs.channel_runs(c, [&](int64_t r) { f(part[r].count, part[r].mean, part[r].m2); });
  });
}

// Exact moments of every channel: per run / row block (stat_sum_t), merged in double.
template <typename T, typename A = acc_t<T>>
std::vector<Moments<double>> channel_moments(const BatchNormFwdParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const int64_t C = p.C;
  std::vector<Moments<double>> out(C);
  if (p.layout == BatchNormLayout::kNCS) {
    const NcsRuns runs(p.N, C, p.S, /*group_planes=*/true);
    std::vector<Moments<stat_sum_t<T>>> part(runs.count());
    runs.parallel([&](int64_t, int64_t off, int64_t len, int64_t r, int64_t np) {
      part[r] = ln::runs_moments(x + off, np, runs.plane_stride(), len);
    });
    for_channels(C, runs.plane_blocks * runs.per_plane, [&](int64_t c) { out[c] = merge_runs(runs, part, c); });
    return out;
  }
  const NscBlocks blocks(p.N * p.S, C);
  std::vector<double> part_mean(blocks.partials()), part_m2(blocks.partials());
  nsc_moments<T, A>(blocks, x, part_mean.data(), part_m2.data());
  // merge_parts per channel, row block by row block over a range of channels at a time
  // (the partials are stored by row block).
  at::parallel_for(0, C, 64, [&](int64_t c0, int64_t c1) {
    const double n = static_cast<double>(blocks.rows);
    for (int64_t c = c0; c < c1; ++c) out[c] = Moments<double>{n, 0.0, 0.0};
    for (int64_t k = 0; k < blocks.count; ++k) {
      const double cnt = static_cast<double>(blocks.block_rows(k));
      for (int64_t c = c0; c < c1; ++c) out[c].mean += cnt * part_mean[k * C + c];
    }
    for (int64_t c = c0; c < c1; ++c) out[c].mean /= n;
    for (int64_t k = 0; k < blocks.count; ++k) {
      const double cnt = static_cast<double>(blocks.block_rows(k));
      for (int64_t c = c0; c < c1; ++c) {
        const double d = part_mean[k * C + c] - out[c].mean;
        out[c].m2 += part_m2[k * C + c] + cnt * d * d;
      }
    }
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

// y = x * scale + shift for a run, converting in registers.
template <int64_t kStep, bool kStream, typename T, typename A>
inline void scale_shift_run(const T* __restrict x, int64_t n, const A* __restrict scale, const A* __restrict shift,
                            T* __restrict y) {
  const Coef<kStep, A> sc(scale), sh(shift);
  store_loop<kStream>(
      y, n, [&](int64_t i) { return load_vec(x + i) * sc.vec(i) + sh.vec(i); },
      [&](int64_t i) { return to_acc<A>(x[i]) * scale[i * kStep] + shift[i * kStep]; });
}

// A kNCS training pass (forward or backward) in blocks of channels, each of them read
// once from memory: the sums of the channels [c0, c1) over the same runs as the
// whole-tensor reduction, added per channel in the same order (so the results are bitwise
// those of the two passes), then the elementwise pass over the block while it is still in
// its core's L2: at most kFuseBlockBytes of each input (x; x and dy; the forward's are
// smaller, see kFuseForwardBytes), channel_bytes per channel and input. A block's
// elementwise pass needs its sums, so a core that did them one after the other would read
// (the sums) and then write (the elementwise pass) instead of both at once as a copy does:
// each task therefore takes its blocks in order and does the sums of a block while it
// writes the block before (ChannelBlocks::pipeline).
// Blocks are not used (count 0) when one channel exceeds the block, when there are fewer
// than 8 blocks per thread (uneven shares), or when the inputs are smaller than
// stream_threshold_bytes() (the threads' caches keep them between two passes anyway:
// bfloat16 8x1024x14x14 forward measured 0.87x in blocks).
// Measured on the 2-core Xeon in alternating processes against the two passes, before the
// pipeline. Training forward, ratio to torch's time (6 pairs, blocks of 256 KiB): bfloat16
// 32x256x28x28 1.59x -> 1.76-1.79x, float32 16x256x1024 3.7x -> 4.2-4.5x, bfloat16
// 64x256x1024 5.3x -> 5.5-5.7x, bfloat16 8x256x56x56 unchanged; blocks of 128 KiB to 1.5
// MiB were within the noise of each other. Backward, ms (4 runs): 512 KiB per input gave
// bfloat16 32x256x28x28 1.49 -> 1.42, float32 32x256x28x28 2.51 -> 1.81, bfloat16
// 8x256x56x56 1.28 -> 1.15, bfloat16 64x256x1024 5.02 -> 3.99, float32 16x256x1024 1.36 ->
// 1.17; 256 KiB for both inputs together made bfloat16 32x256x28x28 slower (1.51 -> 1.87:
// 2 channels per block, 3 KiB read contiguously per plane), and 1 MiB per input was no
// better than 512 KiB.
// The forward's blocks are smaller (kFuseForwardBytes, or one channel of up to
// kFuseBlockBytes): with the pipeline, in-process against 512 KiB (8 rounds), 256 KiB
// measured 1.09x-1.10x on bfloat16 32x256x28x28, 1.02x on 8x256x56x56, 0.99x on
// 64x256x1024 and 1.01x on float32 32x256x28x28 and 16x256x1024; 128 KiB 1.13x on the
// first but 0.95x-0.97x on float32 32x256x28x28 and bfloat16 64x256x1024; 768 KiB and
// 1 MiB 0.86x-0.96x.
constexpr int64_t kFuseBlockBytes = 512 << 10, kFuseForwardBytes = 256 << 10;
struct ChannelBlocks {
  const NcsRuns& runs;
  int64_t per_block, count;
  ChannelBlocks(const NcsRuns& r, int64_t channel_bytes, int64_t block_bytes = kFuseBlockBytes)
      : runs(r), per_block(0), count(0) {
    if (channel_bytes == 0 || channel_bytes > kFuseBlockBytes) return;
    const int64_t per = std::max<int64_t>(1, block_bytes / channel_bytes), blocks = (r.C + per - 1) / per;
    if (blocks < 8 * at::get_num_threads() || r.C * channel_bytes < stream_threshold_bytes()) return;
    per_block = per;
    count = blocks;
  }
  int64_t lo(int64_t b) const { return b * per_block; }
  int64_t hi(int64_t b) const { return std::min(runs.C, (b + 1) * per_block); }

  // f(k, offset, len) over the runs (of at most kBlock values) of plane (n, c).
  template <typename F>
  void plane_runs(int64_t n, int64_t c, F&& f) const {
    for (int64_t k = 0, s0 = 0; k < runs.per_plane; ++k, s0 += kBlock)
      f(k, (n * runs.C + c) * runs.S + s0, std::min(kBlock, runs.S - s0));
  }

  // The blocks in parallel (`bytes` and `run_bytes`: the elementwise pass's, for
  // parallel_for_output), each task pipelining its range of blocks:
  //   sums(c0, c1)                   the sums of a block's runs (runs.channel_block_runs)
  //   done(c0, c1)                   adds them per channel, sets the elementwise coefficients
  //   elementwise(stream, off, c, len)  the elementwise pass of one run
  //   paired(stream, r, off, c, off_prev, c_prev, len)  the sums of run r (of one plane, at
  //                                  off, channel c) while doing the elementwise pass of the
  //                                  run at off_prev (channel c_prev, same length)
  // A task does sums and done of its first block; then, for each next block, its sums
  // paired with the elementwise pass of the block before, run j of plane n with run j of
  // plane n (the elementwise passes of the previous block's extra channels when it has
  // more), and done; and last the elementwise pass of its last block. Runs that cover
  // several planes (short planes, runs.planes > 1) are not paired: the task then does the
  // elementwise pass of the block before and the sums one after the other.
  // paired may be nullptr: no pairing.
  // Measured in-process against the unpaired order (bitwise the same results; medians of
  // 8 rounds, 2-core Xeon), training forward: bfloat16 32x256x28x28 1.06x-1.09x,
  // 8x256x56x56 1.16x-1.24x, 64x256x1024 1.09x-1.10x; float32 32x256x28x28 1.16x-1.23x,
  // 8x256x56x56 1.21x, 16x256x1024 1.11x-1.22x. The backward is not paired: its sums
  // (dy and dy * (x - mean), in double lanes) paired with dx measured 0.90x on bfloat16
  // 32x256x28x28, 0.95x on float32, 0.99x on float32 16x256x1024, and 1.11x-1.14x on
  // bfloat16 8x256x56x56 and 64x256x1024.
  template <typename Sums, typename Done, typename Elementwise, typename Paired>
  void pipeline(int64_t bytes, int64_t run_bytes, Sums&& sums, Done&& done, Elementwise&& elementwise,
                Paired&& paired) const {
    parallel_for_output(bytes, run_bytes, 0, count, 1, [&](auto stream, int64_t b0, int64_t b1) {
      // The elementwise pass of planes [c0, c1) of sample n.
      auto elementwise_planes = [&](int64_t n, int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c)
          plane_runs(n, c, [&](int64_t, int64_t off, int64_t len) { elementwise(stream, off, c, len); });
      };
      auto elementwise_block = [&](int64_t c0, int64_t c1) {
        for (int64_t n = 0; n < runs.N; ++n) elementwise_planes(n, c0, c1);
      };
      sums(lo(b0), hi(b0));
      done(lo(b0), hi(b0));
      for (int64_t b = b0 + 1; b < b1; ++b) {
        const int64_t p0 = lo(b - 1), p1 = hi(b - 1), c0 = lo(b), c1 = hi(b);  // c1 - c0 <= p1 - p0
        if constexpr (!std::is_same_v<std::decay_t<Paired>, std::nullptr_t>) {
          if (runs.planes == 1) {
            const int64_t back = (p0 - c0) * runs.S;  // from a run of this block to its twin in the one before
            for (int64_t n = 0; n < runs.N; ++n) {
              for (int64_t j = 0; j < c1 - c0; ++j)
                plane_runs(n, c0 + j, [&](int64_t k, int64_t off, int64_t len) {
                  paired(stream, runs.index(n, c0 + j, k), off, c0 + j, off + back, p0 + j, len);
                });
              elementwise_planes(n, p0 + (c1 - c0), p1);
            }
            done(c0, c1);
            continue;
          }
        }
        elementwise_block(p0, p1);
        sums(c0, c1);
        done(c0, c1);
      }
      elementwise_block(lo(b1 - 1), hi(b1 - 1));
    });
  }
};

// An elementwise pass's output written from inside a sweep of sums, four vectors per step
// of 4 * kLanes values from 0 (ln::runs_moments' step): out[i] = vec(i), stored as
// store_loop stores them (streamed with kStream when out starts on a 64-byte line, cached
// otherwise). The caller then writes the values from the last whole step on.
template <bool kStream, typename T, typename FV>
struct StepStores {
  static constexpr int64_t L = kLanes<acc_t<T>>;
  T* out;
  FV vec;
  bool streamed;
  StepStores(T* o, FV v) : out(o), vec(v), streamed(kStream && reinterpret_cast<uintptr_t>(o) % kStreamAlign == 0) {}
  void operator()(int64_t i) const {
    for (int64_t q = i; q < i + 4 * L; q += L) {
      if (streamed) {
        stream_bytes(out + q, to_storage(out, vec(q)));
      } else {
        store_vec(out + q, vec(q));
      }
    }
  }
  static int64_t done(int64_t n) { return n / (4 * L) * (4 * L); }
};

// kNCS training forward in blocks of channels (ChannelBlocks): set(c, moments) gives
// channel c's scale and shift.
template <typename T, typename A, typename Set>
bool fused_ncs_forward(const BatchNormFwdParams& p, const A* scale, const A* shift, std::vector<Moments<double>>& m,
                       Set&& set) {
  const int64_t C = p.C, S = p.S, elem = static_cast<int64_t>(sizeof(T));
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const NcsRuns runs(p.N, C, S, /*group_planes=*/true);
  const ChannelBlocks blocks(runs, p.N * S * elem, kFuseForwardBytes);
  if (blocks.count == 0) return false;
  std::vector<Moments<stat_sum_t<T>>> part(runs.count());
  blocks.pipeline(
      p.N * C * S * 2 * elem, std::min(kBlock, S) * elem,
      [&](int64_t c0, int64_t c1) {
        runs.channel_block_runs(c0, c1, [&](int64_t, int64_t off, int64_t len, int64_t r, int64_t np) {
          part[r] = ln::runs_moments(x + off, np, runs.plane_stride(), len);
        });
      },
      [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) set(c, m[c] = merge_runs(runs, part, c));
      },
      [&](auto stream, int64_t off, int64_t c, int64_t len) {
        scale_shift_run<0, decltype(stream)::value>(x + off, len, scale + c, shift + c, y + off);
      },
      [&](auto stream, int64_t r, int64_t off, int64_t, int64_t off_prev, int64_t c_prev, int64_t len) {
        constexpr bool kS = decltype(stream)::value;
        const vec_t<A> sc = vec_t<A>{} + scale[c_prev], sh = vec_t<A>{} + shift[c_prev];
        const T* xp = x + off_prev;
        auto vec = [=](int64_t i) { return load_vec(xp + i) * sc + sh; };
        const StepStores<kS, T, decltype(vec)> stores(y + off_prev, vec);
        part[r] = ln::runs_moments(x + off, 1, 0, len, stores);
        const int64_t d = stores.done(len);
        scale_shift_run<0, kS>(xp + d, len - d, scale + c_prev, shift + c_prev, y + off_prev + d);
      });
  return true;
}

template <typename T, typename W>
void forward(const BatchNormFwdParams& p) {
  using A = acc_t<T>;
  const int64_t C = p.C;
  A* mean = static_cast<A*>(p.save_mean);
  A* invstd = static_cast<A*>(p.save_invstd);
  const std::vector<A> w = ln::widen_param<A, W>(p.weight, C);
  const std::vector<A> b = ln::widen_param<A, W>(p.bias, C);
  std::vector<A> scale(C), shift(C);
  // Channel c's saved statistics, scale and shift.
  auto set = [&](int64_t c, A channel_mean, A channel_invstd) {
    mean[c] = channel_mean;
    invstd[c] = channel_invstd;
    batch_norm_scale_shift(channel_mean, channel_invstd, w.empty() ? A(1) : w[c], b.empty() ? A(0) : b[c], scale[c],
                           shift[c]);
  };
  auto set_moments = [&](int64_t c, const Moments<double>& m) {
    set(c, static_cast<A>(m.mean), static_cast<A>(moments_rstd(m, p.eps)));
  };
  if (p.training) {
    std::vector<Moments<double>> m(C);
    const bool fused = p.layout == BatchNormLayout::kNCS &&
                       fused_ncs_forward<T>(p, scale.data(), shift.data(), m, set_moments);
    if (!fused) {
      m = channel_moments<T>(p);
      for (int64_t c = 0; c < C; ++c) set_moments(c, m[c]);
    }
    if (p.new_running_mean) update_running_stats<W>(p, m);
    if (fused) return;
  } else {
    const W* rm = static_cast<const W*>(p.running_mean);
    const W* rv = static_cast<const W*>(p.running_var);
    for (int64_t c = 0; c < C; ++c)
      set(c, to_acc<A>(rm[c]), static_cast<A>(fn_rsqrt(to_acc<double>(rv[c]) + p.eps)));
  }
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const int64_t bytes = p.N * C * p.S * 2 * static_cast<int64_t>(sizeof(T));
  for_each_run<T>(p.N, C, p.S, p.layout, bytes, [&](auto step, auto stream, int64_t off, int64_t c, int64_t len) {
    scale_shift_run<decltype(step)::value, decltype(stream)::value>(x + off, len, scale.data() + c, shift.data() + c,
                                                                     y + off);
  });
}

// sum dy and sum dy * (x - mean) over `runs` runs of n values of one channel (run r at
// offset r * stride): products and groups of kWidenGroup in A, sums in double lanes (long,
// cancelling sums stay as accurate as torch's), folded once at the end.
template <typename T, typename A>
inline void grad_sums_runs(const T* __restrict x, const T* __restrict dy, int64_t runs, int64_t stride, int64_t n,
                           A mean, double& sum_dy, double& sum_dyx) {
  constexpr int64_t L = kLanes<A>, D = kDoubleVecs<A>, kGroupBytes = kWidenGroup * L * static_cast<int64_t>(sizeof(T));
  static_assert(kWidenGroup % 2 == 0, "the group is loaded in pairs of vectors");
  vec_t<double> s[D] = {}, sx[D] = {};
  double tail = 0, tail_x = 0;
  for (int64_t run = 0; run < runs; ++run) {
    const T* xr = x + run * stride;
    const T* dyr = dy + run * stride;
    int64_t i = 0;
    for (; i + kWidenGroup * L <= n; i += kWidenGroup * L) {
      if (runs == 1) {
        prefetch_ahead(dyr + i, kGroupBytes);
        prefetch_ahead(xr + i, kGroupBytes);
      }
      vec_t<A> gs = {}, ps = {};
      for (int64_t q = 0; q < kWidenGroup; q += 2) {
        vec_t<A> g0, g1, x0, x1;
        load_pair(dyr + i + q * L, g0, g1);
        load_pair(xr + i + q * L, x0, x1);
        gs += g0;
        gs += g1;
        ps = mul_add(g0, x0 - mean, ps);
        ps = mul_add(g1, x1 - mean, ps);
      }
      add_lanes(s, gs);
      add_lanes(sx, ps);
    }
    for (; i + L <= n; i += L) {
      const vec_t<A> g = load_vec(dyr + i);
      add_lanes(s, g);
      add_lanes(sx, g * (load_vec(xr + i) - mean));
    }
    for (; i < n; ++i) {
      const A g = to_acc<A>(dyr[i]);
      tail += static_cast<double>(g);
      tail_x += static_cast<double>(g * (to_acc<A>(xr[i]) - mean));
    }
  }
  for (int64_t j = 1; j < D; ++j) {
    s[0] += s[j];
    sx[0] += sx[j];
  }
  sum_dy = fold_lanes<double>(s[0], tail);
  sum_dyx = fold_lanes<double>(sx[0], tail_x);
}

// kNSC backward sums, per (row block of blocks.rb rows, channel): sums of dy and
// dy * (x - mean) (nsc_block_sums).
template <typename T, typename A>
void nsc_grad_sums(const NscBlocks& blocks, const T* x, const T* dy, const A* mean, double* part_s,
                   double* part_sx) {
  const int64_t C = blocks.C;
  const RowSweep<T, A> sweep(blocks.rows, C);
  at::parallel_for(0, blocks.count, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      nsc_block_sums(blocks, sweep, k, std::array<const T*, 2>{x, dy}, part_s + k * C, part_sx + k * C,
                     [&](auto partial, int64_t c, int64_t last) {
                       constexpr bool kP = decltype(partial)::value;
                       const vec_t<A> m = load_chunk<kP>(mean + c, 0, last);
                       return [=](int64_t q, vec_t<A>& t0, vec_t<A>& t1) {
                         const vec_t<A> g = load_chunk<kP>(dy + q * C + c, 0, last);
                         t0 += g;
                         t1 += g * (load_chunk<kP>(x + q * C + c, 0, last) - m);
                       };
                     });
    }
  });
}

// Channel c's backward sums from those of its kNCS runs (run r: part[2r], part[2r + 1]),
// added in channel_runs order.
inline void add_runs(const NcsRuns& runs, const std::vector<double>& part, int64_t c, double& s, double& sx) {
  s = 0;
  sx = 0;
  runs.channel_runs(c, [&](int64_t r) {
    s += part[2 * r];
    sx += part[2 * r + 1];
  });
}

// Per channel: sum dy and sum dy * (x - mean), per run / row block, added in double.
template <typename T, typename A = acc_t<T>>
void channel_grad_sums(const BatchNormBwdParams& p, std::vector<double>& sum_dy, std::vector<double>& sum_dyx) {
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const A* mean = static_cast<const A*>(p.mean);
  const int64_t C = p.C;
  if (p.layout == BatchNormLayout::kNCS) {
    const NcsRuns runs(p.N, C, p.S, /*group_planes=*/true);
    std::vector<double> part(2 * runs.count());
    runs.parallel([&](int64_t c, int64_t off, int64_t len, int64_t r, int64_t np) {
      grad_sums_runs(x + off, dy + off, np, runs.plane_stride(), len, mean[c], part[2 * r], part[2 * r + 1]);
    });
    for_channels(C, runs.plane_blocks * runs.per_plane,
                 [&](int64_t c) { add_runs(runs, part, c, sum_dy[c], sum_dyx[c]); });
    return;
  }
  const NscBlocks blocks(p.N * p.S, C);
  std::vector<double> part_s(blocks.partials()), part_sx(blocks.partials());
  nsc_grad_sums(blocks, x, dy, mean, part_s.data(), part_sx.data());
  // Per channel, row block by row block (in that fixed order), over a range of channels.
  at::parallel_for(0, C, 64, [&](int64_t c0, int64_t c1) {
    std::fill(sum_dy.begin() + c0, sum_dy.begin() + c1, 0.0);
    std::fill(sum_dyx.begin() + c0, sum_dyx.begin() + c1, 0.0);
    for (int64_t k = 0; k < blocks.count; ++k) {
      for (int64_t c = c0; c < c1; ++c) {
        sum_dy[c] += part_s[k * C + c];
        sum_dyx[c] += part_sx[k * C + c];
      }
    }
  });
}

// dx of a run; per-channel coefficients as in batch_norm_dx (norm_math.h).
template <int64_t kStep, bool kStream, typename T, typename A>
inline void dx_run(const T* __restrict x, const T* __restrict dy, int64_t n, const A* __restrict mean,
                   const A* __restrict a, const A* __restrict k, const A* __restrict mean_dy, T* __restrict out) {
  const Coef<kStep, A> cm(mean), ca(a), ck(k), cmd(mean_dy);
  store_loop<kStream>(
      out, n,
      [&](int64_t i) {
        return batch_norm_dx(load_vec(dy + i), load_vec(x + i), cm.vec(i), ca.vec(i), ck.vec(i), cmd.vec(i));
      },
      [&](int64_t i) {
        return batch_norm_dx(to_acc<A>(dy[i]), to_acc<A>(x[i]), mean[i * kStep], a[i * kStep], k[i * kStep],
                             mean_dy[i * kStep]);
      });
}

template <int64_t kStep, bool kStream, typename T, typename A>
inline void dx_eval_run(const T* __restrict dy, int64_t n, const A* __restrict a, T* __restrict out) {
  const Coef<kStep, A> ca(a);
  store_loop<kStream>(
      out, n, [&](int64_t i) { return load_vec(dy + i) * ca.vec(i); },
      [&](int64_t i) { return to_acc<A>(dy[i]) * a[i * kStep]; });
}

// The per-channel coefficients of dx (batch_norm_dx, norm_math.h), from the channel's sums
// over n values, and dx of a run with them.
template <typename T, typename W>
struct DxCoefs {
  using A = acc_t<T>;
  const BatchNormBwdParams& p;
  const A* invstd;
  std::vector<A> w, a, k, mean_dy;
  double inv_n;
  DxCoefs(const BatchNormBwdParams& params, double n)
      : p(params), invstd(static_cast<const A*>(params.invstd)), w(ln::widen_param<A, W>(params.weight, params.C)),
        a(params.C), k(params.C), mean_dy(params.C), inv_n(1.0 / n) {}
  void set(int64_t c, double sum_dy, double sum_dyx) {
    a[c] = invstd[c] * (w.empty() ? A(1) : w[c]);
    k[c] = static_cast<A>(static_cast<double>(invstd[c]) * invstd[c] * sum_dyx * inv_n);
    mean_dy[c] = static_cast<A>(sum_dy * inv_n);
  }
  // dx of the run of len elements at offset off, element i of channel c + i * kStep.
  template <int64_t kStep, bool kStream>
  void run(int64_t off, int64_t c, int64_t len) const {
    const T* dy = static_cast<const T*>(p.dy) + off;
    T* dx = static_cast<T*>(p.dx) + off;
    if (p.training) {
      dx_run<kStep, kStream>(static_cast<const T*>(p.x) + off, dy, len, static_cast<const A*>(p.mean) + c,
                             a.data() + c, k.data() + c, mean_dy.data() + c, dx);
    } else {
      dx_eval_run<kStep, kStream>(dy, len, a.data() + c, dx);
    }
  }
};

// dx from the per-channel sums over n values per channel (elementwise phase).
template <typename T, typename W>
void backward_dx(const BatchNormBwdParams& p, const std::vector<double>& sum_dy, const std::vector<double>& sum_dyx,
                 double n) {
  DxCoefs<T, W> coefs(p, n);
  for (int64_t c = 0; c < p.C; ++c) coefs.set(c, sum_dy[c], sum_dyx[c]);
  const int64_t bytes = p.N * p.C * p.S * (p.training ? 3 : 2) * static_cast<int64_t>(sizeof(T));
  for_each_run<T>(p.N, p.C, p.S, p.layout, bytes, [&](auto step, auto stream, int64_t off, int64_t c, int64_t len) {
    coefs.template run<decltype(step)::value, decltype(stream)::value>(off, c, len);
  });
}

// kNCS training backward in blocks of channels (ChannelBlocks): the sums of
// channel_grad_sums, then dx.
template <typename T, typename W>
bool fused_ncs_backward(const BatchNormBwdParams& p, std::vector<double>& sum_dy, std::vector<double>& sum_dyx) {
  using A = acc_t<T>;
  const int64_t C = p.C, S = p.S, elem = static_cast<int64_t>(sizeof(T));
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const A* mean = static_cast<const A*>(p.mean);
  const NcsRuns runs(p.N, C, S, /*group_planes=*/true);
  const ChannelBlocks blocks(runs, p.N * S * elem);
  if (blocks.count == 0) return false;
  std::vector<double> part(2 * runs.count());
  DxCoefs<T, W> coefs(p, static_cast<double>(p.N * S));
  blocks.pipeline(
      p.N * C * S * 3 * elem, std::min(kBlock, S) * elem,
      [&](int64_t c0, int64_t c1) {
        runs.channel_block_runs(c0, c1, [&](int64_t c, int64_t off, int64_t len, int64_t r, int64_t np) {
          grad_sums_runs(x + off, dy + off, np, runs.plane_stride(), len, mean[c], part[2 * r], part[2 * r + 1]);
        });
      },
      [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          add_runs(runs, part, c, sum_dy[c], sum_dyx[c]);
          coefs.set(c, sum_dy[c], sum_dyx[c]);
        }
      },
      [&](auto stream, int64_t off, int64_t c, int64_t len) {
        coefs.template run<0, decltype(stream)::value>(off, c, len);
      },
      nullptr);
  return true;
}

template <typename T, typename W>
void backward(const BatchNormBwdParams& p) {
  using A = acc_t<T>;
  const int64_t C = p.C;
  const A* invstd = static_cast<const A*>(p.invstd);
  std::vector<double> sum_dy(C), sum_dyx(C);
  const bool fused =
      p.training && p.layout == BatchNormLayout::kNCS && fused_ncs_backward<T, W>(p, sum_dy, sum_dyx);
  if (!fused && (p.training || p.dweight || p.dbias)) channel_grad_sums<T>(p, sum_dy, sum_dyx);
  for (int64_t c = 0; c < C; ++c) {
    if (p.dweight) static_cast<W*>(p.dweight)[c] = from_acc<W>(static_cast<A>(sum_dyx[c] * invstd[c]));
    if (p.dbias) static_cast<W*>(p.dbias)[c] = from_acc<W>(static_cast<A>(sum_dy[c]));
  }
  if (!fused) backward_dx<T, W>(p, sum_dy, sum_dyx, static_cast<double>(p.N * p.S));
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
