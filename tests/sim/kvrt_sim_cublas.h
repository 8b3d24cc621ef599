/*
 * kvrt_sim_cublas.h: the few cuBLAS entry points kvrt-bench's dense
 * baseline (bench/baseline.cu) calls, for kvrt-sim. Spelled as in
 * cublas_v2.h, with the same semantics for what the baseline uses:
 * column-major operands, CUBLAS_OP_N / CUBLAS_OP_T, f16 or bf16 A and B,
 * f32, f16 or bf16 C, f32 compute with f32 alpha and beta, one product per
 * batch entry at the given strides, queued on the handle's stream (so it
 * runs in stream order, on device memory, as the real one does).
 * cublasGemmStridedBatchedEx checks what it is given and answers
 * CUBLAS_STATUS_NOT_SUPPORTED for any type or compute mode outside that set
 * and CUBLAS_STATUS_INVALID_VALUE for bad sizes, as cuBLAS does.
 * Built for the CUDA flavour only (HIP has no cuBLAS and the bench no
 * hipBLAS baseline).
 */
#ifndef KVRT_SIM_CUBLAS_H
#define KVRT_SIM_CUBLAS_H

#include <stdint.h>

#include "kvrt_sim.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_ALLOC_FAILED = 3,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_NOT_SUPPORTED = 15
} cublasStatus_t;

typedef enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 } cublasOperation_t;

/* cudaDataType values of library_types.h */
typedef enum { CUDA_R_32F = 0, CUDA_R_16F = 2, CUDA_R_16BF = 14 } cudaDataType;

typedef enum { CUBLAS_COMPUTE_32F = 68 } cublasComputeType_t;

typedef enum { CUBLAS_GEMM_DEFAULT = -1 } cublasGemmAlgo_t;

typedef struct kvrt_sim_cublas *cublasHandle_t;

cublasStatus_t cublasCreate(cublasHandle_t *handle);
cublasStatus_t cublasDestroy(cublasHandle_t handle);
cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream);
cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t handle, cublasOperation_t transa,
                                          cublasOperation_t transb, int m, int n, int k,
                                          const void *alpha, const void *A, cudaDataType Atype,
                                          int lda, long long strideA, const void *B,
                                          cudaDataType Btype, int ldb, long long strideB,
                                          const void *beta, void *C, cudaDataType Ctype, int ldc,
                                          long long strideC, int batchCount,
                                          cublasComputeType_t computeType, cublasGemmAlgo_t algo);
const char *cublasGetStatusString(cublasStatus_t status);

#ifdef __cplusplus
}
#endif

#endif /* KVRT_SIM_CUBLAS_H */
