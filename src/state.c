/*
 * state.c: state files (docs/state-format.md). The writer streams sections
 * through the caller's writer, gathering rows from the device in bounded
 * chunks; the reader reads the input section by section into host memory,
 * verifying each frame, checksum (XXH3 from the xxHash library) and its
 * contents as it arrives, and only then loads the sequences into the cache,
 * all or nothing. The parser and the loader are shared with host offload
 * (offload.c) and kvrt-inspect (src/state.h).
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"
#include "state.h"

#if defined(KVRT_HAVE_XXHASH)
#  include <xxhash.h>
#endif

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#  define STATE_HOST_LE 0
#else
#  define STATE_HOST_LE 1
#endif

/* Bytes of rows moved through host memory per step: on the CPU a chunk
 * that stays in cache between gather, checksum and the writer; on GPUs
 * larger ones, each a device round trip. */
#define STATE_CHUNK_CPU ((size_t)1 << 20)
#define STATE_CHUNK_GPU ((size_t)16 << 20)
/* Input read per reader call: a claimed size is only allocated as data arrives. */
#define STATE_READ_STEP ((size_t)16 << 20)
#define STATE_MAX_LAYERS 4096u

/* Fuzzing builds accept any checksum, so that mutated inputs reach the
 * checks behind it (the libFuzzer targets in tests/fuzz define this). */
#if defined(FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION)
#  define STATE_VERIFY_CHECKSUMS 0
#else
#  define STATE_VERIFY_CHECKSUMS 1
#endif
#define STATE_MAX_TOKENS ((uint64_t)INT32_MAX)

static kvrt_status state_available(const char *fn)
{
#if !defined(KVRT_HAVE_XXHASH)
    return kvrt_set_error(KVRT_ERR_UNSUPPORTED,
                          "%s: this kvrt was built without the xxHash library (state files need "
                          "its checksums)", fn);
#else
    if (!STATE_HOST_LE)
        return kvrt_set_error(KVRT_ERR_UNSUPPORTED,
                              "%s: state files are little-endian; big-endian hosts are not supported",
                              fn);
    return KVRT_OK;
#endif
}

static uint64_t checksum(const void *data, size_t n)
{
#if defined(KVRT_HAVE_XXHASH)
    return (uint64_t)XXH3_64bits(data, n);
#else
    (void)data;
    (void)n;
    return 0;
#endif
}

/* ---- little-endian fields ---- */

static uint32_t get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get_u64(const uint8_t *p) { return (uint64_t)get_u32(p) | (uint64_t)get_u32(p + 4) << 32; }

static int32_t get_i32(const uint8_t *p) { return (int32_t)get_u32(p); }

static float get_f32(const uint8_t *p)
{
    uint32_t u = get_u32(p);
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static void put_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static void put_u64(uint8_t *p, uint64_t v)
{
    put_u32(p, (uint32_t)v);
    put_u32(p + 4, (uint32_t)(v >> 32));
}

static void put_f32(uint8_t *p, float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    put_u32(p, u);
}

static uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

const char *kvrt_state_tag_name(uint32_t tag)
{
    switch (tag) {
    case KVRT_STATE_TAG_HEAD: return "HEAD";
    case KVRT_STATE_TAG_SEQ: return "SEQ";
    case KVRT_STATE_TAG_ROWS: return "ROWS";
    case KVRT_STATE_TAG_END: return "END";
    }
    return "????";
}

#define kind_name(k) kvrt_layer_kind_name((int)(k))

/* ---- groups, as the cache forms them (cache.c: same_group) ---- */

/* Fills group[] for n layers: same kind (ATTN or MLA) and window share a
 * group, each CROSS layer is its own; numbered by first layer. Returns the
 * number of groups. */
static uint32_t derive_groups(const kvrt_layer_desc *layers, uint32_t n, uint32_t *group)
{
    uint32_t n_groups = 0;
    for (uint32_t i = 0; i < n; i++) {
        group[i] = UINT32_MAX;
        for (uint32_t j = 0; j < i; j++)
            if (kvrt_layers_share_group(&layers[j], &layers[i])) {
                group[i] = group[j];
                break;
            }
        if (group[i] == UINT32_MAX)
            group[i] = n_groups++;
    }
    return n_groups;
}

/* ---- sizes ---- */

static uint64_t section_bytes(uint64_t payload)
{
    return KVRT_STATE_FRAME_BYTES + payload + KVRT_STATE_CHECKSUM_BYTES;
}


/* Rows of seq in group j: live tokens (self) or cross rows. */
static int64_t group_rows(const kvrt_group *g, int32_t seq)
{
    const kvrt_seq_pages *sp = &g->seqs[seq];
    return kvrt_group_is_self(g) ? sp->n_live : sp->n_slots;
}

static uint64_t seq_payload_bytes(const kvrt_cache *cache, int32_t seq)
{
    uint64_t n = KVRT_STATE_SEQ_FIXED;
    for (int j = 0; j < cache->n_groups; j++) {
        const kvrt_group *g = &cache->groups[j];
        n += KVRT_STATE_GROUP_RECORD;
        if (kvrt_group_is_self(g))
            n += 4 * (uint64_t)group_rows(g, seq);
    }
    return n;
}

/* The format version a cache's state is written in: 2 only when a layer has
 * a RoPE base of its own, so that every other state stays version 1. */
static uint32_t state_version_of(const kvrt_cache *cache)
{
    for (int l = 0; l < cache->desc.n_layers; l++)
        if (cache->layers[l].rope_theta != 0.0f)
            return 2;
    return 1;
}

static uint64_t layer_record_bytes(uint32_t version)
{
    return version >= 2 ? KVRT_STATE_LAYER_RECORD_V2 : KVRT_STATE_LAYER_RECORD;
}

static uint64_t rows_payload_bytes(const kvrt_cache *cache, int layer, int32_t seq)
{
    const kvrt_group *g = &cache->groups[cache->layer_group[layer]];
    return KVRT_STATE_ROWS_FIXED +
           (uint64_t)group_rows(g, seq) * kvrt_layer_row_bytes(&cache->layers[layer], cache->desc.dtype);
}

static uint64_t seq_state_bytes(const kvrt_cache *cache, int32_t seq)
{
    uint64_t n = section_bytes(seq_payload_bytes(cache, seq));
    for (int l = 0; l < cache->desc.n_layers; l++)
        n += section_bytes(rows_payload_bytes(cache, l, seq));
    return n;
}

static kvrt_status do_state_size(const kvrt_cache *cache, int32_t seq, uint64_t *bytes)
{
    KVRT_TRY(kvrt_check_cache(cache, "kvrt_state_size"));
    cache = KVRT_CORE(cache); /* a shared handle's state is its base's */
    KVRT_CHECK(bytes != NULL, KVRT_ERR_INVALID_ARG, "kvrt_state_size: bytes is NULL");
    if (seq >= 0)
        KVRT_TRY(kvrt_check_seq(cache, seq, "kvrt_state_size"));
    KVRT_TRY(state_available("kvrt_state_size"));
    uint64_t n = KVRT_STATE_MAGIC_BYTES +
                 section_bytes(KVRT_STATE_HEAD_FIXED +
                               layer_record_bytes(state_version_of(cache)) * (uint64_t)cache->desc.n_layers) +
                 section_bytes(KVRT_STATE_END_PAYLOAD);
    if (seq >= 0)
        n += seq_state_bytes(cache, seq);
    else
        for (int32_t s = 0; s < cache->desc.max_seqs; s++)
            if (!kvrt_seq_is_empty(cache, s))
                n += seq_state_bytes(cache, s);
    *bytes = n;
    return KVRT_OK;
}

/* ------------------------------------------------------------------------ */
/* Writing                                                                   */
/* ------------------------------------------------------------------------ */

#if defined(KVRT_HAVE_XXHASH)

typedef struct out_stream {
    kvrt_state_writer writer;
    void             *user;
    uint64_t          bytes;      /* written so far */
    uint64_t          left;       /* payload bytes the open section still expects */
    XXH3_state_t     *xxh;
} out_stream;

static kvrt_status out_raw(out_stream *o, const void *data, size_t n)
{
    if (n == 0)
        return KVRT_OK;
    kvrt_clear_error();
    kvrt_callback_begin();
    kvrt_status st = o->writer(o->user, data, n);
    kvrt_callback_end();
    if (st != KVRT_OK) {
        if (kvrt_last_error()[0] == '\0')
            kvrt_set_error(st, "kvrt_state_write: the writer failed at byte %llu (%s)",
                           (unsigned long long)o->bytes, kvrt_status_name(st));
        return st;
    }
    o->bytes += n;
    return KVRT_OK;
}

static kvrt_status section_begin(out_stream *o, uint32_t tag, uint64_t payload)
{
    uint8_t frame[KVRT_STATE_FRAME_BYTES];
    put_u32(frame, tag);
    put_u32(frame + 4, 0);
    put_u64(frame + 8, payload);
    XXH3_64bits_reset(o->xxh);
    XXH3_64bits_update(o->xxh, frame, sizeof frame);
    o->left = payload;
    return out_raw(o, frame, sizeof frame);
}

static kvrt_status section_put(out_stream *o, const void *data, size_t n)
{
    KVRT_CHECK(n <= o->left, KVRT_ERR_INTERNAL, "kvrt_state_write: section overflows its size");
    o->left -= n;
    XXH3_64bits_update(o->xxh, data, n);
    return out_raw(o, data, n);
}

static kvrt_status section_end(out_stream *o)
{
    KVRT_CHECK(o->left == 0, KVRT_ERR_INTERNAL,
               "kvrt_state_write: section short of its size by %llu bytes",
               (unsigned long long)o->left);
    uint8_t sum[KVRT_STATE_CHECKSUM_BYTES];
    put_u64(sum, (uint64_t)XXH3_64bits_digest(o->xxh));
    return out_raw(o, sum, sizeof sum);
}

/* One group's rows of a sequence, in position order. */
typedef struct group_rows_list {
    int32_t *pos;
    int32_t *slots;
    int64_t  n;
} group_rows_list;

typedef struct pos_slot {
    int32_t pos, slot;
} pos_slot;

static int cmp_pos_slot(const void *a, const void *b)
{
    int32_t x = ((const pos_slot *)a)->pos, y = ((const pos_slot *)b)->pos;
    return (x > y) - (x < y);
}

/* Live slots of seq in group g by position (cross rows: 0..n-1). */
static kvrt_status collect_rows(const kvrt_group *g, int32_t seq, group_rows_list *out)
{
    const kvrt_seq_pages *sp = &g->seqs[seq];
    int64_t n = group_rows(g, seq);
    out->n = n;
    out->pos = malloc((size_t)(n > 0 ? n : 1) * sizeof(int32_t));
    out->slots = malloc((size_t)(n > 0 ? n : 1) * sizeof(int32_t));
    pos_slot *tmp = malloc((size_t)(n > 0 ? n : 1) * sizeof(pos_slot));
    if (out->pos == NULL || out->slots == NULL || tmp == NULL) {
        free(tmp);
        return kvrt_set_error(KVRT_ERR_OUT_OF_MEMORY, "kvrt_state_write: host lists of %lld rows",
                              (long long)n);
    }
    int64_t m = 0;
    int sorted = 1;
    for (int64_t i = 0; i < sp->n_slots && m < n; i++) {
        int32_t slot = (int32_t)kvrt_seq_slot(g, sp, i);
        int32_t p = g->pos != NULL ? g->pos[slot] : (int32_t)i;
        if (p < 0)
            continue;
        if (m > 0 && p < tmp[m - 1].pos)
            sorted = 0;
        tmp[m].pos = p;
        tmp[m].slot = slot;
        m++;
    }
    if (m != n) {
        free(tmp);
        return kvrt_set_error(KVRT_ERR_INTERNAL,
                              "kvrt_state_write: sequence %d holds %lld live slots, %lld recorded",
                              (int)seq, (long long)m, (long long)n);
    }
    if (!sorted)
        qsort(tmp, (size_t)n, sizeof(pos_slot), cmp_pos_slot);
    for (int64_t i = 0; i < n; i++) {
        out->pos[i] = tmp[i].pos;
        out->slots[i] = tmp[i].slot;
    }
    free(tmp);
    return KVRT_OK;
}

static kvrt_status write_head(out_stream *o, const kvrt_cache *cache, uint32_t n_seqs)
{
    const kvrt_cache_desc *d = &cache->desc;
    uint32_t version = state_version_of(cache);
    size_t record = (size_t)layer_record_bytes(version);
    size_t size = KVRT_STATE_HEAD_FIXED + record * (size_t)d->n_layers;
    uint8_t *p = calloc(1, size);
    KVRT_CHECK(p != NULL, KVRT_ERR_OUT_OF_MEMORY, "kvrt_state_write: header of %zu bytes", size);
    put_u32(p + 0, version);
    put_u32(p + 4, (uint32_t)d->dtype);
    put_u32(p + 8, (uint32_t)d->n_layers);
    put_u32(p + 12, (uint32_t)cache->n_groups);
    put_u32(p + 16, n_seqs);
    put_u32(p + 20, (uint32_t)d->block_size);
    put_u32(p + 24, (uint32_t)d->cross_max_len);
    put_u32(p + 28, (uint32_t)d->swa_full);
    put_u32(p + 32, (uint32_t)d->rope.n_rot);
    put_f32(p + 36, d->rope.theta);
    put_f32(p + 40, d->rope.freq_scale);
    put_u32(p + 44, (uint32_t)d->rope.style);
    put_u32(p + 48, kvrt_dtype_is_quantized(d->dtype) ? KVRT_STATE_SCALES_ROW_F32 : 0);
    put_u32(p + 52, (uint32_t)d->rope.mode);
    for (int l = 0; l < d->n_layers; l++) {
        const kvrt_layer_desc *ld = &cache->layers[l];
        uint8_t *r = p + KVRT_STATE_HEAD_FIXED + record * (size_t)l;
        put_u32(r + 0, (uint32_t)ld->kind);
        put_u32(r + 4, (uint32_t)ld->n_kv_heads);
        put_u32(r + 8, (uint32_t)ld->head_dim_k);
        put_u32(r + 12, (uint32_t)ld->head_dim_v);
        put_u32(r + 16, (uint32_t)ld->window);
        put_u32(r + 20, (uint32_t)ld->latent_dim);
        put_u32(r + 24, (uint32_t)ld->rope_dim);
        put_u32(r + 28, (uint32_t)cache->layer_group[l]);
        put_u32(r + 32, (uint32_t)(kvrt_layer_row_bytes(ld, d->dtype) -
                                   kvrt_layer_scale_bytes(ld, d->dtype)));
        put_u32(r + 36, (uint32_t)kvrt_layer_scale_bytes(ld, d->dtype));
        if (version >= 2)
            put_f32(r + 40, ld->rope_theta);
    }
    kvrt_status st = section_begin(o, KVRT_STATE_TAG_HEAD, size);
    if (st == KVRT_OK)
        st = section_put(o, p, size);
    if (st == KVRT_OK)
        st = section_end(o);
    free(p);
    return st;
}

static kvrt_status write_seq(out_stream *o, const kvrt_cache *cache, int32_t seq,
                             const group_rows_list *lists, uint8_t *buf, size_t buf_bytes)
{
    KVRT_TRY(section_begin(o, KVRT_STATE_TAG_SEQ, seq_payload_bytes(cache, seq)));
    uint8_t head[KVRT_STATE_SEQ_FIXED];
    put_u32(head, (uint32_t)seq);
    put_u32(head + 4, (uint32_t)cache->n_groups);
    KVRT_TRY(section_put(o, head, sizeof head));
    for (int j = 0; j < cache->n_groups; j++) {
        const kvrt_group *g = &cache->groups[j];
        const kvrt_seq_pages *sp = &g->seqs[seq];
        uint8_t rec[KVRT_STATE_GROUP_RECORD];
        put_u64(rec, (uint64_t)lists[j].n);
        put_u32(rec + 8, (uint32_t)(kvrt_group_is_self(g) ? sp->evicted_min : -1));
        put_u32(rec + 12, (uint32_t)(kvrt_group_is_self(g) ? sp->evicted_max : -1));
        KVRT_TRY(section_put(o, rec, sizeof rec));
        if (!kvrt_group_is_self(g))
            continue;
        size_t per = buf_bytes / 4;
        for (int64_t i = 0; i < lists[j].n;) {
            int64_t m = lists[j].n - i < (int64_t)per ? lists[j].n - i : (int64_t)per;
            for (int64_t k = 0; k < m; k++)
                put_u32(buf + 4 * k, (uint32_t)lists[j].pos[i + k]);
            KVRT_TRY(section_put(o, buf, (size_t)m * 4));
            i += m;
        }
    }
    return section_end(o);
}

/* The parts of a layer's rows, in file order. */
enum { PART_K, PART_V, PART_K_SCALES, PART_V_SCALES, N_PARTS };

/* Streams one part of a layer's rows: gathered in chunks on the device,
 * copied to host memory, checksummed and written. */
static kvrt_status write_part(out_stream *o, kvrt_cache *cache, const kvrt_layer_ref *ref,
                              const group_rows_list *rows, int part, uint8_t *buf,
                              size_t buf_bytes, void *scratch)
{
    kvrt_backend_t *be = &cache->be;
    const kvrt_layout *L = &ref->layout;
    size_t row = part == PART_K ? (size_t)L->n_heads * (size_t)L->dim_k * (size_t)L->elem_size
               : part == PART_V ? (size_t)L->n_heads * (size_t)L->dim_v * (size_t)L->elem_size
               : part == PART_K_SCALES ? (ref->k_scale != NULL ? (size_t)L->n_heads * sizeof(float) : 0)
                                       : (ref->v_scale != NULL ? (size_t)L->n_heads * sizeof(float) : 0);
    if (row == 0 || rows->n == 0)
        return KVRT_OK;
    int64_t per = (int64_t)(buf_bytes / row);
    for (int64_t i = 0; i < rows->n;) {
        int64_t m = rows->n - i < per ? rows->n - i : per;
        kvrt_gather_op op;
        memset(&op, 0, sizeof op);
        op.layer = *ref;
        op.n = (int32_t)m;
        const void *d_slots;
        be->ops->stage_reset(be, cache->stream);
        KVRT_TRY(be->ops->stage(be, rows->slots + i, (size_t)m * sizeof(int32_t), cache->stream,
                                &d_slots));
        op.slots = d_slots;
        void *dst = scratch != NULL ? scratch : buf;
        if (part == PART_V)
            op.v_dst = dst;
        else if (part == PART_K)
            op.k_dst = dst;
        else if (part == PART_K_SCALES)
            op.k_scale_dst = dst;
        else
            op.v_scale_dst = dst;
        KVRT_TRY(be->ops->gather(be, &op, cache->stream));
        if (scratch != NULL) /* returns when the rows are in buf */
            KVRT_TRY(be->ops->download(be, buf, scratch, (size_t)m * row, cache->stream));
        KVRT_TRY(section_put(o, buf, (size_t)m * row));
        i += m;
    }
    return KVRT_OK;
}

static kvrt_status write_rows(out_stream *o, kvrt_cache *cache, int layer, const group_rows_list *rows,
                              uint8_t *buf, size_t buf_bytes, void *scratch)
{
    const kvrt_group *g = &cache->groups[cache->layer_group[layer]];
    const kvrt_layer_ref *ref = &g->refs[0];
    for (int i = 0; i < g->n_layers; i++)
        if (g->layers[i] == layer)
            ref = &g->refs[i];
    uint32_t row_bytes = (uint32_t)kvrt_layer_row_bytes(&cache->layers[layer], cache->desc.dtype);
    uint32_t scale_bytes = (uint32_t)kvrt_layer_scale_bytes(&cache->layers[layer], cache->desc.dtype);
    KVRT_TRY(section_begin(o, KVRT_STATE_TAG_ROWS,
                           KVRT_STATE_ROWS_FIXED + (uint64_t)rows->n * row_bytes));
    uint8_t head[KVRT_STATE_ROWS_FIXED];
    put_u32(head, (uint32_t)layer);
    put_u32(head + 4, 0);
    put_u64(head + 8, (uint64_t)rows->n);
    put_u32(head + 16, row_bytes - scale_bytes);
    put_u32(head + 20, scale_bytes);
    KVRT_TRY(section_put(o, head, sizeof head));
    /* K, V, then (quantized dtypes) the scales of K and of V */
    for (int part = 0; part < N_PARTS; part++)
        KVRT_TRY(write_part(o, cache, ref, rows, part, buf, buf_bytes, scratch));
    return section_end(o);
}

static void free_lists(group_rows_list *lists, int n)
{
    if (lists == NULL)
        return;
    for (int j = 0; j < n; j++) {
        free(lists[j].pos);
        free(lists[j].slots);
    }
    free(lists);
}

static kvrt_status write_state(out_stream *o, kvrt_cache *cache, int32_t seq, uint8_t *buf,
                               size_t buf_bytes, void *scratch)
{
    uint32_t n_seqs = 0;
    if (seq >= 0)
        n_seqs = 1;
    else
        for (int32_t s = 0; s < cache->desc.max_seqs; s++)
            n_seqs += (uint32_t)!kvrt_seq_is_empty(cache, s);
    KVRT_TRY(out_raw(o, KVRT_STATE_MAGIC, KVRT_STATE_MAGIC_BYTES));
    KVRT_TRY(write_head(o, cache, n_seqs));
    int32_t s0 = seq >= 0 ? seq : 0, s1 = seq >= 0 ? seq + 1 : cache->desc.max_seqs;
    for (int32_t s = s0; s < s1; s++) {
        if (seq < 0 && kvrt_seq_is_empty(cache, s))
            continue;
        group_rows_list *lists = calloc((size_t)cache->n_groups, sizeof *lists);
        KVRT_CHECK(lists != NULL, KVRT_ERR_OUT_OF_MEMORY, "kvrt_state_write: host lists");
        kvrt_status st = KVRT_OK;
        for (int j = 0; j < cache->n_groups && st == KVRT_OK; j++)
            st = collect_rows(&cache->groups[j], s, &lists[j]);
        if (st == KVRT_OK)
            st = write_seq(o, cache, s, lists, buf, buf_bytes);
        for (int l = 0; l < cache->desc.n_layers && st == KVRT_OK; l++)
            st = write_rows(o, cache, l, &lists[cache->layer_group[l]], buf, buf_bytes, scratch);
        free_lists(lists, cache->n_groups);
        KVRT_TRY(st);
    }
    KVRT_TRY(section_begin(o, KVRT_STATE_TAG_END, KVRT_STATE_END_PAYLOAD));
    uint8_t end[KVRT_STATE_END_PAYLOAD];
    put_u64(end, o->bytes + KVRT_STATE_END_PAYLOAD + KVRT_STATE_CHECKSUM_BYTES);
    KVRT_TRY(section_put(o, end, sizeof end));
    return section_end(o);
}

#endif /* KVRT_HAVE_XXHASH */

static kvrt_status do_state_write(kvrt_cache *cache, int32_t seq, kvrt_state_writer writer, void *user)
{
    KVRT_TRY(kvrt_check_cache(cache, "kvrt_state_write"));
    cache = KVRT_CORE(cache);
    KVRT_CHECK(writer != NULL, KVRT_ERR_INVALID_ARG, "kvrt_state_write: writer is NULL");
    if (seq >= 0)
        KVRT_TRY(kvrt_check_seq(cache, seq, "kvrt_state_write"));
    KVRT_TRY(state_available("kvrt_state_write"));
#if defined(KVRT_HAVE_XXHASH)
    kvrt_backend_t *be = &cache->be;
    KVRT_TRY(be->ops->sync(be, cache->stream));
    /* the host buffer holds a chunk of rows (no more than the whole state,
     * at least one row of any layer) */
    uint64_t total = 0;
    KVRT_TRY(kvrt_state_size(cache, seq, &total));
    size_t chunk = cache->desc.device.backend == KVRT_BACKEND_CPU ? STATE_CHUNK_CPU : STATE_CHUNK_GPU;
    size_t buf_bytes = total < chunk ? (size_t)total : chunk;
    for (int l = 0; l < cache->desc.n_layers; l++) {
        size_t r = kvrt_layer_row_bytes(&cache->layers[l], cache->desc.dtype);
        if (r > buf_bytes)
            buf_bytes = r;
    }
    out_stream o;
    memset(&o, 0, sizeof o);
    o.writer = writer;
    o.user = user;
    o.xxh = XXH3_createState();
    /* On a GPU backend this buffer would best be pinned host memory (a
     * backend entry for pinned allocations would make downloads direct). */
    uint8_t *buf = malloc(buf_bytes);
    void *scratch = NULL;
    kvrt_status st = KVRT_OK;
    if (o.xxh == NULL || buf == NULL)
        st = kvrt_set_error(KVRT_ERR_OUT_OF_MEMORY, "kvrt_state_write: host buffer of %zu bytes",
                            buf_bytes);
    /* rows go device -> device scratch -> host on GPUs; straight to host on the CPU */
    if (st == KVRT_OK && cache->desc.device.backend != KVRT_BACKEND_CPU)
        st = be->ops->scratch_alloc(be, buf_bytes, &scratch);
    if (st == KVRT_OK)
        st = write_state(&o, cache, seq, buf, buf_bytes, scratch);
    if (scratch != NULL) {
        (void)be->ops->sync(be, cache->stream);
        be->ops->scratch_free(be, scratch);
    }
    free(buf);
    XXH3_freeState(o.xxh);
    return st;
#else
    (void)user;
    return KVRT_ERR_UNSUPPORTED;
#endif
}

/* ------------------------------------------------------------------------ */
/* Parsing                                                                   */
/* ------------------------------------------------------------------------ */

enum { EXPECT_HEAD, EXPECT_SEQ_OR_END, EXPECT_ROWS, EXPECT_DONE };

static const char *expect_name(int expect)
{
    switch (expect) {
    case EXPECT_HEAD: return "HEAD";
    case EXPECT_SEQ_OR_END: return "SEQ or END";
    case EXPECT_ROWS: return "ROWS";
    }
    return "nothing";
}

#define CORRUPT(...) kvrt_set_error(KVRT_ERR_CORRUPT, __VA_ARGS__)
#define CORRUPT_IF(cond, ...)                                                                \
    do {                                                                                     \
        if (cond)                                                                            \
            return CORRUPT(__VA_ARGS__);                                                     \
    } while (0)

void kvrt_state_view_free(kvrt_state_view *v)
{
    if (v == NULL)
        return;
    free(v->header.layers);
    free(v->header.group_self);
    free(v->header.group_first);
    for (int64_t i = 0; i < v->n_seqs; i++) {
        kvrt_state_seq *s = &v->seqs[i];
        free(s->n_tokens);
        free(s->evicted_min);
        free(s->evicted_max);
        free(s->pos_offset);
        free(s->rows_offset);
    }
    free(v->seqs);
    free(v->sections);
    memset(v, 0, sizeof *v);
}

static void view_init(kvrt_state_view *v)
{
    memset(v, 0, sizeof *v);
    v->expect = EXPECT_HEAD;
}

/* The layer group of the ROWS section expected next. */
static uint32_t next_rows_group(const kvrt_state_view *v)
{
    return v->header.layers[v->next_layer].group;
}

/* Checks a frame (its first 16 bytes, at `offset`) before its payload is
 * read, and returns the payload size: the expected section in order, flags
 * 0, and a size that the counts verified so far allow (exactly, where they
 * determine it). */
static kvrt_status frame_check(const kvrt_state_view *v, const uint8_t *frame, uint64_t offset,
                               uint64_t *payload)
{
    uint32_t tag = get_u32(frame), flags = get_u32(frame + 4);
    uint64_t size = get_u64(frame + 8);
    const kvrt_state_header *h = &v->header;
    const char *name = kvrt_state_tag_name(tag);
    switch (v->expect) {
    case EXPECT_HEAD:
        CORRUPT_IF(tag != KVRT_STATE_TAG_HEAD, "state: section at byte %llu is %s (tag 0x%08x), "
                   "expected HEAD", (unsigned long long)offset, name, (unsigned)tag);
        /* the record size depends on the version: parse_head checks it exactly */
        CORRUPT_IF(size < KVRT_STATE_HEAD_FIXED + KVRT_STATE_LAYER_RECORD ||
                       size > KVRT_STATE_HEAD_FIXED + KVRT_STATE_LAYER_RECORD_V2 * (uint64_t)STATE_MAX_LAYERS,
                   "state: HEAD at byte %llu: size %llu is not a header of 1..%u layers",
                   (unsigned long long)offset, (unsigned long long)size, STATE_MAX_LAYERS);
        break;
    case EXPECT_SEQ_OR_END:
        if (tag == KVRT_STATE_TAG_END) {
            CORRUPT_IF(size != KVRT_STATE_END_PAYLOAD, "state: END at byte %llu: size %llu, expected %u",
                       (unsigned long long)offset, (unsigned long long)size, KVRT_STATE_END_PAYLOAD);
            CORRUPT_IF((uint64_t)v->n_seqs != h->n_seqs,
                       "state: END at byte %llu after %lld sequences; the header announces %u",
                       (unsigned long long)offset, (long long)v->n_seqs, h->n_seqs);
            break;
        }
        CORRUPT_IF(tag != KVRT_STATE_TAG_SEQ, "state: section at byte %llu is %s (tag 0x%08x), "
                   "expected SEQ or END", (unsigned long long)offset, name, (unsigned)tag);
        CORRUPT_IF((uint64_t)v->n_seqs >= h->n_seqs,
                   "state: SEQ at byte %llu: more sequences than the header's %u",
                   (unsigned long long)offset, h->n_seqs);
        CORRUPT_IF(size < KVRT_STATE_SEQ_FIXED + KVRT_STATE_GROUP_RECORD * (uint64_t)h->n_groups ||
                       size > KVRT_STATE_SEQ_FIXED +
                                  (KVRT_STATE_GROUP_RECORD + 4 * STATE_MAX_TOKENS) * (uint64_t)h->n_groups,
                   "state: SEQ at byte %llu: size %llu does not fit %u groups",
                   (unsigned long long)offset, (unsigned long long)size, h->n_groups);
        break;
    case EXPECT_ROWS: {
        CORRUPT_IF(tag != KVRT_STATE_TAG_ROWS, "state: section at byte %llu is %s (tag 0x%08x), "
                   "expected ROWS of layer %u", (unsigned long long)offset, name, (unsigned)tag,
                   v->next_layer);
        const kvrt_state_seq *s = &v->seqs[v->n_seqs - 1];
        const kvrt_state_layer *l = &h->layers[v->next_layer];
        uint64_t want = KVRT_STATE_ROWS_FIXED +
                        (uint64_t)s->n_tokens[next_rows_group(v)] * (l->row_bytes + l->scale_bytes);
        CORRUPT_IF(size != want,
                   "state: ROWS of sequence %d layer %u at byte %llu: size %llu, expected %llu",
                   (int)s->seq, v->next_layer, (unsigned long long)offset,
                   (unsigned long long)size, (unsigned long long)want);
        break;
    }
    default:
        return CORRUPT("state: section at byte %llu after END", (unsigned long long)offset);
    }
    CORRUPT_IF(flags != 0, "state: %s at byte %llu: flags 0x%08x (version 1 writes 0)", name,
               (unsigned long long)offset, (unsigned)flags);
    *payload = size;
    return KVRT_OK;
}

/* ---- HEAD ---- */

#define INCOMPATIBLE(...) kvrt_set_error(KVRT_ERR_INCOMPATIBLE, __VA_ARGS__)

static const char *dtype_label(uint32_t dtype, char *buf, size_t n)
{
    if (dtype <= KVRT_FP8_E4M3)
        return kvrt_dtype_name((kvrt_dtype)dtype);
    snprintf(buf, n, "%u", (unsigned)dtype);
    return buf;
}

/* The header fields against the cache, in the documented order. */
static kvrt_status check_compatible(const kvrt_cache *cache, const uint8_t *p)
{
    const kvrt_cache_desc *d = &cache->desc;
    uint32_t dtype = get_u32(p + 4), n_layers = get_u32(p + 8);
    uint64_t record = layer_record_bytes(get_u32(p));
    char a[16], b[16];
    /* one dtype serves every layer: the first layer is the one named */
    if (dtype != (uint32_t)d->dtype)
        return INCOMPATIBLE("layer 0: dtype %s in file, %s in cache (the dtype of every layer)",
                            dtype_label(dtype, a, sizeof a),
                            dtype_label((uint32_t)d->dtype, b, sizeof b));
    if (n_layers != (uint32_t)d->n_layers)
        return INCOMPATIBLE("n_layers %u in file, %d in cache", (unsigned)n_layers, d->n_layers);
    static const char *const field[] = {"n_kv_heads", "head_dim_k", "head_dim_v", "window",
                                        "latent_dim", "rope_dim"};
    for (uint32_t l = 0; l < n_layers; l++) {
        const uint8_t *r = p + KVRT_STATE_HEAD_FIXED + (size_t)record * l;
        const kvrt_layer_desc *ld = &cache->layers[l];
        uint32_t kind = get_u32(r);
        if (kind != (uint32_t)ld->kind) {
            if (kind <= KVRT_LAYER_CROSS)
                return INCOMPATIBLE("layer %u: kind %s in file, %s in cache", (unsigned)l,
                                    kind_name(kind), kind_name((uint32_t)ld->kind));
            return INCOMPATIBLE("layer %u: kind %u in file, %s in cache", (unsigned)l,
                                (unsigned)kind, kind_name((uint32_t)ld->kind));
        }
        const int cache_value[] = {ld->n_kv_heads, ld->head_dim_k, ld->head_dim_v,
                                   ld->window,     ld->latent_dim, ld->rope_dim};
        for (int f = 0; f < 6; f++) {
            int32_t v = get_i32(r + 4 + 4 * f);
            if (v != cache_value[f])
                return INCOMPATIBLE("layer %u: %s %d in file, %d in cache", (unsigned)l, field[f],
                                    (int)v, cache_value[f]);
        }
        float theta = record >= KVRT_STATE_LAYER_RECORD_V2 ? get_f32(r + 40) : 0.0f;
        if (!(theta == ld->rope_theta)) /* values: a file's -0 is the cache's 0 */
            return INCOMPATIBLE("layer %u: rope_theta %.9g in file, %.9g in cache", (unsigned)l,
                                (double)theta, (double)ld->rope_theta);
    }
    int32_t n_rot = get_i32(p + 32);
    if (n_rot != d->rope.n_rot)
        return INCOMPATIBLE("rope.n_rot %d in file, %d in cache", (int)n_rot, d->rope.n_rot);
    if (get_u32(p + 36) != f32_bits(d->rope.theta))
        return INCOMPATIBLE("rope.theta %.9g in file, %.9g in cache", (double)get_f32(p + 36),
                            (double)d->rope.theta);
    if (get_u32(p + 40) != f32_bits(d->rope.freq_scale))
        return INCOMPATIBLE("rope.freq_scale %.9g in file, %.9g in cache", (double)get_f32(p + 40),
                            (double)d->rope.freq_scale);
    uint32_t style = get_u32(p + 44);
    if (style != (uint32_t)d->rope.style)
        return INCOMPATIBLE("rope.style %s in file, %s in cache",
                            style == KVRT_ROPE_NORMAL ? "normal" : style == KVRT_ROPE_NEOX ? "neox" : "?",
                            d->rope.style == KVRT_ROPE_NORMAL ? "normal" : "neox");
    uint32_t mode = get_u32(p + 52);
    if (mode != (uint32_t)d->rope.mode)
        return INCOMPATIBLE("rope.mode %s in file, %s in cache",
                            mode == KVRT_ROPE_STORED_ROTATED ? "stored-rotated"
                            : mode == KVRT_ROPE_IN_ATTENTION ? "in-attention" : "?",
                            d->rope.mode == KVRT_ROPE_STORED_ROTATED ? "stored-rotated" : "in-attention");
    uint32_t scales = get_u32(p + 48);
    uint32_t want = kvrt_dtype_is_quantized(d->dtype) ? KVRT_STATE_SCALES_ROW_F32 : 0;
    if (scales != want)
        return INCOMPATIBLE("scales_format %u in file (%s rows), %u in cache", (unsigned)scales,
                            scales == 0 ? "unquantized" : "quantized", (unsigned)want);
    return KVRT_OK;
}

/* A layer description as kvrt could have written it. */
static int layer_valid(const kvrt_layer_desc *l)
{
    switch (l->kind) {
    case KVRT_LAYER_ATTN:
    case KVRT_LAYER_CROSS:
        return l->n_kv_heads >= 1 && l->n_kv_heads <= 1024 && l->head_dim_k >= 1 &&
               l->head_dim_k <= 1024 && l->head_dim_v >= 1 && l->head_dim_v <= 1024 &&
               l->window >= 0 && (l->kind == KVRT_LAYER_ATTN || l->window == 0) &&
               l->latent_dim == 0 && l->rope_dim == 0;
    case KVRT_LAYER_MLA:
        return l->n_kv_heads == 0 && l->head_dim_k == 0 && l->head_dim_v == 0 && l->window == 0 &&
               l->latent_dim >= 1 && l->latent_dim <= 1024 && l->rope_dim >= 0 && l->rope_dim <= 1024;
    }
    return 0;
}

static kvrt_status parse_head(kvrt_state_view *v, const uint8_t *p, uint64_t size, uint64_t offset,
                              const kvrt_cache *cache)
{
    kvrt_state_header *h = &v->header;
    uint32_t version = get_u32(p);
    if (version < 1 || version > KVRT_STATE_VERSION)
        return INCOMPATIBLE("format_version %u in file; this kvrt reads versions 1 to %u",
                            (unsigned)version, KVRT_STATE_VERSION);
    uint64_t record = layer_record_bytes(version);
    uint32_t n_layers = get_u32(p + 8);
    CORRUPT_IF(size != KVRT_STATE_HEAD_FIXED + record * (uint64_t)n_layers,
               "state: HEAD at byte %llu: %u layers do not fill its %llu bytes",
               (unsigned long long)offset, (unsigned)n_layers, (unsigned long long)size);
    if (cache != NULL)
        KVRT_TRY(check_compatible(cache, p));
    h->version = version;
    h->dtype = get_u32(p + 4);
    if (h->dtype > KVRT_FP8_E4M3)
        return INCOMPATIBLE("dtype %u in file is unknown to this kvrt", (unsigned)h->dtype);
    h->scales_format = get_u32(p + 48);
    if (h->scales_format > KVRT_STATE_SCALES_ROW_F32)
        return INCOMPATIBLE("scales_format %u in file is unknown to this kvrt",
                            (unsigned)h->scales_format);
    CORRUPT_IF(h->scales_format != (kvrt_dtype_is_quantized((kvrt_dtype)h->dtype) ? 1u : 0u),
               "state: HEAD: scales_format %u does not go with dtype %s", (unsigned)h->scales_format,
               kvrt_dtype_name((kvrt_dtype)h->dtype));
    h->n_layers = n_layers;
    h->n_groups = get_u32(p + 12);
    h->n_seqs = get_u32(p + 16);
    h->block_size = get_u32(p + 20);
    h->cross_max_len = get_u32(p + 24);
    h->swa_full = get_u32(p + 28);
    h->rope.n_rot = get_i32(p + 32);
    h->rope.theta = get_f32(p + 36);
    h->rope.freq_scale = get_f32(p + 40);
    h->rope.style = (kvrt_rope_style)get_u32(p + 44);
    CORRUPT_IF(!(isfinite(h->rope.theta) && h->rope.theta > 0.0f &&
                 isfinite(h->rope.freq_scale) && h->rope.freq_scale > 0.0f),
               "state: HEAD: rope.theta %g / rope.freq_scale %g must be finite and > 0",
               (double)h->rope.theta, (double)h->rope.freq_scale);
    CORRUPT_IF(get_u32(p + 52) > KVRT_ROPE_IN_ATTENTION, "state: HEAD: rope.mode %u is not 0 or 1",
               (unsigned)get_u32(p + 52));
    h->rope.mode = (kvrt_rope_mode)get_u32(p + 52);
    h->layers = calloc(n_layers, sizeof *h->layers);
    kvrt_layer_desc *descs = calloc(n_layers, sizeof *descs);
    uint32_t *group = calloc(n_layers, sizeof *group);
    if (h->layers == NULL || descs == NULL || group == NULL) {
        free(descs);
        free(group);
        return kvrt_set_error(KVRT_ERR_OUT_OF_MEMORY, "state: header of %u layers", (unsigned)n_layers);
    }
    kvrt_status st = KVRT_OK;
    for (uint32_t l = 0; l < n_layers && st == KVRT_OK; l++) {
        const uint8_t *r = p + KVRT_STATE_HEAD_FIXED + (size_t)record * l;
        kvrt_layer_desc *ld = &descs[l];
        uint32_t kind = get_u32(r);
        ld->kind = kind <= KVRT_LAYER_CROSS ? (kvrt_layer_kind)kind : KVRT_LAYER_ATTN;
        ld->n_kv_heads = get_i32(r + 4);
        ld->head_dim_k = get_i32(r + 8);
        ld->head_dim_v = get_i32(r + 12);
        ld->window = get_i32(r + 16);
        ld->latent_dim = get_i32(r + 20);
        ld->rope_dim = get_i32(r + 24);
        ld->rope_theta = version >= 2 ? get_f32(r + 40) : 0.0f;
        if (kind > KVRT_LAYER_CROSS || !layer_valid(ld) || !isfinite(ld->rope_theta) ||
            ld->rope_theta < 0.0f || (kind == KVRT_LAYER_CROSS && ld->rope_theta != 0.0f))
            st = CORRUPT("state: HEAD: layer %u has an invalid description (kind %u)", (unsigned)l,
                         (unsigned)kind);
        h->layers[l].desc = *ld;
        h->layers[l].group = get_u32(r + 28);
        h->layers[l].row_bytes = get_u32(r + 32);
        h->layers[l].scale_bytes = get_u32(r + 36);
    }
    uint32_t n_groups = st == KVRT_OK ? derive_groups(descs, n_layers, group) : 0;
    for (uint32_t l = 0; l < n_layers && st == KVRT_OK; l++) {
        const kvrt_state_layer *sl = &h->layers[l];
        size_t scale = kvrt_layer_scale_bytes(&sl->desc, (kvrt_dtype)h->dtype);
        size_t row = kvrt_layer_row_bytes(&sl->desc, (kvrt_dtype)h->dtype) - scale;
        if (sl->group != group[l])
            st = CORRUPT("state: HEAD: layer %u is in group %u; its description puts it in group %u",
                         (unsigned)l, (unsigned)sl->group, (unsigned)group[l]);
        else if (sl->row_bytes != row)
            st = CORRUPT("state: HEAD: layer %u: row_bytes %u, its description gives %zu", (unsigned)l,
                         (unsigned)sl->row_bytes, row);
        else if (kvrt_layer_row_bytes(&sl->desc, (kvrt_dtype)h->dtype) == 0)
            st = CORRUPT("state: HEAD: layer %u (%s) cannot be stored in dtype %s", (unsigned)l,
                         kind_name((uint32_t)sl->desc.kind), kvrt_dtype_name((kvrt_dtype)h->dtype));
        else if (sl->scale_bytes != scale)
            st = CORRUPT("state: HEAD: layer %u: scale_bytes %u, its description and dtype give %zu",
                         (unsigned)l, (unsigned)sl->scale_bytes, scale);
    }
    free(descs);
    free(group);
    KVRT_TRY(st);
    CORRUPT_IF(h->n_groups != n_groups, "state: HEAD: n_groups %u, the layers form %u",
               (unsigned)h->n_groups, (unsigned)n_groups);
    h->group_self = calloc(n_groups, 1);
    h->group_first = calloc(n_groups, sizeof(uint32_t));
    KVRT_CHECK(h->group_self != NULL && h->group_first != NULL, KVRT_ERR_OUT_OF_MEMORY,
               "state: header of %u groups", (unsigned)n_groups);
    for (uint32_t l = n_layers; l-- > 0;) {
        h->group_self[h->layers[l].group] = h->layers[l].desc.kind != KVRT_LAYER_CROSS;
        h->group_first[h->layers[l].group] = l;
    }
    v->have_header = 1;
    v->expect = EXPECT_SEQ_OR_END;
    return KVRT_OK;
}

/* ---- SEQ, ROWS, END ---- */

/* Whether the sorted positions a[0..na) all occur in the sorted b[0..nb). */
static int positions_subset(const uint8_t *a, int64_t na, const uint8_t *b, int64_t nb)
{
    int64_t j = 0;
    for (int64_t i = 0; i < na; i++) {
        int32_t p = get_i32(a + 4 * i);
        while (j < nb && get_i32(b + 4 * j) < p)
            j++;
        if (j == nb || get_i32(b + 4 * j) != p)
            return 0;
    }
    return 1;
}

/* The groups of a sequence as a cache keeps them: every token is planned in
 * every self group and edits apply to all, so full-attention groups (window
 * 0) hold the same positions and nothing evicted, and a sliding-window
 * group holds a subset of them. A file that breaks this would let a later
 * plan duplicate a position. image is the view's image base (offsets). */
static kvrt_status check_group_positions(const kvrt_state_view *v, const kvrt_state_seq *s,
                                         const uint8_t *image)
{
    const kvrt_state_header *h = &v->header;
    int64_t full = -1;
    for (uint32_t j = 0; j < h->n_groups; j++) {
        if (!h->group_self[j])
            continue;
        int window = h->layers[h->group_first[j]].desc.window;
        if (window == 0) {
            CORRUPT_IF(s->evicted_max[j] != -1,
                       "state: sequence %d group %u: evicted positions in a full-attention group",
                       (int)s->seq, (unsigned)j);
            if (full < 0) {
                full = j;
                continue;
            }
            CORRUPT_IF(s->n_tokens[j] != s->n_tokens[full] ||
                           memcmp(image + s->pos_offset[j], image + s->pos_offset[full],
                                  4 * (size_t)s->n_tokens[j]) != 0,
                       "state: sequence %d: groups %u and %u (both full attention) hold different "
                       "positions", (int)s->seq, (unsigned)full, (unsigned)j);
        }
    }
    for (uint32_t j = 0; j < h->n_groups && full >= 0; j++)
        if (h->group_self[j] && h->layers[h->group_first[j]].desc.window > 0)
            CORRUPT_IF(!positions_subset(image + s->pos_offset[j], s->n_tokens[j],
                                         image + s->pos_offset[full], s->n_tokens[full]),
                       "state: sequence %d: sliding-window group %u holds a position that "
                       "full-attention group %u lacks", (int)s->seq, (unsigned)j, (unsigned)full);
    return KVRT_OK;
}

static kvrt_status parse_seq(kvrt_state_view *v, const uint8_t *p, uint64_t size, uint64_t offset)
{
    const kvrt_state_header *h = &v->header;
    int32_t seq = get_i32(p);
    CORRUPT_IF(seq < 0, "state: SEQ at byte %llu: sequence id %d is negative",
               (unsigned long long)offset, (int)seq);
    CORRUPT_IF(v->n_seqs > 0 && seq <= v->seqs[v->n_seqs - 1].seq,
               "state: SEQ at byte %llu: sequence %d after sequence %d (ids must increase)",
               (unsigned long long)offset, (int)seq, (int)v->seqs[v->n_seqs - 1].seq);
    CORRUPT_IF(get_u32(p + 4) != h->n_groups, "state: SEQ at byte %llu: %u groups, the header has %u",
               (unsigned long long)offset, (unsigned)get_u32(p + 4), (unsigned)h->n_groups);
    KVRT_TRY(kvrt_reserve((void **)&v->seqs, &v->seqs_cap, v->n_seqs + 1, sizeof(kvrt_state_seq)));
    kvrt_state_seq *s = &v->seqs[v->n_seqs];
    memset(s, 0, sizeof *s);
    s->seq = seq;
    uint32_t G = h->n_groups;
    s->n_tokens = calloc(G, sizeof(int64_t));
    s->evicted_min = calloc(G, sizeof(int32_t));
    s->evicted_max = calloc(G, sizeof(int32_t));
    s->pos_offset = calloc(G, sizeof(uint64_t));
    s->rows_offset = calloc(h->n_layers, sizeof(uint64_t));
    v->n_seqs++; /* owned by the view from here, freed with it */
    KVRT_CHECK(s->n_tokens && s->evicted_min && s->evicted_max && s->pos_offset && s->rows_offset,
               KVRT_ERR_OUT_OF_MEMORY, "state: sequence tables");
    uint64_t at = KVRT_STATE_SEQ_FIXED;
    uint64_t base = offset + KVRT_STATE_FRAME_BYTES;
    for (uint32_t j = 0; j < G; j++) {
        CORRUPT_IF(size - at < KVRT_STATE_GROUP_RECORD,
                   "state: SEQ of sequence %d at byte %llu ends inside group %u",
                   (int)seq, (unsigned long long)offset, (unsigned)j);
        uint64_t n = get_u64(p + at);
        int32_t emin = get_i32(p + at + 8), emax = get_i32(p + at + 12);
        at += KVRT_STATE_GROUP_RECORD;
        CORRUPT_IF(n > STATE_MAX_TOKENS, "state: sequence %d group %u: %llu tokens", (int)seq,
                   (unsigned)j, (unsigned long long)n);
        /* a cache keeps evicted_max below INT32_MAX (edits clamp it): at
         * INT32_MAX no later position could be planned after it */
        CORRUPT_IF(!((emin == -1 && emax == -1) || (emin >= 0 && emin <= emax && emax < INT32_MAX)) ||
                       (!h->group_self[j] && emax != -1),
                   "state: sequence %d group %u: evicted range [%d, %d] is invalid", (int)seq,
                   (unsigned)j, (int)emin, (int)emax);
        s->n_tokens[j] = (int64_t)n;
        s->evicted_min[j] = emin;
        s->evicted_max[j] = emax;
        if (!h->group_self[j])
            continue;
        CORRUPT_IF((size - at) / 4 < n,
                   "state: SEQ of sequence %d at byte %llu: group %u's %llu positions exceed the "
                   "section", (int)seq, (unsigned long long)offset, (unsigned)j, (unsigned long long)n);
        s->pos_offset[j] = base + at;
        int32_t prev = -1;
        for (uint64_t i = 0; i < n; i++) {
            int32_t pos = get_i32(p + at + 4 * i);
            CORRUPT_IF(pos <= prev || pos == INT32_MAX,
                       "state: sequence %d group %u: position %d after %d (positions must increase "
                       "within [0, 2^31 - 1))", (int)seq, (unsigned)j, (int)pos, (int)prev);
            prev = pos;
        }
        at += 4 * n;
    }
    CORRUPT_IF(at != size, "state: SEQ of sequence %d at byte %llu: %llu bytes left over",
               (int)seq, (unsigned long long)offset, (unsigned long long)(size - at));
    KVRT_TRY(check_group_positions(v, s, p - base));
    v->expect = EXPECT_ROWS;
    v->next_layer = 0;
    return KVRT_OK;
}

static kvrt_status parse_rows(kvrt_state_view *v, const uint8_t *p, uint64_t offset)
{
    const kvrt_state_header *h = &v->header;
    kvrt_state_seq *s = &v->seqs[v->n_seqs - 1];
    uint32_t l = v->next_layer;
    const kvrt_state_layer *sl = &h->layers[l];
    CORRUPT_IF(get_u32(p) != l, "state: ROWS at byte %llu is for layer %u, expected layer %u",
               (unsigned long long)offset, (unsigned)get_u32(p), (unsigned)l);
    CORRUPT_IF(get_u32(p + 4) != 0, "state: ROWS of layer %u at byte %llu: flags 0x%08x", (unsigned)l,
               (unsigned long long)offset, (unsigned)get_u32(p + 4));
    uint64_t n = get_u64(p + 8);
    CORRUPT_IF(n != (uint64_t)s->n_tokens[sl->group],
               "state: ROWS of sequence %d layer %u: %llu rows, its group holds %lld tokens",
               (int)s->seq, (unsigned)l, (unsigned long long)n, (long long)s->n_tokens[sl->group]);
    CORRUPT_IF(get_u32(p + 16) != sl->row_bytes || get_u32(p + 20) != sl->scale_bytes,
               "state: ROWS of sequence %d layer %u: row_bytes %u + %u, the header says %u + %u",
               (int)s->seq, (unsigned)l, (unsigned)get_u32(p + 16), (unsigned)get_u32(p + 20),
               (unsigned)sl->row_bytes, (unsigned)sl->scale_bytes);
    /* scales: finite and >= 0, as kvrt computes them; anything else would
     * turn rows into NaN or flip their signs */
    const uint8_t *scales = p + KVRT_STATE_ROWS_FIXED + n * sl->row_bytes;
    for (uint64_t i = 0; i < n * (sl->scale_bytes / 4); i++) {
        float f = get_f32(scales + 4 * i);
        CORRUPT_IF(!isfinite(f) || signbit(f),
                   "state: ROWS of sequence %d layer %u: scale %llu is %g (scales are finite and >= 0)",
                   (int)s->seq, (unsigned)l, (unsigned long long)i, (double)f);
    }
    s->rows_offset[l] = offset + KVRT_STATE_FRAME_BYTES + KVRT_STATE_ROWS_FIXED;
    if (++v->next_layer == h->n_layers)
        v->expect = EXPECT_SEQ_OR_END;
    return KVRT_OK;
}

/* Verifies and parses a whole frame at `offset` whose size frame_check
 * accepted. */
static kvrt_status frame_parse(kvrt_state_view *v, const uint8_t *frame, uint64_t offset,
                               const kvrt_cache *cache)
{
    uint32_t tag = get_u32(frame);
    uint64_t size = get_u64(frame + 8);
    const uint8_t *p = frame + KVRT_STATE_FRAME_BYTES;
    uint64_t stored = get_u64(p + size);
    uint64_t computed = checksum(frame, (size_t)(KVRT_STATE_FRAME_BYTES + size));
    const kvrt_state_seq *s = v->n_seqs > 0 ? &v->seqs[v->n_seqs - 1] : NULL;
    if (stored != computed && STATE_VERIFY_CHECKSUMS) {
        if (tag == KVRT_STATE_TAG_ROWS && s != NULL)
            return CORRUPT("state: ROWS of sequence %d layer %u at byte %llu: checksum mismatch",
                           (int)s->seq, (unsigned)v->next_layer, (unsigned long long)offset);
        return CORRUPT("state: %s at byte %llu: checksum mismatch", kvrt_state_tag_name(tag),
                       (unsigned long long)offset);
    }
    KVRT_TRY(kvrt_reserve((void **)&v->sections, &v->sections_cap, v->n_sections + 1,
                          sizeof(kvrt_state_section)));
    kvrt_state_section *sec = &v->sections[v->n_sections++];
    sec->tag = tag;
    sec->offset = offset;
    sec->payload_bytes = size;
    sec->checksum = stored;
    switch (tag) {
    case KVRT_STATE_TAG_HEAD: return parse_head(v, p, size, offset, cache);
    case KVRT_STATE_TAG_SEQ: return parse_seq(v, p, size, offset);
    case KVRT_STATE_TAG_ROWS: return parse_rows(v, p, offset);
    default: {
        uint64_t end = offset + section_bytes(size);
        CORRUPT_IF(get_u64(p) != end, "state: END at byte %llu records %llu file bytes, it ends at %llu",
                   (unsigned long long)offset, (unsigned long long)get_u64(p), (unsigned long long)end);
        v->expect = EXPECT_DONE;
        v->complete = 1;
        return KVRT_OK;
    }
    }
}

static kvrt_status check_magic(const uint8_t *p, size_t n)
{
    CORRUPT_IF(n < KVRT_STATE_MAGIC_BYTES, "state: %zu bytes: truncated before the end of the magic", n);
    CORRUPT_IF(memcmp(p, KVRT_STATE_MAGIC, KVRT_STATE_MAGIC_BYTES) != 0,
               "state: not a kvrt state file (bad magic)");
    return KVRT_OK;
}

kvrt_status kvrt_state_parse(const void *image, size_t size, const kvrt_cache *cache,
                             kvrt_state_view *v)
{
    KVRT_CHECK(v != NULL, KVRT_ERR_INVALID_ARG, "kvrt_state_parse: view is NULL");
    view_init(v);
    KVRT_CHECK(image != NULL || size == 0, KVRT_ERR_INVALID_ARG, "kvrt_state_parse: image is NULL");
    KVRT_TRY(state_available("kvrt_state_parse"));
    cache = KVRT_CORE(cache);
    const uint8_t *p = image;
    KVRT_TRY(check_magic(p, size));
    uint64_t at = KVRT_STATE_MAGIC_BYTES;
    while (!v->complete) {
        CORRUPT_IF(size - at < KVRT_STATE_FRAME_BYTES,
                   "state: truncated at byte %zu: expected a %s section", size, expect_name(v->expect));
        uint64_t payload;
        KVRT_TRY(frame_check(v, p + at, at, &payload));
        uint64_t have = size - at - KVRT_STATE_FRAME_BYTES;
        CORRUPT_IF(have < KVRT_STATE_CHECKSUM_BYTES || have - KVRT_STATE_CHECKSUM_BYTES < payload,
                   "state: truncated at byte %zu, inside the %s section at byte %llu (%llu payload "
                   "bytes)", size, kvrt_state_tag_name(get_u32(p + at)), (unsigned long long)at,
                   (unsigned long long)payload);
        KVRT_TRY(frame_parse(v, p + at, at, cache));
        at += section_bytes(payload);
        v->bytes = at;
    }
    CORRUPT_IF(at != size, "state: %llu bytes after the END section", (unsigned long long)(size - at));
    return KVRT_OK;
}

/* ------------------------------------------------------------------------ */
/* Loading into the cache                                                    */
/* ------------------------------------------------------------------------ */

/* Undoes what apply committed for the target sequences. */
static void apply_rollback(kvrt_cache *cache, const int32_t *targets, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        for (int j = 0; j < cache->n_groups; j++) {
            kvrt_group *g = &cache->groups[j];
            kvrt_seq_pages *sp = &g->seqs[targets[i]];
            kvrt_seq_pages_release_all(g, sp);
            sp->evicted_min = sp->evicted_max = -1;
        }
    (void)kvrt_cache_sync_pos(cache);
}

/* Writes n rows of one layer from host memory (K rows then V rows, cache
 * dtype, then for quantized dtypes K scales and V scales, f32 per head)
 * into the given slots. */
static kvrt_status load_rows(kvrt_cache *cache, const kvrt_layer_ref *ref, const int32_t *slots,
                             int64_t n, const uint8_t *k, const uint8_t *v)
{
    kvrt_backend_t *be = &cache->be;
    const kvrt_layout *L = &ref->layout;
    size_t k_row = (size_t)L->n_heads * (size_t)L->dim_k * (size_t)L->elem_size;
    size_t v_row = (size_t)L->n_heads * (size_t)L->dim_v * (size_t)L->elem_size;
    size_t ks_row = ref->k_scale != NULL ? (size_t)L->n_heads * sizeof(float) : 0;
    size_t vs_row = ref->v_scale != NULL ? (size_t)L->n_heads * sizeof(float) : 0;
    const uint8_t *ks = v + (size_t)n * v_row, *vs = ks + (size_t)n * ks_row;
    kvrt_write_op op;
    memset(&op, 0, sizeof op);
    op.layer = *ref;
    op.src_dtype = L->dtype; /* no conversion: bit-exact */
    if (cache->desc.device.backend == KVRT_BACKEND_CPU) {
        /* host memory is the device's: one write straight from the image */
        const void *d_slots;
        be->ops->stage_reset(be, cache->stream);
        KVRT_TRY(be->ops->stage(be, slots, (size_t)n * sizeof(int32_t), cache->stream, &d_slots));
        op.k_src = k;
        op.v_src = v_row > 0 ? v : NULL;
        op.k_scale_src = ks_row > 0 ? (const float *)(const void *)ks : NULL;
        op.v_scale_src = vs_row > 0 ? (const float *)(const void *)vs : NULL;
        op.n_rows = (int32_t)n;
        op.slots = d_slots;
        return be->ops->write(be, &op, cache->stream);
    }
    /* GPUs: through device scratch in chunks (the image would best be pinned
     * host memory; uploads go through the backend's pinned staging). */
    int64_t per = (int64_t)(STATE_CHUNK_GPU / (k_row + v_row + ks_row + vs_row));
    if (per < 1)
        per = 1;
    if (per > n)
        per = n;
    void *dk = NULL, *dv = NULL, *dks = NULL, *dvs = NULL;
    kvrt_status st = be->ops->scratch_alloc(be, (size_t)per * k_row, &dk);
    if (st == KVRT_OK && v_row > 0)
        st = be->ops->scratch_alloc(be, (size_t)per * v_row, &dv);
    if (st == KVRT_OK && ks_row > 0)
        st = be->ops->scratch_alloc(be, (size_t)per * ks_row, &dks);
    if (st == KVRT_OK && vs_row > 0)
        st = be->ops->scratch_alloc(be, (size_t)per * vs_row, &dvs);
    for (int64_t i = 0; i < n && st == KVRT_OK; i += per) {
        int64_t m = n - i < per ? n - i : per;
        const void *d_slots = NULL;
        be->ops->stage_reset(be, cache->stream);
        st = be->ops->upload(be, dk, k + (size_t)i * k_row, (size_t)m * k_row, cache->stream);
        if (st == KVRT_OK && dv != NULL)
            st = be->ops->upload(be, dv, v + (size_t)i * v_row, (size_t)m * v_row, cache->stream);
        if (st == KVRT_OK && dks != NULL)
            st = be->ops->upload(be, dks, ks + (size_t)i * ks_row, (size_t)m * ks_row, cache->stream);
        if (st == KVRT_OK && dvs != NULL)
            st = be->ops->upload(be, dvs, vs + (size_t)i * vs_row, (size_t)m * vs_row, cache->stream);
        if (st == KVRT_OK)
            st = be->ops->stage(be, slots + i, (size_t)m * sizeof(int32_t), cache->stream, &d_slots);
        if (st == KVRT_OK) {
            op.k_src = dk;
            op.v_src = dv;
            op.k_scale_src = dks;
            op.v_scale_src = dvs;
            op.n_rows = (int32_t)m;
            op.slots = d_slots;
            st = be->ops->write(be, &op, cache->stream);
        }
        if (st == KVRT_OK) /* the scratch is reused by the next chunk */
            st = be->ops->sync(be, cache->stream);
    }
    (void)be->ops->sync(be, cache->stream);
    be->ops->scratch_free(be, dk);
    be->ops->scratch_free(be, dv);
    be->ops->scratch_free(be, dks);
    be->ops->scratch_free(be, dvs);
    return st;
}

/* A state holds the base's layers only: the rows of shared handles' own
 * layers (kvrt_cache_create_shared) in a loaded sequence's blocks are
 * zeroed, so that no row of an earlier user of those blocks shows. */
static kvrt_status zero_own_rows(kvrt_cache *cache, int32_t seq)
{
    kvrt_backend_t *be = &cache->be;
    for (int j = 0; j < cache->n_groups; j++) {
        const kvrt_group *g = &cache->groups[j];
        const kvrt_seq_pages *sp = &g->seqs[seq];
        for (int k = 0; k < g->n_layers; k++) {
            if (g->layers[k] < cache->desc.n_layers)
                continue;
            const kvrt_layer_mem *m = &cache->mem[g->layers[k]];
            for (int32_t b = 0; b < sp->n_blocks; b++) {
                size_t at = (size_t)sp->blocks[b];
                KVRT_TRY(be->ops->zero(be, (char *)m->k + at * m->k_block, m->k_block, cache->stream));
                if (m->v != NULL)
                    KVRT_TRY(be->ops->zero(be, (char *)m->v + at * m->v_block, m->v_block,
                                           cache->stream));
                void *scales[2] = {m->k_scale, m->v_scale};
                for (int q = 0; q < 2; q++)
                    if (scales[q] != NULL)
                        KVRT_TRY(be->ops->zero(be, (char *)scales[q] + at * m->scale_block,
                                               m->scale_block, cache->stream));
            }
        }
    }
    return KVRT_OK;
}

kvrt_status kvrt_state_apply(kvrt_cache *cache, int32_t dst_seq, const kvrt_state_view *v,
                             const uint8_t *image)
{
    KVRT_TRY(kvrt_check_cache(cache, "kvrt_state_read"));
    cache = KVRT_CORE(cache);
    KVRT_CHECK(v != NULL && v->complete && image != NULL, KVRT_ERR_INTERNAL,
               "kvrt_state_read: loading an unverified state");
    const kvrt_state_header *h = &v->header;
    KVRT_CHECK(h->n_layers == (uint32_t)cache->desc.n_layers && h->n_groups == (uint32_t)cache->n_groups,
               KVRT_ERR_INTERNAL, "kvrt_state_read: the state's groups differ from the cache's");
    int64_t S = v->n_seqs;
    if (dst_seq >= 0) {
        KVRT_TRY(kvrt_check_seq(cache, dst_seq, "kvrt_state_read: dst_seq"));
        KVRT_CHECK(S == 1, KVRT_ERR_INVALID_ARG,
                   "kvrt_state_read: the state holds %lld sequences; load it with dst_seq < 0 to "
                   "restore each into its id", (long long)S);
    }
    int32_t *targets = malloc((size_t)(S > 0 ? S : 1) * sizeof(int32_t));
    KVRT_CHECK(targets != NULL, KVRT_ERR_OUT_OF_MEMORY, "kvrt_state_read: host tables");
    kvrt_status st = KVRT_OK;
    int64_t max_rows = 1;
    /* validate: targets, capacity, page-table room */
    for (int64_t i = 0; i < S && st == KVRT_OK; i++) {
        int32_t t = dst_seq >= 0 ? dst_seq : v->seqs[i].seq;
        targets[i] = t;
        if (t >= cache->desc.max_seqs)
            st = kvrt_set_error(KVRT_ERR_INVALID_ARG,
                                "kvrt_state_read: sequence %d of the state is out of the cache's "
                                "range [0, %d)", (int)t, cache->desc.max_seqs);
        else if (!kvrt_seq_is_empty(cache, t))
            st = kvrt_set_error(KVRT_ERR_INVALID_ARG,
                                "kvrt_state_read: destination sequence %d is not empty (remove it "
                                "first)", (int)t);
    }
    int64_t *need = calloc((size_t)cache->n_groups, sizeof(int64_t));
    if (st == KVRT_OK && need == NULL)
        st = kvrt_set_error(KVRT_ERR_OUT_OF_MEMORY, "kvrt_state_read: host tables");
    for (int j = 0; j < cache->n_groups && st == KVRT_OK; j++) {
        kvrt_group *g = &cache->groups[j];
        int64_t bs = g->block_size;
        for (int64_t i = 0; i < S && st == KVRT_OK; i++) {
            int64_t n = v->seqs[i].n_tokens[j];
            if (n > max_rows)
                max_rows = n;
            if (kvrt_group_is_self(g) && !g->evict && v->seqs[i].evicted_max[j] >= 0)
                st = kvrt_set_error(KVRT_ERR_INCOMPATIBLE,
                                    "kvrt_state_read: swa_full 1 in cache, but sequence %d lacks "
                                    "rows that layer %d's sliding window dropped (up to position "
                                    "%d)", (int)v->seqs[i].seq, g->layers[0],
                                    (int)v->seqs[i].evicted_max[j]);
            if (kvrt_group_is_self(g)) {
                need[j] += (n + bs - 1) / bs;
            } else if (n > 0) {
                if (n > bs)
                    st = kvrt_set_error(KVRT_ERR_CAPACITY,
                                        "kvrt_state_read: sequence %d: %lld cross rows of layer %d "
                                        "exceed the cache's cross_max_len %d",
                                        (int)v->seqs[i].seq, (long long)n, g->layers[0], g->block_size);
                need[j] += 1;
            }
            if (st == KVRT_OK) {
                kvrt_seq_pages *sp = &g->seqs[targets[i]];
                st = kvrt_reserve((void **)&sp->blocks, &sp->cap_blocks, (n + bs - 1) / bs + 1,
                                  sizeof(int32_t));
            }
        }
        if (st == KVRT_OK && need[j] > kvrt_group_available(g))
            st = kvrt_set_error(KVRT_ERR_CAPACITY,
                                "kvrt_state_read: layer group %d (layer %d) needs %lld blocks; %d "
                                "free, room to grow by %d", j, g->layers[0], (long long)need[j],
                                g->n_free, g->max_blocks - g->n_blocks);
    }
    int32_t *slots = st == KVRT_OK ? malloc((size_t)max_rows * sizeof(int32_t)) : NULL;
    if (st == KVRT_OK && slots == NULL)
        st = kvrt_set_error(KVRT_ERR_OUT_OF_MEMORY, "kvrt_state_read: slots of %lld rows",
                            (long long)max_rows);
    for (int j = 0; j < cache->n_groups && st == KVRT_OK; j++)
        st = kvrt_group_ensure_free(cache, &cache->groups[j], need[j]);
    free(need);
    if (st != KVRT_OK) {
        free(targets);
        free(slots);
        return st;
    }

    /* commit: page tables and positions (nothing here fails) */
    for (int64_t i = 0; i < S; i++) {
        const kvrt_state_seq *s = &v->seqs[i];
        for (int j = 0; j < cache->n_groups; j++) {
            kvrt_group *g = &cache->groups[j];
            kvrt_seq_pages *sp = &g->seqs[targets[i]];
            int64_t n = s->n_tokens[j], bs = g->block_size;
            if (n == 0) {
                sp->evicted_min = s->evicted_min[j];
                sp->evicted_max = s->evicted_max[j];
                continue;
            }
            for (int64_t b = 0; b < (n + bs - 1) / bs; b++)
                sp->blocks[sp->n_blocks++] = kvrt_group_block_alloc(g);
            sp->n_slots = n;
            if (kvrt_group_is_self(g)) {
                const uint8_t *pos = image + s->pos_offset[j];
                for (int64_t k = 0; k < n; k++)
                    g->pos[kvrt_seq_slot(g, sp, k)] = get_i32(pos + 4 * k);
                for (int32_t b = 0; b < sp->n_blocks; b++)
                    kvrt_group_mark_dirty(g, sp->blocks[b]);
            } else {
                g->cross_len[sp->blocks[0]] = (int32_t)n;
            }
            kvrt_seq_pages_refresh(g, sp);
            sp->evicted_min = s->evicted_min[j];
            sp->evicted_max = s->evicted_max[j];
        }
    }
    /* rows, layer by layer */
    for (int64_t i = 0; i < S && st == KVRT_OK; i++) {
        const kvrt_state_seq *s = &v->seqs[i];
        for (int l = 0; l < cache->desc.n_layers && st == KVRT_OK; l++) {
            int j = cache->layer_group[l];
            kvrt_group *g = &cache->groups[j];
            const kvrt_seq_pages *sp = &g->seqs[targets[i]];
            int64_t n = s->n_tokens[j];
            if (n == 0)
                continue;
            const kvrt_layer_ref *ref = &g->refs[0];
            for (int k = 0; k < g->n_layers; k++)
                if (g->layers[k] == l)
                    ref = &g->refs[k];
            const kvrt_layout *L = &ref->layout;
            size_t k_row = (size_t)L->n_heads * (size_t)L->dim_k * (size_t)L->elem_size;
            size_t v_row = (size_t)L->n_heads * (size_t)L->dim_v * (size_t)L->elem_size;
            if (k_row + v_row != h->layers[l].row_bytes ||
                (ref->k_scale != NULL ? 4 * (size_t)L->n_heads : 0) +
                        (ref->v_scale != NULL ? 4 * (size_t)L->n_heads : 0) !=
                    h->layers[l].scale_bytes) {
                st = kvrt_set_error(KVRT_ERR_INTERNAL,
                                    "kvrt_state_read: layer %d: layout rows of %zu bytes, "
                                    "kvrt_layer_row_bytes %u", l, k_row + v_row,
                                    (unsigned)h->layers[l].row_bytes);
                break;
            }
            for (int64_t k = 0; k < n; k++)
                slots[k] = (int32_t)kvrt_seq_slot(g, sp, k);
            const uint8_t *rows = image + s->rows_offset[l];
            st = load_rows(cache, ref, slots, n, rows, rows + (size_t)n * k_row);
        }
    }
    for (int64_t i = 0; i < S && st == KVRT_OK; i++)
        st = zero_own_rows(cache, targets[i]);
    if (st == KVRT_OK)
        st = kvrt_cache_sync_pos(cache);
    if (st != KVRT_OK) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", kvrt_last_error());
        apply_rollback(cache, targets, S);
        kvrt_set_error(st, "%s", msg);
    }
    cache->epoch++;
    free(targets);
    free(slots);
    return st;
}

/* ------------------------------------------------------------------------ */
/* Reading a stream                                                          */
/* ------------------------------------------------------------------------ */

typedef struct in_image {
    uint8_t *data;
    size_t   size, cap;
} in_image;

/* Appends exactly n bytes from the reader. The buffer grows only as data
 * arrives (in steps of at most STATE_READ_STEP), so a size claimed by a
 * corrupt input never allocates more than about twice the input itself.
 * *short_read is set when the input ended first (status OK). */
static kvrt_status read_exact(kvrt_state_reader reader, void *user, in_image *im, uint64_t n,
                              int *short_read)
{
    *short_read = 0;
    while (n > 0) {
        size_t step = n < STATE_READ_STEP ? (size_t)n : STATE_READ_STEP;
        if (im->cap - im->size < step) {
            size_t cap = im->cap > 0 ? im->cap : 4096;
            while (cap - im->size < step)
                cap *= 2;
            uint8_t *p = realloc(im->data, cap);
            KVRT_CHECK(p != NULL, KVRT_ERR_OUT_OF_MEMORY, "kvrt_state_read: host buffer of %zu bytes",
                       cap);
            im->data = p;
            im->cap = cap;
        }
        size_t got = 0;
        kvrt_clear_error();
        kvrt_callback_begin();
        kvrt_status st = reader(user, im->data + im->size, step, &got);
        kvrt_callback_end();
        if (st != KVRT_OK) {
            if (kvrt_last_error()[0] == '\0')
                kvrt_set_error(st, "kvrt_state_read: the reader failed at byte %zu (%s)", im->size,
                               kvrt_status_name(st));
            return st;
        }
        KVRT_CHECK(got <= step, KVRT_ERR_INVALID_ARG,
                   "kvrt_state_read: the reader delivered %zu bytes of %zu asked", got, step);
        im->size += got;
        n -= got;
        if (got == 0) { /* only 0 bytes is the end; fewer is asked again */
            *short_read = 1;
            return KVRT_OK;
        }
    }
    return KVRT_OK;
}

/* Reads and verifies a whole state into *im / *v, checking the header
 * against the cache as soon as it arrives. */
static kvrt_status read_stream(const kvrt_cache *cache, kvrt_state_reader reader, void *user,
                               in_image *im, kvrt_state_view *v)
{
    int short_read;
    KVRT_TRY(read_exact(reader, user, im, KVRT_STATE_MAGIC_BYTES, &short_read));
    KVRT_TRY(check_magic(im->data, im->size));
    while (!v->complete) {
        uint64_t at = im->size;
        KVRT_TRY(read_exact(reader, user, im, KVRT_STATE_FRAME_BYTES, &short_read));
        CORRUPT_IF(short_read, "state: truncated at byte %zu: expected a %s section", im->size,
                   expect_name(v->expect));
        uint64_t payload;
        KVRT_TRY(frame_check(v, im->data + at, at, &payload));
        KVRT_TRY(read_exact(reader, user, im, payload + KVRT_STATE_CHECKSUM_BYTES, &short_read));
        CORRUPT_IF(short_read,
                   "state: truncated at byte %zu, inside the %s section at byte %llu (%llu payload "
                   "bytes)", im->size, kvrt_state_tag_name(get_u32(im->data + at)),
                   (unsigned long long)at, (unsigned long long)payload);
        KVRT_TRY(frame_parse(v, im->data + at, at, cache));
        v->bytes = im->size;
    }
    return KVRT_OK;
}

static kvrt_status state_load(kvrt_cache *cache, int32_t dst_seq, kvrt_state_reader reader,
                              void *user, size_t size_hint, int (*at_end)(void *user))
{
    cache = KVRT_CORE(cache);
    in_image im = {NULL, 0, 0};
    if (size_hint > 0 && size_hint < ((size_t)1 << 40)) {
        im.data = malloc(size_hint);
        im.cap = im.data != NULL ? size_hint : 0;
    }
    kvrt_state_view v;
    view_init(&v);
    kvrt_status st = read_stream(cache, reader, user, &im, &v);
    if (st == KVRT_OK && at_end != NULL && !at_end(user))
        st = CORRUPT("state: bytes follow the END section at byte %zu", im.size);
    if (st == KVRT_OK)
        st = kvrt_state_apply(cache, dst_seq, &v, im.data);
    kvrt_state_view_free(&v);
    free(im.data);
    return st;
}

static kvrt_status do_state_read(kvrt_cache *cache, int32_t dst_seq, kvrt_state_reader reader, void *user)
{
    KVRT_TRY(kvrt_check_cache(cache, "kvrt_state_read"));
    cache = KVRT_CORE(cache);
    KVRT_CHECK(reader != NULL, KVRT_ERR_INVALID_ARG, "kvrt_state_read: reader is NULL");
    if (dst_seq >= 0)
        KVRT_TRY(kvrt_check_seq(cache, dst_seq, "kvrt_state_read: dst_seq"));
    KVRT_TRY(state_available("kvrt_state_read"));
    return state_load(cache, dst_seq, reader, user, 0, NULL);
}

/* ------------------------------------------------------------------------ */
/* Files                                                                     */
/* ------------------------------------------------------------------------ */

typedef struct file_io {
    FILE       *f;
    const char *path;
} file_io;

static kvrt_status file_write(void *user, const void *data, size_t size)
{
    file_io *io = user;
    if (fwrite(data, 1, size, io->f) != size)
        return kvrt_set_error(KVRT_ERR_IO, "kvrt_state_save_file: writing %s: %s", io->path,
                              strerror(errno));
    return KVRT_OK;
}

static kvrt_status file_read(void *user, void *data, size_t size, size_t *got)
{
    file_io *io = user;
    *got = fread(data, 1, size, io->f);
    if (*got < size && ferror(io->f))
        return kvrt_set_error(KVRT_ERR_IO, "kvrt_state_load_file: reading %s: %s", io->path,
                              strerror(errno));
    return KVRT_OK;
}

static int file_at_end(void *user)
{
    file_io *io = user;
    return fgetc(io->f) == EOF;
}

/* A fresh file beside path (same directory, so that rename is atomic),
 * created with the mode open(2) gives new files, or path's mode when it
 * exists. Returns its descriptor, or -1 with errno set. */
static int create_temp_beside(const char *path, const struct stat *existing, char *tmp, size_t size)
{
    static _Atomic unsigned counter;
    int fd = -1;
    for (int attempt = 0; attempt < 64 && fd < 0; attempt++) {
        snprintf(tmp, size, "%s.tmp.%ld.%u", path, (long)getpid(), counter++);
        fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd < 0 && errno != EEXIST)
            return -1;
    }
    if (fd >= 0 && existing != NULL && fchmod(fd, existing->st_mode & 07777) != 0) {
        int e = errno;
        close(fd);
        unlink(tmp);
        errno = e;
        return -1;
    }
    return fd;
}

/* Makes a rename in path's directory durable. Best effort: some file
 * systems cannot sync a directory. */
static void sync_parent_dir(const char *path)
{
    const char *slash = strrchr(path, '/');
    char dir[4096];
    if (slash == NULL)
        snprintf(dir, sizeof dir, ".");
    else if (slash == path)
        snprintf(dir, sizeof dir, "/");
    else if ((size_t)(slash - path) < sizeof dir)
        snprintf(dir, sizeof dir, "%.*s", (int)(slash - path), path);
    else
        return;
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        (void)fsync(fd);
        close(fd);
    }
}

/* The state goes to a temporary file beside path, is synced, and replaces
 * path by rename only when complete: a failed save leaves the file system
 * as it was (the temporary file is removed). A path that exists and is not
 * a regular file (a symlink, a device, a directory) is refused. */
static kvrt_status do_state_save_file(kvrt_cache *cache, int32_t seq, const char *path)
{
    KVRT_TRY(kvrt_check_cache(cache, "kvrt_state_save_file"));
    KVRT_CHECK(path != NULL, KVRT_ERR_INVALID_ARG, "kvrt_state_save_file: path is NULL");
    if (seq >= 0)
        KVRT_TRY(kvrt_check_seq(cache, seq, "kvrt_state_save_file"));
    KVRT_TRY(state_available("kvrt_state_save_file"));
    struct stat sb;
    int exists = lstat(path, &sb) == 0;
    KVRT_CHECK(exists || errno == ENOENT, KVRT_ERR_IO, "kvrt_state_save_file: %s: %s", path,
               strerror(errno));
    KVRT_CHECK(!exists || S_ISREG(sb.st_mode), KVRT_ERR_IO,
               "kvrt_state_save_file: %s is %s, not a regular file; it is left alone", path,
               S_ISLNK(sb.st_mode) ? "a symbolic link" : S_ISDIR(sb.st_mode) ? "a directory"
               : S_ISCHR(sb.st_mode) || S_ISBLK(sb.st_mode) ? "a device" : "a special file");
    size_t tmp_size = strlen(path) + 48;
    char *tmp = malloc(tmp_size);
    KVRT_CHECK(tmp != NULL, KVRT_ERR_OUT_OF_MEMORY, "kvrt_state_save_file: host allocation");
    int fd = create_temp_beside(path, exists ? &sb : NULL, tmp, tmp_size);
    if (fd < 0) {
        kvrt_status st = kvrt_set_error(KVRT_ERR_IO,
                                        "kvrt_state_save_file: cannot create a temporary file "
                                        "beside %s: %s", path, strerror(errno));
        free(tmp);
        return st;
    }
    file_io io = {fdopen(fd, "wb"), path};
    kvrt_status st = KVRT_OK;
    if (io.f == NULL) {
        st = kvrt_set_error(KVRT_ERR_IO, "kvrt_state_save_file: %s: %s", path, strerror(errno));
        close(fd);
    } else {
        st = kvrt_state_write(cache, seq, file_write, &io);
        if (st == KVRT_OK && (fflush(io.f) != 0 || fsync(fd) != 0))
            st = kvrt_set_error(KVRT_ERR_IO, "kvrt_state_save_file: writing %s: %s", path,
                                strerror(errno));
        if (fclose(io.f) != 0 && st == KVRT_OK)
            st = kvrt_set_error(KVRT_ERR_IO, "kvrt_state_save_file: closing %s: %s", path,
                                strerror(errno));
    }
    if (st == KVRT_OK && rename(tmp, path) != 0)
        st = kvrt_set_error(KVRT_ERR_IO, "kvrt_state_save_file: renaming the temporary file to "
                            "%s: %s", path, strerror(errno));
    if (st == KVRT_OK)
        sync_parent_dir(path);
    else
        (void)unlink(tmp);
    free(tmp);
    return st;
}

static kvrt_status do_state_load_file(kvrt_cache *cache, int32_t dst_seq, const char *path)
{
    KVRT_TRY(kvrt_check_cache(cache, "kvrt_state_load_file"));
    KVRT_CHECK(path != NULL, KVRT_ERR_INVALID_ARG, "kvrt_state_load_file: path is NULL");
    if (dst_seq >= 0)
        KVRT_TRY(kvrt_check_seq(cache, dst_seq, "kvrt_state_load_file: dst_seq"));
    KVRT_TRY(state_available("kvrt_state_load_file"));
    file_io io = {fopen(path, "rb"), path};
    KVRT_CHECK(io.f != NULL, KVRT_ERR_IO, "kvrt_state_load_file: cannot open %s: %s", path,
               strerror(errno));
    /* the file's real size bounds the buffer: reserve it at once */
    size_t hint = 0;
    if (fseek(io.f, 0, SEEK_END) == 0) {
        long end = ftell(io.f);
        if (end > 0)
            hint = (size_t)end;
        rewind(io.f);
    }
    kvrt_status st = state_load(cache, dst_seq, file_read, &io, hint, file_at_end);
    fclose(io.f);
    return st;
}

/* ---- public entries: the message of a failure starts with the function ---- */

kvrt_status kvrt_state_size(const kvrt_cache *cache, int32_t seq, uint64_t *bytes)
{
    KVRT_ENTRY(cache, "kvrt_state_size", do_state_size(cache, seq, bytes));
}

kvrt_status kvrt_state_write(kvrt_cache *cache, int32_t seq, kvrt_state_writer writer, void *user)
{
    KVRT_ENTRY(cache, "kvrt_state_write", do_state_write(cache, seq, writer, user));
}

kvrt_status kvrt_state_read(kvrt_cache *cache, int32_t dst_seq, kvrt_state_reader reader, void *user)
{
    KVRT_ENTRY(cache, "kvrt_state_read", do_state_read(cache, dst_seq, reader, user));
}

kvrt_status kvrt_state_save_file(kvrt_cache *cache, int32_t seq, const char *path)
{
    KVRT_ENTRY(cache, "kvrt_state_save_file", do_state_save_file(cache, seq, path));
}

kvrt_status kvrt_state_load_file(kvrt_cache *cache, int32_t dst_seq, const char *path)
{
    KVRT_ENTRY(cache, "kvrt_state_load_file", do_state_load_file(cache, dst_seq, path));
}
