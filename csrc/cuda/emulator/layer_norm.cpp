// The CUDA LayerNorm launchers and kernels, built by the host compiler for the emulator.
#include "../layer_norm.cu"
