/*
 * gpu_common.cuh: device helpers shared by the kernels: element types by
 * dtype (conversions are kvrt_layout.h's, so every backend rounds alike),
 * 16-byte packs of 8 elements, copy units, grid sizing and the launch check.
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
