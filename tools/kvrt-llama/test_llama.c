/*
 * test_llama.c: kvrt-llama against a plain forward pass.
 *
 *   test_llama [--backend cpu|cuda|hip] [--only TEST,TEST...]
 *                                     (exit 77 where the backend has no device;
 *                                      --only: just the tests named)
 *
 * The test writes tiny random checkpoints in the llama2.c format (3 layers,
 * dim 64, 4 query heads over 2 kv heads, vocab 384, separate classifier; and
 * a 1-layer model with a shared one) and checks, on f32, f16, bf16 and (on
 * the CPU backend) q8 and fp8 e4m3 caches:
 *   (a) the logits of every cached decode step equal a recomputation of the
 *       whole prefix from scratch (ref_full: no cache, double precision);
 *   (b) after each context shift, the logits equal the reference with the
 *       kept tokens at their new positions (see test_shift for why, with
 *       more than one layer, the reference keeps each token's K/V as it was
 *       first computed), and, on the 1-layer model, ref_full over the kept
 *       tokens;
 *   (c) each of N sequences forked from one prompt and decoded as one batch
 *       gives the tokens (top-p sampling) of that prompt decoded alone;
 *   (d) a saved and reloaded session continues as the uninterrupted one: its
 *       stored rows bit-exact, its logits within a bound, its tokens (greedy
 *       and top-p) equal but where the logits' rounding explains them;
 *   (e) (a), (b) with both RoPE styles, (c) and (d) on f16, bf16, q8 and
 *       fp8 caches, within bounds derived from each dtype's step (bound()),
 *       the reference reading K and V as the cache stores them (q8 and fp8:
 *       each (token, kv head) row quantized with its own scale), and the decode
 *       nearer that reference than one that does not round (the dtype is in
 *       effect);
 *   (f) on a GPU backend (kvrt-sim in CI), one greedy session with a chunked
 *       prefill, a fork, a truncation, shifts and a save gives the CPU
 *       backend's logits within a bound and its tokens but at near-ties, and
 *       the CPU's session file resumes there;
 * and that bad checkpoints, tokenizers, sessions and prompts fail with a
 * message naming what is wrong.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "kvrt_layout.h" /* kvrt's f16 / bf16 conversions */
#include "llama.h"

static kvrt_backend backend = KVRT_BACKEND_CPU;
static char dir[256];              /* the test's models */
static char model3_path[300], model1_path[300], tok3_path[300];
static llama_model model3, model1; /* 3 layers, separate classifier; 1 layer, shared */

#define TRY(expr)                                                                              \
    do {                                                                                       \
        if ((expr) != 0)                                                                       \
            fail_msg("%s: %s", #expr, llama_error());                                          \
    } while (0)

/* ------------------------------------------------------------------------ */
/* The reference: the model's function in double, no cache                   */
/* ------------------------------------------------------------------------ */

/* A sequence as the reference sees it: per token its position and, per
 * layer, its K before RoPE and its V, from when it was run. Attention
 * rotates K at the token's current position each time, from scratch. */
typedef struct ref_seq {
    const llama_model *m;
    kvrt_rope_style    style;
    kvrt_dtype         dtype;  /* the cache's: K and V are read as it stores them */
    int                n, cap;
    int               *pos;
    double            *k, *v;  /* [cap][n_layers][kv_dim] */
} ref_seq;

static ref_seq ref_create(const llama_model *m, kvrt_rope_style style, kvrt_dtype dtype, int cap)
{
    size_t row = (size_t)m->config.n_layers * (size_t)m->kv_dim;
    ref_seq r = {m, style, dtype, 0, cap, malloc((size_t)cap * sizeof(int)),
                 malloc((size_t)cap * row * sizeof(double)),
                 malloc((size_t)cap * row * sizeof(double))};
    assert_non_null(r.pos);
    assert_non_null(r.k);
    assert_non_null(r.v);
    return r;
}

static void ref_free(ref_seq *r)
{
    free(r->pos);
    free(r->k);
    free(r->v);
}

/* out[o] = sum_i w[o][i] x[i] */
static void ref_matmul(double *out, const float *w, const double *x, int d_in, int d_out)
{
    for (int o = 0; o < d_out; o++) {
        double s = 0.0;
        for (int i = 0; i < d_in; i++)
            s += (double)w[(size_t)o * d_in + i] * x[i];
        out[o] = s;
    }
}

static void ref_rmsnorm(double *out, const double *x, const float *w, int dim)
{
    double ss = 0.0;
    for (int i = 0; i < dim; i++)
        ss += x[i] * x[i];
    double scale = 1.0 / sqrt(ss / dim + 1e-5);
    for (int i = 0; i < dim; i++)
        out[i] = (double)w[i] * scale * x[i];
}

static void ref_rope(double *head, int hs, int pos, kvrt_rope_style style)
{
    for (int i = 0; i < hs / 2; i++) {
        double angle = pos * pow(10000.0, -2.0 * i / hs);
        int a = style == KVRT_ROPE_NORMAL ? 2 * i : i;
        int b = style == KVRT_ROPE_NORMAL ? 2 * i + 1 : i + hs / 2;
        double x0 = head[a], x1 = head[b];
        head[a] = x0 * cos(angle) - x1 * sin(angle);
        head[b] = x0 * sin(angle) + x1 * cos(angle);
    }
}

/* A head row of n values (one token's K after RoPE, or its V, of one kv
 * head), in place, as the cache stores it: f16 / bf16 round each element to
 * nearest even; q8 / fp8 quantize the row, whose scale depends on all of it,
 * by kvrt's rule (kvrt_layout.h, from the row in f32, as the decoder writes
 * it); f32 is kept in double. */
static void stored(double *row, int n, kvrt_dtype dtype)
{
    float f[KVRT_QUANT_ROW_MAX];
    uint8_t code[KVRT_QUANT_ROW_MAX];
    assert_true(n <= KVRT_QUANT_ROW_MAX);
    for (int i = 0; i < n; i++)
        f[i] = (float)row[i];
    if (dtype == KVRT_F16)
        for (int i = 0; i < n; i++)
            row[i] = kvrt_f16_to_f32(kvrt_f32_to_f16(f[i]));
    if (dtype == KVRT_BF16)
        for (int i = 0; i < n; i++)
            row[i] = kvrt_bf16_to_f32(kvrt_f32_to_bf16(f[i]));
    if (kvrt_dtype_is_quantized(dtype)) {
        float scale = kvrt_quant_row(code, (int32_t)dtype, f, KVRT_LAYOUT_F32, n);
        for (int i = 0; i < n; i++)
            row[i] = kvrt_dequant(code, (int32_t)dtype, i, scale);
    }
}

/* Runs token at pos after r's tokens; logits [vocab] of it when not NULL. */
static void ref_step(ref_seq *r, int token, int pos, double *logits)
{
    const llama_model *m = r->m;
    const llama_config *c = &m->config;
    const llama_weights *w = &m->w;
    int dim = c->dim, hs = m->head_size, kv_dim = m->kv_dim, hidden = c->hidden_dim;
    size_t row = (size_t)c->n_layers * (size_t)kv_dim;
    assert_true(r->n < r->cap);
    double *x = calloc((size_t)dim, sizeof(double)), *xb = calloc((size_t)dim, sizeof(double));
    double *q = calloc((size_t)dim, sizeof(double)), *att = calloc((size_t)dim, sizeof(double));
    double *o = calloc((size_t)dim, sizeof(double)), *kh = calloc((size_t)hs, sizeof(double));
    double *vh = calloc((size_t)hs, sizeof(double));
    double *h1 = calloc((size_t)hidden, sizeof(double)), *h3 = calloc((size_t)hidden, sizeof(double));
    double *scores = calloc((size_t)r->n + 1, sizeof(double));
    int t = r->n;
    r->pos[t] = pos;
    for (int i = 0; i < dim; i++)
        x[i] = w->token_embedding[(size_t)token * dim + i];
    for (int l = 0; l < c->n_layers; l++) {
        size_t ld = (size_t)l * dim, lkv = (size_t)l * kv_dim;
        double *k_t = r->k + t * row + lkv, *v_t = r->v + t * row + lkv;
        ref_rmsnorm(xb, x, w->rms_att + ld, dim);
        ref_matmul(q, w->wq + ld * dim, xb, dim, dim);
        ref_matmul(k_t, w->wk + lkv * dim, xb, dim, kv_dim);
        ref_matmul(v_t, w->wv + lkv * dim, xb, dim, kv_dim);
        for (int h = 0; h < c->n_heads; h++) {
            double *qh = q + h * hs;
            int g = h / (c->n_heads / c->n_kv_heads);
            ref_rope(qh, hs, pos, r->style);
            double max = -INFINITY;
            for (int j = 0; j <= t; j++) {
                scores[j] = -INFINITY;
                if (r->pos[j] > pos)
                    continue;
                memcpy(kh, r->k + j * row + lkv + g * hs, (size_t)hs * sizeof(double));
                ref_rope(kh, hs, r->pos[j], r->style);
                stored(kh, hs, r->dtype);
                double s = 0.0;
                for (int i = 0; i < hs; i++)
                    s += qh[i] * kh[i];
                scores[j] = s / sqrt((double)hs);
                max = fmax(max, scores[j]);
            }
            double sum = 0.0;
            for (int j = 0; j <= t; j++) {
                scores[j] = scores[j] == -INFINITY ? 0.0 : exp(scores[j] - max);
                sum += scores[j];
            }
            for (int i = 0; i < hs; i++)
                att[h * hs + i] = 0.0;
            for (int j = 0; j <= t; j++) {
                memcpy(vh, r->v + j * row + lkv + g * hs, (size_t)hs * sizeof(double));
                stored(vh, hs, r->dtype);
                for (int i = 0; i < hs; i++)
                    att[h * hs + i] += scores[j] * vh[i];
            }
            for (int i = 0; i < hs; i++)
                att[h * hs + i] /= sum;
        }
        ref_matmul(o, w->wo + ld * dim, att, dim, dim);
        for (int i = 0; i < dim; i++)
            x[i] += o[i];
        ref_rmsnorm(xb, x, w->rms_ffn + ld, dim);
        ref_matmul(h1, w->w1 + (size_t)l * hidden * dim, xb, dim, hidden);
        ref_matmul(h3, w->w3 + (size_t)l * hidden * dim, xb, dim, hidden);
        for (int i = 0; i < hidden; i++)
            h1[i] = h1[i] / (1.0 + exp(-h1[i])) * h3[i];
        ref_matmul(o, w->w2 + (size_t)l * dim * hidden, h1, hidden, dim);
        for (int i = 0; i < dim; i++)
            x[i] += o[i];
    }
    r->n++;
    if (logits) {
        ref_rmsnorm(xb, x, w->rms_final, dim);
        ref_matmul(logits, w->wcls, xb, dim, c->vocab_size);
    }
    free(x); free(xb); free(q); free(att); free(o); free(kh); free(vh);
    free(h1); free(h3); free(scores);
}

/* The logits of the last of tokens[0..n) at positions 0..n-1, computed
 * from scratch. */
static void ref_full(const llama_model *m, kvrt_rope_style style, kvrt_dtype dtype,
                     const int *tokens, int n, double *logits)
{
    ref_seq r = ref_create(m, style, dtype, n);
    for (int i = 0; i < n; i++)
        ref_step(&r, tokens[i], i, i == n - 1 ? logits : NULL);
    ref_free(&r);
}

/* What a context shift does to the reference: drop [n_keep, n_keep + d),
 * move the rest down by d. A quantized cache turns each moved K row as it
 * stores it (dequantized, rotated by -d, quantized again): so does the
 * reference when requantize is set, keeping the result as K before RoPE at
 * the new position. */
static void ref_shift(ref_seq *r, int n_keep, int d, int requantize)
{
    const llama_model *m = r->m;
    int hs = m->head_size;
    size_t row = (size_t)m->config.n_layers * (size_t)m->kv_dim;
    for (int j = n_keep + d; j < r->n; j++) {
        for (size_t at = 0; requantize && at < row; at += (size_t)hs) {
            double *kh = r->k + j * row + at;
            ref_rope(kh, hs, r->pos[j], r->style);
            stored(kh, hs, r->dtype);
            ref_rope(kh, hs, -d, r->style);
            stored(kh, hs, r->dtype);
            ref_rope(kh, hs, -(r->pos[j] - d), r->style);
        }
        r->pos[j - d] = r->pos[j] - d;
        memcpy(r->k + (j - d) * row, r->k + j * row, row * sizeof(double));
        memcpy(r->v + (j - d) * row, r->v + j * row, row * sizeof(double));
    }
    r->n -= d;
}

/* ------------------------------------------------------------------------ */
/* Bounds                                                                    */
/* ------------------------------------------------------------------------ */

/*
 * The decoder runs in f32 (u = 2^-24) what the reference runs in double.
 * A product of inner length K errs by at most gamma_K sum|w_i x_i|,
 * gamma_K = K u / (1 - K u) (Higham, Accuracy and Stability, 3.1), and,
 * with rounding errors of random sign, by about sqrt(K) u sum|w_i x_i| with
 * high probability (Higham and Mary, 2019). With weights of variance 1/K and
 * unit activations sum|w_i x_i| is about (2/pi) sqrt(K), so an output errs by
 * about K u (probabilistic) to K^1.5 u (worst case), relative to unit size. A
 * layer chains four products (q/k/v, o, gate/up, down) and attention (its
 * softmax and weighted sum add a few u relative); RMSNorm rescales to unit
 * size without amplifying and the residual adds the errors. After L layers
 * and the classifier the logits err by about
 *     (5 L + 1) K u     per unit of logit size,
 * K = the widest inner length (hidden_dim); the bound takes 4 times that
 * (6.6e-4 for L = 3, K = 172), relative to (1 + max |logit|), below the
 * worst case and far above what is measured (about 1e-6, printed). A wrong
 * position in RoPE or a stale or missing row moves logits by O(0.1 - 1).
 *
 * The reference reads K and V as the cache stores them (rounded to f16 or
 * bf16 after RoPE), so on f16/bf16 caches the same bound holds except where
 * the f32 and the double K round to neighbouring values: one unit in the last
 * place of the cache dtype (2^-11, 2^-8) on an element, rarely. A shifted
 * token's K is rounded a second time after re-rotation (kvrt_seq_shift
 * rotates the stored K and stores it again), an error of u_dtype |k| on
 * every element of every shifted row. Through q.k / sqrt(hs) that moves a
 * score by at most u_dtype |q| |k| / sqrt(hs) (a few u_dtype), hence the
 * attention output by as much relative, and the logits by that through
 * the remaining layers. The bounds add 4 u_dtype for the rare neighbouring
 * roundings and 16 u_dtype once rows were shifted: f16 2e-3 / 7.8e-3,
 * bf16 1.6e-2 / 6.3e-2, relative to (1 + max |logit|).
 *
 * q8 and fp8 caches follow the same argument with the dtype's step in place
 * of u_dtype |k|, the reference quantizing each (token, kv head) row as the
 * cache does (kvrt_quant_row). q8: an element errs by at most half a step,
 * amax / 254, amax the row's largest |k_i| <= |k|, so the row errs by at
 * most sqrt(hs) amax / 254 <= (sqrt(hs) / 254) |k|: u_q8 = sqrt(hs) / 254
 * (1.6e-2 for hs = 16), a neighbouring code being a whole step on one
 * element. fp8 e4m3 (3 mantissa bits): an element errs by at most 2^-4 of
 * itself (normal codes; a subnormal one by 2^-10 amax / 448, far less), so
 * u_fp8 = 2^-4. The same 4 u / 16 u give q8 6.3e-2 / 0.25, fp8 0.25 / 1.0.
 * Those are wide, as the dtypes are coarse (measured: decode about 1e-6,
 * 3e-4 at a neighbouring code): the positions are checked tightly on the
 * other dtypes, and on these the mean checks of (a) and (b) show the
 * quantization in effect, exactly as the reference does it.
 * After a shift (b) the cache holds a shifted K row quantized twice, which
 * the running reference of check_shift reproduces (ref_shift re-quantizes
 * as the cache does): only neighbouring codes separate them again, so the
 * bound of no shift holds (measured about 6e-7); 16 u applies to ref_full
 * over the kept tokens, which quantizes once (measured q8 5e-3, fp8 4e-2).
 */
static double bound(const llama_model *m, kvrt_dtype dtype, int shifted)
{
    const llama_config *c = &m->config;
    int K = c->hidden_dim > c->dim ? c->hidden_dim : c->dim;
    double f32 = 4.0 * (5 * c->n_layers + 1) * K * 0x1p-24;
    if (dtype == KVRT_F32)
        return f32;
    double u = dtype == KVRT_F16 ? 0x1p-11 : dtype == KVRT_BF16 ? 0x1p-8
             : dtype == KVRT_Q8 ? sqrt((double)m->head_size) / 254.0 : 0x1p-4;
    return f32 + (shifted ? 16.0 : 4.0) * u;
}

/* mean |got - want| / (1 + max |want|) */
static double logit_mean_error(const float *got, const double *want, int n)
{
    double err = 0.0, scale = 0.0;
    for (int i = 0; i < n; i++) {
        err += fabs((double)got[i] - want[i]);
        scale = fmax(scale, fabs(want[i]));
    }
    return err / n / (1.0 + scale);
}

/* max |got - want| / (1 + max |want|) */
static double logit_error(const float *got, const double *want, int n)
{
    double err = 0.0, scale = 0.0;
    for (int i = 0; i < n; i++) {
        err = fmax(err, fabs((double)got[i] - want[i]));
        scale = fmax(scale, fabs(want[i]));
    }
    return err / (1.0 + scale);
}

/* ------------------------------------------------------------------------ */
/* Fixtures                                                                  */
/* ------------------------------------------------------------------------ */

static llama_config config3(void)
{
    return (llama_config){.dim = 64, .hidden_dim = 172, .n_layers = 3, .n_heads = 4,
                          .n_kv_heads = 2, .vocab_size = 384, .seq_len = 64,
                          .shared_classifier = 0};
}

static int setup(void **state)
{
    (void)state;
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, sizeof dir, "%s/kvrt-llama-XXXXXX", tmp ? tmp : "/tmp");
    if (!mkdtemp(dir))
        return -1;
    char sub[300];
    llama_config c3 = config3(), c1 = config3();
    c1.n_layers = 1;
    c1.shared_classifier = 1;
    snprintf(sub, sizeof sub, "%s/one", dir);
    if (llama_write_tiny(dir, &c3, 7) != 0 || mkdir(sub, 0777) != 0 ||
        llama_write_tiny(sub, &c1, 8) != 0)
        return -1;
    snprintf(model3_path, sizeof model3_path, "%s/model.bin", dir);
    snprintf(tok3_path, sizeof tok3_path, "%s/tokenizer.bin", dir);
    snprintf(model1_path, sizeof model1_path, "%s/one/model.bin", dir);
    if (llama_model_load(model3_path, &model3) != 0 || llama_model_load(model1_path, &model1) != 0)
        return -1;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    llama_model_free(&model3);
    llama_model_free(&model1);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    return system(cmd) == 0 ? 0 : -1;
}

/* A decoder on the test's backend and a session of n_seqs sequences. */
static kvrt_rope_style rope_style = KVRT_ROPE_NORMAL; /* of the next open_session */

static void open_session(const llama_model *m, kvrt_dtype dtype, int n_ctx, int n_seqs,
                         float temperature, uint64_t seed, llama_decoder *dec,
                         llama_session *sess)
{
    llama_decoder_options o;
    llama_decoder_options_init(&o);
    o.rope_style = rope_style;
    o.device = (kvrt_device){backend, 0};
    o.cache_dtype = dtype;
    o.n_ctx = n_ctx;
    o.max_seqs = n_seqs;
    o.max_batch = 16; /* prompts longer than this run in chunks */
    TRY(llama_decoder_create(m, &o, dec));
    llama_sampler s;
    llama_sampler_init(&s, temperature, 0.9f, seed);
    TRY(llama_session_create(dec, n_seqs, &s, sess));
}

static void close_session(llama_decoder *dec, llama_session *sess)
{
    llama_session_destroy(sess);
    llama_decoder_destroy(dec);
}

static const int prompt[] = {LLAMA_BOS, 300, 17, 42, 99, 250, 7, 310, 11, 64, 200, 5,
                             128, 77, 301, 33, 90, 140, 260, 3}; /* 20 tokens */
#define PROMPT_LEN ((int)(sizeof prompt / sizeof *prompt))

/* The cache dtypes of (a) to (d): the quantized ones on the CPU backend
 * only (the GPU backends refuse them). */
static const kvrt_dtype dtypes[5] = {KVRT_F32, KVRT_F16, KVRT_BF16, KVRT_Q8, KVRT_FP8_E4M3};

static int n_dtypes(void)
{
    return backend == KVRT_BACKEND_CPU ? 5 : 3;
}

/* ------------------------------------------------------------------------ */
/* (a) cached decode == recomputation of the whole prefix                    */
/* ------------------------------------------------------------------------ */

static void check_decode(const llama_model *m, kvrt_dtype dtype, kvrt_rope_style style)
{
    llama_decoder dec;
    llama_session sess;
    rope_style = style;
    open_session(m, dtype, 64, 1, 1.0f, 1, &dec, &sess);
    rope_style = KVRT_ROPE_NORMAL;
    int vocab = m->config.vocab_size;
    double *ref = malloc((size_t)vocab * sizeof(double)), worst = 0.0;
    double *unrounded = malloc((size_t)vocab * sizeof(double)), mean = 0.0, mean_unrounded = 0.0;
    TRY(llama_prefill(&sess, 0, prompt, PROMPT_LEN));
    ref_full(m, style, dtype, prompt, PROMPT_LEN, ref);
    worst = logit_error(dec.logits, ref, vocab);
    for (int step = 0; step < 40; step++) {
        TRY(llama_decode_step(&sess, 1, NULL));
        ref_full(m, style, dtype, sess.seqs[0].tokens, sess.seqs[0].n, ref);
        double err = logit_error(dec.logits, ref, vocab);
        worst = fmax(worst, err);
        if (err > bound(m, dtype, 0))
            fail_msg("%s cache, step %d (%d tokens): logits err %.3g > %.3g", kvrt_dtype_name(dtype),
                     step, sess.seqs[0].n, err, bound(m, dtype, 0));
        if (dtype != KVRT_F32) { /* the reference that keeps K and V in double */
            ref_full(m, style, KVRT_F32, sess.seqs[0].tokens, sess.seqs[0].n, unrounded);
            mean += logit_mean_error(dec.logits, ref, vocab) / 40;
            mean_unrounded += logit_mean_error(dec.logits, unrounded, vocab) / 40;
        }
    }
    /* The cache's dtype is in effect, rounding as the reference does. The
     * bound allows a cache that kept K and V in f32 (the error against the
     * rounding reference would then be the rounding itself, about u_dtype
     * |k| on every element, within 4 u_dtype), so the mean error over every
     * logit of every step must also be less than half the error against the
     * reference that does not round: the neighbouring roundings are rare,
     * the rounding itself is everywhere (measured: f16 5e-6 to 1e-5 against
     * 8e-5; bf16 1e-7 to 1e-6 against 6e-4; q8 1e-7 to 1e-5 against 2e-3;
     * fp8 about 1e-7 against 7e-3). */
    if (dtype != KVRT_F32 && !(mean <= 0.5 * mean_unrounded))
        fail_msg("%s cache: mean logit err %.3g against the reference rounding K and V to %s, "
                 "%.3g against the unrounded one: the cache does not store what it was asked to",
                 kvrt_dtype_name(dtype), mean, kvrt_dtype_name(dtype), mean_unrounded);
    char means[128] = "";
    if (dtype != KVRT_F32)
        snprintf(means, sizeof means, "; mean %.3g, %.3g against a reference that does not round "
                 "K and V", mean, mean_unrounded);
    print_message("decode, %d layers, %s cache, %s rope: worst logit error %.3g (bound %.3g)%s\n",
                  m->config.n_layers, kvrt_dtype_name(dtype),
                  style == KVRT_ROPE_NORMAL ? "normal" : "neox", worst, bound(m, dtype, 0), means);
    free(ref);
    free(unrounded);
    close_session(&dec, &sess);
}

static void test_decode(void **state)
{
    (void)state;
    for (int d = 0; d < n_dtypes(); d++) {
        check_decode(&model3, dtypes[d], KVRT_ROPE_NORMAL);
        check_decode(&model3, dtypes[d], KVRT_ROPE_NEOX);
    }
    check_decode(&model1, KVRT_F32, KVRT_ROPE_NORMAL);
}

/* ------------------------------------------------------------------------ */
/* (b) context shift                                                         */
/* ------------------------------------------------------------------------ */

/*
 * After a shift the cache holds the kept tokens' K and V as they were
 * computed, with K re-rotated to the new positions. With one layer a
 * token's K and V depend only on the token, so that is exactly a
 * recomputation over the kept tokens (ref_full). With more layers a kept
 * token's deeper K and V were computed while the dropped tokens were still
 * visible, which no recomputation over the kept tokens reproduces: that is
 * what a context shift is. There the reference runs beside the decoder
 * (ref_step per token, ref_shift at each shift), keeping every token's K
 * before RoPE and rotating it at its current position from scratch, so it
 * checks the removal, the new positions and the re-rotation (a quantized
 * cache's re-quantization of the turned rows included, see ref_shift).
 */
static void check_shift(const llama_model *m, kvrt_dtype dtype, kvrt_rope_style style)
{
    enum { CTX = 32, KEEP = 4 };
    llama_decoder dec;
    llama_session sess;
    rope_style = style;
    open_session(m, dtype, CTX, 1, 1.0f, 3, &dec, &sess);
    rope_style = KVRT_ROPE_NORMAL;
    int vocab = m->config.vocab_size, shifts = 0, one_layer = m->config.n_layers == 1;
    double *ref = malloc((size_t)vocab * sizeof(double)), worst = 0.0, worst_full = 0.0;
    ref_seq r = ref_create(m, style, dtype, CTX);
    /* beside it, for a quantized cache, one that rotates the shifted rows
     * from scratch, not re-quantizing them: the mean errors after the first
     * shift against the two show the cache re-quantizes as documented, as
     * the mean check of (a) shows it quantizes. */
    int quantized = kvrt_dtype_is_quantized(dtype);
    ref_seq r2 = ref_create(m, style, dtype, CTX);
    double *ref2 = malloc((size_t)vocab * sizeof(double)), mean = 0.0, mean2 = 0.0;
    int after = 0; /* steps after the first shift */
    TRY(llama_prefill(&sess, 0, prompt, PROMPT_LEN));
    for (int i = 0; i < PROMPT_LEN; i++) {
        ref_step(&r, prompt[i], i, NULL);
        if (quantized)
            ref_step(&r2, prompt[i], i, NULL);
    }
    for (int step = 0; step < 60; step++) {
        int shifted[1], token = sess.seqs[0].pending;
        TRY(llama_decode_step(&sess, KEEP, shifted));
        if (shifted[0] > 0) {
            ref_shift(&r, KEEP, shifted[0], quantized);
            if (quantized)
                ref_shift(&r2, KEEP, shifted[0], 0);
            shifts++;
        }
        ref_step(&r, token, r.n, ref);
        if (quantized) {
            ref_step(&r2, token, r2.n, ref2);
            if (shifts > 0) {
                mean += logit_mean_error(dec.logits, ref, vocab);
                mean2 += logit_mean_error(dec.logits, ref2, vocab);
                after++;
            }
        }
        assert_int_equal(r.n, sess.seqs[0].n);
        /* The running reference re-quantizes a quantized cache's shifted
         * rows as the cache does (ref_shift), so only neighbouring codes
         * separate them: the bound of no shift. ref_full does not, so it
         * has the bound of shifted rows. */
        double err = logit_error(dec.logits, ref, vocab), err_full = 0.0;
        double b = bound(m, dtype, shifts > 0 && !kvrt_dtype_is_quantized(dtype));
        double b_full = bound(m, dtype, shifts > 0);
        if (one_layer) {
            double *full = malloc((size_t)vocab * sizeof(double));
            ref_full(m, style, dtype, sess.seqs[0].tokens, sess.seqs[0].n, full);
            err_full = logit_error(dec.logits, full, vocab);
            free(full);
        }
        worst = fmax(worst, err);
        worst_full = fmax(worst_full, err_full);
        if (err > b || err_full > b_full)
            fail_msg("%s cache, step %d after %d shifts: logits err %.3g (bound %.3g), %.3g "
                     "against ref_full (bound %.3g)", kvrt_dtype_name(dtype), step, shifts, err,
                     b, err_full, b_full);
        int32_t pos_max;
        assert_int_equal(kvrt_seq_pos_max(dec.cache, 0, &pos_max), KVRT_OK);
        assert_int_equal(pos_max, sess.seqs[0].n - 1);
    }
    assert_true(shifts >= 3);
    mean /= after > 0 ? after : 1;
    mean2 /= after > 0 ? after : 1;
    if (quantized && !(mean <= 0.5 * mean2))
        fail_msg("%s cache: mean logit err %.3g after shifts against the reference that "
                 "re-quantizes shifted rows, %.3g against one that does not: the shift does not "
                 "re-quantize as documented", kvrt_dtype_name(dtype), mean, mean2);
    char full[96] = "", means[128] = "";
    if (one_layer)
        snprintf(full, sizeof full, "; %.3g against ref_full (bound %.3g)", worst_full,
                 bound(m, dtype, 1));
    if (quantized)
        snprintf(means, sizeof means, "; after shifts mean %.3g, %.3g against a reference that "
                 "does not re-quantize", mean, mean2);
    print_message("shift, %d layers, %s cache, %s rope: %d shifts, worst logit error %.3g "
                  "(bound %.3g)%s%s\n", m->config.n_layers, kvrt_dtype_name(dtype),
                  style == KVRT_ROPE_NORMAL ? "normal" : "neox", shifts, worst,
                  bound(m, dtype, !quantized), full, means);
    ref_free(&r);
    ref_free(&r2);
    free(ref);
    free(ref2);
    close_session(&dec, &sess);
}

static void test_shift(void **state)
{
    (void)state;
    for (int d = 0; d < n_dtypes(); d++) {
        check_shift(&model3, dtypes[d], KVRT_ROPE_NORMAL);
        check_shift(&model3, dtypes[d], KVRT_ROPE_NEOX);
        check_shift(&model1, dtypes[d], KVRT_ROPE_NORMAL); /* and ref_full over the kept tokens */
    }
}

/* ------------------------------------------------------------------------ */
/* (c) forks decode as the prompt alone                                      */
/* ------------------------------------------------------------------------ */

/*
 * Batched and alone run the same arithmetic, split differently: OpenBLAS
 * blocks a GEMM by its row count and picks its kernels by CPU, and
 * attention's work split follows the batch. So the two may round
 * differently, and on f16/bf16/q8/fp8 caches a K or V element may then be
 * stored as the neighbouring value of its dtype. Each run is within
 * bound(m, dtype, 0) of the double reference (the argument above bound(),
 * which counts such neighbouring roundings: 4 u_dtype), so the two are within
 * twice that of each other, relative to (1 + max |logit|). Measured: about
 * 3e-6 with the same GEMM kernels, 2e-3 on bf16 when they differ (AVX2
 * OpenBLAS), against a bound of 3.3e-2.
 *
 * The alone runs are fed the batched run's tokens (teacher forcing): a
 * sampled token whose coin lies within a rounding of a cumulative
 * probability may legitimately differ, and would make every later step
 * incomparable. Tokens that the alone run would have sampled differently
 * are counted and printed.
 */
static void check_fork(kvrt_dtype dtype)
{
    enum { N = 4, STEPS = 30, VOCAB = 384 };
    static float logits[STEPS][N][VOCAB]; /* static: a failed assertion leaks nothing */
    int vocab = model3.config.vocab_size;
    assert_int_equal(vocab, VOCAB);
    int together[N][STEPS];
    llama_decoder dec;
    llama_session sess;
    open_session(&model3, dtype, 64, N, 1.0f, 100, &dec, &sess);
    TRY(llama_prefill(&sess, 0, prompt, PROMPT_LEN));
    for (int s = 1; s < N; s++)
        TRY(llama_fork(&sess, 0, s, 100 + s, dec.logits));
    kvrt_cache_stats st;
    assert_int_equal(kvrt_cache_stats_get(dec.cache, -1, &st), KVRT_OK);
    assert_true(st.blocks_shared >= 1); /* the prompt's full block is shared, not copied */
    for (int step = 0; step < STEPS; step++) {
        for (int s = 0; s < N; s++)
            together[s][step] = sess.seqs[s].pending;
        TRY(llama_decode_step(&sess, 1, NULL));
        memcpy(logits[step], dec.logits, sizeof logits[step]);
    }
    close_session(&dec, &sess);

    double worst = 0.0;
    int differ = 0;
    for (int s = 0; s < N; s++) {
        open_session(&model3, dtype, 64, 1, 1.0f, 100 + s, &dec, &sess);
        TRY(llama_prefill(&sess, 0, prompt, PROMPT_LEN));
        for (int step = 0; step < STEPS; step++) {
            differ += sess.seqs[0].pending != together[s][step];
            sess.seqs[0].pending = together[s][step];
            TRY(llama_decode_step(&sess, 1, NULL));
            double err = 0.0, scale = 0.0;
            for (int i = 0; i < vocab; i++) {
                err = fmax(err, fabs((double)logits[step][s][i] - dec.logits[i]));
                scale = fmax(scale, fabs((double)dec.logits[i]));
            }
            worst = fmax(worst, err / (1.0 + scale));
        }
        close_session(&dec, &sess);
    }
    double limit = 2.0 * bound(&model3, dtype, 0);
    print_message("fork, %s cache: %d sequences x %d tokens as alone; largest logit difference "
                  "%.3g (bound %.3g), %d of %d sampled tokens differ\n",
                  kvrt_dtype_name(dtype), N, STEPS, worst, limit, differ, N * STEPS);
    if (!(worst <= limit))
        fail_msg("%s cache: batched and alone logits differ by %.3g, above %.3g",
                 kvrt_dtype_name(dtype), worst, limit);
}

static void test_fork(void **state)
{
    (void)state;
    for (int d = 0; d < n_dtypes(); d++)
        check_fork(dtypes[d]);
}

/* ------------------------------------------------------------------------ */
/* (d) save and resume                                                       */
/* ------------------------------------------------------------------------ */

/*
 * The resumed session must continue as the uninterrupted one. What the file
 * moves is checked bit-exact: every sequence's stored K and V rows (and a
 * quantized cache's scales), gathered in position order by kvrt_gather, are
 * the same bytes after the load as at the save, and so are the tokens, the
 * pending token and the sampler. The arithmetic after it is not: a context
 * shift's kvrt_cache_compact reorders the slots, and the state file writes
 * the rows in position order, so the reloaded cache holds them in another
 * slot order and attention sums them in another order. Each run is within
 * bound(m, dtype, 1) of the double reference (rows were shifted before the
 * save; the argument above bound()), so the two are within twice that of
 * each other, relative to (1 + max |logit|) (the uninterrupted run's: the
 * scales differ by the bound itself, a second-order term).
 *
 * The resumed run is fed the uninterrupted run's tokens (teacher forcing),
 * so that one token flipped at a near-tie does not make every later step
 * incomparable. A token it would have chosen differently is allowed only
 * where that is explained by the logits differing within the bound:
 *   greedy: the uninterrupted run's logits of the two tokens differ by at
 *     most 2 limit (1 + max |logit|): token a is the argmax of logits x,
 *     token b of logits y, and |x_i - y_i| <= limit (1 + max |x|) for every
 *     i, so x_a - x_b <= (y_a + e) - (y_b - e) <= 2 e;
 *   top-p: the resumed sampler, in the state it drew with, draws the
 *     uninterrupted run's token from the uninterrupted run's logits and its
 *     own from its own (the same coin, so the difference is the logits',
 *     which are within the bound).
 * Such tokens are counted and printed.
 */
enum { RESUME_N = 2, RESUME_CTX = 48, RESUME_AFTER = 30, RESUME_VOCAB = 384, RESUME_LAYERS = 3,
       RESUME_KV_DIM = 32, RESUME_KV_HEADS = 2,
       /* per sequence and layer: K and V [CTX][KV_DIM] f32 at most, the
        * positions, and a quantized cache's K and V scales */
       RESUME_LAYER_BYTES = 2 * RESUME_CTX * RESUME_KV_DIM * 4 + RESUME_CTX * 4 +
                            2 * RESUME_CTX * RESUME_KV_HEADS * 4,
       RESUME_SEQ_BYTES = RESUME_LAYERS * RESUME_LAYER_BYTES };

/* Every layer's stored rows of seq, as kvrt_gather gives them (the cache
 * dtype's bytes, in position order), with their positions and, on a
 * quantized cache, kvrt_gather_scales; out [RESUME_SEQ_BYTES], zeroed first. */
static void resume_gather(const llama_decoder *dec, int seq, int n, unsigned char *out)
{
    const llama_model *m = dec->model;
    kvrt_dtype dtype = dec->opts.cache_dtype;
    assert_int_equal(m->config.n_layers, RESUME_LAYERS);
    assert_int_equal(m->kv_dim, RESUME_KV_DIM);
    assert_int_equal(m->config.n_kv_heads, RESUME_KV_HEADS);
    assert_true(n <= RESUME_CTX);
    memset(out, 0, RESUME_SEQ_BYTES);
    size_t kv = (size_t)RESUME_CTX * RESUME_KV_DIM * kvrt_dtype_size(dtype);
    for (int l = 0; l < RESUME_LAYERS; l++) {
        unsigned char *k = out + (size_t)l * RESUME_LAYER_BYTES, *v = k + kv;
        int32_t pos[RESUME_CTX] = {0};
        int64_t got = -1;
        assert_int_equal(kvrt_gather(dec->cache, l, seq, 0, n, k, v, pos, RESUME_CTX, &got, NULL),
                         KVRT_OK);
        assert_int_equal(got, n);
        memcpy(v + kv, pos, sizeof pos);
        if (kvrt_dtype_is_quantized(dtype)) {
            float *ks = (float *)(void *)(v + kv + sizeof pos);
            float *vs = ks + RESUME_CTX * RESUME_KV_HEADS;
            assert_int_equal(kvrt_gather_scales(dec->cache, l, seq, 0, n, ks, vs, RESUME_CTX, &got,
                                                NULL), KVRT_OK);
            assert_int_equal(got, n);
        }
    }
}

static void check_resume(kvrt_dtype dtype, float temperature)
{
    enum { N = RESUME_N, BEFORE = 50, AFTER = RESUME_AFTER, CTX = RESUME_CTX,
           VOCAB = RESUME_VOCAB };
    /* static: a failed assertion leaks nothing */
    static float logits[AFTER][N][VOCAB], probs[VOCAB];
    static unsigned char stored_at_save[N][RESUME_SEQ_BYTES], stored_loaded[N][RESUME_SEQ_BYTES];
    static int tokens_at_save[N][CTX];
    char path[320];
    snprintf(path, sizeof path, "%s/session.kvll", dir);
    int vocab = model3.config.vocab_size;
    assert_int_equal(vocab, VOCAB);
    int first[N][AFTER + 1], n_at_save[N], shifts_first[AFTER], shifts = 0;
    llama_sampler sampler_at_save[N];
    llama_decoder dec;
    llama_session sess;
    open_session(&model3, dtype, CTX, N, temperature, 1, &dec, &sess);
    TRY(llama_prefill(&sess, 0, prompt, PROMPT_LEN));
    TRY(llama_fork(&sess, 0, 1, 0, NULL));
    TRY(llama_truncate(&sess, 1, 10)); /* seq 1 continues differently */
    TRY(llama_prefill(&sess, 1, prompt + 15, 5));
    for (int i = 0; i < BEFORE; i++) { /* past the context: shifts before the save */
        int shifted[N];
        TRY(llama_decode_step(&sess, 1, shifted));
        shifts += (shifted[0] > 0) + (shifted[1] > 0);
    }
    assert_true(shifts >= 1); /* the slots were reordered (kvrt_cache_compact) */
    TRY(llama_session_save(&sess, path));
    for (int s = 0; s < N; s++) {
        n_at_save[s] = sess.seqs[s].n;
        memcpy(tokens_at_save[s], sess.seqs[s].tokens, (size_t)n_at_save[s] * sizeof(int));
        sampler_at_save[s] = sess.seqs[s].sampler;
        resume_gather(&dec, s, n_at_save[s], stored_at_save[s]);
    }
    for (int i = 0; i < AFTER; i++) {
        int shifted[N];
        for (int s = 0; s < N; s++)
            first[s][i] = sess.seqs[s].pending;
        TRY(llama_decode_step(&sess, 1, shifted));
        shifts_first[i] = shifted[0] + shifted[1];
        memcpy(logits[i], dec.logits, sizeof logits[i]);
    }
    for (int s = 0; s < N; s++)
        first[s][AFTER] = sess.seqs[s].pending;
    close_session(&dec, &sess);

    open_session(&model3, dtype, CTX, N, temperature, 99, &dec, &sess); /* samplers from the file */
    TRY(llama_session_load(&sess, path));
    /* What the file moved, bit-exact. */
    for (int s = 0; s < N; s++) {
        if (sess.seqs[s].n != n_at_save[s] ||
            memcmp(sess.seqs[s].tokens, tokens_at_save[s], (size_t)n_at_save[s] * sizeof(int)) ||
            sess.seqs[s].pending != first[s][0] ||
            sess.seqs[s].sampler.rng != sampler_at_save[s].rng ||
            sess.seqs[s].sampler.temperature != sampler_at_save[s].temperature ||
            sess.seqs[s].sampler.top_p != sampler_at_save[s].top_p)
            fail_msg("%s cache, seq %d: the loaded session's tokens, pending token or sampler are "
                     "not those saved", kvrt_dtype_name(dtype), s);
        resume_gather(&dec, s, n_at_save[s], stored_loaded[s]);
        size_t q = 0;
        while (q < RESUME_SEQ_BYTES && stored_loaded[s][q] == stored_at_save[s][q])
            q++;
        if (q < RESUME_SEQ_BYTES)
            fail_msg("%s cache, seq %d: the stored rows (kvrt_gather) after the load are not "
                     "those at the save: layer %d, byte %d of its K, V, positions and scales",
                     kvrt_dtype_name(dtype), s, (int)(q / RESUME_LAYER_BYTES),
                     (int)(q % RESUME_LAYER_BYTES));
    }
    double limit = 2.0 * bound(&model3, dtype, 1), worst = 0.0;
    int differ = 0;
    for (int i = 0; i < AFTER; i++) {
        int shifted[N];
        llama_sampler before[N];
        for (int s = 0; s < N; s++) {
            sess.seqs[s].pending = first[s][i]; /* teacher forcing */
            before[s] = sess.seqs[s].sampler;
        }
        TRY(llama_decode_step(&sess, 1, shifted));
        assert_int_equal(shifted[0] + shifted[1], shifts_first[i]);
        for (int s = 0; s < N; s++) {
            const float *x = logits[i][s], *y = dec.logits + (size_t)s * vocab;
            double err = 0.0, scale = 0.0;
            for (int j = 0; j < vocab; j++) {
                err = fmax(err, fabs((double)x[j] - y[j]));
                scale = fmax(scale, fabs((double)x[j]));
            }
            worst = fmax(worst, err / (1.0 + scale));
            if (!(err <= limit * (1.0 + scale)))
                fail_msg("%s cache, seq %d, step %d after resume: logits differ by %.3g from the "
                         "uninterrupted run's, above %.3g", kvrt_dtype_name(dtype), s, i,
                         err / (1.0 + scale), limit);
            int a = first[s][i + 1], b = sess.seqs[s].pending;
            if (a == b)
                continue;
            differ++;
            if (temperature <= 0.0f) {
                double gap = ((double)x[a] - x[b]) / (1.0 + scale);
                if (!(gap <= 2.0 * limit))
                    fail_msg("%s cache, seq %d, step %d after resume: token %d, %d uninterrupted, "
                             "whose logits there differ by %.3g: not a near-tie (%.3g)",
                             kvrt_dtype_name(dtype), s, i + 1, b, a, gap, 2.0 * limit);
            } else {
                llama_sampler again = before[s];
                memcpy(probs, x, sizeof probs);
                int from_x = llama_sample(&again, probs, vocab, sess.scratch);
                again = before[s];
                memcpy(probs, y, sizeof probs);
                int from_y = llama_sample(&again, probs, vocab, sess.scratch);
                if (from_x != a || from_y != b)
                    fail_msg("%s cache, seq %d, step %d after resume: token %d, %d uninterrupted; "
                             "the resumed sampler draws %d from the uninterrupted logits, %d from "
                             "its own", kvrt_dtype_name(dtype), s, i + 1, b, a, from_x, from_y);
            }
        }
    }
    print_message("resume, %s cache, %s: %d sequences x %d tokens, saved after %d context "
                  "shifts; stored rows bit-exact; largest logit difference %.3g (bound %.3g), "
                  "%d of %d tokens differ\n", kvrt_dtype_name(dtype),
                  temperature <= 0.0f ? "greedy" : "top-p", N, AFTER, shifts, worst, limit,
                  differ, N * AFTER);
    close_session(&dec, &sess);
}

static void test_resume(void **state)
{
    (void)state;
    for (int d = 0; d < n_dtypes(); d++)
        check_resume(dtypes[d], 0.0f); /* greedy */
    check_resume(KVRT_F32, 1.0f);      /* top-p: the samplers' state resumes too */
}

/* ------------------------------------------------------------------------ */
/* (f) a GPU backend gives the CPU backend's tokens                          */
/* ------------------------------------------------------------------------ */

/*
 * One greedy session, run on the CPU backend and on the test's backend: a
 * prompt prefilled in chunks, forked (kvrt_seq_cp), the fork truncated
 * (kvrt_seq_rm) and continued with other tokens, then both decoded as one
 * batch past the context (kvrt_seq_rm + kvrt_seq_shift + kvrt_cache_compact),
 * the session saved halfway. The CPU's session file, loaded into a fresh
 * cache on the test's backend, continues from there.
 *
 * The backends sum in other orders (and on f16/bf16 a K or V element may then
 * be stored as the neighbouring value of its dtype, before or after a shift's
 * re-rotation). Rows were shifted, so each backend's logits are within
 * bound(m, dtype, 1) of the double reference (the argument above bound()),
 * and the two within twice that of each other, relative to (1 + max |logit|)
 * (the CPU's: the scales differ by the bound itself, a second-order term).
 * The resumed run starts from the CPU's own rows, so the same holds.
 *
 * The runs on the test's backend are fed the CPU's tokens (teacher forcing):
 * a greedy token at a near-tie may legitimately flip and would make every
 * later step incomparable. A token they would have chosen differently is
 * allowed only at a near-tie: token a is the argmax of the CPU's logits x,
 * token b of the other's y, and |x_i - y_i| <= e = limit (1 + max |x|), so
 * x_a - x_b <= (y_a + e) - (y_b - e) <= 2 e; a larger gap fails. Such tokens
 * are counted and printed.
 */
enum { AGREE_SEQS = 2, AGREE_STEPS = 40, AGREE_SAVE = 20, AGREE_CTX = 32 };

typedef struct agree_run {
    int    tokens[AGREE_STEPS + 1][AGREE_SEQS]; /* pending before each step, then after the last */
    float *logits; /* [AGREE_STEPS + 1][AGREE_SEQS][vocab]: row t, those tokens[t] was drawn from
                    * (0: each sequence's last prefill; t > 0: step t - 1) */
    int    shifts;
} agree_run;

/* Steps [from, from + steps) of sess into run; when force is not NULL, each
 * step runs force's tokens (run->tokens keeps the session's own choices). */
static void agree_record(llama_session *sess, agree_run *run, int from, int steps,
                         const agree_run *force)
{
    int vocab = sess->dec->model->config.vocab_size;
    for (int step = from; step < from + steps; step++) {
        int shifted[AGREE_SEQS];
        for (int s = 0; s < AGREE_SEQS; s++) {
            run->tokens[step][s] = sess->seqs[s].pending;
            if (force)
                sess->seqs[s].pending = force->tokens[step][s];
        }
        TRY(llama_decode_step(sess, 1, shifted));
        run->shifts += shifted[0] > 0;
        memcpy(run->logits + (size_t)(step + 1) * AGREE_SEQS * vocab, sess->dec->logits,
               (size_t)AGREE_SEQS * vocab * sizeof(float));
    }
    for (int s = 0; s < AGREE_SEQS; s++)
        run->tokens[from + steps][s] = sess->seqs[s].pending;
}

static void agree_session(kvrt_backend on, kvrt_dtype dtype, const char *save, agree_run *run,
                          const agree_run *force)
{
    kvrt_backend test_backend = backend;
    int vocab = model3.config.vocab_size;
    llama_decoder dec;
    llama_session sess;
    backend = on;
    open_session(&model3, dtype, AGREE_CTX, AGREE_SEQS, 0.0f, 1, &dec, &sess);
    backend = test_backend;
    TRY(llama_prefill(&sess, 0, prompt, PROMPT_LEN)); /* chunks of 16 and 4 */
    memcpy(run->logits, dec.logits, (size_t)vocab * sizeof(float));
    TRY(llama_fork(&sess, 0, 1, 0, NULL));
    TRY(llama_truncate(&sess, 1, 10));
    TRY(llama_prefill(&sess, 1, prompt + 12, 6));
    memcpy(run->logits + vocab, dec.logits, (size_t)vocab * sizeof(float));
    agree_record(&sess, run, 0, AGREE_SAVE, force);
    if (save)
        TRY(llama_session_save(&sess, save));
    agree_record(&sess, run, AGREE_SAVE, AGREE_STEPS - AGREE_SAVE, force);
    close_session(&dec, &sess);
}

/* b, teacher-forced with a's tokens, against a: the logits rows (see
 * agree_run) [from_row, AGREE_STEPS] within limit, relative to
 * (1 + max |a's|); tokens [from_token, AGREE_STEPS] equal but at near-ties
 * (above), or exactly equal where b did not draw them (exact < 0: none; else
 * that step, e.g. the pending token a session file holds). Returns the
 * largest logit difference; adds the differing tokens to *differ. */
static double agree_compare(const agree_run *a, const agree_run *b, int from_row, int from_token,
                            int exact, double limit, kvrt_dtype dtype, const char *what,
                            int *differ)
{
    int vocab = model3.config.vocab_size;
    double worst = 0.0;
    for (int row = from_row; row <= AGREE_STEPS; row++) {
        for (int s = 0; s < AGREE_SEQS; s++) {
            size_t at = ((size_t)row * AGREE_SEQS + s) * vocab;
            double scale = 0.0, err = 0.0;
            for (int i = 0; i < vocab; i++) {
                scale = fmax(scale, fabs((double)a->logits[at + i]));
                err = fmax(err, fabs((double)a->logits[at + i] - b->logits[at + i]));
            }
            err /= 1.0 + scale;
            worst = fmax(worst, err);
            if (!(err <= limit))
                fail_msg("%s, %s cache, seq %d, logits of step %d: differ by %.3g > %.3g", what,
                         kvrt_dtype_name(dtype), s, row - 1, err, limit);
        }
    }
    for (int step = from_token; step <= AGREE_STEPS; step++) {
        for (int s = 0; s < AGREE_SEQS; s++) {
            int ta = a->tokens[step][s], tb = b->tokens[step][s];
            if (ta == tb)
                continue;
            if (step == exact)
                fail_msg("%s, %s cache, seq %d, step %d: token %d on %s, %d on cpu (not drawn "
                         "there: must be equal)", what, kvrt_dtype_name(dtype), s, step, tb,
                         kvrt_backend_name(backend), ta);
            (*differ)++;
            /* drawn from row `step` of each */
            size_t at = ((size_t)step * AGREE_SEQS + s) * vocab;
            double scale = 0.0;
            for (int i = 0; i < vocab; i++)
                scale = fmax(scale, fabs((double)a->logits[at + i]));
            double gap = ((double)a->logits[at + ta] - a->logits[at + tb]) / (1.0 + scale);
            if (!(gap <= 2.0 * limit))
                fail_msg("%s, %s cache, seq %d, step %d: token %d on %s, %d on cpu, whose cpu "
                         "logits differ by %.3g: not a near-tie (%.3g)", what,
                         kvrt_dtype_name(dtype), s, step, tb, kvrt_backend_name(backend), ta, gap,
                         2.0 * limit);
        }
    }
    return worst;
}

static void check_agree(kvrt_dtype dtype)
{
    enum { VOCAB = 384 };
    /* static: a failed assertion leaks nothing */
    static float cpu_logits[AGREE_STEPS + 1][AGREE_SEQS][VOCAB];
    static float gpu_logits[AGREE_STEPS + 1][AGREE_SEQS][VOCAB];
    static float resumed_logits[AGREE_STEPS + 1][AGREE_SEQS][VOCAB];
    assert_int_equal(model3.config.vocab_size, VOCAB);
    memset(resumed_logits, 0, sizeof resumed_logits); /* rows before the resume: not run */
    agree_run cpu = {.logits = &cpu_logits[0][0][0]}, gpu = {.logits = &gpu_logits[0][0][0]};
    agree_run resumed = {.logits = &resumed_logits[0][0][0]};
    char path[320];
    snprintf(path, sizeof path, "%s/agree.kvll", dir);
    agree_session(KVRT_BACKEND_CPU, dtype, path, &cpu, NULL);
    agree_session(backend, dtype, NULL, &gpu, &cpu);
    assert_true(cpu.shifts >= 2);
    assert_int_equal(gpu.shifts, cpu.shifts);
    double limit = 2.0 * bound(&model3, dtype, 1);
    int differ = 0, differ_resumed = 0;
    double worst = agree_compare(&cpu, &gpu, 0, 0, -1, limit, dtype, "same session", &differ);

    /* the CPU's session file, resumed on the test's backend: its first
     * pending token comes from the file, the logits from the step after */
    llama_decoder dec;
    llama_session sess;
    open_session(&model3, dtype, AGREE_CTX, AGREE_SEQS, 0.0f, 99, &dec, &sess);
    TRY(llama_session_load(&sess, path));
    agree_record(&sess, &resumed, AGREE_SAVE, AGREE_STEPS - AGREE_SAVE, &cpu);
    close_session(&dec, &sess);
    worst = fmax(worst, agree_compare(&cpu, &resumed, AGREE_SAVE + 1, AGREE_SAVE, AGREE_SAVE,
                                      limit, dtype, "cpu session resumed", &differ_resumed));
    print_message("%s against cpu, %s cache: %d sequences x %d greedy steps (%d shifts), "
                  "teacher-forced, and a cpu session resumed; largest logit difference %.3g "
                  "(limit %.3g), %d of %d tokens differ (near-ties), %d of %d resumed\n",
                  kvrt_backend_name(backend), kvrt_dtype_name(dtype), AGREE_SEQS, AGREE_STEPS,
                  cpu.shifts, worst, limit, differ, AGREE_SEQS * (AGREE_STEPS + 1),
                  differ_resumed, AGREE_SEQS * (AGREE_STEPS - AGREE_SAVE + 1));
}

static void test_agree(void **state)
{
    (void)state;
    if (backend == KVRT_BACKEND_CPU)
        skip(); /* the CPU against itself */
    for (int d = 0; d < 3; d++)
        check_agree(dtypes[d]);
}

/* ------------------------------------------------------------------------ */
/* Bad input                                                                 */
/* ------------------------------------------------------------------------ */

/* A load that must fail (rc -1) with a message containing needle. */
static void expect_error(int rc, const char *what, const char *needle)
{
    if (rc == 0)
        fail_msg("a bad %s loaded (expected \"%s\")", what, needle);
    if (!strstr(llama_error(), needle))
        fail_msg("%s: message \"%s\" does not name \"%s\"", what, llama_error(), needle);
}

static unsigned char *slurp(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *data = malloc(*n);
    assert_non_null(data);
    assert_int_equal(fread(data, 1, *n, f), *n);
    fclose(f);
    return data;
}

static void spill(const char *path, const void *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, n, f), n);
    fclose(f);
}

/* Loading the checkpoint with header field `field` set to value (field < 0:
 * unchanged), cut to `bytes` (0: whole), fails naming `needle`. */
static void bad_checkpoint(int field, int32_t value, size_t bytes, const char *needle)
{
    size_t n;
    unsigned char *data = slurp(model3_path, &n);
    if (field >= 0)
        memcpy(data + 4 * field, &value, 4);
    char path[320];
    snprintf(path, sizeof path, "%s/bad.bin", dir);
    spill(path, data, bytes ? bytes : n);
    llama_model m;
    expect_error(llama_model_load(path, &m), "checkpoint", needle);
    assert_null(m.map);
    free(data);
}

static void test_bad_checkpoint(void **state)
{
    (void)state;
    size_t n;
    free(slurp(model3_path, &n));
    bad_checkpoint(-1, 0, 20, "shorter than the 28-byte header");
    bad_checkpoint(-1, 0, n - 1000, "needs");                 /* truncated */
    bad_checkpoint(0, 0x32346b61, 0, "version 1 or 2");       /* "ak42" */
    bad_checkpoint(2, 1000, 0, "n_layers 1000, but the file holds 3 layers");
    bad_checkpoint(2, 2, 0, "n_layers 2, but the file holds 3 layers");
    bad_checkpoint(0, 1 << 30, 0, "dim 1073741824 is out of range");
    bad_checkpoint(0, 0, 0, "dim 0 is out of range");
    bad_checkpoint(1, -5, 0, "hidden_dim -5 is out of range");
    bad_checkpoint(3, 0, 0, "n_heads 0 is out of range");
    bad_checkpoint(3, 3, 0, "n_heads 3 does not divide dim 64");
    bad_checkpoint(4, 3, 0, "n_kv_heads 3 does not divide n_heads 4");
    bad_checkpoint(4, 8, 0, "n_kv_heads 8 is out of range");
    bad_checkpoint(3, 64, 0, "head size dim / n_heads = 1");
    bad_checkpoint(5, INT32_MIN, 0, "vocab_size 0 is out of range");
    bad_checkpoint(5, 1 << 22, 0, "needs");                   /* passes the range, not the size */
    bad_checkpoint(5, 384, 0, "holds a separate classifier"); /* sign says shared */
    bad_checkpoint(6, 0, 0, "seq_len 0 is out of range");
    bad_checkpoint(6, 1 << 24, 0, "needs");
    /* an absurd but in-range header over a small file allocates nothing */
    bad_checkpoint(1, 1 << 20, 0, "needs");
}

static void bad_tokenizer(size_t at, int32_t value, size_t bytes, size_t extra, const char *needle)
{
    size_t n;
    unsigned char *data = slurp(tok3_path, &n);
    data = realloc(data, n + extra);
    memset(data + n, 0, extra);
    if (at != (size_t)-1)
        memcpy(data + at, &value, 4);
    char path[320];
    snprintf(path, sizeof path, "%s/bad_tokenizer.bin", dir);
    spill(path, data, bytes ? bytes : n + extra);
    llama_tokenizer tok;
    expect_error(llama_tokenizer_load(path, model3.config.vocab_size, &tok), "tokenizer", needle);
    assert_null(tok.pieces);
    free(data);
}

static void test_bad_tokenizer(void **state)
{
    (void)state;
    llama_tokenizer tok;
    TRY(llama_tokenizer_load(tok3_path, model3.config.vocab_size, &tok));
    llama_tokenizer_free(&tok);
    /* token 0 is "<unk>": score at 4, length at 8, bytes at 12 */
    bad_tokenizer((size_t)-1, 0, 2, 0, "no max_token_length");
    bad_tokenizer(0, -1, 0, 0, "max_token_length -1 is out of range");
    bad_tokenizer(0, 1 << 30, 0, 0, "max_token_length 1073741824 is out of range");
    bad_tokenizer(8, 1 << 30, 0, 0, "token 0: length 1073741824 is out of range");
    bad_tokenizer(8, -3, 0, 0, "token 0: length -3 is out of range");
    bad_tokenizer(8, 15, 0, 0, "");                 /* a lying length desynchronizes what follows */
    bad_tokenizer((size_t)-1, 0, 100, 0, "of the model's vocab_size 384");
    bad_tokenizer((size_t)-1, 0, 0, 9, "9 bytes after the model's vocab_size 384 tokens");
    bad_tokenizer(4, 0x7FC00000, 0, 0, "token 0: score is not finite");
    if (llama_tokenizer_load(tok3_path, 2, &tok) == 0 || !strstr(llama_error(), "vocab_size 2"))
        fail_msg("a vocabulary of 2: %s", llama_error());
}

static void test_bad_session(void **state)
{
    (void)state;
    char path[320], bad[320];
    snprintf(path, sizeof path, "%s/good.kvll", dir);
    snprintf(bad, sizeof bad, "%s/bad.kvll", dir);
    llama_decoder dec;
    llama_session sess;
    open_session(&model3, KVRT_F32, 64, 1, 0.0f, 1, &dec, &sess);
    /* a prompt longer than the context: an error, nothing run */
    int long_prompt[80];
    for (int i = 0; i < 80; i++)
        long_prompt[i] = i + 3;
    assert_int_equal(llama_prefill(&sess, 0, long_prompt, 80), -1);
    assert_non_null(strstr(llama_error(), "80 tokens after the 0 cached do not fit the context of 64"));
    assert_int_equal(sess.seqs[0].n, 0);
    TRY(llama_prefill(&sess, 0, prompt, PROMPT_LEN));
    TRY(llama_session_save(&sess, path));
    close_session(&dec, &sess);

    size_t n;
    unsigned char *data = slurp(path, &n);
    struct { size_t bytes; size_t at; int32_t value; const char *needle; } cases[] = {
        {1, (size_t)-1, 0, "kvrt_state_read"},                 /* n - 100: in kvrt's state */
        {40, (size_t)-1, 0, "truncated"},                      /* in the header's tokens */
        {0, 0, 0x12345678, "magic"},
        {0, 8, 5000, "n_seqs 5000 is out of range"},
        {0, 12, 96, "dim 96 in file, 64 in the model"},
        {0, 36, 1000, "1000 tokens do not fit the context of 64"},
        {0, 40, 384, "pending token 384 is outside the vocabulary"},
        {0, 60, -4, "token 0 is outside the vocabulary"},
        {2, 36, 19, "the cache state holds 20 tokens"}, /* 19 in the header, 20 in kvrt's state */
    };
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        unsigned char *copy = malloc(n);
        memcpy(copy, data, n);
        if (cases[c].at != (size_t)-1)
            memcpy(copy + cases[c].at, &cases[c].value, 4);
        size_t bytes = cases[c].bytes ? cases[c].bytes : n;
        if (cases[c].bytes == 1)
            bytes = n - 100;
        if (cases[c].bytes == 2) { /* drop the header's last token, keep kvrt's state whole */
            memmove(copy + 60 + 19 * 4, copy + 60 + 20 * 4, n - (60 + 20 * 4));
            bytes = n - 4;
        }
        spill(bad, copy, bytes);
        free(copy);
        open_session(&model3, KVRT_F32, 64, 1, 0.0f, 1, &dec, &sess);
        expect_error(llama_session_load(&sess, bad), "session", cases[c].needle);
        int64_t cached;
        assert_int_equal(kvrt_seq_n_tokens(dec.cache, 0, &cached), KVRT_OK);
        assert_int_equal(cached, 0);
        assert_int_equal(sess.seqs[0].n, 0);
        close_session(&dec, &sess);
    }
    free(data);
}

/* ------------------------------------------------------------------------ */
/* GGUF                                                                      */
/* ------------------------------------------------------------------------ */

/* A GGUF file (version 3) built in memory. */
typedef struct gbuf {
    unsigned char *p;
    size_t         n, cap;
} gbuf;

static void put(gbuf *b, const void *data, size_t n)
{
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2;
        b->p = realloc(b->p, b->cap);
        assert_non_null(b->p);
    }
    memcpy(b->p + b->n, data, n);
    b->n += n;
}

static void put_u32(gbuf *b, uint32_t v) { put(b, &v, 4); }
static void put_u64(gbuf *b, uint64_t v) { put(b, &v, 8); }
static void put_str(gbuf *b, const char *s)
{
    put_u64(b, strlen(s));
    put(b, s, strlen(s));
}
static void kv_u32(gbuf *b, const char *key, uint32_t v)
{
    put_str(b, key);
    put_u32(b, 4); /* GGUF_UINT32 */
    put_u32(b, v);
}
static void kv_f32(gbuf *b, const char *key, float v)
{
    put_str(b, key);
    put_u32(b, 6); /* GGUF_FLOAT32 */
    put(b, &v, 4);
}
static void kv_str(gbuf *b, const char *key, const char *v)
{
    put_str(b, key);
    put_u32(b, 8); /* GGUF_STRING */
    put_str(b, v);
}

/* How the test's GGUF writer may lie. */
typedef struct gguf_lies {
    int         f16;          /* tensors as f16 */
    int         block_count;  /* != 0: llama.block_count */
    const char *drop;         /* a tensor left out */
    const char *arch;         /* general.architecture (NULL: "llama") */
    int         wrong_dims;   /* blk.0.attn_k.weight of dims [dim, dim] */
    int         f64_type;     /* blk.0.attn_q.weight of ggml type 2 (q4_0) */
} gguf_lies;

/* A tensor to write: its name, dims [d0, d1] (d1 0: one dim) and floats. */
typedef struct gtensor {
    char         name[64];
    uint64_t     d0, d1;
    const float *data;
} gtensor;

static size_t gtensor_bytes(const gtensor *t, int f16)
{
    return (size_t)(t->d0 * (t->d1 ? t->d1 : 1)) * (f16 ? 2 : 4);
}

/* Writes m (and the pieces and scores of tok, spaces as U+2581) as GGUF. */
static void write_gguf(const char *path, const llama_model *m, const llama_tokenizer *tok,
                       const gguf_lies *lies)
{
    const llama_config *c = &m->config;
    const llama_weights *w = &m->w;
    uint64_t dim = (uint64_t)c->dim, hidden = (uint64_t)c->hidden_dim;
    uint64_t kv = (uint64_t)m->kv_dim, vocab = (uint64_t)c->vocab_size;
    gtensor *ts = calloc((size_t)c->n_layers * 9 + 3, sizeof *ts);
    int n = 0;
    ts[n++] = (gtensor){"token_embd.weight", dim, vocab, w->token_embedding};
    ts[n++] = (gtensor){"output_norm.weight", dim, 0, w->rms_final};
    if (!c->shared_classifier)
        ts[n++] = (gtensor){"output.weight", dim, vocab, w->wcls};
    for (int l = 0; l < c->n_layers; l++) {
        const struct { const char *name; uint64_t d0, d1; const float *data; } per[9] = {
            {"attn_norm", dim, 0, w->rms_att + l * dim},
            {"attn_q", dim, dim, w->wq + l * dim * dim},
            {"attn_k", dim, kv, w->wk + l * kv * dim},
            {"attn_v", dim, kv, w->wv + l * kv * dim},
            {"attn_output", dim, dim, w->wo + l * dim * dim},
            {"ffn_norm", dim, 0, w->rms_ffn + l * dim},
            {"ffn_gate", dim, hidden, w->w1 + l * hidden * dim},
            {"ffn_down", hidden, dim, w->w2 + l * dim * hidden},
            {"ffn_up", dim, hidden, w->w3 + l * hidden * dim}};
        for (int i = 0; i < 9; i++) {
            gtensor *t = &ts[n];
            snprintf(t->name, sizeof t->name, "blk.%d.%s.weight", l, per[i].name);
            *t = (gtensor){"", per[i].d0, per[i].d1, per[i].data};
            snprintf(t->name, sizeof t->name, "blk.%d.%s.weight", l, per[i].name);
            if (lies->wrong_dims && l == 0 && i == 2)
                t->d1 = dim;
            if (!lies->drop || strcmp(lies->drop, t->name) != 0)
                n++;
        }
    }
    gbuf b = {0};
    put(&b, "GGUF", 4);
    put_u32(&b, 3);
    put_u64(&b, (uint64_t)n);
    put_u64(&b, 12);
    kv_str(&b, "general.architecture", lies->arch ? lies->arch : "llama");
    kv_u32(&b, "general.alignment", 32);
    kv_u32(&b, "llama.context_length", (uint32_t)c->seq_len);
    kv_u32(&b, "llama.embedding_length", (uint32_t)c->dim);
    kv_u32(&b, "llama.block_count", (uint32_t)(lies->block_count ? lies->block_count : c->n_layers));
    kv_u32(&b, "llama.feed_forward_length", (uint32_t)c->hidden_dim);
    kv_u32(&b, "llama.attention.head_count", (uint32_t)c->n_heads);
    kv_u32(&b, "llama.attention.head_count_kv", (uint32_t)c->n_kv_heads);
    kv_f32(&b, "llama.attention.layer_norm_rms_epsilon", 1e-5f);
    kv_str(&b, "tokenizer.ggml.model", "llama");
    put_str(&b, "tokenizer.ggml.tokens");
    put_u32(&b, 9); /* GGUF_ARRAY */
    put_u32(&b, 8); /* of GGUF_STRING */
    put_u64(&b, (uint64_t)tok->vocab_size);
    for (int i = 0; i < tok->vocab_size; i++) {
        char piece[256] = "";
        for (const char *q = tok->pieces[i]; *q; q++)
            strcat(piece, *q == ' ' ? "\xe2\x96\x81" : (char[2]){*q, 0});
        put_str(&b, piece);
    }
    put_str(&b, "tokenizer.ggml.scores");
    put_u32(&b, 9);
    put_u32(&b, 6); /* of GGUF_FLOAT32 */
    put_u64(&b, (uint64_t)tok->vocab_size);
    put(&b, tok->scores, (size_t)tok->vocab_size * sizeof(float));
    uint64_t offset = 0;
    for (int i = 0; i < n; i++) {
        put_str(&b, ts[i].name);
        put_u32(&b, ts[i].d1 ? 2 : 1);
        put_u64(&b, ts[i].d0);
        if (ts[i].d1)
            put_u64(&b, ts[i].d1);
        int q40 = lies->f64_type && !strcmp(ts[i].name, "blk.0.attn_q.weight");
        put_u32(&b, q40 ? 2 : lies->f16 ? 1 : 0);
        put_u64(&b, offset);
        offset += (gtensor_bytes(&ts[i], lies->f16) + 31) / 32 * 32;
    }
    static const unsigned char zeros[32];
    put(&b, zeros, (32 - b.n % 32) % 32);
    for (int i = 0; i < n; i++) {
        size_t count = gtensor_bytes(&ts[i], lies->f16) / (lies->f16 ? 2 : 4);
        for (size_t e = 0; e < count; e++) {
            if (lies->f16) {
                uint16_t h = kvrt_f32_to_f16(ts[i].data[e]);
                put(&b, &h, 2);
            } else {
                put(&b, &ts[i].data[e], 4);
            }
        }
        put(&b, zeros, (32 - b.n % 32) % 32);
    }
    spill(path, b.p, b.n);
    free(b.p);
    free(ts);
}

/* Prefill and greedy decode on the CPU backend; logits [1 + steps][vocab]. */
static void gguf_run(const llama_model *m, int steps, float *logits)
{
    kvrt_backend saved = backend;
    llama_decoder dec;
    llama_session sess;
    backend = KVRT_BACKEND_CPU;
    open_session(m, KVRT_F32, 64, 1, 0.0f, 1, &dec, &sess);
    backend = saved;
    size_t vocab = (size_t)m->config.vocab_size;
    TRY(llama_prefill(&sess, 0, prompt, PROMPT_LEN));
    memcpy(logits, dec.logits, vocab * sizeof(float));
    for (int i = 1; i <= steps; i++) {
        TRY(llama_decode_step(&sess, 1, NULL));
        memcpy(logits + i * vocab, dec.logits, vocab * sizeof(float));
    }
    close_session(&dec, &sess);
}

/* The llama2.c checkpoint at from with every weight rounded to f16, at to. */
static void round_checkpoint_f16(const char *from, const char *to)
{
    size_t n;
    unsigned char *data = slurp(from, &n);
    for (size_t at = 28; at + 4 <= n; at += 4) {
        float f;
        memcpy(&f, data + at, 4);
        f = kvrt_f16_to_f32(kvrt_f32_to_f16(f));
        memcpy(data + at, &f, 4);
    }
    spill(to, data, n);
    free(data);
}

/* A GGUF of the same weights as a llama2.c checkpoint gives its logits, bit
 * for bit (f16: the checkpoint's weights rounded to f16): the reader put
 * every tensor where the decoder expects it. Its tokenizer encodes as
 * tokenizer.bin does. */
static void check_gguf(const llama_model *m, const char *bin_path, int f16)
{
    enum { STEPS = 12 };
    char gguf_path[320], rounded_path[320];
    snprintf(gguf_path, sizeof gguf_path, "%s/model.gguf", dir);
    snprintf(rounded_path, sizeof rounded_path, "%s/rounded.bin", dir);
    llama_tokenizer tok, gtok;
    TRY(llama_tokenizer_load(tok3_path, m->config.vocab_size, &tok));
    write_gguf(gguf_path, m, &tok, &(gguf_lies){.f16 = f16});

    llama_model g, want;
    TRY(llama_gguf_load(gguf_path, &g, &gtok));
    assert_true(llama_is_gguf(gguf_path));
    assert_memory_equal(&g.config, &m->config, sizeof g.config);
    if (f16) {
        round_checkpoint_f16(bin_path, rounded_path);
        TRY(llama_model_load(rounded_path, &want));
    } else {
        TRY(llama_model_load(bin_path, &want));
    }
    size_t vocab = (size_t)m->config.vocab_size;
    float *a = malloc((STEPS + 1) * vocab * sizeof(float));
    float *b = malloc((STEPS + 1) * vocab * sizeof(float));
    gguf_run(&want, STEPS, a);
    gguf_run(&g, STEPS, b);
    assert_memory_equal(a, b, (STEPS + 1) * vocab * sizeof(float));
    if (f16) { /* and f16 rounding shows: the unrounded checkpoint differs */
        gguf_run(m, STEPS, a);
        assert_memory_not_equal(a, b, vocab * sizeof(float));
    }

    const char *text = "the cat saw\n\xc3\xa9!";
    int t1[64], t2[64], n1, n2;
    TRY(llama_encode(&tok, text, 1, t1, &n1));
    TRY(llama_encode(&gtok, text, 1, t2, &n2));
    assert_int_equal(n1, n2);
    assert_memory_equal(t1, t2, (size_t)n1 * sizeof(int));
    /* the model loader reads GGUF too */
    llama_model again;
    TRY(llama_model_load(gguf_path, &again));
    assert_int_equal(again.config.shared_classifier, m->config.shared_classifier);
    print_message("gguf %s, %d layers, %s classifier: %d steps of logits equal to the llama2.c "
                  "checkpoint's\n", f16 ? "f16" : "f32", m->config.n_layers,
                  m->config.shared_classifier ? "shared" : "separate", STEPS + 1);
    llama_model_free(&again);
    llama_model_free(&g);
    llama_model_free(&want);
    llama_tokenizer_free(&gtok);
    llama_tokenizer_free(&tok);
    free(a);
    free(b);
}

static void test_gguf(void **state)
{
    (void)state;
    check_gguf(&model3, model3_path, 0);
    check_gguf(&model3, model3_path, 1);
    check_gguf(&model1, model1_path, 0);
    check_gguf(&model1, model1_path, 1);
}

/* A GGUF written with lies (or cut to bytes, or with a u32/u64 patched at
 * `at`) fails naming needle; nothing is left allocated. */
static void bad_gguf(const gguf_lies *lies, size_t bytes, size_t at, int wide, uint64_t value,
                     const char *needle)
{
    char path[320];
    snprintf(path, sizeof path, "%s/bad.gguf", dir);
    llama_tokenizer tok;
    TRY(llama_tokenizer_load(tok3_path, model3.config.vocab_size, &tok));
    write_gguf(path, &model3, &tok, lies);
    llama_tokenizer_free(&tok);
    size_t n;
    unsigned char *data = slurp(path, &n);
    if (at != (size_t)-1)
        memcpy(data + at, &value, wide ? 8 : 4);
    spill(path, data, bytes ? bytes : n);
    free(data);
    llama_model m;
    llama_tokenizer t;
    expect_error(llama_gguf_load(path, &m, &t), "gguf", needle);
    assert_null(m.owned);
}

static void test_bad_gguf(void **state)
{
    (void)state;
    const gguf_lies none = {0};
    size_t n;
    char path[320];
    snprintf(path, sizeof path, "%s/bad.gguf", dir);
    bad_gguf(&none, 10, (size_t)-1, 0, 0, "tensor count: 8 bytes at offset 8 run past the end");
    bad_gguf(&none, 0, 0, 0, 0x46554746, "magic is not \"GGUF\"");
    bad_gguf(&none, 0, 4, 0, 1, "version 1; kvrt-llama reads versions 2 and 3");
    bad_gguf(&none, 0, 8, 1, 1ull << 40, "tensor count 1099511627776 is more than the file");
    bad_gguf(&none, 0, 16, 1, 1ull << 40, "key count 1099511627776 is more than the file");
    bad_gguf(&none, 0, 24, 1, 1ull << 40, "key 0: 1099511627776 bytes at offset 32 run past");
    bad_gguf(&none, 300, (size_t)-1, 0, 0, "tensor count 30 is more than the file can hold");
    bad_gguf(&none, 2000, (size_t)-1, 0, 0, "key tokenizer.ggml.tokens: 384 strings run past");
    bad_gguf(&none, 4000, (size_t)-1, 0, 0, "run past the end of the file (4000 bytes)");
    free(slurp(model3_path, &n));                                  /* the data section cut: */
    bad_gguf(&none, n / 2, (size_t)-1, 0, 0, "do not lie inside the file");
    bad_gguf(&(gguf_lies){.block_count = 4}, 0, (size_t)-1, 0, 0,
             "tensor blk.3.attn_norm.weight is missing");
    bad_gguf(&(gguf_lies){.block_count = 5000}, 0, (size_t)-1, 0, 0,
             "llama.block_count 5000 is out of range");
    bad_gguf(&(gguf_lies){.drop = "blk.1.ffn_up.weight"}, 0, (size_t)-1, 0, 0,
             "tensor blk.1.ffn_up.weight is missing");
    bad_gguf(&(gguf_lies){.arch = "gpt2"}, 0, (size_t)-1, 0, 0,
             "general.architecture is \"gpt2\"; kvrt-llama reads \"llama\"");
    bad_gguf(&(gguf_lies){.wrong_dims = 1}, 0, (size_t)-1, 0, 0,
             "tensor blk.0.attn_k.weight: dims [64, 64, 1, 1], the config says [64, 32]");
    bad_gguf(&(gguf_lies){.f64_type = 1}, 0, (size_t)-1, 0, 0,
             "tensor blk.0.attn_q.weight: ggml type 2; kvrt-llama reads f32 (0) and f16 (1)");
}

/* ------------------------------------------------------------------------ */
/* Tokenizer                                                                 */
/* ------------------------------------------------------------------------ */

static void test_tokenizer(void **state)
{
    (void)state;
    llama_tokenizer tok;
    TRY(llama_tokenizer_load(tok3_path, model3.config.vocab_size, &tok));
    const char *text = "the cat saw\n\xc3\xa9!";
    int tokens[64], n;
    TRY(llama_encode(&tok, text, 1, tokens, &n));
    assert_int_equal(tokens[0], LLAMA_BOS);
    /* merges happened (" the" is one token) and decoding gives the text back */
    assert_string_equal(tok.pieces[tokens[1]], " the");
    char back[64] = "";
    for (int i = 1; i < n; i++)
        strcat(back, llama_piece(&tok, tokens[i - 1], tokens[i]));
    assert_string_equal(back, text);
    llama_tokenizer_free(&tok);
}

/* 1 when name is one of the comma-separated names of list (NULL: all). */
static int listed(const char *list, const char *name)
{
    size_t len = strlen(name);
    for (const char *p = list; p; p = strchr(p, ',') ? strchr(p, ',') + 1 : NULL)
        if (!strncmp(p, name, len) && (p[len] == ',' || p[len] == '\0'))
            return 1;
    return list == NULL;
}

int main(int argc, char **argv)
{
    const char *only = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--backend") && i + 1 < argc) {
            const char *b = argv[++i];
            backend = !strcmp(b, "cuda") ? KVRT_BACKEND_CUDA
                      : !strcmp(b, "hip") ? KVRT_BACKEND_HIP : KVRT_BACKEND_CPU;
        } else if (!strcmp(argv[i], "--only") && i + 1 < argc) {
            only = argv[++i];
        }
    }
    if (kvrt_device_count(backend) == 0) {
        printf("no %s device: skipped\n", kvrt_backend_name(backend));
        return 77;
    }
    struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tokenizer),
        cmocka_unit_test(test_decode),
        cmocka_unit_test(test_shift),
        cmocka_unit_test(test_fork),
        cmocka_unit_test(test_resume),
        cmocka_unit_test(test_agree),
        cmocka_unit_test(test_bad_checkpoint),
        cmocka_unit_test(test_bad_tokenizer),
        cmocka_unit_test(test_bad_session),
        cmocka_unit_test(test_gguf),
        cmocka_unit_test(test_bad_gguf),
    };
    size_t n = 0;
    for (size_t t = 0; t < sizeof tests / sizeof *tests; t++)
        if (listed(only, tests[t].name))
            tests[n++] = tests[t];
    return _cmocka_run_group_tests("test_llama", tests, n, setup, teardown);
}
