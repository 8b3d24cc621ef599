/*
 * kvrt_layout.h: the address arithmetic of the cache, element conversion and
 * RoPE angles, as KVRT_HD static inline functions compiled for the host (the
 * CPU backend, the tests) and for the device (the CUDA and HIP kernels), so
 * that every backend runs the same indexing.
 *
 * Layout invariants (docs/layouts.md):
 *   - A slot is one token's place in a group: slot = block * block_size + offset.
 *   - Per layer, one region for all blocks:
 *       K: [n_blocks][n_heads][block_size][dim_k]   (a head's block is one burst)
 *       V: [n_blocks][n_heads][block_size][dim_v]
 *     MLA is n_heads 1, dim_k latent + rope, no V. CROSS uses the same formula
 *     with one "block" per cross slot of block_size = cross_max_len.
 *   - Positions per group: [n_blocks][block_size] int32, -1 marks a hole.
 *   - Quantized dtypes (q8, fp8 e4m3) keep one f32 scale per (slot, head) row
 *     of K and of V in a region of their own per layer:
 *       K scales: [n_blocks][n_heads][block_size]   (kvrt_scale_index)
 *       V scales: [n_blocks][n_heads][block_size]
 */
#ifndef KVRT_LAYOUT_H
#define KVRT_LAYOUT_H

#include <stdint.h>
#if !defined(__CUDACC__) && !defined(__HIPCC__) && !defined(__HIP__)
#  include <math.h>
#endif

#if defined(__CUDACC__) || defined(__HIPCC__) || defined(__HIP__)
#  define KVRT_HD __host__ __device__
#else
#  define KVRT_HD
#endif

/* Element types, the values of kvrt_dtype. */
enum {
    KVRT_LAYOUT_F32 = 0,
    KVRT_LAYOUT_F16 = 1,
    KVRT_LAYOUT_BF16 = 2,
    KVRT_LAYOUT_Q8 = 3,       /* int8 with an f32 scale per (slot, head) row */
    KVRT_LAYOUT_FP8_E4M3 = 4, /* OCP e4m3fn with an f32 scale per (slot, head) row */
};

/* Whether a dtype keeps a scale per row. */
KVRT_HD static inline int kvrt_dtype_quantized(int32_t dtype)
{
    return dtype == KVRT_LAYOUT_Q8 || dtype == KVRT_LAYOUT_FP8_E4M3;
}

/* One layer's region shape. Plain data, passed to kernels by value. */
typedef struct kvrt_layout {
    int32_t n_heads;     /* ATTN/CROSS: n_kv_heads; MLA: 1 */
    int32_t dim_k;       /* ATTN/CROSS: head_dim_k; MLA: latent_dim + rope_dim */
    int32_t dim_v;       /* ATTN/CROSS: head_dim_v; MLA: 0 (V is K's first latent_dim) */
    int32_t block_size;  /* slots per block (CROSS: cross_max_len) */
    int32_t rot_offset;  /* first rotated element of a K head row */
    int32_t rot_dims;    /* rotated elements (0: none; CROSS: 0) */
    int32_t dtype;       /* KVRT_LAYOUT_* */
    int32_t elem_size;   /* bytes per element (1 for q8 and fp8) */
    float   rope_theta;  /* RoPE base of this layer (the layer's or the cache's) */
} kvrt_layout;

/* A layer as kernels see it: its shape and its regions. */
typedef struct kvrt_layer_ref {
    kvrt_layout layout;
    void       *k;       /* [n_blocks][n_heads][block_size][dim_k] */
    void       *v;       /* [n_blocks][n_heads][block_size][dim_v]; NULL for MLA */
    float      *k_scale; /* [n_blocks][n_heads][block_size]; NULL unless quantized */
    float      *v_scale; /* [n_blocks][n_heads][block_size]; NULL unless quantized (or MLA) */
} kvrt_layer_ref;

/* Element index of the first element of head `head`'s K row at `slot`. */
KVRT_HD static inline int64_t kvrt_k_index(const kvrt_layout *L, int64_t slot, int32_t head)
{
    int64_t block = slot / L->block_size, offset = slot % L->block_size;
    return ((block * L->n_heads + head) * L->block_size + offset) * L->dim_k;
}

/* Element index of the first element of head `head`'s V row at `slot`. */
KVRT_HD static inline int64_t kvrt_v_index(const kvrt_layout *L, int64_t slot, int32_t head)
{
    int64_t block = slot / L->block_size, offset = slot % L->block_size;
    return ((block * L->n_heads + head) * L->block_size + offset) * L->dim_v;
}

/* Index of head `head`'s scale at `slot` (K and V scales alike). */
KVRT_HD static inline int64_t kvrt_scale_index(const kvrt_layout *L, int64_t slot, int32_t head)
{
    int64_t block = slot / L->block_size, offset = slot % L->block_size;
    return (block * L->n_heads + head) * L->block_size + offset;
}

/* Bytes of one block of K (or V) scales in one layer; 0 unless quantized. */
KVRT_HD static inline int64_t kvrt_block_bytes_scale(const kvrt_layout *L)
{
    return kvrt_dtype_quantized(L->dtype) ? (int64_t)L->n_heads * L->block_size * 4 : 0;
}

/* Bytes of one block of K (or V) in one layer. */
KVRT_HD static inline int64_t kvrt_block_bytes_k(const kvrt_layout *L)
{
    return (int64_t)L->n_heads * L->block_size * L->dim_k * L->elem_size;
}
KVRT_HD static inline int64_t kvrt_block_bytes_v(const kvrt_layout *L)
{
    return (int64_t)L->n_heads * L->block_size * L->dim_v * L->elem_size;
}

/* Global slot of a sequence's i-th used slot, through its page table. */
KVRT_HD static inline int32_t kvrt_page_slot(const int32_t *page_table, int32_t block_size,
                                             int32_t i)
{
    return page_table[i / block_size] * block_size + i % block_size;
}

/* ---- element conversion (round to nearest even; NaN stays NaN) ---- */

typedef union { float f; uint32_t u; } kvrt_f32_bits;

KVRT_HD static inline float kvrt_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    kvrt_f32_bits r;
    if (exp == 0) {
        if (mant == 0) {
            r.u = sign;
        } else { /* subnormal: value = mant * 2^-24 */
            r.f = (float)mant * 5.9604644775390625e-8f;
            r.u |= sign;
        }
    } else if (exp == 31) {
        r.u = sign | 0x7f800000u | (mant << 13);
    } else {
        r.u = sign | ((exp + 112u) << 23) | (mant << 13);
    }
    return r.f;
}

KVRT_HD static inline uint16_t kvrt_f32_to_f16(float f)
{
    kvrt_f32_bits in;
    in.f = f;
    uint32_t x = in.u;
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t abs = x & 0x7fffffffu;
    if (abs >= 0x7f800000u) /* inf or NaN */
        return (uint16_t)(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
    if (abs >= 0x477ff000u) /* rounds to >= 65520: overflow to inf */
        return (uint16_t)(sign | 0x7c00u);
    if (abs < 0x38800000u) { /* below the smallest normal half: subnormal or 0 */
        if (abs < 0x33000000u) /* < 2^-25: rounds to 0 */
            return sign;
        uint32_t e = abs >> 23, mant = (abs & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126u - e; /* 14..24 */
        uint32_t half = mant >> shift, rem = mant & ((1u << shift) - 1u);
        uint32_t mid = 1u << (shift - 1u);
        if (rem > mid || (rem == mid && (half & 1u)))
            half++;
        return (uint16_t)(sign | half);
    }
    uint32_t r = abs + 0xfffu + ((abs >> 13) & 1u); /* round to nearest even */
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
}

KVRT_HD static inline float kvrt_bf16_to_f32(uint16_t b)
{
    kvrt_f32_bits r;
    r.u = (uint32_t)b << 16;
    return r.f;
}

KVRT_HD static inline uint16_t kvrt_f32_to_bf16(float f)
{
    kvrt_f32_bits in;
    in.f = f;
    uint32_t x = in.u;
    if ((x & 0x7fffffffu) > 0x7f800000u) /* NaN: keep it quiet */
        return (uint16_t)((x >> 16) | 0x40u);
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

/* Element i of an array of dtype `dtype`, as f32. */
KVRT_HD static inline float kvrt_load(const void *base, int32_t dtype, int64_t i)
{
    if (dtype == KVRT_LAYOUT_F32)
        return ((const float *)base)[i];
    if (dtype == KVRT_LAYOUT_F16)
        return kvrt_f16_to_f32(((const uint16_t *)base)[i]);
    return kvrt_bf16_to_f32(((const uint16_t *)base)[i]);
}

/* Stores f as element i of an array of dtype `dtype`. */
KVRT_HD static inline void kvrt_store(void *base, int32_t dtype, int64_t i, float f)
{
    if (dtype == KVRT_LAYOUT_F32)
        ((float *)base)[i] = f;
    else if (dtype == KVRT_LAYOUT_F16)
        ((uint16_t *)base)[i] = kvrt_f32_to_f16(f);
    else
        ((uint16_t *)base)[i] = kvrt_f32_to_bf16(f);
}

/* ---- quantized rows (docs/layouts.md, "Quantized dtypes") ----
 *
 * A row (one slot's elements of one head, K or V) of n values x is stored as
 * n bytes and one f32 scale s, computed in f32:
 *   amax = max |x_i| over the finite x_i
 *   q8:  s = amax / 127, q_i = rint(x_i / s) clamped to [-127, 127] (round to
 *        nearest even); value q_i * s. The byte -128 is never produced by a
 *        finite x_i: it marks a non-finite x_i and reads back as NaN.
 *   fp8: s = amax / 448, q_i = e4m3fn(x_i / s), round to nearest even,
 *        saturating at +-448; value e4m3(q_i) * s. A non-finite x_i is stored
 *        as the e4m3fn NaN (0x7f, 0xff with the sign) and reads back as NaN.
 *   A row whose finite values are all zero (or that has none) gets s = 0 and
 *   stores zeros (and NaN markers); it reads back as zeros (and NaNs).
 * So NaN and +-Inf inputs become NaN elements (visible to attention, which
 * then gives NaN), never finite values, and every scale is finite and >= 0.
 */

KVRT_HD static inline float kvrt_e4m3_to_f32(uint8_t b)
{
    int32_t e = (b >> 3) & 15, m = b & 7;
    float v;
    if (e == 15 && m == 7) {
        kvrt_f32_bits nan;
        nan.u = 0x7fc00000u;
        v = nan.f;
    } else if (e == 0) {
        v = (float)m * 0.001953125f; /* m * 2^-9 */
    } else {
        kvrt_f32_bits r;
        r.u = ((uint32_t)(e + 120) << 23) | ((uint32_t)m << 20);
        v = r.f;
    }
    return (b & 0x80u) ? -v : v;
}

/* f (finite or not) to e4m3fn: round to nearest even, saturating at 448;
 * NaN and +-Inf give NaN. */
KVRT_HD static inline uint8_t kvrt_f32_to_e4m3(float f)
{
    kvrt_f32_bits in;
    in.f = f;
    uint8_t sign = (uint8_t)((in.u >> 24) & 0x80u);
    uint32_t abs = in.u & 0x7fffffffu;
    if (abs >= 0x7f800000u) /* inf or NaN */
        return (uint8_t)(sign | 0x7fu);
    if (abs >= 0x43e00000u) /* >= 448: saturate */
        return (uint8_t)(sign | 0x7eu);
    if (abs < 0x3c800000u) { /* below 2^-6, the smallest normal: multiples of 2^-9 */
        kvrt_f32_bits a;
        a.u = abs;
        float m = rintf(a.f * 512.0f); /* exact scaling, then round to nearest even */
        return (uint8_t)(sign | (uint8_t)m); /* m == 8 is the encoding of 2^-6 */
    }
    uint32_t r = abs + 0x7ffffu + ((abs >> 20) & 1u); /* round to nearest even, 3 bits */
    if (r >= 0x43e00000u) /* rounded up to 480 or beyond: saturate */
        return (uint8_t)(sign | 0x7eu);
    uint32_t e = (r >> 23) - 120u, m = (r >> 20) & 7u;
    return (uint8_t)(sign | (e << 3) | m);
}

/* One stored element of a quantized row as f32 (NaN markers as NaN). */
KVRT_HD static inline float kvrt_dequant(const void *base, int32_t dtype, int64_t i, float scale)
{
    if (dtype == KVRT_LAYOUT_Q8) {
        int8_t q = ((const int8_t *)base)[i];
        if (q == -128) {
            kvrt_f32_bits nan;
            nan.u = 0x7fc00000u;
            return nan.f;
        }
        return (float)q * scale;
    }
    return kvrt_e4m3_to_f32(((const uint8_t *)base)[i]) * scale;
}

/* Quantizes f (a value of a row with scale s) to its stored byte. */
KVRT_HD static inline uint8_t kvrt_quant(float f, int32_t dtype, float s)
{
    if (!(f - f == 0.0f)) /* NaN or +-Inf */
        return dtype == KVRT_LAYOUT_Q8 ? (uint8_t)0x80u : (uint8_t)(kvrt_f32_to_e4m3(f));
    if (s == 0.0f)
        return 0;
    float x = f / s;
    if (dtype == KVRT_LAYOUT_Q8) {
        float q = rintf(x);
        q = q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q;
        return (uint8_t)(int8_t)q;
    }
    return kvrt_f32_to_e4m3(x);
}

/* Longest quantized head row (head_dim_k and head_dim_v are at most 1024). */
enum { KVRT_QUANT_ROW_MAX = 1024 };

/* Largest |x| over the finite values of a row, and its scale. */
KVRT_HD static inline float kvrt_quant_scale(const void *src, int32_t src_dtype, int64_t n,
                                             int32_t dtype)
{
    float amax = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        float a = fabsf(kvrt_load(src, src_dtype, i));
        if (a - a == 0.0f && a > amax)
            amax = a;
    }
    const float top = dtype == KVRT_LAYOUT_Q8 ? 127.0f : 448.0f;
    float s = amax / top;
    /* amax near FLT_MAX: s may round up so far that the largest code reads
     * back as inf (top * s > FLT_MAX); the next smaller scale keeps it
     * finite, the largest values then one code-step short of saturation at
     * most (an error of top ulps of s, far below half a step) */
    if (!(top * s <= 3.40282346638528859812e38f))
        s = nextafterf(s, 0.0f);
    return s;
}

/* Quantizes a row of n values (src_dtype f32, f16 or bf16) into dst and
 * returns its scale. */
KVRT_HD static inline float kvrt_quant_row(void *dst, int32_t dtype, const void *src,
                                           int32_t src_dtype, int64_t n)
{
    float s = kvrt_quant_scale(src, src_dtype, n, dtype);
    for (int64_t i = 0; i < n; i++)
        ((uint8_t *)dst)[i] = kvrt_quant(kvrt_load(src, src_dtype, i), dtype, s);
    return s;
}

/* ---- FlashMLA-style fp8 MLA rows (docs/layouts.md, "fp8 MLA rows") ----
 *
 * An MLA slot row (latent_dim + rope_dim values) in an fp8 cache is one
 * packed byte row, as FlashMLA stores it:
 *   [0, L)          latent: L = latent_dim e4m3fn codes (latent_dim % 128 == 0)
 *   [L, L + S)      scales: latent_dim / 128 f32, scale g for latent values
 *                   [128 g, 128 g + 128), zero bytes up to S = 16 * ceil(4 g / 16)
 *   [L + S, end)    rope: rope_dim bf16, zero bytes up to a multiple of 16
 * 512 / 64: 512 + 16 + 128 = 656 bytes. Each part starts at a multiple of 16
 * bytes of the row and the row is a multiple of 16 bytes, so in a 16-byte
 * aligned region every part of every slot is read with aligned 16-byte loads.
 * The packed row is the layer's K row (dim_k = its bytes, elem_size 1, no
 * scale region): kvrt_k_index addresses it, and whatever copies K rows
 * (moves, copy-on-write, compaction, offload, state files) carries the scales
 * bit-exactly with the codes. Each group of 128 is quantized as a row of the
 * fp8 rules above (amax / 448, saturating, NaN/Inf as the NaN marker); the
 * rope part is rounded to bf16 (NaN stays NaN). A shift turns the rope part in
 * bf16 in place and leaves the latent bytes and scales as they are.
 */

enum { KVRT_MLA_FP8_GROUP = 128 };

KVRT_HD static inline int64_t kvrt_round16(int64_t n)
{
    return (n + 15) / 16 * 16;
}

/* Byte offset of the scales (= latent_dim) and of the rope part in a row. */
KVRT_HD static inline int64_t kvrt_mla_fp8_scale_off(int32_t latent_dim)
{
    return latent_dim;
}
KVRT_HD static inline int64_t kvrt_mla_fp8_rope_off(int32_t latent_dim)
{
    return latent_dim + kvrt_round16(4 * (int64_t)(latent_dim / KVRT_MLA_FP8_GROUP));
}

/* Bytes of one packed row (656 at 512 / 64). */
KVRT_HD static inline int64_t kvrt_mla_fp8_row_bytes(int32_t latent_dim, int32_t rope_dim)
{
    return kvrt_mla_fp8_rope_off(latent_dim) + kvrt_round16(2 * (int64_t)rope_dim);
}

/* Scale g of a packed row. */
KVRT_HD static inline float kvrt_mla_fp8_scale(const uint8_t *row, int32_t latent_dim, int32_t g)
{
    return ((const float *)(row + kvrt_mla_fp8_scale_off(latent_dim)))[g];
}

/* The rope part of a packed row: rope_dim bf16. */
KVRT_HD static inline uint16_t *kvrt_mla_fp8_rope(uint8_t *row, int32_t latent_dim)
{
    return (uint16_t *)(row + kvrt_mla_fp8_rope_off(latent_dim));
}

/* Value i of a packed row (latent_dim + rope_dim of them) as f32. */
KVRT_HD static inline float kvrt_mla_fp8_load(const uint8_t *row, int32_t latent_dim, int64_t i)
{
    if (i < latent_dim)
        return kvrt_e4m3_to_f32(row[i]) *
               kvrt_mla_fp8_scale(row, latent_dim, (int32_t)(i / KVRT_MLA_FP8_GROUP));
    return kvrt_bf16_to_f32(
        ((const uint16_t *)(row + kvrt_mla_fp8_rope_off(latent_dim)))[i - latent_dim]);
}

/* Packs the latent_dim + rope_dim values of src (f32, f16 or bf16) into row
 * (kvrt_mla_fp8_row_bytes of it, padding zeroed). */
KVRT_HD static inline void kvrt_mla_fp8_quant_row(uint8_t *row, const void *src, int32_t src_dtype,
                                                  int32_t latent_dim, int32_t rope_dim)
{
    int64_t rope_off = kvrt_mla_fp8_rope_off(latent_dim);
    int64_t bytes = kvrt_mla_fp8_row_bytes(latent_dim, rope_dim);
    for (int64_t b = latent_dim; b < bytes; b++)
        row[b] = 0;
    float *scale = (float *)(row + kvrt_mla_fp8_scale_off(latent_dim));
    for (int32_t g = 0; g < latent_dim / KVRT_MLA_FP8_GROUP; g++) {
        int64_t first = (int64_t)g * KVRT_MLA_FP8_GROUP;
        float amax = 0.0f;
        for (int64_t i = first; i < first + KVRT_MLA_FP8_GROUP; i++) {
            float a = fabsf(kvrt_load(src, src_dtype, i));
            if (a - a == 0.0f && a > amax)
                amax = a;
        }
        float s = amax / 448.0f;
        scale[g] = s;
        for (int64_t i = first; i < first + KVRT_MLA_FP8_GROUP; i++)
            row[i] = kvrt_quant(kvrt_load(src, src_dtype, i), KVRT_LAYOUT_FP8_E4M3, s);
    }
    uint16_t *rope = (uint16_t *)(row + rope_off);
    for (int32_t i = 0; i < rope_dim; i++)
        rope[i] = kvrt_f32_to_bf16(kvrt_load(src, src_dtype, (int64_t)latent_dim + i));
}

/* ---- RoPE ---- */

/* Rotation parameters of a cache (kvrt_rope_desc as kernels see it). */
typedef struct kvrt_rope {
    int32_t n_rot;       /* rotated elements of an ATTN K head; MLA uses rope_dim */
    int32_t style;       /* 0 normal (adjacent pairs), 1 neox (halves) */
    float   theta;
    float   freq_scale;
} kvrt_rope;

/* Elements (a, b) of pair i of a rotated part of `dims` elements. */
KVRT_HD static inline void kvrt_rope_pair(int32_t style, int32_t dims, int32_t i, int32_t *a,
                                          int32_t *b)
{
    if (style == 0) {
        *a = 2 * i;
        *b = 2 * i + 1;
    } else {
        *a = i;
        *b = i + dims / 2;
    }
}

/* Angle by which pair i of a `dims`-element rotated part turns when the
 * position moves by delta: delta * freq_scale * theta^(-2i/dims). In double,
 * so that large deltas keep their precision before sin/cos. */
KVRT_HD static inline double kvrt_rope_angle(const kvrt_rope *rope, int32_t dims, int32_t i,
                                             int64_t delta)
{
    return (double)delta * (double)rope->freq_scale *
           pow((double)rope->theta, -2.0 * (double)i / (double)dims);
}

/* A shift of a packed fp8 MLA row (kvrt_mla_fp8_quant_row): the rope part's
 * rope_dim bf16 values turn by a position move of delta (angles in double,
 * products in f32, each result rounded to bf16); the latent codes and the
 * scales are not touched. */
KVRT_HD static inline void kvrt_mla_fp8_rotate(uint8_t *row, int32_t latent_dim, int32_t rope_dim,
                                               const kvrt_rope *rope, int64_t delta)
{
    uint16_t *r = kvrt_mla_fp8_rope(row, latent_dim);
    for (int32_t p = 0; p < rope_dim / 2; p++) {
        int32_t a, b;
        kvrt_rope_pair(rope->style, rope_dim, p, &a, &b);
        double ang = kvrt_rope_angle(rope, rope_dim, p, delta);
        float c = (float)cos(ang), sn = (float)sin(ang);
        float xa = kvrt_bf16_to_f32(r[a]), xb = kvrt_bf16_to_f32(r[b]);
        r[a] = kvrt_f32_to_bf16(xa * c - xb * sn);
        r[b] = kvrt_f32_to_bf16(xa * sn + xb * c);
    }
}

#endif /* KVRT_LAYOUT_H */
