// Run-time choice of the CPU kernels' instruction set: the widest the processor
// supports, unless FUSED_NORM_CPU_CAPABILITY (or set_cpu_capability) asks for a
// narrower one.
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "prelude.h"

namespace fused_norm {

extern const CpuKernels kernels_baseline;
extern const CpuKernels kernels_avx2;
extern const CpuKernels kernels_avx512;

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

// Widest first.
const Capability kCapabilities[] = {
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
  return &kCapabilities[2];
}

std::atomic<const Capability*>& active() {
  static std::atomic<const Capability*> a{initial()};
  return a;
}

}  // namespace

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
