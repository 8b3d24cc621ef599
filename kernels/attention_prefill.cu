/*
 * attention_prefill.cu: kvrt_attention_op for prefill-shaped calls on
 * tensor cores (FlashAttention-2 style): many query tokens per sequence,
 * ATTN or CROSS layers with an f16 or bf16 cache and queries of the same
 * dtype, head_dim_k == head_dim_v in {64, 96, 128}. The glue
 * (src/backend_gpu.c, attention_prefill_shaped) sends such calls here and
 * everything else (decode, f32 caches, MLA, other head dims) to the
 * generic kernel in attention.cu. C twin: kvrt_cpu_attention in
 * src/attention_cpu.c.
 *
 *   - A CTA owns one query head and a chunk of 64 consecutive batch tokens
 *     (grid.x chunks, the last first: under a causal mask they see the
 *     most keys; grid.y query heads). Four groups of 32 lanes each own 16
 *     of the chunk's rows; their Q rows stay in registers as mma A
 *     fragments for the whole CTA.
 *   - Ragged batches: the chunk's tokens may belong to several sequences
 *     (runs of equal tok_seq); the CTA takes the runs one after another,
 *     the other rows masked, so tokens of any number of sequences go in
 *     one launch.
 *   - Per run, the sequence's used slots in key tiles (64 keys for head
 *     dim 64, 32 above), double-buffered in shared memory: while the
 *     groups compute on one stage, the next tile is brought into the other
 *     through the page table. A key that no row of the run can see (hole,
 *     past the run's last position under the causal mask, before its
 *     window, past the sequence's used slots) is never read: its K and V
 *     rows in shared memory are zeros and its position is "no key". Rows
 *     are padded by 16 bytes, so the 8 rows of one ldmatrix fall in
 *     distinct banks.
 *   - A group whose warp has no row that can see any key of the tile skips
 *     it (fully masked tiles cost only their positions). Otherwise
 *     S = Q K^T on mma.sync m16n8k16 (K tiles through ldmatrix), scaled and
 *     soft-capped in f32, masked per element by position (causal, window,
 *     holes), online softmax in registers (row max and sum over the 4 lanes
 *     of a row by shuffles), P rounded to the cache dtype as the A fragment
 *     of O += P V (V through ldmatrix .trans), O in f32 registers.
 *   - Output O / l in the output dtype; a token with no visible key gives
 *     zeros, a visible NaN logit NaN (as the twin).
 *
 * Differences from the twin (bounded in tests/gpu/test_gpu_ops.c,
 * attention_bound): f32 sums in another order, exp2f, and P rounded to the
 * cache dtype before P V (the sum l is of the unrounded weights), which
 * moves an output by at most u * max |V| (u = 2^-11 f16, 2^-8 bf16). V is
 * read for every key some row of the tile sees, so a non-finite V row that
 * one row sees and another masks reaches the latter too (0 * inf): the
 * twin skips zero weights. K/V tiles are loaded with plain 16-byte loads
 * behind tile_copy16, the one place to switch to cp.async.
 *
 * Registers and static shared memory per CTA of 128 threads (nvcc 13.0,
 * -O3 -Xptxas -v; the same for f16 and bf16; no stack, no spills):
 *   head dim   keys/tile   sm_90a regs   sm_80 regs   shared memory
 *      64          64          166           167        37888 bytes
 *      96          32          167           165        27392 bytes
 *     128          32          174           168        35584 bytes
 * so 2 CTAs (8 warps) per SM at 174 registers; hipcc compiles the portable
 * tensor-core path (gfx90a, gfx1030).
 */
#include "gpu_common.cuh"

namespace {

constexpr int kPfGroups = 4;              /* groups of 32 lanes per CTA */
constexpr int kPfThreads = 32 * kPfGroups; /* a multiple of every warp width */
constexpr int kPfRows = 16 * kPfGroups;   /* query tokens per CTA */

/* Tile shape by head dim: keys per tile, 16-bit elements per shared row. */
template <int D> struct pf_shape {
    static constexpr int keys = D <= 64 ? 64 : 32;
    static constexpr int stride = D + 8;
};

/* 16 bytes global -> shared, zeros when !valid (src not read). */
__device__ inline void tile_copy16(void *dst, const void *src, bool valid)
{
    *static_cast<uint4 *>(dst) = valid ? *static_cast<const uint4 *>(src) : make_uint4(0, 0, 0, 0);
}

/* Whether some lane of the warp (wavefront) has p. */
__device__ inline bool warp_any(bool p)
{
#if defined(KVRT_GPU_IS_HIP)
    return __any(p) != 0;
#else
    return __any_sync(0xffffffffu, p) != 0;
#endif
}

/* Whether some query with a position in [qmin, qmax] may see kp. */
__device__ inline bool pf_may_see(int32_t kp, int64_t qmin, int64_t qmax, int causal, int window)
{
    return kp != kNoKey && qmin <= qmax && (!causal || kp <= qmax) &&
           (window <= 0 || kp > qmin - window);
}

/* A lane's outputs of its two rows: o * inv (inv NaN: NaN, 0: zeros) in
 * dtype OUT, pairs of elements at at_lo + 8 dn and at_hi + 8 dn. */
template <int OUT, int DN>
__device__ inline void store_rows(void *out, const float (&o)[DN][4], bool act_lo, int64_t at_lo,
                                  float inv_lo, bool act_hi, int64_t at_hi, float inv_hi)
{
#pragma unroll
    for (int dn = 0; dn < DN; dn++)
#pragma unroll
        for (int half = 0; half < 2; half++) {
            if (!(half ? act_hi : act_lo))
                continue;
            const float inv = half ? inv_hi : inv_lo;
            /* inv NaN: a visible NaN logit; inv 0: no visible key, o is 0 */
            const float x0 = inv == 0.0f ? 0.0f : o[dn][2 * half] * inv;
            const float x1 = inv == 0.0f ? 0.0f : o[dn][2 * half + 1] * inv;
            const int64_t at = (half ? at_hi : at_lo) + dn * 8;
            if (OUT == KVRT_LAYOUT_F32)
                *reinterpret_cast<float2 *>(static_cast<float *>(out) + at) = make_float2(x0, x1);
            else
                *reinterpret_cast<uint32_t *>(static_cast<uint16_t *>(out) + at) = pack_pair<OUT>(x0, x1);
        }
}

template <int DT, int D>
__global__ void __launch_bounds__(kPfThreads)
    attention_prefill_kernel(const kvrt_attention_op op, const int n_chunks)
{
    typedef pf_shape<D> shape;
    constexpr int NK = shape::keys, ST = shape::stride;
    constexpr int NT = NK / 8;  /* n-tiles of S */
    constexpr int KS = D / 16;  /* k-steps of Q K^T */
    constexpr int DN = D / 8;   /* n-tiles of O */
    constexpr int CH = D / 8;   /* 16-byte chunks per row */
    __shared__ __align__(16) uint16_t s_k[2][NK][ST];
    __shared__ __align__(16) uint16_t s_v[2][NK][ST];
    __shared__ int32_t s_kpos[2][NK];
    __shared__ int32_t s_seq[kPfRows], s_qpos[kPfRows];

    const kvrt_layout L = op.layer.layout;
    const int chunk = n_chunks - 1 - (int)blockIdx.x;
    const int32_t head = (int32_t)blockIdx.y, kvh = head / (op.n_q_heads / L.n_heads);
    const int tid = (int)threadIdx.x, grp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int mi = lane / 8, mr = lane % 8; /* the ldmatrix row this lane addresses */
    const int32_t c0 = chunk * kPfRows;
    const int nrows = min(kPfRows, op.n_tokens - c0);
    const bool masked = op.pos != NULL; /* NULL: cross-attention, every used slot visible */
    const int causal = masked && op.causal, window = masked ? op.window : 0;
    const uint16_t *kreg = static_cast<const uint16_t *>(op.layer.k);
    const uint16_t *vreg = static_cast<const uint16_t *>(op.layer.v);

    if (tid < kPfRows) {
        s_seq[tid] = tid < nrows ? op.tok_seq[c0 + tid] : -1;
        s_qpos[tid] = tid < nrows ? op.tok_pos[c0 + tid] : 0;
    }
    /* Q fragments of rows r_lo and r_hi */
    const int r_lo = grp * 16 + g, r_hi = r_lo + 8;
    uint32_t qa[KS][4];
    {
        const uint16_t *q = static_cast<const uint16_t *>(op.q);
#pragma unroll
        for (int ks = 0; ks < KS; ks++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int row = i % 2 ? r_hi : r_lo, col = 16 * ks + 2 * t + 8 * (i / 2);
                qa[ks][i] = row < nrows ? *reinterpret_cast<const uint32_t *>(
                                              q + ((int64_t)(c0 + row) * op.n_q_heads + head) * D + col)
                                        : 0u;
            }
    }
    __syncthreads();

    for (int run0 = 0; run0 < nrows;) {
        /* the run: rows [run0, run1) of one sequence */
        const int32_t seq = s_seq[run0];
        int run1 = run0 + 1;
        while (run1 < nrows && s_seq[run1] == seq)
            run1++;
        int64_t qmin = INT64_MAX, qmax = INT64_MIN, gmin = INT64_MAX, gmax = INT64_MIN;
        for (int r = run0; r < run1; r++) {
            const int64_t qp = s_qpos[r];
            qmin = qp < qmin ? qp : qmin;
            qmax = qp > qmax ? qp : qmax;
            if (r / 16 == grp) {
                gmin = qp < gmin ? qp : gmin;
                gmax = qp > gmax ? qp : gmax;
            }
        }
        const bool act_lo = r_lo >= run0 && r_lo < run1, act_hi = r_hi >= run0 && r_hi < run1;
        const int32_t qp_lo = s_qpos[r_lo], qp_hi = s_qpos[r_hi];
        const int32_t *pages = op.page_indices + op.page_indptr[seq];
        const int32_t n_slots = op.seq_n_slots[seq];
        const int n_tiles = (n_slots + NK - 1) / NK;

        /* K and V rows of tile `tile` into stage `st` */
        auto load_tile = [&](int tile, int st) {
            for (int idx = tid; idx < NK * CH; idx += kPfThreads) {
                const int c = idx / CH, part = idx - c * CH;
                const int32_t j = tile * NK + c;
                int32_t kp = kNoKey;
                int64_t slot = 0;
                if (j < n_slots) {
                    slot = kvrt_page_slot(pages, L.block_size, j);
                    kp = masked ? op.pos[slot] : 0;
                    if (kp < 0 || (masked && !pf_may_see(kp, qmin, qmax, causal, window)))
                        kp = kNoKey;
                }
                const bool valid = kp != kNoKey;
                tile_copy16(&s_k[st][c][part * 8],
                            kreg + (valid ? kvrt_k_index(&L, slot, kvh) + part * 8 : 0), valid);
                tile_copy16(&s_v[st][c][part * 8],
                            vreg + (valid ? kvrt_v_index(&L, slot, kvh) + part * 8 : 0), valid);
                if (part == 0)
                    s_kpos[st][c] = kp;
            }
        };

        float o[DN][4];
#pragma unroll
        for (int dn = 0; dn < DN; dn++)
            o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.0f;
        softmax_rows sm = {act_lo, act_hi, qp_lo, qp_hi, -INFINITY, -INFINITY, 0.0f, 0.0f};

        __syncthreads(); /* the previous run is done with both stages */
        if (n_tiles > 0)
            load_tile(0, 0);
        for (int it = 0; it < n_tiles; it++) {
            const int st = it & 1;
            __syncthreads(); /* stage st loaded; stage st ^ 1 no longer read */
            if (it + 1 < n_tiles)
                load_tile(it + 1, st ^ 1);

            bool mine = false;
            for (int c = lane; c < NK; c += 32)
                mine = mine || pf_may_see(s_kpos[st][c], gmin, gmax, causal, window);
            if (!warp_any(mine))
                continue; /* every row of the warp is masked from the whole tile */

            /* S = Q K^T */
            float s[NT][4];
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
                s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
            for (int ks = 0; ks < KS; ks++)
#pragma unroll
                for (int nt = 0; nt < NT; nt += 2) {
                    uint32_t kb[4];
                    ldmatrix_x<4, false>(kb, &s_k[st][nt * 8 + (mi / 2) * 8 + mr][ks * 16 + (mi % 2) * 8]);
                    mma_m16n8k16<DT>(s[nt], qa[ks], kb);
                    mma_m16n8k16<DT>(s[nt + 1], qa[ks], kb + 2);
                }

            /* scale, soft-cap, mask; online softmax */
            softmax_tile<NT, DN>(s, o, s_kpos[st], sm, op.scale, op.softcap, causal, window);

            /* O += P V: two n-tiles of S make one A fragment of 16 keys */
#pragma unroll
            for (int kk = 0; kk < NK / 16; kk++) {
                uint32_t pa[4];
                pa[0] = pack_pair<DT>(s[2 * kk][0], s[2 * kk][1]);
                pa[1] = pack_pair<DT>(s[2 * kk][2], s[2 * kk][3]);
                pa[2] = pack_pair<DT>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
                pa[3] = pack_pair<DT>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
                for (int dn = 0; dn < DN; dn += 2) {
                    uint32_t vb[4];
                    ldmatrix_x<4, true>(vb, &s_v[st][kk * 16 + (mi % 2) * 8 + mr][(dn + mi / 2) * 8]);
                    mma_m16n8k16<DT>(o[dn], pa, vb);
                    mma_m16n8k16<DT>(o[dn + 1], pa, vb + 2);
                }
            }
        }

        /* the run's rows: O / l */
        for (int off = 1; off < 4; off *= 2) {
            sm.l_lo += KVRT_SHFL_XOR(sm.l_lo, off);
            sm.l_hi += KVRT_SHFL_XOR(sm.l_hi, off);
        }
        const float inv_lo = sm.l_lo != sm.l_lo ? NAN : sm.l_lo > 0.0f ? 1.0f / sm.l_lo : 0.0f;
        const float inv_hi = sm.l_hi != sm.l_hi ? NAN : sm.l_hi > 0.0f ? 1.0f / sm.l_hi : 0.0f;
        const int64_t at_lo = ((int64_t)(c0 + r_lo) * op.n_q_heads + head) * D + 2 * t;
        const int64_t at_hi = ((int64_t)(c0 + r_hi) * op.n_q_heads + head) * D + 2 * t;
        if (op.out_dtype == KVRT_LAYOUT_F32)
            store_rows<KVRT_LAYOUT_F32, DN>(op.out, o, act_lo, at_lo, inv_lo, act_hi, at_hi, inv_hi);
        else if (op.out_dtype == KVRT_LAYOUT_F16)
            store_rows<KVRT_LAYOUT_F16, DN>(op.out, o, act_lo, at_lo, inv_lo, act_hi, at_hi, inv_hi);
        else
            store_rows<KVRT_LAYOUT_BF16, DN>(op.out, o, act_lo, at_lo, inv_lo, act_hi, at_hi, inv_hi);
        run0 = run1;
    }
}

template <int DT, int D>
cudaError_t launch_prefill(const kvrt_attention_op *op, cudaStream_t stream)
{
    const int n_chunks = (op->n_tokens + kPfRows - 1) / kPfRows;
    const dim3 grid((unsigned)n_chunks, (unsigned)op->n_q_heads);
    KVRT_LAUNCH(grid, kPfThreads, 0, stream, attention_prefill_kernel<DT, D>)(*op, n_chunks);
    return launch_status();
}

template <int DT> cudaError_t launch_prefill_dt(const kvrt_attention_op *op, cudaStream_t stream)
{
    switch (op->layer.layout.dim_k) {
    case 64: return launch_prefill<DT, 64>(op, stream);
    case 96: return launch_prefill<DT, 96>(op, stream);
    default: return launch_prefill<DT, 128>(op, stream);
    }
}

} // namespace

extern "C" int KVRT_GPU_FN(attention_prefill_supports)(const kvrt_attention_op *op)
{
    const kvrt_layout L = op->layer.layout;
    const int dim = L.dim_k;
    return (L.dtype == KVRT_LAYOUT_F16 || L.dtype == KVRT_LAYOUT_BF16) && !op->mla &&
           op->q_dtype == L.dtype && L.dim_v == dim && op->dim_v == dim &&
           (dim == 64 || dim == 96 || dim == 128) && L.n_heads > 0 && op->n_q_heads > 0 &&
           op->n_q_heads % L.n_heads == 0 && op->n_q_heads <= 65535 && op->n_tokens > 0 &&
           aligned_to(op->q, 4) && aligned_to(op->out, 8) && aligned_to(op->layer.k, 16) &&
           aligned_to(op->layer.v, 16);
}

extern "C" cudaError_t KVRT_GPU_FN(launch_attention_prefill)(const kvrt_attention_op *op,
                                                             void *stream)
{
    if (op->n_tokens <= 0 || op->n_q_heads <= 0)
        return cudaSuccess;
    if (!KVRT_GPU_FN(attention_prefill_supports)(op))
        return cudaErrorInvalidValue;
    cudaStream_t s = (cudaStream_t)stream;
    clear_stale_error();
    if (op->layer.layout.dtype == KVRT_LAYOUT_F16)
        return launch_prefill_dt<KVRT_LAYOUT_F16>(op, s);
    return launch_prefill_dt<KVRT_LAYOUT_BF16>(op, s);
}
