/*
 * devmem_gpu.h: the runtime calls devmem.c needs from CUDA or HIP, as a
 * table that devmem_gpu.c fills once per API (compiled with KVRT_GPU_CUDA or
 * KVRT_GPU_HIP, whose names kernels/gpu_compat.h maps).
 * Each entry returns 0 or -1 with devmem's message set.
 */
#ifndef KVRT_DEVMEM_GPU_H
#define KVRT_DEVMEM_GPU_H

#include <stddef.h>

typedef struct devmem_gpu_ops {
    const char *name;
    int (*alloc)(int ordinal, size_t n, void **p);
    void (*release)(int ordinal, void *p);
    /* kind: 0 host to device, 1 device to host, 2 device to device */
    int (*copy)(int ordinal, void *dst, const void *src, size_t n, int kind);
    int (*sync)(int ordinal);
    int (*event_create)(int ordinal, void **event);
    void (*event_destroy)(void *event);
    int (*event_record)(int ordinal, void *event);
    /* Waits for `end` and sets *ms to the time between the two events. */
    int (*event_elapsed)(void *start, void *end, float *ms);
} devmem_gpu_ops;

extern const devmem_gpu_ops devmem_cuda_ops;
extern const devmem_gpu_ops devmem_hip_ops;

/* Sets devmem's message (devmem.c). */
int devmem_fail(const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 1, 2)))
#endif
    ;

#endif /* KVRT_DEVMEM_GPU_H */
