// CPU kernels built for the avx512 instruction set (see variant.h, cpu_dispatch.cpp).
#include "prelude.h"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
#define FN_CPU_NS avx512
#include "variant.h"
