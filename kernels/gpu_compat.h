/*
 * gpu_compat.h: one spelling for CUDA and HIP. Kernels (.cu) and the host
 * glue (src/backend_gpu.c) are written against CUDA names; when compiled by
 * hipcc, or as C with KVRT_GPU_HIP defined, those names map to HIP's.
 *
 * Included first by every .cu file and by the host glue. In C (the glue)
 * it brings in only the runtime API, which is C-compatible; in device
 * compilation it brings in the full runtime with kernel launch syntax.
 * C has no typedefs for the runtime's struct and enum types: the glue
 * spells them `struct cudaDeviceProp`, `enum cudaStreamCaptureMode`, which
 * map to HIP's tagged types of the same shape.
 *
 * Also here: which API a translation unit is built for (KVRT_GPU_FN gives
 * launchers and backend entry points a per-API prefix so that CUDA and HIP
 * can be linked into one library), the warp width, warp shuffles, and
 * floating-point operations that must not be fused (bit-exact twins).
 */
#ifndef KVRT_GPU_COMPAT_H
#define KVRT_GPU_COMPAT_H

#if defined(__HIPCC__) || defined(__HIP__) || defined(KVRT_GPU_HIP)
#  define KVRT_GPU_IS_HIP 1
#  if !defined(__HIP_PLATFORM_AMD__) && !defined(__HIP_PLATFORM_NVIDIA__)
#    define __HIP_PLATFORM_AMD__ 1 /* the C glue is compiled by a host compiler */
#  endif
#  if defined(__HIP__)
#    include <hip/hip_runtime.h>
#  else
#    include <hip/hip_runtime_api.h>
#  endif
#elif defined(__CUDACC__) || defined(KVRT_GPU_CUDA)
#  define KVRT_GPU_IS_CUDA 1
#  if defined(__CUDACC__)
#    include <cuda_runtime.h>
#  else
#    include <cuda_runtime_api.h>
#  endif
#else
#  error "gpu_compat.h: compile with nvcc or hipcc, or define KVRT_GPU_CUDA or KVRT_GPU_HIP"
#endif

/* kvrt_cuda_<name> or kvrt_hip_<name>. */
#if defined(KVRT_GPU_IS_HIP)
#  define KVRT_GPU_FN(name) kvrt_hip_##name
#  define KVRT_GPU_API_NAME "hip"
#else
#  define KVRT_GPU_FN(name) kvrt_cuda_##name
#  define KVRT_GPU_API_NAME "cuda"
#endif

/* ---- runtime API names (CUDA spelling -> HIP) ---- */
#if defined(KVRT_GPU_IS_HIP)
#  define cudaError_t                       hipError_t
#  define cudaSuccess                       hipSuccess
#  define cudaErrorNotReady                 hipErrorNotReady
#  define cudaErrorInvalidValue             hipErrorInvalidValue
#  define cudaErrorMemoryAllocation         hipErrorOutOfMemory
#  define cudaErrorNoDevice                 hipErrorNoDevice
#  define cudaErrorInsufficientDriver       hipErrorInsufficientDriver
#  define cudaGetErrorString                hipGetErrorString
#  define cudaGetErrorName                  hipGetErrorName
#  define cudaGetLastError                  hipGetLastError
#  define cudaPeekAtLastError               hipPeekAtLastError
#  define cudaGetDeviceCount                hipGetDeviceCount
#  define cudaGetDevice                     hipGetDevice
#  define cudaSetDevice                     hipSetDevice
#  define cudaDeviceProp                    hipDeviceProp_t
#  define cudaGetDeviceProperties           hipGetDeviceProperties
#  define cudaDeviceSynchronize             hipDeviceSynchronize
#  define cudaMemGetInfo                    hipMemGetInfo
#  define cudaStream_t                      hipStream_t
#  define cudaStreamCreateWithFlags         hipStreamCreateWithFlags
#  define cudaStreamNonBlocking             hipStreamNonBlocking
#  define cudaStreamDestroy                 hipStreamDestroy
#  define cudaStreamSynchronize             hipStreamSynchronize
#  define cudaStreamIsCapturing             hipStreamIsCapturing
#  define cudaStreamCaptureStatus           hipStreamCaptureStatus
#  define cudaStreamCaptureStatusNone       hipStreamCaptureStatusNone
#  define cudaStreamCaptureMode             hipStreamCaptureMode
#  define cudaStreamCaptureModeGlobal       hipStreamCaptureModeGlobal
#  define cudaStreamCaptureModeThreadLocal  hipStreamCaptureModeThreadLocal
#  define cudaStreamCaptureModeRelaxed      hipStreamCaptureModeRelaxed
#  define cudaThreadExchangeStreamCaptureMode hipThreadExchangeStreamCaptureMode
#  define cudaStreamBeginCapture            hipStreamBeginCapture
#  define cudaStreamEndCapture              hipStreamEndCapture
#  define cudaGraph_t                       hipGraph_t
#  define cudaGraphExec_t                   hipGraphExec_t
#  define cudaGraphLaunch                   hipGraphLaunch
#  define cudaGraphDestroy                  hipGraphDestroy
#  define cudaGraphExecDestroy              hipGraphExecDestroy
#  define cudaEvent_t                       hipEvent_t
#  define cudaEventCreateWithFlags          hipEventCreateWithFlags
#  define cudaEventDisableTiming            hipEventDisableTiming
#  define cudaEventDefault                  hipEventDefault
#  define cudaEventCreate                   hipEventCreate
#  define cudaEventRecord                   hipEventRecord
#  define cudaEventQuery                    hipEventQuery
#  define cudaEventSynchronize              hipEventSynchronize
#  define cudaEventElapsedTime              hipEventElapsedTime
#  define cudaEventDestroy                  hipEventDestroy
#  define cudaMalloc                        hipMalloc
#  define cudaFree                          hipFree
#  define cudaMallocAsync                   hipMallocAsync
#  define cudaFreeAsync                     hipFreeAsync
#  define cudaMallocHost(p, n)              hipHostMalloc((p), (n), hipHostMallocDefault)
#  define cudaFreeHost                      hipHostFree
#  define cudaMemcpy                        hipMemcpy
#  define cudaMemcpyAsync                   hipMemcpyAsync
#  define cudaMemcpyHostToDevice            hipMemcpyHostToDevice
#  define cudaMemcpyDeviceToHost            hipMemcpyDeviceToHost
#  define cudaMemcpyDeviceToDevice          hipMemcpyDeviceToDevice
#  define cudaMemcpyDefault                 hipMemcpyDefault
#  define cudaMemset                        hipMemset
#  define cudaMemsetAsync                   hipMemsetAsync
#  define cudaPointerAttributes             hipPointerAttribute_t
#  define cudaPointerGetAttributes          hipPointerGetAttributes
#endif

/* ---- device code ---- */
#if defined(__CUDACC__) || defined(__HIP__)

/* The warp (wavefront) width: 32 on NVIDIA and RDNA, 64 on CDNA. Never
 * assume 32; launchers that need it on the host query the device. */
#  define KVRT_WARP_SIZE warpSize

/* Butterfly exchange across the whole warp. */
#  if defined(KVRT_GPU_IS_HIP)
#    define KVRT_SHFL_XOR(var, lane_mask) __shfl_xor((var), (lane_mask), warpSize)
#  else
#    define KVRT_SHFL_XOR(var, lane_mask) __shfl_xor_sync(0xffffffffu, (var), (lane_mask), warpSize)
#  endif

/* a*b - c*d and a*b + c*d rounded after each operation, never fused into an
 * FMA: the C twins compute them unfused (ISO C, fp-contract off), and a
 * fused result would differ in the last bit. */
#  if defined(KVRT_GPU_IS_HIP)
__device__ static inline float kvrt_mul_sub_rn(float a, float b, float c, float d)
{
#    pragma clang fp contract(off)
    return a * b - c * d;
}
__device__ static inline float kvrt_mul_add_rn(float a, float b, float c, float d)
{
#    pragma clang fp contract(off)
    return a * b + c * d;
}
#  else
__device__ static inline float kvrt_mul_sub_rn(float a, float b, float c, float d)
{
    return __fsub_rn(__fmul_rn(a, b), __fmul_rn(c, d));
}
__device__ static inline float kvrt_mul_add_rn(float a, float b, float c, float d)
{
    return __fadd_rn(__fmul_rn(a, b), __fmul_rn(c, d));
}
#  endif

#endif /* device code */

#endif /* KVRT_GPU_COMPAT_H */
