/* Helpers shared by the unit tests: small caches, deterministic data. */
#ifndef KVRT_TEST_COMMON_H
#define KVRT_TEST_COMMON_H

#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kvrt.h"

#define OK(expr)                                                                               \
    do {                                                                                       \
        kvrt_status st_ = (expr);                                                              \
        if (st_ != KVRT_OK)                                                                    \
            fail_msg("%s -> %s: %s", #expr, kvrt_status_name(st_), kvrt_last_error());         \
    } while (0)

#define EXPECT(status, expr)                                                                   \
    do {                                                                                       \
        kvrt_status st_ = (expr);                                                              \
        if (st_ != (status))                                                                   \
            fail_msg("%s -> %s, expected %s (%s)", #expr, kvrt_status_name(st_),               \
                     kvrt_status_name(status), kvrt_last_error());                             \
    } while (0)

/* Deterministic value of element e of token position p in layer l. */
static inline float test_value(int l, int32_t p, int64_t e)
{
    uint32_t x = (uint32_t)(l * 7919 + p * 104729 + (int32_t)e * 31);
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    x ^= x >> 15;
    return (float)(x % 2001) / 1000.0f - 1.0f;
}

static inline kvrt_cache_desc test_desc(kvrt_layer_desc *layers, int n_layers, kvrt_dtype dtype,
                                        int block_size, int n_blocks, int max_seqs)
{
    kvrt_cache_desc d;
    kvrt_cache_desc_init(&d);
    d.dtype = dtype;
    d.layers = layers;
    d.n_layers = n_layers;
    d.block_size = block_size;
    d.n_blocks = n_blocks;
    d.max_seqs = max_seqs;
    return d;
}

/* ---- what a cache holds, as bytes to compare ---- */

/* test_misuse.c wraps the allocator and grows images with the real one. */
#ifndef TEST_REALLOC
#define TEST_REALLOC realloc
#endif

/* Every sequence's state (kvrt_state_write's bytes) and the statistics of
 * every group. */
typedef struct image {
    unsigned char   *bytes;
    size_t           n, cap;
    kvrt_cache_stats stats;
} image;

/* A state writer into an image. */
static inline kvrt_status append(void *user, const void *data, size_t size)
{
    image *im = user;
    if (im->n + size > im->cap) {
        im->cap = (im->n + size) * 2;
        im->bytes = TEST_REALLOC(im->bytes, im->cap);
        assert_non_null(im->bytes);
    }
    memcpy(im->bytes + im->n, data, size);
    im->n += size;
    return KVRT_OK;
}

static inline image take_image(kvrt_cache *c)
{
    image im = {0};
    OK(kvrt_cache_check(c));
    OK(kvrt_state_write(c, -1, append, &im));
    OK(kvrt_cache_stats_get(c, -1, &im.stats));
    return im;
}

#endif
