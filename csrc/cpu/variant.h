// One instruction set's build of all CPU kernels. A kernels_<isa>.cpp file includes
// prelude.h, switches the target ISA, defines FN_CPU_NS and includes this file.
// It also defines what the ISA offers, as g++ does not update the predefined macros
// (__AVX__, __F16C__, ...) after #pragma GCC target:
//   FN_VEC_BYTES   the vector register width: 16, 32 or 64
//   FN_F16C        1 if F16C (half <-> float vector conversion) is available
//   FN_AVX512BF16  1 if AVX512_BF16 (float -> bfloat16 vector conversion) is available
#if !defined(FN_CPU_NS) || !defined(FN_VEC_BYTES) || !defined(FN_F16C) || !defined(FN_AVX512BF16)
#error "define FN_CPU_NS, FN_VEC_BYTES, FN_F16C and FN_AVX512BF16 before including variant.h"
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
