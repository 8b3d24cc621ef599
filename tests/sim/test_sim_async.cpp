/*
 * test_sim_async.cpp: the asynchronous copies of kernels/gpu_common.cuh
 * (async_copy16, async_commit, async_wait) on kvrt-sim, against a plain
 * loop over the same bytes: after a wait and a barrier every thread reads
 * exactly what was copied (zeros where the copy was invalid), groups land
 * in order (async_wait<1> lands all but the newest group), and a read of a
 * destination before its wait sees stale shared memory for some copies but
 * not all (copies land at once or at the wait), which is what makes a
 * missing wait fail a test. Exits 0 when every check held.
 */
#include "gpu_common.cuh"

#include <stdio.h>
#include <string.h>

namespace {

constexpr int kBlockThreads = 64;
constexpr int kUnits = 512; /* 16-byte units, 8 KiB of shared memory per group */

/* Units [0, kUnits) of src into shared group A, then [kUnits, 2 kUnits)
 * into group B; invalid units (i % 7 == 3) are zero-filled. stale[0]
 * counts own destinations of A not yet landed before any wait, stale[1]
 * those of A still missing after async_wait<1>. dst gets every unit, each
 * read by another thread than the one that copied it. */
__global__ void async_copy_kernel(const uint4 *src, uint4 *dst, int *stale)
{
    KVRT_DYNAMIC_SHARED(uint4, sm);
    async_copies ac;
    const int t = (int)threadIdx.x;
    for (int g = 0; g < 2; g++) {
        for (int i = t; i < kUnits; i += kBlockThreads)
            async_copy16(ac, &sm[g * kUnits + i], &src[g * kUnits + i], i % 7 != 3);
        async_commit(ac);
    }
    auto landed = [&](int i) {
        const uint4 want = i % 7 != 3 ? src[i] : make_uint4(0, 0, 0, 0);
        return memcmp(&sm[i], &want, sizeof want) == 0;
    };
    for (int i = t; i < kUnits; i += kBlockThreads)
        if (!landed(i))
            atomicAdd(&stale[0], 1);
    async_wait<1>(ac);
    for (int i = t; i < kUnits; i += kBlockThreads)
        if (!landed(i))
            atomicAdd(&stale[1], 1);
    async_wait<0>(ac);
    __syncthreads();
    for (int i = t; i < 2 * kUnits; i += kBlockThreads)
        dst[i] = sm[(i + 1) % (2 * kUnits)];
}

int failures = 0;

void check(bool ok, const char *what)
{
    if (!ok) {
        failures++;
        fprintf(stderr, "test_sim_async: check failed: %s\n", what);
    }
}

} // namespace

int main()
{
    const size_t bytes = 2 * kUnits * sizeof(uint4);
    unsigned char host_src[2 * kUnits * 16], host_dst[2 * kUnits * 16], want[2 * kUnits * 16];
    uint64_t s = 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < bytes; i++) {
        s ^= s >> 12, s ^= s << 25, s ^= s >> 27;
        host_src[i] = (unsigned char)((s * 2685821657736338717ull) >> 56);
    }
    for (int i = 0; i < 2 * kUnits; i++) { /* the plain loop: unit (i + 1) % n, zeros where invalid */
        const int j = (i + 1) % (2 * kUnits);
        if ((j % kUnits) % 7 == 3)
            memset(want + i * 16, 0, 16);
        else
            memcpy(want + i * 16, host_src + j * 16, 16);
    }
    uint4 *src = nullptr, *dst = nullptr;
    int *stale = nullptr;
    check(cudaMalloc((void **)&src, bytes) == cudaSuccess, "cudaMalloc src");
    check(cudaMalloc((void **)&dst, bytes) == cudaSuccess, "cudaMalloc dst");
    check(cudaMalloc((void **)&stale, 2 * sizeof(int)) == cudaSuccess, "cudaMalloc stale");
    if (failures > 0)
        return 1;
    check(cudaMemcpy(src, host_src, bytes, cudaMemcpyHostToDevice) == cudaSuccess, "upload");
    check(cudaMemset(stale, 0, 2 * sizeof(int)) == cudaSuccess, "memset");
    KVRT_LAUNCH(1, kBlockThreads, bytes, (cudaStream_t)0, async_copy_kernel)(src, dst, stale);
    check(cudaGetLastError() == cudaSuccess, "launch");
    int stale_host[2] = {0, 0};
    check(cudaMemcpy(host_dst, dst, bytes, cudaMemcpyDeviceToHost) == cudaSuccess, "download");
    check(cudaMemcpy(stale_host, stale, sizeof stale_host, cudaMemcpyDeviceToHost) == cudaSuccess,
          "download stale");
    check(memcmp(host_dst, want, bytes) == 0, "the copied bytes differ from the plain loop's");
    check(stale_host[0] > 0, "no copy was pending before its wait: a missing wait would pass");
    check(stale_host[0] < kUnits, "no copy landed before its wait");
    check(stale_host[1] == 0, "async_wait<1> left copies of the older group pending");
    printf("test_sim_async: %d of %d copies pending before the wait\n", stale_host[0], kUnits);
    cudaFree(src);
    cudaFree(dst);
    cudaFree(stale);
    if (failures > 0)
        return 1;
    printf("test_sim_async: all checks passed\n");
    return 0;
}
