/*
 * backend.h: the internal interface every backend implements (CPU, CUDA, HIP).
 * Memory is managed as regions whose base address never changes: a region
 * reserves room for the most it may hold and commits what is used, so a
 * growing pool moves nothing and captured graphs stay valid.
 * Every entry that takes a stream queues its work there (the CPU completes
 * it before returning).
 */
#ifndef KVRT_BACKEND_H
#define KVRT_BACKEND_H

#include <stddef.h>

#include "kvrt.h"
#include "../kernels/kvrt_ops.h"

/* Where a pointer lives, as a backend sees it. */
typedef enum kvrt_mem_kind {
    KVRT_MEM_HOST = 0,      /* pageable or pinned host memory */
    KVRT_MEM_THIS_DEVICE,   /* device memory of the backend's device */
    KVRT_MEM_OTHER_DEVICE,  /* device memory of another device */
} kvrt_mem_kind;

typedef struct kvrt_backend_impl kvrt_backend_t;

struct kvrt_backend_impl {
    kvrt_device device;
    void       *ctx;        /* the backend's own state */
    const struct kvrt_backend_ops *ops;
};

typedef struct kvrt_backend_ops {
    const char *name;
    /* Releases ctx. */
    void (*shutdown)(kvrt_backend_t *be);

    /* Regions: reserve `reserve` bytes, make `commit` bytes usable (zeroed). */
    kvrt_status (*region_create)(kvrt_backend_t *be, size_t reserve, size_t commit, void **base);
    /* Makes [old_commit, new_commit) usable and zeroed; base unchanged. */
    kvrt_status (*region_grow)(kvrt_backend_t *be, void *base, size_t reserve, size_t old_commit,
                               size_t new_commit);
    void (*region_destroy)(kvrt_backend_t *be, void *base, size_t reserve);

    /* Zeroes n bytes of device memory. */
    kvrt_status (*zero)(kvrt_backend_t *be, void *dst, size_t n, void *stream);
    /* Makes n bytes of host memory readable by work queued next on `stream`
     * and returns their device address: a copy through a pinned ring on GPUs
     * (the host buffer may be reused once the consuming op is queued), the
     * host pointer itself on the CPU (whose ops complete before returning).
     * Valid until the next stage_reset on that stream. */
    kvrt_status (*stage)(kvrt_backend_t *be, const void *host, size_t n, void *stream,
                         const void **device);
    /* Starts a new staging round (previous staged data may be reused once
     * the stream has passed it). */
    void (*stage_reset)(kvrt_backend_t *be, void *stream);
    /* Copies n bytes of host memory to device memory dst asynchronously
     * (through pinned staging on GPUs); the host buffer may be reused at once. */
    kvrt_status (*upload)(kvrt_backend_t *be, void *dst, const void *host, size_t n,
                          void *stream);
    /* Device-to-device copy. */
    kvrt_status (*copy)(kvrt_backend_t *be, void *dst, const void *src, size_t n, void *stream);
    /* Device-to-host copy; returns when the data is in dst. */
    kvrt_status (*download)(kvrt_backend_t *be, void *dst, const void *src, size_t n,
                            void *stream);
    /* Waits for the stream. */
    kvrt_status (*sync)(kvrt_backend_t *be, void *stream);
    /* Classifies a pointer; *device_ordinal set for device memory. */
    kvrt_status (*mem_kind)(kvrt_backend_t *be, const void *p, kvrt_mem_kind *kind,
                            int *device_ordinal);
    /* Device scratch for gather to host etc.: bytes of device memory, freed
     * with scratch_free after the stream passes it. */
    kvrt_status (*scratch_alloc)(kvrt_backend_t *be, size_t n, void **p);
    void (*scratch_free)(kvrt_backend_t *be, void *p);

    /* The operations (kernels on GPUs, their C twins on the CPU). Contracts
     * the kernels rely on: spans of one move never overlap (no destination
     * is another span's source) and stay inside one block; slots of one
     * rotate are distinct; blocks of one set_pos are distinct; max_rot_dims
     * is at least every layer's rot_dims. */
    kvrt_status (*write)(kvrt_backend_t *be, const kvrt_write_op *op, void *stream);
    kvrt_status (*move)(kvrt_backend_t *be, const kvrt_move_op *op, void *stream);
    kvrt_status (*rotate)(kvrt_backend_t *be, const kvrt_rotate_op *op, void *stream);
    kvrt_status (*gather)(kvrt_backend_t *be, const kvrt_gather_op *op, void *stream);
    kvrt_status (*set_pos)(kvrt_backend_t *be, const kvrt_pos_op *op, void *stream);
    kvrt_status (*attention)(kvrt_backend_t *be, const kvrt_attention_op *op, void *stream);
} kvrt_backend_ops;

/* Opens a backend on a device: KVRT_ERR_NO_DEVICE if it does not exist or
 * is not built in. */
kvrt_status kvrt_backend_open(kvrt_device device, kvrt_backend_t *out);
void kvrt_backend_close(kvrt_backend_t *be);

kvrt_status kvrt_cpu_backend_open(kvrt_device device, kvrt_backend_t *out);
/* The most threads the CPU backend's calls on be run on (0: OpenMP's default). */
void kvrt_cpu_backend_set_threads(kvrt_backend_t *be, int n_threads);
int kvrt_cpu_device_count(void);

/* Present when built with CUDA or HIP (src/backend_gpu.c compiled per API). */
kvrt_status kvrt_cuda_backend_open(kvrt_device device, kvrt_backend_t *out);
int kvrt_cuda_device_count(void);
kvrt_status kvrt_cuda_device_describe(int ordinal, char *buf, size_t size);
kvrt_status kvrt_hip_backend_open(kvrt_device device, kvrt_backend_t *out);
int kvrt_hip_device_count(void);
kvrt_status kvrt_hip_device_describe(int ordinal, char *buf, size_t size);

#endif /* KVRT_BACKEND_H */
