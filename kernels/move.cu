/*
 * move.cu: kvrt_move_op, slot spans copied in every layer of a group in one
 * launch (copy-on-write of shared blocks, seq_cp boundary blocks,
 * compaction). A pure data move: bit-exact with its C twin, cpu_move in
 * src/backend_cpu.c. Spans never overlap (no destination is a source), so
 * the order in which blocks run does not matter.
 *
 * A block handles one (span, layer) pair: blockIdx.x strides over spans,
 * blockIdx.y over layers. Its threads stride over the span's K rows, then
 * its V rows, one unit each (16, 8, 4 or 2 bytes: the widest dividing the
 * layer's head-row sizes and base addresses, chosen per layer on the
 * device, where the layer table lives). Units are numbered (head, slot of
 * the span, unit of the row), so consecutive threads touch consecutive
 * memory within a head's block. Every row is addressed through
 * kvrt_k_index / kvrt_v_index per slot, so a span may even cross a block
 * boundary. A quantized layer's scales (one f32 per (slot, head)) move
 * with their rows, one float per thread, after the rows.
 * nvcc -arch=sm_90a -O3 -Xptxas -v: move_kernel 74 registers (72 before
 * the scales), no stack, no spills.
 */
#include "gpu_common.cuh"

namespace {

/* Copies rows [0, len) of a span, all heads, for one of K or V. */
template <int UNIT>
__device__ void move_rows(const kvrt_layout &L, char *base, bool is_v, kvrt_span sp)
{
    typedef typename unit_type<UNIT>::type U;
    const int64_t es = L.elem_size;
    const int32_t dim = is_v ? L.dim_v : L.dim_k;
    const int32_t units = (int32_t)(dim * es / UNIT); /* per head row */
    const int64_t per_head = (int64_t)sp.len * units;
    const int64_t total = per_head * L.n_heads;
    for (int64_t t = threadIdx.x; t < total; t += blockDim.x) {
        const int32_t h = (int32_t)(t / per_head);
        const int64_t rest = t - h * per_head;
        const int32_t i = (int32_t)(rest / units), u = (int32_t)(rest - (int64_t)i * units);
        const int64_t src = is_v ? kvrt_v_index(&L, (int64_t)sp.src + i, h)
                                 : kvrt_k_index(&L, (int64_t)sp.src + i, h);
        const int64_t dst = is_v ? kvrt_v_index(&L, (int64_t)sp.dst + i, h)
                                 : kvrt_k_index(&L, (int64_t)sp.dst + i, h);
        ((U *)(base + dst * es))[u] = ((const U *)(base + src * es))[u];
    }
}

__device__ void move_part(const kvrt_layout &L, void *region, bool is_v, kvrt_span sp)
{
    const int32_t dim = is_v ? L.dim_v : L.dim_k;
    if (region == NULL || dim <= 0 || sp.len <= 0)
        return;
    char *base = (char *)region;
    const int64_t row_bytes = (int64_t)dim * L.elem_size;
    switch (device_copy_unit(row_bytes, row_bytes, base, base)) {
    case 16: move_rows<16>(L, base, is_v, sp); break;
    case 8: move_rows<8>(L, base, is_v, sp); break;
    case 4: move_rows<4>(L, base, is_v, sp); break;
    case 2: move_rows<2>(L, base, is_v, sp); break;
    default: move_rows<1>(L, base, is_v, sp); break;
    }
}

/* The span's scales of every head, K or V (a NULL region: none). */
__device__ void move_scales(const kvrt_layout &L, float *scales, kvrt_span sp)
{
    if (scales == NULL || sp.len <= 0)
        return;
    const int64_t total = (int64_t)sp.len * L.n_heads;
    for (int64_t t = threadIdx.x; t < total; t += blockDim.x) {
        const int32_t h = (int32_t)(t / sp.len), i = (int32_t)(t - (int64_t)h * sp.len);
        scales[kvrt_scale_index(&L, (int64_t)sp.dst + i, h)] =
            scales[kvrt_scale_index(&L, (int64_t)sp.src + i, h)];
    }
}

__global__ void move_kernel(const kvrt_layer_ref *layers, int32_t n_layers, const kvrt_span *spans,
                            int32_t n_spans)
{
    for (int32_t l = blockIdx.y; l < n_layers; l += gridDim.y) {
        const kvrt_layer_ref ref = layers[l];
        for (int32_t s = blockIdx.x; s < n_spans; s += gridDim.x) {
            const kvrt_span sp = spans[s];
            move_part(ref.layout, ref.k, false, sp);
            move_part(ref.layout, ref.v, true, sp);
            move_scales(ref.layout, ref.k_scale, sp);
            move_scales(ref.layout, ref.v_scale, sp);
        }
    }
}

} // namespace

extern "C" cudaError_t KVRT_GPU_FN(launch_move)(const kvrt_move_op *op, void *stream)
{
    if (op->n_spans <= 0 || op->n_layers <= 0)
        return cudaSuccess;
    /* A span is at most max_len slots of a few heads: a block of kThreads
     * covers a typical span in a few passes. */
    const unsigned spans = (unsigned)(op->n_spans < (1 << 30) ? op->n_spans : (1 << 30));
    const unsigned layers = (unsigned)(op->n_layers < 65535 ? op->n_layers : 65535);
    clear_stale_error();
    KVRT_LAUNCH(dim3(spans, layers), kThreads, 0, (cudaStream_t)stream, move_kernel)(
        op->layers, op->n_layers, op->spans, op->n_spans);
    return launch_status();
}
