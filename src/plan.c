/*
 * plan.c: the batch and the step's planning. A plan validates everything
 * first (sequences, duplicate positions, sliding windows, capacity), then
 * commits: frees blocks that left a sliding window, copies a shared target
 * block (copy-on-write), appends blocks, assigns a slot per token in every
 * self-attention group, and uploads the step's metadata with one copy.
 */
#include <stdio.h>

#include "internal.h"

/* ---- batch objects ---- */

void kvrt_batch_destroy(kvrt_batch *batch)
{
    if (batch == NULL)
        return;
    kvrt_cache *cache = batch->cache;
    if (batch->groups != NULL)
        for (int j = 0; j < cache->n_groups; j++) {
            kvrt_batch_group *bg = &batch->groups[j];
            free(bg->slots);
            free(bg->page_indptr);
            free(bg->seq_n_slots);
        }
    if (batch->device != NULL) {
        (void)cache->be.ops->sync(&cache->be, cache->stream);
        cache->be.ops->region_destroy(&cache->be, batch->device, batch->device_reserve);
    }
    free(batch->groups);
    free(batch->seq_ids);
    free(batch->positions);
    free(batch->tok_seq);
    free(batch->batch_seqs);
    free(batch->order);
    free(batch->seq_first_pos);
    free(batch->seq_count);
    free(batch->grow);
    free(batch->undo);
    free(batch->image);
    free(batch);
}

static kvrt_status do_batch_create(kvrt_cache *cache, int max_tokens, kvrt_batch **out)
{
    KVRT_CHECK(out != NULL, KVRT_ERR_INVALID_ARG, "kvrt_batch_create: out is NULL");
    *out = NULL;
    KVRT_TRY(kvrt_check_cache(cache, "kvrt_batch_create"));
    cache = KVRT_CORE(cache);
    KVRT_CHECK(max_tokens >= 1 && max_tokens <= (1 << 24), KVRT_ERR_INVALID_ARG,
               "kvrt_batch_create: max_tokens %d must be in [1, 16777216]", max_tokens);
    kvrt_batch *b = calloc(1, sizeof *b);
    KVRT_CHECK(b != NULL, KVRT_ERR_OUT_OF_MEMORY, "host allocation for a batch");
    b->cache = cache;
    b->max_tokens = max_tokens;
    size_t n = (size_t)max_tokens;
    b->seq_ids = malloc(n * sizeof(int32_t));
    b->positions = malloc(n * sizeof(int32_t));
    b->tok_seq = malloc(n * sizeof(int32_t));
    b->batch_seqs = malloc(n * sizeof(int32_t));
    b->order = malloc(n * sizeof(int32_t));
    b->seq_first_pos = malloc(n * sizeof(int32_t));
    b->seq_count = malloc(n * sizeof(int32_t));
    b->groups = calloc((size_t)cache->n_groups, sizeof(kvrt_batch_group));
    int ok = b->seq_ids && b->positions && b->tok_seq && b->batch_seqs && b->order &&
             b->seq_first_pos && b->seq_count && b->groups;
    for (int j = 0; ok && j < cache->n_groups; j++) {
        kvrt_batch_group *bg = &b->groups[j];
        bg->slots = malloc(n * sizeof(int32_t));
        bg->page_indptr = malloc((n + 1) * sizeof(int32_t));
        bg->seq_n_slots = malloc(n * sizeof(int32_t));
        ok = bg->slots && bg->page_indptr && bg->seq_n_slots;
    }
    if (!ok) {
        kvrt_batch_destroy(b);
        return kvrt_set_error(KVRT_ERR_OUT_OF_MEMORY, "host allocation for a batch of %d tokens",
                              max_tokens);
    }
    /* Device metadata: reserved for the largest plan the cache can produce
     * (every batch sequence holding every block of every group), committed
     * as plans need it, so the buffer never moves. */
    int64_t words = 2 * (int64_t)max_tokens;
    int64_t seqs = max_tokens < cache->desc.max_seqs ? max_tokens : cache->desc.max_seqs;
    for (int j = 0; j < cache->n_groups; j++)
        words += 3 * (int64_t)max_tokens + 1 + seqs * cache->groups[j].max_blocks;
    b->device_reserve = (size_t)words * sizeof(int32_t);
    b->device_commit = 0;
    kvrt_status st = cache->be.ops->region_create(&cache->be, b->device_reserve, 0, &b->device);
    if (st != KVRT_OK) {
        b->device = NULL;
        kvrt_batch_destroy(b);
        return st;
    }
    *out = b;
    return KVRT_OK;
}

int kvrt_batch_n_tokens(const kvrt_batch *batch) { return batch != NULL ? batch->n_tokens : 0; }

/* ---- planning ---- */

static _Thread_local const int32_t *sort_keys_seq, *sort_keys_pos;

static int cmp_token(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    int32_t sx = sort_keys_seq[x], sy = sort_keys_seq[y];
    if (sx != sy)
        return (sx > sy) - (sx < sy);
    int32_t px = sort_keys_pos[x], py = sort_keys_pos[y];
    if (px != py)
        return (px > py) - (px < py);
    return (x > y) - (x < y);
}


/* The group whose live slots are a sequence's whole token set: a group
 * without eviction if there is one. */
static int reference_group(const kvrt_cache *cache)
{
    int first = -1;
    for (int j = 0; j < cache->n_groups; j++) {
        const kvrt_group *g = &cache->groups[j];
        if (!kvrt_group_is_self(g))
            continue;
        if (!g->evict)
            return j;
        if (first < 0)
            first = j;
    }
    return first;
}

/* A block of sp can leave the window when every used slot in it is a hole or
 * lies at or below `limit`. */
static int block_evictable(const kvrt_group *g, const kvrt_seq_pages *sp, int32_t page, int32_t limit)
{
    int64_t first = (int64_t)page * g->block_size;
    int64_t end = first + g->block_size;
    if (end > sp->n_slots)
        end = sp->n_slots;
    for (int64_t i = first; i < end; i++) {
        int32_t p = g->pos[kvrt_seq_slot(g, sp, i)];
        if (p > limit)
            return 0;
    }
    return 1;
}

typedef struct seq_plan {
    int32_t seq;
    int32_t first;   /* index into order */
    int32_t count;
    int32_t pos_min; /* lowest new position */
} seq_plan;

/* Frees the blocks of sp that left the window below `limit`. */
static void evict_blocks(kvrt_group *g, kvrt_seq_pages *sp, int32_t limit)
{
    int32_t kept = 0;
    int32_t n = sp->n_blocks;
    int64_t last_used = sp->n_slots - (int64_t)(n - 1) * g->block_size; /* slots used in last */
    int last_removed = 0;
    for (int32_t i = 0; i < n; i++) {
        if (block_evictable(g, sp, i, limit)) {
            int64_t first = (int64_t)i * g->block_size;
            int64_t end = i == n - 1 ? sp->n_slots : first + g->block_size;
            for (int64_t k = first; k < end; k++) {
                int32_t p = g->pos[kvrt_seq_slot(g, sp, k)];
                if (p < 0)
                    continue;
                if (sp->evicted_max < 0 || p > sp->evicted_max)
                    sp->evicted_max = p;
                if (sp->evicted_min < 0 || p < sp->evicted_min)
                    sp->evicted_min = p;
            }
            kvrt_group_block_release(g, sp->blocks[i]);
            if (i == n - 1)
                last_removed = 1;
        } else {
            sp->blocks[kept++] = sp->blocks[i];
        }
    }
    if (kept == n)
        return;
    sp->n_blocks = kept;
    if (kept == 0)
        sp->n_slots = 0;
    else if (last_removed)
        sp->n_slots = (int64_t)kept * g->block_size;
    else
        sp->n_slots = (int64_t)(kept - 1) * g->block_size + last_used;
}

/* ---- the commit's journal ----
 * A plan changes its sequences' page tables and positions on the host as it
 * queues its device work (copy-on-write copies, the metadata upload, the
 * positions). When a device call fails, the journal puts the host tables
 * back, so the cache is as it was (kvrt.h, "Device failures"): the device
 * work already queued wrote only blocks that return to the pool and the
 * device copy of positions, which is uploaded again. That holds when the
 * commit released no block (no sliding window dropped one) and took no
 * cached block (prefix caching is off); otherwise the cache is lost.
 * Layout: per (group, batch sequence) UNDO_SEQ values (the page table's
 * n_blocks, n_slots, n_live, pos_min, pos_max, and the page and old block
 * of a copy-on-write, -1 none), then (group, block) pairs of the blocks
 * allocated, in order. */
enum { UNDO_SEQ = 7 };

typedef struct plan_undo {
    int64_t *at;
    int      n_seqs;
    int64_t  n_allocs;
    int      possible;
} plan_undo;

static kvrt_status undo_reserve(kvrt_cache *cache, kvrt_batch *batch, int n, int n_seqs, plan_undo *u)
{
    int64_t per_group = (int64_t)n_seqs * UNDO_SEQ + 2 * ((int64_t)n + n_seqs);
    KVRT_TRY(kvrt_reserve((void **)&batch->undo, &batch->undo_cap, per_group * cache->n_groups + 1,
                          sizeof(int64_t)));
    u->at = batch->undo;
    u->n_seqs = n_seqs;
    u->n_allocs = 0;
    u->possible = cache->prefix == NULL;
    return KVRT_OK;
}

static int64_t *undo_seq(plan_undo *u, int j, int s) { return u->at + ((int64_t)j * u->n_seqs + s) * UNDO_SEQ; }

static void undo_save_seq(plan_undo *u, int j, int s, const kvrt_seq_pages *sp)
{
    int64_t *e = undo_seq(u, j, s);
    e[0] = sp->n_blocks;
    e[1] = sp->n_slots;
    e[2] = sp->n_live;
    e[3] = sp->pos_min;
    e[4] = sp->pos_max;
    e[5] = e[6] = -1;
}

static void undo_alloc(plan_undo *u, int n_groups, int j, int32_t block)
{
    int64_t *a = u->at + (int64_t)n_groups * u->n_seqs * UNDO_SEQ + 2 * u->n_allocs++;
    a[0] = j;
    a[1] = block;
}

/* Puts back what the commit changed (u->possible must hold). */
static void undo_apply(kvrt_cache *cache, kvrt_batch *batch, const seq_plan *plans, plan_undo *u)
{
    for (int j = 0; j < cache->n_groups; j++) {
        kvrt_group *g = &cache->groups[j];
        if (!kvrt_group_is_self(g))
            continue;
        for (int s = 0; s < u->n_seqs; s++) {
            kvrt_seq_pages *sp = &g->seqs[plans[s].seq];
            const int64_t *e = undo_seq(u, j, s);
            /* the slots the plan appended held no position */
            for (int64_t i = e[1]; i < sp->n_slots; i++) {
                int64_t slot = kvrt_seq_slot(g, sp, i);
                g->pos[slot] = -1;
                kvrt_group_mark_dirty(g, (int32_t)(slot / g->block_size));
            }
            if (e[5] >= 0) { /* the shared block the copy replaced */
                sp->blocks[e[5]] = (int32_t)e[6];
                g->refcount[e[6]]++;
            }
            sp->n_blocks = (int32_t)e[0];
            sp->n_slots = e[1];
            sp->n_live = e[2];
            sp->pos_min = (int32_t)e[3];
            sp->pos_max = (int32_t)e[4];
        }
    }
    /* new blocks back to the pool, last first: the free stacks are as before */
    const int64_t *a = u->at + (int64_t)cache->n_groups * u->n_seqs * UNDO_SEQ;
    for (int64_t i = u->n_allocs - 1; i >= 0; i--)
        kvrt_group_block_release(&cache->groups[a[2 * i]], (int32_t)a[2 * i + 1]);
    batch->n_tokens = 0; /* its host arrays hold the failed plan */
    cache->epoch++;      /* device positions may hold its until the next upload */
    cache->changing = 0;
}

static kvrt_status plan_commit(kvrt_cache *cache, int n, const int32_t *seq_ids,
                               const int32_t *positions, kvrt_batch *batch, const seq_plan *plans,
                               int n_seqs, const int32_t *order, plan_undo *u);

static kvrt_status do_batch_plan(kvrt_cache *cache, int n, const int32_t *seq_ids,
                                 const int32_t *positions, kvrt_batch *batch)
{
    KVRT_TRY(kvrt_check_cache(cache, "kvrt_batch_plan"));
    cache = KVRT_CORE(cache);
    KVRT_CHECK(batch != NULL, KVRT_ERR_INVALID_ARG, "kvrt_batch_plan: batch is NULL");
    KVRT_CHECK(batch->cache == cache, KVRT_ERR_INVALID_ARG,
               "kvrt_batch_plan: the batch was created for another cache");
    KVRT_CHECK(n >= 1 && n <= batch->max_tokens, KVRT_ERR_INVALID_ARG,
               "kvrt_batch_plan: n %d must be in [1, %d] (the batch's max_tokens)", n,
               batch->max_tokens);
    KVRT_CHECK(seq_ids != NULL && positions != NULL, KVRT_ERR_INVALID_ARG,
               "kvrt_batch_plan: seq_ids or positions is NULL");
    for (int t = 0; t < n; t++) {
        KVRT_CHECK(seq_ids[t] >= 0 && seq_ids[t] < cache->desc.max_seqs, KVRT_ERR_INVALID_ARG,
                   "kvrt_batch_plan: token %d: sequence %d is out of range [0, %d)", t,
                   (int)seq_ids[t], cache->desc.max_seqs);
        KVRT_CHECK(positions[t] >= 0, KVRT_ERR_INVALID_ARG,
                   "kvrt_batch_plan: token %d: position %d is negative", t, (int)positions[t]);
        KVRT_CHECK(positions[t] < INT32_MAX, KVRT_ERR_POS_RANGE,
                   "kvrt_batch_plan: token %d: position %d must be below 2^31 - 1", t,
                   (int)positions[t]);
    }
    /* tokens by (sequence, position) */
    int32_t *order = batch->order;
    for (int t = 0; t < n; t++)
        order[t] = t;
    sort_keys_seq = seq_ids;
    sort_keys_pos = positions;
    qsort(order, (size_t)n, sizeof(int32_t), cmp_token);
    for (int i = 1; i < n; i++) {
        int32_t a = order[i - 1], b = order[i];
        KVRT_CHECK(seq_ids[a] != seq_ids[b] || positions[a] != positions[b], KVRT_ERR_POS_EXISTS,
                   "kvrt_batch_plan: tokens %d and %d both hold sequence %d position %d",
                   (int)(a < b ? a : b), (int)(a < b ? b : a), (int)seq_ids[a], (int)positions[a]);
    }
    /* batch sequences */
    seq_plan *plans;
    int32_t *plans_raw;
    KVRT_TRY(kvrt_scratch(cache, 0, (int64_t)n * (int64_t)(sizeof(seq_plan) / sizeof(int32_t)),
                          &plans_raw));
    plans = (seq_plan *)(void *)plans_raw;
    int n_seqs = 0;
    for (int i = 0; i < n; i++) {
        int32_t t = order[i];
        if (n_seqs == 0 || plans[n_seqs - 1].seq != seq_ids[t]) {
            plans[n_seqs].seq = seq_ids[t];
            plans[n_seqs].first = i;
            plans[n_seqs].count = 0;
            plans[n_seqs].pos_min = positions[t];
            n_seqs++;
        }
        plans[n_seqs - 1].count++;
    }
    /* positions already present */
    int rg = reference_group(cache);
    if (rg >= 0) {
        const kvrt_group *g = &cache->groups[rg];
        for (int s = 0; s < n_seqs; s++) {
            const kvrt_seq_pages *sp = &g->seqs[plans[s].seq];
            if (sp->n_live == 0 || plans[s].pos_min > sp->pos_max)
                continue;
            int32_t *live;
            KVRT_TRY(kvrt_scratch(cache, 1, sp->n_live, &live));
            int64_t m = kvrt_seq_pages_live_sorted(g, sp, live);
            for (int k = 0; k < plans[s].count; k++) {
                int32_t p = positions[order[plans[s].first + k]];
                KVRT_CHECK(bsearch(&p, live, (size_t)m, sizeof(int32_t), kvrt_cmp_i32) == NULL,
                           KVRT_ERR_POS_EXISTS,
                           "kvrt_batch_plan: sequence %d already holds position %d",
                           (int)plans[s].seq, (int)p);
            }
        }
    }
    /* sliding windows: every token must see all rows of its window */
    for (int j = 0; j < cache->n_groups; j++) {
        kvrt_group *g = &cache->groups[j];
        for (int s = 0; g->evict && s < n_seqs; s++) {
            const kvrt_seq_pages *sp = &g->seqs[plans[s].seq];
            int32_t pmin = plans[s].pos_min;
            KVRT_CHECK(sp->evicted_max < 0 || (int64_t)sp->evicted_max <= (int64_t)pmin - g->window,
                       KVRT_ERR_WINDOW_EVICTED,
                       "kvrt_batch_plan: sequence %d position %d: layer %d's window of %d "
                       "positions was evicted up to position %d",
                       (int)plans[s].seq, (int)pmin, g->layers[0], g->window, (int)sp->evicted_max);
        }
    }
    /* capacity, per group */
    KVRT_TRY(kvrt_reserve((void **)&batch->grow, &batch->grow_cap, cache->n_groups, sizeof(int64_t)));
    int64_t *grow = batch->grow;
    for (int j = 0; j < cache->n_groups; j++) {
        kvrt_group *g = &cache->groups[j];
        if (!kvrt_group_is_self(g))
            continue;
        int64_t need = 0, freed = 0;
        int32_t *pending = g->pending; /* zero between plans */
        kvrt_status st = KVRT_OK;
        for (int s = 0; s < n_seqs && st == KVRT_OK; s++) {
            const kvrt_seq_pages *sp = &g->seqs[plans[s].seq];
            int64_t cur = sp->n_slots;
            int32_t cur_blocks = sp->n_blocks;
            int32_t last_block = sp->n_blocks > 0 ? sp->blocks[sp->n_blocks - 1] : -1;
            if (g->evict) {
                int32_t pmin = plans[s].pos_min;
                int32_t limit = (int32_t)((int64_t)pmin - g->window);
                int32_t kept = 0, last_removed = 0;
                for (int32_t i = 0; i < sp->n_blocks; i++) {
                    if (limit >= -1 && block_evictable(g, sp, i, limit)) {
                        int32_t b = sp->blocks[i];
                        pending[b]++;
                        if (pending[b] == g->refcount[b])
                            freed++;
                        if (i == sp->n_blocks - 1)
                            last_removed = 1;
                    } else {
                        kept++;
                        last_block = sp->blocks[i];
                    }
                }
                if (kept != sp->n_blocks) {
                    int64_t last_used = sp->n_slots - (int64_t)(sp->n_blocks - 1) * g->block_size;
                    cur = kept == 0 ? 0 : last_removed ? (int64_t)kept * g->block_size
                                                       : (int64_t)(kept - 1) * g->block_size + last_used;
                    cur_blocks = kept;
                    if (kept == 0)
                        last_block = -1;
                }
            }
            int64_t bs = g->block_size;
            int64_t have = cur_blocks;
            int64_t want = (cur + plans[s].count + bs - 1) / bs;
            need += want - have;
            kvrt_seq_pages *spw = &g->seqs[plans[s].seq];
            st = kvrt_reserve((void **)&spw->blocks, &spw->cap_blocks, sp->n_blocks + want + 1,
                              sizeof(int32_t));
            if (cur % bs != 0 && last_block >= 0 && g->refcount[last_block] > 1)
                need++; /* copy-on-write of the partly used last block */
        }
        if (g->evict) /* undo the scratch counts */
            for (int s = 0; s < n_seqs; s++) {
                const kvrt_seq_pages *sp = &g->seqs[plans[s].seq];
                for (int32_t i = 0; i < sp->n_blocks; i++)
                    pending[sp->blocks[i]] = 0;
            }
        KVRT_TRY(st);
        KVRT_CHECK(need <= kvrt_group_available(g) + freed, KVRT_ERR_CAPACITY,
                   "kvrt_batch_plan: layer group %d (layer %d) needs %lld new blocks; %d free, "
                   "%lld leaving the window, room to grow by %d",
                   j, g->layers[0], (long long)need, g->n_free, (long long)freed,
                   g->max_blocks - g->n_blocks);
        grow[j] = need > freed ? need - freed : 0;
    }
    /* every group fits: grow the pools that must (addresses stay) */
    for (int j = 0; j < cache->n_groups; j++)
        if (kvrt_group_is_self(&cache->groups[j]) && grow[j] > 0)
            KVRT_TRY(kvrt_group_ensure_free(cache, &cache->groups[j], grow[j]));
    /* host arrays sized for the page tables */
    int64_t words = 2 * (int64_t)n;
    for (int j = 0; j < cache->n_groups; j++) {
        kvrt_group *g = &cache->groups[j];
        int64_t pages = 0;
        for (int s = 0; s < n_seqs; s++) {
            const kvrt_seq_pages *sp = &g->seqs[plans[s].seq];
            int64_t est = kvrt_group_is_self(g)
                              ? sp->n_blocks + (plans[s].count + g->block_size - 1) / g->block_size + 1
                              : sp->n_blocks;
            pages += est < g->max_blocks ? est : g->max_blocks;
        }
        words += 3 * (int64_t)n + 1 + pages;
    }
    KVRT_TRY(kvrt_reserve((void **)&batch->image, &batch->image_cap, words, sizeof(int32_t)));
    size_t bytes = (size_t)words * sizeof(int32_t);
    if (bytes > batch->device_commit) {
        size_t commit = batch->device_commit * 2 > bytes ? batch->device_commit * 2 : bytes;
        if (commit > batch->device_reserve)
            commit = batch->device_reserve;
        KVRT_CHECK(bytes <= commit, KVRT_ERR_INTERNAL, "batch metadata exceeds its reservation");
        KVRT_TRY(cache->be.ops->region_grow(&cache->be, batch->device, batch->device_reserve,
                                            batch->device_commit, commit));
        batch->device_commit = commit;
    }

    plan_undo undo;
    KVRT_TRY(undo_reserve(cache, batch, n, n_seqs, &undo));

    /* ---- commit: nothing below fails on a valid cache but a device call
     * (kvrt.h, "Device failures"), after which the journal puts the host
     * tables back (undo_apply) ---- */
    kvrt_change_begin(cache);
    kvrt_status st = plan_commit(cache, n, seq_ids, positions, batch, plans, n_seqs, order, &undo);
    if (st != KVRT_OK && undo.possible)
        undo_apply(cache, batch, plans, &undo);
    return st;
}

/* The commit of do_batch_plan, journaled in u. */
static kvrt_status plan_commit(kvrt_cache *cache, int n, const int32_t *seq_ids,
                               const int32_t *positions, kvrt_batch *batch, const seq_plan *plans,
                               int n_seqs, const int32_t *order, plan_undo *u)
{
    for (int j = 0; j < cache->n_groups; j++)
        for (int s = 0; s < n_seqs; s++)
            undo_save_seq(u, j, s, &cache->groups[j].seqs[plans[s].seq]);
    cache->be.ops->stage_reset(&cache->be, cache->stream);
    batch->n_tokens = n;
    batch->n_seqs = n_seqs;
    for (int t = 0; t < n; t++) {
        batch->seq_ids[t] = seq_ids[t];
        batch->positions[t] = positions[t];
    }
    for (int s = 0; s < n_seqs; s++) {
        batch->batch_seqs[s] = plans[s].seq;
        for (int k = 0; k < plans[s].count; k++)
            batch->tok_seq[order[plans[s].first + k]] = s;
    }
    /* Page tables go straight into the upload image (laid out below): per
     * group, slots [n], page_indptr [n_seqs + 1], seq_n_slots [n_seqs], then
     * page_indices. */
    int64_t group_at = 2 * (int64_t)n;
    for (int j = 0; j < cache->n_groups; j++) {
        kvrt_group *g = &cache->groups[j];
        kvrt_batch_group *bg = &batch->groups[j];
        int32_t *page_indices = batch->image + group_at + n + 2 * (int64_t)n_seqs + 1;
        int32_t pages = 0;
        bg->max_seq_slots = 0;
        /* first every sequence frees what left its window, so that the
         * blocks counted as freed exist before anyone allocates */
        for (int s = 0; g->evict && s < n_seqs; s++) {
            kvrt_seq_pages *sp = &g->seqs[plans[s].seq];
            int32_t limit = (int32_t)((int64_t)plans[s].pos_min - g->window);
            int32_t had = sp->n_blocks;
            if (limit >= -1)
                evict_blocks(g, sp, limit);
            if (sp->n_blocks != had)
                u->possible = 0; /* released blocks may be taken again below */
            kvrt_seq_pages_refresh(g, sp);
        }
        for (int s = 0; s < n_seqs; s++) {
            kvrt_seq_pages *sp = &g->seqs[plans[s].seq];
            if (kvrt_group_is_self(g)) {
                int64_t bs = g->block_size;
                if (sp->n_slots % bs != 0) {
                    int32_t page = sp->n_blocks - 1, old = sp->blocks[page];
                    KVRT_TRY(kvrt_group_unshare(cache, g, sp, page));
                    if (sp->blocks[page] != old) {
                        int64_t *e = undo_seq(u, j, s);
                        e[5] = page;
                        e[6] = old;
                        undo_alloc(u, cache->n_groups, j, sp->blocks[page]);
                    }
                }
                for (int k = 0; k < plans[s].count; k++) {
                    int32_t t = order[plans[s].first + k];
                    if (sp->n_slots == (int64_t)sp->n_blocks * bs) {
                        int32_t b = kvrt_group_block_alloc(g);
                        KVRT_CHECK(b >= 0, KVRT_ERR_INTERNAL, "planned block missing");
                        undo_alloc(u, cache->n_groups, j, b);
                        KVRT_TRY(kvrt_seq_pages_push(sp, b));
                    }
                    int64_t slot = kvrt_seq_slot(g, sp, sp->n_slots);
                    sp->n_slots++;
                    g->pos[slot] = positions[t];
                    kvrt_group_mark_dirty(g, (int32_t)(slot / bs));
                    bg->slots[t] = (int32_t)slot;
                    if (sp->n_live == 0 || positions[t] < sp->pos_min)
                        sp->pos_min = positions[t];
                    if (sp->n_live == 0 || positions[t] > sp->pos_max)
                        sp->pos_max = positions[t];
                    sp->n_live++;
                }
            } else {
                for (int k = 0; k < plans[s].count; k++)
                    bg->slots[order[plans[s].first + k]] = -1;
            }
            bg->page_indptr[s] = pages;
            if (sp->n_blocks > 0) /* blocks is NULL until the first */
                memcpy(page_indices + pages, sp->blocks, (size_t)sp->n_blocks * sizeof(int32_t));
            pages += sp->n_blocks;
            bg->seq_n_slots[s] = (int32_t)sp->n_slots;
            if (sp->n_slots > bg->max_seq_slots)
                bg->max_seq_slots = (int32_t)sp->n_slots;
        }
        bg->page_indptr[n_seqs] = pages;
        group_at += n + 2 * (int64_t)n_seqs + 1 + pages;
    }
    /* one image, one upload */
    int32_t *img = batch->image;
    int64_t at = 0;
    const int32_t *dev = batch->device;
    memcpy(img + at, batch->tok_seq, (size_t)n * sizeof(int32_t));
    batch->d_tok_seq = dev + at;
    at += n;
    memcpy(img + at, batch->positions, (size_t)n * sizeof(int32_t));
    batch->d_positions = dev + at;
    at += n;
    for (int j = 0; j < cache->n_groups; j++) {
        kvrt_batch_group *bg = &batch->groups[j];
        memcpy(img + at, bg->slots, (size_t)n * sizeof(int32_t));
        bg->d_slots = dev + at;
        at += n;
        memcpy(img + at, bg->page_indptr, (size_t)(n_seqs + 1) * sizeof(int32_t));
        bg->d_page_indptr = dev + at;
        at += n_seqs + 1;
        memcpy(img + at, bg->seq_n_slots, (size_t)n_seqs * sizeof(int32_t));
        bg->d_seq_n_slots = dev + at;
        at += n_seqs;
        bg->d_page_indices = dev + at; /* already in place */
        at += bg->page_indptr[n_seqs];
    }
    KVRT_TRY(cache->be.ops->upload(&cache->be, batch->device, img, (size_t)at * sizeof(int32_t),
                                   cache->stream));
    KVRT_TRY(kvrt_cache_sync_pos(cache));
    batch->epoch = ++cache->epoch;
    return KVRT_OK;
}

/* ---- public entries: the message of a failure starts with the function ---- */

kvrt_status kvrt_batch_create(kvrt_cache *cache, int max_tokens, kvrt_batch **out)
{
    KVRT_ENTRY(cache, "kvrt_batch_create", do_batch_create(cache, max_tokens, out));
}

kvrt_status kvrt_batch_plan(kvrt_cache *cache, int n, const int32_t *seq_ids,
                            const int32_t *positions, kvrt_batch *batch)
{
    KVRT_ENTRY(cache, "kvrt_batch_plan",
               kvrt_change_end(cache, do_batch_plan(cache, n, seq_ids, positions, batch),
                               "kvrt_batch_plan"));
}
