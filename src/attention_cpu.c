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
 * Three copies of the kernel:
 *   - Portable: inner loops run over LANES-element steps with a
 *     compile-time trip count, so that compilers vectorize them at -O2 for
 *     whatever the target's vector width is. Each chunk's K and V rows of a
 *     kv head are converted to f32 once (the gather) and the rows updated one
 *     at a time.
 *   - AVX2 + FMA (F16C converting f16 rows): the same code compiled for
 *     them, chosen at run time when the processor has them.
 *   - AVX-512 (F, BW, VL): a token's query heads of one kv head four at a
 *     time. The dots of four heads with four keys are sixteen registers,
 *     the V sum of four rows another sixteen, and each K or V vector is
 *     loaded straight from the cache and converted in registers once for
 *     the four (no f32 copy), so a chunk is sized by its bytes (CHUNK_BYTES
 *     per kv head, for K and V). The softmax is 16 lanes wide. Rows that
 *     skip a key of the chunk (a weight of 0: the V of a key a row does not
 *     see may hold anything, and 0 * inf is NaN) are updated one at a time
 *     from the gathered f32 rows, gathered for that kv head only then.
 */
#include "attention_cpu.h"
#include "cpu_isa.h"

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

#if KVRT_ATTENTION_X86
/* The lane sums of eight vectors as one vector (three pairwise levels, as
 * sum_lanes): a few shuffles instead of seven scalar adds per sum. */
__attribute__((target("avx2,fma"))) static inline __m256
sum_lanes8_avx2(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6,
                __m256 a7)
{
    __m256 t0 = _mm256_hadd_ps(a0, a1), t1 = _mm256_hadd_ps(a2, a3);
    __m256 t2 = _mm256_hadd_ps(a4, a5), t3 = _mm256_hadd_ps(a6, a7);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                         _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* dot_rows with AVX2: eight keys at a time, eight independent chains. */
__attribute__((target("avx2,fma"))) static void dot_rows_avx2(float *restrict s,
                                                              const float *restrict q,
                                                              const float *restrict k,
                                                              int64_t stride, int32_t n,
                                                              int32_t dim)
{
    int32_t c = 0;
    if (dim % 8 == 0) {
        for (; c + 8 <= n; c += 8) {
            const float *kc = k + c * stride;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0,
                   a6 = a0, a7 = a0;
            for (int32_t d = 0; d < dim; d += 8) {
                __m256 qd = _mm256_loadu_ps(q + d);
                a0 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kc + d), a0);
                a1 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kc + stride + d), a1);
                a2 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kc + 2 * stride + d), a2);
                a3 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kc + 3 * stride + d), a3);
                a4 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kc + 4 * stride + d), a4);
                a5 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kc + 5 * stride + d), a5);
                a6 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kc + 6 * stride + d), a6);
                a7 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kc + 7 * stride + d), a7);
            }
            _mm256_storeu_ps(s + c, sum_lanes8_avx2(a0, a1, a2, a3, a4, a5, a6, a7));
        }
    }
    dot_rows(s + c, q, k + c * stride, stride, n - c, dim, 1);
}
#endif

/* dot_rows in the copy being compiled (fused: the AVX2 + FMA one). */
KVRT_ALWAYS_INLINE void dot_rows_isa(float *restrict s, const float *restrict q,
                                     const float *restrict k, int64_t stride, int32_t n,
                                     int32_t dim, const int fused)
{
#if KVRT_ATTENTION_X86
    if (fused) {
        dot_rows_avx2(s, q, k, stride, n, dim);
        return;
    }
#endif
    dot_rows(s, q, k, stride, n, dim, fused);
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
    struct line_range *ranges; /* [2 * n_kv of a unit * chunk]: a chunk's K/V runs */
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

static size_t round_up(size_t n, size_t to)
{
    return (n + to - 1) / to * to;
}

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
    sc->ranges = carve(base, &at, 2 * (size_t)pl->kv_max * chunk * sizeof(struct line_range));
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
            if (v_bytes) {
                const char *v = (const char *)op->layer.v + row * v_bytes;
                runs[n++] = (struct line_range){v, v + (end - c) * v_bytes};
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

#if KVRT_ATTENTION_X86
/* dequant_row with AVX2, 8 codes a step. e4m3fn: the code's low 7 bits
 * shifted into an f32's exponent and mantissa (bits 20..26) read as a float
 * and multiplied by 2^120 give the value, subnormals included (they become
 * f32 subnormals, exact); the sign goes to bit 31; code 0x7f is NaN. */
__attribute__((target("avx2,fma"))) static int64_t
dequant_row_avx2(float *restrict dst, const void *src, int32_t dtype, int64_t n, float scale)
{
    const __m256 s = _mm256_set1_ps(scale), nan = _mm256_set1_ps((float)NAN);
    int64_t i = 0;
    if (dtype == KVRT_LAYOUT_Q8) {
        const __m256i marker = _mm256_set1_epi32(-128);
        for (; i + 8 <= n; i += 8) {
            __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)src + i)));
            __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(q), s);
            __m256 is_nan = _mm256_castsi256_ps(_mm256_cmpeq_epi32(q, marker));
            _mm256_storeu_ps(dst + i, _mm256_blendv_ps(v, nan, is_nan));
        }
        return i;
    }
    const __m256i low7 = _mm256_set1_epi32(0x7f), code_nan = _mm256_set1_epi32(0x7f),
                  sign = _mm256_set1_epi32(0x80);
    const __m256 two120 = _mm256_set1_ps(0x1p120f);
    for (; i + 8 <= n; i += 8) {
        __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)((const uint8_t *)src + i)));
        __m256i mag = _mm256_and_si256(c, low7);
        __m256 v = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(mag, 20)), two120);
        v = _mm256_or_ps(v, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(c, sign), 24)));
        v = _mm256_mul_ps(v, s);
        __m256 is_nan = _mm256_castsi256_ps(_mm256_cmpeq_epi32(mag, code_nan));
        _mm256_storeu_ps(dst + i, _mm256_blendv_ps(v, nan, is_nan));
    }
    return i;
}
#endif

/* A quantized row of n codes to f32 values, as kvrt_dequant gives them:
 * code * scale (a table lookup for e4m3), NaN for the NaN codes. */
static void dequant_row(float *restrict dst, const void *src, int32_t dtype, int64_t n, float scale,
                        int avx2)
{
    int64_t i0 = 0;
#if KVRT_ATTENTION_X86
    if (avx2)
        i0 = dequant_row_avx2(dst, src, dtype, n, scale);
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

#if KVRT_ATTENTION_X86
/* f16 to f32 with F16C, 8 halves per instruction. */
__attribute__((target("avx2,fma,f16c"))) static inline void
f16_row_f16c(float *restrict dst, const uint16_t *restrict src, int32_t n)
{
    int32_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i)));
        __m256 b = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i + 8)));
        _mm256_storeu_ps(dst + i, a);
        _mm256_storeu_ps(dst + i + 8, b);
    }
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++)
        dst[i] = kvrt_f16_to_f32(src[i]);
}

/* bf16 to f32 with AVX2: widen, shift into the high half. */
__attribute__((target("avx2,fma,f16c"))) static inline void
bf16_row_avx2(float *restrict dst, const uint16_t *restrict src, int32_t n)
{
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + i)));
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
    }
    for (; i < n; i++)
        dst[i] = kvrt_bf16_to_f32(src[i]);
}
#endif

#if KVRT_ATTENTION_AVX512
#  define KVRT_TARGET_AVX512 \
        __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

/* f16 and bf16 rows to f32, 16 elements per instruction. */
KVRT_TARGET_AVX512 static inline void f16_row_avx512(float *restrict dst,
                                                     const uint16_t *restrict src, int32_t n)
{
    int32_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512 a = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i)));
        __m512 b = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i + 16)));
        _mm512_storeu_ps(dst + i, a);
        _mm512_storeu_ps(dst + i + 16, b);
    }
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i,
                         _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
    for (; i < n; i++)
        dst[i] = kvrt_f16_to_f32(src[i]);
}

KVRT_TARGET_AVX512 static inline void bf16_row_avx512(float *restrict dst,
                                                      const uint16_t *restrict src, int32_t n)
{
    int32_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(src + i)));
        _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
    }
    for (; i < n; i++)
        dst[i] = kvrt_bf16_to_f32(src[i]);
}

#endif

#if KVRT_ATTENTION_X86
/* gather_rows with vector conversions of f16 and bf16 rows (isa: 1 AVX2 +
 * F16C, 2 AVX-512); f32 rows are copied as they are. */
KVRT_ALWAYS_INLINE void gather_vector(const attn_plan *pl, attn_scratch *sc,
                                      const chunk_rows *cr, int32_t g, const int isa)
{
    const kvrt_attention_op *op = pl->op;
    const kvrt_layout *L = &op->layer.layout;
    if (L->dtype == KVRT_LAYOUT_F32) {
        gather_rows(pl, sc, cr, g);
        return;
    }
    const int f16 = L->dtype == KVRT_LAYOUT_F16;
    const uint16_t *k = op->layer.k, *v = op->layer.v;
    const int32_t dk = L->dim_k, dv = L->dim_v;
    const int64_t head_rows = (int64_t)g * L->block_size;
    (void)isa; /* without the AVX-512 copy, always 1 */
    for (int32_t c = 0, end; c < cr->n; c = end) {
        end = run_end(cr, c);
        for (int kv = 0; kv < (op->mla ? 1 : 2); kv++) {
            const int32_t dim = kv ? dv : dk;
            const uint16_t *src = (kv ? v : k) + (cr->row[c] + head_rows) * dim;
            float *dst = (kv ? sc->v : sc->k) + (int64_t)c * dim;
            int32_t n = (end - c) * dim;
#if KVRT_ATTENTION_AVX512
            if (isa == 2) {
                if (f16)
                    f16_row_avx512(dst, src, n);
                else
                    bf16_row_avx512(dst, src, n);
                continue;
            }
#endif
            if (f16)
                f16_row_f16c(dst, src, n);
            else
                bf16_row_avx2(dst, src, n);
        }
    }
}

__attribute__((target("avx2,fma,f16c"))) static void
gather_x86(const attn_plan *pl, attn_scratch *sc, const chunk_rows *cr, int32_t g)
{
    gather_vector(pl, sc, cr, g, 1);
}
#endif

#if KVRT_ATTENTION_AVX512
KVRT_TARGET_AVX512 static void gather_avx512(const attn_plan *pl, attn_scratch *sc,
                                             const chunk_rows *cr, int32_t g)
{
    gather_vector(pl, sc, cr, g, 2);
}
#endif

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

#if KVRT_ATTENTION_AVX512
/* The lane sums of sixteen vectors as one vector, lane i the sum of a[i]:
 * four pairwise levels, each halving the vectors and the lanes they are
 * summed over (45 instructions for 16 sums). */
KVRT_TARGET_AVX512 static inline __m512 sum_lanes16_avx512(const __m512 a[16])
{
    __m512 w[8], x[4], y[2];
    KVRT_UNROLL
    for (int i = 0; i < 8; i++) /* per 128 bits: a[2i] in lanes 0, 2; a[2i+1] in 1, 3 */
        w[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                             _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    KVRT_UNROLL
    for (int i = 0; i < 4; i++) /* per 128 bits: a[4i + j] in lane j */
        x[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    KVRT_UNROLL
    for (int i = 0; i < 2; i++) /* 128-bit parts 0, 2 and 1, 3 summed */
        y[i] = _mm512_add_ps(
            _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
            _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* exp_nonpositive on 16 lanes, the same operations in the same order
 * (bit-identical to the scalar one with FMA). */
KVRT_TARGET_AVX512 KVRT_ALWAYS_INLINE __m512 exp_nonpositive_avx512(__m512 x)
{
    const __m512 lo = _mm512_set1_ps(-87.33654f);
    __mmask16 in_range = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
    __m512 xc = _mm512_mask_blend_ps(in_range, lo, x);
    __m512i n = _mm512_cvttps_epi32(
        _mm512_sub_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                      _mm512_set1_ps(0.5f)));
    __m512 fn = _mm512_cvtepi32_ps(n);
    __m512 r = _mm512_fmadd_ps(fn, _mm512_set1_ps(-0.693359375f), xc);
    r = _mm512_fmadd_ps(fn, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    __m512 scale = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23));
    __m512 y = _mm512_mul_ps(p, scale);
    __mmask16 is_nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    y = _mm512_maskz_mov_ps(in_range, y);
    return _mm512_mask_mov_ps(y, is_nan, _mm512_set1_ps(NAN));
}

/* 16 elements of a K or V row at p, as f32 (the cache's dtype a constant
 * once inlined); with `masked`, only the lanes of `mask` are read. */
KVRT_TARGET_AVX512 KVRT_ALWAYS_INLINE __m512 load16(const char *p, __mmask16 mask,
                                                    const int dtype, const int masked)
{
    if (dtype == KVRT_LAYOUT_F32)
        return masked ? _mm512_maskz_loadu_ps(mask, p) : _mm512_loadu_ps(p);
    __m256i h = masked ? _mm256_maskz_loadu_epi16(mask, p)
                       : _mm256_loadu_si256((const __m256i *)(const void *)p);
    if (dtype == KVRT_LAYOUT_F16)
        return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* Where the AVX-512 kernels read kv head g's K and V rows of a chunk,
 * straight from the cache (no f32 copy): row c's K at k + row[c] * k_bytes,
 * its V at v + row[c] * v_bytes (for MLA the V row is the head of the K
 * row). */
typedef struct head_rows {
    const char    *k, *v;
    const int64_t *row;
    int64_t        k_bytes, v_bytes;
    int32_t        n;
} head_rows;

/* One step of the 4 x 4 dots: 16 elements of four query rows against 16 of
 * four K rows (k0..k3 loaded and converted once, used four times). */
#define KVRT_DOTS_STEP(MASKED)                                                                 \
    do {                                                                                       \
        const int64_t at = (int64_t)d * es;                                                    \
        __m512 k0 = load16(k0p + at, tail, dtype, MASKED),                                     \
               k1 = load16(k1p + at, tail, dtype, MASKED),                                     \
               k2 = load16(k2p + at, tail, dtype, MASKED),                                     \
               k3 = load16(k3p + at, tail, dtype, MASKED), x;                                  \
        x = MASKED ? _mm512_maskz_loadu_ps(tail, q0 + d) : _mm512_loadu_ps(q0 + d);             \
        a00 = _mm512_fmadd_ps(x, k0, a00), a01 = _mm512_fmadd_ps(x, k1, a01);                  \
        a02 = _mm512_fmadd_ps(x, k2, a02), a03 = _mm512_fmadd_ps(x, k3, a03);                  \
        x = MASKED ? _mm512_maskz_loadu_ps(tail, q1 + d) : _mm512_loadu_ps(q1 + d);             \
        a10 = _mm512_fmadd_ps(x, k0, a10), a11 = _mm512_fmadd_ps(x, k1, a11);                  \
        a12 = _mm512_fmadd_ps(x, k2, a12), a13 = _mm512_fmadd_ps(x, k3, a13);                  \
        x = MASKED ? _mm512_maskz_loadu_ps(tail, q2 + d) : _mm512_loadu_ps(q2 + d);             \
        a20 = _mm512_fmadd_ps(x, k0, a20), a21 = _mm512_fmadd_ps(x, k1, a21);                  \
        a22 = _mm512_fmadd_ps(x, k2, a22), a23 = _mm512_fmadd_ps(x, k3, a23);                  \
        x = MASKED ? _mm512_maskz_loadu_ps(tail, q3 + d) : _mm512_loadu_ps(q3 + d);             \
        a30 = _mm512_fmadd_ps(x, k0, a30), a31 = _mm512_fmadd_ps(x, k1, a31);                  \
        a32 = _mm512_fmadd_ps(x, k2, a32), a33 = _mm512_fmadd_ps(x, k3, a33);                  \
    } while (0)

/* s[i * s_stride + c] = dot(q_i, K row c) over dim elements for the four
 * query rows q0..q3 (a row may repeat: its sums are computed twice) and
 * keys c in [0, n rounded up to 4) (keys from n on repeat key n - 1):
 * sixteen accumulators, four rows by four keys. Each dot is 16 partial
 * sums of dim / 16 products (the rest in masked loads), added pairwise.
 * The queue's cursor is copied into locals, so that it stays in registers
 * rather than make a chain of stores and loads through memory. */
KVRT_TARGET_AVX512 KVRT_ALWAYS_INLINE void dots4_body(float *restrict s, int64_t s_stride,
                                                      const float *q0, const float *q1,
                                                      const float *q2, const float *q3,
                                                      const head_rows *hr, int32_t dim,
                                                      line_queue *queue, const int dtype)
{
    const int64_t es = dtype == KVRT_LAYOUT_F32 ? 4 : 2;
    const int32_t full = dim & ~15, n = hr->n;
    const __mmask16 tail = (__mmask16)((1u << (dim & 15)) - 1u);
    line_queue lq = *queue;
    for (int32_t c0 = 0; c0 < n; c0 += 4) {
        const int64_t *row = hr->row + c0;
        const int32_t left = n - c0; /* keys past n repeat the last one */
        const char *k0p = hr->k + row[0] * hr->k_bytes,
                   *k1p = hr->k + row[left > 1 ? 1 : 0] * hr->k_bytes,
                   *k2p = hr->k + row[left > 2 ? 2 : left - 1] * hr->k_bytes,
                   *k3p = hr->k + row[left > 3 ? 3 : left - 1] * hr->k_bytes;
        __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00,
               a11 = a00, a12 = a00, a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00,
               a30 = a00, a31 = a00, a32 = a00, a33 = a00;
        int32_t d = 0;
        for (; d < full; d += 16) {
            prefetch_lines(&lq, 2);
            KVRT_DOTS_STEP(0);
        }
        if (tail)
            KVRT_DOTS_STEP(1);
        const __m512 a[16] = {a00, a01, a02, a03, a10, a11, a12, a13,
                              a20, a21, a22, a23, a30, a31, a32, a33};
        __m512 sums = sum_lanes16_avx512(a);
        _mm_storeu_ps(s + c0, _mm512_extractf32x4_ps(sums, 0));
        _mm_storeu_ps(s + s_stride + c0, _mm512_extractf32x4_ps(sums, 1));
        _mm_storeu_ps(s + 2 * s_stride + c0, _mm512_extractf32x4_ps(sums, 2));
        _mm_storeu_ps(s + 3 * s_stride + c0, _mm512_extractf32x4_ps(sums, 3));
    }
    *queue = lq;
}
#undef KVRT_DOTS_STEP

KVRT_TARGET_AVX512 KVRT_NOINLINE void dots4_avx512(float *restrict s, int64_t s_stride,
                                                   const float *q0, const float *q1,
                                                   const float *q2, const float *q3,
                                                   const head_rows *hr, int32_t dim,
                                                   line_queue *lq, int32_t dtype)
{
    if (dtype == KVRT_LAYOUT_F16)
        dots4_body(s, s_stride, q0, q1, q2, q3, hr, dim, lq, KVRT_LAYOUT_F16);
    else if (dtype == KVRT_LAYOUT_BF16)
        dots4_body(s, s_stride, q0, q1, q2, q3, hr, dim, lq, KVRT_LAYOUT_BF16);
    else
        dots4_body(s, s_stride, q0, q1, q2, q3, hr, dim, lq, KVRT_LAYOUT_F32);
}

/* softmax_row for 16 lanes at a time, without a soft-cap. see16[j] holds the
 * visibility of keys [16 j, 16 j + 16) as bits (none from nv on). */
KVRT_TARGET_AVX512 KVRT_ALWAYS_INLINE int softmax_row_avx512(float scale, float *restrict s,
                                                             const __mmask16 *see16, int32_t nv,
                                                             float *m, float *lsum,
                                                             float *alpha, int *all_nonzero)
{
    const __m512 neg_inf = _mm512_set1_ps(-INFINITY), mul = _mm512_set1_ps(scale);
    __m512 most = neg_inf;
    __mmask16 nan = 0;
    for (int32_t c0 = 0, j = 0; c0 < nv; c0 += 16, j++) {
        __m512 x = _mm512_mask_mul_ps(neg_inf, see16[j], _mm512_maskz_loadu_ps(see16[j], s + c0),
                                      mul);
        _mm512_storeu_ps(s + c0, x);
        nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        most = _mm512_max_ps(x, most); /* a NaN x gives most: NaN never wins */
    }
    float cmax = _mm512_reduce_max_ps(most);
    if (!(cmax > -INFINITY)) { /* as softmax_row */
        if (nan)
            *lsum = NAN;
        return 0;
    }
    *alpha = 1.0f;
    if (cmax > *m) {
        if (*m > -INFINITY) {
            *alpha = exp_nonpositive(*m - cmax, 1);
            *lsum *= *alpha;
        }
        *m = cmax;
    }
    const __m512 row_max = _mm512_set1_ps(*m);
    __m512 part = _mm512_setzero_ps();
    int32_t n_nonzero = 0;
    for (int32_t c0 = 0, j = 0; c0 < nv; c0 += 16, j++) {
        __m512 w = exp_nonpositive_avx512(_mm512_sub_ps(_mm512_loadu_ps(s + c0), row_max));
        _mm512_storeu_ps(s + c0, w);
        part = _mm512_add_ps(part, w);
        n_nonzero += __builtin_popcount(
            _mm512_mask_cmp_ps_mask(nv - c0 >= 16 ? 0xffff : (1u << (nv - c0)) - 1u, w,
                                    _mm512_setzero_ps(), _CMP_NEQ_UQ));
    }
    *lsum += _mm512_reduce_add_ps(part);
    *all_nonzero = n_nonzero == nv;
    return 1;
}

/* Masks of the 16 elements at d0 + 16 x, x in [0, 4), of a dim-element row. */
KVRT_TARGET_AVX512 KVRT_ALWAYS_INLINE __mmask16 slice_mask(int32_t dim, int32_t d0, int x)
{
    int32_t left = dim - d0 - 16 * x;
    return left >= 16 ? (__mmask16)0xffff
                      : left > 0 ? (__mmask16)((1u << left) - 1u) : (__mmask16)0;
}

/* acc[i] = alpha[i] * acc[i] + sum over keys c in [0, n) of w[i][c] * (V
 * row c) for the four rows i in [0, 4): 64 elements at a time in 16
 * accumulators, each V vector loaded and converted once for the four rows.
 * The sum runs in key order, as accumulate's. */
KVRT_TARGET_AVX512 KVRT_ALWAYS_INLINE void accumulate4_body(float *const acc[ROW_BLOCK],
                                                            const float *const w[ROW_BLOCK],
                                                            const float *alpha,
                                                            const head_rows *hr, int32_t dim,
                                                            line_queue *queue, const int dtype)
{
    const int64_t es = dtype == KVRT_LAYOUT_F32 ? 4 : 2;
    const float *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
    line_queue lq = *queue;
    for (int32_t d0 = 0; d0 < dim; d0 += 64) {
        const __mmask16 m0 = slice_mask(dim, d0, 0), m1 = slice_mask(dim, d0, 1),
                        m2 = slice_mask(dim, d0, 2), m3 = slice_mask(dim, d0, 3);
        float *r0 = acc[0] + d0, *r1 = acc[1] + d0, *r2 = acc[2] + d0, *r3 = acc[3] + d0;
#define KVRT_ACC_LOAD(r, i, mk, x) \
    _mm512_mul_ps(_mm512_set1_ps(alpha[i]), _mm512_maskz_loadu_ps(mk, r + 16 * x))
        __m512 a00 = KVRT_ACC_LOAD(r0, 0, m0, 0), a01 = KVRT_ACC_LOAD(r0, 0, m1, 1),
               a02 = KVRT_ACC_LOAD(r0, 0, m2, 2), a03 = KVRT_ACC_LOAD(r0, 0, m3, 3),
               a10 = KVRT_ACC_LOAD(r1, 1, m0, 0), a11 = KVRT_ACC_LOAD(r1, 1, m1, 1),
               a12 = KVRT_ACC_LOAD(r1, 1, m2, 2), a13 = KVRT_ACC_LOAD(r1, 1, m3, 3),
               a20 = KVRT_ACC_LOAD(r2, 2, m0, 0), a21 = KVRT_ACC_LOAD(r2, 2, m1, 1),
               a22 = KVRT_ACC_LOAD(r2, 2, m2, 2), a23 = KVRT_ACC_LOAD(r2, 2, m3, 3),
               a30 = KVRT_ACC_LOAD(r3, 3, m0, 0), a31 = KVRT_ACC_LOAD(r3, 3, m1, 1),
               a32 = KVRT_ACC_LOAD(r3, 3, m2, 2), a33 = KVRT_ACC_LOAD(r3, 3, m3, 3);
#undef KVRT_ACC_LOAD
        const char *v = hr->v + (int64_t)d0 * es;
        for (int32_t c = 0; c < hr->n; c++) {
            const char *vr = v + hr->row[c] * hr->v_bytes;
            prefetch_lines(&lq, 2);
            const __m512 v0 = load16(vr, m0, dtype, 1), v1 = load16(vr + 16 * es, m1, dtype, 1),
                         v2 = load16(vr + 32 * es, m2, dtype, 1),
                         v3 = load16(vr + 48 * es, m3, dtype, 1);
            __m512 x = _mm512_set1_ps(w0[c]);
            a00 = _mm512_fmadd_ps(x, v0, a00), a01 = _mm512_fmadd_ps(x, v1, a01);
            a02 = _mm512_fmadd_ps(x, v2, a02), a03 = _mm512_fmadd_ps(x, v3, a03);
            x = _mm512_set1_ps(w1[c]);
            a10 = _mm512_fmadd_ps(x, v0, a10), a11 = _mm512_fmadd_ps(x, v1, a11);
            a12 = _mm512_fmadd_ps(x, v2, a12), a13 = _mm512_fmadd_ps(x, v3, a13);
            x = _mm512_set1_ps(w2[c]);
            a20 = _mm512_fmadd_ps(x, v0, a20), a21 = _mm512_fmadd_ps(x, v1, a21);
            a22 = _mm512_fmadd_ps(x, v2, a22), a23 = _mm512_fmadd_ps(x, v3, a23);
            x = _mm512_set1_ps(w3[c]);
            a30 = _mm512_fmadd_ps(x, v0, a30), a31 = _mm512_fmadd_ps(x, v1, a31);
            a32 = _mm512_fmadd_ps(x, v2, a32), a33 = _mm512_fmadd_ps(x, v3, a33);
        }
        _mm512_mask_storeu_ps(r0, m0, a00), _mm512_mask_storeu_ps(r0 + 16, m1, a01);
        _mm512_mask_storeu_ps(r0 + 32, m2, a02), _mm512_mask_storeu_ps(r0 + 48, m3, a03);
        _mm512_mask_storeu_ps(r1, m0, a10), _mm512_mask_storeu_ps(r1 + 16, m1, a11);
        _mm512_mask_storeu_ps(r1 + 32, m2, a12), _mm512_mask_storeu_ps(r1 + 48, m3, a13);
        _mm512_mask_storeu_ps(r2, m0, a20), _mm512_mask_storeu_ps(r2 + 16, m1, a21);
        _mm512_mask_storeu_ps(r2 + 32, m2, a22), _mm512_mask_storeu_ps(r2 + 48, m3, a23);
        _mm512_mask_storeu_ps(r3, m0, a30), _mm512_mask_storeu_ps(r3 + 16, m1, a31);
        _mm512_mask_storeu_ps(r3 + 32, m2, a32), _mm512_mask_storeu_ps(r3 + 48, m3, a33);
    }
    *queue = lq;
}

KVRT_TARGET_AVX512 KVRT_NOINLINE void accumulate4_avx512(float *const acc[ROW_BLOCK],
                                                         const float *const w[ROW_BLOCK],
                                                         const float *alpha,
                                                         const head_rows *hr, int32_t dim,
                                                         line_queue *lq, int32_t dtype)
{
    if (dtype == KVRT_LAYOUT_F16)
        accumulate4_body(acc, w, alpha, hr, dim, lq, KVRT_LAYOUT_F16);
    else if (dtype == KVRT_LAYOUT_BF16)
        accumulate4_body(acc, w, alpha, hr, dim, lq, KVRT_LAYOUT_BF16);
    else
        accumulate4_body(acc, w, alpha, hr, dim, lq, KVRT_LAYOUT_F32);
}

/* Rows [r0, r0 + R) of the unit, R in [1, 4], of one token and one kv head,
 * against the chunk's nv gathered rows. */
KVRT_TARGET_AVX512 KVRT_ALWAYS_INLINE void update_block_avx512(const attn_plan *pl,
                                                               attn_scratch *sc, int32_t r0,
                                                               int32_t R, const uint8_t *see,
                                                               const __mmask16 *see16,
                                                               const head_rows *hr,
                                                               line_queue *lq)
{
    const kvrt_attention_op *op = pl->op;
    const int32_t dk = pl->dim_k, dv = pl->dim_v, nv = hr->n;
    const int64_t s_stride = (int64_t)round_up((size_t)pl->chunk, KEY_PAD);
    float *s = sc->s, alpha[ROW_BLOCK] = {0};
    int go[ROW_BLOCK] = {0}, all_nonzero[ROW_BLOCK], any = 0, fast = 1;
    const float *q = sc->q + (int64_t)r0 * dk;
    dots4_avx512(s, s_stride, q, q + (R > 1 ? dk : 0), q + (R > 2 ? 2 * dk : 0),
                 q + (R > 3 ? 3 * dk : 0), hr, dk, lq, op->layer.layout.dtype);
    for (int i = 0; i < R; i++) {
        float *si = s + i * s_stride, *m = sc->m + r0 + i, *l = sc->l + r0 + i;
        go[i] = op->softcap > 0.0f
                    ? softmax_row(op, si, see, nv, m, l, &alpha[i], &all_nonzero[i], 1)
                    : softmax_row_avx512(op->scale, si, see16, nv, m, l, &alpha[i],
                                         &all_nonzero[i]);
        any |= go[i];
        fast &= !go[i] || all_nonzero[i];
    }
    if (!any)
        return;
    if (fast) { /* the usual case: each row takes every key or none */
        float *acc[ROW_BLOCK];
        const float *w[ROW_BLOCK];
        for (int i = 0; i < ROW_BLOCK; i++) { /* rows that take none add to spare */
            acc[i] = go[i] ? sc->acc + (int64_t)(r0 + i) * dv : sc->spare;
            w[i] = s + i * s_stride;
        }
        accumulate4_avx512(acc, w, alpha, hr, dv, lq, op->layer.layout.dtype);
        return;
    }
    /* Row by row, skipping weights of 0 (a key the row does not see, whose
     * V may hold anything: 0 * inf would be NaN), over the rows as f32. */
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

/* Rows [r0, r0 + n) of the unit, one token's query heads of one kv head,
 * in blocks of four. */
KVRT_TARGET_AVX512 static void update_heads_avx512(const attn_plan *pl, attn_scratch *sc,
                                                   int32_t r0, int32_t n, const uint8_t *see,
                                                   const head_rows *hr, line_queue *lq)
{
    __mmask16 see16[(CHUNK_MAX + 15) / 16];
    for (int32_t c0 = 0, j = 0; c0 < hr->n; c0 += 16, j++) {
        __m128i b = _mm_loadu_si128((const __m128i *)(see + c0));
        uint32_t unseen = (uint32_t)_mm_movemask_epi8(_mm_cmpeq_epi8(b, _mm_setzero_si128()));
        uint32_t valid = hr->n - c0 >= 16 ? 0xffffu : (1u << (hr->n - c0)) - 1u;
        see16[j] = (__mmask16)(~unseen & valid);
    }
    for (int32_t r = r0; r < r0 + n; r += ROW_BLOCK)
        update_block_avx512(pl, sc, r, r0 + n - r < ROW_BLOCK ? r0 + n - r : ROW_BLOCK, see,
                            see16, hr, lq);
}
#endif

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

/* One unit, in the copy for `isa`: 0 portable, 1 AVX2 + FMA + F16C, 2
 * AVX-512 (a compile-time constant once inlined). `next`: the unit this
 * thread takes after it (-1 none), whose first rows are prefetched during
 * this one's last chunk. */
KVRT_ALWAYS_INLINE void unit_body(const attn_plan *pl, attn_scratch *sc, int64_t unit,
                                  int64_t next, const int isa)
{
    const int fused = isa >= 1;
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
#if KVRT_ATTENTION_AVX512
            const kvrt_layout *L = &op->layer.layout;
            const int64_t first = (int64_t)g * L->block_size; /* kv head g's row 0 */
            const head_rows hr = {
                (const char *)op->layer.k + first * dk * L->elem_size,
                op->mla ? (const char *)op->layer.k + first * dk * L->elem_size
                        : (const char *)op->layer.v + first * dv * L->elem_size,
                cur->row,
                (int64_t)dk * L->elem_size,
                (int64_t)(op->mla ? dk : dv) * L->elem_size,
                cur->n};
            sc->chunk_now = cur;
            sc->head = g;
            sc->gathered = -1;
#endif
            if (isa < 2) /* the AVX-512 copy reads the cache's rows */
                pl->gather(pl, sc, cur, g);
            for (int32_t t = 0; t < ur.nt; t++) {
                for (int32_t h = h_first; h < h_end; h++) {
                    if (isa < 2)
                        prefetch_lines(&lq, lines_per_row);
                    if (isa < 2 && cur->seen[t])
                        update_row(pl, sc, t * ur.nh + h, cur->see + t * chunk, cur->n,
                                   v_rows, v_stride, fused);
                }
#if KVRT_ATTENTION_AVX512
                if (isa == 2 && cur->seen[t] && h_end > h_first)
                    update_heads_avx512(pl, sc, t * ur.nh + h_first, h_end - h_first,
                                        cur->see + t * chunk, &hr, &lq);
#endif
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

#if KVRT_ATTENTION_AVX512
KVRT_TARGET_AVX512 static void unit_avx512(const attn_plan *pl, attn_scratch *sc,
                                           int64_t unit, int64_t next)
{
    unit_body(pl, sc, unit, next, 2);
}
#endif

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

#if KVRT_ATTENTION_X86
/* Whether the AVX2 + FMA + F16C copy runs: the processor has it and
 * KVRT_CPU_ISA does not cap it (cpu_isa.c). */
static int have_avx2_fma_f16c(void)
{
    return kvrt_cpu_isa_level() >= KVRT_CPU_ISA_AVX2;
}
#endif

#if KVRT_ATTENTION_AVX512
/* Whether the AVX-512 copy (F, BW and VL) runs. */
static int have_avx512(void)
{
    return kvrt_cpu_isa_level() >= KVRT_CPU_ISA_AVX512;
}
#endif

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
    /* quantized rows and pre-RoPE keys: converted by gather_dequant */
    const int special = kvrt_dtype_quantized(L->dtype) || op->rope_in_attention || op->rotate_q;
    if (L->dtype == KVRT_LAYOUT_FP8_E4M3)
        e4m3_table_init();

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
#if KVRT_ATTENTION_AVX512
    /* The AVX-512 copy reads the cache's rows as they are, so its chunk is
     * set by their bytes: larger chunks, fewer fixed costs per key. MLA's
     * rows are read again for each block of four of the 128 heads: their
     * chunk stays at L1's measure. */
    if (have_avx512() && !op->mla && !special)
        pl.chunk = (int32_t)(CHUNK_BYTES / (((int64_t)L->dim_k + L->dim_v) * L->elem_size));
#endif
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

    void (*unit)(const attn_plan *, attn_scratch *, int64_t, int64_t) = unit_generic;
    pl.gather = gather_generic;
#if KVRT_ATTENTION_X86
    if (have_avx2_fma_f16c()) {
        unit = unit_avx2;
        pl.gather = gather_x86;
    }
#endif
#if KVRT_ATTENTION_AVX512
    if (have_avx512()) {
        unit = unit_avx512;
        pl.gather = gather_avx512;
    }
#endif
    if (special) { /* rows through gather_dequant: never the AVX-512 copy, which reads the cache */
        unit = unit_generic;
#if KVRT_ATTENTION_X86
        if (have_avx2_fma_f16c()) {
            unit = unit_avx2;
            pl.dequant_avx2 = 1;
        }
#endif
        pl.gather = gather_dequant;
    }

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
