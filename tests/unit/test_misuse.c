/*
 * test_misuse.c: calls that once crashed, read freed memory or reported
 * under the wrong name, each replayed as a user would make it:
 *   - host allocations failing (an edit's undo journal, create_shared's
 *     tables once crashed; kvrt_cache_check once called it a broken
 *     invariant): for every public entry that takes a cache (create,
 *     create_shared, batch create and plan, plan_tokens, write, attention,
 *     cross_set, the gathers, every edit, compact, clear, the state calls,
 *     offload and restore, attach_prefix, check, statistics, queries, sync),
 *     every allocation of the call is made to fail in turn (the Nth, for
 *     every N until the call succeeds); each failure must be
 *     KVRT_ERR_OUT_OF_MEMORY naming the call, and leave every sequence's
 *     state (kvrt_state_write's bytes) and the pool's statistics exactly as
 *     they were (the ASan build checks that nothing leaks);
 *   - kvrt_cache_create_shared given kvrt_cache_get_desc(base), whose layer
 *     table lives inside base;
 *   - an error of kvrt_batch_plan_tokens named once, by itself;
 *   - n_threads 4096 under an address-space limit in which libgomp cannot
 *     create 4096 threads (it would print and exit);
 *   - a layer rope_theta of -0 (accepted, then its own state and offload
 *     were refused); 8-bit rows holding +-FLT_MAX (read back as +-inf).
 * The allocator is wrapped at link time (-Wl,--wrap=malloc,...): the
 * library's calls go through the wrappers, armed only around the call
 * under test. The sweeps run on the backend KVRT_TEST_BACKEND names (cpu by
 * default; on kvrt-sim, tests/gpu/meson.build, the GPU backends' host glue,
 * whose pinned host memory also comes through aligned_alloc); the other
 * cases are the CPU's.
 */
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

void *__real_malloc(size_t n);
void *__real_calloc(size_t n, size_t size);
void *__real_realloc(void *p, size_t n);
void *__real_aligned_alloc(size_t align, size_t n);

#define TEST_REALLOC __real_realloc
#include "scenario.h"

/* ---- the wrapped allocator ---- */

static long fail_in = -1; /* the allocation that fails: 0 the next one; -1 none */
static long allocations;  /* made while armed */

static int fail_now(void)
{
    if (fail_in < 0)
        return 0;
    allocations++;
    return fail_in-- == 0;
}

void *__wrap_malloc(size_t n) { return fail_now() ? NULL : __real_malloc(n); }
void *__wrap_calloc(size_t n, size_t size) { return fail_now() ? NULL : __real_calloc(n, size); }
void *__wrap_realloc(void *p, size_t n) { return fail_now() ? NULL : __real_realloc(p, n); }
void *__wrap_aligned_alloc(size_t align, size_t n)
{
    return fail_now() ? NULL : __real_aligned_alloc(align, n);
}

/* ---- what a failed call must leave as it was ---- */

static void assert_same(const image *a, const image *b, const char *what, long n)
{
    if (a->n != b->n || memcmp(a->bytes, b->bytes, a->n) != 0 ||
        memcmp(&a->stats, &b->stats, sizeof a->stats) != 0)
        fail_msg("%s with allocation %ld failing changed the cache (state %zu -> %zu bytes, "
                 "%s; blocks used %lld -> %lld, free %lld -> %lld, device bytes %lld -> %lld)",
                 what, n, a->n, b->n,
                 a->n == b->n && memcmp(a->bytes, b->bytes, a->n) == 0 ? "same" : "differs",
                 (long long)a->stats.blocks_used, (long long)b->stats.blocks_used,
                 (long long)a->stats.blocks_free, (long long)b->stats.blocks_free,
                 (long long)a->stats.bytes_device, (long long)b->stats.bytes_device);
}

/* ---- a small cache with two sequences ---- */

enum { LAYERS = 2, HEADS = 2, DIM = 16, BS = 4 };

static kvrt_layer_desc layers[LAYERS] = {
    {KVRT_LAYER_ATTN, HEADS, DIM, DIM},
    {KVRT_LAYER_ATTN, HEADS, DIM, DIM},
};

/* Rows of up to 24 tokens, on the device under test. */
static sc_buf upload_rows(const float *rows, int n)
{
    return sc_upload(rows, (size_t)n * HEADS * DIM * sizeof(float));
}

static kvrt_cache *make_cache_of(kvrt_dtype dtype, const kvrt_layer_desc *ls)
{
    static kvrt_layer_desc l[LAYERS];
    memcpy(l, ls, sizeof l);
    kvrt_cache_desc d = sc_desc(l, LAYERS, dtype, BS, 64, 4);
    d.rope.n_rot = DIM;
    d.cross_max_len = 8;
    kvrt_cache *c = NULL;
    OK(kvrt_cache_create(&d, &c));
    kvrt_batch *b = NULL;
    OK(kvrt_batch_create(c, 32, &b));
    int32_t seqs[24], pos[24];
    for (int i = 0; i < 24; i++) {
        seqs[i] = i < 14 ? 0 : 1;
        pos[i] = i < 14 ? i : i - 14;
    }
    OK(kvrt_batch_plan(c, 24, seqs, pos, b));
    float k[24 * HEADS * DIM], v[24 * HEADS * DIM];
    for (int l = 0; l < LAYERS; l++) {
        for (int e = 0; e < 24 * HEADS * DIM; e++) {
            k[e] = test_value(l, e / (HEADS * DIM), e);
            v[e] = test_value(l + 7, e / (HEADS * DIM), e);
        }
        sc_buf dk = upload_rows(k, 24), dv = upload_rows(v, 24);
        if (ls[l].kind == KVRT_LAYER_CROSS) /* seq 0's encoder rows */
            OK(kvrt_cross_set(c, l, 0, 5, dk.p, dv.p, KVRT_F32, NULL));
        else
            OK(kvrt_write(c, b, l, dk.p, dv.p, KVRT_F32, NULL));
        sc_buf_free(&dk);
        sc_buf_free(&dv);
    }
    kvrt_batch_destroy(b);
    return c;
}

static kvrt_cache *make_cache(void) { return make_cache_of(KVRT_F16, layers); }
/* NULL where the backend has no quantized caches (the GPUs in this build) */
static kvrt_cache *make_q8_cache(void)
{
    kvrt_cache_desc d = sc_desc(layers, LAYERS, KVRT_Q8, BS, 64, 4);
    kvrt_cache *c = NULL;
    if (kvrt_cache_create(&d, &c) == KVRT_ERR_UNSUPPORTED)
        return NULL;
    kvrt_cache_destroy(c);
    return make_cache_of(KVRT_Q8, layers);
}

/* Layer 1 cross-attention (an encoder's K/V per sequence), set for seq 0. */
static kvrt_cache *make_cross_cache(void)
{
    const kvrt_layer_desc ls[LAYERS] = {layers[0], {KVRT_LAYER_CROSS, HEADS, DIM, DIM}};
    return make_cache_of(KVRT_F16, ls);
}

/* The same cache with prefix caching on (either hash this build has), and
 * seq 0's first 12 tokens written through kvrt_batch_plan_tokens, so that
 * their blocks are cached; NULL without a hash. */
static kvrt_cache *make_prefix_cache(void)
{
    kvrt_cache_desc d = sc_desc(layers, LAYERS, KVRT_F16, BS, 64, 4);
    d.rope.n_rot = DIM;
    kvrt_cache *c = NULL;
    d.prefix_cache = KVRT_PREFIX_XXH3;
    if (kvrt_cache_create(&d, &c) != KVRT_OK) {
        d.prefix_cache = KVRT_PREFIX_BLAKE2B;
        if (kvrt_cache_create(&d, &c) != KVRT_OK)
            return NULL;
    }
    kvrt_batch *b = NULL;
    OK(kvrt_batch_create(c, 12, &b));
    int32_t seqs[12] = {0}, pos[12], tok[12];
    static float k[12 * HEADS * DIM];
    for (int i = 0; i < 12; i++)
        pos[i] = i, tok[i] = 100 + i;
    OK(kvrt_batch_plan_tokens(c, 12, seqs, pos, tok, 12, b));
    sc_buf dk = upload_rows(k, 12);
    for (int l = 0; l < LAYERS; l++)
        OK(kvrt_write(c, b, l, dk.p, dk.p, KVRT_F32, NULL));
    sc_buf_free(&dk);
    kvrt_batch_destroy(b);
    return c;
}

/* ---- host allocation failures ---- */

typedef kvrt_status (*edit_fn)(kvrt_cache *c);

static kvrt_status do_cp(kvrt_cache *c) { return kvrt_seq_cp(c, 0, 2, 0, -1); }
static kvrt_status do_rm(kvrt_cache *c) { return kvrt_seq_rm(c, 0, 3, 9); }
static kvrt_status do_keep(kvrt_cache *c) { return kvrt_seq_keep(c, 1); }
static kvrt_status do_shift(kvrt_cache *c) { return kvrt_seq_shift(c, 0, 4, -1, 5); }
static kvrt_status do_div(kvrt_cache *c) { return kvrt_seq_div(c, 1, 5, 6, 2); } /* 5 -> 2, a hole */
static kvrt_status do_compact(kvrt_cache *c) { return kvrt_cache_compact(c); }

/* Makes each allocation of edit(c) fail in turn; returns the allocations
 * the successful call made. */
static long sweep(edit_fn edit, const char *name)
{
    long n = 0;
    for (;; n++) {
        kvrt_cache *c = make_cache();
        OK(kvrt_seq_rm(c, 1, 2, 5)); /* holes for compact to close, a block to copy on write */
        OK(kvrt_seq_cp(c, 0, 3, 0, 8));
        image before = take_image(c);
        allocations = 0;
        fail_in = n;
        kvrt_status st = edit(c);
        fail_in = -1;
        if (st == KVRT_OK && allocations <= n) { /* none refused: the sweep is over */
            free(before.bytes);
            kvrt_cache_destroy(c);
            return n;
        }
        if (st == KVRT_OK) { /* recovered from the refused allocation */
            free(before.bytes);
            kvrt_cache_destroy(c);
            continue;
        }
        if (st != KVRT_ERR_OUT_OF_MEMORY)
            fail_msg("%s with allocation %ld failing: %s (%s), expected KVRT_ERR_OUT_OF_MEMORY",
                     name, n, kvrt_status_name(st), kvrt_last_error());
        image after = take_image(c);
        assert_same(&before, &after, name, n);
        free(before.bytes);
        free(after.bytes);
        kvrt_cache_destroy(c);
        if (n > 500)
            fail_msg("%s still failing after %ld allocations", name, n);
    }
}

static void test_edit_allocation_failures(void **state)
{
    (void)state;
    static const struct {
        edit_fn     fn;
        const char *name;
    } edits[] = {
        {do_cp, "kvrt_seq_cp"},       {do_rm, "kvrt_seq_rm"},
        {do_keep, "kvrt_seq_keep"},   {do_shift, "kvrt_seq_shift"},
        {do_div, "kvrt_seq_div"},     {do_compact, "kvrt_cache_compact"},
    };
    for (size_t i = 0; i < sizeof edits / sizeof edits[0]; i++) {
        long n = sweep(edits[i].fn, edits[i].name);
        print_message("%s: each of its %ld host allocations failed in turn; cache unchanged\n",
                      edits[i].name, n);
    }
}

/* The other entries: a step (plan, write, attention), reads (gather, state
 * write) and whole-sequence moves (state read, offload, restore), each
 * after an unarmed preparation. */
static kvrt_batch   *g_batch;
static kvrt_offload *g_offload;
static image         g_saved;
/* K/V rows and queries (8 rows of HEADS * DIM), outputs, gathered rows: on
 * the device under test (on the CPU, these host arrays themselves) */
static float  g_q[8 * HEADS * DIM], g_out[2 * 2 * HEADS * DIM], g_rows[64 * HEADS * DIM];
static sc_buf g_dq, g_dout, g_drows;

static void prep_batch(kvrt_cache *c) { OK(kvrt_batch_create(c, 4, &g_batch)); }
static void prep_plan(kvrt_cache *c)
{
    prep_batch(c);
    int32_t seqs[2] = {0, 1}, pos[2] = {20, 12};
    OK(kvrt_batch_plan(c, 2, seqs, pos, g_batch));
}
static void prep_written(kvrt_cache *c)
{
    prep_plan(c);
    for (int l = 0; l < LAYERS; l++)
        OK(kvrt_write(c, g_batch, l, g_dq.p, g_dq.p, KVRT_F32, NULL));
}
static void prep_saved(kvrt_cache *c)
{
    free(g_saved.bytes);
    memset(&g_saved, 0, sizeof g_saved);
    OK(kvrt_state_write(c, 0, append, &g_saved));
}
static void prep_offload(kvrt_cache *c) { OK(kvrt_seq_offload(c, 0, &g_offload)); }

static kvrt_status reader(void *user, void *data, size_t size, size_t *got)
{
    image *im = user;
    size_t left = g_saved.n - im->n;
    *got = size < left ? size : left;
    memcpy(data, g_saved.bytes + im->n, *got);
    im->n += *got;
    return KVRT_OK;
}

static kvrt_status do_plan(kvrt_cache *c)
{
    int32_t seqs[2] = {0, 1}, pos[2] = {20, 12};
    return kvrt_batch_plan(c, 2, seqs, pos, g_batch);
}
static kvrt_status do_write(kvrt_cache *c)
{
    return kvrt_write(c, g_batch, 1, g_dq.p, g_dq.p, KVRT_F32, NULL);
}
static kvrt_status do_attention(kvrt_cache *c)
{
    kvrt_attention_params ap = {HEADS * 2, 0.0f, 0.0f, KVRT_F32, KVRT_F32};
    return kvrt_attention(c, g_batch, 0, g_dq.p, g_dout.p, &ap, NULL);
}
static kvrt_status do_gather(kvrt_cache *c)
{
    int64_t n = 0;
    return kvrt_gather(c, 1, 0, 0, -1, g_drows.p, NULL, NULL, 64, &n, NULL);
}
static kvrt_status do_gather_scales(kvrt_cache *c)
{
    int64_t n = 0; /* 14 rows of HEADS scales, K's then V's */
    float *scales = g_drows.p;
    return kvrt_gather_scales(c, 1, 0, 0, -1, scales, scales + 14 * HEADS, 14, &n, NULL);
}
static kvrt_status do_cross_replace(kvrt_cache *c)
{
    return kvrt_cross_set(c, 1, 0, 7, g_dq.p, g_dq.p, KVRT_F32, NULL);
}
static kvrt_status do_cross_first(kvrt_cache *c)
{
    return kvrt_cross_set(c, 1, 1, 3, g_dq.p, g_dq.p, KVRT_F32, NULL);
}
static kvrt_status do_check(kvrt_cache *c) { return kvrt_cache_check(c); }
static kvrt_status do_stats(kvrt_cache *c)
{
    kvrt_cache_stats s;
    return kvrt_cache_stats_get(c, -1, &s);
}
static kvrt_status do_state_size(kvrt_cache *c)
{
    uint64_t n = 0;
    return kvrt_state_size(c, -1, &n);
}
static kvrt_status do_batch_create(kvrt_cache *c) { return kvrt_batch_create(c, 16, &g_batch); }
static kvrt_status do_queries(kvrt_cache *c)
{
    int32_t p;
    int64_t n;
    int ok;
    kvrt_seq_group_info info;
    kvrt_status st = kvrt_seq_pos_min(c, 0, &p);
    if (st == KVRT_OK)
        st = kvrt_seq_pos_max(c, 0, &p);
    if (st == KVRT_OK)
        st = kvrt_seq_n_tokens(c, 0, &n);
    if (st == KVRT_OK)
        st = kvrt_seq_group_info_get(c, 0, 0, &info);
    if (st == KVRT_OK)
        st = kvrt_seq_can_resume(c, 0, 14, &ok);
    return st;
}
static kvrt_status do_sync(kvrt_cache *c)
{
    kvrt_status st = kvrt_cache_set_stream(c, NULL);
    return st == KVRT_OK ? kvrt_cache_sync(c) : st;
}
static kvrt_status do_state_write(kvrt_cache *c)
{
    image im = {0};
    kvrt_status st = kvrt_state_write(c, 0, append, &im);
    free(im.bytes);
    return st;
}
static kvrt_status do_state_read(kvrt_cache *c)
{
    image at = {0};
    return kvrt_state_read(c, 2, reader, &at);
}
static kvrt_status do_offload(kvrt_cache *c)
{
    kvrt_offload *off = NULL;
    kvrt_status st = kvrt_seq_offload(c, 1, &off);
    kvrt_offload_free(off);
    return st;
}
static kvrt_status do_restore(kvrt_cache *c) { return kvrt_seq_restore(c, 0, g_offload); }
static kvrt_status do_gather_as(kvrt_cache *c)
{
    int64_t n = 0;
    return kvrt_gather_as(c, 0, 1, 0, -1, g_drows.p, NULL, NULL, KVRT_F32, 64, &n, NULL);
}
static kvrt_status do_clear(kvrt_cache *c) { return kvrt_cache_clear(c); }
static char g_path[256];
static kvrt_status do_save_file(kvrt_cache *c) { return kvrt_state_save_file(c, 0, g_path); }
static void prep_file(kvrt_cache *c) { OK(kvrt_state_save_file(c, 0, g_path)); }
static kvrt_status do_load_file(kvrt_cache *c) { return kvrt_state_load_file(c, 2, g_path); }
static kvrt_status do_plan_tokens(kvrt_cache *c)
{
    int32_t seqs[2] = {1, 1}, pos[2] = {0, 1}, tok[2] = {100, 101};
    return kvrt_batch_plan_tokens(c, 2, seqs, pos, tok, 2, g_batch);
}
static kvrt_status do_attach(kvrt_cache *c)
{
    int32_t tok[12], covered = 0;
    for (int i = 0; i < 12; i++)
        tok[i] = 100 + i;
    return kvrt_seq_attach_prefix(c, 2, tok, 12, NULL, 0, &covered);
}

static void test_step_allocation_failures(void **state)
{
    (void)state;
    snprintf(g_path, sizeof g_path, "%s/kvrt_misuse_%ld.kvst", P_tmpdir, (long)getpid());
    for (int i = 0; i < 8 * HEADS * DIM; i++) /* K/V rows, then queries of 2 heads per kv head */
        g_q[i] = test_value(3, i / DIM, i);
    g_dq = sc_upload(g_q, sizeof g_q);
    g_dout = sc_upload(g_out, sizeof g_out);
    g_drows = sc_upload(g_rows, sizeof g_rows);
    static const struct {
        void (*prep)(kvrt_cache *c);
        edit_fn     fn;
        const char *name;
        kvrt_cache *(*make)(void); /* the cache it runs on: NULL make_cache */
    } ops[] = {
        {prep_batch, do_plan, "kvrt_batch_plan"},
        {prep_written, do_write, "kvrt_write"},
        {prep_written, do_attention, "kvrt_attention"},
        {NULL, do_gather, "kvrt_gather"},
        {NULL, do_state_write, "kvrt_state_write"},
        {prep_saved, do_state_read, "kvrt_state_read"},
        {NULL, do_offload, "kvrt_seq_offload"},
        {prep_offload, do_restore, "kvrt_seq_restore"},
        {NULL, do_gather_as, "kvrt_gather_as"},
        {NULL, do_clear, "kvrt_cache_clear"},
        {NULL, do_save_file, "kvrt_state_save_file"},
        {prep_file, do_load_file, "kvrt_state_load_file"},
        {prep_batch, do_plan_tokens, "kvrt_batch_plan_tokens", make_prefix_cache},
        {NULL, do_attach, "kvrt_seq_attach_prefix", make_prefix_cache},
        {NULL, do_cross_replace, "kvrt_cross_set", make_cross_cache},
        {NULL, do_cross_first, "kvrt_cross_set", make_cross_cache},
        {NULL, do_gather_scales, "kvrt_gather_scales", make_q8_cache},
        {NULL, do_check, "kvrt_cache_check"},
        {NULL, do_stats, "kvrt_cache_stats_get"},
        {NULL, do_state_size, "kvrt_state_size"},
        {NULL, do_batch_create, "kvrt_batch_create"},
        {NULL, do_queries, "kvrt_seq_"},
        {NULL, do_sync, "kvrt_cache_s"},
    };
    for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++) {
        long n = 0;
        for (;; n++) {
            kvrt_cache *c = ops[i].make != NULL ? ops[i].make() : make_cache();
            if (c == NULL) { /* no prefix hash or quantized cache in this build */
                n = -1;
                break;
            }
            if (ops[i].prep != NULL)
                ops[i].prep(c);
            image before = take_image(c);
            allocations = 0;
            fail_in = n;
            kvrt_status st = ops[i].fn(c);
            fail_in = -1;
            char msg[512];
            snprintf(msg, sizeof msg, "%s", kvrt_last_error());
            /* a call may recover from a refused allocation it can do without
             * (a size hint); the sweep ends when none was refused */
            int done = st == KVRT_OK && allocations <= n;
            if (st == KVRT_ERR_CACHE_LOST && ops[i].fn == do_clear && !sc_dev.on_host) {
                /* a device failure with the zeroing under way (kvrt.h,
                 * "Device failures"): the cache must say so, and clear */
                EXPECT(KVRT_ERR_CACHE_LOST, kvrt_seq_rm(c, 0, 0, -1));
                OK(kvrt_cache_clear(c));
                int64_t left = -1;
                OK(kvrt_seq_n_tokens(c, 0, &left));
                assert_int_equal(left, 0);
            } else if (st != KVRT_OK) {
                if (st != KVRT_ERR_OUT_OF_MEMORY || strncmp(msg, ops[i].name, strlen(ops[i].name)))
                    fail_msg("%s with allocation %ld failing: %s (%s), expected "
                             "KVRT_ERR_OUT_OF_MEMORY naming the call",
                             ops[i].name, n, kvrt_status_name(st), msg);
                image after = take_image(c);
                assert_same(&before, &after, ops[i].name, n);
                free(after.bytes);
            }
            free(before.bytes);
            kvrt_batch_destroy(g_batch);
            g_batch = NULL;
            kvrt_offload_free(g_offload);
            g_offload = NULL;
            kvrt_cache_destroy(c);
            if (done)
                break;
            assert_true(n < 500);
        }
        if (n < 0)
            print_message("%s: not in this build or on this backend\n", ops[i].name);
        else
            print_message("%s: each of its %ld host allocations failed in turn; cache unchanged\n",
                          ops[i].name, n);
    }
    free(g_saved.bytes);
    memset(&g_saved, 0, sizeof g_saved);
    unlink(g_path);
    sc_buf_free(&g_dq);
    sc_buf_free(&g_dout);
    sc_buf_free(&g_drows);
}

static void test_create_allocation_failures(void **state)
{
    (void)state;
    long n = 0;
    for (;; n++) {
        kvrt_cache_desc d = sc_desc(layers, LAYERS, KVRT_F16, BS, 64, 4);
        kvrt_cache *c = NULL;
        allocations = 0;
        fail_in = n;
        kvrt_status st = kvrt_cache_create(&d, &c);
        fail_in = -1;
        if (st == KVRT_OK) {
            OK(kvrt_cache_check(c));
            kvrt_cache_destroy(c);
            break;
        }
        if (st != KVRT_ERR_OUT_OF_MEMORY || c != NULL ||
            strncmp(kvrt_last_error(), "kvrt_cache_create: ", 19) != 0)
            fail_msg("allocation %ld failing: %s, cache %p (%s)", n, kvrt_status_name(st),
                     (void *)c, kvrt_last_error());
        assert_true(n < 500);
    }
    print_message("kvrt_cache_create: each of its %ld host allocations failed in turn\n", n);
}

static void test_create_shared_allocation_failures(void **state)
{
    (void)state;
    long n = 0;
    for (;; n++) {
        kvrt_cache *base = make_cache();
        image before = take_image(base);
        kvrt_layer_desc own[LAYERS] = {layers[0], layers[1]};
        kvrt_cache_desc d = sc_desc(own, LAYERS, KVRT_F16, BS, 64, 4);
        d.rope.n_rot = DIM;
        int base_layers[LAYERS] = {0, -1}; /* one layer of its own */
        kvrt_cache *draft = NULL;
        allocations = 0;
        fail_in = n;
        kvrt_status st = kvrt_cache_create_shared(base, &d, base_layers, &draft);
        fail_in = -1;
        char msg[512];
        snprintf(msg, sizeof msg, "%s", kvrt_last_error());
        image after = take_image(base);
        if (st != KVRT_OK)
            assert_same(&before, &after, "kvrt_cache_create_shared", n);
        free(before.bytes);
        free(after.bytes);
        if (st == KVRT_OK) {
            assert_non_null(draft);
            kvrt_cache_destroy(draft);
            kvrt_cache_destroy(base);
            break;
        }
        if (st != KVRT_ERR_OUT_OF_MEMORY || draft != NULL ||
            strncmp(msg, "kvrt_cache_create_shared: ", 26) != 0)
            fail_msg("allocation %ld failing: %s, draft %p (%s)", n, kvrt_status_name(st),
                     (void *)draft, msg);
        kvrt_cache_destroy(base);
        assert_true(n < 500);
    }
    print_message("kvrt_cache_create_shared: each of its %ld host allocations failed in turn\n",
                  n);
}

/* ---- create_shared given the base's own description ---- */

static void test_create_shared_from_get_desc(void **state)
{
    (void)state;
    kvrt_cache *base = make_cache();
    const kvrt_cache_desc *d = kvrt_cache_get_desc(base);
    kvrt_layer_desc want[LAYERS];
    memcpy(want, d->layers, sizeof want);
    int base_layers[LAYERS] = {-1, -1}; /* own layers: base's table grows (is moved) */
    kvrt_cache *draft = NULL;
    OK(kvrt_cache_create_shared(base, d, base_layers, &draft));
    const kvrt_cache_desc *dd = kvrt_cache_get_desc(draft);
    assert_int_equal(dd->n_layers, LAYERS);
    assert_memory_equal(dd->layers, want, sizeof want);
    kvrt_cache_destroy(draft);
    kvrt_cache_destroy(base);
}

/* ---- kvrt_batch_plan_tokens names itself once ---- */

static void test_plan_tokens_message(void **state)
{
    (void)state;
    kvrt_cache_desc d = test_desc(layers, LAYERS, KVRT_F16, BS, 64, 2);
    d.prefix_cache = KVRT_PREFIX_XXH3;
    kvrt_cache *c = NULL;
    kvrt_status st = kvrt_cache_create(&d, &c);
    if (st == KVRT_ERR_UNSUPPORTED) { /* built without xxHash: the other hash */
        d.prefix_cache = KVRT_PREFIX_BLAKE2B;
        st = kvrt_cache_create(&d, &c);
    }
    if (st == KVRT_ERR_UNSUPPORTED)
        skip();
    OK(st);
    kvrt_batch *b = NULL;
    OK(kvrt_batch_create(c, 4, &b));
    int32_t seq = 7, pos = 0, tok = 1; /* seq 7 >= max_seqs: refused by the plan */
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_batch_plan_tokens(c, 1, &seq, &pos, &tok, 1, b));
    const char *m = kvrt_last_error();
    if (strncmp(m, "kvrt_batch_plan_tokens: ", 24) != 0 || strstr(m, "kvrt_batch_plan:") != NULL)
        fail_msg("message \"%s\": the call's name once, then what is wrong", m);
    kvrt_batch_destroy(b);
    kvrt_cache_destroy(c);
}

/* ---- n_threads beyond what can be created ---- */

static void test_many_threads_capped(void **state)
{
    (void)state;
#if defined(__SANITIZE_ADDRESS__)
    skip(); /* the shadow memory needs more address space than the limit */
#elif defined(__has_feature)
#  if __has_feature(address_sanitizer)
    skip();
#  endif
#endif
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        /* 1 GiB of address space: 4096 thread stacks (libgomp's default
         * is the process stack size, 8 MiB) cannot be mapped */
        struct rlimit rl = {(rlim_t)1 << 30, (rlim_t)1 << 30};
        setrlimit(RLIMIT_AS, &rl);
        kvrt_cache_desc d = test_desc(layers, LAYERS, KVRT_F16, BS, 64, 4);
        d.n_threads = 4096;
        kvrt_cache *c = NULL;
        if (kvrt_cache_create(&d, &c) != KVRT_OK)
            _exit(3);
        kvrt_batch *b = NULL;
        int32_t seqs[100], pos[100];
        for (int i = 0; i < 100; i++)
            seqs[i] = 0, pos[i] = i;
        static float k[100 * HEADS * DIM];
        if (kvrt_batch_create(c, 100, &b) != KVRT_OK ||
            kvrt_batch_plan(c, 100, seqs, pos, b) != KVRT_OK ||
            kvrt_write(c, b, 0, k, k, KVRT_F32, NULL) != KVRT_OK)
            _exit(4);
        kvrt_batch_destroy(b);
        kvrt_cache_destroy(c);
        _exit(0);
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fail_msg("kvrt_write with n_threads 4096 under a 1 GiB address space: the process "
                 "ended with status %d (the library must not end it)",
                 WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status));
}

/* ---- a layer RoPE base of -0 ---- */

static void test_negative_zero_theta(void **state)
{
    (void)state;
    kvrt_layer_desc l[2] = {layers[0], layers[1]};
    l[1].rope_theta = -0.0f; /* accepted once, then its own state and offload were refused */
    kvrt_cache_desc d = test_desc(l, 2, KVRT_F16, BS, 64, 4);
    d.rope.n_rot = DIM;
    kvrt_cache *c = NULL;
    EXPECT(KVRT_ERR_INVALID_ARG, kvrt_cache_create(&d, &c));
    assert_null(c);
    assert_non_null(strstr(kvrt_last_error(), "rope_theta"));
    /* a layer base of its own: the cache restores its own offload */
    l[1].rope_theta = 500000.0f;
    OK(kvrt_cache_create(&d, &c));
    kvrt_batch *b = NULL;
    OK(kvrt_batch_create(c, 8, &b));
    int32_t seqs[8] = {0}, pos[8];
    static float k[8 * HEADS * DIM];
    for (int i = 0; i < 8; i++)
        pos[i] = i;
    for (int i = 0; i < 8 * HEADS * DIM; i++)
        k[i] = test_value(0, i / (HEADS * DIM), i);
    OK(kvrt_batch_plan(c, 8, seqs, pos, b));
    for (int j = 0; j < 2; j++)
        OK(kvrt_write(c, b, j, k, k, KVRT_F32, NULL));
    kvrt_offload *off = NULL;
    OK(kvrt_seq_offload(c, 0, &off));
    OK(kvrt_seq_restore(c, 0, off));
    int64_t n = 0;
    OK(kvrt_seq_n_tokens(c, 0, &n));
    assert_int_equal(n, 8);
    kvrt_offload_free(off);
    kvrt_batch_destroy(b);
    kvrt_cache_destroy(c);
}

/* ---- 8-bit rows holding +-FLT_MAX ---- */

static void test_quant_flt_max(void **state)
{
    (void)state;
    const kvrt_dtype dts[2] = {KVRT_Q8, KVRT_FP8_E4M3};
    for (int t = 0; t < 2; t++) {
        kvrt_cache_desc d = test_desc(layers, 1, dts[t], BS, 16, 1);
        kvrt_cache *c = NULL;
        OK(kvrt_cache_create(&d, &c));
        kvrt_batch *b = NULL;
        OK(kvrt_batch_create(c, 1, &b));
        int32_t seq = 0, p = 0;
        OK(kvrt_batch_plan(c, 1, &seq, &p, b));
        float k[HEADS * DIM], v[HEADS * DIM], got[HEADS * DIM];
        for (int i = 0; i < HEADS * DIM; i++)
            k[i] = v[i] = (float)(i % 5) - 2.0f;
        k[0] = v[0] = 3.40282347e38f; /* FLT_MAX */
        k[1] = v[1] = -3.40282347e38f;
        OK(kvrt_write(c, b, 0, k, v, KVRT_F32, NULL));
        int64_t n = 0;
        OK(kvrt_gather_as(c, 0, 0, 0, -1, got, NULL, NULL, KVRT_F32, 1, &n, NULL));
        assert_int_equal(n, 1);
        for (int i = 0; i < HEADS * DIM; i++)
            if (!isfinite(got[i]))
                fail_msg("%s: element %d written as %g reads back as %g", kvrt_dtype_name(dts[t]),
                         i, (double)k[i], (double)got[i]);
        /* within half a step of the largest (q8: amax / 254; fp8: 2^-4 of it) */
        double step = dts[t] == KVRT_Q8 ? 3.40282347e38 / 254 : 3.40282347e38 / 16;
        assert_true(fabs((double)got[0] - 3.40282347e38) <= step);
        assert_true(fabs((double)got[1] + 3.40282347e38) <= step);
        kvrt_batch_destroy(b);
        kvrt_cache_destroy(c);
    }
}

int main(void)
{
    int status = sc_backend_init();
    if (status != 0)
        return status;
    const struct CMUnitTest sweeps[] = {
        cmocka_unit_test(test_edit_allocation_failures),
        cmocka_unit_test(test_create_allocation_failures),
        cmocka_unit_test(test_create_shared_allocation_failures),
        cmocka_unit_test(test_step_allocation_failures),
    };
    if (!sc_dev.on_host) { /* the rest is the CPU's */
        status = cmocka_run_group_tests(sweeps, NULL, NULL);
        sc_backend_fini();
        return status;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_edit_allocation_failures),
        cmocka_unit_test(test_create_allocation_failures),
        cmocka_unit_test(test_create_shared_allocation_failures),
        cmocka_unit_test(test_step_allocation_failures),
        cmocka_unit_test(test_create_shared_from_get_desc),
        cmocka_unit_test(test_plan_tokens_message),
        cmocka_unit_test(test_many_threads_capped),
        cmocka_unit_test(test_negative_zero_theta),
        cmocka_unit_test(test_quant_flt_max),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
