/*
 * decode.c: the forward pass of a Llama-family model with kvrt owning its
 * KV cache, and what a decoder does with sequences between steps.
 *
 * One forward call runs a batch of tokens of any sequences at any positions
 * (a prompt's chunk, or one pending token of each of N sequences):
 *
 *   x = embedding[token]
 *   per layer:  xb = rmsnorm(x) * rms_att
 *               q, k, v = xb Wq^T, xb Wk^T, xb Wv^T       (BLAS)
 *               RoPE on q and k at each token's position
 *               kvrt_write(k, v); att = kvrt_attention(q)  (GQA, causal)
 *               x += att Wo^T                              (BLAS)
 *               xb = rmsnorm(x) * rms_ffn
 *               x += (silu(xb W1^T) * (xb W3^T)) W2^T      (BLAS)
 *   logits = rmsnorm(x) * rms_final  Wcls^T                (BLAS, asked rows only)
 *
 * kvrt_batch_plan reserves the tokens' slots once per call; the cache lives
 * on the chosen backend's device and q, k, v and att go there and back
 * (the host arrays themselves on the CPU backend). Between calls the
 * sequences are edited by kvrt alone: a context shift is kvrt_seq_rm +
 * kvrt_seq_shift, a fork kvrt_seq_cp, a chat turn's divergent tail
 * kvrt_seq_rm, a session kvrt_state_write / kvrt_state_read.
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "devmem.h"
#include "llama.h"

#define KV_TRY(expr)                                                                           \
    do {                                                                                       \
        kvrt_status st_ = (expr);                                                              \
        if (st_ != KVRT_OK)                                                                    \
            return llama_fail("%s: %s", kvrt_status_name(st_), kvrt_last_error());            \
    } while (0)

/* ------------------------------------------------------------------------ */
/* Decoder                                                                   */
/* ------------------------------------------------------------------------ */

void llama_decoder_options_init(llama_decoder_options *opts)
{
    *opts = (llama_decoder_options){.device = {KVRT_BACKEND_CPU, 0}, .cache_dtype = KVRT_F32,
                                    .n_ctx = 0, .max_seqs = 1, .max_batch = 64,
                                    .rope_style = KVRT_ROPE_NORMAL, .rope_theta = 10000.0f};
}

static int on_cpu(const llama_decoder *dec)
{
    return dec->opts.device.backend == KVRT_BACKEND_CPU;
}

int llama_decoder_create(const llama_model *model, const llama_decoder_options *opts,
                         llama_decoder *dec)
{
    memset(dec, 0, sizeof *dec);
    dec->model = model;
    dec->opts = *opts;
    const llama_config *c = &model->config;
    if (dec->opts.n_ctx <= 0)
        dec->opts.n_ctx = c->seq_len;
    llama_decoder_options *o = &dec->opts;
    if (o->n_ctx < 2 || o->n_ctx > (1 << 24))
        return llama_fail("decoder: context %d is out of range [2, 16777216]", o->n_ctx);
    if (o->max_seqs < 1 || o->max_seqs > 1024)
        return llama_fail("decoder: %d sequences is out of range [1, 1024]", o->max_seqs);
    if (o->max_batch < o->max_seqs)
        o->max_batch = o->max_seqs;
    if (!devmem_supports(o->device.backend))
        return llama_fail("decoder: backend %s is not built in", kvrt_backend_name(o->device.backend));

    kvrt_layer_desc *layers = calloc((size_t)c->n_layers, sizeof *layers);
    if (!layers)
        return llama_fail("decoder: out of memory");
    for (int l = 0; l < c->n_layers; l++)
        layers[l] = (kvrt_layer_desc){.kind = KVRT_LAYER_ATTN, .n_kv_heads = c->n_kv_heads,
                                      .head_dim_k = model->head_size,
                                      .head_dim_v = model->head_size};
    kvrt_cache_desc desc;
    kvrt_cache_desc_init(&desc);
    desc.device = o->device;
    desc.dtype = o->cache_dtype;
    desc.n_layers = c->n_layers;
    desc.layers = layers;
    desc.max_seqs = o->max_seqs;
    desc.block_size = 16;
    /* A full context per sequence, plus one block each for a copy-on-write
     * of a shared boundary block. */
    desc.n_blocks = o->max_seqs * ((o->n_ctx + 15) / 16 + 1);
    desc.rope = (kvrt_rope_desc){model->head_size, o->rope_theta, 1.0f, o->rope_style};
    desc.n_threads = o->n_threads;
    kvrt_status st = kvrt_cache_create(&desc, &dec->cache);
    free(layers);
    if (st != KVRT_OK)
        return llama_fail("kvrt_cache_create: %s: %s", kvrt_status_name(st), kvrt_last_error());
    if ((st = kvrt_batch_create(dec->cache, o->max_batch, &dec->batch)) != KVRT_OK) {
        llama_fail("kvrt_batch_create: %s: %s", kvrt_status_name(st), kvrt_last_error());
        llama_decoder_destroy(dec);
        return -1;
    }

    size_t B = (size_t)o->max_batch, dim = (size_t)c->dim, kv_dim = (size_t)model->kv_dim;
    size_t hidden = (size_t)c->hidden_dim;
    dec->inv_freq = malloc((size_t)model->head_size / 2 * sizeof *dec->inv_freq);
    dec->x = malloc(B * dim * sizeof(float));
    dec->xb = malloc(B * dim * sizeof(float));
    dec->q = malloc(B * dim * sizeof(float));
    dec->k = malloc(B * kv_dim * sizeof(float));
    dec->v = malloc(B * kv_dim * sizeof(float));
    dec->att = malloc(B * dim * sizeof(float));
    dec->hb = malloc(B * hidden * sizeof(float));
    dec->hb2 = malloc(B * hidden * sizeof(float));
    dec->logits = malloc(B * (size_t)c->vocab_size * sizeof(float));
    if (!dec->inv_freq || !dec->x || !dec->xb || !dec->q || !dec->k || !dec->v || !dec->att ||
        !dec->hb || !dec->hb2 || !dec->logits) {
        llama_decoder_destroy(dec);
        return llama_fail("decoder: out of memory for activations of %d tokens", o->max_batch);
    }
    for (int i = 0; i < model->head_size / 2; i++)
        dec->inv_freq[i] = pow((double)o->rope_theta, -2.0 * i / model->head_size);
    if (on_cpu(dec)) {
        dec->dev_q = dec->q;
        dec->dev_k = dec->k;
        dec->dev_v = dec->v;
        dec->dev_att = dec->att;
    } else {
        dec->dev_q = devmem_alloc(o->device, B * dim * sizeof(float));
        dec->dev_k = devmem_alloc(o->device, B * kv_dim * sizeof(float));
        dec->dev_v = devmem_alloc(o->device, B * kv_dim * sizeof(float));
        dec->dev_att = devmem_alloc(o->device, B * dim * sizeof(float));
        if (!dec->dev_q || !dec->dev_k || !dec->dev_v || !dec->dev_att) {
            llama_fail("decoder: device buffers: %s", devmem_error());
            llama_decoder_destroy(dec);
            return -1;
        }
    }
    /* A warm-up (as llama.cpp does): one token run and removed, so that
     * thread pools and first touches of memory are not in the first step
     * that is timed. */
    int bos = LLAMA_BOS;
    int32_t seq0 = 0, pos0 = 0;
    if (llama_forward(dec, 1, &bos, &seq0, &pos0, NULL, NULL) != 0 ||
        kvrt_seq_rm(dec->cache, 0, 0, -1) != KVRT_OK) {
        char why[512];
        snprintf(why, sizeof why, "%s", llama_error());
        llama_decoder_destroy(dec);
        return llama_fail("decoder: warm-up: %s", why);
    }
    return 0;
}

void llama_decoder_destroy(llama_decoder *dec)
{
    if (!on_cpu(dec)) {
        devmem_free(dec->opts.device, dec->dev_q);
        devmem_free(dec->opts.device, dec->dev_k);
        devmem_free(dec->opts.device, dec->dev_v);
        devmem_free(dec->opts.device, dec->dev_att);
    }
    free(dec->inv_freq);
    free(dec->x);
    free(dec->xb);
    free(dec->q);
    free(dec->k);
    free(dec->v);
    free(dec->att);
    free(dec->hb);
    free(dec->hb2);
    free(dec->logits);
    kvrt_batch_destroy(dec->batch);
    kvrt_cache_destroy(dec->cache);
    memset(dec, 0, sizeof *dec);
}

/* ------------------------------------------------------------------------ */
/* The forward pass                                                          */
/* ------------------------------------------------------------------------ */

/* out[n][d_out] = x[n][d_in] W^T for W [d_out][d_in]. */
static void matmul(float *out, const float *x, const float *w, int n, int d_in, int d_out)
{
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, d_out, d_in, 1.0f, x, d_in, w, d_in,
                0.0f, out, d_out);
}

static void rmsnorm(float *out, const float *x, const float *weight, int n, int dim)
{
    for (int t = 0; t < n; t++) {
        const float *xt = x + (size_t)t * dim;
        float ss = 0.0f;
        for (int i = 0; i < dim; i++)
            ss += xt[i] * xt[i];
        float scale = 1.0f / sqrtf(ss / (float)dim + 1e-5f);
        for (int i = 0; i < dim; i++)
            out[(size_t)t * dim + i] = weight[i] * (scale * xt[i]);
    }
}

/* Rotates each head of vec [n][n_heads][head_size] by its token's position:
 * pair i (adjacent elements, or element i and i + head_size/2 in the neox
 * style) turns by pos * theta^(-2i/head_size), the angle kvrt_seq_shift
 * uses to re-rotate cached K. */
static void rope(const llama_decoder *dec, float *vec, int n, int n_heads,
                 const int32_t *positions)
{
    int hs = dec->model->head_size, half = hs / 2;
    for (int t = 0; t < n; t++) {
        for (int i = 0; i < half; i++) {
            double angle = (double)positions[t] * dec->inv_freq[i];
            float cs = (float)cos(angle), sn = (float)sin(angle);
            int a = dec->opts.rope_style == KVRT_ROPE_NORMAL ? 2 * i : i;
            int b = dec->opts.rope_style == KVRT_ROPE_NORMAL ? 2 * i + 1 : i + half;
            for (int h = 0; h < n_heads; h++) {
                float *head = vec + ((size_t)t * n_heads + h) * hs;
                float x0 = head[a], x1 = head[b];
                head[a] = x0 * cs - x1 * sn;
                head[b] = x0 * sn + x1 * cs;
            }
        }
    }
}

static int to_device(const llama_decoder *dec, void *dst, const void *src, size_t bytes)
{
    if (on_cpu(dec) || devmem_upload(dec->opts.device, dst, src, bytes) == 0)
        return 0;
    return llama_fail("decoder: upload: %s", devmem_error());
}

static int from_device(const llama_decoder *dec, void *dst, const void *src, size_t bytes)
{
    if (on_cpu(dec) || devmem_download(dec->opts.device, dst, src, bytes) == 0)
        return 0;
    return llama_fail("decoder: download: %s", devmem_error());
}

/* The attention sublayer of layer l: xb -> att, through kvrt. */
static int attention(llama_decoder *dec, int l, int n, const int32_t *positions)
{
    const llama_model *m = dec->model;
    const llama_config *c = &m->config;
    size_t dim = (size_t)c->dim, kv_dim = (size_t)m->kv_dim;
    matmul(dec->q, dec->xb, m->w.wq + l * dim * dim, n, c->dim, c->dim);
    matmul(dec->k, dec->xb, m->w.wk + l * kv_dim * dim, n, c->dim, m->kv_dim);
    matmul(dec->v, dec->xb, m->w.wv + l * kv_dim * dim, n, c->dim, m->kv_dim);
    rope(dec, dec->q, n, c->n_heads, positions);
    rope(dec, dec->k, n, c->n_kv_heads, positions);
    if (to_device(dec, dec->dev_q, dec->q, n * dim * sizeof(float)) ||
        to_device(dec, dec->dev_k, dec->k, n * kv_dim * sizeof(float)) ||
        to_device(dec, dec->dev_v, dec->v, n * kv_dim * sizeof(float)))
        return -1;
    KV_TRY(kvrt_write(dec->cache, dec->batch, l, dec->dev_k, dec->dev_v, KVRT_F32, NULL));
    kvrt_attention_params params = {.n_q_heads = c->n_heads, .scale = 0.0f, /* 1/sqrt(hs) */
                                    .q_dtype = KVRT_F32, .out_dtype = KVRT_F32};
    KV_TRY(kvrt_attention(dec->cache, dec->batch, l, dec->dev_q, dec->dev_att, &params, NULL));
    return from_device(dec, dec->att, dec->dev_att, n * dim * sizeof(float));
}

int llama_forward(llama_decoder *dec, int n, const int *tokens, const int32_t *seq_ids,
                  const int32_t *positions, const unsigned char *want, int *n_logits)
{
    const llama_model *m = dec->model;
    const llama_config *c = &m->config;
    const llama_weights *w = &m->w;
    size_t dim = (size_t)c->dim, hidden = (size_t)c->hidden_dim;
    if (n < 1 || n > dec->opts.max_batch)
        return llama_fail("forward: %d tokens, the batch holds 1 to %d", n, dec->opts.max_batch);
    for (int t = 0; t < n; t++) {
        if (tokens[t] < 0 || tokens[t] >= c->vocab_size)
            return llama_fail("forward: token %d is outside the vocabulary of %d", tokens[t],
                              c->vocab_size);
        if (positions[t] >= dec->opts.n_ctx)
            return llama_fail("forward: position %d is outside the context of %d", positions[t],
                              dec->opts.n_ctx);
    }
    KV_TRY(kvrt_batch_plan(dec->cache, n, seq_ids, positions, dec->batch));

    for (int t = 0; t < n; t++)
        memcpy(dec->x + t * dim, w->token_embedding + (size_t)tokens[t] * dim,
               dim * sizeof(float));
    for (int l = 0; l < c->n_layers; l++) {
        rmsnorm(dec->xb, dec->x, w->rms_att + l * dim, n, c->dim);
        if (attention(dec, l, n, positions) != 0)
            return -1;
        /* x += att Wo^T, as one GEMM accumulating into x */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, c->dim, c->dim, 1.0f, dec->att,
                    c->dim, w->wo + l * dim * dim, c->dim, 1.0f, dec->x, c->dim);

        rmsnorm(dec->xb, dec->x, w->rms_ffn + l * dim, n, c->dim);
        matmul(dec->hb, dec->xb, w->w1 + l * hidden * dim, n, c->dim, c->hidden_dim);
        matmul(dec->hb2, dec->xb, w->w3 + l * hidden * dim, n, c->dim, c->hidden_dim);
        for (size_t i = 0; i < (size_t)n * hidden; i++) { /* SwiGLU */
            float g = dec->hb[i];
            dec->hb[i] = g / (1.0f + expf(-g)) * dec->hb2[i];
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, c->dim, c->hidden_dim, 1.0f,
                    dec->hb, c->hidden_dim, w->w2 + l * dim * hidden, c->hidden_dim, 1.0f,
                    dec->x, c->dim);
    }

    /* The rows asked for, packed, through the final norm and the classifier. */
    int rows = 0;
    for (int t = 0; t < n; t++) {
        if (want ? want[t] != 0 : t == n - 1) {
            memmove(dec->x + rows * dim, dec->x + t * dim, dim * sizeof(float));
            rows++;
        }
    }
    if (rows > 0) {
        rmsnorm(dec->xb, dec->x, w->rms_final, rows, c->dim);
        matmul(dec->logits, dec->xb, w->wcls, rows, c->dim, c->vocab_size);
    }
    if (n_logits)
        *n_logits = rows;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Sampling (llama2.c's: greedy, or temperature with optional top-p)         */
/* ------------------------------------------------------------------------ */

typedef struct prob_index {
    float prob;
    int   index;
} prob_index;

void llama_sampler_init(llama_sampler *s, float temperature, float top_p, uint64_t seed)
{
    *s = (llama_sampler){temperature, top_p, seed ? seed : 0x5EED};
}

static float random_unit(uint64_t *state) /* [0, 1) */
{
    return (float)(llama_random(state) >> 40) / 16777216.0f;
}

static int compare_prob(const void *a, const void *b)
{
    float pa = ((const prob_index *)a)->prob, pb = ((const prob_index *)b)->prob;
    return (pa < pb) - (pa > pb);
}

static int argmax(const float *v, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[best])
            best = i;
    return best;
}

int llama_sample(llama_sampler *s, float *logits, int vocab_size, void *scratch)
{
    if (s->temperature <= 0.0f)
        return argmax(logits, vocab_size);
    float max = logits[argmax(logits, vocab_size)], sum = 0.0f;
    for (int i = 0; i < vocab_size; i++) {
        logits[i] = expf((logits[i] - max) / s->temperature);
        sum += logits[i];
    }
    for (int i = 0; i < vocab_size; i++)
        logits[i] /= sum;
    float coin = random_unit(&s->rng);
    if (s->top_p <= 0.0f || s->top_p >= 1.0f) {
        float cdf = 0.0f;
        for (int i = 0; i < vocab_size; i++) {
            cdf += logits[i];
            if (coin < cdf)
                return i;
        }
        return vocab_size - 1;
    }
    /* Top-p: the smallest set of most likely tokens whose mass exceeds top_p.
     * Tokens below (1 - top_p) / (n - 1) cannot be in it and are not sorted. */
    prob_index *pi = scratch;
    int n = 0;
    float cutoff = (1.0f - s->top_p) / (float)(vocab_size - 1);
    for (int i = 0; i < vocab_size; i++)
        if (logits[i] >= cutoff)
            pi[n++] = (prob_index){logits[i], i};
    qsort(pi, (size_t)n, sizeof *pi, compare_prob);
    float mass = 0.0f;
    int last = n - 1;
    for (int i = 0; i < n; i++) {
        mass += pi[i].prob;
        if (mass > s->top_p) {
            last = i;
            break;
        }
    }
    float r = coin * mass, cdf = 0.0f;
    for (int i = 0; i <= last; i++) {
        cdf += pi[i].prob;
        if (r < cdf)
            return pi[i].index;
    }
    return pi[last].index;
}

/* ------------------------------------------------------------------------ */
/* Sequences                                                                 */
/* ------------------------------------------------------------------------ */

int llama_session_create(llama_decoder *dec, int n_seqs, const llama_sampler *s,
                         llama_session *sess)
{
    memset(sess, 0, sizeof *sess);
    sess->dec = dec;
    if (n_seqs < 1 || n_seqs > dec->opts.max_seqs)
        return llama_fail("session: %d sequences, the decoder holds 1 to %d", n_seqs,
                          dec->opts.max_seqs);
    int vocab = dec->model->config.vocab_size, max_seqs = dec->opts.max_seqs;
    sess->n_seqs = n_seqs;
    sess->seqs = calloc((size_t)max_seqs, sizeof *sess->seqs);
    sess->probs = malloc((size_t)vocab * sizeof(float));
    sess->scratch = malloc((size_t)vocab * sizeof(prob_index));
    if (!sess->seqs || !sess->probs || !sess->scratch) {
        llama_session_destroy(sess);
        return llama_fail("session: out of memory");
    }
    for (int i = 0; i < max_seqs; i++) {
        sess->seqs[i].tokens = malloc((size_t)dec->opts.n_ctx * sizeof(int));
        sess->seqs[i].pending = -1;
        sess->seqs[i].sampler = *s;
        if (!sess->seqs[i].tokens) {
            llama_session_destroy(sess);
            return llama_fail("session: out of memory");
        }
    }
    return 0;
}

void llama_session_destroy(llama_session *sess)
{
    if (sess->seqs && sess->dec)
        for (int i = 0; i < sess->dec->opts.max_seqs; i++)
            free(sess->seqs[i].tokens);
    free(sess->seqs);
    free(sess->probs);
    free(sess->scratch);
    memset(sess, 0, sizeof *sess);
}

static int sample_into(llama_session *sess, llama_seq *seq, const float *logits)
{
    int vocab = sess->dec->model->config.vocab_size;
    memcpy(sess->probs, logits, (size_t)vocab * sizeof(float));
    seq->pending = llama_sample(&seq->sampler, sess->probs, vocab, sess->scratch);
    return seq->pending;
}

int llama_prefill(llama_session *sess, int s, const int *tokens, int n)
{
    llama_decoder *dec = sess->dec;
    llama_seq *seq = &sess->seqs[s];
    if (n < 1)
        return llama_fail("prefill: no tokens");
    if (n > dec->opts.n_ctx - seq->n)
        return llama_fail("prefill: %d tokens after the %d cached do not fit the context of %d",
                          n, seq->n, dec->opts.n_ctx);
    int32_t *ids = malloc((size_t)dec->opts.max_batch * 2 * sizeof(int32_t));
    if (!ids)
        return llama_fail("prefill: out of memory");
    int32_t *positions = ids + dec->opts.max_batch;
    double t0 = devmem_now();
    int rc = 0;
    for (int done = 0; done < n && rc == 0;) {
        int chunk = n - done < dec->opts.max_batch ? n - done : dec->opts.max_batch;
        for (int i = 0; i < chunk; i++) {
            ids[i] = s;
            positions[i] = seq->n + i;
        }
        rc = llama_forward(dec, chunk, tokens + done, ids, positions, NULL, NULL);
        if (rc == 0) {
            memcpy(seq->tokens + seq->n, tokens + done, (size_t)chunk * sizeof(int));
            seq->n += chunk;
            done += chunk;
        }
    }
    free(ids);
    if (rc == 0) {
        sample_into(sess, seq, dec->logits);
        sess->prefill_s += devmem_now() - t0;
        sess->prefill_tokens += n;
    }
    return rc;
}

int llama_context_shift(llama_session *sess, int s, int n_keep)
{
    llama_seq *seq = &sess->seqs[s];
    if (n_keep < 0 || n_keep >= seq->n - 1)
        return llama_fail("context shift: keeping %d of %d tokens leaves nothing to drop",
                          n_keep, seq->n);
    int n_discard = (seq->n - n_keep) / 2;
    kvrt_cache *cache = sess->dec->cache;
    KV_TRY(kvrt_seq_rm(cache, s, n_keep, n_keep + n_discard));
    KV_TRY(kvrt_seq_shift(cache, s, n_keep + n_discard, -1, -n_discard));
    /* The removed range left holes; new tokens go after the last used slot,
     * so close them before the context refills. */
    KV_TRY(kvrt_cache_compact(cache));
    memmove(seq->tokens + n_keep, seq->tokens + n_keep + n_discard,
            (size_t)(seq->n - n_keep - n_discard) * sizeof(int));
    seq->n -= n_discard;
    return n_discard;
}

int llama_decode_step(llama_session *sess, int n_keep, int *shifted)
{
    llama_decoder *dec = sess->dec;
    int tokens[1024];
    int32_t ids[1024], positions[1024];
    int n = 0;
    for (int s = 0; s < sess->n_seqs; s++) {
        llama_seq *seq = &sess->seqs[s];
        if (shifted)
            shifted[s] = 0;
        if (seq->pending < 0)
            continue;
        if (seq->n == dec->opts.n_ctx) {
            int dropped = llama_context_shift(sess, s, n_keep);
            if (dropped < 0)
                return -1;
            if (shifted)
                shifted[s] = dropped;
        }
        tokens[n] = seq->pending;
        ids[n] = s;
        positions[n] = seq->n;
        n++;
    }
    if (n == 0)
        return llama_fail("decode: no sequence has a pending token");
    unsigned char want[1024];
    memset(want, 1, (size_t)n);
    double t0 = devmem_now();
    if (llama_forward(dec, n, tokens, ids, positions, want, NULL) != 0)
        return -1;
    for (int i = 0; i < n; i++) {
        llama_seq *seq = &sess->seqs[ids[i]];
        seq->tokens[seq->n++] = seq->pending;
        sample_into(sess, seq, dec->logits + (size_t)i * dec->model->config.vocab_size);
    }
    sess->decode_s += devmem_now() - t0;
    sess->decode_tokens += n;
    return 0;
}

int llama_fork(llama_session *sess, int src, int dst, uint64_t seed, const float *logits)
{
    llama_seq *from = &sess->seqs[src], *to = &sess->seqs[dst];
    if (to->n != 0)
        return llama_fail("fork: sequence %d is not empty", dst);
    KV_TRY(kvrt_seq_cp(sess->dec->cache, src, dst, 0, -1));
    memcpy(to->tokens, from->tokens, (size_t)from->n * sizeof(int));
    to->n = from->n;
    to->pending = from->pending;
    to->sampler = from->sampler;
    if (seed != 0) {
        llama_sampler_init(&to->sampler, from->sampler.temperature, from->sampler.top_p, seed);
        if (logits)
            sample_into(sess, to, logits);
    }
    return 0;
}

int llama_truncate(llama_session *sess, int s, int n)
{
    llama_seq *seq = &sess->seqs[s];
    if (n < 0 || n > seq->n)
        return llama_fail("truncate: %d is outside the %d cached tokens", n, seq->n);
    KV_TRY(kvrt_seq_rm(sess->dec->cache, s, n, -1));
    seq->n = n;
    seq->pending = -1;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Session files                                                             */
/* ------------------------------------------------------------------------ */

/* Little-endian int32 fields, as written on the machines kvrt runs on:
 *   "KVLLAMA1", n_seqs, the model's dim, hidden_dim, n_layers, n_heads,
 *   n_kv_heads, vocab_size, then per sequence: n, pending, rng (2 x u32),
 *   temperature and top_p (f32), the n tokens;
 * then kvrt_state_write of every sequence. */
static const char session_magic[8] = {'K', 'V', 'L', 'L', 'A', 'M', 'A', '1'};

static kvrt_status file_writer(void *user, const void *data, size_t size)
{
    return fwrite(data, 1, size, user) == size ? KVRT_OK : KVRT_ERR_IO;
}

static kvrt_status file_reader(void *user, void *data, size_t size, size_t *got)
{
    *got = fread(data, 1, size, user);
    return ferror((FILE *)user) ? KVRT_ERR_IO : KVRT_OK;
}

static void model_shape(const llama_model *m, int32_t shape[6])
{
    const llama_config *c = &m->config;
    int32_t v[6] = {c->dim, c->hidden_dim, c->n_layers, c->n_heads, c->n_kv_heads,
                    c->vocab_size};
    memcpy(shape, v, sizeof v);
}

int llama_session_save(llama_session *sess, const char *path)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        return llama_fail("session %s: %s", path, strerror(errno));
    int32_t head[7];
    head[0] = sess->n_seqs;
    model_shape(sess->dec->model, head + 1);
    int ok = fwrite(session_magic, 8, 1, f) == 1 && fwrite(head, sizeof head, 1, f) == 1;
    for (int s = 0; s < sess->n_seqs && ok; s++) {
        const llama_seq *seq = &sess->seqs[s];
        int32_t fields[4] = {seq->n, seq->pending, (int32_t)(uint32_t)seq->sampler.rng,
                             (int32_t)(uint32_t)(seq->sampler.rng >> 32)};
        float params[2] = {seq->sampler.temperature, seq->sampler.top_p};
        ok = fwrite(fields, sizeof fields, 1, f) == 1 && fwrite(params, sizeof params, 1, f) == 1 &&
             fwrite(seq->tokens, sizeof(int), (size_t)seq->n, f) == (size_t)seq->n;
    }
    kvrt_status st = ok ? kvrt_state_write(sess->dec->cache, -1, file_writer, f) : KVRT_ERR_IO;
    if (fclose(f) != 0 && st == KVRT_OK)
        st = KVRT_ERR_IO;
    if (st == KVRT_ERR_IO && !ok)
        return llama_fail("session %s: write failed", path);
    if (st != KVRT_OK)
        return llama_fail("session %s: kvrt_state_write: %s: %s", path, kvrt_status_name(st),
                          kvrt_last_error());
    return 0;
}

/* Reads and checks the header; *n_seqs its sequence count. */
static int read_head(FILE *f, const char *path, const llama_model *model, int *n_seqs)
{
    char magic[8];
    int32_t head[7];
    if (fread(magic, 8, 1, f) != 1 || memcmp(magic, session_magic, 8) != 0)
        return llama_fail("session %s: not a kvrt-llama session (magic)", path);
    if (fread(head, sizeof head, 1, f) != 1)
        return llama_fail("session %s: truncated header", path);
    if (head[0] < 1 || head[0] > 1024)
        return llama_fail("session %s: n_seqs %d is out of range [1, 1024]", path, head[0]);
    if (model) {
        static const char *names[6] = {"dim", "hidden_dim", "n_layers", "n_heads",
                                       "n_kv_heads", "vocab_size"};
        int32_t shape[6];
        model_shape(model, shape);
        for (int i = 0; i < 6; i++)
            if (head[1 + i] != shape[i])
                return llama_fail("session %s: %s %d in file, %d in the model", path, names[i],
                                  head[1 + i], shape[i]);
    }
    *n_seqs = head[0];
    return 0;
}

int llama_session_peek(const char *path, int *n_seqs)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return llama_fail("session %s: %s", path, strerror(errno));
    int rc = read_head(f, path, NULL, n_seqs);
    fclose(f);
    return rc;
}

int llama_session_load(llama_session *sess, const char *path)
{
    llama_decoder *dec = sess->dec;
    FILE *f = fopen(path, "rb");
    if (!f)
        return llama_fail("session %s: %s", path, strerror(errno));
    int n_seqs, rc = -1;
    llama_seq *seqs = calloc((size_t)dec->opts.max_seqs, sizeof *seqs);
    if (!seqs) {
        fclose(f);
        return llama_fail("session %s: out of memory", path);
    }
    if (read_head(f, path, dec->model, &n_seqs) != 0)
        goto out;
    if (n_seqs > dec->opts.max_seqs) {
        llama_fail("session %s: %d sequences, the decoder holds %d", path, n_seqs,
                   dec->opts.max_seqs);
        goto out;
    }
    /* Into a copy, so that a failure changes nothing. */
    for (int s = 0; s < n_seqs; s++) {
        if (sess->seqs[s].n != 0) {
            llama_fail("session %s: sequence %d is not empty", path, s);
            goto out;
        }
        int32_t fields[4];
        float params[2];
        if (fread(fields, sizeof fields, 1, f) != 1 || fread(params, sizeof params, 1, f) != 1) {
            llama_fail("session %s: sequence %d: truncated", path, s);
            goto out;
        }
        int vocab = dec->model->config.vocab_size;
        if (fields[0] < 0 || fields[0] > dec->opts.n_ctx) {
            llama_fail("session %s: sequence %d: %d tokens do not fit the context of %d", path, s,
                       fields[0], dec->opts.n_ctx);
            goto out;
        }
        if (fields[1] < -1 || fields[1] >= vocab) {
            llama_fail("session %s: sequence %d: pending token %d is outside the vocabulary",
                       path, s, fields[1]);
            goto out;
        }
        seqs[s] = (llama_seq){.n = fields[0], .pending = fields[1]};
        seqs[s].sampler = (llama_sampler){params[0], params[1],
                                          (uint64_t)(uint32_t)fields[2] |
                                              (uint64_t)(uint32_t)fields[3] << 32};
        seqs[s].tokens = malloc((size_t)dec->opts.n_ctx * sizeof(int));
        if (!seqs[s].tokens ||
            fread(seqs[s].tokens, sizeof(int), (size_t)seqs[s].n, f) != (size_t)seqs[s].n) {
            llama_fail("session %s: sequence %d: truncated tokens", path, s);
            goto out;
        }
        for (int i = 0; i < seqs[s].n; i++) {
            if (seqs[s].tokens[i] < 0 || seqs[s].tokens[i] >= vocab) {
                llama_fail("session %s: sequence %d: token %d is outside the vocabulary", path,
                           s, i);
                goto out;
            }
        }
    }
    kvrt_status st = kvrt_state_read(dec->cache, -1, file_reader, f);
    if (st != KVRT_OK) {
        llama_fail("session %s: kvrt_state_read: %s: %s", path, kvrt_status_name(st),
                   kvrt_last_error());
        goto out;
    }
    /* What kvrt restored must be what the header says: token i at position i. */
    for (int s = 0; s < n_seqs; s++) {
        int64_t n;
        int32_t pos_max;
        kvrt_seq_n_tokens(dec->cache, s, &n);
        kvrt_seq_pos_max(dec->cache, s, &pos_max);
        if (n != seqs[s].n || pos_max != seqs[s].n - 1) {
            llama_fail("session %s: sequence %d: the cache state holds %lld tokens up to position "
                       "%d, the header %d", path, s, (long long)n, pos_max, seqs[s].n);
            for (int r = 0; r < n_seqs; r++) /* they were empty */
                kvrt_seq_rm(dec->cache, r, 0, -1);
            goto out;
        }
    }
    for (int s = 0; s < n_seqs; s++) {
        int *tokens = sess->seqs[s].tokens;
        sess->seqs[s] = seqs[s];
        seqs[s].tokens = tokens; /* freed below */
    }
    sess->n_seqs = n_seqs;
    rc = 0;
out:
    for (int s = 0; s < dec->opts.max_seqs; s++)
        free(seqs[s].tokens);
    free(seqs);
    fclose(f);
    return rc;
}
