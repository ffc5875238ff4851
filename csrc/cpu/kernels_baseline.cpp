// CPU kernels built for the baseline x86-64 (SSE2) instruction set, which every
// x86-64 processor runs (see variant.h, cpu_dispatch.cpp).
#include "prelude.h"
#define FN_CPU_NS baseline
#include "variant.h"
