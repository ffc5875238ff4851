// CPU kernels built for the avx2 instruction set (see variant.h, cpu_dispatch.cpp).
#include "prelude.h"
#pragma GCC target("avx2,fma,f16c")
#define FN_CPU_NS avx2
#include "variant.h"
