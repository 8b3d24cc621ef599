/*
 * attention_decode.cu: kvrt_attention_op for decode-shaped calls (1 to 8
 * query tokens per sequence: decode and speculative verification) of ATTN
 * and CROSS layers over f32, f16 and bf16 caches, with K stored rotated.
 * C twin: kvrt_cpu_attention in src/attention_cpu.c. Every other call goes
 * to the generic tiled kernel (attention.cu); the glue asks
 * attention_decode_takes which one.
 *
 * Work of a CTA (kDecodeThreads threads): the tile of up to tt consecutive
 * batch tokens of one sequence (tile leaders as in attention.cu), one kv
 * head and hpc of its query heads (all of them unless rows would not fit),
 * one split of the sequence's used slots. Its R = tokens x heads rows read
 * each K/V row of the kv head once.
 *   - Threads: row groups of kLanes(DK, DV) lanes (a power of two <= 16,
 *     so within a warp of 32 or 64); a lane owns 8-element chunks
 *     lane, lane + L, ... of a row. Row group g is (gr, z): gr picks rows
 *     gr, gr + GR, ... (up to RPT of them), z picks slots z, z + Z, ... of
 *     each key tile. q, the running max m, sum l and the accumulators of a
 *     thread's rows are registers (head dims 64, 80, 96, 128, 192, 256 as
 *     template parameters; other multiples of 8 up to 256 through the
 *     generic instance, with guards on the chunk loops).
 *   - Key tiles of TS slots move through kStages shared-memory stages with
 *     cp.async (gpu_common.cuh): while tile t is computed, tiles t + 1 ..
 *     t + kStages - 1 are in flight. Per tile, threads < TS first resolve
 *     the page table and positions of the tile kStages ahead into a small
 *     ring (slot, position, or kInvisible when no token of the CTA sees it:
 *     holes, causal and window masks, slots past the end), and the copies
 *     skip invisible rows. Two barriers per tile: after the wait (the
 *     tile's rows landed) and after the compute (its stage may be refilled).
 *   - Per slot: dots of the thread's chunks with each row's q, summed over
 *     the row group by xor shuffles (every lane of a group ends with the
 *     same bits, so the softmax branches below are uniform in a group);
 *     online softmax per row, rescaling only when the max grows; a weight
 *     of 0 skips its V (a hole's V may hold anything), a NaN logit makes
 *     the row NaN, a token with no visible key gives zeros (the twin's
 *     rules).
 *   - At the end the Z slot lanes of each row are merged through shared
 *     memory into the output, or into this split's partial (m, l, acc),
 *     which attention.cu's combine kernel merges (flash-decoding). Splits:
 *     enough CTAs for kCtasPerSm per multiprocessor, each split at least
 *     kSplitMinSlots slots, at most kMaxSplits, within the workspace.
 *
 * Bytes in flight (Little's law): an H100 SXM reads HBM3 at ~3.35 TB/s
 * with ~700 ns of load latency, so 3.35e12 * 700e-9 = 2.3 MB must be in
 * flight, 17.8 KiB per multiprocessor (132); an H200 (4.8 TB/s) needs
 * 25 KiB. At d128 f16 a stage of TS = 16 slots is 16 * 2 * 256 B = 8 KiB,
 * kStages - 1 = 2 stages in flight per CTA: 16 KiB, and a multiprocessor
 * holds several CTAs (24 KiB of shared memory and 128 threads each), so
 * two resident CTAs already cover the H200's 25 KiB.
 *
 * Results differ from the twin by summation order and expf: f32 rounding,
 * bounded in tests/gpu/test_gpu_ops.c (attention_close).
 *
 * Registers, spills and shared memory per instance (nvcc 13.0, -O3
 * -arch=sm_90a -Xptxas -v; registers of the f16 instance, f32 and bf16
 * within the range given; no instance spills, 0-byte stack frames; 1 KiB
 * of static shared memory; dynamic shared memory of an f16 cache at the
 * plan's TS, the slot lanes' merge needing less):
 *   DK = DV   L  RPT  registers (f32..bf16)  TS  dynamic smem
 *   64        8   4   125 (124..125)         32  24 KiB
 *   80        2   1   158 (156..167)         32  30 KiB
 *   96        4   1   116 (114..116)         32  36 KiB
 *   128      16   4   126 (124..126)         16  24 KiB
 *   192       8   1   116 (114..116)         16  36 KiB
 *   256      16   2   120 (119..121)          8  24 KiB
 *   generic   8   1   150 (148..150)   by dims, <= 40 KiB
 * At 126 registers a multiprocessor holds 4 CTAs of 128 threads (64K
 * registers), 96 KiB of stages at d128: the bytes in flight above.
 */
#include "gpu_common.cuh"

#include <algorithm>

namespace {

constexpr int kDecodeThreads = 128;  /* a multiple of every warp width */
constexpr int kMaxTileTokens = 8;    /* query tokens of one sequence per CTA */
constexpr int kStages = 3;           /* shared-memory stages of the key tiles */
constexpr int kMaxTileSlots = 32;    /* slots per key tile, at most */
constexpr int kMinTileSlots = 4;
constexpr size_t kSharedBudget = 40 * 1024; /* dynamic shared memory per CTA */
constexpr int kMaxDim = 256;         /* head dims (K and V) this kernel takes */
constexpr int kMaxSplits = 64;
constexpr int kSplitMinSlots = 256;
constexpr int kCtasPerSm = 4;        /* splits aim for this many CTAs per multiprocessor */
constexpr int32_t kInvisible = INT32_MIN;

/* Lanes per row group for chunk counts ck (K) and cv (V), 0: the generic
 * instance: the largest power of two up to 16 dividing both. */
constexpr int decode_lanes(int ck, int cv)
{
    if (ck == 0)
        return 8;
    int l = 16;
    while (l > 1 && (ck % l != 0 || cv % l != 0))
        l /= 2;
    return l;
}
/* Rows per thread: q and acc of all of them within about 32 + 32 floats. */
constexpr int decode_rows_per_thread(int elems_per_row)
{
    return elems_per_row >= 32 ? 1 : 32 / elems_per_row;
}

/* The register shape of an instance (DK = DV = 0: generic, dims up to 256). */
template <int DK, int DV> struct decode_shape {
    static constexpr int CK = DK > 0 ? DK / 8 : kMaxDim / 8; /* chunks, at most */
    static constexpr int CV = DV > 0 ? DV / 8 : kMaxDim / 8;
    static constexpr int L = decode_lanes(DK / 8, DV / 8);
    static constexpr int NK = (CK + L - 1) / L; /* chunks per lane */
    static constexpr int NV = (CV + L - 1) / L;
    static constexpr int RPT = decode_rows_per_thread(8 * (NK > NV ? NK : NV));
};

/* How one call is cut (host-side plan, passed to the kernel by value). */
struct decode_plan {
    int tt;          /* tokens per tile (a power of two, 1..8) */
    int hpc;         /* query heads per CTA */
    int n_chunks;    /* CTAs over one kv head's query heads */
    int gr;          /* row groups along rows (a power of two) */
    int tile_slots;  /* TS */
    int n_splits, split_slots;
    size_t shared, workspace;
    bool ok;
};

__device__ inline bool decode_visible(int64_t p, int64_t qpos, const kvrt_attention_op &op)
{
    return p >= 0 && (!op.causal || p <= qpos) && (op.window <= 0 || p > qpos - op.window);
}

/* Chunk c (8 elements) of a row held in shared memory, as f32. */
template <int DT>
__device__ inline void load_chunk(const unsigned char *row, int c, float *out)
{
    typedef typename dtype_traits<DT>::storage S;
    pack8<S> v = load_pack8(reinterpret_cast<const S *>(row) + (size_t)c * 8);
#pragma unroll
    for (int e = 0; e < 8; e++)
        out[e] = dtype_traits<DT>::to_f32(v.v[e]);
}

/*
 * partial: NULL when n_splits == 1 (the CTA writes the output); otherwise
 * [n_tokens][n_q_heads][n_splits][2 + dim_v] floats (attention.cu's layout).
 * Dynamic shared memory: kStages stages of [TS][dim_k] K then [TS][dim_v] V
 * (cache dtype); after the last tile, the slot lanes' states
 * [Z][R] (m, l, nan) and accumulators [Z][R][dim_v] (f32).
 */
template <int DT, int DK, int DV>
__global__ void __launch_bounds__(kDecodeThreads)
    attention_decode_kernel(const kvrt_attention_op op, const decode_plan p, float *partial)
{
    typedef decode_shape<DK, DV> shape;
    typedef typename dtype_traits<DT>::storage S;
    constexpr int L = shape::L, NK = shape::NK, NV = shape::NV, RPT = shape::RPT;
    constexpr int NG = kDecodeThreads / L;
    KVRT_DYNAMIC_SHARED(unsigned char, shared);
    __shared__ int32_t s_slot[kStages + 1][kMaxTileSlots];
    __shared__ int32_t s_pos[kStages + 1][kMaxTileSlots];

    const kvrt_layout lay = op.layer.layout;
    const int dim_k = DK > 0 ? DK : lay.dim_k, dim_v = DV > 0 ? DV : op.dim_v;
    const int ck = dim_k / 8, cv = dim_v / 8;
    const int32_t group = op.n_q_heads / lay.n_heads;

    /* the tile's tokens */
    const int32_t t0 = (int32_t)blockIdx.x;
    const int32_t seq = op.tok_seq[t0];
    if (t0 % p.tt != 0 && op.tok_seq[t0 - 1] == seq)
        return; /* not a leader (uniform over the CTA) */
    int nt = 1;
    while (nt < p.tt && t0 + nt < op.n_tokens && (t0 + nt) % p.tt != 0 &&
           op.tok_seq[t0 + nt] == seq)
        nt++;

    /* the tile's query heads: kv head kvh, heads [h0, h0 + nh) */
    const int32_t kvh = (int32_t)blockIdx.y / p.n_chunks;
    const int32_t h0 = kvh * group + ((int32_t)blockIdx.y - kvh * p.n_chunks) * p.hpc;
    const int nh = min(p.hpc, (int)(kvh * group + group - h0));
    const int R = nt * nh; /* row r: token t0 + r / nh, query head h0 + r % nh */

    /* this thread: lane of row group (gr, z) */
    const int tid = (int)threadIdx.x;
    const int lane = tid % L, g = tid / L;
    const int gr = g % p.gr, z = g / p.gr, Z = NG / p.gr;
    const int rpt = (R + p.gr - 1) / p.gr; /* rows per row group, uniform */

    float q[RPT][NK][8], acc[RPT][NV][8], m[RPT], l[RPT];
    int64_t qpos[RPT];
    bool row_ok[RPT], saw_nan[RPT];
#pragma unroll
    for (int i = 0; i < RPT; i++) {
        const int r = gr + i * p.gr;
        row_ok[i] = i < rpt && r < R;
        const int64_t row = (int64_t)(t0 + r / nh) * op.n_q_heads + h0 + r % nh;
        qpos[i] = row_ok[i] ? op.tok_pos[t0 + r / nh] : 0;
#pragma unroll
        for (int n = 0; n < NK; n++) {
            const int c = lane + n * L;
#pragma unroll
            for (int e = 0; e < 8; e++)
                q[i][n][e] = row_ok[i] && c < ck
                                 ? kvrt_load(op.q, op.q_dtype, row * dim_k + c * 8 + e)
                                 : 0.0f;
        }
#pragma unroll
        for (int n = 0; n < NV; n++)
#pragma unroll
            for (int e = 0; e < 8; e++)
                acc[i][n][e] = 0.0f;
        m[i] = -INFINITY;
        l[i] = 0.0f;
        saw_nan[i] = false;
    }

    /* the split's slots and its key tiles */
    const int32_t *pages = op.page_indices + op.page_indptr[seq];
    const int64_t n_slots = op.seq_n_slots[seq];
    const int64_t j_begin = (int64_t)blockIdx.z * p.split_slots;
    const int64_t j_end = min(n_slots, j_begin + (int64_t)p.split_slots);
    const int TS = p.tile_slots;
    const int n_tiles = j_end > j_begin ? (int)((j_end - j_begin + TS - 1) / TS) : 0;
    const size_t k_row = (size_t)dim_k * sizeof(S), v_row = (size_t)dim_v * sizeof(S);
    const size_t stage_bytes = (size_t)TS * (k_row + v_row);
    const int units_k = (int)(k_row / 16), units = (int)((k_row + v_row) / 16);
    const char *k_base = static_cast<const char *>(op.layer.k);
    const char *v_base = static_cast<const char *>(op.layer.v);

    /* tile u's slots and positions into ring entry u % (kStages + 1) */
    auto resolve = [&](int u) {
        if (tid >= TS || u >= n_tiles)
            return;
        const int64_t j = j_begin + (int64_t)u * TS + tid;
        int32_t slot = 0, pos = kInvisible;
        if (j < j_end) {
            slot = kvrt_page_slot(pages, lay.block_size, (int32_t)j);
            if (op.pos == NULL) {
                pos = 0; /* cross-attention: every used slot */
            } else {
                const int32_t sp = op.pos[slot];
                bool any = false; /* some token of the tile sees it */
                for (int ti = 0; ti < nt && !any; ti++)
                    any = decode_visible(sp, op.tok_pos[t0 + ti], op);
                pos = any ? sp : kInvisible;
            }
        }
        s_slot[u % (kStages + 1)][tid] = slot;
        s_pos[u % (kStages + 1)][tid] = pos;
    };
    /* this thread's share of tile u's K/V rows into stage u % kStages;
     * always closes a group, so that groups count tiles */
    async_copies ac;
    auto issue = [&](int u) {
        if (u < n_tiles) {
            unsigned char *stage = shared + (size_t)(u % kStages) * stage_bytes;
            const int e = u % (kStages + 1);
            for (int i = tid; i < TS * units; i += kDecodeThreads) {
                const int c = i / units, part = i - c * units;
                if (s_pos[e][c] == kInvisible)
                    continue;
                const int64_t slot = s_slot[e][c];
                if (part < units_k)
                    async_copy16(ac, stage + c * k_row + (size_t)part * 16,
                                 k_base + kvrt_k_index(&lay, slot, kvh) * (int64_t)sizeof(S) +
                                     part * 16,
                                 true);
                else
                    async_copy16(ac, stage + TS * k_row + c * v_row + (size_t)(part - units_k) * 16,
                                 v_base + kvrt_v_index(&lay, slot, kvh) * (int64_t)sizeof(S) +
                                     (part - units_k) * 16,
                                 true);
            }
        }
        async_commit(ac);
    };

    for (int u = 0; u < kStages; u++)
        resolve(u);
    __syncthreads();
    for (int u = 0; u < kStages - 1; u++)
        issue(u);

    for (int t = 0; t < n_tiles; t++) {
        resolve(t + kStages); /* ring entry last read by tile t - 1 */
        issue(t + kStages - 1);
        async_wait<kStages - 1>(ac); /* this thread's copies of tile t */
        __syncthreads();             /* everyone's */
        const int e = t % (kStages + 1);
        const unsigned char *stage = shared + (size_t)(t % kStages) * stage_bytes;
        bool tile_any = false;
        for (int c = 0; c < TS; c++)
            tile_any = tile_any || s_pos[e][c] != kInvisible;
        for (int c0 = 0; tile_any && c0 < TS; c0 += Z) { /* uniform trip count */
            const int c = c0 + z;
            const int32_t pos = c < TS ? s_pos[e][c] : kInvisible;
            const bool seen = pos != kInvisible;
            float kf[NK][8];
#pragma unroll
            for (int n = 0; n < NK; n++) {
                const int ci = lane + n * L;
                if (seen && ci < ck) {
                    load_chunk<DT>(stage + c * k_row, ci, kf[n]);
                } else {
#pragma unroll
                    for (int x = 0; x < 8; x++)
                        kf[n][x] = 0.0f;
                }
            }
            float dot[RPT];
#pragma unroll
            for (int i = 0; i < RPT; i++) {
                dot[i] = 0.0f;
                if (i < rpt) { /* uniform: every lane shuffles */
                    float d = 0.0f;
#pragma unroll
                    for (int n = 0; n < NK; n++)
#pragma unroll
                        for (int x = 0; x < 8; x++)
                            d = fmaf(q[i][n][x], kf[n][x], d);
                    for (int off = L / 2; off > 0; off /= 2)
                        d += KVRT_SHFL_XOR(d, off);
                    dot[i] = d;
                }
            }
            if (!seen)
                continue;
            float vf[NV][8];
#pragma unroll
            for (int n = 0; n < NV; n++) {
                const int ci = lane + n * L;
                if (ci < cv) {
                    load_chunk<DT>(stage + TS * k_row + c * v_row, ci, vf[n]);
                } else {
#pragma unroll
                    for (int x = 0; x < 8; x++)
                        vf[n][x] = 0.0f;
                }
            }
#pragma unroll
            for (int i = 0; i < RPT; i++) {
                if (!row_ok[i] || (op.pos != NULL && !decode_visible(pos, qpos[i], op)))
                    continue;
                const float s = op.softcap > 0.0f
                                    ? op.softcap * tanhf(dot[i] * op.scale / op.softcap)
                                    : dot[i] * op.scale;
                if (s != s) {
                    saw_nan[i] = true;
                    continue;
                }
                if (!(s > -INFINITY))
                    continue; /* weight 0 */
                if (s > m[i]) {
                    const float alpha = m[i] > -INFINITY ? expf(m[i] - s) : 0.0f;
                    l[i] *= alpha;
#pragma unroll
                    for (int n = 0; n < NV; n++)
#pragma unroll
                        for (int x = 0; x < 8; x++)
                            acc[i][n][x] *= alpha;
                    m[i] = s;
                }
                const float w = expf(s - m[i]);
                l[i] += w;
                if (w != 0.0f) {
#pragma unroll
                    for (int n = 0; n < NV; n++)
#pragma unroll
                        for (int x = 0; x < 8; x++)
                            acc[i][n][x] = fmaf(w, vf[n][x], acc[i][n][x]);
                }
            }
        }
        __syncthreads(); /* stage t % kStages is refilled next */
    }
    async_wait<0>(ac);
    __syncthreads(); /* shared memory now holds the slot lanes' states */

    float *st = reinterpret_cast<float *>(shared);   /* [Z][R][3]: m, l, nan */
    float *sacc = st + (size_t)Z * R * 3;             /* [Z][R][dim_v] */
#pragma unroll
    for (int i = 0; i < RPT; i++) {
        if (!row_ok[i])
            continue;
        const int r = gr + i * p.gr;
        const size_t at = (size_t)z * R + r;
        if (lane == 0) {
            st[at * 3 + 0] = m[i];
            st[at * 3 + 1] = l[i];
            st[at * 3 + 2] = saw_nan[i] ? 1.0f : 0.0f;
        }
#pragma unroll
        for (int n = 0; n < NV; n++) {
            const int ci = lane + n * L;
            if (ci < cv)
#pragma unroll
                for (int x = 0; x < 8; x++)
                    sacc[at * dim_v + ci * 8 + x] = acc[i][n][x];
        }
    }
    __syncthreads();

    /* the rows: output, or this split's partial */
    for (int i = tid; i < R * dim_v; i += kDecodeThreads) {
        const int r = i / dim_v, d = i - r * dim_v;
        float mm = -INFINITY;
        bool any_nan = false;
        for (int zz = 0; zz < Z; zz++) {
            const float *sz = st + ((size_t)zz * R + r) * 3;
            any_nan = any_nan || sz[2] != 0.0f || sz[1] != sz[1];
            if (sz[1] > 0.0f)
                mm = fmaxf(mm, sz[0]);
        }
        float lt = 0.0f, a = 0.0f;
        for (int zz = 0; zz < Z; zz++) {
            const float *sz = st + ((size_t)zz * R + r) * 3;
            if (sz[1] > 0.0f) {
                const float w = expf(sz[0] - mm);
                lt += sz[1] * w;
                a += sacc[((size_t)zz * R + r) * dim_v + d] * w;
            }
        }
        const int64_t row = (int64_t)(t0 + r / nh) * op.n_q_heads + h0 + r % nh;
        if (partial == NULL) {
            const float out = any_nan ? NAN : lt > 0.0f ? a / lt : 0.0f;
            kvrt_store(op.out, op.out_dtype, row * dim_v + d, out);
        } else {
            float *pp = partial + (row * gridDim.z + blockIdx.z) * (int64_t)(dim_v + 2);
            if (d == 0) {
                pp[0] = mm;
                pp[1] = any_nan ? NAN : lt;
            }
            pp[2 + d] = a;
        }
    }
}

/* Lanes and rows per thread of the instance that takes (dim_k, dim_v). */
void decode_instance(int dim_k, int dim_v, int *lanes, int *rpt)
{
#define KVRT_DECODE_SHAPE(DK, DV)                                                               \
    if (dim_k == DK && dim_v == DV) {                                                          \
        *lanes = decode_shape<DK, DV>::L;                                                      \
        *rpt = decode_shape<DK, DV>::RPT;                                                      \
        return;                                                                                \
    }
    KVRT_DECODE_SHAPE(64, 64)
    KVRT_DECODE_SHAPE(80, 80)
    KVRT_DECODE_SHAPE(96, 96)
    KVRT_DECODE_SHAPE(128, 128)
    KVRT_DECODE_SHAPE(192, 192)
    KVRT_DECODE_SHAPE(256, 256)
#undef KVRT_DECODE_SHAPE
    *lanes = decode_shape<0, 0>::L;
    *rpt = decode_shape<0, 0>::RPT;
}

/* The cut of an op; ws_bytes caps the workspace (SIZE_MAX: as much as the
 * best plan wants). */
decode_plan make_decode_plan(const kvrt_attention_op *op, size_t ws_bytes)
{
    decode_plan p = {};
    const kvrt_layout L = op->layer.layout;
    const int group = op->n_q_heads / L.n_heads;
    const int n_seqs = op->n_seqs > 0 ? op->n_seqs : 1;
    const int per_seq = (op->n_tokens + n_seqs - 1) / n_seqs;
    p.tt = 1;
    while (p.tt < per_seq && p.tt < kMaxTileTokens)
        p.tt *= 2;
    int lanes = 8, rpt = 1;
    decode_instance(L.dim_k, op->dim_v, &lanes, &rpt);
    const int n_groups = kDecodeThreads / lanes, row_cap = n_groups * rpt;
    p.hpc = std::max(1, std::min(group, row_cap / p.tt));
    p.n_chunks = (group + p.hpc - 1) / p.hpc;
    const int rows = p.tt * p.hpc;
    p.gr = 1;
    while (p.gr * rpt < rows && p.gr < n_groups)
        p.gr *= 2;
    const size_t row_bytes = ((size_t)L.dim_k + (size_t)op->dim_v) * (size_t)L.elem_size;
    p.tile_slots = kMaxTileSlots;
    while (p.tile_slots > kMinTileSlots && kStages * p.tile_slots * row_bytes > kSharedBudget)
        p.tile_slots /= 2;
    const size_t merge = (size_t)(n_groups / p.gr) * rows * ((size_t)op->dim_v + 3) * sizeof(float);
    p.shared = std::max((size_t)kStages * p.tile_slots * row_bytes, merge);
    p.ok = p.shared <= kSharedBudget && p.gr * rpt >= rows;

    /* splits: enough CTAs for the device, each split long enough to pay */
    p.n_splits = 1;
    p.split_slots = op->max_seq_slots > 0 ? op->max_seq_slots : 1;
    const int64_t tiles = (int64_t)n_seqs * ((per_seq + p.tt - 1) / p.tt);
    const int64_t base = (int64_t)L.n_heads * p.n_chunks * tiles;
    const int64_t target = (int64_t)kCtasPerSm * sm_count();
    int64_t splits = base >= target ? 1 : (target + base - 1) / base;
    splits = std::min(splits, (int64_t)(op->max_seq_slots / kSplitMinSlots));
    splits = std::min(splits, (int64_t)kMaxSplits);
    const size_t per_split =
        (size_t)op->n_tokens * op->n_q_heads * ((size_t)op->dim_v + 2) * sizeof(float);
    if (splits > 1 && (size_t)splits * per_split > ws_bytes)
        splits = (int64_t)(ws_bytes / per_split);
    if (splits > 1) {
        int64_t slots = (op->max_seq_slots + splits - 1) / splits;
        slots = (slots + p.tile_slots - 1) / p.tile_slots * p.tile_slots;
        p.n_splits = (int)((op->max_seq_slots + slots - 1) / slots);
        p.split_slots = (int)slots;
    }
    p.workspace = p.n_splits > 1 ? (size_t)p.n_splits * per_split : 0;
    return p;
}

template <int DT, int DK, int DV>
cudaError_t launch_decode(const kvrt_attention_op *op, const decode_plan &p, float *partial,
                          cudaStream_t stream)
{
    const dim3 grid((unsigned)op->n_tokens, (unsigned)(op->layer.layout.n_heads * p.n_chunks),
                    (unsigned)p.n_splits);
    KVRT_LAUNCH(grid, kDecodeThreads, p.shared, stream, attention_decode_kernel<DT, DK, DV>)(
        *op, p, partial);
    return launch_status();
}

template <int DT>
cudaError_t launch_decode_dt(const kvrt_attention_op *op, const decode_plan &p, float *partial,
                             cudaStream_t stream)
{
    const int dk = op->layer.layout.dim_k, dv = op->dim_v;
#define KVRT_DECODE_DIM(D)                                                                      \
    if (dk == D && dv == D)                                                                    \
        return launch_decode<DT, D, D>(op, p, partial, stream);
    KVRT_DECODE_DIM(64)
    KVRT_DECODE_DIM(80)
    KVRT_DECODE_DIM(96)
    KVRT_DECODE_DIM(128)
    KVRT_DECODE_DIM(192)
    KVRT_DECODE_DIM(256)
#undef KVRT_DECODE_DIM
    return launch_decode<DT, 0, 0>(op, p, partial, stream);
}

} // namespace

/* K rows are used as stored (rotated when written): a cache that keeps K
 * unrotated or quantized must not be taken here until this kernel learns
 * it; the dtype test below refuses every dtype but f32, f16 and bf16. */
extern "C" int KVRT_GPU_FN(attention_decode_takes)(const kvrt_attention_op *op)
{
    const kvrt_layout L = op->layer.layout;
    const int n_seqs = op->n_seqs > 0 ? op->n_seqs : 1;
    const bool dtype = (L.dtype == KVRT_LAYOUT_F32 && L.elem_size == 4) ||
                       ((L.dtype == KVRT_LAYOUT_F16 || L.dtype == KVRT_LAYOUT_BF16) &&
                        L.elem_size == 2);
    if (op->mla || !dtype || op->n_tokens <= 0 || L.n_heads <= 0 || op->n_q_heads <= 0 ||
        op->n_q_heads % L.n_heads != 0 || L.dim_k <= 0 || op->dim_v <= 0 ||
        L.dim_k % 8 != 0 || op->dim_v % 8 != 0 || L.dim_k > kMaxDim || op->dim_v > kMaxDim ||
        (op->n_tokens + n_seqs - 1) / n_seqs > kMaxTileTokens || !aligned_to(op->layer.k, 16) ||
        !aligned_to(op->layer.v, 16))
        return 0;
    return make_decode_plan(op, 0).ok ? 1 : 0;
}

extern "C" size_t KVRT_GPU_FN(attention_decode_workspace)(const kvrt_attention_op *op)
{
    if (!KVRT_GPU_FN(attention_decode_takes)(op))
        return 0;
    return make_decode_plan(op, SIZE_MAX).workspace;
}

extern "C" cudaError_t KVRT_GPU_FN(launch_attention_decode)(const kvrt_attention_op *op,
                                                            void *stream, void *workspace,
                                                            size_t workspace_bytes)
{
    if (op->n_tokens <= 0)
        return cudaSuccess;
    if (!KVRT_GPU_FN(attention_decode_takes)(op) ||
        (int64_t)op->n_tokens * op->n_q_heads > 0x7fffffff)
        return cudaErrorInvalidValue;
    const decode_plan p = make_decode_plan(op, workspace != NULL ? workspace_bytes : 0);
    if ((int64_t)op->layer.layout.n_heads * p.n_chunks > 65535)
        return cudaErrorInvalidValue;
    cudaStream_t s = (cudaStream_t)stream;
    float *partial = p.n_splits > 1 ? (float *)workspace : NULL;
    clear_stale_error();
    cudaError_t err;
    if (op->layer.layout.dtype == KVRT_LAYOUT_F32)
        err = launch_decode_dt<KVRT_LAYOUT_F32>(op, p, partial, s);
    else if (op->layer.layout.dtype == KVRT_LAYOUT_F16)
        err = launch_decode_dt<KVRT_LAYOUT_F16>(op, p, partial, s);
    else
        err = launch_decode_dt<KVRT_LAYOUT_BF16>(op, p, partial, s);
    if (err != cudaSuccess || p.n_splits == 1)
        return err;
    return KVRT_GPU_FN(launch_attention_combine)(op, p.n_splits, partial, stream);
}
