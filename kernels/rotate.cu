/*
 * rotate.cu: kvrt_rotate_op, the rotary part of cached K re-rotated in
 * place by each slot's position delta, in every layer of a group in one
 * launch (seq_shift, seq_div). C twin: cpu_rotate in src/backend_cpu.c.
 *
 * A thread handles one (slot, pair) over a chunk of the layers: it computes
 * the pair's angle once per distinct (rot_dims, layer RoPE base), in double (kvrt_rope_angle,
 * then cos and sin in double, rounded to float, as the twin does), and
 * turns that pair in every head of every layer of its chunk. blockIdx.x
 * strides over (slot, pair), consecutive threads taking consecutive pairs
 * of a slot (adjacent or half-split elements of one head row: coalesced);
 * blockIdx.y picks the chunk of layers, so that a shift of a few tokens
 * still spreads over the device.
 *
 * Arithmetic matches the twin operation for operation: x' = x*c - y*s and
 * y' = x*s + y*c in f32 from the stored values, each product and sum
 * rounded (never fused), then rounded to the cache dtype. What may differ
 * is the last bit of the angle (device pow/cos/sin in double are within 2
 * ulp, glibc's within 1), which reaches the result only when c or s then
 * round to a different float: rarely, and by at most one unit of the cache
 * dtype (tests/gpu bounds it).
 *
 * Slots of one op are distinct, so no two threads touch the same element.
 *
 * A quantized layer (k_scale set) has one scale per head row, so its rows
 * are turned whole (rotate_row_quant), by the thread of pair 0 of each
 * slot, head after head: dequantized with the row's scale, the rotary part
 * turned with the same products and sums as above, the row quantized again
 * (kvrt_quant_row, a new scale). That is the twin's rotate_head_quant
 * operation for operation, so bytes and scales match it except where a
 * last-bit difference of the angle changes c or s (see above): then the
 * turned values differ by about 2^-24 relative before requantization, and
 * a stored byte by at most one quantization step. tests/gpu compares
 * bit-exact on the sim (the angle from the same libm), allowing only the
 * sign of fp8 NaN markers to differ (IEEE 754 leaves a NaN's sign open).
 * nvcc -arch=sm_90a -O3 -Xptxas -v: rotate_kernel 80 registers, no spills,
 * and a 4144-byte stack frame (the dequantized row, float[1024]) that
 * every thread reserves in local memory; not yet measured on a device.
 */
#include "gpu_common.cuh"

namespace {

/* One quantized head row of K turned by delta (see the top comment). */
__device__ void rotate_row_quant(const kvrt_layer_ref &ref, const kvrt_rope &rope, int64_t slot,
                                 int32_t h, int64_t delta)
{
    const kvrt_layout L = ref.layout;
    float x[KVRT_QUANT_ROW_MAX];
    int8_t *row = (int8_t *)ref.k + kvrt_k_index(&L, slot, h);
    float *scale = ref.k_scale + kvrt_scale_index(&L, slot, h);
    for (int32_t i = 0; i < L.dim_k; i++)
        x[i] = kvrt_dequant(row, L.dtype, i, *scale);
    kvrt_rope layer_rope = rope;
    layer_rope.theta = L.rope_theta;
    float *r = x + L.rot_offset;
    for (int32_t p = 0; p < L.rot_dims / 2; p++) {
        const double angle = kvrt_rope_angle(&layer_rope, L.rot_dims, p, delta);
        const float c = (float)cos(angle), s = (float)sin(angle);
        int32_t a, b;
        kvrt_rope_pair(rope.style, L.rot_dims, p, &a, &b);
        const float xa = r[a], xb = r[b];
        r[a] = kvrt_mul_sub_rn(xa, c, xb, s);
        r[b] = kvrt_mul_add_rn(xa, s, xb, c);
    }
    *scale = kvrt_quant_row(row, L.dtype, x, KVRT_LAYOUT_F32, L.dim_k);
}

__global__ void rotate_kernel(const kvrt_layer_ref *layers, int32_t n_layers,
                              int32_t layers_per_chunk, const kvrt_rope rope, const int32_t *slots,
                              const int32_t *deltas, int32_t n, int32_t n_pairs)
{
    const int32_t l_begin = (int32_t)blockIdx.y * layers_per_chunk;
    const int32_t l_end = min(n_layers, l_begin + layers_per_chunk);
    const int64_t total = (int64_t)n * n_pairs;
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (int64_t)gridDim.x * blockDim.x) {
        const int32_t i = (int32_t)(t / n_pairs);
        const int32_t p = (int32_t)(t - (int64_t)i * n_pairs);
        const int64_t delta = deltas[i];
        if (delta == 0)
            continue;
        const int64_t slot = slots[i];
        int32_t angle_dims = -1;
        float angle_theta = 0.0f, c = 1.0f, s = 0.0f;
        for (int32_t l = l_begin; l < l_end; l++) {
            const kvrt_layer_ref ref = layers[l];
            const kvrt_layout L = ref.layout;
            const int32_t dims = L.rot_dims;
            if (ref.k == NULL || p >= dims / 2)
                continue;
            if (ref.k_scale != NULL) {
                if (p == 0)
                    for (int32_t h = 0; h < L.n_heads; h++)
                        rotate_row_quant(ref, rope, slot, h, delta);
                continue;
            }
            if (dims != angle_dims || L.rope_theta != angle_theta) {
                kvrt_rope layer_rope = rope;
                layer_rope.theta = L.rope_theta;
                const double angle = kvrt_rope_angle(&layer_rope, dims, p, delta);
                c = (float)cos(angle);
                s = (float)sin(angle);
                angle_dims = dims;
                angle_theta = L.rope_theta;
            }
            int32_t a, b;
            kvrt_rope_pair(rope.style, dims, p, &a, &b);
            for (int32_t h = 0; h < L.n_heads; h++) {
                const int64_t base = kvrt_k_index(&L, slot, h) + L.rot_offset;
                const float x = kvrt_load(ref.k, L.dtype, base + a);
                const float y = kvrt_load(ref.k, L.dtype, base + b);
                kvrt_store(ref.k, L.dtype, base + a, kvrt_mul_sub_rn(x, c, y, s));
                kvrt_store(ref.k, L.dtype, base + b, kvrt_mul_add_rn(x, s, y, c));
            }
        }
    }
}

} // namespace

extern "C" cudaError_t KVRT_GPU_FN(launch_rotate)(const kvrt_rotate_op *op, void *stream)
{
    const int32_t n_pairs = op->max_rot_dims / 2;
    if (op->n <= 0 || op->n_layers <= 0 || n_pairs <= 0)
        return cudaSuccess;
    const int64_t work = (int64_t)op->n * n_pairs;
    /* Split the layers into chunks until about 64k threads run. */
    int64_t chunks = (65536 + work - 1) / work;
    if (chunks > op->n_layers)
        chunks = op->n_layers;
    if (chunks > 65535)
        chunks = 65535;
    const int32_t per_chunk = (int32_t)((op->n_layers + chunks - 1) / chunks);
    chunks = (op->n_layers + per_chunk - 1) / per_chunk;
    clear_stale_error();
    KVRT_LAUNCH(dim3(grid_blocks(work), (unsigned)chunks), kThreads, 0, (cudaStream_t)stream,
                rotate_kernel)(
        op->layers, op->n_layers, per_chunk, op->rope, op->slots, op->deltas, op->n, n_pairs);
    return launch_status();
}
