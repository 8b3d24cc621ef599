/*
 * test_prefix.c: automatic prefix caching on the CPU backend: hits and the
 * rows they attach, cached blocks and eviction under memory pressure,
 * salts, unwritten plans, edits dropping keys, sliding windows, both hashes,
 * and bad input changing nothing. Expected rows come from test_value of
 * the position that wrote them, never from the library.
 */
#include "common.h"

enum { DIM = 8 };

static kvrt_layer_desc attn(int window)
{
    kvrt_layer_desc l;
    memset(&l, 0, sizeof l);
    l.kind = KVRT_LAYER_ATTN;
    l.n_kv_heads = 1;
    l.head_dim_k = l.head_dim_v = DIM;
    l.window = window;
    return l;
}

static kvrt_layer_desc layers_full[2], layers_swa[2];

static kvrt_cache *make(kvrt_layer_desc *layers, int n_layers, int block_size, int n_blocks,
                        int hash)
{
    kvrt_cache_desc d = test_desc(layers, n_layers, KVRT_F32, block_size, n_blocks, 4);
    d.prefix_cache = hash;
    kvrt_cache *c = NULL;
    OK(kvrt_cache_create(&d, &c));
    return c;
}

/* The prompt: token i is 1000 + i (prompt 0) or 5000 + i (others). */
static int32_t prompt[64], other[64];

static void init_prompts(void)
{
    for (int i = 0; i < 64; i++) {
        prompt[i] = 1000 + i;
        other[i] = 5000 + i;
    }
}

/* Plans seq:[p0, p0 + n) with tokens[p0..] and writes test_value rows of
 * the position to layers [0, n_write) (all when n_write < 0). */
static void step_tokens(kvrt_cache *c, kvrt_batch *b, int32_t seq, int32_t p0, int n,
                        const int32_t *tokens, int n_write)
{
    const kvrt_cache_desc *d = kvrt_cache_get_desc(c);
    int32_t seqs[64], pos[64];
    for (int i = 0; i < n; i++) {
        seqs[i] = seq;
        pos[i] = p0 + i;
    }
    if (tokens != NULL)
        OK(kvrt_batch_plan_tokens(c, n, seqs, pos, tokens + p0, n, b));
    else
        OK(kvrt_batch_plan(c, n, seqs, pos, b));
    float k[64 * DIM], v[64 * DIM];
    for (int l = 0; l < d->n_layers && (n_write < 0 || l < n_write); l++) {
        for (int i = 0; i < n; i++)
            for (int e = 0; e < DIM; e++) {
                k[i * DIM + e] = test_value(l, pos[i], e);
                v[i * DIM + e] = test_value(l + 1000, pos[i], e);
            }
        OK(kvrt_write(c, b, l, k, v, KVRT_F32, NULL));
    }
}

/* seq holds positions [p0, p1) in layer l with the rows step_tokens wrote. */
static void expect_rows(kvrt_cache *c, int l, int32_t seq, int32_t p0, int32_t p1)
{
    float k[64 * DIM], v[64 * DIM];
    int32_t pos[64];
    int64_t got;
    OK(kvrt_gather(c, l, seq, 0, -1, k, v, pos, 64, &got, NULL));
    assert_int_equal(got, p1 - p0);
    for (int64_t i = 0; i < got; i++) {
        assert_int_equal(pos[i], p0 + i);
        for (int e = 0; e < DIM; e++) {
            assert_true(k[i * DIM + e] == test_value(l, pos[i], e));
            assert_true(v[i * DIM + e] == test_value(l + 1000, pos[i], e));
        }
    }
}

static kvrt_prefix_stats pstats(kvrt_cache *c)
{
    kvrt_prefix_stats s;
    OK(kvrt_prefix_stats_get(c, &s));
    return s;
}

static kvrt_cache_stats cstats(kvrt_cache *c)
{
    kvrt_cache_stats s;
    OK(kvrt_cache_stats_get(c, -1, &s));
    return s;
}

static void hit_and_chain(int hash)
{
    kvrt_cache *c = make(layers_full, 2, 4, 16, hash);
    kvrt_batch *b;
    OK(kvrt_batch_create(c, 64, &b));
    step_tokens(c, b, 0, 0, 10, prompt, -1);
    int32_t covered = -1;
    OK(kvrt_seq_attach_prefix(c, 1, prompt, 10, NULL, 0, &covered));
    assert_int_equal(covered, 8); /* two full blocks of four */
    for (int l = 0; l < 2; l++)
        expect_rows(c, l, 1, 0, 8);
    assert_int_equal(cstats(c).blocks_shared, 2);
    /* seq 1 continues its chain; seq 2 then finds four blocks */
    step_tokens(c, b, 1, 8, 8, prompt, -1);
    OK(kvrt_seq_attach_prefix(c, 2, prompt, 17, NULL, 0, &covered));
    assert_int_equal(covered, 16);
    expect_rows(c, 0, 2, 0, 16);
    OK(kvrt_seq_attach_prefix(c, 3, other, 17, NULL, 0, &covered));
    assert_int_equal(covered, 0);
    kvrt_prefix_stats s = pstats(c);
    assert_int_equal(s.lookups, 3);
    assert_int_equal(s.hits, 2);
    assert_int_equal(s.misses, 1);
    assert_int_equal(s.tokens_queried, 10 + 17 + 17);
    assert_int_equal(s.tokens_served, 24);
    assert_int_equal(s.blocks_keyed, 4);
    OK(kvrt_cache_check(c));
    kvrt_batch_destroy(b);
    kvrt_cache_destroy(c);
}

static void test_hit_blake2b(void **state)
{
    (void)state;
    hit_and_chain(KVRT_PREFIX_BLAKE2B);
}

static void test_hit_xxh3(void **state)
{
    (void)state;
    hit_and_chain(KVRT_PREFIX_XXH3);
}

static void test_cached_and_evicted(void **state)
{
    (void)state;
    kvrt_cache *c = make(layers_full, 2, 4, 8, KVRT_PREFIX_BLAKE2B);
    kvrt_batch *b;
    OK(kvrt_batch_create(c, 64, &b));
    step_tokens(c, b, 0, 0, 16, prompt, -1);
    OK(kvrt_seq_rm(c, 0, 0, -1)); /* the request ends: its blocks stay cached */
    kvrt_cache_stats cs = cstats(c);
    assert_int_equal(cs.blocks_cached, 4);
    assert_int_equal(cs.blocks_free + cs.blocks_used + cs.blocks_cached, cs.blocks_total);
    int32_t covered;
    OK(kvrt_seq_attach_prefix(c, 1, prompt, 16, NULL, 0, &covered));
    assert_int_equal(covered, 16);
    expect_rows(c, 1, 1, 0, 16);
    assert_int_equal(cstats(c).blocks_cached, 0);
    OK(kvrt_seq_rm(c, 1, 0, -1));
    /* the whole pool for another sequence: the cached blocks are evicted,
     * the plan does not fail */
    step_tokens(c, b, 2, 0, 32, NULL, -1);
    assert_int_equal(pstats(c).evictions, 4);
    assert_int_equal(cstats(c).blocks_cached, 0);
    assert_int_equal(pstats(c).blocks_keyed, 0);
    expect_rows(c, 0, 2, 0, 32);
    OK(kvrt_seq_attach_prefix(c, 1, prompt, 16, NULL, 0, &covered));
    assert_int_equal(covered, 0);
    int32_t seq = 3, pos = 32;
    EXPECT(KVRT_ERR_CAPACITY, kvrt_batch_plan(c, 1, &seq, &pos, b));
    OK(kvrt_cache_check(c));
    kvrt_batch_destroy(b);
    kvrt_cache_destroy(c);
}

/* Leaves go first: a chain's last block is evicted before its first. */
static void test_leaves_first(void **state)
{
    (void)state;
    kvrt_cache *c = make(layers_full, 1, 4, 8, KVRT_PREFIX_XXH3);
    kvrt_batch *b;
    OK(kvrt_batch_create(c, 64, &b));
    step_tokens(c, b, 0, 0, 16, prompt, -1);
    OK(kvrt_seq_rm(c, 0, 0, -1));
    step_tokens(c, b, 1, 0, 20, NULL, -1); /* five blocks: one cached block evicted */
    assert_int_equal(pstats(c).evictions, 1);
    int32_t covered;
    OK(kvrt_seq_attach_prefix(c, 2, prompt, 16, NULL, 0, &covered));
    assert_int_equal(covered, 12);
    expect_rows(c, 0, 2, 0, 12);
    kvrt_batch_destroy(b);
    kvrt_cache_destroy(c);
}

static void test_salts(void **state)
{
    (void)state;
    kvrt_cache *c = make(layers_full, 2, 4, 16, KVRT_PREFIX_XXH3);
    kvrt_batch *b;
    OK(kvrt_batch_create(c, 64, &b));
    int32_t covered;
    OK(kvrt_seq_attach_prefix(c, 0, prompt, 12, "tenant-a", 8, &covered));
    assert_int_equal(covered, 0);
    step_tokens(c, b, 0, 0, 12, prompt, -1);
    OK(kvrt_seq_attach_prefix(c, 1, prompt, 12, "tenant-b", 8, &covered));
    assert_int_equal(covered, 0);
    OK(kvrt_seq_attach_prefix(c, 2, prompt, 12, NULL, 0, &covered));
    assert_int_equal(covered, 0);
    OK(kvrt_seq_attach_prefix(c, 3, prompt, 12, "tenant-a", 8, &covered));
    assert_int_equal(covered, 12);
    expect_rows(c, 0, 3, 0, 12);
    kvrt_batch_destroy(b);
    kvrt_cache_destroy(c);
}

/* Keys are published only when every layer of the group was written. */
static void test_unwritten(void **state)
{
    (void)state;
    kvrt_cache *c = make(layers_full, 2, 4, 16, KVRT_PREFIX_BLAKE2B);
    kvrt_batch *b;
    OK(kvrt_batch_create(c, 64, &b));
    step_tokens(c, b, 0, 0, 8, prompt, 1); /* layer 1 never written */
    int32_t covered;
    OK(kvrt_seq_attach_prefix(c, 1, prompt, 8, NULL, 0, &covered));
    assert_int_equal(covered, 0);
    /* the chain stopped: later blocks of seq 0 get no key either */
    step_tokens(c, b, 0, 8, 8, prompt, -1);
    assert_int_equal(pstats(c).blocks_keyed, 0);
    kvrt_batch_destroy(b);
    kvrt_cache_destroy(c);
}

static void test_edits_drop_keys(void **state)
{
    (void)state;
    kvrt_cache *c = make(layers_full, 2, 4, 16, KVRT_PREFIX_BLAKE2B);
    kvrt_batch *b;
    OK(kvrt_batch_create(c, 64, &b));
    step_tokens(c, b, 0, 0, 16, prompt, -1);
    assert_int_equal(pstats(c).blocks_keyed, 4);
    OK(kvrt_seq_rm(c, 0, 5, 6)); /* a partial removal: block 1's key goes */
    assert_int_equal(pstats(c).blocks_keyed, 3);
    int32_t covered;
    OK(kvrt_seq_attach_prefix(c, 1, prompt, 16, NULL, 0, &covered));
    assert_int_equal(covered, 4);
    OK(kvrt_seq_shift(c, 0, 0, -1, 3)); /* every row moves */
    assert_int_equal(pstats(c).blocks_keyed, 1); /* seq 1's shared copy of block 0 keeps it */
    OK(kvrt_seq_rm(c, 1, 0, -1));
    OK(kvrt_cache_compact(c));
    OK(kvrt_cache_check(c));
    OK(kvrt_cache_clear(c));
    kvrt_cache_stats cs = cstats(c);
    assert_int_equal(cs.blocks_cached, 0);
    assert_int_equal(pstats(c).blocks_keyed, 0);
    assert_int_equal(cs.blocks_free, cs.blocks_total);
    OK(kvrt_cache_check(c));
    kvrt_batch_destroy(b);
    kvrt_cache_destroy(c);
}

static void test_sliding_window(void **state)
{
    (void)state;
    kvrt_cache *c = make(layers_swa, 2, 4, 32, KVRT_PREFIX_BLAKE2B);
    kvrt_batch *b;
    OK(kvrt_batch_create(c, 64, &b));
    step_tokens(c, b, 0, 0, 16, prompt, -1);
    int32_t covered;
    OK(kvrt_seq_attach_prefix(c, 1, prompt, 16, NULL, 0, &covered));
    assert_int_equal(covered, 16);
    expect_rows(c, 0, 1, 0, 16);
    expect_rows(c, 1, 1, 12, 16); /* window 4: the last block only */
    int ok = 0;
    OK(kvrt_seq_can_resume(c, 1, 16, &ok));
    assert_int_equal(ok, 1);
    OK(kvrt_seq_can_resume(c, 1, 8, &ok));
    assert_int_equal(ok, 0);
    step_tokens(c, b, 1, 16, 1, prompt, -1); /* decoding resumes */
    OK(kvrt_cache_check(c));
    kvrt_batch_destroy(b);
    kvrt_cache_destroy(c);
}

/* Bad input: a status, a message naming the call, and nothing changed. */
static void test_bad_input(void **state)
{
    (void)state;
    kvrt_cache *off = make(layers_full, 2, 4, 16, KVRT_PREFIX_OFF);
    kvrt_batch *b;
    OK(kvrt_batch_create(off, 8, &b));
    int32_t covered = 7, seq = 0, pos = 0, tok = 1;
    kvrt_prefix_stats ps;
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_seq_attach_prefix(off, 0, prompt, 8, NULL, 0, &covered));
    assert_non_null(strstr(kvrt_last_error(), "kvrt_seq_attach_prefix"));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_batch_plan_tokens(off, 1, &seq, &pos, &tok, 1, b));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_prefix_stats_get(off, &ps));
    assert_int_equal(covered, 7);
    assert_int_equal(cstats(off).blocks_used, 0);
    kvrt_batch_destroy(b);
    kvrt_cache_destroy(off);

    kvrt_cache_desc d = test_desc(layers_full, 2, KVRT_F32, 4, 16, 4);
    d.prefix_cache = 3;
    kvrt_cache *c = NULL;
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_cache_create(&d, &c));
    assert_null(c);

    c = make(layers_full, 2, 4, 16, KVRT_PREFIX_BLAKE2B);
    OK(kvrt_batch_create(c, 8, &b));
    step_tokens(c, b, 0, 0, 8, prompt, -1);
    kvrt_cache_stats before = cstats(c);
    kvrt_prefix_stats pbefore = pstats(c);
    static char long_salt[KVRT_PREFIX_SALT_MAX + 1];
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_seq_attach_prefix(c, 1, NULL, 8, NULL, 0, &covered));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_seq_attach_prefix(c, 1, prompt, -1, NULL, 0, &covered));
    EXPECT(KVRT_ERR_INVALID_ARG,
           kvrt_seq_attach_prefix(c, 1, prompt, 8, long_salt, KVRT_PREFIX_SALT_MAX + 1, &covered));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_seq_attach_prefix(c, 1, prompt, 8, long_salt, -1, &covered));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_seq_attach_prefix(c, 1, prompt, 8, NULL, 4, &covered));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_seq_attach_prefix(c, 0, prompt, 8, NULL, 0, &covered));
    assert_non_null(strstr(kvrt_last_error(), "not empty"));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_seq_attach_prefix(c, 1, prompt, 8, NULL, 0, NULL));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_seq_attach_prefix(c, 9, prompt, 8, NULL, 0, &covered));
    seq = 1;
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_batch_plan_tokens(c, 1, &seq, &pos, NULL, 1, b));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_batch_plan_tokens(c, 1, &seq, &pos, &tok, 0, b));
    assert_non_null(strstr(kvrt_last_error(), "kvrt_batch_plan_tokens"));
    int32_t bad_pos = -3; /* refused by the planning itself: the message still names this call */
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_batch_plan_tokens(c, 1, &seq, &bad_pos, &tok, 1, b));
    assert_true(strncmp(kvrt_last_error(), "kvrt_batch_plan_tokens: ", 24) == 0);
    assert_int_equal(covered, 7);
    kvrt_cache_stats after = cstats(c);
    kvrt_prefix_stats pafter = pstats(c);
    assert_memory_equal(&before, &after, sizeof before);
    assert_memory_equal(&pbefore, &pafter, sizeof pbefore);
    expect_rows(c, 0, 0, 0, 8);
    OK(kvrt_cache_check(c));
    kvrt_batch_destroy(b);
    kvrt_cache_destroy(c);
}

int main(void)
{
    layers_full[0] = layers_full[1] = attn(0);
    layers_swa[0] = attn(0);
    layers_swa[1] = attn(4);
    init_prompts();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hit_blake2b),     cmocka_unit_test(test_hit_xxh3),
        cmocka_unit_test(test_cached_and_evicted), cmocka_unit_test(test_leaves_first),
        cmocka_unit_test(test_salts),           cmocka_unit_test(test_unwritten),
        cmocka_unit_test(test_edits_drop_keys), cmocka_unit_test(test_sliding_window),
        cmocka_unit_test(test_bad_input),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
