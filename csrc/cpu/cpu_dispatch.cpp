// Run-time choice of the CPU kernels' instruction set: the widest the processor
// supports, unless FUSED_NORM_CPU_CAPABILITY (or set_cpu_capability) asks for a
// narrower one.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>

#include "prelude.h"

namespace fused_norm {

extern const CpuKernels kernels_baseline;
extern const CpuKernels kernels_avx2;
extern const CpuKernels kernels_avx512;
extern const CpuKernels kernels_avx512bf16;

namespace {

struct Capability {
  const char* name;
  const CpuKernels* kernels;
  bool (*supported)();
};

bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
bool has_avx512bf16() { return has_avx512() && __builtin_cpu_supports("avx512bf16"); }

// Widest first.
const Capability kCapabilities[] = {
    {"avx512bf16", &kernels_avx512bf16, has_avx512bf16},
    {"avx512", &kernels_avx512, has_avx512},
    {"avx2", &kernels_avx2, has_avx2},
    {"baseline", &kernels_baseline, [] { return true; }},
};

const Capability* find(const char* name) {
  for (const Capability& c : kCapabilities)
    if (std::strcmp(c.name, name) == 0 && c.supported()) return &c;
  return nullptr;
}

const Capability* initial() {
  const char* env = std::getenv("FUSED_NORM_CPU_CAPABILITY");
  if (env && *env) {
    if (const Capability* c = find(env)) return c;
  }
  for (const Capability& c : kCapabilities)
    if (c.supported()) return &c;
  return &kCapabilities[std::size(kCapabilities) - 1];  // baseline
}

std::atomic<const Capability*>& active() {
  static std::atomic<const Capability*> a{initial()};
  return a;
}

// Sizes of cpu0's caches, from sysfs (Linux). glibc's sysconf can report the host's cache
// in a virtual machine (320 MiB on an AMD EPYC VM whose guest has 32 MiB).
struct CacheSizes {
  int64_t l2 = 0;                   // per core; 0 when unknown
  int64_t llc = int64_t{32} << 20;  // the last level; 32 MiB when unknown
};

CacheSizes read_cache_sizes() {
  CacheSizes sizes;
  int64_t best_level = 0;
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::ifstream level_file(dir + "level"), size_file(dir + "size");
    int64_t level = 0, size = 0;
    std::string unit;
    if (!(level_file >> level) || !(size_file >> size)) continue;
    size_file >> unit;  // "32768K"
    const int64_t bytes = size * (unit == "M" ? (1 << 20) : unit == "K" ? (1 << 10) : 1);
    if (bytes <= 0) continue;
    if (level == 2) sizes.l2 = bytes;
    if (level > best_level) {
      best_level = level;
      sizes.llc = bytes;
    }
  }
  return sizes;
}

const CacheSizes& cache_sizes() {
  static const CacheSizes sizes = read_cache_sizes();
  return sizes;
}

// Default threshold. An Intel server's last-level cache is one mesh-connected cache for
// the whole socket, shared with every other core (and tenant): on a 2-core AVX-512 Xeon VM
// (105 MiB L3 listed) one thread copied at 16 GB/s from it against 7.7 GB/s from memory,
// and streaming the outputs was faster from a 3-4 MiB footprint on (LayerNorm float32,
// 768 columns; 1.2-2x at 8-50 MiB). There the threshold is the L2 of the threads running
// the call (capped by the last level). Elsewhere (measured on an AMD EPYC VM, whose 32 MiB
// L3 served a 2-thread copy at 69-136 GB/s) it is the last-level cache.
int64_t default_stream_threshold() {
  const CacheSizes& c = cache_sizes();
#if defined(__x86_64__) || defined(__i386__)
  static const bool intel = __builtin_cpu_is("intel");
  if (intel && c.l2 > 0) return std::min(c.llc, c.l2 * static_cast<int64_t>(at::get_num_threads()));
#endif
  return c.llc;
}

std::atomic<int64_t>& stream_threshold_override() {
  static std::atomic<int64_t> t{-1};  // -1: the default
  return t;
}

}  // namespace

int64_t stream_threshold_bytes() {
  const int64_t t = stream_threshold_override().load(std::memory_order_relaxed);
  return t >= 0 ? t : default_stream_threshold();
}

void set_stream_threshold_bytes(int64_t bytes) {
  stream_threshold_override().store(bytes < 0 ? -1 : bytes, std::memory_order_relaxed);
}

const char* cpu_capability() { return active().load()->name; }

bool set_cpu_capability(const char* name) {
  const Capability* c = find(name);
  if (!c) return false;
  active().store(c);
  return true;
}

void layer_norm_fwd_cpu(const LayerNormFwdParams& p) { active().load()->kernels->layer_norm_fwd(p); }
void layer_norm_bwd_cpu(const LayerNormBwdParams& p) { active().load()->kernels->layer_norm_bwd(p); }
void batch_norm_fwd_cpu(const BatchNormFwdParams& p) { active().load()->kernels->batch_norm_fwd(p); }
void batch_norm_bwd_cpu(const BatchNormBwdParams& p) { active().load()->kernels->batch_norm_bwd(p); }
void batch_norm_stats_cpu(const BatchNormFwdParams& p) { active().load()->kernels->batch_norm_stats(p); }
void batch_norm_bwd_reduce_cpu(const BatchNormBwdParams& p) { active().load()->kernels->batch_norm_bwd_reduce(p); }
void batch_norm_bwd_elemt_cpu(const BatchNormBwdParams& p) { active().load()->kernels->batch_norm_bwd_elemt(p); }

}  // namespace fused_norm
