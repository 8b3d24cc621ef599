/*
 * attention_cpu_avx512.c: the CPU attention's AVX-512 (F, BW, VL) kernels
 * (attention_cpu.c's top comment says how the work is cut): a token's
 * query heads of one kv head four at a time, reading the cache's rows as
 * they are, and f16/bf16 rows to f32 for the rows that skip a key.
 */
#include "attention_cpu_impl.h"

#if KVRT_ATTENTION_AVX512

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

/* gather_rows with this instruction set's conversions of f16 and bf16 rows. */
KVRT_TARGET_AVX512 void kvrt_attn_gather_avx512(const attn_plan *pl, attn_scratch *sc, const chunk_rows *cr,
                                                int32_t g)
{
    gather_converting(pl, sc, cr, g, f16_row_avx512, bf16_row_avx512);
}

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
 * once inlined); with `masked`, only the lanes of `mask` are read. q8 and
 * fp8 give the codes' values before their row's scale (attention_cpu_avx2.c's
 * load8 says how). */
KVRT_TARGET_AVX512 KVRT_ALWAYS_INLINE __m512 load16(const char *p, __mmask16 mask,
                                                    const int dtype, const int masked)
{
    if (dtype == KVRT_LAYOUT_F32)
        return masked ? _mm512_maskz_loadu_ps(mask, p) : _mm512_loadu_ps(p);
    if (dtype == KVRT_LAYOUT_Q8 || dtype == KVRT_LAYOUT_FP8_E4M3) {
        __m128i b = masked ? _mm_maskz_loadu_epi8(mask, p)
                           : _mm_loadu_si128((const __m128i *)(const void *)p);
        const __m512 nan = _mm512_set1_ps((float)NAN);
        if (dtype == KVRT_LAYOUT_Q8) {
            __m512i q = _mm512_cvtepi8_epi32(b);
            __mmask16 is_nan = _mm512_cmpeq_epi32_mask(q, _mm512_set1_epi32(-128));
            return _mm512_mask_mov_ps(_mm512_cvtepi32_ps(q), is_nan, nan);
        }
        /* e4m3fn as attention_cpu_avx2.c's load8 */
        __m512i c = _mm512_slli_epi32(_mm512_cvtepi8_epi32(b), 20);
        const __m512i low7 = _mm512_set1_epi32(0x07f00000);
        __m512 v = _mm512_mul_ps(
            _mm512_castsi512_ps(_mm512_and_si512(c, _mm512_set1_epi32((int)0x87f00000u))),
            _mm512_set1_ps(0x1p120f));
        __mmask16 is_nan = _mm512_cmpeq_epi32_mask(_mm512_and_si512(c, low7), low7);
        return _mm512_mask_mov_ps(v, is_nan, nan);
    }
    __m256i h = masked ? _mm256_maskz_loadu_epi16(mask, p)
                       : _mm256_loadu_si256((const __m256i *)(const void *)p);
    if (dtype == KVRT_LAYOUT_F16)
        return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}


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
    const int64_t es = elem_bytes(dtype);
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
    else if (dtype == KVRT_LAYOUT_Q8)
        dots4_body(s, s_stride, q0, q1, q2, q3, hr, dim, lq, KVRT_LAYOUT_Q8);
    else if (dtype == KVRT_LAYOUT_FP8_E4M3)
        dots4_body(s, s_stride, q0, q1, q2, q3, hr, dim, lq, KVRT_LAYOUT_FP8_E4M3);
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
    const int64_t es = elem_bytes(dtype);
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
    else if (dtype == KVRT_LAYOUT_Q8)
        accumulate4_body(acc, w, alpha, hr, dim, lq, KVRT_LAYOUT_Q8);
    else if (dtype == KVRT_LAYOUT_FP8_E4M3)
        accumulate4_body(acc, w, alpha, hr, dim, lq, KVRT_LAYOUT_FP8_E4M3);
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
    if (hr->k_scale != NULL) /* codes to values: each key's dots times its row's scale */
        scale_keys(s, s_stride, R, hr->k_scale, hr->row, nv);
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
        if (hr->v_scale != NULL) /* each V row's scale into its weight */
            scale_keys(s, s_stride, R, hr->v_scale, hr->row, nv);
        accumulate4_avx512(acc, w, alpha, hr, dv, lq, op->layer.layout.dtype);
        return;
    }
    update_rows_gathered(pl, sc, r0, R, go, alpha, all_nonzero, s, s_stride, nv);
}

/* Rows [r0, r0 + n) of the unit, one token's query heads of one kv head,
 * in blocks of four. */
KVRT_TARGET_AVX512 void kvrt_attn_heads_avx512(const attn_plan *pl, attn_scratch *sc,
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

#endif /* KVRT_ATTENTION_AVX512 */
