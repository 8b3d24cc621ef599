/*
 * attention_cpu_avx2.c: the CPU attention's AVX2 + FMA + F16C kernels
 * (attention_cpu.c's top comment says how the work is cut).
 *
 * The direct copy (kvrt_attn_heads_avx2) takes a token's query heads of
 * one kv head up to four at a time and reads each K and V vector straight
 * from the cache (f32, f16, bf16, q8 or fp8 e4m3), converting it in
 * registers once for the four; there is no f32 copy of the rows. With 16
 * vector registers (AVX-512 has 32) the blocks are smaller than the
 * AVX-512 copy's: the dots of four rows with two keys are eight
 * accumulators, two K vectors and a query vector; the V sum of four rows
 * over 16 elements eight accumulators, two V vectors and a weight. Rows of
 * 8-bit layers are read as codes (q8: int8; e4m3 through its bits) and
 * their scales applied outside the inner loops: a K row's to its dot
 * products, a V row's to its weight. So an 8-bit row costs a widening and
 * a conversion per 8 elements, about what an f16 row costs, for half the
 * bytes.
 *
 * Also here: the dot products of the gathered-row copy, f16/bf16 rows to
 * f32, and quantized rows dequantized 8 codes a step (pre-RoPE keys, and
 * dims that are not multiples of 8, take that copy).
 */
#include "attention_cpu_impl.h"

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
__attribute__((target("avx2,fma"))) void kvrt_attn_dot_rows_avx2(float *restrict s,
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

/* dequant_row with AVX2, 8 codes a step. e4m3fn: the code's low 7 bits
 * shifted into an f32's exponent and mantissa (bits 20..26) read as a float
 * and multiplied by 2^120 give the value, subnormals included (they become
 * f32 subnormals, exact); the sign goes to bit 31; code 0x7f is NaN. */
__attribute__((target("avx2,fma"))) int64_t
kvrt_attn_dequant_row_avx2(float *restrict dst, const void *src, int32_t dtype, int64_t n, float scale)
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

/* gather_rows with this instruction set's conversions of f16 and bf16 rows. */
KVRT_TARGET_AVX2 void kvrt_attn_gather_avx2(const attn_plan *pl, attn_scratch *sc, const chunk_rows *cr,
                                            int32_t g)
{
    gather_converting(pl, sc, cr, g, f16_row_f16c, bf16_row_avx2);
}


/* ---- the direct copy ---- */

/* Keeps a loaded vector in a register: compilers otherwise fold its load
 * into each instruction that uses it, one load per use, and loads are what
 * the dot loop runs short of. */
#if defined(__GNUC__)
#  define KVRT_IN_REGISTER(v) __asm__("" : "+x"(v))
#else
#  define KVRT_IN_REGISTER(v) ((void)0)
#endif


/* 8 elements of a K or V row at p as f32 (the dtype a constant once
 * inlined). q8 and fp8 give the codes' values before their row's scale:
 * q8 the integer (the marker -128 NaN), e4m3 its value (0x7f and 0xff NaN),
 * both exact in f32. */
KVRT_TARGET_AVX2 KVRT_ALWAYS_INLINE __m256 load8(const char *p, const int dtype)
{
    if (dtype == KVRT_LAYOUT_F32)
        return _mm256_loadu_ps((const float *)(const void *)p);
    if (dtype == KVRT_LAYOUT_F16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)p));
    if (dtype == KVRT_LAYOUT_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(const void *)p)), 16));
    const __m256 nan = _mm256_set1_ps((float)NAN);
    if (dtype == KVRT_LAYOUT_Q8) {
        __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)p));
        __m256 is_nan = _mm256_castsi256_ps(_mm256_cmpeq_epi32(q, _mm256_set1_epi32(-128)));
        return _mm256_blendv_ps(_mm256_cvtepi32_ps(q), nan, is_nan);
    }
    /* e4m3fn: the code sign-extended and shifted by 20 puts the sign in bit
     * 31 and the low 7 bits in 20..26, an f32 2^-120 times the value (as
     * kvrt_attn_dequant_row_avx2 explains); 0x7f and 0xff are NaN */
    __m256i c = _mm256_slli_epi32(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)p)), 20);
    const __m256i low7 = _mm256_set1_epi32(0x07f00000);
    __m256 v = _mm256_castsi256_ps(_mm256_and_si256(c, _mm256_set1_epi32((int)0x87f00000u)));
    __m256 is_nan = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(c, low7), low7));
    return _mm256_blendv_ps(_mm256_mul_ps(v, _mm256_set1_ps(0x1p120f)), nan, is_nan);
}

/* exp_nonpositive on 8 lanes, the same operations in the same order
 * (bit-identical to the scalar one with FMA). */
KVRT_TARGET_AVX2 KVRT_ALWAYS_INLINE __m256 exp_nonpositive_avx2(__m256 x)
{
    const __m256 lo = _mm256_set1_ps(-87.33654f);
    __m256 in_range = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
    __m256 xc = _mm256_blendv_ps(lo, x, in_range);
    __m256i n = _mm256_cvttps_epi32(
        _mm256_sub_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                      _mm256_set1_ps(0.5f)));
    __m256 fn = _mm256_cvtepi32_ps(n);
    __m256 r = _mm256_fmadd_ps(fn, _mm256_set1_ps(-0.693359375f), xc);
    r = _mm256_fmadd_ps(fn, _mm256_set1_ps(2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    __m256 scale = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
    __m256 y = _mm256_and_ps(_mm256_mul_ps(p, scale), in_range);
    __m256 is_nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    return _mm256_blendv_ps(y, _mm256_set1_ps((float)NAN), is_nan);
}

/* Every `every` + 1 steps of `bytes` read, one line of the queue: one line
 * asked for per 64 bytes read, the pace at which the next chunk's lines
 * (as many as this chunk's) are all asked for by the end of this one. */
KVRT_ALWAYS_INLINE int prefetch_every(const int dtype, int64_t bytes_per_step)
{
    int64_t steps = 64 / (bytes_per_step * elem_bytes(dtype));
    return steps > 1 ? (int)steps - 1 : 0;
}

/* s[i * s_stride + c] = dot(q_i, K row c) over dim (a multiple of 8)
 * elements for the R query rows q + i * q_stride and keys c in [0, n
 * rounded up to 2) (a key from n on repeats key n - 1), two keys at a time:
 * R x 2 accumulators of 8 lanes, each K vector loaded and converted once
 * for the R rows. Each dot is 8 partial sums of dim / 8 products, added
 * pairwise. */
KVRT_TARGET_AVX2 KVRT_ALWAYS_INLINE void dots_body(float *restrict s, int64_t s_stride,
                                                   const float *q, int64_t q_stride,
                                                   const head_rows *hr, int32_t dim,
                                                   line_queue *queue, const int dtype, const int R)
{
    const int64_t es = elem_bytes(dtype);
    const int every = prefetch_every(dtype, 16);
    const int32_t n = hr->n;
    line_queue lq = *queue;
    for (int32_t c0 = 0; c0 < n; c0 += 2) {
        const char *k0p = hr->k + hr->row[c0] * hr->k_bytes;
        const char *k1p = hr->k + hr->row[c0 + 1 < n ? c0 + 1 : c0] * hr->k_bytes;
        __m256 a[4][2];
        KVRT_UNROLL
        for (int i = 0; i < 4; i++)
            a[i][0] = a[i][1] = _mm256_setzero_ps();
        for (int32_t d = 0; d < dim; d += 8) {
            if (((d >> 3) & every) == 0)
                prefetch_lines(&lq, 1);
            const __m256 k0 = load8(k0p + d * es, dtype), k1 = load8(k1p + d * es, dtype);
            KVRT_UNROLL
            for (int i = 0; i < R; i++) {
                __m256 x = _mm256_loadu_ps(q + i * q_stride + d);
                KVRT_IN_REGISTER(x); /* one load for both keys, not one per FMA */
                a[i][0] = _mm256_fmadd_ps(x, k0, a[i][0]);
                a[i][1] = _mm256_fmadd_ps(x, k1, a[i][1]);
            }
        }
        float sums[8];
        _mm256_storeu_ps(sums, sum_lanes8_avx2(a[0][0], a[0][1], a[1][0], a[1][1], a[2][0],
                                                a[2][1], a[3][0], a[3][1]));
        KVRT_UNROLL
        for (int i = 0; i < R; i++) {
            s[i * s_stride + c0] = sums[2 * i];
            s[i * s_stride + c0 + 1] = sums[2 * i + 1];
        }
    }
    *queue = lq;
}

/* acc[i] = alpha[i] * acc[i] + sum over keys c in [0, n) of w[i][c] * (V
 * row c) for the R rows i: 16 elements at a time (8 for the last ones when
 * dim % 16 is 8) in R x 2 accumulators, each V vector loaded and converted
 * once for the R rows. The sum runs in key order, as accumulate's. */
KVRT_TARGET_AVX2 KVRT_ALWAYS_INLINE void accumulate_body(float *const acc[ROW_BLOCK],
                                                         const float *const w[ROW_BLOCK],
                                                         const float *alpha, const head_rows *hr,
                                                         int32_t dim, line_queue *queue,
                                                         const int dtype, const int R)
{
    const int64_t es = elem_bytes(dtype);
    const int every = prefetch_every(dtype, 16);
    line_queue lq = *queue;
    int32_t d0 = 0;
    for (; d0 + 16 <= dim; d0 += 16) {
        __m256 a[4][2];
        KVRT_UNROLL
        for (int i = 0; i < R; i++) {
            const __m256 al = _mm256_set1_ps(alpha[i]);
            a[i][0] = _mm256_mul_ps(al, _mm256_loadu_ps(acc[i] + d0));
            a[i][1] = _mm256_mul_ps(al, _mm256_loadu_ps(acc[i] + d0 + 8));
        }
        const char *v = hr->v + (int64_t)d0 * es;
        for (int32_t c = 0; c < hr->n; c++) {
            const char *vr = v + hr->row[c] * hr->v_bytes;
            if ((c & every) == 0)
                prefetch_lines(&lq, 1);
            const __m256 v0 = load8(vr, dtype), v1 = load8(vr + 8 * es, dtype);
            KVRT_UNROLL
            for (int i = 0; i < R; i++) {
                const __m256 x = _mm256_set1_ps(w[i][c]);
                a[i][0] = _mm256_fmadd_ps(x, v0, a[i][0]);
                a[i][1] = _mm256_fmadd_ps(x, v1, a[i][1]);
            }
        }
        KVRT_UNROLL
        for (int i = 0; i < R; i++) {
            _mm256_storeu_ps(acc[i] + d0, a[i][0]);
            _mm256_storeu_ps(acc[i] + d0 + 8, a[i][1]);
        }
    }
    if (d0 < dim) { /* 8 left */
        __m256 a[4];
        KVRT_UNROLL
        for (int i = 0; i < R; i++)
            a[i] = _mm256_mul_ps(_mm256_set1_ps(alpha[i]), _mm256_loadu_ps(acc[i] + d0));
        const char *v = hr->v + (int64_t)d0 * es;
        for (int32_t c = 0; c < hr->n; c++) {
            const __m256 v0 = load8(v + hr->row[c] * hr->v_bytes, dtype);
            KVRT_UNROLL
            for (int i = 0; i < R; i++)
                a[i] = _mm256_fmadd_ps(_mm256_set1_ps(w[i][c]), v0, a[i]);
        }
        KVRT_UNROLL
        for (int i = 0; i < R; i++)
            _mm256_storeu_ps(acc[i] + d0, a[i]);
    }
    *queue = lq;
}

/* dots_body and accumulate_body for the layer's dtype and R in [1, 4]. */
#define KVRT_BY_DTYPE_AND_R(BODY, DTYPE, R, ...)                                                \
    do {                                                                                       \
        switch (DTYPE) {                                                                       \
        case KVRT_LAYOUT_F16: KVRT_BY_R(BODY, KVRT_LAYOUT_F16, R, __VA_ARGS__); break;         \
        case KVRT_LAYOUT_BF16: KVRT_BY_R(BODY, KVRT_LAYOUT_BF16, R, __VA_ARGS__); break;       \
        case KVRT_LAYOUT_Q8: KVRT_BY_R(BODY, KVRT_LAYOUT_Q8, R, __VA_ARGS__); break;           \
        case KVRT_LAYOUT_FP8_E4M3: KVRT_BY_R(BODY, KVRT_LAYOUT_FP8_E4M3, R, __VA_ARGS__); break; \
        default: KVRT_BY_R(BODY, KVRT_LAYOUT_F32, R, __VA_ARGS__); break;                      \
        }                                                                                      \
    } while (0)
#define KVRT_BY_R(BODY, DT, R, ...)                                                            \
    do {                                                                                       \
        if ((R) == 1)                                                                          \
            BODY(__VA_ARGS__, DT, 1);                                                          \
        else if ((R) == 2)                                                                     \
            BODY(__VA_ARGS__, DT, 2);                                                          \
        else if ((R) == 3)                                                                     \
            BODY(__VA_ARGS__, DT, 3);                                                          \
        else                                                                                   \
            BODY(__VA_ARGS__, DT, 4);                                                          \
    } while (0)

KVRT_TARGET_AVX2 KVRT_NOINLINE void dots_avx2(float *restrict s, int64_t s_stride,
                                              const float *q, int64_t q_stride,
                                              const head_rows *hr, int32_t dim, line_queue *lq,
                                              int32_t dtype, int R)
{
    KVRT_BY_DTYPE_AND_R(dots_body, dtype, R, s, s_stride, q, q_stride, hr, dim, lq);
}

KVRT_TARGET_AVX2 KVRT_NOINLINE void accumulate_avx2(float *const acc[ROW_BLOCK],
                                                    const float *const w[ROW_BLOCK],
                                                    const float *alpha, const head_rows *hr,
                                                    int32_t dim, line_queue *lq, int32_t dtype,
                                                    int R)
{
    KVRT_BY_DTYPE_AND_R(accumulate_body, dtype, R, acc, w, alpha, hr, dim, lq);
}
#undef KVRT_BY_R
#undef KVRT_BY_DTYPE_AND_R

/* softmax_row for 8 lanes at a time, without a soft-cap; see[c] for c in
 * [nv, nv rounded up to 8) is 0. */
KVRT_TARGET_AVX2 KVRT_ALWAYS_INLINE int softmax_row_avx2(float scale, float *restrict s,
                                                         const uint8_t *see, int32_t nv,
                                                         float *m, float *lsum, float *alpha,
                                                         int *all_nonzero)
{
    const __m256 neg_inf = _mm256_set1_ps(-INFINITY), mul = _mm256_set1_ps(scale);
    __m256 most = neg_inf;
    int nan = 0;
    for (int32_t c0 = 0; c0 < nv; c0 += 8) {
        __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)(see + c0)));
        __m256 seen = _mm256_castsi256_ps(_mm256_cmpgt_epi32(b, _mm256_setzero_si256()));
        __m256 x = _mm256_blendv_ps(neg_inf, _mm256_mul_ps(_mm256_loadu_ps(s + c0), mul), seen);
        _mm256_storeu_ps(s + c0, x);
        nan |= _mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
        most = _mm256_max_ps(x, most); /* a NaN x gives most: NaN never wins */
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(most), _mm256_extractf128_ps(most, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float cmax = _mm_cvtss_f32(m4);
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
    const __m256 row_max = _mm256_set1_ps(*m);
    __m256 part = _mm256_setzero_ps();
    int32_t n_nonzero = 0;
    for (int32_t c0 = 0; c0 < nv; c0 += 8) {
        __m256 w = exp_nonpositive_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + c0), row_max));
        _mm256_storeu_ps(s + c0, w);
        part = _mm256_add_ps(part, w);
        unsigned valid = nv - c0 >= 8 ? 0xffu : (1u << (nv - c0)) - 1u;
        n_nonzero += __builtin_popcount(
            (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(w, _mm256_setzero_ps(), _CMP_NEQ_UQ)) &
            valid);
    }
    __m128 p4 = _mm_add_ps(_mm256_castps256_ps128(part), _mm256_extractf128_ps(part, 1));
    p4 = _mm_add_ps(p4, _mm_movehl_ps(p4, p4));
    p4 = _mm_add_ss(p4, _mm_movehdup_ps(p4));
    *lsum += _mm_cvtss_f32(p4);
    *all_nonzero = n_nonzero == nv;
    return 1;
}

/* Rows [r0, r0 + R) of the unit, R in [1, 4], of one token and one kv head,
 * against the chunk's rows hr. */
KVRT_TARGET_AVX2 static void update_block_avx2(const attn_plan *pl, attn_scratch *sc,
                                               int32_t r0, int32_t R, const uint8_t *see,
                                               const head_rows *hr, line_queue *lq)
{
    const kvrt_attention_op *op = pl->op;
    const int32_t dk = pl->dim_k, dv = pl->dim_v, nv = hr->n;
    const int32_t dtype = op->layer.layout.dtype;
    const int64_t s_stride = (int64_t)round_up((size_t)pl->chunk, KEY_PAD);
    float *s = sc->s, alpha[ROW_BLOCK] = {0};
    int go[ROW_BLOCK] = {0}, all_nonzero[ROW_BLOCK], any = 0, fast = 1;
    const float *q = sc->q + (int64_t)r0 * dk;
    dots_avx2(s, s_stride, q, dk, hr, dk, lq, dtype, R);
    if (hr->k_scale != NULL) /* codes to values: each key's dots times its row's scale */
        scale_keys(s, s_stride, R, hr->k_scale, hr->row, nv);
    for (int i = 0; i < R; i++) {
        float *si = s + i * s_stride, *m = sc->m + r0 + i, *l = sc->l + r0 + i;
        go[i] = op->softcap > 0.0f
                    ? softmax_row(op, si, see, nv, m, l, &alpha[i], &all_nonzero[i], 1)
                    : softmax_row_avx2(op->scale, si, see, nv, m, l, &alpha[i], &all_nonzero[i]);
        any |= go[i];
        fast &= !go[i] || all_nonzero[i];
    }
    if (!any)
        return;
    if (fast) { /* the usual case: each row takes every key or none */
        float *acc[ROW_BLOCK];
        const float *w[ROW_BLOCK];
        for (int i = 0; i < ROW_BLOCK; i++) { /* rows that take none add to spare */
            acc[i] = i < R && go[i] ? sc->acc + (int64_t)(r0 + i) * dv : sc->spare;
            w[i] = s + i * s_stride;
        }
        if (hr->v_scale != NULL) /* each V row's scale into its weight */
            scale_keys(s, s_stride, R, hr->v_scale, hr->row, nv);
        accumulate_avx2(acc, w, alpha, hr, dv, lq, dtype, R);
        return;
    }
    update_rows_gathered(pl, sc, r0, R, go, alpha, all_nonzero, s, s_stride, nv);
}

KVRT_TARGET_AVX2 void kvrt_attn_heads_avx2(const attn_plan *pl, attn_scratch *sc, int32_t r0,
                                           int32_t n, const uint8_t *see, const head_rows *hr,
                                           line_queue *lq)
{
    for (int32_t r = r0; r < r0 + n; r += ROW_BLOCK)
        update_block_avx2(pl, sc, r, r0 + n - r < ROW_BLOCK ? r0 + n - r : ROW_BLOCK, see, hr,
                          lq);
}

#endif /* KVRT_ATTENTION_X86 */
