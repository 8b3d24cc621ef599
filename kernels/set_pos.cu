/*
 * set_pos.cu: kvrt_pos_op, the positions of whole blocks overwritten from
 * staged host truth: pos[blocks[i] * block_size + j] = data[i * block_size + j].
 * C twin: cpu_set_pos in src/backend_cpu.c. The blocks of one op are
 * distinct (one entry per dirty block).
 *
 * A thread writes one position; blocks of kThreads threads stride over all
 * n * block_size of them, so consecutive threads write consecutive slots of
 * a block and read consecutive staged values.
 */
#include "gpu_common.cuh"

namespace {

__global__ void set_pos_kernel(int32_t *pos, int32_t block_size, const int32_t *blocks,
                               const int32_t *data, int32_t n)
{
    const int64_t total = (int64_t)n * block_size;
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (int64_t)gridDim.x * blockDim.x) {
        const int32_t i = (int32_t)(t / block_size);
        const int32_t j = (int32_t)(t - (int64_t)i * block_size);
        pos[(int64_t)blocks[i] * block_size + j] = data[t];
    }
}

} // namespace

extern "C" cudaError_t KVRT_GPU_FN(launch_set_pos)(const kvrt_pos_op *op, void *stream)
{
    if (op->n <= 0 || op->block_size <= 0)
        return cudaSuccess;
    clear_stale_error();
    KVRT_LAUNCH(grid_blocks((int64_t)op->n * op->block_size), kThreads, 0, (cudaStream_t)stream,
                set_pos_kernel)(op->pos, op->block_size, op->blocks, op->data, op->n);
    return launch_status();
}
