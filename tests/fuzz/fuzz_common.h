/* The small caches the libFuzzer targets run on, shared with the corpus
 * generator so that its valid states load into them. */
#ifndef KVRT_FUZZ_COMMON_H
#define KVRT_FUZZ_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvrt.h"

enum { FUZZ_ATTN, FUZZ_SWA, FUZZ_MLA, FUZZ_MIXED, FUZZ_N_LAYOUTS };

static const char *const fuzz_layout_names[FUZZ_N_LAYOUTS] = {"attn", "swa", "mla", "mixed"};

#define FUZZ_MAX_SEQS 4
#define FUZZ_BLOCK_SIZE 4
#define FUZZ_N_BLOCKS 48
#define FUZZ_CROSS_MAX_LEN 12

/* Fills layers (room for 8) and desc for a layout. */
static inline void fuzz_desc(int layout, kvrt_cache_desc *d, kvrt_layer_desc *layers)
{
    const kvrt_layer_desc attn = {KVRT_LAYER_ATTN, 2, 8, 16, 0, 0, 0};
    const kvrt_layer_desc full = {KVRT_LAYER_ATTN, 1, 8, 8, 0, 0, 0};
    const kvrt_layer_desc swa = {KVRT_LAYER_ATTN, 1, 8, 8, 6, 0, 0};
    const kvrt_layer_desc mla = {KVRT_LAYER_MLA, 0, 0, 0, 0, 16, 8};
    const kvrt_layer_desc cross = {KVRT_LAYER_CROSS, 1, 8, 16, 0, 0, 0};
    int n = 0;
    kvrt_dtype dtype = KVRT_F16;
    switch (layout) {
    case FUZZ_ATTN: layers[n++] = attn; layers[n++] = attn; dtype = KVRT_F32; break;
    case FUZZ_SWA: layers[n++] = full; layers[n++] = swa; layers[n++] = swa; dtype = KVRT_BF16; break;
    case FUZZ_MLA: layers[n++] = mla; layers[n++] = mla; break;
    default: layers[n++] = full; layers[n++] = swa; layers[n++] = mla; layers[n++] = cross; break;
    }
    kvrt_cache_desc_init(d);
    d->dtype = dtype;
    d->layers = layers;
    d->n_layers = n;
    d->max_seqs = FUZZ_MAX_SEQS;
    d->block_size = FUZZ_BLOCK_SIZE;
    d->n_blocks = FUZZ_N_BLOCKS;
    d->cross_max_len = FUZZ_CROSS_MAX_LEN;
    d->rope.n_rot = layout == FUZZ_MLA ? 0 : 4;
}

/* Aborts with a message: how a target reports a broken invariant. */
#define FUZZ_ASSERT(cond, ...)                                                                 \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            fprintf(stderr, "fuzz: %s:%d: %s: ", __FILE__, __LINE__, #cond);                   \
            fprintf(stderr, __VA_ARGS__);                                                      \
            fprintf(stderr, "\n");                                                             \
            abort();                                                                           \
        }                                                                                      \
    } while (0)

/* An input in memory, as a kvrt_state_reader. */
typedef struct fuzz_input {
    const uint8_t *data;
    size_t         size, pos;
} fuzz_input;

static inline kvrt_status fuzz_reader(void *user, void *data, size_t n, size_t *got)
{
    fuzz_input *in = user;
    size_t m = in->size - in->pos < n ? in->size - in->pos : n;
    if (m > 0)
        memcpy(data, in->data + in->pos, m);
    in->pos += m;
    *got = m;
    return KVRT_OK;
}

/* A growing buffer, as a kvrt_state_writer. */
typedef struct fuzz_output {
    uint8_t *data;
    size_t   size, cap;
} fuzz_output;

static inline kvrt_status fuzz_writer(void *user, const void *data, size_t n)
{
    fuzz_output *out = user;
    if (out->size + n > out->cap) {
        size_t cap = out->cap > 0 ? out->cap : 4096;
        while (cap < out->size + n)
            cap *= 2;
        uint8_t *p = realloc(out->data, cap);
        if (p == NULL)
            return KVRT_ERR_OUT_OF_MEMORY;
        out->data = p;
        out->cap = cap;
    }
    memcpy(out->data + out->size, data, n);
    out->size += n;
    return KVRT_OK;
}

/* Statuses a call may return on a fuzzed input; anything else (INTERNAL,
 * DEVICE, ...) is a bug. */
static inline int fuzz_status_expected(kvrt_status st)
{
    switch (st) {
    case KVRT_OK:
    case KVRT_ERR_INVALID_ARG:
    case KVRT_ERR_CAPACITY:
    case KVRT_ERR_POS_EXISTS:
    case KVRT_ERR_POS_RANGE:
    case KVRT_ERR_WINDOW_EVICTED:
    case KVRT_ERR_INCOMPATIBLE:
    case KVRT_ERR_CORRUPT:
        return 1;
    default:
        return 0;
    }
}

#endif
