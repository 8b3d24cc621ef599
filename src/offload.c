/*
 * offload.c: host offload of a sequence. An offload is the sequence's state
 * image (docs/state-format.md) in host memory: kvrt_seq_offload writes it
 * and then empties the sequence; kvrt_seq_restore verifies it and loads it
 * into free blocks, all or nothing, keeping the offload either way.
 */
#include <stdio.h>

#include "internal.h"
#include "state.h"

struct kvrt_offload {
    uint8_t *image;   /* [size] a state image of one sequence */
    size_t   size;
    size_t   used;    /* bytes written so far (while offloading) */
};

static kvrt_status image_write(void *user, const void *data, size_t size)
{
    kvrt_offload *off = user;
    KVRT_CHECK(size <= off->size - off->used, KVRT_ERR_INTERNAL,
               "kvrt_seq_offload: the state outgrew its computed size of %zu bytes", off->size);
    memcpy(off->image + off->used, data, size);
    off->used += size;
    return KVRT_OK;
}

static kvrt_status do_seq_offload(kvrt_cache *cache, int32_t seq, kvrt_offload **out)
{
    KVRT_CHECK(out != NULL, KVRT_ERR_INVALID_ARG, "kvrt_seq_offload: out is NULL");
    *out = NULL;
    KVRT_TRY(kvrt_check_cache(cache, "kvrt_seq_offload"));
    KVRT_TRY(kvrt_check_seq(cache, seq, "kvrt_seq_offload"));
    uint64_t bytes;
    KVRT_TRY(kvrt_state_size(cache, seq, &bytes));
    KVRT_CHECK(bytes <= SIZE_MAX, KVRT_ERR_OUT_OF_MEMORY,
               "kvrt_seq_offload: %llu bytes exceed the address space", (unsigned long long)bytes);
    kvrt_offload *off = calloc(1, sizeof *off);
    KVRT_CHECK(off != NULL, KVRT_ERR_OUT_OF_MEMORY, "kvrt_seq_offload: host allocation");
    /* Plain host memory. On a GPU backend this is where pinned memory
     * (cudaMallocHost / hipHostMalloc, through a backend entry for pinned
     * host allocations) would let rows be downloaded straight into the
     * offload and uploaded straight back by DMA. */
    off->size = (size_t)bytes;
    off->image = malloc(off->size > 0 ? off->size : 1);
    if (off->image == NULL) {
        free(off);
        return kvrt_set_error(KVRT_ERR_OUT_OF_MEMORY,
                              "kvrt_seq_offload: host copy of %llu bytes for sequence %d",
                              (unsigned long long)bytes, (int)seq);
    }
    kvrt_status st = kvrt_state_write(cache, seq, image_write, off);
    if (st == KVRT_OK && off->used != off->size)
        st = kvrt_set_error(KVRT_ERR_INTERNAL, "kvrt_seq_offload: wrote %zu bytes of %zu computed",
                            off->used, off->size);
    /* the copy is complete: only now does the sequence leave the cache */
    if (st == KVRT_OK)
        st = kvrt_seq_rm(cache, seq, 0, -1);
    if (st != KVRT_OK) {
        kvrt_offload_free(off);
        return st;
    }
    *out = off;
    return KVRT_OK;
}

static kvrt_status do_seq_restore(kvrt_cache *cache, int32_t dst_seq, const kvrt_offload *off)
{
    KVRT_TRY(kvrt_check_cache(cache, "kvrt_seq_restore"));
    KVRT_CHECK(off != NULL, KVRT_ERR_INVALID_ARG, "kvrt_seq_restore: off is NULL");
    KVRT_TRY(kvrt_check_seq(cache, dst_seq, "kvrt_seq_restore: dst_seq"));
    kvrt_state_view view;
    /* verified again (checksums) so host memory corrupted meanwhile is caught */
    kvrt_status st = kvrt_state_parse(off->image, off->used, cache, &view);
    if (st == KVRT_OK)
        st = kvrt_state_apply(cache, dst_seq, &view, off->image);
    kvrt_state_view_free(&view);
    return st;
}

uint64_t kvrt_offload_bytes(const kvrt_offload *off) { return off != NULL ? (uint64_t)off->size : 0; }

void kvrt_offload_free(kvrt_offload *off)
{
    if (off == NULL)
        return;
    free(off->image);
    free(off);
}

/* ---- public entries: the message of a failure starts with the function ---- */

kvrt_status kvrt_seq_offload(kvrt_cache *cache, int32_t seq, kvrt_offload **out)
{
    KVRT_ENTRY(cache, "kvrt_seq_offload", do_seq_offload(cache, seq, out));
}

kvrt_status kvrt_seq_restore(kvrt_cache *cache, int32_t dst_seq, const kvrt_offload *off)
{
    KVRT_ENTRY(cache, "kvrt_seq_restore", do_seq_restore(cache, dst_seq, off));
}
