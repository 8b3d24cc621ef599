/*
 * attention.cu: kvrt_attention_op, masked paged attention of a batch's
 * tokens over their sequences' slots (decode and prefill alike, ATTN, MLA
 * and CROSS layers). C twin: kvrt_cpu_attention in src/attention_cpu.c.
 *
 * Version 1, the straightforward kernel: correctness first, no tensor
 * cores, no split of long sequences, K/V read once per query head.
 *
 * A block handles one (token, query head) row. It walks the sequence's used
 * slots in tiles of kTile:
 *   A. threads [0, kTile) look up one slot each through the page table and
 *      decide whether the row's token sees it (position >= 0, <= the
 *      token's position when causal, > position - window when windowed;
 *      every slot when the layer has no positions);
 *   B. each warp takes visible slots of the tile in turn: its lanes stride
 *      over the K row (coalesced), multiply by the query (in shared memory,
 *      f32) and reduce the dot product by shuffles; lane 0 stores the logit
 *      (scaled, soft-capped);
 *   C. every thread reads the tile's logits and updates the online softmax
 *      (running max m, sum l) identically;
 *   D. threads [0, kTile) turn logits into weights; then each thread adds
 *      the weighted V rows (ATTN: the kv head's V; MLA: the first dim_v
 *      values of the K row) into its own output elements (kept in shared
 *      memory), skipping zero weights as the twin does, so that a hole's
 *      garbage never reaches the output.
 * The row is written as acc / l in the output dtype; no visible key gives
 * zeros, a NaN logit of a visible key gives NaN, as in the twin.
 *
 * Results differ from the twin by summation order and by expf against its
 * polynomial exp (both within 2 ulp): f32 rounding, bounded in tests/gpu.
 */
#include "gpu_common.cuh"

namespace {

constexpr int kTile = 64;          /* slots per tile */
constexpr int kAttnThreads = 128;  /* a multiple of every warp width */

/* Dynamic shared memory: q [dim_k], acc [dim_v]. */
__global__ void __launch_bounds__(kAttnThreads)
    attention_kernel(const kvrt_attention_op op)
{
    extern __shared__ float shared[];
    __shared__ int64_t tile_slot[kTile];
    __shared__ int tile_visible[kTile];
    __shared__ float tile_logit[kTile];
    __shared__ float tile_weight[kTile];

    const kvrt_layout L = op.layer.layout;
    const int32_t dim_k = L.dim_k, dim_v = op.dim_v;
    float *q = shared;
    float *acc = shared + dim_k;

    const int64_t row = blockIdx.x; /* token * n_q_heads + query head */
    const int32_t t = (int32_t)(row / op.n_q_heads);
    const int32_t qh = (int32_t)(row - (int64_t)t * op.n_q_heads);
    const int32_t group = op.n_q_heads / L.n_heads;
    const int32_t head = op.mla ? 0 : qh / group;
    const int32_t seq = op.tok_seq[t];
    const int64_t qpos = op.tok_pos[t];
    const int32_t *pages = op.page_indices + op.page_indptr[seq];
    const int64_t n_slots = op.seq_n_slots[seq];

    for (int32_t d = threadIdx.x; d < dim_k; d += blockDim.x)
        q[d] = kvrt_load(op.q, op.q_dtype, row * dim_k + d);
    for (int32_t d = threadIdx.x; d < dim_v; d += blockDim.x)
        acc[d] = 0.0f;

    const int lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize;
    const int n_warps = blockDim.x / warpSize;
    float m = -INFINITY, l = 0.0f;
    bool nan_logit = false;

    for (int64_t j0 = 0; j0 < n_slots; j0 += kTile) {
        /* A: which slots of the tile the token sees */
        if (threadIdx.x < kTile) {
            const int64_t j = j0 + threadIdx.x;
            int visible = 0;
            int64_t slot = 0;
            if (j < n_slots) {
                slot = kvrt_page_slot(pages, L.block_size, (int32_t)j);
                visible = 1;
                if (op.pos != NULL) {
                    const int64_t p = op.pos[slot];
                    visible = p >= 0 && (!op.causal || p <= qpos) &&
                              (op.window <= 0 || p > qpos - op.window);
                }
            }
            tile_slot[threadIdx.x] = slot;
            tile_visible[threadIdx.x] = visible;
            tile_logit[threadIdx.x] = -INFINITY;
        }
        __syncthreads();

        /* B: logits of the visible slots, one warp per slot */
        for (int c = warp; c < kTile; c += n_warps) {
            if (!tile_visible[c])
                continue;
            const int64_t base = kvrt_k_index(&L, tile_slot[c], head);
            float dot = 0.0f;
            for (int32_t d = lane; d < dim_k; d += warpSize)
                dot += q[d] * kvrt_load(op.layer.k, L.dtype, base + d);
            for (int offset = warpSize / 2; offset > 0; offset /= 2)
                dot += KVRT_SHFL_XOR(dot, offset);
            if (lane == 0)
                tile_logit[c] = op.softcap > 0.0f ? op.softcap * tanhf(dot * op.scale / op.softcap)
                                                  : dot * op.scale;
        }
        __syncthreads();

        /* C: the online softmax's running max (every thread alike) */
        float tile_max = -INFINITY;
        for (int c = 0; c < kTile; c++) {
            if (!tile_visible[c])
                continue;
            const float s = tile_logit[c];
            if (s != s)
                nan_logit = true;
            else if (s > tile_max)
                tile_max = s;
        }
        if (tile_max > -INFINITY) {
            if (tile_max > m) {
                const float alpha = m > -INFINITY ? expf(m - tile_max) : 0.0f;
                for (int32_t d = threadIdx.x; d < dim_v; d += blockDim.x)
                    acc[d] *= alpha;
                l *= alpha;
                m = tile_max;
            }
            /* D: weights, then the weighted V rows */
            if (threadIdx.x < kTile) {
                const float s = tile_logit[threadIdx.x];
                tile_weight[threadIdx.x] =
                    tile_visible[threadIdx.x] && s == s ? expf(s - m) : 0.0f;
            }
            __syncthreads();
            for (int c = 0; c < kTile; c++)
                l += tile_weight[c];
            const void *v_region = op.mla ? op.layer.k : op.layer.v;
            for (int c = 0; c < kTile; c++) {
                const float w = tile_weight[c];
                if (w == 0.0f)
                    continue;
                const int64_t base = op.mla ? kvrt_k_index(&L, tile_slot[c], 0)
                                            : kvrt_v_index(&L, tile_slot[c], head);
                for (int32_t d = threadIdx.x; d < dim_v; d += blockDim.x)
                    acc[d] += w * kvrt_load(v_region, L.dtype, base + d);
            }
        }
        __syncthreads(); /* the tile's shared arrays are rewritten next */
    }

    for (int32_t d = threadIdx.x; d < dim_v; d += blockDim.x) {
        const float out = nan_logit ? NAN : l > 0.0f ? acc[d] / l : 0.0f;
        kvrt_store(op.out, op.out_dtype, row * dim_v + d, out);
    }
}

} // namespace

extern "C" cudaError_t KVRT_GPU_FN(launch_attention)(const kvrt_attention_op *op, void *stream)
{
    if (op->n_tokens <= 0 || op->n_q_heads <= 0)
        return cudaSuccess;
    const kvrt_layout L = op->layer.layout;
    const size_t shared = ((size_t)L.dim_k + (size_t)op->dim_v) * sizeof(float);
    const int64_t rows = (int64_t)op->n_tokens * op->n_q_heads;
    if (L.n_heads <= 0 || op->n_q_heads % L.n_heads != 0 || shared > 40 * 1024 ||
        rows > 0x7fffffff)
        return cudaErrorInvalidValue;
    clear_stale_error();
    attention_kernel<<<(unsigned)rows, kAttnThreads, shared, (cudaStream_t)stream>>>(*op);
    return launch_status();
}
