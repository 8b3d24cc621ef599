/*
 * test_quant.c: quantized caches (q8, fp8 e4m3) and the pre-RoPE mode, on
 * the CPU backend, against the reference model (tests/ref):
 *   - row sizes, and what each layer kind takes;
 *   - writes quantize as documented (stored codes and scales bit-exact
 *     against ref_quantize_row, from f32, f16 and bf16; zero rows, ties,
 *     saturation, NaN and Inf);
 *   - moves (copy-on-write, compaction) keep codes and scales bit-exact;
 *   - state files and offload carry them bit-exactly across block sizes;
 *     a quantized state loads only into the same dtype, and a file whose
 *     scales are NaN or negative is corrupt;
 *   - attention dequantizes: against the reference over the same values,
 *     and against an f32 cache within a bound derived from the step;
 *   - shifts on quantized K (dequantize, rotate, requantize) stay within a
 *     step per shift;
 *   - pre-RoPE: 100 shifts leave K bit-exact, attention matches the
 *     reference, which rotates in double; in the stored-rotated mode the
 *     drift of 100 shifts is printed and bounded;
 *   - per-layer RoPE bases, in both modes and in state files (version 2);
 *   - bad arguments.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "../isa_check.h"
#include "kvrt.h"
#include "ref.h"

#if defined(KVRT_HAVE_XXHASH)
#  include <xxhash.h>
#endif

#define OK(x) assert_int_equal((x), KVRT_OK)
#define EXPECT(st, x) assert_int_equal((x), (st))

enum { HEADS = 2, DK = 16, DV = 8, MAX_ROWS = 512 };

typedef struct setup {
    kvrt_dtype      dtype;
    int             block_size, n_blocks, max_seqs;
    int             n_rot;
    kvrt_rope_style style;
    kvrt_rope_mode  mode;
    int             rotate_q;
    float           theta[2];  /* per layer; 0: the cache's */
    int             window;
} setup;

static setup base_setup(kvrt_dtype dtype)
{
    setup s = {dtype, 16, 64, 4, 8, KVRT_ROPE_NEOX, KVRT_ROPE_STORED_ROTATED, 0, {0, 0}, 0};
    return s;
}

/* Two ATTN layers (HEADS x DK / DV). */
static kvrt_cache_desc make_desc(const setup *s, kvrt_layer_desc layers[2])
{
    for (int l = 0; l < 2; l++) {
        memset(&layers[l], 0, sizeof layers[l]);
        layers[l].kind = KVRT_LAYER_ATTN;
        layers[l].n_kv_heads = HEADS;
        layers[l].head_dim_k = DK;
        layers[l].head_dim_v = DV;
        layers[l].window = s->window;
        layers[l].rope_theta = s->theta[l];
    }
    kvrt_cache_desc d;
    kvrt_cache_desc_init(&d);
    d.dtype = s->dtype;
    d.n_layers = 2;
    d.layers = layers;
    d.block_size = s->block_size;
    d.n_blocks = s->n_blocks;
    d.max_seqs = s->max_seqs;
    d.rope.n_rot = s->n_rot;
    d.rope.style = s->style;
    d.rope.theta = 10000.0f;
    d.rope.mode = s->mode;
    d.rope.rotate_q = s->rotate_q;
    return d;
}

typedef struct pair {
    kvrt_cache     *cache;
    ref_model      *ref;
    kvrt_layer_desc layers[2];
    kvrt_cache_desc desc;
} pair;

static pair make_pair(const setup *s)
{
    pair p;
    memset(&p, 0, sizeof p);
    p.desc = make_desc(s, p.layers);
    OK(kvrt_cache_create(&p.desc, &p.cache));
    p.ref = ref_create(&p.desc);
    assert_non_null(p.ref);
    return p;
}

static void pair_free(pair *p)
{
    kvrt_cache_destroy(p->cache);
    ref_destroy(p->ref);
}

static uint64_t rng_state = 12345;
static double unit_rand(void)
{
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(rng_state >> 11) * 0x1.0p-53;
}

/* Fills n values of dtype dt; magnitudes vary by row so that scales differ. */
static void fill(void *buf, kvrt_dtype dt, int64_t n, int64_t row_len)
{
    for (int64_t i = 0; i < n; i++) {
        double mag = ldexp(1.0, (int)((i / row_len) % 7) - 3);
        ref_store(buf, dt, i, (unit_rand() * 2 - 1) * mag);
    }
}

/* Plans n tokens of seq at pos0.. and writes both layers from k/v (src dtype). */
static void put_tokens(pair *p, int32_t seq, int32_t pos0, int n, kvrt_dtype src, const void *k,
                       const void *v)
{
    int32_t seqs[64], pos[64];
    assert_true(n <= 64);
    for (int i = 0; i < n; i++) {
        seqs[i] = seq;
        pos[i] = pos0 + i;
    }
    kvrt_batch *b = NULL;
    OK(kvrt_batch_create(p->cache, 64, &b));
    OK(kvrt_batch_plan(p->cache, n, seqs, pos, b));
    assert_true(REF_HAS(ref_plan(p->ref, n, seqs, pos, 64, 1), KVRT_OK));
    for (int l = 0; l < 2; l++) {
        OK(kvrt_write(p->cache, b, l, k, v, src, NULL));
        ref_write(p->ref, l, n, seqs, pos, k, v, src, 1);
    }
    kvrt_batch_destroy(b);
}

/* Random tokens written from f32. */
static void put_random(pair *p, int32_t seq, int32_t pos0, int n)
{
    float *k = malloc(sizeof(float) * (size_t)n * HEADS * DK);
    float *v = malloc(sizeof(float) * (size_t)n * HEADS * DV);
    fill(k, KVRT_F32, (int64_t)n * HEADS * DK, DK);
    fill(v, KVRT_F32, (int64_t)n * HEADS * DV, DV);
    put_tokens(p, seq, pos0, n, KVRT_F32, k, v);
    free(k);
    free(v);
}

/* What a layer of a sequence stores: codes, scales, positions. */
typedef struct stored {
    int64_t n;
    uint8_t k[MAX_ROWS * HEADS * DK], v[MAX_ROWS * HEADS * DV];
    float   ks[MAX_ROWS * HEADS], vs[MAX_ROWS * HEADS];
    int32_t pos[MAX_ROWS];
} stored;

static stored *get_stored(kvrt_cache *c, int layer, int32_t seq)
{
    stored *s = calloc(1, sizeof *s);
    int64_t n2 = -1;
    OK(kvrt_gather(c, layer, seq, 0, -1, s->k, s->v, s->pos, MAX_ROWS, &s->n, NULL));
    if (kvrt_dtype_is_quantized(kvrt_cache_get_desc(c)->dtype)) {
        OK(kvrt_gather_scales(c, layer, seq, 0, -1, s->ks, s->vs, MAX_ROWS, &n2, NULL));
        assert_int_equal(n2, s->n);
    }
    return s;
}

static void assert_stored_equal(const stored *a, const stored *b)
{
    assert_int_equal(a->n, b->n);
    assert_memory_equal(a->pos, b->pos, sizeof(int32_t) * (size_t)a->n);
    assert_memory_equal(a->k, b->k, (size_t)a->n * HEADS * DK);
    assert_memory_equal(a->v, b->v, (size_t)a->n * HEADS * DV);
    assert_memory_equal(a->ks, b->ks, sizeof(float) * (size_t)a->n * HEADS);
    assert_memory_equal(a->vs, b->vs, sizeof(float) * (size_t)a->n * HEADS);
}

/* Every value of a layer of seq, dequantized by kvrt_gather_as to f32, against
 * the reference: bit-exact (NaN where the reference has NaN). */
static void assert_values_match_ref(pair *p, int layer, int32_t seq)
{
    float *k = malloc(sizeof(float) * MAX_ROWS * HEADS * DK);
    float *v = malloc(sizeof(float) * MAX_ROWS * HEADS * DV);
    int32_t pos[MAX_ROWS];
    int64_t n = -1, rn;
    OK(kvrt_gather_as(p->cache, layer, seq, 0, -1, k, v, pos, KVRT_F32, MAX_ROWS, &n, NULL));
    const ref_token *t = ref_seq_tokens(p->ref, seq, &rn);
    assert_int_equal(n, rn);
    int64_t off = ref_layer_offset(p->ref, layer);
    for (int64_t i = 0; i < n; i++) {
        assert_int_equal(pos[i], t[i].pos);
        for (int e = 0; e < HEADS * (DK + DV); e++) {
            double want = t[i].data[off + e];
            double got = e < HEADS * DK ? k[i * HEADS * DK + e] : v[i * HEADS * DV + e - HEADS * DK];
            if (isnan(want)) {
                assert_true(isnan(got));
            } else if (got != want) {
                fail_msg("row %lld elem %d: %.9g, reference %.9g", (long long)i, e, got, want);
            }
        }
    }
    free(k);
    free(v);
}

/* ------------------------------------------------------------------------ */

static void test_row_bytes(void **state)
{
    (void)state;
    kvrt_layer_desc a = {KVRT_LAYER_ATTN, 8, 128, 128, 0, 0, 0, 0};
    assert_int_equal(kvrt_layer_row_bytes(&a, KVRT_F16), 8 * 256 * 2);
    assert_int_equal(kvrt_layer_row_bytes(&a, KVRT_Q8), 8 * 256 + 8 * 2 * 4);
    assert_int_equal(kvrt_layer_scale_bytes(&a, KVRT_FP8_E4M3), 8 * 2 * 4);
    assert_int_equal(kvrt_layer_scale_bytes(&a, KVRT_BF16), 0);
    kvrt_layer_desc mla = {KVRT_LAYER_MLA, 0, 0, 0, 0, 512, 64, 0};
    assert_int_equal(kvrt_layer_row_bytes(&mla, KVRT_Q8), 0);
    assert_int_equal(kvrt_dtype_size(KVRT_Q8), 1);
    assert_string_equal(kvrt_dtype_name(KVRT_FP8_E4M3), "fp8_e4m3");
    /* MLA in a quantized cache: refused per kind */
    kvrt_cache_desc d;
    kvrt_cache_desc_init(&d);
    d.dtype = KVRT_FP8_E4M3;
    d.n_layers = 1;
    d.layers = &mla;
    d.n_blocks = 4;
    d.rope.n_rot = 64;
    kvrt_cache *c = (kvrt_cache *)1;
    EXPECT(KVRT_ERR_UNSUPPORTED, kvrt_cache_create(&d, &c));
    assert_null(c);
    assert_non_null(strstr(kvrt_last_error(), "layer 0 (MLA)"));
}

/* Rows with special values: each head row of K is one case. */
static void special_rows(float *k, int n_rows)
{
    for (int r = 0; r < n_rows; r++)
        for (int h = 0; h < HEADS; h++) {
            float *x = k + ((int64_t)r * HEADS + h) * DK;
            int c = (r * HEADS + h) % 8;
            for (int e = 0; e < DK; e++)
                x[e] = (float)((unit_rand() * 2 - 1) * 3);
            switch (c) {
            case 0: /* all zero: scale 0 */
                for (int e = 0; e < DK; e++)
                    x[e] = e % 2 ? -0.0f : 0.0f;
                break;
            case 1: /* q8 ties at scale 1: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2 */
                x[0] = 127.0f;
                x[1] = 0.5f;
                x[2] = 1.5f;
                x[3] = 2.5f;
                x[4] = -2.5f;
                x[5] = -126.5f;
                break;
            case 2: /* NaN and infinities: NaN elements, the rest kept */
                x[3] = NAN;
                x[7] = INFINITY;
                x[9] = -INFINITY;
                break;
            case 3: /* only non-finite values */
                for (int e = 0; e < DK; e++)
                    x[e] = e % 2 ? NAN : -INFINITY;
                break;
            case 4: /* tiny values: fp8 subnormals after scaling */
                x[0] = 448.0f;
                for (int e = 1; e < DK; e++)
                    x[e] = (float)ldexp(e, -12);
                break;
            case 5: /* fp8 ties at scale 1 (448 / 448): 17 -> 16, 19 -> 20, 0.0048828125 (2.5 * 2^-9) -> 2^-8 */
                x[0] = 448.0f;
                x[1] = 17.0f;
                x[2] = 19.0f;
                x[3] = 0.0048828125f;
                x[4] = -432.0f; /* between 416 and 448: a tie, to 448 (even) */
                break;
            default:
                break;
            }
        }
}

static void check_write(kvrt_dtype dtype, kvrt_dtype src)
{
    setup s = base_setup(dtype);
    pair p = make_pair(&s);
    enum { N = 24 };
    float kf[N * HEADS * DK], vf[N * HEADS * DV];
    special_rows(kf, N);
    fill(vf, KVRT_F32, N * HEADS * DV, DV);
    /* the source in src dtype; the reference quantizes its f32 values */
    uint16_t k16[N * HEADS * DK], v16[N * HEADS * DV];
    const void *k = kf, *v = vf;
    if (src != KVRT_F32) {
        for (int i = 0; i < N * HEADS * DK; i++)
            ref_store(k16, src, i, kf[i]);
        for (int i = 0; i < N * HEADS * DV; i++)
            ref_store(v16, src, i, vf[i]);
        k = k16;
        v = v16;
    }
    put_tokens(&p, 0, 0, N, src, k, v);
    stored *st = get_stored(p.cache, 0, 0);
    assert_int_equal(st->n, N);
    for (int r = 0; r < N; r++)
        for (int h = 0; h < HEADS; h++) {
            float x[DK], y[DV];
            uint8_t code[DK];
            for (int e = 0; e < DK; e++)
                x[e] = (float)ref_load(k, src, ((int64_t)r * HEADS + h) * DK + e);
            float sc = ref_quantize_row(dtype, x, DK, code);
            assert_memory_equal(&st->ks[r * HEADS + h], &sc, sizeof sc);
            assert_memory_equal(&st->k[(r * HEADS + h) * DK], code, DK);
            assert_true(isfinite(sc) && sc >= 0);
            for (int e = 0; e < DV; e++)
                y[e] = (float)ref_load(v, src, ((int64_t)r * HEADS + h) * DV + e);
            sc = ref_quantize_row(dtype, y, DV, code);
            assert_memory_equal(&st->vs[r * HEADS + h], &sc, sizeof sc);
            assert_memory_equal(&st->v[(r * HEADS + h) * DV], code, DV);
        }
    if (src == KVRT_F32) { /* the documented cases, spelled out */
        const float *ks = st->ks;
        const uint8_t *kc = st->k;
        assert_true(ks[0] == 0.0f && !signbit(ks[0])); /* zero row */
        if (dtype == KVRT_Q8) {
            assert_true(ks[1] == 1.0f);
            assert_int_equal((int8_t)kc[DK + 1], 0);
            assert_int_equal((int8_t)kc[DK + 2], 2);
            assert_int_equal((int8_t)kc[DK + 3], 2);
            assert_int_equal((int8_t)kc[DK + 4], -2);
            assert_int_equal((int8_t)kc[DK + 5], -126);
            assert_int_equal(kc[2 * DK + 3], 0x80); /* NaN marker */
            assert_int_equal(kc[2 * DK + 7], 0x80);
        } else {
            assert_true(ks[5] == 1.0f);
            assert_true(ref_e4m3_value(kc[5 * DK + 1]) == 16.0);
            assert_true(ref_e4m3_value(kc[5 * DK + 2]) == 20.0);
            assert_true(ref_e4m3_value(kc[5 * DK + 3]) == 0x1p-8);
            assert_true(ref_e4m3_value(kc[5 * DK + 4]) == -448.0);
            assert_int_equal(kc[2 * DK + 3] & 0x7f, 0x7f);
            assert_int_equal(kc[2 * DK + 9], 0xff); /* -inf: NaN with its sign */
        }
        assert_true(ks[3] == 0.0f); /* no finite value: scale 0 */
    }
    assert_values_match_ref(&p, 0, 0);
    assert_values_match_ref(&p, 1, 0);
    /* converting gathers round the dequantized values */
    uint16_t hk[N * HEADS * DK];
    int64_t n = 0;
    OK(kvrt_gather_as(p.cache, 0, 0, 0, -1, hk, NULL, NULL, KVRT_BF16, N, &n, NULL));
    float fk[N * HEADS * DK];
    OK(kvrt_gather_as(p.cache, 0, 0, 0, -1, fk, NULL, NULL, KVRT_F32, N, &n, NULL));
    for (int i = 0; i < N * HEADS * DK; i++) {
        double want = ref_round(fk[i], KVRT_BF16), got = ref_load(hk, KVRT_BF16, i);
        assert_true(isnan(want) ? isnan(got) : got == want);
    }
    free(st);
    pair_free(&p);
}

static void test_write_quantizes(void **state)
{
    (void)state;
    kvrt_dtype q[2] = {KVRT_Q8, KVRT_FP8_E4M3}, src[3] = {KVRT_F32, KVRT_F16, KVRT_BF16};
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 3; j++)
            check_write(q[i], src[j]);
}

/* An e4m3 sweep: every code's value, midpoints (ties to even) and
 * neighbours round as the reference says. Written as rows of one element
 * next to 448 (scale 1). */
static void test_e4m3_sweep(void **state)
{
    (void)state;
    setup s = base_setup(KVRT_FP8_E4M3);
    s.n_blocks = 128;
    pair p = make_pair(&s);
    enum { N = 64 };
    float k[N * HEADS * DK], v[N * HEADS * DV];
    fill(v, KVRT_F32, N * HEADS * DV, DV);
    int code = 0;
    for (int r = 0; r < N; r++)
        for (int h = 0; h < HEADS; h++) {
            float *x = k + ((int64_t)r * HEADS + h) * DK;
            x[0] = 448.0f;
            for (int e = 1; e < DK; e++, code = (code + 1) % 126) {
                double a = ref_e4m3_value((uint8_t)code), b = ref_e4m3_value((uint8_t)(code + 1));
                int kind = e % 3;
                x[e] = (float)(kind == 0 ? a : kind == 1 ? (a + b) / 2 : nextafter((a + b) / 2, b));
                if (e % 2)
                    x[e] = -x[e];
            }
        }
    put_tokens(&p, 0, 0, N, KVRT_F32, k, v);
    stored *st = get_stored(p.cache, 0, 0);
    for (int r = 0; r < N * HEADS; r++) {
        uint8_t c[DK];
        float sc = ref_quantize_row(KVRT_FP8_E4M3, k + (int64_t)r * DK, DK, c);
        assert_true(sc == 1.0f);
        assert_memory_equal(st->k + (int64_t)r * DK, c, DK);
    }
    free(st);
    pair_free(&p);
}

/* seq_cp (shared blocks), a write into the copy (copy-on-write), rm and
 * compaction move codes and scales as they are. */
static void test_moves_bit_exact(void **state)
{
    (void)state;
    kvrt_dtype q[2] = {KVRT_Q8, KVRT_FP8_E4M3};
    for (int i = 0; i < 2; i++) {
        setup s = base_setup(q[i]);
        s.block_size = 8;
        pair p = make_pair(&s);
        put_random(&p, 0, 0, 37);
        stored *a = get_stored(p.cache, 0, 0);
        OK(kvrt_seq_cp(p.cache, 0, 1, 0, -1));
        assert_true(REF_HAS(ref_seq_cp(p.ref, 0, 1, 0, -1, 1), KVRT_OK));
        OK(kvrt_seq_rm(p.cache, 1, 30, -1)); /* the last block of seq 1: copied first */
        assert_true(REF_HAS(ref_seq_rm(p.ref, 1, 30, -1, 1), KVRT_OK));
        put_random(&p, 1, 30, 3);
        stored *b = get_stored(p.cache, 0, 0);
        assert_stored_equal(a, b);
        /* holes, then compaction */
        OK(kvrt_seq_rm(p.cache, 0, 3, 19));
        assert_true(REF_HAS(ref_seq_rm(p.ref, 0, 3, 19, 1), KVRT_OK));
        stored *c = get_stored(p.cache, 1, 0);
        OK(kvrt_cache_compact(p.cache));
        OK(kvrt_cache_check(p.cache));
        stored *d = get_stored(p.cache, 1, 0);
        assert_stored_equal(c, d);
        for (int32_t seq = 0; seq < 2; seq++)
            for (int l = 0; l < 2; l++)
                assert_values_match_ref(&p, l, seq);
        free(a);
        free(b);
        free(c);
        free(d);
        pair_free(&p);
    }
}

/* ---- state files ---- */

typedef struct membuf {
    uint8_t *data;
    size_t   size, cap, at;
} membuf;

static kvrt_status mem_write(void *user, const void *data, size_t size)
{
    membuf *m = user;
    if (m->size + size > m->cap) {
        m->cap = (m->size + size) * 2;
        m->data = realloc(m->data, m->cap);
    }
    memcpy(m->data + m->size, data, size);
    m->size += size;
    return KVRT_OK;
}

static kvrt_status mem_read(void *user, void *data, size_t size, size_t *got)
{
    membuf *m = user;
    size_t n = m->size - m->at < size ? m->size - m->at : size;
    memcpy(data, m->data + m->at, n);
    m->at += n;
    *got = n;
    return KVRT_OK;
}

static kvrt_status load(kvrt_cache *c, int32_t dst, membuf *m)
{
    m->at = 0;
    return kvrt_state_read(c, dst, mem_read, m);
}

static uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t le64(const uint8_t *p) { return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32; }

#if defined(KVRT_HAVE_XXHASH)
/* Sets the f32 at byte `at` of the section that starts at `frame`, and the
 * section's checksum after it, so that only the value is wrong. */
static void patch_f32(uint8_t *frame, size_t at, float f)
{
    uint64_t size = le64(frame + 8);
    memcpy(frame + at, &f, 4); /* little-endian host */
    uint64_t sum = XXH3_64bits(frame, 16 + size);
    for (int i = 0; i < 8; i++)
        frame[16 + size + (size_t)i] = (uint8_t)(sum >> (8 * i));
}
#endif

static void test_state_roundtrip(void **state)
{
    (void)state;
    kvrt_dtype q[2] = {KVRT_Q8, KVRT_FP8_E4M3};
    for (int i = 0; i < 2; i++) {
        setup s = base_setup(q[i]);
        pair p = make_pair(&s);
        put_random(&p, 0, 0, 53);
        OK(kvrt_seq_rm(p.cache, 0, 10, 14));
        stored *a[2] = {get_stored(p.cache, 0, 0), get_stored(p.cache, 1, 0)};
        membuf m = {0};
        kvrt_status st = kvrt_state_write(p.cache, 0, mem_write, &m);
        if (st == KVRT_ERR_UNSUPPORTED) { /* no checksum library */
            free(a[0]);
            free(a[1]);
            pair_free(&p);
            skip();
        }
        OK(st);
        uint64_t size = 0;
        OK(kvrt_state_size(p.cache, 0, &size));
        assert_int_equal(size, m.size);
        /* into a cache of another block size */
        setup s2 = s;
        s2.block_size = 4;
        s2.n_blocks = 40;
        pair p2 = make_pair(&s2);
        OK(load(p2.cache, 2, &m));
        for (int l = 0; l < 2; l++) {
            stored *b = get_stored(p2.cache, l, 2);
            assert_stored_equal(a[l], b);
            free(b);
        }
        /* offload and restore */
        kvrt_offload *off = NULL;
        OK(kvrt_seq_offload(p2.cache, 2, &off));
        OK(kvrt_seq_restore(p2.cache, 3, off));
        kvrt_offload_free(off);
        for (int l = 0; l < 2; l++) {
            stored *b = get_stored(p2.cache, l, 3);
            assert_stored_equal(a[l], b);
            free(b);
        }
        /* only into the same dtype, naming the layer */
        kvrt_dtype others[2] = {KVRT_F16, q[1 - i]};
        for (int o = 0; o < 2; o++) {
            setup s3 = s;
            s3.dtype = others[o];
            pair p3 = make_pair(&s3);
            EXPECT(KVRT_ERR_INCOMPATIBLE, load(p3.cache, 0, &m));
            assert_non_null(strstr(kvrt_last_error(), "layer 0: dtype"));
            pair_free(&p3);
        }
#if defined(KVRT_HAVE_XXHASH)
        /* NaN and negative scales: corrupt, the cache untouched. The first
         * ROWS section follows magic, HEAD and SEQ. */
        uint8_t *frame = m.data + 8;
        for (int sec = 0; sec < 2; sec++)
            frame += 16 + le64(frame + 8) + 8;
        assert_int_equal(le32(frame), 0x53574f52u); /* "ROWS" */
        uint64_t n_rows = le64(frame + 16 + 8);
        size_t scales_at = 16 + 24 + (size_t)n_rows * HEADS * (DK + DV);
        const float bad[3] = {NAN, -1.0f, -0.0f};
        for (int b = 0; b < 3; b++) {
            membuf c = m;
            c.data = malloc(m.size);
            memcpy(c.data, m.data, m.size);
            patch_f32(c.data + (frame - m.data), scales_at + 4 * (size_t)(b + 1), bad[b]);
            EXPECT(KVRT_ERR_CORRUPT, load(p2.cache, 0, &c));
            assert_non_null(strstr(kvrt_last_error(), "scale"));
            int64_t nt = -1;
            OK(kvrt_seq_n_tokens(p2.cache, 0, &nt));
            assert_int_equal(nt, 0);
            free(c.data);
        }
#endif
        free(m.data);
        free(a[0]);
        free(a[1]);
        pair_free(&p2);
        pair_free(&p);
    }
}

/* ---- attention ---- */

/* Attention of one decode token of seq at qpos (q random, f32) in a layer,
 * into out [HEADS * group][DV]. */
static void attend(pair *p, int32_t seq, int32_t qpos, int layer, const float *q, int n_q,
                   float *out)
{
    kvrt_batch *b = NULL;
    OK(kvrt_batch_create(p->cache, 4, &b));
    OK(kvrt_batch_plan(p->cache, 1, &seq, &qpos, b));
    assert_true(REF_HAS(ref_plan(p->ref, 1, &seq, &qpos, 4, 1), KVRT_OK));
    float k[HEADS * DK], v[HEADS * DV];
    fill(k, KVRT_F32, HEADS * DK, DK);
    fill(v, KVRT_F32, HEADS * DV, DV);
    for (int l = 0; l < 2; l++) {
        OK(kvrt_write(p->cache, b, l, k, v, KVRT_F32, NULL));
        ref_write(p->ref, l, 1, &seq, &qpos, k, v, KVRT_F32, 1);
    }
    kvrt_attention_params ap;
    memset(&ap, 0, sizeof ap);
    ap.n_q_heads = n_q;
    ap.q_dtype = KVRT_F32;
    ap.out_dtype = KVRT_F32;
    OK(kvrt_attention(p->cache, b, layer, q, out, &ap, NULL));
    kvrt_batch_destroy(b);
}

/* The reference's attention for the same query; returns the bound on the
 * difference of an f32 backend from it over the same K/V values:
 * logits differ by at most ds = scale |q|_1 (kmax (dk + 8) 2^-24 + kerr)
 * (f32 dot products; kerr: error of K turned in f32, pre-RoPE), so the
 * weights move by expm1(2 ds) in L1 and an output by
 * vmax (expm1(2 ds) + (n + dk + 16) 2^-23). */
static double ref_attend(pair *p, int32_t seq, int32_t qpos, int layer, const float *q, int n_q,
                         double kerr, double *out)
{
    double qd[8 * DK];
    for (int i = 0; i < n_q * DK; i++)
        qd[i] = q[i];
    double scale = 1.0 / sqrt((double)DK);
    int64_t keys = ref_attention(p->ref, layer, seq, qpos, qd, n_q, 0, 0, out);
    assert_true(keys > 0);
    int64_t n;
    const ref_token *t = ref_seq_tokens(p->ref, seq, &n);
    double kmax = 0, vmax = 0, q1 = 0;
    int64_t off = ref_layer_offset(p->ref, layer);
    for (int64_t i = 0; i < n; i++)
        for (int e = 0; e < HEADS * (DK + DV); e++)
            if (e < HEADS * DK)
                kmax = fmax(kmax, fabs(t[i].data[off + e]));
            else
                vmax = fmax(vmax, fabs(t[i].data[off + e]));
    for (int h = 0; h < n_q; h++) {
        double s1 = 0;
        for (int e = 0; e < DK; e++)
            s1 += fabs(qd[h * DK + e]);
        q1 = fmax(q1, s1);
    }
    double ds = scale * q1 * (kmax * (DK + 8) * 0x1.0p-24 + kerr);
    return vmax * (expm1(2 * ds) + (double)(keys + DK + 16) * 0x1.0p-23);
}

static void test_attention_quant(void **state)
{
    (void)state;
    kvrt_dtype q[2] = {KVRT_Q8, KVRT_FP8_E4M3};
    for (int i = 0; i < 2; i++) {
        setup s = base_setup(q[i]), sf = base_setup(KVRT_F32);
        pair p = make_pair(&s), pf = make_pair(&sf);
        enum { N = 200, NQ = 4 };
        float *k = malloc(sizeof(float) * N * HEADS * DK), *v = malloc(sizeof(float) * N * HEADS * DV);
        fill(k, KVRT_F32, (int64_t)N * HEADS * DK, DK);
        fill(v, KVRT_F32, (int64_t)N * HEADS * DV, DV);
        for (int at = 0; at < N; at += 50) {
            put_tokens(&p, 0, at, 50, KVRT_F32, k + (int64_t)at * HEADS * DK, v + (int64_t)at * HEADS * DV);
            put_tokens(&pf, 0, at, 50, KVRT_F32, k + (int64_t)at * HEADS * DK, v + (int64_t)at * HEADS * DV);
        }
        float qv[NQ * DK], out[NQ * DV], outf[NQ * DV];
        double want[NQ * DV];
        fill(qv, KVRT_F32, NQ * DK, DK);
        rng_state = 99; /* the same new token in both caches */
        attend(&p, 0, N, 0, qv, NQ, out);
        rng_state = 99;
        attend(&pf, 0, N, 0, qv, NQ, outf);
        /* against the reference over the dequantized values */
        double tol = ref_attend(&p, 0, N, 0, qv, NQ, 0, want);
        for (int e = 0; e < NQ * DV; e++)
            assert_true(fabs(out[e] - want[e]) <= tol);
        /* against the f32 cache: each stored element is off by at most
         * eps_q * amax of its row (q8: half a step, amax / 254; fp8: half
         * an ulp of 3 mantissa bits, 2^-4 of the element, <= amax / 16,
         * or 2^-10 s below the normal range). A key's logit moves by
         * d_j = scale * sum_e |q_e| |k_e - k'_e| <= scale |q|_1 eps_q amax,
         * the weights by expm1(2 max d_j) in L1, and an output by
         * vmax * expm1(2 max d_j) + max |v - v'|; that is between the
         * exact attentions over the two caches' values. The errors are
         * measured element by element (each within eps_q * amax of its
         * row, checked) and the bound is built from them. Each f32 output
         * adds its own rounding against the exact attention over its
         * cache's values: ref_attend's bound (logits off by ds = scale
         * |q|_1 kmax (dk + 8) 2^-24, weights by expm1(2 ds) in L1, f32
         * accumulation over the n = N + 1 keys and the dk products
         * (n + dk + 16) 2^-23 of vmax), tol for the quantized cache and
         * tol_f for the f32 one, so
         *   |out - outf| <= vmax expm1(2 d) + dvmax + tol + tol_f. */
        double eps_q = q[i] == KVRT_Q8 ? 1.0 / 254 : 1.0 / 16;
        enum { ROWS = N + 1 };
        float *kq = malloc(sizeof(float) * ROWS * HEADS * DK), *kx = malloc(sizeof(float) * ROWS * HEADS * DK);
        float *vq = malloc(sizeof(float) * ROWS * HEADS * DV), *vx = malloc(sizeof(float) * ROWS * HEADS * DV);
        int64_t nq = 0, nx = 0;
        OK(kvrt_gather_as(p.cache, 0, 0, 0, -1, kq, vq, NULL, KVRT_F32, ROWS, &nq, NULL));
        OK(kvrt_gather(pf.cache, 0, 0, 0, -1, kx, vx, NULL, ROWS, &nx, NULL));
        assert_int_equal(nq, ROWS);
        double dmax = 0, dvmax = 0, vmax = 0;
        for (int64_t r = 0; r < ROWS * HEADS; r++) {
            double ka = 0, va = 0;
            for (int e = 0; e < DK; e++)
                ka = fmax(ka, fabs(kx[r * DK + e]));
            for (int e = 0; e < DV; e++)
                va = fmax(va, fabs(vx[r * DV + e]));
            for (int e = 0; e < DK; e++)
                assert_true(fabs(kq[r * DK + e] - kx[r * DK + e]) <= eps_q * ka + 1e-30);
            for (int e = 0; e < DV; e++) {
                double dv = fabs(vq[r * DV + e] - vx[r * DV + e]);
                assert_true(dv <= eps_q * va + 1e-30);
                dvmax = fmax(dvmax, dv);
            }
            vmax = fmax(vmax, va);
            for (int h = 0; h < NQ / HEADS; h++) { /* the query heads of kv head r % HEADS */
                const float *qh = qv + ((int64_t)(r % HEADS) * (NQ / HEADS) + h) * DK;
                double d = 0;
                for (int e = 0; e < DK; e++)
                    d += fabs(qh[e]) * fabs(kq[r * DK + e] - kx[r * DK + e]);
                dmax = fmax(dmax, d / sqrt((double)DK));
            }
        }
        free(kq);
        free(kx);
        free(vq);
        free(vx);
        double d = dmax, want_f[NQ * DV];
        double tol_f = ref_attend(&pf, 0, N, 0, qv, NQ, 0, want_f);
        double bound = vmax * expm1(2 * d) + dvmax + tol + tol_f, worst = 0;
        for (int e = 0; e < NQ * DV; e++)
            worst = fmax(worst, fabs(out[e] - outf[e]));
        printf("  %s decode attention vs f32 cache: largest difference %.3g, bound %.3g\n",
               kvrt_dtype_name(q[i]), worst, bound);
        assert_true(worst <= bound);
        assert_true(worst > 0); /* quantization did something */
        /* a NaN written into K reaches the tokens that see it */
        float kn[HEADS * DK], vn[HEADS * DV];
        fill(kn, KVRT_F32, HEADS * DK, DK);
        fill(vn, KVRT_F32, HEADS * DV, DV);
        kn[3] = NAN;
        put_tokens(&p, 1, 0, 1, KVRT_F32, kn, vn);
        attend(&p, 1, 1, 0, qv, NQ, out);
        for (int h = 0; h < NQ; h++)
            assert_true(h < NQ / HEADS ? isnan(out[h * DV]) : !isnan(out[h * DV]));
        free(k);
        free(v);
        pair_free(&p);
        pair_free(&pf);
    }
}

/* Shifting quantized K: dequantize, rotate, requantize; each shift adds at
 * most half a step of the row's new scale (plus the f32 rotation error),
 * so after n shifts an element is within n * (eps_q * amax + 2^-20 amax) of
 * the reference, which rotates the first values in double. */
static void test_shift_quant(void **state)
{
    (void)state;
    kvrt_dtype q[2] = {KVRT_Q8, KVRT_FP8_E4M3};
    for (int i = 0; i < 2; i++) {
        setup s = base_setup(q[i]);
        pair p = make_pair(&s);
        put_random(&p, 0, 0, 40);
        enum { SHIFTS = 5 };
        for (int k = 0; k < SHIFTS; k++) {
            OK(kvrt_seq_shift(p.cache, 0, 0, -1, k % 2 ? -3 : 7));
            assert_true(REF_HAS(ref_seq_shift(p.ref, 0, 0, -1, k % 2 ? -3 : 7, 1), KVRT_OK));
        }
        float kf[40 * HEADS * DK];
        int64_t n = 0, rn;
        OK(kvrt_gather_as(p.cache, 0, 0, 0, -1, kf, NULL, NULL, KVRT_F32, 40, &n, NULL));
        const ref_token *t = ref_seq_tokens(p.ref, 0, &rn);
        double eps_q = q[i] == KVRT_Q8 ? 1.0 / 254 : 1.0 / 16, worst = 0;
        for (int64_t r = 0; r < n * HEADS; r++) {
            const double *row = t[r / HEADS].data + (r % HEADS) * DK;
            double amax = 0;
            for (int e = 0; e < DK; e++)
                amax = fmax(amax, fabs(row[e]));
            double bound = SHIFTS * (2 * eps_q * amax + 0x1.0p-20 * amax);
            for (int e = 0; e < DK; e++) {
                double err = fabs(kf[r * DK + e] - row[e]);
                worst = fmax(worst, err / bound);
                assert_true(err <= bound);
            }
        }
        printf("  %s: %d shifts, largest K error %.3g of its bound\n", kvrt_dtype_name(q[i]),
               SHIFTS, worst);
        pair_free(&p);
    }
}

/* ---- pre-RoPE ---- */

/* 100 shifts: in pre-RoPE mode K is bit-exact afterwards and attention at
 * the new positions matches the reference (which turns keys and queries in
 * double); in the stored-rotated mode the drift is printed and bounded. */
static void check_prerope(kvrt_dtype dtype, kvrt_rope_style style, int n_rot, int rotate_q)
{
    setup s = base_setup(dtype);
    s.style = style;
    s.n_rot = n_rot;
    s.mode = KVRT_ROPE_IN_ATTENTION;
    s.rotate_q = rotate_q;
    s.theta[1] = 1000000.0f; /* a global layer's base next to a local one's */
    pair p = make_pair(&s);
    setup so = s;
    so.mode = KVRT_ROPE_STORED_ROTATED;
    so.rotate_q = 0;
    pair po = make_pair(&so);
    enum { N = 30, NQ = 4 };
    float *k = malloc(sizeof(float) * N * HEADS * DK), *v = malloc(sizeof(float) * N * HEADS * DV);
    fill(k, KVRT_F32, (int64_t)N * HEADS * DK, DK);
    fill(v, KVRT_F32, (int64_t)N * HEADS * DV, DV);
    put_tokens(&p, 0, 0, N, KVRT_F32, k, v);
    put_tokens(&po, 0, 0, N, KVRT_F32, k, v);
    stored *before[2] = {get_stored(p.cache, 0, 0), get_stored(p.cache, 1, 0)};
    int32_t end = N;
    for (int i = 0; i < 100; i++) {
        int32_t delta = i % 2 ? -37 : 41;
        OK(kvrt_seq_shift(p.cache, 0, 0, -1, delta));
        OK(kvrt_seq_shift(po.cache, 0, 0, -1, delta));
        assert_true(REF_HAS(ref_seq_shift(p.ref, 0, 0, -1, delta, 1), KVRT_OK));
        assert_true(REF_HAS(ref_seq_shift(po.ref, 0, 0, -1, delta, 1), KVRT_OK));
        end += delta;
    }
    OK(kvrt_seq_div(p.cache, 0, 0, -1, 1));
    for (int l = 0; l < 2; l++) {
        stored *after = get_stored(p.cache, l, 0);
        for (int64_t r = 0; r < after->n; r++)
            before[l]->pos[r] += end - N;
        assert_stored_equal(before[l], after); /* K, V and scales bit-exact; positions moved */
        free(after);
        free(before[l]);
    }
    for (int l = 0; l < 2; l++)
        assert_values_match_ref(&p, l, 0);
    /* stored-rotated: the drift of 100 re-rotations, against the reference */
    if (n_rot > 0 && dtype == KVRT_F32) {
        float kf[N * HEADS * DK];
        int64_t n = 0, rn;
        OK(kvrt_gather(po.cache, 0, 0, 0, -1, kf, NULL, NULL, N, &n, NULL));
        const ref_token *t = ref_seq_tokens(po.ref, 0, &rn);
        double drift = 0, maxabs = 0;
        for (int64_t r = 0; r < n; r++)
            for (int e = 0; e < HEADS * DK; e++) {
                drift = fmax(drift, fabs(kf[r * HEADS * DK + e] - t[r].data[e]));
                maxabs = fmax(maxabs, fabs(t[r].data[e]));
            }
        /* the fuzzer's re-rotation bound: n (4 eps max|x| + 2^-24), eps 2^-22 */
        double bound = 100 * (4 * 0x1.0p-22 * maxabs + 0x1.0p-24);
        printf("  stored-rotated f32 %s n_rot %d: 100 shifts drift K by %.3g (bound %.3g); "
               "pre-RoPE: 0\n", style == KVRT_ROPE_NEOX ? "neox" : "normal", n_rot, drift, bound);
        assert_true(drift > 0 && drift <= bound);
    }
    /* attention at the shifted positions, both layers (two bases) */
    float q[NQ * DK], out[NQ * DV];
    double want[NQ * DV];
    fill(q, KVRT_F32, NQ * DK, DK);
    for (int l = 0; l < 2; l++) {
        attend(&p, 0, end + l, l, q, NQ, out);
        /* K (and with rotate_q q) turned in f32 as attention reads it, the
         * reference turning in double. kmax: the largest |K| of the layer's
         * reference rows, as ref_attend takes it (fill() reaches 8). A pair
         * (a, b) of norm r <= sqrt(2) kmax turns within 3 u r (u = 2^-24:
         * cos and sin rounded, two products, one sum; |a c| + |b s| <= r).
         * Against a logit, per unit of scale |q|_1 kmax:
         *   K's error: |q'|_1 <= sqrt(2) |q|_1 times 3 sqrt(2) u kmax: 6 u;
         *   q's error: |dq|_1 <= 6 u |q|_1 (3 u r per element, r <= |a| +
         *     |b|) times |k'| <= sqrt(2) kmax: 8.5 u;
         *   the f32 dot over turned values: dk u sum |q'_i k'_i|, with
         *     sum |q'_i k'_i| <= |q'|_1 max|k'| <= 2 |q|_1 kmax: 2 dk u.
         * That is 2 dk + 14.5 = 46.5 u, inside ref_attend's (dk + 8) u plus
         * kerr / kmax >= 32 u (56 u), so kerr = 2 (4 2^-22 kmax + 2^-24):
         * the fuzzer's turn bound (prerope_kerr), once for K and once for q. */
        int64_t nt;
        const ref_token *tk = ref_seq_tokens(p.ref, 0, &nt);
        double kmax = 0;
        for (int64_t r = 0; r < nt; r++)
            for (int e = 0; e < HEADS * DK; e++)
                kmax = fmax(kmax, fabs(tk[r].data[ref_layer_offset(p.ref, l) + e]));
        double kerr = 2 * (4 * 0x1.0p-22 * kmax + 0x1.0p-24);
        double tol = ref_attend(&p, 0, end + l, l, q, NQ, kerr, want);
        for (int e = 0; e < NQ * DV; e++)
            if (fabs(out[e] - want[e]) > tol)
                fail_msg("layer %d out[%d] %.9g, reference %.9g, bound %.3g", l, e, out[e], want[e], tol);
    }
    free(k);
    free(v);
    pair_free(&p);
    pair_free(&po);
}

static void test_prerope(void **state)
{
    (void)state;
    check_prerope(KVRT_F32, KVRT_ROPE_NEOX, 8, 0);
    check_prerope(KVRT_F32, KVRT_ROPE_NORMAL, 16, 1);
    check_prerope(KVRT_F16, KVRT_ROPE_NEOX, 16, 1);
    check_prerope(KVRT_Q8, KVRT_ROPE_NORMAL, 8, 1);
    check_prerope(KVRT_FP8_E4M3, KVRT_ROPE_NEOX, 4, 0);
}

/* Per-layer bases in the stored-rotated mode: a shift turns each layer by
 * its own theta; the state file (version 2) carries them and refuses a
 * cache with other bases, and a pre-RoPE file loads only into a pre-RoPE
 * cache. */
static void test_layer_theta_state(void **state)
{
    (void)state;
    setup s = base_setup(KVRT_F32);
    s.theta[0] = 10.0f;
    pair p = make_pair(&s);
    put_random(&p, 0, 0, 20);
    OK(kvrt_seq_shift(p.cache, 0, 0, -1, 5));
    assert_true(REF_HAS(ref_seq_shift(p.ref, 0, 0, -1, 5, 1), KVRT_OK));
    for (int l = 0; l < 2; l++) {
        float kf[20 * HEADS * DK];
        int64_t n, rn;
        OK(kvrt_gather(p.cache, l, 0, 0, -1, kf, NULL, NULL, 20, &n, NULL));
        const ref_token *t = ref_seq_tokens(p.ref, 0, &rn);
        const int64_t off = ref_layer_offset(p.ref, l);
        for (int64_t r = 0; r < n; r++) {
            /* one re-rotation (the fuzzer's rotation_bound): a pair of norm
             * r' <= sqrt(2) kmax turns in f32 within 3 u r' (u = 2^-24) <=
             * 4.3 u kmax, bounded by 4 * 2^-22 * kmax + 2^-24 with kmax the
             * largest |K| of the token's row (the reference's, turned in
             * double; fill() reaches 8) */
            double kmax = 0;
            for (int e = 0; e < HEADS * DK; e++)
                kmax = fmax(kmax, fabs(t[r].data[off + e]));
            for (int e = 0; e < HEADS * DK; e++)
                assert_true(fabs(kf[r * HEADS * DK + e] - t[r].data[off + e]) <=
                            4 * 0x1.0p-22 * kmax + 0x1.0p-24);
        }
    }
    membuf m = {0};
    kvrt_status st = kvrt_state_write(p.cache, 0, mem_write, &m);
    if (st == KVRT_ERR_UNSUPPORTED) {
        pair_free(&p);
        skip();
    }
    OK(st);
    assert_int_equal(le32(m.data + 8 + 16), 2); /* format_version 2: a layer has its own base */
    pair p2 = make_pair(&s);
    OK(load(p2.cache, 0, &m));
    stored *a = get_stored(p.cache, 0, 0), *b = get_stored(p2.cache, 0, 0);
    assert_stored_equal(a, b);
    free(a);
    free(b);
    setup s3 = s;
    s3.theta[0] = 0.0f;
    pair p3 = make_pair(&s3);
    EXPECT(KVRT_ERR_INCOMPATIBLE, load(p3.cache, 0, &m));
    assert_non_null(strstr(kvrt_last_error(), "layer 0: rope_theta"));
    s3 = s;
    s3.mode = KVRT_ROPE_IN_ATTENTION;
    pair p4 = make_pair(&s3);
    EXPECT(KVRT_ERR_INCOMPATIBLE, load(p4.cache, 0, &m));
    assert_non_null(strstr(kvrt_last_error(), "rope.mode"));
    free(m.data);
    pair_free(&p);
    pair_free(&p2);
    pair_free(&p3);
    pair_free(&p4);
}

static void test_invalid(void **state)
{
    (void)state;
    setup s = base_setup(KVRT_Q8);
    pair p = make_pair(&s);
    int32_t seq = 0, pos = 0;
    kvrt_batch *b = NULL;
    OK(kvrt_batch_create(p.cache, 4, &b));
    OK(kvrt_batch_plan(p.cache, 1, &seq, &pos, b));
    uint8_t raw[HEADS * DK] = {0};
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_write(p.cache, b, 0, raw, raw, KVRT_Q8, NULL));
    float q[HEADS * DK] = {0}, out[HEADS * DV];
    kvrt_attention_params ap;
    memset(&ap, 0, sizeof ap);
    ap.n_q_heads = HEADS;
    ap.q_dtype = KVRT_FP8_E4M3;
    ap.out_dtype = KVRT_F32;
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_attention(p.cache, b, 0, q, out, &ap, NULL));
    ap.q_dtype = KVRT_F32;
    ap.out_dtype = KVRT_Q8;
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_attention(p.cache, b, 0, q, out, &ap, NULL));
    ap.out_dtype = KVRT_BF16; /* any plain dtype for a quantized cache */
    float k[HEADS * DK] = {0}, v[HEADS * DV] = {0};
    OK(kvrt_write(p.cache, b, 0, k, v, KVRT_F32, NULL));
    OK(kvrt_attention(p.cache, b, 0, q, out, &ap, NULL));
    int64_t n;
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_gather_as(p.cache, 0, 0, 0, -1, k, v, NULL, KVRT_Q8, 4, &n, NULL));
    kvrt_batch_destroy(b);
    pair_free(&p);
    /* scales of an unquantized cache; rotate_q without the mode; a bad mode */
    s = base_setup(KVRT_F16);
    p = make_pair(&s);
    float sc[HEADS];
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_gather_scales(p.cache, 0, 0, 0, -1, sc, sc, 1, &n, NULL));
    assert_non_null(strstr(kvrt_last_error(), "kvrt_gather_scales: "));
    kvrt_layer_desc layers[2];
    kvrt_cache_desc d = make_desc(&s, layers);
    d.rope.rotate_q = 1;
    kvrt_cache *c = NULL;
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_cache_create(&d, &c));
    assert_non_null(strstr(kvrt_last_error(), "rope.rotate_q"));
    d.rope.rotate_q = 0;
    d.rope.mode = (kvrt_rope_mode)2;
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_cache_create(&d, &c));
    d.rope.mode = KVRT_ROPE_STORED_ROTATED;
    layers[1].rope_theta = -1.0f;
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_cache_create(&d, &c));
    assert_non_null(strstr(kvrt_last_error(), "layer 1: rope_theta"));
    layers[1].rope_theta = 0.0f;
    /* a shared handle in the other mode */
    d.rope.mode = KVRT_ROPE_IN_ATTENTION;
    int base_layers[2] = {0, 1};
    EXPECT(KVRT_ERR_INCOMPATIBLE, kvrt_cache_create_shared(p.cache, &d, base_layers, &c));
    assert_non_null(strstr(kvrt_last_error(), "rope.mode"));
    pair_free(&p);
}

int main(void)
{
    int isa = test_isa_check("test_quant");
    if (isa != 0)
        return isa;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_row_bytes),
        cmocka_unit_test(test_write_quantizes),
        cmocka_unit_test(test_e4m3_sweep),
        cmocka_unit_test(test_moves_bit_exact),
        cmocka_unit_test(test_state_roundtrip),
        cmocka_unit_test(test_attention_quant),
        cmocka_unit_test(test_shift_quant),
        cmocka_unit_test(test_prerope),
        cmocka_unit_test(test_layer_theta_state),
        cmocka_unit_test(test_invalid),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
