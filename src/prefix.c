/*
 * prefix.c: automatic prefix caching. Full blocks of sequences whose token
 * ids were declared get content keys; a new sequence attaches the longest
 * run of keyed blocks matching its prompt instead of recomputing it; keyed
 * blocks that no sequence references any more stay cached, in release
 * order, until planning needs their memory.
 *
 * Keys. root = H("kvrt-prefix-1", block_size, salt), key(block i) =
 * H(key(block i - 1) || token ids of block i), 32 bytes. One chain of keys
 * serves every self-attention group; each group has its own table (key and
 * salt id -> block), because its blocks hold its own layers' rows. Salts are
 * interned and compared byte for byte, so blocks of one salt never match a
 * lookup under another, whatever the hash.
 *
 * A block is keyed only when its slot k holds position b * block_size + k
 * of a sequence whose token ids were declared without a gap from position 0
 * (a chain) and whose rows were written in every layer of the group: plans
 * leave their keys pending, kvrt_write publishes them when the last layer
 * of a group is written for that plan, and a chain whose plan was not
 * written in every layer stops. Any edit of a sequence ends its chain; any
 * edit of a block's rows or positions drops its key (edit.c calls
 * kvrt_prefix_forget and kvrt_prefix_seq_edited).
 *
 * Cached blocks (refcount 0, keyed) form a list in release order; a
 * sequence releases its last block first, so the leaves of a chain are
 * evicted before their parents. The pool counts cached blocks as available:
 * kvrt_group_block_alloc takes a free block, else evicts the oldest cached
 * one, so prefix caching never makes a plan fail.
 */
#include <stdio.h>

#include "prefix.h"

#if defined(KVRT_HAVE_SODIUM)
#include <sodium.h>
#endif
#if defined(KVRT_HAVE_XXHASH)
#define XXH_INLINE_ALL
#include <xxhash.h>
#endif

enum { KEY_BYTES = 32 };

typedef struct prefix_key {
    uint8_t b[KEY_BYTES];
} prefix_key;

typedef struct prefix_block {
    prefix_key key;
    int32_t    salt;         /* interned salt id; -1: no key */
    int32_t    prev, next;   /* the cached list, -1 at its ends */
    uint8_t    cached;       /* refcount 0, kept for its key */
} prefix_block;

typedef struct prefix_pending {
    int32_t    block;
    int32_t    salt;
    prefix_key key;
} prefix_pending;

typedef struct kvrt_prefix_group {
    struct kvrt_prefix *owner;
    kvrt_group         *group;
    prefix_block       *blocks;      /* [max_blocks] */
    int32_t            *table;       /* [table_mask + 1] block ids, -1 empty; linear probing */
    uint64_t            table_mask;
    int32_t             head, tail;  /* cached list: head released longest ago */
    int32_t             n_cached, n_keyed;
    int64_t             evictions;
    prefix_pending     *pending;     /* [max_blocks] keys of the last plan, not yet written */
    int32_t             n_pending;
} kvrt_prefix_group;

typedef struct prefix_salt {
    uint8_t *bytes;
    int32_t  len;                    /* -1: slot unused */
    int64_t  refs;                   /* keyed blocks and chains under it */
} prefix_salt;

/* The declared tokens of a sequence, from position 0 without a gap. */
typedef struct prefix_chain {
    int        active;
    int32_t    salt;
    int32_t    pos;                  /* tokens declared */
    prefix_key key;                  /* of the last full block; the root when none */
    int32_t   *tail;                 /* [block_size] tokens of the partial block */
    uint64_t   unconfirmed;          /* epoch of its last plan until fully written; 0 none */
} prefix_chain;

typedef struct kvrt_prefix {
    int           hash;              /* kvrt_prefix_hash */
    int           block_size;
    prefix_salt  *salts;             /* id 0: the empty salt, always there */
    int32_t       n_salts;
    int64_t       cap_salts;
    prefix_chain *chains;            /* [max_seqs] */
    uint64_t      plan_epoch;        /* the plan whose keys are pending */
    uint8_t      *written;           /* [n_layers_total] layers written for that plan */
    int64_t       written_cap;
    prefix_key   *keys;              /* lookup scratch */
    int64_t       keys_cap;
    int32_t      *found;             /* lookup scratch [n_groups][blocks] */
    int64_t       found_cap;
    int64_t       lookups, hits, misses, tokens_queried, tokens_served;
} kvrt_prefix;

/* ---- hashing ---- */

static const char ROOT_TAG[] = "kvrt-prefix-1";

/* H(a || b) into out, with the cache's hash. */
static void hash2(int hash, const void *a, size_t na, const void *b, size_t nb, prefix_key *out)
{
    memset(out, 0, sizeof *out);
#if defined(KVRT_HAVE_SODIUM)
    if (hash == KVRT_PREFIX_BLAKE2B) {
        crypto_generichash_state st;
        crypto_generichash_init(&st, NULL, 0, KEY_BYTES);
        crypto_generichash_update(&st, a, na);
        crypto_generichash_update(&st, b, nb);
        crypto_generichash_final(&st, out->b, KEY_BYTES);
        return;
    }
#endif
#if defined(KVRT_HAVE_XXHASH)
    if (hash == KVRT_PREFIX_XXH3) {
        uint8_t buf[KEY_BYTES + 256 * sizeof(int32_t) + 16];
        XXH128_hash_t h;
        if (na + nb <= sizeof buf) {
            memcpy(buf, a, na);
            memcpy(buf + na, b, nb);
            h = XXH3_128bits(buf, na + nb);
        } else { /* roots with long salts */
            XXH3_state_t st;
            XXH3_128bits_reset(&st);
            XXH3_128bits_update(&st, a, na);
            XXH3_128bits_update(&st, b, nb);
            h = XXH3_128bits_digest(&st);
        }
        XXH128_canonical_t c;
        XXH128_canonicalFromHash(&c, h);
        memcpy(out->b, c.digest, sizeof c.digest);
        return;
    }
#endif
    (void)hash, (void)a, (void)na, (void)b, (void)nb;
}

static void hash_root(const kvrt_prefix *P, const void *salt, int32_t salt_len, prefix_key *out)
{
    uint8_t head[sizeof ROOT_TAG + 8];
    memcpy(head, ROOT_TAG, sizeof ROOT_TAG);
    int32_t nums[2] = {P->block_size, salt_len};
    memcpy(head + sizeof ROOT_TAG, nums, sizeof nums);
    hash2(P->hash, head, sizeof head, salt_len > 0 ? salt : "", (size_t)salt_len, out);
}

static void hash_block(const kvrt_prefix *P, const prefix_key *prev, const int32_t *tokens,
                       prefix_key *out)
{
    hash2(P->hash, prev->b, KEY_BYTES, tokens, (size_t)P->block_size * sizeof(int32_t), out);
}

/* ---- salts ---- */

static int32_t salt_find(const kvrt_prefix *P, const void *salt, int32_t len)
{
    for (int32_t i = 0; i < P->n_salts; i++)
        if (P->salts[i].len == len && (len == 0 || memcmp(P->salts[i].bytes, salt, (size_t)len) == 0))
            return i;
    return -1;
}

/* Interns a salt (refs 0 when new); KVRT_ERR_OUT_OF_MEMORY. */
static kvrt_status salt_intern(kvrt_prefix *P, const void *salt, int32_t len, int32_t *id)
{
    *id = salt_find(P, salt, len);
    if (*id >= 0)
        return KVRT_OK;
    int32_t slot = -1;
    for (int32_t i = 1; i < P->n_salts && slot < 0; i++)
        if (P->salts[i].len < 0)
            slot = i;
    if (slot < 0)
        KVRT_TRY(kvrt_reserve((void **)&P->salts, &P->cap_salts, P->n_salts + 1, sizeof(prefix_salt)));
    uint8_t *bytes = malloc(len > 0 ? (size_t)len : 1);
    KVRT_CHECK(bytes != NULL, KVRT_ERR_OUT_OF_MEMORY, "host allocation for a salt of %d bytes",
               (int)len);
    if (len > 0)
        memcpy(bytes, salt, (size_t)len);
    if (slot < 0)
        slot = P->n_salts++;
    P->salts[slot].bytes = bytes;
    P->salts[slot].len = len;
    P->salts[slot].refs = 0;
    *id = slot;
    return KVRT_OK;
}

static void salt_ref(kvrt_prefix *P, int32_t id) { P->salts[id].refs++; }

static void salt_unref(kvrt_prefix *P, int32_t id)
{
    prefix_salt *s = &P->salts[id];
    if (--s->refs > 0 || id == 0)
        return;
    free(s->bytes);
    s->bytes = NULL;
    s->len = -1;
}

/* ---- tables ---- */

static uint64_t key_home(const kvrt_prefix_group *pg, const prefix_key *k)
{
    uint64_t x;
    memcpy(&x, k->b, sizeof x);
    return x & pg->table_mask;
}

static int32_t table_find(const kvrt_prefix_group *pg, const prefix_key *k, int32_t salt)
{
    for (uint64_t i = key_home(pg, k);; i = (i + 1) & pg->table_mask) {
        int32_t b = pg->table[i];
        if (b < 0)
            return -1;
        if (pg->blocks[b].salt == salt && memcmp(pg->blocks[b].key.b, k->b, KEY_BYTES) == 0)
            return b;
    }
}

static void table_insert(kvrt_prefix_group *pg, int32_t block)
{
    uint64_t i = key_home(pg, &pg->blocks[block].key);
    while (pg->table[i] >= 0)
        i = (i + 1) & pg->table_mask;
    pg->table[i] = block;
}

/* Removes a block by backward shifting, so lookups need no tombstones. */
static void table_remove(kvrt_prefix_group *pg, int32_t block)
{
    uint64_t m = pg->table_mask, i = key_home(pg, &pg->blocks[block].key);
    while (pg->table[i] != block)
        i = (i + 1) & m;
    for (uint64_t j = (i + 1) & m; pg->table[j] >= 0; j = (j + 1) & m) {
        uint64_t home = key_home(pg, &pg->blocks[pg->table[j]].key);
        /* the entry at j may move to i when i lies on its probe path */
        if (((j - home) & m) >= ((j - i) & m)) {
            pg->table[i] = pg->table[j];
            i = j;
        }
    }
    pg->table[i] = -1;
}

/* ---- the cached list ---- */

static void list_unlink(kvrt_prefix_group *pg, int32_t b)
{
    prefix_block *x = &pg->blocks[b];
    if (x->prev >= 0)
        pg->blocks[x->prev].next = x->next;
    else
        pg->head = x->next;
    if (x->next >= 0)
        pg->blocks[x->next].prev = x->prev;
    else
        pg->tail = x->prev;
    x->prev = x->next = -1;
    x->cached = 0;
    pg->n_cached--;
}

static void list_append(kvrt_prefix_group *pg, int32_t b)
{
    prefix_block *x = &pg->blocks[b];
    x->prev = pg->tail;
    x->next = -1;
    if (pg->tail >= 0)
        pg->blocks[pg->tail].next = b;
    else
        pg->head = b;
    pg->tail = b;
    x->cached = 1;
    pg->n_cached++;
}

static void unkey(kvrt_prefix_group *pg, int32_t b)
{
    prefix_block *x = &pg->blocks[b];
    if (x->salt < 0)
        return;
    if (x->cached)
        list_unlink(pg, b);
    table_remove(pg, b);
    salt_unref(pg->owner, x->salt);
    x->salt = -1;
    pg->n_keyed--;
}

/* A pending key holds a reference to its salt, which publishing hands to
 * the block. */
static void publish(kvrt_prefix_group *pg, const prefix_pending *e)
{
    prefix_block *x = &pg->blocks[e->block];
    if (x->salt >= 0 || table_find(pg, &e->key, e->salt) >= 0) {
        salt_unref(pg->owner, e->salt); /* another block holds the key: the first one serves */
        return;
    }
    x->key = e->key;
    x->salt = e->salt;
    table_insert(pg, e->block);
    pg->n_keyed++;
}

static void pending_drop(kvrt_prefix_group *pg)
{
    for (int32_t i = 0; i < pg->n_pending; i++)
        salt_unref(pg->owner, pg->pending[i].salt);
    pg->n_pending = 0;
}

/* ---- hooks of the block pool and the edits ---- */

int kvrt_prefix_release(kvrt_group *g, int32_t block)
{
    kvrt_prefix_group *pg = g->prefix;
    if (pg == NULL || pg->blocks[block].salt < 0)
        return 0;
    list_append(pg, block);
    return 1;
}

/* Takes the cached block released longest ago: no key, no positions. */
static int32_t take_oldest(kvrt_group *g)
{
    kvrt_prefix_group *pg = g->prefix;
    int32_t b = pg->head;
    unkey(pg, b);
    int32_t *p = g->pos + (int64_t)b * g->block_size;
    for (int i = 0; i < g->block_size; i++)
        p[i] = -1;
    kvrt_group_mark_dirty(g, b);
    return b;
}

int32_t kvrt_prefix_evict(kvrt_group *g)
{
    if (g->prefix == NULL || g->prefix->head < 0)
        return -1;
    g->prefix->evictions++;
    return take_oldest(g);
}

int32_t kvrt_prefix_n_cached(const kvrt_group *g) { return g->prefix != NULL ? g->prefix->n_cached : 0; }

void kvrt_prefix_forget(kvrt_group *g, int32_t block)
{
    if (g->prefix != NULL)
        unkey(g->prefix, block);
}

static void chain_end(kvrt_prefix *P, prefix_chain *c)
{
    if (c->active)
        salt_unref(P, c->salt);
    c->active = 0;
    c->unconfirmed = 0;
}

void kvrt_prefix_seq_edited(kvrt_cache *cache, int32_t seq)
{
    kvrt_prefix *P = cache->prefix;
    if (P == NULL)
        return;
    for (int32_t s = seq < 0 ? 0 : seq; s < (seq < 0 ? cache->desc.max_seqs : seq + 1); s++)
        chain_end(P, &P->chains[s]);
}

void kvrt_prefix_clear(kvrt_cache *cache)
{
    kvrt_prefix *P = cache->prefix;
    if (P == NULL)
        return;
    kvrt_prefix_seq_edited(cache, -1);
    for (int j = 0; j < cache->n_groups; j++) {
        kvrt_group *g = &cache->groups[j];
        kvrt_prefix_group *pg = g->prefix;
        if (pg == NULL)
            continue;
        while (pg->head >= 0) /* cached blocks go back to the free stack */
            g->free_stack[g->n_free++] = take_oldest(g);
        for (int32_t b = 0; b < g->n_blocks; b++)
            unkey(pg, b);
        pending_drop(pg);
    }
}

/* ---- creation ---- */

kvrt_status kvrt_prefix_desc_validate(const kvrt_cache_desc *desc)
{
    int h = desc->prefix_cache;
    KVRT_CHECK(h >= KVRT_PREFIX_OFF && h <= KVRT_PREFIX_XXH3, KVRT_ERR_INVALID_ARG,
               "kvrt_cache_create: prefix_cache %d is not a kvrt_prefix_hash (0 off, 1 BLAKE2b, "
               "2 XXH3)", h);
#if !defined(KVRT_HAVE_SODIUM)
    KVRT_CHECK(h != KVRT_PREFIX_BLAKE2B, KVRT_ERR_UNSUPPORTED,
               "kvrt_cache_create: prefix_cache BLAKE2b needs libsodium, which this build lacks");
#endif
#if !defined(KVRT_HAVE_XXHASH)
    KVRT_CHECK(h != KVRT_PREFIX_XXH3, KVRT_ERR_UNSUPPORTED,
               "kvrt_cache_create: prefix_cache XXH3 needs xxHash, which this build lacks");
#endif
    return KVRT_OK;
}

kvrt_status kvrt_prefix_create(kvrt_cache *cache)
{
    if (cache->desc.prefix_cache == KVRT_PREFIX_OFF)
        return KVRT_OK;
#if defined(KVRT_HAVE_SODIUM)
    KVRT_CHECK(sodium_init() >= 0, KVRT_ERR_UNSUPPORTED, "kvrt_cache_create: sodium_init failed");
#endif
    kvrt_prefix *P = calloc(1, sizeof *P);
    KVRT_CHECK(P != NULL, KVRT_ERR_OUT_OF_MEMORY, "host allocation for prefix caching");
    cache->prefix = P; /* freed by kvrt_prefix_destroy whatever happens below */
    P->hash = cache->desc.prefix_cache;
    P->block_size = cache->desc.block_size;
    int32_t empty;
    KVRT_TRY(salt_intern(P, "", 0, &empty)); /* id 0 */
    P->chains = calloc((size_t)cache->desc.max_seqs, sizeof(prefix_chain));
    KVRT_CHECK(P->chains != NULL, KVRT_ERR_OUT_OF_MEMORY, "host allocation for prefix chains");
    for (int s = 0; s < cache->desc.max_seqs; s++) {
        P->chains[s].tail = malloc((size_t)P->block_size * sizeof(int32_t));
        KVRT_CHECK(P->chains[s].tail != NULL, KVRT_ERR_OUT_OF_MEMORY,
                   "host allocation for prefix chains");
    }
    for (int j = 0; j < cache->n_groups; j++) {
        kvrt_group *g = &cache->groups[j];
        if (!kvrt_group_is_self(g))
            continue;
        kvrt_prefix_group *pg = calloc(1, sizeof *pg);
        KVRT_CHECK(pg != NULL, KVRT_ERR_OUT_OF_MEMORY, "host allocation for prefix caching");
        g->prefix = pg;
        pg->owner = P;
        pg->group = g;
        pg->head = pg->tail = -1;
        uint64_t size = 16;
        while (size < 2 * (uint64_t)g->max_blocks)
            size *= 2;
        pg->table_mask = size - 1;
        pg->table = malloc(size * sizeof(int32_t));
        pg->blocks = malloc((size_t)g->max_blocks * sizeof(prefix_block));
        pg->pending = malloc((size_t)g->max_blocks * sizeof(prefix_pending));
        KVRT_CHECK(pg->table && pg->blocks && pg->pending, KVRT_ERR_OUT_OF_MEMORY,
                   "host allocation for the prefix table of %d blocks", g->max_blocks);
        for (uint64_t i = 0; i < size; i++)
            pg->table[i] = -1;
        for (int32_t b = 0; b < g->max_blocks; b++) {
            pg->blocks[b].salt = -1;
            pg->blocks[b].prev = pg->blocks[b].next = -1;
            pg->blocks[b].cached = 0;
        }
    }
    return KVRT_OK;
}

void kvrt_prefix_destroy(kvrt_cache *cache)
{
    kvrt_prefix *P = cache->prefix;
    if (P == NULL)
        return;
    for (int j = 0; j < cache->n_groups; j++) {
        kvrt_prefix_group *pg = cache->groups[j].prefix;
        if (pg == NULL)
            continue;
        free(pg->table);
        free(pg->blocks);
        free(pg->pending);
        free(pg);
        cache->groups[j].prefix = NULL;
    }
    if (P->chains != NULL)
        for (int s = 0; s < cache->desc.max_seqs; s++)
            free(P->chains[s].tail);
    for (int32_t i = 0; i < P->n_salts; i++)
        free(P->salts[i].bytes);
    free(P->salts);
    free(P->chains);
    free(P->written);
    free(P->keys);
    free(P->found);
    free(P);
    cache->prefix = NULL;
}

/* ---- planning with token ids ---- */

static kvrt_status check_enabled(const kvrt_cache *cache, const char *fn)
{
    KVRT_CHECK(cache->prefix != NULL, KVRT_ERR_INVALID_ARG,
               "%s: the cache was created without prefix caching (kvrt_cache_desc.prefix_cache "
               "is 0)",
               fn);
    return KVRT_OK;
}

/* Whether a group's block holds positions first .. first + block_size - 1
 * in slot order. */
static int block_holds(const kvrt_group *g, int32_t block, int32_t first)
{
    const int32_t *p = g->pos + (int64_t)block * g->block_size;
    for (int k = 0; k < g->block_size; k++)
        if (p[k] != first + k)
            return 0;
    return 1;
}

/* After a successful plan: whether the count tokens of seq planned at
 * positions[first..] (ascending) continue its chain, i.e. the sequence now
 * holds exactly positions 0 .. last in every group that keeps all rows. */
static int chain_continues(const kvrt_cache *cache, const prefix_chain *c, int32_t seq,
                           int32_t p_first, int32_t p_last, int32_t count)
{
    if (p_last - p_first + 1 != count)
        return 0;
    if (c->active ? (c->unconfirmed != 0 || p_first != c->pos) : p_first != 0)
        return 0;
    for (int j = 0; j < cache->n_groups; j++) {
        const kvrt_group *g = &cache->groups[j];
        const kvrt_seq_pages *sp = &g->seqs[seq];
        if (!kvrt_group_is_self(g))
            continue;
        if (sp->pos_max != p_last)
            return 0;
        if (!g->evict && (sp->n_live != (int64_t)p_last + 1 || sp->n_slots != sp->n_live))
            return 0;
    }
    return 1;
}

static kvrt_status do_batch_plan_tokens(kvrt_cache *cache, int n, const int32_t *seq_ids,
                                        const int32_t *positions, const int32_t *token_ids,
                                        int n_token_ids, kvrt_batch *batch)
{
    const char *fn = "kvrt_batch_plan_tokens";
    KVRT_TRY(kvrt_check_cache(cache, fn));
    cache = KVRT_CORE(cache);
    KVRT_TRY(check_enabled(cache, fn));
    kvrt_prefix *P = cache->prefix;
    KVRT_CHECK(token_ids != NULL, KVRT_ERR_INVALID_ARG, "%s: token_ids is NULL", fn);
    KVRT_CHECK(n_token_ids == n, KVRT_ERR_INVALID_ARG,
               "%s: token_ids holds %d ids for a plan of %d tokens", fn, n_token_ids, n);
    KVRT_TRY(kvrt_reserve((void **)&P->written, &P->written_cap, cache->n_layers_total, 1));
    kvrt_status st = kvrt_batch_plan(cache, n, seq_ids, positions, batch);
    if (st != KVRT_OK) /* the public entry renames the message */
        return st;

    /* the plan stands: record tokens and pending keys (nothing fails below) */
    int bs = P->block_size;
    P->plan_epoch = batch->epoch;
    memset(P->written, 0, (size_t)cache->n_layers_total);
    for (int j = 0; j < cache->n_groups; j++)
        if (cache->groups[j].prefix != NULL)
            pending_drop(cache->groups[j].prefix);
    const int32_t *order = batch->order; /* tokens by (sequence, position) */
    for (int i = 0; i < n;) {
        int32_t seq = seq_ids[order[i]];
        int k = i;
        while (k < n && seq_ids[order[k]] == seq)
            k++;
        prefix_chain *c = &P->chains[seq];
        if (!chain_continues(cache, c, seq, positions[order[i]], positions[order[k - 1]], k - i)) {
            chain_end(P, c);
            i = k;
            continue;
        }
        if (!c->active) { /* a fresh sequence: a chain under the empty salt */
            c->active = 1;
            c->salt = 0;
            salt_ref(P, 0);
            c->pos = 0;
            hash_root(P, "", 0, &c->key);
        }
        for (; i < k && c->active; i++) {
            int32_t t = order[i], pos = positions[t];
            c->tail[pos % bs] = token_ids[t];
            c->pos = pos + 1;
            if (pos % bs != bs - 1)
                continue;
            prefix_key key;
            hash_block(P, &c->key, c->tail, &key);
            c->key = key;
            for (int j = 0; j < cache->n_groups; j++) {
                kvrt_group *g = &cache->groups[j];
                if (g->prefix == NULL)
                    continue;
                int32_t block = batch->groups[j].slots[t] / bs;
                if (!block_holds(g, block, pos - bs + 1)) {
                    chain_end(P, c); /* not laid out as a chain: no more keys */
                    break;
                }
                prefix_pending *e = &g->prefix->pending[g->prefix->n_pending++];
                e->block = block;
                e->salt = c->salt;
                e->key = key;
                salt_ref(P, c->salt);
            }
        }
        i = k;
        if (c->active)
            c->unconfirmed = batch->epoch;
    }
    return KVRT_OK;
}

void kvrt_prefix_written(kvrt_cache *cache, const kvrt_batch *batch, int layer)
{
    kvrt_prefix *P = cache->prefix;
    if (P == NULL || batch->epoch != P->plan_epoch || P->plan_epoch == 0)
        return;
    P->written[layer] = 1;
    kvrt_group *g = &cache->groups[cache->layer_group[layer]];
    int all = 1;
    for (int i = 0; i < g->n_layers; i++)
        all &= P->written[g->layers[i]];
    if (!all)
        return;
    kvrt_prefix_group *pg = g->prefix;
    for (int32_t i = 0; i < pg->n_pending; i++)
        publish(pg, &pg->pending[i]);
    pg->n_pending = 0;
    /* every self group written: the plan's chains are confirmed */
    for (int j = 0; j < cache->n_groups; j++) {
        const kvrt_group *h = &cache->groups[j];
        for (int i = 0; kvrt_group_is_self(h) && i < h->n_layers; i++)
            if (!P->written[h->layers[i]])
                return;
    }
    for (int s = 0; s < batch->n_seqs; s++) {
        prefix_chain *c = &P->chains[batch->batch_seqs[s]];
        if (c->unconfirmed == batch->epoch)
            c->unconfirmed = 0;
    }
}

/* ---- lookup and attach ---- */

static kvrt_status do_seq_attach_prefix(kvrt_cache *cache, int32_t seq, const int32_t *tokens,
                                        int n, const void *salt, int salt_len,
                                        int32_t *n_covered)
{
    const char *fn = "kvrt_seq_attach_prefix";
    KVRT_TRY(kvrt_check_cache(cache, fn));
    cache = KVRT_CORE(cache);
    KVRT_TRY(check_enabled(cache, fn));
    kvrt_prefix *P = cache->prefix;
    KVRT_TRY(kvrt_check_seq(cache, seq, fn));
    KVRT_CHECK(n_covered != NULL, KVRT_ERR_INVALID_ARG, "%s: n_covered is NULL", fn);
    KVRT_CHECK(n >= 0, KVRT_ERR_INVALID_ARG, "%s: n %d is negative", fn, n);
    KVRT_CHECK(tokens != NULL || n == 0, KVRT_ERR_INVALID_ARG, "%s: tokens is NULL for %d tokens",
               fn, n);
    KVRT_CHECK(salt_len >= 0 && salt_len <= KVRT_PREFIX_SALT_MAX, KVRT_ERR_INVALID_ARG,
               "%s: salt_len %d is out of range [0, %d]", fn, salt_len, KVRT_PREFIX_SALT_MAX);
    KVRT_CHECK(salt != NULL || salt_len == 0, KVRT_ERR_INVALID_ARG,
               "%s: salt is NULL with salt_len %d", fn, salt_len);
    KVRT_CHECK(kvrt_seq_is_empty(cache, seq), KVRT_ERR_INVALID_ARG,
               "%s: sequence %d is not empty (remove it first)", fn, (int)seq);
    int bs = P->block_size;
    int32_t m = n / bs; /* full blocks of the prompt */
    KVRT_TRY(kvrt_reserve((void **)&P->keys, &P->keys_cap, m + 1, sizeof(prefix_key)));
    KVRT_TRY(kvrt_reserve((void **)&P->found, &P->found_cap, (int64_t)cache->n_groups * (m + 1),
                          sizeof(int32_t)));
    for (int j = 0; j < cache->n_groups; j++)
        if (cache->groups[j].prefix != NULL)
            KVRT_TRY(kvrt_reserve((void **)&cache->groups[j].seqs[seq].blocks,
                                  &cache->groups[j].seqs[seq].cap_blocks, m + 1, sizeof(int32_t)));
    int32_t salt_id = salt_find(P, salt, salt_len);
    if (salt_id < 0)
        KVRT_TRY(salt_intern(P, salt, salt_len, &salt_id));

    /* keys and the blocks every group holds for them; a group that keeps all
     * rows ends the search at its first miss */
    prefix_key root;
    hash_root(P, salt, salt_len, &root);
    int32_t reach = 0;
    for (int32_t i = 0; i < m; i++) {
        hash_block(P, i > 0 ? &P->keys[i - 1] : &root, tokens + (int64_t)i * bs, &P->keys[i]);
        int full_miss = 0;
        for (int j = 0; j < cache->n_groups; j++) {
            kvrt_prefix_group *pg = cache->groups[j].prefix;
            if (pg == NULL)
                continue;
            int32_t b = table_find(pg, &P->keys[i], salt_id);
            P->found[(int64_t)j * (m + 1) + i] = b;
            full_miss |= b < 0 && !cache->groups[j].evict;
        }
        if (full_miss)
            break;
        reach = i + 1;
    }
    /* the longest hit every sliding window can serve: a token at position
     * h * bs sees positions above h * bs - window */
    int32_t h = reach;
    for (; h > 0; h--) {
        int ok = 1;
        for (int j = 0; j < cache->n_groups && ok; j++) {
            const kvrt_group *g = &cache->groups[j];
            if (g->prefix == NULL || !g->evict)
                continue;
            int64_t need = (int64_t)h * bs - g->window + 1;
            int32_t first = need > 0 ? (int32_t)(need / bs) : 0;
            for (int32_t i = first; i < h && ok; i++)
                ok = P->found[(int64_t)j * (m + 1) + i] >= 0;
        }
        if (ok)
            break;
    }

    /* commit */
    for (int j = 0; j < cache->n_groups; j++) {
        kvrt_group *g = &cache->groups[j];
        kvrt_prefix_group *pg = g->prefix;
        if (pg == NULL || h == 0)
            continue;
        kvrt_seq_pages *sp = &g->seqs[seq];
        int32_t first = 0;
        if (g->evict) {
            int64_t need = (int64_t)h * bs - g->window + 1;
            first = need > 0 ? (int32_t)(need / bs) : 0;
        }
        for (int32_t i = first; i < h; i++) {
            int32_t b = P->found[(int64_t)j * (m + 1) + i];
            if (g->refcount[b] == 0)
                list_unlink(pg, b);
            g->refcount[b]++;
            sp->blocks[sp->n_blocks++] = b;
        }
        /* keyed blocks hold whole blocks of positions: no need to read them */
        sp->n_slots = sp->n_live = (int64_t)(h - first) * bs;
        sp->pos_min = first * bs;
        sp->pos_max = h * bs - 1;
        if (first > 0) { /* the window's earlier rows count as dropped */
            sp->evicted_min = 0;
            sp->evicted_max = first * bs - 1;
        }
    }
    prefix_chain *c = &P->chains[seq];
    salt_ref(P, salt_id); /* before the old chain lets go of its salt, which may be this one */
    chain_end(P, c);
    c->active = 1;
    c->salt = salt_id;
    c->pos = h * bs;
    c->key = h > 0 ? P->keys[h - 1] : root;
    c->unconfirmed = 0;
    P->lookups++;
    P->hits += h > 0;
    P->misses += h == 0;
    P->tokens_queried += n;
    P->tokens_served += (int64_t)h * bs;
    *n_covered = h * bs;
    cache->epoch++;
    return KVRT_OK;
}

/* ---- statistics and invariants ---- */

static kvrt_status do_prefix_stats_get(const kvrt_cache *cache, kvrt_prefix_stats *out)
{
    KVRT_TRY(kvrt_check_cache(cache, "kvrt_prefix_stats_get"));
    cache = KVRT_CORE(cache);
    KVRT_TRY(check_enabled(cache, "kvrt_prefix_stats_get"));
    KVRT_CHECK(out != NULL, KVRT_ERR_INVALID_ARG, "kvrt_prefix_stats_get: out is NULL");
    const kvrt_prefix *P = cache->prefix;
    memset(out, 0, sizeof *out);
    out->lookups = P->lookups;
    out->hits = P->hits;
    out->misses = P->misses;
    out->tokens_queried = P->tokens_queried;
    out->tokens_served = P->tokens_served;
    for (int j = 0; j < cache->n_groups; j++) {
        const kvrt_prefix_group *pg = cache->groups[j].prefix;
        if (pg == NULL)
            continue;
        out->evictions += pg->evictions;
        out->blocks_cached += pg->n_cached;
        out->blocks_keyed += pg->n_keyed;
    }
    return KVRT_OK;
}

kvrt_status kvrt_prefix_check(const kvrt_cache *cache, int gi)
{
    const kvrt_group *g = &cache->groups[gi];
    const kvrt_prefix_group *pg = g->prefix;
    if (pg == NULL)
        return KVRT_OK;
    int32_t listed = 0, keyed = 0, used = 0, in_table = 0;
    for (int32_t b = pg->head, prev = -1; b >= 0; prev = b, b = pg->blocks[b].next) {
        KVRT_CHECK(listed <= g->n_blocks && pg->blocks[b].prev == prev, KVRT_ERR_INTERNAL,
                   "group %d: the cached list is broken at block %d", gi, b);
        listed++;
    }
    KVRT_CHECK(listed == pg->n_cached, KVRT_ERR_INTERNAL,
               "group %d: %d blocks listed as cached, %d counted", gi, listed, pg->n_cached);
    for (int32_t i = 0; i < g->n_free; i++)
        KVRT_CHECK(pg->blocks[g->free_stack[i]].salt < 0 && !pg->blocks[g->free_stack[i]].cached,
                   KVRT_ERR_INTERNAL, "group %d: free block %d has a key", gi, g->free_stack[i]);
    for (int32_t b = 0; b < g->n_blocks; b++) {
        const prefix_block *x = &pg->blocks[b];
        used += g->refcount[b] > 0;
        KVRT_CHECK(!x->cached || (g->refcount[b] == 0 && x->salt >= 0), KVRT_ERR_INTERNAL,
                   "group %d: cached block %d has refcount %d and salt %d (needs 0 and a key)", gi,
                   b, g->refcount[b], x->salt);
        KVRT_CHECK(x->cached || x->salt < 0 || g->refcount[b] > 0, KVRT_ERR_INTERNAL,
                   "group %d: keyed block %d is neither used nor cached", gi, b);
        if (x->salt < 0)
            continue;
        keyed++;
        KVRT_CHECK(table_find(pg, &x->key, x->salt) == b, KVRT_ERR_INTERNAL,
                   "group %d: keyed block %d is not found by its key", gi, b);
        KVRT_CHECK(x->salt < pg->owner->n_salts && pg->owner->salts[x->salt].len >= 0 &&
                       pg->owner->salts[x->salt].refs > 0,
                   KVRT_ERR_INTERNAL, "group %d: block %d has a released salt %d", gi, b, x->salt);
        KVRT_CHECK(block_holds(g, b, g->pos[(int64_t)b * g->block_size]) &&
                       g->pos[(int64_t)b * g->block_size] % g->block_size == 0,
                   KVRT_ERR_INTERNAL, "group %d: keyed block %d does not hold one whole block of "
                   "positions", gi, b);
    }
    for (uint64_t i = 0; i <= pg->table_mask; i++)
        in_table += pg->table[i] >= 0;
    KVRT_CHECK(keyed == pg->n_keyed && in_table == keyed, KVRT_ERR_INTERNAL,
               "group %d: %d keyed blocks, %d counted, %d in the table", gi, keyed, pg->n_keyed,
               in_table);
    KVRT_CHECK(g->n_free + pg->n_cached + used == g->n_blocks, KVRT_ERR_INTERNAL,
               "group %d: %d free + %d cached + %d used blocks != %d in the pool", gi, g->n_free,
               pg->n_cached, used, g->n_blocks);
    return KVRT_OK;
}

/* ---- public entries: the message of a failure starts with the function ---- */

kvrt_status kvrt_batch_plan_tokens(kvrt_cache *cache, int n, const int32_t *seq_ids,
                                   const int32_t *positions, const int32_t *token_ids,
                                   int n_token_ids, kvrt_batch *batch)
{
    KVRT_ENTRY(cache, "kvrt_batch_plan_tokens",
               do_batch_plan_tokens(cache, n, seq_ids, positions, token_ids, n_token_ids, batch));
}

kvrt_status kvrt_seq_attach_prefix(kvrt_cache *cache, int32_t seq, const int32_t *tokens, int n,
                                   const void *salt, int salt_len, int32_t *n_covered)
{
    KVRT_ENTRY(cache, "kvrt_seq_attach_prefix",
               do_seq_attach_prefix(cache, seq, tokens, n, salt, salt_len, n_covered));
}

/* ---- public entries that only check the thread (internal.h) ---- */

kvrt_status kvrt_prefix_stats_get(const kvrt_cache *cache, kvrt_prefix_stats *out)
{
    KVRT_ENTRY(cache, "kvrt_prefix_stats_get", do_prefix_stats_get(cache, out));
}
