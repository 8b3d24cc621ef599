/*
 * test_sim_faults.c: a failed device call inside any operation of a step or
 * any edit returns a device status naming the runtime call, and leaves the
 * cache exactly as it was, or returns KVRT_ERR_CACHE_LOST (kvrt.h, "Device
 * failures"), after which the cache refuses work until kvrt_cache_clear
 * makes it usable again.
 *
 * For each operation (write, attention, plan (plain, with copy-on-write,
 * with a sliding window dropping blocks), rm and shift (one sequence and
 * every sequence), cp, keep, div, compact, clear, cross_set, gather, save,
 * load, offload, restore) the test builds a cache with the same contents
 * (shared blocks, holes, cross K/V, MLA and sliding-window layers), runs
 * the operation once to count its allocations, copies and launches with
 * kvrt-sim's counters, then for each kind and each i in 1..count rebuilds
 * the cache, makes the i-th call of that kind fail (kvrt_sim_fail_at) and
 * runs the operation again. Then:
 *   - KVRT_ERR_DEVICE / KVRT_ERR_OUT_OF_MEMORY (an allocation's): the
 *     message starts with the operation's function and names the runtime
 *     call and its error, and every layer and sequence gathered again
 *     equals the snapshot taken before (positions and rows bit-exact), as
 *     do the statistics of every group and every sequence's group info,
 *     and kvrt_cache_check passes;
 *   - KVRT_ERR_CACHE_LOST: allowed only where kvrt.h ("Device failures")
 *     allows it: a shift or div after its RoPE re-rotation ran, a clear, a
 *     plan that drops blocks from a sliding window;
 *     the message names the runtime call and its error and says the cache
 *     must be cleared; the next edit and kvrt_cache_check are refused with
 *     KVRT_ERR_CACHE_LOST; kvrt_cache_clear succeeds and leaves an empty
 *     cache that passes kvrt_cache_check; building the same contents again
 *     on that cache gives the snapshot again;
 *   - KVRT_OK: only for attention with an allocation failing (its split
 *     workspace falls back to fewer splits); kvrt_cache_check passes.
 * Every injected fault must have been reached (the counters pass it).
 *
 * Built once per sim flavour (warp 32 as CUDA, warp 64 as HIP); the
 * argument names the backend. Prints one line per operation: faults
 * injected, restored, lost.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu_test.h" /* CHECK, gpu_test_result */
#include "kvrt.h"
#include "kvrt_sim.h"

/* A setup call that must succeed: the test cannot go on otherwise. */
#define MUST(expr)                                                                           \
    do {                                                                                     \
        kvrt_status must_st_ = (expr);                                                       \
        if (must_st_ != KVRT_OK) {                                                           \
            fprintf(stderr, "%s:%d: %s -> %s: %s\n", __FILE__, __LINE__, #expr,              \
                    kvrt_status_name(must_st_), kvrt_last_error());                          \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

enum { N_LAYERS = 4, MAX_SEQS = 4, BLOCK = 4, N_BLOCKS = 24, MAX_ROWS = 32, CROSS_LEN = 8 };
enum { L_ATTN = 0, L_SWA = 1, L_MLA = 2, L_CROSS = 3 };

static const kvrt_layer_desc layers[N_LAYERS] = {
    {KVRT_LAYER_ATTN, 2, 32, 16, 0, 0, 0},
    {KVRT_LAYER_ATTN, 1, 16, 16, 16, 0, 0},
    {KVRT_LAYER_MLA, 0, 0, 0, 0, 32, 16},
    {KVRT_LAYER_CROSS, 2, 16, 16, 0, 0, 0},
};
static const int q_heads[N_LAYERS] = {4, 2, 4, 2};

static kvrt_backend backend;

static int64_t k_elems(int l)
{
    return layers[l].kind == KVRT_LAYER_MLA ? layers[l].latent_dim + layers[l].rope_dim
                                            : (int64_t)layers[l].n_kv_heads * layers[l].head_dim_k;
}

static int64_t v_elems(int l)
{
    return layers[l].kind == KVRT_LAYER_MLA ? 0 : (int64_t)layers[l].n_kv_heads * layers[l].head_dim_v;
}

static int64_t q_elems(int l)
{
    return (int64_t)q_heads[l] * (layers[l].kind == KVRT_LAYER_MLA
                                      ? layers[l].latent_dim + layers[l].rope_dim
                                      : layers[l].head_dim_k);
}

static int64_t out_elems(int l)
{
    return (int64_t)q_heads[l] * (layers[l].kind == KVRT_LAYER_MLA ? layers[l].latent_dim
                                                                   : layers[l].head_dim_v);
}

/* Device buffers of f32 inputs (MAX_ROWS rows of every layer's K, V, q) and
 * attention outputs, allocated once, before any fault is armed. */
static void *dev_k[N_LAYERS], *dev_v[N_LAYERS], *dev_q[N_LAYERS], *dev_out[N_LAYERS];
/* Where snapshots gather to (device memory: gathers then need no
 * synchronization each), [layer][seq] K rows then V rows. */
static uint16_t *dev_snap[N_LAYERS][MAX_SEQS];
static size_t snap_bytes;

/* One device allocation holds them all: every allocation costs the sim
 * work at each stream execution. */
static float *dev_pool, *host_pool;
static size_t pool_used, pool_cap;

static void *device_values(int64_t n, uint32_t seed)
{
    uint32_t x = seed * 2654435761u + 1;
    float *host = host_pool + pool_used;
    for (int64_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        host[i] = (float)(x % 2001) / 1000.0f - 1.0f;
    }
    void *p = dev_pool + pool_used;
    pool_used += ((size_t)n + 63) / 64 * 64;
    return p;
}

static void inputs_init(void)
{
    pool_cap = 0;
    for (int l = 0; l < N_LAYERS; l++)
        pool_cap += (size_t)(MAX_ROWS * (k_elems(l) + v_elems(l) + q_elems(l) + out_elems(l))) + 4 * 64 +
                    MAX_SEQS * ((size_t)(MAX_ROWS * (k_elems(l) + v_elems(l))) / 2 + 64);
    host_pool = calloc(pool_cap, sizeof(float));
    if (host_pool == NULL || cudaMalloc((void **)&dev_pool, pool_cap * sizeof(float)) != cudaSuccess) {
        fprintf(stderr, "device inputs: allocation failed\n");
        exit(1);
    }
    for (int l = 0; l < N_LAYERS; l++) {
        dev_k[l] = device_values(MAX_ROWS * k_elems(l), 10 * l + 1);
        dev_v[l] = v_elems(l) > 0 ? device_values(MAX_ROWS * v_elems(l), 10 * l + 2) : NULL;
        dev_q[l] = device_values(MAX_ROWS * q_elems(l), 10 * l + 3);
        dev_out[l] = device_values(MAX_ROWS * out_elems(l), 10 * l + 4);
    }
    size_t snap_at = pool_used;
    for (int l = 0; l < N_LAYERS; l++)
        for (int q = 0; q < MAX_SEQS; q++) {
            dev_snap[l][q] = (uint16_t *)(void *)(dev_pool + pool_used);
            pool_used += ((size_t)(MAX_ROWS * (k_elems(l) + v_elems(l))) / 2 + 63) / 64 * 64;
        }
    snap_bytes = (pool_used - snap_at) * sizeof(float);
    if (cudaMemcpy(dev_pool, host_pool, pool_cap * sizeof(float), cudaMemcpyHostToDevice) != cudaSuccess) {
        fprintf(stderr, "device inputs: upload failed\n");
        exit(1);
    }
}

/* ---- the cache every run starts from ---- */

typedef struct fixture {
    kvrt_cache   *cache;
    kvrt_batch   *batch;
    uint8_t      *state;      /* kvrt_state_write of sequence 0 */
    size_t        state_len, state_cap;
    kvrt_offload *off;        /* an offload of sequence 2 (restore's) */
} fixture;

static void plan_write(fixture *f, int n, const int32_t *seqs, const int32_t *pos)
{
    MUST(kvrt_batch_plan(f->cache, n, seqs, pos, f->batch));
    for (int l = 0; l < N_LAYERS; l++)
        if (layers[l].kind != KVRT_LAYER_CROSS)
            MUST(kvrt_write(f->cache, f->batch, l, dev_k[l], dev_v[l], KVRT_F32, NULL));
}

/* Sequence 0: positions 0..9; 1: 0..5 shared with 0, then 6..8 of its own;
 * 2: 0..6 with a hole at 3; cross K/V for 0 (5 rows) and 2 (3 rows);
 * sequence 3 empty. The last plan (one token of 0, 1 and 2) stays current. */
static void contents_build(fixture *f)
{
    int32_t s0[10], p0[10];
    for (int i = 0; i < 10; i++) {
        s0[i] = 0;
        p0[i] = i;
    }
    plan_write(f, 10, s0, p0);
    MUST(kvrt_seq_cp(f->cache, 0, 1, 0, 6));
    int32_t s1[] = {1, 1, 2, 2, 2, 2, 2, 2}, p1[] = {6, 7, 0, 1, 2, 3, 4, 5};
    plan_write(f, 8, s1, p1);
    MUST(kvrt_seq_rm(f->cache, 2, 3, 4));
    MUST(kvrt_cross_set(f->cache, L_CROSS, 0, 5, dev_k[L_CROSS], dev_v[L_CROSS], KVRT_F32, NULL));
    MUST(kvrt_cross_set(f->cache, L_CROSS, 2, 3, dev_k[L_CROSS], dev_v[L_CROSS], KVRT_F32, NULL));
    int32_t s2[] = {0, 1, 2}, p2[] = {10, 8, 6};
    plan_write(f, 3, s2, p2);
    MUST(kvrt_cache_sync(f->cache));
}

static kvrt_status state_writer(void *user, const void *data, size_t size)
{
    fixture *f = user; /* state sized by kvrt_state_size (state_save) */
    if (size > f->state_cap - f->state_len)
        return KVRT_ERR_INTERNAL;
    memcpy(f->state + f->state_len, data, size);
    f->state_len += size;
    return KVRT_OK;
}

typedef struct reader_pos {
    const fixture *f;
    size_t         at;
} reader_pos;

static kvrt_status state_reader(void *user, void *data, size_t size, size_t *got)
{
    reader_pos *r = user;
    size_t left = r->f->state_len - r->at;
    *got = size < left ? size : left;
    memcpy(data, r->f->state + r->at, *got);
    r->at += *got;
    return KVRT_OK;
}

static void fixture_open(fixture *f)
{
    memset(f, 0, sizeof *f);
    kvrt_cache_desc d;
    kvrt_cache_desc_init(&d);
    d.device.backend = backend;
    d.dtype = KVRT_F16;
    d.n_layers = N_LAYERS;
    d.layers = layers;
    d.max_seqs = MAX_SEQS;
    d.block_size = BLOCK;
    d.n_blocks = N_BLOCKS;
    d.cross_max_len = CROSS_LEN;
    d.rope.n_rot = 16;
    MUST(kvrt_cache_create(&d, &f->cache));
    MUST(kvrt_batch_create(f->cache, MAX_ROWS, &f->batch));
    contents_build(f);
}

static void fixture_close(fixture *f)
{
    kvrt_offload_free(f->off);
    free(f->state);
    kvrt_batch_destroy(f->batch);
    kvrt_cache_destroy(f->cache);
}

/* ---- what a cache holds, as the API shows it ---- */

typedef struct snapshot {
    int64_t             n[N_LAYERS][MAX_SEQS];
    int32_t             pos[N_LAYERS][MAX_SEQS][MAX_ROWS];
    uint16_t           *k[N_LAYERS][MAX_SEQS], *v[N_LAYERS][MAX_SEQS];
    kvrt_cache_stats    stats[N_LAYERS + 1];
    kvrt_seq_group_info info[N_LAYERS][MAX_SEQS];
    int                 n_groups;
} snapshot;

static void snapshot_take(kvrt_cache *c, snapshot *s)
{
    memset(s, 0, sizeof *s);
    s->n_groups = kvrt_cache_n_groups(c);
    for (int l = 0; l < N_LAYERS; l++)
        for (int q = 0; q < MAX_SEQS; q++) {
            uint16_t *dk = dev_snap[l][q], *dv = dk + MAX_ROWS * k_elems(l);
            MUST(kvrt_gather(c, l, q, 0, -1, dk, v_elems(l) > 0 ? dv : NULL, s->pos[l][q], MAX_ROWS,
                             &s->n[l][q], NULL));
        }
    uint16_t *all = malloc(snap_bytes);
    if (all == NULL || cudaMemcpy(all, dev_snap[0][0], snap_bytes, cudaMemcpyDeviceToHost) != cudaSuccess) {
        fprintf(stderr, "snapshot: download failed\n");
        exit(1);
    }
    for (int l = 0; l < N_LAYERS; l++)
        for (int q = 0; q < MAX_SEQS; q++) {
            const uint16_t *at = all + (dev_snap[l][q] - dev_snap[0][0]);
            s->k[l][q] = calloc((size_t)(MAX_ROWS * k_elems(l)), sizeof(uint16_t));
            s->v[l][q] = calloc((size_t)(MAX_ROWS * (v_elems(l) + 1)), sizeof(uint16_t));
            memcpy(s->k[l][q], at, (size_t)(MAX_ROWS * k_elems(l)) * sizeof(uint16_t));
            memcpy(s->v[l][q], at + MAX_ROWS * k_elems(l), (size_t)(MAX_ROWS * v_elems(l)) * sizeof(uint16_t));
        }
    free(all);
    MUST(kvrt_cache_stats_get(c, -1, &s->stats[0]));
    for (int g = 0; g < s->n_groups; g++) {
        MUST(kvrt_cache_stats_get(c, g, &s->stats[g + 1]));
        for (int q = 0; q < MAX_SEQS; q++)
            MUST(kvrt_seq_group_info_get(c, q, g, &s->info[g][q]));
    }
}

static void snapshot_free(snapshot *s)
{
    for (int l = 0; l < N_LAYERS; l++)
        for (int q = 0; q < MAX_SEQS; q++) {
            free(s->k[l][q]);
            free(s->v[l][q]);
        }
}

/* 1 when a and b hold the same rows, positions, statistics and page tables. */
static int snapshot_same(const snapshot *a, const snapshot *b, char *why, size_t size)
{
    for (int l = 0; l < N_LAYERS; l++)
        for (int q = 0; q < MAX_SEQS; q++) {
            if (a->n[l][q] != b->n[l][q]) {
                snprintf(why, size, "layer %d seq %d: %lld rows, %lld before", l, q,
                         (long long)b->n[l][q], (long long)a->n[l][q]);
                return 0;
            }
            size_t n = (size_t)a->n[l][q];
            if (memcmp(a->pos[l][q], b->pos[l][q], n * sizeof(int32_t)) != 0 ||
                memcmp(a->k[l][q], b->k[l][q], n * (size_t)k_elems(l) * 2) != 0 ||
                memcmp(a->v[l][q], b->v[l][q], n * (size_t)v_elems(l) * 2) != 0) {
                snprintf(why, size, "layer %d seq %d: positions or rows differ", l, q);
                return 0;
            }
        }
    for (int g = 0; g <= a->n_groups; g++) {
        const kvrt_cache_stats *x = &a->stats[g], *y = &b->stats[g];
        /* a pool grown for the call keeps its new free blocks (kvrt.h) */
        if (y->blocks_total < x->blocks_total || y->bytes_device < x->bytes_device ||
            x->blocks_total - x->blocks_free != y->blocks_total - y->blocks_free ||
            x->blocks_used != y->blocks_used || x->blocks_shared != y->blocks_shared ||
            x->slots_live != y->slots_live || x->holes != y->holes ||
            x->blocks_cached != y->blocks_cached) {
            snprintf(why, size, "statistics of group %d differ (used %lld, %lld before; free "
                     "%lld, %lld before)", g - 1, (long long)y->blocks_used,
                     (long long)x->blocks_used, (long long)y->blocks_free, (long long)x->blocks_free);
            return 0;
        }
    }
    for (int g = 0; g < a->n_groups; g++)
        for (int q = 0; q < MAX_SEQS; q++)
            if (memcmp(&a->info[g][q], &b->info[g][q], sizeof a->info[g][q]) != 0) {
                snprintf(why, size, "group %d seq %d: group info differs", g, q);
                return 0;
            }
    return 1;
}

/* ---- the operations ---- */

typedef struct op {
    const char *name;     /* the public function whose message must lead */
    int         may_lose; /* 1: may return KVRT_ERR_CACHE_LOST */
    void (*prep)(fixture *f);                /* before the snapshot, no fault */
    kvrt_status (*run)(fixture *f);
} op;

static kvrt_status run_write(fixture *f)
{
    for (int l = 0; l < N_LAYERS; l++)
        if (layers[l].kind != KVRT_LAYER_CROSS) {
            kvrt_status st = kvrt_write(f->cache, f->batch, l, dev_k[l], dev_v[l], KVRT_F32, NULL);
            if (st != KVRT_OK)
                return st;
        }
    return KVRT_OK;
}

static kvrt_status run_attention(fixture *f)
{
    for (int l = 0; l < N_LAYERS; l++) {
        kvrt_attention_params p = {q_heads[l], 0.0f, 0.0f, KVRT_F32, KVRT_F32};
        kvrt_status st = kvrt_attention(f->cache, f->batch, l, dev_q[l], dev_out[l], &p, NULL);
        if (st != KVRT_OK)
            return st;
    }
    return kvrt_cache_sync(f->cache);
}

/* 0 and 1 continue their last blocks, 2 its block, 3 starts with two new
 * blocks; no row leaves the sliding window */
static kvrt_status run_plan(fixture *f)
{
    int32_t seqs[] = {0, 0, 1, 2, 3, 3, 3, 3, 3}, pos[] = {11, 12, 9, 7, 0, 1, 2, 3, 4};
    return kvrt_batch_plan(f->cache, 9, seqs, pos, f->batch);
}

/* 3, a fork of all of 0, continues 0's shared last block: copy-on-write */
static void prep_fork(fixture *f) { MUST(kvrt_seq_cp(f->cache, 0, 3, 0, -1)); }
static kvrt_status run_plan_cow(fixture *f)
{
    int32_t seqs[] = {3, 2}, pos[] = {11, 7};
    return kvrt_batch_plan(f->cache, 2, seqs, pos, f->batch);
}

/* 0 jumps to position 30: its first blocks leave layer 1's window */
static kvrt_status run_plan_evict(fixture *f)
{
    int32_t seqs[] = {0, 1}, pos[] = {30, 9};
    return kvrt_batch_plan(f->cache, 2, seqs, pos, f->batch);
}

static kvrt_status run_rm(fixture *f) { return kvrt_seq_rm(f->cache, 0, 2, 5); }
static kvrt_status run_rm_all(fixture *f) { return kvrt_seq_rm(f->cache, -1, 1, 3); }
static kvrt_status run_cp(fixture *f) { return kvrt_seq_cp(f->cache, 0, 3, 1, 9); }
static kvrt_status run_keep(fixture *f) { return kvrt_seq_keep(f->cache, 2); }
static kvrt_status run_shift(fixture *f) { return kvrt_seq_shift(f->cache, 1, 2, -1, 3); }
static kvrt_status run_shift_all(fixture *f) { return kvrt_seq_shift(f->cache, -1, 0, -1, 5); }
/* sequence 3 at positions 0, 3, 6, 9: divided by 3 they stay distinct */
static void prep_div(fixture *f)
{
    int32_t seqs[] = {3, 3, 3, 3}, pos[] = {0, 3, 6, 9};
    plan_write(f, 4, seqs, pos);
}
static kvrt_status run_div(fixture *f) { return kvrt_seq_div(f->cache, 3, 0, -1, 3); }
static kvrt_status run_compact(fixture *f) { return kvrt_cache_compact(f->cache); }
static kvrt_status run_clear(fixture *f) { return kvrt_cache_clear(f->cache); }

static kvrt_status run_cross_set(fixture *f)
{
    return kvrt_cross_set(f->cache, L_CROSS, 0, 7, dev_k[L_CROSS], dev_v[L_CROSS], KVRT_F32, NULL);
}

static kvrt_status run_gather(fixture *f)
{
    /* to host memory (device scratch, download) and to device memory */
    static uint16_t k[MAX_ROWS * 64], v[MAX_ROWS * 64];
    int32_t pos[MAX_ROWS];
    int64_t n = 0;
    kvrt_status st = kvrt_gather(f->cache, L_ATTN, 0, 0, -1, k, v, pos, MAX_ROWS, &n, NULL);
    if (st == KVRT_OK)
        st = kvrt_gather(f->cache, L_MLA, 1, 0, -1, dev_out[L_MLA], NULL, pos, MAX_ROWS, &n, NULL);
    return st;
}

/* kvrt_state_write of seq into f->state */
static kvrt_status state_save(fixture *f, int32_t seq)
{
    uint64_t bytes = 0;
    MUST(kvrt_state_size(f->cache, seq, &bytes));
    free(f->state);
    f->state = malloc((size_t)bytes);
    if (f->state == NULL)
        exit(1);
    f->state_cap = (size_t)bytes;
    f->state_len = 0;
    return kvrt_state_write(f->cache, seq, state_writer, f);
}

static kvrt_status run_save(fixture *f) { return state_save(f, -1); }

static void prep_state(fixture *f) { MUST(state_save(f, 0)); }

static kvrt_status run_load(fixture *f)
{
    reader_pos r = {f, 0};
    return kvrt_state_read(f->cache, 3, state_reader, &r);
}

static kvrt_status run_offload(fixture *f)
{
    kvrt_offload *off = NULL;
    kvrt_status st = kvrt_seq_offload(f->cache, 2, &off);
    kvrt_offload_free(off);
    return st;
}

static void prep_offload(fixture *f)
{
    kvrt_offload_free(f->off);
    MUST(kvrt_seq_offload(f->cache, 2, &f->off));
}

static kvrt_status run_restore(fixture *f) { return kvrt_seq_restore(f->cache, 3, f->off); }

static const op ops[] = {
    {"kvrt_write", 0, NULL, run_write},
    {"kvrt_attention", 0, NULL, run_attention},
    {"kvrt_batch_plan", 0, NULL, run_plan},
    {"kvrt_batch_plan", 0, prep_fork, run_plan_cow},
    {"kvrt_batch_plan", 1, NULL, run_plan_evict},
    {"kvrt_seq_rm", 0, NULL, run_rm},
    {"kvrt_seq_rm", 0, NULL, run_rm_all},
    {"kvrt_seq_cp", 0, NULL, run_cp},
    {"kvrt_seq_keep", 0, NULL, run_keep},
    {"kvrt_seq_shift", 1, NULL, run_shift},
    {"kvrt_seq_shift", 1, NULL, run_shift_all},
    {"kvrt_seq_div", 1, prep_div, run_div},
    {"kvrt_cache_compact", 0, NULL, run_compact},
    {"kvrt_cache_clear", 1, NULL, run_clear},
    {"kvrt_cross_set", 0, NULL, run_cross_set},
    {"kvrt_gather", 0, NULL, run_gather},
    {"kvrt_state_write", 0, NULL, run_save},
    {"kvrt_state_read", 0, prep_state, run_load},
    {"kvrt_seq_offload", 0, NULL, run_offload},
    {"kvrt_seq_restore", 0, prep_offload, run_restore},
};

static const char *const kind_names[KVRT_SIM_N_CALLS] = {"alloc", "copy", "launch"};

/* The runtime error an injected fault of `kind` returns (kvrt_sim.h). */
static const char *fault_error_name(int kind)
{
    cudaError_t err = kind == KVRT_SIM_ALLOC ? cudaErrorMemoryAllocation
                      : kind == KVRT_SIM_COPY ? cudaErrorInvalidValue
                                              : cudaErrorLaunchOutOfResources;
    return cudaGetErrorName(err);
}

/* 1 when msg names a runtime call of `kind`: "cudaMemcpyAsync",
 * "hipMemsetAsync", "cudaMalloc", "cuMemCreate", "write kernel", ... */
static int names_call(const char *msg, int kind)
{
    static const char *const words[KVRT_SIM_N_CALLS][3] = {
        {"Malloc", "MemCreate", "HostAlloc"}, {"Memcpy", "Memset", NULL}, {" kernel:", NULL, NULL}};
    for (int i = 0; i < 3; i++)
        if (words[kind][i] != NULL && strstr(msg, words[kind][i]) != NULL)
            return 1;
    return 0;
}

/* A lost cache: refused until cleared, then as good as new. */
static void check_recovery(const op *o, fixture *f, const snapshot *before, const char *what)
{
    kvrt_status st = kvrt_seq_rm(f->cache, 0, 0, 1);
    CHECK(st == KVRT_ERR_CACHE_LOST, "%s: an edit of a lost cache returned %s", what,
          kvrt_status_name(st));
    CHECK(kvrt_cache_check(f->cache) == KVRT_ERR_CACHE_LOST, "%s: check of a lost cache", what);
    st = kvrt_cache_clear(f->cache);
    CHECK(st == KVRT_OK, "%s: kvrt_cache_clear of a lost cache: %s", what, kvrt_last_error());
    if (st != KVRT_OK)
        return;
    st = kvrt_cache_check(f->cache);
    CHECK(st == KVRT_OK, "%s: after clear: %s", what, kvrt_last_error());
    kvrt_cache_stats s;
    MUST(kvrt_cache_stats_get(f->cache, -1, &s));
    CHECK(s.blocks_used == 0 && s.slots_live == 0, "%s: after clear: %lld blocks used", what,
          (long long)s.blocks_used);
    contents_build(f);
    if (o->prep != NULL)
        o->prep(f);
    snapshot again;
    snapshot_take(f->cache, &again);
    char why[256];
    CHECK(snapshot_same(before, &again, why, sizeof why), "%s: rebuilt after clear: %s", what, why);
    snapshot_free(&again);
}

/* The cache an operation starts from, and its snapshot. */
static void fixture_start(const op *o, fixture *f, snapshot *before)
{
    fixture_open(f);
    if (o->prep != NULL)
        o->prep(f);
    snapshot_take(f->cache, before);
    MUST(kvrt_cache_sync(f->cache));
}

/* Runs op with the nth call of kind failing; returns 1 if the cache was lost. */
static int fault_once(const op *o, int kind, long nth)
{
    fixture f;
    snapshot before;
    fixture_start(o, &f, &before);
    long at = kvrt_sim_calls(kind) + nth;
    kvrt_sim_fail_at(kind, at);
    kvrt_status st = o->run(&f);
    kvrt_sim_fail_at(kind, 0);
    char what[160];
    snprintf(what, sizeof what, "%s (%s fault %ld)", o->name, kind_names[kind], nth);
    CHECK(kvrt_sim_calls(kind) >= at, "%s: the fault was not reached", what);
    const char *msg = kvrt_last_error();
    int lost = 0;
    if (st == KVRT_ERR_DEVICE || st == KVRT_ERR_OUT_OF_MEMORY || st == KVRT_ERR_CACHE_LOST) {
        CHECK(strncmp(msg, o->name, strlen(o->name)) == 0, "%s: message '%s'", what, msg);
        CHECK(strstr(msg, fault_error_name(kind)) != NULL, "%s: message '%s' does not name %s",
              what, msg, fault_error_name(kind));
        CHECK(names_call(msg, kind), "%s: message '%s' names no %s call", what, msg,
              kind_names[kind]);
        CHECK(kind != KVRT_SIM_ALLOC || st != KVRT_ERR_DEVICE,
              "%s: an allocation failure is KVRT_ERR_OUT_OF_MEMORY: '%s'", what, msg);
    }
    if (st == KVRT_ERR_CACHE_LOST) {
        lost = 1;
        CHECK(o->may_lose, "%s: lost the cache: %s", what, msg);
        CHECK(strstr(msg, "must be cleared") != NULL, "%s: message '%s'", what, msg);
        check_recovery(o, &f, &before, what);
    } else if (st == KVRT_ERR_DEVICE || st == KVRT_ERR_OUT_OF_MEMORY) {
        snapshot after;
        snapshot_take(f.cache, &after);
        char why[256];
        CHECK(snapshot_same(&before, &after, why, sizeof why), "%s -> %s: %s (%s)", what,
              kvrt_status_name(st), why, msg);
        snapshot_free(&after);
        kvrt_status ck = kvrt_cache_check(f.cache);
        CHECK(ck == KVRT_OK, "%s: kvrt_cache_check: %s", what, kvrt_last_error());
    } else if (st == KVRT_OK) {
        /* only attention's split workspace has a fallback */
        CHECK(kind == KVRT_SIM_ALLOC && strcmp(o->name, "kvrt_attention") == 0,
              "%s: succeeded although a device call failed", what);
        kvrt_status ck = kvrt_cache_check(f.cache);
        CHECK(ck == KVRT_OK, "%s: kvrt_cache_check: %s", what, kvrt_last_error());
    } else {
        CHECK(0, "%s: returned %s: %s", what, kvrt_status_name(st), msg);
    }
    snapshot_free(&before);
    fixture_close(&f);
    return lost;
}

static void fault_op(const op *o)
{
    long count[KVRT_SIM_N_CALLS];
    {
        fixture f;
        snapshot before;
        fixture_start(o, &f, &before);
        long c0[KVRT_SIM_N_CALLS];
        for (int k = 0; k < KVRT_SIM_N_CALLS; k++)
            c0[k] = kvrt_sim_calls(k);
        kvrt_status st = o->run(&f);
        CHECK(st == KVRT_OK, "%s without a fault: %s", o->name, kvrt_last_error());
        for (int k = 0; k < KVRT_SIM_N_CALLS; k++)
            count[k] = kvrt_sim_calls(k) - c0[k];
        snapshot_free(&before);
        fixture_close(&f);
    }
    CHECK(count[KVRT_SIM_COPY] + count[KVRT_SIM_LAUNCH] + count[KVRT_SIM_ALLOC] > 0,
          "%s makes no device call", o->name);
    long injected = 0, lost = 0;
    for (int k = 0; k < KVRT_SIM_N_CALLS; k++)
        for (long i = 1; i <= count[k]; i++) {
            lost += fault_once(o, k, i);
            injected++;
        }
    printf("%-20s alloc %2ld copy %2ld launch %2ld: %3ld faults, %3ld restored, %3ld lost\n",
           o->name, count[0], count[1], count[2], injected, injected - lost, lost);
}

int main(int argc, char **argv)
{
    backend = argc > 1 && strcmp(argv[1], "hip") == 0 ? KVRT_BACKEND_HIP : KVRT_BACKEND_CUDA;
    if (kvrt_device_count(backend) < 1) {
        printf("test_sim_faults: no %s device\n", kvrt_backend_name(backend));
        return GPU_TEST_SKIP;
    }
    /* one OS thread runs the blocks: this test is about the glue, not
     * about concurrent blocks, and hand-offs between threads dominate its
     * time on a loaded machine */
    setenv("KVRT_SIM_THREADS", "1", 0);
    inputs_init();
    const char *only = argc > 2 ? argv[2] : NULL; /* one operation, for debugging */
    for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++)
        if (only == NULL || strcmp(only, ops[i].name) == 0)
            fault_op(&ops[i]);
    return gpu_test_result("test_sim_faults");
}
