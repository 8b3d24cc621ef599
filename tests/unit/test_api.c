/*
 * test_api.c: the public API on the CPU backend: statuses, description
 * validation, the step, every edit, queries, and failed calls changing
 * nothing. Every expectation is computed from the test's own model of what
 * was written (test_value), not from the library.
 */
#include "common.h"

/* Plans tokens seq:[p0, p0+n) and writes test_value rows to every ATTN/MLA layer. */
static kvrt_status step(kvrt_cache *c, kvrt_batch *b, int32_t seq, int32_t p0, int n)
{
    const kvrt_cache_desc *d = kvrt_cache_get_desc(c);
    int32_t *seqs = malloc(sizeof(int32_t) * (size_t)n), *pos = malloc(sizeof(int32_t) * (size_t)n);
    for (int i = 0; i < n; i++) {
        seqs[i] = seq;
        pos[i] = p0 + i;
    }
    kvrt_status st = kvrt_batch_plan(c, n, seqs, pos, b);
    for (int l = 0; st == KVRT_OK && l < d->n_layers; l++) {
        const kvrt_layer_desc *ld = &d->layers[l];
        if (ld->kind == KVRT_LAYER_CROSS)
            continue;
        int64_t kw = ld->kind == KVRT_LAYER_MLA ? ld->latent_dim + ld->rope_dim
                                                : (int64_t)ld->n_kv_heads * ld->head_dim_k;
        int64_t vw = ld->kind == KVRT_LAYER_MLA ? 0 : (int64_t)ld->n_kv_heads * ld->head_dim_v;
        float *k = malloc(sizeof(float) * (size_t)(kw * n)), *v = malloc(sizeof(float) * (size_t)(vw * n + 1));
        for (int i = 0; i < n; i++) {
            for (int64_t e = 0; e < kw; e++)
                k[i * kw + e] = test_value(l, pos[i], e);
            for (int64_t e = 0; e < vw; e++)
                v[i * vw + e] = test_value(l + 1000, pos[i], e);
        }
        st = kvrt_write(c, b, l, k, ld->kind == KVRT_LAYER_MLA ? NULL : v, KVRT_F32, NULL);
        free(k);
        free(v);
    }
    free(seqs);
    free(pos);
    return st;
}

/* Checks that seq holds exactly positions want[0..n) in layer l, with the rows step() wrote. */
static void expect_rows(kvrt_cache *c, int l, int32_t seq, const int32_t *want, int64_t n)
{
    const kvrt_layer_desc *ld = &kvrt_cache_get_desc(c)->layers[l];
    int64_t kw = (int64_t)ld->n_kv_heads * ld->head_dim_k, vw = (int64_t)ld->n_kv_heads * ld->head_dim_v;
    float *k = malloc(sizeof(float) * (size_t)(kw * (n + 1))), *v = malloc(sizeof(float) * (size_t)(vw * (n + 1)));
    int32_t *pos = malloc(sizeof(int32_t) * (size_t)(n + 1));
    int64_t got;
    OK(kvrt_gather(c, l, seq, 0, -1, k, v, pos, n + 1, &got, NULL));
    assert_int_equal(got, n);
    for (int64_t i = 0; i < n; i++) {
        assert_int_equal(pos[i], want[i]);
        for (int64_t e = 0; e < kw; e++)
            assert_true(k[i * kw + e] == test_value(l, want[i], e));
        for (int64_t e = 0; e < vw; e++)
            assert_true(v[i * vw + e] == test_value(l + 1000, want[i], e));
    }
    free(k);
    free(v);
    free(pos);
}

static void test_status_names(void **state)
{
    (void)state;
    assert_string_equal(kvrt_status_name(KVRT_OK), "KVRT_OK");
    assert_string_equal(kvrt_status_name(KVRT_ERR_CAPACITY), "KVRT_ERR_CAPACITY");
    assert_string_equal(kvrt_status_name((kvrt_status)-999), "KVRT_UNKNOWN");
    assert_string_equal(kvrt_status_str(KVRT_ERR_WINDOW_EVICTED),
                        "sliding window no longer holds the rows needed");
    assert_int_equal(kvrt_version_number(), KVRT_VERSION_NUMBER);
    assert_string_equal(kvrt_version_string(), "0.1.0");
    assert_int_equal(kvrt_device_count(KVRT_BACKEND_CPU), 1);
    assert_int_equal(kvrt_dtype_size(KVRT_BF16), 2);
}

/* Each bad field: INVALID_ARG and a message naming the field. */
static void test_desc_validation(void **state)
{
    (void)state;
    kvrt_layer_desc good = {KVRT_LAYER_ATTN, 2, 16, 8, 0, 0, 0};
    kvrt_cache *c = (kvrt_cache *)0x1;
    kvrt_layer_desc l = good;
    kvrt_cache_desc d = test_desc(&l, 1, KVRT_F32, 16, 8, 2);

#define BAD(field_text, stmt)                                                                   \
    do {                                                                                       \
        l = good;                                                                              \
        d = test_desc(&l, 1, KVRT_F32, 16, 8, 2);                                              \
        stmt;                                                                                  \
        EXPECT(KVRT_ERR_INVALID_ARG, kvrt_cache_create(&d, &c));                               \
        assert_null(c);                                                                        \
        if (strstr(kvrt_last_error(), field_text) == NULL)                                     \
            fail_msg("message '%s' does not name %s", kvrt_last_error(), field_text);          \
    } while (0)

    BAD("block_size", d.block_size = 24);
    BAD("block_size", d.block_size = 512);
    BAD("n_blocks", d.n_blocks = 0);
    BAD("max_blocks", d.max_blocks = 4);
    BAD("max_seqs", d.max_seqs = 0);
    BAD("n_layers", d.n_layers = 0);
    BAD("dtype", d.dtype = (kvrt_dtype)7);
    BAD("head_dim_k", l.head_dim_k = 12);
    BAD("head_dim_v", l.head_dim_v = 0);
    BAD("n_kv_heads", l.n_kv_heads = 0);
    BAD("window", l.window = -1);
    BAD("latent_dim", l.latent_dim = 64);
    BAD("rope.n_rot", d.rope.n_rot = 3);
    BAD("rope.n_rot", d.rope.n_rot = 32);
    BAD("rope.theta", (d.rope.n_rot = 8, d.rope.theta = 0));
    BAD("rope.style", d.rope.style = (kvrt_rope_style)5);
    BAD("n_kv_heads", (l.kind = KVRT_LAYER_MLA, l.latent_dim = 64, l.rope_dim = 16, l.head_dim_k = 0, l.head_dim_v = 0));
    BAD("rope_dim", (l = (kvrt_layer_desc){KVRT_LAYER_MLA, 0, 0, 0, 0, 64, 15}));
    BAD("window", (l.kind = KVRT_LAYER_CROSS, d.cross_max_len = 8, l.window = 4));
    BAD("cross_max_len", (l.kind = KVRT_LAYER_CROSS, d.cross_max_len = 0));
    BAD("device", d.device.backend = (kvrt_backend)9);
    BAD("n_threads", d.n_threads = -1);
    BAD("n_threads", d.n_threads = 5000);
    d = test_desc(&l, 1, KVRT_F32, 16, 8, 2);
    l = good;
    d.device.ordinal = 3;
    EXPECT(KVRT_ERR_NO_DEVICE, kvrt_cache_create(&d, &c));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_cache_create(NULL, &c));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_cache_create(&d, NULL));
    kvrt_cache_destroy(NULL);
    kvrt_batch_destroy(NULL);
}

static void test_step_roundtrip(void **state)
{
    (void)state;
    kvrt_dtype dtypes[] = {KVRT_F32, KVRT_F16, KVRT_BF16};
    for (int di = 0; di < 3; di++) {
        kvrt_layer_desc layers[2] = {{KVRT_LAYER_ATTN, 2, 16, 8, 0, 0, 0},
                                     {KVRT_LAYER_ATTN, 1, 32, 32, 0, 0, 0}};
        kvrt_cache_desc d = test_desc(layers, 2, dtypes[di], 4, 16, 3);
        kvrt_cache *c;
        kvrt_batch *b;
        OK(kvrt_cache_create(&d, &c));
        OK(kvrt_batch_create(c, 32, &b));
        OK(step(c, b, 0, 0, 10));
        OK(step(c, b, 1, 0, 3));
        OK(step(c, b, 0, 10, 1));
        int32_t want[11];
        for (int i = 0; i < 11; i++)
            want[i] = i;
        if (dtypes[di] == KVRT_F32) {
            expect_rows(c, 0, 0, want, 11);
            expect_rows(c, 1, 1, want, 3);
        } else { /* converted once: within half an ulp of the dtype */
            float k[11 * 32];
            int64_t n;
            OK(kvrt_gather(c, 1, 0, 0, -1, NULL, NULL, NULL, 11, &n, NULL));
            assert_int_equal(n, 11);
            uint16_t raw[11 * 32];
            OK(kvrt_gather(c, 1, 0, 0, -1, raw, NULL, NULL, 11, &n, NULL));
            for (int i = 0; i < 11 * 32; i++) {
                float x = test_value(1, i / 32, i % 32);
                uint32_t bits = dtypes[di] == KVRT_BF16 ? (uint32_t)raw[i] << 16 : 0;
                float got;
                if (dtypes[di] == KVRT_BF16) {
                    memcpy(&got, &bits, 4);
                    assert_true(fabsf(got - x) <= fabsf(x) * 0x1p-8f);
                } else {
                    /* decode f16 */
                    int e = (raw[i] >> 10) & 31, m = raw[i] & 1023;
                    got = e ? ldexpf(1.0f + m / 1024.0f, e - 15) : ldexpf(m / 1024.0f, -14);
                    if (raw[i] & 0x8000)
                        got = -got;
                    assert_true(fabsf(got - x) <= fmaxf(fabsf(x) * 0x1p-11f, 0x1p-25f));
                }
                k[i % 32] = got;
            }
            (void)k;
        }
        int32_t lo, hi;
        int64_t nt;
        OK(kvrt_seq_pos_min(c, 0, &lo));
        OK(kvrt_seq_pos_max(c, 0, &hi));
        OK(kvrt_seq_n_tokens(c, 0, &nt));
        assert_int_equal(lo, 0);
        assert_int_equal(hi, 10);
        assert_int_equal(nt, 11);
        kvrt_cache_stats s;
        OK(kvrt_cache_stats_get(c, -1, &s));
        assert_int_equal(s.blocks_used, 3 + 1); /* 11 tokens in blocks of 4, 3 tokens */
        assert_int_equal(s.slots_live, 14);
        OK(kvrt_cache_check(c));
        kvrt_batch_destroy(b);
        kvrt_cache_destroy(c);
    }
}

/* Bad plans: status, message, nothing changed. */
static void test_plan_errors(void **state)
{
    (void)state;
    kvrt_layer_desc l = {KVRT_LAYER_ATTN, 1, 8, 8, 0, 0, 0};
    kvrt_cache_desc d = test_desc(&l, 1, KVRT_F32, 4, 3, 2);
    kvrt_cache *c;
    kvrt_batch *b, *b2;
    OK(kvrt_cache_create(&d, &c));
    OK(kvrt_batch_create(c, 16, &b));
    OK(step(c, b, 0, 0, 5));
    kvrt_cache_stats before, after;
    OK(kvrt_cache_stats_get(c, -1, &before));
    int32_t seqs[3] = {0, 0, 5}, pos[3] = {5, 5, 0};
    EXPECT(KVRT_ERR_POS_EXISTS, kvrt_batch_plan(c, 2, seqs, pos, b));
    assert_non_null(strstr(kvrt_last_error(), "position 5"));
    pos[0] = 3;
    EXPECT(KVRT_ERR_POS_EXISTS, kvrt_batch_plan(c, 1, seqs, pos, b));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_batch_plan(c, 1, seqs + 2, pos, b));
    assert_non_null(strstr(kvrt_last_error(), "sequence 5"));
    pos[0] = -2;
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_batch_plan(c, 1, seqs, pos, b));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_batch_plan(c, 0, seqs, pos, b));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_batch_plan(c, 17, seqs, pos, b));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_batch_plan(c, 1, NULL, pos, b));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_batch_plan(NULL, 1, seqs, pos, b));
    /* 12 slots in all; 5 used: 8 more need 3 blocks, 1 free */
    EXPECT(KVRT_ERR_CAPACITY, step(c, b, 1, 0, 8));
    assert_non_null(strstr(kvrt_last_error(), "blocks"));
    OK(kvrt_cache_stats_get(c, -1, &after));
    assert_memory_equal(&before, &after, sizeof before);
    int32_t want[5] = {0, 1, 2, 3, 4};
    expect_rows(c, 0, 0, want, 5);
    OK(kvrt_cache_check(c));
    /* a batch of another cache, and a stale batch */
    kvrt_cache *c2;
    OK(kvrt_cache_create(&d, &c2));
    OK(kvrt_batch_create(c2, 4, &b2));
    seqs[0] = 0;
    pos[0] = 9;
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_batch_plan(c, 1, seqs, pos, b2));
    OK(kvrt_batch_plan(c, 1, seqs, pos, b));
    OK(kvrt_seq_rm(c, 0, 0, 1));
    float k[8] = {0}, v[8] = {0};
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_write(c, b, 0, k, v, KVRT_F32, NULL));
    assert_non_null(strstr(kvrt_last_error(), "stale"));
    kvrt_batch_destroy(b2);
    kvrt_cache_destroy(c2);
    kvrt_batch_destroy(b);
    kvrt_cache_destroy(c);
}

static void test_edits(void **state)
{
    (void)state;
    kvrt_layer_desc l = {KVRT_LAYER_ATTN, 2, 8, 8, 0, 0, 0};
    kvrt_cache_desc d = test_desc(&l, 1, KVRT_F32, 4, 32, 4);
    kvrt_cache *c;
    kvrt_batch *b;
    OK(kvrt_cache_create(&d, &c));
    OK(kvrt_batch_create(c, 64, &b));
    OK(step(c, b, 0, 0, 10));
    /* cp shares whole blocks: [0, 8) is two full blocks */
    OK(kvrt_seq_cp(c, 0, 1, 0, 8));
    kvrt_cache_stats s;
    OK(kvrt_cache_stats_get(c, -1, &s));
    assert_int_equal(s.blocks_shared, 2);
    assert_int_equal(s.blocks_used, 3);
    int32_t want[16];
    for (int i = 0; i < 16; i++)
        want[i] = i;
    expect_rows(c, 0, 1, want, 8);
    /* cp of a range cutting a block copies the boundary block */
    OK(kvrt_seq_cp(c, 0, 2, 2, 6));
    expect_rows(c, 0, 2, want + 2, 4);
    OK(kvrt_cache_check(c));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_seq_cp(c, 0, 1, 0, -1));
    assert_non_null(strstr(kvrt_last_error(), "not empty"));
    /* appending to seq 1 writes a new block; the shared ones stay */
    OK(step(c, b, 1, 8, 3));
    expect_rows(c, 0, 1, want, 11);
    expect_rows(c, 0, 0, want, 10);
    /* rm in a shared block copies it first */
    OK(kvrt_seq_rm(c, 1, 1, 2));
    int32_t w1[10] = {0, 2, 3, 4, 5, 6, 7, 8, 9, 10};
    expect_rows(c, 0, 1, w1, 10);
    expect_rows(c, 0, 0, want, 10);
    OK(kvrt_cache_check(c));
    /* tail rollback, then the same positions again */
    OK(kvrt_seq_rm(c, 0, 7, -1));
    expect_rows(c, 0, 0, want, 7);
    OK(step(c, b, 0, 7, 3));
    expect_rows(c, 0, 0, want, 10);
    /* keep */
    OK(kvrt_seq_keep(c, 0));
    int64_t n;
    OK(kvrt_seq_n_tokens(c, 1, &n));
    assert_int_equal(n, 0);
    OK(kvrt_cache_check(c));
    /* holes + compact frees blocks and keeps contents */
    OK(kvrt_seq_rm(c, 0, 1, 3));
    OK(kvrt_seq_rm(c, 0, 5, 6));
    OK(kvrt_cache_stats_get(c, -1, &s));
    assert_int_equal(s.holes, 3);
    OK(kvrt_cache_compact(c));
    OK(kvrt_cache_stats_get(c, -1, &s));
    assert_int_equal(s.holes, 0);
    assert_int_equal(s.blocks_used, 2);
    int32_t w2[7] = {0, 3, 4, 6, 7, 8, 9};
    expect_rows(c, 0, 0, w2, 7);
    OK(kvrt_cache_check(c));
    /* clear */
    OK(kvrt_cache_clear(c));
    OK(kvrt_cache_stats_get(c, -1, &s));
    assert_int_equal(s.blocks_used, 0);
    assert_int_equal(s.blocks_free, 32);
    assert_int_equal(s.slots_live, 0);
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_seq_rm(c, 9, 0, -1));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_seq_rm(c, 0, 5, 2));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_seq_rm(NULL, 0, 0, -1));
    kvrt_batch_destroy(b);
    kvrt_cache_destroy(c);
}

/* shift re-rotates K by the delta; compared with a double-precision rotation
 * of the written f32 values. Bound: the kernel rotates in f32 with an angle
 * computed in double, so each output is within a few f32 ulps of |row|:
 * 4 * 2^-24 * (|x| + |y|) <= 2^-20 for values in [-1, 1]. */
static void test_shift_rotation(void **state)
{
    (void)state;
    for (int style = 0; style < 2; style++) {
        kvrt_layer_desc l = {KVRT_LAYER_ATTN, 2, 16, 8, 0, 0, 0};
        kvrt_cache_desc d = test_desc(&l, 1, KVRT_F32, 4, 16, 1);
        d.rope.n_rot = 8;
        d.rope.theta = 10000.0f;
        d.rope.freq_scale = 0.5f;
        d.rope.style = (kvrt_rope_style)style;
        kvrt_cache *c;
        kvrt_batch *b;
        OK(kvrt_cache_create(&d, &c));
        OK(kvrt_batch_create(c, 16, &b));
        OK(step(c, b, 0, 0, 12));
        /* collisions are refused, nothing changes */
        EXPECT(KVRT_ERR_POS_EXISTS, kvrt_seq_shift(c, 0, 4, -1, -3));
        EXPECT(KVRT_ERR_POS_RANGE, kvrt_seq_shift(c, 0, 0, -1, INT32_MAX - 3));
        /* the llama.cpp context shift: drop [1, 4), move [4, 12) down by 3 */
        OK(kvrt_seq_rm(c, 0, 1, 4));
        OK(kvrt_seq_shift(c, 0, 4, -1, -3));
        OK(kvrt_cache_check(c));
        float k[9 * 32];
        int32_t pos[9];
        int64_t n;
        OK(kvrt_gather(c, 0, 0, 0, -1, k, NULL, pos, 9, &n, NULL));
        assert_int_equal(n, 9);
        for (int i = 0; i < 9; i++) {
            assert_int_equal(pos[i], i);
            int32_t old = i == 0 ? 0 : i + 3;
            for (int h = 0; h < 2; h++) {
                const float *row = k + (i * 2 + h) * 16;
                double x[16];
                for (int e = 0; e < 16; e++)
                    x[e] = test_value(0, old, h * 16 + e);
                if (old != i)
                    for (int p = 0; p < 4; p++) {
                        int a = style == 0 ? 2 * p : p, bb = style == 0 ? 2 * p + 1 : p + 4;
                        double ang = (i - old) * 0.5 * pow(10000.0, -2.0 * p / 8);
                        double xa = x[a], xb = x[bb];
                        x[a] = xa * cos(ang) - xb * sin(ang);
                        x[bb] = xa * sin(ang) + xb * cos(ang);
                    }
                for (int e = 0; e < 16; e++)
                    if (fabs(row[e] - x[e]) > 0x1p-20)
                        fail_msg("style %d pos %d head %d elem %d: %.9g vs %.9g", style, i, h, e,
                                 row[e], x[e]);
            }
        }
        /* shifting below 0 removes, div merges are refused */
        OK(kvrt_seq_shift(c, 0, 0, 3, -2));
        OK(kvrt_seq_n_tokens(c, 0, &n));
        assert_int_equal(n, 7);
        EXPECT(KVRT_ERR_POS_EXISTS, kvrt_seq_div(c, 0, 0, -1, 2));
        EXPECT(KVRT_ERR_INVALID_ARG, kvrt_seq_div(c, 0, 0, -1, 0));
        int32_t hi;
        OK(kvrt_seq_pos_max(c, 0, &hi));
        assert_int_equal(hi, 8);
        OK(kvrt_cache_check(c));
        kvrt_batch_destroy(b);
        kvrt_cache_destroy(c);
    }
}

/* The pool grows past its first allocation without moving or losing data. */
static void test_growth(void **state)
{
    (void)state;
    kvrt_layer_desc l = {KVRT_LAYER_ATTN, 1, 8, 8, 0, 0, 0};
    kvrt_cache_desc d = test_desc(&l, 1, KVRT_F32, 4, 2, 1);
    d.max_blocks = 64;
    kvrt_cache *c;
    kvrt_batch *b;
    OK(kvrt_cache_create(&d, &c));
    OK(kvrt_batch_create(c, 8, &b));
    for (int p = 0; p < 256; p += 8)
        OK(step(c, b, 0, p, 8));
    EXPECT(KVRT_ERR_CAPACITY, step(c, b, 0, 256, 1));
    int32_t want[256];
    for (int i = 0; i < 256; i++)
        want[i] = i;
    expect_rows(c, 0, 0, want, 256);
    kvrt_cache_stats s;
    OK(kvrt_cache_stats_get(c, -1, &s));
    assert_int_equal(s.blocks_total, 64);
    assert_int_equal(s.blocks_used, 64);
    OK(kvrt_cache_check(c));
    kvrt_batch_destroy(b);
    kvrt_cache_destroy(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_status_names),  cmocka_unit_test(test_desc_validation),
        cmocka_unit_test(test_step_roundtrip), cmocka_unit_test(test_plan_errors),
        cmocka_unit_test(test_edits),         cmocka_unit_test(test_shift_rotation), cmocka_unit_test(test_growth),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
