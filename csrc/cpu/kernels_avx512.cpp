// CPU kernels built for the avx512 instruction set (see variant.h, cpu_dispatch.cpp).
#include "prelude.h"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
#define FN_CPU_NS avx512
#define FN_VEC_BYTES 64
#define FN_F16C 1
#define FN_AVX512BF16 0
#include "variant.h"
