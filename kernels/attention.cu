/*
 * attention.cu: kvrt_attention_op, masked paged attention of a batch's
 * tokens over their sequences' slots (decode, short query blocks and
 * prefill, ATTN, MLA and CROSS layers). C twin: kvrt_cpu_attention in
 * src/attention_cpu.c. Decode-shaped calls over f32, f16 and bf16 caches
 * go to attention_decode.cu instead (the glue asks attention_decode_takes);
 * its splits are merged by attention_combine_kernel here
 * (launch_attention_combine).
 *
 * One tiled kernel (attention_kernel) serves decode and prefill; the
 * launcher picks the tile shape from the op:
 *   - A CTA owns a query tile: up to `tt` consecutive batch tokens of one
 *     sequence times up to `hpc` query heads that share one kv head (GQA;
 *     MLA: all query heads share the latent row). Its rows (token, query
 *     head), at most kMaxRows, read every K/V row of the kv head once.
 *     Decode (few tokens per sequence): tt is the next power of two of the
 *     tokens per sequence (1..8), hpc as many heads of the group as fit.
 *     Prefill: tt = 32 tokens (16 with GQA pairs of heads).
 *   - Tile leaders: grid.x runs over tokens (grid.y over kv heads and
 *     chunks of their query heads); token t leads a tile when
 *     t % tt == 0 or its predecessor belongs to another sequence, and takes
 *     the following tokens of its sequence up to the next multiple of tt.
 *     Every token belongs to exactly one leader; other CTAs return at once.
 *   - The CTA walks its split of the sequence's used slots in key tiles of
 *     kKeyTile: (A) page-table walk and positions, (B) logits, one slot per
 *     group of lanes reading the K row with 16-byte loads, dotted against
 *     the rows' queries (f32, shared memory) and reduced by shuffles within
 *     the group, (C) online softmax per row (m, l in f32), (D) the weighted
 *     V rows added into the rows' accumulators (shared memory, f32), V read
 *     with 16-byte loads; zero weights are skipped, as in the twin, so that
 *     a hole's garbage never reaches the output.
 *   - Flash-decoding: grid.z splits the slots when there are too few CTAs
 *     for the device; each split writes (m, l, acc) to a workspace that the
 *     glue owns, and attention_combine merges the splits into the output.
 * A token with no visible key gives zeros; a visible NaN logit gives NaN.
 *
 * Results differ from the twin by summation order and by expf against its
 * polynomial exp: f32 rounding, bounded in tests/gpu.
 *
 * Pre-RoPE caches (op.rope_in_attention; the glue sends them nowhere else)
 * turn each key's rotary part by its slot's position in phase B as it is
 * loaded, and with op.rotate_q each query by its token's position as it is
 * staged (rope_key_part, load_query: the twin's rope_row arithmetic).
 * nvcc 13.0 -Xptxas -v, sm_90a, attention_kernel: 111 registers (scalar
 * loads) and 124 (16-byte loads), 40 bytes stack frame (the double sin/cos
 * slow path), 0 spills, 5504 bytes static shared memory; before the pre-RoPE
 * turn 70 and 83 registers, no stack. Still two CTAs of 256 threads per SM
 * (__launch_bounds__). The angles are recomputed per element and key (in
 * double); not measured.
 */
#include "gpu_common.cuh"

#include <algorithm>

namespace {

constexpr int kAttnThreads = 256;  /* a multiple of every warp width */
constexpr int kKeyTile = 32;       /* slots per key tile */
constexpr int kMaxRows = 32;       /* (token, query head) rows per CTA */
constexpr int kMaxSplits = 64;
constexpr int kSplitMinSlots = 256;
/* Dynamic shared memory per CTA: with the static arrays (about 5.5 KiB)
 * under the 48 KiB a CTA gets without opting in; one row of up to 40 KiB
 * (the glue's bound) always fits. */
constexpr size_t kSharedLimit = 40 * 1024;

/* Elements [i, i + N) of a cache array of dtype DT as f32; PACK: N == 8 and
 * 16-byte aligned. */
template <int DT, bool PACK>
__device__ inline void load_row_part(const void *base, int64_t i, float *out)
{
    typedef typename dtype_traits<DT>::storage S;
    const S *p = static_cast<const S *>(base) + i;
    if (PACK) {
        pack8<S> v = load_pack8(p);
#pragma unroll
        for (int e = 0; e < 8; e++)
            out[e] = dtype_traits<DT>::to_f32(v.v[e]);
    } else {
        out[0] = dtype_traits<DT>::to_f32(*p);
    }
}

/* N (1 or 8) floats of shared memory; 8: 32-byte aligned, two 16-byte accesses. */
template <int N> __device__ inline void load_shared(const float *p, float *out)
{
    if (N == 8) {
        const float4 a = reinterpret_cast<const float4 *>(p)[0];
        const float4 b = reinterpret_cast<const float4 *>(p)[1];
        out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
        out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
    } else {
        out[0] = p[0];
    }
}
template <int N> __device__ inline void store_shared(float *p, const float *in)
{
    if (N == 8) {
        reinterpret_cast<float4 *>(p)[0] = make_float4(in[0], in[1], in[2], in[3]);
        reinterpret_cast<float4 *>(p)[1] = make_float4(in[4], in[5], in[6], in[7]);
    } else {
        p[0] = in[0];
    }
}

/*
 * Pre-RoPE mode (op.rope_in_attention, op.rotate_q): element j of a head
 * row's rotary part [rot_offset, rot_offset + rot_dims) turned by position
 * pos, as rope_row in src/attention_cpu.c turns the row: pair i =
 * (a, b) (kvrt_rope_pair), angle kvrt_rope_angle in double, c and s rounded
 * to f32, x_a c - x_b s and x_a s + x_b c in f32 unfused (kvrt_mul_sub_rn,
 * kvrt_mul_add_rn); position 0 leaves the row as it is, as the twin does.
 * On kvrt-sim (the host's libm) this is the twin's arithmetic, bit for bit.
 * On a device, cos, sin and pow in double are within 2 ulp of double (CUDA
 * and HIP math), so c and s rounded to f32 are the twin's or one f32 ulp
 * (2^-24) away; a turned element then differs from the twin's by at most
 * 2^-24 (|x_a| + |x_b|) + its own rounding, below the attention bound of
 * tests/gpu. Each element is computed from the pair's two stored values
 * independently, so a lane turns its own elements without the others.
 */
/* Pair i of element j (relative to rot_offset) of a rot_dims-part, and the
 * pair's other element; false: j is not turned. */
__device__ inline bool rope_pair_of(int32_t style, int32_t dims, int32_t j, int32_t *i,
                                    int32_t *other, bool *first)
{
    const int32_t half = dims / 2;
    if (j < 0 || j >= 2 * half)
        return false;
    if (style == 0) {
        *i = j / 2;
        *first = (j & 1) == 0;
        *other = j ^ 1;
    } else {
        *first = j < half;
        *i = *first ? j : j - half;
        *other = *first ? j + half : j - half;
    }
    return true;
}

/* x (element j of the pair) turned with its pair's other element y. */
__device__ inline float rope_turn(const kvrt_attention_op &op, int32_t dims, int32_t i, bool first,
                                  int64_t pos, float x, float y)
{
    const double angle = kvrt_rope_angle(&op.rope, dims, i, pos); /* theta: the layer's */
    const float c = (float)cos(angle), s = (float)sin(angle);
    return first ? kvrt_mul_sub_rn(x, c, y, s) : kvrt_mul_add_rn(y, s, x, c);
}

/* Elements [d, d + N) of the K head row at kb, loaded as kv, turned by the
 * slot's position pos; partners come from the stored row. */
template <int DT, int N>
__device__ inline void rope_key_part(const kvrt_attention_op &op, const kvrt_layout &L,
                                     int64_t kb, int32_t d, int64_t pos, float *kv)
{
    if (pos == 0 || L.rot_dims <= 0)
        return;
#pragma unroll
    for (int e = 0; e < N; e++) {
        int32_t i, other;
        bool first;
        if (rope_pair_of(op.rope.style, L.rot_dims, d + e - L.rot_offset, &i, &other, &first)) {
            float y;
            load_row_part<DT, false>(op.layer.k, kb + L.rot_offset + other, &y);
            kv[e] = rope_turn(op, L.rot_dims, i, first, pos, kv[e], y);
        }
    }
}

/* Element d of query row `row` (f32), turned by its token's position pos
 * when op.rotate_q. */
__device__ inline float load_query(const kvrt_attention_op &op, const kvrt_layout &L, int64_t row,
                                   int32_t d, int64_t pos)
{
    const int64_t qb = row * L.dim_k;
    const float x = kvrt_load(op.q, op.q_dtype, qb + d);
    int32_t i, other;
    bool first;
    if (!op.rotate_q || pos == 0 ||
        !rope_pair_of(op.rope.style, L.rot_dims, d - L.rot_offset, &i, &other, &first))
        return x;
    const float y = kvrt_load(op.q, op.q_dtype, qb + L.rot_offset + other);
    return rope_turn(op, L.rot_dims, i, first, pos, x, y);
}

__device__ inline bool slot_visible(int64_t p, int64_t qpos, const kvrt_attention_op &op)
{
    return p >= 0 && (!op.causal || p <= qpos) && (op.window <= 0 || p > qpos - op.window);
}

/*
 * partial: NULL when n_splits == 1 (the CTA writes the output); otherwise
 * [n_tokens][n_q_heads][n_splits][2 + dim_v] floats: m, l (NaN: a NaN
 * logit was seen), acc.
 * Dynamic shared memory: q [tt * hpc][dim_k], acc [tt * hpc][dim_v].
 */
template <int DT, bool PACK>
__global__ void __launch_bounds__(kAttnThreads, 2)
    attention_kernel(const kvrt_attention_op op, const int tt, const int hpc,
                     const int n_chunks, const int split_slots, float *partial)
{
    KVRT_DYNAMIC_SHARED(float, shared);
    __shared__ int64_t s_slot[kKeyTile];
    __shared__ int32_t s_pos[kKeyTile];
    __shared__ int s_any[kKeyTile];     /* some token of the tile sees the slot */
    __shared__ float s_p[kMaxRows][kKeyTile + 1];
    __shared__ float s_m[kMaxRows], s_l[kMaxRows], s_alpha[kMaxRows];
    __shared__ int s_nan[kMaxRows];
    __shared__ int64_t s_qpos[kMaxRows];

    constexpr int E = PACK ? 8 : 1; /* elements per lane step */
    const kvrt_layout L = op.layer.layout;
    const int32_t dim_k = L.dim_k, dim_v = op.dim_v;
    const int32_t group = op.n_q_heads / L.n_heads;

    /* the tile's tokens */
    const int32_t t0 = (int32_t)blockIdx.x;
    const int32_t seq = op.tok_seq[t0];
    if (t0 % tt != 0 && op.tok_seq[t0 - 1] == seq)
        return; /* not a leader (uniform over the CTA) */
    int nt = 1;
    while (nt < tt && t0 + nt < op.n_tokens && (t0 + nt) % tt != 0 &&
           op.tok_seq[t0 + nt] == seq)
        nt++;

    /* the tile's query heads: kv head kvh, heads [h0, h0 + nh) */
    const int32_t kvh = (int32_t)blockIdx.y / n_chunks;
    const int32_t chunk = (int32_t)blockIdx.y - kvh * n_chunks;
    const int32_t h0 = kvh * group + chunk * hpc;
    const int nh = min(hpc, group - chunk * hpc);
    const int32_t head = op.mla ? 0 : kvh;
    const int R = nt * nh; /* row r: token t0 + r / nh, query head h0 + r % nh */
    const int R_cap = tt * hpc;
    float *q = shared;                          /* [R_cap][dim_k] */
    float *acc = shared + (size_t)R_cap * dim_k; /* [R_cap][dim_v] */

    for (int i = threadIdx.x; i < R * dim_k; i += blockDim.x) {
        const int r = i / dim_k, d = i - r * dim_k;
        const int64_t row = (int64_t)(t0 + r / nh) * op.n_q_heads + h0 + r % nh;
        q[i] = load_query(op, L, row, d, op.tok_pos[t0 + r / nh]);
    }
    for (int i = threadIdx.x; i < R * dim_v; i += blockDim.x)
        acc[i] = 0.0f;
    if (threadIdx.x < kMaxRows) {
        const int r = threadIdx.x;
        s_m[r] = -INFINITY;
        s_l[r] = 0.0f;
        s_nan[r] = 0;
        s_qpos[r] = r < R ? op.tok_pos[t0 + r / nh] : 0;
    }

    const int32_t *pages = op.page_indices + op.page_indptr[seq];
    const int64_t n_slots = op.seq_n_slots[seq];
    const int64_t j_begin = (int64_t)blockIdx.z * split_slots;
    const int64_t j_end = min(n_slots, j_begin + (int64_t)split_slots);

    /* phase B geometry: groups of lps lanes, one slot per group */
    const int W = KVRT_WARP_SIZE;
    int lps = W;
    while (lps > 1 && (lps / 2) * E >= dim_k)
        lps /= 2;
    const int lane = threadIdx.x % W, warp = threadIdx.x / W;
    const int sub = lane % lps;
    const int groups_per_pass = (int)(blockDim.x / W) * (W / lps);
    const int my_group = warp * (W / lps) + lane / lps;
    const int n_units_v = dim_v / E;
    const void *v_region = op.mla ? op.layer.k : op.layer.v;
    __syncthreads();

    for (int64_t j0 = j_begin; j0 < j_end; j0 += kKeyTile) {
        /* A: slots of the tile, their positions, whether any token sees them */
        if (threadIdx.x < kKeyTile) {
            const int c = threadIdx.x;
            const int64_t j = j0 + c;
            int any = 0;
            int64_t slot = 0;
            int32_t p = 0;
            if (j < j_end) {
                slot = kvrt_page_slot(pages, L.block_size, (int32_t)j);
                if (op.pos == NULL) {
                    any = 1;
                } else {
                    p = op.pos[slot];
                    for (int ti = 0; ti < nt && !any; ti++)
                        any = slot_visible(p, s_qpos[ti * nh], op);
                }
            }
            s_slot[c] = slot;
            s_pos[c] = p;
            s_any[c] = any;
        }
        if (!KVRT_SIM_MUTANT(1)) /* mutant 1: B reads A's writes without this barrier */
            __syncthreads();

        /* B: logits s_p[r][c] of the slots some token sees */
        for (int base = 0; base < kKeyTile; base += groups_per_pass) {
            const int c = base + my_group;
            const bool active = c < kKeyTile && s_any[c];
            float part[kMaxRows];
#pragma unroll
            for (int r = 0; r < kMaxRows; r++)
                part[r] = 0.0f;
            if (active) {
                const int64_t kb = kvrt_k_index(&L, s_slot[c], head);
                for (int32_t d = sub * E; d < dim_k; d += lps * E) {
                    float kv[E];
                    load_row_part<DT, PACK>(op.layer.k, kb + d, kv);
                    if (op.rope_in_attention)
                        rope_key_part<DT, E>(op, L, kb, d, s_pos[c], kv);
#pragma unroll
                    for (int r = 0; r < kMaxRows; r++) {
                        if (r < R) {
                            const float *qr = q + (size_t)r * dim_k + d;
                            float qv[E];
                            load_shared<E>(qr, qv);
#pragma unroll
                            for (int e = 0; e < E; e++)
                                part[r] = fmaf(qv[e], kv[e], part[r]);
                        }
                    }
                }
            }
#pragma unroll
            for (int r = 0; r < kMaxRows; r++) {
                if (r < R) { /* R is uniform: every lane shuffles */
                    float v = part[r];
                    /* mutant 5: a sum capped at 32 lanes */
                    for (int off = (KVRT_SIM_MUTANT(5) ? min(lps, 32) : lps) / 2; off > 0; off /= 2)
                        v += KVRT_SHFL_XOR(v, off);
                    part[r] = v;
                }
            }
            if (active && sub == 0) {
#pragma unroll
                for (int r = 0; r < kMaxRows; r++) {
                    if (r < R) {
                        const float dot = part[r];
                        s_p[r][c] = op.softcap > 0.0f
                                        ? op.softcap * tanhf(dot * op.scale / op.softcap)
                                        : dot * op.scale;
                    }
                }
            }
        }
        __syncthreads();

        /* C: online softmax, one thread per row; s_p becomes the weights */
        if ((int)threadIdx.x < R) {
            const int r = threadIdx.x;
            const int64_t qpos = s_qpos[r];
            float tile_max = -INFINITY;
            for (int c = 0; c < kKeyTile; c++) {
                bool vis = s_any[c] && (op.pos == NULL || slot_visible(s_pos[c], qpos, op));
                const float s = vis ? s_p[r][c] : -INFINITY;
                if (vis && s != s)
                    s_nan[r] = 1;
                else if (s > tile_max)
                    tile_max = s;
                if (!vis)
                    s_p[r][c] = -INFINITY;
            }
            const float m_old = s_m[r];
            const float m_new = fmaxf(m_old, tile_max);
            float alpha = 1.0f, l = s_l[r];
            if (m_new > -INFINITY) {
                alpha = m_old > -INFINITY ? expf(m_old - m_new) : 0.0f;
                l *= alpha;
                for (int c = 0; c < kKeyTile; c++) {
                    const float s = s_p[r][c];
                    const float w = s == s && s > -INFINITY ? expf(s - m_new) : 0.0f;
                    s_p[r][c] = w;
                    l += w;
                }
            } else {
                for (int c = 0; c < kKeyTile; c++)
                    s_p[r][c] = 0.0f;
            }
            s_m[r] = m_new;
            s_l[r] = l;
            s_alpha[r] = alpha;
        }
        __syncthreads();

        /* D: acc = acc * alpha + sum_c w[r][c] * V[c] */
        for (int i = threadIdx.x; i < R * n_units_v; i += blockDim.x) {
            const int r = i / n_units_v, u = i - r * n_units_v;
            float *a = acc + (size_t)r * dim_v + u * E;
            const float alpha = s_alpha[r];
            float av[E];
            load_shared<E>(a, av);
#pragma unroll
            for (int e = 0; e < E; e++)
                av[e] *= alpha;
            for (int c = 0; c < kKeyTile; c++) {
                const float w = s_p[r][c];
                if (w == 0.0f)
                    continue;
                const int64_t vb = op.mla ? kvrt_k_index(&L, s_slot[c], 0)
                                          : kvrt_v_index(&L, s_slot[c], head);
                float vv[E];
                load_row_part<DT, PACK>(v_region, vb + u * E, vv);
#pragma unroll
                for (int e = 0; e < E; e++)
                    av[e] = fmaf(w, vv[e], av[e]);
            }
            store_shared<E>(a, av);
        }
        __syncthreads(); /* the tile's shared arrays are rewritten next */
    }

    /* the rows: output, or this split's partial */
    for (int i = threadIdx.x; i < R * dim_v; i += blockDim.x) {
        const int r = i / dim_v, d = i - r * dim_v;
        const int64_t row = (int64_t)(t0 + r / nh) * op.n_q_heads + h0 + r % nh;
        const float l = s_l[r];
        if (partial == NULL) {
            const float out = s_nan[r] ? NAN : l > 0.0f ? acc[i] / l : 0.0f;
            kvrt_store(op.out, op.out_dtype, row * dim_v + d, out);
        } else {
            float *pp = partial + (row * gridDim.z + blockIdx.z) * (int64_t)(dim_v + 2);
            if (d == 0) {
                pp[0] = s_m[r];
                pp[1] = s_nan[r] ? NAN : l;
            }
            pp[2 + d] = acc[i];
        }
    }
}

/* Merges the splits' partials of one (token, query head) row per CTA. */
__global__ void __launch_bounds__(128)
    attention_combine_kernel(const kvrt_attention_op op, const int n_splits,
                             const float *partial)
{
    const int64_t row = blockIdx.x;
    const int32_t dim_v = op.dim_v;
    const float *pr = partial + row * n_splits * (int64_t)(dim_v + 2);
    float m = -INFINITY;
    bool nan = false;
    for (int s = 0; s < n_splits; s++) {
        const float *pp = pr + (int64_t)s * (dim_v + 2);
        const float l = pp[1];
        if (l != l)
            nan = true;
        else if (l > 0.0f)
            m = fmaxf(m, pp[0]);
    }
    float l_total = 0.0f;
    for (int s = 0; s < n_splits; s++) {
        const float *pp = pr + (int64_t)s * (dim_v + 2);
        if (pp[1] > 0.0f)
            l_total += pp[1] * expf(pp[0] - m);
    }
    for (int32_t d = threadIdx.x; d < dim_v; d += blockDim.x) {
        float a = 0.0f;
        for (int s = 0; s < n_splits; s++) {
            const float *pp = pr + (int64_t)s * (dim_v + 2);
            if (pp[1] > 0.0f) /* mutant 4: the splits' weights wrong */
                a += pp[2 + d] * expf(KVRT_SIM_MUTANT(4) ? 0.5f * (pp[0] - m) : pp[0] - m);
        }
        const float out = nan ? NAN : l_total > 0.0f ? a / l_total : 0.0f;
        kvrt_store(op.out, op.out_dtype, row * dim_v + d, out);
    }
}

struct attn_plan {
    int tt, hpc, n_chunks, n_splits, split_slots;
    size_t shared, workspace;
    bool ok;
};

/* The tile shape, splits and workspace of an op; ws_bytes caps the
 * workspace (SIZE_MAX: as much as the best plan wants). */
attn_plan make_plan(const kvrt_attention_op *op, size_t ws_bytes)
{
    attn_plan p = {};
    const kvrt_layout L = op->layer.layout;
    const int group = op->n_q_heads / L.n_heads;
    const int n_seqs = op->n_seqs > 0 ? op->n_seqs : 1;
    const int per_seq = (op->n_tokens + n_seqs - 1) / n_seqs;
    const bool decode = per_seq <= 8;
    if (decode) {
        p.tt = 1;
        while (p.tt < per_seq)
            p.tt *= 2;
    } else {
        p.tt = group >= 2 ? 16 : 32;
    }
    p.hpc = std::min(group, kMaxRows / p.tt);
    const size_t row_bytes = ((size_t)L.dim_k + (size_t)op->dim_v) * sizeof(float);
    while ((size_t)p.tt * p.hpc * row_bytes > kSharedLimit && p.hpc > 1)
        p.hpc--;
    while ((size_t)p.tt * p.hpc * row_bytes > kSharedLimit && p.tt > 1)
        p.tt /= 2;
    p.shared = (size_t)p.tt * p.hpc * row_bytes;
    p.ok = p.shared <= kSharedLimit;
    p.n_chunks = (group + p.hpc - 1) / p.hpc;

    /* splits: enough CTAs for two waves of the device */
    p.n_splits = 1;
    p.split_slots = op->max_seq_slots > 0 ? op->max_seq_slots : 1;
    if (decode) {
        const int64_t base = (int64_t)L.n_heads * p.n_chunks * n_seqs;
        const int64_t target = 2LL * sm_count();
        int64_t splits = base >= target ? 1 : (target + base - 1) / base;
        const int64_t by_len = op->max_seq_slots / kSplitMinSlots;
        if (splits > by_len)
            splits = by_len;
        if (splits > kMaxSplits)
            splits = kMaxSplits;
        const size_t per_split = (size_t)op->n_tokens * op->n_q_heads *
                                 ((size_t)op->dim_v + 2) * sizeof(float);
        if (splits > 1 && (size_t)splits * per_split > ws_bytes)
            splits = (int64_t)(ws_bytes / per_split);
        if (splits > 1) {
            int64_t slots = (op->max_seq_slots + splits - 1) / splits;
            slots = (slots + kKeyTile - 1) / kKeyTile * kKeyTile;
            p.n_splits = (int)((op->max_seq_slots + slots - 1) / slots);
            p.split_slots = (int)slots;
            p.workspace = (size_t)p.n_splits * per_split;
        }
    }
    if (p.n_splits <= 1) {
        p.n_splits = 1;
        p.split_slots = op->max_seq_slots > 0 ? op->max_seq_slots : 1;
        p.workspace = 0;
    }
    return p;
}

template <int DT>
cudaError_t launch_dt(const kvrt_attention_op *op, const attn_plan &p, bool pack, float *ws,
                      cudaStream_t stream)
{
    const dim3 grid((unsigned)op->n_tokens, (unsigned)(op->layer.layout.n_heads * p.n_chunks),
                    (unsigned)p.n_splits);
    float *partial = p.n_splits > 1 ? ws : NULL;
    if (pack)
        KVRT_LAUNCH(grid, kAttnThreads, p.shared, stream, attention_kernel<DT, true>)(
            *op, p.tt, p.hpc, p.n_chunks, p.split_slots, partial);
    else
        KVRT_LAUNCH(grid, kAttnThreads, p.shared, stream, attention_kernel<DT, false>)(
            *op, p.tt, p.hpc, p.n_chunks, p.split_slots, partial);
    return cudaGetLastError();
}

} // namespace

extern "C" size_t KVRT_GPU_FN(attention_workspace)(const kvrt_attention_op *op)
{
    if (op->n_tokens <= 0 || op->n_q_heads <= 0 || op->layer.layout.n_heads <= 0)
        return 0;
    return make_plan(op, SIZE_MAX).workspace;
}

extern "C" cudaError_t KVRT_GPU_FN(launch_attention_ws)(const kvrt_attention_op *op,
                                                        void *stream, void *workspace,
                                                        size_t workspace_bytes)
{
    if (op->n_tokens <= 0 || op->n_q_heads <= 0)
        return cudaSuccess;
    const kvrt_layout L = op->layer.layout;
    const int64_t rows = (int64_t)op->n_tokens * op->n_q_heads;
    if (L.n_heads <= 0 || op->n_q_heads % L.n_heads != 0 || rows > 0x7fffffff)
        return cudaErrorInvalidValue;
    const attn_plan p = make_plan(op, workspace != NULL ? workspace_bytes : 0);
    if (!p.ok || (int64_t)L.n_heads * p.n_chunks > 65535)
        return cudaErrorInvalidValue;
    const void *v_region = op->mla ? op->layer.k : op->layer.v;
    const bool pack = L.dim_k % 8 == 0 && op->dim_v % 8 == 0 && aligned_to(op->layer.k, 16) &&
                      aligned_to(v_region, 16);
    cudaStream_t s = (cudaStream_t)stream;
    float *ws = (float *)workspace;
    clear_stale_error();
    cudaError_t err;
    if (L.dtype == KVRT_LAYOUT_F32)
        err = launch_dt<KVRT_LAYOUT_F32>(op, p, pack, ws, s);
    else if (L.dtype == KVRT_LAYOUT_F16)
        err = launch_dt<KVRT_LAYOUT_F16>(op, p, pack, ws, s);
    else
        err = launch_dt<KVRT_LAYOUT_BF16>(op, p, pack, ws, s);
    if (err != cudaSuccess || p.n_splits == 1)
        return err;
    KVRT_LAUNCH((unsigned)rows, 128, 0, s, attention_combine_kernel)(*op, p.n_splits, ws);
    return launch_status();
}

extern "C" cudaError_t KVRT_GPU_FN(launch_attention)(const kvrt_attention_op *op, void *stream)
{
    return KVRT_GPU_FN(launch_attention_ws)(op, stream, NULL, 0);
}

extern "C" cudaError_t KVRT_GPU_FN(launch_attention_combine)(const kvrt_attention_op *op,
                                                             int n_splits, const float *partial,
                                                             void *stream)
{
    const int64_t rows = (int64_t)op->n_tokens * op->n_q_heads;
    if (rows <= 0)
        return cudaSuccess;
    clear_stale_error();
    KVRT_LAUNCH((unsigned)rows, 128, 0, (cudaStream_t)stream, attention_combine_kernel)(
        *op, n_splits, partial);
    return launch_status();
}
