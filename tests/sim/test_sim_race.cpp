/*
 * test_sim_race.cpp: kvrt-sim's race detector (the race variant,
 * KVRT_SIM_RACE) catches a data race on shared memory as a kernel error
 * that names both threads and the address, and stays silent on kernels
 * that order their accesses. Each racy kernel is one class of bug that
 * the plain sim misses (threads switch only at barriers and collectives,
 * so a read-modify-write by many lanes sums exactly there):
 *
 *   sum_race     lanes add into one __shared__ float, no atomic, no barrier
 *   write_race   two warps write one dynamic shared element in one interval
 *   read_early   a thread reads what another writes, before the barrier
 *   warp_race    lanes of a warp exchange through shared memory with no
 *                __syncwarp between the write and the read
 *
 * and the same work done right, which must pass: atomicAdd, a barrier, a
 * __syncwarp, a reduction tree with a barrier per level.
 *
 * `global` (run with KVRT_SIM_RACE_GLOBAL=1): two blocks of one launch
 * writing one element of device memory is reported with both blocks;
 * blocks writing their own elements, or adding atomically, are not.
 *
 * `interleave` (run with KVRT_SIM_RACECHECK=0 KVRT_SIM_INTERLEAVE=1): the
 * reports off, threads switched at random before their writes: sum_race
 * loses updates and its sum comes out wrong, as on hardware, while the
 * atomic and the tree sums stay exact.
 *
 * Built once per flavour (warp 32 and 64) with the kernels instrumented.
 */
#include "sim_test.h"

/* ---- racy ---- */

__global__ void sum_race(float *out)
{
    __shared__ float s_p;
    if (threadIdx.x == 0)
        s_p = 0.0f;
    __syncthreads();
    s_p += (float)threadIdx.x; /* every lane: read, add, write */
    __syncthreads();
    if (threadIdx.x == 0)
        out[blockIdx.x] = s_p;
}

__global__ void write_race(float *out)
{
    KVRT_DYNAMIC_SHARED(float, buf);
    buf[threadIdx.x] = 1.0f;
    if (threadIdx.x == 3 * warpSize / 2) /* a lane of warp 1 writes warp 0's element */
        buf[1] = 2.0f;
    __syncthreads();
    out[threadIdx.x] = buf[threadIdx.x];
}

__global__ void read_early(float *out)
{
    __shared__ float tile[256];
    tile[threadIdx.x] = (float)threadIdx.x;
    out[threadIdx.x] = tile[(threadIdx.x + 1) % blockDim.x]; /* no barrier before */
}

__global__ void warp_race(float *out)
{
    __shared__ float lane_val[256];
    lane_val[threadIdx.x] = (float)threadIdx.x;
    /* missing __syncwarp() */
    out[threadIdx.x] = lane_val[threadIdx.x ^ 1];
}

__global__ void blocks_collide(float *out)
{
    if (threadIdx.x == 0)
        out[0] = (float)blockIdx.x; /* every block's thread 0: one element */
}

__global__ void blocks_apart(float *out)
{
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < 255)
        out[i] = 1.0f;
    atomicAdd(out + 255, 1.0f); /* every thread of both blocks */
}

/* ---- ordered ---- */

__global__ void sum_atomic(float *out)
{
    __shared__ float s_p;
    if (threadIdx.x == 0)
        s_p = 0.0f;
    __syncthreads();
    atomicAdd(&s_p, (float)threadIdx.x);
    __syncthreads();
    if (threadIdx.x == 0)
        out[blockIdx.x] = s_p;
}

__global__ void exchange_ordered(float *out)
{
    __shared__ float tile[256];
    __shared__ float lane_val[256];
    tile[threadIdx.x] = (float)threadIdx.x;
    lane_val[threadIdx.x] = 2.0f * (float)threadIdx.x;
#if KVRT_SIM_WARP == 32
    __syncwarp();
#else
    __syncthreads(); /* __syncwarp's mask has 32 bits */
#endif
    const float mine = lane_val[threadIdx.x ^ 1];
    __syncthreads();
    out[threadIdx.x] = tile[(threadIdx.x + 1) % blockDim.x] + mine;
}

__global__ void tree_sum(float *out)
{
    KVRT_DYNAMIC_SHARED(float, buf);
    buf[threadIdx.x] = (float)threadIdx.x;
    __syncthreads();
    for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half)
            buf[threadIdx.x] += buf[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0)
        out[blockIdx.x] = buf[0];
}


/* Launches kernel (2 blocks of 128 threads, 512 bytes of dynamic shared
 * memory) and returns the next synchronization's error, its message in
 * msg. A macro: the launch names the kernel as written here. */
#define RUN(msg, kernel, out)                                                                \
    (KVRT_LAUNCH(2, 128, 512, nullptr, kernel)(out), sync_message(&(msg)))

static void expect_race(const char *kernel, cudaError_t e, const std::string &msg, const char *space)
{
    EXPECT_TRUE(e == cudaErrorLaunchFailure, "%s: %s (%s)", kernel, cudaGetErrorName(e), msg.c_str());
    /* the kernel, the data race, its memory, both threads with where they were */
    size_t first = msg.find("thread ("), second = msg.find("thread (", first + 1);
    size_t third = msg.find("thread (", second + 1);
    EXPECT_TRUE(contains(msg, kernel) && contains(msg, "data race on") && contains(msg, space) &&
                    first != std::string::npos && second != std::string::npos &&
                    third != std::string::npos && contains(msg, " at 0x"),
                "%s: message \"%s\"", kernel, msg.c_str());
    kvrt_sim_reset_error();
}

/* The interleaving mode: wrong numbers from the racy sum, exact ones from
 * the ordered sums. */
static int interleave(float *out)
{
    const float want = 127.0f * 128.0f / 2.0f;
    std::string msg;
    float got[2];
    cudaError_t e = RUN(msg, sum_race, out);
    EXPECT_TRUE(e == cudaSuccess, "sum_race without reports: %s", msg.c_str());
    cudaMemcpy(got, out, sizeof got, cudaMemcpyDeviceToHost);
    EXPECT_TRUE(got[0] != want || got[1] != want,
                "sum_race interleaved gave the exact sum %g twice: no update was lost", (double)want);
    printf("sum_race interleaved: %g and %g (exact: %g)\n", (double)got[0], (double)got[1],
           (double)want);
    e = RUN(msg, sum_atomic, out);
    cudaMemcpy(got, out, sizeof got, cudaMemcpyDeviceToHost);
    EXPECT_TRUE(e == cudaSuccess && got[0] == want && got[1] == want, "sum_atomic interleaved: %g %g",
                (double)got[0], (double)got[1]);
    e = RUN(msg, tree_sum, out);
    cudaMemcpy(got, out, sizeof got, cudaMemcpyDeviceToHost);
    EXPECT_TRUE(e == cudaSuccess && got[0] == want && got[1] == want, "tree_sum interleaved: %g %g",
                (double)got[0], (double)got[1]);
    cudaFree(out);
    if (failures > 0) {
        fprintf(stderr, "test_sim_race interleave: %d check(s) failed\n", failures);
        return 1;
    }
    printf("test_sim_race interleave: the racy sum loses updates; ordered sums are exact\n");
    return 0;
}

/* Races between blocks on device memory. */
static int global(float *out)
{
    std::string msg;
    cudaError_t e = RUN(msg, blocks_collide, out);
    EXPECT_TRUE(e == cudaErrorLaunchFailure && contains(msg, "blocks_collide"),
                "blocks_collide: %s", msg.c_str());
    EXPECT_TRUE(contains(msg, "data race on device memory") && contains(msg, "by block "),
                "blocks_collide: message \"%s\"", msg.c_str());
    kvrt_sim_reset_error();
    e = RUN(msg, blocks_apart, out);
    EXPECT_TRUE(e == cudaSuccess, "blocks_apart: %s", msg.c_str());
    cudaFree(out);
    if (failures > 0) {
        fprintf(stderr, "test_sim_race global: %d check(s) failed\n", failures);
        return 1;
    }
    printf("test_sim_race global: two blocks on one element reported; apart or atomic pass\n");
    return 0;
}

int main(int argc, char **argv)
{
    float *out = nullptr;
    if (cudaMalloc((void **)&out, 256 * sizeof(float)) != cudaSuccess) {
        fprintf(stderr, "test_sim_race: cudaMalloc failed\n");
        return 1;
    }
    if (argc > 1 && strcmp(argv[1], "interleave") == 0)
        return interleave(out);
    if (argc > 1 && strcmp(argv[1], "global") == 0)
        return global(out);
    std::string msg;
    expect_race("sum_race", RUN(msg, sum_race, out), msg, "static shared");
    expect_race("write_race", RUN(msg, write_race, out), msg, "dynamic shared");
    expect_race("read_early", RUN(msg, read_early, out), msg, "static shared");
    expect_race("warp_race", RUN(msg, warp_race, out), msg, "static shared");
    cudaError_t e = RUN(msg, sum_atomic, out);
    EXPECT_TRUE(e == cudaSuccess, "sum_atomic: %s", msg.c_str());
    float got[256];
    cudaMemcpy(got, out, 2 * sizeof(float), cudaMemcpyDeviceToHost);
    EXPECT_TRUE(got[0] == 127.0f * 128.0f / 2.0f && got[1] == got[0], "sum_atomic: %g %g",
                (double)got[0], (double)got[1]);
    e = RUN(msg, exchange_ordered, out);
    EXPECT_TRUE(e == cudaSuccess, "exchange_ordered: %s", msg.c_str());
    e = RUN(msg, tree_sum, out);
    EXPECT_TRUE(e == cudaSuccess, "tree_sum: %s", msg.c_str());
    cudaMemcpy(got, out, 2 * sizeof(float), cudaMemcpyDeviceToHost);
    EXPECT_TRUE(got[0] == 127.0f * 128.0f / 2.0f, "tree_sum: %g", (double)got[0]);
    cudaFree(out);
    if (failures > 0) {
        fprintf(stderr, "test_sim_race: %d check(s) failed\n", failures);
        return 1;
    }
    printf("test_sim_race: four races reported with both threads; ordered kernels pass\n");
    return 0;
}
