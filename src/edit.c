/*
 * edit.c: sequence edits (rm, cp, keep, shift, div, clear, compact), the
 * queries, gather and cross-attention K/V. Every edit validates first
 * (arguments, collisions, blocks needed for copy-on-write) and only then
 * changes anything; device work (slot copies, RoPE re-rotation, positions)
 * is queued on the cache's stream.
 */
#include <stdio.h>

#include "internal.h"
#include "prefix.h"


static int in_range(int32_t p, int32_t p0, int32_t p1) { return p >= p0 && (p1 < 0 || p < p1); }

/* ---- the position rewrite engine shared by rm, shift and div ----
 * A rewrite maps each live position of a sequence in [p0, p1) to a new one
 * (REMOVE drops the token). Blocks whose live tokens all go are dropped from
 * the page table; other touched blocks that are shared are copied first. */

enum { REWRITE_RM, REWRITE_SHIFT, REWRITE_DIV };

typedef struct rewrite {
    int     kind;
    int32_t p0, p1;
    int64_t arg;   /* delta or divisor */
} rewrite;

#define REWRITE_REMOVE (-1)

/* Shared blocks of a seq < 0 rewrite (alike_blocks) */
enum { ALIKE_IN_PLACE = 1, ALIKE_DONE = 2 };

static kvrt_status rewrite_all(kvrt_cache *cache, int32_t seq, const rewrite *rw, uint8_t **alike);

/* New position of p (p is live): p itself when untouched, REMOVE, or >= 0.
 * Sets *overflow when the result leaves int32. */
static int64_t rewrite_pos(const rewrite *rw, int32_t p)
{
    if (!in_range(p, rw->p0, rw->p1))
        return p;
    switch (rw->kind) {
    case REWRITE_RM: return REWRITE_REMOVE;
    case REWRITE_SHIFT: {
        int64_t np = (int64_t)p + rw->arg;
        return np < 0 ? REWRITE_REMOVE : np;
    }
    default: return (int64_t)p / rw->arg;
    }
}

/* Counts what a rewrite of sp needs: copy-on-write blocks; checks new
 * positions (range, collisions). */
static kvrt_status rewrite_check(kvrt_cache *cache, const kvrt_group *g, int32_t seq,
                                 const rewrite *rw, const uint8_t *alike, int64_t *cow)
{
    const kvrt_seq_pages *sp = &g->seqs[seq];
    int64_t bs = g->block_size;
    int32_t *newpos;
    KVRT_TRY(kvrt_scratch(cache, 1, sp->n_live + 1, &newpos));
    int64_t m = 0;
    for (int32_t page = 0; page < sp->n_blocks; page++) {
        int64_t first = (int64_t)page * bs, end = first + bs < sp->n_slots ? first + bs : sp->n_slots;
        int64_t live = 0, changed = 0, removed = 0;
        for (int64_t i = first; i < end; i++) {
            int32_t p = g->pos[kvrt_seq_slot(g, sp, i)];
            if (p < 0)
                continue;
            live++;
            int64_t np = rewrite_pos(rw, p);
            KVRT_CHECK(np < INT32_MAX, KVRT_ERR_POS_RANGE,
                       "sequence %d: position %d moved by %lld leaves the int32 range", (int)seq,
                       (int)p, (long long)rw->arg);
            if (np == REWRITE_REMOVE)
                removed++;
            else
                newpos[m++] = (int32_t)np;
            if (np != p)
                changed++;
        }
        if (changed > 0 && removed < live && g->refcount[sp->blocks[page]] > 1 &&
            !(alike != NULL && alike[sp->blocks[page]]))
            (*cow)++;
    }
    if (rw->kind == REWRITE_RM)
        return KVRT_OK;
    qsort(newpos, (size_t)m, sizeof(int32_t), kvrt_cmp_i32);
    for (int64_t i = 1; i < m; i++)
        KVRT_CHECK(newpos[i] != newpos[i - 1], KVRT_ERR_POS_EXISTS,
                   "sequence %d: two tokens would share position %d after the edit", (int)seq,
                   (int)newpos[i]);
    return KVRT_OK;
}

/* Drops trailing holes and the blocks they leave empty. */
static void seq_trim(kvrt_group *g, kvrt_seq_pages *sp)
{
    while (sp->n_slots > 0 && g->pos[kvrt_seq_slot(g, sp, sp->n_slots - 1)] < 0)
        sp->n_slots--;
    int64_t bs = g->block_size;
    while ((int64_t)sp->n_blocks > (sp->n_slots + bs - 1) / bs)
        kvrt_group_block_release(g, sp->blocks[--sp->n_blocks]);
}

/* Whether a rewrite removes every live token of a page (which is then
 * dropped from the page table). */
static int page_dropped(const kvrt_group *g, const kvrt_seq_pages *sp, const rewrite *rw, int32_t page)
{
    int64_t bs = g->block_size, first = (int64_t)page * bs;
    int64_t end = page == sp->n_blocks - 1 ? sp->n_slots : first + bs;
    int64_t live = 0, removed = 0;
    for (int64_t i = first; i < end; i++) {
        int32_t p = g->pos[(int64_t)sp->blocks[page] * bs + (i - first)];
        if (p < 0)
            continue;
        live++;
        removed += rewrite_pos(rw, p) == REWRITE_REMOVE;
    }
    return live > 0 && removed == live;
}

/* Applies a checked rewrite; appends (slot, delta) pairs to rotate. */
static kvrt_status rewrite_apply(kvrt_cache *cache, kvrt_group *g, int32_t seq, const rewrite *rw,
                                 uint8_t *alike, int32_t *rot_slots, int32_t *rot_deltas,
                                 int64_t *n_rot)
{
    kvrt_seq_pages *sp = &g->seqs[seq];
    int64_t bs = g->block_size;
    int32_t kept = 0;
    int32_t n = sp->n_blocks;
    int64_t last_used = n > 0 ? sp->n_slots - (int64_t)(n - 1) * bs : 0;
    int last_dropped = 0;
    /* prefix caching: dropped blocks go last first, so that a chain's
     * leaves are cached (and evicted) before their parents; -1 marks them */
    for (int32_t page = n - 1; g->prefix != NULL && page >= 0; page--)
        if (!(alike != NULL && alike[sp->blocks[page]] == ALIKE_DONE) && /* already rewritten */
            page_dropped(g, sp, rw, page)) {
            kvrt_group_block_release(g, sp->blocks[page]);
            sp->blocks[page] = -1;
        }
    for (int32_t page = 0; page < n; page++) {
        if (sp->blocks[page] < 0) {
            last_dropped |= page == n - 1;
            continue;
        }
        int64_t first = (int64_t)page * bs, end = page == n - 1 ? sp->n_slots : first + bs;
        if (alike != NULL && alike[sp->blocks[page]] == ALIKE_DONE) { /* an earlier sharer's */
            sp->blocks[kept++] = sp->blocks[page];
            continue;
        }
        int64_t live = 0, changed = 0, removed = 0;
        for (int64_t i = first; i < end; i++) {
            int32_t p = g->pos[(int64_t)sp->blocks[page] * bs + (i - first)];
            if (p < 0)
                continue;
            live++;
            int64_t np = rewrite_pos(rw, p);
            removed += np == REWRITE_REMOVE;
            changed += np != p;
        }
        if (live > 0 && removed == live) {
            kvrt_group_block_release(g, sp->blocks[page]);
            if (page == n - 1)
                last_dropped = 1;
            continue;
        }
        sp->blocks[kept] = sp->blocks[page];
        if (changed > 0) {
            if (alike != NULL && alike[sp->blocks[kept]])
                alike[sp->blocks[kept]] = ALIKE_DONE; /* edited in place, once for all sharers */
            else
                KVRT_TRY(kvrt_group_unshare(cache, g, sp, kept));
            int32_t b = sp->blocks[kept];
            kvrt_prefix_forget(g, b); /* its rows or positions change */
            for (int64_t i = 0; i < end - first; i++) {
                int64_t slot = (int64_t)b * bs + i;
                int32_t p = g->pos[slot];
                if (p < 0)
                    continue;
                int64_t np = rewrite_pos(rw, p);
                if (np == p)
                    continue;
                g->pos[slot] = (int32_t)np;
                if (np != REWRITE_REMOVE && g->max_rot_dims > 0) {
                    rot_slots[*n_rot] = (int32_t)slot;
                    rot_deltas[*n_rot] = (int32_t)(np - p);
                    (*n_rot)++;
                }
            }
            kvrt_group_mark_dirty(g, b);
        }
        kept++;
    }
    if (kept != n) {
        sp->n_blocks = kept;
        sp->n_slots = kept == 0 ? 0 : last_dropped ? (int64_t)kept * bs : (int64_t)(kept - 1) * bs + last_used;
    }
    seq_trim(g, sp);
    kvrt_seq_pages_refresh(g, sp);
    return KVRT_OK;
}

/* Keeps the dropped-position interval [evicted_min, evicted_max] of a
 * sliding-window group true after an edit: the part inside the edited range
 * is mapped like the tokens (or forgotten when removed), and the result is
 * the hull of what remains, so resuming is never allowed wrongly. */
static void rewrite_evicted(kvrt_seq_pages *sp, const rewrite *rw)
{
    if (sp->evicted_max < 0)
        return;
    int64_t lo = sp->evicted_min, hi = sp->evicted_max;
    int64_t r1 = rw->p1 < 0 ? INT64_MAX : (int64_t)rw->p1 - 1; /* range [p0, r1] */
    int64_t nlo = INT64_MAX, nhi = -1;
    /* parts outside the range stay */
    if (lo < rw->p0) {
        nlo = lo;
        nhi = hi < rw->p0 ? hi : rw->p0 - 1;
    }
    if (hi > r1) {
        int64_t a = lo > r1 ? lo : r1 + 1;
        if (a < nlo)
            nlo = a;
        nhi = hi;
    }
    /* the part inside is mapped */
    int64_t b0 = lo > rw->p0 ? lo : rw->p0, b1 = hi < r1 ? hi : r1;
    if (b0 <= b1 && rw->kind != REWRITE_RM) {
        int64_t m0 = rw->kind == REWRITE_SHIFT ? b0 + rw->arg : b0 / rw->arg;
        int64_t m1 = rw->kind == REWRITE_SHIFT ? b1 + rw->arg : b1 / rw->arg;
        if (m0 < 0)
            m0 = 0;
        if (m1 >= 0) {
            if (m0 < nlo)
                nlo = m0;
            if (m1 > nhi)
                nhi = m1;
        }
    }
    if (nhi < 0 || nlo > nhi) {
        sp->evicted_min = sp->evicted_max = -1;
        return;
    }
    sp->evicted_min = (int32_t)nlo;
    sp->evicted_max = (int32_t)(nhi > INT32_MAX - 1 ? INT32_MAX - 1 : nhi);
}

/* After an edit, the positions a sliding-window group dropped are derived
 * again from the live slots where a full group holds every token: they are
 * the tokens the full group has and the window group lacks. Without a full
 * group, an empty sequence forgets them. */
static kvrt_status refresh_evicted(kvrt_cache *cache, int32_t seq)
{
    const kvrt_group *full = NULL;
    int any_live = 0;
    for (int j = 0; j < cache->n_groups; j++) {
        const kvrt_group *g = &cache->groups[j];
        if (!kvrt_group_is_self(g))
            continue;
        any_live |= g->seqs[seq].n_live > 0;
        if (!g->evict && full == NULL)
            full = g;
    }
    for (int j = 0; j < cache->n_groups; j++) {
        kvrt_group *g = &cache->groups[j];
        kvrt_seq_pages *sp = &g->seqs[seq];
        if (!g->evict || sp->evicted_max < 0)
            continue;
        if (full == NULL) {
            if (!any_live)
                sp->evicted_min = sp->evicted_max = -1;
            continue;
        }
        const kvrt_seq_pages *fp = &full->seqs[seq];
        int32_t *a, *b;
        KVRT_TRY(kvrt_scratch(cache, 1, fp->n_live + 1, &a));
        KVRT_TRY(kvrt_scratch(cache, 2, sp->n_live + 1, &b));
        int64_t na = kvrt_seq_pages_live_sorted(full, fp, a), nb = kvrt_seq_pages_live_sorted(g, sp, b);
        int32_t lo = -1, hi = -1;
        for (int64_t i = 0, k = 0; i < na; i++) {
            while (k < nb && b[k] < a[i])
                k++;
            if (k < nb && b[k] == a[i])
                continue;
            if (lo < 0)
                lo = a[i];
            hi = a[i];
        }
        sp->evicted_min = lo;
        sp->evicted_max = hi;
    }
    return KVRT_OK;
}

static kvrt_status rotate_group(kvrt_cache *cache, kvrt_group *g, const int32_t *slots,
                                const int32_t *deltas, int64_t n)
{
    /* pre-RoPE: K is unrotated, attention turns it by the new positions */
    if (n == 0 || g->max_rot_dims == 0 || cache->desc.rope.mode == KVRT_ROPE_IN_ATTENTION)
        return KVRT_OK;
    kvrt_backend_t *be = &cache->be;
    kvrt_rotate_op op;
    memset(&op, 0, sizeof op);
    op.layers = g->refs_device;
    op.n_layers = g->n_layers;
    op.max_rot_dims = g->max_rot_dims;
    op.rope.n_rot = cache->desc.rope.n_rot;
    op.rope.style = (int32_t)cache->desc.rope.style;
    op.rope.theta = cache->desc.rope.theta;
    op.rope.freq_scale = cache->desc.rope.freq_scale;
    op.n = (int32_t)n;
    const void *ds, *dd;
    KVRT_TRY(be->ops->stage(be, slots, (size_t)n * sizeof(int32_t), cache->stream, &ds));
    KVRT_TRY(be->ops->stage(be, deltas, (size_t)n * sizeof(int32_t), cache->stream, &dd));
    op.slots = ds;
    op.deltas = dd;
    KVRT_TRY(be->ops->rotate(be, &op, cache->stream));
    kvrt_change_final(cache); /* K rotated in place: no way back */
    return KVRT_OK;
}

/* With seq < 0 every sequence is rewritten alike: a shared block changes the
 * same way for each of its sharers, so it is edited once, in place, rather
 * than copied for each (which could fail for want of free blocks although
 * nothing needs a copy). That holds only for a block whose every reference
 * is a sequence's page table; a reference held elsewhere keeps
 * copy-on-write. Returns [n_blocks]: ALIKE_IN_PLACE for such shared blocks,
 * 0 for the others (NULL when out of host memory). */
static uint8_t *alike_blocks(const kvrt_cache *cache, const kvrt_group *g)
{
    uint8_t *alike = calloc((size_t)g->n_blocks + 1, 1);
    int32_t *refs = calloc((size_t)g->n_blocks + 1, sizeof(int32_t));
    if (alike == NULL || refs == NULL) {
        free(alike);
        free(refs);
        return NULL;
    }
    for (int32_t s = 0; s < cache->desc.max_seqs; s++)
        for (int32_t page = 0; page < g->seqs[s].n_blocks; page++)
            refs[g->seqs[s].blocks[page]]++;
    for (int32_t b = 0; b < g->n_blocks; b++)
        alike[b] = g->refcount[b] > 1 && refs[b] == g->refcount[b] ? ALIKE_IN_PLACE : 0;
    free(refs);
    return alike;
}

static void free_alike(uint8_t **alike, int n)
{
    for (int j = 0; alike != NULL && j < n; j++)
        free(alike[j]);
    free(alike);
}

/* Runs a rewrite over one sequence or all (seq < 0), all-or-nothing. */
static kvrt_status run_rewrite(kvrt_cache *cache, int32_t seq, const rewrite *rw)
{
    uint8_t **alike = NULL;
    if (seq < 0) {
        alike = calloc((size_t)cache->n_groups, sizeof *alike);
        KVRT_CHECK(alike != NULL, KVRT_ERR_OUT_OF_MEMORY, "host tables for %d groups", cache->n_groups);
        for (int j = 0; j < cache->n_groups; j++)
            if (kvrt_group_is_self(&cache->groups[j]) &&
                (alike[j] = alike_blocks(cache, &cache->groups[j])) == NULL) {
                free_alike(alike, cache->n_groups);
                return kvrt_set_error(KVRT_ERR_OUT_OF_MEMORY, "host tables of group %d", j);
            }
    }
    kvrt_status st = rewrite_all(cache, seq, rw, alike);
    free_alike(alike, cache->n_groups);
    return st;
}

static kvrt_status rewrite_all(kvrt_cache *cache, int32_t seq, const rewrite *rw, uint8_t **alike)
{
    int32_t s0 = seq < 0 ? 0 : seq, s1 = seq < 0 ? cache->desc.max_seqs : seq + 1;
    int64_t most_live = 0;
    int32_t *cows;
    KVRT_TRY(kvrt_scratch(cache, 2, cache->n_groups, &cows));
    for (int j = 0; j < cache->n_groups; j++) {
        kvrt_group *g = &cache->groups[j];
        cows[j] = 0;
        if (!kvrt_group_is_self(g))
            continue;
        int64_t cow = 0, live = 0;
        for (int32_t s = s0; s < s1; s++)
            if (g->seqs[s].n_live > 0) {
                KVRT_TRY(rewrite_check(cache, g, s, rw, alike != NULL ? alike[j] : NULL, &cow));
                live += g->seqs[s].n_live;
            }
        KVRT_CHECK(cow <= kvrt_group_available(g), KVRT_ERR_CAPACITY,
                   "layer group %d needs %lld blocks to copy shared blocks before the edit; %d "
                   "free, room to grow by %d",
                   j, (long long)cow, g->n_free, g->max_blocks - g->n_blocks);
        cows[j] = (int32_t)cow;
        if (live > most_live)
            most_live = live;
    }
    for (int j = 0; j < cache->n_groups; j++)
        if (cows[j] > 0)
            KVRT_TRY(kvrt_group_ensure_free(cache, &cache->groups[j], cows[j]));
    /* rotation lists, sized before anything changes */
    int32_t *rot_slots, *rot_deltas;
    KVRT_TRY(kvrt_scratch(cache, 0, most_live + 1, &rot_slots));
    KVRT_TRY(kvrt_scratch(cache, 1, most_live + 1, &rot_deltas));
    KVRT_TRY(kvrt_change_journal(cache, s0, s1));
    cache->be.ops->stage_reset(&cache->be, cache->stream);
    kvrt_prefix_seq_edited(cache, seq);
    for (int j = 0; j < cache->n_groups; j++) {
        kvrt_group *g = &cache->groups[j];
        if (!kvrt_group_is_self(g))
            continue;
        int64_t n_rot = 0;
        for (int32_t s = s0; s < s1; s++) {
            if (g->seqs[s].n_live > 0)
                KVRT_TRY(rewrite_apply(cache, g, s, rw, alike != NULL ? alike[j] : NULL, rot_slots,
                                       rot_deltas, &n_rot));
            rewrite_evicted(&g->seqs[s], rw);
        }
        KVRT_TRY(rotate_group(cache, g, rot_slots, rot_deltas, n_rot));
        KVRT_TRY(kvrt_group_sync_pos(cache, g));
    }
    for (int32_t s = s0; s < s1; s++)
        KVRT_TRY(refresh_evicted(cache, s));
    cache->epoch++;
    return KVRT_OK;
}

static kvrt_status check_range(const char *fn, int32_t p0, int32_t p1)
{
    KVRT_CHECK(p1 < 0 || p0 <= p1, KVRT_ERR_INVALID_ARG, "%s: p0 %d > p1 %d", fn, (int)p0, (int)p1);
    return KVRT_OK;
}

static void drop_cross(kvrt_cache *cache, int32_t seq)
{
    for (int j = 0; j < cache->n_groups; j++) {
        kvrt_group *g = &cache->groups[j];
        if (!kvrt_group_is_self(g))
            kvrt_seq_pages_release_all(g, &g->seqs[seq]);
    }
}

static kvrt_status do_seq_rm(kvrt_cache *cache, int32_t seq, int32_t p0, int32_t p1)
{
    KVRT_TRY(kvrt_check_cache(cache, "kvrt_seq_rm"));
    cache = KVRT_CORE(cache);
    if (seq >= 0)
        KVRT_TRY(kvrt_check_seq(cache, seq, "kvrt_seq_rm"));
    if (p0 < 0)
        p0 = 0;
    KVRT_TRY(check_range("kvrt_seq_rm", p0, p1));
    if (p1 >= 0 && p0 == p1)
        return KVRT_OK;
    rewrite rw = {REWRITE_RM, p0, p1, 0};
    KVRT_TRY(run_rewrite(cache, seq, &rw));
    if (p0 == 0 && p1 < 0) {
        int32_t s0 = seq < 0 ? 0 : seq, s1 = seq < 0 ? cache->desc.max_seqs : seq + 1;
        for (int32_t s = s0; s < s1; s++)
            drop_cross(cache, s);
    }
    return KVRT_OK;
}

static kvrt_status do_seq_shift(kvrt_cache *cache, int32_t seq, int32_t p0, int32_t p1, int32_t delta)
{
    KVRT_TRY(kvrt_check_cache(cache, "kvrt_seq_shift"));
    cache = KVRT_CORE(cache);
    if (seq >= 0)
        KVRT_TRY(kvrt_check_seq(cache, seq, "kvrt_seq_shift"));
    if (p0 < 0)
        p0 = 0;
    KVRT_TRY(check_range("kvrt_seq_shift", p0, p1));
    if (delta == 0 || (p1 >= 0 && p0 == p1))
        return KVRT_OK;
    rewrite rw = {REWRITE_SHIFT, p0, p1, delta};
    return run_rewrite(cache, seq, &rw);
}

static kvrt_status do_seq_div(kvrt_cache *cache, int32_t seq, int32_t p0, int32_t p1, int d)
{
    KVRT_TRY(kvrt_check_cache(cache, "kvrt_seq_div"));
    cache = KVRT_CORE(cache);
    if (seq >= 0)
        KVRT_TRY(kvrt_check_seq(cache, seq, "kvrt_seq_div"));
    KVRT_CHECK(d >= 1, KVRT_ERR_INVALID_ARG, "kvrt_seq_div: divisor %d must be >= 1", d);
    if (p0 < 0)
        p0 = 0;
    KVRT_TRY(check_range("kvrt_seq_div", p0, p1));
    if (d == 1 || (p1 >= 0 && p0 == p1))
        return KVRT_OK;
    rewrite rw = {REWRITE_DIV, p0, p1, d};
    return run_rewrite(cache, seq, &rw);
}

/* ---- cp, keep, clear ---- */

static kvrt_status do_seq_cp(kvrt_cache *cache, int32_t src, int32_t dst, int32_t p0, int32_t p1)
{
    KVRT_TRY(kvrt_check_cache(cache, "kvrt_seq_cp"));
    cache = KVRT_CORE(cache);
    KVRT_TRY(kvrt_check_seq(cache, src, "kvrt_seq_cp: src"));
    KVRT_TRY(kvrt_check_seq(cache, dst, "kvrt_seq_cp: dst"));
    if (p0 < 0)
        p0 = 0;
    KVRT_TRY(check_range("kvrt_seq_cp", p0, p1));
    if (src == dst)
        return KVRT_OK;
    KVRT_CHECK(kvrt_seq_is_empty(cache, dst), KVRT_ERR_INVALID_ARG,
               "kvrt_seq_cp: destination sequence %d is not empty (remove it first)", (int)dst);
    int32_t *need;
    KVRT_TRY(kvrt_scratch(cache, 0, cache->n_groups, &need));
    /* blocks to copy, per group */
    for (int j = 0; j < cache->n_groups; j++) {
        kvrt_group *g = &cache->groups[j];
        const kvrt_seq_pages *sp = &g->seqs[src];
        kvrt_seq_pages *dp = &g->seqs[dst];
        need[j] = 0;
        KVRT_TRY(kvrt_reserve((void **)&dp->blocks, &dp->cap_blocks, sp->n_blocks + 1, sizeof(int32_t)));
        if (!kvrt_group_is_self(g))
            continue;
        int64_t copies = 0, bs = g->block_size;
        for (int32_t page = 0; page < sp->n_blocks; page++) {
            int64_t first = (int64_t)page * bs, end = first + bs < sp->n_slots ? first + bs : sp->n_slots;
            int64_t live = 0, inside = 0;
            for (int64_t i = first; i < end; i++) {
                int32_t p = g->pos[kvrt_seq_slot(g, sp, i)];
                live += p >= 0;
                inside += p >= 0 && in_range(p, p0, p1);
            }
            copies += inside > 0 && inside < live;
        }
        need[j] = copies;
        KVRT_CHECK(copies <= kvrt_group_available(g), KVRT_ERR_CAPACITY,
                   "kvrt_seq_cp: layer group %d needs %lld blocks for boundary copies; %d free, room "
                   "to grow by %d",
                   j, (long long)copies, g->n_free, g->max_blocks - g->n_blocks);
    }
    for (int j = 0; j < cache->n_groups; j++)
        if (need[j] > 0)
            KVRT_TRY(kvrt_group_ensure_free(cache, &cache->groups[j], need[j]));
    KVRT_TRY(kvrt_change_journal(cache, dst, dst + 1));
    cache->be.ops->stage_reset(&cache->be, cache->stream);
    kvrt_prefix_seq_edited(cache, dst);
    for (int j = 0; j < cache->n_groups; j++) {
        kvrt_group *g = &cache->groups[j];
        kvrt_seq_pages *sp = &g->seqs[src], *dp = &g->seqs[dst];
        if (!kvrt_group_is_self(g)) { /* cross K/V is shared */
            if (sp->n_blocks > 0) {
                g->refcount[sp->blocks[0]]++;
                dp->blocks[0] = sp->blocks[0];
                dp->n_blocks = 1;
                dp->n_slots = sp->n_slots;
                kvrt_seq_pages_refresh(g, dp);
            }
            continue;
        }
        int64_t bs = g->block_size;
        int32_t n = sp->n_blocks;
        int64_t last_used = n > 0 ? sp->n_slots - (int64_t)(n - 1) * bs : 0;
        int last_taken = 0;
        for (int32_t page = 0; page < n; page++) {
            int64_t first = (int64_t)page * bs, used = page == n - 1 ? last_used : bs;
            int32_t b = sp->blocks[page];
            int64_t live = 0, inside = 0;
            for (int64_t i = 0; i < used; i++) {
                int32_t p = g->pos[(int64_t)b * bs + i];
                live += p >= 0;
                inside += p >= 0 && in_range(p, p0, p1);
            }
            (void)first;
            if (inside == 0)
                continue;
            last_taken = page == n - 1;
            if (inside == live) {
                g->refcount[b]++;
                dp->blocks[dp->n_blocks++] = b;
                continue;
            }
            int32_t nb = kvrt_group_block_alloc(g);
            KVRT_CHECK(nb >= 0, KVRT_ERR_INTERNAL, "kvrt_seq_cp: planned block missing");
            kvrt_span span = {b * (int32_t)bs, nb * (int32_t)bs, (int32_t)bs};
            KVRT_TRY(kvrt_group_move(cache, g, &span, 1));
            for (int64_t i = 0; i < bs; i++) {
                int32_t p = g->pos[(int64_t)b * bs + i];
                g->pos[(int64_t)nb * bs + i] = i < used && p >= 0 && in_range(p, p0, p1) ? p : -1;
            }
            kvrt_group_mark_dirty(g, nb);
            dp->blocks[dp->n_blocks++] = nb;
        }
        dp->n_slots = dp->n_blocks == 0 ? 0
                      : last_taken  ? (int64_t)(dp->n_blocks - 1) * bs + last_used
                                    : (int64_t)dp->n_blocks * bs;
        seq_trim(g, dp);
        kvrt_seq_pages_refresh(g, dp);
        /* the dropped positions inside the range are dropped for dst too */
        int32_t elo = sp->evicted_min > p0 ? sp->evicted_min : p0;
        int32_t ehi = p1 >= 0 && sp->evicted_max >= p1 ? p1 - 1 : sp->evicted_max;
        if (sp->evicted_max >= 0 && elo <= ehi) {
            dp->evicted_min = elo;
            dp->evicted_max = ehi;
        } else {
            dp->evicted_min = dp->evicted_max = -1;
        }
        KVRT_TRY(kvrt_group_sync_pos(cache, g));
    }
    KVRT_TRY(refresh_evicted(cache, dst));
    cache->epoch++;
    return KVRT_OK;
}

static void seq_reset(kvrt_cache *cache, int32_t seq)
{
    for (int j = 0; j < cache->n_groups; j++) {
        kvrt_group *g = &cache->groups[j];
        kvrt_seq_pages_release_all(g, &g->seqs[seq]);
        g->seqs[seq].evicted_min = g->seqs[seq].evicted_max = -1;
    }
}

static kvrt_status do_seq_keep(kvrt_cache *cache, int32_t seq)
{
    KVRT_TRY(kvrt_check_cache(cache, "kvrt_seq_keep"));
    cache = KVRT_CORE(cache);
    KVRT_TRY(kvrt_check_seq(cache, seq, "kvrt_seq_keep"));
    KVRT_TRY(kvrt_change_journal(cache, 0, cache->desc.max_seqs));
    for (int32_t s = 0; s < cache->desc.max_seqs; s++)
        if (s != seq) {
            kvrt_prefix_seq_edited(cache, s);
            seq_reset(cache, s);
        }
    cache->be.ops->stage_reset(&cache->be, cache->stream);
    KVRT_TRY(kvrt_cache_sync_pos(cache));
    cache->epoch++;
    return KVRT_OK;
}

/* A lost cache's host tables may be half-changed (refcounts not matching
 * page tables, positions of blocks no sequence holds): every sequence is
 * emptied without releasing its blocks, every block gets refcount 0 and no
 * position, and every block is marked for the upload of its positions. */
static void tables_reset(kvrt_cache *cache)
{
    for (int j = 0; j < cache->n_groups; j++) {
        kvrt_group *g = &cache->groups[j];
        for (int32_t s = 0; s < cache->desc.max_seqs; s++) {
            kvrt_seq_pages *sp = &g->seqs[s];
            sp->n_blocks = 0;
            sp->n_slots = sp->n_live = 0;
            sp->pos_min = sp->pos_max = -1;
        }
        for (int32_t b = 0; b < g->n_blocks; b++) {
            g->refcount[b] = 0;
            if (g->cross_len != NULL)
                g->cross_len[b] = 0;
            if (g->pending != NULL)
                g->pending[b] = 0;
            if (g->pos != NULL) {
                for (int64_t i = 0; i < g->block_size; i++)
                    g->pos[(int64_t)b * g->block_size + i] = -1;
                kvrt_group_mark_dirty(g, b);
            }
        }
    }
}

static kvrt_status do_cache_clear(kvrt_cache *cache)
{
    KVRT_TRY(kvrt_check_handle(cache, "kvrt_cache_clear")); /* a lost cache too */
    cache = KVRT_CORE(cache);
    kvrt_backend_t *be = &cache->be;
    kvrt_change_begin(cache);
    kvrt_prefix_clear(cache);
    if (cache->lost)
        tables_reset(cache);
    for (int32_t s = 0; s < cache->desc.max_seqs; s++)
        seq_reset(cache, s);
    be->ops->stage_reset(be, cache->stream);
    for (int j = 0; j < cache->n_groups; j++) {
        kvrt_group *g = &cache->groups[j];
        /* the pool as created: block 0 first */
        g->n_free = 0;
        for (int32_t b = g->n_blocks - 1; b >= 0; b--)
            g->free_stack[g->n_free++] = b;
        for (int i = 0; i < g->n_layers; i++) {
            kvrt_layer_mem *m = &cache->mem[g->layers[i]];
            KVRT_TRY(be->ops->zero(be, m->k, m->k_block * (size_t)g->n_blocks, cache->stream));
            if (m->v != NULL)
                KVRT_TRY(be->ops->zero(be, m->v, m->v_block * (size_t)g->n_blocks, cache->stream));
            void *scales[2] = {m->k_scale, m->v_scale};
            for (int q = 0; q < 2; q++)
                if (scales[q] != NULL)
                    KVRT_TRY(be->ops->zero(be, scales[q], m->scale_block * (size_t)g->n_blocks,
                                           cache->stream));
        }
        KVRT_TRY(kvrt_group_sync_pos(cache, g));
    }
    cache->lost = 0;
    cache->epoch++;
    return KVRT_OK;
}

/* ---- compaction ---- */

static kvrt_status do_cache_compact(kvrt_cache *cache)
{
    KVRT_TRY(kvrt_check_cache(cache, "kvrt_cache_compact"));
    cache = KVRT_CORE(cache);
    /* room for the moves first, so nothing fails half-way */
    int64_t holes = 0;
    for (int j = 0; j < cache->n_groups; j++) {
        kvrt_group *g = &cache->groups[j];
        if (!kvrt_group_is_self(g))
            continue;
        int64_t h = 0;
        for (int32_t s = 0; s < cache->desc.max_seqs; s++)
            h += g->seqs[s].n_slots - g->seqs[s].n_live;
        if (h > holes)
            holes = h;
    }
    KVRT_TRY(kvrt_reserve((void **)&cache->spans, &cache->spans_cap, holes + 1, sizeof(kvrt_span)));
    KVRT_TRY(kvrt_change_journal(cache, 0, cache->desc.max_seqs));
    cache->be.ops->stage_reset(&cache->be, cache->stream);
    for (int j = 0; j < cache->n_groups; j++) {
        kvrt_group *g = &cache->groups[j];
        if (!kvrt_group_is_self(g))
            continue;
        int32_t n_spans = 0;
        for (int32_t s = 0; s < cache->desc.max_seqs; s++) {
            kvrt_seq_pages *sp = &g->seqs[s];
            if (sp->n_live == sp->n_slots)
                continue;
            kvrt_prefix_seq_edited(cache, s);
            /* Fill holes from the end: the front index finds a hole in an
             * unshared block, the back index a token in an unshared block.
             * Destinations are holes and sources tokens, so no move reads
             * what another writes. */
            int64_t i = 0, k = sp->n_slots - 1;
            int32_t first = n_spans;
            for (;;) {
                while (i < k && (g->pos[kvrt_seq_slot(g, sp, i)] >= 0 ||
                                 g->refcount[sp->blocks[i / g->block_size]] > 1))
                    i++;
                while (k > i && g->pos[kvrt_seq_slot(g, sp, k)] < 0)
                    k--;
                if (i >= k || g->refcount[sp->blocks[k / g->block_size]] > 1)
                    break;
                cache->spans[n_spans].src = (int32_t)kvrt_seq_slot(g, sp, k);
                cache->spans[n_spans].dst = (int32_t)kvrt_seq_slot(g, sp, i);
                cache->spans[n_spans].len = 1;
                n_spans++;
                i++;
                k--;
            }
            /* Every token moved lies behind every hole filled, so the tokens
             * may fill the holes in ascending order too; then runs that are
             * consecutive on both sides (inside one block) are one span. */
            int32_t m = n_spans - first, out = first;
            for (int32_t j = 0; j < m / 2; j++) {
                int32_t t = cache->spans[first + j].src;
                cache->spans[first + j].src = cache->spans[first + m - 1 - j].src;
                cache->spans[first + m - 1 - j].src = t;
            }
            for (int32_t j = first; j < n_spans; j++) {
                kvrt_span sp_j = cache->spans[j];
                g->pos[sp_j.dst] = g->pos[sp_j.src];
                g->pos[sp_j.src] = -1;
                kvrt_prefix_forget(g, sp_j.dst / g->block_size);
                kvrt_prefix_forget(g, sp_j.src / g->block_size);
                kvrt_group_mark_dirty(g, sp_j.dst / g->block_size);
                kvrt_group_mark_dirty(g, sp_j.src / g->block_size);
                kvrt_span *last = out > first ? &cache->spans[out - 1] : NULL;
                if (last != NULL && last->src + last->len == sp_j.src &&
                    last->dst + last->len == sp_j.dst && sp_j.src % g->block_size != 0 &&
                    sp_j.dst % g->block_size != 0)
                    last->len++;
                else
                    cache->spans[out++] = sp_j;
            }
            n_spans = out;
            seq_trim(g, sp);
            kvrt_seq_pages_refresh(g, sp);
        }
        KVRT_TRY(kvrt_group_move(cache, g, cache->spans, n_spans));
        KVRT_TRY(kvrt_group_sync_pos(cache, g));
    }
    cache->epoch++;
    return KVRT_OK;
}

/* ---- queries ---- */

static kvrt_status do_seq_pos_min(const kvrt_cache *cache, int32_t seq, int32_t *out)
{
    KVRT_TRY(kvrt_check_cache(cache, "kvrt_seq_pos_min"));
    cache = KVRT_CORE(cache);
    KVRT_TRY(kvrt_check_seq(cache, seq, "kvrt_seq_pos_min"));
    KVRT_CHECK(out != NULL, KVRT_ERR_INVALID_ARG, "kvrt_seq_pos_min: out is NULL");
    int32_t r = -1;
    for (int j = 0; j < cache->n_groups; j++) {
        const kvrt_group *g = &cache->groups[j];
        int32_t p = g->seqs[seq].pos_min;
        if (kvrt_group_is_self(g) && p >= 0 && (r < 0 || p < r))
            r = p;
    }
    *out = r;
    return KVRT_OK;
}

static kvrt_status do_seq_pos_max(const kvrt_cache *cache, int32_t seq, int32_t *out)
{
    KVRT_TRY(kvrt_check_cache(cache, "kvrt_seq_pos_max"));
    cache = KVRT_CORE(cache);
    KVRT_TRY(kvrt_check_seq(cache, seq, "kvrt_seq_pos_max"));
    KVRT_CHECK(out != NULL, KVRT_ERR_INVALID_ARG, "kvrt_seq_pos_max: out is NULL");
    int32_t r = -1;
    for (int j = 0; j < cache->n_groups; j++) {
        const kvrt_group *g = &cache->groups[j];
        int32_t p = g->seqs[seq].pos_max;
        if (kvrt_group_is_self(g) && p > r)
            r = p;
    }
    *out = r;
    return KVRT_OK;
}

static kvrt_status do_seq_n_tokens(const kvrt_cache *cache, int32_t seq, int64_t *out)
{
    KVRT_TRY(kvrt_check_cache(cache, "kvrt_seq_n_tokens"));
    cache = KVRT_CORE(cache);
    KVRT_TRY(kvrt_check_seq(cache, seq, "kvrt_seq_n_tokens"));
    KVRT_CHECK(out != NULL, KVRT_ERR_INVALID_ARG, "kvrt_seq_n_tokens: out is NULL");
    int best = -1;
    for (int j = 0; j < cache->n_groups; j++) {
        const kvrt_group *g = &cache->groups[j];
        if (!kvrt_group_is_self(g))
            continue;
        if (best < 0 || (cache->groups[best].evict && !g->evict))
            best = j;
    }
    *out = best >= 0 ? cache->groups[best].seqs[seq].n_live : 0;
    return KVRT_OK;
}

static kvrt_status do_seq_group_info_get(const kvrt_cache *cache, int32_t seq, int group,
                                         kvrt_seq_group_info *out)
{
    KVRT_TRY(kvrt_check_cache(cache, "kvrt_seq_group_info_get"));
    cache = KVRT_CORE(cache);
    KVRT_TRY(kvrt_check_seq(cache, seq, "kvrt_seq_group_info_get"));
    KVRT_CHECK(group >= 0 && group < cache->n_groups, KVRT_ERR_INVALID_ARG,
               "kvrt_seq_group_info_get: group %d is out of range [0, %d)", group, cache->n_groups);
    KVRT_CHECK(out != NULL, KVRT_ERR_INVALID_ARG, "kvrt_seq_group_info_get: out is NULL");
    const kvrt_seq_pages *sp = &cache->groups[group].seqs[seq];
    out->pos_min = sp->pos_min;
    out->pos_max = sp->pos_max;
    out->n_tokens = sp->n_live;
    out->n_slots = sp->n_slots;
    out->n_blocks = sp->n_blocks;
    out->evicted_max = sp->evicted_max;
    return KVRT_OK;
}

static kvrt_status do_seq_can_resume(const kvrt_cache *cache, int32_t seq, int32_t pos, int *ok)
{
    KVRT_TRY(kvrt_check_cache(cache, "kvrt_seq_can_resume"));
    cache = KVRT_CORE(cache);
    KVRT_TRY(kvrt_check_seq(cache, seq, "kvrt_seq_can_resume"));
    KVRT_CHECK(ok != NULL, KVRT_ERR_INVALID_ARG, "kvrt_seq_can_resume: ok is NULL");
    KVRT_CHECK(pos >= 0, KVRT_ERR_POS_RANGE, "kvrt_seq_can_resume: position %d is negative", (int)pos);
    *ok = 1;
    for (int j = 0; j < cache->n_groups; j++) {
        const kvrt_group *g = &cache->groups[j];
        const kvrt_seq_pages *sp = &g->seqs[seq];
        if (g->evict && sp->evicted_max >= 0 && (int64_t)sp->evicted_max > (int64_t)pos - g->window)
            *ok = 0;
    }
    return KVRT_OK;
}

/* ---- gather ---- */

typedef struct pos_slot {
    int32_t pos, slot;
} pos_slot;

static int cmp_pos_slot(const void *a, const void *b)
{
    int32_t x = ((const pos_slot *)a)->pos, y = ((const pos_slot *)b)->pos;
    return (x > y) - (x < y);
}

/* What a gather copies into k and v. */
typedef enum gather_kind {
    GATHER_STORED,  /* the stored elements (kvrt_gather) */
    GATHER_SCALES,  /* the scales of a quantized layer (kvrt_gather_scales) */
    GATHER_AS,      /* values converted to dst_dtype (kvrt_gather_as) */
} gather_kind;

static kvrt_status do_gather(const kvrt_cache *ccache, int layer, int32_t seq, int32_t p0, int32_t p1,
                             void *k, void *v, int32_t *pos, int64_t capacity, int64_t *n_out,
                             void *stream, gather_kind kind, kvrt_dtype dst_dtype)
{
    KVRT_TRY(kvrt_check_cache(ccache, "kvrt_gather"));
    KVRT_TRY(kvrt_map_layer(ccache, &layer, "kvrt_gather"));
    KVRT_CHECK(kind != GATHER_SCALES || kvrt_dtype_is_quantized(ccache->desc.dtype),
               KVRT_ERR_INVALID_ARG, "kvrt_gather: the cache's dtype %s keeps no scales",
               kvrt_dtype_name(ccache->desc.dtype));
    KVRT_CHECK(kind != GATHER_AS || kvrt_dtype_is_plain(dst_dtype), KVRT_ERR_INVALID_ARG,
               "kvrt_gather: dst_dtype %d is not f32, f16 or bf16", (int)dst_dtype);
    kvrt_cache *cache = (kvrt_cache *)KVRT_CORE(ccache); /* scratch only */
    KVRT_CHECK(layer >= 0 && layer < cache->n_layers_total, KVRT_ERR_INVALID_ARG,
               "kvrt_gather: layer %d is out of range [0, %d)", layer, cache->n_layers_total);
    KVRT_TRY(kvrt_check_seq(cache, seq, "kvrt_gather"));
    KVRT_CHECK(n_out != NULL, KVRT_ERR_INVALID_ARG, "kvrt_gather: n_out is NULL");
    if (p0 < 0)
        p0 = 0;
    KVRT_TRY(check_range("kvrt_gather", p0, p1));
    KVRT_CHECK(capacity >= 0, KVRT_ERR_INVALID_ARG, "kvrt_gather: capacity %lld is negative",
               (long long)capacity);
    const kvrt_group *g = &cache->groups[cache->layer_group[layer]];
    const kvrt_seq_pages *sp = &g->seqs[seq];
    int32_t *raw;
    KVRT_TRY(kvrt_scratch(cache, 0, 2 * (sp->n_slots + 1), &raw));
    pos_slot *rows = (pos_slot *)(void *)raw;
    int64_t n = 0;
    for (int64_t i = 0; i < sp->n_slots; i++) {
        int32_t p = g->pos != NULL ? g->pos[kvrt_seq_slot(g, sp, i)] : (int32_t)i;
        if (p >= 0 && in_range(p, p0, p1)) {
            rows[n].pos = p;
            rows[n].slot = (int32_t)kvrt_seq_slot(g, sp, i);
            n++;
        }
    }
    *n_out = n;
    KVRT_CHECK(n <= capacity, KVRT_ERR_INVALID_ARG,
               "kvrt_gather: %lld rows in the range exceed the capacity of %lld", (long long)n,
               (long long)capacity);
    qsort(rows, (size_t)n, sizeof(pos_slot), cmp_pos_slot);
    int32_t *slots;
    KVRT_TRY(kvrt_scratch(cache, 1, n + 1, &slots));
    for (int64_t i = 0; i < n; i++) {
        slots[i] = rows[i].slot;
        if (pos != NULL)
            pos[i] = rows[i].pos;
    }
    if (n == 0 || (k == NULL && v == NULL))
        return KVRT_OK;
    kvrt_backend_t *be = &cache->be;
    kvrt_gather_op op;
    memset(&op, 0, sizeof op);
    op.layer = g->refs[0];
    for (int i = 0; i < g->n_layers; i++)
        if (g->layers[i] == layer)
            op.layer = g->refs[i];
    op.n = (int32_t)n;
    /* bytes per element and elements per head row of what k and v receive */
    size_t es = kind == GATHER_SCALES ? sizeof(float)
              : kind == GATHER_AS     ? kvrt_dtype_size(dst_dtype)
                                      : (size_t)op.layer.layout.elem_size;
    size_t dk = kind == GATHER_SCALES ? 1 : (size_t)op.layer.layout.dim_k;
    size_t dv = kind == GATHER_SCALES ? (op.layer.layout.dim_v > 0 ? 1 : 0)
                                      : (size_t)op.layer.layout.dim_v;
    size_t k_bytes = (size_t)n * (size_t)op.layer.layout.n_heads * dk * es;
    size_t v_bytes = (size_t)n * (size_t)op.layer.layout.n_heads * dv * es;
    if (v_bytes == 0)
        v = NULL;
    /* host destinations on a GPU go through device scratch */
    void *k_tmp = NULL, *v_tmp = NULL;
    kvrt_mem_kind kk = KVRT_MEM_THIS_DEVICE, vk = KVRT_MEM_THIS_DEVICE;
    int ord;
    if (cache->desc.device.backend != KVRT_BACKEND_CPU) {
        if (k != NULL)
            KVRT_TRY(be->ops->mem_kind(be, k, &kk, &ord));
        if (v != NULL)
            KVRT_TRY(be->ops->mem_kind(be, v, &vk, &ord));
        KVRT_CHECK(kk != KVRT_MEM_OTHER_DEVICE && vk != KVRT_MEM_OTHER_DEVICE,
                   KVRT_ERR_DEVICE_MISMATCH, "kvrt_gather: k or v is on another device than %s:%d",
                   kvrt_backend_name(cache->desc.device.backend), cache->desc.device.ordinal);
    }
    kvrt_status st = KVRT_OK;
    if (k != NULL && kk == KVRT_MEM_HOST)
        st = be->ops->scratch_alloc(be, k_bytes, &k_tmp);
    if (st == KVRT_OK && v != NULL && vk == KVRT_MEM_HOST)
        st = be->ops->scratch_alloc(be, v_bytes, &v_tmp);
    const void *d_slots = NULL;
    if (st == KVRT_OK)
        st = be->ops->stage(be, slots, (size_t)n * sizeof(int32_t), stream, &d_slots);
    if (st == KVRT_OK) {
        op.slots = d_slots;
        void *kd = k_tmp != NULL ? k_tmp : k, *vd = v_tmp != NULL ? v_tmp : v;
        if (kind == GATHER_SCALES) {
            op.k_scale_dst = kd;
            op.v_scale_dst = vd;
        } else {
            op.k_dst = kd;
            op.v_dst = vd;
            op.convert = kind == GATHER_AS;
            op.dst_dtype = (int32_t)dst_dtype;
        }
        st = be->ops->gather(be, &op, stream);
    }
    if (st == KVRT_OK && k_tmp != NULL)
        st = be->ops->download(be, k, k_tmp, k_bytes, stream);
    if (st == KVRT_OK && v_tmp != NULL)
        st = be->ops->download(be, v, v_tmp, v_bytes, stream);
    if (k_tmp != NULL || v_tmp != NULL) {
        (void)be->ops->sync(be, stream);
        be->ops->scratch_free(be, k_tmp);
        be->ops->scratch_free(be, v_tmp);
    }
    return st;
}

/* ---- cross-attention K/V ---- */

static kvrt_status do_cross_set(kvrt_cache *cache, int layer, int32_t seq, int n, const void *k,
                                const void *v, kvrt_dtype src_dtype, void *stream)
{
    KVRT_TRY(kvrt_check_cache(cache, "kvrt_cross_set"));
    const int named = layer; /* the caller's index (a shared handle's), for messages */
    KVRT_TRY(kvrt_map_layer(cache, &layer, "kvrt_cross_set"));
    cache = KVRT_CORE(cache);
    KVRT_CHECK(layer >= 0 && layer < cache->n_layers_total, KVRT_ERR_INVALID_ARG,
               "kvrt_cross_set: layer %d is out of range [0, %d)", layer, cache->n_layers_total);
    KVRT_CHECK(cache->layers[layer].kind == KVRT_LAYER_CROSS, KVRT_ERR_INVALID_ARG,
               "kvrt_cross_set: layer %d is not a CROSS layer", named);
    KVRT_TRY(kvrt_check_seq(cache, seq, "kvrt_cross_set"));
    KVRT_CHECK(n >= 0 && n <= cache->desc.cross_max_len, KVRT_ERR_INVALID_ARG,
               "kvrt_cross_set: %d rows exceed cross_max_len %d", n, cache->desc.cross_max_len);
    KVRT_CHECK(kvrt_dtype_is_plain(src_dtype), KVRT_ERR_INVALID_ARG,
               "kvrt_cross_set: src_dtype %d is not f32, f16 or bf16", (int)src_dtype);
    KVRT_CHECK(n == 0 || (k != NULL && v != NULL), KVRT_ERR_INVALID_ARG,
               "kvrt_cross_set: k or v is NULL");
    if (n > 0) {
        KVRT_TRY(kvrt_check_device_ptr(cache, k, "kvrt_cross_set: k"));
        KVRT_TRY(kvrt_check_device_ptr(cache, v, "kvrt_cross_set: v"));
    }
    kvrt_group *g = &cache->groups[cache->layer_group[layer]];
    kvrt_seq_pages *sp = &g->seqs[seq];
    KVRT_TRY(kvrt_reserve((void **)&sp->blocks, &sp->cap_blocks, 1, sizeof(int32_t)));
    cache->be.ops->stage_reset(&cache->be, stream);
    int32_t *slots = NULL;
    if (n > 0)
        KVRT_TRY(kvrt_scratch(cache, 0, n, &slots));
    /* The rows go into a free block, and the sequence's old block is
     * released only once the write is queued, so a failed device call
     * leaves the old rows in place. Only when every block is in use is the
     * sequence's own block rewritten in place (a failure then loses it). */
    int32_t b = n > 0 ? kvrt_group_block_alloc(g) : -1;
    if (b < 0) {
        kvrt_change_begin(cache);
        kvrt_seq_pages_release_all(g, sp);
        cache->epoch++;
        if (n == 0)
            return KVRT_OK;
        b = kvrt_group_block_alloc(g);
        KVRT_CHECK(b >= 0, KVRT_ERR_INTERNAL, "kvrt_cross_set: no free cross block");
    }
    for (int i = 0; i < n; i++)
        slots[i] = b * g->block_size + i;
    kvrt_write_op op;
    memset(&op, 0, sizeof op);
    op.layer = g->refs[0];
    op.k_src = k;
    op.v_src = v;
    op.src_dtype = (int32_t)src_dtype;
    op.n_rows = n;
    const void *d_slots;
    kvrt_status st = cache->be.ops->stage(&cache->be, slots, (size_t)n * sizeof(int32_t), stream, &d_slots);
    if (st == KVRT_OK) {
        op.slots = d_slots;
        st = cache->be.ops->write(&cache->be, &op, stream);
    }
    if (st != KVRT_OK) {
        if (!cache->changing)
            kvrt_group_block_release(g, b); /* the old rows stay */
        return st;
    }
    kvrt_seq_pages_release_all(g, sp);
    sp->blocks[0] = b;
    sp->n_blocks = 1;
    sp->n_slots = n;
    g->cross_len[b] = n;
    kvrt_seq_pages_refresh(g, sp);
    cache->epoch++;
    return KVRT_OK;
}

/* ---- public entries: the message of a failure starts with the function ---- */

kvrt_status kvrt_seq_rm(kvrt_cache *cache, int32_t seq, int32_t p0, int32_t p1)
{
    KVRT_ENTRY(cache, "kvrt_seq_rm",
               kvrt_change_end(cache, do_seq_rm(cache, seq, p0, p1), "kvrt_seq_rm"));
}

kvrt_status kvrt_seq_shift(kvrt_cache *cache, int32_t seq, int32_t p0, int32_t p1, int32_t delta)
{
    KVRT_ENTRY(cache, "kvrt_seq_shift",
               kvrt_change_end(cache, do_seq_shift(cache, seq, p0, p1, delta), "kvrt_seq_shift"));
}

kvrt_status kvrt_seq_div(kvrt_cache *cache, int32_t seq, int32_t p0, int32_t p1, int d)
{
    KVRT_ENTRY(cache, "kvrt_seq_div",
               kvrt_change_end(cache, do_seq_div(cache, seq, p0, p1, d), "kvrt_seq_div"));
}

kvrt_status kvrt_seq_cp(kvrt_cache *cache, int32_t src, int32_t dst, int32_t p0, int32_t p1)
{
    KVRT_ENTRY(cache, "kvrt_seq_cp",
               kvrt_change_end(cache, do_seq_cp(cache, src, dst, p0, p1), "kvrt_seq_cp"));
}

kvrt_status kvrt_seq_keep(kvrt_cache *cache, int32_t seq)
{
    KVRT_ENTRY(cache, "kvrt_seq_keep",
               kvrt_change_end(cache, do_seq_keep(cache, seq), "kvrt_seq_keep"));
}

kvrt_status kvrt_cache_clear(kvrt_cache *cache)
{
    KVRT_ENTRY(cache, "kvrt_cache_clear",
               kvrt_change_end(cache, do_cache_clear(cache), "kvrt_cache_clear"));
}

kvrt_status kvrt_cache_compact(kvrt_cache *cache)
{
    KVRT_ENTRY(cache, "kvrt_cache_compact",
               kvrt_change_end(cache, do_cache_compact(cache), "kvrt_cache_compact"));
}

kvrt_status kvrt_gather(const kvrt_cache *ccache, int layer, int32_t seq, int32_t p0, int32_t p1,
                        void *k, void *v, int32_t *pos, int64_t capacity, int64_t *n_out,
                        void *stream)
{
    KVRT_ENTRY(ccache, "kvrt_gather",
               do_gather(ccache, layer, seq, p0, p1, k, v, pos, capacity, n_out, stream,
                         GATHER_STORED, KVRT_F32));
}

kvrt_status kvrt_gather_scales(const kvrt_cache *ccache, int layer, int32_t seq, int32_t p0,
                               int32_t p1, float *k_scale, float *v_scale, int64_t capacity,
                               int64_t *n_out, void *stream)
{
    KVRT_ENTRY(ccache, "kvrt_gather_scales",
               do_gather(ccache, layer, seq, p0, p1, k_scale, v_scale, NULL, capacity, n_out,
                         stream, GATHER_SCALES, KVRT_F32));
}

kvrt_status kvrt_gather_as(const kvrt_cache *ccache, int layer, int32_t seq, int32_t p0, int32_t p1,
                           void *k, void *v, int32_t *pos, kvrt_dtype dst_dtype, int64_t capacity,
                           int64_t *n_out, void *stream)
{
    KVRT_ENTRY(ccache, "kvrt_gather_as",
               do_gather(ccache, layer, seq, p0, p1, k, v, pos, capacity, n_out, stream,
                         GATHER_AS, dst_dtype));
}

kvrt_status kvrt_cross_set(kvrt_cache *cache, int layer, int32_t seq, int n, const void *k,
                           const void *v, kvrt_dtype src_dtype, void *stream)
{
    KVRT_ENTRY(cache, "kvrt_cross_set",
               kvrt_change_end(cache, do_cross_set(cache, layer, seq, n, k, v, src_dtype, stream),
                               "kvrt_cross_set"));
}

/* ---- public entries that only check the thread (internal.h) ---- */

kvrt_status kvrt_seq_pos_min(const kvrt_cache *cache, int32_t seq, int32_t *out)
{
    KVRT_ENTRY(cache, "kvrt_seq_pos_min", do_seq_pos_min(cache, seq, out));
}

kvrt_status kvrt_seq_pos_max(const kvrt_cache *cache, int32_t seq, int32_t *out)
{
    KVRT_ENTRY(cache, "kvrt_seq_pos_max", do_seq_pos_max(cache, seq, out));
}

kvrt_status kvrt_seq_n_tokens(const kvrt_cache *cache, int32_t seq, int64_t *out)
{
    KVRT_ENTRY(cache, "kvrt_seq_n_tokens", do_seq_n_tokens(cache, seq, out));
}

kvrt_status kvrt_seq_group_info_get(const kvrt_cache *cache, int32_t seq, int group,
                                    kvrt_seq_group_info *out)
{
    KVRT_ENTRY(cache, "kvrt_seq_group_info_get", do_seq_group_info_get(cache, seq, group, out));
}

kvrt_status kvrt_seq_can_resume(const kvrt_cache *cache, int32_t seq, int32_t pos, int *ok)
{
    KVRT_ENTRY(cache, "kvrt_seq_can_resume", do_seq_can_resume(cache, seq, pos, ok));
}
