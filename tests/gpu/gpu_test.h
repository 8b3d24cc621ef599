/*
 * gpu_test.h: helpers shared by the GPU tests: a check macro that records
 * failures and goes on, deterministic random numbers, and the backend under
 * test chosen from argv ("cuda" or "hip"). A test exits 0 when every check
 * held, 1 when one failed, 77 (meson's skip) when the backend has no device.
 */
#ifndef KVRT_GPU_TEST_H
#define KVRT_GPU_TEST_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvrt.h"

#define GPU_TEST_SKIP 77

static int gpu_test_failures;

#define CHECK(cond, ...)                                                                     \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            gpu_test_failures++;                                                             \
            fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, #cond);         \
            fprintf(stderr, __VA_ARGS__);                                                    \
            fprintf(stderr, "\n");                                                           \
        }                                                                                    \
    } while (0)

/* Checks that a kvrt call succeeds; on failure returns from the enclosing
 * function (which returns void), since what follows depends on it. */
#define OK(expr)                                                                             \
    do {                                                                                     \
        kvrt_status ok_status_ = (expr);                                                     \
        if (ok_status_ != KVRT_OK) {                                                         \
            gpu_test_failures++;                                                             \
            fprintf(stderr, "%s:%d: %s -> %s: %s\n", __FILE__, __LINE__, #expr,              \
                    kvrt_status_name(ok_status_), kvrt_last_error());                        \
            return;                                                                          \
        }                                                                                    \
    } while (0)

/* xorshift64*: the same sequence everywhere. */
typedef struct rng {
    uint64_t s;
} rng;

static inline uint64_t rng_next(rng *r)
{
    r->s ^= r->s >> 12;
    r->s ^= r->s << 25;
    r->s ^= r->s >> 27;
    return r->s * 2685821657736338717ull;
}

/* Uniform in [0, n). */
static inline int64_t rng_below(rng *r, int64_t n) { return (int64_t)(rng_next(r) % (uint64_t)n); }

/* Uniform in [lo, hi). */
static inline float rng_float(rng *r, float lo, float hi)
{
    return lo + (hi - lo) * (float)((rng_next(r) >> 40) * (1.0 / 16777216.0));
}

/* A random permutation's first n elements of [0, range): n distinct values. */
static inline void rng_distinct(rng *r, int32_t *out, int32_t n, int32_t range)
{
    int32_t *all = malloc((size_t)range * sizeof *all);
    for (int32_t i = 0; i < range; i++)
        all[i] = i;
    for (int32_t i = 0; i < n; i++) {
        int32_t j = i + (int32_t)rng_below(r, range - i);
        int32_t t = all[i];
        all[i] = all[j];
        all[j] = t;
        out[i] = all[i];
    }
    free(all);
}

/* The backend named by argv[1] ("cuda" default, "hip"). */
static inline kvrt_backend gpu_test_backend(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "hip") == 0)
        return KVRT_BACKEND_HIP;
    return KVRT_BACKEND_CUDA;
}

static inline int gpu_test_result(const char *name)
{
    if (gpu_test_failures > 0) {
        fprintf(stderr, "%s: %d check(s) failed\n", name, gpu_test_failures);
        return 1;
    }
    printf("%s: all checks passed\n", name);
    return 0;
}

#endif /* KVRT_GPU_TEST_H */
