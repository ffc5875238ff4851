// The CUDA BatchNorm launchers and kernels, built by the host compiler for the emulator.
#include "../batch_norm.cu"
