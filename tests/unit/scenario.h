/*
 * scenario.h: helpers for the scenario tests (seeds, layouts) that run on the
 * backend named by KVRT_TEST_BACKEND (cpu, cuda, hip; cpu by default):
 *   - the backend under test, and device copies of host inputs (kvrt_write,
 *     kvrt_cross_set and kvrt_attention take device pointers);
 *   - row values that every dtype holds exactly (k / 128, |k| <= 128), so
 *     what comes back from the cache compares bit-exact in f32, f16 and bf16;
 *   - the test's own decoding of f16 / bf16 (not the library's);
 *   - the step (plan + write every self-attention layer) and checks of what a
 *     sequence holds against the test's expectation;
 *   - a double-precision attention reference;
 *   - an independent model of one sequence in a sliding-window group, as the
 *     header documents it: a plan frees the blocks whose rows all lie at or
 *     below (oldest new position - window); a tail removal drops rows and
 *     trailing slots.
 *
 * Device copies use the library's internal backend interface (src/backend.h)
 * on the same device: the public API has no allocator, and the tests must not
 * depend on a GPU toolkit at build time.
 */
#ifndef KVRT_TEST_SCENARIO_H
#define KVRT_TEST_SCENARIO_H

#include "common.h"

#include "backend.h"

/* ------------------------------------------------------------------------ */
/* The backend under test                                                    */
/* ------------------------------------------------------------------------ */

typedef struct sc_backend {
    kvrt_device    device;
    kvrt_backend_t be;      /* opened for GPU backends only */
    int            on_host; /* CPU: host pointers are device pointers */
} sc_backend;

static sc_backend sc_dev;

/* Reads KVRT_TEST_BACKEND. Returns 0 when the backend has a device, 77 (the
 * skip status of meson) when it has none, 1 on a bad value. */
static inline int sc_backend_init(void)
{
    const char *name = getenv("KVRT_TEST_BACKEND");
    memset(&sc_dev, 0, sizeof sc_dev);
    if (name == NULL || name[0] == '\0' || strcmp(name, "cpu") == 0)
        sc_dev.device.backend = KVRT_BACKEND_CPU;
    else if (strcmp(name, "cuda") == 0)
        sc_dev.device.backend = KVRT_BACKEND_CUDA;
    else if (strcmp(name, "hip") == 0)
        sc_dev.device.backend = KVRT_BACKEND_HIP;
    else {
        fprintf(stderr, "KVRT_TEST_BACKEND=%s: expected cpu, cuda or hip\n", name);
        return 1;
    }
    if (kvrt_device_count(sc_dev.device.backend) < 1) {
        fprintf(stderr, "no %s device: skipped\n", kvrt_backend_name(sc_dev.device.backend));
        return 77;
    }
    sc_dev.on_host = sc_dev.device.backend == KVRT_BACKEND_CPU;
    if (!sc_dev.on_host && kvrt_backend_open(sc_dev.device, &sc_dev.be) != KVRT_OK) {
        fprintf(stderr, "opening %s:0 failed: %s\n", kvrt_backend_name(sc_dev.device.backend),
                kvrt_last_error());
        return 1;
    }
    return 0;
}

static inline void sc_backend_fini(void)
{
    if (!sc_dev.on_host)
        kvrt_backend_close(&sc_dev.be);
}

/* A device buffer holding a copy of host memory (on the CPU, the host memory itself). */
typedef struct sc_buf {
    void  *p;
    size_t n;
    int    owned;
} sc_buf;

static inline sc_buf sc_upload(const void *host, size_t n)
{
    sc_buf b = {(void *)(uintptr_t)host, n, 0};
    if (sc_dev.on_host || n == 0)
        return b;
    OK(sc_dev.be.ops->region_create(&sc_dev.be, n, n, &b.p));
    b.owned = 1;
    if (host != NULL)
        OK(sc_dev.be.ops->upload(&sc_dev.be, b.p, host, n, NULL));
    OK(sc_dev.be.ops->sync(&sc_dev.be, NULL));
    return b;
}

/* Copies a device buffer back into host memory (no-op on the CPU when it is the same). */
static inline void sc_download(void *host, const sc_buf *b)
{
    if (!b->owned) {
        if (host != b->p)
            memcpy(host, b->p, b->n);
        return;
    }
    OK(sc_dev.be.ops->sync(&sc_dev.be, NULL));
    OK(sc_dev.be.ops->download(&sc_dev.be, host, b->p, b->n, NULL));
}

static inline void sc_buf_free(sc_buf *b)
{
    if (b->owned) {
        (void)sc_dev.be.ops->sync(&sc_dev.be, NULL);
        sc_dev.be.ops->region_destroy(&sc_dev.be, b->p, b->n);
    }
    b->p = NULL;
    b->owned = 0;
}

static inline kvrt_cache_desc sc_desc(kvrt_layer_desc *layers, int n_layers, kvrt_dtype dtype,
                               int block_size, int n_blocks, int max_seqs)
{
    kvrt_cache_desc d = test_desc(layers, n_layers, dtype, block_size, n_blocks, max_seqs);
    d.device = sc_dev.device;
    return d;
}

/* ------------------------------------------------------------------------ */
/* Values and dtypes                                                         */
/* ------------------------------------------------------------------------ */

/* Value k / 128 (|k| <= 128) for element e of a row: f32, f16 and bf16 all
 * hold it exactly. `tag` tells apart rows written at the same position at
 * different times (a token id, a version). */
static inline float sc_val(uint32_t tag, int32_t l, int32_t p, int64_t e)
{
    uint32_t x = tag * 0x9e3779b1u ^ (uint32_t)l * 0x85ebca6bu ^ (uint32_t)p * 0xc2b2ae35u ^
                 (uint32_t)e * 0x27d4eb2fu;
    x ^= x >> 15;
    x *= 0x2c1b3c6du;
    x ^= x >> 12;
    x *= 0x297a2d39u;
    x ^= x >> 15;
    return (float)((int)(x % 257u) - 128) / 128.0f;
}

/* Offsets of the value streams of one layer: self K, self V, cross K, cross V. */
enum { SC_K = 0, SC_V = 4096, SC_XK = 8192, SC_XV = 12288, SC_Q = 16384 };

/* f16 / bf16 to f32, written here rather than taken from the library. */
static inline float sc_f16(uint16_t h)
{
    int e = (h >> 10) & 31, m = h & 1023;
    float f;
    if (e == 0)
        f = ldexpf((float)m, -24);
    else if (e == 31)
        f = m ? NAN : INFINITY;
    else
        f = ldexpf((float)(m + 1024), e - 25);
    return (h & 0x8000) ? -f : f;
}

static inline float sc_bf16(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Converts n elements of `dtype` to f32. */
static inline void sc_to_f32(float *dst, const void *src, kvrt_dtype dtype, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        if (dtype == KVRT_F32)
            dst[i] = ((const float *)src)[i];
        else if (dtype == KVRT_F16)
            dst[i] = sc_f16(((const uint16_t *)src)[i]);
        else
            dst[i] = sc_bf16(((const uint16_t *)src)[i]);
    }
}

/* Elements of a K row / V row of a layer (all heads). */
static inline int64_t sc_kw(const kvrt_layer_desc *ld)
{
    return ld->kind == KVRT_LAYER_MLA ? ld->latent_dim + ld->rope_dim
                                      : (int64_t)ld->n_kv_heads * ld->head_dim_k;
}
static inline int64_t sc_vw(const kvrt_layer_desc *ld)
{
    return ld->kind == KVRT_LAYER_MLA ? 0 : (int64_t)ld->n_kv_heads * ld->head_dim_v;
}

static inline const kvrt_layer_desc *sc_layer(const kvrt_cache *c, int l)
{
    return &kvrt_cache_get_desc(c)->layers[l];
}

/* ------------------------------------------------------------------------ */
/* The step                                                                  */
/* ------------------------------------------------------------------------ */

/* Writes the rows of the batch's tokens, positions pos[0..n) with tags
 * tags[0..n), into every self-attention layer. */
static inline kvrt_status sc_write_all(kvrt_cache *c, kvrt_batch *b, int n, const int32_t *pos,
                                const uint32_t *tags)
{
    const kvrt_cache_desc *d = kvrt_cache_get_desc(c);
    kvrt_status st = KVRT_OK;
    for (int l = 0; st == KVRT_OK && l < d->n_layers; l++) {
        const kvrt_layer_desc *ld = &d->layers[l];
        if (ld->kind == KVRT_LAYER_CROSS)
            continue;
        int64_t kw = sc_kw(ld), vw = sc_vw(ld);
        float *k = malloc(sizeof(float) * (size_t)(kw * n));
        float *v = malloc(sizeof(float) * (size_t)(vw * n + 1));
        for (int i = 0; i < n; i++) {
            for (int64_t e = 0; e < kw; e++)
                k[i * kw + e] = sc_val(tags[i], l + SC_K, pos[i], e);
            for (int64_t e = 0; e < vw; e++)
                v[i * vw + e] = sc_val(tags[i], l + SC_V, pos[i], e);
        }
        sc_buf kb = sc_upload(k, sizeof(float) * (size_t)(kw * n));
        sc_buf vb = sc_upload(v, sizeof(float) * (size_t)(vw * n));
        st = kvrt_write(c, b, l, kb.p, ld->kind == KVRT_LAYER_MLA ? NULL : vb.p, KVRT_F32, NULL);
        sc_buf_free(&kb);
        sc_buf_free(&vb);
        free(k);
        free(v);
    }
    return st;
}

/* Plans seq:[p0, p0 + n) and writes rows tagged tags[0..n) (tags NULL: tag 0). */
static inline kvrt_status sc_step(kvrt_cache *c, kvrt_batch *b, int32_t seq, int32_t p0, int n,
                           const uint32_t *tags)
{
    int32_t *seqs = malloc(sizeof(int32_t) * (size_t)n), *pos = malloc(sizeof(int32_t) * (size_t)n);
    uint32_t *t = calloc((size_t)n, sizeof(uint32_t));
    for (int i = 0; i < n; i++) {
        seqs[i] = seq;
        pos[i] = p0 + i;
        if (tags != NULL)
            t[i] = tags[i];
    }
    kvrt_status st = kvrt_batch_plan(c, n, seqs, pos, b);
    if (st == KVRT_OK)
        st = sc_write_all(c, b, n, pos, t);
    free(seqs);
    free(pos);
    free(t);
    return st;
}

/* Sets the CROSS layer l of seq to n rows tagged `tag`. */
static inline kvrt_status sc_cross_set(kvrt_cache *c, int l, int32_t seq, int n, uint32_t tag)
{
    const kvrt_layer_desc *ld = sc_layer(c, l);
    int64_t kw = (int64_t)ld->n_kv_heads * ld->head_dim_k, vw = (int64_t)ld->n_kv_heads * ld->head_dim_v;
    float *k = malloc(sizeof(float) * (size_t)(kw * n + 1)), *v = malloc(sizeof(float) * (size_t)(vw * n + 1));
    for (int i = 0; i < n; i++) {
        for (int64_t e = 0; e < kw; e++)
            k[i * kw + e] = sc_val(tag, l + SC_XK, i, e);
        for (int64_t e = 0; e < vw; e++)
            v[i * vw + e] = sc_val(tag, l + SC_XV, i, e);
    }
    sc_buf kb = sc_upload(k, sizeof(float) * (size_t)(kw * n)), vb = sc_upload(v, sizeof(float) * (size_t)(vw * n));
    kvrt_status st = kvrt_cross_set(c, l, seq, n, kb.p, vb.p, KVRT_F32, NULL);
    sc_buf_free(&kb);
    sc_buf_free(&vb);
    free(k);
    free(v);
    return st;
}

/* ------------------------------------------------------------------------ */
/* What a sequence holds                                                     */
/* ------------------------------------------------------------------------ */

/* The rows of seq in layer l with positions in [p0, p1), as f32 (host). */
typedef struct sc_rows {
    int64_t  n;
    int64_t  kw, vw;
    float   *k, *v;
    int32_t *pos;
} sc_rows;

static inline void sc_rows_free(sc_rows *r)
{
    free(r->k);
    free(r->v);
    free(r->pos);
    memset(r, 0, sizeof *r);
}

static inline sc_rows sc_gather(const kvrt_cache *c, int l, int32_t seq, int32_t p0, int32_t p1)
{
    const kvrt_layer_desc *ld = sc_layer(c, l);
    kvrt_dtype dt = kvrt_cache_get_desc(c)->dtype;
    size_t es = kvrt_dtype_size(dt);
    sc_rows r;
    memset(&r, 0, sizeof r);
    r.kw = sc_kw(ld);
    r.vw = sc_vw(ld);
    int64_t n = -1;
    OK(kvrt_gather(c, l, seq, p0, p1, NULL, NULL, NULL, INT64_MAX, &n, NULL));
    assert_true(n >= 0);
    void *kraw = malloc(es * (size_t)(r.kw * n) + 1), *vraw = malloc(es * (size_t)(r.vw * n) + 1);
    r.k = malloc(sizeof(float) * (size_t)(r.kw * n) + 1);
    r.v = malloc(sizeof(float) * (size_t)(r.vw * n) + 1);
    r.pos = malloc(sizeof(int32_t) * (size_t)n + 1);
    int64_t got = -1;
    OK(kvrt_gather(c, l, seq, p0, p1, kraw, r.vw > 0 ? vraw : NULL, r.pos, n, &got, NULL));
    assert_int_equal(got, n);
    r.n = n;
    sc_to_f32(r.k, kraw, dt, r.kw * n);
    sc_to_f32(r.v, vraw, dt, r.vw * n);
    free(kraw);
    free(vraw);
    return r;
}

/* Checks that the rows of seq in layer l (a self-attention layer) with
 * positions in [p0, p1) are exactly (pos[i], tags[i]), i < n, in position
 * order, bit-exact. */
static inline void sc_expect_self_in(const kvrt_cache *c, int l, int32_t seq, int32_t p0, int32_t p1,
                              int64_t n, const int32_t *pos, const uint32_t *tags)
{
    sc_rows r = sc_gather(c, l, seq, p0, p1);
    if (r.n != n)
        fail_msg("layer %d seq %d: %lld rows, expected %lld", l, seq, (long long)r.n, (long long)n);
    for (int64_t i = 0; i < n; i++) {
        if (r.pos[i] != pos[i])
            fail_msg("layer %d seq %d row %lld: position %d, expected %d", l, seq, (long long)i,
                     r.pos[i], pos[i]);
        for (int64_t e = 0; e < r.kw; e++)
            if (r.k[i * r.kw + e] != sc_val(tags[i], l + SC_K, pos[i], e))
                fail_msg("layer %d seq %d pos %d: K[%lld] %.9g, expected %.9g (tag %u)", l, seq,
                         pos[i], (long long)e, r.k[i * r.kw + e],
                         sc_val(tags[i], l + SC_K, pos[i], e), tags[i]);
        for (int64_t e = 0; e < r.vw; e++)
            if (r.v[i * r.vw + e] != sc_val(tags[i], l + SC_V, pos[i], e))
                fail_msg("layer %d seq %d pos %d: V[%lld] %.9g, expected %.9g (tag %u)", l, seq,
                         pos[i], (long long)e, r.v[i * r.vw + e],
                         sc_val(tags[i], l + SC_V, pos[i], e), tags[i]);
    }
    sc_rows_free(&r);
}

/* Checks that seq holds exactly the rows (pos[i], tags[i]), i < n, in layer l. */
static inline void sc_expect_self(const kvrt_cache *c, int l, int32_t seq, int64_t n, const int32_t *pos,
                           const uint32_t *tags)
{
    sc_expect_self_in(c, l, seq, 0, -1, n, pos, tags);
}

/* Checks that seq holds positions [lo, hi] (none if hi < lo) of layer l, the
 * row at position p tagged tag_of[p]. */
static inline void sc_expect_range(const kvrt_cache *c, int l, int32_t seq, int32_t lo, int32_t hi,
                            const uint32_t *tag_of)
{
    int64_t n = hi >= lo ? (int64_t)hi - lo + 1 : 0;
    int32_t *pos = malloc(sizeof(int32_t) * (size_t)(n + 1));
    uint32_t *tags = malloc(sizeof(uint32_t) * (size_t)(n + 1));
    for (int64_t i = 0; i < n; i++) {
        pos[i] = lo + (int32_t)i;
        tags[i] = tag_of[lo + i];
    }
    sc_expect_self(c, l, seq, n, pos, tags);
    free(pos);
    free(tags);
}

/* Checks that seq's CROSS layer l holds n rows tagged `tag`. */
static inline void sc_expect_cross(const kvrt_cache *c, int l, int32_t seq, int n, uint32_t tag)
{
    sc_rows r = sc_gather(c, l, seq, 0, -1);
    if (r.n != n)
        fail_msg("cross layer %d seq %d: %lld rows, expected %d", l, seq, (long long)r.n, n);
    for (int64_t i = 0; i < n; i++) {
        assert_int_equal(r.pos[i], i);
        for (int64_t e = 0; e < r.kw; e++)
            if (r.k[i * r.kw + e] != sc_val(tag, l + SC_XK, (int32_t)i, e))
                fail_msg("cross layer %d seq %d row %lld: K[%lld] %.9g, expected %.9g", l, seq,
                         (long long)i, (long long)e, r.k[i * r.kw + e],
                         sc_val(tag, l + SC_XK, (int32_t)i, e));
        for (int64_t e = 0; e < r.vw; e++)
            if (r.v[i * r.vw + e] != sc_val(tag, l + SC_XV, (int32_t)i, e))
                fail_msg("cross layer %d seq %d row %lld: V[%lld] %.9g, expected %.9g", l, seq,
                         (long long)i, (long long)e, r.v[i * r.vw + e],
                         sc_val(tag, l + SC_XV, (int32_t)i, e));
    }
    sc_rows_free(&r);
}

/* Two gathers of the same layer are identical, bit for bit. */
static inline void sc_expect_same_rows(const sc_rows *a, const sc_rows *b, const char *what)
{
    if (a->n != b->n)
        fail_msg("%s: %lld rows, then %lld", what, (long long)a->n, (long long)b->n);
    if (a->n > 0 && (memcmp(a->pos, b->pos, sizeof(int32_t) * (size_t)a->n) != 0 ||
                     memcmp(a->k, b->k, sizeof(float) * (size_t)(a->n * a->kw)) != 0 ||
                     memcmp(a->v, b->v, sizeof(float) * (size_t)(a->n * a->vw)) != 0))
        fail_msg("%s: rows changed", what);
}

/* ------------------------------------------------------------------------ */
/* State snapshots (a failed call must change nothing)                       */
/* ------------------------------------------------------------------------ */

typedef struct sc_snapshot {
    int               n_groups, n_layers, max_seqs;
    kvrt_cache_stats  stats[9];     /* -1 then each group (up to 8) */
    kvrt_seq_group_info *info;      /* [max_seqs][n_groups] */
    sc_rows          *rows;         /* [max_seqs][n_layers] */
} sc_snapshot;

static inline sc_snapshot sc_snap(const kvrt_cache *c)
{
    sc_snapshot s;
    memset(&s, 0, sizeof s);
    const kvrt_cache_desc *d = kvrt_cache_get_desc(c);
    s.n_groups = kvrt_cache_n_groups(c);
    s.n_layers = d->n_layers;
    s.max_seqs = d->max_seqs;
    for (int g = -1; g < s.n_groups && g < 8; g++)
        OK(kvrt_cache_stats_get(c, g, &s.stats[g + 1]));
    s.info = calloc((size_t)(s.max_seqs * s.n_groups), sizeof *s.info);
    s.rows = calloc((size_t)(s.max_seqs * s.n_layers), sizeof *s.rows);
    for (int q = 0; q < s.max_seqs; q++) {
        for (int g = 0; g < s.n_groups; g++)
            OK(kvrt_seq_group_info_get(c, q, g, &s.info[q * s.n_groups + g]));
        for (int l = 0; l < s.n_layers; l++)
            s.rows[q * s.n_layers + l] = sc_gather(c, l, q, 0, -1);
    }
    return s;
}

static inline void sc_snap_free(sc_snapshot *s)
{
    for (int i = 0; i < s->max_seqs * s->n_layers; i++)
        sc_rows_free(&s->rows[i]);
    free(s->rows);
    free(s->info);
    memset(s, 0, sizeof *s);
}

static inline void sc_expect_unchanged(const kvrt_cache *c, const sc_snapshot *before, const char *what)
{
    sc_snapshot now = sc_snap(c);
    for (int g = -1; g < now.n_groups && g < 8; g++)
        if (memcmp(&now.stats[g + 1], &before->stats[g + 1], sizeof(kvrt_cache_stats)) != 0)
            fail_msg("%s: statistics of group %d changed", what, g);
    for (int i = 0; i < now.max_seqs * now.n_groups; i++)
        if (memcmp(&now.info[i], &before->info[i], sizeof(kvrt_seq_group_info)) != 0)
            fail_msg("%s: sequence %d group %d changed", what, i / now.n_groups, i % now.n_groups);
    for (int i = 0; i < now.max_seqs * now.n_layers; i++)
        sc_expect_same_rows(&before->rows[i], &now.rows[i], what);
    sc_snap_free(&now);
    OK(kvrt_cache_check(c));
}

/* Everything a fresh cache of the same description shows: statistics, every
 * sequence's group info, empty gathers. */
static inline void sc_expect_fresh(const kvrt_cache *c, const char *what)
{
    kvrt_cache *fresh;
    OK(kvrt_cache_create(kvrt_cache_get_desc(c), &fresh));
    sc_snapshot a = sc_snap(c), b = sc_snap(fresh);
    for (int g = -1; g < a.n_groups && g < 8; g++)
        if (memcmp(&a.stats[g + 1], &b.stats[g + 1], sizeof(kvrt_cache_stats)) != 0)
            fail_msg("%s: statistics of group %d differ from a fresh cache's (used %lld free %lld "
                     "live %lld holes %lld vs %lld %lld %lld %lld)",
                     what, g, (long long)a.stats[g + 1].blocks_used, (long long)a.stats[g + 1].blocks_free,
                     (long long)a.stats[g + 1].slots_live, (long long)a.stats[g + 1].holes,
                     (long long)b.stats[g + 1].blocks_used, (long long)b.stats[g + 1].blocks_free,
                     (long long)b.stats[g + 1].slots_live, (long long)b.stats[g + 1].holes);
    for (int i = 0; i < a.max_seqs * a.n_groups; i++) {
        const kvrt_seq_group_info *x = &a.info[i];
        if (memcmp(x, &b.info[i], sizeof *x) != 0)
            fail_msg("%s: sequence %d group %d: pos [%d, %d] tokens %lld slots %lld blocks %d "
                     "evicted_max %d; a fresh cache has none",
                     what, i / a.n_groups, i % a.n_groups, x->pos_min, x->pos_max,
                     (long long)x->n_tokens, (long long)x->n_slots, x->n_blocks, x->evicted_max);
        assert_int_equal(x->pos_min, -1);
        assert_int_equal(x->evicted_max, -1);
    }
    for (int q = 0; q < a.max_seqs; q++) {
        int32_t lo, hi;
        int64_t nt;
        OK(kvrt_seq_pos_min(c, q, &lo));
        OK(kvrt_seq_pos_max(c, q, &hi));
        OK(kvrt_seq_n_tokens(c, q, &nt));
        assert_int_equal(lo, -1);
        assert_int_equal(hi, -1);
        assert_int_equal(nt, 0);
        int ok = 0;
        OK(kvrt_seq_can_resume(c, q, 0, &ok));
        assert_int_equal(ok, 1);
        for (int l = 0; l < a.n_layers; l++)
            if (a.rows[q * a.n_layers + l].n != 0)
                fail_msg("%s: layer %d seq %d still gathers %lld rows", what, l, q,
                         (long long)a.rows[q * a.n_layers + l].n);
    }
    sc_snap_free(&a);
    sc_snap_free(&b);
    kvrt_cache_destroy(fresh);
    OK(kvrt_cache_check(c));
}

/* ------------------------------------------------------------------------ */
/* Attention reference                                                       */
/* ------------------------------------------------------------------------ */

/* Runs kvrt_attention for the batch's single token (planned and written just
 * before) on layer l and compares it with a double-precision softmax over the
 * rows the test expects the token to see: n rows of positions pos[] tagged
 * tags[] (CROSS: n rows tagged tags[0]). q is derived from (q_tag, l). */
static inline void sc_expect_attention(kvrt_cache *c, kvrt_batch *b, int l, int n_q_heads, uint32_t q_tag,
                                int64_t n, const int32_t *pos, const uint32_t *tags)
{
    const kvrt_layer_desc *ld = sc_layer(c, l);
    int mla = ld->kind == KVRT_LAYER_MLA, cross = ld->kind == KVRT_LAYER_CROSS;
    int n_kv = mla ? 1 : ld->n_kv_heads;
    int dk = mla ? ld->latent_dim + ld->rope_dim : ld->head_dim_k;
    int dv = mla ? ld->latent_dim : ld->head_dim_v;
    assert_int_equal(kvrt_batch_n_tokens(b), 1);
    float *q = malloc(sizeof(float) * (size_t)n_q_heads * (size_t)dk);
    float *out = malloc(sizeof(float) * (size_t)n_q_heads * (size_t)dv);
    for (int64_t e = 0; e < (int64_t)n_q_heads * dk; e++)
        q[e] = sc_val(q_tag, l + SC_Q, 0, e);
    sc_buf qb = sc_upload(q, sizeof(float) * (size_t)n_q_heads * (size_t)dk);
    sc_buf ob = sc_upload(NULL, sizeof(float) * (size_t)n_q_heads * (size_t)dv);
    if (!ob.owned)
        ob.p = out;
    kvrt_attention_params ap = {n_q_heads, 0.125f, 0.0f, KVRT_F32, KVRT_F32};
    OK(kvrt_attention(c, b, l, qb.p, ob.p, &ap, NULL));
    sc_download(out, &ob);
    double *s = malloc(sizeof(double) * (size_t)(n + 1));
    for (int h = 0; h < n_q_heads; h++) {
        int kvh = h / (n_q_heads / n_kv);
        double mx = -INFINITY, sum = 0.0;
        for (int64_t r = 0; r < n; r++) {
            double dot = 0.0;
            for (int e = 0; e < dk; e++) {
                float kx = cross ? sc_val(tags[0], l + SC_XK, (int32_t)r, (int64_t)kvh * dk + e)
                                 : sc_val(tags[r], l + SC_K, pos[r], (int64_t)kvh * dk + e);
                dot += (double)q[(int64_t)h * dk + e] * kx;
            }
            s[r] = dot * 0.125;
            if (s[r] > mx)
                mx = s[r];
        }
        for (int64_t r = 0; r < n; r++) {
            s[r] = exp(s[r] - mx);
            sum += s[r];
        }
        for (int e = 0; e < dv; e++) {
            double acc = 0.0;
            for (int64_t r = 0; r < n; r++) {
                float vx = mla   ? sc_val(tags[r], l + SC_K, pos[r], e)
                           : cross ? sc_val(tags[0], l + SC_XV, (int32_t)r, (int64_t)kvh * dv + e)
                                   : sc_val(tags[r], l + SC_V, pos[r], (int64_t)kvh * dv + e);
                acc += s[r] * vx;
            }
            double want = n > 0 ? acc / sum : 0.0;
            /* inputs in [-1, 1]; f32 accumulation over at most a few thousand
             * rows stays well inside 1e-4 */
            float got = out[(int64_t)h * dv + e];
            if (!(fabs(got - want) <= 1e-4))
                fail_msg("attention layer %d head %d elem %d: %.7g, expected %.7g (%lld rows)", l,
                         h, e, got, want, (long long)n);
        }
    }
    free(s);
    sc_buf_free(&qb);
    sc_buf_free(&ob);
    free(q);
    free(out);
}

/* ------------------------------------------------------------------------ */
/* The model of one sequence in a sliding-window group                       */
/* ------------------------------------------------------------------------ */

/* Valid while positions are written in increasing order and only tails are
 * removed (the chat, decode and rollback scenarios): the group then holds
 * the contiguous positions [base, hi], slot i holding base + i, blocks
 * starting at base, base + block, ... */
typedef struct sc_swa {
    int     window, block;
    int32_t base, hi;       /* hi < base: no slots */
    int32_t emin, emax;     /* positions the window dropped; -1: none */
} sc_swa;

static inline void sc_swa_init(sc_swa *m, int window, int block)
{
    m->window = window;
    m->block = block;
    m->base = 0;
    m->hi = -1;
    m->emin = m->emax = -1;
}

static inline int sc_swa_empty(const sc_swa *m) { return m->hi < m->base; }

static inline int sc_swa_blocks(const sc_swa *m)
{
    return sc_swa_empty(m) ? 0 : (m->hi - m->base + m->block) / m->block;
}

/* Whether a token at pos sees every row it should. */
static inline int sc_swa_can_resume(const sc_swa *m, int32_t pos)
{
    return m->emax < 0 || (int64_t)m->emax <= (int64_t)pos - m->window;
}

/* A plan of positions [p0, p0 + n): blocks whose rows are all <= p0 - window leave. */
static inline void sc_swa_plan(sc_swa *m, int32_t p0, int n)
{
    int64_t limit = (int64_t)p0 - m->window;
    while (!sc_swa_empty(m)) {
        int32_t last = m->base + m->block - 1 < m->hi ? m->base + m->block - 1 : m->hi;
        if (last > limit)
            break;
        if (m->emin < 0 || m->base < m->emin)
            m->emin = m->base;
        if (last > m->emax)
            m->emax = last;
        m->base += m->block;
    }
    if (sc_swa_empty(m))
        m->base = p0;
    assert_int_equal(p0, m->hi < m->base ? m->base : m->hi + 1); /* the model's scope */
    m->hi = p0 + n - 1;
}

/* kvrt_seq_rm(seq, d, -1). */
static inline void sc_swa_rm_tail(sc_swa *m, int32_t d)
{
    if (!sc_swa_empty(m)) {
        if (d <= m->base)
            m->hi = m->base - 1;
        else if (d <= m->hi)
            m->hi = d - 1;
    }
    if (m->emax >= 0) {
        if (d <= m->emin)
            m->emin = m->emax = -1;
        else if (d <= m->emax)
            m->emax = d - 1;
    }
    if (sc_swa_empty(m))
        m->base = 0, m->hi = -1;
}

/* kvrt_seq_rm(seq, 0, n) then kvrt_seq_shift(seq, n, -1, -n) (the context
 * shift), for n at most the first row held: only evicted rows are removed,
 * and what the window dropped moves down with everything else. */
static inline void sc_swa_shift_left(sc_swa *m, int32_t n)
{
    assert_true(sc_swa_empty(m) || n <= m->base);
    if (m->emax >= 0) {
        if (n > m->emax) {
            m->emin = m->emax = -1;
        } else {
            m->emin = (m->emin > n ? m->emin : n) - n;
            m->emax -= n;
        }
    }
    if (!sc_swa_empty(m)) {
        m->base -= n;
        m->hi -= n;
    }
}

static inline void sc_swa_clear(sc_swa *m) { sc_swa_init(m, m->window, m->block); }

/* Checks a sequence's sliding-window group against the model: the info
 * (evicted_max, blocks, range), and, for each listed layer, exactly the rows
 * [base, hi] with the tags the test wrote; also that every row above
 * evicted_max (below `len`) is there. */
static inline void sc_expect_swa(const kvrt_cache *c, int group, int32_t seq, const sc_swa *m,
                          const int *layers, int n_layers, const uint32_t *tag_of, int32_t len)
{
    kvrt_seq_group_info info;
    OK(kvrt_seq_group_info_get(c, seq, group, &info));
    if (info.evicted_max != m->emax)
        fail_msg("seq %d group %d: evicted_max %d, expected %d", seq, group, info.evicted_max,
                 m->emax);
    if (info.n_blocks != sc_swa_blocks(m))
        fail_msg("seq %d group %d: %d blocks, expected %d (rows [%d, %d])", seq, group,
                 info.n_blocks, sc_swa_blocks(m), m->base, m->hi);
    int32_t lo = sc_swa_empty(m) ? 0 : m->base, hi = sc_swa_empty(m) ? -1 : m->hi;
    assert_int_equal(info.pos_min, hi >= lo ? lo : -1);
    assert_int_equal(info.pos_max, hi >= lo ? hi : -1);
    assert_int_equal(info.n_tokens, hi >= lo ? hi - lo + 1 : 0);
    /* the contract, stated on its own: every row of [0, len) above
     * evicted_max is present, and nothing else */
    if (hi >= lo) {
        assert_int_equal(lo, info.evicted_max + 1);
        assert_int_equal(hi, len - 1);
    } else {
        assert_true(info.evicted_max + 1 >= len);
    }
    for (int i = 0; i < n_layers; i++)
        sc_expect_range(c, layers[i], seq, info.evicted_max + 1, len - 1, tag_of);
}

#endif
