/*
 * gpu_cuda.c: the CUDA backend: backend_gpu.c compiled for the CUDA runtime.
 */
#define KVRT_GPU_CUDA 1
#include "backend_gpu.c"
