/*
 * attention_cpu_avx2.c: the CPU attention's AVX2 + FMA + F16C kernels
 * (attention_cpu.c's top comment says how the work is cut): the dot
 * products of the gathered-row copy, f16/bf16 rows to f32, and quantized
 * rows dequantized 8 codes a step.
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

/* gather_rows with F16C and AVX2 conversions of f16 and bf16 rows; f32
 * rows are copied as they are. */
KVRT_TARGET_AVX2 void kvrt_attn_gather_avx2(const attn_plan *pl, attn_scratch *sc,
                                            const chunk_rows *cr, int32_t g)
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
    for (int32_t c = 0, end; c < cr->n; c = end) {
        end = run_end(cr, c);
        for (int kv = 0; kv < (op->mla ? 1 : 2); kv++) {
            const int32_t dim = kv ? dv : dk;
            const uint16_t *src = (kv ? v : k) + (cr->row[c] + head_rows) * dim;
            float *dst = (kv ? sc->v : sc->k) + (int64_t)c * dim;
            int32_t n = (end - c) * dim;
            if (f16)
                f16_row_f16c(dst, src, n);
            else
                bf16_row_avx2(dst, src, n);
        }
    }
}

#endif /* KVRT_ATTENTION_X86 */
