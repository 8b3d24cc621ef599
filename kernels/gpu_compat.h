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
 * floating-point operations that must not be fused (bit-exact twins), and
 * the two macros every kernel goes through: KVRT_LAUNCH for launches and
 * KVRT_DYNAMIC_SHARED for dynamic shared memory.
 *
 * With KVRT_GPU_SIM (and KVRT_GPU_CUDA or KVRT_GPU_HIP) the same sources
 * build against kvrt-sim, the CPU simulator in tests/sim: the glue as C,
 * the kernels as C++17, with no toolkit header.
 */
#ifndef KVRT_GPU_COMPAT_H
#define KVRT_GPU_COMPAT_H

#if defined(KVRT_GPU_SIM)
/* kvrt-sim (tests/sim): the runtime in C, the device side in C++; both
 * spellings of every name used here, so no mapping below. */
#  if defined(KVRT_GPU_HIP)
#    define KVRT_GPU_IS_HIP 1
#  elif defined(KVRT_GPU_CUDA)
#    define KVRT_GPU_IS_CUDA 1
#  else
#    error "gpu_compat.h: kvrt-sim needs KVRT_GPU_CUDA or KVRT_GPU_HIP"
#  endif
#  include "kvrt_sim.h"
#  if defined(__cplusplus)
#    include "kvrt_sim_device.h"
#  endif
#elif defined(__HIPCC__) || defined(__HIP__) || defined(KVRT_GPU_HIP)
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

/* A deliberate bug, for proving that a check of kvrt-sim catches its class
 * (tests/gpu/meson.build, "mutants"): KVRT_SIM_MUTANT(n) is true in the
 * sim's race variant (kernels and glue) when the environment sets
 * KVRT_SIM_MUTANT=n, and 0 in every other build, where the compiler drops
 * what it guards. */
#if defined(KVRT_GPU_SIM) && defined(KVRT_SIM_RACE)
#  define KVRT_SIM_MUTANT(n) (kvrt_sim_mutant() == (n))
#else
#  define KVRT_SIM_MUTANT(n) 0
#endif

/* ---- runtime API names (CUDA spelling -> HIP) ---- */
#if defined(KVRT_GPU_IS_HIP) && !defined(KVRT_GPU_SIM)
#  define cudaError_t                       hipError_t
#  define cudaSuccess                       hipSuccess
#  define cudaErrorNotReady                 hipErrorNotReady
#  define cudaErrorInvalidValue             hipErrorInvalidValue
#  define cudaErrorMemoryAllocation         hipErrorOutOfMemory
#  define cudaErrorNoDevice                 hipErrorNoDevice
#  define cudaErrorInsufficientDriver       hipErrorInsufficientDriver
#  define cudaErrorStreamCaptureInvalidated hipErrorStreamCaptureInvalidated
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
#if defined(__CUDACC__) || defined(__HIP__) || (defined(KVRT_GPU_SIM) && defined(__cplusplus))

/* Every kernel launch: KVRT_LAUNCH(grid, block, smem, stream, kernel)(args...).
 * The kernel comes last so that a template's commas need no parentheses.
 * nvcc and hipcc get <<<>>>; kvrt-sim queues a call of the kernel with its
 * arguments copied. */
#  if defined(KVRT_GPU_SIM)
#    define KVRT_LAUNCH(grid, block, smem, stream, ...)                                       \
         ::kvrt_sim::make_launcher(__VA_ARGS__, #__VA_ARGS__, __FILE__, __LINE__, (grid),       \
                                   (block), (smem), (stream))
#  else
#    define KVRT_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<(grid), (block), (smem), (stream)>>>
#  endif

/* The dynamic shared memory of a kernel as `type *name` (16-byte aligned):
 * `extern __shared__` on a GPU, the block's buffer in kvrt-sim. */
#  if defined(KVRT_GPU_SIM)
#    define KVRT_DYNAMIC_SHARED(type, name) type *name = (type *)::kvrt_sim::dynamic_shared()
#  else
#    define KVRT_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#  endif

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
#  if defined(KVRT_GPU_IS_HIP) && !defined(KVRT_GPU_SIM)
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
