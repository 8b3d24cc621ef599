/* Host offload: a sequence leaves the cache for host memory and comes back
 * bit-exactly, into its own id or another, while other sequences are left
 * alone; a restore without room fails with nothing changed and the offload
 * kept. */
#include "state_test.h"

static cache_opts opts(kvrt_dtype dtype, int block_size, int n_blocks, int max_seqs)
{
    cache_opts o = {dtype, block_size, n_blocks, 0, max_seqs, 512, 0};
    return o;
}

static int offload_supported(void)
{
    kvrt_cache *c = make_cache(LAYOUT_ATTN, opts(KVRT_F16, 16, 4, 1));
    kvrt_offload *off = NULL;
    kvrt_status st = kvrt_seq_offload(c, 0, &off);
    kvrt_offload_free(off);
    kvrt_cache_destroy(c);
    return st != KVRT_ERR_UNSUPPORTED;
}

#define REQUIRE_OFFLOAD()                                                                      \
    do {                                                                                       \
        if (!offload_supported())                                                              \
            skip();                                                                            \
    } while (0)

static void seq_is_empty(const kvrt_cache *c, int32_t seq)
{
    for (int g = 0; g < kvrt_cache_n_groups(c); g++) {
        kvrt_seq_group_info info;
        OK(kvrt_seq_group_info_get(c, seq, g, &info));
        assert_int_equal(info.n_blocks, 0);
        assert_int_equal(info.n_tokens, 0);
        assert_int_equal(info.evicted_max, -1);
    }
}

static void test_offload_roundtrip(void **state)
{
    (void)state;
    REQUIRE_OFFLOAD();
    const kvrt_dtype dtypes[3] = {KVRT_F32, KVRT_F16, KVRT_BF16};
    for (int layout = 0; layout < N_LAYOUTS; layout++)
        for (int di = 0; di < 3; di++) {
            kvrt_cache *c = make_cache(layout, opts(dtypes[di], 16, 1500, 4));
            fill_seq(c, 0, 0, 4000, 1, 1);
            fill_cross(c, 0, 30, 1);
            OK(kvrt_seq_cp(c, 0, 1, 0, -1)); /* seq 1 shares seq 0's blocks */
            fill_seq(c, 1, 4000, 4500, 1, 2);
            OK(kvrt_seq_rm(c, 1, 10, 20));
            blob seq0 = {0}, seq1 = {0};
            snap_seq(c, 0, &seq0);
            snap_seq(c, 1, &seq1);
            uint64_t bytes = 0;
            OK(kvrt_state_size(c, 1, &bytes));
            kvrt_cache_stats before, after;
            OK(kvrt_cache_stats_get(c, -1, &before));

            kvrt_offload *off = NULL;
            OK(kvrt_seq_offload(c, 1, &off));
            assert_non_null(off);
            assert_int_equal(kvrt_offload_bytes(off), bytes);
            seq_is_empty(c, 1);
            OK(kvrt_cache_check(c));
            OK(kvrt_cache_stats_get(c, -1, &after));
            assert_true(after.blocks_free > before.blocks_free);
            assert_true(after.blocks_shared < before.blocks_shared || before.blocks_shared == 0);

            OK(kvrt_seq_restore(c, 1, off));
            OK(kvrt_cache_check(c));
            blob x = {0};
            snap_seq(c, 1, &x);
            assert_same_blob(&seq1, &x, "restored sequence 1");
            /* the offload is kept: once more, into another id */
            OK(kvrt_seq_restore(c, 3, off));
            blob y = {0};
            snap_seq(c, 3, &y);
            assert_same_blob(&seq1, &y, "sequence 1 restored into sequence 3");
            blob z = {0};
            snap_seq(c, 0, &z);
            assert_same_blob(&seq0, &z, "sequence 0");
            EXPECT(KVRT_ERR_INVALID_ARG, kvrt_seq_restore(c, 3, off)); /* not empty */

            /* and into another cache of the same description and block size 64 */
            kvrt_cache *other = make_cache(layout, opts(dtypes[di], 64, 200, 2));
            OK(kvrt_seq_restore(other, 0, off));
            assert_same_seq(c, 1, other, 0);

            kvrt_offload_free(off);
            blob_free(&seq0);
            blob_free(&seq1);
            blob_free(&x);
            blob_free(&y);
            blob_free(&z);
            kvrt_cache_destroy(c);
            kvrt_cache_destroy(other);
        }
}

/* A restore without room: KVRT_ERR_CAPACITY, nothing changed, the offload
 * still restores once room is made. */
static void test_offload_capacity(void **state)
{
    (void)state;
    REQUIRE_OFFLOAD();
    kvrt_cache *c = make_cache(LAYOUT_MIXED, opts(KVRT_F16, 16, 300, 3));
    fill_seq(c, 0, 0, 4000, 1, 1);
    fill_cross(c, 0, 300, 1);
    blob seq0 = {0};
    snap_seq(c, 0, &seq0);
    kvrt_offload *off = NULL;
    OK(kvrt_seq_offload(c, 0, &off));
    seq_is_empty(c, 0);
    fill_seq(c, 1, 0, 4000, 1, 2); /* takes the blocks back */

    blob before = {0}, after = {0};
    snap_cache(c, &before);
    EXPECT(KVRT_ERR_CAPACITY, kvrt_seq_restore(c, 0, off));
    snap_cache(c, &after);
    assert_same_blob(&before, &after, "cache contents");
    OK(kvrt_cache_check(c));

    OK(kvrt_seq_rm(c, 1, 0, -1));
    OK(kvrt_seq_restore(c, 2, off));
    blob x = {0};
    snap_seq(c, 2, &x);
    assert_same_blob(&seq0, &x, "restored sequence");
    OK(kvrt_cache_check(c));

    /* an incompatible cache refuses it, naming the field */
    kvrt_layer_desc layers[8];
    int n = layout_layers(LAYOUT_MIXED, layers);
    layers[2].latent_dim = 48;
    kvrt_cache *other = make_cache_layers(layers, n, opts(KVRT_F16, 16, 300, 1));
    EXPECT(KVRT_ERR_INCOMPATIBLE, kvrt_seq_restore(other, 0, off));
    assert_non_null(strstr(kvrt_last_error(), "layer 2: latent_dim 32 in file, 48 in cache"));

    kvrt_offload_free(off);
    blob_free(&seq0);
    blob_free(&before);
    blob_free(&after);
    blob_free(&x);
    kvrt_cache_destroy(c);
    kvrt_cache_destroy(other);
}

/* Empty sequences, arguments. */
static void test_offload_edges(void **state)
{
    (void)state;
    REQUIRE_OFFLOAD();
    kvrt_cache *c = make_cache(LAYOUT_MIXED, opts(KVRT_F16, 16, 100, 2));
    kvrt_offload *off = NULL;
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_seq_offload(c, 0, NULL));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_seq_offload(NULL, 0, &off));
    assert_null(off);
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_seq_offload(c, 2, &off));
    assert_null(off);
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_seq_restore(c, 0, NULL));
    assert_int_equal(kvrt_offload_bytes(NULL), 0);
    kvrt_offload_free(NULL);

    OK(kvrt_seq_offload(c, 1, &off)); /* an empty sequence */
    assert_true(kvrt_offload_bytes(off) > 0);
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_seq_restore(c, 5, off));
    OK(kvrt_seq_restore(c, 0, off));
    seq_is_empty(c, 0);
    kvrt_offload_free(off);

    /* a cross-only sequence */
    fill_cross(c, 1, 40, 3);
    blob s1 = {0};
    snap_seq(c, 1, &s1);
    OK(kvrt_seq_offload(c, 1, &off));
    seq_is_empty(c, 1);
    OK(kvrt_seq_restore(c, 1, off));
    blob x = {0};
    snap_seq(c, 1, &x);
    assert_same_blob(&s1, &x, "cross rows");
    kvrt_offload_free(off);
    blob_free(&s1);
    blob_free(&x);
    kvrt_cache_destroy(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_offload_roundtrip),
        cmocka_unit_test(test_offload_capacity),
        cmocka_unit_test(test_offload_edges),
    };
    return cmocka_run_group_tests_name("offload", tests, NULL, NULL);
}
