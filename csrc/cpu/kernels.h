// Entry points of the CPU kernels. Torch-free declarations; each dispatches at run time
// to the widest instruction set this processor supports (see cpu_dispatch.cpp).
#pragma once
#include <cstdint>

#include "../params.h"

namespace fused_norm {

void layer_norm_fwd_cpu(const LayerNormFwdParams& p);
void layer_norm_bwd_cpu(const LayerNormBwdParams& p);
void batch_norm_fwd_cpu(const BatchNormFwdParams& p);
void batch_norm_bwd_cpu(const BatchNormBwdParams& p);
// The phases of a synchronized BatchNorm (see params.h).
void batch_norm_stats_cpu(const BatchNormFwdParams& p);
void batch_norm_bwd_reduce_cpu(const BatchNormBwdParams& p);
void batch_norm_bwd_elemt_cpu(const BatchNormBwdParams& p);

// "baseline" (x86-64 SSE2), "avx2" (AVX2+FMA+F16C), "avx512" (F/BW/VL/DQ) or
// "avx512bf16" (avx512 and AVX512_BF16).
const char* cpu_capability();
// Selects a capability (for tests and benchmarks); returns false if the processor
// lacks it or the name is unknown.
bool set_cpu_capability(const char* name);

// Outputs of a call whose memory footprint (bytes read and written) is at least this many
// bytes are written with non-temporal stores: they would not stay in cache with the
// inputs anyway, and bypassing it saves the read for ownership. Default (cpu_dispatch.cpp):
// the last-level cache (sysfs; 32 MiB when unknown), or on Intel the L2 of the threads in
// use (at::get_num_threads()) when smaller. Settable for tests and tuning (0: always; -1
// restores the default).
int64_t stream_threshold_bytes();
void set_stream_threshold_bytes(int64_t bytes);

}  // namespace fused_norm
