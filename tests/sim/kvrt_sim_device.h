/*
 * kvrt_sim_device.h: the device side of kvrt-sim for kernels compiled as
 * C++17 (each kernels/NAME.cu through tests/sim/kernel.cpp.in): CUDA's qualifiers,
 * vector types, built-in indices, barriers, warp collectives, atomics and
 * fences, over the fiber scheduler of tests/sim/sim_runtime.cpp.
 *
 * Each GPU thread of a block is a fiber on one OS thread; every barrier and
 * warp collective is a switch to the block's scheduler, which resumes the
 * threads in a seeded random order (never in lockstep) and reports, as a
 * sticky kernel error naming kernel, block and thread: threads waiting at
 * different barriers, a barrier or collective some thread can never reach,
 * a lane calling a collective with a mask that leaves it out, lanes of one
 * mask at different collectives, and a shuffle reading a lane that does not
 * take part. Collectives are rendezvous of the lanes in the mask, so
 * further ones (mma.sync, ldmatrix) fit the same mechanism. Asynchronous
 * copies (cp.async) land at once or at their wait (async_copies).
 *
 * `__shared__` variables are thread_local (one block at a time per OS
 * thread); dynamic shared memory comes from KVRT_DYNAMIC_SHARED
 * (kernels/gpu_compat.h): NaN bytes before each block, a guard page right
 * after the launched size (ASan-poisoned up to it). Launches go through
 * KVRT_LAUNCH, which queues the kernel with its arguments copied, as a
 * launch does.
 */
#ifndef KVRT_SIM_DEVICE_H
#define KVRT_SIM_DEVICE_H

#include "kvrt_sim.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#ifndef KVRT_SIM_WARP
#  error "kvrt_sim_device.h: define KVRT_SIM_WARP (32 or 64)"
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __constant__ static
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))

struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
static inline float2 make_float2(float x, float y) { return float2{x, y}; }
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
static inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }

namespace kvrt_sim {
extern thread_local uint3 thread_idx, block_idx;
extern thread_local dim3 block_dim, grid_dim;

enum collective_kind { SHFL = 0, SHFL_UP, SHFL_DOWN, SHFL_XOR, BALLOT, ANY, ALL, SYNCWARP };
/* Mask of a HIP collective without one: the warp's live lanes. */
constexpr unsigned long long kImplicitMask = ~0ull;

void syncthreads(const char *file, int line);
/* A warp collective of kind over the lanes of mask; returns this lane's result. */
uint64_t collective(int kind, unsigned long long mask, uint64_t value, int arg, int width,
                    const char *file, int line);
unsigned long long active_mask();
void *dynamic_shared();

struct launch_config {
    dim3        grid, block;
    size_t      smem;
    cudaStream_t stream;
    const char *name, *file;
    int         line;
};
/* Queues body (the kernel with its arguments) on the launch's stream; sets
 * the thread's last error as a launch does. */
void launch(const launch_config &c, std::function<void()> body);

template <typename... P> struct launcher {
    void (*kernel)(P...);
    launch_config c;
    template <typename... A> void operator()(A &&...args) const
    {
        std::tuple<typename std::decay<P>::type...> copied(std::forward<A>(args)...);
        void (*k)(P...) = kernel;
        launch(c, [k, copied]() { std::apply(k, copied); });
    }
};
template <typename... P>
launcher<P...> make_launcher(void (*kernel)(P...), const char *name, const char *file, int line,
                             dim3 grid, dim3 block, size_t smem, cudaStream_t stream)
{
    return launcher<P...>{kernel, launch_config{grid, block, smem, stream, name, file, line}};
}

template <typename T> inline uint64_t to_bits(T v)
{
    static_assert(sizeof(T) <= 8, "collectives move at most 8 bytes");
    uint64_t b = 0;
    memcpy(&b, &v, sizeof v);
    return b;
}
template <typename T> inline T from_bits(uint64_t b)
{
    T v;
    memcpy(&v, &b, sizeof v);
    return v;
}
} // namespace kvrt_sim

#define threadIdx (::kvrt_sim::thread_idx)
#define blockIdx (::kvrt_sim::block_idx)
#define blockDim (::kvrt_sim::block_dim)
#define gridDim (::kvrt_sim::grid_dim)
#define warpSize KVRT_SIM_WARP

#define __syncthreads() ::kvrt_sim::syncthreads(__FILE__, __LINE__)
static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

/* ---- warp collectives: CUDA's (with mask) and HIP's (the live lanes) ---- */
#define KVRT_SIM_SITE const char *kvrt_file_ = __builtin_FILE(), int kvrt_line_ = __builtin_LINE()
#define KVRT_SIM_COLL(kind, mask, v, arg, w)                                                 \
    ::kvrt_sim::from_bits<T>(::kvrt_sim::collective((kind), (mask), ::kvrt_sim::to_bits(v),  \
                                                    (arg), (w), kvrt_file_, kvrt_line_))

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = warpSize, KVRT_SIM_SITE)
{ return KVRT_SIM_COLL(::kvrt_sim::SHFL, mask, v, src, width); }
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize, KVRT_SIM_SITE)
{ return KVRT_SIM_COLL(::kvrt_sim::SHFL_UP, mask, v, (int)delta, width); }
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize, KVRT_SIM_SITE)
{ return KVRT_SIM_COLL(::kvrt_sim::SHFL_DOWN, mask, v, (int)delta, width); }
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize, KVRT_SIM_SITE)
{ return KVRT_SIM_COLL(::kvrt_sim::SHFL_XOR, mask, v, lane_mask, width); }

template <typename T>
T __shfl(T v, int src, int width = warpSize, KVRT_SIM_SITE)
{ return KVRT_SIM_COLL(::kvrt_sim::SHFL, ::kvrt_sim::kImplicitMask, v, src, width); }
template <typename T>
T __shfl_up(T v, unsigned delta, int width = warpSize, KVRT_SIM_SITE)
{ return KVRT_SIM_COLL(::kvrt_sim::SHFL_UP, ::kvrt_sim::kImplicitMask, v, (int)delta, width); }
template <typename T>
T __shfl_down(T v, unsigned delta, int width = warpSize, KVRT_SIM_SITE)
{ return KVRT_SIM_COLL(::kvrt_sim::SHFL_DOWN, ::kvrt_sim::kImplicitMask, v, (int)delta, width); }
template <typename T>
T __shfl_xor(T v, int lane_mask, int width = warpSize, KVRT_SIM_SITE)
{ return KVRT_SIM_COLL(::kvrt_sim::SHFL_XOR, ::kvrt_sim::kImplicitMask, v, lane_mask, width); }

static inline unsigned __ballot_sync(unsigned mask, int pred, KVRT_SIM_SITE)
{ return (unsigned)::kvrt_sim::collective(::kvrt_sim::BALLOT, mask, pred != 0, 0, warpSize, kvrt_file_, kvrt_line_); }
static inline int __any_sync(unsigned mask, int pred, KVRT_SIM_SITE)
{ return (int)::kvrt_sim::collective(::kvrt_sim::ANY, mask, pred != 0, 0, warpSize, kvrt_file_, kvrt_line_); }
static inline int __all_sync(unsigned mask, int pred, KVRT_SIM_SITE)
{ return (int)::kvrt_sim::collective(::kvrt_sim::ALL, mask, pred != 0, 0, warpSize, kvrt_file_, kvrt_line_); }
static inline void __syncwarp(unsigned mask = 0xffffffffu, KVRT_SIM_SITE)
{ (void)::kvrt_sim::collective(::kvrt_sim::SYNCWARP, mask, 0, 0, warpSize, kvrt_file_, kvrt_line_); }
static inline unsigned long long __ballot(int pred, KVRT_SIM_SITE)
{ return ::kvrt_sim::collective(::kvrt_sim::BALLOT, ::kvrt_sim::kImplicitMask, pred != 0, 0, warpSize, kvrt_file_, kvrt_line_); }
static inline int __any(int pred, KVRT_SIM_SITE)
{ return (int)::kvrt_sim::collective(::kvrt_sim::ANY, ::kvrt_sim::kImplicitMask, pred != 0, 0, warpSize, kvrt_file_, kvrt_line_); }
static inline int __all(int pred, KVRT_SIM_SITE)
{ return (int)::kvrt_sim::collective(::kvrt_sim::ALL, ::kvrt_sim::kImplicitMask, pred != 0, 0, warpSize, kvrt_file_, kvrt_line_); }
static inline unsigned long long __activemask() { return ::kvrt_sim::active_mask(); }

/* ---- asynchronous copies (cp.async, through kernels/gpu_common.cuh) ----
 * One GPU thread's copies in flight: a local object of the thread, so that
 * nothing outlives it. Each 16-byte copy reads its source when issued and
 * lands in shared memory either at once or only when a wait covers its
 * group (chosen per copy by a hash of its destination and its number in
 * the thread), both of which a GPU may do: a read of the destination
 * before the wait sees stale bytes (NaN from the block's start) often
 * enough to fail a test. commit() closes the open group; wait(n) lands
 * every copy of the committed groups but the n most recent. Copies still
 * pending when the thread ends land then, as they would on a GPU. */
namespace kvrt_sim {
class async_copies {
public:
    async_copies() = default;
    async_copies(const async_copies &) = delete;
    async_copies &operator=(const async_copies &) = delete;
    ~async_copies()
    {
        commit();
        land(INT64_MAX);
    }

    void copy16(void *dst, const void *src, bool valid)
    {
        pending p;
        p.dst = static_cast<unsigned char *>(dst);
        p.group = 0; /* open */
        if (valid)
            memcpy(p.bytes, src, 16);
        else
            memset(p.bytes, 0, 16);
        uint64_t h = (uint64_t)(uintptr_t)dst * 0x9e3779b97f4a7c15ull + ++issued_;
        h ^= h >> 29;
        if ((h * 0xbf58476d1ce4e5b9ull) >> 63)
            memcpy(p.dst, p.bytes, 16); /* landed early */
        else
            pending_.push_back(p);
    }
    void commit()
    {
        committed_++;
        for (pending &p : pending_)
            if (p.group == 0)
                p.group = committed_;
    }
    void wait(int n) { land(committed_ - n); }

private:
    struct pending {
        unsigned char *dst;
        unsigned char bytes[16];
        int64_t group; /* 0: not committed yet */
    };
    /* Lands the copies of committed groups up to `last`, in issue order. */
    void land(int64_t last)
    {
        size_t kept = 0;
        for (size_t i = 0; i < pending_.size(); i++) {
            pending &p = pending_[i];
            if (p.group != 0 && p.group <= last)
                memcpy(p.dst, p.bytes, 16);
            else
                pending_[kept++] = p;
        }
        pending_.resize(kept);
    }
    std::vector<pending> pending_;
    int64_t committed_ = 0;
    uint64_t issued_ = 0;
};
} // namespace kvrt_sim

/* ---- atomics (blocks run on several OS threads) ---- */
template <typename T> T atomicAdd(T *p, T v)
{
    if constexpr (std::is_floating_point<T>::value) {
        T old, want; /* the generic builtins: the _n ones take integers only */
        __atomic_load(p, &old, __ATOMIC_RELAXED);
        do {
            want = old + v;
        } while (!__atomic_compare_exchange(p, &old, &want, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
        return old;
    } else {
        return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
    }
}
template <typename T> T atomicSub(T *p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }
template <typename T> T atomicExch(T *p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
template <typename T> T atomicCAS(T *p, T expected, T desired)
{
    __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return expected;
}
template <typename T> T atomicMax(T *p, T v)
{
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
    }
    return old;
}
template <typename T> T atomicMin(T *p, T v)
{
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old > v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
    }
    return old;
}
template <typename T> T atomicOr(T *p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
template <typename T> T atomicAnd(T *p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }

/* ---- arithmetic (the sim's objects are built with -ffp-contract=off) ---- */
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline long min(long a, long b) { return a < b ? a : b; }
static inline long max(long a, long b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
static inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __frcp_rn(float x) { return 1.0f / x; }

/* ---- half and bfloat16 (storage and round-to-nearest-even conversions) ---- */
struct __half { uint16_t x; };
struct __nv_bfloat16 { uint16_t x; };
static inline float __half2float(__half h)
{
    uint32_t sign = (uint32_t)(h.x & 0x8000u) << 16, exp = (h.x >> 10) & 0x1fu, mant = h.x & 0x3ffu;
    uint32_t u;
    float f;
    if (exp == 0) {
        f = (float)mant * 5.9604644775390625e-8f;
        memcpy(&u, &f, 4);
        u |= sign;
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (mant << 13);
    } else {
        u = sign | ((exp + 112u) << 23) | (mant << 13);
    }
    memcpy(&f, &u, 4);
    return f;
}
static inline __half __float2half_rn(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t a = x & 0x7fffffffu;
    __half h;
    if (a >= 0x7f800000u)
        h.x = (uint16_t)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u));
    else if (a >= 0x477ff000u)
        h.x = (uint16_t)(sign | 0x7c00u);
    else if (a < 0x38800000u) {
        if (a < 0x33000000u) {
            h.x = sign;
        } else {
            uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u, s = 126u - e;
            uint32_t v = m >> s, rem = m & ((1u << s) - 1u), mid = 1u << (s - 1u);
            if (rem > mid || (rem == mid && (v & 1u)))
                v++;
            h.x = (uint16_t)(sign | v);
        }
    } else {
        h.x = (uint16_t)(sign | ((a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u) >> 13));
    }
    return h;
}
static inline __half __float2half(float f) { return __float2half_rn(f); }
static inline float __bfloat162float(__nv_bfloat16 b)
{
    uint32_t u = (uint32_t)b.x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline __nv_bfloat16 __float2bfloat16_rn(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    __nv_bfloat16 b;
    b.x = (x & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((x >> 16) | 0x40u)
                                           : (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
    return b;
}
static inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }

/* ---- tensor cores: mma.sync m16n8k16 and ldmatrix (the CUDA flavour) ----
 *
 * The sim's versions of the instructions kernels/gpu_common.cuh wraps, with
 * their register layouts (the PTX ISA's; summarized there). A warp's lanes
 * meet twice per instruction through __syncwarp over all 32 lanes: each
 * lane first puts its operand registers (or its row address) in the warp's
 * exchange area, and after the first meeting computes its own result from
 * everyone's; the second meeting keeps the area until every lane has read
 * it. So a lane that misses the instruction, or lanes at different ones,
 * are the sim's collective errors, as .aligned makes them on a GPU.
 * Products of f16 or bf16 values are exact in f32; d accumulates them in
 * k order with f32 rounding after each addition. */
#if KVRT_SIM_WARP == 32
namespace kvrt_sim {
/* The exchange area of the calling thread's warp: 8 words per lane. */
inline uint32_t *warp_exchange()
{
    static thread_local uint32_t area[1024 / 32][32 * 8];
    const unsigned tid = thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z);
    return area[tid / 32];
}

inline unsigned mma_lane()
{
    return (thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z)) % 32;
}

inline float mma_elem(bool bf16, const uint32_t *regs, int reg, int half)
{
    const uint16_t e = (uint16_t)(half ? regs[reg] >> 16 : regs[reg] & 0xffffu);
    return bf16 ? __bfloat162float(__nv_bfloat16{e}) : __half2float(__half{e});
}

inline void mma_m16n8k16(bool bf16, float d[4], const uint32_t a[4], const uint32_t b[2],
                         KVRT_SIM_SITE)
{
    uint32_t *x = warp_exchange();
    const unsigned lane = mma_lane(), g = lane / 4, t = lane % 4;
    memcpy(x + 8 * lane, a, 4 * sizeof(uint32_t));
    memcpy(x + 8 * lane + 4, b, 2 * sizeof(uint32_t));
    (void)collective(SYNCWARP, 0xffffffffu, 0, 0, 32, kvrt_file_, kvrt_line_);
    for (int i = 0; i < 4; i++) {
        const unsigned row = g + 8 * (i / 2), col = 2 * t + i % 2;
        float acc = d[i];
        for (unsigned k = 0; k < 16; k++) {
            /* A[row][k]: lane 4 (row % 8) + (k % 8) / 2, register row / 8 + 2 (k / 8);
             * B[k][col]: lane 4 col + (k % 8) / 2, register k / 8 */
            const uint32_t *ra = x + 8 * (4 * (row % 8) + (k % 8) / 2);
            const uint32_t *rb = x + 8 * (4 * col + (k % 8) / 2) + 4;
            acc += mma_elem(bf16, ra, (int)(row / 8 + 2 * (k / 8)), (int)(k % 2)) *
                   mma_elem(bf16, rb, (int)(k / 8), (int)(k % 2));
        }
        d[i] = acc;
    }
    (void)collective(SYNCWARP, 0xffffffffu, 0, 0, 32, kvrt_file_, kvrt_line_);
}

inline void ldmatrix(int n, bool trans, uint32_t *r, const void *row, KVRT_SIM_SITE)
{
    uint32_t *x = warp_exchange();
    const unsigned lane = mma_lane(), g = lane / 4, t = lane % 4;
    memcpy(x + 8 * lane, &row, sizeof row);
    (void)collective(SYNCWARP, 0xffffffffu, 0, 0, 32, kvrt_file_, kvrt_line_);
    for (int i = 0; i < n; i++) {
        const uint16_t *p0, *p1;
        if (!trans) {
            memcpy(&p0, x + 8 * (8 * i + g), sizeof p0);
            r[i] = (uint32_t)p0[2 * t] | (uint32_t)p0[2 * t + 1] << 16;
        } else {
            memcpy(&p0, x + 8 * (8 * i + 2 * t), sizeof p0);
            memcpy(&p1, x + 8 * (8 * i + 2 * t + 1), sizeof p1);
            r[i] = (uint32_t)p0[g] | (uint32_t)p1[g] << 16;
        }
    }
    (void)collective(SYNCWARP, 0xffffffffu, 0, 0, 32, kvrt_file_, kvrt_line_);
}
} // namespace kvrt_sim
#endif /* KVRT_SIM_WARP == 32 */

#endif /* KVRT_SIM_DEVICE_H */
