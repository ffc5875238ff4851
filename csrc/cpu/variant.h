// One instruction set's build of all CPU kernels. A kernels_<isa>.cpp file includes
// prelude.h, switches the target ISA, defines FN_CPU_NS and includes this file.
#ifndef FN_CPU_NS
#error "define FN_CPU_NS before including variant.h"
#endif

namespace fused_norm {
namespace FN_CPU_NS {

#include "convert.h"
#include "vec_io.h"
#include "layer_norm_impl.h"
#include "batch_norm_impl.h"

}  // namespace FN_CPU_NS

extern const CpuKernels FN_CONCAT(kernels_, FN_CPU_NS);
const CpuKernels FN_CONCAT(kernels_, FN_CPU_NS) = {
    &FN_CPU_NS::layer_norm_fwd,
    &FN_CPU_NS::layer_norm_bwd,
    &FN_CPU_NS::batch_norm_fwd,
    &FN_CPU_NS::batch_norm_bwd,
    &FN_CPU_NS::batch_norm_stats,
    &FN_CPU_NS::batch_norm_bwd_reduce,
    &FN_CPU_NS::batch_norm_bwd_elemt,
};

}  // namespace fused_norm
