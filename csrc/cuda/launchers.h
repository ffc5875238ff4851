// Entry points of the CUDA kernels, called by the binding layer. Torch-free: plain
// parameter blocks and a stream. Each returns the launch's cudaError_t.
#pragma once
#include <cuda_runtime_api.h>

#include "../params.h"

namespace fused_norm {

cudaError_t layer_norm_fwd_cuda(const LayerNormFwdParams& p, cudaStream_t stream);
// Bytes of scratch layer_norm_bwd_cuda needs in p.workspace (device memory).
int64_t layer_norm_bwd_cuda_workspace_bytes(const LayerNormBwdParams& p);
cudaError_t layer_norm_bwd_cuda(const LayerNormBwdParams& p, cudaStream_t stream);

}  // namespace fused_norm
