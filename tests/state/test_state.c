/* State files: round trips on every layout and dtype at 8k+ tokens across
 * block sizes, whole caches, edited caches (holes, shifts, shared prefixes),
 * other sequence ids, seed 003 (MLA 512 + 64, 9,000 tokens, file size by
 * the documented formula), incompatible descriptions, truncated and
 * corrupted files, capacity, and argument errors. */
#include <sys/stat.h>
#include <unistd.h>

#include "state_test.h"

#if defined(KVRT_HAVE_XXHASH)
#  include <xxhash.h>
#endif

static const kvrt_dtype all_dtypes[3] = {KVRT_F32, KVRT_F16, KVRT_BF16};

static cache_opts opts(kvrt_dtype dtype, int block_size, int n_blocks, int max_seqs)
{
    cache_opts o = {dtype, block_size, n_blocks, 0, max_seqs, 2048, 0};
    return o;
}

static int layout_has(int layout, kvrt_layer_kind kind, int window)
{
    kvrt_layer_desc layers[8];
    int n = layout_layers(layout, layers);
    for (int i = 0; i < n; i++)
        if (layers[i].kind == kind && (window < 0 || layers[i].window == window))
            return 1;
    return 0;
}

static uint64_t le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

/* Offsets of every section frame of an image, then its size. */
static int section_offsets(const blob *b, uint64_t *out, int cap)
{
    int n = 0;
    uint64_t at = 8;
    while (at + 16 <= b->size && n < cap) {
        out[n++] = at;
        at += 24 + le64(b->data + at + 8);
    }
    assert_int_equal(at, b->size);
    return n;
}

static size_t head_section_end(const kvrt_cache *c)
{
    return 8 + 24 + 56 + 40 * (size_t)kvrt_cache_get_desc(c)->n_layers;
}

static void write_file(const char *path, const void *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

static void temp_path(char *buf, size_t n, const char *name)
{
    snprintf(buf, n, "%s/kvrt_state_test_%ld_%s", P_tmpdir, (long)getpid(), name);
}

static int skip_without_state(void)
{
    uint64_t n;
    kvrt_cache *c = make_cache(LAYOUT_ATTN, opts(KVRT_F16, 16, 4, 1));
    kvrt_status st = kvrt_state_size(c, -1, &n);
    kvrt_cache_destroy(c);
    return st == KVRT_ERR_UNSUPPORTED;
}

#define REQUIRE_STATE()                                                                        \
    do {                                                                                       \
        if (skip_without_state())                                                              \
            skip();                                                                            \
    } while (0)

/* ---- round trips ---- */

/* Every layout and dtype, 8,300 tokens: block size 16 -> 64 -> 16. */
static void test_roundtrip_layouts(void **state)
{
    (void)state;
    REQUIRE_STATE();
    const int64_t n_tokens = 8300;
    for (int layout = 0; layout < N_LAYOUTS; layout++)
        for (int di = 0; di < 3; di++) {
            kvrt_dtype dt = all_dtypes[di];
            uint32_t salt = (uint32_t)(layout * 10 + di);
            kvrt_cache *src = make_cache(layout, opts(dt, 16, 560, 2));
            fill_seq(src, 0, 0, n_tokens, 1, salt);
            if (layout_has(layout, KVRT_LAYER_CROSS, -1))
                fill_cross(src, 0, 1500, salt);
            blob a = save_state(src, 0);
            int32_t seq0 = 0;
            assert_int_equal(a.size, formula_size(src, &seq0, 1));

            kvrt_cache *dst = make_cache(layout, opts(dt, 64, 140, 2));
            OK(load_state(dst, 0, a.data, a.size));
            OK(kvrt_cache_check(dst));
            assert_same_seq(src, 0, dst, 0);
            for (int32_t p = 0; p <= n_tokens + 200; p += 277) {
                int ok_src = -1, ok_dst = -2;
                OK(kvrt_seq_can_resume(src, 0, p, &ok_src));
                OK(kvrt_seq_can_resume(dst, 0, p, &ok_dst));
                assert_int_equal(ok_src, ok_dst);
            }
            if (layout_has(layout, KVRT_LAYER_ATTN, 96)) { /* the window dropped rows */
                kvrt_seq_group_info info;
                OK(kvrt_seq_group_info_get(dst, 0, kvrt_layer_group(dst, 1), &info));
                assert_true(info.n_tokens < n_tokens && info.evicted_max >= 0);
            }

            blob b = save_state(dst, 0);
            assert_int_equal(b.size, a.size);
            /* only the header's block_size (and its checksum) tell them apart */
            size_t h = head_section_end(src);
            assert_memory_equal(a.data + h, b.data + h, a.size - h);
            kvrt_cache *back = make_cache(layout, opts(dt, 16, 560, 2));
            OK(load_state(back, 1, b.data, b.size));
            assert_same_seq(src, 0, back, 1);
            OK(kvrt_cache_check(back));

            blob_free(&a);
            blob_free(&b);
            kvrt_cache_destroy(src);
            kvrt_cache_destroy(dst);
            kvrt_cache_destroy(back);
        }
}

/* seq < 0: every sequence that holds anything, cross-only ones included. */
static void test_whole_cache(void **state)
{
    (void)state;
    REQUIRE_STATE();
    kvrt_cache *src = make_cache(LAYOUT_MIXED, opts(KVRT_F16, 16, 1000, 5));
    fill_seq(src, 0, 0, 9000, 1, 1);
    fill_seq(src, 1, 100, 3000, 3, 2); /* positions 100, 103, ... */
    fill_cross(src, 1, 100, 2);
    fill_cross(src, 3, 50, 3);
    blob a = save_state(src, -1);
    const int32_t seqs[3] = {0, 1, 3};
    assert_int_equal(a.size, formula_size(src, seqs, 3));

    kvrt_cache *dst = make_cache(LAYOUT_MIXED, opts(KVRT_F16, 32, 400, 5));
    OK(load_state(dst, -1, a.data, a.size));
    OK(kvrt_cache_check(dst));
    for (int32_t s = 0; s < 5; s++)
        assert_same_seq(src, s, dst, s);
    kvrt_cache_stats x, y;
    OK(kvrt_cache_stats_get(src, -1, &x));
    OK(kvrt_cache_stats_get(dst, -1, &y));
    assert_int_equal(x.slots_live, y.slots_live);
    assert_int_equal(y.holes, 0);

    /* an empty cache writes a state of no sequence, which loads as nothing */
    kvrt_cache *empty = make_cache(LAYOUT_MIXED, opts(KVRT_F16, 16, 8, 2));
    blob e = save_state(empty, -1);
    assert_int_equal(e.size, formula_size(empty, NULL, 0));
    blob before = {0}, after = {0};
    snap_cache(dst, &before);
    OK(load_state(dst, -1, e.data, e.size));
    snap_cache(dst, &after);
    assert_same_blob(&before, &after, "cache contents");

    blob_free(&a);
    blob_free(&e);
    blob_free(&before);
    blob_free(&after);
    kvrt_cache_destroy(src);
    kvrt_cache_destroy(dst);
    kvrt_cache_destroy(empty);
}

/* Holes, shifts and a prefix shared through seq_cp: each sequence is written
 * in full and reloads as private blocks; compaction changes no byte. */
static void test_after_edits(void **state)
{
    (void)state;
    REQUIRE_STATE();
    for (int di = 0; di < 3; di++) {
        kvrt_cache *src = make_cache(LAYOUT_MIXED, opts(all_dtypes[di], 16, 1200, 3));
        fill_seq(src, 0, 0, 3000, 1, 11);
        fill_cross(src, 0, 64, 11);
        OK(kvrt_seq_cp(src, 0, 1, 0, -1));
        fill_seq(src, 0, 3000, 6000, 1, 12);
        fill_seq(src, 1, 3000, 500, 1, 13);
        kvrt_cache_stats st;
        OK(kvrt_cache_stats_get(src, -1, &st));
        assert_true(st.blocks_shared > 0);
        OK(kvrt_seq_rm(src, 0, 100, 200));
        OK(kvrt_seq_rm(src, 0, 8950, 8960));
        OK(kvrt_seq_shift(src, 1, 1000, -1, 50));
        OK(kvrt_seq_rm(src, 1, 0, 7));
        OK(kvrt_cache_stats_get(src, -1, &st));
        assert_true(st.holes > 0);
        assert_true(st.blocks_shared > 0);
        OK(kvrt_cache_check(src));

        blob a = save_state(src, -1);
        const int32_t seqs[2] = {0, 1};
        assert_int_equal(a.size, formula_size(src, seqs, 2));
        kvrt_cache *dst = make_cache(LAYOUT_MIXED, opts(all_dtypes[di], 64, 400, 3));
        OK(load_state(dst, -1, a.data, a.size));
        OK(kvrt_cache_check(dst));
        assert_same_seq(src, 0, dst, 0);
        assert_same_seq(src, 1, dst, 1);
        kvrt_cache_stats ds;
        OK(kvrt_cache_stats_get(dst, -1, &ds));
        assert_int_equal(ds.blocks_shared, 0);
        assert_int_equal(ds.holes, 0);

        /* the state does not depend on where slots are */
        OK(kvrt_cache_compact(src));
        blob b = save_state(src, -1);
        assert_int_equal(a.size, b.size);
        assert_memory_equal(a.data, b.data, a.size);

        /* one sequence of the shared pair */
        blob one = save_state(src, 1);
        kvrt_cache *solo = make_cache(LAYOUT_MIXED, opts(all_dtypes[di], 16, 400, 1));
        OK(load_state(solo, 0, one.data, one.size));
        assert_same_seq(src, 1, solo, 0);

        blob_free(&a);
        blob_free(&b);
        blob_free(&one);
        kvrt_cache_destroy(src);
        kvrt_cache_destroy(dst);
        kvrt_cache_destroy(solo);
    }
}

/* A sequence loads into another id; destinations must be empty. */
static void test_other_sequence(void **state)
{
    (void)state;
    REQUIRE_STATE();
    kvrt_cache *c = make_cache(LAYOUT_MIXED, opts(KVRT_F16, 16, 400, 8));
    fill_seq(c, 2, 0, 1000, 1, 5);
    fill_cross(c, 2, 10, 5);
    blob a = save_state(c, 2);
    OK(load_state(c, 5, a.data, a.size));
    assert_same_seq(c, 2, c, 5);
    OK(kvrt_cache_check(c));

    blob before = {0}, after = {0};
    snap_cache(c, &before);
    EXPECT(KVRT_ERR_INVALID_ARG, load_state(c, 5, a.data, a.size)); /* not empty */
    assert_non_null(strstr(kvrt_last_error(), "not empty"));
    EXPECT(KVRT_ERR_INVALID_ARG, load_state(c, -1, a.data, a.size)); /* seq 2 is taken */
    EXPECT(KVRT_ERR_INVALID_ARG, load_state(c, 8, a.data, a.size));
    blob two = save_state(c, -1);
    EXPECT(KVRT_ERR_INVALID_ARG, load_state(c, 1, two.data, two.size)); /* two sequences */
    assert_non_null(strstr(kvrt_last_error(), "2 sequences"));
    snap_cache(c, &after);
    assert_same_blob(&before, &after, "cache contents");

    /* an id the destination does not have */
    kvrt_cache *small = make_cache(LAYOUT_MIXED, opts(KVRT_F16, 16, 400, 2));
    EXPECT(KVRT_ERR_INVALID_ARG, load_state(small, -1, a.data, a.size));
    OK(load_state(small, 1, a.data, a.size));
    assert_same_seq(c, 2, small, 1);

    /* an empty sequence round-trips as empty */
    blob e = save_state(c, 7);
    OK(load_state(small, 0, e.data, e.size));
    int64_t n = -1;
    OK(kvrt_seq_n_tokens(small, 0, &n));
    assert_int_equal(n, 0);

    blob_free(&a);
    blob_free(&two);
    blob_free(&e);
    blob_free(&before);
    blob_free(&after);
    kvrt_cache_destroy(c);
    kvrt_cache_destroy(small);
}

/* Seed 003: an MLA cache (latent 512 + rope 64) of 9,000 tokens saved to a
 * file of exactly the documented size and restored bit-exactly. */
static void test_seed003_mla(void **state)
{
    (void)state;
    REQUIRE_STATE();
    const kvrt_layer_desc mla = {KVRT_LAYER_MLA, 0, 0, 0, 0, 512, 64};
    cache_opts o = opts(KVRT_F16, 16, 600, 1);
    kvrt_cache *src = make_cache_layers(&mla, 1, o);
    assert_int_equal(kvrt_layer_row_bytes(&mla, KVRT_F16), 1152);
    fill_seq(src, 0, 0, 9000, 1, 3);
    char path[256];
    temp_path(path, sizeof path, "seed003.kvst");
    OK(kvrt_state_save_file(src, 0, path));
    struct stat sb;
    assert_int_equal(stat(path, &sb), 0);
    int32_t seq0 = 0;
    uint64_t size = 0;
    OK(kvrt_state_size(src, 0, &size));
    assert_int_equal((uint64_t)sb.st_size, 10404256u); /* docs/state-format.md's example */
    assert_int_equal((uint64_t)sb.st_size, formula_size(src, &seq0, 1));
    assert_int_equal((uint64_t)sb.st_size, size);

    cache_opts o64 = opts(KVRT_F16, 64, 150, 1);
    kvrt_cache *dst = make_cache_layers(&mla, 1, o64);
    OK(kvrt_state_load_file(dst, 0, path));
    assert_same_seq(src, 0, dst, 0);
    OK(kvrt_cache_check(dst));
    remove(path);

    /* three MLA layers, bf16: the formula again */
    const kvrt_layer_desc mla3[3] = {mla, mla, mla};
    cache_opts ob = opts(KVRT_BF16, 32, 300, 1);
    kvrt_cache *three = make_cache_layers(mla3, 3, ob);
    fill_seq(three, 0, 0, 9000, 1, 4);
    blob b = save_state(three, 0);
    assert_int_equal(b.size, formula_size(three, &seq0, 1));
    assert_int_equal(b.size, 8 + 24 + 56 + 3 * 40 + 24 + 8 + 16 + 4 * 9000 + 3 * (48 + 9000 * 1152) + 32);
    kvrt_cache *three_back = make_cache_layers(mla3, 3, opts(KVRT_BF16, 1, 9000, 1));
    OK(load_state(three_back, 0, b.data, b.size));
    assert_same_seq(three, 0, three_back, 0);

    blob_free(&b);
    kvrt_cache_destroy(src);
    kvrt_cache_destroy(dst);
    kvrt_cache_destroy(three);
    kvrt_cache_destroy(three_back);
}

/* ---- incompatible descriptions ---- */

typedef struct variant {
    const char *expect;      /* substring of the message; NULL: loads */
    void (*apply)(kvrt_cache_desc *d, kvrt_layer_desc *layers);
} variant;

static void v_dtype(kvrt_cache_desc *d, kvrt_layer_desc *l) { (void)l; d->dtype = KVRT_F32; }
static void v_n_layers(kvrt_cache_desc *d, kvrt_layer_desc *l) { (void)l; d->n_layers = 3; }
static void v_kind(kvrt_cache_desc *d, kvrt_layer_desc *l)
{
    (void)d;
    l[0] = (kvrt_layer_desc){KVRT_LAYER_MLA, 0, 0, 0, 0, 32, 16};
}
static void v_heads(kvrt_cache_desc *d, kvrt_layer_desc *l) { (void)d; l[0].n_kv_heads = 4; }
static void v_dim_k(kvrt_cache_desc *d, kvrt_layer_desc *l) { (void)d; l[0].head_dim_k = 24; }
static void v_dim_v(kvrt_cache_desc *d, kvrt_layer_desc *l) { (void)d; l[0].head_dim_v = 16; }
static void v_window(kvrt_cache_desc *d, kvrt_layer_desc *l) { (void)d; l[1].window = 128; }
static void v_latent(kvrt_cache_desc *d, kvrt_layer_desc *l) { (void)d; l[2].latent_dim = 40; }
static void v_rope_dim(kvrt_cache_desc *d, kvrt_layer_desc *l) { (void)d; l[2].rope_dim = 8; }
static void v_cross_heads(kvrt_cache_desc *d, kvrt_layer_desc *l) { (void)d; l[3].n_kv_heads = 1; }
static void v_n_rot(kvrt_cache_desc *d, kvrt_layer_desc *l) { (void)l; d->rope.n_rot = 4; }
static void v_theta(kvrt_cache_desc *d, kvrt_layer_desc *l) { (void)l; d->rope.theta = 500000.0f; }
static void v_freq(kvrt_cache_desc *d, kvrt_layer_desc *l) { (void)l; d->rope.freq_scale = 0.5f; }
static void v_style(kvrt_cache_desc *d, kvrt_layer_desc *l) { (void)l; d->rope.style = KVRT_ROPE_NEOX; }
static void v_block(kvrt_cache_desc *d, kvrt_layer_desc *l) { (void)l; d->block_size = 128; }
static void v_seqs(kvrt_cache_desc *d, kvrt_layer_desc *l) { (void)l; d->max_seqs = 3; }
static void v_swa_full(kvrt_cache_desc *d, kvrt_layer_desc *l) { (void)l; d->swa_full = 1; }
static void v_cross_len(kvrt_cache_desc *d, kvrt_layer_desc *l) { (void)l; d->cross_max_len = 4096; }
static void v_growth(kvrt_cache_desc *d, kvrt_layer_desc *l) { (void)l; d->n_blocks = 10; d->max_blocks = 500; }

static kvrt_cache_desc base_desc(kvrt_layer_desc *layers)
{
    int n = layout_layers(LAYOUT_MIXED, layers);
    kvrt_cache_desc d;
    kvrt_cache_desc_init(&d);
    d.dtype = KVRT_F16;
    d.layers = layers;
    d.n_layers = n;
    d.block_size = 16;
    d.n_blocks = 200;
    d.max_seqs = 2;
    d.cross_max_len = 2048;
    d.rope.n_rot = 8;
    return d;
}

#if defined(KVRT_HAVE_XXHASH)
/* Rewrites a u32 of the HEAD payload and its checksum, as a writer of
 * another version would. */
static void patch_head_u32(blob *b, size_t field, uint32_t value)
{
    uint8_t *frame = b->data + 8;
    uint64_t size = le64(frame + 8);
    for (int i = 0; i < 4; i++)
        frame[16 + field + (size_t)i] = (uint8_t)(value >> (8 * i));
    uint64_t sum = XXH3_64bits(frame, 16 + size);
    for (int i = 0; i < 8; i++)
        frame[16 + size + (size_t)i] = (uint8_t)(sum >> (8 * i));
}
#endif

static void test_incompatible(void **state)
{
    (void)state;
    REQUIRE_STATE();
    kvrt_layer_desc layers[8];
    kvrt_cache_desc d = base_desc(layers);
    kvrt_cache *src = NULL;
    OK(kvrt_cache_create(&d, &src));
    fill_seq(src, 0, 0, 700, 1, 9);
    fill_cross(src, 0, 20, 9);
    blob a = save_state(src, 0);
    const variant variants[] = {
        {"dtype f16 in file, f32 in cache", v_dtype},
        {"n_layers 4 in file, 3 in cache", v_n_layers},
        {"layer 0: kind ATTN in file, MLA in cache", v_kind},
        {"layer 0: n_kv_heads 2 in file, 4 in cache", v_heads},
        {"layer 0: head_dim_k 16 in file, 24 in cache", v_dim_k},
        {"layer 0: head_dim_v 8 in file, 16 in cache", v_dim_v},
        {"layer 1: window 96 in file, 128 in cache", v_window},
        {"layer 2: latent_dim 32 in file, 40 in cache", v_latent},
        {"layer 2: rope_dim 16 in file, 8 in cache", v_rope_dim},
        {"layer 3: n_kv_heads 2 in file, 1 in cache", v_cross_heads},
        {"rope.n_rot 8 in file, 4 in cache", v_n_rot},
        {"rope.theta 10000 in file, 500000 in cache", v_theta},
        {"rope.freq_scale 1 in file, 0.5 in cache", v_freq},
        {"rope.style normal in file, neox in cache", v_style},
        {NULL, v_block},
        {NULL, v_seqs},
        {"swa_full 1 in cache, but sequence 0 lacks rows that layer 1's sliding window dropped",
         v_swa_full},
        {NULL, v_cross_len},
        {NULL, v_growth},
    };
    for (size_t i = 0; i < sizeof variants / sizeof variants[0]; i++) {
        kvrt_layer_desc vl[8];
        kvrt_cache_desc vd = base_desc(vl);
        variants[i].apply(&vd, vl);
        kvrt_cache *dst = NULL;
        OK(kvrt_cache_create(&vd, &dst));
        blob before = {0}, after = {0};
        snap_cache(dst, &before);
        kvrt_status st = load_state(dst, 0, a.data, a.size);
        if (variants[i].expect == NULL) {
            if (st != KVRT_OK)
                fail_msg("variant %zu: %s: %s", i, kvrt_status_name(st), kvrt_last_error());
            assert_same_seq(src, 0, dst, 0);
        } else {
            if (st != KVRT_ERR_INCOMPATIBLE)
                fail_msg("variant %zu: %s (%s), expected INCOMPATIBLE", i, kvrt_status_name(st),
                         kvrt_last_error());
            if (strstr(kvrt_last_error(), variants[i].expect) == NULL)
                fail_msg("variant %zu: message \"%s\" does not name \"%s\"", i, kvrt_last_error(),
                         variants[i].expect);
            snap_cache(dst, &after);
            assert_same_blob(&before, &after, "cache contents");
        }
        blob_free(&before);
        blob_free(&after);
        kvrt_cache_destroy(dst);
    }
    /* a cache that keeps every sliding-window row writes states that both
     * kinds of cache load */
    kvrt_layer_desc fl[8];
    kvrt_cache_desc fd = base_desc(fl);
    fd.swa_full = 1;
    kvrt_cache *keep_all = NULL, *keep_all_dst = NULL, *evicting_dst = NULL;
    OK(kvrt_cache_create(&fd, &keep_all));
    OK(kvrt_cache_create(&fd, &keep_all_dst));
    OK(kvrt_cache_create(&d, &evicting_dst));
    fill_seq(keep_all, 1, 0, 700, 1, 10);
    blob full = save_state(keep_all, 1);
    OK(load_state(keep_all_dst, 0, full.data, full.size));
    assert_same_seq(keep_all, 1, keep_all_dst, 0);
    OK(load_state(evicting_dst, 0, full.data, full.size));
    assert_same_seq(keep_all, 1, evicting_dst, 0);
    fill_seq(evicting_dst, 0, 700, 300, 1, 11); /* the window moves on from there */
    OK(kvrt_cache_check(evicting_dst));
    blob_free(&full);
    kvrt_cache_destroy(keep_all);
    kvrt_cache_destroy(keep_all_dst);
    kvrt_cache_destroy(evicting_dst);

#if defined(KVRT_HAVE_XXHASH)
    /* a later format version and a quantized scales format */
    kvrt_cache *dst = NULL;
    OK(kvrt_cache_create(&d, &dst));
    blob v2 = {0};
    blob_put(&v2, a.data, a.size);
    patch_head_u32(&v2, 0, 3);
    EXPECT(KVRT_ERR_INCOMPATIBLE, load_state(dst, 0, v2.data, v2.size));
    assert_non_null(strstr(kvrt_last_error(), "format_version 3 in file"));
    blob q = {0};
    blob_put(&q, a.data, a.size);
    patch_head_u32(&q, 48, 1);
    EXPECT(KVRT_ERR_INCOMPATIBLE, load_state(dst, 0, q.data, q.size));
    assert_non_null(strstr(kvrt_last_error(), "scales_format 1 in file"));
    int64_t n = -1;
    OK(kvrt_seq_n_tokens(dst, 0, &n));
    assert_int_equal(n, 0);
    blob_free(&v2);
    blob_free(&q);
    kvrt_cache_destroy(dst);
#endif
    blob_free(&a);
    kvrt_cache_destroy(src);
}

/* ---- corrupt input ---- */

/* A destination with a sequence of its own, to show that nothing changes. */
static kvrt_cache *corrupt_destination(kvrt_dtype dtype)
{
    kvrt_cache *dst = make_cache(LAYOUT_MIXED, opts(dtype, 16, 120, 4));
    fill_seq(dst, 0, 0, 200, 1, 77);
    fill_cross(dst, 0, 5, 77);
    return dst;
}

static void expect_corrupt(kvrt_cache *dst, const uint8_t *data, size_t size, const char *what,
                           size_t at, const kvrt_cache_stats *stats)
{
    kvrt_status st = load_state(dst, -1, data, size);
    if (st != KVRT_ERR_CORRUPT)
        fail_msg("%s at %zu: %s (%s), expected CORRUPT", what, at, kvrt_status_name(st),
                 kvrt_last_error());
    kvrt_cache_stats now;
    OK(kvrt_cache_stats_get(dst, -1, &now));
    assert_memory_equal(&now, stats, sizeof now);
}

/* A SEQ record whose sliding-window group's evicted range reaches
 * INT32_MAX, with a valid checksum: CORRUPT, the destination unchanged
 * (such a sequence could never be planned again; a cache clamps the range
 * below it). A range over live positions is valid: edits (shift, div)
 * keep it as a bound, and live positions may fall inside it. */
static void test_swa_evicted_range(void **state)
{
    (void)state;
    REQUIRE_STATE();
#if !defined(KVRT_HAVE_XXHASH)
    skip(); /* the checksum must be rewritten */
#else
    kvrt_cache *src = make_cache(LAYOUT_SWA, opts(KVRT_F16, 16, 120, 2));
    fill_seq(src, 0, 0, 100, 1, 5); /* window 96: the next steps evict the oldest blocks */
    for (int32_t p = 100; p < 200; p += 10)
        fill_seq(src, 0, p, 10, 1, 5);
    blob b = save_state(src, 0);
    uint64_t sec[16];
    int n_sec = section_offsets(&b, sec, 16);
    {
        blob c = {malloc(b.size), b.size, b.size, 0, 0};
        memcpy(c.data, b.data, b.size);
        int patched = 0;
        for (int i = 0; i < n_sec && !patched; i++) {
            uint8_t *frame = c.data + sec[i];
            uint32_t tag = frame[0] | frame[1] << 8 | frame[2] << 16 | (uint32_t)frame[3] << 24;
            if (tag != 0x20514553u) /* "SEQ " */
                continue;
            uint64_t size = le64(frame + 8);
            uint8_t *p = frame + 16;
            uint32_t groups = p[4] | p[5] << 8 | p[6] << 16 | (uint32_t)p[7] << 24;
            uint64_t at = 8;
            for (uint32_t j = 0; j < groups && !patched; j++) {
                uint64_t n = le64(p + at);
                int32_t emax;
                memcpy(&emax, p + at + 12, 4);
                if (emax >= 0) { /* the window group: its range up to INT32_MAX */
                    int32_t top = INT32_MAX;
                    memcpy(p + at + 12, &top, 4);
                    patched = 1;
                }
                at += 16 + 4 * n;
            }
            uint64_t sum = XXH3_64bits(frame, 16 + size);
            for (int k = 0; k < 8; k++)
                frame[16 + size + (size_t)k] = (uint8_t)(sum >> (8 * k));
        }
        assert_true(patched);
        kvrt_cache *dst = make_cache(LAYOUT_SWA, opts(KVRT_F16, 16, 120, 2));
        fill_seq(dst, 1, 0, 50, 1, 77); /* a sequence of its own, to show nothing changes */
        kvrt_cache_stats before;
        OK(kvrt_cache_stats_get(dst, -1, &before));
        expect_corrupt(dst, c.data, c.size, "evicted range to INT32_MAX", 0, &before);
        kvrt_cache_destroy(dst);
        free(c.data);
    }
    blob_free(&b);
    kvrt_cache_destroy(src);
#endif
}

static void test_truncated(void **state)
{
    (void)state;
    REQUIRE_STATE();
    kvrt_cache *src = make_cache(LAYOUT_MIXED, opts(KVRT_F16, 16, 200, 4));
    fill_seq(src, 1, 0, 600, 1, 1);
    fill_cross(src, 1, 20, 1);
    fill_seq(src, 2, 0, 300, 2, 2);
    blob a = save_state(src, -1);
    kvrt_cache *dst = corrupt_destination(KVRT_F16);
    blob before = {0}, after = {0};
    snap_cache(dst, &before);
    kvrt_cache_stats stats;
    OK(kvrt_cache_stats_get(dst, -1, &stats));

    uint64_t offs[64];
    int n = section_offsets(&a, offs, 64);
    assert_int_equal(n, 1 + 2 * (1 + 4) + 1);
    expect_corrupt(dst, a.data, 0, "truncation", 0, &stats);
    for (int i = 0; i < n; i++) {
        /* at the boundary, inside the frame, after the frame, before the checksum */
        const uint64_t cuts[] = {offs[i], offs[i] + 1, offs[i] + 16, offs[i] + 17,
                                 offs[i] + 16 + le64(a.data + offs[i] + 8),
                                 offs[i] + 23 + le64(a.data + offs[i] + 8)};
        for (size_t c = 0; c < sizeof cuts / sizeof cuts[0]; c++)
            if (cuts[c] < a.size)
                expect_corrupt(dst, a.data, (size_t)cuts[c], "truncation", (size_t)cuts[c], &stats);
    }
    expect_corrupt(dst, a.data, a.size - 1, "truncation", a.size - 1, &stats);

    /* a tiny state, cut at every byte */
    kvrt_cache *tiny = make_cache(LAYOUT_MIXED, opts(KVRT_F16, 4, 8, 4));
    fill_seq(tiny, 3, 0, 3, 1, 4);
    fill_cross(tiny, 3, 2, 4);
    blob t = save_state(tiny, -1);
    for (size_t cut = 0; cut < t.size; cut++)
        expect_corrupt(dst, t.data, cut, "truncation of the tiny state", cut, &stats);

    snap_cache(dst, &after);
    assert_same_blob(&before, &after, "cache contents");
    /* and the intact states still load */
    OK(load_state(dst, -1, a.data, a.size));
    assert_same_seq(src, 1, dst, 1);
    assert_same_seq(src, 2, dst, 2);
    OK(load_state(dst, -1, t.data, t.size));
    assert_same_seq(tiny, 3, dst, 3);
    OK(kvrt_cache_check(dst));

    blob_free(&a);
    blob_free(&t);
    blob_free(&before);
    blob_free(&after);
    kvrt_cache_destroy(src);
    kvrt_cache_destroy(dst);
    kvrt_cache_destroy(tiny);
}

static void test_bit_flips(void **state)
{
    (void)state;
    REQUIRE_STATE();
    kvrt_cache *src = make_cache(LAYOUT_MIXED, opts(KVRT_BF16, 16, 200, 4));
    fill_seq(src, 1, 0, 900, 1, 1);
    fill_cross(src, 1, 30, 1);
    fill_seq(src, 2, 5, 100, 1, 2);
    blob a = save_state(src, -1);
    kvrt_cache *dst = corrupt_destination(KVRT_BF16);
    blob before = {0}, after = {0};
    snap_cache(dst, &before);
    kvrt_cache_stats stats;
    OK(kvrt_cache_stats_get(dst, -1, &stats));

    uint32_t rng = 12345;
    for (int i = 0; i < 600; i++) {
        rng = rng * 1664525u + 1013904223u;
        size_t bit = (size_t)(((uint64_t)rng << 16 ^ rng) % (a.size * 8));
        a.data[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        expect_corrupt(dst, a.data, a.size, "bit flip", bit, &stats);
        a.data[bit / 8] ^= (uint8_t)(1u << (bit % 8));
    }
    /* every bit of a tiny state */
    kvrt_cache *tiny = make_cache(LAYOUT_MIXED, opts(KVRT_BF16, 4, 8, 4));
    fill_seq(tiny, 3, 0, 2, 1, 4);
    fill_cross(tiny, 3, 1, 4);
    blob t = save_state(tiny, 3);
    for (size_t bit = 0; bit < t.size * 8; bit++) {
        t.data[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        expect_corrupt(dst, t.data, t.size, "bit flip of the tiny state", bit, &stats);
        t.data[bit / 8] ^= (uint8_t)(1u << (bit % 8));
    }
    /* not a state at all */
    uint8_t junk[4096];
    for (size_t i = 0; i < sizeof junk; i++) {
        rng = rng * 1664525u + 1013904223u;
        junk[i] = (uint8_t)(rng >> 24);
    }
    expect_corrupt(dst, junk, sizeof junk, "random bytes", 0, &stats);
    memcpy(junk, "KVRTSTAT", 8);
    expect_corrupt(dst, junk, sizeof junk, "random bytes after the magic", 8, &stats);
    expect_corrupt(dst, junk, 8, "the magic alone", 8, &stats);
    snap_cache(dst, &after);
    assert_same_blob(&before, &after, "cache contents");

    /* bytes after END: a file is corrupt */
    char path[256];
    temp_path(path, sizeof path, "trailing.kvst");
    blob tr = {0};
    blob_put(&tr, a.data, a.size);
    blob_put(&tr, "x", 1);
    write_file(path, tr.data, tr.size);
    EXPECT(KVRT_ERR_CORRUPT, kvrt_state_load_file(dst, -1, path));
    write_file(path, a.data, a.size);
    OK(kvrt_state_load_file(dst, -1, path));
    assert_same_seq(src, 1, dst, 1);
    remove(path);

    blob_free(&a);
    blob_free(&t);
    blob_free(&tr);
    blob_free(&before);
    blob_free(&after);
    kvrt_cache_destroy(src);
    kvrt_cache_destroy(dst);
    kvrt_cache_destroy(tiny);
}

/* ---- capacity ---- */

static void test_capacity(void **state)
{
    (void)state;
    REQUIRE_STATE();
    kvrt_cache *src = make_cache(LAYOUT_MIXED, opts(KVRT_F16, 16, 400, 2));
    fill_seq(src, 0, 0, 3000, 1, 1);
    fill_cross(src, 0, 1500, 1);
    blob a = save_state(src, 0);

    kvrt_cache *small = make_cache(LAYOUT_MIXED, opts(KVRT_F16, 16, 100, 2));
    fill_seq(small, 1, 0, 50, 1, 2);
    blob before = {0}, after = {0};
    snap_cache(small, &before);
    EXPECT(KVRT_ERR_CAPACITY, load_state(small, 0, a.data, a.size));
    snap_cache(small, &after);
    assert_same_blob(&before, &after, "cache contents");
    blob_free(&after);

    cache_opts short_cross = opts(KVRT_F16, 16, 400, 2);
    short_cross.cross_max_len = 1000;
    kvrt_cache *sc = make_cache(LAYOUT_MIXED, short_cross);
    snap_cache(sc, &after);
    EXPECT(KVRT_ERR_CAPACITY, load_state(sc, 0, a.data, a.size));
    assert_non_null(strstr(kvrt_last_error(), "cross_max_len"));
    blob again = {0};
    snap_cache(sc, &again);
    assert_same_blob(&after, &again, "cache contents");

    /* growth provides the blocks */
    cache_opts grow = opts(KVRT_F16, 16, 20, 2);
    grow.max_blocks = 400;
    kvrt_cache *g = make_cache(LAYOUT_MIXED, grow);
    OK(load_state(g, 0, a.data, a.size));
    assert_same_seq(src, 0, g, 0);
    OK(kvrt_cache_check(g));

    blob_free(&a);
    blob_free(&before);
    blob_free(&after);
    blob_free(&again);
    kvrt_cache_destroy(src);
    kvrt_cache_destroy(small);
    kvrt_cache_destroy(sc);
    kvrt_cache_destroy(g);
}

/* ---- arguments, I/O errors ---- */

static void test_errors(void **state)
{
    (void)state;
    REQUIRE_STATE();
    kvrt_cache *c = make_cache(LAYOUT_MIXED, opts(KVRT_F16, 16, 200, 2));
    fill_seq(c, 0, 0, 1000, 1, 1);
    blob b = {0};
    uint64_t n;
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_state_write(NULL, 0, blob_writer, &b));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_state_write(c, 0, NULL, &b));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_state_write(c, 2, blob_writer, &b));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_state_size(c, 2, &n));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_state_size(c, 0, NULL));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_state_read(NULL, 0, blob_reader, &b));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_state_read(c, 0, NULL, &b));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_state_read(c, 9, blob_reader, &b));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_state_save_file(c, 0, NULL));
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_state_load_file(c, 0, NULL));

    /* a writer's error comes back as it is */
    b.fail_after = 5000;
    EXPECT(KVRT_ERR_IO, kvrt_state_write(c, 0, blob_writer, &b));
    blob_free(&b);

    EXPECT(KVRT_ERR_IO, kvrt_state_save_file(c, 0, "/nonexistent-kvrt-dir/state.kvst"));
    assert_non_null(strstr(kvrt_last_error(), "/nonexistent-kvrt-dir/state.kvst"));
    EXPECT(KVRT_ERR_IO, kvrt_state_load_file(c, 1, "/nonexistent-kvrt-dir/state.kvst"));
    assert_non_null(strstr(kvrt_last_error(), "/nonexistent-kvrt-dir/state.kvst"));
    kvrt_cache_destroy(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip_layouts),
        cmocka_unit_test(test_whole_cache),
        cmocka_unit_test(test_after_edits),
        cmocka_unit_test(test_other_sequence),
        cmocka_unit_test(test_seed003_mla),
        cmocka_unit_test(test_incompatible),
        cmocka_unit_test(test_truncated),
        cmocka_unit_test(test_bit_flips),
        cmocka_unit_test(test_swa_evicted_range),
        cmocka_unit_test(test_capacity),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests_name("state", tests, NULL, NULL);
}
