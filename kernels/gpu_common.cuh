/*
 * gpu_common.cuh: device helpers shared by the kernels: element types by
 * dtype (conversions are kvrt_layout.h's, so every backend rounds alike),
 * 16-byte packs of 8 elements, asynchronous global-to-shared copies
 * (cp.async), copy units, grid sizing and the launch check.
 *
 * Everything here has internal linkage (an unnamed namespace), so the CUDA
 * and the HIP objects of one library never share a symbol.
 */
#ifndef KVRT_GPU_COMMON_CUH
#define KVRT_GPU_COMMON_CUH

#include "gpu_compat.h"

#include <stdint.h>

#include "gpu_launch.h"
#include "kvrt_layout.h"

namespace {

/* Threads per block of the element-wise kernels. */
constexpr int kThreads = 256;
/* Grid-stride kernels launch at most this many blocks. */
constexpr int64_t kMaxBlocks = 1 << 20;

/* Blocks for `total` work items, kThreads per block, capped for grid-stride loops. */
inline unsigned grid_blocks(int64_t total)
{
    int64_t blocks = (total + kThreads - 1) / kThreads;
    if (blocks > kMaxBlocks)
        blocks = kMaxBlocks;
    return (unsigned)(blocks > 0 ? blocks : 1);
}

/* Drops an error left over from earlier, unrelated work (not sticky ones,
 * which will show again), so that the check after a launch reports this
 * launch only. */
inline void clear_stale_error() { (void)cudaGetLastError(); }

/* The status of the launch just made. */
inline cudaError_t launch_status() { return cudaGetLastError(); }

inline bool aligned_to(const void *p, uintptr_t n) { return ((uintptr_t)p % n) == 0; }

/* Multiprocessors of the current device, cached per device. */
inline int sm_count()
{
    static int cached[64];
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) {
        (void)cudaGetLastError();
        return 100;
    }
    if (dev < 64 && cached[dev] > 0)
        return cached[dev];
    int n = 0;
#if defined(KVRT_GPU_IS_HIP)
    if (hipDeviceGetAttribute(&n, hipDeviceAttributeMultiprocessorCount, dev) != hipSuccess)
#else
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
#endif
    {
        (void)cudaGetLastError();
        n = 100;
    }
    if (n <= 0)
        n = 100;
    if (dev < 64)
        cached[dev] = n;
    return n;
}

/* ---- element types ---- */

template <int DT> struct dtype_traits;

template <> struct dtype_traits<KVRT_LAYOUT_F32> {
    typedef float storage;
    __device__ static float to_f32(float v) { return v; }
    __device__ static float from_f32(float f) { return f; }
};

template <> struct dtype_traits<KVRT_LAYOUT_F16> {
    typedef uint16_t storage;
    __device__ static float to_f32(uint16_t v) { return kvrt_f16_to_f32(v); }
    __device__ static uint16_t from_f32(float f) { return kvrt_f32_to_f16(f); }
};

template <> struct dtype_traits<KVRT_LAYOUT_BF16> {
    typedef uint16_t storage;
    __device__ static float to_f32(uint16_t v) { return kvrt_bf16_to_f32(v); }
    __device__ static uint16_t from_f32(float f) { return kvrt_f32_to_bf16(f); }
};

/* 8 elements, read and written as one or two 16-byte accesses. */
template <typename T> struct alignas(16) pack8 {
    T v[8];
};

template <typename T> __device__ inline pack8<T> load_pack8(const T *p)
{
    pack8<T> r;
    const uint4 *s = reinterpret_cast<const uint4 *>(p);
    uint4 *d = reinterpret_cast<uint4 *>(&r);
#pragma unroll
    for (int i = 0; i < (int)(sizeof(pack8<T>) / sizeof(uint4)); i++)
        d[i] = s[i];
    return r;
}

template <typename T> __device__ inline void store_pack8(T *p, const pack8<T> &v)
{
    uint4 *d = reinterpret_cast<uint4 *>(p);
    const uint4 *s = reinterpret_cast<const uint4 *>(&v);
#pragma unroll
    for (int i = 0; i < (int)(sizeof(pack8<T>) / sizeof(uint4)); i++)
        d[i] = s[i];
}

/* ---- asynchronous copies (cp.async) ----
 *
 * 16-byte copies from global to shared memory that run while the thread
 * goes on, grouped and waited for as on sm_80+:
 *   async_copies ac;                    one per thread, before its first copy
 *   async_copy16(ac, dst, src, valid);  dst shared, src global, both 16-byte
 *                                       aligned; !valid: dst gets 16 zero bytes
 *                                       and src is not read
 *   async_commit(ac);                   closes the group of copies issued so far
 *   async_wait<N>(ac);                  until at most N committed groups are
 *                                       pending; async_wait<0> waits for all
 * A wait covers this thread's copies only: other threads read them after a
 * __syncthreads() that follows the wait.
 *   nvcc, sm_80+: cp.async.cg (L2 only: K/V rows are read once),
 *                 cp.async.commit_group, cp.async.wait_group (inline PTX).
 *   nvcc < sm_80, HIP: a plain 16-byte copy; commit and wait do nothing.
 *   kvrt-sim: each copy lands either at once or only at the wait that
 *             covers it (kvrt_sim::async_copies), so a read before the wait
 *             sees stale shared memory, as it may on a GPU.
 * async_copies is empty on GPUs (it costs nothing there). */
#if defined(KVRT_GPU_SIM)
typedef ::kvrt_sim::async_copies async_copies;
#else
struct async_copies {};
#endif

#if !defined(KVRT_GPU_SIM) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#  define KVRT_CP_ASYNC_PTX 1
#endif

__device__ inline void async_copy16(async_copies &ac, void *dst, const void *src, bool valid)
{
#if defined(KVRT_GPU_SIM)
    ac.copy16(dst, src, valid);
#elif defined(KVRT_CP_ASYNC_PTX)
    (void)ac;
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    const int src_bytes = valid ? 16 : 0; /* 0: the 16 bytes are zero-filled */
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
                 "r"(src_bytes)
                 : "memory");
#else
    (void)ac;
    *static_cast<uint4 *>(dst) = valid ? *static_cast<const uint4 *>(src) : make_uint4(0, 0, 0, 0);
#endif
}

__device__ inline void async_commit(async_copies &ac)
{
#if defined(KVRT_GPU_SIM)
    ac.commit();
#elif defined(KVRT_CP_ASYNC_PTX)
    (void)ac;
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#else
    (void)ac;
#endif
}

template <int N> __device__ inline void async_wait(async_copies &ac)
{
#if defined(KVRT_GPU_SIM)
    ac.wait(N);
#elif defined(KVRT_CP_ASYNC_PTX)
    (void)ac;
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#else
    (void)ac;
#endif
}

/* Copies VEC (1 or 8) elements src[si..] -> dst[di..], converting from
 * dtype SRC to DST. Equal dtypes copy bits (NaN payloads included), as the
 * C twin's memcpy does; otherwise each element goes through f32 with
 * round-to-nearest-even, as its kvrt_load/kvrt_store loop does. VEC 8
 * needs both addresses 16-byte aligned. */
template <int SRC, int DST, int VEC>
__device__ inline void convert_chunk(const void *src, int64_t si, void *dst, int64_t di)
{
    typedef typename dtype_traits<SRC>::storage S;
    typedef typename dtype_traits<DST>::storage D;
    const S *s = static_cast<const S *>(src) + si;
    D *d = static_cast<D *>(dst) + di;
    if (VEC == 8) {
        pack8<S> in = load_pack8(s);
        pack8<D> out;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            if (SRC == DST)
                out.v[i] = (D)in.v[i];
            else
                out.v[i] = dtype_traits<DST>::from_f32(dtype_traits<SRC>::to_f32(in.v[i]));
        }
        store_pack8(d, out);
    } else {
        if (SRC == DST)
            *d = (D)*s;
        else
            *d = dtype_traits<DST>::from_f32(dtype_traits<SRC>::to_f32(*s));
    }
}

/* Copy units: the widest of 16, 8, 4, 2 bytes that divides every length
 * and every address given (0 and NULL constrain nothing). */
inline int copy_unit(const int64_t *lengths, int n_lengths, const void *const *ptrs, int n_ptrs)
{
    int unit = 16;
    while (unit > 1) {
        bool ok = true;
        for (int i = 0; i < n_lengths && ok; i++)
            ok = lengths[i] % unit == 0;
        for (int i = 0; i < n_ptrs && ok; i++)
            ok = ptrs[i] == NULL || aligned_to(ptrs[i], (uintptr_t)unit);
        if (ok)
            break;
        unit >>= 1;
    }
    return unit;
}

/* The same choice on the device, for layouts only the device can read. */
__device__ inline int device_copy_unit(int64_t len_a, int64_t len_b, const void *a, const void *b)
{
    int unit = 16;
    while (unit > 1 && ((len_a % unit) != 0 || (len_b % unit) != 0 ||
                        ((uintptr_t)a % (uintptr_t)unit) != 0 ||
                        ((uintptr_t)b % (uintptr_t)unit) != 0))
        unit >>= 1;
    return unit;
}

template <int UNIT> struct unit_type;
template <> struct unit_type<16> { typedef uint4 type; };
template <> struct unit_type<8> { typedef uint2 type; };
template <> struct unit_type<4> { typedef uint32_t type; };
template <> struct unit_type<2> { typedef uint16_t type; };
template <> struct unit_type<1> { typedef uint8_t type; };

} // namespace

#endif /* KVRT_GPU_COMMON_CUH */
