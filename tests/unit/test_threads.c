/*
 * test_threads.c: one cache used from two threads at once (kvrt.h,
 * "Threads"). A cache and its shared handles take one call at a time; a
 * call arriving while another thread is inside one must return
 * KVRT_ERR_BUSY naming itself and change nothing, where it once corrupted
 * the undo journal (a use after free under ASan):
 *   - held: a thread stops inside kvrt_state_write (in its writer) while
 *     the other calls every entry on the cache and on a shared handle: each
 *     must be KVRT_ERR_BUSY with its own name, and the cache unchanged;
 *   - callbacks: a state writer or reader calling back into its own cache
 *     is refused the same way;
 *   - hammered: two threads edit their own sequences of one cache as fast as
 *     they can, retrying what was refused; the cache must end exactly as
 *     the edits say (each thread's edits undo themselves) and check clean.
 * Worker threads record what they saw; the assertions run on the main
 * thread (cmocka's are not thread-safe).
 */
#include <pthread.h>
#include <sched.h>

#include "common.h"

enum { LAYERS = 2, HEADS = 2, DIM = 16, BS = 4, SEQS = 4, TOKENS_0 = 14, TOKENS_1 = 10 };

static kvrt_layer_desc layers[LAYERS] = {
    {KVRT_LAYER_ATTN, HEADS, DIM, DIM},
    {KVRT_LAYER_ATTN, HEADS, DIM, DIM},
};

/* Sequences 0 and 1 hold TOKENS_0 and TOKENS_1 written tokens; 2 and 3 are empty. */
static kvrt_cache *make_cache(void)
{
    /* no RoPE: a shift moves positions and leaves the rows bit for bit */
    kvrt_cache_desc d = test_desc(layers, LAYERS, KVRT_F16, BS, 64, SEQS);
    kvrt_cache *c = NULL;
    OK(kvrt_cache_create(&d, &c));
    kvrt_batch *b = NULL;
    enum { N = TOKENS_0 + TOKENS_1 };
    OK(kvrt_batch_create(c, N, &b));
    int32_t seqs[N], pos[N];
    for (int i = 0; i < N; i++) {
        seqs[i] = i < TOKENS_0 ? 0 : 1;
        pos[i] = i < TOKENS_0 ? i : i - TOKENS_0;
    }
    OK(kvrt_batch_plan(c, N, seqs, pos, b));
    static float k[N * HEADS * DIM], v[N * HEADS * DIM];
    for (int l = 0; l < LAYERS; l++) {
        for (int e = 0; e < N * HEADS * DIM; e++) {
            k[e] = test_value(l, e / (HEADS * DIM), e);
            v[e] = test_value(l + 7, e / (HEADS * DIM), e);
        }
        OK(kvrt_write(c, b, l, k, v, KVRT_F32, NULL));
    }
    kvrt_batch_destroy(b);
    return c;
}

/* ---- what the cache holds (common.h's image) ---- */

static void assert_same(const image *a, const image *b, const char *what)
{
    if (a->n != b->n || memcmp(a->bytes, b->bytes, a->n) != 0 ||
        memcmp(&a->stats, &b->stats, sizeof a->stats) != 0)
        fail_msg("%s changed the cache (state %zu -> %zu bytes; blocks used %lld -> %lld)", what,
                 a->n, b->n, (long long)a->stats.blocks_used, (long long)b->stats.blocks_used);
}

/* ---- a thread held inside a call ---- */

typedef struct hold {
    pthread_mutex_t mu;
    pthread_cond_t  cv;
    int             inside, released;
    kvrt_cache     *cache;
    kvrt_status     status; /* of the held call */
} hold;

/* A state writer that, on its first call, says it is inside and waits to
 * be released. */
static kvrt_status holding_writer(void *user, const void *data, size_t size)
{
    (void)data, (void)size;
    hold *h = user;
    pthread_mutex_lock(&h->mu);
    if (!h->inside) {
        h->inside = 1;
        pthread_cond_broadcast(&h->cv);
        while (!h->released)
            pthread_cond_wait(&h->cv, &h->mu);
    }
    pthread_mutex_unlock(&h->mu);
    return KVRT_OK;
}

static void *held_call(void *arg)
{
    hold *h = arg;
    h->status = kvrt_state_write(h->cache, 0, holding_writer, h);
    return NULL;
}

static kvrt_status nop_writer(void *user, const void *data, size_t size)
{
    (void)user, (void)data, (void)size;
    return KVRT_OK;
}

/* Each call must be refused as busy, under its own name. */
#define BUSY(name, expr)                                                                       \
    do {                                                                                       \
        kvrt_status st_ = (expr);                                                              \
        if (st_ != KVRT_ERR_BUSY)                                                              \
            fail_msg("%s while another thread is inside: %s (%s), expected KVRT_ERR_BUSY",      \
                     #expr, kvrt_status_name(st_), kvrt_last_error());                          \
        if (strncmp(kvrt_last_error(), name ": ", strlen(name) + 2) != 0)                      \
            fail_msg("%s: message \"%s\" does not start with \"%s: \"", #expr,                  \
                     kvrt_last_error(), name);                                                 \
    } while (0)

static void test_busy_while_held(void **state)
{
    (void)state;
    kvrt_cache *c = make_cache();
    kvrt_cache *h = NULL; /* a handle sharing every layer of c */
    OK(kvrt_cache_create_shared(c, kvrt_cache_get_desc(c), NULL, &h));
    kvrt_batch *b = NULL;
    OK(kvrt_batch_create(c, 4, &b));
    image before = take_image(c);

    hold hd = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, c, KVRT_ERR_INTERNAL};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, held_call, &hd), 0);
    pthread_mutex_lock(&hd.mu);
    while (!hd.inside)
        pthread_cond_wait(&hd.cv, &hd.mu);
    pthread_mutex_unlock(&hd.mu);

    /* the other thread is inside kvrt_state_write on c */
    int32_t seq = 2, p = 0, p32;
    int64_t n64;
    uint64_t bytes;
    int ok;
    float buf[HEADS * DIM];
    kvrt_cache_stats stats;
    kvrt_seq_group_info info;
    kvrt_offload *off = NULL;
    kvrt_cache *h2 = NULL;
    BUSY("kvrt_seq_rm", kvrt_seq_rm(c, 1, 0, -1));
    BUSY("kvrt_seq_rm", kvrt_seq_rm(h, 1, 0, -1)); /* a handle on the same memory */
    BUSY("kvrt_seq_cp", kvrt_seq_cp(c, 1, 3, 0, -1));
    BUSY("kvrt_seq_keep", kvrt_seq_keep(c, 1));
    BUSY("kvrt_seq_shift", kvrt_seq_shift(c, 1, 0, -1, 3));
    BUSY("kvrt_seq_div", kvrt_seq_div(c, 1, 0, -1, 2));
    BUSY("kvrt_cache_compact", kvrt_cache_compact(c));
    BUSY("kvrt_cache_clear", kvrt_cache_clear(h));
    BUSY("kvrt_batch_plan", kvrt_batch_plan(c, 1, &seq, &p, b));
    BUSY("kvrt_batch_create", kvrt_batch_create(h, 4, &b));
    BUSY("kvrt_write", kvrt_write(c, b, 0, buf, buf, KVRT_F32, NULL));
    BUSY("kvrt_attention", kvrt_attention(c, b, 0, buf, buf, NULL, NULL));
    BUSY("kvrt_gather", kvrt_gather(c, 0, 0, 0, 1, buf, buf, &p32, 1, &n64, NULL));
    BUSY("kvrt_seq_pos_max", kvrt_seq_pos_max(h, 0, &p32));
    BUSY("kvrt_seq_pos_min", kvrt_seq_pos_min(c, 0, &p32));
    BUSY("kvrt_seq_n_tokens", kvrt_seq_n_tokens(c, 0, &n64));
    BUSY("kvrt_seq_group_info_get", kvrt_seq_group_info_get(c, 0, 0, &info));
    BUSY("kvrt_seq_can_resume", kvrt_seq_can_resume(c, 0, 3, &ok));
    BUSY("kvrt_cache_stats_get", kvrt_cache_stats_get(c, -1, &stats));
    BUSY("kvrt_cache_check", kvrt_cache_check(h));
    BUSY("kvrt_cache_sync", kvrt_cache_sync(c));
    BUSY("kvrt_cache_set_stream", kvrt_cache_set_stream(c, NULL));
    BUSY("kvrt_state_size", kvrt_state_size(c, 1, &bytes));
    BUSY("kvrt_state_write", kvrt_state_write(c, 1, nop_writer, NULL));
    BUSY("kvrt_seq_offload", kvrt_seq_offload(c, 1, &off));
    assert_null(off);
    BUSY("kvrt_cache_create_shared", kvrt_cache_create_shared(h, kvrt_cache_get_desc(c), NULL, &h2));
    assert_null(h2);

    pthread_mutex_lock(&hd.mu);
    hd.released = 1;
    pthread_cond_broadcast(&hd.cv);
    pthread_mutex_unlock(&hd.mu);
    assert_int_equal(pthread_join(t, NULL), 0);
    OK(hd.status);

    /* nothing changed, and the cache takes calls again */
    image after = take_image(c);
    assert_same(&before, &after, "calls refused as busy");
    OK(kvrt_batch_plan(c, 1, &seq, &p, b));
    OK(kvrt_seq_rm(h, 2, 0, -1));
    free(before.bytes);
    free(after.bytes);
    kvrt_batch_destroy(b);
    kvrt_cache_destroy(h);
    kvrt_cache_destroy(c);
}

/* ---- callbacks calling back into their own cache ---- */

typedef struct reentry {
    kvrt_cache *cache;
    image       im;
    size_t      at;     /* reader: bytes of im delivered */
    kvrt_status inner;  /* of the call made from the callback */
    char        message[512];
} reentry;

static kvrt_status reentering_writer(void *user, const void *data, size_t size)
{
    reentry *r = user;
    if (r->inner == KVRT_OK) {
        r->inner = kvrt_seq_rm(r->cache, 1, 0, -1);
        snprintf(r->message, sizeof r->message, "%s", kvrt_last_error());
    }
    return append(&r->im, data, size);
}

static kvrt_status reentering_reader(void *user, void *data, size_t size, size_t *got)
{
    reentry *r = user;
    if (r->inner == KVRT_OK) {
        int32_t p;
        r->inner = kvrt_seq_pos_max(r->cache, 3, &p);
        snprintf(r->message, sizeof r->message, "%s", kvrt_last_error());
    }
    size_t n = r->im.n - r->at < size ? r->im.n - r->at : size;
    memcpy(data, r->im.bytes + r->at, n);
    r->at += n;
    *got = n;
    return KVRT_OK;
}

static void test_busy_from_callback(void **state)
{
    (void)state;
    kvrt_cache *c = make_cache();
    image before = take_image(c);
    reentry r = {c, {0}, 0, KVRT_OK, ""};
    OK(kvrt_state_write(c, 0, reentering_writer, &r));
    assert_int_equal(r.inner, KVRT_ERR_BUSY);
    if (strncmp(r.message, "kvrt_seq_rm: called from a state writer", 39) != 0)
        fail_msg("writer's kvrt_seq_rm: \"%s\"", r.message);
    image mid = take_image(c);
    assert_same(&before, &mid, "kvrt_seq_rm from a state writer");

    r.inner = KVRT_OK;
    OK(kvrt_state_read(c, 3, reentering_reader, &r));
    assert_int_equal(r.inner, KVRT_ERR_BUSY);
    if (strncmp(r.message, "kvrt_seq_pos_max: called from a state writer or reader", 54) != 0)
        fail_msg("reader's kvrt_seq_pos_max: \"%s\"", r.message);
    int64_t n;
    OK(kvrt_seq_n_tokens(c, 3, &n)); /* the read itself went through */
    assert_int_equal(n, TOKENS_0);
    free(before.bytes);
    free(mid.bytes);
    free(r.im.bytes);
    kvrt_cache_destroy(c);
}

/* ---- two threads hammering one cache ---- */

enum { ROUNDS = 300 };

typedef struct hammer {
    kvrt_cache *cache;
    int32_t     own, spare;      /* the sequence it edits, and one it copies into */
    int32_t     n_tokens;        /* of own */
    long        busy, done;      /* calls refused, rounds completed */
    char        error[512];      /* the first unexpected status; "" none */
} hammer;

/* Calls expr until it is not refused as busy; records anything but OK. */
#define RETRY(hm, expr)                                                                        \
    do {                                                                                       \
        kvrt_status st_;                                                                       \
        while ((st_ = (expr)) == KVRT_ERR_BUSY) {                                              \
            (hm)->busy++;                                                                      \
            sched_yield();                                                                     \
        }                                                                                      \
        if (st_ != KVRT_OK && (hm)->error[0] == '\0')                                          \
            snprintf((hm)->error, sizeof (hm)->error, "%s -> %s: %s", #expr,                   \
                     kvrt_status_name(st_), kvrt_last_error());                                \
    } while (0)

/* Each round leaves its sequences as they were: copy own into spare and
 * drop it, move own's positions up by 3 and back, and every fourth round
 * offload own and restore it. */
static void *hammer_thread(void *arg)
{
    hammer *hm = arg;
    kvrt_cache *c = hm->cache;
    for (int i = 0; i < ROUNDS && hm->error[0] == '\0'; i++) {
        RETRY(hm, kvrt_seq_cp(c, hm->own, hm->spare, 0, -1));
        int64_t n = -1;
        RETRY(hm, kvrt_seq_n_tokens(c, hm->spare, &n));
        if (n != hm->n_tokens && hm->error[0] == '\0')
            snprintf(hm->error, sizeof hm->error, "round %d: copy holds %lld tokens, not %d", i,
                     (long long)n, (int)hm->n_tokens);
        RETRY(hm, kvrt_seq_rm(c, hm->spare, 0, -1));
        RETRY(hm, kvrt_seq_shift(c, hm->own, 0, -1, 3));
        int32_t top = -1;
        RETRY(hm, kvrt_seq_pos_max(c, hm->own, &top));
        if (top != hm->n_tokens - 1 + 3 && hm->error[0] == '\0')
            snprintf(hm->error, sizeof hm->error, "round %d: shifted pos_max %d, not %d", i,
                     (int)top, (int)(hm->n_tokens - 1 + 3));
        RETRY(hm, kvrt_seq_shift(c, hm->own, 0, -1, -3));
        if (i % 4 == 0) {
            kvrt_offload *off = NULL;
            RETRY(hm, kvrt_seq_offload(c, hm->own, &off));
            RETRY(hm, kvrt_seq_restore(c, hm->own, off));
            kvrt_offload_free(off);
        }
        hm->done++;
    }
    return NULL;
}

static void test_two_threads_hammer(void **state)
{
    (void)state;
    kvrt_cache *c = make_cache();
    image before = take_image(c);
    hammer a = {c, 0, 2, TOKENS_0, 0, 0, ""}, b = {c, 1, 3, TOKENS_1, 0, 0, ""};
    pthread_t ta, tb;
    assert_int_equal(pthread_create(&ta, NULL, hammer_thread, &a), 0);
    assert_int_equal(pthread_create(&tb, NULL, hammer_thread, &b), 0);
    assert_int_equal(pthread_join(ta, NULL), 0);
    assert_int_equal(pthread_join(tb, NULL), 0);
    if (a.error[0] != '\0')
        fail_msg("thread on seq 0: %s", a.error);
    if (b.error[0] != '\0')
        fail_msg("thread on seq 1: %s", b.error);
    assert_int_equal(a.done, ROUNDS);
    assert_int_equal(b.done, ROUNDS);
    print_message("calls refused as busy: %ld and %ld\n", a.busy, b.busy);
    /* every round undid itself: the cache is as it began (a shift back and
     * forth and an offload and restore leave the same rows and positions) */
    image after = take_image(c);
    assert_same(&before, &after, "the hammered rounds");
    free(before.bytes);
    free(after.bytes);
    kvrt_cache_destroy(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_busy_while_held),
        cmocka_unit_test(test_busy_from_callback),
        cmocka_unit_test(test_two_threads_hammer),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
