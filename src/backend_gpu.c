/*
 * backend_gpu.c: the CUDA and HIP backends. One source, compiled once per
 * API: src/gpu_cuda.c defines KVRT_GPU_CUDA and src/gpu_hip.c defines
 * KVRT_GPU_HIP before including it; kernels/gpu_compat.h maps the CUDA
 * names used here to HIP's. C11 over the runtime API; the kernels are
 * reached through the launchers of src/gpu_launch.h.
 *
 * It owns:
 *   - devices: count (0 on any error, no driver included), description;
 *   - regions with a stable base: on CUDA, virtual address space reserved
 *     with the driver's VMM API and physical memory mapped as a region grows
 *     (entry points fetched through the runtime, so nothing links libcuda);
 *     where VMM is unavailable, and on HIP, one allocation of the full
 *     reservation;
 *   - staging: a ring of pinned host memory (upload, stage) and a ring of
 *     device memory (stage), each slot reused only after an event shows the
 *     stream has passed it, so no step or edit synchronizes a stream. Work
 *     queued while the stream is being captured into a graph stages into
 *     memory kept for the backend's lifetime instead, because the graph may
 *     be replayed any number of times and reads that memory on each replay;
 *   - the operations, one launcher each.
 *
 * Every runtime error becomes KVRT_ERR_DEVICE with the runtime's message
 * (KVRT_GPU_TRY). Nothing here aborts, exits or prints.
 *
 * Every entry switches the calling thread to the backend's device and to
 * the relaxed stream-capture mode for its duration, restoring both on
 * return: allocation and event bookkeeping are then allowed while a stream
 * of the process is being captured, and queued work still lands in the
 * capture.
 */
#if !defined(KVRT_GPU_CUDA) && !defined(KVRT_GPU_HIP)
#  error "compile backend_gpu.c through gpu_cuda.c or gpu_hip.c"
#endif

#include "gpu_compat.h"

#if defined(KVRT_GPU_IS_CUDA) && !defined(KVRT_GPU_SIM) /* kvrt-sim declares them itself */
#  include <cuda.h> /* driver types of the VMM API; functions come from cudaGetDriverEntryPoint */
#endif

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "gpu_launch.h"
#include "internal.h"

/* ------------------------------------------------------------------------ */
/* Errors                                                                    */
/* ------------------------------------------------------------------------ */

/* KVRT_ERR_DEVICE (KVRT_ERR_OUT_OF_MEMORY for allocation failures) with the
 * runtime's message, naming the call ("cudaMemcpyAsync: invalid argument"). */
static kvrt_status gpu_error(cudaError_t err, const char *call)
{
    size_t len = strcspn(call, "(");
    const char *prefix = "";
#if defined(KVRT_GPU_IS_HIP)
    if (strncmp(call, "cuda", 4) == 0) { /* the HIP name of the call */
        prefix = "hip";
        call += 4;
        len -= 4;
    }
#endif
    (void)cudaGetLastError(); /* consume it: the next check reports its own call */
    return kvrt_set_error(err == cudaErrorMemoryAllocation ? KVRT_ERR_OUT_OF_MEMORY : KVRT_ERR_DEVICE,
                          "%s: %s%.*s: %s (%s)", KVRT_GPU_API_NAME, prefix, (int)len, call,
                          cudaGetErrorString(err), cudaGetErrorName(err));
}

/* Returns the mapped status when a runtime call fails. */
#define KVRT_GPU_TRY(call)                                                                   \
    do {                                                                                     \
        cudaError_t kvrt_gpu_err_ = (call);                                                  \
        if (kvrt_gpu_err_ != cudaSuccess)                                                    \
            return gpu_error(kvrt_gpu_err_, #call);                                          \
    } while (0)

/* ------------------------------------------------------------------------ */
/* CUDA driver VMM entry points                                              */
/* ------------------------------------------------------------------------ */

#if defined(KVRT_GPU_IS_CUDA)
typedef CUresult (*pfn_cuDeviceGet)(CUdevice *, int);
typedef CUresult (*pfn_cuDeviceGetAttribute)(int *, CUdevice_attribute, CUdevice);
typedef CUresult (*pfn_cuMemGetAllocationGranularity)(size_t *, const CUmemAllocationProp *,
                                                      CUmemAllocationGranularity_flags);
typedef CUresult (*pfn_cuMemAddressReserve)(CUdeviceptr *, size_t, size_t, CUdeviceptr,
                                            unsigned long long);
typedef CUresult (*pfn_cuMemAddressFree)(CUdeviceptr, size_t);
typedef CUresult (*pfn_cuMemCreate)(CUmemGenericAllocationHandle *, size_t,
                                    const CUmemAllocationProp *, unsigned long long);
typedef CUresult (*pfn_cuMemRelease)(CUmemGenericAllocationHandle);
typedef CUresult (*pfn_cuMemMap)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle,
                                 unsigned long long);
typedef CUresult (*pfn_cuMemUnmap)(CUdeviceptr, size_t);
typedef CUresult (*pfn_cuMemSetAccess)(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t);
typedef CUresult (*pfn_cuGetErrorString)(CUresult, const char **);

typedef struct gpu_vmm {
    pfn_cuDeviceGet                   DeviceGet;
    pfn_cuDeviceGetAttribute          DeviceGetAttribute;
    pfn_cuMemGetAllocationGranularity MemGetAllocationGranularity;
    pfn_cuMemAddressReserve           MemAddressReserve;
    pfn_cuMemAddressFree              MemAddressFree;
    pfn_cuMemCreate                   MemCreate;
    pfn_cuMemRelease                  MemRelease;
    pfn_cuMemMap                      MemMap;
    pfn_cuMemUnmap                    MemUnmap;
    pfn_cuMemSetAccess                MemSetAccess;
    pfn_cuGetErrorString              GetErrorString;
} gpu_vmm;

/* The driver's function `name` (ABI of CUDA 12.0), or NULL. */
static void *driver_entry(const char *name)
{
    void *fn = NULL;
    enum cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#  if CUDART_VERSION >= 12050
    cudaError_t err = cudaGetDriverEntryPointByVersion(name, &fn, 12000, cudaEnableDefault, &found);
#  else
    cudaError_t err = cudaGetDriverEntryPoint(name, &fn, cudaEnableDefault, &found);
#  endif
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess) {
        (void)cudaGetLastError();
        return NULL;
    }
    return fn;
}

/* Fills vmm when the driver has every function; 0 otherwise. */
static int vmm_load(gpu_vmm *v)
{
    void *fn;
#  define KVRT_VMM_LOAD_(field, name)                                                        \
        fn = driver_entry(#name);                                                            \
        if (fn == NULL)                                                                      \
            return 0;                                                                        \
        memcpy(&v->field, &fn, sizeof fn); /* object to function pointer, as dlsym's users do */
    KVRT_VMM_LOAD_(DeviceGet, cuDeviceGet)
    KVRT_VMM_LOAD_(DeviceGetAttribute, cuDeviceGetAttribute)
    KVRT_VMM_LOAD_(MemGetAllocationGranularity, cuMemGetAllocationGranularity)
    KVRT_VMM_LOAD_(MemAddressReserve, cuMemAddressReserve)
    KVRT_VMM_LOAD_(MemAddressFree, cuMemAddressFree)
    KVRT_VMM_LOAD_(MemCreate, cuMemCreate)
    KVRT_VMM_LOAD_(MemRelease, cuMemRelease)
    KVRT_VMM_LOAD_(MemMap, cuMemMap)
    KVRT_VMM_LOAD_(MemUnmap, cuMemUnmap)
    KVRT_VMM_LOAD_(MemSetAccess, cuMemSetAccess)
    KVRT_VMM_LOAD_(GetErrorString, cuGetErrorString)
#  undef KVRT_VMM_LOAD_
    return 1;
}

static kvrt_status vmm_error(const gpu_vmm *v, CUresult res, const char *call)
{
    const char *msg = NULL;
    if (v->GetErrorString == NULL || v->GetErrorString(res, &msg) != CUDA_SUCCESS || msg == NULL)
        msg = "unknown driver error";
    return kvrt_set_error(res == CUDA_ERROR_OUT_OF_MEMORY ? KVRT_ERR_OUT_OF_MEMORY : KVRT_ERR_DEVICE,
                          "cuda: %s: %s (CUresult %d)", call, msg, (int)res);
}

#  define KVRT_VMM_TRY(ctx, call, name)                                                      \
        do {                                                                                 \
            CUresult kvrt_vmm_res_ = (call);                                                 \
            if (kvrt_vmm_res_ != CUDA_SUCCESS)                                               \
                return vmm_error(&(ctx)->vmm, kvrt_vmm_res_, name);                          \
        } while (0)
#endif /* KVRT_GPU_IS_CUDA */

/* ------------------------------------------------------------------------ */
/* State                                                                     */
/* ------------------------------------------------------------------------ */

/* Staging allocations are aligned to this (any op array, kvrt_layer_ref included). */
#define GPU_STAGE_ALIGN 256u
#define GPU_RING_FENCES 64
#define GPU_HOST_RING_BYTES ((size_t)4 << 20)
#define GPU_DEVICE_RING_BYTES ((size_t)4 << 20)
#define GPU_CAPTURE_CHUNK_BYTES ((size_t)1 << 20)
/* On kvrt-sim each staged buffer is followed by a red zone of this many
 * bytes (kvrt_sim_guard): a kernel reading past a staged array's end is
 * reported instead of reading the next one's (buffers are 256-aligned, so
 * without it up to 255 bytes past the end are someone else's). */
#if defined(KVRT_GPU_SIM)
#  define GPU_STAGE_GUARD 64u
#else
#  define GPU_STAGE_GUARD 0u
#endif

/* A region: one reservation whose base never changes. */
typedef struct gpu_map {
    size_t offset, size;
} gpu_map;

typedef struct gpu_region {
    char    *base;
    size_t   reserve;     /* bytes reserved (VMM: rounded to the granularity) */
    size_t   mapped;      /* VMM: bytes backed by physical memory */
    int      vmm;         /* 1: VMM reservation; 0: one allocation of the full reserve */
    gpu_map *maps;        /* VMM mappings, unmapped one by one */
    int      n_maps;
    int64_t  cap_maps;
} gpu_region;

/* A fence: once `event` has completed, ring bytes before `end` are free. */
typedef struct gpu_fence {
    uint64_t    end;
    cudaEvent_t event;
} gpu_fence;

/* A ring of host (pinned) or device memory. Positions are monotonic byte
 * counts: [tail, head) may still be read by queued work, [fenced, head) is
 * not covered by a fence yet (the current staging round). */
typedef struct gpu_ring {
    char     *base;
    uint64_t  cap;
    uint64_t  head, tail, fenced;
    gpu_fence fences[GPU_RING_FENCES]; /* FIFO: first, count; each slot owns its event */
    int       first, count;
    int       is_host;
} gpu_ring;

/* Memory kept until an event shows the stream is done with it (a ring that
 * was replaced by a larger one). */
typedef struct gpu_retired {
    void       *p;
    int         is_host;
    cudaEvent_t event;    /* recorded at the next stage_reset; NULL before */
} gpu_retired;

/* Memory staged while a stream was being captured: kept for the backend's
 * lifetime (a captured graph reads it on every replay). */
typedef struct gpu_chunk {
    struct gpu_chunk *next;
    char             *p;
    size_t            cap, used;
    int               is_host;
} gpu_chunk;

typedef struct gpu_ctx {
    int          ordinal;
    cudaStream_t aux;           /* private non-blocking stream: zeroing of new region memory */
    gpu_region  *regions;
    int          n_regions;
    int64_t      cap_regions;
    gpu_ring     host_ring;     /* pinned: upload and stage sources */
    gpu_ring     device_ring;   /* stage destinations */
    gpu_retired *retired;
    int          n_retired;
    int64_t      cap_retired;
    gpu_chunk   *capture_host, *capture_device;
    gpu_chunk   *attn_ws;       /* attention split partials; head: the current one */
#if defined(KVRT_GPU_IS_CUDA)
    int          have_vmm;
    gpu_vmm      vmm;
    size_t       granularity;
#endif
} gpu_ctx;

static uint64_t round_up(uint64_t n, uint64_t to) { return (n + to - 1) / to * to; }

/* ------------------------------------------------------------------------ */
/* Entry and exit of every backend call                                      */
/* ------------------------------------------------------------------------ */

typedef struct gpu_scope {
    int                        prev_device;  /* -1: unchanged */
    int                        mode_changed;
    enum cudaStreamCaptureMode prev_mode;
} gpu_scope;

static void scope_restore_mode(gpu_scope *scope)
{
    if (scope->mode_changed && cudaThreadExchangeStreamCaptureMode(&scope->prev_mode) != cudaSuccess)
        (void)cudaGetLastError();
    scope->mode_changed = 0;
}

static kvrt_status scope_enter(const gpu_ctx *ctx, gpu_scope *scope)
{
    scope->prev_mode = cudaStreamCaptureModeRelaxed;
    scope->mode_changed = cudaThreadExchangeStreamCaptureMode(&scope->prev_mode) == cudaSuccess;
    if (!scope->mode_changed)
        (void)cudaGetLastError();
    scope->prev_device = -1;
    int current = -1;
    cudaError_t err = cudaGetDevice(&current);
    if (err == cudaSuccess && current != ctx->ordinal) {
        err = cudaSetDevice(ctx->ordinal);
        if (err == cudaSuccess)
            scope->prev_device = current;
    }
    if (err != cudaSuccess) {
        scope_restore_mode(scope);
        return gpu_error(err, "cudaSetDevice");
    }
    return KVRT_OK;
}

/* Restores the thread's device and capture mode; returns status. */
static kvrt_status scope_leave(gpu_scope *scope, kvrt_status status)
{
    if (scope->prev_device >= 0 && cudaSetDevice(scope->prev_device) != cudaSuccess)
        (void)cudaGetLastError();
    scope_restore_mode(scope);
    return status;
}

/* 1 when work queued on `stream` now goes into a graph being captured. */
static kvrt_status stream_capturing(cudaStream_t stream, int *capturing)
{
    enum cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    KVRT_GPU_TRY(cudaStreamIsCapturing(stream, &status));
    *capturing = status != cudaStreamCaptureStatusNone;
    return KVRT_OK;
}

/* ------------------------------------------------------------------------ */
/* Devices                                                                   */
/* ------------------------------------------------------------------------ */

int KVRT_GPU_FN(device_count)(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) { /* no driver, no device, ... */
        (void)cudaGetLastError();
        return 0;
    }
    return n > 0 ? n : 0;
}

kvrt_status KVRT_GPU_FN(device_describe)(int ordinal, char *buf, size_t size)
{
    KVRT_CHECK(buf != NULL && size > 0, KVRT_ERR_INVALID_ARG, "%s: describe: buf is NULL",
               KVRT_GPU_API_NAME);
    buf[0] = '\0';
    int count = KVRT_GPU_FN(device_count)();
    KVRT_CHECK(ordinal >= 0 && ordinal < count, KVRT_ERR_NO_DEVICE, "no device %s:%d (%d available)",
               KVRT_GPU_API_NAME, ordinal, count);
    struct cudaDeviceProp prop;
    memset(&prop, 0, sizeof prop);
    KVRT_GPU_TRY(cudaGetDeviceProperties(&prop, ordinal));
    unsigned long long gib = (unsigned long long)(prop.totalGlobalMem >> 30);
#if defined(KVRT_GPU_IS_HIP)
    snprintf(buf, size, "hip:%d %s (%s), %llu GiB", ordinal, prop.name, prop.gcnArchName, gib);
#else
    snprintf(buf, size, "cuda:%d %s (sm_%d%d), %llu GiB", ordinal, prop.name, prop.major,
             prop.minor, gib);
#endif
    return KVRT_OK;
}

/* ------------------------------------------------------------------------ */
/* Regions                                                                   */
/* ------------------------------------------------------------------------ */

/* Zeroes [p, p + n) before returning (new region memory is used by any
 * stream afterwards). On the private stream, so no caller's stream or
 * capture is touched. */
static kvrt_status zero_now(gpu_ctx *ctx, void *p, size_t n)
{
    if (n == 0)
        return KVRT_OK;
    KVRT_GPU_TRY(cudaMemsetAsync(p, 0, n, ctx->aux));
    KVRT_GPU_TRY(cudaStreamSynchronize(ctx->aux));
    return KVRT_OK;
}

static gpu_region *region_find(gpu_ctx *ctx, const void *base)
{
    for (int i = 0; i < ctx->n_regions; i++)
        if (ctx->regions[i].base == base)
            return &ctx->regions[i];
    return NULL;
}

#if defined(KVRT_GPU_IS_CUDA)
/* Backs [region->mapped, mapped + size) with new physical memory. */
static kvrt_status vmm_map(gpu_ctx *ctx, gpu_region *r, size_t size)
{
    KVRT_TRY(kvrt_reserve((void **)&r->maps, &r->cap_maps, r->n_maps + 1, sizeof *r->maps));
    CUmemAllocationProp prop;
    memset(&prop, 0, sizeof prop);
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = ctx->ordinal;
    CUmemGenericAllocationHandle handle;
    KVRT_VMM_TRY(ctx, ctx->vmm.MemCreate(&handle, size, &prop, 0), "cuMemCreate");
    CUdeviceptr at = (CUdeviceptr)(uintptr_t)(r->base + r->mapped);
    CUresult res = ctx->vmm.MemMap(at, size, 0, handle, 0);
    /* The mapping keeps the memory alive; the handle is no longer needed. */
    (void)ctx->vmm.MemRelease(handle);
    if (res != CUDA_SUCCESS)
        return vmm_error(&ctx->vmm, res, "cuMemMap");
    CUmemAccessDesc access;
    memset(&access, 0, sizeof access);
    access.location = prop.location;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    res = ctx->vmm.MemSetAccess(at, size, &access, 1);
    if (res != CUDA_SUCCESS) {
        (void)ctx->vmm.MemUnmap(at, size);
        return vmm_error(&ctx->vmm, res, "cuMemSetAccess");
    }
    r->maps[r->n_maps].offset = r->mapped;
    r->maps[r->n_maps].size = size;
    r->n_maps++;
    r->mapped += size;
    return KVRT_OK;
}

static void vmm_unmap_all(gpu_ctx *ctx, gpu_region *r)
{
    for (int i = r->n_maps - 1; i >= 0; i--)
        (void)ctx->vmm.MemUnmap((CUdeviceptr)(uintptr_t)(r->base + r->maps[i].offset),
                                r->maps[i].size);
    r->n_maps = 0;
    r->mapped = 0;
}
#endif

static kvrt_status region_create_impl(gpu_ctx *ctx, size_t reserve, size_t commit, void **base)
{
    KVRT_CHECK(commit <= reserve, KVRT_ERR_INTERNAL, "%s: region commit %zu > reserve %zu",
               KVRT_GPU_API_NAME, commit, reserve);
    KVRT_TRY(kvrt_reserve((void **)&ctx->regions, &ctx->cap_regions, ctx->n_regions + 1,
                          sizeof *ctx->regions));
    gpu_region r;
    memset(&r, 0, sizeof r);
    if (reserve == 0)
        reserve = 1;
#if defined(KVRT_GPU_IS_CUDA)
    if (ctx->have_vmm) {
        r.vmm = 1;
        r.reserve = (size_t)round_up(reserve, ctx->granularity);
        CUdeviceptr p = 0;
        KVRT_VMM_TRY(ctx, ctx->vmm.MemAddressReserve(&p, r.reserve, ctx->granularity, 0, 0),
                     "cuMemAddressReserve");
        r.base = (char *)(uintptr_t)p;
        size_t map = (size_t)round_up(commit, ctx->granularity);
        kvrt_status st = map > 0 ? vmm_map(ctx, &r, map) : KVRT_OK;
        if (st == KVRT_OK)
            st = zero_now(ctx, r.base, map);
        if (st != KVRT_OK) {
            vmm_unmap_all(ctx, &r);
            free(r.maps);
            (void)ctx->vmm.MemAddressFree(p, r.reserve);
            return st;
        }
        ctx->regions[ctx->n_regions++] = r;
        *base = r.base;
        return KVRT_OK;
    }
#endif
    /* The whole reservation, allocated now. */
    r.reserve = reserve;
    void *p = NULL;
    cudaError_t err = cudaMalloc(&p, reserve);
    if (err != cudaSuccess) {
        kvrt_status st = gpu_error(err, "cudaMalloc");
        if (st == KVRT_ERR_OUT_OF_MEMORY)
            kvrt_set_error(st, "%s:%d: allocating a region of %zu bytes (this backend commits "
                           "the full reservation, max_blocks included) failed: %s",
                           KVRT_GPU_API_NAME, ctx->ordinal, reserve, cudaGetErrorString(err));
        return st;
    }
    r.base = p;
    kvrt_status st = zero_now(ctx, p, commit);
    if (st != KVRT_OK) {
        (void)cudaFree(p);
        return st;
    }
    ctx->regions[ctx->n_regions++] = r;
    *base = p;
    return KVRT_OK;
}

static kvrt_status region_grow_impl(gpu_ctx *ctx, void *base, size_t reserve, size_t old_commit,
                                    size_t new_commit)
{
    gpu_region *r = region_find(ctx, base);
    KVRT_CHECK(r != NULL, KVRT_ERR_INTERNAL, "%s: growing an unknown region", KVRT_GPU_API_NAME);
    KVRT_CHECK(new_commit <= r->reserve && new_commit <= (reserve > 0 ? reserve : 1),
               KVRT_ERR_INTERNAL, "%s: growing a region past its reservation", KVRT_GPU_API_NAME);
    if (new_commit <= old_commit)
        return KVRT_OK;
#if defined(KVRT_GPU_IS_CUDA)
    if (r->vmm) {
        size_t want = (size_t)round_up(new_commit, ctx->granularity);
        if (want > r->mapped) {
            size_t from = r->mapped;
            KVRT_TRY(vmm_map(ctx, r, want - r->mapped));
            /* Fresh pages are zeroed whole; [old_commit, from) was zeroed when mapped. */
            KVRT_TRY(zero_now(ctx, r->base + from, want - from));
        }
        return KVRT_OK;
    }
#endif
    return zero_now(ctx, (char *)base + old_commit, new_commit - old_commit);
}

static void region_destroy_impl(gpu_ctx *ctx, void *base)
{
    gpu_region *r = region_find(ctx, base);
    if (r == NULL)
        return;
#if defined(KVRT_GPU_IS_CUDA)
    if (r->vmm) {
        /* Unmapping does not wait for queued work that may still use it. */
        if (cudaDeviceSynchronize() != cudaSuccess)
            (void)cudaGetLastError();
        vmm_unmap_all(ctx, r);
        (void)ctx->vmm.MemAddressFree((CUdeviceptr)(uintptr_t)r->base, r->reserve);
    } else
#endif
    {
        if (cudaFree(r->base) != cudaSuccess) /* waits for work using it */
            (void)cudaGetLastError();
    }
    free(r->maps);
    *r = ctx->regions[--ctx->n_regions];
}

/* ------------------------------------------------------------------------ */
/* Staging rings                                                             */
/* ------------------------------------------------------------------------ */

static kvrt_status ring_init(gpu_ring *r, size_t cap, int is_host)
{
    memset(r, 0, sizeof *r);
    r->is_host = is_host;
    for (int i = 0; i < GPU_RING_FENCES; i++)
        KVRT_GPU_TRY(cudaEventCreateWithFlags(&r->fences[i].event, cudaEventDisableTiming));
    void *p = NULL;
    if (is_host)
        KVRT_GPU_TRY(cudaMallocHost(&p, cap));
    else
        KVRT_GPU_TRY(cudaMalloc(&p, cap));
    r->base = p;
    r->cap = cap;
    return KVRT_OK;
}

static void free_memory(void *p, int is_host)
{
    if (p == NULL)
        return;
    cudaError_t err = is_host ? cudaFreeHost(p) : cudaFree(p);
    if (err != cudaSuccess)
        (void)cudaGetLastError();
}

static void ring_release(gpu_ring *r)
{
    for (int i = 0; i < GPU_RING_FENCES; i++)
        if (r->fences[i].event != NULL && cudaEventDestroy(r->fences[i].event) != cudaSuccess)
            (void)cudaGetLastError();
    free_memory(r->base, r->is_host);
    memset(r, 0, sizeof *r);
}

/* Retires fences whose work has completed; with `wait`, waits for the oldest first. */
static kvrt_status ring_reclaim(gpu_ring *r, int wait)
{
    while (r->count > 0) {
        gpu_fence *f = &r->fences[r->first];
        if (wait) {
            KVRT_GPU_TRY(cudaEventSynchronize(f->event));
            wait = 0;
        } else {
            cudaError_t err = cudaEventQuery(f->event);
            if (err == cudaErrorNotReady) {
                (void)cudaGetLastError();
                break;
            }
            if (err != cudaSuccess)
                return gpu_error(err, "cudaEventQuery");
        }
        r->tail = f->end;
        r->first = (r->first + 1) % GPU_RING_FENCES;
        r->count--;
    }
    return KVRT_OK;
}

/* Allocates n bytes; *ok 0 when the ring cannot hold them even after every
 * fenced byte is free (the current round, unfenced, fills it). */
static kvrt_status ring_alloc(gpu_ring *r, uint64_t n, uint64_t *offset, int *ok)
{
    *ok = 0;
    n = round_up(n > 0 ? n : 1, GPU_STAGE_ALIGN);
    if (n > r->cap)
        return KVRT_OK;
    uint64_t pos = r->head;
    if (pos % r->cap + n > r->cap)
        pos += r->cap - pos % r->cap; /* no room before the end: skip to the start */
    if (pos + n - r->tail > r->cap)
        KVRT_TRY(ring_reclaim(r, 0));
    while (pos + n - r->tail > r->cap) {
        if (r->count == 0)
            return KVRT_OK;
        KVRT_TRY(ring_reclaim(r, 1));
    }
    *offset = pos % r->cap;
    r->head = pos + n;
    *ok = 1;
    return KVRT_OK;
}

/* Covers [fenced, head) by an event on `stream`. */
static kvrt_status ring_fence(gpu_ring *r, cudaStream_t stream)
{
    if (r->head == r->fenced)
        return KVRT_OK;
    if (r->count == GPU_RING_FENCES)
        KVRT_TRY(ring_reclaim(r, 1));
    gpu_fence *f = &r->fences[(r->first + r->count) % GPU_RING_FENCES];
    KVRT_GPU_TRY(cudaEventRecord(f->event, stream));
    f->end = r->head;
    r->count++;
    r->fenced = r->head;
    return KVRT_OK;
}

/* Frees retired memory whose event has completed. */
static kvrt_status retired_reclaim(gpu_ctx *ctx)
{
    for (int i = 0; i < ctx->n_retired;) {
        gpu_retired *t = &ctx->retired[i];
        if (t->event == NULL) {
            i++;
            continue;
        }
        cudaError_t err = cudaEventQuery(t->event);
        if (err == cudaErrorNotReady) {
            (void)cudaGetLastError();
            i++;
            continue;
        }
        if (err != cudaSuccess)
            return gpu_error(err, "cudaEventQuery");
        free_memory(t->p, t->is_host);
        (void)cudaEventDestroy(t->event);
        *t = ctx->retired[--ctx->n_retired];
    }
    return KVRT_OK;
}

/* Replaces a ring by one of at least `need` bytes. Fenced work on the old
 * memory is covered by its fences, unfenced work (the current round) by an
 * event recorded at the next stage_reset: the old memory goes to the
 * retired list until then. */
static kvrt_status ring_replace(gpu_ctx *ctx, gpu_ring *r, uint64_t need)
{
    uint64_t cap = r->cap > 0 ? r->cap : GPU_DEVICE_RING_BYTES;
    while (cap < 2 * need)
        cap *= 2;
    KVRT_TRY(kvrt_reserve((void **)&ctx->retired, &ctx->cap_retired, ctx->n_retired + 1,
                          sizeof *ctx->retired));
    void *p = NULL;
    if (r->is_host)
        KVRT_GPU_TRY(cudaMallocHost(&p, cap));
    else
        KVRT_GPU_TRY(cudaMalloc(&p, cap));
    /* The fenced part of the old ring is done once its last fence is. */
    if (r->count > 0) {
        kvrt_status st = KVRT_OK;
        while (r->count > 0 && st == KVRT_OK)
            st = ring_reclaim(r, 1);
        if (st != KVRT_OK) {
            free_memory(p, r->is_host);
            return st;
        }
    }
    if (r->fenced == r->head) {
        free_memory(r->base, r->is_host); /* every byte fenced, every fence passed */
    } else {
        gpu_retired *t = &ctx->retired[ctx->n_retired++];
        t->p = r->base;
        t->is_host = r->is_host;
        t->event = NULL;
    }
    r->base = p;
    r->cap = cap;
    r->head = r->tail = r->fenced = 0;
    return KVRT_OK;
}

/* Records, on `stream`, the event that frees retired memory used by the
 * round that ends now. */
static kvrt_status retired_fence(gpu_ctx *ctx, cudaStream_t stream)
{
    for (int i = 0; i < ctx->n_retired; i++) {
        gpu_retired *t = &ctx->retired[i];
        if (t->event != NULL)
            continue;
        KVRT_GPU_TRY(cudaEventCreateWithFlags(&t->event, cudaEventDisableTiming));
        KVRT_GPU_TRY(cudaEventRecord(t->event, stream));
    }
    return KVRT_OK;
}

/* n bytes of memory kept for the backend's lifetime (staging under capture). */
static kvrt_status chunk_alloc(gpu_chunk **list, int is_host, size_t n, char **out)
{
    n = (size_t)round_up(n > 0 ? n : 1, GPU_STAGE_ALIGN);
    gpu_chunk *c = *list;
    if (c == NULL || c->cap - c->used < n) {
        size_t cap = n > GPU_CAPTURE_CHUNK_BYTES ? n : GPU_CAPTURE_CHUNK_BYTES;
        gpu_chunk *fresh = calloc(1, sizeof *fresh);
        KVRT_CHECK(fresh != NULL, KVRT_ERR_OUT_OF_MEMORY, "%s: staging bookkeeping",
                   KVRT_GPU_API_NAME);
        void *p = NULL;
        cudaError_t err = is_host ? cudaMallocHost(&p, cap) : cudaMalloc(&p, cap);
        if (err != cudaSuccess) {
            free(fresh);
            return gpu_error(err, is_host ? "cudaMallocHost" : "cudaMalloc");
        }
        fresh->p = p;
        fresh->cap = cap;
        fresh->is_host = is_host;
        fresh->next = c;
        *list = c = fresh;
    }
    *out = c->p + c->used;
    c->used += n;
    return KVRT_OK;
}

static void chunks_free(gpu_chunk **list)
{
    for (gpu_chunk *c = *list; c != NULL;) {
        gpu_chunk *next = c->next;
        free_memory(c->p, c->is_host);
        free(c);
        c = next;
    }
    *list = NULL;
}

/* Pinned host memory for n bytes that queued work will read: from the host
 * ring (fenced by the caller after queuing the copy) or, under capture,
 * from memory kept for good. */
static kvrt_status host_staging(gpu_ctx *ctx, int capturing, size_t n, char **out)
{
    if (capturing)
        return chunk_alloc(&ctx->capture_host, 1, n, out);
    uint64_t off = 0;
    int ok = 0;
    KVRT_TRY(ring_alloc(&ctx->host_ring, n, &off, &ok));
    if (!ok) { /* larger than the ring: the host ring is always fully fenced */
        KVRT_TRY(ring_replace(ctx, &ctx->host_ring, n));
        KVRT_TRY(ring_alloc(&ctx->host_ring, n, &off, &ok));
        KVRT_CHECK(ok, KVRT_ERR_INTERNAL, "%s: host staging of %zu bytes", KVRT_GPU_API_NAME, n);
    }
    *out = ctx->host_ring.base + off;
    return KVRT_OK;
}

/* ------------------------------------------------------------------------ */
/* Memory operations                                                         */
/* ------------------------------------------------------------------------ */

static kvrt_status zero_impl(gpu_ctx *ctx, void *dst, size_t n, cudaStream_t stream)
{
    (void)ctx;
    if (n > 0)
        KVRT_GPU_TRY(cudaMemsetAsync(dst, 0, n, stream));
    return KVRT_OK;
}

static kvrt_status stage_impl(gpu_ctx *ctx, const void *host, size_t n, cudaStream_t stream,
                              const void **device)
{
    int capturing = 0;
    KVRT_TRY(stream_capturing(stream, &capturing));
    char *dst = NULL;
    const size_t span = n + GPU_STAGE_GUARD;
    if (capturing) {
        KVRT_TRY(chunk_alloc(&ctx->capture_device, 0, span, &dst));
    } else {
        KVRT_TRY(retired_reclaim(ctx));
        uint64_t off = 0;
        int ok = 0;
        KVRT_TRY(ring_alloc(&ctx->device_ring, span, &off, &ok));
        if (!ok) {
            KVRT_TRY(ring_replace(ctx, &ctx->device_ring,
                                  span + (ctx->device_ring.head - ctx->device_ring.fenced)));
            KVRT_TRY(ring_alloc(&ctx->device_ring, span, &off, &ok));
            KVRT_CHECK(ok, KVRT_ERR_INTERNAL, "%s: device staging of %zu bytes",
                       KVRT_GPU_API_NAME, n);
        }
        dst = ctx->device_ring.base + off;
    }
#if defined(KVRT_GPU_SIM)
    kvrt_sim_guard(dst, n, GPU_STAGE_GUARD);
#endif
    if (n > 0) {
        char *src = NULL;
        KVRT_TRY(host_staging(ctx, capturing, n, &src));
        memcpy(src, host, n);
        KVRT_GPU_TRY(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, stream));
        if (!capturing)
            KVRT_TRY(ring_fence(&ctx->host_ring, stream));
    }
    *device = dst;
    return KVRT_OK;
}

static kvrt_status stage_reset_impl(gpu_ctx *ctx, cudaStream_t stream)
{
    int capturing = 0;
    KVRT_TRY(stream_capturing(stream, &capturing));
    if (capturing) /* what was staged under capture is kept for good */
        return KVRT_OK;
    KVRT_TRY(ring_fence(&ctx->device_ring, stream));
    KVRT_TRY(retired_fence(ctx, stream));
    return retired_reclaim(ctx);
}

static kvrt_status upload_impl(gpu_ctx *ctx, void *dst, const void *host, size_t n,
                               cudaStream_t stream)
{
    if (n == 0)
        return KVRT_OK;
    int capturing = 0;
    KVRT_TRY(stream_capturing(stream, &capturing));
    if (capturing) {
        char *src = NULL;
        KVRT_TRY(host_staging(ctx, 1, n, &src));
        memcpy(src, host, n);
        KVRT_GPU_TRY(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, stream));
        return KVRT_OK;
    }
    /* Through the ring in pieces of at most a quarter of it, so a large
     * upload streams instead of growing the ring. */
    const size_t piece_max = (size_t)(ctx->host_ring.cap / 4);
    for (size_t done = 0; done < n;) {
        size_t piece = n - done < piece_max ? n - done : piece_max;
        char *src = NULL;
        KVRT_TRY(host_staging(ctx, 0, piece, &src));
        memcpy(src, (const char *)host + done, piece);
        KVRT_GPU_TRY(
            cudaMemcpyAsync((char *)dst + done, src, piece, cudaMemcpyHostToDevice, stream));
        KVRT_TRY(ring_fence(&ctx->host_ring, stream));
        done += piece;
    }
    return KVRT_OK;
}

/* memmove semantics, as the CPU backend's copy: overlapping ranges go
 * through a temporary when they are close (many pieces otherwise), else in
 * pieces no longer than their distance, in the order that reads every byte
 * before overwriting it (stream order serializes the pieces). */
static kvrt_status copy_impl(gpu_ctx *ctx, void *dst, const void *src, size_t n,
                             cudaStream_t stream)
{
    (void)ctx;
    char *d = dst;
    const char *s = src;
    if (n == 0 || d == s)
        return KVRT_OK;
    if (d + n <= s || s + n <= d) {
        KVRT_GPU_TRY(cudaMemcpyAsync(d, s, n, cudaMemcpyDeviceToDevice, stream));
        return KVRT_OK;
    }
    size_t dist = d < s ? (size_t)(s - d) : (size_t)(d - s);
    void *tmp = NULL;
    if (n / dist > 64) {
        if (cudaMallocAsync(&tmp, n, stream) == cudaSuccess) {
            cudaError_t err = cudaMemcpyAsync(tmp, s, n, cudaMemcpyDeviceToDevice, stream);
            if (err == cudaSuccess)
                err = cudaMemcpyAsync(d, tmp, n, cudaMemcpyDeviceToDevice, stream);
            cudaError_t free_err = cudaFreeAsync(tmp, stream);
            if (err != cudaSuccess)
                return gpu_error(err, "cudaMemcpyAsync");
            if (free_err != cudaSuccess)
                return gpu_error(free_err, "cudaFreeAsync");
            return KVRT_OK;
        }
        (void)cudaGetLastError(); /* no stream-ordered allocator: go piece by piece */
    }
    if (d < s) {
        for (size_t at = 0; at < n; at += dist) {
            size_t len = n - at < dist ? n - at : dist;
            KVRT_GPU_TRY(cudaMemcpyAsync(d + at, s + at, len, cudaMemcpyDeviceToDevice, stream));
        }
    } else {
        for (size_t end = n; end > 0;) {
            size_t len = end < dist ? end : dist;
            end -= len;
            KVRT_GPU_TRY(cudaMemcpyAsync(d + end, s + end, len, cudaMemcpyDeviceToDevice, stream));
        }
    }
    return KVRT_OK;
}

static kvrt_status download_impl(gpu_ctx *ctx, void *dst, const void *src, size_t n,
                                 cudaStream_t stream)
{
    (void)ctx;
    if (n == 0)
        return KVRT_OK;
    KVRT_GPU_TRY(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, stream));
    KVRT_GPU_TRY(cudaStreamSynchronize(stream));
    return KVRT_OK;
}

static kvrt_status mem_kind_impl(gpu_ctx *ctx, const void *p, kvrt_mem_kind *kind, int *ordinal)
{
    *kind = KVRT_MEM_HOST;
    *ordinal = -1;
    if (p == NULL)
        return KVRT_OK;
    struct cudaPointerAttributes attr;
    memset(&attr, 0, sizeof attr);
    cudaError_t err = cudaPointerGetAttributes(&attr, p);
    if (err == cudaErrorInvalidValue) { /* memory the runtime does not know: plain host memory */
        (void)cudaGetLastError();
        return KVRT_OK;
    }
    if (err != cudaSuccess)
        return gpu_error(err, "cudaPointerGetAttributes");
#if defined(KVRT_GPU_IS_HIP)
    int on_device = attr.memoryType == hipMemoryTypeDevice || attr.isManaged;
#else
    int on_device = attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged;
#endif
    if (on_device) {
        *ordinal = attr.device;
        *kind = attr.device == ctx->ordinal ? KVRT_MEM_THIS_DEVICE : KVRT_MEM_OTHER_DEVICE;
    }
    return KVRT_OK;
}

static kvrt_status scratch_alloc_impl(gpu_ctx *ctx, size_t n, void **p)
{
    (void)ctx;
    *p = NULL;
    KVRT_GPU_TRY(cudaMalloc(p, n > 0 ? n : 1));
    return KVRT_OK;
}

/* ------------------------------------------------------------------------ */
/* The backend entries                                                       */
/* ------------------------------------------------------------------------ */

#define GPU_CTX(be) ((gpu_ctx *)(be)->ctx)
#define GPU_STREAM(stream) ((cudaStream_t)(stream))

/* Runs `expr` (a kvrt_status) inside the backend's device scope. */
#define GPU_SCOPED(be, expr)                                                                 \
    do {                                                                                     \
        gpu_scope gpu_scope_;                                                                \
        KVRT_TRY(scope_enter(GPU_CTX(be), &gpu_scope_));                                     \
        return scope_leave(&gpu_scope_, (expr));                                             \
    } while (0)

/* The status of a launcher's result, naming the op. */
static kvrt_status launched(cudaError_t err, const char *op)
{
    if (err == cudaSuccess)
        return KVRT_OK;
    (void)cudaGetLastError();
    return kvrt_set_error(KVRT_ERR_DEVICE, "%s: %s kernel: %s (%s)", KVRT_GPU_API_NAME, op,
                          cudaGetErrorString(err), cudaGetErrorName(err));
}

static kvrt_status gpu_region_create(kvrt_backend_t *be, size_t reserve, size_t commit, void **base)
{
    GPU_SCOPED(be, region_create_impl(GPU_CTX(be), reserve, commit, base));
}

static kvrt_status gpu_region_grow(kvrt_backend_t *be, void *base, size_t reserve,
                                   size_t old_commit, size_t new_commit)
{
    GPU_SCOPED(be, region_grow_impl(GPU_CTX(be), base, reserve, old_commit, new_commit));
}

static void gpu_region_destroy(kvrt_backend_t *be, void *base, size_t reserve)
{
    (void)reserve;
    gpu_scope scope;
    if (base == NULL || scope_enter(GPU_CTX(be), &scope) != KVRT_OK)
        return;
    region_destroy_impl(GPU_CTX(be), base);
    (void)scope_leave(&scope, KVRT_OK);
}

static kvrt_status gpu_zero(kvrt_backend_t *be, void *dst, size_t n, void *stream)
{
    GPU_SCOPED(be, zero_impl(GPU_CTX(be), dst, n, GPU_STREAM(stream)));
}

static kvrt_status gpu_stage(kvrt_backend_t *be, const void *host, size_t n, void *stream,
                             const void **device)
{
    GPU_SCOPED(be, stage_impl(GPU_CTX(be), host, n, GPU_STREAM(stream), device));
}

static void gpu_stage_reset(kvrt_backend_t *be, void *stream)
{
    gpu_scope scope;
    if (scope_enter(GPU_CTX(be), &scope) != KVRT_OK)
        return;
    /* A failure here only delays reuse of staging memory; a device fault
     * will show again at the next call that can report it. */
    if (stage_reset_impl(GPU_CTX(be), GPU_STREAM(stream)) != KVRT_OK)
        (void)cudaGetLastError();
    (void)scope_leave(&scope, KVRT_OK);
}

static kvrt_status gpu_upload(kvrt_backend_t *be, void *dst, const void *host, size_t n,
                              void *stream)
{
    GPU_SCOPED(be, upload_impl(GPU_CTX(be), dst, host, n, GPU_STREAM(stream)));
}

static kvrt_status gpu_copy(kvrt_backend_t *be, void *dst, const void *src, size_t n, void *stream)
{
    GPU_SCOPED(be, copy_impl(GPU_CTX(be), dst, src, n, GPU_STREAM(stream)));
}

static kvrt_status gpu_download(kvrt_backend_t *be, void *dst, const void *src, size_t n,
                                void *stream)
{
    GPU_SCOPED(be, download_impl(GPU_CTX(be), dst, src, n, GPU_STREAM(stream)));
}

static kvrt_status sync_impl(cudaStream_t stream)
{
    KVRT_GPU_TRY(cudaStreamSynchronize(stream));
    return KVRT_OK;
}

static kvrt_status gpu_sync(kvrt_backend_t *be, void *stream)
{
    GPU_SCOPED(be, sync_impl(GPU_STREAM(stream)));
}

static kvrt_status gpu_mem_kind(kvrt_backend_t *be, const void *p, kvrt_mem_kind *kind,
                                int *device_ordinal)
{
    GPU_SCOPED(be, mem_kind_impl(GPU_CTX(be), p, kind, device_ordinal));
}

static kvrt_status gpu_scratch_alloc(kvrt_backend_t *be, size_t n, void **p)
{
    GPU_SCOPED(be, scratch_alloc_impl(GPU_CTX(be), n, p));
}

static void gpu_scratch_free(kvrt_backend_t *be, void *p)
{
    gpu_scope scope;
    if (p == NULL || scope_enter(GPU_CTX(be), &scope) != KVRT_OK)
        return;
    free_memory(p, 0);
    (void)scope_leave(&scope, KVRT_OK);
}

static kvrt_status gpu_write(kvrt_backend_t *be, const kvrt_write_op *op, void *stream)
{
    GPU_SCOPED(be, launched(KVRT_GPU_FN(launch_write)(op, stream), "write"));
}

static kvrt_status gpu_move(kvrt_backend_t *be, const kvrt_move_op *op, void *stream)
{
    GPU_SCOPED(be, launched(KVRT_GPU_FN(launch_move)(op, stream), "move"));
}

static kvrt_status gpu_rotate(kvrt_backend_t *be, const kvrt_rotate_op *op, void *stream)
{
    GPU_SCOPED(be, launched(KVRT_GPU_FN(launch_rotate)(op, stream), "rotate"));
}

static kvrt_status gpu_gather(kvrt_backend_t *be, const kvrt_gather_op *op, void *stream)
{
    GPU_SCOPED(be, launched(KVRT_GPU_FN(launch_gather)(op, stream), "gather"));
}

static kvrt_status gpu_set_pos(kvrt_backend_t *be, const kvrt_pos_op *op, void *stream)
{
    GPU_SCOPED(be, launched(KVRT_GPU_FN(launch_set_pos)(op, stream), "set_pos"));
}

/* Attention's workspace (split partials of long decode sequences): grown
 * outside stream capture, never shrunk, and older ones kept until shutdown
 * because a captured graph may still use them. During capture a workspace
 * too small makes the launcher split less (or not at all). Attention calls
 * on one backend share it: they are expected on one stream at a time. */
static void attention_workspace(gpu_ctx *ctx, size_t need, void *stream, void **ws,
                                size_t *bytes)
{
    gpu_chunk *cur = ctx->attn_ws;
    int capturing = 1;
    if (need > 0 && (cur == NULL || cur->cap < need) &&
        stream_capturing(GPU_STREAM(stream), &capturing) == KVRT_OK && !capturing) {
        size_t cap = (size_t)round_up(need + need / 2, 1 << 20);
        gpu_chunk *c = calloc(1, sizeof *c);
        void *p = NULL;
        if (c != NULL && cudaMalloc(&p, cap) == cudaSuccess) {
            c->p = p;
            c->cap = cap;
            c->next = ctx->attn_ws;
            ctx->attn_ws = c;
        } else {
            (void)cudaGetLastError();
            free(c);
        }
    }
    *ws = ctx->attn_ws != NULL ? ctx->attn_ws->p : NULL;
    *bytes = ctx->attn_ws != NULL ? ctx->attn_ws->cap : 0;
}

/* Prefill-shaped calls go to the tensor-core kernel (attention_prefill.cu):
 * more than 8 query tokens per sequence on average (the generic kernel's
 * prefill tiles), with a cache and queries the kernel takes (f16 or bf16,
 * head dims it is built for). Everything else stays on the generic kernel. */
static int attention_prefill_shaped(const kvrt_attention_op *op)
{
    return op->n_seqs > 0 && (int64_t)op->n_tokens > 8 * (int64_t)op->n_seqs &&
           KVRT_GPU_FN(attention_prefill_supports)(op);
}

static kvrt_status attention_impl(gpu_ctx *ctx, const kvrt_attention_op *op, void *stream)
{
    const kvrt_layout *L = &op->layer.layout;
    const size_t shared = ((size_t)L->dim_k + (size_t)op->dim_v) * sizeof(float);
    KVRT_CHECK(shared <= 40 * 1024, KVRT_ERR_UNSUPPORTED,
               "%s: attention over rows of %d + %d values is not supported by this kernel "
               "(at most 10240 together)", KVRT_GPU_API_NAME, L->dim_k, op->dim_v);
    void *ws = NULL;
    size_t ws_bytes = 0;
    attention_workspace(ctx, KVRT_GPU_FN(attention_workspace)(op), stream, &ws, &ws_bytes);
    return launched(KVRT_GPU_FN(launch_attention_ws)(op, stream, ws, ws_bytes), "attention");
}

/* A launcher that splits long sequences within a workspace (decode, MLA). */
typedef cudaError_t (*split_launcher)(const kvrt_attention_op *op, void *stream, void *workspace,
                                      size_t workspace_bytes);

static kvrt_status attention_split_impl(gpu_ctx *ctx, const kvrt_attention_op *op, void *stream,
                                        size_t need, split_launcher launch, const char *what)
{
    void *ws = NULL;
    size_t ws_bytes = 0;
    attention_workspace(ctx, need, stream, &ws, &ws_bytes);
    return launched(launch(op, stream, ws, ws_bytes), what);
}

static kvrt_status attention_dispatch(gpu_ctx *ctx, const kvrt_attention_op *op, void *stream)
{
    KVRT_CHECK((int64_t)op->n_tokens * op->n_q_heads <= 0x7fffffff, KVRT_ERR_UNSUPPORTED,
               "%s: attention over %d tokens x %d query heads is too large for one launch",
               KVRT_GPU_API_NAME, op->n_tokens, op->n_q_heads);
    /* pre-RoPE caches: only the generic kernel turns keys and queries */
    if (op->rope_in_attention || op->rotate_q)
        return attention_impl(ctx, op, stream);
    if (attention_prefill_shaped(op)) {
        if (KVRT_SIM_MUTANT(2)) /* mutant 2: a synchronization, which a capture refuses */
            (void)cudaStreamSynchronize((cudaStream_t)stream);
        return launched(KVRT_GPU_FN(launch_attention_prefill)(op, stream), "attention");
    }
    /* decode-shaped MLA calls (576/512 latent rows, f16 or bf16): the
     * tensor-core MLA kernel; other decode-shaped calls (1 to 8 query tokens
     * per sequence over an f32/f16/bf16 cache): the decode kernel; the rest
     * the generic one */
    if (KVRT_GPU_FN(attention_mla_takes)(op))
        return attention_split_impl(ctx, op, stream, KVRT_GPU_FN(attention_mla_workspace)(op),
                                    KVRT_GPU_FN(launch_attention_mla), "attention (MLA)");
    if (KVRT_GPU_FN(attention_decode_takes)(op))
        return attention_split_impl(ctx, op, stream, KVRT_GPU_FN(attention_decode_workspace)(op),
                                    KVRT_GPU_FN(launch_attention_decode), "attention (decode)");
    return attention_impl(ctx, op, stream);
}

static kvrt_status gpu_attention(kvrt_backend_t *be, const kvrt_attention_op *op, void *stream)
{
    GPU_SCOPED(be, attention_dispatch(GPU_CTX(be), op, stream));
}

/* ------------------------------------------------------------------------ */
/* Open and shut down                                                        */
/* ------------------------------------------------------------------------ */

static void ctx_release(gpu_ctx *ctx)
{
    /* Work queued on any stream may still read staging memory. */
    if (cudaDeviceSynchronize() != cudaSuccess)
        (void)cudaGetLastError();
    while (ctx->n_regions > 0)
        region_destroy_impl(ctx, ctx->regions[ctx->n_regions - 1].base);
    free(ctx->regions);
    ring_release(&ctx->host_ring);
    ring_release(&ctx->device_ring);
    for (int i = 0; i < ctx->n_retired; i++) {
        free_memory(ctx->retired[i].p, ctx->retired[i].is_host);
        if (ctx->retired[i].event != NULL)
            (void)cudaEventDestroy(ctx->retired[i].event);
    }
    free(ctx->retired);
    chunks_free(&ctx->capture_host);
    chunks_free(&ctx->capture_device);
    while (ctx->attn_ws != NULL) {
        gpu_chunk *next = ctx->attn_ws->next;
        if (cudaFree(ctx->attn_ws->p) != cudaSuccess)
            (void)cudaGetLastError();
        free(ctx->attn_ws);
        ctx->attn_ws = next;
    }
    if (ctx->aux != NULL && cudaStreamDestroy(ctx->aux) != cudaSuccess)
        (void)cudaGetLastError();
    free(ctx);
}

static void gpu_shutdown(kvrt_backend_t *be)
{
    gpu_ctx *ctx = GPU_CTX(be);
    if (ctx == NULL)
        return;
    gpu_scope scope;
    int entered = scope_enter(ctx, &scope) == KVRT_OK;
    ctx_release(ctx);
    if (entered)
        (void)scope_leave(&scope, KVRT_OK);
    be->ctx = NULL;
}

static const kvrt_backend_ops gpu_ops = {
    .name = KVRT_GPU_API_NAME,
    .shutdown = gpu_shutdown,
    .region_create = gpu_region_create,
    .region_grow = gpu_region_grow,
    .region_destroy = gpu_region_destroy,
    .zero = gpu_zero,
    .stage = gpu_stage,
    .stage_reset = gpu_stage_reset,
    .upload = gpu_upload,
    .copy = gpu_copy,
    .download = gpu_download,
    .sync = gpu_sync,
    .mem_kind = gpu_mem_kind,
    .scratch_alloc = gpu_scratch_alloc,
    .scratch_free = gpu_scratch_free,
    .write = gpu_write,
    .move = gpu_move,
    .rotate = gpu_rotate,
    .gather = gpu_gather,
    .set_pos = gpu_set_pos,
    .attention = gpu_attention,
};

static kvrt_status ctx_init(gpu_ctx *ctx)
{
    KVRT_GPU_TRY(cudaFree(NULL)); /* initializes the device's context now, not in a step */
    KVRT_GPU_TRY(cudaStreamCreateWithFlags(&ctx->aux, cudaStreamNonBlocking));
#if defined(KVRT_GPU_IS_CUDA)
    ctx->have_vmm = 0;
    if (vmm_load(&ctx->vmm)) {
        CUdevice dev;
        int supported = 0;
        CUmemAllocationProp prop;
        memset(&prop, 0, sizeof prop);
        prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
        prop.location.id = ctx->ordinal;
        size_t granularity = 0;
        if (ctx->vmm.DeviceGet(&dev, ctx->ordinal) == CUDA_SUCCESS &&
            ctx->vmm.DeviceGetAttribute(
                &supported, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, dev) ==
                CUDA_SUCCESS &&
            supported &&
            ctx->vmm.MemGetAllocationGranularity(&granularity, &prop,
                                                 CU_MEM_ALLOC_GRANULARITY_RECOMMENDED) ==
                CUDA_SUCCESS &&
            granularity > 0) {
            ctx->have_vmm = 1;
            ctx->granularity = granularity;
        }
    }
#endif
    KVRT_TRY(ring_init(&ctx->host_ring, GPU_HOST_RING_BYTES, 1));
    KVRT_TRY(ring_init(&ctx->device_ring, GPU_DEVICE_RING_BYTES, 0));
    return KVRT_OK;
}

kvrt_status KVRT_GPU_FN(backend_open)(kvrt_device device, kvrt_backend_t *out)
{
    int count = KVRT_GPU_FN(device_count)();
    KVRT_CHECK(device.ordinal >= 0 && device.ordinal < count, KVRT_ERR_NO_DEVICE,
               "no device %s:%d (%d available)", KVRT_GPU_API_NAME, device.ordinal, count);
    gpu_ctx *ctx = calloc(1, sizeof *ctx);
    KVRT_CHECK(ctx != NULL, KVRT_ERR_OUT_OF_MEMORY, "%s backend context", KVRT_GPU_API_NAME);
    ctx->ordinal = device.ordinal;
    gpu_scope scope;
    kvrt_status st = scope_enter(ctx, &scope);
    if (st != KVRT_OK) {
        free(ctx);
        return st;
    }
    st = ctx_init(ctx);
    if (st != KVRT_OK) {
        char message[512];
        snprintf(message, sizeof message, "%s", kvrt_last_error());
        ctx_release(ctx);
        kvrt_set_error(st, "%s", message);
        return scope_leave(&scope, st);
    }
    out->device = device;
    out->ctx = ctx;
    out->ops = &gpu_ops;
    return scope_leave(&scope, KVRT_OK);
}
