/*
 * test_gpu_ops.c: every backend operation of a GPU backend against its C
 * twin on the CPU backend. Both backends are opened through
 * kvrt_backend_open, get the same inputs, run the same op, and their
 * results are compared: bit-exact for data moves and dtype conversion
 * (write, move, gather, set_pos, zero, copy, staging), within the bounds
 * derived at check_rotated for RoPE re-rotation and at attention_close for
 * attention.
 *
 * Shapes cover the edges: block size 1 and 256, head dims 64..256, MLA rows
 * of 576 (and an odd-sized MLA row that takes the scalar paths), many
 * blocks, unaligned caller buffers, every source/cache dtype pair.
 *
 * Usage: test_gpu_ops [cuda|hip|cpu]
 *                     [ops|attention-decode|prefill|mla|quant|prerope|gather|wide].
 * "cpu" runs the CPU backend against itself, which checks the test where
 * there is no device. The second argument runs a part: "ops" every test but the
 * decode attention grid, the tensor-core prefill grid and the MLA grid,
 * "attention-decode" the decode grid alone, "prefill" the prefill grid
 * alone, "mla" the MLA grid alone, "quant" the ops on q8 and fp8 layers
 * alone, "prerope" the pre-RoPE attention cases alone, "gather" the
 * gathers alone, "wide" the generic
 * kernel with rows long enough that its slot groups fill a whole warp of
 * 64 lanes (all of them by
 * default; the sim runs them as separate tests). Exits 77 when the
 * backend has no device.
 */
#include "gpu_test.h"

#include "backend.h"
#if defined(KVRT_GPU_SIM)
#  include "kvrt_sim.h" /* launch counts */
#endif

enum { CPU = 0, DEV = 1 };

static kvrt_backend_t be[2];

/* Setup that later steps depend on: a failure ends the test. */
#define MUST(expr)                                                                           \
    do {                                                                                     \
        kvrt_status must_status_ = (expr);                                                   \
        if (must_status_ != KVRT_OK) {                                                       \
            fprintf(stderr, "%s:%d: %s -> %s: %s\n", __FILE__, __LINE__, #expr,              \
                    kvrt_status_name(must_status_), kvrt_last_error());                      \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

/* ---- a buffer with the same size on both backends ---- */

typedef struct twin {
    void  *p[2];
    size_t n;
} twin;

static void twin_alloc(twin *t, size_t n)
{
    t->n = n;
    for (int s = 0; s < 2; s++)
        MUST(be[s].ops->region_create(&be[s], n > 0 ? n : 1, n > 0 ? n : 1, &t->p[s]));
}

static void twin_free(twin *t)
{
    for (int s = 0; s < 2; s++)
        if (t->p[s] != NULL)
            be[s].ops->region_destroy(&be[s], t->p[s], t->n > 0 ? t->n : 1);
    memset(t, 0, sizeof *t);
}

static void twin_set(twin *t, const void *host)
{
    for (int s = 0; s < 2; s++) {
        MUST(be[s].ops->upload(&be[s], t->p[s], host, t->n, NULL));
        MUST(be[s].ops->sync(&be[s], NULL));
    }
}

static void *twin_get(const twin *t, int side)
{
    void *host = malloc(t->n > 0 ? t->n : 1);
    MUST(be[side].ops->download(&be[side], host, t->p[side], t->n, NULL));
    return host;
}

/* Compares the twin's two copies byte for byte; names the first difference. */
static void twin_expect_equal(const twin *t, const char *what, size_t elem_size)
{
    unsigned char *a = twin_get(t, CPU), *b = twin_get(t, DEV);
    if (memcmp(a, b, t->n) != 0) {
        size_t i = 0;
        while (a[i] == b[i])
            i++;
        size_t e = i / elem_size, n_diff = 0;
        for (size_t j = 0; j < t->n; j++)
            n_diff += a[j] != b[j];
        CHECK(0, "%s: first difference at element %zu (byte %zu), %zu bytes differ of %zu", what, e,
              i, n_diff, t->n);
    }
    free(a);
    free(b);
}

/* Stages host data on both backends (valid until the next stage_reset). */
static void stage_both(const void *host, size_t n, const void *dev[2])
{
    for (int s = 0; s < 2; s++)
        MUST(be[s].ops->stage(&be[s], host, n, NULL, &dev[s]));
}

static void finish_both(void)
{
    for (int s = 0; s < 2; s++) {
        MUST(be[s].ops->sync(&be[s], NULL));
        be[s].ops->stage_reset(&be[s], NULL);
    }
}

/* ---- data ---- */

static size_t dtype_size(int dtype) { return dtype == KVRT_LAYOUT_F32 ? 4 : 2; }

static const char *dtype_str(int dtype)
{
    return dtype == KVRT_LAYOUT_F32 ? "f32" : dtype == KVRT_LAYOUT_F16 ? "f16" : "bf16";
}

/* Finite values in [-2, 2), rounded to the dtype. */
static void fill_finite(rng *r, void *p, int dtype, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        kvrt_store(p, dtype, i, rng_float(r, -2.0f, 2.0f));
}

/* Anything: every bit pattern of 16-bit types; for f32 a mix of ordinary
 * values, values that overflow or underflow f16/bf16, subnormals, zeros
 * of both signs, infinities and NaNs, so conversions meet every case. */
static void fill_any(rng *r, void *p, int dtype, int64_t n)
{
    if (dtype != KVRT_LAYOUT_F32) {
        for (int64_t i = 0; i < n; i++)
            ((uint16_t *)p)[i] = (uint16_t)rng_next(r);
        return;
    }
    for (int64_t i = 0; i < n; i++) {
        float f;
        switch (rng_below(r, 10)) {
        case 0: f = rng_float(r, -1e5f, 1e5f); break;    /* beyond f16's range */
        case 1: f = rng_float(r, -1e-5f, 1e-5f); break;  /* f16 subnormals */
        case 2: f = rng_float(r, -1e-8f, 1e-8f); break;  /* below f16's smallest */
        case 3: {                                         /* any bits: NaNs, inf, subnormals */
            kvrt_f32_bits b;
            b.u = (uint32_t)rng_next(r);
            f = b.f;
            break;
        }
        case 4: f = rng_below(r, 2) ? 65504.0f : 65520.0f; break; /* f16 max and the overflow edge */
        case 5: f = rng_below(r, 2) ? -0.0f : 0.0f; break;
        default: f = rng_float(r, -4.0f, 4.0f); break;
        }
        ((float *)p)[i] = f;
    }
}

/* ---- layers ---- */

static kvrt_layout layout_attn(int n_heads, int dim_k, int dim_v, int block_size, int dtype, int n_rot)
{
    kvrt_layout L = {n_heads, dim_k, dim_v, block_size, 0, n_rot, dtype, (int32_t)dtype_size(dtype)};
    return L;
}

static kvrt_layout layout_mla(int latent, int rope, int block_size, int dtype)
{
    kvrt_layout L = {1, latent + rope, 0, block_size, latent, rope, dtype, (int32_t)dtype_size(dtype)};
    return L;
}

typedef struct layer_fix {
    kvrt_layout L;
    int32_t     n_blocks;
    twin        k, v;
} layer_fix;

static void layer_make(layer_fix *f, kvrt_layout L, int32_t n_blocks, rng *r, int finite)
{
    memset(f, 0, sizeof *f);
    f->L = L;
    f->n_blocks = n_blocks;
    size_t kb = (size_t)kvrt_block_bytes_k(&L) * (size_t)n_blocks;
    size_t vb = (size_t)kvrt_block_bytes_v(&L) * (size_t)n_blocks;
    twin_alloc(&f->k, kb);
    void *host = malloc(kb > vb ? kb : vb);
    (finite ? fill_finite : fill_any)(r, host, L.dtype, (int64_t)(kb / (size_t)L.elem_size));
    twin_set(&f->k, host);
    if (vb > 0) {
        twin_alloc(&f->v, vb);
        (finite ? fill_finite : fill_any)(r, host, L.dtype, (int64_t)(vb / (size_t)L.elem_size));
        twin_set(&f->v, host);
    }
    free(host);
}

static void layer_free(layer_fix *f)
{
    twin_free(&f->k);
    twin_free(&f->v);
}

static kvrt_layer_ref layer_ref(const layer_fix *f, int side)
{
    kvrt_layer_ref ref;
    memset(&ref, 0, sizeof ref); /* no scales: the fixtures are f32/f16/bf16 */
    ref.layout = f->L;
    ref.k = f->k.p[side];
    ref.v = f->v.n > 0 ? f->v.p[side] : NULL;
    return ref;
}

static void layout_name(const kvrt_layout *L, char *buf, size_t size)
{
    snprintf(buf, size, "heads %d dk %d dv %d bs %d %s rot [%d,+%d)", L->n_heads, L->dim_k, L->dim_v,
             L->block_size, dtype_str(L->dtype), L->rot_offset, L->rot_dims);
}

/* ---- group ops on both backends ----
 *
 * refs holds each layer's ref on the CPU (refs[0 .. n_layers)) and on the
 * device (refs[n_layers .. 2 n_layers)); the op runs on both and both are
 * synchronized. */

static void move_both(const kvrt_layer_ref *refs, int n_layers, const kvrt_span *spans,
                      int32_t n_spans, int32_t max_len)
{
    const void *d_spans[2], *d_layers[2];
    stage_both(spans, (size_t)n_spans * sizeof *spans, d_spans);
    for (int s = 0; s < 2; s++) {
        MUST(be[s].ops->stage(&be[s], refs + s * n_layers, (size_t)n_layers * sizeof *refs, NULL,
                              &d_layers[s]));
        kvrt_move_op op;
        memset(&op, 0, sizeof op);
        op.layers = d_layers[s];
        op.n_layers = n_layers;
        op.spans = d_spans[s];
        op.n_spans = n_spans;
        op.max_len = max_len;
        MUST(be[s].ops->move(&be[s], &op, NULL));
    }
    finish_both();
}

static void rotate_both(const kvrt_layer_ref *refs, int n_layers, int32_t max_rot, kvrt_rope rope,
                        const int32_t *slots, const int32_t *deltas, int32_t n)
{
    const void *d_slots[2], *d_deltas[2], *d_layers[2];
    stage_both(slots, (size_t)n * sizeof *slots, d_slots);
    stage_both(deltas, (size_t)n * sizeof *deltas, d_deltas);
    for (int s = 0; s < 2; s++) {
        MUST(be[s].ops->stage(&be[s], refs + s * n_layers, (size_t)n_layers * sizeof *refs, NULL,
                              &d_layers[s]));
        kvrt_rotate_op op;
        memset(&op, 0, sizeof op);
        op.layers = d_layers[s];
        op.n_layers = n_layers;
        op.max_rot_dims = max_rot;
        op.rope = rope;
        op.slots = d_slots[s];
        op.deltas = d_deltas[s];
        op.n = n;
        MUST(be[s].ops->rotate(&be[s], &op, NULL));
    }
    finish_both();
}

/* ---- write ---- */

/* n_rows rows in src_dtype scattered into distinct slots; `offset` bytes
 * shift the caller's buffers off 16-byte alignment (the scalar path). */
static void test_write(rng *r, kvrt_layout L, int32_t n_blocks, int src_dtype, int32_t n_rows,
                       int with_v, size_t offset)
{
    char name[160], what[320];
    layout_name(&L, name, sizeof name);
    layer_fix f;
    layer_make(&f, L, n_blocks, r, 0);
    int32_t *slots = malloc((size_t)n_rows * sizeof *slots);
    rng_distinct(r, slots, n_rows, n_blocks * L.block_size);
    size_t es = dtype_size(src_dtype);
    size_t kn = (size_t)n_rows * (size_t)L.n_heads * (size_t)L.dim_k;
    size_t vn = with_v ? (size_t)n_rows * (size_t)L.n_heads * (size_t)L.dim_v : 0;
    twin ksrc, vsrc;
    memset(&vsrc, 0, sizeof vsrc);
    twin_alloc(&ksrc, kn * es + offset);
    char *host = calloc(1, (kn > vn ? kn : vn) * es + offset);
    fill_any(r, host + offset, src_dtype, (int64_t)kn);
    twin_set(&ksrc, host);
    if (vn > 0) {
        twin_alloc(&vsrc, vn * es + offset);
        memset(host, 0, offset);
        fill_any(r, host + offset, src_dtype, (int64_t)vn);
        twin_set(&vsrc, host);
    }
    const void *d_slots[2];
    stage_both(slots, (size_t)n_rows * sizeof *slots, d_slots);
    for (int s = 0; s < 2; s++) {
        kvrt_write_op op;
        memset(&op, 0, sizeof op);
        op.layer = layer_ref(&f, s);
        op.k_src = (char *)ksrc.p[s] + offset;
        op.v_src = vn > 0 ? (char *)vsrc.p[s] + offset : NULL;
        op.src_dtype = src_dtype;
        op.n_rows = n_rows;
        op.slots = d_slots[s];
        MUST(be[s].ops->write(&be[s], &op, NULL));
    }
    finish_both();
    snprintf(what, sizeof what, "write %s <- %s, %d rows%s, offset %zu: K", name, dtype_str(src_dtype),
             n_rows, with_v ? " with V" : "", offset);
    twin_expect_equal(&f.k, what, (size_t)L.elem_size);
    if (f.v.n > 0) {
        what[strlen(what) - 1] = 'V';
        twin_expect_equal(&f.v, what, (size_t)L.elem_size);
    }
    free(host);
    free(slots);
    twin_free(&ksrc);
    twin_free(&vsrc);
    layer_free(&f);
}

/* ---- gather ---- */

static void test_gather(rng *r, kvrt_layout L, int32_t n_blocks, int32_t n, int want_k, int want_v,
                        size_t offset)
{
    char name[160], what[320];
    layout_name(&L, name, sizeof name);
    layer_fix f;
    layer_make(&f, L, n_blocks, r, 0);
    int32_t *slots = malloc((size_t)n * sizeof *slots);
    for (int32_t i = 0; i < n; i++) /* repeats allowed: gather only reads */
        slots[i] = (int32_t)rng_below(r, (int64_t)n_blocks * L.block_size);
    size_t es = (size_t)L.elem_size;
    twin kd, vd;
    memset(&kd, 0, sizeof kd);
    memset(&vd, 0, sizeof vd);
    size_t kb = (size_t)n * (size_t)L.n_heads * (size_t)L.dim_k * es + offset;
    size_t vb = (size_t)n * (size_t)L.n_heads * (size_t)L.dim_v * es + offset;
    char *zeros = calloc(1, kb > vb ? kb : vb);
    if (want_k) {
        twin_alloc(&kd, kb);
        twin_set(&kd, zeros);
    }
    if (want_v && L.dim_v > 0) {
        twin_alloc(&vd, vb);
        twin_set(&vd, zeros);
    }
    const void *d_slots[2];
    stage_both(slots, (size_t)n * sizeof *slots, d_slots);
    for (int s = 0; s < 2; s++) {
        kvrt_gather_op op;
        memset(&op, 0, sizeof op);
        op.layer = layer_ref(&f, s);
        op.slots = d_slots[s];
        op.n = n;
        op.k_dst = kd.n > 0 ? (char *)kd.p[s] + offset : NULL;
        op.v_dst = vd.n > 0 ? (char *)vd.p[s] + offset : NULL;
        MUST(be[s].ops->gather(&be[s], &op, NULL));
    }
    finish_both();
    snprintf(what, sizeof what, "gather %s, %d rows, offset %zu: K", name, n, offset);
    if (kd.n > 0)
        twin_expect_equal(&kd, what, es);
    what[strlen(what) - 1] = 'V';
    if (vd.n > 0)
        twin_expect_equal(&vd, what, es);
    free(zeros);
    free(slots);
    twin_free(&kd);
    twin_free(&vd);
    layer_free(&f);
}

/* ---- move ---- */

/* Spans from one half of the blocks into distinct blocks of the other
 * half, each inside one block, in every layer of the group at once. */
static void test_move(rng *r, const kvrt_layout *layouts, int n_layers, int32_t n_blocks,
                      int32_t n_spans)
{
    char name[160], what[320];
    layer_fix *f = calloc((size_t)n_layers, sizeof *f);
    for (int l = 0; l < n_layers; l++)
        layer_make(&f[l], layouts[l], n_blocks, r, 0);
    int32_t bs = layouts[0].block_size;
    int32_t *blocks = malloc((size_t)n_blocks * sizeof *blocks);
    rng_distinct(r, blocks, n_blocks, n_blocks);
    if (n_spans > n_blocks / 2)
        n_spans = n_blocks / 2;
    kvrt_span *spans = malloc((size_t)n_spans * sizeof *spans);
    int32_t max_len = 0;
    for (int32_t i = 0; i < n_spans; i++) {
        int32_t len = 1 + (int32_t)rng_below(r, bs);
        int32_t src_block = blocks[n_blocks / 2 + (int32_t)rng_below(r, n_blocks - n_blocks / 2)];
        int32_t dst_block = blocks[i]; /* distinct, never a source block */
        spans[i].len = len;
        spans[i].src = src_block * bs + (int32_t)rng_below(r, bs - len + 1);
        spans[i].dst = dst_block * bs + (int32_t)rng_below(r, bs - len + 1);
        if (len > max_len)
            max_len = len;
    }
    kvrt_layer_ref *refs = malloc(2 * (size_t)n_layers * sizeof *refs);
    for (int s = 0; s < 2; s++)
        for (int l = 0; l < n_layers; l++)
            refs[s * n_layers + l] = layer_ref(&f[l], s);
    move_both(refs, n_layers, spans, n_spans, max_len);
    for (int l = 0; l < n_layers; l++) {
        layout_name(&layouts[l], name, sizeof name);
        snprintf(what, sizeof what, "move layer %d/%d (%s), %d spans: K", l, n_layers, name, n_spans);
        twin_expect_equal(&f[l].k, what, (size_t)layouts[l].elem_size);
        what[strlen(what) - 1] = 'V';
        if (f[l].v.n > 0)
            twin_expect_equal(&f[l].v, what, (size_t)layouts[l].elem_size);
        layer_free(&f[l]);
    }
    free(refs);
    free(spans);
    free(blocks);
    free(f);
}

/* ---- rotate ---- */

/* One unit in the last place of `dtype` at magnitude m. */
static double ulp_at(int dtype, double m)
{
    int mant = dtype == KVRT_LAYOUT_F32 ? 23 : dtype == KVRT_LAYOUT_F16 ? 10 : 7;
    double min_normal = dtype == KVRT_LAYOUT_F16 ? ldexp(1.0, -14) : ldexp(1.0, -126);
    if (m < min_normal)
        m = min_normal;
    int e;
    frexp(m, &e); /* m = f * 2^e, f in [0.5, 1) */
    return ldexp(1.0, e - 1 - mant);
}

/* The bound of GPU against CPU rotation. Both compute c = (float)cos(angle)
 * and s = (float)sin(angle) from a double angle, then x*c - y*s and x*s + y*c
 * unfused in f32, then round to the dtype. The device's pow, cos and sin
 * (double) are within 2 ulp and glibc's within 1, so c and s agree except
 * when a double result lies within 3 double-ulps of a float rounding
 * boundary, and then differ by one float ulp (<= 2^-24 as |c|, |s| <= 1).
 * That moves x*c - y*s by at most (|x| + |y|) * 2^-24 <= 2 * 2 * 2^-24
 * = 2^-22 for inputs in [-2, 2], plus at most one ulp of f32 from the f32
 * roundings landing on the other side, and the final rounding to the dtype
 * can then pick the neighbouring value: one ulp of the dtype. So
 * |gpu - cpu| <= ulp_dtype(|r|) + ulp_f32(|r|) + 2^-22. */
static void check_rotated(const twin *t, int dtype, const char *what)
{
    char *a = twin_get(t, CPU), *b = twin_get(t, DEV);
    int64_t n = (int64_t)(t->n / dtype_size(dtype)), n_diff = 0, n_bad = 0, first_bad = -1;
    double worst = 0;
    for (int64_t i = 0; i < n; i++) {
        double x = kvrt_load(a, dtype, i), y = kvrt_load(b, dtype, i);
        if (x == y || (x != x && y != y))
            continue;
        n_diff++;
        double m = fabs(x) > fabs(y) ? fabs(x) : fabs(y);
        double bound = ulp_at(dtype, m) + ulp_at(KVRT_LAYOUT_F32, m) + ldexp(1.0, -22);
        double d = fabs(x - y);
        if (d > worst)
            worst = d;
        if (!(d <= bound)) {
            if (first_bad < 0)
                first_bad = i;
            n_bad++;
        }
    }
    CHECK(n_bad == 0, "%s: %lld of %lld elements beyond the bound (first %lld), worst %g",
          what, (long long)n_bad, (long long)n, (long long)first_bad, worst);
    if (n_diff > 0)
        printf("  %s: %lld of %lld elements differ within the bound (worst %g)\n", what,
               (long long)n_diff, (long long)n, worst);
    free(a);
    free(b);
}

static void test_rotate(rng *r, const kvrt_layout *layouts, int n_layers, int32_t n_blocks,
                        int32_t n, int style, int64_t max_delta)
{
    char name[160], what[320];
    layer_fix *f = calloc((size_t)n_layers, sizeof *f);
    int32_t max_rot = 0;
    for (int l = 0; l < n_layers; l++) {
        layer_make(&f[l], layouts[l], n_blocks, r, 1);
        if (layouts[l].rot_dims > max_rot)
            max_rot = layouts[l].rot_dims;
    }
    int32_t total = n_blocks * layouts[0].block_size;
    if (n > total)
        n = total;
    int32_t *slots = malloc((size_t)n * sizeof *slots), *deltas = malloc((size_t)n * sizeof *deltas);
    rng_distinct(r, slots, n, total);
    for (int32_t i = 0; i < n; i++) {
        switch (rng_below(r, 6)) {
        case 0: deltas[i] = 0; break;
        case 1: deltas[i] = rng_below(r, 2) ? 1 : -1; break;
        case 2: deltas[i] = (int32_t)(rng_below(r, 2 * max_delta + 1) - max_delta); break;
        default: deltas[i] = (int32_t)(rng_below(r, 8193) - 4096); break;
        }
    }
    kvrt_rope rope = {max_rot, style, 10000.0f, 1.0f};
    if (style == 1) {
        rope.theta = 500000.0f;
        rope.freq_scale = 0.25f;
    }
    kvrt_layer_ref *refs = malloc(2 * (size_t)n_layers * sizeof *refs);
    for (int s = 0; s < 2; s++)
        for (int l = 0; l < n_layers; l++)
            refs[s * n_layers + l] = layer_ref(&f[l], s);
    rotate_both(refs, n_layers, max_rot, rope, slots, deltas, n);
    for (int l = 0; l < n_layers; l++) {
        layout_name(&layouts[l], name, sizeof name);
        snprintf(what, sizeof what, "rotate %s layer %d/%d (%s), %d slots: K",
                 style ? "neox" : "normal", l, n_layers, name, n);
        check_rotated(&f[l].k, layouts[l].dtype, what);
        if (f[l].v.n > 0) { /* V is never touched */
            what[strlen(what) - 1] = 'V';
            twin_expect_equal(&f[l].v, what, (size_t)layouts[l].elem_size);
        }
        layer_free(&f[l]);
    }
    free(refs);
    free(slots);
    free(deltas);
    free(f);
}

/* ---- attention ---- */

/* The bound of GPU against CPU attention, per output element, derived from
 * the data (attention_bounds computes it; the style of check_case in
 * tests/attention/test_attention_cpu.c). Both sides read the same stored q,
 * K, V exactly into f32, so each is within B of the exact attention over
 * them and the two are within 2 B, plus each side's final rounding to the
 * output dtype (an ulp of it on each side, at the larger magnitude m). With
 * u = 2^-24, for one row (token, query head) over the n keys it sees:
 *   M = max_j sum_i |q_i k_ji| bounds the dot magnitudes; pre-RoPE takes
 *       2 |q_rot|_1 max|k_j,rot| over the rotary dims instead, which bounds
 *       sum |q'_i k'_i| of turned values (a turn keeps pair norms:
 *       |q'|_1 <= sqrt(2) |q|_1, |k'| <= sqrt(2) max|k|);
 *   S = |scale| M, or softcap if smaller, bounds |logit|;
 *   logit error D <= |scale| (dk + 12 + 8 prerope) u M + 4 u S + 4 u softcap:
 *       an f32 dot of dk products summed in any order (a GPU reduction
 *       tree, the twin's partial sums under every ISA) is within dk u sum
 *       |q_i k_i| to first order, the 12 the scale product and slack; s / c,
 *       tanhf within 2 ulp and c * tanh; pre-RoPE: a turned element is
 *       within 3 u r of exact (r its pair's norm; c, s rounded, two
 *       products, a sum), 6 u |q_rot|_1 max|k_rot| for K's turn and 8.5 u
 *       for q's, under 8 u M;
 *   a weight's relative error E_p <= 2 D (s_j and the max m) + 2 u S + 4 u
 *       (s - m rounded, expf within 2 ulp) + 4 u n + 2 u S (the online
 *       rescalings by expf(m_old - m_new): at most one per key, arguments
 *       summing to at most 2 S) + 3 (4 u + 2 u S) (merges of lanes, splits,
 *       partials: three levels at most, one expf of a difference each);
 *   o = sum p_j v_j / sum p_j moves by E_p sum p_j |v_j - o| / sum p_j
 *       <= 2 E_p A, with A <= max_j |v_jd| (A: the weighted mean of |v|);
 *   f32 accumulation over n keys, three roundings a step (product,
 *       rescale, sum) in sum p v and in sum p (times |o| <= A), and the
 *       division: (6 n + 33) u A.
 * So B = 2 A (2 E_p + (6 n + 33) u), the first-order bound doubled for the
 * second-order terms left out (as in check_case). The tensor-core kernels
 * add their rounding of P, u_dtype A (attention_tensor_core_extra). */
static int attention_close(float a, float b, int dtype, double bound)
{
    if (a != a || b != b)
        return a != a && b != b;
    double m = fabs(a) > fabs(b) ? fabs(a) : fabs(b);
    return fabs((double)a - (double)b) <= bound + 2 * ulp_at(dtype, m);
}

/* The terms of attention_close's bound for one row: n keys, dot magnitude
 * M; returns 2 E_p + (6 n + 33) u, the factor of 2 A in B. */
static double attention_row_factor(double n, double M, int32_t dim_k, double scale, double softcap,
                                   int prerope)
{
    const double u = 0x1p-24;
    double S = fabs(scale) * M;
    if (softcap > 0 && softcap < S)
        S = softcap;
    double D = fabs(scale) * (dim_k + 12 + (prerope ? 8 : 0)) * u * M + 4 * u * S + 4 * u * softcap;
    double E_p = 2 * D + 2 * u * S + 4 * u + 4 * u * n + 2 * u * S + 3 * (4 * u + 2 * u * S);
    return 2 * E_p + (6 * n + 33) * u;
}

typedef struct attn_case {
    kvrt_layout L;
    int         mla;         /* V is the first dim_v values of the K row */
    int32_t     dim_v;       /* output values per head */
    int32_t     n_blocks;
    int32_t     n_seqs;
    int32_t     max_seq_blocks;
    int32_t     tokens_per_seq; /* 1: decode; more: a prefill chunk */
    int32_t     n_q_heads;
    int32_t     window;
    int32_t     causal;      /* 0 with positions NULL: cross-attention */
    float       softcap;
    int         q_dtype, out_dtype;
    int         nan_inputs;  /* NaN in one query row and in one K row a token sees */
    int         launches;    /* kvrt-sim: device launches expected (0: any) */
    int         full_seqs;   /* every sequence holds max_seq_blocks blocks */
    int         ragged;      /* tokens per sequence drawn from 1 .. 2 * tokens_per_seq */
    int         nan_q;       /* one token's queries are NaN: its rows come out NaN */
    int         mla_kernel;  /* kvrt-sim: the call must run attention_mla.cu's kernel */
    int         prerope;     /* pre-RoPE: 1 keys turned in attention, 2 keys and queries */
    int         rope_style;  /* with prerope: 0 normal, 1 neox (theta: L.rope_theta) */
} attn_case;

/* Whether the glue sends the case to the tensor-core prefill kernel: the
 * rule of attention_prefill_shaped in src/backend_gpu.c (more than 8
 * tokens per sequence on average, f16 or bf16 cache and queries, not MLA,
 * head_dim_k == head_dim_v in {64, 96, 128}). */
static int attention_on_tensor_cores(const attn_case *c, int32_t n_tokens)
{
    int dim = c->L.dim_k;
    return n_tokens > 8 * c->n_seqs && c->L.dtype != KVRT_LAYOUT_F32 && c->q_dtype == c->L.dtype &&
           !c->mla && c->L.dim_v == dim && (dim == 64 || dim == 96 || dim == 128);
}

/* The tensor-core kernel's bound beyond attention_close's: it rounds the
 * softmax weights p (in [0, 1]) to the cache dtype before P V while the
 * sum l is of the unrounded weights, so an output moves by
 * |sum_j (p~_j - p_j) v_j| / l <= u * sum_j p_j |v_j| / l = u A, u = 2^-11
 * for f16 and 2^-8 for bf16; returns u (times A <= max_j |v_jd| there).
 * Q and K enter the products exactly (f16/bf16 products are exact in f32). */
static double attention_tensor_core_extra(int cache_dtype)
{
    return cache_dtype == KVRT_LAYOUT_F16 ? 0x1p-11 : 0x1p-8;
}

/* Whether the glue sends the case to the MLA kernel: the rule of
 * attention_mla_takes in kernels/attention_mla.cu (MLA rows of 512 + 64,
 * f16 or bf16 cache and queries of the same dtype, at most 8 query tokens
 * per sequence on average). */
static int attention_on_mla_kernel(const attn_case *c, int32_t n_tokens)
{
    return c->mla && c->L.dim_k == 576 && c->dim_v == 512 && c->L.dtype != KVRT_LAYOUT_F32 &&
           c->q_dtype == c->L.dtype && (n_tokens + c->n_seqs - 1) / c->n_seqs <= 8;
}

/* attention_close's bound for every output element of a case: for each
 * row (token, query head), M, n and per element max_j |v_jd| over the keys
 * the token sees (causal: positions 0 <= p <= its own, inside the window;
 * cross: every used slot of its sequence). Rows with NaN (masked slots,
 * NaN inputs) drop out of the maxima (fmax), where the outputs are NaN. */
static double *attention_bounds(const attn_case *c, const layer_fix *f, const twin *q,
                                int32_t n_tokens, const int32_t *tok_seq, const int32_t *tok_pos,
                                const int32_t *pos, const int32_t *indptr, const int32_t *indices,
                                const int32_t *n_slots, double tc_u)
{
    const kvrt_layout *L = &c->L;
    const int32_t bs = L->block_size, dk = L->dim_k, dv = c->dim_v;
    const double scale = 1.0f / sqrtf((float)dk); /* op.scale */
    int64_t nk_el = (int64_t)(f->k.n / (size_t)L->elem_size);
    int64_t nv_el = f->v.n > 0 ? (int64_t)(f->v.n / (size_t)L->elem_size) : 0;
    int64_t nq_el = (int64_t)n_tokens * c->n_q_heads * dk;
    char *kh = twin_get(&f->k, CPU), *vh = nv_el > 0 ? twin_get(&f->v, CPU) : NULL;
    char *qh = twin_get(q, CPU);
    float *kf = malloc((size_t)nk_el * sizeof *kf), *vf = malloc((size_t)(nv_el + 1) * sizeof *vf);
    float *qf = malloc((size_t)nq_el * sizeof *qf);
    for (int64_t i = 0; i < nk_el; i++)
        kf[i] = fabsf(kvrt_load(kh, L->dtype, i));
    for (int64_t i = 0; i < nv_el; i++)
        vf[i] = fabsf(kvrt_load(vh, L->dtype, i));
    for (int64_t i = 0; i < nq_el; i++)
        qf[i] = fabsf(kvrt_load(qh, c->q_dtype, i));
    const int32_t rot0 = c->prerope ? L->rot_offset : dk, rot1 = c->prerope ? L->rot_offset + L->rot_dims : dk;
    double *bound = malloc((size_t)n_tokens * (size_t)c->n_q_heads * (size_t)dv * sizeof *bound);
    double *vmax = malloc((size_t)dv * sizeof *vmax);
    for (int32_t t = 0; t < n_tokens; t++) {
        const int32_t s = tok_seq[t];
        for (int32_t h = 0; h < c->n_q_heads; h++) {
            const int32_t kvh = h / (c->n_q_heads / L->n_heads);
            const float *qr = qf + ((int64_t)t * c->n_q_heads + h) * dk;
            double q1_rot = 0, M = 0, nk = 0;
            for (int32_t d = rot0; d < rot1; d++)
                q1_rot += qr[d];
            for (int32_t d = 0; d < dv; d++)
                vmax[d] = 0;
            for (int32_t i = 0; i < n_slots[s]; i++) {
                const int32_t slot = indices[indptr[s] + i / bs] * bs + i % bs;
                if (c->causal && (pos[slot] < 0 || pos[slot] > tok_pos[t] ||
                                  (c->window > 0 && pos[slot] <= tok_pos[t] - c->window)))
                    continue;
                nk++;
                const float *kr = kf + kvrt_k_index(L, slot, kvh);
                double dot = 0, krot = 0;
                for (int32_t d = 0; d < dk; d++) {
                    if (d >= rot0 && d < rot1)
                        krot = fmax(krot, kr[d]);
                    else
                        dot += (double)qr[d] * kr[d];
                }
                M = fmax(M, dot + 2 * q1_rot * krot);
                const float *vr = c->mla ? kr : vf + kvrt_v_index(L, slot, kvh);
                for (int32_t d = 0; d < dv; d++)
                    vmax[d] = fmax(vmax[d], vr[d]);
            }
            const double g = attention_row_factor(nk, M, dk, scale, c->softcap, c->prerope);
            double *br = bound + ((int64_t)t * c->n_q_heads + h) * dv;
            for (int32_t d = 0; d < dv; d++)
                br[d] = 2 * (2 * vmax[d] * g) + tc_u * vmax[d]; /* GPU and twin, P rounding */
        }
    }
    free(vmax);
    free(kf);
    free(vf);
    free(qf);
    free(kh);
    free(vh);
    free(qh);
    return bound;
}

/* The keys a token of sequence s at position tp sees (every used slot for
 * cross-attention; causal: those at or before tp, inside the window). */
static int32_t keys_seen(const attn_case *c, const int32_t *pos, const int32_t *indptr,
                         const int32_t *indices, const int32_t *n_slots, int32_t s, int32_t tp)
{
    const int32_t bs = c->L.block_size;
    int32_t n = 0;
    for (int32_t i = 0; i < n_slots[s]; i++) {
        const int32_t slot = indices[indptr[s] + i / bs] * bs + i % bs;
        n += !c->causal || (pos[slot] >= 0 && pos[slot] <= tp &&
                            (c->window <= 0 || pos[slot] > tp - c->window));
    }
    return n;
}

static void test_attention(rng *r, attn_case c)
{
    const kvrt_layout L = c.L;
    const int32_t bs = L.block_size;
    layer_fix f;
    layer_make(&f, L, c.n_blocks, r, 1);
    /* positions: per sequence mostly increasing, with holes; the rows of
     * holes and unused slots hold NaN, which must never reach an output */
    size_t n_pos = (size_t)c.n_blocks * (size_t)bs;
    int32_t *pos = malloc(n_pos * sizeof *pos);
    for (size_t i = 0; i < n_pos; i++)
        pos[i] = -1;
    int32_t *order = malloc((size_t)c.n_blocks * sizeof *order);
    rng_distinct(r, order, c.n_blocks, c.n_blocks);
    int32_t *indptr = calloc((size_t)c.n_seqs + 1, sizeof *indptr);
    int32_t *indices = malloc((size_t)c.n_blocks * sizeof *indices);
    int32_t *n_slots = malloc((size_t)c.n_seqs * sizeof *n_slots);
    int32_t *max_pos = malloc((size_t)c.n_seqs * sizeof *max_pos);
    int32_t used = 0, max_seq_slots = 0;
    for (int32_t s = 0; s < c.n_seqs; s++) {
        int32_t nb = c.full_seqs ? c.max_seq_blocks : 1 + (int32_t)rng_below(r, c.max_seq_blocks);
        if (used + nb > c.n_blocks)
            nb = c.n_blocks - used;
        indptr[s + 1] = indptr[s] + nb;
        for (int32_t b = 0; b < nb; b++)
            indices[indptr[s] + b] = order[used + b];
        used += nb;
        n_slots[s] = nb > 0 ? (nb - 1) * bs + 1 + (int32_t)rng_below(r, bs) : 0;
        if (n_slots[s] > max_seq_slots)
            max_seq_slots = n_slots[s];
        int32_t p = 0;
        max_pos[s] = 0;
        for (int32_t i = 0; i < n_slots[s]; i++) {
            int32_t slot = indices[indptr[s] + i / bs] * bs + i % bs;
            int hole = (s == 0 && i == 0) || rng_below(r, 10) == 0;
            pos[slot] = c.causal && hole ? -1 : p;
            p += 1 + (rng_below(r, 8) == 0); /* sometimes a gap */
            max_pos[s] = p;
        }
    }
    /* NaN in every row no token may see */
    {
        char *k = twin_get(&f.k, CPU), *v = f.v.n > 0 ? twin_get(&f.v, CPU) : NULL;
        for (size_t slot = 0; slot < n_pos; slot++) {
            if (pos[slot] >= 0 && c.causal)
                continue;
            int inside = 0;
            for (int32_t s = 0; s < c.n_seqs && !inside; s++)
                for (int32_t b = indptr[s]; b < indptr[s + 1] && !inside; b++)
                    inside = (int64_t)slot / bs == indices[b] &&
                             (int64_t)(b - indptr[s]) * bs + (int64_t)slot % bs < n_slots[s];
            if (!c.causal && inside)
                continue; /* cross-attention sees every used slot */
            for (int32_t h = 0; h < L.n_heads; h++) {
                for (int32_t d = 0; d < L.dim_k; d++)
                    kvrt_store(k, L.dtype, kvrt_k_index(&L, (int64_t)slot, h) + d, NAN);
                for (int32_t d = 0; v != NULL && d < L.dim_v; d++)
                    kvrt_store(v, L.dtype, kvrt_v_index(&L, (int64_t)slot, h) + d, NAN);
            }
        }
        twin_set(&f.k, k);
        if (v != NULL)
            twin_set(&f.v, v);
        free(k);
        free(v);
    }
    twin pos_dev;
    twin_alloc(&pos_dev, n_pos * sizeof *pos);
    twin_set(&pos_dev, pos);
    if (c.nan_inputs) { /* the last sequence's first used slot: K of head 0 */
        int32_t s = c.n_seqs - 1, slot = indices[indptr[s]] * bs;
        if (n_slots[s] > 0 && (!c.causal || pos[slot] >= 0)) {
            char *k = twin_get(&f.k, CPU);
            kvrt_store(k, L.dtype, kvrt_k_index(&L, slot, 0) + L.dim_k / 2, NAN);
            twin_set(&f.k, k);
            free(k);
        }
    }
    /* tokens */
    int32_t n_tokens = c.n_seqs * c.tokens_per_seq;
    int32_t *per_seq = malloc((size_t)c.n_seqs * sizeof *per_seq);
    for (int32_t s = 0; s < c.n_seqs; s++) {
        per_seq[s] = c.ragged ? 1 + (int32_t)rng_below(r, 2 * c.tokens_per_seq) : c.tokens_per_seq;
        n_tokens += c.ragged ? per_seq[s] - c.tokens_per_seq : 0;
    }
    int32_t *tok_seq = malloc((size_t)n_tokens * sizeof *tok_seq);
    int32_t *tok_pos = malloc((size_t)n_tokens * sizeof *tok_pos);
    for (int32_t t = 0, s = 0, in_seq = 0; t < n_tokens; t++) {
        while (in_seq == per_seq[s])
            s++, in_seq = 0;
        in_seq++;
        tok_seq[t] = s;
        /* a position where the token sees a key (a few draws) */
        for (int tries = 0; tries < 64; tries++) {
            tok_pos[t] = (int32_t)rng_below(r, max_pos[tok_seq[t]] + 1);
            if (keys_seen(&c, pos, indptr, indices, n_slots, s, tok_pos[t]) > 0)
                break;
        }
    }
    tok_pos[0] = 0; /* sequence 0's slot 0 is a hole: this token may see nothing */
    /* no vacuous case: every other token sees a key, so that each output
     * but the first checks the kernel's arithmetic */
    for (int32_t t = 1; t < n_tokens; t++)
        CHECK(keys_seen(&c, pos, indptr, indices, n_slots, tok_seq[t], tok_pos[t]) > 0,
              "attention case: token %d of sequence %d (position %d, window %d) sees no key", t,
              tok_seq[t], tok_pos[t], c.window);
    const int32_t nan_token = c.nan_q ? n_tokens / 2 : -1;
    const int tc = !c.prerope && (attention_on_tensor_cores(&c, n_tokens) ||
                                  attention_on_mla_kernel(&c, n_tokens));
    /* the MLA kernel rounds P as the prefill kernel does: the same bound */
    const double extra = tc ? attention_tensor_core_extra(c.L.dtype) : 0.0;
    size_t q_elems = (size_t)n_tokens * (size_t)c.n_q_heads * (size_t)L.dim_k;
    size_t out_bytes = (size_t)n_tokens * (size_t)c.n_q_heads * (size_t)c.dim_v * dtype_size(c.out_dtype);
    twin q, out;
    twin_alloc(&q, q_elems * dtype_size(c.q_dtype));
    twin_alloc(&out, out_bytes);
    void *host = malloc(q_elems * dtype_size(c.q_dtype) > out_bytes ? q_elems * dtype_size(c.q_dtype) : out_bytes);
    fill_finite(r, host, c.q_dtype, (int64_t)q_elems);
    if (c.nan_inputs) /* the last head of the last token */
        kvrt_store(host, c.q_dtype, ((int64_t)n_tokens * c.n_q_heads - 1) * L.dim_k, NAN);
    for (int64_t e = 0; nan_token >= 0 && e < (int64_t)c.n_q_heads * L.dim_k; e++)
        kvrt_store(host, c.q_dtype, (int64_t)nan_token * c.n_q_heads * L.dim_k + e, NAN);
    twin_set(&q, host);
    memset(host, 0x7f, out_bytes);
    twin_set(&out, host);
    const void *d_tok_seq[2], *d_tok_pos[2], *d_indptr[2], *d_indices[2], *d_n_slots[2];
    stage_both(tok_seq, (size_t)n_tokens * sizeof *tok_seq, d_tok_seq);
    stage_both(tok_pos, (size_t)n_tokens * sizeof *tok_pos, d_tok_pos);
    stage_both(indptr, ((size_t)c.n_seqs + 1) * sizeof *indptr, d_indptr);
    stage_both(indices, (size_t)(indptr[c.n_seqs] > 0 ? indptr[c.n_seqs] : 1) * sizeof *indices, d_indices);
    stage_both(n_slots, (size_t)c.n_seqs * sizeof *n_slots, d_n_slots);
    kvrt_status st[2];
    for (int s = 0; s < 2; s++) {
        kvrt_attention_op op;
        memset(&op, 0, sizeof op);
        op.layer = layer_ref(&f, s);
        op.pos = c.causal ? pos_dev.p[s] : NULL;
        op.causal = c.causal;
        op.window = c.window;
        op.mla = c.mla;
        op.dim_v = c.dim_v;
        op.n_tokens = n_tokens;
        op.n_q_heads = c.n_q_heads;
        op.scale = 1.0f / sqrtf((float)L.dim_k);
        op.softcap = c.softcap;
        op.q_dtype = c.q_dtype;
        op.out_dtype = c.out_dtype;
        op.q = q.p[s];
        op.out = out.p[s];
        op.tok_seq = d_tok_seq[s];
        op.tok_pos = d_tok_pos[s];
        op.page_indptr = d_indptr[s];
        op.page_indices = d_indices[s];
        op.seq_n_slots = d_n_slots[s];
        op.n_seqs = c.n_seqs;
        op.max_seq_slots = max_seq_slots;
        op.rope_in_attention = c.prerope > 0;
        op.rotate_q = c.prerope > 1;
        op.rope.n_rot = L.rot_dims;
        op.rope.style = c.rope_style;
        op.rope.theta = L.rope_theta;
        op.rope.freq_scale = 1.0f;
#if defined(KVRT_GPU_SIM)
        long launched = kvrt_sim_calls(KVRT_SIM_LAUNCH);
        const long mla_launched = kvrt_sim_launches_of("attention_mla_kernel");
#endif
        st[s] = be[s].ops->attention(&be[s], &op, NULL);
#if defined(KVRT_GPU_SIM)
        launched = kvrt_sim_calls(KVRT_SIM_LAUNCH) - launched;
        CHECK(s == CPU || c.launches == 0 || launched == c.launches,
              "attention: %ld launches (%d tokens over up to %d slots), expected %d", launched,
              n_tokens, max_seq_slots, c.launches);
        CHECK(s == CPU || !c.mla_kernel ||
                  kvrt_sim_launches_of("attention_mla_kernel") - mla_launched == 1,
              "attention: %d tokens x %d MLA heads did not run the MLA kernel", n_tokens,
              c.n_q_heads);
#endif
    }
    finish_both();
    char name[160];
    layout_name(&L, name, sizeof name);
    CHECK(st[CPU] == KVRT_OK && st[DEV] == KVRT_OK, "attention %s: cpu %s, device %s: %s", name,
          kvrt_status_name(st[CPU]), kvrt_status_name(st[DEV]), kvrt_last_error());
    if (st[CPU] == KVRT_OK && st[DEV] == KVRT_OK) {
        char *a = twin_get(&out, CPU), *b = twin_get(&out, DEV);
        int64_t n = (int64_t)(out_bytes / dtype_size(c.out_dtype)), bad = 0, first = -1, nans = 0;
        const int64_t per_token = (int64_t)c.n_q_heads * c.dim_v;
        double *bound = attention_bounds(&c, &f, &q, n_tokens, tok_seq, tok_pos, pos, indptr,
                                         indices, n_slots, extra);
        for (int64_t i = 0; i < n; i++) {
            float x = kvrt_load(a, c.out_dtype, i), y = kvrt_load(b, c.out_dtype, i);
            nans += x != x && i / per_token != nan_token;
            if (!attention_close(x, y, c.out_dtype, bound[i])) {
                if (first < 0)
                    first = i;
                bad++;
            }
        }
        CHECK(bad == 0, "attention %s, %d q heads, %d tokens%s (window %d, softcap %g, %s -> %s): "
              "%lld of %lld outputs beyond the bound, first %lld: cpu %g device %g",
              name, c.n_q_heads, n_tokens, tc ? " on tensor cores" : "", c.window,
              (double)c.softcap, dtype_str(c.q_dtype),
              dtype_str(c.out_dtype), (long long)bad, (long long)n, (long long)first,
              first >= 0 ? (double)kvrt_load(a, c.out_dtype, first) : 0.0,
              first >= 0 ? (double)kvrt_load(b, c.out_dtype, first) : 0.0);
        free(bound);
        /* NaN sits only in rows no token sees: none may show */
        CHECK(!c.nan_inputs || nans > 0, "attention %s: NaN inputs gave no NaN output", name);
        CHECK(nans == 0 || c.nan_inputs, "attention %s: the CPU twin read %lld NaN outputs from masked rows", name,
              (long long)nans);
        free(a);
        free(b);
    }
    free(host);
    free(pos);
    free(order);
    free(indptr);
    free(indices);
    free(n_slots);
    free(max_pos);
    free(tok_seq);
    free(tok_pos);
    free(per_seq);
    twin_free(&q);
    twin_free(&out);
    twin_free(&pos_dev);
    layer_free(&f);
}

/* ---- the decode attention grid ---- */

/* Decode-shaped calls (1 to 8 query tokens per sequence, f32/f16/bf16
 * caches: attention_decode.cu) over the grid of shapes. The bound is
 * attention_close's: the decode kernel also sums in f32 (dots over a row
 * group's lanes, then slots in a lane's order, then the lanes' and the
 * splits' partials, each rescaled by one expf of a difference of maxima
 * within 2 ulp, a relative error under 2^-21 per merge level, three levels
 * at most, all counted in attention_close's E_p); outputs are
 * poisoned (0x7f bytes) before the call, so a row the kernel skips fails.
 * NaN inputs (a query row, a K row a token sees) must give NaN exactly
 * where the twin gives it. On kvrt-sim the launch count shows whether the
 * call split (kernel + combine) or not. */
/* A causal case of the grid: n_seqs sequences of up to max_seq_blocks
 * blocks (all of them with full), tokens query tokens each. */
static attn_case decode_case(kvrt_layout L, int32_t dim_v, int32_t n_seqs, int32_t max_seq_blocks,
                             int full, int32_t tokens, int32_t n_q_heads, int q_dtype, int out_dtype)
{
    attn_case c;
    memset(&c, 0, sizeof c);
    c.L = L;
    c.dim_v = dim_v;
    c.n_seqs = n_seqs;
    c.max_seq_blocks = max_seq_blocks;
    c.n_blocks = n_seqs * max_seq_blocks;
    c.full_seqs = full;
    c.tokens_per_seq = tokens;
    c.n_q_heads = n_q_heads;
    c.causal = 1;
    c.q_dtype = q_dtype;
    c.out_dtype = out_dtype;
    return c;
}

static void attention_decode_grid(rng *r)
{
    static const int dims[][2] = {{64, 64}, {80, 80}, {96, 96}, {128, 128}, {192, 192},
                                  {256, 256}, {48, 48}, {64, 128}};
    const int f32 = KVRT_LAYOUT_F32, f16 = KVRT_LAYOUT_F16, bf16 = KVRT_LAYOUT_BF16;
    attn_case c;
    /* head dims (templated and generic) x dtypes, under 256 slots: no split */
    for (int i = 0; i < (int)(sizeof dims / sizeof dims[0]); i++) {
        int dt = i % 3;
        c = decode_case(layout_attn(2, dims[i][0], dims[i][1], 16, dt, dims[i][0]), dims[i][1], 3,
                        15, 0, 1 + i % 3, 2 * (1 + i % 5), (dt + 1) % 3, i % 2 ? f32 : dt);
        c.launches = 1;
        test_attention(r, c);
    }
    /* group sizes 1..16 with 1..8 query tokens over up to 1600 slots */
    static const int groups[] = {1, 2, 3, 4, 6, 8, 12, 16};
    for (int i = 0; i < 8; i++) {
        c = decode_case(layout_attn(2, 128, 128, 16, f16, 128), 128, 2, 100, 0, 1 + i,
                        2 * groups[i], f16, i % 2 ? f16 : f32);
        c.window = i == 5 ? 300 : 0;
        c.softcap = i == 3 ? 30.0f : 0.0f;
        test_attention(r, c);
    }
    /* block sizes 1, 16, 64, 256 over many blocks: over 768 slots split,
     * under 256 not */
    static const int block_sizes[] = {1, 16, 64, 256};
    for (int i = 0; i < 4; i++)
        for (int split = 0; split < 2; split++) {
            int bs = block_sizes[i], blocks = (split ? 1200 : 250) / bs;
            c = decode_case(layout_attn(1, 64, 64, bs, bf16, 64), 64, split ? 1 : 4,
                            blocks > 0 ? blocks : 1, split, split ? 4 : 1, 8, bf16, bf16);
            c.launches = split ? 2 : 1;
            test_attention(r, c);
        }
    /* one long sequence split many ways: window and soft-cap, NaN inputs */
    c = decode_case(layout_attn(2, 128, 128, 16, f32, 128), 128, 1, 200, 1, 2, 8, f32, f32);
    c.window = 700;
    c.softcap = 20.0f;
    c.launches = 2;
    test_attention(r, c);
    c.window = 0;
    c.softcap = 0.0f;
    c.nan_inputs = 1;
    test_attention(r, c);
    c = decode_case(layout_attn(4, 96, 96, 16, f16, 96), 96, 3, 10, 0, 3, 16, f16, f16);
    c.nan_inputs = 1;
    c.launches = 1;
    test_attention(r, c);
    /* cross-attention: no positions, no causal mask */
    for (int tps = 1; tps <= 5; tps += 4) {
        c = decode_case(layout_attn(2, 64, 64, 128, f16, 0), 64, 4, 1, 0, tps, 16, f16, f32);
        c.causal = 0;
        c.launches = 1;
        test_attention(r, c);
    }
}

/* ---- the MLA attention grid ---- */

/* Decode-shaped MLA calls (latent rows of 512 + 64, V their first 512; 1 to
 * 8 query tokens per sequence; f16 or bf16 cache and queries) run
 * attention_mla.cu's tensor-core kernel, which every case asserts on
 * kvrt-sim. Bound: attention_close's plus attention_tensor_core_extra's.
 * The f32 dots over 576 dims (products of f16/bf16 values exact in f32;
 * four partial sums of 144 dims meeting in one more f32 addition each) are
 * inside attention_close's dk u sum |q_i k_i|; the weights p rounded to the
 * cache dtype before P V move an output by at most u A (u = 2^-11 f16,
 * 2^-8 bf16), the extra; the splits' merge adds under 2^-21 relative per
 * level, inside E_p's merge terms. Outputs are poisoned before
 * the call; sequence 0's first token sees no key (zeros); rows of holes
 * and unused slots hold NaN and must stay invisible. NaN inputs are tried
 * without windows: a visible NaN V reaches rows of the CTA that mask it
 * (0 * NaN), where the twin skips the zero weight (attention_mla.cu). */
static attn_case mla_case(int32_t block_size, int dtype, int32_t n_seqs, int32_t slots,
                          int full, int32_t tokens, int32_t n_q_heads, int out_dtype)
{
    int32_t blocks = (slots + block_size - 1) / block_size;
    attn_case c = decode_case(layout_mla(512, 64, block_size, dtype), 512, n_seqs,
                              blocks > 0 ? blocks : 1, full, tokens, n_q_heads, dtype, out_dtype);
    c.mla = 1;
    c.mla_kernel = 1;
    return c;
}

static void attention_mla_grid(rng *r)
{
    const int f32 = KVRT_LAYOUT_F32, f16 = KVRT_LAYOUT_F16, bf16 = KVRT_LAYOUT_BF16;
    attn_case c;
    /* block sizes 1, 16, 64, 256 x heads 16, 64, 128, dtypes, output dtypes;
     * contexts of up to 120 slots crossing many blocks: no split */
    static const int block_sizes[] = {1, 16, 64, 256}, heads[] = {16, 64, 128, 16};
    for (int i = 0; i < 4; i++) {
        const int dt = i % 2 ? f16 : bf16;
        c = mla_case(block_sizes[i], dt, 3, 120, 0, i == 3 ? 2 : 1, heads[i], i % 3 == 0 ? f32 : dt);
        c.launches = 1;
        test_attention(r, c);
    }
    /* several query tokens per sequence (rows of one CTA at several
     * positions) with windows and soft-caps, ragged token counts; one
     * sequence long enough to split (kernel + combine); NaN in a query row
     * and in a K row tokens see; a token's queries NaN */
    static const struct {
        int32_t bs, dt, seqs, slots, full, tokens, heads, out, window;
        float   softcap;
        int     ragged, launches, nan_inputs, nan_q;
    } more[] = {
        {64, KVRT_LAYOUT_BF16, 2, 150, 0, 3, 16, KVRT_LAYOUT_BF16, 40, 30.0f, 0, 1, 0, 0},
        {16, KVRT_LAYOUT_F16, 3, 60, 0, 8, 16, KVRT_LAYOUT_F32, 25, 0.0f, 0, 1, 0, 0},
        {16, KVRT_LAYOUT_BF16, 3, 60, 0, 2, 16, KVRT_LAYOUT_BF16, 0, 15.0f, 1, 1, 0, 0},
        /* split cases: sequence 0's token is the one that sees no key, the
         * other's sees 576 and 1800 slots over 2 and 4 splits */
        {64, KVRT_LAYOUT_BF16, 2, 576, 1, 1, 16, KVRT_LAYOUT_BF16, 0, 0.0f, 0, 2, 0, 0},
        {64, KVRT_LAYOUT_F16, 2, 1800, 1, 1, 64, KVRT_LAYOUT_F32, 0, 0.0f, 0, 2, 0, 0},
        {16, KVRT_LAYOUT_F16, 3, 80, 0, 1, 64, KVRT_LAYOUT_F16, 0, 0.0f, 0, 1, 1, 0},
        {64, KVRT_LAYOUT_BF16, 3, 70, 0, 1, 16, KVRT_LAYOUT_F32, 0, 0.0f, 0, 1, 0, 1},
    };
    for (size_t i = 0; i < sizeof more / sizeof more[0]; i++) {
        c = mla_case(more[i].bs, more[i].dt, more[i].seqs, more[i].slots, more[i].full,
                     more[i].tokens, more[i].heads, more[i].out);
        c.window = more[i].window;
        c.softcap = more[i].softcap;
        c.ragged = more[i].ragged;
        c.launches = more[i].ragged ? 0 : more[i].launches;
        c.nan_inputs = more[i].nan_inputs;
        c.nan_q = more[i].nan_q;
        test_attention(r, c);
    }
}

/* gather: K and V, K or V alone, every dtype, MLA rows. */
static void gather_grid(rng *r)
{
    test_gather(r, layout_attn(8, 128, 128, 16, KVRT_LAYOUT_F16, 128), 64, 700, 1, 1, 0);
    test_gather(r, layout_attn(8, 128, 128, 16, KVRT_LAYOUT_F16, 128), 64, 700, 1, 0, 0);
    test_gather(r, layout_attn(8, 128, 128, 16, KVRT_LAYOUT_F16, 128), 64, 700, 0, 1, 0);
    test_gather(r, layout_attn(4, 64, 256, 1, KVRT_LAYOUT_F32, 64), 4096, 4096, 1, 1, 4);
    test_gather(r, layout_attn(2, 256, 64, 256, KVRT_LAYOUT_BF16, 64), 8, 2048, 1, 1, 2);
    test_gather(r, layout_mla(512, 64, 64, KVRT_LAYOUT_BF16), 16, 1000, 1, 1, 0);
    test_gather(r, layout_mla(512, 2, 16, KVRT_LAYOUT_F16), 32, 300, 1, 0, 2);
}

/* The generic kernel (attention.cu) with rows long enough that its slot
 * groups are a whole warp: lps, the lanes per slot, halves from the warp
 * width while half of them still cover dim_k, so an f32 row of 512 (4 per
 * lane) and an MLA row of 576 read as f32 queries on f16 (8 per lane) keep
 * all 64 lanes of a CDNA wavefront, and every shuffle of the group's sum
 * runs (the warp-width class of bug, in seconds). */
static void attention_wide(rng *r)
{
    const int f32 = KVRT_LAYOUT_F32, f16 = KVRT_LAYOUT_F16;
    attn_case c = decode_case(layout_attn(2, 512, 512, 16, f32, 0), 512, 2, 6, 0, 3, 4, f32, f32);
    test_attention(r, c);
    c = decode_case(layout_mla(512, 64, 16, f16), 512, 2, 5, 0, 2, 16, f32, f32);
    c.mla = 1;
    test_attention(r, c);
}

/* ---- set_pos ---- */

static void test_set_pos(rng *r, int32_t block_size, int32_t n_blocks, int32_t n)
{
    char what[120];
    twin pos;
    size_t count = (size_t)n_blocks * (size_t)block_size;
    twin_alloc(&pos, count * sizeof(int32_t));
    int32_t *host = malloc(count * sizeof *host);
    for (size_t i = 0; i < count; i++)
        host[i] = (int32_t)rng_below(r, 100000) - 1;
    twin_set(&pos, host);
    if (n > n_blocks)
        n = n_blocks;
    int32_t *blocks = malloc((size_t)n * sizeof *blocks);
    int32_t *data = malloc((size_t)n * (size_t)block_size * sizeof *data);
    rng_distinct(r, blocks, n, n_blocks);
    for (int64_t i = 0; i < (int64_t)n * block_size; i++)
        data[i] = (int32_t)rng_below(r, 1 << 30) - 1;
    const void *d_blocks[2], *d_data[2];
    stage_both(blocks, (size_t)n * sizeof *blocks, d_blocks);
    stage_both(data, (size_t)n * (size_t)block_size * sizeof *data, d_data);
    for (int s = 0; s < 2; s++) {
        kvrt_pos_op op;
        memset(&op, 0, sizeof op);
        op.pos = pos.p[s];
        op.block_size = block_size;
        op.blocks = d_blocks[s];
        op.data = d_data[s];
        op.n = n;
        MUST(be[s].ops->set_pos(&be[s], &op, NULL));
    }
    finish_both();
    snprintf(what, sizeof what, "set_pos bs %d, %d of %d blocks", block_size, n, n_blocks);
    twin_expect_equal(&pos, what, sizeof(int32_t));
    free(host);
    free(blocks);
    free(data);
    twin_free(&pos);
}

/* ---- memory operations ---- */

static void test_zero_copy(rng *r)
{
    const size_t n = (size_t)3 << 20;
    twin t;
    twin_alloc(&t, n);
    unsigned char *host = malloc(n);
    for (size_t i = 0; i < n; i++)
        host[i] = (unsigned char)rng_next(r);
    twin_set(&t, host);
    char *p[2] = {t.p[CPU], t.p[DEV]};
    for (int s = 0; s < 2; s++) {
        MUST(be[s].ops->zero(&be[s], p[s] + 1000, 77777, NULL));
        /* disjoint copy */
        MUST(be[s].ops->copy(&be[s], p[s] + 200000, p[s] + 100, 50000, NULL));
        /* overlapping, forward and backward, in few pieces */
        MUST(be[s].ops->copy(&be[s], p[s] + 400000, p[s] + 430000, 100000, NULL));
        MUST(be[s].ops->copy(&be[s], p[s] + 630000, p[s] + 600000, 100000, NULL));
        /* overlapping at a short distance: through a temporary */
        MUST(be[s].ops->copy(&be[s], p[s] + 1000000, p[s] + 1000016, 500000, NULL));
        MUST(be[s].ops->copy(&be[s], p[s] + 2000016, p[s] + 2000000, 500000, NULL));
    }
    finish_both();
    twin_expect_equal(&t, "zero and copy (memmove semantics)", 1);
    free(host);
    twin_free(&t);
}

/* Uploads larger than the staging ring, and a region that grows. */
static void test_upload_grow(rng *r)
{
    const size_t reserve = (size_t)48 << 20, first = (size_t)1 << 20, second = (size_t)33 << 20;
    unsigned char *host = malloc(reserve), *back = malloc(reserve);
    for (size_t i = 0; i < reserve; i++)
        host[i] = (unsigned char)(rng_next(r) | 1); /* never 0: zeroed memory shows */
    void *p = NULL;
    MUST(be[DEV].ops->region_create(&be[DEV], reserve, first, &p));
    MUST(be[DEV].ops->upload(&be[DEV], p, host, first, NULL));
    MUST(be[DEV].ops->region_grow(&be[DEV], p, reserve, first, second));
    MUST(be[DEV].ops->download(&be[DEV], back, p, second, NULL));
    CHECK(memcmp(back, host, first) == 0, "region: committed data changed by growth");
    size_t nonzero = 0;
    for (size_t i = first; i < second; i++)
        nonzero += back[i] != 0;
    CHECK(nonzero == 0, "region: %zu bytes of grown memory not zero", nonzero);
    /* 40 MiB through the ring (4 MiB) in one call, then everything back */
    MUST(be[DEV].ops->region_grow(&be[DEV], p, reserve, second, reserve));
    MUST(be[DEV].ops->upload(&be[DEV], p, host, reserve, NULL));
    MUST(be[DEV].ops->download(&be[DEV], back, p, reserve, NULL));
    CHECK(memcmp(back, host, reserve) == 0, "upload of %zu bytes through the staging ring", reserve);
    be[DEV].ops->region_destroy(&be[DEV], p, reserve);
    free(host);
    free(back);
}

/* Staging rounds of random sizes: wraps the ring many times, and one round
 * larger than the ring forces it to be replaced while in use. Each staged
 * array is copied, in stream order, into a region on the device; the
 * caller's buffer is overwritten right after stage returns (it may be
 * reused at once); the region is read back once per round. */
static void test_staging(rng *r)
{
    const size_t region = (size_t)16 << 20;
    void *dst = NULL;
    MUST(be[DEV].ops->region_create(&be[DEV], region, region, &dst));
    unsigned char *host = malloc(region), *expect = malloc(region), *back = malloc(region);
    for (int round = 0; round < 80; round++) {
        size_t total = 0;
        int pieces = 1 + (int)rng_below(r, 6);
        size_t cap = (size_t)600 << 10;
        if (round == 30) { /* three pieces of 3 MiB in one round: more than the 4 MiB ring */
            pieces = 3;
            cap = (size_t)3 << 20;
        }
        for (int i = 0; i < pieces && total < region; i++) {
            size_t n = round == 30 ? cap : 1 + (size_t)rng_below(r, (int64_t)cap);
            if (total + n > region)
                n = region - total;
            for (size_t j = 0; j < n; j++)
                expect[total + j] = host[total + j] = (unsigned char)rng_next(r);
            const void *staged = NULL;
            MUST(be[DEV].ops->stage(&be[DEV], host + total, n, NULL, &staged));
            /* backend.h: the host buffer may be reused at once (the CPU
             * backend hands the caller's pointer back, so not there) */
            if (be[DEV].device.backend != KVRT_BACKEND_CPU)
                memset(host + total, 0xee, n);
            MUST(be[DEV].ops->copy(&be[DEV], (char *)dst + total, staged, n, NULL));
            total += n;
        }
        be[DEV].ops->stage_reset(&be[DEV], NULL);
        MUST(be[DEV].ops->download(&be[DEV], back, dst, total, NULL));
        CHECK(memcmp(back, expect, total) == 0, "staging round %d: %zu bytes staged, content differs",
              round, total);
    }
    be[DEV].ops->region_destroy(&be[DEV], dst, region);
    free(host);
    free(expect);
    free(back);
}

static void test_mem_kind(void)
{
    kvrt_mem_kind kind;
    int ordinal = -1;
    char *host = malloc(64);
    MUST(be[DEV].ops->mem_kind(&be[DEV], host, &kind, &ordinal));
    CHECK(be[DEV].device.backend == KVRT_BACKEND_CPU || kind == KVRT_MEM_HOST,
          "malloc'd memory classified as %d", (int)kind);
    void *p = NULL;
    MUST(be[DEV].ops->region_create(&be[DEV], 4096, 4096, &p));
    MUST(be[DEV].ops->mem_kind(&be[DEV], (char *)p + 100, &kind, &ordinal));
    CHECK(kind == KVRT_MEM_THIS_DEVICE && ordinal == be[DEV].device.ordinal,
          "region memory classified as %d on device %d", (int)kind, ordinal);
    void *scratch = NULL;
    MUST(be[DEV].ops->scratch_alloc(&be[DEV], 12345, &scratch));
    MUST(be[DEV].ops->mem_kind(&be[DEV], scratch, &kind, &ordinal));
    CHECK(kind == KVRT_MEM_THIS_DEVICE, "scratch memory classified as %d", (int)kind);
    be[DEV].ops->scratch_free(&be[DEV], scratch);
    be[DEV].ops->region_destroy(&be[DEV], p, 4096);
    free(host);
}

/* The grid of the tensor-core prefill kernel (attention_on_tensor_cores
 * holds for every case): head dims 64, 96, 128; groups of 1, 4 and 8 query
 * heads per kv head; blocks of 1, 16, 64, 256 slots; contexts over many
 * blocks with holes; windows; soft-cap; cross-attention; ragged batches
 * whose sequences share 64-token chunks; a token with no visible key (the
 * first, in every case) and one with NaN queries. */
static void test_attention_prefill(rng *r)
{
    static const struct {
        int32_t kv_heads, dim, block_size, dtype, n_blocks, n_seqs, max_seq_blocks;
        int32_t tokens_per_seq, n_q_heads, window, causal, ragged, nan_q, out_dtype;
        float   softcap;
        const char *what;
    } grid[] = {
        {2, 128, 16, KVRT_LAYOUT_F16, 64, 2, 20, 70, 8, 0, 1, 0, 0, KVRT_LAYOUT_F16, 0,
         "Llama-like heads, GQA 4, page 16, two chunks per sequence"},
        {2, 64, 1, KVRT_LAYOUT_BF16, 1024, 2, 300, 24, 2, 50, 1, 0, 0, KVRT_LAYOUT_F32, 0,
         "MHA, one slot per block over hundreds of blocks, a window"},
        {1, 96, 64, KVRT_LAYOUT_F16, 24, 5, 4, 14, 8, 0, 1, 1, 1, KVRT_LAYOUT_BF16, 30.0f,
         "GQA 8, page 64, soft-cap, a ragged batch, NaN queries"},
        {1, 128, 256, KVRT_LAYOUT_BF16, 6, 2, 3, 40, 1, 300, 1, 0, 0, KVRT_LAYOUT_BF16, 0,
         "page 256, a window inside the context"},
        {2, 64, 128, KVRT_LAYOUT_F16, 3, 3, 1, 20, 8, 0, 0, 1, 0, KVRT_LAYOUT_F16, 0,
         "cross-attention: no positions, every used slot visible"},
    };
    for (size_t i = 0; i < sizeof grid / sizeof grid[0]; i++) {
        attn_case c;
        memset(&c, 0, sizeof c);
        c.L = layout_attn(grid[i].kv_heads, grid[i].dim, grid[i].dim, grid[i].block_size,
                          grid[i].dtype, grid[i].causal ? grid[i].dim : 0);
        c.dim_v = grid[i].dim;
        c.n_blocks = grid[i].n_blocks;
        c.n_seqs = grid[i].n_seqs;
        c.max_seq_blocks = grid[i].max_seq_blocks;
        c.tokens_per_seq = grid[i].tokens_per_seq;
        c.n_q_heads = grid[i].n_q_heads;
        c.window = grid[i].window;
        c.causal = grid[i].causal;
        c.softcap = grid[i].softcap;
        c.ragged = grid[i].ragged;
        c.nan_q = grid[i].nan_q;
        c.q_dtype = grid[i].dtype;
        c.out_dtype = grid[i].out_dtype;
        if (!attention_on_tensor_cores(&c, c.n_seqs * c.tokens_per_seq))
            CHECK(0, "prefill grid case %zu (%s) would not run on tensor cores", i, grid[i].what);
        test_attention(r, c);
    }
}

/* ---- quantized layers (q8, fp8 e4m3): the "quant" part ----
 *
 * A quantized layer has one f32 scale per (slot, head) row of K and of V
 * (kvrt_layout.h, "quantized rows"). Every op on it is compared with its
 * twin on the CPU backend, bytes and scales bit-exact: the kernels call
 * the same kvrt_quant_row / kvrt_dequant in the same order, so nothing may
 * differ. Sources hold every f32 case (NaN, Inf, subnormals, zeros) and
 * whole zero rows (scale 0); head dims of 37 and 5 take no vector path. */

static const char *qdtype_str(int dtype) { return dtype == KVRT_LAYOUT_Q8 ? "q8" : "fp8"; }

static kvrt_layout qlayout(int n_heads, int dim_k, int dim_v, int block_size, int dtype,
                           int rot_offset, int rot_dims)
{
    kvrt_layout L = {n_heads, dim_k, dim_v, block_size, rot_offset, rot_dims, dtype, 1, 10000.0f};
    return L;
}

typedef struct qlayer_fix {
    kvrt_layout L;
    int32_t     n_blocks;
    twin        k, v, ks, vs;
} qlayer_fix;

/* Any stored bytes (NaN markers included) and finite scales >= 0, some 0. */
static void qfill(rng *r, twin *t, int bytes_are_scales)
{
    unsigned char *host = malloc(t->n > 0 ? t->n : 1);
    if (bytes_are_scales)
        for (size_t i = 0; i < t->n / 4; i++)
            ((float *)host)[i] = rng_below(r, 8) == 0 ? 0.0f : rng_float(r, 0.0f, 0.05f);
    else
        for (size_t i = 0; i < t->n; i++)
            host[i] = (unsigned char)rng_next(r);
    twin_set(t, host);
    free(host);
}

static void qlayer_make(qlayer_fix *f, kvrt_layout L, int32_t n_blocks, rng *r)
{
    memset(f, 0, sizeof *f);
    f->L = L;
    f->n_blocks = n_blocks;
    twin_alloc(&f->k, (size_t)kvrt_block_bytes_k(&L) * (size_t)n_blocks);
    twin_alloc(&f->ks, (size_t)kvrt_block_bytes_scale(&L) * (size_t)n_blocks);
    qfill(r, &f->k, 0);
    qfill(r, &f->ks, 1);
    if (L.dim_v > 0) {
        twin_alloc(&f->v, (size_t)kvrt_block_bytes_v(&L) * (size_t)n_blocks);
        twin_alloc(&f->vs, (size_t)kvrt_block_bytes_scale(&L) * (size_t)n_blocks);
        qfill(r, &f->v, 0);
        qfill(r, &f->vs, 1);
    }
}

static void qlayer_free(qlayer_fix *f)
{
    twin_free(&f->k);
    twin_free(&f->v);
    twin_free(&f->ks);
    twin_free(&f->vs);
}

static kvrt_layer_ref qlayer_ref(const qlayer_fix *f, int side)
{
    kvrt_layer_ref ref;
    memset(&ref, 0, sizeof ref);
    ref.layout = f->L;
    ref.k = f->k.p[side];
    ref.k_scale = f->ks.p[side];
    ref.v = f->v.n > 0 ? f->v.p[side] : NULL;
    ref.v_scale = f->vs.n > 0 ? f->vs.p[side] : NULL;
    return ref;
}

/* Rows turned by arithmetic (rotate): IEEE 754 leaves the sign of a NaN
 * made from NaN operands open (x86 and GPUs propagate whichever operand
 * the compiler put first), so an fp8 NaN marker may be 0x7f on one side
 * and 0xff on the other; both read back as NaN. Every other byte must be
 * equal. */
static void qbytes_expect_equal_nan_sign(const twin *t, int dtype, const char *what)
{
    unsigned char *a = twin_get(t, CPU), *b = twin_get(t, DEV);
    size_t n_diff = 0, first = 0;
    for (size_t i = 0; i < t->n; i++) {
        int nan_pair = dtype == KVRT_LAYOUT_FP8_E4M3 && (a[i] & 0x7f) == 0x7f && (b[i] & 0x7f) == 0x7f;
        if (a[i] != b[i] && !nan_pair && n_diff++ == 0)
            first = i;
    }
    CHECK(n_diff == 0, "%s: first difference at byte %zu (%02x vs %02x), %zu bytes differ of %zu",
          what, first, a[first], b[first], n_diff, t->n);
    free(a);
    free(b);
}

/* The layer's rows and scales, CPU against device; `what` names the op. */
static void qlayer_expect_equal(const qlayer_fix *f, const char *what, int turned)
{
    char name[160], buf[400];
    layout_name(&f->L, name, sizeof name);
    snprintf(buf, sizeof buf, "%s %s (%s): K", what, name, qdtype_str(f->L.dtype));
    if (turned)
        qbytes_expect_equal_nan_sign(&f->k, f->L.dtype, buf);
    else
        twin_expect_equal(&f->k, buf, 1);
    snprintf(buf, sizeof buf, "%s %s (%s): K scales", what, name, qdtype_str(f->L.dtype));
    twin_expect_equal(&f->ks, buf, 4);
    if (f->v.n > 0) {
        snprintf(buf, sizeof buf, "%s %s (%s): V", what, name, qdtype_str(f->L.dtype));
        twin_expect_equal(&f->v, buf, 1);
        snprintf(buf, sizeof buf, "%s %s (%s): V scales", what, name, qdtype_str(f->L.dtype));
        twin_expect_equal(&f->vs, buf, 4);
    }
}

/* n_rows rows quantized from src_dtype (every third head row all zeros), or
 * with src_dtype the layer's dtype copied raw with their scales. */
static void test_quant_write(rng *r, kvrt_layout L, int32_t n_blocks, int src_dtype, int32_t n_rows)
{
    char what[160];
    qlayer_fix f;
    qlayer_make(&f, L, n_blocks, r);
    int raw = src_dtype == L.dtype;
    int32_t *slots = malloc((size_t)n_rows * sizeof *slots);
    rng_distinct(r, slots, n_rows, n_blocks * L.block_size);
    size_t es = raw ? 1 : dtype_size(src_dtype);
    size_t hr = (size_t)n_rows * (size_t)L.n_heads;
    twin src[2], sc[2];
    int32_t dims[2] = {L.dim_k, L.dim_v};
    for (int kv = 0; kv < 2; kv++) {
        size_t n = hr * (size_t)dims[kv];
        unsigned char *host = calloc(1, n * es > 0 ? n * es : 1);
        if (raw)
            for (size_t i = 0; i < n; i++)
                host[i] = (unsigned char)rng_next(r);
        else
            fill_any(r, host, src_dtype, (int64_t)n);
        for (size_t row = 0; row < hr; row += 3) /* zero rows: scale 0 */
            memset(host + row * (size_t)dims[kv] * es, 0, (size_t)dims[kv] * es);
        twin_alloc(&src[kv], n * es);
        twin_set(&src[kv], host);
        float *scales = malloc(hr * sizeof *scales);
        for (size_t i = 0; i < hr; i++)
            scales[i] = rng_float(r, 0.0f, 0.05f);
        twin_alloc(&sc[kv], hr * sizeof *scales);
        twin_set(&sc[kv], scales);
        free(scales);
        free(host);
    }
    const void *d_slots[2];
    stage_both(slots, (size_t)n_rows * sizeof *slots, d_slots);
    for (int s = 0; s < 2; s++) {
        kvrt_write_op op;
        memset(&op, 0, sizeof op);
        op.layer = qlayer_ref(&f, s);
        op.k_src = src[0].p[s];
        op.v_src = L.dim_v > 0 ? src[1].p[s] : NULL;
        op.src_dtype = src_dtype;
        op.n_rows = n_rows;
        op.slots = d_slots[s];
        if (raw) {
            op.k_scale_src = sc[0].p[s];
            op.v_scale_src = sc[1].p[s];
        }
        MUST(be[s].ops->write(&be[s], &op, NULL));
    }
    finish_both();
    snprintf(what, sizeof what, "quant write <- %s, %d rows",
             raw ? "raw" : dtype_str(src_dtype), n_rows);
    qlayer_expect_equal(&f, what, 0);
    for (int kv = 0; kv < 2; kv++) {
        twin_free(&src[kv]);
        twin_free(&sc[kv]);
    }
    free(slots);
    qlayer_free(&f);
}

/* Rows and scales out: raw (convert 0) or dequantized to dst_dtype. */
static void test_quant_gather(rng *r, kvrt_layout L, int32_t n_blocks, int32_t n, int convert,
                              int dst_dtype)
{
    char name[160], what[400];
    layout_name(&L, name, sizeof name);
    qlayer_fix f;
    qlayer_make(&f, L, n_blocks, r);
    int32_t *slots = malloc((size_t)n * sizeof *slots);
    for (int32_t i = 0; i < n; i++)
        slots[i] = (int32_t)rng_below(r, (int64_t)n_blocks * L.block_size);
    size_t des = convert ? dtype_size(dst_dtype) : 1, hr = (size_t)n * (size_t)L.n_heads;
    twin kd, vd, ksd, vsd;
    twin_alloc(&kd, hr * (size_t)L.dim_k * des);
    twin_alloc(&vd, hr * (size_t)L.dim_v * des);
    twin_alloc(&ksd, hr * 4);
    twin_alloc(&vsd, hr * 4);
    size_t big = hr * 1024 * 4;
    char *zeros = calloc(1, big);
    twin_set(&kd, zeros);
    twin_set(&vd, zeros);
    twin_set(&ksd, zeros);
    twin_set(&vsd, zeros);
    const void *d_slots[2];
    stage_both(slots, (size_t)n * sizeof *slots, d_slots);
    for (int s = 0; s < 2; s++) {
        kvrt_gather_op op;
        memset(&op, 0, sizeof op);
        op.layer = qlayer_ref(&f, s);
        op.slots = d_slots[s];
        op.n = n;
        op.k_dst = kd.p[s];
        op.v_dst = L.dim_v > 0 ? vd.p[s] : NULL;
        op.convert = convert;
        op.dst_dtype = dst_dtype;
        op.k_scale_dst = ksd.p[s];
        op.v_scale_dst = L.dim_v > 0 ? vsd.p[s] : NULL;
        MUST(be[s].ops->gather(&be[s], &op, NULL));
    }
    finish_both();
    const char *to = convert ? dtype_str(dst_dtype) : "raw";
    snprintf(what, sizeof what, "quant gather %s (%s) -> %s, %d rows: K", name,
             qdtype_str(L.dtype), to, n);
    twin_expect_equal(&kd, what, des);
    snprintf(what, sizeof what, "quant gather %s (%s) -> %s, %d rows: K scales", name,
             qdtype_str(L.dtype), to, n);
    twin_expect_equal(&ksd, what, 4);
    if (L.dim_v > 0) {
        snprintf(what, sizeof what, "quant gather %s (%s) -> %s, %d rows: V", name,
                 qdtype_str(L.dtype), to, n);
        twin_expect_equal(&vd, what, des);
        snprintf(what, sizeof what, "quant gather %s (%s) -> %s, %d rows: V scales", name,
                 qdtype_str(L.dtype), to, n);
        twin_expect_equal(&vsd, what, 4);
    }
    free(zeros);
    free(slots);
    twin_free(&kd);
    twin_free(&vd);
    twin_free(&ksd);
    twin_free(&vsd);
    qlayer_free(&f);
}

/* A group of quantized layers: move (spans into distinct blocks, scales
 * with their rows) or rotate (n distinct slots, deltas of every size). */
static void test_quant_group(rng *r, const kvrt_layout *layouts, int n_layers, int32_t n_blocks,
                             int32_t n, int rotate, int style)
{
    qlayer_fix *f = calloc((size_t)n_layers, sizeof *f);
    int32_t max_rot = 0;
    for (int l = 0; l < n_layers; l++) {
        qlayer_make(&f[l], layouts[l], n_blocks, r);
        if (layouts[l].rot_dims > max_rot)
            max_rot = layouts[l].rot_dims;
    }
    int32_t bs = layouts[0].block_size, total = n_blocks * bs;
    int32_t *slots = malloc((size_t)total * sizeof *slots), *deltas = malloc((size_t)total * sizeof *deltas);
    kvrt_span *spans = malloc((size_t)n_blocks * sizeof *spans);
    int32_t max_len = 0, n_spans = n < n_blocks / 2 ? n : n_blocks / 2;
    if (rotate) {
        n = n < total ? n : total;
        rng_distinct(r, slots, n, total);
        for (int32_t i = 0; i < n; i++)
            deltas[i] = rng_below(r, 5) == 0 ? 0 : (int32_t)(rng_below(r, 8193) - 4096);
    } else {
        rng_distinct(r, slots, n_blocks, n_blocks); /* a permutation of the blocks */
        for (int32_t i = 0; i < n_spans; i++) {
            int32_t len = 1 + (int32_t)rng_below(r, bs);
            int32_t src_block = slots[n_blocks / 2 + (int32_t)rng_below(r, n_blocks - n_blocks / 2)];
            spans[i].len = len;
            spans[i].src = src_block * bs + (int32_t)rng_below(r, bs - len + 1);
            spans[i].dst = slots[i] * bs + (int32_t)rng_below(r, bs - len + 1);
            max_len = len > max_len ? len : max_len;
        }
    }
    kvrt_rope rope = {max_rot, style, 10000.0f, style ? 0.25f : 1.0f};
    kvrt_layer_ref *refs = malloc(2 * (size_t)n_layers * sizeof *refs);
    for (int s = 0; s < 2; s++)
        for (int l = 0; l < n_layers; l++)
            refs[s * n_layers + l] = qlayer_ref(&f[l], s);
    if (rotate)
        rotate_both(refs, n_layers, max_rot, rope, slots, deltas, n);
    else
        move_both(refs, n_layers, spans, n_spans, max_len);
    for (int l = 0; l < n_layers; l++) {
        char what[96];
        snprintf(what, sizeof what, "quant %s layer %d/%d, %d %s", rotate ? "rotate" : "move", l,
                 n_layers, rotate ? n : n_spans, rotate ? (style ? "slots neox" : "slots") : "spans");
        qlayer_expect_equal(&f[l], what, rotate);
        qlayer_free(&f[l]);
    }
    free(refs);
    free(spans);
    free(slots);
    free(deltas);
    free(f);
}

/* The "quant" part: every op on q8 and fp8 layers. */
static void test_quant_ops(rng *r)
{
    for (int qt = KVRT_LAYOUT_Q8; qt <= KVRT_LAYOUT_FP8_E4M3; qt++) {
        for (int src = KVRT_LAYOUT_F32; src <= KVRT_LAYOUT_BF16; src++) {
            test_quant_write(r, qlayout(4, 128, 128, 16, qt, 0, 128), 32, src, 200);
            test_quant_write(r, qlayout(3, 37, 5, 1, qt, 0, 36), 512, src, 300);
        }
        test_quant_write(r, qlayout(4, 128, 128, 16, qt, 0, 128), 32, qt, 200);
        test_quant_write(r, qlayout(1, 576, 0, 64, qt, 512, 64), 8, KVRT_LAYOUT_F32, 300); /* K only */
        for (int dst = KVRT_LAYOUT_F32; dst <= KVRT_LAYOUT_BF16; dst++)
            test_quant_gather(r, qlayout(4, 128, 64, 16, qt, 0, 128), 32, 300, 1, dst);
        test_quant_gather(r, qlayout(4, 128, 64, 16, qt, 0, 128), 32, 300, 0, 0);
        test_quant_gather(r, qlayout(3, 37, 5, 1, qt, 0, 36), 512, 200, 1, KVRT_LAYOUT_F16);
        kvrt_layout group[2] = {qlayout(4, 128, 128, 16, qt, 0, 128), qlayout(3, 37, 5, 16, qt, 1, 36)};
        test_quant_group(r, group, 2, 64, 30, 0, 0);
        test_quant_group(r, group, 2, 64, 500, 1, 0);
        test_quant_group(r, group, 2, 64, 500, 1, 1);
        kvrt_layout partial[1] = {qlayout(2, 128, 128, 1, qt, 64, 64)}; /* n_rot < dk */
        test_quant_group(r, partial, 1, 256, 200, 1, 1);
    }
}

/* ---- pre-RoPE attention ---- */

/* Pre-RoPE calls (keys turned by their slots' positions as they are read,
 * queries by their tokens' with rotate_q) against the CPU twin. The glue
 * sends every one of them to the generic kernel: the cases below include
 * decode shapes (the decode kernel's) and f16/bf16 prefill chunks of head
 * dims 64/96/128 (the tensor-core kernel's), neither of which turns keys,
 * so any of them routed there fails the bound. The turn itself is the
 * twin's f32 arithmetic (bit-exact on kvrt-sim: attention.cu), so the bound
 * is attention_close's with its pre-RoPE terms (turned magnitudes and the
 * turn's rounding); outputs are poisoned before the call. */
static void test_attention_prerope(rng *r)
{
    static const struct {
        int32_t kv_heads, dim_k, n_rot, block_size, dtype, n_blocks, n_seqs, max_seq_blocks;
        int32_t tokens_per_seq, n_q_heads, prerope, style;
        float   theta;
        const char *what;
    } grid[] = {
        {2, 128, 128, 16, KVRT_LAYOUT_F16, 32, 3, 8, 1, 8, 1, 0, 10000.0f,
         "decode, GQA 4, normal style, whole head, queries rotated by the caller"},
        {2, 128, 64, 16, KVRT_LAYOUT_BF16, 32, 3, 8, 2, 8, 2, 1, 500000.0f,
         "decode 2 tokens, GQA 4, neox, partial rotary dims, rotate_q"},
        {1, 64, 32, 1, KVRT_LAYOUT_F32, 300, 2, 120, 1, 4, 2, 0, 1000000.0f,
         "decode, f32, page 1, normal style, partial dims, rotate_q, another base"},
        {2, 64, 64, 16, KVRT_LAYOUT_F16, 32, 2, 12, 40, 4, 2, 1, 10000.0f,
         "prefill chunk of a tensor-core shape, neox, rotate_q"},
        {1, 96, 48, 64, KVRT_LAYOUT_BF16, 8, 2, 3, 20, 2, 1, 0, 10000.0f,
         "prefill chunk, GQA 2, normal, partial dims, queries rotated by the caller"},
        {4, 40, 24, 16, KVRT_LAYOUT_F32, 16, 2, 6, 3, 4, 2, 1, 10000.0f,
         "MHA, head dim 40, neox, partial dims, rotate_q"},
    };
    for (size_t i = 0; i < sizeof grid / sizeof grid[0]; i++) {
        attn_case c;
        memset(&c, 0, sizeof c);
        c.L = layout_attn(grid[i].kv_heads, grid[i].dim_k, grid[i].dim_k, grid[i].block_size,
                          grid[i].dtype, grid[i].n_rot);
        c.L.rope_theta = grid[i].theta;
        c.dim_v = grid[i].dim_k;
        c.n_blocks = grid[i].n_blocks;
        c.n_seqs = grid[i].n_seqs;
        c.max_seq_blocks = grid[i].max_seq_blocks;
        c.tokens_per_seq = grid[i].tokens_per_seq;
        c.n_q_heads = grid[i].n_q_heads;
        c.causal = 1;
        c.q_dtype = grid[i].dtype;
        c.out_dtype = KVRT_LAYOUT_F32;
        c.prerope = grid[i].prerope;
        c.rope_style = grid[i].style;
        test_attention(r, c);
    }
}

int main(int argc, char **argv)
{
    kvrt_device dev = {gpu_test_backend(argc, argv), 0};
    if (argc > 1 && strcmp(argv[1], "cpu") == 0)
        dev.backend = KVRT_BACKEND_CPU;
    if (kvrt_device_count(dev.backend) == 0) {
        printf("test_gpu_ops: no %s device, skipped\n", kvrt_backend_name(dev.backend));
        return GPU_TEST_SKIP;
    }
    kvrt_device cpu = {KVRT_BACKEND_CPU, 0};
    MUST(kvrt_backend_open(cpu, &be[CPU]));
    MUST(kvrt_backend_open(dev, &be[DEV]));
    char desc[256] = "";
    (void)kvrt_device_describe(dev, desc, sizeof desc);
    printf("test_gpu_ops on %s\n", desc);
    rng r = {0x9e3779b97f4a7c15ull};
    /* argv[2]: the part to run (see the top comment); none: all */
    const char *part = argc > 2 ? argv[2] : "all";
    if (strcmp(part, "attention-decode") == 0) {
        attention_decode_grid(&r);
        goto done;
    }
    if (strcmp(part, "prefill") == 0) {
        test_attention_prefill(&r);
        goto done;
    }
    if (strcmp(part, "mla") == 0) {
        attention_mla_grid(&r);
        goto done;
    }
    if (strcmp(part, "quant") == 0) {
        test_quant_ops(&r);
        goto done;
    }
    if (strcmp(part, "prerope") == 0) {
        test_attention_prerope(&r);
        goto done;
    }
    if (strcmp(part, "gather") == 0) {
        gather_grid(&r);
        goto done;
    }
    if (strcmp(part, "wide") == 0) {
        attention_wide(&r);
        goto done;
    }

    /* memory */
    test_mem_kind();
    test_zero_copy(&r);
    test_upload_grow(&r);
    test_staging(&r);

    /* write: every dtype pair, vector and scalar paths, block sizes 1..256 */
    for (int cache_dt = 0; cache_dt < 3; cache_dt++)
        for (int src_dt = 0; src_dt < 3; src_dt++) {
            test_write(&r, layout_attn(8, 128, 128, 16, cache_dt, 128), 64, src_dt, 300, 1, 0);
            test_write(&r, layout_mla(512, 64, 64, cache_dt), 16, src_dt, 500, 0, 0);
            test_write(&r, layout_attn(2, 64, 64, 16, cache_dt, 64), 8, src_dt, 100, 1,
                       dtype_size(src_dt));
        }
    test_write(&r, layout_attn(4, 64, 256, 1, KVRT_LAYOUT_F16, 64), 4096, KVRT_LAYOUT_F32, 3000, 1, 0);
    test_write(&r, layout_attn(2, 256, 64, 256, KVRT_LAYOUT_BF16, 128), 8, KVRT_LAYOUT_BF16, 2048, 1, 0);
    test_write(&r, layout_attn(8, 128, 128, 16, KVRT_LAYOUT_F16, 128), 64, KVRT_LAYOUT_F16, 300, 0, 0);
    test_write(&r, layout_attn(1, 192, 128, 32, KVRT_LAYOUT_F32, 64), 32, KVRT_LAYOUT_F16, 1024, 1, 0);
    test_write(&r, layout_mla(512, 2, 16, KVRT_LAYOUT_F16), 32, KVRT_LAYOUT_F32, 400, 0, 0);

    /* gather */
    gather_grid(&r);

    /* move: one launch over every layer of a group */
    {
        kvrt_layout attn[3] = {layout_attn(8, 128, 128, 16, KVRT_LAYOUT_F16, 128),
                               layout_attn(2, 256, 64, 16, KVRT_LAYOUT_F16, 64),
                               layout_attn(4, 64, 64, 16, KVRT_LAYOUT_F16, 64)};
        test_move(&r, attn, 3, 256, 100);
        kvrt_layout bs1[2] = {layout_attn(4, 64, 256, 1, KVRT_LAYOUT_F32, 64),
                              layout_attn(1, 128, 128, 1, KVRT_LAYOUT_F32, 64)};
        test_move(&r, bs1, 2, 8192, 4000);
        kvrt_layout bs256[1] = {layout_attn(2, 128, 128, 256, KVRT_LAYOUT_BF16, 128)};
        test_move(&r, bs256, 1, 16, 8);
        kvrt_layout mla[2] = {layout_mla(512, 64, 64, KVRT_LAYOUT_BF16),
                              layout_mla(512, 64, 64, KVRT_LAYOUT_BF16)};
        test_move(&r, mla, 2, 64, 30);
        kvrt_layout odd[1] = {layout_mla(512, 2, 16, KVRT_LAYOUT_F16)};
        test_move(&r, odd, 1, 64, 30);
    }

    /* rotate: both styles, ATTN and MLA groups, every dtype, large deltas */
    for (int style = 0; style < 2; style++)
        for (int dt = 0; dt < 3; dt++) {
            kvrt_layout attn[2] = {layout_attn(8, 128, 128, 16, dt, 128),
                                   layout_attn(2, 256, 64, 16, dt, 128)};
            test_rotate(&r, attn, 2, 64, 700, style, 1000000);
            kvrt_layout mla[3] = {layout_mla(512, 64, 64, dt), layout_mla(512, 64, 64, dt),
                                  layout_mla(512, 64, 64, dt)};
            test_rotate(&r, mla, 3, 16, 900, style, 1 << 30);
        }
    {
        kvrt_layout part[1] = {layout_attn(4, 128, 128, 1, KVRT_LAYOUT_F16, 64)}; /* n_rot < dk */
        test_rotate(&r, part, 1, 2048, 2000, 0, 100000);
        kvrt_layout bs256[2] = {layout_attn(2, 64, 64, 256, KVRT_LAYOUT_F32, 64),
                                layout_attn(2, 64, 64, 256, KVRT_LAYOUT_F32, 64)};
        test_rotate(&r, bs256, 2, 8, 2048, 1, 50000);
        /* a few tokens over many layers: the layer chunks of the grid */
        kvrt_layout many[40];
        for (int l = 0; l < 40; l++)
            many[l] = layout_attn(8, 128, 128, 16, KVRT_LAYOUT_BF16, 128);
        test_rotate(&r, many, 40, 8, 3, 0, 1000);
    }

    /* attention: decode and prefill, GQA, windows, soft-cap, MLA, cross */
    {
        attn_case c;
        memset(&c, 0, sizeof c);
        c.L = layout_attn(8, 128, 128, 16, KVRT_LAYOUT_F16, 128);
        c.dim_v = 128;
        c.n_blocks = 256;
        c.n_seqs = 16;
        c.max_seq_blocks = 16;
        c.tokens_per_seq = 1;
        c.n_q_heads = 32;
        c.causal = 1;
        c.q_dtype = KVRT_LAYOUT_F16;
        c.out_dtype = KVRT_LAYOUT_F16;
        test_attention(&r, c);
        c.out_dtype = KVRT_LAYOUT_F32;
        c.q_dtype = KVRT_LAYOUT_F32;
        c.window = 37;
        test_attention(&r, c);
        c.window = 0;
        c.softcap = 30.0f;
        c.tokens_per_seq = 8; /* prefill chunks */
        c.L = layout_attn(2, 64, 256, 1, KVRT_LAYOUT_BF16, 64);
        c.dim_v = 256;
        c.n_blocks = 2048;
        c.max_seq_blocks = 300;
        c.n_seqs = 4;
        c.n_q_heads = 6;
        test_attention(&r, c);
        c.softcap = 0;
        c.L = layout_attn(4, 256, 128, 256, KVRT_LAYOUT_F32, 128);
        c.dim_v = 128;
        c.n_blocks = 16;
        c.max_seq_blocks = 4;
        c.n_seqs = 3;
        c.tokens_per_seq = 5;
        c.n_q_heads = 4;
        c.out_dtype = KVRT_LAYOUT_F32;
        test_attention(&r, c);
        /* MLA: 576-value rows, V the first 512 */
        c.L = layout_mla(512, 64, 64, KVRT_LAYOUT_BF16);
        c.mla = 1;
        c.dim_v = 512;
        c.n_blocks = 64;
        c.max_seq_blocks = 16;
        c.n_seqs = 4;
        c.tokens_per_seq = 2;
        c.n_q_heads = 16;
        c.q_dtype = KVRT_LAYOUT_BF16;
        c.out_dtype = KVRT_LAYOUT_BF16;
        test_attention(&r, c);
        /* cross-attention: no positions, every used slot visible */
        c.L = layout_attn(4, 64, 64, 128, KVRT_LAYOUT_F16, 0);
        c.mla = 0;
        c.dim_v = 64;
        c.n_blocks = 4;
        c.max_seq_blocks = 1;
        c.n_seqs = 4;
        c.tokens_per_seq = 3;
        c.n_q_heads = 8;
        c.causal = 0;
        c.q_dtype = KVRT_LAYOUT_F16;
        c.out_dtype = KVRT_LAYOUT_F16;
        test_attention(&r, c);
        /* cross-attention, decode: one token per sequence */
        c.tokens_per_seq = 1;
        test_attention(&r, c);

        /* decode of a few long sequences: the slots split over CTAs and
         * merged (flash-decoding), GQA groups of 4 and 8 */
        memset(&c, 0, sizeof c);
        c.L = layout_attn(2, 128, 128, 16, KVRT_LAYOUT_BF16, 128);
        c.dim_v = 128;
        c.n_blocks = 1024;
        c.n_seqs = 2;
        c.max_seq_blocks = 500;
        c.tokens_per_seq = 1;
        c.n_q_heads = 16;
        c.causal = 1;
        c.q_dtype = KVRT_LAYOUT_BF16;
        c.out_dtype = KVRT_LAYOUT_BF16;
        test_attention(&r, c);
        c.window = 1000; /* splits before the window see nothing */
        test_attention(&r, c);
        c.window = 0;
        c.softcap = 50.0f;
        c.L = layout_attn(1, 64, 64, 32, KVRT_LAYOUT_F32, 64);
        c.dim_v = 64;
        c.n_q_heads = 4;
        c.q_dtype = KVRT_LAYOUT_F32;
        c.out_dtype = KVRT_LAYOUT_F16;
        test_attention(&r, c);
        c.softcap = 0;
        /* short query blocks (speculative verification): 2, 3, 8 tokens */
        c.L = layout_attn(4, 128, 128, 16, KVRT_LAYOUT_F16, 128);
        c.dim_v = 128;
        c.n_q_heads = 32;
        c.n_seqs = 5;
        c.max_seq_blocks = 150;
        c.q_dtype = KVRT_LAYOUT_F16;
        c.out_dtype = KVRT_LAYOUT_F32;
        for (int32_t tps = 2; tps <= 8; tps += tps < 3 ? 1 : 5) {
            c.tokens_per_seq = tps;
            test_attention(&r, c);
        }
        /* prefill tiles with ragged ends: 45 tokens per sequence (tiles of
         * 32 and 16 tokens), head dims 64, 96 (generic), 256 */
        c.tokens_per_seq = 45;
        c.n_seqs = 3;
        c.max_seq_blocks = 12;
        c.n_blocks = 64;
        c.L = layout_attn(2, 64, 64, 16, KVRT_LAYOUT_BF16, 64);
        c.dim_v = 64;
        c.n_q_heads = 2;
        test_attention(&r, c);
        c.n_q_heads = 8;
        c.window = 20;
        test_attention(&r, c);
        c.window = 0;
        c.L = layout_attn(2, 96, 96, 8, KVRT_LAYOUT_F16, 96);
        c.dim_v = 96;
        test_attention(&r, c);
        c.L = layout_attn(1, 256, 256, 16, KVRT_LAYOUT_F32, 256);
        c.dim_v = 256;
        c.n_q_heads = 3;
        c.softcap = 20.0f;
        test_attention(&r, c);
        c.softcap = 0;
        /* a head dim that is not a multiple of 8: element-wise loads */
        c.L = layout_attn(2, 36, 20, 16, KVRT_LAYOUT_F16, 36);
        c.dim_v = 20;
        c.n_q_heads = 4;
        c.tokens_per_seq = 1;
        test_attention(&r, c);
        c.tokens_per_seq = 40;
        test_attention(&r, c);
        /* MLA decode with 16, 64 and 128 query heads, long latent rows split */
        c.L = layout_mla(512, 64, 64, KVRT_LAYOUT_BF16);
        c.mla = 1;
        c.dim_v = 512;
        c.n_blocks = 128;
        c.max_seq_blocks = 20; /* the MLA kernel, split beyond 512 slots */
        c.n_seqs = 2;
        c.tokens_per_seq = 1;
        c.q_dtype = KVRT_LAYOUT_BF16;
        c.out_dtype = KVRT_LAYOUT_BF16;
        for (int32_t h = 16; h <= 128; h *= h == 16 ? 4 : 2) {
            c.n_q_heads = h;
            test_attention(&r, c);
        }
        c.L = layout_mla(512, 64, 16, KVRT_LAYOUT_F16);
        c.n_q_heads = 16;
        c.tokens_per_seq = 4; /* MLA short query blocks */
        c.max_seq_blocks = 100;
        c.n_blocks = 256;
        c.q_dtype = KVRT_LAYOUT_F32;
        c.out_dtype = KVRT_LAYOUT_F32;
        test_attention(&r, c);
    }

    if (strcmp(part, "all") == 0) {
        attention_decode_grid(&r);
        test_attention_prefill(&r);
        attention_mla_grid(&r);
        test_quant_ops(&r);
        test_attention_prerope(&r);
    }

    /* set_pos */
    test_set_pos(&r, 16, 256, 100);
    test_set_pos(&r, 1, 10000, 5000);
    test_set_pos(&r, 256, 64, 64);

done:

    kvrt_backend_close(&be[DEV]);
    kvrt_backend_close(&be[CPU]);
    return gpu_test_result("test_gpu_ops");
}
