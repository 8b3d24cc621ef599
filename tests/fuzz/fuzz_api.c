/* libFuzzer target for API call sequences: the input's bytes decode into
 * calls (plan + write + attention, rm, cp, keep, shift, div, clear, compact,
 * cross_set, gather, state write/read, offload/restore, queries) on a small
 * cache of the layout its first byte picks. After every call the cache must
 * pass kvrt_cache_check; a call that fails must change nothing observable;
 * a state or offload round trip must give back exactly what was saved.
 * Op 15 is hostile: rows and queries holding -0, +-FLT_MAX, denormals, inf
 * and NaN; a shared handle made from kvrt_cache_get_desc's own description;
 * caches described with such values (a cache that accepts one must restore
 * its own offload). */
#include <float.h>
#include <math.h>

#include "fuzz_common.h"

#define MAX_OPS 160
#define MAX_BATCH 8

typedef struct bytes {
    const uint8_t *p;
    size_t         n, at;
} bytes;

static uint32_t u8(bytes *b) { return b->at < b->n ? b->p[b->at++] : 0; }

/* Small positions mostly, so that calls meet; the int32 edges sometimes. */
static int32_t pos_arg(bytes *b)
{
    uint32_t x = u8(b);
    if (x == 255)
        return INT32_MAX - (int32_t)u8(b);
    if (x == 254)
        return -(int32_t)u8(b) - 1;
    if (x >= 200)
        return (int32_t)(x - 200) * 64 + (int32_t)u8(b);
    return (int32_t)x;
}

/* A sequence id: in range mostly, -1 or one past the end sometimes. */
static int32_t seq_arg(bytes *b)
{
    uint32_t x = u8(b) % 16;
    if (x == 15)
        return -1;
    if (x == 14)
        return FUZZ_MAX_SEQS;
    return (int32_t)(x % FUZZ_MAX_SEQS);
}

static float value(int32_t seq, int layer, int32_t pos, size_t e)
{
    uint32_t x = (uint32_t)seq * 0x9e3779b9u ^ (uint32_t)layer * 7919u ^ (uint32_t)pos * 104729u ^
                 (uint32_t)e * 31u;
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    x ^= x >> 15;
    return (float)(x % 2001) / 1000.0f - 1.0f;
}

typedef struct ctx {
    kvrt_cache            *c, *mirror;
    const kvrt_cache_desc *d;
    kvrt_batch            *batch;
    kvrt_layer_desc        layers[8], mirror_layers[8];
    fuzz_output            before, after, tmp_a, tmp_b;
    float                 *k, *v, *q, *out;
    int                    wild; /* rows hold hostile values: outputs are unbounded */
} ctx;

/* Values a decoder may hand over by mistake or by overflow. */
static const float hostile[] = {-0.0f, FLT_MAX, -FLT_MAX, FLT_MIN, FLT_TRUE_MIN, -FLT_TRUE_MIN,
                                FLT_MIN / 3.0f, 65504.0f, 65520.0f, 448.0f, 1e-30f,
                                INFINITY, -INFINITY, NAN};
enum { N_HOSTILE = sizeof hostile / sizeof hostile[0] };

static size_t k_elems(const kvrt_layer_desc *l)
{
    return l->kind == KVRT_LAYER_MLA ? (size_t)(l->latent_dim + l->rope_dim)
                                     : (size_t)l->n_kv_heads * (size_t)l->head_dim_k;
}

static size_t v_elems(const kvrt_layer_desc *l)
{
    return l->kind == KVRT_LAYER_MLA ? 0 : (size_t)l->n_kv_heads * (size_t)l->head_dim_v;
}

static void put(fuzz_output *o, const void *p, size_t n)
{
    FUZZ_ASSERT(fuzz_writer(o, p, n) == KVRT_OK, "host memory");
}

/* What a cache holds for one sequence, whatever its block size: per group
 * tokens, range and evicted range; per layer positions and (with_rows) rows. */
static void seq_content_rows(const kvrt_cache *c, int32_t seq, fuzz_output *o, int with_rows)
{
    const kvrt_cache_desc *d = kvrt_cache_get_desc(c);
    size_t es = kvrt_dtype_size(d->dtype);
    for (int g = 0; g < kvrt_cache_n_groups(c); g++) {
        kvrt_seq_group_info info;
        FUZZ_ASSERT(kvrt_seq_group_info_get(c, seq, g, &info) == KVRT_OK, "group info");
        int64_t rec[4] = {info.n_tokens, info.pos_min, info.pos_max, info.evicted_max};
        put(o, rec, sizeof rec);
    }
    for (int l = 0; l < d->n_layers; l++) {
        int64_t n = 0;
        kvrt_status st = kvrt_gather(c, l, seq, 0, -1, NULL, NULL, NULL, 0, &n, NULL);
        FUZZ_ASSERT(st == KVRT_OK || st == KVRT_ERR_INVALID_ARG, "gather count: %s", kvrt_last_error());
        size_t kb = k_elems(&d->layers[l]) * es, vb = v_elems(&d->layers[l]) * es;
        uint8_t *k = malloc((size_t)n * kb + 1), *v = malloc((size_t)n * vb + 1);
        int32_t *pos = malloc((size_t)n * sizeof(int32_t) + 4);
        int64_t got = -1;
        st = kvrt_gather(c, l, seq, 0, -1, with_rows ? k : NULL, with_rows && vb > 0 ? v : NULL, pos,
                         n, &got, NULL);
        if (!with_rows)
            kb = vb = 0;
        FUZZ_ASSERT(st == KVRT_OK && got == n, "gather: %s", kvrt_last_error());
        for (int64_t i = 1; i < n; i++)
            FUZZ_ASSERT(pos[i] > pos[i - 1], "layer %d: gathered positions out of order", l);
        put(o, &n, sizeof n);
        put(o, pos, (size_t)n * sizeof(int32_t));
        put(o, k, (size_t)n * kb);
        put(o, v, (size_t)n * vb);
        free(k);
        free(v);
        free(pos);
    }
}

static void seq_content(const kvrt_cache *c, int32_t seq, fuzz_output *o)
{
    seq_content_rows(c, seq, o, 1);
}

/* What a failed call must leave as it was: statistics, page use, positions
 * (rows are only read by calls that succeed, and compared there). */
static void snapshot(const kvrt_cache *c, fuzz_output *o)
{
    o->size = 0;
    kvrt_cache_stats st;
    FUZZ_ASSERT(kvrt_cache_stats_get(c, -1, &st) == KVRT_OK, "stats");
    put(o, &st, sizeof st);
    for (int32_t s = 0; s < FUZZ_MAX_SEQS; s++) {
        for (int g = 0; g < kvrt_cache_n_groups(c); g++) {
            kvrt_seq_group_info info;
            FUZZ_ASSERT(kvrt_seq_group_info_get(c, s, g, &info) == KVRT_OK, "group info");
            put(o, &info, sizeof info);
        }
        seq_content_rows(c, s, o, 0);
    }
}

static int same(const fuzz_output *a, const fuzz_output *b)
{
    return a->size == b->size && memcmp(a->data, b->data, a->size) == 0;
}

static void assert_same_seq(ctx *x, const kvrt_cache *a, int32_t sa, const kvrt_cache *b, int32_t sb)
{
    x->tmp_a.size = x->tmp_b.size = 0;
    seq_content(a, sa, &x->tmp_a);
    seq_content(b, sb, &x->tmp_b);
    FUZZ_ASSERT(same(&x->tmp_a, &x->tmp_b), "sequence %d and sequence %d differ after a round trip",
                (int)sa, (int)sb);
}

static int seq_empty(const kvrt_cache *c, int32_t seq)
{
    for (int g = 0; g < kvrt_cache_n_groups(c); g++) {
        kvrt_seq_group_info info;
        if (kvrt_seq_group_info_get(c, seq, g, &info) != KVRT_OK || info.n_blocks > 0)
            return 0;
    }
    return 1;
}

static kvrt_status op_plan(ctx *x, bytes *b, int wild)
{
    int n = 1 + (int)(u8(b) % MAX_BATCH);
    int32_t seq = seq_arg(b), base = pos_arg(b), stride = (int32_t)(u8(b) % 3);
    int32_t seqs[MAX_BATCH], pos[MAX_BATCH];
    for (int i = 0; i < n; i++) {
        uint32_t m = u8(b);
        seqs[i] = (m & 0x80) ? seq_arg(b) : seq;
        pos[i] = (int32_t)((int64_t)base + (int64_t)i * stride > INT32_MAX ? INT32_MAX
                                                                           : base + i * stride);
        if (m & 0x40)
            pos[i] = pos_arg(b);
    }
    uint32_t h = wild ? u8(b) : 0; /* where hostile values go, and which */
    kvrt_status st = kvrt_batch_plan(x->c, n, seqs, pos, x->batch);
    if (st != KVRT_OK)
        return st;
    x->wild |= wild;
    for (int l = 0; l < x->d->n_layers; l++) {
        const kvrt_layer_desc *ld = &x->d->layers[l];
        if (ld->kind == KVRT_LAYER_CROSS)
            continue;
        size_t ke = k_elems(ld), ve = v_elems(ld);
        for (int i = 0; i < n; i++) {
            for (size_t e = 0; e < ke; e++)
                x->k[(size_t)i * ke + e] = value(seqs[i], l, pos[i], e);
            for (size_t e = 0; e < ve; e++)
                x->v[(size_t)i * ve + e] = value(seqs[i] + 100, l, pos[i], e);
            for (size_t e = (h + (uint32_t)i) % 5; wild && e < ke + ve; e += 5 + h % 7) {
                float *at = e < ke ? &x->k[(size_t)i * ke + e] : &x->v[(size_t)i * ve + e - ke];
                *at = hostile[(h / 7 + e) % N_HOSTILE];
            }
        }
        st = kvrt_write(x->c, x->batch, l, x->k, ve > 0 ? x->v : NULL, KVRT_F32, NULL);
        FUZZ_ASSERT(st == KVRT_OK, "write after a plan: %s", kvrt_last_error());
    }
    uint32_t a = u8(b);
    if (a & 1) { /* attention over what the batch sees */
        int l = (int)(a >> 1) % x->d->n_layers;
        const kvrt_layer_desc *ld = &x->d->layers[l];
        int kv_heads = ld->kind == KVRT_LAYER_MLA ? 1 : ld->n_kv_heads;
        kvrt_attention_params p = {kv_heads * (1 + (int)(a >> 6) % 2), 0.0f,
                                   (a & 0x20) ? 20.0f : 0.0f, KVRT_F32, KVRT_F32};
        size_t qe = (size_t)p.n_q_heads * (ld->kind == KVRT_LAYER_MLA ? k_elems(ld) : (size_t)ld->head_dim_k);
        size_t oe = (size_t)p.n_q_heads * (ld->kind == KVRT_LAYER_MLA ? (size_t)ld->latent_dim
                                                                      : (size_t)ld->head_dim_v);
        for (size_t i = 0; i < (size_t)n * qe; i++)
            x->q[i] = wild && i % 11 == h % 11 ? hostile[(h + i) % N_HOSTILE]
                                               : value(7, l, (int32_t)i, i);
        st = kvrt_attention(x->c, x->batch, l, x->q, x->out, &p, NULL);
        FUZZ_ASSERT(st == KVRT_OK, "attention after a plan: %s", kvrt_last_error());
        for (size_t i = 0; i < (size_t)n * oe && !x->wild; i++)
            FUZZ_ASSERT(isfinite(x->out[i]) && fabsf(x->out[i]) <= 1.001f,
                        "layer %d: attention output %zu is %g", l, i, (double)x->out[i]);
    }
    return KVRT_OK;
}

/* Writes seq (or every sequence) and loads it into the mirror cache or into
 * another sequence; what loads must equal what was written. */
static kvrt_status op_state(ctx *x, bytes *b)
{
    int32_t seq = seq_arg(b);
    uint32_t mode = u8(b);
    fuzz_output out = {NULL, 0, 0};
    kvrt_status st = kvrt_state_write(x->c, seq, fuzz_writer, &out);
    if (st != KVRT_OK) {
        free(out.data);
        return st;
    }
    uint64_t bytes_expected = 0;
    FUZZ_ASSERT(kvrt_state_size(x->c, seq, &bytes_expected) == KVRT_OK &&
                    bytes_expected == out.size,
                "state size %llu, written %zu", (unsigned long long)bytes_expected, out.size);
    fuzz_input in = {out.data, out.size, 0};
    if (mode & 1 || seq < 0) {
        FUZZ_ASSERT(kvrt_cache_clear(x->mirror) == KVRT_OK, "clear");
        st = kvrt_state_read(x->mirror, -1, fuzz_reader, &in);
        FUZZ_ASSERT(st == KVRT_OK, "loading a state into an empty cache of the same description: %s",
                    kvrt_last_error());
        FUZZ_ASSERT(kvrt_cache_check(x->mirror) == KVRT_OK, "mirror: %s", kvrt_last_error());
        for (int32_t s = 0; s < FUZZ_MAX_SEQS; s++)
            if (seq < 0 || s == seq)
                assert_same_seq(x, x->c, s, x->mirror, s);
    } else {
        int32_t dst = seq_arg(b);
        snapshot(x->c, &x->before);
        st = kvrt_state_read(x->c, dst, fuzz_reader, &in);
        if (st == KVRT_OK) { /* dst < 0: into the sequence's own id (it was empty) */
            assert_same_seq(x, x->c, seq, x->c, dst < 0 ? seq : dst);
        } else {
            snapshot(x->c, &x->after);
            FUZZ_ASSERT(same(&x->before, &x->after), "a failed state read (%s) changed the cache",
                        kvrt_status_name(st));
        }
    }
    free(out.data);
    return st;
}

static kvrt_status op_offload(ctx *x, bytes *b)
{
    int32_t seq = seq_arg(b), dst = seq_arg(b);
    fuzz_output saved = {NULL, 0, 0};
    if (seq >= 0 && seq < FUZZ_MAX_SEQS)
        seq_content(x->c, seq, &saved);
    kvrt_offload *off = NULL;
    kvrt_status st = kvrt_seq_offload(x->c, seq, &off);
    if (st != KVRT_OK) {
        FUZZ_ASSERT(off == NULL, "a failed offload returned one");
        free(saved.data);
        return st;
    }
    FUZZ_ASSERT(seq_empty(x->c, seq), "sequence %d holds something after its offload", (int)seq);
    FUZZ_ASSERT(kvrt_cache_check(x->c) == KVRT_OK, "after an offload: %s", kvrt_last_error());
    int32_t targets[2] = {dst, seq};
    for (int t = 0; t < 2; t++) {
        snapshot(x->c, &x->before);
        st = kvrt_seq_restore(x->c, targets[t], off);
        FUZZ_ASSERT(fuzz_status_expected(st), "restore: %s: %s", kvrt_status_name(st),
                    kvrt_last_error());
        FUZZ_ASSERT(kvrt_cache_check(x->c) == KVRT_OK, "after a restore: %s", kvrt_last_error());
        if (st == KVRT_OK) {
            x->tmp_a.size = 0;
            seq_content(x->c, targets[t], &x->tmp_a);
            FUZZ_ASSERT(same(&saved, &x->tmp_a), "restored sequence %d differs from the offloaded %d",
                        (int)targets[t], (int)seq);
            break;
        }
        snapshot(x->c, &x->after);
        FUZZ_ASSERT(same(&x->before, &x->after), "a failed restore (%s) changed the cache",
                    kvrt_status_name(st));
    }
    kvrt_offload_free(off);
    free(saved.data);
    return KVRT_OK;
}

static kvrt_status op_query(ctx *x, bytes *b)
{
    int32_t seq = seq_arg(b), pos = pos_arg(b), v32;
    int64_t v64;
    int ok;
    kvrt_seq_group_info info;
    kvrt_status st = kvrt_seq_pos_min(x->c, seq, &v32);
    FUZZ_ASSERT(fuzz_status_expected(st), "pos_min");
    st = kvrt_seq_pos_max(x->c, seq, &v32);
    FUZZ_ASSERT(fuzz_status_expected(st), "pos_max");
    st = kvrt_seq_n_tokens(x->c, seq, &v64);
    FUZZ_ASSERT(fuzz_status_expected(st), "n_tokens");
    st = kvrt_seq_group_info_get(x->c, seq, (int)(u8(b) % 6) - 1, &info);
    FUZZ_ASSERT(fuzz_status_expected(st), "group_info");
    return kvrt_seq_can_resume(x->c, seq, pos, &ok);
}

/* A handle made from the description kvrt_cache_get_desc returns, whose
 * layer table lives inside the cache that create_shared grows. */
static kvrt_status op_shared_from_own_desc(ctx *x, bytes *b)
{
    int n = x->d->n_layers, base_layers[8];
    uint32_t how = u8(b);
    for (int l = 0; l < n; l++)
        base_layers[l] = how % 3 == 0 ? -1 : how % 3 == 1 ? l : (int)((how >> 2) + l) % (n + 1) - 1;
    kvrt_cache *h = NULL;
    kvrt_status st = kvrt_cache_create_shared(x->c, x->d, how % 4 == 3 ? NULL : base_layers, &h);
    if (st != KVRT_OK) {
        FUZZ_ASSERT(h == NULL, "a failed create_shared returned a handle");
        return st;
    }
    FUZZ_ASSERT(kvrt_cache_get_desc(h)->n_layers == n, "the handle has %d layers, not %d",
                kvrt_cache_get_desc(h)->n_layers, n);
    FUZZ_ASSERT(kvrt_cache_check(h) == KVRT_OK, "handle: %s", kvrt_last_error());
    kvrt_cache_destroy(h);
    return KVRT_OK;
}

/* A cache described with one hostile value; one that accepts it must take
 * a token and give back its own offload. */
static kvrt_status op_hostile_desc(ctx *x, bytes *b)
{
    kvrt_cache_desc d = *x->d;
    kvrt_layer_desc ls[8];
    memcpy(ls, x->d->layers, (size_t)d.n_layers * sizeof ls[0]);
    d.layers = ls;
    uint32_t field = u8(b) % 5;
    float v = hostile[u8(b) % N_HOSTILE];
    if (field == 0)
        d.rope.theta = v;
    else if (field == 1)
        d.rope.freq_scale = v;
    else if (field == 2)
        ls[u8(b) % (uint32_t)d.n_layers].rope_theta = v;
    else if (field == 3)
        d.n_threads = (int)(u8(b) % 4 == 0 ? 4097 : u8(b) % 4 == 1 ? -1 : 1 << (u8(b) % 31));
    else
        d.rope.theta = ls[0].rope_theta = -0.0f;
    kvrt_cache *c = NULL;
    kvrt_status st = kvrt_cache_create(&d, &c);
    if (st != KVRT_OK) {
        FUZZ_ASSERT(c == NULL, "a failed create returned a cache");
        return st;
    }
    kvrt_batch *batch = NULL;
    int32_t seq = 0, pos = 0;
    FUZZ_ASSERT(kvrt_batch_create(c, 1, &batch) == KVRT_OK, "batch: %s", kvrt_last_error());
    st = kvrt_batch_plan(c, 1, &seq, &pos, batch);
    FUZZ_ASSERT(st == KVRT_OK, "a first token in a new cache: %s", kvrt_last_error());
    for (int l = 0; l < d.n_layers; l++) {
        if (ls[l].kind == KVRT_LAYER_CROSS)
            continue;
        for (size_t e = 0; e < k_elems(&ls[l]); e++)
            x->k[e] = value(0, l, 0, e);
        for (size_t e = 0; e < v_elems(&ls[l]); e++)
            x->v[e] = value(100, l, 0, e);
        st = kvrt_write(c, batch, l, x->k, v_elems(&ls[l]) > 0 ? x->v : NULL, KVRT_F32, NULL);
        FUZZ_ASSERT(st == KVRT_OK, "write: %s", kvrt_last_error());
    }
    kvrt_offload *off = NULL;
    st = kvrt_seq_offload(c, 0, &off);
    FUZZ_ASSERT(st == KVRT_OK, "offload: %s", kvrt_last_error());
    st = kvrt_seq_restore(c, 0, off);
    FUZZ_ASSERT(st == KVRT_OK, "a cache refused its own offload: %s", kvrt_last_error());
    kvrt_offload_free(off);
    kvrt_batch_destroy(batch);
    kvrt_cache_destroy(c);
    return KVRT_OK;
}

static kvrt_status run_op(ctx *x, bytes *b)
{
    uint32_t op = u8(b) % 16;
    switch (op) {
    case 0: case 1: case 2:
        return op_plan(x, b, 0);
    case 3: {
        int32_t seq = seq_arg(b), p0 = pos_arg(b), p1 = pos_arg(b);
        return kvrt_seq_rm(x->c, seq, p0, p1);
    }
    case 4: {
        int32_t src = seq_arg(b), dst = seq_arg(b), p0 = pos_arg(b), p1 = pos_arg(b);
        return kvrt_seq_cp(x->c, src, dst, p0, p1);
    }
    case 5:
        return kvrt_seq_keep(x->c, seq_arg(b));
    case 6: {
        int32_t seq = seq_arg(b), p0 = pos_arg(b), p1 = pos_arg(b);
        uint32_t m = u8(b);
        int32_t delta = m == 255 ? INT32_MAX - (int32_t)u8(b) : m == 254 ? INT32_MIN + (int32_t)u8(b)
                                                                     : (int32_t)(int8_t)m;
        return kvrt_seq_shift(x->c, seq, p0, p1, delta);
    }
    case 7: {
        int32_t seq = seq_arg(b), p0 = pos_arg(b), p1 = pos_arg(b);
        return kvrt_seq_div(x->c, seq, p0, p1, (int)(u8(b) % 5));
    }
    case 8:
        return u8(b) % 4 == 0 ? kvrt_cache_clear(x->c) : KVRT_OK;
    case 9:
        return kvrt_cache_compact(x->c);
    case 10: {
        int layer = (int)(u8(b) % (uint32_t)x->d->n_layers);
        int32_t seq = seq_arg(b);
        int n = (int)(u8(b) % (FUZZ_CROSS_MAX_LEN + 2));
        const kvrt_layer_desc *ld = &x->d->layers[layer];
        size_t ke = k_elems(ld), ve = v_elems(ld);
        for (int i = 0; i < n; i++) {
            for (size_t e = 0; e < ke; e++)
                x->k[(size_t)i * ke + e] = value(seq, layer, i, e);
            for (size_t e = 0; e < ve; e++)
                x->v[(size_t)i * ve + e] = value(seq + 50, layer, i, e);
        }
        return kvrt_cross_set(x->c, layer, seq, n, x->k, x->v, KVRT_F32, NULL);
    }
    case 11: {
        int layer = (int)(u8(b) % (uint32_t)(x->d->n_layers + 1)) - (u8(b) == 0);
        int32_t seq = seq_arg(b), p0 = pos_arg(b), p1 = pos_arg(b);
        int64_t cap = (int64_t)u8(b), n = -1;
        size_t es = kvrt_dtype_size(x->d->dtype), most = 0;
        for (int l = 0; l < x->d->n_layers; l++) {
            size_t e = k_elems(&x->d->layers[l]) + v_elems(&x->d->layers[l]);
            most = e > most ? e : most;
        }
        uint8_t *k = malloc((size_t)cap * most * es + 1), *v = malloc((size_t)cap * most * es + 1);
        int32_t *pos = malloc((size_t)cap * sizeof(int32_t) + 4);
        kvrt_status st = kvrt_gather(x->c, layer, seq, p0, p1, k, v, pos, cap, &n, NULL);
        free(k);
        free(v);
        free(pos);
        return st;
    }
    case 12:
        return op_state(x, b);
    case 13:
        return op_offload(x, b);
    case 15:
        switch (u8(b) % 4) {
        case 0:
            return op_plan(x, b, 1);
        case 1:
            return op_shared_from_own_desc(x, b);
        case 2:
            return op_hostile_desc(x, b);
        default:
            return op_query(x, b);
        }
    default:
        return op_query(x, b);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    bytes b = {data, size, 0};
    ctx x;
    memset(&x, 0, sizeof x);
    int layout = (int)(u8(&b) % FUZZ_N_LAYOUTS);
    kvrt_cache_desc d;
    fuzz_desc(layout, &d, x.layers);
    FUZZ_ASSERT(kvrt_cache_create(&d, &x.c) == KVRT_OK, "create: %s", kvrt_last_error());
    fuzz_desc(layout, &d, x.mirror_layers);
    d.block_size = 16; /* the mirror pages differently */
    d.n_blocks = FUZZ_N_BLOCKS * FUZZ_BLOCK_SIZE / 16 * 2;
    FUZZ_ASSERT(kvrt_cache_create(&d, &x.mirror) == KVRT_OK, "create: %s", kvrt_last_error());
    x.d = kvrt_cache_get_desc(x.c);
    FUZZ_ASSERT(kvrt_batch_create(x.c, MAX_BATCH, &x.batch) == KVRT_OK, "batch");
    size_t most = 64 * 4; /* elements per row, any layer, with query heads */
    x.k = malloc((FUZZ_CROSS_MAX_LEN + 2) * most * sizeof(float));
    x.v = malloc((FUZZ_CROSS_MAX_LEN + 2) * most * sizeof(float));
    x.q = malloc(MAX_BATCH * most * sizeof(float));
    x.out = malloc(MAX_BATCH * most * sizeof(float));
    FUZZ_ASSERT(x.k && x.v && x.q && x.out, "host memory");
    for (int i = 0; i < MAX_OPS && b.at < b.n; i++) {
        snapshot(x.c, &x.before);
        size_t at = b.at;
        kvrt_status st = run_op(&x, &b);
        FUZZ_ASSERT(fuzz_status_expected(st), "op at byte %zu: %s: %s", at, kvrt_status_name(st),
                    kvrt_last_error());
        FUZZ_ASSERT(kvrt_cache_check(x.c) == KVRT_OK, "op at byte %zu: %s", at, kvrt_last_error());
        if (st != KVRT_OK && data[at] % 16 != 12 && data[at] % 16 != 13) {
            snapshot(x.c, &x.after);
            FUZZ_ASSERT(same(&x.before, &x.after), "op at byte %zu failed (%s: %s) and changed the cache",
                        at, kvrt_status_name(st), kvrt_last_error());
        }
    }
    kvrt_batch_destroy(x.batch);
    kvrt_cache_destroy(x.c);
    kvrt_cache_destroy(x.mirror);
    free(x.k);
    free(x.v);
    free(x.q);
    free(x.out);
    free(x.before.data);
    free(x.after.data);
    free(x.tmp_a.data);
    free(x.tmp_b.data);
    return 0;
}
