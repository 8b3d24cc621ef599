/*
 * devmem.h: memory, copies and timing on the device a cache lives on, for
 * the tools and benchmarks (not part of the library). kvrt takes device
 * pointers for its inputs and outputs but does not allocate them: on the CPU
 * backend device memory is host memory; on CUDA and HIP it comes from the
 * runtime, which this helper is linked against when the build finds it.
 *
 * Every function returns 0 on success and -1 on failure, with a message in
 * devmem_error().
 */
#ifndef KVRT_DEVMEM_H
#define KVRT_DEVMEM_H

#include <stddef.h>
#include <stdint.h>

#include "kvrt.h"

/* 1 when this helper can allocate on the backend (always for the CPU). */
int devmem_supports(kvrt_backend backend);

/* n bytes of device memory (64-byte aligned host memory on the CPU);
 * NULL on failure. */
void *devmem_alloc(kvrt_device device, size_t n);
/* NULL is fine. */
void devmem_free(kvrt_device device, void *p);

/* Host to device, device to host, device to device; each returns when the
 * copy is complete. */
int devmem_upload(kvrt_device device, void *dst, const void *src, size_t n);
int devmem_download(kvrt_device device, void *dst, const void *src, size_t n);
int devmem_copy(kvrt_device device, void *dst, const void *src, size_t n);

/* Waits for all work queued on the device (a no-op on the CPU). */
int devmem_sync(kvrt_device device);

/* A stopwatch for device work: events on the default stream on GPUs, the
 * monotonic clock on the CPU (whose work completes before calls return). */
typedef struct devmem_timer {
    kvrt_device device;
    double      t0;          /* CPU: seconds at start */
    void       *start, *end; /* GPU: events */
} devmem_timer;

int devmem_timer_init(devmem_timer *timer, kvrt_device device);
void devmem_timer_destroy(devmem_timer *timer);
int devmem_timer_start(devmem_timer *timer);
/* Waits for the work queued since start and sets *ms to its duration. */
int devmem_timer_stop(devmem_timer *timer, double *ms);

/* Seconds of the monotonic clock. */
double devmem_now(void);

/* A large device copy, timed one run at a time, so that a benchmark can
 * interleave it with the runs of what it measures and compare the two
 * under the same conditions. On the CPU a memcpy split into one contiguous
 * piece per OpenMP thread; on GPUs a device-to-device copy timed with
 * events. */
typedef struct devmem_copy_probe {
    kvrt_device  device;
    char        *src, *dst;
    size_t       bytes;
    devmem_timer timer;
} devmem_copy_probe;

/* Allocates and touches both buffers and runs two warm-up copies. */
int devmem_copy_probe_init(devmem_copy_probe *probe, kvrt_device device, size_t bytes);
/* One copy of probe->bytes; *ms its duration. */
int devmem_copy_probe_run(devmem_copy_probe *probe, double *ms);
/* A zeroed probe is fine. */
void devmem_copy_probe_destroy(devmem_copy_probe *probe);

/* GB/s (1e9 bytes per second) of `bytes` moved in `ms`. */
double devmem_gbps(double bytes, double ms);

/* The device's copy bandwidth in GB/s, counting bytes read plus bytes
 * written: the median of `runs` probe copies of `bytes` after a warm-up. */
int devmem_copy_gbps(kvrt_device device, size_t bytes, int runs, double *gbps);

/* A device buffer with a host image of what it holds (the same memory on
 * the CPU), so that results can be checked on the host. */
typedef struct devmem_buffer {
    kvrt_device device;
    void       *dev;
    void       *host;
    size_t      bytes;
} devmem_buffer;

/* n elements of dtype with pseudo-random values in [-1, 1), a function of
 * seed (windows of a fixed random pool, so that large buffers fill at memcpy
 * speed). */
int devmem_buffer_random(kvrt_device device, kvrt_dtype dtype, size_t n, uint64_t seed,
                         devmem_buffer *out);
/* bytes of zeros. */
int devmem_buffer_zero(kvrt_device device, size_t bytes, devmem_buffer *out);
/* Copies the device contents into the host image. */
int devmem_buffer_pull(devmem_buffer *buf);
/* A zeroed buffer is fine. */
void devmem_buffer_free(devmem_buffer *buf);

/* The message of the last failure on this thread. */
const char *devmem_error(void);

/* Median of n values (sorts them). */
double devmem_median(double *values, int n);

#endif /* KVRT_DEVMEM_H */
