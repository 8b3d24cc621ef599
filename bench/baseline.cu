/*
 * baseline.cu: kvrt-bench's dense attention baseline (see baseline.h): the
 * K/V gathered contiguous, then per layer
 *   S = scale * Q K^T   cublasGemmStridedBatchedEx, f16/bf16 in, f32 out,
 *                       f32 compute; one product per (sequence, kv head)
 *                       with the group's query heads and the step's tokens
 *                       as rows (GQA without repeating K)
 *   P = softmax(S)      softmax_kernel: causal mask by position, P in the
 *                       cache dtype
 *   O = P V             cublasGemmStridedBatchedEx, f32 compute, O in the
 *                       cache dtype
 * Layouts (row-major, elements of 2 bytes):
 *   K  [layer][seq][kv_head][key][dk]     V [layer][seq][kv_head][key][dv]
 *      (MLA: kv_heads 1, V is K with row stride dk)
 *   Q' [seq][kv_head][token][group][dk]   O' likewise with dv
 *   S  [seq][kv_head][token * group][key] f32, P likewise in the cache dtype
 * kvrt's q [seq][token][kv_head][group][dk] is Q' with its token and kv head
 * axes swapped (the same array when tokens or kv_heads is 1), out likewise:
 * swap_kernel moves them when they differ (in the timed step, as part of
 * what the baseline costs).
 * cuBLAS is column-major: a row-major [r][c] matrix with row stride ld is
 * its column-major [c][r] transpose with leading dimension ld, so
 *   S^T (keys x M) = op_T(K^T as stored) * Q'^T    (m keys, n M, k dk)
 *   O^T (dv x M)   = V^T (as stored) * P^T         (m dv, n M, k keys)
 * with M = tokens * group.
 * Built with nvcc and cuBLAS in CUDA builds, and as C++ against kvrt-sim
 * and its cuBLAS shim (tests/sim/kvrt_sim_cublas.h) for the simulated
 * bench, where the same glue and softmax kernel run.
 */
#include "gpu_compat.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#if defined(KVRT_GPU_SIM)
#  include "kvrt_sim_cublas.h"
#else
#  include <cublas_v2.h>
#endif

#include "baseline.h"
#include "kvrt_layout.h"

struct bench_baseline {
    bench_baseline_shape s;
    cublasHandle_t       handle;
    uint16_t            *k, *v;   /* every layer's K and V (v NULL for MLA) */
    uint16_t            *qp, *op; /* Q' and O' when they differ from q and out */
    float               *scores;  /* S */
    uint16_t            *p;       /* P */
};

namespace {

thread_local char error_text[512];

int fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(error_text, sizeof error_text, fmt, ap);
    va_end(ap);
    return -1;
}

int check(cudaError_t e, const char *what)
{
    return e == cudaSuccess ? 0 : fail("baseline: %s: %s", what, cudaGetErrorString(e));
}

int check_blas(cublasStatus_t st, const char *what)
{
    return st == CUBLAS_STATUS_SUCCESS ? 0
                                       : fail("baseline: %s: %s", what, cublasGetStatusString(st));
}

constexpr int kThreads = 256; /* a power of two: block_reduce halves it */

unsigned blocks_for(int64_t items, int64_t per_block)
{
    int64_t b = (items + per_block - 1) / per_block;
    return (unsigned)(b < 1 ? 1 : b > 65535 ? 65535 : b);
}

/* dst[s][b][a][c] = src[s][a][b][c], 2-byte elements. */
__global__ void swap_kernel(const uint16_t *src, uint16_t *dst, int64_t S, int64_t A, int64_t B,
                            int64_t C)
{
    const int64_t total = S * A * B * C;
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (int64_t)gridDim.x * blockDim.x) {
        const int64_t c = t % C;
        int64_t r = t / C;
        const int64_t a = r % A;
        r /= A;
        const int64_t b = r % B, s = r / B;
        dst[t] = src[((s * A + a) * B + b) * C + c];
    }
}

template <bool MAX> __device__ float block_reduce(float *red, float v)
{
    red[threadIdx.x] = v;
    __syncthreads();
    for (int h = (int)blockDim.x / 2; h > 0; h /= 2) {
        if ((int)threadIdx.x < h)
            red[threadIdx.x] = MAX ? fmaxf(red[threadIdx.x], red[threadIdx.x + h])
                                   : red[threadIdx.x] + red[threadIdx.x + h];
        __syncthreads();
    }
    const float r = red[0];
    __syncthreads();
    return r;
}

/* One block per row of S (grid-stride over rows): row r of a (sequence,
 * kv head) is token (r % m) / group, at position pos0 + that, and sees the
 * keys at positions up to its own (row j is at position j). P = exp(S -
 * max) / sum over the visible keys, 0 for the others, in `dtype`. */
__global__ void softmax_kernel(const float *S, void *P, int32_t dtype, int64_t rows, int32_t keys,
                               int32_t m, int32_t group, int32_t pos0)
{
    __shared__ float red[kThreads];
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const float *s = S + row * keys;
        const int32_t last = pos0 + (int32_t)(row % m) / group;
        const int32_t visible = last + 1 < keys ? last + 1 : keys;
        float most = -INFINITY;
        for (int32_t j = threadIdx.x; j < visible; j += blockDim.x)
            most = fmaxf(most, s[j]);
        most = block_reduce<true>(red, most);
        float sum = 0;
        for (int32_t j = threadIdx.x; j < visible; j += blockDim.x)
            sum += expf(s[j] - most);
        sum = block_reduce<false>(red, sum);
        const float inv = sum > 0 ? 1.0f / sum : 0.0f;
        for (int32_t j = threadIdx.x; j < keys; j += blockDim.x)
            kvrt_store(P, dtype, row * keys + j, j < visible ? expf(s[j] - most) * inv : 0.0f);
    }
}

int swap(const void *src, void *dst, int64_t S, int64_t A, int64_t B, int64_t C)
{
    (void)cudaGetLastError();
    KVRT_LAUNCH(blocks_for(S * A * B * C, kThreads), kThreads, 0, (cudaStream_t)0, swap_kernel)(
        (const uint16_t *)src, (uint16_t *)dst, S, A, B, C);
    return check(cudaGetLastError(), "swap_kernel");
}

int alloc(void *p, size_t bytes, const char *what)
{
    return check(cudaMalloc((void **)p, bytes > 0 ? bytes : 1), what);
}

} // namespace

extern "C" {

const char *bench_baseline_error(void) { return error_text; }

void bench_baseline_destroy(bench_baseline *bl)
{
    if (bl == NULL)
        return;
    if (bl->handle != NULL)
        (void)cublasDestroy(bl->handle);
    (void)cudaFree(bl->k);
    (void)cudaFree(bl->v);
    (void)cudaFree(bl->qp);
    (void)cudaFree(bl->op);
    (void)cudaFree(bl->scores);
    (void)cudaFree(bl->p);
    free(bl);
}

int bench_baseline_create(const bench_baseline_shape *shape, bench_baseline **out)
{
    *out = NULL;
    const bench_baseline_shape s = *shape;
    if (s.layers < 1 || s.batch < 1 || s.kv_heads < 1 || s.group < 1 || s.tokens < 1 ||
        s.keys < s.tokens || s.dk < 1 || s.dv < 1 || (s.mla && (s.kv_heads != 1 || s.dv > s.dk)))
        return fail("baseline: bad shape");
    bench_baseline *bl = (bench_baseline *)calloc(1, sizeof *bl);
    if (bl == NULL)
        return fail("baseline: out of host memory");
    bl->s = s;
    const int64_t per_layer = (int64_t)s.batch * s.kv_heads * s.keys;
    const int64_t rows = (int64_t)s.batch * s.kv_heads * s.tokens * s.group; /* of S */
    const int64_t q_elems = rows * s.dk, o_elems = rows * s.dv;
    const int swapped = s.tokens > 1 && s.kv_heads > 1;
    if (alloc(&bl->k, 2 * (size_t)(s.layers * per_layer * s.dk), "cudaMalloc K") ||
        (!s.mla && alloc(&bl->v, 2 * (size_t)(s.layers * per_layer * s.dv), "cudaMalloc V")) ||
        (swapped && (alloc(&bl->qp, 2 * (size_t)q_elems, "cudaMalloc Q'") ||
                     alloc(&bl->op, 2 * (size_t)o_elems, "cudaMalloc O'"))) ||
        alloc(&bl->scores, 4 * (size_t)(rows * s.keys), "cudaMalloc S") ||
        alloc(&bl->p, 2 * (size_t)(rows * s.keys), "cudaMalloc P") ||
        check_blas(cublasCreate(&bl->handle), "cublasCreate") ||
        check_blas(cublasSetStream(bl->handle, (cudaStream_t)0), "cublasSetStream")) {
        bench_baseline_destroy(bl);
        return -1;
    }
    *out = bl;
    return 0;
}

int bench_baseline_load(bench_baseline *bl, int layer, int seq, const void *k, const void *v)
{
    const bench_baseline_shape *s = &bl->s;
    const int64_t at = ((int64_t)layer * s->batch + seq) * s->kv_heads * s->keys;
    /* [key][kv_head][d] -> [kv_head][key][d] */
    if (swap(k, bl->k + at * s->dk, 1, s->keys, s->kv_heads, s->dk) ||
        (!s->mla && swap(v, bl->v + at * s->dv, 1, s->keys, s->kv_heads, s->dv)))
        return -1;
    return check(cudaDeviceSynchronize(), "bench_baseline_load");
}

int bench_baseline_run(bench_baseline *bl, const void *q, void *out)
{
    const bench_baseline_shape *s = &bl->s;
    const cudaDataType t = s->bf16 ? CUDA_R_16BF : CUDA_R_16F;
    const int32_t dtype = s->bf16 ? KVRT_LAYOUT_BF16 : KVRT_LAYOUT_F16;
    const int m = s->tokens * s->group, n = s->keys, count = s->batch * s->kv_heads;
    const int64_t per_layer = (int64_t)count * n;
    const int ldv = s->mla ? s->dk : s->dv;
    const float scale = 1.0f / sqrtf((float)s->dk), one = 1.0f, zero = 0.0f;
    const void *qp = q;
    if (bl->qp != NULL) { /* [seq][token][kv_head][group dk] -> [seq][kv_head][token][group dk] */
        if (swap(q, bl->qp, s->batch, s->tokens, s->kv_heads, (int64_t)s->group * s->dk))
            return -1;
        qp = bl->qp;
    }
    void *op = bl->op != NULL ? (void *)bl->op : out;
    for (int l = 0; l < s->layers; l++) {
        const uint16_t *k = bl->k + l * per_layer * s->dk;
        const uint16_t *v = s->mla ? k : bl->v + l * per_layer * s->dv;
        if (check_blas(cublasGemmStridedBatchedEx(
                           bl->handle, CUBLAS_OP_T, CUBLAS_OP_N, n, m, s->dk, &scale, k, t, s->dk,
                           (long long)n * s->dk, qp, t, s->dk, (long long)m * s->dk, &zero,
                           bl->scores, CUDA_R_32F, n, (long long)m * n, count, CUBLAS_COMPUTE_32F,
                           CUBLAS_GEMM_DEFAULT),
                       "cublasGemmStridedBatchedEx (Q K^T)"))
            return -1;
        const int64_t rows = (int64_t)count * m;
        (void)cudaGetLastError();
        KVRT_LAUNCH(blocks_for(rows, 1), kThreads, 0, (cudaStream_t)0, softmax_kernel)(
            bl->scores, (void *)bl->p, dtype, rows, n, m, s->group, s->pos0);
        if (check(cudaGetLastError(), "softmax_kernel") ||
            check_blas(cublasGemmStridedBatchedEx(
                           bl->handle, CUBLAS_OP_N, CUBLAS_OP_N, s->dv, m, n, &one, v, t, ldv,
                           (long long)n * ldv, bl->p, t, n, (long long)m * n, &zero, op, t, s->dv,
                           (long long)m * s->dv, count, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                       "cublasGemmStridedBatchedEx (P V)"))
            return -1;
        /* [seq][kv_head][token][group dv] -> [seq][token][kv_head][group dv] */
        if (bl->op != NULL &&
            swap(bl->op, out, s->batch, s->kv_heads, s->tokens, (int64_t)s->group * s->dv))
            return -1;
    }
    return 0;
}

} // extern "C"
