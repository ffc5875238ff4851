// CPU kernels built for the avx2 instruction set (see variant.h, cpu_dispatch.cpp).
#include "prelude.h"
#pragma GCC target("avx2,fma,f16c")
#define FN_CPU_NS avx2
#define FN_VEC_BYTES 32
#define FN_F16C 1
#define FN_AVX512BF16 0
#include "variant.h"
