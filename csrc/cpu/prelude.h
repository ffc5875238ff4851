// Headers every CPU kernel translation unit includes BEFORE it switches the target
// instruction set (see kernels_*.cpp): library code is compiled for the baseline ISA,
// only our kernels (inside the per-ISA namespace) get the wider one.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../norm_math.h"
#include "../params.h"
#include "kernels.h"

namespace fused_norm {

// Table of one instruction set's kernels; cpu_dispatch.cpp picks one at run time.
struct CpuKernels {
  void (*layer_norm_fwd)(const LayerNormFwdParams&);
  void (*layer_norm_bwd)(const LayerNormBwdParams&);
  void (*batch_norm_fwd)(const BatchNormFwdParams&);
  void (*batch_norm_bwd)(const BatchNormBwdParams&);
  void (*batch_norm_stats)(const BatchNormFwdParams&);
  void (*batch_norm_bwd_reduce)(const BatchNormBwdParams&);
  void (*batch_norm_bwd_elemt)(const BatchNormBwdParams&);
};

}  // namespace fused_norm

#define FN_CONCAT_(a, b) a##b
#define FN_CONCAT(a, b) FN_CONCAT_(a, b)
