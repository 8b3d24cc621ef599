/*
 * internal.h: the cache's host structures and the error macros shared by
 * the library's sources. Nothing here is exported.
 */
#ifndef KVRT_INTERNAL_H
#define KVRT_INTERNAL_H

#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "kvrt.h"

/* ---- errors ---- */

/* Records the thread's last error message and returns status. */
kvrt_status kvrt_set_error(kvrt_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
void kvrt_clear_error(void);
/* Makes the message of a failed public call start with "fn: " (every
 * message names the function that failed): a prefix of another entry called
 * on the way ("kvrt_state_read: ") or of the state parser ("state: ") is
 * replaced, a message without one gets fn in front. Returns status. */
kvrt_status kvrt_error_in(kvrt_status status, const char *fn);

/* Returns `status` with a message when cond is false. */
#define KVRT_CHECK(cond, status, ...)                                                        \
    do {                                                                                     \
        if (!(cond))                                                                         \
            return kvrt_set_error((status), __VA_ARGS__);                                    \
    } while (0)

/* Returns the status of expr when it is an error (its message stays). */
#define KVRT_TRY(expr)                                                                       \
    do {                                                                                     \
        kvrt_status kvrt_try_status_ = (expr);                                               \
        if (kvrt_try_status_ != KVRT_OK)                                                     \
            return kvrt_try_status_;                                                         \
    } while (0)

/* ---- host arrays ---- */

/* Grows *p (elements of `size` bytes) to hold at least `need`; KVRT_ERR_OUT_OF_MEMORY. */
kvrt_status kvrt_reserve(void **p, int64_t *cap, int64_t need, size_t size);

/* ---- cache ---- */

/* One sequence's slots in one group. Used slots are [0, n_slots): slot i is
 * (blocks[i / block_size], i % block_size). pos_min / pos_max / n_live are
 * recomputed from the slots by kvrt_seq_pages_refresh after every edit. */
typedef struct kvrt_seq_pages {
    int32_t *blocks;       /* page table */
    int64_t  cap_blocks;
    int32_t  n_blocks;
    int64_t  n_slots;
    int64_t  n_live;
    int32_t  pos_min, pos_max;     /* -1 when empty */
    int32_t  evicted_min, evicted_max; /* positions a sliding window dropped; -1 none */
} kvrt_seq_pages;

typedef struct kvrt_group {
    kvrt_layer_kind kind;
    int             window;        /* > 0: sliding window (and not swa_full) */
    int             block_size;    /* CROSS: cross_max_len */
    int             n_layers;
    int            *layers;        /* [n_layers] layer indices */
    kvrt_layer_ref *refs;          /* [n_layers] host copy */
    kvrt_layer_ref *refs_device;   /* [n_layers] on the device */
    size_t          refs_device_bytes;
    int             max_rot_dims;
    int32_t         n_blocks;      /* committed */
    int32_t         max_blocks;    /* reserved */
    int32_t         grow_step;
    int32_t        *refcount;      /* [max_blocks] */
    int32_t        *free_stack;    /* [max_blocks] */
    int32_t         n_free;
    int32_t        *pos;           /* host truth [max_blocks][block_size]; NULL for CROSS */
    int32_t        *pos_device;    /* the device copy */
    uint8_t        *dirty;         /* [max_blocks] positions changed since upload */
    int32_t        *dirty_list;
    int32_t         n_dirty;
    int32_t        *cross_len;     /* CROSS: rows held by each block */
    int             evict;         /* sliding window that frees old blocks */
    int32_t        *pending;       /* evict: [max_blocks] planning counts, kept zero */
    kvrt_seq_pages *seqs;          /* [max_seqs] */
    struct kvrt_prefix_group *prefix; /* prefix caching (prefix.c); NULL when off */
} kvrt_group;

/* Device memory of one layer. */
typedef struct kvrt_layer_mem {
    void  *k, *v;
    size_t k_reserve, v_reserve;   /* bytes reserved */
    size_t k_block, v_block;       /* bytes per block */
    /* quantized dtypes: the scales of K and V, a region each; NULL otherwise */
    void  *k_scale, *v_scale;
    size_t scale_reserve, scale_block; /* bytes of each; 0 when not quantized */
} kvrt_layer_mem;

/* Bytes per block of one layer's memory, all regions (K, V, scales). */
static inline size_t kvrt_layer_mem_block(const kvrt_layer_mem *m)
{
    return m->k_block + m->v_block + (m->v_scale != NULL ? 2 : m->k_scale != NULL ? 1 : 0) *
                                         m->scale_block;
}
/* Creates a layer's regions (K, V, scales) for max_blocks blocks, n_blocks
 * committed; the sizes come from its layout. */
kvrt_status kvrt_layer_mem_create(kvrt_cache *cache, kvrt_layer_mem *m, const kvrt_layout *L,
                                  int32_t n_blocks, int32_t max_blocks);
/* Grows a layer's regions from old_n to new_n committed blocks. */
kvrt_status kvrt_layer_mem_grow(kvrt_cache *cache, kvrt_layer_mem *m, int32_t old_n, int32_t new_n);
/* Frees a layer's regions. */
void kvrt_layer_mem_destroy(kvrt_cache *cache, kvrt_layer_mem *m);

struct kvrt_cache {
    kvrt_cache_desc  desc;
    kvrt_layer_desc *layers;       /* [n_layers_total]; the handle's view is desc.n_layers */
    kvrt_backend_t   be;
    void            *stream;
    int              n_groups;
    kvrt_group      *groups;
    int             *layer_group;  /* [n_layers] */
    kvrt_layer_mem  *mem;          /* [n_layers] */
    uint64_t         epoch;        /* bumped by every edit; plans of older epochs are stale */
    int64_t          bytes_device;
    /* host scratch reused by edits (grown as needed) */
    int32_t *scratch_a, *scratch_b, *scratch_c;
    int64_t  scratch_a_cap, scratch_b_cap, scratch_c_cap;
    kvrt_span *spans;
    int64_t    spans_cap;
    /* handles: a shared handle (kvrt_cache_create_shared) has core set and
     * maps its layer indices to the core's; the core counts live handles */
    kvrt_cache *core;
    int        *layer_map;         /* [desc.n_layers] core layer of each of the handle's */
    int         n_handles;         /* on the core: live handles, itself included */
    int         destroy_pending;   /* on the core: its own handle was destroyed */
    int         n_layers_total;    /* on the core: its layers plus shared handles' own */
    int        *layer_users;       /* on the core [n_layers_total]: shared handles using each
                                      own layer; a released one has layer_group -1 */
    struct kvrt_prefix *prefix;    /* prefix caching (prefix.c); NULL when off */
    /* on the core: a call has begun changing the cache (kvrt_change_begin),
     * and a failure after that left it half-changed (KVRT_ERR_CACHE_LOST) */
    int         changing;
    int         lost;
    /* on the core: the thread inside a public call on the cache or one of
     * its handles (an address only that thread has; 0 none), and how deep
     * its calls are nested (kvrt_enter) */
    _Atomic uintptr_t owner;
    int               depth;
    struct kvrt_journal *journal;  /* on the core: the edit's undo record (kvrt_change_journal) */
};

/* ---- one thread at a time (kvrt.h, "Threads") ----
 * Every public entry that takes a cache and returns a status runs between
 * kvrt_enter and kvrt_leave: the first thread in takes the core's owner
 * flag (an atomic compare-and-swap); another thread arriving meanwhile gets
 * KVRT_ERR_BUSY naming its call and changes nothing. The owner may enter
 * again (kvrt's entries call one another: kvrt_seq_offload calls
 * kvrt_state_write), except from a state writer or reader, which
 * kvrt_callback_begin / _end bracket. A NULL cache enters nothing (the
 * entry's own check names it). */
kvrt_status kvrt_enter(const kvrt_cache *cache, const char *fn);
kvrt_status kvrt_leave(const kvrt_cache *cache, kvrt_status status);
void        kvrt_callback_begin(void);
void        kvrt_callback_end(void);
/* The body of a public entry fn: `return call` between kvrt_enter and
 * kvrt_leave, its failure's message under fn (kvrt_error_in). */
#define KVRT_ENTRY(cache, fn, call)                                                          \
    do {                                                                                     \
        kvrt_status kvrt_entry_status_ = kvrt_enter((cache), (fn));                          \
        if (kvrt_entry_status_ != KVRT_OK)                                                   \
            return kvrt_entry_status_;                                                       \
        return kvrt_leave((cache), kvrt_error_in((call), (fn)));                             \
    } while (0)

/* ---- calls that change the cache (kvrt.h, "Device failures") ----
 * A call that edits the cache calls kvrt_change_begin at its point of no
 * return, the first change of a host table or of device rows, and its
 * public entry returns through kvrt_change_end, which turns a failure after
 * that point into KVRT_ERR_CACHE_LOST and marks the cache lost until
 * kvrt_cache_clear rebuilds it. kvrt_check_cache refuses a lost cache. */
void        kvrt_change_begin(kvrt_cache *core);
/* kvrt_error_in(status, fn), after which a failure of a call that had begun
 * changing the cache becomes KVRT_ERR_CACHE_LOST. */
kvrt_status kvrt_change_end(kvrt_cache *cache, kvrt_status status, const char *fn);
/* kvrt_change_begin for an edit that changes only the page tables of
 * sequences [s0, s1), positions, refcounts and the free lists, whose device
 * work writes rows only into blocks that end up free or into holes, and the
 * device copy of positions: it records them first, so that kvrt_change_end
 * puts them back on a failure and the cache is as it was. Without prefix
 * caching only; kvrt_change_final marks the point (a RoPE re-rotation in
 * place) after which the edit can no longer be undone. Returns
 * KVRT_ERR_OUT_OF_MEMORY, with nothing begun, when the record's host memory
 * cannot be had: the edit must then return before changing anything. */
kvrt_status kvrt_change_journal(kvrt_cache *core, int32_t s0, int32_t s1);
void        kvrt_change_final(kvrt_cache *core);
/* kvrt_check_cache without refusing a lost cache (clear, sync, set_stream). */
kvrt_status kvrt_check_handle(const kvrt_cache *cache, const char *fn);

/* The cache that owns the memory behind a handle. */
#define KVRT_CORE(c) ((c) != NULL && (c)->core != NULL ? (c)->core : (c))
/* Called when shared handle h is destroyed while its core lives on: own
 * layers no other handle uses leave their groups and their memory is freed. */
void kvrt_shared_release(kvrt_cache *core, kvrt_cache *h);
/* Checks a handle's layer index and maps it to the core's. */
kvrt_status kvrt_map_layer(const kvrt_cache *handle, int *layer, const char *fn);

/* f32, f16 or bf16: a dtype for write sources, queries, outputs. */
int kvrt_dtype_is_plain(kvrt_dtype dtype);

/* qsort comparison of int32 values. */
int kvrt_cmp_i32(const void *a, const void *b);
/* "ATTN", "MLA", "CROSS", "?". */
const char *kvrt_layer_kind_name(int kind);
/* The grouping rule: two self-attention layers of the same kind and window
 * share a page table; a CROSS layer shares with none. */
int kvrt_layers_share_group(const kvrt_layer_desc *a, const kvrt_layer_desc *b);
/* Live positions of a sequence in a group, sorted, into out (n_live room). */
int64_t kvrt_seq_pages_live_sorted(const kvrt_group *g, const kvrt_seq_pages *sp, int32_t *out);
/* 1 when the sequence holds nothing in any group (cross K/V included). */
int kvrt_seq_is_empty(const kvrt_cache *cache, int32_t seq);

/* Layout of a layer for kernels. */
kvrt_layout kvrt_layer_layout(const kvrt_cache *cache, int layer);
/* Layout of layer description l in group g of cache. */
kvrt_layout kvrt_layout_of(const kvrt_cache *cache, const kvrt_layer_desc *l, const kvrt_group *g);

/* Block pool */
int32_t kvrt_group_block_alloc(kvrt_group *g);            /* -1 when none free */
void    kvrt_group_block_release(kvrt_group *g, int32_t block);
/* Makes sure `need` blocks are free, growing the pool if allowed. */
kvrt_status kvrt_group_ensure_free(kvrt_cache *cache, kvrt_group *g, int64_t need);
/* Blocks the pool could still provide (free + growth room). */
int64_t kvrt_group_available(const kvrt_group *g);
void    kvrt_group_mark_dirty(kvrt_group *g, int32_t block);
/* Uploads positions of dirty blocks to the device. */
kvrt_status kvrt_group_sync_pos(kvrt_cache *cache, kvrt_group *g);
kvrt_status kvrt_cache_sync_pos(kvrt_cache *cache);

/* Page tables */
kvrt_status kvrt_seq_pages_push(kvrt_seq_pages *sp, int32_t block);
void        kvrt_seq_pages_refresh(const kvrt_group *g, kvrt_seq_pages *sp);
void        kvrt_seq_pages_release_all(kvrt_group *g, kvrt_seq_pages *sp);
/* Global slot of used slot i of a sequence. */
static inline int64_t kvrt_seq_slot(const kvrt_group *g, const kvrt_seq_pages *sp, int64_t i)
{
    return (int64_t)sp->blocks[i / g->block_size] * g->block_size + i % g->block_size;
}

/* Copies `n_spans` slot spans in every layer of the group (staged to the device). */
kvrt_status kvrt_group_move(kvrt_cache *cache, kvrt_group *g, const kvrt_span *spans,
                            int32_t n_spans);
/* Replaces a shared block of a sequence with a private copy (data and
 * positions). Needs one free block (call kvrt_group_ensure_free first). */
kvrt_status kvrt_group_unshare(kvrt_cache *cache, kvrt_group *g, kvrt_seq_pages *sp,
                               int32_t page_index);

int kvrt_group_is_self(const kvrt_group *g); /* ATTN or MLA (has positions) */

/* Validation helpers */
kvrt_status kvrt_check_cache(const kvrt_cache *cache, const char *fn);
kvrt_status kvrt_check_seq(const kvrt_cache *cache, int32_t seq, const char *what);
kvrt_status kvrt_check_device_ptr(const kvrt_cache *cache, const void *p, const char *what);

/* Scratch */
kvrt_status kvrt_scratch(kvrt_cache *cache, int which, int64_t n, int32_t **out);

/* ---- batch ---- */

typedef struct kvrt_batch_group {
    int32_t *slots;         /* host [max_tokens] slot of each token */
    int32_t *page_indptr;   /* host [max_tokens + 1] */
    int32_t *seq_n_slots;   /* host [max_tokens] */
    int32_t  max_seq_slots;
    /* device copies, inside the batch's device buffer */
    const int32_t *d_slots, *d_page_indptr, *d_page_indices, *d_seq_n_slots;
} kvrt_batch_group;

struct kvrt_batch {
    kvrt_cache       *cache;
    int               max_tokens;
    int               n_tokens;
    int               n_seqs;
    uint64_t          epoch;
    int32_t          *seq_ids;     /* host [max_tokens] per token */
    int32_t          *positions;   /* host [max_tokens] */
    int32_t          *tok_seq;     /* host [max_tokens] batch-sequence index */
    int32_t          *batch_seqs;  /* host [max_tokens] sequence id of each batch sequence */
    kvrt_batch_group *groups;      /* [n_groups] */
    /* one host image of all metadata, uploaded with one copy */
    int32_t          *image;
    int64_t           image_cap;
    void             *device;      /* device buffer (region) */
    size_t            device_reserve, device_commit;
    const int32_t    *d_tok_seq, *d_positions;
    /* planning scratch */
    int32_t          *order;
    int32_t          *seq_first_pos; /* per batch sequence: lowest new position */
    int32_t          *seq_count;
    int64_t          *grow;        /* per group: blocks to add */
    int64_t           grow_cap;
    int64_t          *undo;        /* the commit's journal (plan.c, plan_undo) */
    int64_t           undo_cap;
};

#endif /* KVRT_INTERNAL_H */
