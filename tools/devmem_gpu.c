/*
 * devmem_gpu.c: devmem's runtime calls for one GPU API. Compiled once with
 * KVRT_GPU_CUDA (devmem_cuda_ops) and once with KVRT_GPU_HIP
 * (devmem_hip_ops) when the build finds that runtime.
 */
#include "gpu_compat.h"

#include "devmem_gpu.h"

#if defined(KVRT_GPU_IS_HIP)
#  define DEVMEM_OPS devmem_hip_ops
#else
#  define DEVMEM_OPS devmem_cuda_ops
#endif

static int check(cudaError_t e, const char *what)
{
    if (e == cudaSuccess)
        return 0;
    return devmem_fail("%s: %s: %s", KVRT_GPU_API_NAME, what, cudaGetErrorString(e));
}

static int gpu_alloc(int ordinal, size_t n, void **p)
{
    *p = NULL;
    if (check(cudaSetDevice(ordinal), "cudaSetDevice"))
        return -1;
    return check(cudaMalloc(p, n > 0 ? n : 1), "cudaMalloc");
}

static void gpu_release(int ordinal, void *p)
{
    if (p == NULL)
        return;
    (void)cudaSetDevice(ordinal);
    (void)cudaFree(p);
}

static int gpu_copy(int ordinal, void *dst, const void *src, size_t n, int kind)
{
    static const int kinds[3] = {cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost,
                                     cudaMemcpyDeviceToDevice};
    if (check(cudaSetDevice(ordinal), "cudaSetDevice"))
        return -1;
    if (check(cudaMemcpy(dst, src, n, kinds[kind]), "cudaMemcpy"))
        return -1;
    return check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

static int gpu_sync(int ordinal)
{
    if (check(cudaSetDevice(ordinal), "cudaSetDevice"))
        return -1;
    return check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

static int gpu_event_create(int ordinal, void **event)
{
    cudaEvent_t e;
    if (check(cudaSetDevice(ordinal), "cudaSetDevice") || check(cudaEventCreate(&e), "cudaEventCreate"))
        return -1;
    *event = (void *)e;
    return 0;
}

static void gpu_event_destroy(void *event)
{
    if (event != NULL)
        (void)cudaEventDestroy((cudaEvent_t)event);
}

static int gpu_event_record(int ordinal, void *event)
{
    if (check(cudaSetDevice(ordinal), "cudaSetDevice"))
        return -1;
    return check(cudaEventRecord((cudaEvent_t)event, 0), "cudaEventRecord");
}

static int gpu_event_elapsed(void *start, void *end, float *ms)
{
    if (check(cudaEventSynchronize((cudaEvent_t)end), "cudaEventSynchronize"))
        return -1;
    return check(cudaEventElapsedTime(ms, (cudaEvent_t)start, (cudaEvent_t)end),
                 "cudaEventElapsedTime");
}

const devmem_gpu_ops DEVMEM_OPS = {
    .name = KVRT_GPU_API_NAME,
    .alloc = gpu_alloc,
    .release = gpu_release,
    .copy = gpu_copy,
    .sync = gpu_sync,
    .event_create = gpu_event_create,
    .event_destroy = gpu_event_destroy,
    .event_record = gpu_event_record,
    .event_elapsed = gpu_event_elapsed,
};
