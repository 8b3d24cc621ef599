/*
 * kvrt_sim.h: the host side of kvrt-sim, the CPU simulator of the GPU
 * backend: the subset of the CUDA runtime API (and of the driver's VMM API,
 * reached through cudaGetDriverEntryPoint) that src/backend_gpu.c, the GPU
 * tests, kvrt-bench and kvrt-demo call, in C, with no CUDA or HIP header.
 *
 * kernels/gpu_compat.h includes it instead of the toolkit's headers when
 * KVRT_GPU_SIM is defined. Functions carry the CUDA names (so the C glue
 * compiles unchanged); the HIP spellings the glue, kernels and tests use are
 * macros onto the same functions. One library is built per flavour:
 * tests/sim/sim_runtime.cpp compiled with KVRT_SIM_WARP=32 (the CUDA
 * backend) or 64 with KVRT_SIM_HIP (the HIP backend, CDNA-like), which only
 * changes the warp width, the device's name and the errors' names.
 *
 * Semantics are CUDA's where a test can observe them (tests/sim/README in
 * docs/testing.md): work queued on a stream runs only when the host must see
 * it; device memory is inaccessible to host code; graph capture records the
 * queued work and fails on a synchronizing call; a kernel error (barrier
 * divergence, warp-collective misuse) is sticky, as a device fault is.
 */
#ifndef KVRT_SIM_H
#define KVRT_SIM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CUDART_VERSION 12080

typedef enum cudaError {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInitializationError = 3,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidDevicePointer = 17,
    cudaErrorInvalidMemcpyDirection = 21,
    cudaErrorInsufficientDriver = 35,
    cudaErrorNoDevice = 100,
    cudaErrorInvalidDevice = 101,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorIllegalState = 401,
    cudaErrorNotReady = 600,
    cudaErrorIllegalAddress = 700,
    cudaErrorLaunchOutOfResources = 701,
    cudaErrorLaunchFailure = 719,
    cudaErrorStreamCaptureUnsupported = 900,
    cudaErrorStreamCaptureInvalidated = 901,
    cudaErrorStreamCaptureUnmatched = 903,
    cudaErrorStreamCaptureImplicit = 906,
    cudaErrorUnknown = 999
} cudaError_t;

typedef struct kvrt_sim_stream *cudaStream_t;
typedef struct kvrt_sim_event *cudaEvent_t;
typedef struct kvrt_sim_graph *cudaGraph_t;
typedef struct kvrt_sim_graph_exec *cudaGraphExec_t;

enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4
};

enum cudaStreamCaptureMode {
    cudaStreamCaptureModeGlobal = 0,
    cudaStreamCaptureModeThreadLocal = 1,
    cudaStreamCaptureModeRelaxed = 2
};

enum cudaStreamCaptureStatus {
    cudaStreamCaptureStatusNone = 0,
    cudaStreamCaptureStatusActive = 1,
    cudaStreamCaptureStatusInvalidated = 2
};

enum cudaMemoryType {
    cudaMemoryTypeUnregistered = 0,
    cudaMemoryTypeHost = 1,
    cudaMemoryTypeDevice = 2,
    cudaMemoryTypeManaged = 3
};

struct cudaPointerAttributes {
    enum cudaMemoryType type;
    int   device;
    void *devicePointer;
    void *hostPointer;
    int   memoryType; /* HIP's field: hipMemoryTypeDevice for device memory */
    int   isManaged;  /* HIP's field */
};

struct cudaDeviceProp {
    char   name[256];
    size_t totalGlobalMem;
    size_t sharedMemPerBlock;
    size_t sharedMemPerBlockOptin;
    size_t sharedMemPerMultiprocessor;
    int    regsPerBlock;
    int    warpSize;
    int    maxThreadsPerBlock;
    int    maxThreadsDim[3];
    int    maxGridSize[3];
    int    major, minor;
    int    multiProcessorCount;
    int    maxThreadsPerMultiProcessor;
    int    l2CacheSize;
    char   gcnArchName[256];
};

enum cudaDeviceAttr {
    cudaDevAttrMaxThreadsPerBlock = 1,
    cudaDevAttrMaxSharedMemoryPerBlock = 8,
    cudaDevAttrWarpSize = 10,
    cudaDevAttrMultiProcessorCount = 16,
    cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
    cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};

#define cudaStreamDefault 0x0u
#define cudaStreamNonBlocking 0x1u
#define cudaEventDefault 0x0u
#define cudaEventBlockingSync 0x1u
#define cudaEventDisableTiming 0x2u
#define cudaEnableDefault 0x0ull

enum cudaDriverEntryPointQueryResult {
    cudaDriverEntryPointSuccess = 0,
    cudaDriverEntryPointSymbolNotFound = 1,
    cudaDriverEntryPointVersionNotSufficent = 2
};

/* ---- runtime API ---- */
const char *cudaGetErrorString(cudaError_t err);
const char *cudaGetErrorName(cudaError_t err);
cudaError_t cudaGetLastError(void);
cudaError_t cudaPeekAtLastError(void);
cudaError_t cudaGetDeviceCount(int *count);
cudaError_t cudaGetDevice(int *device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *prop, int device);
cudaError_t cudaDeviceGetAttribute(int *value, enum cudaDeviceAttr attr, int device);
cudaError_t cudaDeviceSynchronize(void);
cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes);

cudaError_t cudaStreamCreate(cudaStream_t *stream);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *stream, unsigned int flags);
cudaError_t cudaStreamDestroy(cudaStream_t stream);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaStreamQuery(cudaStream_t stream);
cudaError_t cudaStreamIsCapturing(cudaStream_t stream, enum cudaStreamCaptureStatus *status);
cudaError_t cudaThreadExchangeStreamCaptureMode(enum cudaStreamCaptureMode *mode);
cudaError_t cudaStreamBeginCapture(cudaStream_t stream, enum cudaStreamCaptureMode mode);
cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t *graph);
cudaError_t cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t graph, unsigned long long flags);
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream);
cudaError_t cudaGraphDestroy(cudaGraph_t graph);
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec);

cudaError_t cudaEventCreate(cudaEvent_t *event);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *event, unsigned int flags);
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream);
cudaError_t cudaEventQuery(cudaEvent_t event);
cudaError_t cudaEventSynchronize(cudaEvent_t event);
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end);
cudaError_t cudaEventDestroy(cudaEvent_t event);

cudaError_t cudaMalloc(void **p, size_t n);
cudaError_t cudaFree(void *p);
cudaError_t cudaMallocAsync(void **p, size_t n, cudaStream_t stream);
cudaError_t cudaFreeAsync(void *p, cudaStream_t stream);
cudaError_t cudaMallocHost(void **p, size_t n);
cudaError_t cudaHostAlloc(void **p, size_t n, unsigned int flags);
cudaError_t cudaFreeHost(void *p);
cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, enum cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, enum cudaMemcpyKind kind,
                            cudaStream_t stream);
cudaError_t cudaMemset(void *p, int value, size_t n);
cudaError_t cudaMemsetAsync(void *p, int value, size_t n, cudaStream_t stream);
cudaError_t cudaPointerGetAttributes(struct cudaPointerAttributes *attr, const void *p);

cudaError_t cudaGetDriverEntryPoint(const char *symbol, void **fn, unsigned long long flags,
                                    enum cudaDriverEntryPointQueryResult *status);
cudaError_t cudaGetDriverEntryPointByVersion(const char *symbol, void **fn, unsigned int version,
                                             unsigned long long flags,
                                             enum cudaDriverEntryPointQueryResult *status);

/* ---- driver types of the VMM API (functions only through the entry points) ---- */
typedef enum cudaError_enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_SUPPORTED = 801
} CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUmemGenericAllocationHandle;
typedef enum CUdevice_attribute_enum {
    CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16,
    CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 102
} CUdevice_attribute;
typedef enum CUmemAllocationType_enum { CU_MEM_ALLOCATION_TYPE_PINNED = 1 } CUmemAllocationType;
typedef enum CUmemLocationType_enum { CU_MEM_LOCATION_TYPE_DEVICE = 1 } CUmemLocationType;
typedef enum CUmemAllocationGranularity_flags_enum {
    CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0,
    CU_MEM_ALLOC_GRANULARITY_RECOMMENDED = 1
} CUmemAllocationGranularity_flags;
typedef enum CUmemAccess_flags_enum {
    CU_MEM_ACCESS_FLAGS_PROT_NONE = 0,
    CU_MEM_ACCESS_FLAGS_PROT_READ = 1,
    CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
} CUmemAccess_flags;
typedef struct CUmemLocation_st {
    CUmemLocationType type;
    int id;
} CUmemLocation;
typedef struct CUmemAllocationProp_st {
    CUmemAllocationType type;
    int requestedHandleTypes;
    CUmemLocation location;
    void *win32HandleMetaData;
    struct {
        unsigned char compressionType, gpuDirectRDMACapable;
        unsigned short usage;
        unsigned char reserved[4];
    } allocFlags;
} CUmemAllocationProp;
typedef struct CUmemAccessDesc_st {
    CUmemLocation location;
    CUmemAccess_flags flags;
} CUmemAccessDesc;

/* ---- HIP spellings (the glue's, kernels' and tests' HIP-only code) ---- */
#define hipSuccess cudaSuccess
#define hipError_t cudaError_t
#define hipMemoryTypeDevice cudaMemoryTypeDevice
#define hipDeviceGetAttribute cudaDeviceGetAttribute
#define hipDeviceAttributeMultiprocessorCount cudaDevAttrMultiProcessorCount
#define hipGraphInstantiate(exec, graph, node, log, size) cudaGraphInstantiate((exec), (graph), 0ull)

/* ---- kvrt-sim's own controls (tests) ---- */

/* Device calls counted for fault injection. */
enum kvrt_sim_call {
    KVRT_SIM_ALLOC = 0,  /* cudaMalloc, cudaMallocAsync, cudaMallocHost, cuMemCreate */
    KVRT_SIM_COPY = 1,   /* cudaMemcpy, cudaMemcpyAsync, cudaMemset, cudaMemsetAsync */
    KVRT_SIM_LAUNCH = 2, /* kernel launches */
    KVRT_SIM_N_CALLS = 3
};

/* Calls of `kind` made so far in this process. */
long kvrt_sim_calls(int kind);
/* Kernel launches accepted so far whose kernel (as written at the launch
 * site, e.g. "attention_mla_kernel<KVRT_LAYOUT_BF16>") contains name_part
 * (NULL: every launch): which kernel a call took. */
long kvrt_sim_launches_of(const char *name_part);
/* The deliberate bug KVRT_SIM_MUTANT(n) (kernels/gpu_compat.h) turns on:
 * the environment's KVRT_SIM_MUTANT, read once; 0 none. */
int kvrt_sim_mutant(void);
/* Device memory [p, p + n) is a buffer of its own inside a larger
 * allocation (staging), and the `guard` bytes after it are a red zone until
 * another buffer covers them: the race variant reports a kernel that
 * touches them, as it does the tail of an allocation past its size. */
void kvrt_sim_guard(const void *p, size_t n, size_t guard);
/* Makes the call of `kind` numbered `nth` (counting from 1 as kvrt_sim_calls
 * does, so kvrt_sim_calls(kind) + 1 is the next one) fail with the
 * runtime's error for it: cudaErrorMemoryAllocation for an allocation,
 * cudaErrorInvalidValue for a copy, cudaErrorLaunchOutOfResources for a
 * launch. 0 disarms. The environment variable KVRT_SIM_FAIL=alloc:N,
 * copy:N or launch:N does the same at start. */
void kvrt_sim_fail_at(int kind, long nth);
/* The seed of block and thread orders (KVRT_SIM_SEED, default 1). */
void kvrt_sim_set_seed(uint64_t seed);
/* Kernel errors seen so far (each also makes the error sticky). */
long kvrt_sim_kernel_errors(void);
/* Clears a sticky error (tests that provoke kernel errors on purpose). */
void kvrt_sim_reset_error(void);

#ifdef __cplusplus
}
#endif

#endif /* KVRT_SIM_H */
