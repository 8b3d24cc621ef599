/*
 * test_harden.c: misuse that once got through: state, offload and queries
 * through a shared handle; a failed kvrt_state_save_file leaves the file
 * system as it was; non-finite RoPE parameters; readers that deliver a few
 * bytes at a time and inputs that go on after a state; messages that name
 * the function that failed; edits of blocks that every sharer edits alike;
 * shared handles' own layers freed with their handle.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "state_test.h"

static cache_opts opts(kvrt_dtype dtype, int block_size, int n_blocks, int max_seqs)
{
    cache_opts o = {dtype, block_size, n_blocks, 0, max_seqs, 16, 0};
    return o;
}

static int state_supported(void)
{
    kvrt_cache *c = make_cache(LAYOUT_ATTN, opts(KVRT_F16, 16, 4, 1));
    uint64_t bytes = 0;
    kvrt_status st = kvrt_state_size(c, 0, &bytes);
    kvrt_cache_destroy(c);
    return st != KVRT_ERR_UNSUPPORTED;
}

#define REQUIRE_STATE()                                                                        \
    do {                                                                                       \
        if (!state_supported())                                                                \
            skip();                                                                            \
    } while (0)

/* The message of the last failure starts with fn and ": ". */
#define EXPECT_IN(fn, status, expr)                                                            \
    do {                                                                                       \
        EXPECT(status, expr);                                                                  \
        if (strncmp(kvrt_last_error(), fn ": ", strlen(fn) + 2) != 0)                          \
            fail_msg("%s: message \"%s\" does not start with \"%s: \"", #expr,                 \
                     kvrt_last_error(), fn);                                                   \
    } while (0)

static const kvrt_layer_desc base_attn = {KVRT_LAYER_ATTN, 2, 8, 8, 0, 0, 0};
static const kvrt_layer_desc own_attn = {KVRT_LAYER_ATTN, 1, 8, 8, 0, 0, 0};

/* The setting: one ATTN layer, max_seqs 2, block_size 4, 8 blocks. */
static kvrt_cache *small_base(void)
{
    return make_cache_layers(&base_attn, 1, opts(KVRT_F32, 4, 8, 2));
}

/* A handle on base naming its layer 0, plus one own layer when own. */
static kvrt_cache *make_draft(kvrt_cache *base, int own)
{
    kvrt_layer_desc dl[2] = {base_attn, own_attn};
    int bl[2] = {0, -1};
    kvrt_cache_desc dd = *kvrt_cache_get_desc(base);
    dd.layers = dl;
    dd.n_layers = own ? 2 : 1;
    kvrt_cache *draft = NULL;
    OK(kvrt_cache_create_shared(base, &dd, bl, &draft));
    return draft;
}

/* seq's rows of one layer (K then V, cache dtype) and positions. */
static blob layer_rows(const kvrt_cache *c, int layer, int32_t seq)
{
    const kvrt_cache_desc *d = kvrt_cache_get_desc(c);
    kvrt_seq_group_info info;
    OK(kvrt_seq_group_info_get(c, seq, kvrt_layer_group(c, layer), &info));
    size_t es = kvrt_dtype_size(d->dtype);
    size_t kb = layer_k_elems(&d->layers[layer]) * es, vb = layer_v_elems(&d->layers[layer]) * es;
    int64_t n = info.n_tokens, got = -1;
    uint8_t *k = malloc((size_t)n * kb + 1), *v = malloc((size_t)n * vb + 1);
    int32_t *pos = malloc((size_t)n * sizeof(int32_t) + 4);
    OK(kvrt_gather(c, layer, seq, 0, -1, k, v, pos, n, &got, NULL));
    assert_int_equal(got, n);
    blob b = {0};
    blob_put(&b, pos, (size_t)n * sizeof(int32_t));
    blob_put(&b, k, (size_t)n * kb);
    blob_put(&b, v, (size_t)n * vb);
    free(k);
    free(v);
    free(pos);
    return b;
}

static int all_zero_after(const blob *b, size_t from)
{
    for (size_t i = from; i < b->size; i++)
        if (b->data[i] != 0)
            return 0;
    return 1;
}

static void temp_path(char *buf, size_t n, const char *name)
{
    const char *dir = getenv("TMPDIR");
    snprintf(buf, n, "%s/kvrt_harden_%d_%s", dir != NULL ? dir : "/tmp", (int)getpid(), name);
}

/* ---- 1. state, offload and queries through a shared handle ---- */

static void shared_round(int own, int destroy_base_first)
{
    kvrt_cache *base = small_base();
    kvrt_cache *draft = make_draft(base, own);
    /* every sequence empty */
    blob empty = save_state(draft, -1);
    blob empty_base = save_state(base, -1);
    assert_same_blob(&empty, &empty_base, "empty states through the draft and the base");
    fill_seq(draft, 0, 0, 2, 1, 5); /* the plan: sequence 0, positions 0 and 1 */
    fill_seq(draft, 1, 0, 7, 2, 6);
    blob rows0 = layer_rows(base, 0, 0), rows1 = layer_rows(base, 0, 1);
    blob st_all = save_state(base, -1), st0 = save_state(base, 0);
    if (destroy_base_first) {
        kvrt_cache_destroy(base);
        base = NULL;
    }
    uint64_t size = 0;
    OK(kvrt_state_size(draft, 0, &size));
    assert_int_equal(size, st0.size);
    OK(kvrt_state_size(draft, -1, &size));
    assert_int_equal(size, st_all.size);
    blob d_all = save_state(draft, -1), d0 = save_state(draft, 0);
    assert_same_blob(&d_all, &st_all, "states of every sequence through the draft and the base");
    assert_same_blob(&d0, &st0, "states of sequence 0 through the draft and the base");
    /* files through the draft load into a plain cache of base's description */
    char path[256];
    temp_path(path, sizeof path, "shared.kvrt");
    OK(kvrt_state_save_file(draft, -1, path));
    kvrt_cache *plain = small_base();
    OK(kvrt_state_load_file(plain, -1, path));
    blob p0 = layer_rows(plain, 0, 0), p1 = layer_rows(plain, 0, 1);
    assert_same_blob(&p0, &rows0, "sequence 0 loaded from the draft's file");
    assert_same_blob(&p1, &rows1, "sequence 1 loaded from the draft's file");
    /* and back into the draft */
    OK(kvrt_seq_rm(draft, -1, 0, -1));
    OK(kvrt_state_load_file(draft, -1, path));
    blob q0 = layer_rows(draft, 0, 0);
    assert_same_blob(&q0, &rows0, "sequence 0 loaded through the draft");
    OK(kvrt_seq_rm(draft, -1, 0, -1));
    OK(load_state(draft, 0, d0.data, d0.size));
    blob r0 = layer_rows(draft, 0, 0);
    assert_same_blob(&r0, &rows0, "sequence 0 read through the draft");
    /* offload through the draft, restore into sequence 1 through the draft */
    OK(kvrt_seq_rm(draft, 1, 0, -1));
    kvrt_offload *off = NULL;
    OK(kvrt_seq_offload(draft, 0, &off));
    int64_t n = -1;
    OK(kvrt_seq_n_tokens(draft, 0, &n));
    assert_int_equal(n, 0);
    OK(kvrt_seq_restore(draft, 1, off));
    OK(kvrt_seq_n_tokens(draft, 1, &n));
    assert_int_equal(n, 2);
    blob back = layer_rows(draft, 0, 1);
    assert_same_blob(&back, &rows0, "sequence 0 restored into sequence 1 through the draft");
    if (own) { /* the state holds base's layers: the own layer's rows are zero */
        blob mine = layer_rows(draft, 1, 1);
        assert_int_equal(mine.size, 2 * sizeof(int32_t) + 2 * 16 * sizeof(float));
        assert_true(all_zero_after(&mine, 2 * sizeof(int32_t)));
        blob_free(&mine);
    }
    int32_t pmax = -1;
    OK(kvrt_seq_pos_max(draft, 1, &pmax));
    assert_int_equal(pmax, 1);
    OK(kvrt_cache_check(draft));
    kvrt_offload_free(off);
    remove(path);
    blob *all[] = {&empty, &empty_base, &rows0, &rows1, &st_all, &st0, &d_all, &d0, &p0, &p1, &q0, &r0, &back};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        blob_free(all[i]);
    kvrt_cache_destroy(plain);
    kvrt_cache_destroy(draft);
    kvrt_cache_destroy(base);
}

static void test_shared_state_offload(void **state)
{
    (void)state;
    REQUIRE_STATE();
    for (int own = 0; own < 2; own++)
        for (int first = 0; first < 2; first++)
            shared_round(own, first);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_shared_state_offload),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
