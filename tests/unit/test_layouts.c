/*
 * test_layouts.c: the layer kinds and how they group, on the backend named
 * by KVRT_TEST_BACKEND (cpu by default; exit 77 when it has no device):
 * layer groups of Gemma-, DeepSeek- and Whisper-like models; sliding-window
 * rings (the block bound, blocks returning to the pool, swa_full, the resume
 * query, tail rollback never exposing a stale row); MLA rows (bit-exact
 * moves, rotation of the rope part only); CROSS layers (bounds, sharing,
 * removal, edits leaving them alone, clear); descriptions mixing fields of
 * different kinds.
 *
 * Expectations come from the test's own model (scenario.h), not from the
 * library.
 */
#include "scenario.h"

static kvrt_layer_desc attn(int heads, int dk, int dv, int window)
{
    return (kvrt_layer_desc){KVRT_LAYER_ATTN, heads, dk, dv, window, 0, 0};
}
static kvrt_layer_desc mla(int latent, int rope)
{
    return (kvrt_layer_desc){KVRT_LAYER_MLA, 0, 0, 0, 0, latent, rope};
}
static kvrt_layer_desc cross(int heads, int dk, int dv)
{
    return (kvrt_layer_desc){KVRT_LAYER_CROSS, heads, dk, dv, 0, 0, 0};
}

/* positions 0..n-1, and a constant tag */
static int32_t iota_pos[4096];
static uint32_t tag_1[4096], tag_2[4096], tag_3[4096];

static int setup_tables(void **state)
{
    (void)state;
    for (int i = 0; i < 4096; i++) {
        iota_pos[i] = i;
        tag_1[i] = 1;
        tag_2[i] = 2;
        tag_3[i] = 3;
    }
    return 0;
}

/* ======================================================================== */
/* Groups                                                                   */
/* ======================================================================== */

/* Checks that layers with equal class[] share a group and others do not,
 * and that there are as many groups as classes. */
static void expect_groups(const kvrt_cache *c, const int *class_of, int n_layers, int n_classes)
{
    if (kvrt_cache_n_groups(c) != n_classes)
        fail_msg("%d layer groups, expected %d", kvrt_cache_n_groups(c), n_classes);
    for (int i = 0; i < n_layers; i++) {
        int gi = kvrt_layer_group(c, i);
        assert_true(gi >= 0 && gi < n_classes);
        for (int j = 0; j < n_layers; j++) {
            int same = kvrt_layer_group(c, j) == gi;
            if (same != (class_of[i] == class_of[j]))
                fail_msg("layers %d and %d: %s group, expected %s", i, j, same ? "same" : "different",
                         same ? "different" : "same");
        }
    }
    assert_int_equal(kvrt_layer_group(c, -1), -1);
    assert_int_equal(kvrt_layer_group(c, n_layers), -1);
}

static void test_groups(void **state)
{
    (void)state;
    kvrt_cache *c;
    /* Gemma-like: 5 sliding-window layers to 1 global, twice */
    kvrt_layer_desc gemma[12];
    int gemma_class[12];
    for (int l = 0; l < 12; l++) {
        gemma[l] = attn(4, 64, 64, l % 6 == 5 ? 0 : 512);
        gemma_class[l] = l % 6 == 5;
    }
    kvrt_cache_desc d = sc_desc(gemma, 12, KVRT_BF16, 16, 8, 2);
    OK(kvrt_cache_create(&d, &c));
    expect_groups(c, gemma_class, 12, 2);
    kvrt_cache_destroy(c);

    /* DeepSeek-like: every layer MLA 512 + 64 */
    kvrt_layer_desc deepseek[8];
    int deepseek_class[8] = {0};
    for (int l = 0; l < 8; l++)
        deepseek[l] = mla(512, 64);
    d = sc_desc(deepseek, 8, KVRT_BF16, 64, 4, 1);
    d.rope.n_rot = 64;
    OK(kvrt_cache_create(&d, &c));
    expect_groups(c, deepseek_class, 8, 1);
    kvrt_cache_destroy(c);

    /* three windows, layers of different shapes: one group per window */
    kvrt_layer_desc mixed[6] = {attn(2, 32, 32, 0),   attn(2, 32, 32, 64), attn(1, 64, 32, 64),
                                attn(2, 32, 32, 128), attn(8, 16, 16, 0),  attn(1, 8, 8, 128)};
    int mixed_class[6] = {0, 1, 1, 2, 0, 2};
    d = sc_desc(mixed, 6, KVRT_F16, 16, 8, 1);
    OK(kvrt_cache_create(&d, &c));
    expect_groups(c, mixed_class, 6, 3);
    kvrt_cache_destroy(c);

    assert_int_equal(kvrt_cache_n_groups(NULL), 0);
    assert_int_equal(kvrt_layer_group(NULL, 0), -1);
}

/* DESIGN.md: "a Whisper decoder is a self-attention group plus a cross
 * group"; the header: layers of the same kind class and window share a page
 * table. */
static void test_groups_whisper(void **state)
{
    (void)state;
    kvrt_layer_desc whisper[8];
    int whisper_class[8];
    /* the self-attention layers share one group; each CROSS layer is a group
     * of its own, since its rows are set per layer (docs/layouts.md) */
    for (int l = 0; l < 8; l++) {
        whisper[l] = l % 2 ? cross(6, 64, 64) : attn(6, 64, 64, 0);
        whisper_class[l] = l % 2 ? 1 + l / 2 : 0;
    }
    kvrt_cache_desc d = sc_desc(whisper, 8, KVRT_F16, 16, 8, 2);
    d.cross_max_len = 1500;
    kvrt_cache *c;
    OK(kvrt_cache_create(&d, &c));
    expect_groups(c, whisper_class, 8, 5);
    kvrt_cache_destroy(c);
}

/* ======================================================================== */
/* Sliding windows                                                          */
/* ======================================================================== */

/* Decoding 1,000 tokens one at a time: after every plan the sequence holds
 * no more than ceil(window / block) + 1 blocks, exactly as many as the model
 * says (the blocks overlapping (p - window, p], at most `tight`), and the
 * rest are back in the pool. The pool holds ceil(window / block) + 1 blocks,
 * so a block that did not come back would fail a plan with CAPACITY. */
static void test_swa_ring_bound(void **state)
{
    (void)state;
    const int configs[][2] = {{32, 16}, {32, 8}, {20, 16}, {32, 32}, {5, 4}, {16, 64}, {33, 16}};
    for (unsigned ci = 0; ci < sizeof configs / sizeof configs[0]; ci++) {
        int window = configs[ci][0], bs = configs[ci][1];
        int bound = (window + bs - 1) / bs + 1;
        int tight = (window + bs - 2) / bs + 1;
        assert_true(tight <= bound);
        kvrt_layer_desc layers[2] = {attn(2, 16, 16, window), attn(1, 32, 16, window)};
        kvrt_cache_desc d = sc_desc(layers, 2, KVRT_F16, bs, bound, 1);
        kvrt_cache *c;
        kvrt_batch *b;
        OK(kvrt_cache_create(&d, &c));
        OK(kvrt_batch_create(c, 1, &b));
        assert_int_equal(kvrt_cache_n_groups(c), 1);
        sc_swa m;
        sc_swa_init(&m, window, bs);
        int most = 0;
        for (int p = 0; p < 1000; p++) {
            kvrt_status st = sc_step(c, b, 0, p, 1, tag_1);
            if (st != KVRT_OK)
                fail_msg("window %d block %d: position %d: %s (%s)", window, bs, p,
                         kvrt_status_name(st), kvrt_last_error());
            sc_swa_plan(&m, p, 1);
            kvrt_seq_group_info info;
            OK(kvrt_seq_group_info_get(c, 0, 0, &info));
            if (info.n_blocks > bound || info.n_blocks != sc_swa_blocks(&m))
                fail_msg("window %d block %d: position %d: %d blocks (bound %d, model %d)", window,
                         bs, p, info.n_blocks, bound, sc_swa_blocks(&m));
            if (info.n_blocks > most)
                most = info.n_blocks;
            assert_int_equal(info.evicted_max, m.emax);
            kvrt_cache_stats s;
            OK(kvrt_cache_stats_get(c, 0, &s));
            assert_int_equal(s.blocks_total, bound);
            assert_int_equal(s.blocks_used, info.n_blocks);
            assert_int_equal(s.blocks_free, bound - info.n_blocks);
            assert_int_equal(s.slots_live, m.hi - m.base + 1);
            if (p % 97 == 0 || p == 999) {
                sc_expect_range(c, 0, 0, m.base, m.hi, tag_1);
                sc_expect_range(c, 1, 0, m.base, m.hi, tag_1);
                OK(kvrt_cache_check(c));
            }
        }
        assert_int_equal(most, tight);
        /* the last token sees exactly the window */
        int32_t lo = 999 - window + 1;
        sc_expect_attention(c, b, 0, 4, 9, window, iota_pos + lo, tag_1);
        kvrt_batch_destroy(b);
        kvrt_cache_destroy(c);
    }
}

/* A pool with no free block: a plan whose window frees a block must be able
 * to use it in the same plan (the header: the plan frees the blocks that
 * left the window, then appends). Decode with window 5 / block 4 in a pool
 * of the 2 blocks it ever needs, and the configuration of the ring bound
 * (window 32, block 16, 3 blocks) prefilled in chunks of 16. */
static void test_swa_evict_into_full_pool(void **state)
{
    (void)state;
    const int configs[][4] = {/* window, block, pool, chunk */
                              {5, 4, 2, 1}, {17, 16, 2, 1}, {32, 16, 3, 16}, {32, 16, 3, 1}};
    for (unsigned ci = 0; ci < sizeof configs / sizeof configs[0]; ci++) {
        int window = configs[ci][0], bs = configs[ci][1], pool = configs[ci][2], chunk = configs[ci][3];
        kvrt_layer_desc layer = attn(1, 16, 16, window);
        kvrt_cache_desc d = sc_desc(&layer, 1, KVRT_F16, bs, pool, 1);
        kvrt_cache *c;
        kvrt_batch *b;
        OK(kvrt_cache_create(&d, &c));
        OK(kvrt_batch_create(c, chunk, &b));
        sc_swa m;
        sc_swa_init(&m, window, bs);
        for (int p = 0; p < 200; p += chunk) {
            kvrt_status st = sc_step(c, b, 0, p, chunk, tag_1);
            if (st != KVRT_OK)
                fail_msg("window %d block %d pool %d chunk %d: positions [%d, %d): %s (%s)", window,
                         bs, pool, chunk, p, p + chunk, kvrt_status_name(st), kvrt_last_error());
            sc_swa_plan(&m, p, chunk);
            assert_true(sc_swa_blocks(&m) <= pool);
        }
        sc_expect_range(c, 0, 0, m.base, m.hi, tag_1);
        OK(kvrt_cache_check(c));
        kvrt_batch_destroy(b);
        kvrt_cache_destroy(c);
    }
}

/* swa_full keeps every row (arbitrary rollback works), while attention still
 * sees only the window. */
static void test_swa_full(void **state)
{
    (void)state;
    kvrt_layer_desc layers[2] = {attn(2, 16, 16, 32), attn(2, 16, 16, 0)};
    kvrt_cache_desc d = sc_desc(layers, 2, KVRT_F16, 16, 32, 1);
    d.swa_full = 1;
    kvrt_cache *c;
    kvrt_batch *b;
    OK(kvrt_cache_create(&d, &c));
    OK(kvrt_batch_create(c, 4, &b));
    int gs = kvrt_layer_group(c, 0);
    for (int p = 0; p < 200; p++)
        OK(sc_step(c, b, 0, p, 1, tag_1));
    sc_expect_attention(c, b, 0, 4, 5, 32, iota_pos + 168, tag_1);
    sc_expect_attention(c, b, 1, 4, 5, 200, iota_pos, tag_1);
    kvrt_seq_group_info info;
    OK(kvrt_seq_group_info_get(c, 0, gs, &info));
    assert_int_equal(info.evicted_max, -1);
    assert_int_equal(info.n_blocks, 13);
    assert_int_equal(info.n_tokens, 200);
    sc_expect_range(c, 0, 0, 0, 199, tag_1);
    sc_expect_range(c, 1, 0, 0, 199, tag_1);
    for (int32_t p = 0; p <= 200; p += 10) {
        int ok = 0;
        OK(kvrt_seq_can_resume(c, 0, p, &ok));
        assert_int_equal(ok, 1);
    }
    /* roll back deep into what a window would have dropped, decode again */
    OK(kvrt_seq_rm(c, 0, 10, -1));
    OK(kvrt_cache_check(c));
    OK(kvrt_seq_group_info_get(c, 0, gs, &info));
    assert_int_equal(info.n_blocks, 1);
    for (int p = 10; p < 50; p++)
        OK(sc_step(c, b, 0, p, 1, tag_2 + p));
    uint32_t tags[50];
    for (int i = 0; i < 50; i++)
        tags[i] = i < 10 ? 1 : 2;
    sc_expect_range(c, 0, 0, 0, 49, tags);
    sc_expect_range(c, 1, 0, 0, 49, tags);
    sc_expect_attention(c, b, 0, 4, 5, 32, iota_pos + 18, tags + 18);
    kvrt_batch_destroy(b);
    kvrt_cache_destroy(c);
}

/* The resume query against the model, for two windows and a full layer, and
 * its agreement with planning. */
static void test_resume_query(void **state)
{
    (void)state;
    kvrt_layer_desc layers[3] = {attn(1, 16, 16, 32), attn(1, 16, 16, 40), attn(1, 16, 16, 0)};
    kvrt_cache_desc d = sc_desc(layers, 3, KVRT_F16, 16, 64, 4);
    kvrt_cache *c;
    kvrt_batch *b;
    OK(kvrt_cache_create(&d, &c));
    OK(kvrt_batch_create(c, 8, &b));
    assert_int_equal(kvrt_cache_n_groups(c), 3);
    int g32 = kvrt_layer_group(c, 0), g40 = kvrt_layer_group(c, 1);
    sc_swa m32[3], m40[3];
    for (int q = 0; q < 3; q++) {
        sc_swa_init(&m32[q], 32, 16);
        sc_swa_init(&m40[q], 40, 16);
        for (int p = 0; p < 100; p++) {
            OK(sc_step(c, b, q, p, 1, tag_1));
            sc_swa_plan(&m32[q], p, 1);
            sc_swa_plan(&m40[q], p, 1);
        }
    }
    /* at position 99 the 32-window dropped blocks up to 63, the 40-window up to 47 */
    assert_int_equal(m32[0].emax, 63);
    assert_int_equal(m40[0].emax, 47);
    kvrt_seq_group_info info;
    OK(kvrt_seq_group_info_get(c, 0, g32, &info));
    assert_int_equal(info.evicted_max, 63);
    OK(kvrt_seq_group_info_get(c, 0, g40, &info));
    assert_int_equal(info.evicted_max, 47);
    /* seq 2 loses its tail from 50: the 32-window's evicted rows above 49 are gone */
    OK(kvrt_seq_rm(c, 2, 50, -1));
    sc_swa_rm_tail(&m32[2], 50);
    sc_swa_rm_tail(&m40[2], 50);
    OK(kvrt_seq_group_info_get(c, 2, g32, &info));
    assert_int_equal(info.evicted_max, 49);
    /* seq 0: the 32-window decides (resume from 95); seq 2: the 40-window (from 87) */
    const int32_t from[3] = {95, 95, 87};
    for (int q = 0; q < 3; q += 2)
        for (int32_t p = 0; p < 300; p++) {
            int ok = -1;
            OK(kvrt_seq_can_resume(c, q, p, &ok));
            int want = sc_swa_can_resume(&m32[q], p) && sc_swa_can_resume(&m40[q], p);
            if (ok != want)
                fail_msg("seq %d: can_resume(%d): %d, expected %d", q, p, ok, want);
            assert_int_equal(want, p >= from[q]);
        }
    /* an empty sequence resumes anywhere */
    for (int32_t p = 0; p < 100; p += 33) {
        int ok = 0;
        OK(kvrt_seq_can_resume(c, 3, p, &ok));
        assert_int_equal(ok, 1);
    }
    int ok = -1;
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_seq_can_resume(c, 4, 0, &ok));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_seq_can_resume(c, 0, 0, NULL));
    EXPECT(KVRT_ERR_POS_RANGE, kvrt_seq_can_resume(c, 0, -1, &ok));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_seq_can_resume(NULL, 0, 0, &ok));

    /* the query agrees with planning: seq 0 rolls back to 96 and goes on */
    OK(kvrt_seq_rm(c, 0, 96, -1));
    sc_swa_rm_tail(&m32[0], 96);
    sc_swa_rm_tail(&m40[0], 96);
    OK(kvrt_seq_can_resume(c, 0, 96, &ok));
    assert_int_equal(ok, 1);
    for (int p = 96; p < 104; p++)
        OK(sc_step(c, b, 0, p, 1, tag_2 + p));
    uint32_t tags[104];
    for (int i = 0; i < 104; i++)
        tags[i] = i < 96 ? 1 : 2;
    sc_expect_range(c, 2, 0, 0, 103, tags);
    sc_expect_attention(c, b, 0, 2, 1, 32, iota_pos + 72, tags + 72);
    sc_expect_attention(c, b, 1, 2, 1, 40, iota_pos + 64, tags + 64);
    /* seq 1 rolls back to 90: the 32-window lost rows 59..63 that 90 needs */
    OK(kvrt_seq_rm(c, 1, 90, -1));
    sc_swa_rm_tail(&m32[1], 90);
    sc_swa_rm_tail(&m40[1], 90);
    OK(kvrt_seq_can_resume(c, 1, 90, &ok));
    assert_int_equal(ok, 0);
    assert_int_equal(sc_swa_can_resume(&m32[1], 90), 0);
    sc_snapshot before = sc_snap(c);
    EXPECT(KVRT_ERR_WINDOW_EVICTED, sc_step(c, b, 1, 90, 1, tag_3));
    sc_expect_unchanged(c, &before, "a plan into an evicted window");
    /* several sequences in one plan: one of them evicted, none changes */
    int32_t seqs[2] = {0, 1}, pos[2] = {104, 90};
    EXPECT(KVRT_ERR_WINDOW_EVICTED, kvrt_batch_plan(c, 2, seqs, pos, b));
    sc_expect_unchanged(c, &before, "a batch with one evicted sequence");
    sc_snap_free(&before);
    /* seq 2 resumes at 87 as the query said, and not at 86 */
    EXPECT(KVRT_ERR_WINDOW_EVICTED, sc_step(c, b, 2, 86, 1, tag_3));
    OK(sc_step(c, b, 2, 87, 1, tag_3));
    kvrt_batch_destroy(b);
    kvrt_cache_destroy(c);
}

/* Rows [lo, hi] of layer l (K not rotated: n_rot 0): the row now at p was
 * written at p + moved_by when p < moved_below, else at p; tag 1. */
static void expect_moved(const kvrt_cache *c, int l, int32_t lo, int32_t hi, int32_t moved_below,
                         int32_t moved_by)
{
    sc_rows r = sc_gather(c, l, 0, 0, -1);
    if (r.n != hi - lo + 1)
        fail_msg("layer %d: %lld rows, expected [%d, %d]", l, (long long)r.n, lo, hi);
    for (int64_t i = 0; i < r.n; i++) {
        int32_t p = lo + (int32_t)i, old = p < moved_below ? p + moved_by : p;
        assert_int_equal(r.pos[i], p);
        for (int64_t e = 0; e < r.kw; e++)
            if (r.k[i * r.kw + e] != sc_val(1, l + SC_K, old, e))
                fail_msg("layer %d position %d (written at %d): K[%lld] differs", l, p, old,
                         (long long)e);
        for (int64_t e = 0; e < r.vw; e++)
            if (r.v[i * r.vw + e] != sc_val(1, l + SC_V, old, e))
                fail_msg("layer %d position %d (written at %d): V[%lld] differs", l, p, old,
                         (long long)e);
    }
    sc_rows_free(&r);
}

/* The context shift on a sliding-window model: drop the first n positions,
 * move the rest down by n. What the window dropped moves down too, so
 * decoding goes on at the new end. */
static void test_swa_shift_left(void **state)
{
    (void)state;
    kvrt_layer_desc layers[2] = {attn(2, 16, 16, 32), attn(2, 16, 16, 0)};
    kvrt_cache_desc d = sc_desc(layers, 2, KVRT_F16, 16, 16, 1);
    kvrt_cache *c;
    kvrt_batch *b;
    OK(kvrt_cache_create(&d, &c));
    OK(kvrt_batch_create(c, 4, &b));
    int gs = kvrt_layer_group(c, 0);
    sc_swa m;
    sc_swa_init(&m, 32, 16);
    for (int p = 0; p < 100; p++) {
        OK(sc_step(c, b, 0, p, 1, tag_1));
        sc_swa_plan(&m, p, 1);
    }
    assert_int_equal(m.emax, 63);
    OK(kvrt_seq_rm(c, 0, 0, 20));
    OK(kvrt_seq_shift(c, 0, 20, -1, -20));
    sc_swa_shift_left(&m, 20);
    expect_moved(c, 0, 44, 79, 80, 20);
    expect_moved(c, 1, 0, 79, 80, 20);
    kvrt_seq_group_info info;
    OK(kvrt_seq_group_info_get(c, 0, gs, &info));
    assert_int_equal(info.pos_min, 44);
    assert_int_equal(info.pos_max, 79);
    /* a row above evicted_max that is not held would be a contradiction */
    if (info.evicted_max != m.emax)
        fail_msg("after the shift: evicted_max %d, expected %d (rows held from %d)",
                 info.evicted_max, m.emax, info.pos_min);
    int ok = -1;
    OK(kvrt_seq_can_resume(c, 0, 80, &ok));
    assert_int_equal(ok, sc_swa_can_resume(&m, 80));
    assert_int_equal(ok, 1);
    for (int p = 80; p < 150; p++) {
        kvrt_status st = sc_step(c, b, 0, p, 1, tag_1);
        if (st != KVRT_OK)
            fail_msg("decoding at %d after the shift: %s (%s)", p, kvrt_status_name(st),
                     kvrt_last_error());
        sc_swa_plan(&m, p, 1);
    }
    sc_expect_attention(c, b, 0, 4, 2, 32, iota_pos + 118, tag_1);
    expect_moved(c, 0, m.base, 149, 80, 20);
    OK(kvrt_cache_check(c));
    kvrt_batch_destroy(b);
    kvrt_cache_destroy(c);
}

/* mlx-lm's rotating cache showed stale rows after a trim. Here: decode past
 * the window, remove a tail, decode the same positions with other rows:
 * gather and attention see only the new rows, at every step. */
static void test_ring_rollback(void **state)
{
    (void)state;
    kvrt_layer_desc layers[2] = {attn(2, 16, 16, 32), attn(2, 16, 16, 0)};
    kvrt_cache_desc d = sc_desc(layers, 2, KVRT_F16, 16, 20, 1);
    kvrt_cache *c;
    kvrt_batch *b;
    OK(kvrt_cache_create(&d, &c));
    OK(kvrt_batch_create(c, 8, &b));
    int gs = kvrt_layer_group(c, 0);
    uint32_t tag_of[400];
    sc_swa m;
    sc_swa_init(&m, 32, 16);
    int32_t len = 0;
    /* (decode until, roll back to) */
    const int32_t plan[][2] = {{100, 96}, {120, 112}, {130, 127}, {200, 192}, {260, 255}, {300, 0}};
    uint32_t version = 1;
    for (unsigned r = 0; r < sizeof plan / sizeof plan[0]; r++) {
        for (; len < plan[r][0]; len++) {
            tag_of[len] = version;
            OK(sc_step(c, b, 0, len, 1, tag_of + len));
            sc_swa_plan(&m, len, 1);
            if (len % 5 == 0 || len + 1 == plan[r][0]) {
                int32_t lo = len - 31 > 0 ? len - 31 : 0;
                sc_expect_attention(c, b, 0, 4, version, len - lo + 1, iota_pos + lo, tag_of + lo);
                sc_expect_attention(c, b, 1, 4, version, len + 1, iota_pos, tag_of);
            }
        }
        sc_expect_swa(c, gs, 0, &m, (int[]){0}, 1, tag_of, len);
        sc_expect_range(c, 1, 0, 0, len - 1, tag_of);
        int32_t d0 = plan[r][1];
        OK(kvrt_seq_rm(c, 0, d0, -1));
        sc_swa_rm_tail(&m, d0);
        len = d0;
        version++;
        sc_expect_swa(c, gs, 0, &m, (int[]){0}, 1, tag_of, len);
        sc_expect_range(c, 1, 0, 0, len - 1, tag_of);
        int ok;
        OK(kvrt_seq_can_resume(c, 0, len, &ok));
        assert_int_equal(ok, sc_swa_can_resume(&m, len));
        assert_int_equal(ok, 1); /* every rollback above stays inside the window */
        OK(kvrt_cache_check(c));
    }
    kvrt_batch_destroy(b);
    kvrt_cache_destroy(c);
}

/* ======================================================================== */
/* MLA                                                                      */
/* ======================================================================== */

/* Rows of an MLA layer after a shift: the first latent_dim values bit-exact,
 * the last rope_dim rotated by delta (pairs by style, theta^(-2i/rope_dim)),
 * compared with a double rotation (bound as test_api's: 2^-20). */
static void expect_mla_shifted(const kvrt_cache *c, int l, int32_t seq, int64_t n,
                               const int32_t *new_pos, const int32_t *old_pos, const uint32_t *tags)
{
    const kvrt_cache_desc *d = kvrt_cache_get_desc(c);
    const kvrt_layer_desc *ld = &d->layers[l];
    int lat = ld->latent_dim, rd = ld->rope_dim;
    sc_rows r = sc_gather(c, l, seq, 0, -1);
    assert_int_equal(r.n, n);
    for (int64_t i = 0; i < n; i++) {
        assert_int_equal(r.pos[i], new_pos[i]);
        int32_t delta = new_pos[i] - old_pos[i];
        double x[2048];
        for (int e = 0; e < lat + rd; e++)
            x[e] = sc_val(tags[i], l + SC_K, old_pos[i], e);
        for (int p = 0; delta != 0 && p < rd / 2; p++) {
            int a = lat + (d->rope.style == KVRT_ROPE_NORMAL ? 2 * p : p);
            int bb = lat + (d->rope.style == KVRT_ROPE_NORMAL ? 2 * p + 1 : p + rd / 2);
            double ang = delta * (double)d->rope.freq_scale * pow((double)d->rope.theta, -2.0 * p / rd);
            double xa = x[a], xb = x[bb];
            x[a] = xa * cos(ang) - xb * sin(ang);
            x[bb] = xa * sin(ang) + xb * cos(ang);
        }
        for (int e = 0; e < lat + rd; e++) {
            float got = r.k[i * r.kw + e];
            int rotated = delta != 0 && e >= lat;
            if (rotated ? fabs(got - x[e]) > 0x1p-20 : got != (float)x[e])
                fail_msg("MLA layer %d pos %d (was %d) elem %d: %.9g, expected %.9g", l, new_pos[i],
                         old_pos[i], e, got, x[e]);
        }
    }
    sc_rows_free(&r);
}

static void test_mla(void **state)
{
    (void)state;
    kvrt_layer_desc layers[3] = {mla(512, 64), mla(512, 64), mla(512, 64)};
    assert_int_equal(kvrt_layer_row_bytes(&layers[0], KVRT_BF16), 1152);
    assert_int_equal(kvrt_layer_row_bytes(&layers[0], KVRT_F32), 2304);

    /* every dtype holds the test's values: write and gather are bit-exact */
    kvrt_dtype dtypes[3] = {KVRT_BF16, KVRT_F16, KVRT_F32};
    for (int di = 0; di < 3; di++) {
        kvrt_cache_desc d = sc_desc(layers, 3, dtypes[di], 16, 8, 1);
        kvrt_cache *c;
        kvrt_batch *b;
        OK(kvrt_cache_create(&d, &c));
        OK(kvrt_batch_create(c, 64, &b));
        OK(sc_step(c, b, 0, 0, 37, tag_1));
        OK(sc_step(c, b, 0, 37, 1, tag_1));
        for (int l = 0; l < 3; l++)
            sc_expect_self(c, l, 0, 38, iota_pos, tag_1);
        sc_expect_attention(c, b, 2, 16, 4, 38, iota_pos, tag_1);
        kvrt_batch_destroy(b);
        kvrt_cache_destroy(c);
    }

    for (int style = 0; style < 2; style++) {
        kvrt_cache_desc d = sc_desc(layers, 3, KVRT_F32, 16, 32, 3);
        d.rope.n_rot = 64;
        d.rope.theta = 10000.0f;
        d.rope.freq_scale = 1.0f;
        d.rope.style = (kvrt_rope_style)style;
        kvrt_cache *c;
        kvrt_batch *b;
        OK(kvrt_cache_create(&d, &c));
        OK(kvrt_batch_create(c, 64, &b));
        assert_int_equal(kvrt_cache_n_groups(c), 1);
        OK(sc_step(c, b, 0, 0, 41, tag_1));

        /* cp shares the three blocks */
        OK(kvrt_seq_cp(c, 0, 1, 0, -1));
        kvrt_cache_stats s;
        OK(kvrt_cache_stats_get(c, -1, &s));
        assert_int_equal(s.blocks_used, 3);
        assert_int_equal(s.blocks_shared, 3);
        for (int l = 0; l < 3; l++)
            sc_expect_self(c, l, 1, 41, iota_pos, tag_1);
        /* appending to the copy copies its partly used last block */
        OK(sc_step(c, b, 1, 41, 2, tag_2 + 41));
        OK(kvrt_cache_stats_get(c, -1, &s));
        assert_int_equal(s.blocks_shared, 2);
        uint32_t t1[64];
        for (int i = 0; i < 64; i++)
            t1[i] = i < 41 ? 1 : 2;
        for (int l = 0; l < 3; l++) {
            sc_expect_self(c, l, 0, 41, iota_pos, tag_1);
            sc_expect_self(c, l, 1, 43, iota_pos, t1);
        }
        /* rm in the middle of the copy: holes in a shared block, copied first */
        OK(kvrt_seq_rm(c, 1, 5, 12));
        int32_t p1[64];
        uint32_t tt1[64];
        int n1 = 0;
        for (int i = 0; i < 43; i++)
            if (i < 5 || i >= 12) {
                p1[n1] = i;
                tt1[n1++] = t1[i];
            }
        OK(kvrt_cache_stats_get(c, -1, &s));
        assert_int_equal(s.holes, 7);
        assert_int_equal(s.blocks_shared, 1);
        for (int l = 0; l < 3; l++) {
            sc_expect_self(c, l, 1, n1, p1, tt1);
            sc_expect_self(c, l, 0, 41, iota_pos, tag_1);
        }
        /* compact closes the holes that are not in shared blocks; rows stay */
        OK(kvrt_cache_compact(c));
        OK(kvrt_cache_stats_get(c, -1, &s));
        assert_int_equal(s.holes, 0);
        for (int l = 0; l < 3; l++) {
            sc_expect_self(c, l, 1, n1, p1, tt1);
            sc_expect_self(c, l, 0, 41, iota_pos, tag_1);
        }
        OK(kvrt_cache_check(c));

        /* shift-left of seq 0 while seq 2 shares its blocks */
        OK(kvrt_seq_cp(c, 0, 2, 0, -1));
        OK(kvrt_seq_rm(c, 0, 0, 10));
        OK(kvrt_seq_shift(c, 0, 10, -1, -10));
        int32_t oldp[64];
        for (int i = 0; i < 31; i++)
            oldp[i] = i + 10;
        for (int l = 0; l < 3; l++) {
            expect_mla_shifted(c, l, 0, 31, iota_pos, oldp, tag_1);
            sc_expect_self(c, l, 2, 41, iota_pos, tag_1);
        }
        /* a forward shift of part of seq 2 */
        OK(kvrt_seq_shift(c, 2, 30, -1, 1000));
        int32_t newp[64], old2[64];
        for (int i = 0; i < 41; i++) {
            old2[i] = i;
            newp[i] = i < 30 ? i : i + 1000;
        }
        for (int l = 0; l < 3; l++)
            expect_mla_shifted(c, l, 2, 41, newp, old2, tag_1);
        /* div of a sparse sequence: positions 4i become i */
        OK(kvrt_seq_rm(c, 2, -1, -1));
        int32_t sparse_seq[16], sparse_pos[16];
        for (int i = 0; i < 16; i++) {
            sparse_seq[i] = 2;
            sparse_pos[i] = 4 * i;
        }
        OK(kvrt_batch_plan(c, 16, sparse_seq, sparse_pos, b));
        OK(sc_write_all(c, b, 16, sparse_pos, tag_3));
        EXPECT(KVRT_ERR_POS_EXISTS, kvrt_seq_div(c, 2, 0, -1, 5));
        OK(kvrt_seq_div(c, 2, 0, -1, 4));
        for (int l = 0; l < 3; l++)
            expect_mla_shifted(c, l, 2, 16, iota_pos, sparse_pos, tag_3);
        OK(kvrt_cache_check(c));
        kvrt_batch_destroy(b);
        kvrt_cache_destroy(c);
    }
}

/* ======================================================================== */
/* CROSS                                                                    */
/* ======================================================================== */

static void test_cross(void **state)
{
    (void)state;
    kvrt_layer_desc layers[3] = {attn(2, 16, 16, 0), cross(2, 16, 8), cross(1, 32, 32)};
    kvrt_cache_desc d = sc_desc(layers, 3, KVRT_F16, 8, 16, 3);
    d.cross_max_len = 100;
    d.rope.n_rot = 8;
    kvrt_cache *c;
    kvrt_batch *b;
    OK(kvrt_cache_create(&d, &c));
    OK(kvrt_batch_create(c, 8, &b));
    int gx1 = kvrt_layer_group(c, 1), gx2 = kvrt_layer_group(c, 2);
    assert_int_not_equal(gx1, kvrt_layer_group(c, 0));
    assert_int_equal(kvrt_layer_row_bytes(&layers[1], KVRT_F16), 2 * (16 + 8) * 2);

    /* too long, or not a CROSS layer: refused, nothing changed */
    sc_snapshot before = sc_snap(c);
    EXPECT(KVRT_ERR_INVALID_ARG, sc_cross_set(c, 1, 0, 101, 1));
    assert_non_null(strstr(kvrt_last_error(), "cross_max_len"));
    sc_expect_unchanged(c, &before, "cross_set past cross_max_len");
    EXPECT(KVRT_ERR_INVALID_ARG, sc_cross_set(c, 0, 0, 10, 1));
    sc_expect_unchanged(c, &before, "cross_set on an ATTN layer");
    EXPECT(KVRT_ERR_INVALID_ARG, sc_cross_set(c, 1, 3, 10, 1));
    sc_snap_free(&before);

    OK(sc_cross_set(c, 1, 0, 60, 1));
    OK(sc_cross_set(c, 2, 0, 100, 2));
    sc_expect_cross(c, 1, 0, 60, 1);
    sc_expect_cross(c, 2, 0, 100, 2);
    int32_t hi;
    OK(kvrt_seq_pos_max(c, 0, &hi));
    assert_int_equal(hi, -1);
    /* a second cross_set replaces */
    OK(sc_cross_set(c, 1, 0, 40, 4));
    sc_expect_cross(c, 1, 0, 40, 4);
    OK(sc_step(c, b, 0, 0, 6, tag_1));
    OK(sc_step(c, b, 0, 6, 1, tag_1));
    uint32_t xt = 4;
    sc_expect_attention(c, b, 1, 4, 2, 40, NULL, &xt);
    xt = 2;
    sc_expect_attention(c, b, 2, 3, 2, 100, NULL, &xt);

    /* seq_cp shares the cross rows (seq 1 has held cross rows before: a
     * destination that never did is test_cross_cp_to_new_seq's case) */
    OK(sc_cross_set(c, 1, 1, 1, 0));
    OK(sc_cross_set(c, 2, 1, 1, 0));
    OK(kvrt_seq_rm(c, 1, -1, -1));
    OK(kvrt_seq_cp(c, 0, 1, 0, -1));
    kvrt_cache_stats s;
    OK(kvrt_cache_stats_get(c, gx1, &s));
    assert_int_equal(s.blocks_shared, 1);
    OK(kvrt_cache_stats_get(c, gx2, &s));
    assert_int_equal(s.blocks_shared, 1);
    sc_expect_cross(c, 1, 1, 40, 4);
    sc_expect_cross(c, 2, 1, 100, 2);
    /* setting the copy's layer gives it its own rows; the source keeps its own */
    OK(sc_cross_set(c, 1, 1, 30, 5));
    sc_expect_cross(c, 1, 1, 30, 5);
    sc_expect_cross(c, 1, 0, 40, 4);
    OK(kvrt_cache_stats_get(c, gx1, &s));
    assert_int_equal(s.blocks_shared, 0);
    OK(kvrt_cache_stats_get(c, gx2, &s));
    assert_int_equal(s.blocks_shared, 1);

    /* shift and div move positions, never cross rows */
    OK(kvrt_seq_shift(c, 0, 0, -1, 5));
    OK(kvrt_seq_shift(c, -1, 0, -1, 3));
    int32_t lo;
    OK(kvrt_seq_pos_min(c, 0, &lo));
    assert_int_equal(lo, 8);
    sc_expect_cross(c, 1, 0, 40, 4);
    sc_expect_cross(c, 2, 0, 100, 2);
    sc_expect_cross(c, 1, 1, 30, 5);
    int32_t sparse_seq[4] = {2, 2, 2, 2}, sparse_pos[4] = {0, 10, 20, 30};
    OK(kvrt_batch_plan(c, 4, sparse_seq, sparse_pos, b));
    OK(sc_write_all(c, b, 4, sparse_pos, tag_3));
    OK(sc_cross_set(c, 2, 2, 7, 6));
    OK(kvrt_seq_div(c, 2, 0, -1, 10));
    OK(kvrt_seq_div(c, -1, 0, -1, 1));
    sc_expect_cross(c, 2, 2, 7, 6);
    sc_expect_cross(c, 1, 2, 0, 0);
    OK(kvrt_seq_pos_max(c, 2, &hi));
    assert_int_equal(hi, 3);

    /* removing part of a sequence keeps its cross rows; removing all drops them */
    OK(kvrt_seq_rm(c, 0, 10, -1));
    sc_expect_cross(c, 1, 0, 40, 4);
    OK(kvrt_seq_rm(c, 0, -1, -1));
    sc_expect_cross(c, 1, 0, 0, 0);
    sc_expect_cross(c, 2, 0, 0, 0);
    sc_expect_cross(c, 2, 1, 100, 2); /* the copy still holds the shared rows */
    OK(kvrt_cache_stats_get(c, gx2, &s));
    assert_int_equal(s.blocks_shared, 0);
    assert_int_equal(s.blocks_used, 2);
    OK(kvrt_seq_rm(c, 1, 0, -1));
    sc_expect_cross(c, 1, 1, 0, 0);
    sc_expect_cross(c, 2, 1, 0, 0);
    OK(kvrt_cache_stats_get(c, gx2, &s));
    assert_int_equal(s.blocks_used, 1);
    OK(kvrt_cache_check(c));

    /* a sequence with cross rows and no tokens is removed whole as well */
    OK(sc_cross_set(c, 1, 1, 9, 7));
    OK(kvrt_seq_rm(c, 1, -1, -1));
    sc_expect_cross(c, 1, 1, 0, 0);

    /* keep drops every other sequence's cross rows; clear empties everything */
    OK(sc_cross_set(c, 1, 0, 11, 8));
    OK(kvrt_seq_keep(c, 0));
    sc_expect_cross(c, 2, 2, 0, 0);
    sc_expect_cross(c, 1, 0, 11, 8);
    OK(sc_cross_set(c, 2, 1, 12, 9));
    OK(kvrt_cache_clear(c));
    sc_expect_fresh(c, "clear with cross rows");
    kvrt_batch_destroy(b);
    kvrt_cache_destroy(c);
}

/* seq_cp from a sequence with cross rows into one that never had any:
 * the copy shares the rows. */
static void test_cross_cp_to_new_seq(void **state)
{
    (void)state;
    kvrt_layer_desc layers[2] = {attn(1, 16, 16, 0), cross(1, 16, 16)};
    kvrt_cache_desc d = sc_desc(layers, 2, KVRT_F16, 16, 4, 2);
    d.cross_max_len = 8;
    kvrt_cache *c;
    kvrt_batch *b;
    OK(kvrt_cache_create(&d, &c));
    OK(kvrt_batch_create(c, 4, &b));
    OK(sc_cross_set(c, 1, 0, 8, 1));
    OK(sc_step(c, b, 0, 0, 3, tag_1));
    OK(kvrt_seq_cp(c, 0, 1, 0, -1));
    sc_expect_cross(c, 1, 1, 8, 1);
    sc_expect_self(c, 0, 1, 3, iota_pos, tag_1);
    kvrt_cache_stats s;
    OK(kvrt_cache_stats_get(c, kvrt_layer_group(c, 1), &s));
    assert_int_equal(s.blocks_shared, 1);
    OK(kvrt_cache_check(c));
    kvrt_batch_destroy(b);
    kvrt_cache_destroy(c);
}

/* ======================================================================== */
/* Descriptions mixing fields of different kinds                            */
/* ======================================================================== */

typedef struct bad_layer {
    kvrt_layer_desc layer;
    const char     *field;
} bad_layer;

static const bad_layer bad_layers[] = {
    {{KVRT_LAYER_MLA, 8, 0, 0, 0, 512, 64}, "n_kv_heads"},
    {{KVRT_LAYER_MLA, 0, 64, 0, 0, 512, 64}, "head_dim_k"},
    {{KVRT_LAYER_MLA, 0, 0, 64, 0, 512, 64}, "head_dim_v"},
    {{KVRT_LAYER_MLA, 0, 0, 0, 32, 512, 64}, "window"},
    {{KVRT_LAYER_MLA, 0, 0, 0, 0, 0, 64}, "latent_dim"},
    {{KVRT_LAYER_MLA, 0, 0, 0, 0, 512, 63}, "rope_dim"},
    {{KVRT_LAYER_CROSS, 2, 64, 64, 4, 0, 0}, "window"},
    {{KVRT_LAYER_CROSS, 2, 64, 64, 0, 512, 0}, "latent_dim"},
    {{KVRT_LAYER_CROSS, 2, 64, 64, 0, 0, 64}, "rope_dim"},
    {{KVRT_LAYER_ATTN, 2, 64, 64, 0, 512, 0}, "latent_dim"},
    {{KVRT_LAYER_ATTN, 2, 64, 64, 0, 0, 64}, "rope_dim"},
    {{KVRT_LAYER_ATTN, 0, 64, 64, 0, 0, 0}, "n_kv_heads"},
    {{(kvrt_layer_kind)7, 2, 64, 64, 0, 0, 0}, "kind"},
};

static void test_bad_layers(void **state)
{
    (void)state;
    for (unsigned i = 0; i < sizeof bad_layers / sizeof bad_layers[0]; i++) {
        kvrt_layer_desc layers[3] = {attn(2, 64, 64, 0), bad_layers[i].layer, cross(2, 64, 64)};
        kvrt_cache_desc d = sc_desc(layers, 3, KVRT_F16, 16, 8, 1);
        d.cross_max_len = 16;
        kvrt_cache *c = (kvrt_cache *)0x1;
        kvrt_status st = kvrt_cache_create(&d, &c);
        if (st != KVRT_ERR_INVALID_ARG)
            fail_msg("case %u (%s): %s, expected KVRT_ERR_INVALID_ARG", i, bad_layers[i].field,
                     kvrt_status_name(st));
        assert_null(c);
        const char *msg = kvrt_last_error();
        if (strstr(msg, bad_layers[i].field) == NULL || strstr(msg, "layer 1") == NULL)
            fail_msg("case %u: message '%s' does not name layer 1 and %s", i, msg,
                     bad_layers[i].field);
    }
    /* the same layers are fine where they belong */
    kvrt_layer_desc good[3] = {mla(512, 64), cross(2, 64, 64), attn(2, 64, 64, 32)};
    kvrt_cache_desc d = sc_desc(good, 3, KVRT_F16, 16, 8, 1);
    d.cross_max_len = 16;
    kvrt_cache *c;
    OK(kvrt_cache_create(&d, &c));
    kvrt_cache_destroy(c);
    /* a CROSS layer needs cross_max_len */
    d.cross_max_len = 0;
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_cache_create(&d, &c));
    assert_non_null(strstr(kvrt_last_error(), "cross_max_len"));
}

/* kvrt_layer_row_bytes: the one size every reader and writer uses (seed 003):
 * the documented formula for valid layers, 0 for a description the cache
 * refuses. */
static void test_row_bytes(void **state)
{
    (void)state;
    kvrt_layer_desc a = attn(8, 128, 64, 0), m = mla(512, 64), x = cross(6, 64, 64);
    assert_int_equal(kvrt_layer_row_bytes(&a, KVRT_F16), 8 * (128 + 64) * 2);
    assert_int_equal(kvrt_layer_row_bytes(&a, KVRT_F32), 8 * (128 + 64) * 4);
    assert_int_equal(kvrt_layer_row_bytes(&m, KVRT_BF16), (512 + 64) * 2);
    assert_int_equal(kvrt_layer_row_bytes(&x, KVRT_F16), 6 * 128 * 2);
    assert_int_equal(kvrt_layer_row_bytes(NULL, KVRT_F16), 0);
    assert_int_equal(kvrt_layer_row_bytes(&a, (kvrt_dtype)9), 0);
    int wrong = 0;
    for (unsigned i = 0; i < sizeof bad_layers / sizeof bad_layers[0]; i++) {
        size_t got = kvrt_layer_row_bytes(&bad_layers[i].layer, KVRT_F16);
        if (got != 0) {
            print_error("invalid layer %u (bad %s) has row size %zu, expected 0\n", i,
                        bad_layers[i].field, got);
            wrong++;
        }
    }
    assert_int_equal(wrong, 0);
}

/* An optional argument selects cases by name (cmocka's filter pattern). */
int main(int argc, char **argv)
{
    if (argc > 1)
        cmocka_set_test_filter(argv[1]);
    int st = sc_backend_init();
    if (st != 0)
        return st;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_groups),         cmocka_unit_test(test_groups_whisper),
        cmocka_unit_test(test_swa_ring_bound), cmocka_unit_test(test_swa_evict_into_full_pool),
        cmocka_unit_test(test_swa_full),
        cmocka_unit_test(test_resume_query),   cmocka_unit_test(test_ring_rollback),
        cmocka_unit_test(test_swa_shift_left),
        cmocka_unit_test(test_mla),            cmocka_unit_test(test_cross),
        cmocka_unit_test(test_cross_cp_to_new_seq),
        cmocka_unit_test(test_bad_layers),     cmocka_unit_test(test_row_bytes),
    };
    st = cmocka_run_group_tests(tests, setup_tables, NULL);
    sc_backend_fini();
    return st;
}
