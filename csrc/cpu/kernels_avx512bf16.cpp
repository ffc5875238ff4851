// CPU kernels built for AVX-512 with the BF16 extension (see variant.h, cpu_dispatch.cpp):
// the avx512 kernels, with bfloat16 outputs rounded by VCVTNEPS2BF16 (vec_io.h).
#include "prelude.h"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,prefer-vector-width=512")
#define FN_CPU_NS avx512bf16
#define FN_VEC_BYTES 64
#define FN_F16C 1
#define FN_AVX512BF16 1
#include "variant.h"
