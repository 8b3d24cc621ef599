/*
 * attention_cpu_impl.h: what the CPU attention's files share (the plan,
 * the per-thread scratch, a chunk's rows, the prefetch queue, the scalar
 * arithmetic every copy falls back on) and the entry points of the
 * instruction-set files: attention_cpu.c holds the plan, the chunking,
 * the unit loop and the merge, and the portable copy; attention_cpu_avx2.c
 * and attention_cpu_avx512.c the kernels of their instruction sets (the
 * file map of attention_cpu.c's top comment).
 */
#ifndef KVRT_ATTENTION_CPU_IMPL_H
#define KVRT_ATTENTION_CPU_IMPL_H

#include "attention_cpu.h"
#include "cpu_isa.h"

#include <math.h>
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#  include <omp.h>
#endif

#if defined(__GNUC__)
#  define KVRT_ALWAYS_INLINE static inline __attribute__((always_inline))
/* kernels with many live vectors: their own functions, so that the
 * caller's invariants do not take their registers */
#  define KVRT_NOINLINE static __attribute__((noinline))
#else
#  define KVRT_ALWAYS_INLINE static inline
#  define KVRT_NOINLINE static
#endif

/* KVRT_ATTENTION_ISA caps the x86 copies compiled in: 0 the portable code
 * only, 1 also AVX2 + FMA + F16C, 2 (the default) also AVX-512 (F, BW, VL). The tests
 * build every level, so that each copy is tested on a processor that has
 * the next. */
#ifndef KVRT_ATTENTION_ISA
#  define KVRT_ATTENTION_ISA 2
#endif
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && KVRT_ATTENTION_ISA >= 1
#  define KVRT_ATTENTION_X86 1
#  include <immintrin.h>
#else
#  define KVRT_ATTENTION_X86 0
#endif
#define KVRT_ATTENTION_AVX512 (KVRT_ATTENTION_X86 && KVRT_ATTENTION_ISA >= 2)
#define KVRT_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define KVRT_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

#if defined(__GNUC__)
/* loops over a few registers: unrolled, so that arrays of vectors stay in
 * registers */
#  define KVRT_UNROLL _Pragma("GCC unroll 16")
#  define KVRT_PREFETCH(p) __builtin_prefetch(p)
#else
#  define KVRT_UNROLL
#  define KVRT_PREFETCH(p) ((void)(p))
#endif

enum {
    LANES = 8,              /* elements per step of an inner loop */
    TILE_TOKENS = 8,        /* tokens of one sequence sharing a unit, at most */
    CHUNK_MAX = 64,         /* slots per chunk, at most */
    KEY_PAD = 16,           /* rows of s are padded to a multiple of this: the AVX-512
                             * softmax takes logits 16 at a time */
    ROW_BLOCK = 4,          /* query rows the AVX-512 code takes together, at most */
    CHUNK_FLOATS = 2048,    /* f32 elements of one chunk's K (8 KiB: L1 with its V) */
    CHUNK_BYTES = 16384,    /* AVX-512 copy: bytes of K and V of one kv head per chunk */
    ROW_FLOATS = 32768,     /* f32 elements of a unit's queries (and of acc), about */
    SPLIT_MIN_SLOTS = 256,  /* a split of a sequence covers at least this many slots */
    UNITS_PER_THREAD = 2,   /* units of work per thread that splits aim for: a thread
                             * starts each unit by prefetching; its partial sums are merged */
    PREFETCH_CHUNKS = 1,    /* chunks ahead whose rows are prefetched */
    MERGE_ROWS = 8,         /* rows of a base unit whose splits one thread merges */
};

/* ---- arithmetic, written so that loops over it vectorize ---- */

/* a * b + c, fused where the copy being compiled has FMA (fused is a
 * compile-time constant once inlined). */
KVRT_ALWAYS_INLINE float madd(float a, float b, float c, const int fused)
{
    return fused ? fmaf(a, b, c) : c + a * b;
}

typedef union {
    float    f;
    uint32_t u;
} bits32;

/* kvrt_f16_to_f32 without branches (bit-identical for every input; the
 * tests check all 65536), so that a loop over it vectorizes. */
KVRT_ALWAYS_INLINE float f16_to_f32(uint16_t h)
{
    bits32 v, sub;
    uint32_t em = (uint32_t)(h & 0x7fffu) << 13; /* exponent and mantissa in place */
    uint32_t exp = em & 0x0f800000u;
    uint32_t is_special = 0u - (uint32_t)(exp == 0x0f800000u); /* inf, NaN */
    uint32_t is_small = 0u - (uint32_t)(exp == 0);              /* zero, subnormal */
    v.u = em + ((127u - 15u) << 23);                            /* rebias a normal */
    sub.u = v.u + (1u << 23);
    sub.f -= 6.103515625e-05f;                                  /* mant * 2^-24 */
    v.u += is_special & ((128u - 16u) << 23);
    v.u = (v.u & ~is_small) | (sub.u & is_small);
    v.u |= (uint32_t)(h & 0x8000u) << 16;
    return v.f;
}

KVRT_ALWAYS_INLINE float bf16_to_f32(uint16_t b)
{
    bits32 v;
    v.u = (uint32_t)b << 16;
    return v.f;
}

/* dst[0, n) = elements [index, index + n) of an array of `dtype`, as f32.
 * One loop per dtype: no branch per element. */
KVRT_ALWAYS_INLINE void row_to_f32(float *restrict dst, const void *base, int32_t dtype,
                                   int64_t index, int32_t n)
{
    int32_t i = 0;
    if (dtype == KVRT_LAYOUT_F32) {
        memcpy(dst, (const float *)base + index, (size_t)n * sizeof(float));
    } else if (dtype == KVRT_LAYOUT_F16) {
        const uint16_t *src = (const uint16_t *)base + index;
        for (; i + LANES <= n; i += LANES)
            for (int l = 0; l < LANES; l++)
                dst[i + l] = f16_to_f32(src[i + l]);
        for (; i < n; i++)
            dst[i] = f16_to_f32(src[i]);
    } else {
        const uint16_t *src = (const uint16_t *)base + index;
        for (; i + LANES <= n; i += LANES)
            for (int l = 0; l < LANES; l++)
                dst[i + l] = bf16_to_f32(src[i + l]);
        for (; i < n; i++)
            dst[i] = bf16_to_f32(src[i]);
    }
}

/* e^x for x <= 0, within 2 ulp: Cody-Waite reduction and Cephes' expf
 * polynomial. Below -87.33 (and for -inf, a masked logit) it gives 0
 * instead of a subnormal, an absolute error under 2^-125 against weights
 * whose largest is 1; NaN stays NaN. Branch-free, so that a loop over it
 * vectorizes. */
KVRT_ALWAYS_INLINE float exp_nonpositive(float x, const int fused)
{
    bits32 xc, lo, y;
    lo.f = -87.33654f;
    xc.f = x;
    uint32_t in_range = 0u - (uint32_t)(x >= lo.f); /* selects by mask, not branches */
    xc.u = (xc.u & in_range) | (lo.u & ~in_range);
    int32_t n = (int32_t)(xc.f * 1.44269504088896341f - 0.5f); /* round(x / ln 2), x <= 0 */
    float fn = (float)n;
    float r = madd(fn, -0.693359375f, xc.f, fused);
    r = madd(fn, 2.12194440e-4f, r, fused);
    float p = 1.9875691500e-4f;
    p = madd(p, r, 1.3981999507e-3f, fused);
    p = madd(p, r, 8.3334519073e-3f, fused);
    p = madd(p, r, 4.1665795894e-2f, fused);
    p = madd(p, r, 1.6666665459e-1f, fused);
    p = madd(p, r, 5.0000001201e-1f, fused);
    p = madd(p, r * r, r, fused) + 1.0f;
    bits32 scale;
    scale.u = (uint32_t)(n + 127) << 23;
    y.f = p * scale.f;
    uint32_t is_nan = 0u - (uint32_t)(x != x);
    y.u = (y.u & in_range) | (is_nan & 0x7fc00000u);
    return y.f;
}

KVRT_ALWAYS_INLINE float sum_lanes(const float *a)
{
    return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
}

/* s[c] = dot(q, k + c * stride) over dim elements, for c in [0, n). Four
 * keys at a time, each with LANES partial sums: independent chains, one
 * load of q for four keys. */
KVRT_ALWAYS_INLINE void dot_rows(float *restrict s, const float *restrict q,
                                 const float *restrict k, int64_t stride, int32_t n,
                                 int32_t dim, const int fused)
{
    int32_t c = 0;
    for (; c + 4 <= n; c += 4) {
        const float *k0 = k + c * stride, *k1 = k0 + stride, *k2 = k1 + stride,
                    *k3 = k2 + stride;
        float a0[LANES] = {0}, a1[LANES] = {0}, a2[LANES] = {0}, a3[LANES] = {0};
        int32_t d = 0;
        for (; d + LANES <= dim; d += LANES)
            for (int l = 0; l < LANES; l++) {
                a0[l] = madd(q[d + l], k0[d + l], a0[l], fused);
                a1[l] = madd(q[d + l], k1[d + l], a1[l], fused);
                a2[l] = madd(q[d + l], k2[d + l], a2[l], fused);
                a3[l] = madd(q[d + l], k3[d + l], a3[l], fused);
            }
        for (; d < dim; d++) {
            a0[0] = madd(q[d], k0[d], a0[0], fused);
            a1[0] = madd(q[d], k1[d], a1[0], fused);
            a2[0] = madd(q[d], k2[d], a2[0], fused);
            a3[0] = madd(q[d], k3[d], a3[0], fused);
        }
        s[c] = sum_lanes(a0);
        s[c + 1] = sum_lanes(a1);
        s[c + 2] = sum_lanes(a2);
        s[c + 3] = sum_lanes(a3);
    }
    for (; c < n; c++) {
        const float *k0 = k + c * stride;
        float a0[LANES] = {0};
        int32_t d = 0;
        for (; d + LANES <= dim; d += LANES)
            for (int l = 0; l < LANES; l++)
                a0[l] = madd(q[d + l], k0[d + l], a0[l], fused);
        for (; d < dim; d++)
            a0[0] = madd(q[d], k0[d], a0[0], fused);
        s[c] = sum_lanes(a0);
    }
}

/* acc[0, dim) += w[c] * (v + c * stride)[0, dim) for c in [0, n) with
 * w[c] != 0 (a zero weight is a key this row does not see: its row is not
 * touched, so an inf there cannot become a NaN; all_nonzero: none is 0). Eight keys per pass over
 * acc, so that acc is loaded and stored once per eight rows of V and the
 * iterations of a pass are independent of each other. */
KVRT_ALWAYS_INLINE void accumulate(float *restrict acc, const float *restrict w,
                                   const float *restrict v, int64_t stride, int32_t n,
                                   int all_nonzero, int32_t dim, const int fused)
{
    int32_t key[CHUNK_MAX], n_keys = 0;
    for (int32_t c = 0; c < n; c++) {
        key[n_keys] = c;
        n_keys += all_nonzero || w[c] != 0.0f;
    }
    int32_t j = 0;
    for (; j + 8 <= n_keys; j += 8) {
        const float *v0 = v + key[j] * stride, *v1 = v + key[j + 1] * stride,
                    *v2 = v + key[j + 2] * stride, *v3 = v + key[j + 3] * stride,
                    *v4 = v + key[j + 4] * stride, *v5 = v + key[j + 5] * stride,
                    *v6 = v + key[j + 6] * stride, *v7 = v + key[j + 7] * stride;
        const float w0 = w[key[j]], w1 = w[key[j + 1]], w2 = w[key[j + 2]], w3 = w[key[j + 3]],
                    w4 = w[key[j + 4]], w5 = w[key[j + 5]], w6 = w[key[j + 6]],
                    w7 = w[key[j + 7]];
        int32_t d = 0;
        for (; d + LANES <= dim; d += LANES)
            for (int l = 0; l < LANES; l++) {
                float a = madd(w0, v0[d + l], acc[d + l], fused);
                float b = w4 * v4[d + l];
                a = madd(w1, v1[d + l], a, fused);
                b = madd(w5, v5[d + l], b, fused);
                a = madd(w2, v2[d + l], a, fused);
                b = madd(w6, v6[d + l], b, fused);
                a = madd(w3, v3[d + l], a, fused);
                b = madd(w7, v7[d + l], b, fused);
                acc[d + l] = a + b;
            }
        for (; d < dim; d++) {
            float a = madd(w0, v0[d], acc[d], fused);
            float b = w4 * v4[d];
            a = madd(w1, v1[d], a, fused);
            b = madd(w5, v5[d], b, fused);
            a = madd(w2, v2[d], a, fused);
            b = madd(w6, v6[d], b, fused);
            a = madd(w3, v3[d], a, fused);
            b = madd(w7, v7[d], b, fused);
            acc[d] = a + b;
        }
    }
    for (; j < n_keys; j++) {
        const float *v0 = v + key[j] * stride;
        const float w0 = w[key[j]];
        int32_t d = 0;
        for (; d + LANES <= dim; d += LANES)
            for (int l = 0; l < LANES; l++)
                acc[d + l] = madd(w0, v0[d + l], acc[d + l], fused);
        for (; d < dim; d++)
            acc[d] = madd(w0, v0[d], acc[d], fused);
    }
}

/* ---- plan and scratch ---- */

typedef struct attn_plan attn_plan;
typedef struct attn_scratch attn_scratch;
typedef struct chunk_rows chunk_rows;
struct head_rows;
struct line_queue;
/* Converts the K and V rows of kv head g at a chunk's visible slots to f32. */
typedef void (*gather_fn)(const attn_plan *pl, attn_scratch *sc, const chunk_rows *cr,
                          int32_t g);

struct attn_plan {
    const kvrt_attention_op *op;
    gather_fn      gather;
    int32_t        dim_k;      /* elements of q and of a K row */
    int32_t        dim_v;      /* output elements per head */
    int32_t        group;      /* query heads per kv head */
    /* A unit's query heads: kv_per_unit whole kv heads (all their query
     * heads), or, when one kv head's query heads do not fit (kv_per_unit 0),
     * head_sub of one kv head's. head_units: units per (tile, split). */
    int32_t        kv_per_unit;
    int32_t        head_sub;
    int32_t        head_units;
    int32_t        chunk;      /* slots per chunk, a multiple of LANES */
    int32_t        rows_max;   /* (token, query head) rows per unit, at most */
    int32_t        n_tiles;
    const int32_t *tile_first; /* [n_tiles + 1]: tile i is tokens [first[i], first[i+1]) */
    int32_t        n_splits;   /* splits of each sequence's slots */
    int64_t        split_len;  /* slots per split */
    float         *partial;    /* n_splits > 1: [units][rows_max][2 + dim_v] (m, l, acc) */
    int32_t        kv_max;     /* kv heads of a unit, at most */
    int            dequant_avx2; /* gather_dequant may use AVX2 */
    /* The direct copy's kernel (NULL: the gathered-row copies): updates
     * rows [r0, r0 + n) of the unit (one token's query heads of one kv
     * head) with the chunk's rows hr, of which the token sees those with
     * see[c], reading the cache's rows (gathered only for rows that skip
     * some key), and asks for the queue's lines as it goes. */
    void (*heads)(const attn_plan *pl, attn_scratch *sc, int32_t r0, int32_t n,
                  const uint8_t *see, const struct head_rows *hr, struct line_queue *lq);
};

/* Bytes [p, end) of K or V to prefetch, and a queue of them taken a line or
 * two at a time from inside the arithmetic's loops, so that the next
 * chunk's misses are spread over this chunk's work: asked for all at once,
 * they would wait for each other as a gather does. */
struct line_range {
    const char *p, *end;
};
typedef struct line_queue {
    const struct line_range *r;
    int32_t     n, next;
    const char *p, *end;
} line_queue;

/* One thread's buffers. */
struct attn_scratch {
    float   *q;      /* [rows_max][dim_k] queries as f32 */
    float   *acc;    /* [rows_max][dim_v] */
    float   *m, *l;  /* [rows_max] running max and sum of weights */
    float   *k;      /* [chunk][dim_k] visible K rows of the chunk as f32 */
    float   *v;      /* [chunk][dim_v] their V rows (not used for MLA) */
    float   *s;      /* [ROW_BLOCK][chunk rounded up to KEY_PAD] logits, then
                      * weights (the portable code uses the first row) */
    /* chunk_rows.row ([chunk]) and .see ([TILE_TOKENS][chunk]) of the chunk
     * being computed, of the PREFETCH_CHUNKS after it and of the first chunk
     * of the thread's next unit */
    int64_t *row[PREFETCH_CHUNKS + 2];
    struct line_range *ranges; /* [4 * n_kv of a unit * chunk]: a chunk's K/V runs
                                * and their scales' */
    uint8_t *see[PREFETCH_CHUNKS + 2];
    float   *out;    /* [dim_v] one output row before its conversion */
    /* AVX-512 copy: the chunk and kv head being computed, the kv head whose
     * rows k and v hold (-1: none yet; they are converted only for rows
     * that skip some key), and where the rows of a block of four that take
     * no key add their (meaningless) sums */
    const chunk_rows *chunk_now;
    int32_t  head, gathered;
    float   *spare;  /* [dim_v] */
};

/* The slots of one chunk that some token of the tile sees. */
struct chunk_rows {
    int32_t  n;                  /* visible rows */
    int32_t  seen[TILE_TOKENS];  /* of which each token of the tile sees */
    int64_t *row;                /* [chunk] their rows in K and V of kv head 0;
                                  * kv head g's are block_size rows further each:
                                  * K at row * dim_k, V at row * dim_v */
    uint8_t *see;                /* [TILE_TOKENS][chunk]: token t sees row c */
};

static inline size_t round_up(size_t n, size_t to)
{
    return (n + to - 1) / to * to;
}

/* Asks for the next `lines` cache lines of the queue. A chunk's rows sit in
 * a few blocks, too short a stream for the hardware prefetcher to find by
 * itself. */
KVRT_ALWAYS_INLINE void prefetch_lines(line_queue *lq, int lines)
{
    for (int j = 0; j < lines; j++) {
        if (lq->p >= lq->end) {
            if (lq->next >= lq->n)
                return;
            lq->p = lq->r[lq->next].p;
            lq->end = lq->r[lq->next].end;
            lq->next++;
        }
        KVRT_PREFETCH(lq->p);
        lq->p += 64;
    }
}

/* The end of the run of consecutive rows that starts at row `first` of a
 * chunk: rows of one block are adjacent in K and V (and in the buffers), so
 * a run converts as one array. */
KVRT_ALWAYS_INLINE int32_t run_end(const chunk_rows *cr, int32_t first)
{
    int32_t end = first + 1;
    while (end < cr->n && cr->row[end] == cr->row[end - 1] + 1)
        end++;
    return end;
}

KVRT_ALWAYS_INLINE void gather_rows(const attn_plan *pl, attn_scratch *sc, const chunk_rows *cr,
                                    int32_t g)
{
    const kvrt_attention_op *op = pl->op;
    const kvrt_layout *L = &op->layer.layout;
    const int32_t dk = L->dim_k, dv = L->dim_v;
    const int64_t head_rows = (int64_t)g * L->block_size;
    for (int32_t c = 0, end; c < cr->n; c = end) {
        end = run_end(cr, c);
        row_to_f32(sc->k + (int64_t)c * dk, op->layer.k, L->dtype,
                   (cr->row[c] + head_rows) * dk, (end - c) * dk);
        if (!op->mla)
            row_to_f32(sc->v + (int64_t)c * dv, op->layer.v, L->dtype,
                       (cr->row[c] + head_rows) * dv, (end - c) * dv);
    }
}

/* gather_rows with an instruction set's converters of f16 and bf16 runs
 * (f16_row, bf16_row: dst[0, n) from src; constants once inlined); f32 rows
 * are copied as they are. */
typedef void (*row_convert_fn)(float *restrict dst, const uint16_t *restrict src, int32_t n);
KVRT_ALWAYS_INLINE void gather_converting(const attn_plan *pl, attn_scratch *sc,
                                          const chunk_rows *cr, int32_t g,
                                          row_convert_fn f16_row, row_convert_fn bf16_row)
{
    const kvrt_attention_op *op = pl->op;
    const kvrt_layout *L = &op->layer.layout;
    if (L->dtype == KVRT_LAYOUT_F32) {
        gather_rows(pl, sc, cr, g);
        return;
    }
    const row_convert_fn convert = L->dtype == KVRT_LAYOUT_F16 ? f16_row : bf16_row;
    const uint16_t *k = op->layer.k, *v = op->layer.v;
    const int32_t dk = L->dim_k, dv = L->dim_v;
    const int64_t head_rows = (int64_t)g * L->block_size;
    for (int32_t c = 0, end; c < cr->n; c = end) {
        end = run_end(cr, c);
        for (int kv = 0; kv < (op->mla ? 1 : 2); kv++) {
            const int32_t dim = kv ? dv : dk;
            convert((kv ? sc->v : sc->k) + (int64_t)c * dim,
                    (kv ? v : k) + (cr->row[c] + head_rows) * dim, (end - c) * dim);
        }
    }
}

/* Bytes per element of a layer dtype (a constant once inlined). */
KVRT_ALWAYS_INLINE int64_t elem_bytes(const int dtype)
{
    return dtype == KVRT_LAYOUT_F32 ? 4
         : dtype == KVRT_LAYOUT_F16 || dtype == KVRT_LAYOUT_BF16 ? 2 : 1;
}

/* ---- one unit ---- */

/* The online-softmax step of one row for one chunk. s[0, nv) holds the
 * row's dot products with the chunk's gathered K rows; see[c] says whether
 * the row's token sees row c (0 past nv up to a multiple of LANES). The dots
 * become weights e^(logit - m) in s (0 where unseen, and from nv up to that
 * multiple), and the row's running max m and sum l are updated. Returns 0
 * when nothing is to be accumulated (every seen logit -inf or NaN: a NaN is
 * recorded in l); else 1, with *alpha the factor the row's acc must be
 * scaled by first (1 when m did not move) and *all_nonzero whether every
 * weight of [0, nv) is nonzero. */
KVRT_ALWAYS_INLINE int softmax_row(const kvrt_attention_op *op, float *restrict s,
                                   const uint8_t *see, int32_t nv, float *m, float *lsum,
                                   float *alpha, int *all_nonzero, const int fused)
{
    int32_t n_pad = (int32_t)round_up((size_t)nv, LANES);
    float mul = op->scale;
    if (op->softcap > 0.0f) {
        for (int32_t c = 0; c < nv; c++)
            s[c] = op->softcap * tanhf(s[c] * op->scale / op->softcap);
        mul = 1.0f;
    }
    for (int32_t c = nv; c < n_pad; c++)
        s[c] = 0.0f;
    /* logits, masked to -inf where the row's token does not see the key */
    float most[LANES];
    for (int l = 0; l < LANES; l++)
        most[l] = -INFINITY;
    for (int32_t c = 0; c < n_pad; c += LANES)
        for (int l = 0; l < LANES; l++) {
            float x = see[c + l] ? s[c + l] * mul : -INFINITY;
            s[c + l] = x;
            most[l] = x > most[l] ? x : most[l]; /* NaN never wins */
        }
    float cmax = most[0];
    for (int l = 1; l < LANES; l++)
        cmax = most[l] > cmax ? most[l] : cmax;
    if (!(cmax > -INFINITY)) {
        /* The row's token sees keys here (the caller checked), so their
         * logits are -inf or NaN (a NaN in q or K): a NaN makes the row's
         * output NaN. Otherwise NaN weights below carry it into l. */
        for (int32_t c = 0; c < nv; c++)
            if (s[c] != s[c])
                *lsum = NAN;
        return 0;
    }
    *alpha = 1.0f;
    if (cmax > *m) {
        if (*m > -INFINITY) {
            *alpha = exp_nonpositive(*m - cmax, fused);
            *lsum *= *alpha;
        }
        *m = cmax;
    }

    const float row_max = *m;
    float part[LANES] = {0};
    int32_t nonzero[LANES] = {0};
    for (int32_t c = 0; c < n_pad; c += LANES)
        for (int l = 0; l < LANES; l++) {
            s[c + l] = exp_nonpositive(s[c + l] - row_max, fused);
            part[l] += s[c + l];
            nonzero[l] += s[c + l] != 0.0f;
        }
    *lsum += sum_lanes(part);
    int32_t n_nonzero = 0;
    for (int l = 0; l < LANES; l++)
        n_nonzero += nonzero[l];
    *all_nonzero = n_nonzero == nv;
    return 1;
}

/* Where the direct copies (AVX2, AVX-512) read kv head g's K and V rows of
 * a chunk, straight from the cache (no f32 copy): row c's K at k + row[c] *
 * k_bytes, its V at v + row[c] * v_bytes (for MLA the V row is the head of
 * the K row). On q8/fp8 layers k_scale[row[c]] and v_scale[row[c]] are the
 * rows' scales (NULL otherwise): a K row's scale multiplies its dot
 * products, a V row's its weight, so that codes are only converted. */
struct head_rows {
    const char    *k, *v;
    const float   *k_scale, *v_scale;
    const int64_t *row;
    int64_t        k_bytes, v_bytes;
    int32_t        n;
};
typedef struct head_rows head_rows;



/* Rows [0, R) of s (stride s_stride) times each key's row scale,
 * scale[row[c]] for c in [0, nv): the scales gathered once, then loops that
 * vectorize. The direct copies apply a K row's scale to its dot products
 * and a V row's to its weight this way. */
KVRT_ALWAYS_INLINE void scale_keys(float *restrict s, int64_t s_stride, int R,
                                   const float *restrict scale, const int64_t *row, int32_t nv)
{
    float f[CHUNK_MAX];
    for (int32_t c = 0; c < nv; c++)
        f[c] = scale[row[c]];
    for (int i = 0; i < R; i++)
        for (int32_t c = 0; c < nv; c++)
            s[i * s_stride + c] *= f[c];
}

/* The direct copies' path for a block of rows [r0, r0 + R) of which some
 * skip a key of the chunk (a weight of 0: the V of a key a row does not
 * see may hold anything, and 0 * inf would be NaN): row by row over the
 * chunk's rows as f32 (dequantized with their scales), gathered for the kv
 * head once. s row i holds row i's weights (stride s_stride), alpha[i] its
 * rescaling; rows with go[i] 0 take nothing. */
KVRT_ALWAYS_INLINE void update_rows_gathered(const attn_plan *pl, attn_scratch *sc, int32_t r0,
                                             int R, const int *go, const float *alpha,
                                             const int *all_nonzero, const float *s,
                                             int64_t s_stride, int32_t nv)
{
    const kvrt_attention_op *op = pl->op;
    const int32_t dk = pl->dim_k, dv = pl->dim_v;
    if (sc->gathered != sc->head) {
        pl->gather(pl, sc, sc->chunk_now, sc->head);
        sc->gathered = sc->head;
    }
    const float *v_rows = op->mla ? sc->k : sc->v;
    const int64_t v_stride = op->mla ? dk : dv;
    for (int i = 0; i < R; i++) {
        if (!go[i])
            continue;
        float *row_acc = sc->acc + (int64_t)(r0 + i) * dv;
        if (alpha[i] != 1.0f)
            for (int32_t d = 0; d < dv; d++)
                row_acc[d] *= alpha[i];
        accumulate(row_acc, s + i * s_stride, v_rows, v_stride, nv, all_nonzero[i], dv, 1);
    }
}

/* ---- the instruction-set files' entry points ---- */

#if KVRT_ATTENTION_X86
/* attention_cpu_avx2.c */
void kvrt_attn_dot_rows_avx2(float *restrict s, const float *restrict q, const float *restrict k,
                             int64_t stride, int32_t n, int32_t dim);
int64_t kvrt_attn_dequant_row_avx2(float *restrict dst, const void *src, int32_t dtype, int64_t n,
                                   float scale);
void kvrt_attn_gather_avx2(const attn_plan *pl, attn_scratch *sc, const chunk_rows *cr, int32_t g);
void kvrt_attn_heads_avx2(const attn_plan *pl, attn_scratch *sc, int32_t r0, int32_t n,
                          const uint8_t *see, const head_rows *hr, line_queue *lq);
#endif
#if KVRT_ATTENTION_AVX512
/* attention_cpu_avx512.c */
void kvrt_attn_gather_avx512(const attn_plan *pl, attn_scratch *sc, const chunk_rows *cr,
                             int32_t g);
void kvrt_attn_heads_avx512(const attn_plan *pl, attn_scratch *sc, int32_t r0, int32_t n,
                            const uint8_t *see, const head_rows *hr, line_queue *lq);
#endif

#endif /* KVRT_ATTENTION_CPU_IMPL_H */
