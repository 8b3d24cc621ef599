/*
 * test_sim_mma.cpp: the tensor-core helpers of kernels/gpu_common.cuh
 * (mma_m16n8k16, ldmatrix_x) against a scalar loop, on kvrt-sim: on the
 * CUDA flavour they are the sim's emulation of mma.sync and ldmatrix, on
 * the HIP flavour (warp 64) the portable shuffle path with two groups of 32
 * lanes in one wavefront.
 *
 * Each group of 32 lanes gets its own random matrices in device memory;
 * its lanes build their fragments from them by the PTX ISA's layouts
 * (gpu_common.cuh), call the helper, and scatter the result back by the
 * same layouts, so a lane that gets another lane's element shows as a
 * wrong matrix entry.
 *   mma: small integers (every product and partial sum exact: bit-exact),
 *        and random values in [-2, 2) with f32 accumulation. The bound of
 *        the latter: D = C + sum of 16 products, each exact in f32 (two
 *        f16 or bf16 significands of at most 11 bits multiply into 22);
 *        adding 17 terms in any order with f32 rounding after each
 *        addition is off the exact sum by at most gamma_16 times the sum
 *        of the terms' magnitudes, gamma_16 = 16u / (1 - 16u), u = 2^-24.
 *   ldmatrix: x1, x2, x4, plain and .trans, from rows at permuted
 *        addresses in shared memory: bit-exact.
 *
 * Usage: test_sim_mma cuda|hip (the flavour it was built for).
 */
#include "gpu_common.cuh"

#include <stdio.h>
#include <stdlib.h>

namespace {

constexpr int kGroups = 2;   /* groups of 32 lanes per block (two warps, or one wavefront) */
constexpr int kBlocks = 3;

struct mma_case {
    uint16_t a[16 * 16];     /* row-major, dtype bits */
    uint16_t b[16 * 8];      /* b[k * 8 + n] */
    float    c[16 * 8];
    float    d[16 * 8];      /* result */
};

template <int DT> __global__ void mma_kernel(mma_case *cases)
{
    const int lane = (int)(threadIdx.x % 32), g = lane / 4, t = lane % 4;
    mma_case *m = cases + blockIdx.x * kGroups + threadIdx.x / 32;
    uint32_t a[4], b[2];
    float d[4];
    for (int i = 0; i < 4; i++) {
        const int row = g + 8 * (i % 2), col = 2 * t + 8 * (i / 2);
        a[i] = (uint32_t)m->a[row * 16 + col] | (uint32_t)m->a[row * 16 + col + 1] << 16;
        d[i] = m->c[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
    }
    for (int i = 0; i < 2; i++) {
        const int k = 2 * t + 8 * i;
        b[i] = (uint32_t)m->b[k * 8 + g] | (uint32_t)m->b[(k + 1) * 8 + g] << 16;
    }
    mma_m16n8k16<DT>(d, a, b);
    for (int i = 0; i < 4; i++)
        m->d[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = d[i];
}

/* 32 rows of 8 16-bit elements in shared memory, row j at slot perm[j] of
 * a 40-row area; element (j, e) holds 256 j + e + salt. */
struct ld_case {
    int32_t  perm[32];
    uint32_t out[4 * 32 * 4]; /* [variant: x1, x2, x4 plain, x4 trans][lane][register] */
};

__global__ void ldmatrix_kernel(ld_case *cases)
{
    __shared__ __align__(16) uint16_t area[kGroups][40][8];
    const int lane = (int)(threadIdx.x % 32), grp = (int)(threadIdx.x / 32);
    ld_case *c = cases + blockIdx.x * kGroups + grp;
    for (int e = 0; e < 8; e++)
        area[grp][c->perm[lane]][e] = (uint16_t)(256 * lane + e + 17 * grp);
    __syncthreads();
    const void *row = &area[grp][c->perm[lane]][0];
    uint32_t r[4];
    ldmatrix_x<1, false>(r, row);
    c->out[(0 * 32 + lane) * 4] = r[0];
    ldmatrix_x<2, true>(r, row);
    c->out[(1 * 32 + lane) * 4] = r[0];
    c->out[(1 * 32 + lane) * 4 + 1] = r[1];
    ldmatrix_x<4, false>(r, row);
    for (int i = 0; i < 4; i++)
        c->out[(2 * 32 + lane) * 4 + i] = r[i];
    ldmatrix_x<4, true>(r, row);
    for (int i = 0; i < 4; i++)
        c->out[(3 * 32 + lane) * 4 + i] = r[i];
}

int failures;

#define EXPECT(cond, ...)                                                                    \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            if (failures++ < 20) {                                                           \
                fprintf(stderr, "test_sim_mma: check failed: %s: ", #cond);                  \
                fprintf(stderr, __VA_ARGS__);                                                \
                fprintf(stderr, "\n");                                                       \
            }                                                                                \
        }                                                                                    \
    } while (0)

uint64_t rng_state = 0x2545f4914f6cdd1dull;
uint64_t rng_next()
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ull;
}
float rng_float(float lo, float hi) { return lo + (hi - lo) * (float)((rng_next() >> 40) * 0x1p-24); }

template <typename T> T *device_copy(const T *host, size_t n)
{
    void *p = NULL;
    if (cudaMalloc(&p, n * sizeof(T)) != cudaSuccess ||
        cudaMemcpy(p, host, n * sizeof(T), cudaMemcpyHostToDevice) != cudaSuccess) {
        fprintf(stderr, "test_sim_mma: device allocation failed\n");
        exit(1);
    }
    return (T *)p;
}

template <typename T> void fetch(T *host, T *dev, size_t n)
{
    if (cudaMemcpy(host, dev, n * sizeof(T), cudaMemcpyDeviceToHost) != cudaSuccess) {
        fprintf(stderr, "test_sim_mma: kernel or copy failed: %s\n",
                cudaGetErrorString(cudaGetLastError()));
        exit(1);
    }
    cudaFree(dev);
}

/* integers: |values| <= 8 and |c| <= 64, so every partial sum is an exact integer */
template <int DT> void test_mma(bool integers)
{
    const int n = kBlocks * kGroups;
    mma_case *h = (mma_case *)calloc(n, sizeof(mma_case));
    for (int m = 0; m < n; m++) {
        for (int i = 0; i < 16 * 16; i++)
            h[m].a[i] = dtype_traits<DT>::from_f32(integers ? (float)((int)(rng_next() % 17) - 8)
                                                            : rng_float(-2, 2));
        for (int i = 0; i < 16 * 8; i++) {
            h[m].b[i] = dtype_traits<DT>::from_f32(integers ? (float)((int)(rng_next() % 17) - 8)
                                                            : rng_float(-2, 2));
            h[m].c[i] = integers ? (float)((int)(rng_next() % 129) - 64) : rng_float(-4, 4);
        }
    }
    mma_case *d = device_copy(h, n);
    KVRT_LAUNCH(kBlocks, 32 * kGroups, 0, NULL, mma_kernel<DT>)(d);
    fetch(h, d, n);
    const double gamma16 = 16 * 0x1p-24 / (1 - 16 * 0x1p-24);
    for (int m = 0; m < n; m++)
        for (int row = 0; row < 16; row++)
            for (int col = 0; col < 8; col++) {
                double exact = h[m].c[row * 8 + col], mag = fabs(exact);
                for (int k = 0; k < 16; k++) {
                    const double p = (double)dtype_traits<DT>::to_f32(h[m].a[row * 16 + k]) *
                                     (double)dtype_traits<DT>::to_f32(h[m].b[k * 8 + col]);
                    exact += p;
                    mag += fabs(p);
                }
                const double got = h[m].d[row * 8 + col];
                const double bound = integers ? 0.0 : gamma16 * mag;
                EXPECT(fabs(got - exact) <= bound,
                       "mma %s %s: case %d D[%d][%d] = %.9g, exact %.9g, bound %.3g",
                       DT == KVRT_LAYOUT_F16 ? "f16" : "bf16", integers ? "integers" : "random",
                       m, row, col, got, exact, bound);
            }
    free(h);
}

void test_ldmatrix()
{
    const int n = kBlocks * kGroups;
    ld_case *h = (ld_case *)calloc(n, sizeof(ld_case));
    for (int m = 0; m < n; m++) {
        int32_t all[40];
        for (int i = 0; i < 40; i++)
            all[i] = i;
        for (int i = 0; i < 32; i++) { /* 32 distinct rows of 40 */
            const int j = i + (int)(rng_next() % (uint64_t)(40 - i));
            const int32_t x = all[i];
            all[i] = all[j];
            all[j] = x;
            h[m].perm[i] = all[i];
        }
    }
    ld_case *d = device_copy(h, n);
    KVRT_LAUNCH(kBlocks, 32 * kGroups, 0, NULL, ldmatrix_kernel)(d);
    fetch(h, d, n);
    for (int m = 0; m < n; m++) {
        const int grp = m % kGroups;
        /* element e of the row that lane j addressed */
        auto elem = [&](int j, int e) { return (uint32_t)(256 * j + e + 17 * grp) & 0xffffu; };
        for (int lane = 0; lane < 32; lane++) {
            const int g = lane / 4, t = lane % 4;
            const int counts[4] = {1, 2, 4, 4};
            for (int v = 0; v < 4; v++) {
                const bool trans = v == 1 || v == 3;
                for (int i = 0; i < counts[v]; i++) {
                    const uint32_t want = trans ? elem(8 * i + 2 * t, g) | elem(8 * i + 2 * t + 1, g) << 16
                                                : elem(8 * i + g, 2 * t) | elem(8 * i + g, 2 * t + 1) << 16;
                    const uint32_t got = h[m].out[(v * 32 + lane) * 4 + i];
                    EXPECT(got == want, "ldmatrix x%d%s: case %d lane %d register %d: %#x, want %#x",
                           counts[v], trans ? ".trans" : "", m, lane, i, got, want);
                }
            }
        }
    }
    free(h);
}

} // namespace

int main(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    for (int rep = 0; rep < 4; rep++) {
        test_mma<KVRT_LAYOUT_F16>(true);
        test_mma<KVRT_LAYOUT_BF16>(true);
        test_mma<KVRT_LAYOUT_F16>(false);
        test_mma<KVRT_LAYOUT_BF16>(false);
        test_ldmatrix();
    }
    if (failures > 0) {
        fprintf(stderr, "test_sim_mma: %d check(s) failed\n", failures);
        return 1;
    }
    printf("test_sim_mma (warp %d): all checks passed\n", KVRT_SIM_WARP);
    return 0;
}
