/*
 * gpu_hip.c: the HIP backend: backend_gpu.c compiled for the HIP runtime.
 */
#define KVRT_GPU_HIP 1
#include "backend_gpu.c"
