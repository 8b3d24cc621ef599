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

/* ---- 2. a failed kvrt_state_save_file changes nothing on disk ---- */

static blob read_file(const char *path)
{
    blob b = {0};
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0)
        blob_put(&b, buf, n);
    fclose(f);
    return b;
}

static int dir_entries(const char *dir)
{
    char cmd[512];
    snprintf(cmd, sizeof cmd, "ls -A '%s' | wc -l", dir);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    int n = -1;
    assert_int_equal(fscanf(p, "%d", &n), 1);
    pclose(p);
    return n;
}

static void test_save_file_failure_keeps_files(void **state)
{
    (void)state;
    REQUIRE_STATE();
    char dir[256];
    temp_path(dir, sizeof dir, "dirXXXXXX");
    assert_non_null(mkdtemp(dir));
    char path[320], target[320], link[320];
    snprintf(path, sizeof path, "%s/good.kvrt", dir);
    snprintf(target, sizeof target, "%s/target", dir);
    snprintf(link, sizeof link, "%s/link.kvrt", dir);

    kvrt_cache *c = make_cache(LAYOUT_ATTN, opts(KVRT_F32, 16, 64, 2));
    fill_seq(c, 0, 0, 20, 1, 1);
    OK(kvrt_state_save_file(c, -1, path));
    assert_int_equal(chmod(path, 0640), 0);
    blob good = read_file(path);
    /* a bigger state whose save fails part way: the file size limit makes
     * write(2) fail with EFBIG once the temporary file passes half of the
     * earlier file's size */
    fill_seq(c, 1, 0, 200, 1, 2);
    struct rlimit old, lim;
    assert_int_equal(getrlimit(RLIMIT_FSIZE, &old), 0);
    lim = old;
    lim.rlim_cur = good.size / 2;
    void (*prev)(int) = signal(SIGXFSZ, SIG_IGN);
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &lim), 0);
    kvrt_status st = kvrt_state_save_file(c, -1, path);
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &old), 0);
    signal(SIGXFSZ, prev);
    EXPECT_IN("kvrt_state_save_file", KVRT_ERR_IO, st);
    blob after = read_file(path);
    assert_same_blob(&after, &good, "the earlier state file after a failed save");
    struct stat sb;
    assert_int_equal(stat(path, &sb), 0);
    assert_int_equal(sb.st_mode & 07777, 0640);
    assert_int_equal(dir_entries(dir), 1); /* no temporary file left */
    /* a successful save replaces it, keeping its mode */
    OK(kvrt_state_save_file(c, -1, path));
    assert_int_equal(stat(path, &sb), 0);
    assert_int_equal(sb.st_mode & 07777, 0640);
    blob now = save_state(c, -1), file = read_file(path);
    assert_same_blob(&file, &now, "the replaced state file");
    kvrt_cache *d = make_cache(LAYOUT_ATTN, opts(KVRT_F32, 16, 64, 2));
    OK(kvrt_state_load_file(d, -1, path));
    assert_same_seq(c, 1, d, 1);

    /* a symbolic link is refused; neither it nor its target changes */
    FILE *f = fopen(target, "wb");
    assert_non_null(f);
    fputs("keep me", f);
    fclose(f);
    assert_int_equal(symlink(target, link), 0);
    EXPECT_IN("kvrt_state_save_file", KVRT_ERR_IO, kvrt_state_save_file(c, 0, link));
    assert_non_null(strstr(kvrt_last_error(), "symbolic link"));
    assert_int_equal(lstat(link, &sb), 0);
    assert_true(S_ISLNK(sb.st_mode));
    blob t = read_file(target);
    assert_int_equal(t.size, 7);
    assert_memory_equal(t.data, "keep me", 7);
    /* a directory, and a path whose directory does not exist */
    EXPECT_IN("kvrt_state_save_file", KVRT_ERR_IO, kvrt_state_save_file(c, 0, dir));
    char missing[400];
    snprintf(missing, sizeof missing, "%s/no/such.kvrt", dir);
    EXPECT_IN("kvrt_state_save_file", KVRT_ERR_IO, kvrt_state_save_file(c, 0, missing));
    assert_int_equal(dir_entries(dir), 3);
    /* a device node stays (as root, the old code deleted /dev/full) */
    if (lstat("/dev/full", &sb) == 0 && S_ISCHR(sb.st_mode)) {
        EXPECT_IN("kvrt_state_save_file", KVRT_ERR_IO, kvrt_state_save_file(c, 0, "/dev/full"));
        assert_non_null(strstr(kvrt_last_error(), "a device"));
        assert_int_equal(lstat("/dev/full", &sb), 0);
        assert_true(S_ISCHR(sb.st_mode));
    }
    blob *all[] = {&good, &after, &now, &file, &t};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        blob_free(all[i]);
    remove(link);
    remove(target);
    remove(path);
    rmdir(dir);
    kvrt_cache_destroy(c);
    kvrt_cache_destroy(d);
}

/* ---- 4. readers that deliver a little at a time; input after END ---- */

static kvrt_status one_byte_reader(void *user, void *data, size_t n, size_t *got)
{
    return blob_reader(user, data, n > 0 ? 1 : 0, got);
}

static void test_short_reads_and_trailing_bytes(void **state)
{
    (void)state;
    REQUIRE_STATE();
    kvrt_cache *c = make_cache(LAYOUT_MIXED, opts(KVRT_F16, 8, 64, 2));
    fill_seq(c, 0, 0, 30, 1, 3);
    fill_cross(c, 0, 5, 3);
    blob image = save_state(c, 0);
    kvrt_cache *d = make_cache(LAYOUT_MIXED, opts(KVRT_F16, 4, 128, 2));
    /* a reader that delivers one byte per call is not at the end */
    blob in = {image.data, image.size, image.size, 0, 0};
    OK(kvrt_state_read(d, 1, one_byte_reader, &in));
    assert_same_seq(c, 0, d, 1);
    assert_int_equal(in.pos, image.size);
    /* kvrt_state_read stops at END: what follows stays unread */
    blob longer = {0};
    blob_put(&longer, image.data, image.size);
    blob_put(&longer, "garbage!", 8);
    OK(kvrt_seq_rm(d, -1, 0, -1));
    blob in2 = {longer.data, longer.size, longer.size, 0, 0};
    OK(kvrt_state_read(d, 1, blob_reader, &in2));
    assert_int_equal(in2.pos, image.size);
    assert_same_seq(c, 0, d, 1);
    /* a file with bytes after END is corrupt, and changes nothing */
    char path[256];
    temp_path(path, sizeof path, "trailing.kvrt");
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(longer.data, 1, longer.size, f), longer.size);
    fclose(f);
    blob before = {0}, after = {0};
    snap_cache(d, &before);
    EXPECT_IN("kvrt_state_load_file", KVRT_ERR_CORRUPT, kvrt_state_load_file(d, 0, path));
    snap_cache(d, &after);
    assert_same_blob(&before, &after, "the cache after a refused file");
    remove(path);
    blob *all[] = {&image, &longer, &before, &after};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        blob_free(all[i]);
    kvrt_cache_destroy(c);
    kvrt_cache_destroy(d);
}

/* ---- 3. float fields must be finite ---- */

static void test_nonfinite_rope_refused(void **state)
{
    (void)state;
    const float bad[] = {INFINITY, -INFINITY, NAN, 0.0f, -1.0f};
    kvrt_layer_desc l = base_attn;
    kvrt_cache *base = small_base();
    for (int field = 0; field < 2; field++)
        for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            kvrt_cache_desc d = test_desc(&l, 1, KVRT_F32, 4, 8, 2);
            d.rope.n_rot = 8;
            if (field == 0)
                d.rope.theta = bad[i];
            else
                d.rope.freq_scale = bad[i];
            kvrt_cache *c = (kvrt_cache *)0x1;
            EXPECT_IN("kvrt_cache_create", KVRT_ERR_INVALID_ARG, kvrt_cache_create(&d, &c));
            assert_null(c);
            assert_non_null(strstr(kvrt_last_error(), field == 0 ? "rope.theta" : "rope.freq_scale"));
            assert_non_null(strstr(kvrt_last_error(), "finite"));
            /* a shared handle's description is checked the same way */
            EXPECT_IN("kvrt_cache_create_shared", KVRT_ERR_INVALID_ARG,
                      kvrt_cache_create_shared(base, &d, (int[]){0}, &c));
            assert_null(c);
        }
    kvrt_cache_destroy(base);
}

/* ---- 4. the smaller ones ---- */

static void test_mla_only_n_rot(void **state)
{
    (void)state;
    kvrt_layer_desc mla[2] = {{KVRT_LAYER_MLA, 0, 0, 0, 0, 32, 8}, {KVRT_LAYER_MLA, 0, 0, 0, 0, 32, 8}};
    const int refused[] = {1000, 4, 16, 2};
    for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
        kvrt_cache_desc d = test_desc(mla, 2, KVRT_F16, 4, 8, 1);
        d.rope.n_rot = refused[i];
        kvrt_cache *c = (kvrt_cache *)0x1;
        EXPECT_IN("kvrt_cache_create", KVRT_ERR_INVALID_ARG, kvrt_cache_create(&d, &c));
        assert_null(c);
        assert_non_null(strstr(kvrt_last_error(), "rope_dim 8"));
    }
    const int taken[] = {0, 8};
    for (size_t i = 0; i < 2; i++) {
        kvrt_cache_desc d = test_desc(mla, 2, KVRT_F16, 4, 8, 1);
        d.rope.n_rot = taken[i];
        kvrt_cache *c = NULL;
        OK(kvrt_cache_create(&d, &c));
        kvrt_cache_destroy(c);
    }
    /* beside an ATTN layer, n_rot is the ATTN layers' (MLA rotates rope_dim) */
    kvrt_layer_desc mixed[2] = {mla[0], {KVRT_LAYER_ATTN, 1, 16, 16, 0, 0, 0}};
    kvrt_cache_desc d = test_desc(mixed, 2, KVRT_F16, 4, 8, 1);
    d.rope.n_rot = 16;
    kvrt_cache *c = NULL;
    OK(kvrt_cache_create(&d, &c));
    kvrt_cache_destroy(c);
    /* CROSS layers only: nothing is rotated */
    kvrt_layer_desc cross = {KVRT_LAYER_CROSS, 1, 8, 8, 0, 0, 0};
    d = test_desc(&cross, 1, KVRT_F16, 4, 8, 1);
    d.cross_max_len = 4;
    d.rope.n_rot = 2;
    EXPECT_IN("kvrt_cache_create", KVRT_ERR_INVALID_ARG, kvrt_cache_create(&d, &c));
}

static void test_base_layers_negative(void **state)
{
    (void)state;
    kvrt_cache *base = small_base();
    kvrt_layer_desc dl = base_attn;
    kvrt_cache_desc dd = *kvrt_cache_get_desc(base);
    dd.layers = &dl;
    dd.n_layers = 1;
    const int bad[] = {-2, -7, INT32_MIN};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        kvrt_cache *d = (kvrt_cache *)0x1;
        EXPECT_IN("kvrt_cache_create_shared", KVRT_ERR_INVALID_ARG,
                  kvrt_cache_create_shared(base, &dd, &bad[i], &d));
        assert_null(d);
        assert_non_null(strstr(kvrt_last_error(), "base_layers[0]"));
    }
    kvrt_cache_stats st;
    OK(kvrt_cache_stats_get(base, -1, &st));
    int64_t bytes = st.bytes_device;
    kvrt_cache *d = NULL;
    OK(kvrt_cache_create_shared(base, &dd, (int[]){-1}, &d));
    OK(kvrt_cache_stats_get(base, -1, &st));
    assert_true(st.bytes_device > bytes); /* -1: a layer of its own */
    kvrt_cache_destroy(d);
    kvrt_cache_destroy(base);
}

static void test_messages_name_the_function(void **state)
{
    (void)state;
    REQUIRE_STATE();
    char buf[64];
    kvrt_device cpu = {KVRT_BACKEND_CPU, 0};
    EXPECT_IN("kvrt_device_describe", KVRT_ERR_INVALID_ARG, kvrt_device_describe(cpu, buf, 0));
    assert_non_null(strstr(kvrt_last_error(), "size is 0"));
    EXPECT_IN("kvrt_device_describe", KVRT_ERR_INVALID_ARG, kvrt_device_describe(cpu, NULL, 8));
    assert_non_null(strstr(kvrt_last_error(), "buf is NULL"));
    EXPECT_IN("kvrt_device_describe", KVRT_ERR_NO_DEVICE,
              kvrt_device_describe((kvrt_device){KVRT_BACKEND_CPU, 3}, buf, sizeof buf));

    kvrt_cache *c = small_base();
    /* attention with an unknown out_dtype names the value */
    kvrt_batch *b = NULL;
    OK(kvrt_batch_create(c, 4, &b));
    OK(kvrt_batch_plan(c, 1, (int32_t[]){0}, (int32_t[]){0}, b));
    float q[16] = {0}, out[16];
    kvrt_attention_params ap = {2, 0.0f, 0.0f, KVRT_F32, (kvrt_dtype)7};
    EXPECT_IN("kvrt_attention", KVRT_ERR_INVALID_ARG, kvrt_attention(c, b, 0, q, out, &ap, NULL));
    assert_non_null(strstr(kvrt_last_error(), "out_dtype 7"));
    /* a shared handle on an unknown backend is an invalid argument */
    kvrt_cache_desc dd = *kvrt_cache_get_desc(c);
    dd.device.backend = (kvrt_backend)7;
    kvrt_cache *draft = (kvrt_cache *)0x1;
    EXPECT_IN("kvrt_cache_create_shared", KVRT_ERR_INVALID_ARG,
              kvrt_cache_create_shared(c, &dd, (int[]){0}, &draft));
    assert_null(draft);
    assert_non_null(strstr(kvrt_last_error(), "backend 7"));
    /* a bad field of a description */
    dd = *kvrt_cache_get_desc(c);
    dd.block_size = 3;
    EXPECT_IN("kvrt_cache_create", KVRT_ERR_INVALID_ARG, kvrt_cache_create(&dd, &draft));
    assert_non_null(strstr(kvrt_last_error(), "block_size 3"));
    /* a shared handle's layers are named by its own indices */
    kvrt_layer_desc dl[2] = {own_attn, base_attn};
    dd = *kvrt_cache_get_desc(c);
    dd.layers = dl;
    dd.n_layers = 2;
    OK(kvrt_cache_create_shared(c, &dd, (int[]){-1, 0}, &draft));
    OK(kvrt_batch_plan(draft, 1, (int32_t[]){0}, (int32_t[]){1}, b));
    EXPECT_IN("kvrt_write", KVRT_ERR_INVALID_ARG, kvrt_write(draft, b, 0, q, NULL, KVRT_F32, NULL));
    assert_non_null(strstr(kvrt_last_error(), "layer 0: v is NULL"));
    ap.out_dtype = KVRT_F32;
    ap.n_q_heads = 3;
    EXPECT_IN("kvrt_attention", KVRT_ERR_INVALID_ARG, kvrt_attention(draft, b, 1, q, out, &ap, NULL));
    assert_non_null(strstr(kvrt_last_error(), "layer 1: n_q_heads 3"));
    EXPECT_IN("kvrt_cross_set", KVRT_ERR_INVALID_ARG,
              kvrt_cross_set(draft, 0, 0, 1, q, q, KVRT_F32, NULL));
    assert_non_null(strstr(kvrt_last_error(), "layer 0 is not a CROSS layer"));
    kvrt_cache_destroy(draft);
    kvrt_batch_destroy(b);
    kvrt_cache_destroy(c);

    /* edits: a collision, a copy-on-write without blocks */
    c = make_cache_layers(&base_attn, 1, opts(KVRT_F32, 4, 2, 2));
    fill_seq(c, 0, 0, 8, 1, 1);
    EXPECT_IN("kvrt_seq_shift", KVRT_ERR_POS_EXISTS, kvrt_seq_shift(c, 0, 0, 4, 1));
    assert_non_null(strstr(kvrt_last_error(), "two tokens"));
    EXPECT_IN("kvrt_seq_div", KVRT_ERR_POS_EXISTS, kvrt_seq_div(c, 0, 0, -1, 2));
    OK(kvrt_seq_cp(c, 0, 1, 0, -1));
    EXPECT_IN("kvrt_seq_rm", KVRT_ERR_CAPACITY, kvrt_seq_rm(c, 1, 1, 2));
    EXPECT_IN("kvrt_seq_cp", KVRT_ERR_INVALID_ARG, kvrt_seq_cp(c, 0, 1, 0, -1));
    OK(kvrt_batch_create(c, 4, &b));
    EXPECT_IN("kvrt_batch_plan", KVRT_ERR_CAPACITY,
              kvrt_batch_plan(c, 1, (int32_t[]){0}, (int32_t[]){8}, b));
    kvrt_batch_destroy(b);

    /* state: another dtype; restore into a sequence that is not empty */
    kvrt_cache *h = make_cache_layers(&base_attn, 1, opts(KVRT_F16, 4, 8, 2));
    fill_seq(h, 0, 0, 3, 1, 2);
    blob image = save_state(h, 0);
    EXPECT_IN("kvrt_state_read", KVRT_ERR_INCOMPATIBLE, load_state(c, 0, image.data, image.size));
    assert_non_null(strstr(kvrt_last_error(), "dtype f16 in file, f32 in cache"));
    EXPECT_IN("kvrt_state_read", KVRT_ERR_CORRUPT, load_state(h, 1, image.data, image.size - 1));
    kvrt_offload *off = NULL;
    OK(kvrt_seq_offload(h, 0, &off));
    EXPECT_IN("kvrt_seq_restore", KVRT_ERR_INCOMPATIBLE, kvrt_seq_restore(c, 0, off));
    fill_seq(h, 1, 0, 2, 1, 3);
    EXPECT_IN("kvrt_seq_restore", KVRT_ERR_INVALID_ARG, kvrt_seq_restore(h, 1, off));
    assert_non_null(strstr(kvrt_last_error(), "not empty"));
    EXPECT_IN("kvrt_seq_restore", KVRT_ERR_INVALID_ARG, kvrt_seq_restore(h, 9, off));
    OK(kvrt_seq_restore(h, 0, off));
    kvrt_offload_free(off);
    blob_free(&image);
    kvrt_cache_destroy(h);
    kvrt_cache_destroy(c);
}

static int64_t device_bytes(const kvrt_cache *c)
{
    kvrt_cache_stats st;
    OK(kvrt_cache_stats_get(c, -1, &st));
    return st.bytes_device;
}

/* A draft recreated per request: its own layer goes with it. */
static void test_own_layers_freed_with_handle(void **state)
{
    (void)state;
    kvrt_cache *base = small_base();
    fill_seq(base, 0, 0, 6, 1, 1);
    blob rows = layer_rows(base, 0, 0);
    int64_t bytes = device_bytes(base);
    for (int cycle = 0; cycle < 20; cycle++) {
        kvrt_cache *draft = make_draft(base, 1);
        assert_true(device_bytes(base) > bytes);
        fill_seq(draft, 1, 0, 3, 1, (uint32_t)cycle);
        OK(kvrt_seq_shift(draft, 1, 0, -1, 2));
        OK(kvrt_cache_check(draft));
        kvrt_cache_destroy(draft);
        assert_int_equal(device_bytes(base), bytes);
        OK(kvrt_seq_rm(base, 1, 0, -1));
    }
    /* a handle naming another handle's own layer keeps it alive */
    kvrt_cache *a = make_draft(base, 1);
    int64_t with_a = device_bytes(base);
    kvrt_layer_desc bl_desc[1] = {own_attn};
    kvrt_cache_desc dd = *kvrt_cache_get_desc(base);
    dd.layers = bl_desc;
    dd.n_layers = 1;
    kvrt_cache *b = NULL;
    OK(kvrt_cache_create_shared(a, &dd, (int[]){1}, &b)); /* a's layer 1 */
    fill_seq(a, 1, 0, 5, 1, 9);
    blob mine = layer_rows(a, 1, 1);
    kvrt_cache_destroy(a);
    assert_int_equal(device_bytes(base), with_a);
    OK(kvrt_seq_shift(base, 1, 0, -1, 1));
    OK(kvrt_seq_shift(base, 1, 0, -1, -1)); /* rotated there and back */
    OK(kvrt_seq_rm(base, 1, 0, 1));
    OK(kvrt_cache_check(b));
    blob theirs = layer_rows(b, 0, 1);
    assert_int_equal(theirs.size, mine.size - (sizeof(int32_t) + 16 * sizeof(float)));
    kvrt_cache_destroy(b);
    assert_int_equal(device_bytes(base), bytes);
    /* the base's rows never moved */
    blob now = layer_rows(base, 0, 0);
    assert_same_blob(&now, &rows, "the base's rows after 22 handles came and went");
    OK(kvrt_cache_check(base));
    blob_free(&rows);
    blob_free(&mine);
    blob_free(&theirs);
    blob_free(&now);
    kvrt_cache_destroy(base);
}

/* MLA writes take no V; attention over a row planned but never written
 * reads what its slot holds (here memory no row has used: zeros). */
static void test_mla_write_v_and_unwritten_rows(void **state)
{
    (void)state;
    kvrt_layer_desc mla = {KVRT_LAYER_MLA, 0, 0, 0, 0, 32, 8};
    kvrt_cache *c = make_cache_layers(&mla, 1, opts(KVRT_F32, 4, 8, 1));
    kvrt_batch *b = NULL;
    OK(kvrt_batch_create(c, 4, &b));
    OK(kvrt_batch_plan(c, 1, (int32_t[]){0}, (int32_t[]){0}, b));
    float k[40], v[40], q[2 * 40], out[2 * 32];
    for (int i = 0; i < 40; i++)
        k[i] = v[i] = q[i] = q[40 + i] = 0.25f * (float)(i % 7) - 0.5f;
    blob before = {0}, after = {0};
    snap_cache(c, &before);
    EXPECT_IN("kvrt_write", KVRT_ERR_INVALID_ARG, kvrt_write(c, b, 0, k, v, KVRT_F32, NULL));
    assert_non_null(strstr(kvrt_last_error(), "v must be NULL"));
    snap_cache(c, &after);
    assert_same_blob(&before, &after, "the cache after a refused MLA write");
    kvrt_attention_params ap = {2, 0.0f, 0.0f, KVRT_F32, KVRT_F32};
    for (int i = 0; i < 64; i++)
        out[i] = 1.0f;
    OK(kvrt_attention(c, b, 0, q, out, &ap, NULL)); /* planned, not written */
    for (int i = 0; i < 64; i++)
        assert_true(out[i] == 0.0f);
    OK(kvrt_write(c, b, 0, k, NULL, KVRT_F32, NULL));
    OK(kvrt_attention(c, b, 0, q, out, &ap, NULL));
    for (int i = 0; i < 32; i++) /* one visible key: its V, the latent part */
        assert_true(out[i] == k[i] && out[32 + i] == k[i]);
    blob_free(&before);
    blob_free(&after);
    kvrt_batch_destroy(b);
    kvrt_cache_destroy(c);
}

/* seq < 0 edits every sharer of a block alike: the block is edited in
 * place, so no copy (and no free block) is needed, and it stays shared. */
static void test_edit_all_shared_in_place(void **state)
{
    (void)state;
    kvrt_cache *c = make_cache_layers(&base_attn, 1, opts(KVRT_F32, 4, 2, 3));
    kvrt_cache *solo = make_cache_layers(&base_attn, 1, opts(KVRT_F32, 4, 8, 3));
    fill_seq(c, 0, 0, 8, 1, 1);
    fill_seq(solo, 0, 0, 8, 1, 1);
    OK(kvrt_seq_cp(c, 0, 1, 0, -1)); /* both blocks shared; none free */
    kvrt_cache_stats st;
    OK(kvrt_cache_stats_get(c, -1, &st));
    assert_int_equal(st.blocks_free, 0);
    assert_int_equal(st.blocks_shared, 2);
    OK(kvrt_seq_rm(c, -1, 1, 2));
    OK(kvrt_seq_rm(solo, -1, 1, 2));
    OK(kvrt_seq_shift(c, -1, 4, -1, 10));
    OK(kvrt_seq_shift(solo, -1, 4, -1, 10));
    OK(kvrt_seq_div(c, -1, 14, 15, 2));
    OK(kvrt_seq_div(solo, -1, 14, 15, 2));
    OK(kvrt_seq_shift(c, -1, 0, 1, -1)); /* position 0 leaves */
    OK(kvrt_seq_shift(solo, -1, 0, 1, -1));
    OK(kvrt_cache_check(c));
    OK(kvrt_cache_stats_get(c, -1, &st));
    assert_int_equal(st.blocks_shared, 2);
    assert_int_equal(st.blocks_free, 0);
    int64_t n = 0;
    OK(kvrt_seq_n_tokens(c, 1, &n));
    assert_int_equal(n, 6);
    /* rotated once, like the unshared copy, in both sharers */
    assert_same_seq(c, 0, solo, 0);
    assert_same_seq(c, 1, solo, 0);
    /* removing every token of a shared block frees it from both */
    OK(kvrt_seq_rm(c, -1, 0, 4));
    OK(kvrt_cache_stats_get(c, -1, &st));
    assert_int_equal(st.blocks_free, 1);
    OK(kvrt_seq_rm(solo, -1, 0, 4));
    assert_same_seq(c, 1, solo, 0);
    OK(kvrt_cache_check(c));
    /* one sharer alone still copies first: no block for it, refused */
    fill_seq(c, 2, 0, 4, 1, 3);
    OK(kvrt_cache_stats_get(c, -1, &st));
    assert_int_equal(st.blocks_free, 0);
    EXPECT_IN("kvrt_seq_rm", KVRT_ERR_CAPACITY, kvrt_seq_rm(c, 0, 7, 8));
    kvrt_cache_destroy(c);
    kvrt_cache_destroy(solo);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_shared_state_offload),
        cmocka_unit_test(test_save_file_failure_keeps_files),
        cmocka_unit_test(test_short_reads_and_trailing_bytes),
        cmocka_unit_test(test_nonfinite_rope_refused),
        cmocka_unit_test(test_mla_only_n_rot),
        cmocka_unit_test(test_base_layers_negative),
        cmocka_unit_test(test_messages_name_the_function),
        cmocka_unit_test(test_own_layers_freed_with_handle),
        cmocka_unit_test(test_mla_write_v_and_unwritten_rows),
        cmocka_unit_test(test_edit_all_shared_in_place),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
