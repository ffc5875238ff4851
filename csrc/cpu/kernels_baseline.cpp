// CPU kernels built for the baseline x86-64 (SSE2) instruction set, which every
// x86-64 processor runs (see variant.h, cpu_dispatch.cpp).
#include "prelude.h"
#define FN_CPU_NS baseline
#define FN_VEC_BYTES 16
#define FN_F16C 0
#define FN_AVX512BF16 0
#include "variant.h"
