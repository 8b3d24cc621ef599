/*
 * gather.cu: kvrt_gather_op, the rows of one layer at the given slots
 * copied out, in order, to contiguous [n][n_heads][dim_k] (K) and
 * [n][n_heads][dim_v] (V) buffers in the cache dtype. A pure data move:
 * bit-exact with its C twin, cpu_gather in src/backend_cpu.c.
 *
 * A thread copies one unit (16, 8, 4 or 2 bytes: the widest that divides
 * both head-row sizes and every base address) of one head row. A row's
 * units are numbered K heads first, then V heads, so consecutive threads
 * write consecutive destination memory. Blocks of kThreads threads stride
 * over all n * units_per_row units.
 *
 * With convert, or scales asked for (cpu_gather_as is the twin), a thread
 * handles one head row of K or of V (gather_as_kernel): the row's scale to
 * k_scale_dst / v_scale_dst, and its values converted to dst_dtype
 * (kvrt_dequant with the row's scale for a quantized layer, the same f32
 * value then rounded as the twin does: bit-exact) or copied as stored.
 * nvcc -arch=sm_90a -O3 -Xptxas -v: gather_as_kernel 30 registers, no
 * stack, no spills.
 */
#include "gpu_common.cuh"

namespace {

template <int UNIT>
__global__ void gather_kernel(const kvrt_layer_ref layer, const int32_t *slots, int32_t n,
                              void *k_dst, void *v_dst)
{
    typedef typename unit_type<UNIT>::type U;
    const kvrt_layout L = layer.layout;
    const int64_t es = L.elem_size;
    const int32_t units_k = k_dst != NULL ? (int32_t)(L.dim_k * es / UNIT) : 0; /* per head row */
    const int32_t units_v = v_dst != NULL ? (int32_t)(L.dim_v * es / UNIT) : 0;
    const int32_t row_k = L.n_heads * units_k;
    const int32_t per_row = row_k + L.n_heads * units_v;
    const int64_t total = (int64_t)n * per_row;
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (int64_t)gridDim.x * blockDim.x) {
        const int32_t r = (int32_t)(t / per_row);
        int32_t c = (int32_t)(t - (int64_t)r * per_row);
        const int64_t slot = slots[KVRT_SIM_MUTANT(3) ? r + 1 : r]; /* mutant 3: one past */
        if (c < row_k) {
            const int32_t h = c / units_k, u = c - h * units_k;
            const U *src = (const U *)((const char *)layer.k + kvrt_k_index(&L, slot, h) * es);
            const int64_t out_r = KVRT_SIM_MUTANT(6) ? r % 2 : r; /* mutant 6: rows collide */
            U *dst = (U *)((char *)k_dst + (out_r * L.n_heads + h) * L.dim_k * es);
            dst[u] = src[u];
        } else {
            c -= row_k;
            const int32_t h = c / units_v, u = c - h * units_v;
            const U *src = (const U *)((const char *)layer.v + kvrt_v_index(&L, slot, h) * es);
            U *dst = (U *)((char *)v_dst + ((int64_t)r * L.n_heads + h) * L.dim_v * es);
            dst[u] = src[u];
        }
    }
}

__global__ void gather_as_kernel(const kvrt_gather_op op, void *k_dst, void *v_dst)
{
    const kvrt_layout L = op.layer.layout;
    const int64_t es = L.elem_size;
    const int64_t des = !op.convert ? es : op.dst_dtype == KVRT_LAYOUT_F32 ? 4 : 2;
    const int64_t total = (int64_t)op.n * 2 * L.n_heads;
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (int64_t)gridDim.x * blockDim.x) {
        const head_row w = head_row_of(t, L.n_heads, true);
        const int32_t h = w.h;
        const bool is_v = w.is_v;
        const int64_t slot = op.slots[w.r], rh = (int64_t)w.r * L.n_heads + h;
        const int64_t si = kvrt_scale_index(&L, slot, h);
        const float *scales = is_v ? op.layer.v_scale : op.layer.k_scale;
        float *scale_dst = is_v ? op.v_scale_dst : op.k_scale_dst;
        if (scale_dst != NULL && scales != NULL)
            scale_dst[rh] = scales[si];
        void *dst = is_v ? v_dst : k_dst;
        if (dst == NULL)
            continue;
        const int32_t dim = is_v ? L.dim_v : L.dim_k;
        const char *src = (const char *)(is_v ? op.layer.v : op.layer.k) +
                          (is_v ? kvrt_v_index(&L, slot, h) : kvrt_k_index(&L, slot, h)) * es;
        char *out = (char *)dst + rh * dim * des;
        if (!op.convert) {
            for (int64_t b = 0; b < dim * es; b++)
                out[b] = src[b];
            continue;
        }
        for (int32_t i = 0; i < dim; i++)
            kvrt_store(out, op.dst_dtype, i,
                       scales != NULL ? kvrt_dequant(src, L.dtype, i, scales[si])
                                      : kvrt_load(src, L.dtype, i));
    }
}

template <int UNIT>
cudaError_t launch_unit(const kvrt_gather_op *op, void *k_dst, void *v_dst, cudaStream_t stream)
{
    const kvrt_layout L = op->layer.layout;
    const int64_t units = (int64_t)L.n_heads *
                          ((k_dst != NULL ? L.dim_k : 0) + (v_dst != NULL ? L.dim_v : 0)) *
                          L.elem_size / UNIT;
    if (units == 0)
        return cudaSuccess;
    clear_stale_error();
    KVRT_LAUNCH(grid_blocks((int64_t)op->n * units), kThreads, 0, stream, gather_kernel<UNIT>)(
        op->layer, op->slots, op->n, k_dst, v_dst);
    return launch_status();
}

} // namespace

extern "C" cudaError_t KVRT_GPU_FN(launch_gather)(const kvrt_gather_op *op, void *stream)
{
    const kvrt_layout L = op->layer.layout;
    void *k_dst = L.dim_k > 0 ? op->k_dst : NULL;
    void *v_dst = (op->layer.v != NULL && L.dim_v > 0) ? op->v_dst : NULL;
    if (op->convert || op->k_scale_dst != NULL || op->v_scale_dst != NULL) {
        if (op->n <= 0 || L.n_heads <= 0)
            return cudaSuccess;
        if (op->convert && (op->dst_dtype < KVRT_LAYOUT_F32 || op->dst_dtype > KVRT_LAYOUT_BF16))
            return cudaErrorInvalidValue;
        clear_stale_error();
        KVRT_LAUNCH(grid_blocks((int64_t)op->n * 2 * L.n_heads), kThreads, 0,
                    (cudaStream_t)stream, gather_as_kernel)(*op, k_dst, v_dst);
        return launch_status();
    }
    if (op->n <= 0 || L.n_heads <= 0 || (k_dst == NULL && v_dst == NULL))
        return cudaSuccess;
    const int64_t lengths[2] = {(int64_t)L.dim_k * L.elem_size, (int64_t)L.dim_v * L.elem_size};
    const void *ptrs[4] = {k_dst, v_dst, k_dst != NULL ? op->layer.k : NULL,
                           v_dst != NULL ? op->layer.v : NULL};
    cudaStream_t s = (cudaStream_t)stream;
    switch (copy_unit(lengths, v_dst != NULL ? 2 : 1, ptrs, 4)) {
    case 16: return launch_unit<16>(op, k_dst, v_dst, s);
    case 8: return launch_unit<8>(op, k_dst, v_dst, s);
    case 4: return launch_unit<4>(op, k_dst, v_dst, s);
    case 2: return launch_unit<2>(op, k_dst, v_dst, s);
    default: return launch_unit<1>(op, k_dst, v_dst, s);
    }
}
