/*
 * cache.c: cache creation and destruction, layer groups, the block pool
 * (refcounts, free stack, growth), the positions' device mirror, statistics
 * and the invariant check.
 */
#include <stdio.h>

#include "internal.h"
#include "prefix.h"

kvrt_status kvrt_desc_validate(const kvrt_cache_desc *desc);
kvrt_status kvrt_desc_validate_rope_use(const kvrt_cache_desc *desc);

int kvrt_group_is_self(const kvrt_group *g) { return g->kind != KVRT_LAYER_CROSS; }

kvrt_layout kvrt_layer_layout(const kvrt_cache *cache, int layer)
{
    return kvrt_layout_of(cache, &cache->layers[layer], &cache->groups[cache->layer_group[layer]]);
}

kvrt_layout kvrt_layout_of(const kvrt_cache *cache, const kvrt_layer_desc *l, const kvrt_group *g)
{
    kvrt_layout L;
    memset(&L, 0, sizeof L);
    L.block_size = g->block_size;
    L.dtype = (int32_t)cache->desc.dtype;
    L.elem_size = (int32_t)kvrt_dtype_size(cache->desc.dtype);
    L.rope_theta = l->rope_theta > 0.0f ? l->rope_theta : cache->desc.rope.theta;
    if (l->kind == KVRT_LAYER_MLA) {
        L.n_heads = 1;
        L.dim_k = l->latent_dim + l->rope_dim;
        L.dim_v = 0;
        L.rot_offset = l->latent_dim;
        L.rot_dims = l->rope_dim;
    } else {
        L.n_heads = l->n_kv_heads;
        L.dim_k = l->head_dim_k;
        L.dim_v = l->head_dim_v;
        L.rot_offset = 0;
        L.rot_dims = l->kind == KVRT_LAYER_ATTN ? cache->desc.rope.n_rot : 0;
    }
    return L;
}

/* ---- checks shared by the API ---- */

kvrt_status kvrt_check_handle(const kvrt_cache *cache, const char *fn)
{
    KVRT_CHECK(cache != NULL, KVRT_ERR_INVALID_ARG, "%s: cache is NULL", fn);
    return KVRT_OK;
}

kvrt_status kvrt_check_cache(const kvrt_cache *cache, const char *fn)
{
    KVRT_TRY(kvrt_check_handle(cache, fn));
    KVRT_CHECK(!KVRT_CORE(cache)->lost, KVRT_ERR_CACHE_LOST,
               "%s: an earlier failed device call left the cache half-changed; the cache must be "
               "cleared (kvrt_cache_clear)", fn);
    return KVRT_OK;
}

/* ---- one thread at a time (internal.h) ---- */

/* Its address names the calling thread; callbacks counts the state writers
 * and readers the thread is inside. */
static _Thread_local char this_thread;
static _Thread_local int  callbacks;

kvrt_status kvrt_enter(const kvrt_cache *cache, const char *fn)
{
    if (cache == NULL)
        return KVRT_OK;
    kvrt_cache *core = (kvrt_cache *)KVRT_CORE(cache);
    const uintptr_t self = (uintptr_t)&this_thread;
    uintptr_t       none = 0;
    if (atomic_compare_exchange_strong_explicit(&core->owner, &none, self, memory_order_acquire,
                                                memory_order_relaxed)) {
        core->depth = 1;
        return KVRT_OK;
    }
    KVRT_CHECK(none == self, KVRT_ERR_BUSY,
               "%s: another thread is inside a call on this cache (or a handle sharing it); calls "
               "on one cache must be serialized by the caller", fn);
    KVRT_CHECK(callbacks == 0, KVRT_ERR_BUSY,
               "%s: called from a state writer or reader of a call on the same cache", fn);
    core->depth++;
    return KVRT_OK;
}

kvrt_status kvrt_leave(const kvrt_cache *cache, kvrt_status status)
{
    if (cache == NULL)
        return status;
    kvrt_cache *core = (kvrt_cache *)KVRT_CORE(cache);
    if (--core->depth == 0)
        atomic_store_explicit(&core->owner, 0, memory_order_release);
    return status;
}

void kvrt_callback_begin(void) { callbacks++; }
void kvrt_callback_end(void) { callbacks--; }

void kvrt_change_begin(kvrt_cache *core) { core->changing = 1; }

/* What an edit may change, as it was (kvrt_change_journal). */
typedef struct journal_group {
    int32_t        *refcount, *free_stack, n_free;
    int32_t        *cross_len; /* CROSS groups: rows of each block */
    kvrt_seq_pages *seqs;      /* [s1 - s0] headers */
    int32_t       **blocks;    /* [s1 - s0] page tables */
    int32_t       **pos;       /* [s1 - s0] positions of their blocks */
} journal_group;

struct kvrt_journal {
    int32_t        s0, s1;
    journal_group *groups;
};

static void journal_free(kvrt_cache *core)
{
    struct kvrt_journal *J = core->journal;
    core->journal = NULL;
    if (J == NULL)
        return;
    for (int j = 0; J->groups != NULL && j < core->n_groups; j++) {
        journal_group *jg = &J->groups[j];
        for (int32_t s = 0; s < J->s1 - J->s0; s++) { /* either table may be missing */
            if (jg->blocks != NULL)
                free(jg->blocks[s]);
            if (jg->pos != NULL)
                free(jg->pos[s]);
        }
        free(jg->refcount);
        free(jg->cross_len);
        free(jg->free_stack);
        free(jg->seqs);
        free(jg->blocks);
        free(jg->pos);
    }
    free(J->groups);
    free(J);
}

static int journal_take(kvrt_cache *core, struct kvrt_journal *J)
{
    J->groups = calloc((size_t)core->n_groups, sizeof *J->groups);
    if (J->groups == NULL)
        return 0;
    int32_t n = J->s1 - J->s0;
    for (int j = 0; j < core->n_groups; j++) {
        const kvrt_group *g = &core->groups[j];
        journal_group *jg = &J->groups[j];
        jg->refcount = malloc(((size_t)g->n_blocks + 1) * sizeof(int32_t));
        jg->free_stack = malloc(((size_t)g->n_free + 1) * sizeof(int32_t));
        jg->seqs = malloc((size_t)n * sizeof *jg->seqs);
        jg->blocks = calloc((size_t)n, sizeof *jg->blocks);
        jg->pos = calloc((size_t)n, sizeof *jg->pos);
        if (jg->refcount == NULL || jg->free_stack == NULL || jg->seqs == NULL ||
            jg->blocks == NULL || jg->pos == NULL)
            return 0;
        memcpy(jg->refcount, g->refcount, (size_t)g->n_blocks * sizeof(int32_t));
        if (g->cross_len != NULL) {
            jg->cross_len = malloc(((size_t)g->n_blocks + 1) * sizeof(int32_t));
            if (jg->cross_len == NULL)
                return 0;
            memcpy(jg->cross_len, g->cross_len, (size_t)g->n_blocks * sizeof(int32_t));
        }
        memcpy(jg->free_stack, g->free_stack, (size_t)g->n_free * sizeof(int32_t));
        jg->n_free = g->n_free;
        int64_t bs = g->block_size;
        for (int32_t s = 0; s < n; s++) {
            const kvrt_seq_pages *sp = &g->seqs[J->s0 + s];
            jg->seqs[s] = *sp;
            jg->blocks[s] = malloc(((size_t)sp->n_blocks + 1) * sizeof(int32_t));
            if (jg->blocks[s] == NULL)
                return 0;
            if (sp->n_blocks > 0)
                memcpy(jg->blocks[s], sp->blocks, (size_t)sp->n_blocks * sizeof(int32_t));
            if (g->pos == NULL)
                continue;
            jg->pos[s] = malloc(((size_t)sp->n_blocks * (size_t)bs + 1) * sizeof(int32_t));
            if (jg->pos[s] == NULL)
                return 0;
            for (int32_t k = 0; k < sp->n_blocks; k++)
                memcpy(jg->pos[s] + k * bs, g->pos + (int64_t)sp->blocks[k] * bs,
                       (size_t)bs * sizeof(int32_t));
        }
    }
    return 1;
}

kvrt_status kvrt_change_journal(kvrt_cache *core, int32_t s0, int32_t s1)
{
    journal_free(core);
    if (core->prefix != NULL) {
        kvrt_change_begin(core);
        return KVRT_OK; /* keys and cached blocks change too: not undone */
    }
    struct kvrt_journal *J = calloc(1, sizeof *J);
    if (J != NULL) {
        J->s0 = s0;
        J->s1 = s1;
        core->journal = J;
    }
    if (J == NULL || !journal_take(core, J)) { /* nothing changed yet: refused */
        journal_free(core);
        return kvrt_set_error(KVRT_ERR_OUT_OF_MEMORY,
                              "host memory for the edit's undo record (%d sequences)", s1 - s0);
    }
    kvrt_change_begin(core);
    return KVRT_OK;
}

void kvrt_change_final(kvrt_cache *core) { journal_free(core); }

/* Puts back what the journal recorded; every block involved is marked for
 * the upload of its positions. */
static void journal_undo(kvrt_cache *core)
{
    struct kvrt_journal *J = core->journal;
    for (int j = 0; j < core->n_groups; j++) {
        kvrt_group *g = &core->groups[j];
        journal_group *jg = &J->groups[j];
        int64_t bs = g->block_size;
        for (int32_t s = 0; s < J->s1 - J->s0; s++) {
            kvrt_seq_pages *sp = &g->seqs[J->s0 + s];
            const kvrt_seq_pages *old = &jg->seqs[s];
            if (g->pos != NULL) {
                /* blocks the edit took were free: no position (a block
                 * shared from another sequence keeps its own) */
                for (int32_t k = 0; k < sp->n_blocks; k++) {
                    int32_t b = sp->blocks[k];
                    if (b < 0 || b >= g->n_blocks || jg->refcount[b] != 0)
                        continue;
                    for (int64_t i = 0; i < bs; i++)
                        g->pos[(int64_t)b * bs + i] = -1;
                    kvrt_group_mark_dirty(g, b);
                }
                for (int32_t k = 0; k < old->n_blocks; k++) {
                    int32_t b = jg->blocks[s][k];
                    memcpy(g->pos + (int64_t)b * bs, jg->pos[s] + k * bs, (size_t)bs * sizeof(int32_t));
                    kvrt_group_mark_dirty(g, b);
                }
            }
            if (old->n_blocks > 0)
                memcpy(sp->blocks, jg->blocks[s], (size_t)old->n_blocks * sizeof(int32_t));
            sp->n_blocks = old->n_blocks;
            sp->n_slots = old->n_slots;
            sp->n_live = old->n_live;
            sp->pos_min = old->pos_min;
            sp->pos_max = old->pos_max;
            sp->evicted_min = old->evicted_min;
            sp->evicted_max = old->evicted_max;
        }
        memcpy(g->refcount, jg->refcount, (size_t)g->n_blocks * sizeof(int32_t));
        if (jg->cross_len != NULL)
            memcpy(g->cross_len, jg->cross_len, (size_t)g->n_blocks * sizeof(int32_t));
        memcpy(g->free_stack, jg->free_stack, (size_t)jg->n_free * sizeof(int32_t));
        g->n_free = jg->n_free;
    }
    /* the device copy of positions may hold the edit's until the next
     * upload: earlier plans are stale */
    core->epoch++;
}

kvrt_status kvrt_change_end(kvrt_cache *cache, kvrt_status status, const char *fn)
{
    kvrt_cache *core = KVRT_CORE(cache);
    int changing = core != NULL && core->changing;
    if (core != NULL)
        core->changing = 0;
    if (changing && status != KVRT_OK && core->journal != NULL) {
        journal_undo(core); /* as it was: the failure is reported as it is */
        changing = 0;
    }
    if (core != NULL)
        journal_free(core);
    status = kvrt_error_in(status, fn);
    if (status == KVRT_OK || !changing || status == KVRT_ERR_CACHE_LOST)
        return status;
    core->lost = 1;
    char msg[512];
    snprintf(msg, sizeof msg, "%s", kvrt_last_error());
    return kvrt_set_error(KVRT_ERR_CACHE_LOST, "%s (%s); the cache must be cleared (kvrt_cache_clear)",
                          msg, kvrt_status_name(status));
}

kvrt_status kvrt_check_seq(const kvrt_cache *cache, int32_t seq, const char *what)
{
    KVRT_CHECK(seq >= 0 && seq < cache->desc.max_seqs, KVRT_ERR_INVALID_ARG,
               "%s: sequence %d is out of range [0, %d)", what, (int)seq, cache->desc.max_seqs);
    return KVRT_OK;
}

kvrt_status kvrt_check_device_ptr(const kvrt_cache *cache, const void *p, const char *what)
{
    if (!cache->desc.validate || cache->desc.device.backend == KVRT_BACKEND_CPU)
        return KVRT_OK;
    kvrt_mem_kind kind;
    int ordinal = -1;
    kvrt_backend_t *be = (kvrt_backend_t *)&cache->be;
    KVRT_TRY(be->ops->mem_kind(be, p, &kind, &ordinal));
    const char *bn = kvrt_backend_name(cache->desc.device.backend);
    KVRT_CHECK(kind != KVRT_MEM_HOST, KVRT_ERR_DEVICE_MISMATCH,
               "%s is host memory; the cache is on %s:%d", what, bn, cache->desc.device.ordinal);
    KVRT_CHECK(kind == KVRT_MEM_THIS_DEVICE, KVRT_ERR_DEVICE_MISMATCH,
               "%s is on %s:%d; the cache is on %s:%d", what, bn, ordinal, bn,
               cache->desc.device.ordinal);
    return KVRT_OK;
}

/* ---- block pool ---- */

int32_t kvrt_group_block_alloc(kvrt_group *g)
{
    if (g->n_free == 0) { /* prefix caching: the oldest cached block */
        int32_t b = kvrt_prefix_evict(g);
        if (b >= 0)
            g->refcount[b] = 1;
        return b;
    }
    int32_t b = g->free_stack[--g->n_free];
    g->refcount[b] = 1;
    return b;
}

void kvrt_group_mark_dirty(kvrt_group *g, int32_t block)
{
    if (g->pos == NULL || g->dirty[block])
        return;
    g->dirty[block] = 1;
    g->dirty_list[g->n_dirty++] = block;
}

void kvrt_group_block_release(kvrt_group *g, int32_t block)
{
    if (--g->refcount[block] > 0)
        return;
    if (kvrt_prefix_release(g, block)) /* keyed: cached with its rows and positions */
        return;
    if (g->pos != NULL) {
        int32_t *p = g->pos + (int64_t)block * g->block_size;
        for (int i = 0; i < g->block_size; i++)
            p[i] = -1;
        kvrt_group_mark_dirty(g, block);
    }
    if (g->cross_len != NULL)
        g->cross_len[block] = 0;
    g->free_stack[g->n_free++] = block;
}

int64_t kvrt_group_available(const kvrt_group *g)
{
    return (int64_t)g->n_free + (g->max_blocks - g->n_blocks) + kvrt_prefix_n_cached(g);
}

kvrt_status kvrt_layer_mem_create(kvrt_cache *cache, kvrt_layer_mem *m, const kvrt_layout *L,
                                  int32_t n_blocks, int32_t max_blocks)
{
    kvrt_backend_t *be = &cache->be;
    m->k_block = (size_t)kvrt_block_bytes_k(L);
    m->v_block = (size_t)kvrt_block_bytes_v(L);
    m->scale_block = (size_t)kvrt_block_bytes_scale(L);
    m->k_reserve = m->k_block * (size_t)max_blocks;
    m->v_reserve = m->v_block * (size_t)max_blocks;
    m->scale_reserve = m->scale_block * (size_t)max_blocks;
    KVRT_TRY(be->ops->region_create(be, m->k_reserve, m->k_block * (size_t)n_blocks, &m->k));
    if (m->v_block > 0)
        KVRT_TRY(be->ops->region_create(be, m->v_reserve, m->v_block * (size_t)n_blocks, &m->v));
    if (m->scale_block > 0) {
        KVRT_TRY(be->ops->region_create(be, m->scale_reserve, m->scale_block * (size_t)n_blocks,
                                        &m->k_scale));
        if (m->v_block > 0)
            KVRT_TRY(be->ops->region_create(be, m->scale_reserve,
                                            m->scale_block * (size_t)n_blocks, &m->v_scale));
    }
    return KVRT_OK;
}

kvrt_status kvrt_layer_mem_grow(kvrt_cache *cache, kvrt_layer_mem *m, int32_t old_n, int32_t new_n)
{
    kvrt_backend_t *be = &cache->be;
    KVRT_TRY(be->ops->region_grow(be, m->k, m->k_reserve, m->k_block * old_n, m->k_block * new_n));
    if (m->v != NULL)
        KVRT_TRY(be->ops->region_grow(be, m->v, m->v_reserve, m->v_block * old_n,
                                      m->v_block * new_n));
    void *scales[2] = {m->k_scale, m->v_scale};
    for (int i = 0; i < 2; i++)
        if (scales[i] != NULL)
            KVRT_TRY(be->ops->region_grow(be, scales[i], m->scale_reserve, m->scale_block * old_n,
                                          m->scale_block * new_n));
    return KVRT_OK;
}

void kvrt_layer_mem_destroy(kvrt_cache *cache, kvrt_layer_mem *m)
{
    kvrt_backend_t *be = &cache->be;
    if (be->ops == NULL)
        return;
    if (m->k != NULL)
        be->ops->region_destroy(be, m->k, m->k_reserve);
    if (m->v != NULL)
        be->ops->region_destroy(be, m->v, m->v_reserve);
    if (m->k_scale != NULL)
        be->ops->region_destroy(be, m->k_scale, m->scale_reserve);
    if (m->v_scale != NULL)
        be->ops->region_destroy(be, m->v_scale, m->scale_reserve);
    m->k = m->v = m->k_scale = m->v_scale = NULL;
}

static kvrt_status group_grow(kvrt_cache *cache, kvrt_group *g, int32_t new_n)
{
    kvrt_backend_t *be = &cache->be;
    int32_t old_n = g->n_blocks;
    for (int i = 0; i < g->n_layers; i++)
        KVRT_TRY(kvrt_layer_mem_grow(cache, &cache->mem[g->layers[i]], old_n, new_n));
    size_t pos_block = (size_t)g->block_size * sizeof(int32_t);
    if (g->pos_device != NULL)
        KVRT_TRY(be->ops->region_grow(be, g->pos_device, pos_block * g->max_blocks,
                                      pos_block * old_n, pos_block * new_n));
    for (int i = 0; i < g->n_layers; i++)
        cache->bytes_device += (int64_t)kvrt_layer_mem_block(&cache->mem[g->layers[i]]) * (new_n - old_n);
    cache->bytes_device += (int64_t)(g->pos_device != NULL ? pos_block : 0) * (new_n - old_n);
    /* new blocks: free, positions -1 (device memory grows zeroed, so upload) */
    for (int32_t b = new_n - 1; b >= old_n; b--) {
        g->free_stack[g->n_free++] = b;
        kvrt_group_mark_dirty(g, b);
    }
    g->n_blocks = new_n;
    return KVRT_OK;
}

kvrt_status kvrt_group_ensure_free(kvrt_cache *cache, kvrt_group *g, int64_t need)
{
    if (need <= g->n_free)
        return KVRT_OK;
    KVRT_CHECK(need <= kvrt_group_available(g), KVRT_ERR_CAPACITY,
               "out of blocks: %lld needed, %d free of %d (max_blocks %d)", (long long)need,
               g->n_free, g->n_blocks, g->max_blocks);
    if (g->n_blocks >= g->max_blocks)
        return KVRT_OK; /* cached blocks make up the rest (kvrt_group_block_alloc) */
    int64_t target = g->n_blocks + (need - g->n_free);
    int64_t doubled = (int64_t)g->n_blocks * 2;
    if (target < doubled)
        target = doubled;
    if (target > g->max_blocks)
        target = g->max_blocks;
    return group_grow(cache, g, (int32_t)target);
}

/* ---- page tables ---- */

kvrt_status kvrt_seq_pages_push(kvrt_seq_pages *sp, int32_t block)
{
    KVRT_TRY(kvrt_reserve((void **)&sp->blocks, &sp->cap_blocks, sp->n_blocks + 1, sizeof(int32_t)));
    sp->blocks[sp->n_blocks++] = block;
    return KVRT_OK;
}

void kvrt_seq_pages_refresh(const kvrt_group *g, kvrt_seq_pages *sp)
{
    if (g->pos == NULL) { /* cross: rows are 0..n_slots-1 */
        sp->n_live = sp->n_slots;
        sp->pos_min = sp->n_slots > 0 ? 0 : -1;
        sp->pos_max = (int32_t)(sp->n_slots - 1);
        return;
    }
    int64_t live = 0;
    int32_t lo = -1, hi = -1;
    for (int64_t i = 0; i < sp->n_slots; i++) {
        int32_t p = g->pos[kvrt_seq_slot(g, sp, i)];
        if (p < 0)
            continue;
        if (live == 0 || p < lo)
            lo = p;
        if (live == 0 || p > hi)
            hi = p;
        live++;
    }
    sp->n_live = live;
    sp->pos_min = lo;
    sp->pos_max = hi;
}

void kvrt_seq_pages_release_all(kvrt_group *g, kvrt_seq_pages *sp)
{
    /* last block first: with prefix caching, leaves are cached (and so
     * evicted) before their parents */
    for (int32_t i = sp->n_blocks - 1; i >= 0; i--)
        kvrt_group_block_release(g, sp->blocks[i]);
    sp->n_blocks = 0;
    sp->n_slots = 0;
    sp->n_live = 0;
    sp->pos_min = sp->pos_max = -1;
}

/* ---- device work shared by edits ---- */

kvrt_status kvrt_group_move(kvrt_cache *cache, kvrt_group *g, const kvrt_span *spans, int32_t n_spans)
{
    if (n_spans == 0)
        return KVRT_OK;
    kvrt_backend_t *be = &cache->be;
    kvrt_move_op op;
    memset(&op, 0, sizeof op);
    op.layers = g->refs_device;
    op.n_layers = g->n_layers;
    op.n_spans = n_spans;
    for (int32_t i = 0; i < n_spans; i++)
        if (spans[i].len > op.max_len)
            op.max_len = spans[i].len;
    const void *d_spans;
    KVRT_TRY(be->ops->stage(be, spans, sizeof(kvrt_span) * (size_t)n_spans, cache->stream, &d_spans));
    op.spans = d_spans;
    return be->ops->move(be, &op, cache->stream);
}

kvrt_status kvrt_group_unshare(kvrt_cache *cache, kvrt_group *g, kvrt_seq_pages *sp, int32_t page_index)
{
    int32_t b = sp->blocks[page_index];
    if (g->refcount[b] == 1)
        return KVRT_OK;
    int32_t nb = kvrt_group_block_alloc(g);
    KVRT_CHECK(nb >= 0, KVRT_ERR_INTERNAL, "copy-on-write without a free block");
    kvrt_span span = {b * g->block_size, nb * g->block_size, g->block_size};
    kvrt_status st = kvrt_group_move(cache, g, &span, 1);
    if (st != KVRT_OK) { /* the block goes back: nothing changed */
        kvrt_group_block_release(g, nb);
        return st;
    }
    if (g->pos != NULL) {
        memcpy(g->pos + (int64_t)nb * g->block_size, g->pos + (int64_t)b * g->block_size,
               (size_t)g->block_size * sizeof(int32_t));
        kvrt_group_mark_dirty(g, nb);
    }
    if (g->cross_len != NULL)
        g->cross_len[nb] = g->cross_len[b];
    g->refcount[b]--;
    sp->blocks[page_index] = nb;
    return KVRT_OK;
}

kvrt_status kvrt_group_sync_pos(kvrt_cache *cache, kvrt_group *g)
{
    if (g->pos == NULL || g->n_dirty == 0)
        return KVRT_OK;
    kvrt_backend_t *be = &cache->be;
    int64_t n = g->n_dirty, bs = g->block_size;
    int32_t *data;
    KVRT_TRY(kvrt_scratch(cache, 2, n * bs, &data));
    for (int64_t i = 0; i < n; i++)
        memcpy(data + i * bs, g->pos + (int64_t)g->dirty_list[i] * bs, (size_t)bs * sizeof(int32_t));
    kvrt_pos_op op;
    op.pos = g->pos_device;
    op.block_size = g->block_size;
    op.n = (int32_t)n;
    const void *d_blocks, *d_data;
    KVRT_TRY(be->ops->stage(be, g->dirty_list, (size_t)n * sizeof(int32_t), cache->stream, &d_blocks));
    KVRT_TRY(be->ops->stage(be, data, (size_t)(n * bs) * sizeof(int32_t), cache->stream, &d_data));
    op.blocks = d_blocks;
    op.data = d_data;
    KVRT_TRY(be->ops->set_pos(be, &op, cache->stream));
    for (int64_t i = 0; i < n; i++)
        g->dirty[g->dirty_list[i]] = 0;
    g->n_dirty = 0;
    return KVRT_OK;
}

kvrt_status kvrt_cache_sync_pos(kvrt_cache *cache)
{
    for (int i = 0; i < cache->n_groups; i++)
        KVRT_TRY(kvrt_group_sync_pos(cache, &cache->groups[i]));
    return KVRT_OK;
}

/* ---- creation ---- */

static int same_group(const kvrt_cache *cache, const kvrt_group *g, const kvrt_layer_desc *l)
{
    return kvrt_layers_share_group(&cache->layers[g->layers[0]], l);
}

int64_t kvrt_seq_pages_live_sorted(const kvrt_group *g, const kvrt_seq_pages *sp, int32_t *out)
{
    int64_t m = 0;
    for (int64_t i = 0; i < sp->n_slots; i++) {
        int32_t p = g->pos[kvrt_seq_slot(g, sp, i)];
        if (p >= 0)
            out[m++] = p;
    }
    qsort(out, (size_t)m, sizeof(int32_t), kvrt_cmp_i32);
    return m;
}

int kvrt_seq_is_empty(const kvrt_cache *cache, int32_t seq)
{
    for (int j = 0; j < cache->n_groups; j++)
        if (cache->groups[j].seqs[seq].n_blocks > 0)
            return 0;
    return 1;
}

static kvrt_status create_group_memory(kvrt_cache *cache, kvrt_group *g)
{
    kvrt_backend_t *be = &cache->be;
    int64_t bs = g->block_size;
    g->refcount = calloc((size_t)g->max_blocks, sizeof(int32_t));
    g->free_stack = malloc((size_t)g->max_blocks * sizeof(int32_t));
    g->seqs = calloc((size_t)cache->desc.max_seqs, sizeof(kvrt_seq_pages));
    g->refs = calloc((size_t)g->n_layers, sizeof(kvrt_layer_ref));
    KVRT_CHECK(g->refcount && g->free_stack && g->seqs && g->refs, KVRT_ERR_OUT_OF_MEMORY,
               "host allocation for a group of %d blocks", g->max_blocks);
    for (int s = 0; s < cache->desc.max_seqs; s++) {
        kvrt_seq_pages *sp = &g->seqs[s];
        sp->pos_min = sp->pos_max = sp->evicted_min = sp->evicted_max = -1;
    }
    if (g->evict) {
        g->pending = calloc((size_t)g->max_blocks, sizeof(int32_t));
        KVRT_CHECK(g->pending != NULL, KVRT_ERR_OUT_OF_MEMORY, "host planning counts");
    }
    if (kvrt_group_is_self(g)) {
        g->pos = malloc((size_t)(g->max_blocks * bs) * sizeof(int32_t));
        g->dirty = calloc((size_t)g->max_blocks, 1);
        g->dirty_list = malloc((size_t)g->max_blocks * sizeof(int32_t));
        KVRT_CHECK(g->pos && g->dirty && g->dirty_list, KVRT_ERR_OUT_OF_MEMORY,
                   "host positions for %d blocks", g->max_blocks);
        for (int64_t i = 0; i < g->max_blocks * bs; i++)
            g->pos[i] = -1;
        size_t pos_block = (size_t)bs * sizeof(int32_t);
        void *pd;
        KVRT_TRY(be->ops->region_create(be, pos_block * g->max_blocks, pos_block * g->n_blocks, &pd));
        g->pos_device = pd;
        cache->bytes_device += (int64_t)(pos_block * g->n_blocks);
    } else {
        g->cross_len = calloc((size_t)g->max_blocks, sizeof(int32_t));
        KVRT_CHECK(g->cross_len != NULL, KVRT_ERR_OUT_OF_MEMORY, "host cross lengths");
    }
    for (int32_t b = g->n_blocks - 1; b >= 0; b--) {
        g->free_stack[g->n_free++] = b;
        kvrt_group_mark_dirty(g, b);
    }
    for (int i = 0; i < g->n_layers; i++) {
        int layer = g->layers[i];
        kvrt_layer_mem *m = &cache->mem[layer];
        kvrt_layout L = kvrt_layer_layout(cache, layer);
        KVRT_TRY(kvrt_layer_mem_create(cache, m, &L, g->n_blocks, g->max_blocks));
        cache->bytes_device += (int64_t)(kvrt_layer_mem_block(m) * (size_t)g->n_blocks);
        g->refs[i].layout = L;
        g->refs[i].k = m->k;
        g->refs[i].v = m->v;
        g->refs[i].k_scale = m->k_scale;
        g->refs[i].v_scale = m->v_scale;
        if (L.rot_dims > g->max_rot_dims)
            g->max_rot_dims = L.rot_dims;
    }
    size_t refs_bytes = sizeof(kvrt_layer_ref) * (size_t)g->n_layers;
    void *rd;
    KVRT_TRY(be->ops->region_create(be, refs_bytes, refs_bytes, &rd));
    g->refs_device = rd;
    g->refs_device_bytes = refs_bytes;
    KVRT_TRY(be->ops->upload(be, rd, g->refs, refs_bytes, cache->stream));
    return kvrt_group_sync_pos(cache, g);
}

static kvrt_status create_groups(kvrt_cache *cache)
{
    const kvrt_cache_desc *d = &cache->desc;
    cache->layer_group = malloc(sizeof(int) * (size_t)d->n_layers);
    cache->groups = calloc((size_t)d->n_layers, sizeof(kvrt_group));
    cache->mem = calloc((size_t)d->n_layers, sizeof(kvrt_layer_mem));
    KVRT_CHECK(cache->layer_group && cache->groups && cache->mem, KVRT_ERR_OUT_OF_MEMORY,
               "host allocation for %d layers", d->n_layers);
    for (int i = 0; i < d->n_layers; i++) {
        const kvrt_layer_desc *l = &cache->layers[i];
        int gi = -1;
        for (int j = 0; j < cache->n_groups && gi < 0; j++)
            if (same_group(cache, &cache->groups[j], l))
                gi = j;
        if (gi < 0) {
            gi = cache->n_groups++;
            kvrt_group *g = &cache->groups[gi];
            g->kind = l->kind;
            g->layers = malloc(sizeof(int) * (size_t)d->n_layers);
            KVRT_CHECK(g->layers != NULL, KVRT_ERR_OUT_OF_MEMORY, "host allocation for a group");
            if (l->kind == KVRT_LAYER_CROSS) {
                g->block_size = d->cross_max_len;
                g->n_blocks = g->max_blocks = d->max_seqs;
            } else {
                g->window = l->window;
                g->evict = l->window > 0 && !d->swa_full;
                g->block_size = d->block_size;
                g->n_blocks = d->n_blocks;
                g->max_blocks = d->max_blocks > 0 ? d->max_blocks : d->n_blocks;
            }
        }
        kvrt_group *g = &cache->groups[gi];
        g->layers[g->n_layers++] = i;
        cache->layer_group[i] = gi;
    }
    for (int j = 0; j < cache->n_groups; j++)
        KVRT_TRY(create_group_memory(cache, &cache->groups[j]));
    return KVRT_OK;
}

static kvrt_status do_cache_create(const kvrt_cache_desc *desc, kvrt_cache **out)
{
    KVRT_CHECK(out != NULL, KVRT_ERR_INVALID_ARG, "kvrt_cache_create: out is NULL");
    *out = NULL;
    KVRT_TRY(kvrt_desc_validate(desc));
    KVRT_TRY(kvrt_desc_validate_rope_use(desc));
    KVRT_TRY(kvrt_prefix_desc_validate(desc));
    /* the GPU kernels read f32, f16 and bf16 rows (K rotated or, in rope.mode
     * IN_ATTENTION, turned by the generic attention kernel as it reads it) */
    KVRT_CHECK(desc->device.backend == KVRT_BACKEND_CPU || !kvrt_dtype_is_quantized(desc->dtype),
               KVRT_ERR_UNSUPPORTED,
               "kvrt_cache_create: %s on %s: quantized dtypes run on the CPU backend only in this "
               "build",
               kvrt_dtype_name(desc->dtype), kvrt_backend_name(desc->device.backend));
    int count = kvrt_device_count(desc->device.backend);
    KVRT_CHECK(desc->device.ordinal >= 0 && desc->device.ordinal < count, KVRT_ERR_NO_DEVICE,
               "device %s:%d does not exist (%d %s device%s in this build)",
               kvrt_backend_name(desc->device.backend), desc->device.ordinal, count,
               kvrt_backend_name(desc->device.backend), count == 1 ? "" : "s");
    kvrt_cache *cache = calloc(1, sizeof *cache);
    KVRT_CHECK(cache != NULL, KVRT_ERR_OUT_OF_MEMORY, "host allocation for the cache");
    cache->desc = *desc;
    cache->layers = malloc(sizeof(kvrt_layer_desc) * (size_t)desc->n_layers);
    if (cache->layers == NULL) {
        free(cache);
        return kvrt_set_error(KVRT_ERR_OUT_OF_MEMORY, "host allocation for %d layers", desc->n_layers);
    }
    memcpy(cache->layers, desc->layers, sizeof(kvrt_layer_desc) * (size_t)desc->n_layers);
    cache->desc.layers = cache->layers;
    cache->n_handles = 1;
    cache->n_layers_total = desc->n_layers;
    kvrt_status st = kvrt_backend_open(desc->device, &cache->be);
    if (st == KVRT_OK && desc->device.backend == KVRT_BACKEND_CPU)
        kvrt_cpu_backend_set_threads(&cache->be, desc->n_threads);
    if (st == KVRT_OK)
        st = create_groups(cache);
    if (st == KVRT_OK)
        st = kvrt_prefix_create(cache);
    if (st == KVRT_OK)
        st = cache->be.ops->sync(&cache->be, cache->stream);
    if (st != KVRT_OK) {
        kvrt_cache_destroy(cache);
        return st;
    }
    *out = cache;
    return KVRT_OK;
}

static void core_destroy(kvrt_cache *cache);

/* Handles are reference-counted: the core's memory lives until the last
 * handle on it is destroyed. */
void kvrt_cache_destroy(kvrt_cache *cache)
{
    if (cache == NULL)
        return;
    kvrt_cache *core = KVRT_CORE(cache);
    if (cache != core) {
        if (!(core->destroy_pending && core->n_handles == 1)) /* the core lives on */
            kvrt_shared_release(core, cache);
        free(cache->layer_map);
        free(cache->layers);
        free(cache);
    } else {
        core->destroy_pending = 1;
    }
    if (--core->n_handles <= 0 && core->destroy_pending)
        core_destroy(core);
}

static void core_destroy(kvrt_cache *cache)
{
    kvrt_backend_t *be = &cache->be;
    if (be->ops != NULL)
        (void)be->ops->sync(be, cache->stream);
    kvrt_prefix_destroy(cache);
    for (int j = 0; j < cache->n_groups; j++) {
        kvrt_group *g = &cache->groups[j];
        if (be->ops != NULL) {
            size_t pos_block = (size_t)g->block_size * sizeof(int32_t);
            if (g->pos_device != NULL)
                be->ops->region_destroy(be, g->pos_device, pos_block * g->max_blocks);
            if (g->refs_device != NULL)
                be->ops->region_destroy(be, g->refs_device, g->refs_device_bytes);
        }
        if (g->seqs != NULL)
            for (int s = 0; s < cache->desc.max_seqs; s++)
                free(g->seqs[s].blocks);
        free(g->seqs);
        free(g->layers);
        free(g->refs);
        free(g->refcount);
        free(g->free_stack);
        free(g->pos);
        free(g->dirty);
        free(g->dirty_list);
        free(g->cross_len);
        free(g->pending);
    }
    if (cache->mem != NULL)
        for (int i = 0; i < cache->n_layers_total; i++)
            kvrt_layer_mem_destroy(cache, &cache->mem[i]);
    kvrt_backend_close(be);
    free(cache->groups);
    free(cache->mem);
    free(cache->layer_group);
    free(cache->layer_users);
    free(cache->layers);
    free(cache->scratch_a);
    free(cache->scratch_b);
    free(cache->scratch_c);
    free(cache->spans);
    free(cache);
}

static kvrt_status do_cache_set_stream(kvrt_cache *cache, void *stream)
{
    KVRT_TRY(kvrt_check_handle(cache, "kvrt_cache_set_stream"));
    cache = KVRT_CORE(cache);
    cache->stream = stream;
    return KVRT_OK;
}

static kvrt_status do_cache_sync(kvrt_cache *cache)
{
    KVRT_TRY(kvrt_check_handle(cache, "kvrt_cache_sync"));
    cache = KVRT_CORE(cache);
    return cache->be.ops->sync(&cache->be, cache->stream);
}

const kvrt_cache_desc *kvrt_cache_get_desc(const kvrt_cache *cache)
{
    return cache != NULL ? &cache->desc : NULL;
}

int kvrt_cache_n_groups(const kvrt_cache *cache)
{
    return cache != NULL ? KVRT_CORE(cache)->n_groups : 0;
}

int kvrt_layer_group(const kvrt_cache *cache, int layer)
{
    if (cache == NULL || layer < 0 || layer >= cache->desc.n_layers)
        return -1;
    if (cache->core != NULL)
        layer = cache->layer_map[layer];
    return KVRT_CORE(cache)->layer_group[layer];
}

kvrt_status kvrt_map_layer(const kvrt_cache *handle, int *layer, const char *fn)
{
    KVRT_CHECK(*layer >= 0 && *layer < handle->desc.n_layers, KVRT_ERR_INVALID_ARG,
               "%s: layer %d is out of range [0, %d)", fn, *layer, handle->desc.n_layers);
    if (handle->core != NULL)
        *layer = handle->layer_map[*layer];
    return KVRT_OK;
}

/* ---- statistics and invariants ---- */

static void group_stats(const kvrt_cache *cache, const kvrt_group *g, kvrt_cache_stats *s)
{
    s->blocks_total += g->n_blocks;
    s->blocks_free += g->n_free;
    s->blocks_cached += kvrt_prefix_n_cached(g);
    for (int32_t b = 0; b < g->n_blocks; b++) {
        if (g->refcount[b] == 0)
            continue;
        s->blocks_used++;
        if (g->refcount[b] > 1)
            s->blocks_shared++;
        if (g->pos != NULL) {
            for (int i = 0; i < g->block_size; i++)
                s->slots_live += g->pos[(int64_t)b * g->block_size + i] >= 0;
        } else {
            s->slots_live += g->cross_len[b];
        }
    }
    if (g->pos != NULL)
        for (int q = 0; q < cache->desc.max_seqs; q++)
            s->holes += g->seqs[q].n_slots - g->seqs[q].n_live;
    for (int i = 0; i < g->n_layers; i++) {
        const kvrt_layer_mem *m = &cache->mem[g->layers[i]];
        s->bytes_device += (int64_t)(kvrt_layer_mem_block(m) * (size_t)g->n_blocks);
    }
    if (g->pos != NULL)
        s->bytes_device += (int64_t)g->n_blocks * g->block_size * (int64_t)sizeof(int32_t);
}

static kvrt_status do_cache_stats_get(const kvrt_cache *cache, int group, kvrt_cache_stats *out)
{
    KVRT_TRY(kvrt_check_cache(cache, "kvrt_cache_stats_get"));
    cache = KVRT_CORE(cache);
    KVRT_CHECK(out != NULL, KVRT_ERR_INVALID_ARG, "kvrt_cache_stats_get: out is NULL");
    KVRT_CHECK(group >= -1 && group < cache->n_groups, KVRT_ERR_INVALID_ARG,
               "kvrt_cache_stats_get: group %d is out of range [-1, %d)", group, cache->n_groups);
    memset(out, 0, sizeof *out);
    for (int j = 0; j < cache->n_groups; j++)
        if (group < 0 || group == j)
            group_stats(cache, &cache->groups[j], out);
    return KVRT_OK;
}


#define INVARIANT(cond, ...)                                                                   \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            st = kvrt_set_error(KVRT_ERR_INTERNAL, __VA_ARGS__);                               \
            goto done;                                                                         \
        }                                                                                      \
    } while (0)

/* A host allocation of the check itself failing: out of memory, not a
 * broken invariant. */
#define CHECK_ALLOC(p)                                                                         \
    do {                                                                                       \
        if ((p) == NULL) {                                                                     \
            st = kvrt_set_error(KVRT_ERR_OUT_OF_MEMORY, "kvrt_cache_check: host allocation");  \
            goto done;                                                                         \
        }                                                                                      \
    } while (0)

static kvrt_status check_group(const kvrt_cache *cache, int gi)
{
    const kvrt_group *g = &cache->groups[gi];
    kvrt_status st = KVRT_OK;
    int32_t *refs = calloc((size_t)g->max_blocks, sizeof(int32_t));
    int32_t *posbuf = NULL;
    int32_t *device_pos = NULL;
    int64_t posbuf_cap = 0;
    CHECK_ALLOC(refs);
    INVARIANT(g->n_free >= 0 && g->n_free <= g->n_blocks, "group %d: %d free of %d blocks", gi,
              g->n_free, g->n_blocks);
    for (int32_t i = 0; i < g->n_free; i++) {
        int32_t b = g->free_stack[i];
        INVARIANT(b >= 0 && b < g->n_blocks, "group %d: free block %d out of range", gi, b);
        INVARIANT(g->refcount[b] == 0, "group %d: free block %d has refcount %d", gi, b,
                  g->refcount[b]);
        INVARIANT(refs[b] == 0, "group %d: block %d is free twice", gi, b);
        refs[b] = -1;
        if (g->pos != NULL)
            for (int k = 0; k < g->block_size; k++)
                INVARIANT(g->pos[(int64_t)b * g->block_size + k] == -1,
                          "group %d: free block %d slot %d has position %d", gi, b, k,
                          g->pos[(int64_t)b * g->block_size + k]);
    }
    for (int32_t b = 0; b < g->n_blocks; b++)
        if (refs[b] == -1)
            refs[b] = 0;
    for (int s = 0; s < cache->desc.max_seqs; s++) {
        const kvrt_seq_pages *sp = &g->seqs[s];
        int64_t bs = g->block_size;
        INVARIANT(sp->n_slots >= 0 && sp->n_slots <= (int64_t)sp->n_blocks * bs &&
                      sp->n_slots > ((int64_t)sp->n_blocks - 1) * bs,
                  "group %d seq %d: %lld used slots in %d blocks", gi, s, (long long)sp->n_slots,
                  sp->n_blocks);
        for (int32_t i = 0; i < sp->n_blocks; i++) {
            int32_t b = sp->blocks[i];
            INVARIANT(b >= 0 && b < g->n_blocks, "group %d seq %d: block %d out of range", gi, s, b);
            refs[b]++;
        }
        if (g->pos == NULL)
            continue;
        st = kvrt_reserve((void **)&posbuf, &posbuf_cap, sp->n_slots + 1, sizeof(int32_t));
        if (st != KVRT_OK)
            goto done;
        int64_t live = kvrt_seq_pages_live_sorted(g, sp, posbuf);
        INVARIANT(live == sp->n_live, "group %d seq %d: %lld live slots, %lld recorded", gi, s,
                  (long long)live, (long long)sp->n_live);
        for (int64_t i = 1; i < live; i++)
            INVARIANT(posbuf[i] != posbuf[i - 1], "group %d seq %d: position %d twice", gi, s,
                      posbuf[i]);
        INVARIANT(sp->pos_min == (live ? posbuf[0] : -1) &&
                      sp->pos_max == (live ? posbuf[live - 1] : -1),
                  "group %d seq %d: recorded range [%d, %d] differs from live slots", gi, s,
                  sp->pos_min, sp->pos_max);
    }
    for (int32_t b = 0; b < g->n_blocks; b++)
        INVARIANT(refs[b] == g->refcount[b], "group %d: block %d refcount %d, referenced %d times",
                  gi, b, g->refcount[b], refs[b]);
    /* unshared blocks: slots beyond a sequence's used slots hold no token */
    for (int s = 0; s < cache->desc.max_seqs && g->pos != NULL; s++) {
        const kvrt_seq_pages *sp = &g->seqs[s];
        for (int64_t i = sp->n_slots; i < (int64_t)sp->n_blocks * g->block_size; i++) {
            int32_t b = sp->blocks[i / g->block_size];
            if (g->refcount[b] == 1)
                INVARIANT(g->pos[kvrt_seq_slot(g, sp, i)] == -1,
                          "group %d seq %d: unused slot %lld holds position %d", gi, s,
                          (long long)i, g->pos[kvrt_seq_slot(g, sp, i)]);
        }
    }
    /* the device copy of positions equals the host's */
    if (g->pos != NULL && g->n_dirty == 0) {
        size_t n = (size_t)g->n_blocks * (size_t)g->block_size;
        device_pos = malloc(n * sizeof(int32_t));
        CHECK_ALLOC(device_pos);
        kvrt_backend_t *be = (kvrt_backend_t *)&cache->be;
        st = be->ops->download(be, device_pos, g->pos_device, n * sizeof(int32_t), cache->stream);
        if (st != KVRT_OK)
            goto done;
        for (size_t i = 0; i < n; i++)
            INVARIANT(device_pos[i] == g->pos[i],
                      "group %d: device position of slot %zu is %d, host %d", gi, i, device_pos[i],
                      g->pos[i]);
    }
done:
    free(refs);
    free(posbuf);
    free(device_pos);
    return st;
}

static kvrt_status do_cache_check(const kvrt_cache *cache)
{
    KVRT_TRY(kvrt_check_cache(cache, "kvrt_cache_check"));
    cache = KVRT_CORE(cache);
    for (int j = 0; j < cache->n_groups; j++) {
        KVRT_TRY(check_group(cache, j));
        KVRT_TRY(kvrt_prefix_check(cache, j));
    }
    return KVRT_OK;
}

/* ---- public entries: the message of a failure starts with the function ---- */

kvrt_status kvrt_cache_create(const kvrt_cache_desc *desc, kvrt_cache **out)
{
    return kvrt_error_in(do_cache_create(desc, out), "kvrt_cache_create");
}

kvrt_status kvrt_cache_sync(kvrt_cache *cache)
{
    KVRT_ENTRY(cache, "kvrt_cache_sync", do_cache_sync(cache));
}

kvrt_status kvrt_cache_check(const kvrt_cache *cache)
{
    KVRT_ENTRY(cache, "kvrt_cache_check", do_cache_check(cache));
}

/* ---- public entries that only check the thread (internal.h) ---- */

kvrt_status kvrt_cache_set_stream(kvrt_cache *cache, void *stream)
{
    KVRT_ENTRY(cache, "kvrt_cache_set_stream", do_cache_set_stream(cache, stream));
}

kvrt_status kvrt_cache_stats_get(const kvrt_cache *cache, int group, kvrt_cache_stats *out)
{
    KVRT_ENTRY(cache, "kvrt_cache_stats_get", do_cache_stats_get(cache, group, out));
}
