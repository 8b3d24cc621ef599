/*
 * write.cu: kvrt_write_op, the step's new K/V rows scattered into their
 * slots, converting from the source dtype to the cache dtype.
 * C twin: cpu_write in src/backend_cpu.c.
 *
 * A thread handles one chunk: 8 consecutive elements of one head row
 * (vector path, 16-byte loads and stores: every head row a multiple of 8
 * elements and every base address 16-byte aligned) or one element (scalar
 * path). A row's chunks are numbered K heads first, then V heads, so
 * consecutive threads read consecutive source memory and write
 * consecutive memory of a head's row in the cache. Blocks of kThreads
 * threads stride over all n_rows * chunks_per_row chunks.
 *
 * Into a quantized layer (q8, fp8 e4m3) a thread handles one whole head row
 * of K or of V (quant_kernel): kvrt_quant_row, the very function the twin
 * calls, so bytes and scale are bit-identical (same f32 operations in the
 * same order, NaN/Inf marker codes, scale 0 for a zero row). With
 * src_dtype the layer's own dtype the row's bytes and its scale are copied
 * as they are (state loads). A row is at most 1024 bytes: one thread per
 * row keeps the amax a plain loop; a warp-per-row reduction is the faster
 * form still to be written (no device measurement yet).
 * nvcc -arch=sm_90a -O3 -Xptxas -v: quant_kernel 32 registers, no stack,
 * no spills.
 */
#include "gpu_common.cuh"

namespace {

template <int SRC, int DST, int VEC>
__global__ void write_kernel(const kvrt_layer_ref layer, const void *k_src, const void *v_src,
                             const int32_t *slots, int32_t n_rows)
{
    const kvrt_layout L = layer.layout;
    const int32_t chunks_k = L.dim_k / VEC;                       /* per head row */
    const int32_t chunks_v = v_src != NULL ? L.dim_v / VEC : 0;
    const int32_t row_k = L.n_heads * chunks_k;
    const int32_t per_row = row_k + L.n_heads * chunks_v;
    const int64_t total = (int64_t)n_rows * per_row;
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (int64_t)gridDim.x * blockDim.x) {
        const int32_t r = (int32_t)(t / per_row);
        int32_t c = (int32_t)(t - (int64_t)r * per_row);
        const int64_t slot = slots[r];
        if (c < row_k) {
            const int32_t h = c / chunks_k, e = (c - h * chunks_k) * VEC;
            convert_chunk<SRC, DST, VEC>(k_src, ((int64_t)r * L.n_heads + h) * L.dim_k + e,
                                         layer.k, kvrt_k_index(&L, slot, h) + e);
        } else {
            c -= row_k;
            const int32_t h = c / chunks_v, e = (c - h * chunks_v) * VEC;
            convert_chunk<SRC, DST, VEC>(v_src, ((int64_t)r * L.n_heads + h) * L.dim_v + e,
                                         layer.v, kvrt_v_index(&L, slot, h) + e);
        }
    }
}

/* One head row (K heads first, then V heads of each source row) per thread. */
__global__ void quant_kernel(const kvrt_layer_ref layer, const void *k_src, const void *v_src,
                             int32_t src_dtype, const int32_t *slots, int32_t n_rows,
                             const float *k_scale_src, const float *v_scale_src)
{
    const kvrt_layout L = layer.layout;
    const int64_t src_es = src_dtype == KVRT_LAYOUT_F32 ? 4 : kvrt_dtype_quantized(src_dtype) ? 1 : 2;
    const int64_t total = (int64_t)n_rows * L.n_heads * (v_src != NULL ? 2 : 1);
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (int64_t)gridDim.x * blockDim.x) {
        const head_row w = head_row_of(t, L.n_heads, v_src != NULL);
        const int32_t h = w.h;
        const bool is_v = w.is_v;
        const int64_t slot = slots[w.r], rh = (int64_t)w.r * L.n_heads + h;
        const int32_t dim = is_v ? L.dim_v : L.dim_k;
        int8_t *dst = (int8_t *)(is_v ? layer.v : layer.k) +
                      (is_v ? kvrt_v_index(&L, slot, h) : kvrt_k_index(&L, slot, h));
        float *scale = (is_v ? layer.v_scale : layer.k_scale) + kvrt_scale_index(&L, slot, h);
        const char *src = (const char *)(is_v ? v_src : k_src) + rh * dim * src_es;
        if (src_dtype == L.dtype) {
            for (int32_t i = 0; i < dim; i++)
                dst[i] = ((const int8_t *)src)[i];
            *scale = (is_v ? v_scale_src : k_scale_src)[rh];
        } else {
            *scale = kvrt_quant_row(dst, L.dtype, src, src_dtype, dim);
        }
    }
}

cudaError_t launch_quant(const kvrt_write_op *op, const void *v_src, cudaStream_t stream)
{
    const kvrt_layout L = op->layer.layout;
    if (op->src_dtype == L.dtype
            ? (op->k_scale_src == NULL || (v_src != NULL && op->v_scale_src == NULL))
            : (op->src_dtype < KVRT_LAYOUT_F32 || op->src_dtype > KVRT_LAYOUT_BF16))
        return cudaErrorInvalidValue;
    const int64_t rows = (int64_t)op->n_rows * L.n_heads * (v_src != NULL ? 2 : 1);
    clear_stale_error();
    KVRT_LAUNCH(grid_blocks(rows), kThreads, 0, stream, quant_kernel)(
        op->layer, op->k_src, v_src, op->src_dtype, op->slots, op->n_rows, op->k_scale_src,
        op->v_scale_src);
    return launch_status();
}

template <int SRC, int DST>
cudaError_t launch_typed(const kvrt_write_op *op, const void *v_src, bool vec, cudaStream_t stream)
{
    const kvrt_layout L = op->layer.layout;
    const int vec_len = vec ? 8 : 1;
    const int64_t per_row =
        (int64_t)L.n_heads * (L.dim_k + (v_src != NULL ? L.dim_v : 0)) / vec_len;
    const unsigned blocks = grid_blocks((int64_t)op->n_rows * per_row);
    clear_stale_error();
    if (vec)
        KVRT_LAUNCH(blocks, kThreads, 0, stream, write_kernel<SRC, DST, 8>)(
            op->layer, op->k_src, v_src, op->slots, op->n_rows);
    else
        KVRT_LAUNCH(blocks, kThreads, 0, stream, write_kernel<SRC, DST, 1>)(
            op->layer, op->k_src, v_src, op->slots, op->n_rows);
    return launch_status();
}

template <int SRC>
cudaError_t launch_src(const kvrt_write_op *op, const void *v_src, bool vec, cudaStream_t stream)
{
    switch (op->layer.layout.dtype) {
    case KVRT_LAYOUT_F32: return launch_typed<SRC, KVRT_LAYOUT_F32>(op, v_src, vec, stream);
    case KVRT_LAYOUT_F16: return launch_typed<SRC, KVRT_LAYOUT_F16>(op, v_src, vec, stream);
    case KVRT_LAYOUT_BF16: return launch_typed<SRC, KVRT_LAYOUT_BF16>(op, v_src, vec, stream);
    default: return cudaErrorInvalidValue;
    }
}

} // namespace

extern "C" cudaError_t KVRT_GPU_FN(launch_write)(const kvrt_write_op *op, void *stream)
{
    const kvrt_layout L = op->layer.layout;
    if (op->n_rows <= 0 || L.n_heads <= 0 || L.dim_k <= 0)
        return cudaSuccess;
    /* V is written when given and the layer has it (MLA has none). */
    const void *v_src = (op->v_src != NULL && op->layer.v != NULL && L.dim_v > 0) ? op->v_src : NULL;
    if (kvrt_dtype_quantized(L.dtype))
        return launch_quant(op, v_src, (cudaStream_t)stream);
    const bool vec = L.dim_k % 8 == 0 && aligned_to(op->k_src, 16) && aligned_to(op->layer.k, 16) &&
                     (v_src == NULL ||
                      (L.dim_v % 8 == 0 && aligned_to(v_src, 16) && aligned_to(op->layer.v, 16)));
    cudaStream_t s = (cudaStream_t)stream;
    switch (op->src_dtype) {
    case KVRT_LAYOUT_F32: return launch_src<KVRT_LAYOUT_F32>(op, v_src, vec, s);
    case KVRT_LAYOUT_F16: return launch_src<KVRT_LAYOUT_F16>(op, v_src, vec, s);
    case KVRT_LAYOUT_BF16: return launch_src<KVRT_LAYOUT_BF16>(op, v_src, vec, s);
    default: return cudaErrorInvalidValue;
    }
}
