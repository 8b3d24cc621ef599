/*
 * sim_cublas.cpp: kvrt_sim_cublas.h, the cuBLAS entry points of kvrt-bench's
 * dense baseline, for kvrt-sim. The product is a kernel queued on the
 * handle's stream: one thread per element of C, the k products summed in
 * f32 in index order (cuBLAS sums in another order; the baseline's bound
 * covers any order), then alpha * sum (+ beta * C when beta is not 0: C is
 * not read when beta is 0, as in cuBLAS), rounded once to C's type.
 */
#include "gpu_compat.h"

#include <new>

#include "kvrt_layout.h"
#include "kvrt_sim_cublas.h"

struct kvrt_sim_cublas {
    cudaStream_t stream;
};

namespace {

int layout_of(cudaDataType t)
{
    return t == CUDA_R_16F ? KVRT_LAYOUT_F16 : t == CUDA_R_16BF ? KVRT_LAYOUT_BF16 : KVRT_LAYOUT_F32;
}

struct gemm_args {
    int       ta, tb, m, n, k;
    float     alpha, beta;
    const void *A, *B;
    void     *C;
    int       at, bt, ct; /* KVRT_LAYOUT_* */
    long long lda, ldb, ldc, sa, sb, sc;
    int       batch;
};

__global__ void gemm_kernel(const gemm_args g)
{
    const long long total = (long long)g.m * g.n * g.batch;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        const long long b = t / ((long long)g.m * g.n);
        const long long e = t - b * g.m * g.n;
        const long long j = e / g.m, i = e - j * g.m; /* column-major C(i, j) */
        float sum = 0;
        for (long long l = 0; l < g.k; l++) {
            /* op(A)(i, l), op(B)(l, j) of column-major A and B */
            const long long ai = g.ta ? l + i * g.lda : i + l * g.lda;
            const long long bi = g.tb ? j + l * g.ldb : l + j * g.ldb;
            sum += kvrt_load(g.A, g.at, b * g.sa + ai) * kvrt_load(g.B, g.bt, b * g.sb + bi);
        }
        const long long ci = b * g.sc + i + j * g.ldc;
        float r = g.alpha * sum;
        if (g.beta != 0.0f)
            r += g.beta * kvrt_load(g.C, g.ct, ci);
        kvrt_store(g.C, g.ct, ci, r);
    }
}

} // namespace

extern "C" {

cublasStatus_t cublasCreate(cublasHandle_t *handle)
{
    if (handle == NULL)
        return CUBLAS_STATUS_INVALID_VALUE;
    *handle = new (std::nothrow) kvrt_sim_cublas{NULL};
    return *handle != NULL ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_ALLOC_FAILED;
}

cublasStatus_t cublasDestroy(cublasHandle_t handle)
{
    if (handle == NULL)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    delete handle;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream)
{
    if (handle == NULL)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    handle->stream = stream;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t handle, cublasOperation_t transa,
                                          cublasOperation_t transb, int m, int n, int k,
                                          const void *alpha, const void *A, cudaDataType Atype,
                                          int lda, long long strideA, const void *B,
                                          cudaDataType Btype, int ldb, long long strideB,
                                          const void *beta, void *C, cudaDataType Ctype, int ldc,
                                          long long strideC, int batchCount,
                                          cublasComputeType_t computeType, cublasGemmAlgo_t algo)
{
    (void)algo;
    if (handle == NULL)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    const bool half_in = (Atype == CUDA_R_16F || Atype == CUDA_R_16BF) && Btype == Atype;
    if (computeType != CUBLAS_COMPUTE_32F || !half_in ||
        (Ctype != CUDA_R_32F && Ctype != Atype))
        return CUBLAS_STATUS_NOT_SUPPORTED;
    const int rows_a = transa == CUBLAS_OP_N ? m : k, rows_b = transb == CUBLAS_OP_N ? k : n;
    if (m < 0 || n < 0 || k < 0 || batchCount < 0 || lda < (rows_a > 1 ? rows_a : 1) ||
        ldb < (rows_b > 1 ? rows_b : 1) || ldc < (m > 1 ? m : 1) || alpha == NULL || beta == NULL)
        return CUBLAS_STATUS_INVALID_VALUE;
    if (m == 0 || n == 0 || batchCount == 0)
        return CUBLAS_STATUS_SUCCESS;
    gemm_args g = {transa == CUBLAS_OP_T, transb == CUBLAS_OP_T, m, n, k,
                   *(const float *)alpha, *(const float *)beta, A, B, C,
                   layout_of(Atype), layout_of(Btype), layout_of(Ctype),
                   lda, ldb, ldc, strideA, strideB, strideC, batchCount};
    const long long total = (long long)m * n * batchCount;
    long long blocks = (total + 255) / 256;
    blocks = blocks > 4096 ? 4096 : blocks;
    (void)cudaGetLastError();
    KVRT_LAUNCH((unsigned)blocks, 256, 0, handle->stream, gemm_kernel)(g);
    return cudaGetLastError() == cudaSuccess ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED;
}

const char *cublasGetStatusString(cublasStatus_t status)
{
    switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    }
    return "CUBLAS_STATUS_UNKNOWN";
}

} // extern "C"
