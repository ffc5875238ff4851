// Entry points of the CUDA kernels, called by the binding layer. Torch-free: plain
// parameter blocks and a stream. Each returns the launch's cudaError_t; the workspace
// queries return theirs too (a failed SM-count query, an unsupported dtype pair or
// sizes), so the caller can report the cause. With FN_CUDA_EMULATION the same entry
// points run the kernels on the CPU (emulator/emulator.h).
#pragma once
#include <cuda_runtime_api.h>

#include "../params.h"

namespace fused_norm {

cudaError_t layer_norm_fwd_cuda(const LayerNormFwdParams& p, cudaStream_t stream);
// Bytes of scratch layer_norm_bwd_cuda needs in p.workspace (device memory).
cudaError_t layer_norm_bwd_cuda_workspace_bytes(const LayerNormBwdParams& p, int64_t* bytes);
cudaError_t layer_norm_bwd_cuda(const LayerNormBwdParams& p, cudaStream_t stream);

// BatchNorm (see BatchNormFwdParams / BatchNormBwdParams in params.h for the exact
// math, dtypes, layouts and which pointers may be null). Both layouts (kNCS, kNSC) and
// all four x dtypes with their w_dtype are handled. No atomics; bitwise reproducible.
// The workspace (device memory, uninitialized; p.workspace is null when 0 bytes are
// asked for) must not be assumed zeroed; sizes depend only on N, C, S, layout, dtypes
// and the current device.
//
// Forward: statistics (training), running-stat update, then y. In eval only y and
// save_mean/save_invstd. num_batches_tracked is a device pointer read on the device.
cudaError_t batch_norm_fwd_cuda_workspace_bytes(const BatchNormFwdParams& p, int64_t* bytes);
cudaError_t batch_norm_fwd_cuda(const BatchNormFwdParams& p, cudaStream_t stream);
// Backward: per-channel sums (when needed), dweight/dbias, then dx.
cudaError_t batch_norm_bwd_cuda_workspace_bytes(const BatchNormBwdParams& p, int64_t* bytes);
cudaError_t batch_norm_bwd_cuda(const BatchNormBwdParams& p, cudaStream_t stream);

// The phases of a synchronized BatchNorm (params.h), which read no parameter except
// bwd_elemt's weight. Workspace: stats takes batch_norm_fwd_cuda_workspace_bytes(p),
// bwd_reduce batch_norm_bwd_cuda_workspace_bytes(p) (with p.w_dtype = p.x_dtype);
// bwd_elemt needs none. bwd_elemt reads *p.count on the device.
cudaError_t batch_norm_stats_cuda(const BatchNormFwdParams& p, cudaStream_t stream);
cudaError_t batch_norm_bwd_reduce_cuda(const BatchNormBwdParams& p, cudaStream_t stream);
cudaError_t batch_norm_bwd_elemt_cuda(const BatchNormBwdParams& p, cudaStream_t stream);

}  // namespace fused_norm
