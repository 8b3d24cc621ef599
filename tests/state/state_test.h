/* Helpers of the state and offload tests: caches of every layout, filling
 * sequences with deterministic rows, snapshots of what a cache holds, state
 * images in memory, and the file-size formula of docs/state-format.md. */
#ifndef KVRT_STATE_TEST_H
#define KVRT_STATE_TEST_H

#include "../unit/common.h" /* cmocka, kvrt.h, OK() and EXPECT() */

/* ---- layouts ---- */

enum { LAYOUT_ATTN, LAYOUT_SWA, LAYOUT_MLA, LAYOUT_CROSS, LAYOUT_MIXED, N_LAYOUTS };

static const char *const layout_names[N_LAYOUTS] = {"attn", "swa", "mla", "cross", "mixed"};

/* Small heads keep 8k-token sequences cheap; K and V dims differ so that a
 * mix-up shows. */
static inline int layout_layers(int layout, kvrt_layer_desc *out)
{
    const kvrt_layer_desc attn = {KVRT_LAYER_ATTN, 2, 16, 8, 0, 0, 0};
    const kvrt_layer_desc swa = {KVRT_LAYER_ATTN, 1, 8, 16, 96, 0, 0};
    const kvrt_layer_desc mla = {KVRT_LAYER_MLA, 0, 0, 0, 0, 32, 16};
    const kvrt_layer_desc cross = {KVRT_LAYER_CROSS, 2, 8, 16, 0, 0, 0};
    int n = 0;
    switch (layout) {
    case LAYOUT_ATTN: out[n++] = attn; out[n++] = attn; break;
    case LAYOUT_SWA: out[n++] = attn; out[n++] = swa; out[n++] = attn; out[n++] = swa; break;
    case LAYOUT_MLA: out[n++] = mla; out[n++] = mla; break;
    case LAYOUT_CROSS: out[n++] = attn; out[n++] = cross; out[n++] = attn; out[n++] = cross; break;
    default: out[n++] = attn; out[n++] = swa; out[n++] = mla; out[n++] = cross; break;
    }
    return n;
}

typedef struct cache_opts {
    kvrt_dtype dtype;
    int        block_size;
    int        n_blocks;
    int        max_blocks;
    int        max_seqs;
    int        cross_max_len;
    int        swa_full;
} cache_opts;

static inline kvrt_cache *make_cache_layers(const kvrt_layer_desc *layers, int n_layers,
                                            cache_opts o)
{
    kvrt_cache_desc d;
    kvrt_cache_desc_init(&d);
    d.dtype = o.dtype;
    d.layers = layers;
    d.n_layers = n_layers;
    d.block_size = o.block_size;
    d.n_blocks = o.n_blocks;
    d.max_blocks = o.max_blocks;
    d.max_seqs = o.max_seqs;
    d.cross_max_len = o.cross_max_len;
    d.swa_full = o.swa_full;
    d.rope.n_rot = 8;
    d.rope.theta = 10000.0f;
    int has_attn = 0;
    for (int i = 0; i < n_layers; i++)
        has_attn |= layers[i].kind == KVRT_LAYER_ATTN;
    if (!has_attn)
        d.rope.n_rot = 0;
    kvrt_cache *c = NULL;
    OK(kvrt_cache_create(&d, &c));
    return c;
}

static inline kvrt_cache *make_cache(int layout, cache_opts o)
{
    kvrt_layer_desc layers[8];
    int n = layout_layers(layout, layers);
    return make_cache_layers(layers, n, o);
}

/* ---- deterministic rows ---- */

static inline float row_value(uint32_t salt, int layer, int32_t pos, int64_t e)
{
    uint32_t x = salt * 2654435761u ^ (uint32_t)layer * 7919u ^ (uint32_t)pos * 104729u ^
                 (uint32_t)e * 31u;
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    x ^= x >> 15;
    return (float)(x % 4001) / 1000.0f - 2.0f;
}

static inline size_t layer_k_elems(const kvrt_layer_desc *l)
{
    return l->kind == KVRT_LAYER_MLA ? (size_t)(l->latent_dim + l->rope_dim)
                                     : (size_t)l->n_kv_heads * (size_t)l->head_dim_k;
}

static inline size_t layer_v_elems(const kvrt_layer_desc *l)
{
    return l->kind == KVRT_LAYER_MLA ? 0 : (size_t)l->n_kv_heads * (size_t)l->head_dim_v;
}

/* Plans positions p0, p0 + stride, ... (n of them) of seq in batches and
 * writes every self-attention layer's rows. */
static inline void fill_seq(kvrt_cache *c, int32_t seq, int32_t p0, int64_t n, int32_t stride,
                            uint32_t salt)
{
    const kvrt_cache_desc *d = kvrt_cache_get_desc(c);
    const int max_batch = 512;
    kvrt_batch *b = NULL;
    OK(kvrt_batch_create(c, max_batch, &b));
    int32_t *seqs = malloc(max_batch * sizeof(int32_t)), *pos = malloc(max_batch * sizeof(int32_t));
    size_t most = 1;
    for (int l = 0; l < d->n_layers; l++) {
        size_t e = layer_k_elems(&d->layers[l]) > layer_v_elems(&d->layers[l])
                       ? layer_k_elems(&d->layers[l]) : layer_v_elems(&d->layers[l]);
        if (e > most)
            most = e;
    }
    float *k = malloc(max_batch * most * sizeof(float)), *v = malloc(max_batch * most * sizeof(float));
    for (int64_t done = 0; done < n;) {
        int m = n - done < max_batch ? (int)(n - done) : max_batch;
        for (int i = 0; i < m; i++) {
            seqs[i] = seq;
            pos[i] = p0 + (int32_t)(done + i) * stride;
        }
        OK(kvrt_batch_plan(c, m, seqs, pos, b));
        for (int l = 0; l < d->n_layers; l++) {
            const kvrt_layer_desc *ld = &d->layers[l];
            if (ld->kind == KVRT_LAYER_CROSS)
                continue;
            size_t ke = layer_k_elems(ld), ve = layer_v_elems(ld);
            for (int i = 0; i < m; i++) {
                for (size_t e = 0; e < ke; e++)
                    k[i * ke + e] = row_value(salt, l, pos[i], (int64_t)e);
                for (size_t e = 0; e < ve; e++)
                    v[i * ve + e] = row_value(salt + 1, l, pos[i], (int64_t)e);
            }
            OK(kvrt_write(c, b, l, k, ve > 0 ? v : NULL, KVRT_F32, NULL));
        }
        done += m;
    }
    kvrt_batch_destroy(b);
    free(seqs);
    free(pos);
    free(k);
    free(v);
}

/* Sets n cross rows of every CROSS layer of seq. */
static inline void fill_cross(kvrt_cache *c, int32_t seq, int n, uint32_t salt)
{
    const kvrt_cache_desc *d = kvrt_cache_get_desc(c);
    for (int l = 0; l < d->n_layers; l++) {
        const kvrt_layer_desc *ld = &d->layers[l];
        if (ld->kind != KVRT_LAYER_CROSS)
            continue;
        size_t ke = layer_k_elems(ld), ve = layer_v_elems(ld);
        float *k = malloc((size_t)n * ke * sizeof(float) + 4), *v = malloc((size_t)n * ve * sizeof(float) + 4);
        for (int i = 0; i < n; i++) {
            for (size_t e = 0; e < ke; e++)
                k[i * ke + e] = row_value(salt + 7, l, i, (int64_t)e);
            for (size_t e = 0; e < ve; e++)
                v[i * ve + e] = row_value(salt + 8, l, i, (int64_t)e);
        }
        OK(kvrt_cross_set(c, l, seq, n, k, v, KVRT_F32, NULL));
        free(k);
        free(v);
    }
}

/* ---- byte buffers, state images ---- */

typedef struct blob {
    uint8_t *data;
    size_t   size, cap, pos;
    size_t   fail_after;   /* writer: fail once this many bytes are written (0: never) */
} blob;

static inline void blob_put(blob *b, const void *data, size_t n)
{
    if (b->size + n > b->cap) {
        size_t cap = b->cap > 0 ? b->cap : 4096;
        while (cap < b->size + n)
            cap *= 2;
        b->data = realloc(b->data, cap);
        assert_non_null(b->data);
        b->cap = cap;
    }
    if (n > 0)
        memcpy(b->data + b->size, data, n);
    b->size += n;
}

static inline void blob_free(blob *b)
{
    free(b->data);
    memset(b, 0, sizeof *b);
}

static inline kvrt_status blob_writer(void *user, const void *data, size_t n)
{
    blob *b = user;
    if (b->fail_after > 0 && b->size + n > b->fail_after)
        return KVRT_ERR_IO;
    blob_put(b, data, n);
    return KVRT_OK;
}

static inline kvrt_status blob_reader(void *user, void *data, size_t n, size_t *got)
{
    blob *b = user;
    size_t m = b->size - b->pos < n ? b->size - b->pos : n;
    memcpy(data, b->data + b->pos, m);
    b->pos += m;
    *got = m;
    return KVRT_OK;
}

static inline blob save_state(kvrt_cache *c, int32_t seq)
{
    blob b = {0};
    OK(kvrt_state_write(c, seq, blob_writer, &b));
    uint64_t size = 0;
    OK(kvrt_state_size(c, seq, &size));
    assert_int_equal(size, b.size);
    return b;
}

static inline kvrt_status load_state(kvrt_cache *c, int32_t dst, const uint8_t *data, size_t size)
{
    blob b = {(uint8_t *)data, size, size, 0, 0};
    return kvrt_state_read(c, dst, blob_reader, &b);
}

/* ---- snapshots ---- */

/* What a cache holds for one sequence, independent of block size: per group
 * its token count, range and evicted range; per layer its rows and
 * positions in position order. */
static inline void snap_seq(const kvrt_cache *c, int32_t seq, blob *out)
{
    const kvrt_cache_desc *d = kvrt_cache_get_desc(c);
    for (int g = 0; g < kvrt_cache_n_groups(c); g++) {
        kvrt_seq_group_info info;
        OK(kvrt_seq_group_info_get(c, seq, g, &info));
        int64_t rec[4] = {info.n_tokens, info.pos_min, info.pos_max, info.evicted_max};
        blob_put(out, rec, sizeof rec);
    }
    size_t es = kvrt_dtype_size(d->dtype);
    for (int l = 0; l < d->n_layers; l++) {
        kvrt_seq_group_info info;
        OK(kvrt_seq_group_info_get(c, seq, kvrt_layer_group(c, l), &info));
        int64_t n = info.n_tokens, got = -1;
        size_t kb = layer_k_elems(&d->layers[l]) * es, vb = layer_v_elems(&d->layers[l]) * es;
        void *k = malloc((size_t)n * kb + 1), *v = malloc((size_t)n * vb + 1);
        int32_t *pos = malloc((size_t)n * sizeof(int32_t) + 4);
        OK(kvrt_gather(c, l, seq, 0, -1, k, vb > 0 ? v : NULL, pos, n, &got, NULL));
        assert_int_equal(got, n);
        blob_put(out, &n, sizeof n);
        blob_put(out, pos, (size_t)n * sizeof(int32_t));
        blob_put(out, k, (size_t)n * kb);
        blob_put(out, v, (size_t)n * vb);
        free(k);
        free(v);
        free(pos);
    }
}

/* Everything observable: statistics, per-sequence page use and contents. */
static inline void snap_cache(const kvrt_cache *c, blob *out)
{
    const kvrt_cache_desc *d = kvrt_cache_get_desc(c);
    kvrt_cache_stats st;
    OK(kvrt_cache_stats_get(c, -1, &st));
    blob_put(out, &st, sizeof st);
    for (int32_t s = 0; s < d->max_seqs; s++) {
        for (int g = 0; g < kvrt_cache_n_groups(c); g++) {
            kvrt_seq_group_info info;
            OK(kvrt_seq_group_info_get(c, s, g, &info));
            blob_put(out, &info, sizeof info);
        }
        snap_seq(c, s, out);
    }
}

static inline void assert_same_blob(const blob *a, const blob *b, const char *what)
{
    if (a->size != b->size || memcmp(a->data, b->data, a->size) != 0)
        fail_msg("%s differ (%zu and %zu bytes)", what, a->size, b->size);
}

/* seq of cache a holds exactly what seq_b of cache b holds. */
static inline void assert_same_seq(const kvrt_cache *a, int32_t seq_a, const kvrt_cache *b,
                                   int32_t seq_b)
{
    blob x = {0}, y = {0};
    snap_seq(a, seq_a, &x);
    snap_seq(b, seq_b, &y);
    char what[96];
    snprintf(what, sizeof what, "sequence %d and sequence %d", (int)seq_a, (int)seq_b);
    assert_same_blob(&x, &y, what);
    blob_free(&x);
    blob_free(&y);
}

/* ---- the file size formula of docs/state-format.md ---- */

static inline int group_is_self(const kvrt_cache *c, int g)
{
    const kvrt_cache_desc *d = kvrt_cache_get_desc(c);
    for (int l = 0; l < d->n_layers; l++)
        if (kvrt_layer_group(c, l) == g)
            return d->layers[l].kind != KVRT_LAYER_CROSS;
    return 0;
}

static inline uint64_t formula_size(const kvrt_cache *c, const int32_t *seqs, int n_seqs)
{
    const kvrt_cache_desc *d = kvrt_cache_get_desc(c);
    uint64_t L = (uint64_t)d->n_layers;
    uint64_t size = 8 + (24 + 56 + 40 * L);
    for (int i = 0; i < n_seqs; i++) {
        size += 24 + 8;
        for (int g = 0; g < kvrt_cache_n_groups(c); g++) {
            kvrt_seq_group_info info;
            OK(kvrt_seq_group_info_get(c, seqs[i], g, &info));
            size += 16 + 4 * (uint64_t)info.n_tokens * (uint64_t)group_is_self(c, g);
        }
        for (int l = 0; l < d->n_layers; l++) {
            kvrt_seq_group_info info;
            OK(kvrt_seq_group_info_get(c, seqs[i], kvrt_layer_group(c, l), &info));
            size += 24 + 24 + (uint64_t)info.n_tokens * kvrt_layer_row_bytes(&d->layers[l], d->dtype);
        }
    }
    return size + 24 + 8;
}

#endif
