/*
 * test_sim_errors.cpp: a kernel error in kvrt-sim fails the work that ran
 * it with the kernel's name, block and thread.
 *
 *   barrier   threads of a block waiting at different __syncthreads: the
 *             next synchronization returns cudaErrorLaunchFailure, whose
 *             message names the kernel, a block and a thread and both
 *             barriers; the error is sticky until kvrt_sim_reset_error
 *   shuffle   a lane calling __shfl_sync with a mask that leaves it out
 *   fault     a kernel writing past the end of its allocation (the guard
 *             page after it): the process dies, and stderr names the
 *             kernel, block and thread and the allocation (in a child)
 *   host      host code reading device memory: the process dies, and
 *             stderr says host code touched device memory (in a child)
 *
 * Built once per flavour (warp 32 and 64).
 */
#include "sim_test.h"

#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

__global__ void barrier_kernel(int *out)
{
    if (threadIdx.x % 2 == 0)
        __syncthreads();
    else
        __syncthreads();
    out[threadIdx.x] = 1;
}

__global__ void shuffle_kernel(int *out)
{
    out[threadIdx.x] = __shfl_sync(0x3u, (int)threadIdx.x, 0);
}

__global__ void fault_kernel(int *p, int n)
{
    if (blockIdx.x == 1 && threadIdx.x == 5)
        p[n + 16] = 1; /* 64 bytes past the allocation: its guard page */
}


/* Launches `kernel` (grid x block) and returns the error of the next
 * synchronization, its message in msg. A macro: the launch names the
 * kernel as written here. */
#define RUN(msg, grid, block, kernel, ...)                                                   \
    (KVRT_LAUNCH((grid), (block), 0, nullptr, kernel)(__VA_ARGS__),                          \
     sync_message(&(msg)))

static void expect_kernel_error(const char *name, cudaError_t e, const std::string &msg,
                                const char *kernel, const char *detail)
{
    EXPECT_TRUE(e == cudaErrorLaunchFailure, "%s: %s", name, cudaGetErrorName(e));
    EXPECT_TRUE(contains(msg, kernel) && contains(msg, "block (") && contains(msg, "thread (") &&
                    contains(msg, detail),
                "%s: the message does not name kernel, block, thread and '%s': %s", name, detail,
                msg.c_str());
    /* sticky: the next call fails too, until reset */
    int *p = nullptr;
    EXPECT_TRUE(cudaMalloc((void **)&p, 16) == cudaErrorLaunchFailure, "%s: the error is not sticky", name);
    kvrt_sim_reset_error();
    EXPECT_TRUE(cudaMalloc((void **)&p, 16) == cudaSuccess, "%s: reset", name);
    cudaFree(p);
}

/* Runs fn in a child; returns what it wrote to stderr, and whether it ended
 * normally with status 0. */
template <typename F> static std::string in_child(F fn, bool *exited_ok)
{
    int fd[2];
    if (pipe(fd) != 0) {
        perror("pipe");
        exit(1);
    }
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(fd[1], 2);
        close(fd[0]);
        fn();
        _exit(0);
    }
    close(fd[1]);
    std::string out;
    char buf[4096];
    ssize_t n;
    while ((n = read(fd[0], buf, sizeof buf)) > 0)
        out.append(buf, (size_t)n);
    close(fd[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    *exited_ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
    return out;
}

int main()
{
    /* The children first, while the process has one thread (one-block
     * grids and single-block runs keep it so). */
    bool ok = true;
    std::string err = in_child([] {
        int *p = nullptr;
        if (cudaMalloc((void **)&p, 64 * sizeof(int)) != cudaSuccess)
            _exit(3);
        KVRT_LAUNCH(dim3(2), dim3(32), 0, nullptr, fault_kernel)(p, 64);
        (void)cudaDeviceSynchronize();
    }, &ok);
    EXPECT_TRUE(!ok, "fault: the child survived a write past its allocation");
    EXPECT_TRUE(contains(err, "device memory fault") && contains(err, "fault_kernel") &&
                    contains(err, "block (1,0,0), thread (5,0,0)") &&
                    contains(err, "64 bytes past the end of a device allocation of 256 bytes"),
                "fault: stderr does not name the kernel, block, thread and allocation:\n%s", err.c_str());

    err = in_child([] {
        int *p = nullptr;
        if (cudaMalloc((void **)&p, 64) != cudaSuccess)
            _exit(3);
        fprintf(stdout, "%d\n", *(volatile int *)p); /* host code reading device memory */
    }, &ok);
    EXPECT_TRUE(!ok, "host: the child survived reading device memory");
    EXPECT_TRUE(contains(err, "host code touched device memory"),
                "host: stderr does not say host code touched device memory:\n%s", err.c_str());

    int *out = nullptr;
    if (cudaMalloc((void **)&out, 256 * sizeof(int)) != cudaSuccess) {
        fprintf(stderr, "cudaMalloc failed\n");
        return 1;
    }
    std::string msg;
    long before = kvrt_sim_kernel_errors();
    cudaError_t e = RUN(msg, dim3(3), dim3(64), barrier_kernel, out);
    expect_kernel_error("barrier", e, msg, "barrier_kernel", "threads wait at different barriers");
    e = RUN(msg, dim3(2), dim3(64), shuffle_kernel, out);
    expect_kernel_error("shuffle", e, msg, "shuffle_kernel", "which leaves it out");
    EXPECT_TRUE(kvrt_sim_kernel_errors() >= before + 2, "kernel errors not counted");
    cudaFree(out);

    if (failures > 0) {
        fprintf(stderr, "test_sim_errors: %d check(s) failed\n", failures);
        return 1;
    }
    printf("test_sim_errors: all checks passed\n");
    return 0;
}
