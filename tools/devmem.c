/*
 * devmem.c: device memory, copies, timing and copy bandwidth for the tools
 * and benchmarks. The CPU is handled here; CUDA and HIP go through the
 * runtime tables of devmem_gpu.c when the build has them
 * (DEVMEM_HAVE_CUDA, DEVMEM_HAVE_HIP).
 */
#include "devmem.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef _OPENMP
#  include <omp.h>
#endif

#include "devmem_gpu.h"
#include "kvrt_layout.h" /* element conversions */

static _Thread_local char error_message[512];

int devmem_fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(error_message, sizeof error_message, fmt, ap);
    va_end(ap);
    return -1;
}

const char *devmem_error(void) { return error_message; }

static const devmem_gpu_ops *gpu_ops(kvrt_backend backend)
{
#if defined(DEVMEM_HAVE_CUDA)
    if (backend == KVRT_BACKEND_CUDA)
        return &devmem_cuda_ops;
#endif
#if defined(DEVMEM_HAVE_HIP)
    if (backend == KVRT_BACKEND_HIP)
        return &devmem_hip_ops;
#endif
    (void)backend;
    return NULL;
}

int devmem_supports(kvrt_backend backend)
{
    return backend == KVRT_BACKEND_CPU || gpu_ops(backend) != NULL;
}

/* The GPU table of a device, or NULL with a message (CPU: NULL, no message). */
static const devmem_gpu_ops *device_ops(kvrt_device device, int *failed)
{
    *failed = 0;
    if (device.backend == KVRT_BACKEND_CPU)
        return NULL;
    const devmem_gpu_ops *ops = gpu_ops(device.backend);
    if (ops == NULL) {
        *failed = 1;
        devmem_fail("%s: this build of the tools has no %s runtime",
                    kvrt_backend_name(device.backend), kvrt_backend_name(device.backend));
    }
    return ops;
}

void *devmem_alloc(kvrt_device device, size_t n)
{
    int failed;
    const devmem_gpu_ops *ops = device_ops(device, &failed);
    if (failed)
        return NULL;
    if (ops == NULL) {
        void *p = aligned_alloc(64, (n + 63) / 64 * 64 + 64);
        if (p == NULL)
            devmem_fail("cpu: allocating %zu bytes failed", n);
        return p;
    }
    void *p = NULL;
    return ops->alloc(device.ordinal, n, &p) == 0 ? p : NULL;
}

void devmem_free(kvrt_device device, void *p)
{
    int failed;
    const devmem_gpu_ops *ops = device_ops(device, &failed);
    if (ops != NULL)
        ops->release(device.ordinal, p);
    else if (!failed)
        free(p);
}

static int copy_kind(kvrt_device device, void *dst, const void *src, size_t n, int kind)
{
    int failed;
    const devmem_gpu_ops *ops = device_ops(device, &failed);
    if (failed)
        return -1;
    if (ops == NULL) {
        if (n > 0)
            memcpy(dst, src, n);
        return 0;
    }
    return ops->copy(device.ordinal, dst, src, n, kind);
}

int devmem_upload(kvrt_device device, void *dst, const void *src, size_t n)
{
    return copy_kind(device, dst, src, n, 0);
}

int devmem_download(kvrt_device device, void *dst, const void *src, size_t n)
{
    return copy_kind(device, dst, src, n, 1);
}

int devmem_copy(kvrt_device device, void *dst, const void *src, size_t n)
{
    return copy_kind(device, dst, src, n, 2);
}

int devmem_sync(kvrt_device device)
{
    int failed;
    const devmem_gpu_ops *ops = device_ops(device, &failed);
    if (failed)
        return -1;
    return ops != NULL ? ops->sync(device.ordinal) : 0;
}

double devmem_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int devmem_timer_init(devmem_timer *timer, kvrt_device device)
{
    memset(timer, 0, sizeof *timer);
    timer->device = device;
    int failed;
    const devmem_gpu_ops *ops = device_ops(device, &failed);
    if (failed)
        return -1;
    if (ops == NULL)
        return 0;
    if (ops->event_create(device.ordinal, &timer->start) != 0 ||
        ops->event_create(device.ordinal, &timer->end) != 0) {
        devmem_timer_destroy(timer);
        return -1;
    }
    return 0;
}

void devmem_timer_destroy(devmem_timer *timer)
{
    int failed;
    const devmem_gpu_ops *ops = device_ops(timer->device, &failed);
    if (ops != NULL) {
        ops->event_destroy(timer->start);
        ops->event_destroy(timer->end);
    }
    timer->start = timer->end = NULL;
}

int devmem_timer_start(devmem_timer *timer)
{
    int failed;
    const devmem_gpu_ops *ops = device_ops(timer->device, &failed);
    if (failed)
        return -1;
    if (ops == NULL) {
        timer->t0 = devmem_now();
        return 0;
    }
    return ops->event_record(timer->device.ordinal, timer->start);
}

int devmem_timer_stop(devmem_timer *timer, double *ms)
{
    int failed;
    const devmem_gpu_ops *ops = device_ops(timer->device, &failed);
    if (failed)
        return -1;
    if (ops == NULL) {
        *ms = (devmem_now() - timer->t0) * 1e3;
        return 0;
    }
    float elapsed = 0.0f;
    if (ops->event_record(timer->device.ordinal, timer->end) != 0 ||
        ops->event_elapsed(timer->start, timer->end, &elapsed) != 0)
        return -1;
    *ms = elapsed;
    return 0;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double devmem_median(double *values, int n)
{
    if (n <= 0)
        return 0.0;
    qsort(values, (size_t)n, sizeof(double), cmp_double);
    return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

/* memcpy split into one contiguous, cache-line aligned piece per thread. */
static void cpu_parallel_copy(char *dst, const char *src, size_t n)
{
#pragma omp parallel
    {
        size_t t = 0, n_threads = 1;
#ifdef _OPENMP
        t = (size_t)omp_get_thread_num();
        n_threads = (size_t)omp_get_num_threads();
#endif
        size_t lines = (n + 63) / 64;
        size_t lo = lines * t / n_threads * 64, hi = lines * (t + 1) / n_threads * 64;
        if (hi > n)
            hi = n;
        if (lo < hi)
            memcpy(dst + lo, src + lo, hi - lo);
    }
}

int devmem_copy_probe_init(devmem_copy_probe *probe, kvrt_device device, size_t bytes)
{
    memset(probe, 0, sizeof *probe);
    probe->device = device;
    probe->bytes = bytes;
    probe->src = devmem_alloc(device, bytes);
    probe->dst = devmem_alloc(device, bytes);
    int rc = probe->src != NULL && probe->dst != NULL ? 0 : -1;
    if (rc == 0)
        rc = devmem_timer_init(&probe->timer, device);
    if (rc != 0) {
        devmem_free(device, probe->src);
        devmem_free(device, probe->dst);
        memset(probe, 0, sizeof *probe);
        return -1;
    }
    if (device.backend == KVRT_BACKEND_CPU) { /* touch every page before timing */
        memset(probe->src, 1, bytes);
        memset(probe->dst, 2, bytes);
    }
    double ms;
    for (int r = 0; r < 2 && rc == 0; r++) /* warm-up */
        rc = devmem_copy_probe_run(probe, &ms);
    if (rc != 0)
        devmem_copy_probe_destroy(probe);
    return rc;
}

int devmem_copy_probe_run(devmem_copy_probe *probe, double *ms)
{
    int rc = devmem_timer_start(&probe->timer);
    if (rc == 0 && probe->device.backend == KVRT_BACKEND_CPU)
        cpu_parallel_copy(probe->dst, probe->src, probe->bytes);
    else if (rc == 0)
        rc = devmem_copy(probe->device, probe->dst, probe->src, probe->bytes);
    if (rc == 0)
        rc = devmem_timer_stop(&probe->timer, ms);
    return rc;
}

void devmem_copy_probe_destroy(devmem_copy_probe *probe)
{
    if (probe->src == NULL && probe->dst == NULL)
        return;
    devmem_timer_destroy(&probe->timer);
    devmem_free(probe->device, probe->src);
    devmem_free(probe->device, probe->dst);
    memset(probe, 0, sizeof *probe);
}

double devmem_gbps(double bytes, double ms)
{
    return ms > 0.0 ? bytes / (ms * 1e-3) / 1e9 : 0.0;
}

int devmem_copy_gbps(kvrt_device device, size_t bytes, int runs, double *gbps)
{
    *gbps = 0.0;
    runs = runs < 1 ? 1 : runs;
    devmem_copy_probe probe;
    double *ms = malloc(sizeof(double) * (size_t)runs);
    if (ms == NULL)
        return devmem_fail("host allocation");
    int rc = devmem_copy_probe_init(&probe, device, bytes);
    for (int r = 0; r < runs && rc == 0; r++)
        rc = devmem_copy_probe_run(&probe, &ms[r]);
    if (rc == 0)
        *gbps = devmem_gbps(2.0 * (double)bytes, devmem_median(ms, runs));
    devmem_copy_probe_destroy(&probe);
    free(ms);
    return rc;
}

/* ---- buffers ---- */

static uint64_t splitmix(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

enum { POOL_ELEMS = 1 << 22, POOL_WINDOW = 4096 };

/* Random values of each dtype, made once. */
static const void *pool(kvrt_dtype dtype)
{
    static void *pools[3];
    void *p;
#pragma omp critical(devmem_pool)
    {
        if (pools[dtype] == NULL && (pools[dtype] = malloc(POOL_ELEMS * kvrt_dtype_size(dtype))) != NULL) {
            uint64_t s = 12345 + (uint64_t)dtype;
            for (int64_t i = 0; i < POOL_ELEMS; i++)
                kvrt_store(pools[dtype], (int32_t)dtype, i,
                           (float)((double)(splitmix(&s) >> 11) * 0x1.0p-53 * 2.0 - 1.0));
        }
        p = pools[dtype];
    }
    return p;
}

static int buffer_alloc(kvrt_device device, size_t bytes, devmem_buffer *out)
{
    memset(out, 0, sizeof *out);
    out->device = device;
    out->bytes = bytes;
    out->dev = devmem_alloc(device, bytes);
    if (out->dev == NULL)
        return -1;
    out->host = device.backend == KVRT_BACKEND_CPU ? out->dev : malloc(bytes > 0 ? bytes : 1);
    if (out->host == NULL) {
        devmem_free(device, out->dev);
        return devmem_fail("host image of %zu bytes", bytes);
    }
    return 0;
}

int devmem_buffer_random(kvrt_device device, kvrt_dtype dtype, size_t n, uint64_t seed,
                         devmem_buffer *out)
{
    size_t es = kvrt_dtype_size(dtype);
    const char *values = es != 0 ? pool(dtype) : NULL;
    if (values == NULL)
        return devmem_fail("random values of dtype %d", (int)dtype);
    if (buffer_alloc(device, n * es, out) != 0)
        return -1;
    uint64_t s = seed * 7919 + 1;
    for (size_t i = 0; i < n; i += POOL_WINDOW) {
        size_t m = n - i < POOL_WINDOW ? n - i : POOL_WINDOW;
        size_t at = (size_t)(splitmix(&s) % (POOL_ELEMS - POOL_WINDOW));
        memcpy((char *)out->host + i * es, values + at * es, m * es);
    }
    if (out->host != out->dev && devmem_upload(device, out->dev, out->host, out->bytes) != 0) {
        devmem_buffer_free(out);
        return -1;
    }
    return 0;
}

int devmem_buffer_zero(kvrt_device device, size_t bytes, devmem_buffer *out)
{
    if (buffer_alloc(device, bytes, out) != 0)
        return -1;
    memset(out->host, 0, bytes);
    if (out->host != out->dev && devmem_upload(device, out->dev, out->host, bytes) != 0) {
        devmem_buffer_free(out);
        return -1;
    }
    return 0;
}

int devmem_buffer_pull(devmem_buffer *buf)
{
    if (buf->host == buf->dev)
        return 0;
    return devmem_download(buf->device, buf->host, buf->dev, buf->bytes);
}

void devmem_buffer_free(devmem_buffer *buf)
{
    if (buf->host != buf->dev)
        free(buf->host);
    if (buf->dev != NULL)
        devmem_free(buf->device, buf->dev);
    memset(buf, 0, sizeof *buf);
}
