/*
 * test_attention_cpu.c: kvrt_cpu_attention against a double-precision
 * reference, on paged layouts built by hand in host memory (nothing else of
 * the library is needed).
 *
 * Each case builds a block pool with shuffled block ids, sequences with
 * holes (pos -1), gaps, shifted starts and a few out-of-order positions, an
 * empty sequence, and a ragged batch mixing prefill chunks (consecutive
 * tokens of one sequence with increasing positions), decode tokens, tokens
 * at arbitrary positions and tokens that see nothing. K/V of holes and of
 * unused slots hold NaN and unused slots carry position 0, so reading a row
 * the kernel must not read shows up as a failure; some cases also put a NaN
 * in one live K or V row, which the outputs that see it must show and the
 * others must not. The output is poisoned with NaN first and every element
 * is checked against the bound derived in check_case(); a token that sees
 * nothing must get exact zeros.
 *
 * The grid: head dims 64, 80, 96, 128, 256 and MLA 576/512; block sizes 1,
 * 16, 64; cache dtype f32, f16, bf16, q8 and fp8 (these two not for MLA:
 * rows quantized as a cache does, a scale per row, NaN codes); GQA ratios
 * 1, 4, 8, 16 (all combinations), each run twice with the rest drawn at random: window 0, 8,
 * 32; causal or not (cross, with or without positions); q dtype; out dtype f32
 * or the cache dtype; softcap on or off; scale; logit magnitude. Then long
 * contexts under several thread counts (the slot-splitting path), MLA with
 * 128 query heads, more kv heads than one unit takes, and single-key cases
 * that must reproduce V exactly for every f16 and bf16 value.
 *
 * Exit status 0 when everything passes, 1 otherwise.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../isa_check.h"
#include "attention_cpu.h"

#ifdef _OPENMP
#  include <omp.h>
#endif

/* The threads kvrt_cpu_attention may use: OpenMP's current count. */
static int max_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static int g_failures;
static long g_checked, g_zero_rows, g_nan_elems;
static double g_worst_ratio; /* largest |error| / bound seen */

/* ---- random numbers (splitmix64) ---- */

static uint64_t g_rng = 0x6b7672742d617474ull;

static uint64_t rng_next(void)
{
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static int rng_int(int n) /* [0, n) */
{
    return (int)(rng_next() % (uint64_t)n);
}

static double rng_uniform(void) /* [-1, 1) */
{
    return (double)(rng_next() >> 11) * 0x1.0p-52 - 1.0;
}

static const char *dtype_name(int dtype)
{
    return dtype == KVRT_LAYOUT_F32 ? "f32" : dtype == KVRT_LAYOUT_F16 ? "f16"
         : dtype == KVRT_LAYOUT_BF16 ? "bf16" : dtype == KVRT_LAYOUT_Q8 ? "q8" : "fp8";
}

static size_t dtype_size(int dtype)
{
    return dtype == KVRT_LAYOUT_F32 ? 4 : kvrt_dtype_quantized(dtype) ? 1 : 2;
}

/* Fills n elements of an array of `dtype` with NaN. */
static void fill_nan(void *p, int dtype, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        if (dtype == KVRT_LAYOUT_F32)
            ((float *)p)[i] = NAN;
        else if (kvrt_dtype_quantized(dtype)) /* the NaN codes */
            ((uint8_t *)p)[i] = dtype == KVRT_LAYOUT_Q8 ? 0x80u : i % 2 ? 0xffu : 0x7fu;
        else
            ((uint16_t *)p)[i] = dtype == KVRT_LAYOUT_F16 ? 0x7e00u : 0x7fc0u;
    }
}

/* ---- a case ---- */

typedef struct config {
    int   dim_k, dim_v;  /* layout; MLA: 576, 0 */
    int   out_dim;       /* op->dim_v */
    int   mla;
    int   n_kv, n_q;
    int   block_size;
    int   window, causal, use_pos;
    int   cache_dtype, q_dtype, out_dtype;
    float scale, softcap, q_mag;
    int   n_seqs;        /* sequences with slots (one empty sequence is added) */
    int   max_slots;     /* slots per sequence, at most */
    int   max_tokens;    /* tokens per sequence, at most */
    int   nan_row;       /* 1: one element of a live K or V row is NaN */
} config;

typedef struct world {
    config          cfg;
    int32_t         n_blocks;
    kvrt_layout     layout;
    void           *k, *v;
    float          *k_scale, *v_scale; /* q8/fp8: a scale per (slot, head) row */
    int32_t        *pos;          /* [n_blocks][block_size] */
    int32_t         n_seqs;       /* batch sequences, the empty one last */
    int32_t        *seq_n_slots;
    int32_t        *page_indptr, *page_indices;
    int32_t         n_tokens;
    int32_t        *tok_seq, *tok_pos;
    void           *q, *out;
} world;

static void describe(const config *c, char *buf, size_t size)
{
    snprintf(buf, size,
             "dk %d dv %d%s kv %d q %d block %d window %d causal %d pos %d cache %s q %s "
             "out %s scale %g softcap %g qmag %g%s",
             c->dim_k, c->out_dim, c->mla ? " mla" : "", c->n_kv, c->n_q, c->block_size,
             c->window, c->causal, c->use_pos, dtype_name(c->cache_dtype),
             dtype_name(c->q_dtype), dtype_name(c->out_dtype), (double)c->scale,
             (double)c->softcap, (double)c->q_mag, c->nan_row ? " nan" : "");
}

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    return p;
}

/* Positions of one sequence's used slots: a shifted start, gaps, holes and
 * a few swapped pairs (positions need not grow with the slot index). */
static void fill_positions(const config *c, int32_t *out, int32_t n)
{
    int32_t p = rng_int(4) == 0 ? 0 : rng_int(1000);
    for (int32_t i = 0; i < n; i++) {
        if (c->use_pos && rng_int(10) == 0) {
            out[i] = -1;
            continue;
        }
        out[i] = p;
        p += 1 + (rng_int(5) == 0 ? rng_int(4) : 0);
    }
    for (int swaps = n / 16; swaps > 0; swaps--) {
        int32_t a = rng_int(n), b = rng_int(n), t = out[a];
        out[a] = out[b];
        out[b] = t;
    }
}

static void world_build(world *w, const config *c)
{
    memset(w, 0, sizeof *w);
    w->cfg = *c;
    int32_t bs = c->block_size;
    w->n_seqs = c->n_seqs + 1;
    w->seq_n_slots = xcalloc((size_t)w->n_seqs, sizeof(int32_t));
    w->page_indptr = xcalloc((size_t)w->n_seqs + 1, sizeof(int32_t));
    for (int32_t s = 0; s < c->n_seqs; s++)
        w->seq_n_slots[s] = 1 + rng_int(c->max_slots);
    w->seq_n_slots[c->n_seqs] = 0; /* the empty sequence */
    for (int32_t s = 0; s < w->n_seqs; s++)
        w->page_indptr[s + 1] = w->page_indptr[s] + (w->seq_n_slots[s] + bs - 1) / bs;
    int32_t used_blocks = w->page_indptr[w->n_seqs];
    w->n_blocks = used_blocks + rng_int(4);

    /* Shuffled block ids: a sequence's blocks are scattered over the pool. */
    int32_t *perm = xcalloc((size_t)w->n_blocks, sizeof(int32_t));
    for (int32_t i = 0; i < w->n_blocks; i++)
        perm[i] = i;
    for (int32_t i = w->n_blocks - 1; i > 0; i--) {
        int32_t j = rng_int(i + 1), t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    w->page_indices = xcalloc((size_t)used_blocks, sizeof(int32_t));
    memcpy(w->page_indices, perm, (size_t)used_blocks * sizeof(int32_t));
    free(perm);

    kvrt_layout *L = &w->layout;
    L->n_heads = c->n_kv;
    L->dim_k = c->dim_k;
    L->dim_v = c->dim_v;
    L->block_size = bs;
    L->dtype = c->cache_dtype;
    L->elem_size = (int32_t)dtype_size(c->cache_dtype);
    int64_t slots_total = (int64_t)w->n_blocks * bs;
    int64_t k_elems = slots_total * c->n_kv * c->dim_k, v_elems = slots_total * c->n_kv * c->dim_v;
    w->k = xcalloc((size_t)k_elems, dtype_size(c->cache_dtype));
    w->v = xcalloc((size_t)(v_elems ? v_elems : 1), dtype_size(c->cache_dtype));
    fill_nan(w->k, c->cache_dtype, k_elems);
    fill_nan(w->v, c->cache_dtype, v_elems);
    if (kvrt_dtype_quantized(c->cache_dtype)) { /* scales of unused rows: NaN too */
        w->k_scale = xcalloc((size_t)(slots_total * c->n_kv), sizeof(float));
        w->v_scale = xcalloc((size_t)(slots_total * c->n_kv), sizeof(float));
        for (int64_t i = 0; i < slots_total * c->n_kv; i++)
            w->k_scale[i] = w->v_scale[i] = NAN;
    }
    /* Unused slots: position 0 (visible to anything) over NaN rows. */
    w->pos = xcalloc((size_t)slots_total, sizeof(int32_t));

    int32_t *seq_pos = xcalloc((size_t)c->max_slots + 1, sizeof(int32_t));
    for (int32_t s = 0; s < c->n_seqs; s++) {
        int32_t n = w->seq_n_slots[s];
        const int32_t *pages = w->page_indices + w->page_indptr[s];
        fill_positions(c, seq_pos, n);
        for (int32_t i = 0; i < n; i++) {
            int32_t slot = kvrt_page_slot(pages, bs, i);
            w->pos[slot] = seq_pos[i];
            if (seq_pos[i] < 0)
                continue; /* a hole keeps its NaN rows */
            for (int32_t h = 0; h < c->n_kv; h++) {
                int64_t ki = kvrt_k_index(L, slot, h), vi = kvrt_v_index(L, slot, h);
                if (kvrt_dtype_quantized(c->cache_dtype)) { /* quantized as a cache does */
                    float row[1024];
                    for (int32_t d = 0; d < c->dim_k; d++)
                        row[d] = (float)rng_uniform();
                    w->k_scale[kvrt_scale_index(L, slot, h)] = kvrt_quant_row(
                        (uint8_t *)w->k + ki, c->cache_dtype, row, KVRT_LAYOUT_F32, c->dim_k);
                    for (int32_t d = 0; d < c->dim_v; d++)
                        row[d] = (float)rng_uniform();
                    w->v_scale[kvrt_scale_index(L, slot, h)] = kvrt_quant_row(
                        (uint8_t *)w->v + vi, c->cache_dtype, row, KVRT_LAYOUT_F32, c->dim_v);
                    continue;
                }
                for (int32_t d = 0; d < c->dim_k; d++)
                    kvrt_store(w->k, c->cache_dtype, ki + d, (float)rng_uniform());
                for (int32_t d = 0; d < c->dim_v; d++)
                    kvrt_store(w->v, c->cache_dtype, vi + d, (float)rng_uniform());
            }
        }
    }

    /* A NaN in one live row: the outputs that see it must be NaN (in every
     * element for K, in its own element for V), the others unaffected. */
    if (c->nan_row) {
        int32_t s = rng_int(c->n_seqs), i = rng_int(w->seq_n_slots[s]);
        int32_t slot = kvrt_page_slot(w->page_indices + w->page_indptr[s], bs, i);
        int32_t h = rng_int(c->n_kv);
        if (w->pos[slot] >= 0 || !c->use_pos) {
            int v = c->dim_v > 0 && rng_int(2);
            int64_t i = v ? kvrt_v_index(L, slot, h) + rng_int(c->dim_v)
                          : kvrt_k_index(L, slot, h) + rng_int(c->dim_k);
            if (kvrt_dtype_quantized(c->cache_dtype)) /* a NaN code (e4m3: either sign) */
                ((uint8_t *)(v ? w->v : w->k))[i] =
                    c->cache_dtype == KVRT_LAYOUT_Q8 ? 0x80u : rng_int(2) ? 0xffu : 0x7fu;
            else
                kvrt_store(v ? w->v : w->k, c->cache_dtype, i, NAN);
        }
    }

    /* The batch: per sequence a prefill chunk (the positions of its last
     * live slots, in slot order), a decode token (its largest position), or
     * tokens at arbitrary positions, plus tokens that see nothing; the
     * sequences' runs are interleaved and a sequence may appear twice. */
    int32_t cap = (c->n_seqs + 1) * (c->max_tokens + 4) + 8;
    w->tok_seq = xcalloc((size_t)cap, sizeof(int32_t));
    w->tok_pos = xcalloc((size_t)cap, sizeof(int32_t));
    int32_t n_tok = 0;
    int32_t order[64];
    int32_t n_order = 0;
    for (int32_t s = 0; s < c->n_seqs && n_order < 60; s++) {
        order[n_order++] = s;
        if (rng_int(4) == 0)
            order[n_order++] = s;
    }
    order[n_order++] = c->n_seqs; /* the empty sequence */
    for (int32_t i = n_order - 1; i > 0; i--) {
        int32_t j = rng_int(i + 1), t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
    for (int32_t o = 0; o < n_order; o++) {
        int32_t s = order[o], n = w->seq_n_slots[s];
        const int32_t *pages = n ? w->page_indices + w->page_indptr[s] : NULL;
        int32_t pmin = INT32_MAX, pmax = -1;
        for (int32_t i = 0; i < n; i++) {
            int32_t p = w->pos[kvrt_page_slot(pages, bs, i)];
            if (p >= 0) {
                pmin = p < pmin ? p : pmin;
                pmax = p > pmax ? p : pmax;
            }
        }
        if (pmax < 0) { /* nothing live: any position sees nothing (with positions) */
            w->tok_seq[n_tok] = s;
            w->tok_pos[n_tok++] = rng_int(100);
            continue;
        }
        int mode = rng_int(3);
        if (mode == 0) { /* prefill chunk */
            int32_t want = 1 + rng_int(c->max_tokens), i = n - 1;
            int32_t first = n_tok;
            for (; i >= 0 && n_tok - first < want; i--) {
                int32_t p = w->pos[kvrt_page_slot(pages, bs, i)];
                if (p >= 0)
                    w->tok_pos[n_tok++] = p;
            }
            for (int32_t a = first, b = n_tok - 1; a < b; a++, b--) { /* increasing */
                int32_t t = w->tok_pos[a];
                w->tok_pos[a] = w->tok_pos[b];
                w->tok_pos[b] = t;
            }
            for (int32_t t = first; t < n_tok; t++)
                w->tok_seq[t] = s;
        } else if (mode == 1) { /* decode */
            w->tok_seq[n_tok] = s;
            w->tok_pos[n_tok++] = pmax;
        } else { /* arbitrary positions, increasing */
            int32_t m = 1 + rng_int(c->max_tokens), p = pmin - 3 + rng_int(pmax - pmin + 8);
            for (int32_t t = 0; t < m; t++) {
                w->tok_seq[n_tok] = s;
                w->tok_pos[n_tok++] = p < 0 ? 0 : p;
                p += 1 + rng_int(3);
            }
        }
        if (rng_int(3) == 0) { /* a token that sees nothing, when masking allows it */
            w->tok_seq[n_tok] = s;
            if (c->causal && pmin > 0)
                w->tok_pos[n_tok++] = pmin - 1;
            else if (c->window > 0)
                w->tok_pos[n_tok++] = pmax + c->window + rng_int(5);
            else
                w->tok_pos[n_tok++] = pmax;
        }
    }
    w->n_tokens = n_tok;
    free(seq_pos);

    int64_t q_elems = (int64_t)n_tok * c->n_q * c->dim_k;
    w->q = xcalloc((size_t)q_elems, dtype_size(c->q_dtype));
    for (int64_t i = 0; i < q_elems; i++)
        kvrt_store(w->q, c->q_dtype, i, (float)(c->q_mag * rng_uniform()));
    int64_t out_elems = (int64_t)n_tok * c->n_q * c->out_dim;
    w->out = xcalloc((size_t)out_elems, dtype_size(c->out_dtype));
}

static void world_free(world *w)
{
    free(w->k);
    free(w->v);
    free(w->k_scale);
    free(w->v_scale);
    free(w->pos);
    free(w->seq_n_slots);
    free(w->page_indptr);
    free(w->page_indices);
    free(w->tok_seq);
    free(w->tok_pos);
    free(w->q);
    free(w->out);
}

static kvrt_attention_op world_op(const world *w)
{
    const config *c = &w->cfg;
    kvrt_attention_op op;
    memset(&op, 0, sizeof op);
    op.layer.layout = w->layout;
    op.layer.k = w->k;
    op.layer.v = c->mla ? NULL : w->v;
    op.layer.k_scale = w->k_scale;
    op.layer.v_scale = c->mla ? NULL : w->v_scale;
    op.pos = c->use_pos ? w->pos : NULL;
    op.causal = c->causal;
    op.window = c->window;
    op.mla = c->mla;
    op.dim_v = c->out_dim;
    op.n_tokens = w->n_tokens;
    op.n_q_heads = c->n_q;
    op.scale = c->scale;
    op.softcap = c->softcap;
    op.q_dtype = c->q_dtype;
    op.out_dtype = c->out_dtype;
    op.q = w->q;
    op.out = w->out;
    op.tok_seq = w->tok_seq;
    op.tok_pos = w->tok_pos;
    op.page_indptr = w->page_indptr;
    op.page_indices = w->page_indices;
    op.seq_n_slots = w->seq_n_slots;
    op.n_seqs = w->n_seqs;
    op.max_seq_slots = 0;
    for (int32_t s = 0; s < w->n_seqs; s++)
        op.max_seq_slots = w->seq_n_slots[s] > op.max_seq_slots ? w->seq_n_slots[s]
                                                                 : op.max_seq_slots;
    return op;
}

/* Element i of a K or V region (row length dim) as the reference reads it:
 * q8/fp8 codes dequantized with their row's scale (kvrt_dequant), others
 * converted. */
static double kv_value(const world *w, const void *base, const float *scales, int32_t dim,
                       int64_t i)
{
    int dtype = w->cfg.cache_dtype;
    if (kvrt_dtype_quantized(dtype))
        return kvrt_dequant(base, dtype, i, scales[i / dim]);
    return kvrt_load(base, dtype, i);
}

/* Half a unit in the last place of `dtype` at magnitude x (the most that
 * rounding an f32 result into the output dtype adds). */
static double half_ulp(int dtype, double x)
{
    int bits = dtype == KVRT_LAYOUT_F32 ? 24 : dtype == KVRT_LAYOUT_F16 ? 11 : 8;
    double min_ulp = dtype == KVRT_LAYOUT_F32 ? 0x1p-149 : dtype == KVRT_LAYOUT_F16 ? 0x1p-24
                                                                                   : 0x1p-133;
    int e;
    frexp(x, &e); /* x = f * 2^e, f in [0.5, 1) */
    double ulp = ldexp(1.0, e - bits);
    return 0.5 * (ulp > min_ulp ? ulp : min_ulp);
}

/* Runs the kernel on w and checks every output element against the
 * reference. Returns the number of mismatches. */
static int check_case(world *w, const char *label)
{
    const config *c = &w->cfg;
    const kvrt_layout *L = &w->layout;
    kvrt_attention_op op = world_op(w);
    int64_t out_elems = (int64_t)w->n_tokens * c->n_q * c->out_dim;
    fill_nan(w->out, c->out_dtype, out_elems);
    kvrt_status st = kvrt_cpu_attention(&op, max_threads());
    char desc[512];
    describe(c, desc, sizeof desc);
    if (st != KVRT_OK) {
        fprintf(stderr, "FAIL %s: status %d (%s)\n", label, (int)st, desc);
        return 1;
    }

    int32_t max_n = 0;
    for (int32_t s = 0; s < w->n_seqs; s++)
        max_n = w->seq_n_slots[s] > max_n ? w->seq_n_slots[s] : max_n;
    double *logit = xcalloc((size_t)max_n + 1, sizeof(double));
    double *dot_abs = xcalloc((size_t)max_n + 1, sizeof(double));
    int32_t *vis_slot = xcalloc((size_t)max_n + 1, sizeof(int32_t));
    double *o = xcalloc((size_t)c->out_dim, sizeof(double));
    double *mag = xcalloc((size_t)c->out_dim, sizeof(double));
    const double u = 0x1p-24;
    int bad = 0;

    for (int32_t t = 0; t < w->n_tokens; t++) {
        int32_t s = w->tok_seq[t];
        int64_t qp = w->tok_pos[t];
        const int32_t *pages = w->page_indices + w->page_indptr[s];
        int32_t nv = 0;
        for (int32_t i = 0; i < w->seq_n_slots[s]; i++) {
            int32_t slot = kvrt_page_slot(pages, c->block_size, i);
            if (c->use_pos) {
                int64_t p = w->pos[slot];
                if (p < 0 || (c->causal && p > qp) || (c->window > 0 && p <= qp - c->window))
                    continue;
            }
            vis_slot[nv++] = slot;
        }
        for (int32_t h = 0; h < c->n_q; h++) {
            int32_t kvh = h / (c->n_q / c->n_kv);
            int64_t qi = ((int64_t)t * c->n_q + h) * c->dim_k;
            double smax = -INFINITY, s_abs = 0, dot_abs_max = 0;
            for (int32_t j = 0; j < nv; j++) {
                int64_t ki = kvrt_k_index(L, vis_slot[j], kvh);
                double dot = 0, da = 0;
                for (int32_t d = 0; d < c->dim_k; d++) {
                    double a = kvrt_load(w->q, c->q_dtype, qi + d);
                    double b = kv_value(w, w->k, w->k_scale, c->dim_k, ki + d);
                    dot += a * b;
                    da += fabs(a * b);
                }
                double sc = (double)c->scale * dot;
                if (c->softcap > 0)
                    sc = c->softcap * tanh(sc / c->softcap);
                logit[j] = sc;
                dot_abs[j] = da;
                smax = sc > smax ? sc : smax;
                s_abs = fabs(sc) > s_abs ? fabs(sc) : s_abs;
                dot_abs_max = da > dot_abs_max ? da : dot_abs_max;
            }
            double l = 0;
            for (int32_t d = 0; d < c->out_dim; d++)
                o[d] = mag[d] = 0;
            for (int32_t j = 0; j < nv; j++) {
                double p = exp(logit[j] - smax);
                const void *vbase = c->mla ? w->k : w->v;
                int64_t vi = c->mla ? kvrt_k_index(L, vis_slot[j], kvh)
                                    : kvrt_v_index(L, vis_slot[j], kvh);
                l += p;
                for (int32_t d = 0; d < c->out_dim; d++) {
                    double v = c->mla ? kv_value(w, vbase, w->k_scale, c->dim_k, vi + d)
                                      : kv_value(w, vbase, w->v_scale, c->dim_v, vi + d);
                    o[d] += p * v;
                    mag[d] += p * fabs(v);
                }
            }
            /*
             * The bound, per output element, with u = 2^-24 (f32 rounding):
             *   logit error D <= |scale| (dk / 8 + 12) u sum_i |q_i k_i|   (the
             *       kernel sums the dk products of a dot in 8 partial sums of
             *       dk / 8 terms, the remainder (< 8 terms) into one of them, then
             *       adds them pairwise (3 roundings); then the scale product)
             *     + 4 u max|s| + 4 u softcap                         (s / c, tanhf
             *       within 2 ulp, c * tanh)
             *   a weight p_j = e^(s_j - m) then has relative error
             *   E_p <= 2 D (s_j and m) + 2 u max|s| (the subtraction) + 3 u (the
             *       polynomial exp, within 2 ulp, and its scaling);
             *   merging splits weighs each split by e^(m_i - m), an error of the
             *       same kind, already inside E_p;
             *   o = sum p_j v_j / sum p_j moves by at most
             *       E_p * sum p_j |v_j - o| / sum p_j <= 2 E_p A, where
             *       A = sum p_j |v_j| / sum p_j (the magnitudes);
             *   f32 accumulation over n keys: (n + 16) u A for sum p v, the same
             *       relative error for sum p (times |o| <= A), one rounding of
             *       the rescalings per chunk (at most n) and of the division:
             *       3 (n + 16) u A together.
             * So |o - o_ref| <= A (2 E_p + 3 (n + 16) u), doubled for the
             * second-order terms left out, plus half an ulp of the output dtype
             * at |o_ref| + that (the final rounding). The reference uses the same
             * stored q, K, V, so input rounding is not part of the error.
             * q8/fp8: the reference reads k = fl(code * scale); the direct
             * copies compute scale * sum q code and fold a V row's scale into
             * its weight, fl(p * scale). Each differs from the reference's
             * product by at most 2 u of it (the dequantizing rounding and the
             * scale's), so D gains 2 u |scale| sum |q k| and the sum p v
             * 2 u A: qx below.
             */
            const int qx = kvrt_dtype_quantized(c->cache_dtype) ? 2 : 0;
            double D = fabs((double)c->scale) * (c->dim_k / 8 + 12 + qx) * u * dot_abs_max +
                       4 * u * s_abs + 4 * u * (double)c->softcap;
            double E_p = 2 * D + 2 * u * s_abs + 3 * u;
            int64_t oi = ((int64_t)t * c->n_q + h) * c->out_dim;
            for (int32_t d = 0; d < c->out_dim; d++) {
                double got = kvrt_load(w->out, c->out_dtype, oi + d);
                g_checked++;
                if (nv == 0) { /* no visible key: exactly zero */
                    if (d == 0)
                        g_zero_rows++;
                    if (!(got == 0.0)) {
                        if (bad < 5)
                            fprintf(stderr,
                                    "FAIL %s: token %d (seq %d pos %lld) head %d dim %d: "
                                    "sees nothing, got %g (%s)\n",
                                    label, t, s, (long long)qp, h, d, got, desc);
                        bad++;
                    }
                    continue;
                }
                double ref = o[d] / l, A = mag[d] / l;
                if (isnan(ref)) { /* it sees a NaN: the output must say so */
                    g_nan_elems++;
                    if (!isnan(got)) {
                        if (bad < 5)
                            fprintf(stderr,
                                    "FAIL %s: token %d head %d dim %d sees a NaN, got %g (%s)\n",
                                    label, t, h, d, got, desc);
                        bad++;
                    }
                    continue;
                }
                double bound = 2 * A * (2 * E_p + (3 * (nv + 16) + qx) * u);
                bound += half_ulp(c->out_dtype, fabs(ref) + bound) + 1e-300;
                double err = fabs(got - ref);
                if (!(err <= bound)) { /* also catches NaN: an element not written */
                    if (bad < 5)
                        fprintf(stderr,
                                "FAIL %s: token %d (seq %d pos %lld, %d keys) head %d dim %d: "
                                "got %.9g want %.9g err %.3g bound %.3g (%s)\n",
                                label, t, s, (long long)qp, nv, h, d, got, ref, err, bound,
                                desc);
                    bad++;
                } else if (err / bound > g_worst_ratio) {
                    g_worst_ratio = err / bound;
                }
            }
        }
    }
    free(logit);
    free(dot_abs);
    free(vis_slot);
    free(o);
    free(mag);
    if (bad)
        fprintf(stderr, "FAIL %s: %d mismatches of %lld elements\n", label, bad,
                (long long)out_elems);
    return bad;
}

/* Draws the settings the grid does not enumerate. */
static void draw_rest(config *c)
{
    static const int windows[] = {0, 8, 32};
    c->window = windows[rng_int(3)];
    c->causal = rng_int(4) != 0;
    c->use_pos = c->causal ? 1 : rng_int(2); /* not causal: cross (no positions) or not */
    c->q_dtype = rng_int(3);
    c->out_dtype = rng_int(2) ? KVRT_LAYOUT_F32
                 : kvrt_dtype_quantized(c->cache_dtype) ? 1 + rng_int(2) : c->cache_dtype;
    c->softcap = rng_int(2) ? 0.0f : (rng_int(2) ? 30.0f : 2.5f);
    c->scale = rng_int(2) ? (float)(1.0 / sqrt((double)c->dim_k))
                          : (float)(0.02 + 0.3 * fabs(rng_uniform()));
    c->q_mag = rng_int(2) ? 1.0f : 4.0f;
    c->nan_row = rng_int(8) == 0;
}

static void run(const config *c, const char *label)
{
    world w;
    world_build(&w, c);
    if (check_case(&w, label))
        g_failures++;
    world_free(&w);
}

static void test_grid(void)
{
    static const int dims[] = {64, 80, 96, 128, 256, 576};
    static const int blocks[] = {1, 16, 64};
    static const int ratios[] = {1, 4, 8, 16};
    int cases = 0;
    for (int di = 0; di < 6; di++)
        for (int bi = 0; bi < 3; bi++)
            for (int dt = 0; dt < 5; dt++) /* f32, f16, bf16, q8, fp8 (not MLA) */
                for (int ri = 0; ri < 4; ri++)
                    for (int rep = 0; rep < 2 && !(dt >= 3 && dims[di] == 576); rep++) {
                        config c;
                        memset(&c, 0, sizeof c);
                        c.mla = dims[di] == 576;
                        c.dim_k = dims[di];
                        c.dim_v = c.mla ? 0 : dims[di];
                        c.out_dim = c.mla ? 512 : dims[di];
                        c.n_kv = c.mla ? 1 : 1 + rng_int(3);
                        c.n_q = ratios[ri] * c.n_kv;
                        c.block_size = blocks[bi];
                        c.cache_dtype = dt;
                        draw_rest(&c);
                        c.n_seqs = 1 + rng_int(4);
                        c.max_slots = c.mla ? 120 : 60 + rng_int(200);
                        c.max_tokens = 1 + rng_int(12);
                        char label[64];
                        snprintf(label, sizeof label, "grid %d", cases++);
                        run(&c, label);
                    }
    printf("grid: %d cases\n", cases);
}

/* Long contexts with few tokens, under several thread counts: the path that
 * splits a sequence's slots among threads and merges the partial results. */
static void test_long_context(void)
{
    int cases = 0;
#ifdef _OPENMP
    int saved = omp_get_max_threads();
    static const int threads[] = {1, 2, 3, 4};
    int n_threads = 4;
#else
    int n_threads = 1;
#endif
    for (int ti = 0; ti < n_threads; ti++) {
#ifdef _OPENMP
        omp_set_num_threads(threads[ti]);
#endif
        for (int rep = 0; rep < 6; rep++) {
            config c;
            memset(&c, 0, sizeof c);
            c.mla = rep == 5;
            c.dim_k = c.mla ? 576 : (rep % 2 ? 128 : 64);
            c.dim_v = c.mla ? 0 : c.dim_k;
            c.out_dim = c.mla ? 512 : c.dim_k;
            c.n_kv = c.mla ? 1 : 1 + rep % 2;
            c.n_q = c.n_kv * (c.mla ? 8 : 4);
            c.block_size = rep % 3 == 0 ? 16 : rep % 3 == 1 ? 64 : 1;
            c.cache_dtype = c.mla ? KVRT_LAYOUT_BF16 : rep; /* f32 .. fp8 */
            draw_rest(&c);
            c.n_seqs = 1 + rng_int(2);
            c.max_slots = 1500 + rng_int(3000);
            c.max_tokens = 1 + rng_int(2);
            char label[64];
            snprintf(label, sizeof label, "long %d", cases++);
            run(&c, label);
        }
    }
#ifdef _OPENMP
    omp_set_num_threads(saved);
#endif
    printf("long contexts: %d cases\n", cases);
}

/* MLA with 128 query heads: more heads than one unit holds. */
static void test_mla_many_heads(void)
{
    for (int rep = 0; rep < 3; rep++) {
        config c;
        memset(&c, 0, sizeof c);
        c.mla = 1;
        c.dim_k = 576;
        c.dim_v = 0;
        c.out_dim = 512;
        c.n_kv = 1;
        c.n_q = 128;
        c.block_size = 64;
        c.cache_dtype = rep;
        draw_rest(&c);
        c.n_seqs = 2;
        c.max_slots = 200;
        c.max_tokens = 3;
        char label[64];
        snprintf(label, sizeof label, "mla128 %d", rep);
        run(&c, label);
    }
    printf("mla 128 heads: 3 cases\n");
}

/* More kv heads than one unit takes (units then cover a part of a token's
 * kv heads, the last one fewer). */
static void test_many_kv_heads(void)
{
    static const int shapes[][3] = {{40, 4, 256}, {9, 16, 256}, {17, 8, 128}};
    for (int i = 0; i < 3; i++) {
        config c;
        memset(&c, 0, sizeof c);
        c.n_kv = shapes[i][0];
        c.n_q = shapes[i][0] * shapes[i][1];
        c.dim_k = c.dim_v = c.out_dim = shapes[i][2];
        c.block_size = 16;
        c.cache_dtype = i;
        draw_rest(&c);
        c.n_seqs = 2;
        c.max_slots = 70;
        c.max_tokens = 3;
        char label[64];
        snprintf(label, sizeof label, "many kv heads %d", i);
        run(&c, label);
    }
    printf("many kv heads: 3 cases\n");
}

/* Head dims that are not multiples of 16 (the vector kernels' masked
 * tails), K and V of different widths, and query heads per kv head that
 * leave a partial block of rows (2, 3, 5, 6, 7). */
static void test_odd_shapes(void)
{
    static const int dims_k[] = {8, 40, 72, 100, 136, 200}, dims_v[] = {8, 24, 72, 100, 130, 200};
    static const int ratios[] = {1, 2, 3, 5, 6, 7};
    int cases = 0;
    for (int i = 0; i < 6; i++)
        for (int j = 0; j < 6; j++) {
            config c;
            memset(&c, 0, sizeof c);
            c.dim_k = dims_k[i];
            c.dim_v = c.out_dim = dims_v[(i + j) % 6];
            c.n_kv = 1 + rng_int(3);
            c.n_q = ratios[j] * c.n_kv;
            c.block_size = rng_int(2) ? 16 : 1 + rng_int(20);
            c.cache_dtype = rng_int(3);
            draw_rest(&c);
            c.n_seqs = 1 + rng_int(3);
            c.max_slots = 20 + rng_int(150);
            c.max_tokens = 1 + rng_int(10);
            char label[64];
            snprintf(label, sizeof label, "odd shape %d", cases++);
            run(&c, label);
        }
    printf("odd shapes: %d cases\n", cases);
}

/* One visible key: the weight is exactly 1, so the output must equal V
 * exactly, for every finite f16 and bf16 value (and the conversion to f32
 * that feeds the f32 output). Checks the kernel's own element conversion. */
static void test_single_key_exact(void)
{
    for (int dtype = KVRT_LAYOUT_F16; dtype <= KVRT_LAYOUT_BF16; dtype++)
        for (int out_f32 = 0; out_f32 < 2; out_f32++) {
            const int32_t dim = 1024, n_seqs = 65536 / dim, bs = 4;
            kvrt_layout L = {1, 8, dim, bs, 0, 0, dtype, 2};
            uint16_t *k = xcalloc((size_t)n_seqs * bs * 8, 2);
            uint16_t *v = xcalloc((size_t)n_seqs * bs * dim, 2);
            int32_t *pos = xcalloc((size_t)n_seqs * bs, sizeof(int32_t));
            int32_t *indptr = xcalloc((size_t)n_seqs + 1, sizeof(int32_t));
            int32_t *indices = xcalloc((size_t)n_seqs, sizeof(int32_t));
            int32_t *n_slots = xcalloc((size_t)n_seqs, sizeof(int32_t));
            int32_t *tok_seq = xcalloc((size_t)n_seqs, sizeof(int32_t));
            int32_t *tok_pos = xcalloc((size_t)n_seqs, sizeof(int32_t));
            uint16_t *q = xcalloc((size_t)n_seqs * 8, 2);
            void *out = xcalloc((size_t)n_seqs * dim, 4);
            fill_nan(k, dtype, (int64_t)n_seqs * bs * 8);
            fill_nan(v, dtype, (int64_t)n_seqs * bs * dim);
            for (int32_t s = 0; s < n_seqs; s++) {
                int32_t block = n_seqs - 1 - s, slot = block * bs;
                indptr[s + 1] = s + 1;
                indices[s] = block;
                n_slots[s] = 1;
                tok_seq[s] = s;
                tok_pos[s] = 7;
                pos[slot] = 7;
                for (int32_t d = 0; d < 8; d++) {
                    kvrt_store(k, dtype, kvrt_k_index(&L, slot, 0) + d, 0.25f);
                    kvrt_store(q, dtype, (int64_t)s * 8 + d, 0.5f);
                }
                for (int32_t d = 0; d < dim; d++) {
                    uint16_t bits = (uint16_t)(s * dim + d);
                    if (kvrt_load(&bits, dtype, 0) != kvrt_load(&bits, dtype, 0))
                        bits = 0x3c00; /* NaN: not a value to average */
                    v[kvrt_v_index(&L, slot, 0) + d] = bits;
                }
            }
            kvrt_attention_op op;
            memset(&op, 0, sizeof op);
            op.layer.layout = L;
            op.layer.k = k;
            op.layer.v = v;
            op.pos = pos;
            op.causal = 1;
            op.dim_v = dim;
            op.n_tokens = n_seqs;
            op.n_q_heads = 1;
            op.scale = 1.0f;
            op.q_dtype = dtype;
            op.out_dtype = out_f32 ? KVRT_LAYOUT_F32 : dtype;
            op.q = q;
            op.out = out;
            op.tok_seq = tok_seq;
            op.tok_pos = tok_pos;
            op.page_indptr = indptr;
            op.page_indices = indices;
            op.seq_n_slots = n_slots;
            op.n_seqs = n_seqs;
            op.max_seq_slots = 1;
            fill_nan(out, op.out_dtype, (int64_t)n_seqs * dim);
            int bad = kvrt_cpu_attention(&op, max_threads()) != KVRT_OK;
            for (int32_t s = 0; s < n_seqs && !bad; s++)
                for (int32_t d = 0; d < dim; d++) {
                    int32_t slot = (n_seqs - 1 - s) * bs;
                    uint16_t want = v[kvrt_v_index(&L, slot, 0) + d];
                    int ok;
                    if (out_f32) { /* the same value; -0 may come out as +0 */
                        ok = ((float *)out)[(int64_t)s * dim + d] == kvrt_load(&want, dtype, 0);
                    } else {
                        uint16_t got = ((uint16_t *)out)[(int64_t)s * dim + d];
                        ok = got == want || (want == 0x8000u && got == 0);
                    }
                    if (!ok) {
                        fprintf(stderr, "FAIL single key %s out %s: value 0x%04x not reproduced\n",
                                dtype_name(dtype), out_f32 ? "f32" : dtype_name(dtype), want);
                        bad = 1;
                        break;
                    }
                }
            if (bad)
                g_failures++;
            free(k);
            free(v);
            free(pos);
            free(indptr);
            free(indices);
            free(n_slots);
            free(tok_seq);
            free(tok_pos);
            free(q);
            free(out);
        }
    printf("single key: every f16 and bf16 value reproduced\n");
}

int main(void)
{
    int isa = test_isa_check("test_attention_cpu");
    if (isa != 0)
        return isa;
    test_single_key_exact();
    test_grid();
    test_mla_many_heads();
    test_many_kv_heads();
    test_odd_shapes();
    test_long_context();
    printf("%ld elements checked, %ld rows that see nothing, %ld elements that see a NaN, "
           "worst error / bound %.3g\n",
           g_checked, g_zero_rows, g_nan_elems, g_worst_ratio);
    if (g_zero_rows == 0 || g_nan_elems == 0) {
        fprintf(stderr, "FAIL: the cases did not cover tokens that see nothing or a NaN\n");
        g_failures++;
    }
    if (g_failures) {
        fprintf(stderr, "%d case(s) failed\n", g_failures);
        return 1;
    }
    printf("attention: all passed\n");
    return 0;
}
