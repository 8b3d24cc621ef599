/*
 * ref.c: the reference model of a kvrt cache (see ref.h). Every operation is
 * the obvious loop over a sorted token list; nothing here knows about
 * blocks, slots or sharing.
 */
#include "ref.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvrt_layout.h"

typedef struct ref_seq {
    ref_token *tokens;  /* sorted by pos */
    int64_t    n, cap;
    uint8_t    salt[KVRT_PREFIX_SALT_MAX];  /* of the last ref_attach_prefix */
    int        salt_len;
} ref_seq;

/* A row recorded for prefix caching: positions 0..pos of a sequence held
 * declared tokens, digested with its salt. */
typedef struct ref_record {
    uint64_t digest;
    double  *data;      /* [row_elems] */
    uint8_t *written;   /* [n_layers] */
} ref_record;

typedef struct ref_cross {
    int     n;
    double *k;          /* [n][heads][dk] */
    double *v;          /* [n][heads][dv] */
} ref_cross;

struct ref_model {
    kvrt_cache_desc  desc;
    kvrt_layer_desc *layers;
    int              n_layers;
    int64_t         *offset;     /* [n_layers] offset of a self layer's row in token data */
    int64_t          row_elems;  /* all self layers */
    ref_seq         *seqs;       /* [max_seqs] */
    ref_cross       *cross;      /* [n_layers][max_seqs] */
    ref_policy       policy;
    ref_record      *records;    /* prefix caching */
    int64_t          n_records, cap_records;
};

/* ---- small helpers ---- */

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        abort(); /* a test helper: running out of host memory ends the test */
    return p;
}

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p)
        abort();
    return p;
}

static int seq_valid(const ref_model *m, int32_t seq)
{
    return seq >= 0 && seq < m->desc.max_seqs;
}

static int layer_valid(const ref_model *m, int layer)
{
    return layer >= 0 && layer < m->n_layers;
}

static int layer_is_self(const ref_model *m, int layer)
{
    return m->layers[layer].kind != KVRT_LAYER_CROSS;
}

/* [lo, hi) of positions a range covers (positions are never negative). */
static void range_bounds(int32_t p0, int32_t p1, int64_t *lo, int64_t *hi)
{
    *lo = p0 < 0 ? 0 : p0;
    *hi = p1 < 0 ? INT64_MAX : p1;
}

static int in_range(int32_t pos, int64_t lo, int64_t hi)
{
    return pos >= lo && pos < hi;
}

/* Adds `error` to `set` for an open reading, or replaces the set by it. */
static ref_status_set open_case_as(int reading, ref_status_set set, kvrt_status error)
{
    if (reading == REF_OPEN_OK)
        return set;
    if (reading == REF_OPEN_ERROR)
        return REF_BIT(error);
    return set | REF_BIT(error);
}

static ref_status_set open_case(int reading, ref_status_set set)
{
    return open_case_as(reading, set, KVRT_ERR_INVALID_ARG);
}

/* Statuses allowed by the open readings of a range. */
static ref_status_set range_open(const ref_model *m, int32_t p0, int32_t p1, ref_status_set set)
{
    if (p0 < 0)
        set = open_case(m->policy.range_p0_negative, set);
    if (p1 >= 0 && p0 > p1)
        set = open_case(m->policy.range_reversed, set);
    return set;
}

static void token_free(ref_token *t)
{
    free(t->data);
    free(t->rotations);
    free(t->written);
    t->data = NULL;
    t->rotations = NULL;
    t->written = NULL;
}

static ref_token token_new(const ref_model *m, int32_t pos)
{
    ref_token t;
    t.pos = pos;
    t.data = xcalloc((size_t)m->row_elems, sizeof(double));
    t.rotations = xcalloc((size_t)m->n_layers, sizeof(int32_t));
    t.written = xcalloc((size_t)m->n_layers, sizeof(uint8_t));
    t.token = -1;
    return t;
}

static ref_token token_copy(const ref_model *m, const ref_token *src)
{
    ref_token t = token_new(m, src->pos);
    memcpy(t.data, src->data, (size_t)m->row_elems * sizeof(double));
    memcpy(t.rotations, src->rotations, (size_t)m->n_layers * sizeof(int32_t));
    memcpy(t.written, src->written, (size_t)m->n_layers);
    t.token = src->token;
    return t;
}

static void seq_reserve(ref_seq *s, int64_t need)
{
    if (need <= s->cap)
        return;
    int64_t cap = s->cap ? s->cap : 16;
    while (cap < need)
        cap *= 2;
    ref_token *p = realloc(s->tokens, (size_t)cap * sizeof(ref_token));
    if (!p)
        abort();
    s->tokens = p;
    s->cap = cap;
}

/* Index of the first token with position >= pos. */
static int64_t seq_lower_bound(const ref_seq *s, int32_t pos)
{
    int64_t lo = 0, hi = s->n;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (s->tokens[mid].pos < pos)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static ref_token *seq_find(const ref_seq *s, int32_t pos)
{
    int64_t i = seq_lower_bound(s, pos);
    return i < s->n && s->tokens[i].pos == pos ? &s->tokens[i] : NULL;
}

static void seq_insert(ref_seq *s, ref_token t)
{
    seq_reserve(s, s->n + 1);
    int64_t i = seq_lower_bound(s, t.pos);
    memmove(&s->tokens[i + 1], &s->tokens[i], (size_t)(s->n - i) * sizeof(ref_token));
    s->tokens[i] = t;
    s->n++;
}

static int token_cmp(const void *a, const void *b)
{
    int32_t pa = ((const ref_token *)a)->pos, pb = ((const ref_token *)b)->pos;
    return (pa > pb) - (pa < pb);
}

static void seq_sort(ref_seq *s)
{
    if (s->n > 1)
        qsort(s->tokens, (size_t)s->n, sizeof(ref_token), token_cmp);
}

static void seq_clear(ref_seq *s)
{
    for (int64_t i = 0; i < s->n; i++)
        token_free(&s->tokens[i]);
    s->n = 0;
}

static ref_cross *cross_of(const ref_model *m, int layer, int32_t seq)
{
    return &m->cross[(int64_t)layer * m->desc.max_seqs + seq];
}

static void cross_drop(ref_cross *c)
{
    free(c->k);
    free(c->v);
    c->k = c->v = NULL;
    c->n = 0;
}

static void seq_drop_cross(ref_model *m, int32_t seq)
{
    for (int l = 0; l < m->n_layers; l++)
        if (m->layers[l].kind == KVRT_LAYER_CROSS)
            cross_drop(cross_of(m, l, seq));
}

/* ---- dtype helpers ---- */

double ref_load(const void *base, kvrt_dtype dtype, int64_t i)
{
    return (double)kvrt_load(base, (int32_t)dtype, i);
}

double ref_round(double f, kvrt_dtype dtype)
{
    float x = (float)f;
    switch (dtype) {
    case KVRT_F16:
        return (double)kvrt_f16_to_f32(kvrt_f32_to_f16(x));
    case KVRT_BF16:
        return (double)kvrt_bf16_to_f32(kvrt_f32_to_bf16(x));
    default: /* f32; quantized dtypes round whole rows (store_rows) */
        return (double)x;
    }
}

void ref_store(void *base, kvrt_dtype dtype, int64_t i, double f)
{
    kvrt_store(base, (int32_t)dtype, i, (float)f);
}

/* ---- quantized rows, as docs/layouts.md describes them ----
 * Written from the description, not from kvrt_layout.h: the e4m3fn value of
 * a code is taken from its bits, and rounding picks the nearest of all 127
 * non-negative finite codes (ties to the even code). */

double ref_e4m3_value(uint8_t code)
{
    int e = (code >> 3) & 15, mant = code & 7;
    double v;
    if (e == 15 && mant == 7)
        v = NAN;
    else if (e == 0)
        v = ldexp(mant / 8.0, -6);
    else
        v = ldexp(1.0 + mant / 8.0, e - 7);
    return (code & 0x80) ? -v : v;
}

/* The e4m3fn code of x (finite): nearest, ties to even, saturating at 448. */
static uint8_t e4m3_code(float x)
{
    static double value[127]; /* of the non-negative finite codes, increasing */
    if (value[126] == 0)
        for (int c = 0; c <= 126; c++)
            value[c] = ref_e4m3_value((uint8_t)c);
    double a = fabs((double)x);
    int lo = 0, hi = 126; /* the last code whose value is <= a, then it or the next */
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (value[mid] <= a)
            lo = mid;
        else
            hi = mid - 1;
    }
    int best = lo;
    if (lo < 126) {
        double below = a - value[lo], above = value[lo + 1] - a;
        if (above < below || (above == below && ((lo + 1) & 1) == 0))
            best = lo + 1;
    }
    return (uint8_t)(best | (signbit(x) ? 0x80 : 0));
}

float ref_quantize_row(kvrt_dtype dtype, const float *x, int64_t n, uint8_t *code)
{
    float amax = 0.0f;
    for (int64_t i = 0; i < n; i++)
        if (isfinite(x[i]) && fabsf(x[i]) > amax)
            amax = fabsf(x[i]);
    const float top = dtype == KVRT_Q8 ? 127.0f : 448.0f;
    float s = amax / top;
    if (isinf(top * s)) /* near FLT_MAX: the largest code must read back finite */
        s = nextafterf(s, 0.0f);
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(x[i])) {
            code[i] = dtype == KVRT_Q8 ? 0x80 : (uint8_t)(0x7f | (signbit(x[i]) ? 0x80 : 0));
            continue;
        }
        if (s == 0.0f) {
            code[i] = 0;
            continue;
        }
        float y = x[i] / s;
        if (dtype == KVRT_Q8) {
            double q = nearbyint((double)y); /* the default rounding: to nearest even */
            q = q > 127 ? 127 : q < -127 ? -127 : q;
            code[i] = (uint8_t)(int8_t)q;
        } else {
            code[i] = e4m3_code(y);
        }
    }
    return s;
}

double ref_dequantize(kvrt_dtype dtype, uint8_t code, float scale)
{
    if (dtype == KVRT_Q8)
        return code == 0x80 ? NAN : (double)((float)(int8_t)code * scale);
    return (double)((float)ref_e4m3_value(code) * scale);
}

/* Written from the description in docs/layouts.md: the byte offsets are
 * computed here, not taken from kvrt_layout.h. */
int64_t ref_mla_fp8_row(const float *x, int32_t latent_dim, int32_t rope_dim, uint8_t *row)
{
    int32_t groups = latent_dim / 128;
    int64_t scale_bytes = (4 * groups + 15) / 16 * 16, rope_bytes = (2 * rope_dim + 15) / 16 * 16;
    int64_t rope_off = latent_dim + scale_bytes, row_bytes = rope_off + rope_bytes;
    memset(row, 0, (size_t)row_bytes);
    for (int32_t g = 0; g < groups; g++) {
        float s = ref_quantize_row(KVRT_FP8_E4M3, x + 128 * g, 128, row + 128 * g);
        memcpy(row + latent_dim + 4 * g, &s, 4);
    }
    for (int32_t i = 0; i < rope_dim; i++) {
        uint16_t b = kvrt_f32_to_bf16(x[latent_dim + i]);
        memcpy(row + rope_off + 2 * i, &b, 2);
    }
    return row_bytes;
}

double ref_mla_fp8_value(const uint8_t *row, int32_t latent_dim, int64_t i)
{
    if (i < latent_dim) {
        float s;
        memcpy(&s, row + latent_dim + 4 * (i / 128), 4);
        return ref_dequantize(KVRT_FP8_E4M3, row[i], s);
    }
    int64_t rope_off = latent_dim + (4 * (latent_dim / 128) + 15) / 16 * 16;
    uint16_t b;
    memcpy(&b, row + rope_off + 2 * (i - latent_dim), 2);
    return (double)kvrt_bf16_to_f32(b);
}

/* Each of n_rows rows of len values of x (f32) as the cache holds them:
 * quantized and read back. */
static void quantize_rows(kvrt_dtype dtype, double *x, int64_t n_rows, int64_t len)
{
    float row[1024];
    uint8_t code[1024];
    for (int64_t r = 0; r < n_rows; r++) {
        double *xr = x + r * len;
        for (int64_t e = 0; e < len; e++)
            row[e] = (float)xr[e];
        float s = ref_quantize_row(dtype, row, len, code);
        for (int64_t e = 0; e < len; e++)
            xr[e] = ref_dequantize(dtype, code[e], s);
    }
}

/* A layer's K (then V) values of one token, just converted to f32, as the
 * cache stores them: quantized per head row in q8/fp8 caches (the rounding
 * to f16/bf16/f32 happened already). */
static void store_rows(const ref_model *m, const kvrt_layer_desc *L, double *k, double *v)
{
    if (m->desc.dtype != KVRT_Q8 && m->desc.dtype != KVRT_FP8_E4M3)
        return;
    quantize_rows(m->desc.dtype, k, L->n_kv_heads, L->head_dim_k);
    if (v != NULL)
        quantize_rows(m->desc.dtype, v, L->n_kv_heads, L->head_dim_v);
}

/* ---- creation ---- */

static int64_t layer_k_elems(const kvrt_layer_desc *L)
{
    if (L->kind == KVRT_LAYER_MLA)
        return (int64_t)L->latent_dim + L->rope_dim;
    return (int64_t)L->n_kv_heads * L->head_dim_k;
}

static int64_t layer_v_elems(const kvrt_layer_desc *L)
{
    if (L->kind == KVRT_LAYER_MLA)
        return 0;
    return (int64_t)L->n_kv_heads * L->head_dim_v;
}

ref_model *ref_create(const kvrt_cache_desc *desc)
{
    if (!desc || desc->n_layers < 1 || !desc->layers || desc->max_seqs < 1)
        return NULL;
    ref_model *m = xcalloc(1, sizeof(*m));
    m->desc = *desc;
    m->n_layers = desc->n_layers;
    m->layers = xmalloc((size_t)m->n_layers * sizeof(kvrt_layer_desc));
    memcpy(m->layers, desc->layers, (size_t)m->n_layers * sizeof(kvrt_layer_desc));
    m->desc.layers = m->layers;
    m->offset = xcalloc((size_t)m->n_layers, sizeof(int64_t));
    for (int l = 0; l < m->n_layers; l++) {
        m->offset[l] = m->row_elems;
        if (layer_is_self(m, l))
            m->row_elems += layer_k_elems(&m->layers[l]) + layer_v_elems(&m->layers[l]);
    }
    m->seqs = xcalloc((size_t)desc->max_seqs, sizeof(ref_seq));
    m->cross = xcalloc((size_t)m->n_layers * desc->max_seqs, sizeof(ref_cross));
    return m;
}

void ref_destroy(ref_model *m)
{
    if (!m)
        return;
    for (int s = 0; s < m->desc.max_seqs; s++) {
        seq_clear(&m->seqs[s]);
        free(m->seqs[s].tokens);
    }
    for (int64_t i = 0; i < (int64_t)m->n_layers * m->desc.max_seqs; i++)
        cross_drop(&m->cross[i]);
    for (int64_t i = 0; i < m->n_records; i++) {
        free(m->records[i].data);
        free(m->records[i].written);
    }
    free(m->records);
    free(m->seqs);
    free(m->cross);
    free(m->offset);
    free(m->layers);
    free(m);
}

static void cross_copy(ref_cross *dst, const ref_cross *src, const kvrt_layer_desc *L)
{
    cross_drop(dst);
    if (src->n == 0)
        return;
    size_t nk = (size_t)src->n * layer_k_elems(L), nv = (size_t)src->n * layer_v_elems(L);
    dst->k = xmalloc(nk * sizeof(double));
    dst->v = xmalloc(nv * sizeof(double));
    memcpy(dst->k, src->k, nk * sizeof(double));
    memcpy(dst->v, src->v, nv * sizeof(double));
    dst->n = src->n;
}

ref_model *ref_clone(const ref_model *m)
{
    ref_model *c = ref_create(&m->desc);
    c->policy = m->policy;
    c->records = xcalloc((size_t)m->n_records, sizeof(ref_record));
    c->n_records = c->cap_records = m->n_records;
    for (int64_t i = 0; i < m->n_records; i++) {
        c->records[i].digest = m->records[i].digest;
        c->records[i].data = xmalloc((size_t)m->row_elems * sizeof(double) + 1);
        memcpy(c->records[i].data, m->records[i].data, (size_t)m->row_elems * sizeof(double));
        c->records[i].written = xmalloc((size_t)m->n_layers);
        memcpy(c->records[i].written, m->records[i].written, (size_t)m->n_layers);
    }
    for (int s = 0; s < m->desc.max_seqs; s++) {
        const ref_seq *src = &m->seqs[s];
        seq_reserve(&c->seqs[s], src->n);
        for (int64_t i = 0; i < src->n; i++)
            c->seqs[s].tokens[i] = token_copy(m, &src->tokens[i]);
        c->seqs[s].n = src->n;
        memcpy(c->seqs[s].salt, src->salt, sizeof src->salt);
        c->seqs[s].salt_len = src->salt_len;
        for (int l = 0; l < m->n_layers; l++)
            if (m->layers[l].kind == KVRT_LAYER_CROSS)
                cross_copy(cross_of(c, l, s), cross_of(m, l, s), &m->layers[l]);
    }
    return c;
}

void ref_set_policy(ref_model *m, const ref_policy *policy)
{
    m->policy = *policy;
}

const ref_policy *ref_get_policy(const ref_model *m)
{
    return &m->policy;
}

/* ---- layout ---- */

int ref_n_layers(const ref_model *m) { return m->n_layers; }
int ref_n_seqs(const ref_model *m) { return m->desc.max_seqs; }

const kvrt_layer_desc *ref_layer(const ref_model *m, int layer)
{
    return layer_valid(m, layer) ? &m->layers[layer] : NULL;
}

int64_t ref_k_elems(const ref_model *m, int layer) { return layer_k_elems(&m->layers[layer]); }
int64_t ref_v_elems(const ref_model *m, int layer) { return layer_v_elems(&m->layers[layer]); }
int64_t ref_layer_offset(const ref_model *m, int layer) { return m->offset[layer]; }

int ref_k_elem_rotary(const ref_model *m, int layer, int64_t e)
{
    const kvrt_layer_desc *L = &m->layers[layer];
    if (L->kind == KVRT_LAYER_ATTN)
        return (e % L->head_dim_k) < m->desc.rope.n_rot;
    if (L->kind == KVRT_LAYER_MLA)
        return e >= L->latent_dim;
    return 0;
}

/* ---- contents ---- */

const ref_token *ref_seq_tokens(const ref_model *m, int32_t seq, int64_t *n)
{
    if (!seq_valid(m, seq)) {
        *n = 0;
        return NULL;
    }
    *n = m->seqs[seq].n;
    return m->seqs[seq].tokens;
}

int32_t ref_seq_pos_min(const ref_model *m, int32_t seq)
{
    const ref_seq *s = &m->seqs[seq];
    return s->n ? s->tokens[0].pos : -1;
}

int32_t ref_seq_pos_max(const ref_model *m, int32_t seq)
{
    const ref_seq *s = &m->seqs[seq];
    return s->n ? s->tokens[s->n - 1].pos : -1;
}

const ref_token *ref_seq_find(const ref_model *m, int32_t seq, int32_t pos)
{
    return seq_valid(m, seq) ? seq_find(&m->seqs[seq], pos) : NULL;
}

int ref_cross_rows(const ref_model *m, int layer, int32_t seq, const double **k,
                   const double **v)
{
    const ref_cross *c = cross_of(m, layer, seq);
    if (k)
        *k = c->k;
    if (v)
        *v = c->v;
    return c->n;
}

int ref_seq_is_empty(const ref_model *m, int32_t seq)
{
    if (m->seqs[seq].n)
        return 0;
    for (int l = 0; l < m->n_layers; l++)
        if (m->layers[l].kind == KVRT_LAYER_CROSS && cross_of(m, l, seq)->n)
            return 0;
    return 1;
}

/* ---- RoPE ---- */

void ref_rope_rotate(double *x, int dims, kvrt_rope_style style, double theta,
                     double freq_scale, int64_t delta)
{
    if (delta == 0 || dims <= 0)
        return;
    for (int i = 0; i < dims / 2; i++) {
        int a = style == KVRT_ROPE_NEOX ? i : 2 * i;
        int b = style == KVRT_ROPE_NEOX ? i + dims / 2 : 2 * i + 1;
        double angle = (double)delta * freq_scale * pow(theta, -2.0 * (double)i / (double)dims);
        double c = cos(angle), s = sin(angle);
        double xa = x[a], xb = x[b];
        x[a] = xa * c - xb * s;
        x[b] = xa * s + xb * c;
    }
}

double ref_layer_theta(const ref_model *m, int layer)
{
    return m->layers[layer].rope_theta > 0 ? (double)m->layers[layer].rope_theta
                                           : (double)m->desc.rope.theta;
}

int ref_rotate_heads(const ref_model *m, int layer, double *x, int n_heads, int64_t delta)
{
    const kvrt_rope_desc *r = &m->desc.rope;
    const kvrt_layer_desc *L = &m->layers[layer];
    double theta = ref_layer_theta(m, layer);
    if (L->kind == KVRT_LAYER_ATTN && r->n_rot > 0) {
        for (int h = 0; h < n_heads; h++)
            ref_rope_rotate(x + (int64_t)h * L->head_dim_k, r->n_rot, r->style, theta,
                            (double)r->freq_scale, delta);
        return 1;
    }
    if (L->kind == KVRT_LAYER_MLA && L->rope_dim > 0) {
        int64_t dk = (int64_t)L->latent_dim + L->rope_dim;
        for (int h = 0; h < n_heads; h++)
            ref_rope_rotate(x + h * dk + L->latent_dim, L->rope_dim, r->style, theta,
                            (double)r->freq_scale, delta);
        return 1;
    }
    return 0;
}

/* Re-rotates every self layer's K of a token by a position move of delta
 * (a cache that stores rotated K; pre-RoPE caches keep K as written). */
static void token_rotate(const ref_model *m, ref_token *t, int64_t delta)
{
    if (delta == 0 || m->desc.rope.mode == KVRT_ROPE_IN_ATTENTION)
        return;
    for (int l = 0; l < m->n_layers; l++) {
        const kvrt_layer_desc *L = &m->layers[l];
        int heads = L->kind == KVRT_LAYER_MLA ? 1 : L->n_kv_heads;
        if (L->kind != KVRT_LAYER_CROSS && ref_rotate_heads(m, l, t->data + m->offset[l], heads, delta))
            t->rotations[l]++;
    }
}

/* ---- the step ---- */

ref_status_set ref_plan(ref_model *m, int n, const int32_t *seq_ids, const int32_t *positions,
                        int max_tokens, int apply)
{
    if (n < 1 || n > max_tokens || !seq_ids || !positions)
        return REF_BIT(KVRT_ERR_INVALID_ARG);
    ref_status_set set = 0;
    int at_int32_max = 0;
    for (int i = 0; i < n; i++) {
        if (!seq_valid(m, seq_ids[i]) || positions[i] < 0) {
            set |= REF_BIT(KVRT_ERR_INVALID_ARG);
            continue;
        }
        at_int32_max |= positions[i] == INT32_MAX;
        int dup = seq_find(&m->seqs[seq_ids[i]], positions[i]) != NULL;
        for (int j = 0; j < i && !dup; j++)
            dup = seq_ids[j] == seq_ids[i] && positions[j] == positions[i];
        if (dup)
            set |= REF_BIT(KVRT_ERR_POS_EXISTS);
    }
    if (set == 0)
        set = REF_BIT(KVRT_OK);
    if (at_int32_max)
        set = open_case_as(m->policy.pos_int32_max, set, KVRT_ERR_POS_RANGE) |
              (set & ~REF_BIT(KVRT_OK));
    if (!REF_HAS(set, KVRT_OK))
        return set;
    if (apply)
        for (int i = 0; i < n; i++)
            seq_insert(&m->seqs[seq_ids[i]], token_new(m, positions[i]));
    return set;
}

/* ---- prefix caching: digests and records ---- */

static uint64_t digest_mix(uint64_t h, uint64_t x)
{
    h ^= x + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    h *= 0xff51afd7ed558ccdull;
    return h ^ (h >> 33);
}

static uint64_t digest_salt(const void *salt, int salt_len)
{
    uint64_t h = digest_mix(0x243f6a8885a308d3ull, (uint64_t)salt_len);
    for (int i = 0; i < salt_len; i++)
        h = digest_mix(h, ((const uint8_t *)salt)[i]);
    return h;
}

uint64_t ref_prefix_digest(const void *salt, int salt_len, const int32_t *tokens, int64_t n)
{
    uint64_t h = digest_salt(salt, salt_len);
    for (int64_t i = 0; i < n; i++)
        h = digest_mix(h, (uint32_t)tokens[i]);
    return h;
}

static ref_record *record_find(const ref_model *m, uint64_t digest)
{
    for (int64_t i = 0; i < m->n_records; i++)
        if (m->records[i].digest == digest)
            return &m->records[i];
    return NULL;
}

int ref_seq_token_digest(const ref_model *m, int32_t seq, int32_t pos, uint64_t *digest)
{
    const ref_seq *s = &m->seqs[seq];
    if (pos < 0 || pos >= s->n)
        return 0;
    uint64_t h = digest_salt(s->salt, s->salt_len);
    for (int64_t i = 0; i <= pos; i++) {
        if (s->tokens[i].pos != i || s->tokens[i].token < 0)
            return 0;
        h = digest_mix(h, (uint32_t)s->tokens[i].token);
    }
    *digest = h;
    return 1;
}

/* Records a freshly written row of t when its sequence holds declared
 * tokens at every position 0..t->pos. */
static void prefix_record(ref_model *m, int32_t seq, const ref_token *t, int layer)
{
    uint64_t h;
    if (!ref_seq_token_digest(m, seq, t->pos, &h))
        return;
    ref_record *r = record_find(m, h);
    if (r == NULL) {
        if (m->n_records == m->cap_records) {
            m->cap_records = m->cap_records ? 2 * m->cap_records : 64;
            m->records = realloc(m->records, (size_t)m->cap_records * sizeof(ref_record));
            if (!m->records)
                abort();
        }
        r = &m->records[m->n_records++];
        r->digest = h;
        r->data = xcalloc((size_t)m->row_elems + 1, sizeof(double));
        r->written = xcalloc((size_t)m->n_layers, 1);
    }
    int64_t off = m->offset[layer], len = layer_k_elems(&m->layers[layer]) + layer_v_elems(&m->layers[layer]);
    memcpy(r->data + off, t->data + off, (size_t)len * sizeof(double));
    r->written[layer] = 1;
}

/* An edit that changed something: the sequence's salt is forgotten. */
static void salt_reset(ref_model *m, int32_t seq)
{
    for (int32_t s = 0; s < m->desc.max_seqs; s++)
        if (seq < 0 || s == seq)
            m->seqs[s].salt_len = 0;
}

/* Whether kvrt treats a range as empty, so that the edit changes nothing. */
static int range_empty(int32_t p0, int32_t p1) { return p1 >= 0 && (p0 < 0 ? 0 : p0) == p1; }

ref_status_set ref_plan_tokens(ref_model *m, int n, const int32_t *seq_ids,
                               const int32_t *positions, const int32_t *tokens, int max_tokens,
                               int apply)
{
    if (!tokens)
        return REF_BIT(KVRT_ERR_INVALID_ARG);
    ref_status_set set = ref_plan(m, n, seq_ids, positions, max_tokens, apply);
    if (apply && REF_HAS(set, KVRT_OK))
        for (int i = 0; i < n; i++)
            seq_find(&m->seqs[seq_ids[i]], positions[i])->token = tokens[i];
    return set;
}

/* Whether layer l can serve a hit of h blocks: its recorded rows cover the
 * positions a token at h * block_size sees. digests[p]: of tokens 0..p. */
static int layer_serves(const ref_model *m, int l, const uint64_t *digests, int64_t h, int bs)
{
    const kvrt_layer_desc *L = &m->layers[l];
    int64_t first = 0;
    if (L->kind == KVRT_LAYER_ATTN && L->window > 0 && !m->desc.swa_full)
        first = h * bs - L->window + 1 > 0 ? (h * bs - L->window + 1) / bs * bs : 0;
    for (int64_t p = first; p < h * bs; p++) {
        const ref_record *r = record_find(m, digests[p]);
        if (r == NULL || !r->written[l])
            return 0;
    }
    return 1;
}

int32_t ref_prefix_longest(const ref_model *m, const int32_t *tokens, int n, const void *salt,
                           int salt_len, int block_size)
{
    int64_t blocks = n / block_size, len = blocks * block_size;
    uint64_t *digests = xmalloc((size_t)(len + 1) * sizeof(uint64_t));
    uint64_t h = digest_salt(salt, salt_len);
    for (int64_t p = 0; p < len; p++)
        digests[p] = h = digest_mix(h, (uint32_t)tokens[p]);
    int64_t best = blocks;
    for (; best > 0; best--) {
        int ok = 1;
        for (int l = 0; l < m->n_layers && ok; l++)
            ok = !layer_is_self(m, l) || layer_serves(m, l, digests, best, block_size);
        if (ok)
            break;
    }
    free(digests);
    return (int32_t)(best * block_size);
}

ref_status_set ref_attach_prefix(ref_model *m, int32_t seq, const int32_t *tokens, int n,
                                 const void *salt, int salt_len, int32_t n_covered, int apply)
{
    if (!seq_valid(m, seq) || !ref_seq_is_empty(m, seq) || n < 0 || (!tokens && n > 0) ||
        salt_len < 0 || salt_len > KVRT_PREFIX_SALT_MAX || (!salt && salt_len > 0))
        return REF_BIT(KVRT_ERR_INVALID_ARG);
    if (!apply)
        return REF_BIT(KVRT_OK);
    ref_seq *s = &m->seqs[seq];
    if (salt_len > 0)
        memcpy(s->salt, salt, (size_t)salt_len);
    s->salt_len = salt_len;
    uint64_t h = digest_salt(salt, salt_len);
    for (int32_t p = 0; p < n_covered; p++) {
        h = digest_mix(h, (uint32_t)tokens[p]);
        ref_token t = token_new(m, p);
        t.token = tokens[p];
        const ref_record *r = record_find(m, h);
        for (int l = 0; r != NULL && l < m->n_layers; l++) {
            if (!layer_is_self(m, l) || !r->written[l])
                continue;
            int64_t off = m->offset[l], len = layer_k_elems(&m->layers[l]) + layer_v_elems(&m->layers[l]);
            memcpy(t.data + off, r->data + off, (size_t)len * sizeof(double));
            t.written[l] = 1;
        }
        seq_insert(s, t);
    }
    return REF_BIT(KVRT_OK);
}

ref_status_set ref_write(ref_model *m, int layer, int n, const int32_t *seq_ids,
                         const int32_t *positions, const void *k, const void *v,
                         kvrt_dtype src_dtype, int apply)
{
    if (!layer_valid(m, layer) || !layer_is_self(m, layer) || !k ||
        (m->layers[layer].kind == KVRT_LAYER_ATTN && !v) || src_dtype < KVRT_F32 ||
        src_dtype > KVRT_BF16)
        return REF_BIT(KVRT_ERR_INVALID_ARG);
    for (int i = 0; i < n; i++)
        if (!seq_valid(m, seq_ids[i]) || !seq_find(&m->seqs[seq_ids[i]], positions[i]))
            return REF_BIT(KVRT_ERR_INVALID_ARG);
    if (!apply)
        return REF_BIT(KVRT_OK);
    int64_t nk = ref_k_elems(m, layer), nv = ref_v_elems(m, layer);
    for (int i = 0; i < n; i++) {
        ref_token *t = seq_find(&m->seqs[seq_ids[i]], positions[i]);
        double *row = t->data + m->offset[layer];
        for (int64_t e = 0; e < nk; e++)
            row[e] = ref_round(ref_load(k, src_dtype, i * nk + e), m->desc.dtype);
        for (int64_t e = 0; e < nv; e++)
            row[nk + e] = ref_round(ref_load(v, src_dtype, i * nv + e), m->desc.dtype);
        store_rows(m, &m->layers[layer], row, nv > 0 ? row + nk : NULL);
        t->written[layer] = 1;
        t->rotations[layer] = 0;
        prefix_record(m, seq_ids[i], t, layer);
    }
    return REF_BIT(KVRT_OK);
}

ref_status_set ref_cross_set(ref_model *m, int layer, int32_t seq, int n, const void *k,
                             const void *v, kvrt_dtype src_dtype, int apply)
{
    if (!layer_valid(m, layer) || m->layers[layer].kind != KVRT_LAYER_CROSS ||
        !seq_valid(m, seq) || n < 0 || n > m->desc.cross_max_len || src_dtype < KVRT_F32 ||
        src_dtype > KVRT_BF16)
        return REF_BIT(KVRT_ERR_INVALID_ARG);
    if (n > 0 && (!k || !v))
        return REF_BIT(KVRT_ERR_INVALID_ARG);
    ref_status_set set = REF_BIT(KVRT_OK);
    if (n == 0)
        set = open_case(m->policy.cross_set_empty, set);
    if (!apply || !REF_HAS(set, KVRT_OK))
        return set;
    const kvrt_layer_desc *L = &m->layers[layer];
    ref_cross *c = cross_of(m, layer, seq);
    cross_drop(c);
    if (n == 0)
        return set;
    int64_t nk = (int64_t)n * layer_k_elems(L), nv = (int64_t)n * layer_v_elems(L);
    c->k = xmalloc((size_t)nk * sizeof(double));
    c->v = xmalloc((size_t)nv * sizeof(double));
    for (int64_t e = 0; e < nk; e++)
        c->k[e] = ref_round(ref_load(k, src_dtype, e), m->desc.dtype);
    for (int64_t e = 0; e < nv; e++)
        c->v[e] = ref_round(ref_load(v, src_dtype, e), m->desc.dtype);
    for (int r = 0; r < n; r++)
        store_rows(m, L, c->k + (int64_t)r * layer_k_elems(L), c->v + (int64_t)r * layer_v_elems(L));
    c->n = n;
    return set;
}

/* ---- sequence edits ---- */

static void seq_rm_one(ref_model *m, int32_t seq, int32_t p0, int32_t p1)
{
    ref_seq *s = &m->seqs[seq];
    int64_t lo, hi, w = 0;
    range_bounds(p0, p1, &lo, &hi);
    for (int64_t i = 0; i < s->n; i++) {
        if (in_range(s->tokens[i].pos, lo, hi))
            token_free(&s->tokens[i]);
        else
            s->tokens[w++] = s->tokens[i];
    }
    s->n = w;
    int drop = m->policy.rm_drops_cross == REF_RM_CROSS_EMPTIED ? s->n == 0
                                                                : (lo == 0 && p1 < 0);
    if (drop)
        seq_drop_cross(m, seq);
}

ref_status_set ref_seq_rm(ref_model *m, int32_t seq, int32_t p0, int32_t p1, int apply)
{
    if (seq >= m->desc.max_seqs)
        return REF_BIT(KVRT_ERR_INVALID_ARG);
    ref_status_set set = range_open(m, p0, p1, REF_BIT(KVRT_OK));
    if (!apply || !REF_HAS(set, KVRT_OK))
        return set;
    for (int32_t s = 0; s < m->desc.max_seqs; s++)
        if (seq < 0 || s == seq)
            seq_rm_one(m, s, p0, p1);
    if (!range_empty(p0, p1))
        salt_reset(m, seq);
    return set;
}

ref_status_set ref_seq_cp(ref_model *m, int32_t src, int32_t dst, int32_t p0, int32_t p1,
                          int apply)
{
    if (!seq_valid(m, src) || !seq_valid(m, dst))
        return REF_BIT(KVRT_ERR_INVALID_ARG);
    ref_status_set set = REF_BIT(KVRT_OK);
    if (src == dst)
        set = open_case(m->policy.cp_self, set);
    else if (m->seqs[dst].n > 0)
        return REF_BIT(KVRT_ERR_INVALID_ARG);
    else if (!ref_seq_is_empty(m, dst))
        set = open_case(m->policy.cp_dst_cross_only, set);
    set = range_open(m, p0, p1, set);
    if (!apply || !REF_HAS(set, KVRT_OK) || src == dst)
        return set;
    const ref_seq *s = &m->seqs[src];
    ref_seq *d = &m->seqs[dst];
    int64_t lo, hi;
    range_bounds(p0, p1, &lo, &hi);
    salt_reset(m, dst);
    seq_reserve(d, s->n);
    for (int64_t i = 0; i < s->n; i++)
        if (in_range(s->tokens[i].pos, lo, hi))
            d->tokens[d->n++] = token_copy(m, &s->tokens[i]);
    for (int l = 0; l < m->n_layers; l++)
        if (m->layers[l].kind == KVRT_LAYER_CROSS)
            cross_copy(cross_of(m, l, dst), cross_of(m, l, src), &m->layers[l]);
    return set;
}

ref_status_set ref_seq_keep(ref_model *m, int32_t seq, int apply)
{
    if (!seq_valid(m, seq))
        return REF_BIT(KVRT_ERR_INVALID_ARG);
    if (apply)
        for (int32_t s = 0; s < m->desc.max_seqs; s++)
            if (s != seq) {
                seq_clear(&m->seqs[s]);
                seq_drop_cross(m, s);
                salt_reset(m, s);
            }
    return REF_BIT(KVRT_OK);
}

/* Errors of moving the positions in [lo, hi) of one sequence to new_pos(old):
 * POS_RANGE when one overflows int32, POS_EXISTS when two land on one
 * position (negative new positions are removed and collide with nothing). */
typedef int64_t (*pos_map_fn)(int32_t pos, int64_t arg);

static int64_t map_shift(int32_t pos, int64_t delta) { return (int64_t)pos + delta; }
static int64_t map_div(int32_t pos, int64_t d) { return pos / d; }

static int64_t cmp_i64(int64_t a, int64_t b) { return (a > b) - (a < b); }

static int i64_cmp(const void *a, const void *b)
{
    return (int)cmp_i64(*(const int64_t *)a, *(const int64_t *)b);
}

static ref_status_set seq_move_check(const ref_model *m, int32_t seq, int64_t lo, int64_t hi,
                                     pos_map_fn map, int64_t arg, int *at_int32_max)
{
    const ref_seq *s = &m->seqs[seq];
    ref_status_set set = 0;
    /* new positions of the moved tokens and positions of the others, sorted */
    int64_t *all = xmalloc((size_t)(s->n ? s->n : 1) * sizeof(int64_t));
    int64_t n_all = 0;
    for (int64_t i = 0; i < s->n; i++) {
        int32_t pos = s->tokens[i].pos;
        int64_t np = in_range(pos, lo, hi) ? map(pos, arg) : pos;
        if (np > INT32_MAX)
            set |= REF_BIT(KVRT_ERR_POS_RANGE);
        else if (np >= 0)
            all[n_all++] = np;
        if (np == INT32_MAX && np != pos)
            *at_int32_max = 1;
    }
    qsort(all, (size_t)n_all, sizeof(int64_t), i64_cmp);
    for (int64_t i = 1; i < n_all; i++)
        if (all[i] == all[i - 1])
            set |= REF_BIT(KVRT_ERR_POS_EXISTS);
    free(all);
    return set;
}

static void seq_move_apply(ref_model *m, int32_t seq, int64_t lo, int64_t hi, pos_map_fn map,
                           int64_t arg)
{
    ref_seq *s = &m->seqs[seq];
    int64_t w = 0;
    for (int64_t i = 0; i < s->n; i++) {
        ref_token t = s->tokens[i];
        if (in_range(t.pos, lo, hi)) {
            int64_t np = map(t.pos, arg);
            if (np < 0) {
                token_free(&t);
                continue;
            }
            token_rotate(m, &t, np - t.pos);
            t.pos = (int32_t)np;
        }
        s->tokens[w++] = t;
    }
    s->n = w;
    seq_sort(s);
}

ref_status_set ref_seq_shift(ref_model *m, int32_t seq, int32_t p0, int32_t p1, int32_t delta,
                             int apply)
{
    if (seq >= m->desc.max_seqs)
        return REF_BIT(KVRT_ERR_INVALID_ARG);
    int64_t lo, hi;
    range_bounds(p0, p1, &lo, &hi);
    ref_status_set errors = 0;
    int at_int32_max = 0;
    for (int32_t s = 0; s < m->desc.max_seqs; s++)
        if (seq < 0 || s == seq)
            errors |= seq_move_check(m, s, lo, hi, map_shift, delta, &at_int32_max);
    ref_status_set set = errors ? errors : REF_BIT(KVRT_OK);
    if (at_int32_max)
        set = open_case_as(m->policy.pos_int32_max, set, KVRT_ERR_POS_RANGE) |
              (set & ~REF_BIT(KVRT_OK));
    set = range_open(m, p0, p1, set);
    if (!apply || !REF_HAS(set, KVRT_OK))
        return set;
    for (int32_t s = 0; s < m->desc.max_seqs; s++)
        if (seq < 0 || s == seq)
            seq_move_apply(m, s, lo, hi, map_shift, delta);
    if (delta != 0 && !range_empty(p0, p1))
        salt_reset(m, seq);
    return set;
}

ref_status_set ref_seq_div(ref_model *m, int32_t seq, int32_t p0, int32_t p1, int d, int apply)
{
    if (seq >= m->desc.max_seqs || d < 1)
        return REF_BIT(KVRT_ERR_INVALID_ARG);
    if (seq < 0 && m->policy.div_all_seqs == REF_OPEN_ERROR)
        return REF_BIT(KVRT_ERR_INVALID_ARG);
    int64_t lo, hi;
    range_bounds(p0, p1, &lo, &hi);
    ref_status_set errors = 0;
    int at_int32_max = 0; /* a division never reaches it */
    for (int32_t s = 0; s < m->desc.max_seqs; s++)
        if (seq < 0 || s == seq)
            errors |= seq_move_check(m, s, lo, hi, map_div, d, &at_int32_max);
    ref_status_set set = errors ? errors : REF_BIT(KVRT_OK);
    if (seq < 0)
        set = open_case(m->policy.div_all_seqs, set);
    set = range_open(m, p0, p1, set);
    if (!apply || !REF_HAS(set, KVRT_OK))
        return set;
    for (int32_t s = 0; s < m->desc.max_seqs; s++)
        if (seq < 0 || s == seq)
            seq_move_apply(m, s, lo, hi, map_div, d);
    if (d != 1 && !range_empty(p0, p1))
        salt_reset(m, seq);
    return set;
}

void ref_prefix_forget(ref_model *m)
{
    salt_reset(m, -1);
    for (int64_t i = 0; i < m->n_records; i++) {
        free(m->records[i].data);
        free(m->records[i].written);
    }
    m->n_records = 0;
}

void ref_clear(ref_model *m)
{
    for (int32_t s = 0; s < m->desc.max_seqs; s++) {
        seq_clear(&m->seqs[s]);
        seq_drop_cross(m, s);
    }
    ref_prefix_forget(m);
}

void ref_seq_import(ref_model *m, int32_t dst, const ref_model *from, int32_t src)
{
    const ref_seq *s = &from->seqs[src];
    ref_seq *d = &m->seqs[dst];
    seq_clear(d);
    seq_reserve(d, s->n);
    for (int64_t i = 0; i < s->n; i++)
        d->tokens[i] = token_copy(m, &s->tokens[i]);
    d->n = s->n;
    for (int l = 0; l < m->n_layers; l++)
        if (m->layers[l].kind == KVRT_LAYER_CROSS)
            cross_copy(cross_of(m, l, dst), cross_of(from, l, src), &m->layers[l]);
}

/* ---- attention ---- */

/* Whether a key at kpos is visible to a query at qpos in a self layer. */
static int key_visible(const kvrt_layer_desc *L, int32_t kpos, int32_t qpos)
{
    if (kpos > qpos)
        return 0;
    if (L->kind == KVRT_LAYER_ATTN && L->window > 0 && (int64_t)kpos <= (int64_t)qpos - L->window)
        return 0;
    return 1;
}

int64_t ref_attention(const ref_model *m, int layer, int32_t seq, int32_t qpos,
                      const double *q, int n_q_heads, double scale, double softcap,
                      double *out)
{
    if (!layer_valid(m, layer) || !seq_valid(m, seq) || !q || !out || n_q_heads < 1)
        return -1;
    const kvrt_layer_desc *L = &m->layers[layer];
    int mla = L->kind == KVRT_LAYER_MLA;
    int n_kv = mla ? 1 : L->n_kv_heads;
    int dk = mla ? L->latent_dim + L->rope_dim : L->head_dim_k;
    int dv = mla ? L->latent_dim : L->head_dim_v;
    if (n_q_heads % n_kv)
        return -1;
    if (scale == 0)
        scale = 1.0 / sqrt((double)dk);

    /* the visible keys: pointers to each key's K row (all heads) and V row */
    int64_t n_keys = 0, cap;
    const double **krows, **vrows;
    if (L->kind == KVRT_LAYER_CROSS) {
        const ref_cross *c = cross_of(m, layer, seq);
        cap = c->n;
        krows = xmalloc((size_t)(cap ? cap : 1) * sizeof(*krows));
        vrows = xmalloc((size_t)(cap ? cap : 1) * sizeof(*vrows));
        for (int64_t j = 0; j < c->n; j++, n_keys++) {
            krows[n_keys] = c->k + j * layer_k_elems(L);
            vrows[n_keys] = c->v + j * layer_v_elems(L);
        }
    } else {
        const ref_seq *s = &m->seqs[seq];
        cap = s->n;
        krows = xmalloc((size_t)(cap ? cap : 1) * sizeof(*krows));
        vrows = xmalloc((size_t)(cap ? cap : 1) * sizeof(*vrows));
        for (int64_t j = 0; j < s->n; j++) {
            const ref_token *t = &s->tokens[j];
            if (!key_visible(L, t->pos, qpos))
                continue;
            if (!t->written[layer]) {
                free(krows);
                free(vrows);
                return -1;
            }
            const double *row = t->data + m->offset[layer];
            krows[n_keys] = row;
            vrows[n_keys] = mla ? row : row + layer_k_elems(L);
            n_keys++;
        }
    }

    /* pre-RoPE: each key turned by its position, the queries by qpos */
    double *turned = NULL, *q_turned = NULL;
    if (m->desc.rope.mode == KVRT_ROPE_IN_ATTENTION && L->kind != KVRT_LAYER_CROSS) {
        int64_t ke = layer_k_elems(L);
        turned = xmalloc((size_t)(n_keys ? n_keys : 1) * (size_t)ke * sizeof(double));
        const ref_seq *s = &m->seqs[seq];
        int64_t j = 0;
        for (int64_t i = 0; i < s->n; i++) {
            const ref_token *t = &s->tokens[i];
            if (!key_visible(L, t->pos, qpos))
                continue;
            memcpy(turned + j * ke, krows[j], (size_t)ke * sizeof(double));
            ref_rotate_heads(m, layer, turned + j * ke, n_kv, t->pos);
            krows[j] = turned + j * ke;
            j++;
        }
        if (m->desc.rope.rotate_q) {
            q_turned = xmalloc((size_t)n_q_heads * (size_t)dk * sizeof(double));
            memcpy(q_turned, q, (size_t)n_q_heads * (size_t)dk * sizeof(double));
            ref_rotate_heads(m, layer, q_turned, n_q_heads, qpos);
            q = q_turned;
        }
    }

    double *logits = xmalloc((size_t)(n_keys ? n_keys : 1) * sizeof(double));
    int group = n_q_heads / n_kv;
    for (int h = 0; h < n_q_heads; h++) {
        int kvh = h / group;
        const double *qh = q + (int64_t)h * dk;
        double *oh = out + (int64_t)h * dv;
        for (int e = 0; e < dv; e++)
            oh[e] = 0;
        if (n_keys == 0)
            continue;
        double mx = -INFINITY;
        for (int64_t j = 0; j < n_keys; j++) {
            const double *kh = krows[j] + (int64_t)kvh * dk;
            double dot = 0;
            for (int e = 0; e < dk; e++)
                dot += qh[e] * kh[e];
            double sc = dot * scale;
            if (softcap > 0)
                sc = softcap * tanh(sc / softcap);
            logits[j] = sc;
            if (sc > mx)
                mx = sc;
        }
        double sum = 0;
        for (int64_t j = 0; j < n_keys; j++) {
            logits[j] = exp(logits[j] - mx);
            sum += logits[j];
        }
        for (int64_t j = 0; j < n_keys; j++) {
            double p = logits[j] / sum;
            const double *vh = vrows[j] + (int64_t)kvh * (mla ? dk : dv);
            for (int e = 0; e < dv; e++)
                oh[e] += p * vh[e];
        }
    }
    free(logits);
    free(krows);
    free(vrows);
    free(turned);
    free(q_turned);
    return n_keys;
}

double ref_attention_vmax(const ref_model *m, int layer, int32_t seq, int32_t qpos)
{
    const kvrt_layer_desc *L = &m->layers[layer];
    double vmax = 0;
    if (L->kind == KVRT_LAYER_CROSS) {
        const ref_cross *c = cross_of(m, layer, seq);
        for (int64_t e = 0; e < (int64_t)c->n * layer_v_elems(L); e++)
            vmax = fmax(vmax, fabs(c->v[e]));
        return vmax;
    }
    const ref_seq *s = &m->seqs[seq];
    int mla = L->kind == KVRT_LAYER_MLA;
    for (int64_t j = 0; j < s->n; j++) {
        const ref_token *t = &s->tokens[j];
        if (!key_visible(L, t->pos, qpos))
            continue;
        const double *row = t->data + m->offset[layer];
        const double *v = mla ? row : row + layer_k_elems(L);
        int64_t nv = mla ? L->latent_dim : layer_v_elems(L);
        for (int64_t e = 0; e < nv; e++)
            vmax = fmax(vmax, fabs(v[e]));
    }
    return vmax;
}
