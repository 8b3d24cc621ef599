/*
 * gpu_common.cuh: device helpers shared by the kernels: element types by
 * dtype (conversions are kvrt_layout.h's, so every backend rounds alike),
 * 16-byte packs of 8 elements, asynchronous global-to-shared copies
 * (cp.async), copy units, grid sizing and the launch check; at the end, the
 * tensor-core products (mma.sync m16n8k16, ldmatrix) and the online
 * softmax of their S tiles.
 *
 * Everything here has internal linkage (an unnamed namespace), so the CUDA
 * and the HIP objects of one library never share a symbol.
 */
#ifndef KVRT_GPU_COMMON_CUH
#define KVRT_GPU_COMMON_CUH

#include "gpu_compat.h"

#include <stdint.h>

#if defined(__CUDACC__) && !defined(KVRT_GPU_SIM)
#  include <cuda_bf16.h>
#  include <cuda_fp16.h>
#endif

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

/* 8 elements, read and written as one or two 16-byte accesses: the words
 * and the elements are members of one union, so filling one and reading
 * the other is the same object's bytes (no write through a cast pointer
 * that a compiler may assume leaves `v` untouched). */
template <typename T> union alignas(16) pack8 {
    T     v[8];
    uint4 w[sizeof(T) * 8 / sizeof(uint4)];
};

template <typename T> __device__ inline pack8<T> load_pack8(const T *p)
{
    pack8<T> r;
    const uint4 *s = reinterpret_cast<const uint4 *>(p);
#pragma unroll
    for (int i = 0; i < (int)(sizeof r.w / sizeof r.w[0]); i++)
        r.w[i] = s[i];
    return r;
}

template <typename T> __device__ inline void store_pack8(T *p, const pack8<T> &v)
{
    uint4 *d = reinterpret_cast<uint4 *>(p);
#pragma unroll
    for (int i = 0; i < (int)(sizeof v.w / sizeof v.w[0]); i++)
        d[i] = v.w[i];
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

/* ---- tensor cores: mma.sync m16n8k16 and ldmatrix ----
 *
 * One matrix product D = A * B + C of 16x16 f16 or bf16 by 16x8 into f32,
 * and the loads of 8x8 16-bit matrices from shared memory that feed it, for
 * a group of 32 lanes (a CUDA warp; half a CDNA wavefront). Every lane of
 * the group calls them together, with the registers the PTX ISA gives it.
 * Lane l of the group (l = threadIdx.x % 32), g = l / 4, t = l % 4; a
 * register holds two 16-bit elements, the lower-indexed in its low half:
 *   A (16 x 16, row-major):  a[0] = A[g][2t, 2t+1]    a[1] = A[g+8][2t, 2t+1]
 *                            a[2] = A[g][2t+8, 2t+9]  a[3] = A[g+8][2t+8, 2t+9]
 *   B (16 x 8, by column):   b[0] = B[2t, 2t+1][g]    b[1] = B[2t+8, 2t+9][g]
 *   C, D (16 x 8, f32):      d[0], d[1] = D[g][2t, 2t+1]
 *                            d[2], d[3] = D[g+8][2t, 2t+1]
 * ldmatrix_x<N, TRANS>(r, row): N (1, 2, 4) matrices of 8 rows of 8 16-bit
 * elements; lane 8i + j gives the address of row j of matrix i (16 bytes,
 * 16-byte aligned shared memory; lanes past 8N give nothing). Lane l gets
 * r[i] = matrix i's row g, elements 2t, 2t+1; with TRANS its elements
 * (2t, g) and (2t+1, g), i.e. the row of the transposed matrix.
 * So the C fragment of two adjacent n-tiles is an A fragment, an 8 x 8
 * tile of K rows read by ldmatrix is a B fragment, and V rows read by
 * ldmatrix .trans are B fragments of P * V.
 *
 *   nvcc, sm_80+:  mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16} and
 *                  ldmatrix.sync.aligned.m8n8 (inline PTX).
 *   kvrt-sim, CUDA flavour: kvrt_sim::mma_m16n8k16 and kvrt_sim::ldmatrix,
 *                  an emulation over the sim's warp collectives with the
 *                  same register layouts.
 *   HIP (and nvcc below sm_80, and the sim's HIP flavour, which runs it):
 *                  the same layouts through 32-wide shuffles, one element
 *                  product at a time: correct, not fast.
 * Products of two f16 or bf16 values are exact in f32; the sums are f32
 * with an order of their own (the hardware's is not specified), so results
 * agree with a scalar loop within 16 roundings (tests/sim/test_sim_mma.cpp). */

#if !defined(KVRT_GPU_SIM) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#  define KVRT_MMA_PTX 1
#elif defined(KVRT_GPU_SIM) && defined(KVRT_GPU_IS_CUDA)
#  define KVRT_MMA_SIM 1
#else
#  define KVRT_MMA_PORTABLE 1
#endif

#if defined(KVRT_MMA_PORTABLE)
/* v from lane `src` of this lane's group of 32. */
__device__ inline unsigned long long shfl_group32(unsigned long long v, int src)
{
#  if defined(KVRT_GPU_IS_HIP)
    return __shfl(v, src, 32);
#  else
    return __shfl_sync(0xffffffffu, v, src, 32);
#  endif
}

/* Element `half` (0 low, 1 high) of a register of two 16-bit values, as f32. */
template <int DT> __device__ inline float mma_elem(uint32_t r, int half)
{
    return dtype_traits<DT>::to_f32((uint16_t)(half ? r >> 16 : r & 0xffffu));
}
#endif

/* d += A * B for one m16n8k16 tile; DT: KVRT_LAYOUT_F16 or KVRT_LAYOUT_BF16. */
template <int DT>
__device__ inline void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2])
{
    static_assert(DT == KVRT_LAYOUT_F16 || DT == KVRT_LAYOUT_BF16, "mma: f16 or bf16");
#if defined(KVRT_MMA_PTX)
    if (DT == KVRT_LAYOUT_F16)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(KVRT_MMA_SIM)
    ::kvrt_sim::mma_m16n8k16(DT == KVRT_LAYOUT_BF16, d, a, b);
#else
    const int lane = (int)(threadIdx.x % 32), g = lane / 4, t = lane % 4;
    /* k = 2s, 2s+1 (a[0], a[1], b[0]) and 2s+8, 2s+9 (a[2], a[3], b[1]) */
    for (int s = 0; s < 4; s++) {
        const unsigned long long a01 = shfl_group32(a[0] | (unsigned long long)a[1] << 32, 4 * g + s);
        const unsigned long long a23 = shfl_group32(a[2] | (unsigned long long)a[3] << 32, 4 * g + s);
        const unsigned long long bb = b[0] | (unsigned long long)b[1] << 32;
        const unsigned long long b_n0 = shfl_group32(bb, 4 * (2 * t) + s);
        const unsigned long long b_n1 = shfl_group32(bb, 4 * (2 * t + 1) + s);
        for (int i = 0; i < 4; i++) { /* d[i]: row g + 8 (i / 2), column 2t + i % 2 */
            const uint32_t lo = (uint32_t)(i < 2 ? a01 : a01 >> 32);  /* A[row][2s, 2s+1] */
            const uint32_t hi = (uint32_t)(i < 2 ? a23 : a23 >> 32);  /* A[row][2s+8, 2s+9] */
            const unsigned long long bn = i % 2 ? b_n1 : b_n0;
            const uint32_t b0 = (uint32_t)bn, b1 = (uint32_t)(bn >> 32);
            float acc = d[i];
            acc += mma_elem<DT>(lo, 0) * mma_elem<DT>(b0, 0);
            acc += mma_elem<DT>(lo, 1) * mma_elem<DT>(b0, 1);
            acc += mma_elem<DT>(hi, 0) * mma_elem<DT>(b1, 0);
            acc += mma_elem<DT>(hi, 1) * mma_elem<DT>(b1, 1);
            d[i] = acc;
        }
    }
#endif
}

/* N 8x8 matrices of 16-bit elements from shared memory (see above). */
template <int N, bool TRANS> __device__ inline void ldmatrix_x(uint32_t r[N], const void *row)
{
    static_assert(N == 1 || N == 2 || N == 4, "ldmatrix: x1, x2 or x4");
#if defined(KVRT_MMA_PTX)
    const unsigned p = (unsigned)__cvta_generic_to_shared(row);
    if (N == 1 && !TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(p));
    else if (N == 1)
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(p));
    else if (N == 2 && !TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                     : "=r"(r[0]), "=r"(r[1]) : "r"(p));
    else if (N == 2)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                     : "=r"(r[0]), "=r"(r[1]) : "r"(p));
    else if (!TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(p));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(p));
#elif defined(KVRT_MMA_SIM)
    ::kvrt_sim::ldmatrix(N, TRANS, r, row);
#else
    const int lane = (int)(threadIdx.x % 32), g = lane / 4, t = lane % 4;
    const unsigned long long mine = (unsigned long long)(uintptr_t)row;
    for (int i = 0; i < N; i++) {
        if (!TRANS) {
            const uint16_t *p = (const uint16_t *)(uintptr_t)shfl_group32(mine, 8 * i + g);
            r[i] = (uint32_t)p[2 * t] | (uint32_t)p[2 * t + 1] << 16;
        } else {
            const uint16_t *p0 = (const uint16_t *)(uintptr_t)shfl_group32(mine, 8 * i + 2 * t);
            const uint16_t *p1 = (const uint16_t *)(uintptr_t)shfl_group32(mine, 8 * i + 2 * t + 1);
            r[i] = (uint32_t)p0[g] | (uint32_t)p1[g] << 16;
        }
    }
#endif
}

/* Two f32 values as one register of two DT values (lo in the low half),
 * rounded to nearest even: the A fragment of a product P * V. */
template <int DT> __device__ inline uint32_t pack_pair(float lo, float hi)
{
#if defined(__CUDA_ARCH__) && !defined(KVRT_GPU_SIM)
    uint32_t r;
    if (DT == KVRT_LAYOUT_F16) {
        const __half2 h = __floats2half2_rn(lo, hi);
        memcpy(&r, &h, sizeof r);
    } else {
        const __nv_bfloat162 b = __floats2bfloat162_rn(lo, hi);
        memcpy(&r, &b, sizeof r);
    }
    return r;
#else
    return (uint32_t)dtype_traits<DT>::from_f32(lo) | (uint32_t)dtype_traits<DT>::from_f32(hi) << 16;
#endif
}

/* ---- online softmax of an S tile held as mma C fragments ----
 *
 * For the tensor-core attention kernels: a lane's rows g (lo) and g + 8
 * (hi) of a 16 x 8NT tile of logits s (the C fragments of Q K^T), keys at
 * positions kpos[8 nt + 2t + i % 2] (kNoKey: no row sees it). Scales,
 * soft-caps and masks s by position (causal, window; inactive rows see
 * nothing), updates the running row max m and sum l (over the 4 lanes of a
 * row, by shuffles), rescales the DN accumulator tiles o by
 * exp(m_old - m_new), and leaves p = exp(s - m_new) in s. A row with no
 * visible key keeps m -inf, l 0 and p 0; a NaN logit makes l NaN. */
constexpr int32_t kNoKey = INT32_MIN; /* the position of a key no row sees */
constexpr float kLog2e = 1.4426950408889634f;

/* Whether a query at qp sees a key at kp (kNoKey: none sees it). */
__device__ inline bool key_sees(int32_t kp, int64_t qp, int causal, int window)
{
    return kp != kNoKey && (!causal || kp <= qp) && (window <= 0 || kp > qp - window);
}

struct softmax_rows {
    bool    act_lo, act_hi;   /* the lane's rows take part */
    int32_t qp_lo, qp_hi;     /* their query positions */
    float   m_lo, m_hi, l_lo, l_hi;
};

template <int NT, int DN>
__device__ inline void softmax_tile(float (&s)[NT][4], float (&o)[DN][4], const int32_t *kpos,
                                    softmax_rows &r, float scale, float softcap, int causal,
                                    int window)
{
    const int t = (int)(threadIdx.x % 32) % 4;
    float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int32_t kp = kpos[nt * 8 + 2 * t + i % 2];
            const bool vis = i < 2 ? r.act_lo && key_sees(kp, r.qp_lo, causal, window)
                                   : r.act_hi && key_sees(kp, r.qp_hi, causal, window);
            float x = s[nt][i] * scale;
            if (softcap > 0.0f)
                x = softcap * tanhf(x / softcap);
            x = vis ? x : -INFINITY;
            s[nt][i] = x;
            if (i < 2)
                mx_lo = fmaxf(mx_lo, x);
            else
                mx_hi = fmaxf(mx_hi, x);
        }
    for (int off = 1; off < 4; off *= 2) {
        mx_lo = fmaxf(mx_lo, KVRT_SHFL_XOR(mx_lo, off));
        mx_hi = fmaxf(mx_hi, KVRT_SHFL_XOR(mx_hi, off));
    }
    /* rescale by exp(m_old - m_new); p = exp(s - m_new) */
    const float mn_lo = fmaxf(r.m_lo, mx_lo), mn_hi = fmaxf(r.m_hi, mx_hi);
    const float ref_lo = mn_lo == -INFINITY ? 0.0f : mn_lo;
    const float ref_hi = mn_hi == -INFINITY ? 0.0f : mn_hi;
    const float alpha_lo = exp2f((r.m_lo - ref_lo) * kLog2e);
    const float alpha_hi = exp2f((r.m_hi - ref_hi) * kLog2e);
    r.m_lo = mn_lo;
    r.m_hi = mn_hi;
    float sum_lo = 0.0f, sum_hi = 0.0f;
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const float p = exp2f((s[nt][i] - (i < 2 ? ref_lo : ref_hi)) * kLog2e);
            s[nt][i] = p;
            if (i < 2)
                sum_lo += p;
            else
                sum_hi += p;
        }
    r.l_lo = r.l_lo * alpha_lo + sum_lo;
    r.l_hi = r.l_hi * alpha_hi + sum_hi;
#pragma unroll
    for (int dn = 0; dn < DN; dn++) {
        o[dn][0] *= alpha_lo;
        o[dn][1] *= alpha_lo;
        o[dn][2] *= alpha_hi;
        o[dn][3] *= alpha_hi;
    }
}

/* ---- one thread per head row (quantized write, converting gather) ----
 *
 * Work item t of a grid-stride loop over n rows of n_heads K head rows and
 * then (with_v) n_heads V head rows each: its row r, head h and whether it
 * is the V row. */
struct head_row {
    int32_t r, h;
    bool    is_v;
};

__device__ inline head_row head_row_of(int64_t t, int32_t n_heads, bool with_v)
{
    const int32_t per_row = n_heads * (with_v ? 2 : 1);
    head_row w;
    w.r = (int32_t)(t / per_row);
    w.h = (int32_t)(t - (int64_t)w.r * per_row);
    w.is_v = w.h >= n_heads;
    w.h -= w.is_v ? n_heads : 0;
    return w;
}

} // namespace

#endif /* KVRT_GPU_COMMON_CUH */
