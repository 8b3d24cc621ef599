/*
 * attention_mla.cu: kvrt_attention_op for decode-shaped calls of MLA layers
 * (1 to 8 query tokens per sequence) on tensor cores: latent rows of
 * 512 + 64 = 576 values (V: the first 512), an f16 or bf16 cache with
 * queries of the same dtype, K used as stored. C twin: kvrt_cpu_attention
 * in src/attention_cpu.c. The glue (src/backend_gpu.c) asks
 * attention_mla_takes; every other MLA call (other latent/rope dims, f32
 * or quantized caches, prefill shapes, K rotated in attention) stays on
 * the generic kernel in attention.cu.
 *
 *   - A CTA of 4 groups of 32 lanes owns 16 rows: (token, query head)
 *     pairs r = c0 .. c0 + 15 of a tile of up to tt consecutive batch
 *     tokens of one sequence (tile leaders as in attention_decode.cu), row
 *     r being token t0 + r / n_q_heads, head r % n_q_heads, and one split
 *     of the sequence's used slots. All 16 rows share each latent row the
 *     CTA reads, so a latent row is read once per CTA.
 *   - Key tiles of 16 slots move through kMlaStages shared-memory stages
 *     with cp.async: while the groups compute one tile, the next is in
 *     flight. Each thread resolves one slot of the tile (page table,
 *     position, visibility for the CTA's positions) and copies 9 of its 72
 *     16-byte chunks; a slot no row of the CTA can see (hole, causal or
 *     window mask, past the used slots) is not read: zeros, "no key".
 *   - S = Q K^T on mma.sync m16n8k16: group w multiplies its quarter of
 *     the 576 dims (Q fragments in registers for the whole CTA, K through
 *     ldmatrix); the four partial S tiles meet in shared memory and every
 *     group sums them in the same order, so all groups hold the same S,
 *     scale, soft-cap, mask by position (causal, window, holes), and the
 *     same online softmax (row max and sum over the 4 lanes of a row).
 *   - O += P V: P rounded to the cache dtype as an A fragment, V = the
 *     tile's first 512 columns through ldmatrix .trans; group w owns output
 *     columns [128 w, 128 w + 128) in f32 registers.
 *   - The end: O / l into the output, or (split) m, l, O into the partial
 *     layout that attention.cu's combine kernel merges (flash-decoding).
 *     Splits as in attention_decode.cu: enough CTAs for kMlaCtasPerSm per
 *     multiprocessor, each split at least kMlaSplitMinSlots slots, within
 *     the workspace.
 *
 * Differences from the twin (bounded in tests/gpu/test_gpu_ops.c,
 * attention_mla_grid): f32 sums in another order, exp2f, and P rounded to
 * the cache dtype before P V (moves an output by at most u * max |V|). V is read for
 * every key some row of the CTA sees, so a non-finite V that one row sees
 * and another masks reaches the latter too (0 * inf): the twin skips zero
 * weights.
 *
 * Shared memory: 2 stages of 16 rows of 584 16-bit values (rows padded by
 * 16 bytes so the 8 rows of an ldmatrix fall in distinct banks), the
 * partial S tiles (4 KiB) and positions: 41.6 KiB of static shared memory,
 * within the 48 KiB a CUDA block gets without opt-in, kvrt-sim's limit and
 * the 64 KiB of LDS of a gfx90a workgroup, so no launch attribute is
 * needed on any backend.
 *
 * Registers and shared memory per CTA of 128 threads (nvcc 13.0, -O3
 * -arch=sm_90a -Xptxas -v; the f16 and bf16 instances alike):
 *   164 registers, 0-byte stack frame, no spill stores or loads,
 *   41664 bytes of static shared memory, no dynamic shared memory.
 * So 3 CTAs per multiprocessor (registers: 3 x 164 x 128 of 64K), each with
 * one 18.7 KiB stage in flight while it computes the other: ~56 KiB of
 * latent rows in flight per SM, above the ~25 KiB that covers an H200's
 * HBM latency (Little's law, attention_decode.cu). hipcc compiles the
 * portable tensor-core path (gfx90a, gfx1030).
 */
#include "gpu_common.cuh"

#include <algorithm>

namespace {

constexpr int kMlaDimK = 576;            /* latent 512 + rope 64 */
constexpr int kMlaDimV = 512;            /* V: the latent part */
constexpr int kMlaGroups = 4;            /* groups of 32 lanes per CTA */
constexpr int kMlaThreads = 32 * kMlaGroups;
constexpr int kMlaRows = 16;             /* (token, head) rows per CTA */
constexpr int kMlaKeys = 16;             /* slots per key tile */
constexpr int kMlaStages = 2;
constexpr int kMlaStride = kMlaDimK + 8; /* 16-bit elements per shared row */
constexpr int kMlaMaxTokens = 8;
constexpr int kMlaSplitMinSlots = 256;
constexpr int kMlaMaxSplits = 64;
constexpr int kMlaCtasPerSm = 4;

struct mla_plan {
    int tt;          /* tokens per tile (a power of two, 1..8) */
    int n_chunks;    /* CTAs of 16 rows over a tile's tt * n_q_heads rows */
    int n_splits, split_slots;
    size_t workspace;
};

template <int DT>
__global__ void __launch_bounds__(kMlaThreads)
    attention_mla_kernel(const kvrt_attention_op op, const mla_plan p, float *partial)
{
    constexpr int KS = kMlaDimK / kMlaGroups / 16; /* k-steps of a group's S: 9 */
    constexpr int DN = kMlaDimV / kMlaGroups / 8;  /* n-tiles of a group's O: 16 */
    constexpr int CH = kMlaDimK / 8;               /* 16-byte chunks per row: 72 */
    constexpr int TPK = kMlaThreads / kMlaKeys;    /* threads per slot of a tile: 8 */
    __shared__ __align__(16) uint16_t s_k[kMlaStages][kMlaKeys][kMlaStride];
    __shared__ __align__(16) float s_part[kMlaGroups][32][8];
    __shared__ int32_t s_kpos[kMlaStages][kMlaKeys];
    __shared__ int32_t s_qpos[kMlaRows];

    const kvrt_layout L = op.layer.layout;
    const int H = op.n_q_heads;

    /* the tile's tokens (leaders as in attention_decode.cu) */
    const int32_t t0 = (int32_t)blockIdx.x;
    const int32_t seq = op.tok_seq[t0];
    if (t0 % p.tt != 0 && op.tok_seq[t0 - 1] == seq)
        return; /* not a leader (uniform over the CTA) */
    int nt = 1;
    while (nt < p.tt && t0 + nt < op.n_tokens && (t0 + nt) % p.tt != 0 &&
           op.tok_seq[t0 + nt] == seq)
        nt++;
    const int R = nt * H;
    const int c0 = (int)blockIdx.y * kMlaRows;
    if (c0 >= R)
        return; /* the tile has fewer rows (uniform) */
    const int nrows = min(kMlaRows, R - c0);

    const int tid = (int)threadIdx.x, grp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int mi = lane / 8, mr = lane % 8; /* the ldmatrix row this lane addresses */
    const bool masked = op.pos != NULL;
    const int causal = masked && op.causal, window = masked ? op.window : 0;
    const uint16_t *kreg = static_cast<const uint16_t *>(op.layer.k);

    /* the CTA's query positions: every row sees nothing beyond qmax, before qmin - window */
    int64_t qmin = INT64_MAX, qmax = INT64_MIN;
    for (int i = 0; i < nt; i++) {
        const int64_t qp = op.tok_pos[t0 + i];
        qmin = qp < qmin ? qp : qmin;
        qmax = qp > qmax ? qp : qmax;
    }

    /* Q fragments of rows g and g + 8, dims [144 grp, 144 grp + 144) */
    const int r_lo = g, r_hi = g + 8;
    const bool act_lo = r_lo < nrows, act_hi = r_hi < nrows;
    const int64_t row_lo = (int64_t)(t0 + (c0 + r_lo) / H) * H + (c0 + r_lo) % H;
    const int64_t row_hi = (int64_t)(t0 + (c0 + r_hi) / H) * H + (c0 + r_hi) % H;
    uint32_t qa[KS][4];
    {
        const uint16_t *q = static_cast<const uint16_t *>(op.q);
#pragma unroll
        for (int ks = 0; ks < KS; ks++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const bool hi = i % 2 != 0;
                const int col = grp * (KS * 16) + 16 * ks + 2 * t + 8 * (i / 2);
                qa[ks][i] = (hi ? act_hi : act_lo)
                                ? *reinterpret_cast<const uint32_t *>(
                                      q + (hi ? row_hi : row_lo) * kMlaDimK + col)
                                : 0u;
            }
    }

    /* this split's slots */
    const int32_t *pages = op.page_indices + op.page_indptr[seq];
    const int32_t n_slots = op.seq_n_slots[seq];
    const int32_t s_begin = (int32_t)blockIdx.z * p.split_slots;
    const int32_t s_end = min(n_slots, s_begin + p.split_slots);
    const int n_tiles = s_end > s_begin ? (s_end - s_begin + kMlaKeys - 1) / kMlaKeys : 0;

    async_copies ac;
    /* tile `tile` into stage `st`: thread tid copies chunks of slot tid / TPK */
    auto load_tile = [&](int tile, int st) {
        const int c = tid / TPK;
        const int32_t j = s_begin + tile * kMlaKeys + c;
        int32_t kp = kNoKey;
        int64_t slot = 0;
        if (j < s_end) {
            slot = kvrt_page_slot(pages, L.block_size, j);
            kp = masked ? op.pos[slot] : 0;
            if (kp < 0 || (masked && ((causal && kp > qmax) || (window > 0 && kp <= qmin - window))))
                kp = kNoKey;
        }
        const bool valid = kp != kNoKey;
        const uint16_t *src = kreg + (valid ? kvrt_k_index(&L, slot, 0) : 0);
        for (int part = tid % TPK; part < CH; part += TPK)
            async_copy16(ac, &s_k[st][c][part * 8], src + (valid ? part * 8 : 0), valid);
        if (tid % TPK == 0)
            s_kpos[st][c] = kp;
    };

    float o[DN][4];
#pragma unroll
    for (int dn = 0; dn < DN; dn++)
        o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.0f;
    softmax_rows sm = {act_lo, act_hi, 0, 0, -INFINITY, -INFINITY, 0.0f, 0.0f};
    if (tid < kMlaRows) /* the rows' positions, read after the first barrier */
        s_qpos[tid] = tid < nrows ? op.tok_pos[t0 + (c0 + tid) / H] : 0;

    if (n_tiles > 0)
        load_tile(0, 0);
    async_commit(ac);
    for (int it = 0; it < n_tiles; it++) {
        const int st = it % kMlaStages;
        async_wait<0>(ac);
        __syncthreads(); /* stage st landed; the other stage and s_part no longer read */
        if (it + 1 < n_tiles)
            load_tile(it + 1, (it + 1) % kMlaStages);
        async_commit(ac);

        /* this group's part of S = Q K^T */
        float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
        for (int ks = 0; ks < KS; ks++) {
            uint32_t kb[4];
            ldmatrix_x<4, false>(kb, &s_k[st][(mi / 2) * 8 + mr][grp * (KS * 16) + ks * 16 + (mi % 2) * 8]);
            mma_m16n8k16<DT>(s[0], qa[ks], kb);
            mma_m16n8k16<DT>(s[1], qa[ks], kb + 2);
        }
#pragma unroll
        for (int i = 0; i < 8; i++)
            s_part[grp][lane][i] = s[i / 4][i % 4];
        __syncthreads(); /* the partial S tiles are in */
#pragma unroll
        for (int i = 0; i < 8; i++) {
            float x = 0.0f;
#pragma unroll
            for (int w = 0; w < kMlaGroups; w++)
                x += s_part[w][lane][i];
            s[i / 4][i % 4] = x;
        }

        /* scale, soft-cap, mask; online softmax */
        sm.qp_lo = s_qpos[r_lo];
        sm.qp_hi = s_qpos[r_hi];
        softmax_tile<2, DN>(s, o, s_kpos[st], sm, op.scale, op.softcap, causal, window);

        /* O += P V over this group's 128 columns */
        uint32_t pa[4];
        pa[0] = pack_pair<DT>(s[0][0], s[0][1]);
        pa[1] = pack_pair<DT>(s[0][2], s[0][3]);
        pa[2] = pack_pair<DT>(s[1][0], s[1][1]);
        pa[3] = pack_pair<DT>(s[1][2], s[1][3]);
#pragma unroll
        for (int dn = 0; dn < DN; dn += 2) {
            uint32_t vb[4];
            ldmatrix_x<4, true>(vb, &s_k[st][(mi % 2) * 8 + mr][grp * (DN * 8) + (dn + mi / 2) * 8]);
            mma_m16n8k16<DT>(o[dn], pa, vb);
            mma_m16n8k16<DT>(o[dn + 1], pa, vb + 2);
        }
    }
    async_wait<0>(ac);

    /* the rows' sums over the 4 lanes of a row */
    for (int off = 1; off < 4; off *= 2) {
        sm.l_lo += KVRT_SHFL_XOR(sm.l_lo, off);
        sm.l_hi += KVRT_SHFL_XOR(sm.l_hi, off);
    }
#pragma unroll
    for (int half = 0; half < 2; half++) {
        if (!(half ? act_hi : act_lo))
            continue;
        const float l = half ? sm.l_hi : sm.l_lo, m = half ? sm.m_hi : sm.m_lo;
        const int64_t row = half ? row_hi : row_lo;
        const int col0 = grp * (DN * 8) + 2 * t;
        if (partial == NULL) {
            /* NaN l: a visible NaN logit; l 0: no visible key, o is 0 */
            const float inv = l != l ? NAN : l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
            for (int dn = 0; dn < DN; dn++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const float x = inv == 0.0f ? 0.0f : o[dn][2 * half + e] * inv;
                    kvrt_store(op.out, op.out_dtype, row * kMlaDimV + col0 + dn * 8 + e, x);
                }
        } else {
            float *pp = partial + (row * gridDim.z + blockIdx.z) * (int64_t)(kMlaDimV + 2);
            if (grp == 0 && t == 0) {
                pp[0] = m;
                pp[1] = l;
            }
#pragma unroll
            for (int dn = 0; dn < DN; dn++) {
                pp[2 + col0 + dn * 8] = o[dn][2 * half];
                pp[2 + col0 + dn * 8 + 1] = o[dn][2 * half + 1];
            }
        }
    }
}

/* The cut of an op; ws_bytes caps the workspace (SIZE_MAX: as much as the
 * best plan wants). */
mla_plan make_mla_plan(const kvrt_attention_op *op, size_t ws_bytes)
{
    mla_plan p = {};
    const int n_seqs = op->n_seqs > 0 ? op->n_seqs : 1;
    const int per_seq = (op->n_tokens + n_seqs - 1) / n_seqs;
    p.tt = 1;
    while (p.tt < per_seq && p.tt < kMlaMaxTokens)
        p.tt *= 2;
    p.n_chunks = (p.tt * op->n_q_heads + kMlaRows - 1) / kMlaRows;
    p.n_splits = 1;
    p.split_slots = op->max_seq_slots > 0 ? op->max_seq_slots : 1;
    const int64_t tiles = (int64_t)n_seqs * ((per_seq + p.tt - 1) / p.tt);
    const int64_t base = tiles * ((per_seq < p.tt ? per_seq : p.tt) * (int64_t)op->n_q_heads +
                                  kMlaRows - 1) / kMlaRows;
    const int64_t target = (int64_t)kMlaCtasPerSm * sm_count();
    int64_t splits = base >= target ? 1 : (target + base - 1) / base;
    splits = std::min(splits, (int64_t)(op->max_seq_slots / kMlaSplitMinSlots));
    splits = std::min(splits, (int64_t)kMlaMaxSplits);
    const size_t per_split =
        (size_t)op->n_tokens * op->n_q_heads * ((size_t)kMlaDimV + 2) * sizeof(float);
    if (splits > 1 && (size_t)splits * per_split > ws_bytes)
        splits = (int64_t)(ws_bytes / per_split);
    if (splits > 1) {
        int64_t slots = (op->max_seq_slots + splits - 1) / splits;
        slots = (slots + kMlaKeys - 1) / kMlaKeys * kMlaKeys;
        p.n_splits = (int)((op->max_seq_slots + slots - 1) / slots);
        p.split_slots = (int)slots;
    }
    p.workspace = p.n_splits > 1 ? (size_t)p.n_splits * per_split : 0;
    return p;
}

template <int DT>
cudaError_t launch_mla(const kvrt_attention_op *op, const mla_plan &p, float *partial,
                       cudaStream_t stream)
{
    const dim3 grid((unsigned)op->n_tokens, (unsigned)p.n_chunks, (unsigned)p.n_splits);
    KVRT_LAUNCH(grid, kMlaThreads, 0, stream, attention_mla_kernel<DT>)(*op, p, partial);
    return launch_status();
}

} // namespace

/* K rows are used as stored: a layer whose K is rotated in attention, a
 * quantized or f32 cache, or queries of another dtype stay on the generic
 * kernel. */
extern "C" int KVRT_GPU_FN(attention_mla_takes)(const kvrt_attention_op *op)
{
    const kvrt_layout L = op->layer.layout;
    const int n_seqs = op->n_seqs > 0 ? op->n_seqs : 1;
    const bool dtype = (L.dtype == KVRT_LAYOUT_F16 || L.dtype == KVRT_LAYOUT_BF16) &&
                       L.elem_size == 2 && op->q_dtype == L.dtype;
    return op->mla && dtype && L.n_heads == 1 && L.dim_k == kMlaDimK && op->dim_v == kMlaDimV &&
           !op->rope_in_attention && !op->rotate_q && op->n_tokens > 0 && op->n_q_heads > 0 &&
           (op->n_tokens + n_seqs - 1) / n_seqs <= kMlaMaxTokens &&
           (int64_t)kMlaMaxTokens * op->n_q_heads <= 65535LL * kMlaRows &&
           aligned_to(op->layer.k, 16) && aligned_to(op->q, 4);
}

extern "C" size_t KVRT_GPU_FN(attention_mla_workspace)(const kvrt_attention_op *op)
{
    if (!KVRT_GPU_FN(attention_mla_takes)(op))
        return 0;
    return make_mla_plan(op, SIZE_MAX).workspace;
}

extern "C" cudaError_t KVRT_GPU_FN(launch_attention_mla)(const kvrt_attention_op *op,
                                                         void *stream, void *workspace,
                                                         size_t workspace_bytes)
{
    if (op->n_tokens <= 0)
        return cudaSuccess;
    if (!KVRT_GPU_FN(attention_mla_takes)(op) ||
        (int64_t)op->n_tokens * op->n_q_heads > 0x7fffffff)
        return cudaErrorInvalidValue;
    const mla_plan p = make_mla_plan(op, workspace != NULL ? workspace_bytes : 0);
    cudaStream_t s = (cudaStream_t)stream;
    float *partial = p.n_splits > 1 ? (float *)workspace : NULL;
    clear_stale_error();
    const cudaError_t err = op->layer.layout.dtype == KVRT_LAYOUT_F16
                                ? launch_mla<KVRT_LAYOUT_F16>(op, p, partial, s)
                                : launch_mla<KVRT_LAYOUT_BF16>(op, p, partial, s);
    if (err != cudaSuccess || p.n_splits == 1)
        return err;
    return KVRT_GPU_FN(launch_attention_combine)(op, p.n_splits, partial, stream);
}
