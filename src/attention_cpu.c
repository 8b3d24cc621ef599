/*
 * attention_cpu.c: masked paged attention on the host (kvrt_attention_op),
 * the CPU backend's kernel and the C twin the GPU attention kernels are
 * checked against.
 *
 * How the work is cut:
 *   - A tile is a run of consecutive batch tokens of one sequence (a prefill
 *     chunk, up to TILE_TOKENS); a decode token is a tile of its own. The
 *     tokens of a tile share the K/V rows they read, so those rows are read
 *     once for all of them.
 *   - A unit is (tile, query heads, a split of the sequence's slots). Its
 *     query heads are those of all the kv heads when they fit, else those of
 *     some kv heads, or a part of one kv head's (MLA's 128). It walks its
 *     slots in chunks: it collects the chunk's slots that some token of the
 *     tile sees, then for each kv head updates each (token, query head) row
 *     of that kv head with an online softmax kept in f32: running max m,
 *     running sum l, unnormalized output acc. Rows of holes and of slots no
 *     token of the tile sees are never read.
 *   - OpenMP threads take units dynamically; a thread claims its next unit
 *     when it starts one. Slots are split so that each thread gets about
 *     UNITS_PER_THREAD units' worth of the batch's slots, and the splits'
 *     partial (m, l, acc) are merged afterwards, MERGE_ROWS rows at a time.
 *
 * Memory: decode attention reads every K/V byte once and does about 4 flops
 * per byte, so it runs at memory speed only if the next rows' misses are in
 * flight while this chunk is computed. The K and V lines of the next chunk
 * are queued and asked for (prefetched) a line or two at a time from inside
 * the arithmetic; a burst of prefetches, or loads alone, keeps few misses
 * in flight and leaves memory idle meanwhile. A unit's first chunk is asked
 * for at once; during a unit's last chunk, the first chunk of the unit the
 * thread takes next is queued instead, so that only a thread's first unit
 * in a call starts cold.
 *
 * The copies of the kernel, one file per instruction set (this file holds
 * the plan, the chunking, the unit loop, the merge and the portable copy;
 * attention_cpu_impl.h what they share). kvrt_cpu_isa_level (KVRT_CPU_ISA
 * caps it) picks one per call:
 *   - Portable (gathered rows): inner loops run over LANES-element steps
 *     with a compile-time trip count, so that compilers vectorize them at
 *     -O2 for whatever the target's vector width is. Each chunk's K and V
 *     rows of a kv head are converted to f32 once (the gather; q8/fp8 rows
 *     dequantized, pre-RoPE keys turned) and the rows updated one at a time.
 *   - AVX2 + FMA over gathered rows: the same code compiled for them, with
 *     F16C conversions (attention_cpu_avx2.c). Pre-RoPE caches, and dims
 *     that are not multiples of 8, run here on AVX2 processors.
 *   - The direct copies, AVX2 (attention_cpu_avx2.c) and AVX-512 (F, BW,
 *     VL; attention_cpu_avx512.c): a token's query heads of one kv head up
 *     to four at a time. Each K or V vector is loaded straight from the
 *     cache (f32, f16, bf16, or q8/fp8 codes) and converted in registers
 *     once for the four (no f32 copy), so a chunk is sized by its bytes
 *     (CHUNK_BYTES per kv head, for K and V). A q8/fp8 row's scale
 *     multiplies its dot products (K) or its weight (V) instead of each
 *     element. AVX-512's dots of four heads with four keys are sixteen
 *     registers and its V sums of four rows over 64 elements another
 *     sixteen; AVX2, with half the registers, takes two keys and 16
 *     elements. The softmax is 16 or 8 lanes wide. Rows that skip a key of
 *     the chunk (a weight of 0: the V of a key a row does not see may hold
 *     anything, and 0 * inf is NaN) are updated one at a time from the
 *     gathered f32 rows, gathered for that kv head only then.
 */
#include "attention_cpu_impl.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#  include <omp.h>
#endif

/* dot_rows in the copy being compiled (fused: the AVX2 + FMA one). */
KVRT_ALWAYS_INLINE void dot_rows_isa(float *restrict s, const float *restrict q,
                                     const float *restrict k, int64_t stride, int32_t n,
                                     int32_t dim, const int fused)
{
#if KVRT_ATTENTION_X86
    if (fused) {
        kvrt_attn_dot_rows_avx2(s, q, k, stride, n, dim);
        return;
    }
#endif
    dot_rows(s, q, k, stride, n, dim, fused);
}

/* ---- plan and scratch ---- */

/* Places n bytes at *cursor (64-byte aligned) and advances it; with base
 * NULL it only measures. */
static void *carve(char *base, size_t *cursor, size_t n)
{
    void *p = base ? base + *cursor : NULL;
    *cursor += round_up(n, 64);
    return p;
}

static size_t scratch_carve(const attn_plan *pl, char *base, attn_scratch *sc)
{
    size_t at = 0, rows = (size_t)pl->rows_max, chunk = (size_t)pl->chunk;
    sc->q = carve(base, &at, rows * pl->dim_k * sizeof(float));
    sc->acc = carve(base, &at, rows * pl->dim_v * sizeof(float));
    sc->m = carve(base, &at, rows * sizeof(float));
    sc->l = carve(base, &at, rows * sizeof(float));
    sc->k = carve(base, &at, chunk * pl->dim_k * sizeof(float));
    sc->v = carve(base, &at, pl->op->mla ? 0 : chunk * pl->dim_v * sizeof(float));
    sc->s = carve(base, &at, ROW_BLOCK * round_up(chunk, KEY_PAD) * sizeof(float));
    for (int i = 0; i <= PREFETCH_CHUNKS + 1; i++) {
        sc->row[i] = carve(base, &at, chunk * sizeof(int64_t));
        sc->see[i] = carve(base, &at, TILE_TOKENS * chunk + KEY_PAD); /* read 16 at a time */
    }
    sc->out = carve(base, &at, (size_t)pl->dim_v * sizeof(float));
    sc->spare = carve(base, &at, (size_t)pl->dim_v * sizeof(float));
    sc->ranges = carve(base, &at, 4 * (size_t)pl->kv_max * chunk * sizeof(struct line_range));
    return at;
}

/* The rows of a unit: tokens [t0, t0 + nt) of one tile, query heads
 * [h0, h0 + nh), whose kv heads are [g0, g1); row r = token t0 + r / nh,
 * query head h0 + r % nh. */
typedef struct unit_rows {
    int32_t t0, nt, h0, nh, g0, g1;
} unit_rows;

static unit_rows rows_of(const attn_plan *pl, int64_t base_unit)
{
    const kvrt_attention_op *op = pl->op;
    int32_t k = (int32_t)(base_unit % pl->head_units);
    int32_t tile = (int32_t)(base_unit / pl->head_units);
    unit_rows ur;
    ur.t0 = pl->tile_first[tile];
    ur.nt = pl->tile_first[tile + 1] - ur.t0;
    if (pl->kv_per_unit > 0) {
        ur.g0 = k * pl->kv_per_unit;
        ur.g1 = ur.g0 + pl->kv_per_unit;
        if (ur.g1 > op->layer.layout.n_heads)
            ur.g1 = op->layer.layout.n_heads;
        ur.h0 = ur.g0 * pl->group;
        ur.nh = (ur.g1 - ur.g0) * pl->group;
    } else {
        int32_t n_sub = (pl->group + pl->head_sub - 1) / pl->head_sub;
        int32_t sub = k % n_sub;
        ur.g0 = k / n_sub;
        ur.g1 = ur.g0 + 1;
        ur.h0 = ur.g0 * pl->group + sub * pl->head_sub;
        ur.nh = pl->group - sub * pl->head_sub;
        if (ur.nh > pl->head_sub)
            ur.nh = pl->head_sub;
    }
    return ur;
}

/* out rows [r0, r1) = acc / l in the output dtype; rows with l == 0 (no
 * visible key) get zeros, rows with l NaN (a NaN logit) NaN. */
static void write_rows(const attn_plan *pl, const unit_rows *ur, const float *acc,
                       const float *l, float *tmp, int32_t r0, int32_t r1)
{
    const kvrt_attention_op *op = pl->op;
    int32_t dv = pl->dim_v;
    for (int32_t r = r0; r < r1; r++) {
        const float *a = acc + (int64_t)r * dv;
        const float lr = l[r];
        if (lr > 0.0f) {
            int32_t d = 0;
            for (; d + LANES <= dv; d += LANES)
                for (int k = 0; k < LANES; k++)
                    tmp[d + k] = a[d + k] / lr;
            for (; d < dv; d++)
                tmp[d] = a[d] / lr;
        } else {
            for (int32_t d = 0; d < dv; d++)
                tmp[d] = lr == 0.0f ? 0.0f : NAN;
        }
        int64_t at = ((int64_t)(ur->t0 + r / ur->nh) * op->n_q_heads + ur->h0 + r % ur->nh) * dv;
        if (op->out_dtype == KVRT_LAYOUT_F32) {
            memcpy((float *)op->out + at, tmp, (size_t)dv * sizeof(float));
        } else if (op->out_dtype == KVRT_LAYOUT_F16) {
            uint16_t *o = (uint16_t *)op->out + at;
            for (int32_t d = 0; d < dv; d++)
                o[d] = kvrt_f32_to_f16(tmp[d]);
        } else {
            uint16_t *o = (uint16_t *)op->out + at;
            for (int32_t d = 0; d < dv; d++)
                o[d] = kvrt_f32_to_bf16(tmp[d]);
        }
    }
}

/* ---- a chunk's rows ---- */

/* Collects the used slots [i0, min(i0 + chunk, end)) of a sequence that
 * some token of the tile (positions qpos[0, nt)) sees. Walks blocks and
 * offsets instead of dividing each slot index by block_size (kvrt_page_slot
 * and kvrt_k_index do, once per call). */
static void collect_chunk(const attn_plan *pl, const int32_t *pages, const int64_t *qpos,
                          int32_t nt, int64_t i0, int64_t end, chunk_rows *cr)
{
    const kvrt_attention_op *op = pl->op;
    const int32_t chunk = pl->chunk, block_size = op->layer.layout.block_size;
    const int32_t n_heads = op->layer.layout.n_heads;
    const int32_t n = (int32_t)(end - i0 < chunk ? end - i0 : chunk);
    int64_t page = i0 / block_size;
    int32_t offset = (int32_t)(i0 % block_size), nv = 0;
    int64_t block = pages[page];
    for (int32_t t = 0; t < nt; t++)
        cr->seen[t] = 0;
    for (int32_t c = 0; c < n; c++) {
        if (offset == block_size) {
            offset = 0;
            block = pages[++page];
        }
        int any = 0;
        for (int32_t t = 0; t < nt; t++) {
            int visible = 1;
            if (op->pos) {
                int64_t p = op->pos[block * block_size + offset];
                visible = p >= 0 && (!op->causal || p <= qpos[t]) &&
                          (op->window <= 0 || p > qpos[t] - op->window);
            }
            cr->see[t * chunk + nv] = (uint8_t)visible;
            cr->seen[t] += visible;
            any |= visible;
        }
        /* kvrt_k_index(layout, slot, 0) / dim_k */
        cr->row[nv] = block * n_heads * block_size + offset;
        nv += any;
        offset++;
    }
    for (int32_t t = 0; t < nt; t++) /* so that lane loops can run past nv */
        for (int32_t c = nv; c < (int32_t)round_up((size_t)nv, LANES); c++)
            cr->see[t * chunk + c] = 0;
    cr->n = nv;
}

/* Collects the next chunk from used slot i0 on that has a visible row
 * (cr->n 0 when none is left); returns where the chunk after it starts. */
static int64_t collect_next(const attn_plan *pl, const int32_t *pages, const int64_t *qpos,
                            int32_t nt, int64_t i0, int64_t end, chunk_rows *cr)
{
    cr->n = 0;
    for (; i0 < end && cr->n == 0; i0 += pl->chunk)
        collect_chunk(pl, pages, qpos, nt, i0, end, cr);
    return i0;
}

/* Starts a queue over the K and V byte runs of a chunk's rows of kv heads
 * [g0, g1), in the order they are used (kept in `runs`); returns the number
 * of cache lines they span. */
static int64_t queue_chunk(const attn_plan *pl, const chunk_rows *cr, int32_t g0, int32_t g1,
                           struct line_range *runs, line_queue *lq)
{
    const kvrt_attention_op *op = pl->op;
    const kvrt_layout *L = &op->layer.layout;
    const int64_t k_bytes = (int64_t)L->dim_k * L->elem_size;
    const int64_t v_bytes = op->mla ? 0 : (int64_t)L->dim_v * L->elem_size;
    int32_t n = 0;
    int64_t bytes = 0;
    for (int32_t g = g0; g < g1; g++)
        for (int32_t c = 0, end; c < cr->n; c = end) {
            end = run_end(cr, c);
            int64_t row = cr->row[c] + (int64_t)g * L->block_size;
            const char *k = (const char *)op->layer.k + row * k_bytes;
            runs[n++] = (struct line_range){k, k + (end - c) * k_bytes};
            if (op->layer.k_scale != NULL) { /* q8/fp8: the rows' scales too */
                const char *ks = (const char *)(op->layer.k_scale + row);
                runs[n++] = (struct line_range){ks, ks + (end - c) * sizeof(float)};
                bytes += (end - c) * (int64_t)sizeof(float);
            }
            if (v_bytes) {
                const char *v = (const char *)op->layer.v + row * v_bytes;
                runs[n++] = (struct line_range){v, v + (end - c) * v_bytes};
                if (op->layer.v_scale != NULL) {
                    const char *vs = (const char *)(op->layer.v_scale + row);
                    runs[n++] = (struct line_range){vs, vs + (end - c) * sizeof(float)};
                    bytes += (end - c) * (int64_t)sizeof(float);
                }
            }
            bytes += (end - c) * (k_bytes + v_bytes);
        }
    *lq = (line_queue){runs, n, 0, NULL, NULL};
    return (bytes + 63) / 64 + n; /* a run may start inside a line */
}

/* Asks for every line left in the queue. */
static void prefetch_rest(line_queue *lq)
{
    while (lq->p < lq->end || lq->next < lq->n)
        prefetch_lines(lq, 64);
}

static void gather_generic(const attn_plan *pl, attn_scratch *sc, const chunk_rows *cr,
                           int32_t g)
{
    gather_rows(pl, sc, cr, g);
}

/* Turns the rotary part of an f32 row by position pos (pre-RoPE mode): pair i
 * by pos * freq_scale * theta^(-2i/dims) (op->rope.theta is the layer's base),
 * cos and sin from a double angle
 * rounded to f32, the turn in f32, as kvrt_seq_shift turns stored K. */
static void rope_row(float *x, const kvrt_attention_op *op, int64_t pos)
{
    const kvrt_layout *L = &op->layer.layout;
    const int32_t dims = L->rot_dims;
    if (dims <= 0 || pos == 0)
        return;
    const kvrt_rope r = op->rope; /* theta: the layer's */
    float *y = x + L->rot_offset;
    for (int32_t i = 0; i < dims / 2; i++) {
        int32_t a, b;
        kvrt_rope_pair(r.style, dims, i, &a, &b);
        double angle = kvrt_rope_angle(&r, dims, i, pos);
        float c = (float)cos(angle), s = (float)sin(angle), ya = y[a], yb = y[b];
        y[a] = ya * c - yb * s;
        y[b] = ya * s + yb * c;
    }
}

/* e4m3fn code -> value (kvrt_e4m3_to_f32), filled once before the threads
 * start (kvrt_cpu_attention) and read by them. */
static float e4m3_value[256];
static _Atomic int e4m3_value_ready;

static void e4m3_table_init(void)
{
    if (atomic_load_explicit(&e4m3_value_ready, memory_order_acquire))
        return;
    for (int c = 0; c < 256; c++)
        e4m3_value[c] = kvrt_e4m3_to_f32((uint8_t)c);
    atomic_store_explicit(&e4m3_value_ready, 1, memory_order_release);
}

/* A quantized row of n codes to f32 values, as kvrt_dequant gives them:
 * code * scale (a table lookup for e4m3), NaN for the NaN codes. */
static void dequant_row(float *restrict dst, const void *src, int32_t dtype, int64_t n, float scale,
                        int avx2)
{
    int64_t i0 = 0;
#if KVRT_ATTENTION_X86
    if (avx2)
        i0 = kvrt_attn_dequant_row_avx2(dst, src, dtype, n, scale);
#endif
    (void)avx2;
    src = (const uint8_t *)src + i0;
    dst += i0;
    n -= i0;
    if (dtype == KVRT_LAYOUT_Q8) {
        const int8_t *q = src;
        const float nan = (float)NAN;
        for (int64_t i = 0; i < n; i++) {
            float v = (float)q[i] * scale;
            dst[i] = q[i] == -128 ? nan : v;
        }
        return;
    }
    const uint8_t *c = src;
    for (int64_t i = 0; i < n; i++)
        dst[i] = e4m3_value[c[i]] * scale;
}

/* Row `row` (n elements) of a K or V region as f32: dequantized with its
 * scale when the layer keeps scales, else converted. */
static void part_to_f32(float *dst, const void *base, const float *scales, int32_t dtype,
                        int64_t row, int32_t n, int avx2)
{
    if (scales != NULL)
        dequant_row(dst, (const int8_t *)base + row * n, dtype, n, scales[row], avx2);
    else
        row_to_f32(dst, base, dtype, row * n, n);
}

/* Rows of quantized layers (dequantized with their scales) and of pre-RoPE
 * caches (K turned by its slot's position) to f32; only these caches take
 * it. */
static void gather_dequant(const attn_plan *pl, attn_scratch *sc, const chunk_rows *cr, int32_t g)
{
    const kvrt_attention_op *op = pl->op;
    const kvrt_layout *L = &op->layer.layout;
    const int32_t dk = L->dim_k, dv = L->dim_v;
    const int64_t head_rows = (int64_t)g * L->block_size, bs = L->block_size;
    for (int32_t c = 0; c < cr->n; c++) {
        int64_t row = cr->row[c] + head_rows; /* == kvrt_scale_index of (slot, g) */
        float *k = sc->k + (int64_t)c * dk;
        part_to_f32(k, op->layer.k, op->layer.k_scale, L->dtype, row, dk, pl->dequant_avx2);
        if (op->rope_in_attention) {
            int64_t slot = cr->row[c] / ((int64_t)L->n_heads * bs) * bs + cr->row[c] % bs;
            rope_row(k, op, op->pos[slot]);
        }
        if (op->mla)
            continue;
        part_to_f32(sc->v + (int64_t)c * dv, op->layer.v, op->layer.v_scale, L->dtype, row, dv,
                    pl->dequant_avx2);
    }
}

/* ---- one unit ---- */

/* Updates row r's (m, l, acc) with the chunk's nv gathered rows, of which
 * the row's token sees those with see[c]. */
KVRT_ALWAYS_INLINE void update_row(const attn_plan *pl, attn_scratch *sc, int32_t r,
                                   const uint8_t *see, int32_t nv, const float *v_rows,
                                   int64_t v_stride, const int fused)
{
    float *s = sc->s, alpha;
    int all_nonzero;
    dot_rows_isa(s, sc->q + (int64_t)r * pl->dim_k, sc->k, pl->dim_k, nv, pl->dim_k, fused);
    if (!softmax_row(pl->op, s, see, nv, sc->m + r, sc->l + r, &alpha, &all_nonzero, fused))
        return;
    float *acc = sc->acc + (int64_t)r * pl->dim_v;
    if (alpha != 1.0f)
        for (int32_t d = 0; d < pl->dim_v; d++)
            acc[d] *= alpha;
    accumulate(acc, s, v_rows, v_stride, nv, all_nonzero, pl->dim_v, fused);
}


/* What a unit covers: its rows, its sequence's page table, its slots
 * [begin, end) and its tokens' positions. */
typedef struct unit_span {
    unit_rows      ur;
    const int32_t *pages;
    int64_t        begin, end;
    int64_t        qpos[TILE_TOKENS];
} unit_span;

static void span_of(const attn_plan *pl, int64_t unit, unit_span *us)
{
    const kvrt_attention_op *op = pl->op;
    const int32_t split = (int32_t)(unit % pl->n_splits);
    us->ur = rows_of(pl, unit / pl->n_splits);
    const int32_t seq = op->tok_seq[us->ur.t0];
    us->pages = op->page_indices + op->page_indptr[seq];
    us->begin = split * pl->split_len;
    us->end = us->begin + pl->split_len;
    if (us->end > op->seq_n_slots[seq])
        us->end = op->seq_n_slots[seq];
    for (int32_t t = 0; t < us->ur.nt; t++)
        us->qpos[t] = op->tok_pos[us->ur.t0 + t];
}

/* Queues the K/V lines of the first chunk of unit `unit` (collected into
 * cr), so that the unit a thread takes next starts on rows already in its
 * caches: started cold, a unit's first chunk costs about three others. */
static int64_t queue_first_chunk(const attn_plan *pl, int64_t unit, chunk_rows *cr,
                                 struct line_range *ranges, line_queue *lq)
{
    unit_span us;
    span_of(pl, unit, &us);
    collect_next(pl, us.pages, us.qpos, us.ur.nt, us.begin, us.end, cr);
    return queue_chunk(pl, cr, us.ur.g0, us.ur.g1, ranges, lq);
}

/* One unit, in the copy `copy` (a compile-time constant once inlined): 0
 * the portable one and 1 the AVX2 + FMA one, over gathered f32 rows; 2 a
 * direct copy, pl->heads (AVX2 or AVX-512), reading the cache's rows.
 * `next`: the unit this thread takes after it (-1 none), whose first rows
 * are prefetched during this one's last chunk. */
KVRT_ALWAYS_INLINE void unit_body(const attn_plan *pl, attn_scratch *sc, int64_t unit,
                                  int64_t next, const int copy)
{
    const int fused = copy == 1, direct = copy == 2;
    const kvrt_attention_op *op = pl->op;
    const int32_t dk = pl->dim_k, dv = pl->dim_v, chunk = pl->chunk;
    unit_span us;
    span_of(pl, unit, &us);
    const unit_rows ur = us.ur;
    const int32_t rows = ur.nt * ur.nh;
    const int32_t *pages = us.pages;
    const int64_t *qpos = us.qpos, end = us.end;
    for (int32_t r = 0; r < rows; r++) {
        int64_t at = ((int64_t)(ur.t0 + r / ur.nh) * op->n_q_heads + ur.h0 + r % ur.nh) * dk;
        row_to_f32(sc->q + (int64_t)r * dk, op->q, op->q_dtype, at, dk);
        if (op->rotate_q)
            rope_row(sc->q + (int64_t)r * dk, op, qpos[r / ur.nh]);
        sc->m[r] = -INFINITY;
        sc->l[r] = 0.0f;
    }
    memset(sc->acc, 0, (size_t)rows * dv * sizeof(float));

    /* Chunk by chunk; the visible rows of the next PREFETCH_CHUNKS chunks
     * are known (and prefetched) before the current one is computed; the
     * first chunks' rows are asked for at once, the rest from inside the
     * arithmetic. For each chunk the kv heads are taken in order, so that
     * each block's K and V regions are read front to back. */
    const float *v_rows = op->mla ? sc->k : sc->v;
    const int64_t v_stride = op->mla ? dk : dv;
    chunk_rows ring[PREFETCH_CHUNKS + 2]; /* and the next unit's first chunk */
    for (int k = 0; k <= PREFETCH_CHUNKS + 1; k++) {
        ring[k].row = sc->row[k];
        ring[k].see = sc->see[k];
    }
    int64_t i0 = us.begin;
    for (int k = 0; k < PREFETCH_CHUNKS; k++) {
        line_queue lq;
        i0 = collect_next(pl, pages, qpos, ur.nt, i0, end, &ring[k]);
        queue_chunk(pl, &ring[k], ur.g0, ur.g1, sc->ranges, &lq);
        prefetch_rest(&lq);
    }
    for (int64_t c = 0; ring[c % (PREFETCH_CHUNKS + 1)].n > 0; c++) {
        chunk_rows *cur = &ring[c % (PREFETCH_CHUNKS + 1)];
        chunk_rows *ahead = &ring[(c + PREFETCH_CHUNKS) % (PREFETCH_CHUNKS + 1)];
        i0 = collect_next(pl, pages, qpos, ur.nt, i0, end, ahead);
        /* The lines of the chunk PREFETCH_CHUNKS ahead are asked for a few
         * at a time from inside this chunk's arithmetic: a slice per row
         * updated, two per step of the AVX-512 copy's dot and V loops. */
        line_queue lq;
        int64_t lines = queue_chunk(pl, ahead, ur.g0, ur.g1, sc->ranges, &lq);
        if (ahead->n == 0 && next >= 0) /* the last chunk: the next unit's first */
            lines = queue_first_chunk(pl, next, &ring[PREFETCH_CHUNKS + 1], sc->ranges, &lq);
        const int lines_per_row = (int)((lines + rows - 1) / rows);
        for (int32_t g = ur.g0; g < ur.g1; g++) {
            /* this kv head's query heads among the unit's */
            int32_t h_first = g * pl->group > ur.h0 ? g * pl->group - ur.h0 : 0;
            int32_t h_end = (g + 1) * pl->group - ur.h0 < ur.nh ? (g + 1) * pl->group - ur.h0
                                                               : ur.nh;
            const kvrt_layout *L = &op->layer.layout;
            const int64_t first = (int64_t)g * L->block_size; /* kv head g's row 0 */
            const int quant = op->layer.k_scale != NULL;
            const head_rows hr = {
                (const char *)op->layer.k + first * dk * L->elem_size,
                op->mla ? (const char *)op->layer.k + first * dk * L->elem_size
                        : (const char *)op->layer.v + first * dv * L->elem_size,
                quant ? op->layer.k_scale + first : NULL,
                quant && !op->mla ? op->layer.v_scale + first : NULL,
                cur->row,
                (int64_t)dk * L->elem_size,
                (int64_t)(op->mla ? dk : dv) * L->elem_size,
                cur->n};
            sc->chunk_now = cur;
            sc->head = g;
            sc->gathered = -1;
            if (!direct) /* the direct copies read the cache's rows */
                pl->gather(pl, sc, cur, g);
            for (int32_t t = 0; t < ur.nt; t++) {
                if (direct) {
                    if (cur->seen[t] && h_end > h_first)
                        pl->heads(pl, sc, t * ur.nh + h_first, h_end - h_first,
                                  cur->see + t * chunk, &hr, &lq);
                    continue;
                }
                for (int32_t h = h_first; h < h_end; h++) {
                    prefetch_lines(&lq, lines_per_row);
                    if (cur->seen[t])
                        update_row(pl, sc, t * ur.nh + h, cur->see + t * chunk, cur->n,
                                   v_rows, v_stride, fused);
                }
            }
        }
        prefetch_rest(&lq); /* what the loops did not take */
    }

    if (pl->n_splits == 1) {
        write_rows(pl, &ur, sc->acc, sc->l, sc->out, 0, rows);
        return;
    }
    for (int32_t r = 0; r < rows; r++) {
        float *part = pl->partial + ((size_t)unit * pl->rows_max + r) * (2 + (size_t)dv);
        part[0] = sc->m[r];
        part[1] = sc->l[r];
        memcpy(part + 2, sc->acc + (int64_t)r * dv, (size_t)dv * sizeof(float));
    }
}

static void unit_generic(const attn_plan *pl, attn_scratch *sc, int64_t unit, int64_t next)
{
    unit_body(pl, sc, unit, next, 0);
}

#if KVRT_ATTENTION_X86
__attribute__((target("avx2,fma"))) static void
unit_avx2(const attn_plan *pl, attn_scratch *sc, int64_t unit, int64_t next)
{
    unit_body(pl, sc, unit, next, 1);
}
#endif

/* The direct copies: the unit's bookkeeping is the same for both, their
 * kernels (pl->heads) are compiled for their instruction sets. */
static void unit_direct(const attn_plan *pl, attn_scratch *sc, int64_t unit, int64_t next)
{
    unit_body(pl, sc, unit, next, 2);
}

/* Merges the splits of rows [r0, r0 + MERGE_ROWS) of base unit
 * `base_unit` (those it has): for each row, m = max m_i,
 * l = sum l_i e^(m_i - m), acc = sum acc_i e^(m_i - m) (l NaN if some l_i
 * is: a split saw a NaN logit). */
static void merge_splits(const attn_plan *pl, attn_scratch *sc, int64_t base_unit, int32_t r0)
{
    const unit_rows ur = rows_of(pl, base_unit);
    const int32_t dv = pl->dim_v;
    const int32_t r1 = r0 + MERGE_ROWS < ur.nt * ur.nh ? r0 + MERGE_ROWS : ur.nt * ur.nh;
    const size_t part_size = 2 + (size_t)dv;
    const size_t step = (size_t)pl->rows_max * part_size; /* to the next split's row */
    for (int32_t r = r0; r < r1; r++) {
        const float *part = pl->partial + ((size_t)base_unit * pl->n_splits * pl->rows_max + r) *
                                              part_size;
        float *acc = sc->acc + (int64_t)r * dv, m = -INFINITY, l = 0.0f;
        int nan = 0;
        for (int32_t i = 0; i < pl->n_splits; i++) {
            m = part[i * step] > m ? part[i * step] : m;
            nan |= part[i * step + 1] != part[i * step + 1];
        }
        memset(acc, 0, (size_t)dv * sizeof(float));
        for (int32_t i = 0; i < pl->n_splits && !nan; i++) {
            const float *p = part + i * step;
            if (!(p[1] > 0.0f))
                continue; /* nothing visible in this split */
            const float w = exp_nonpositive(p[0] - m, 0);
            l += w * p[1];
            int32_t d = 0;
            for (; d + LANES <= dv; d += LANES)
                for (int k = 0; k < LANES; k++)
                    acc[d + k] += w * p[2 + d + k];
            for (; d < dv; d++)
                acc[d] += w * p[2 + d];
        }
        sc->l[r] = nan ? NAN : l;
    }
    write_rows(pl, &ur, sc->acc, sc->l, sc->out, r0, r1);
}

kvrt_status kvrt_cpu_attention(const kvrt_attention_op *op, int max_threads)
{
    const kvrt_layout *L = &op->layer.layout;
    if (op->n_tokens <= 0)
        return KVRT_OK;

    attn_plan pl;
    memset(&pl, 0, sizeof pl);
    pl.op = op;
    pl.dim_k = L->dim_k;
    pl.dim_v = op->dim_v;
    pl.group = op->n_q_heads / L->n_heads;
    int32_t dim_max = pl.dim_k > pl.dim_v ? pl.dim_k : pl.dim_v;
    /* quantized rows and pre-RoPE keys: gathered by gather_dequant */
    const int quant = kvrt_dtype_quantized(L->dtype);
    if (L->dtype == KVRT_LAYOUT_FP8_E4M3)
        e4m3_table_init();

    /* The copy: a direct one (pl.heads) where the instruction set has one
     * and keys need no turn (pre-RoPE keys are turned as they are
     * gathered); the AVX2 one reads whole 8-element vectors, so it takes
     * dims that are multiples of 8. Otherwise the gathered-row copies. */
    void (*unit)(const attn_plan *, attn_scratch *, int64_t, int64_t) = unit_generic;
    pl.gather = quant || op->rope_in_attention || op->rotate_q ? gather_dequant : gather_generic;
    const int isa = kvrt_cpu_isa_level();
    (void)isa;
#if KVRT_ATTENTION_X86
    if (isa >= KVRT_CPU_ISA_AVX2) {
        unit = unit_avx2;
        pl.dequant_avx2 = 1;
        if (pl.gather == gather_generic)
            pl.gather = kvrt_attn_gather_avx2;
        if (!op->rope_in_attention && pl.dim_k % 8 == 0 && pl.dim_v % 8 == 0)
            pl.heads = kvrt_attn_heads_avx2;
    }
#endif
#if KVRT_ATTENTION_AVX512
    if (isa >= KVRT_CPU_ISA_AVX512) {
        if (pl.gather == kvrt_attn_gather_avx2)
            pl.gather = kvrt_attn_gather_avx512;
        if (!op->rope_in_attention)
            pl.heads = kvrt_attn_heads_avx512;
    }
#endif
    if (pl.heads != NULL)
        unit = unit_direct;

    /* Query heads per unit: those of as many kv heads as fit ROW_FLOATS (all
     * of a token's, usually: then a block's K and V regions are read as two
     * bursts), or, when one kv head's do not fit (MLA's 128 heads of 576),
     * a part of one kv head's. */
    int32_t heads_per_unit;
    if ((int64_t)pl.group * dim_max <= ROW_FLOATS) {
        pl.kv_per_unit = (int32_t)(ROW_FLOATS / ((int64_t)pl.group * dim_max));
        if (pl.kv_per_unit > L->n_heads)
            pl.kv_per_unit = L->n_heads;
        pl.head_units = (L->n_heads + pl.kv_per_unit - 1) / pl.kv_per_unit;
        heads_per_unit = pl.kv_per_unit * pl.group;
    } else {
        int32_t parts = (int32_t)(((int64_t)pl.group * dim_max + ROW_FLOATS - 1) / ROW_FLOATS);
        pl.kv_per_unit = 0;
        pl.head_sub = (pl.group + parts - 1) / parts;
        pl.head_units = L->n_heads * ((pl.group + pl.head_sub - 1) / pl.head_sub);
        heads_per_unit = pl.head_sub;
    }
    pl.kv_max = pl.kv_per_unit > 0 ? pl.kv_per_unit : 1;
    int32_t tile_tokens = (int32_t)(ROW_FLOATS / ((int64_t)heads_per_unit * dim_max));
    tile_tokens = tile_tokens < 1 ? 1 : tile_tokens > TILE_TOKENS ? TILE_TOKENS : tile_tokens;
    pl.rows_max = tile_tokens * heads_per_unit;
    int32_t dim_row = L->dim_k > (op->mla ? 0 : L->dim_v) ? L->dim_k : L->dim_v;
    pl.chunk = CHUNK_FLOATS / (dim_row > 0 ? dim_row : 1);
    /* The direct copies read the cache's rows as they are, so their chunk
     * is set by their bytes: larger chunks, fewer fixed costs per key.
     * MLA's rows are read again for each block of four of the 128 heads:
     * their chunk stays at L1's measure. */
    if (pl.heads != NULL && !op->mla)
        pl.chunk = (int32_t)(CHUNK_BYTES / (((int64_t)L->dim_k + L->dim_v) * L->elem_size));
    pl.chunk = pl.chunk < LANES ? LANES : pl.chunk > CHUNK_MAX ? CHUNK_MAX : pl.chunk;
    pl.chunk = (int32_t)round_up((size_t)pl.chunk, LANES);

    int n_threads = max_threads > 1 ? max_threads : 1;

    /* Tiles, counted first so that one allocation holds everything, with
     * the slots they cover. */
    int32_t n_tiles = 1;
    int64_t tile_slots = op->seq_n_slots[op->tok_seq[0]];
    for (int32_t t = 1, len = 1; t < op->n_tokens; t++, len++)
        if (op->tok_seq[t] != op->tok_seq[t - 1] || len == tile_tokens) {
            n_tiles++;
            tile_slots += op->seq_n_slots[op->tok_seq[t]];
            len = 0;
        }
    int64_t max_slots = 0;
    for (int32_t s = 0; s < op->n_seqs; s++)
        max_slots = op->seq_n_slots[s] > max_slots ? op->seq_n_slots[s] : max_slots;

    /* Split the slots so that each thread has about UNITS_PER_THREAD
     * units of work: a unit covers at most (all slots of all units) /
     * (threads * UNITS_PER_THREAD) slots, and at least SPLIT_MIN_SLOTS. A
     * long sequence among short ones is then spread over the threads too.
     * Splits end on whole chunks. */
    int64_t n_base = (int64_t)n_tiles * pl.head_units;
    pl.n_splits = 1;
    pl.split_len = max_slots;
    if (n_threads > 1) {
        int64_t len = tile_slots * pl.head_units / ((int64_t)UNITS_PER_THREAD * n_threads);
        len = len < SPLIT_MIN_SLOTS ? SPLIT_MIN_SLOTS : len;
        len = (int64_t)round_up((size_t)len, (size_t)pl.chunk);
        if (len < max_slots) {
            pl.n_splits = (int32_t)((max_slots + len - 1) / len);
            pl.split_len = len;
        }
    }
    int64_t n_units = n_base * pl.n_splits;
    if (n_threads > n_units)
        n_threads = (int)n_units;

    attn_scratch sizing;
    size_t per_thread = scratch_carve(&pl, NULL, &sizing);
    size_t partial_bytes = pl.n_splits > 1 ? (size_t)n_units * pl.rows_max *
                                                 (2 + (size_t)pl.dim_v) * sizeof(float)
                                           : 0;
    size_t tiles_bytes = round_up(((size_t)n_tiles + 1) * sizeof(int32_t), 64);
    size_t total = tiles_bytes + round_up(partial_bytes, 64) + per_thread * n_threads;
    char *mem = aligned_alloc(64, total);
    if (!mem)
        return KVRT_ERR_OUT_OF_MEMORY;

    int32_t *tile_first = (int32_t *)mem;
    n_tiles = 0;
    tile_first[0] = 0;
    for (int32_t t = 1, len = 1; t < op->n_tokens; t++, len++)
        if (op->tok_seq[t] != op->tok_seq[t - 1] || len == tile_tokens) {
            tile_first[++n_tiles] = t;
            len = 0;
        }
    tile_first[++n_tiles] = op->n_tokens;
    pl.n_tiles = n_tiles;
    pl.tile_first = tile_first;
    pl.partial = pl.n_splits > 1 ? (float *)(mem + tiles_bytes) : NULL;
    char *thread_mem = mem + tiles_bytes + round_up(partial_bytes, 64);

    _Atomic int64_t next_unit = 0;
    const int32_t merge_parts = (pl.rows_max + MERGE_ROWS - 1) / MERGE_ROWS;
#ifdef _OPENMP
#  pragma omp parallel num_threads(n_threads)
#endif
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        attn_scratch sc;
        scratch_carve(&pl, thread_mem + per_thread * tid, &sc);
        memset(sc.spare, 0, (size_t)pl.dim_v * sizeof(float));
        /* Units are taken dynamically, each thread claiming its next one
         * as it starts one, so that it can prefetch the next one's first
         * rows. */
        int64_t u = atomic_fetch_add_explicit(&next_unit, 1, memory_order_relaxed);
        while (u < n_units) {
            int64_t after = atomic_fetch_add_explicit(&next_unit, 1, memory_order_relaxed);
            unit(&pl, &sc, u, after < n_units ? after : -1);
            u = after;
        }
        if (pl.n_splits > 1) {
#ifdef _OPENMP
#  pragma omp barrier
#  pragma omp for schedule(dynamic, 1)
#endif
            for (int64_t b = 0; b < n_base * merge_parts; b++)
                merge_splits(&pl, &sc, b / merge_parts, (int32_t)(b % merge_parts) * MERGE_ROWS);
        }
    }
    free(mem);
    return KVRT_OK;
}

