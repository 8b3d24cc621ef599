/*
 * prefix.h: the hooks through which the block pool, planning, writes and
 * edits keep prefix caching (prefix.c) true. Every hook is a no-op on a
 * cache or group without prefix caching.
 */
#ifndef KVRT_PREFIX_H
#define KVRT_PREFIX_H

#include "internal.h"

/* Creation and destruction (kvrt_cache_create, core_destroy). */
kvrt_status kvrt_prefix_desc_validate(const kvrt_cache_desc *desc);
kvrt_status kvrt_prefix_create(kvrt_cache *cache);
void        kvrt_prefix_destroy(kvrt_cache *cache);

/* Block pool (cache.c). A keyed block whose last reference goes joins the
 * cached set, keeping rows and positions: release returns 1 then. Evict
 * takes the least recently released cached block, drops its key and
 * positions, and returns it (refcount 0), or -1 when none is cached. */
int     kvrt_prefix_release(kvrt_group *g, int32_t block);
int32_t kvrt_prefix_evict(kvrt_group *g);
int32_t kvrt_prefix_n_cached(const kvrt_group *g);

/* An edit changed the rows or positions of a block: its key goes. */
void kvrt_prefix_forget(kvrt_group *g, int32_t block);
/* An edit changed sequence seq (seq < 0: every sequence): its token chain
 * ends, so none of its later blocks gets a key. */
void kvrt_prefix_seq_edited(kvrt_cache *cache, int32_t seq);
/* kvrt_cache_clear: every key, cached block and chain goes (before the
 * sequences are released). */
void kvrt_prefix_clear(kvrt_cache *cache);

/* kvrt_write of a layer succeeded for the current plan. */
void kvrt_prefix_written(kvrt_cache *cache, const kvrt_batch *batch, int layer);

/* Invariants of the prefix structures of group gi (kvrt_cache_check). */
kvrt_status kvrt_prefix_check(const kvrt_cache *cache, int gi);

#endif /* KVRT_PREFIX_H */
