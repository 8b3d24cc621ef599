/*
 * kvrt_demo.c: kvrt-demo, a simulated multi-turn decoding session on the
 * best backend available (CUDA, else HIP, else the CPU), with random
 * numbers standing in for a model's K, V and queries.
 *
 *   kvrt-demo [--backend cpu|cuda|hip] [--quick]
 *
 * Four caches, as four deployments would have:
 *   llama     8 layers of 8 kv heads x 128 (32 query heads), f16: prompts,
 *             decoding, a second answer forked from the prompt (kvrt_seq_cp,
 *             copy-on-write), speculative drafts rolled back (kvrt_seq_rm),
 *             a context shift when the context is full (llama.cpp's: remove
 *             the oldest half after the kept prefix, shift the rest down),
 *             and a compaction of the holes that left.
 *   gemma     interleaved sliding windows: 5 layers of window 32, then 1
 *             global; the window's blocks are recycled, and a rollback past
 *             what the window still holds is refused.
 *   deepseek  MLA: one latent row of 512 + 64 rotary per token.
 *   serving   prefix caching: requests of two tenants share a system prompt
 *             each, and multi-turn chats resend their history; each request
 *             looks its prompt up (kvrt_seq_attach_prefix), prefills only
 *             the rest, answers, and ends, leaving its blocks cached. Prints
 *             the hit rate and the prefill tokens saved.
 *
 * Every step plans the tokens, writes K/V in every layer and runs attention
 * in every layer. The demo checks its work as it goes (rows gathered back
 * against what was written, positions after each edit, re-rotated K against
 * a reference, attention against a double-precision reference) and exits 1
 * with kvrt's message on the first failure.
 */
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#  include <omp.h>
#endif

#include "devmem.h"
#include "kvrt.h"
#include "kvrt_layout.h" /* element conversions, shared with the library */

/* ------------------------------------------------------------------------ */
/* Failures                                                                  */
/* ------------------------------------------------------------------------ */

static void fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "kvrt-demo: FAILED: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

#define KV(expr)                                                                               \
    do {                                                                                       \
        kvrt_status st_ = (expr);                                                              \
        if (st_ != KVRT_OK)                                                                    \
            fail("%s -> %s: %s", #expr, kvrt_status_name(st_), kvrt_last_error());            \
    } while (0)

#define DM(expr)                                                                               \
    do {                                                                                       \
        if ((expr) != 0)                                                                       \
            fail("%s: %s", #expr, devmem_error());                                             \
    } while (0)

#define CHECK(cond, ...)                                                                       \
    do {                                                                                       \
        if (!(cond))                                                                           \
            fail(__VA_ARGS__);                                                                 \
    } while (0)

static void *xmalloc(size_t n)
{
    void *p = malloc(n > 0 ? n : 1);
    CHECK(p != NULL, "host allocation of %zu bytes", n);
    return p;
}

/* ------------------------------------------------------------------------ */
/* A model: its cache, its batch, random K/V/q on the device, its counters   */
/* ------------------------------------------------------------------------ */

enum { MAX_TOKENS = 128 };   /* tokens per step, at most (prefill chunks) */

typedef struct model {
    const char     *name;
    kvrt_device     device;
    kvrt_cache     *cache;
    kvrt_batch     *batch;
    int             n_layers;
    int             n_q_heads;
    int             src_rows;    /* rows of k_src / v_src */
    size_t          k_row, v_row;/* bytes of one token's K / V row in a layer */
    int             dim_q, dim_out;
    devmem_buffer   k_src, v_src;/* [src_rows][row]: position p of a prompt takes row p */
    devmem_buffer   q, out;      /* [MAX_TOKENS][n_q_heads][dim] */
    int64_t         steps;
    int32_t       **tokens;      /* prefix caching: tokens[seq][pos] planned with ids, or NULL */
    /* totals */
    int64_t         tokens_prefill, tokens_decode;
    double          seconds;
    double          bytes_written, bytes_read;
} model;

static double now(void) { return devmem_now(); }

static void model_open(model *m, const char *name, kvrt_device device,
                       const kvrt_layer_desc *layers, int n_layers, kvrt_dtype dtype,
                       int block_size, int n_blocks, int max_blocks, int max_seqs,
                       kvrt_rope_desc rope, int n_q_heads, int src_rows, int prefix_cache)
{
    memset(m, 0, sizeof *m);
    m->name = name;
    m->device = device;
    m->n_layers = n_layers;
    m->n_q_heads = n_q_heads;
    m->src_rows = src_rows;
    kvrt_cache_desc d;
    kvrt_cache_desc_init(&d);
    d.device = device;
    d.dtype = dtype;
    d.layers = layers;
    d.n_layers = n_layers;
    d.block_size = block_size;
    d.n_blocks = n_blocks;
    d.max_blocks = max_blocks;
    d.max_seqs = max_seqs;
    d.rope = rope;
    d.prefix_cache = prefix_cache;
    KV(kvrt_cache_create(&d, &m->cache));
    KV(kvrt_batch_create(m->cache, MAX_TOKENS, &m->batch));
    size_t es = kvrt_dtype_size(dtype);
    const kvrt_layer_desc *l = &layers[0];
    if (l->kind == KVRT_LAYER_MLA) {
        m->k_row = (size_t)(l->latent_dim + l->rope_dim) * es;
        m->v_row = 0;
        m->dim_q = l->latent_dim + l->rope_dim;
        m->dim_out = l->latent_dim;
    } else {
        m->k_row = (size_t)l->n_kv_heads * l->head_dim_k * es;
        m->v_row = (size_t)l->n_kv_heads * l->head_dim_v * es;
        m->dim_q = l->head_dim_k;
        m->dim_out = l->head_dim_v;
    }
    DM(devmem_buffer_random(device, dtype, (size_t)src_rows * m->k_row / es, 1, &m->k_src));
    if (m->v_row > 0)
        DM(devmem_buffer_random(device, dtype, (size_t)src_rows * m->v_row / es, 2, &m->v_src));
    DM(devmem_buffer_random(device, dtype, (size_t)MAX_TOKENS * n_q_heads * m->dim_q, 3, &m->q));
    DM(devmem_buffer_zero(device, (size_t)MAX_TOKENS * n_q_heads * m->dim_out * es, &m->out));
}

static void model_close(model *m)
{
    devmem_buffer_free(&m->k_src);
    devmem_buffer_free(&m->v_src);
    devmem_buffer_free(&m->q);
    devmem_buffer_free(&m->out);
    kvrt_batch_destroy(m->batch);
    kvrt_cache_destroy(m->cache);
}

static kvrt_dtype model_dtype(const model *m) { return kvrt_cache_get_desc(m->cache)->dtype; }

/* Plans n tokens, writes their K/V in every layer (rows [src_row, src_row + n)
 * of the sources) and runs attention in every layer. Counts cache traffic:
 * the rows written, and each sequence's visible rows read once per layer. */
static void step_at(model *m, int n, const int32_t *seqs, const int32_t *pos, int src_row,
                    int prefill)
{
    CHECK(n <= MAX_TOKENS && src_row + n <= m->src_rows, "%s: step of %d tokens from row %d", m->name,
          n, src_row);
    const kvrt_cache_desc *d = kvrt_cache_get_desc(m->cache);
    kvrt_attention_params params = {m->n_q_heads, 0.0f, 0.0f, d->dtype, d->dtype};
    double t0 = now();
    if (m->tokens != NULL) {
        int32_t ids[MAX_TOKENS];
        for (int i = 0; i < n; i++)
            ids[i] = m->tokens[seqs[i]][pos[i]];
        KV(kvrt_batch_plan_tokens(m->cache, n, seqs, pos, ids, n, m->batch));
    } else {
        KV(kvrt_batch_plan(m->cache, n, seqs, pos, m->batch));
    }
    for (int l = 0; l < m->n_layers; l++) {
        const char *k = (const char *)m->k_src.dev + (size_t)src_row * m->k_row;
        const char *v = m->v_row > 0 ? (const char *)m->v_src.dev + (size_t)src_row * m->v_row : NULL;
        KV(kvrt_write(m->cache, m->batch, l, k, v, d->dtype, NULL));
        KV(kvrt_attention(m->cache, m->batch, l, m->q.dev, m->out.dev, &params, NULL));
    }
    KV(kvrt_cache_sync(m->cache));
    m->seconds += now() - t0;
    m->steps++;
    if (prefill)
        m->tokens_prefill += n;
    else
        m->tokens_decode += n;
    m->bytes_written += (double)n * (double)(m->k_row + m->v_row) * m->n_layers;
    /* rows read: per sequence of the step and layer, its rows in the layer's group */
    for (int i = 0; i < n; i++) {
        int first = 1;
        for (int j = 0; j < i; j++)
            first &= seqs[j] != seqs[i];
        if (!first)
            continue;
        for (int l = 0; l < m->n_layers; l++) {
            kvrt_seq_group_info info;
            KV(kvrt_seq_group_info_get(m->cache, seqs[i], kvrt_layer_group(m->cache, l), &info));
            m->bytes_read += (double)info.n_tokens * (double)(m->k_row + m->v_row);
        }
    }
}

/* Next source row for decode steps (any rows will do). */
static int decode_row(model *m, int n)
{
    return (int)((m->steps * 7) % (m->src_rows - n));
}

/* Prefills positions [p0, p0 + n) of seq in chunks; position p takes source
 * row p, so that the rows can be checked afterwards. */
static void prefill(model *m, int32_t seq, int32_t p0, int n, int chunk)
{
    int32_t seqs[MAX_TOKENS], pos[MAX_TOKENS];
    for (int done = 0; done < n; done += chunk) {
        int c = n - done < chunk ? n - done : chunk;
        for (int i = 0; i < c; i++) {
            seqs[i] = seq;
            pos[i] = p0 + done + i;
        }
        step_at(m, c, seqs, pos, p0 + done, 1);
    }
}

/* One token for each of n sequences at their next positions. */
static void decode(model *m, int n, const int32_t *seqs)
{
    int32_t pos[MAX_TOKENS];
    for (int i = 0; i < n; i++) {
        KV(kvrt_seq_pos_max(m->cache, seqs[i], &pos[i]));
        pos[i]++;
    }
    step_at(m, n, seqs, pos, decode_row(m, n), 0);
}

static int32_t pos_max(model *m, int32_t seq)
{
    int32_t p;
    KV(kvrt_seq_pos_max(m->cache, seq, &p));
    return p;
}

static int64_t n_tokens(model *m, int32_t seq)
{
    int64_t n;
    KV(kvrt_seq_n_tokens(m->cache, seq, &n));
    return n;
}

/* ------------------------------------------------------------------------ */
/* Reading the cache back                                                    */
/* ------------------------------------------------------------------------ */

typedef struct rows {
    char    *k, *v;
    int32_t *pos;
    int64_t  n;
} rows;

static rows gather(model *m, int layer, int32_t seq, int32_t p0, int32_t p1)
{
    rows r;
    int64_t n = 0;
    /* capacity 0 counts the rows: INVALID_ARG with the count when there are any */
    kvrt_status st = kvrt_gather(m->cache, layer, seq, p0, p1, NULL, NULL, NULL, 0, &n, NULL);
    if (st != KVRT_ERR_INVALID_ARG)
        KV(st);
    r.k = xmalloc(m->k_row * (size_t)(n + 1));
    r.v = xmalloc(m->v_row * (size_t)(n + 1) + 1);
    r.pos = xmalloc(sizeof(int32_t) * (size_t)(n + 1));
    KV(kvrt_gather(m->cache, layer, seq, p0, p1, r.k, m->v_row > 0 ? r.v : NULL, r.pos, n, &r.n,
                   NULL));
    return r;
}

static void rows_free(rows *r)
{
    free(r->k);
    free(r->v);
    free(r->pos);
}

/* seq holds positions [p0, p0 + n) of layer `layer` with source rows
 * [row0, row0 + n). */
static void expect_prompt_rows(model *m, int layer, int32_t seq, int32_t p0, int n, int row0)
{
    rows r = gather(m, layer, seq, p0, p0 + n);
    CHECK(r.n == n, "%s: seq %d holds %lld of positions [%d, %d)", m->name, seq, (long long)r.n, p0,
          p0 + n);
    for (int i = 0; i < n; i++)
        CHECK(r.pos[i] == p0 + i, "%s: seq %d row %d at position %d, expected %d", m->name, seq, i,
              r.pos[i], p0 + i);
    CHECK(memcmp(r.k, (const char *)m->k_src.host + (size_t)row0 * m->k_row, m->k_row * n) == 0,
          "%s: seq %d layer %d: K rows differ from what was written", m->name, seq, layer);
    if (m->v_row > 0)
        CHECK(memcmp(r.v, (const char *)m->v_src.host + (size_t)row0 * m->v_row, m->v_row * n) == 0,
              "%s: seq %d layer %d: V rows differ from what was written", m->name, seq, layer);
    rows_free(&r);
}

/* Two gathers hold the same rows (positions, K and V bit for bit). */
static void expect_same_rows(model *m, const rows *a, const rows *b, const char *what)
{
    CHECK(a->n == b->n, "%s: %s: %lld rows, expected %lld", m->name, what, (long long)b->n,
          (long long)a->n);
    CHECK(memcmp(a->pos, b->pos, sizeof(int32_t) * (size_t)a->n) == 0, "%s: %s: positions differ",
          m->name, what);
    CHECK(memcmp(a->k, b->k, m->k_row * (size_t)a->n) == 0, "%s: %s: K differs", m->name, what);
    CHECK(m->v_row == 0 || memcmp(a->v, b->v, m->v_row * (size_t)a->n) == 0, "%s: %s: V differs",
          m->name, what);
}

/* The largest error of re-rotated K against rotating the old rows by delta
 * in double, in units of the cache dtype's ulp at each value (rotation in
 * f32, one rounding: within 1). Columns [rot0, rot0 + n_rot) of each head
 * of `dim` rotate; the rest must not change. */
static double rotation_error(model *m, const rows *before, const rows *after, int heads, int dim,
                             int rot0, int n_rot, int64_t delta)
{
    kvrt_dtype dtype = model_dtype(m);
    const kvrt_rope_desc *rope = &kvrt_cache_get_desc(m->cache)->rope;
    double ulp = dtype == KVRT_BF16 ? 0x1p-7 : dtype == KVRT_F16 ? 0x1p-10 : 0x1p-23, worst = 0;
    for (int64_t r = 0; r < after->n; r++)
        for (int h = 0; h < heads; h++) {
            int64_t base = (r * heads + h) * dim;
            for (int i = 0; i < dim; i++) {
                double want;
                int j = i - rot0;
                if (j < 0 || j >= n_rot) {
                    want = kvrt_load(before->k, dtype, base + i);
                } else {
                    int pair = j / 2, first = j % 2 == 0; /* NORMAL: adjacent pairs */
                    double a = (double)delta * rope->freq_scale *
                               pow((double)rope->theta, -2.0 * pair / n_rot);
                    double x = kvrt_load(before->k, dtype, base + rot0 + 2 * pair);
                    double y = kvrt_load(before->k, dtype, base + rot0 + 2 * pair + 1);
                    want = first ? x * cos(a) - y * sin(a) : x * sin(a) + y * cos(a);
                }
                double got = kvrt_load(after->k, dtype, base + i);
                double e = fabs(got - want) / (ulp * fabs(want) + 1e-6);
                worst = e > worst ? e : worst;
            }
        }
    return worst;
}

/* The step's last token's attention output in `layer` (run again here)
 * against attention in double over the gathered rows; the largest error in
 * units of its bound (f32 accumulation, one rounding to the cache dtype:
 * 1 ulp of |value| plus 1e-4). */
static double attention_error(model *m, int layer, int32_t seq, int t)
{
    const kvrt_cache_desc *d = kvrt_cache_get_desc(m->cache);
    const kvrt_layer_desc *l = &d->layers[layer];
    kvrt_attention_params params = {m->n_q_heads, 0.0f, 0.0f, d->dtype, d->dtype};
    KV(kvrt_attention(m->cache, m->batch, layer, m->q.dev, m->out.dev, &params, NULL));
    DM(devmem_buffer_pull(&m->out));
    int32_t qpos = pos_max(m, seq);
    int mla = l->kind == KVRT_LAYER_MLA;
    int kv_heads = mla ? 1 : l->n_kv_heads, dk = m->dim_q, dv = m->dim_out;
    int group = m->n_q_heads / kv_heads;
    int32_t p0 = l->window > 0 ? qpos - l->window + 1 : 0;
    rows r = gather(m, layer, seq, p0 < 0 ? 0 : p0, qpos + 1);
    double *logit = xmalloc(sizeof(double) * (size_t)(r.n + 1)), *acc = xmalloc(sizeof(double) * dv);
    double ulp = d->dtype == KVRT_BF16 ? 0x1p-7 : d->dtype == KVRT_F16 ? 0x1p-10 : 0x1p-23, worst = 0;
    for (int h = 0; h < m->n_q_heads; h++) {
        int kvh = h / group;
        int64_t qat = ((int64_t)t * m->n_q_heads + h) * dk;
        double most = -INFINITY, sum = 0;
        for (int64_t j = 0; j < r.n; j++) {
            double s = 0;
            for (int i = 0; i < dk; i++)
                s += (double)kvrt_load(m->q.host, d->dtype, qat + i) *
                     kvrt_load(r.k, d->dtype, (j * kv_heads + kvh) * dk + i);
            logit[j] = s / sqrt((double)dk);
            most = logit[j] > most ? logit[j] : most;
        }
        for (int i = 0; i < dv; i++)
            acc[i] = 0;
        for (int64_t j = 0; j < r.n; j++) {
            double w = exp(logit[j] - most);
            sum += w;
            for (int i = 0; i < dv; i++)
                acc[i] += w * (mla ? kvrt_load(r.k, d->dtype, j * dk + i)
                                   : kvrt_load(r.v, d->dtype, (j * kv_heads + kvh) * dv + i));
        }
        for (int i = 0; i < dv; i++) {
            double want = acc[i] / sum;
            double got = kvrt_load(m->out.host, d->dtype, ((int64_t)t * m->n_q_heads + h) * dv + i);
            double e = fabs(got - want) / (ulp * fabs(want) + 1e-4);
            worst = e > worst ? e : worst;
        }
    }
    free(logit);
    free(acc);
    rows_free(&r);
    return worst;
}

/* ------------------------------------------------------------------------ */
/* Printing                                                                  */
/* ------------------------------------------------------------------------ */

static void say(const char *what, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("  %-8s ", what);
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    fflush(stdout);
}

static void print_stats(model *m, const char *when)
{
    kvrt_cache_stats s;
    KV(kvrt_cache_stats_get(m->cache, -1, &s));
    KV(kvrt_cache_check(m->cache));
    say("stats", "%s: blocks %lld total, %lld used, %lld shared, %lld free; %lld live slots, "
                 "%lld holes; %.1f MiB",
        when, (long long)s.blocks_total, (long long)s.blocks_used, (long long)s.blocks_shared,
        (long long)s.blocks_free, (long long)s.slots_live, (long long)s.holes,
        (double)s.bytes_device / (1 << 20));
}

static kvrt_cache_stats stats(model *m)
{
    kvrt_cache_stats s;
    KV(kvrt_cache_stats_get(m->cache, -1, &s));
    return s;
}

static void print_throughput(model *m)
{
    int64_t tokens = m->tokens_prefill + m->tokens_decode;
    say("speed", "%lld tokens (%lld prefill, %lld decode) in %lld steps, %.3f s: %.0f tokens/s; "
                 "cache traffic %.2f GB, %.2f GB/s",
        (long long)tokens, (long long)m->tokens_prefill, (long long)m->tokens_decode,
        (long long)m->steps, m->seconds, tokens / m->seconds,
        (m->bytes_written + m->bytes_read) / 1e9, (m->bytes_written + m->bytes_read) / 1e9 / m->seconds);
}

/* ------------------------------------------------------------------------ */
/* The llama session                                                         */
/* ------------------------------------------------------------------------ */

typedef struct totals {
    int64_t tokens;
    double  seconds, bytes;
} totals;

static void add_totals(totals *t, const model *m)
{
    t->tokens += m->tokens_prefill + m->tokens_decode;
    t->seconds += m->seconds;
    t->bytes += m->bytes_written + m->bytes_read;
}

/* An in-memory state file for kvrt_state_write / kvrt_state_read. */
typedef struct membuf {
    unsigned char *data;
    size_t         size, cap, at;
} membuf;

static kvrt_status membuf_write(void *user, const void *data, size_t size)
{
    membuf *b = user;
    if (b->size + size > b->cap) {
        size_t cap = b->cap ? b->cap : 1 << 20;
        while (cap < b->size + size)
            cap *= 2;
        unsigned char *p = realloc(b->data, cap);
        if (p == NULL)
            return KVRT_ERR_OUT_OF_MEMORY;
        b->data = p;
        b->cap = cap;
    }
    memcpy(b->data + b->size, data, size);
    b->size += size;
    return KVRT_OK;
}

static kvrt_status membuf_read(void *user, void *data, size_t size, size_t *got)
{
    membuf *b = user;
    size_t n = b->size - b->at < size ? b->size - b->at : size;
    memcpy(data, b->data + b->at, n);
    b->at += n;
    *got = n;
    return KVRT_OK;
}

/* n ATTN layers of 8 kv heads of head_dim. */
static void attn_layers(kvrt_layer_desc *layers, int n, int head_dim)
{
    for (int l = 0; l < n; l++) {
        memset(&layers[l], 0, sizeof layers[l]);
        layers[l].kind = KVRT_LAYER_ATTN;
        layers[l].n_kv_heads = 8;
        layers[l].head_dim_k = layers[l].head_dim_v = head_dim;
    }
}

static void llama_session(kvrt_device device, int quick, totals *total)
{
    const int n_layers = 8, n_ctx = quick ? 256 : 512, n_keep = 20;
    const int prompt = quick ? 90 : 150, answer = quick ? 16 : 40, turn2 = quick ? 40 : 100;
    kvrt_layer_desc layers[8];
    attn_layers(layers, n_layers, 128);
    kvrt_rope_desc rope = {128, 500000.0f, 1.0f, KVRT_ROPE_NORMAL};
    model m;
    /* room for two sequences of n_ctx; the pool starts at a quarter and grows */
    int max_blocks = 2 * (n_ctx / 16 + 2);
    model_open(&m, "llama", device, layers, n_layers, KVRT_F16, 16, max_blocks / 4, max_blocks, 4,
               rope, 32, n_ctx + MAX_TOKENS, 0);
    printf("\n[llama] %d layers x 8 kv heads x 128, f16, 32 query heads, block 16, context %d per "
           "sequence; %zu bytes per token and layer\n",
           n_layers, n_ctx, kvrt_layer_row_bytes(&layers[0], KVRT_F16));
    print_stats(&m, "created");

    /* turn 1: the prompt, then an answer */
    prefill(&m, 0, 0, prompt, 64);
    expect_prompt_rows(&m, 0, 0, 0, prompt, 0);
    expect_prompt_rows(&m, n_layers - 1, 0, 0, prompt, 0);
    say("prefill", "seq 0: %d-token prompt in chunks of 64; rows read back match what was written",
        prompt);
    int32_t seq0 = 0, both[2] = {0, 1};
    for (int i = 0; i < answer; i++)
        decode(&m, 1, &seq0);
    CHECK(pos_max(&m, 0) == prompt + answer - 1 && n_tokens(&m, 0) == prompt + answer,
          "llama: seq 0 should hold [0, %d)", prompt + answer);
    say("decode", "seq 0: %d tokens, positions %d..%d", answer, prompt, prompt + answer - 1);
    double err = attention_error(&m, 3, 0, 0);
    CHECK(err <= 1.0, "llama: attention of layer 3 is off the reference by %.2f of its bound", err);
    say("check", "attention of seq 0's last token in layer 3 matches a double-precision "
                 "reference (worst %.2f of the bound)", err);
    print_stats(&m, "after turn 1");

    /* a second answer to the same prompt: fork, then decode both together */
    int64_t used_before = stats(&m).blocks_used;
    KV(kvrt_seq_cp(m.cache, 0, 1, 0, prompt));
    kvrt_cache_stats s = stats(&m);
    rows a = gather(&m, 2, 0, 0, prompt), b = gather(&m, 2, 1, 0, -1);
    expect_same_rows(&m, &a, &b, "fork");
    rows_free(&a);
    rows_free(&b);
    say("fork", "kvrt_seq_cp(0 -> 1, [0, %d)): %lld blocks shared, %lld boundary block copied; "
                "seq 1 reads the prompt's rows",
        prompt, (long long)s.blocks_shared, (long long)(s.blocks_used - used_before));
    int64_t shared_before = s.blocks_shared;
    for (int i = 0; i < answer; i++)
        decode(&m, 2, both);
    s = stats(&m);
    CHECK(pos_max(&m, 1) == prompt + answer - 1, "llama: seq 1 should end at %d", prompt + answer - 1);
    CHECK(s.blocks_shared <= shared_before, "llama: decoding shared more blocks");
    say("decode", "seqs 0 and 1 together: %d steps of 2 tokens; %lld blocks still shared", answer,
        (long long)s.blocks_shared);
    print_stats(&m, "two answers");
    KV(kvrt_seq_keep(m.cache, 0));
    CHECK(n_tokens(&m, 1) == 0 && stats(&m).blocks_shared == 0, "llama: seq_keep left seq 1");
    say("keep", "answer 0 chosen: kvrt_seq_keep(0) frees seq 1's own blocks");

    /* turn 2: a user message, then speculative decoding with 4 drafts */
    int32_t p = pos_max(&m, 0) + 1;
    prefill(&m, 0, p, turn2, 64);
    expect_prompt_rows(&m, 5, 0, p, turn2, p);
    say("prefill", "seq 0: %d-token user message at %d..%d", turn2, p, p + turn2 - 1);
    static const int accepted[] = {1, 3, 0, 4, 2};
    int drafted = 0, kept = 0;
    for (int round = 0; round < 5; round++) {
        int32_t seqs[4] = {0, 0, 0, 0}, pos[4];
        int32_t next = pos_max(&m, 0) + 1;
        for (int i = 0; i < 4; i++)
            pos[i] = next + i;
        step_at(&m, 4, seqs, pos, decode_row(&m, 4), 0);
        KV(kvrt_seq_rm(m.cache, 0, next + accepted[round], -1));
        CHECK(pos_max(&m, 0) == next + accepted[round] - 1, "llama: rollback left pos_max %d",
              pos_max(&m, 0));
        drafted += 4;
        kept += accepted[round];
    }
    say("draft", "5 rounds of 4 draft tokens verified in one step each; %d of %d accepted, the rest "
                 "removed with kvrt_seq_rm(0, p, -1); seq 0 ends at %d",
        kept, drafted, pos_max(&m, 0));

    /* decode until the context is full, then shift it like llama.cpp */
    int before_fill = (int)n_tokens(&m, 0);
    while (n_tokens(&m, 0) < n_ctx)
        decode(&m, 1, &seq0);
    say("decode", "seq 0: %d tokens until the context of %d is full", n_ctx - before_fill, n_ctx);
    int32_t n_past = pos_max(&m, 0) + 1;
    int32_t n_discard = (n_past - n_keep) / 2;
    rows old = gather(&m, 4, 0, n_keep + n_discard, -1);
    KV(kvrt_seq_rm(m.cache, 0, n_keep, n_keep + n_discard));
    KV(kvrt_seq_shift(m.cache, 0, n_keep + n_discard, n_past, -n_discard));
    CHECK(pos_max(&m, 0) == n_past - n_discard - 1 && n_tokens(&m, 0) == n_past - n_discard,
          "llama: after the shift seq 0 should hold [0, %d)", n_past - n_discard);
    rows moved = gather(&m, 4, 0, n_keep, -1);
    CHECK(moved.n == old.n, "llama: the shift lost rows");
    for (int64_t i = 0; i < moved.n; i++)
        CHECK(moved.pos[i] == old.pos[i] - n_discard, "llama: row %lld at %d after the shift", (long long)i,
              moved.pos[i]);
    CHECK(memcmp(moved.v, old.v, m.v_row * (size_t)old.n) == 0, "llama: the shift changed V");
    err = rotation_error(&m, &old, &moved, 8, 128, 0, 128, -n_discard);
    CHECK(err <= 1.0, "llama: re-rotated K is off the reference by %.2f ulp", err);
    rows_free(&old);
    rows_free(&moved);
    s = stats(&m);
    say("shift", "context full at %d: keep %d, kvrt_seq_rm [%d, %d), kvrt_seq_shift [%d, %d) by "
                 "%d; positions now 0..%d, K re-rotated (within %.2f ulp of the reference), V "
                 "unchanged, %lld holes",
        n_past, n_keep, n_keep, n_keep + n_discard, n_keep + n_discard, n_past, -n_discard,
        pos_max(&m, 0), err, (long long)s.holes);
    for (int i = 0; i < 24; i++)
        decode(&m, 1, &seq0);
    err = attention_error(&m, n_layers - 1, 0, 0);
    CHECK(err <= 1.0, "llama: attention after the shift is off by %.2f of its bound", err);
    say("decode", "seq 0: 24 more tokens after the shift, ends at %d; attention matches the "
                  "reference (%.2f)",
        pos_max(&m, 0), err);

    /* compaction closes the holes the removal left */
    print_stats(&m, "before compaction");
    rows pre = gather(&m, 6, 0, 0, -1);
    kvrt_cache_stats s0 = stats(&m);
    KV(kvrt_cache_compact(m.cache));
    kvrt_cache_stats s1 = stats(&m);
    rows post = gather(&m, 6, 0, 0, -1);
    expect_same_rows(&m, &pre, &post, "compaction");
    rows_free(&pre);
    rows_free(&post);
    CHECK(s1.holes == 0, "llama: %lld holes after compaction", (long long)s1.holes);
    say("compact", "%lld holes closed, %lld blocks freed; every row reads back the same",
        (long long)s0.holes, (long long)(s0.blocks_used - s1.blocks_used));
    decode(&m, 1, &seq0);

    /* save the session, restore it into a fresh cache, continue there */
    membuf file = {0};
    rows saved = gather(&m, 0, 0, 0, -1);
    KV(kvrt_state_write(m.cache, 0, membuf_write, &file));
    uint64_t predicted;
    KV(kvrt_state_size(m.cache, 0, &predicted));
    CHECK(predicted == file.size, "llama: state of %zu bytes, %llu predicted", file.size,
          (unsigned long long)predicted);
    kvrt_cache *fresh;
    kvrt_batch *fresh_batch;
    KV(kvrt_cache_create(kvrt_cache_get_desc(m.cache), &fresh));
    KV(kvrt_batch_create(fresh, MAX_TOKENS, &fresh_batch));
    KV(kvrt_state_read(fresh, 0, membuf_read, &file));
    kvrt_batch_destroy(m.batch);
    kvrt_cache_destroy(m.cache);
    m.cache = fresh;
    m.batch = fresh_batch;
    rows restored = gather(&m, 0, 0, 0, -1);
    expect_same_rows(&m, &saved, &restored, "save and restore");
    rows_free(&saved);
    rows_free(&restored);
    for (int i = 0; i < 8; i++)
        decode(&m, 1, &seq0);
    err = attention_error(&m, n_layers - 1, 0, 0);
    CHECK(err <= 1.0, "llama: attention after the restore is off by %.2f of its bound", err);
    say("restore", "seq 0 saved (%.1f MiB state, checksummed), restored into a fresh cache, 8 "
                   "more tokens decoded there (ends at %d); rows bit-exact, attention matches",
        (double)file.size / (1 << 20), pos_max(&m, 0));
    free(file.data);
    print_stats(&m, "end");
    print_throughput(&m);
    add_totals(total, &m);
    model_close(&m);
}

/* ------------------------------------------------------------------------ */
/* The gemma session: interleaved sliding windows                            */
/* ------------------------------------------------------------------------ */

static void gemma_session(kvrt_device device, int quick, totals *total)
{
    enum { LAYERS = 6, WINDOW = 32 };
    const int prompt = quick ? 64 : 100, answer = quick ? 48 : 96;
    kvrt_layer_desc layers[LAYERS];
    for (int l = 0; l < LAYERS; l++) {
        memset(&layers[l], 0, sizeof layers[l]);
        layers[l].kind = KVRT_LAYER_ATTN;
        layers[l].n_kv_heads = 4;
        layers[l].head_dim_k = layers[l].head_dim_v = 128;
        layers[l].window = l % 6 == 5 ? 0 : WINDOW;
    }
    kvrt_rope_desc rope = {128, 10000.0f, 1.0f, KVRT_ROPE_NORMAL};
    model m;
    int n_ctx = prompt + answer + 16;
    model_open(&m, "gemma", device, layers, LAYERS, KVRT_BF16, 16, n_ctx / 16 + 4, 0, 2, rope, 8,
               n_ctx + MAX_TOKENS, 0);
    int g_swa = kvrt_layer_group(m.cache, 0), g_full = kvrt_layer_group(m.cache, 5);
    printf("\n[gemma] %d layers: 5 of window %d, then 1 global; 4 kv heads x 128, bf16, 8 query "
           "heads; %d layer groups\n",
           LAYERS, WINDOW, kvrt_cache_n_groups(m.cache));
    CHECK(kvrt_cache_n_groups(m.cache) == 2, "gemma: expected 2 layer groups");

    prefill(&m, 0, 0, prompt, 64);
    expect_prompt_rows(&m, 5, 0, 0, prompt, 0);
    int32_t seq0 = 0;
    for (int i = 0; i < answer; i++)
        decode(&m, 1, &seq0);
    kvrt_seq_group_info sw, full;
    KV(kvrt_seq_group_info_get(m.cache, 0, g_swa, &sw));
    KV(kvrt_seq_group_info_get(m.cache, 0, g_full, &full));
    int32_t last = pos_max(&m, 0);
    CHECK(full.n_tokens == prompt + answer, "gemma: the global layer should hold every token");
    CHECK(sw.pos_min <= last - WINDOW + 1 && sw.n_blocks <= WINDOW / 16 + 2,
          "gemma: the window group holds [%d, %d] in %d blocks", sw.pos_min, sw.pos_max, sw.n_blocks);
    rows win = gather(&m, 0, 0, last - WINDOW + 1, -1);
    CHECK(win.n == WINDOW, "gemma: the window layer holds %lld of its last %d positions",
          (long long)win.n, WINDOW);
    for (int i = 0; i < WINDOW; i++)
        CHECK(win.pos[i] == last - WINDOW + 1 + i, "gemma: window row %d at position %d", i,
              win.pos[i]);
    rows_free(&win);
    say("decode", "prompt %d + %d tokens: the global group holds %lld tokens in %d blocks, the "
                  "window group %lld tokens in %d blocks (dropped up to position %d)",
        prompt, answer, (long long)full.n_tokens, full.n_blocks, (long long)sw.n_tokens, sw.n_blocks,
        sw.evicted_max);
    double err = attention_error(&m, 2, 0, 0);
    CHECK(err <= 1.0, "gemma: windowed attention is off the reference by %.2f of its bound", err);
    say("check", "windowed attention (layer 2) matches a reference over the last %d positions "
                 "(%.2f of the bound)",
        WINDOW, err);

    /* speculative drafts: a plan evicts only rows that its oldest token no
     * longer sees, so rejected drafts can be rolled back and decoding resumes */
    int kept = 0;
    for (int round = 0; round < 4; round++) {
        int32_t seqs[4] = {0, 0, 0, 0}, pos[4], next = pos_max(&m, 0) + 1;
        for (int i = 0; i < 4; i++)
            pos[i] = next + i;
        step_at(&m, 4, seqs, pos, decode_row(&m, 4), 0);
        int accept = 1 + round % 3;
        KV(kvrt_seq_rm(m.cache, 0, next + accept, -1));
        int ok;
        KV(kvrt_seq_can_resume(m.cache, 0, next + accept, &ok));
        CHECK(ok, "gemma: decoding should resume after rejecting drafts at %d", next + accept);
        kept += accept;
    }
    say("draft", "4 rounds of 4 draft tokens, %d accepted; after each rollback "
                 "kvrt_seq_can_resume says yes", kept);

    /* a rollback past what the window still holds is refused */
    int ok;
    int32_t back = pos_max(&m, 0) - 40;
    KV(kvrt_seq_rm(m.cache, 0, back, -1));
    KV(kvrt_seq_can_resume(m.cache, 0, back, &ok));
    CHECK(!ok, "gemma: a rollback past the window should not resume");
    int32_t pos = back;
    kvrt_status st = kvrt_batch_plan(m.cache, 1, &seq0, &pos, m.batch);
    CHECK(st == KVRT_ERR_WINDOW_EVICTED, "gemma: planning past the window gave %s",
          kvrt_status_name(st));
    say("rollback", "to %d: the window no longer holds its rows; can_resume says no and the plan "
                    "is refused (%s), nothing changed",
        back, kvrt_status_name(st));
    KV(kvrt_seq_rm(m.cache, 0, 0, -1));
    prefill(&m, 0, 0, back, 64);
    decode(&m, 1, &seq0);
    say("prefill", "the decoder re-reads the %d tokens and goes on at %d", back, pos_max(&m, 0));
    print_stats(&m, "end");
    print_throughput(&m);
    add_totals(total, &m);
    model_close(&m);
}

/* ------------------------------------------------------------------------ */
/* The deepseek session: MLA                                                  */
/* ------------------------------------------------------------------------ */

static void deepseek_session(kvrt_device device, int quick, totals *total)
{
    enum { LAYERS = 4, LATENT = 512, ROPE = 64 };
    const int prompt = quick ? 64 : 128, answer = quick ? 16 : 48;
    const int n_q_heads = device.backend == KVRT_BACKEND_CPU ? 16 : 128;
    kvrt_layer_desc layers[LAYERS];
    for (int l = 0; l < LAYERS; l++) {
        memset(&layers[l], 0, sizeof layers[l]);
        layers[l].kind = KVRT_LAYER_MLA;
        layers[l].latent_dim = LATENT;
        layers[l].rope_dim = ROPE;
    }
    kvrt_rope_desc rope = {0, 10000.0f, 1.0f, KVRT_ROPE_NORMAL};
    model m;
    int n_ctx = prompt + answer + 64;
    model_open(&m, "deepseek", device, layers, LAYERS, KVRT_BF16, 64, 2 * (n_ctx / 64 + 2), 0, 2,
               rope, n_q_heads, n_ctx + MAX_TOKENS, 0);
    printf("\n[deepseek] %d MLA layers: latent %d + rope %d, bf16, %d query heads, block 64; %zu "
           "bytes per token and layer\n",
           LAYERS, LATENT, ROPE, n_q_heads, kvrt_layer_row_bytes(&layers[0], KVRT_BF16));
    prefill(&m, 0, 0, prompt, 64);
    expect_prompt_rows(&m, 0, 0, 0, prompt, 0);
    expect_prompt_rows(&m, LAYERS - 1, 0, 0, prompt, 0);
    int32_t seq0 = 0;
    for (int i = 0; i < answer; i++)
        decode(&m, 1, &seq0);
    double err = attention_error(&m, 1, 0, 0);
    CHECK(err <= 1.0, "deepseek: MLA attention is off the reference by %.2f of its bound", err);
    say("decode", "prompt %d + %d tokens; MLA attention (V = the latent part) matches a reference "
                  "(%.2f of the bound)",
        prompt, answer, err);

    /* a shift re-rotates only the rope part of each row */
    KV(kvrt_seq_cp(m.cache, 0, 1, 0, -1));
    rows old = gather(&m, 2, 1, 0, -1);
    KV(kvrt_seq_shift(m.cache, 1, 0, -1, 1000));
    rows moved = gather(&m, 2, 1, 0, -1);
    CHECK(moved.n == old.n && moved.pos[0] == old.pos[0] + 1000, "deepseek: shift moved positions wrong");
    err = rotation_error(&m, &old, &moved, 1, LATENT + ROPE, LATENT, ROPE, 1000);
    CHECK(err <= 1.0, "deepseek: re-rotated rope part is off by %.2f ulp", err);
    rows orig = gather(&m, 2, 0, 0, -1);
    expect_same_rows(&m, &old, &orig, "the source of the copy-on-write shift");
    rows_free(&old);
    rows_free(&moved);
    rows_free(&orig);
    say("shift", "a copy of seq 0 shifted by +1000: its shared blocks were copied first, only the "
                 "rope part of each row turned (%.2f ulp), seq 0 unchanged",
        err);
    int32_t seqs[2] = {0, 1};
    for (int i = 0; i < 8; i++)
        decode(&m, 2, seqs);
    print_stats(&m, "end");
    print_throughput(&m);
    add_totals(total, &m);
    model_close(&m);
}

/* ------------------------------------------------------------------------ */
/* The serving session: prefix caching                                      */
/* ------------------------------------------------------------------------ */

static uint32_t demo_rand(uint32_t *state)
{
    *state = *state * 1664525u + 1013904223u;
    return *state >> 8;
}

/* Requests on SEQS sequence slots, one after another; a request's rows are
 * position-indexed source rows (as if every prompt computed the same K/V at
 * a position), so attached rows are checked against the source. */
static void serving_session(kvrt_device device, int quick, totals *total)
{
    enum { LAYERS = 4, SEQS = 4, CHATS = 10, TURNS = 4, USER_MAX = 64, ANSWER = 16 };
    const int system = quick ? 128 : 512, requests = quick ? 32 : 96;
    const int max_ctx = system + TURNS * (USER_MAX + ANSWER) + 16;
    kvrt_layer_desc layers[LAYERS];
    attn_layers(layers, LAYERS, 64);
    kvrt_rope_desc rope = {64, 10000.0f, 1.0f, KVRT_ROPE_NORMAL};
    model m;
    /* room for the live requests and a little more: cached blocks get evicted */
    int n_blocks = SEQS * (max_ctx / 16 + 2) + 2 * system / 16;
    model_open(&m, "serving", device, layers, LAYERS, KVRT_F16, 16, n_blocks, 0, SEQS, rope, 16,
               max_ctx + MAX_TOKENS, KVRT_PREFIX_BLAKE2B);
    int32_t *slot_tokens[SEQS], *history[CHATS], history_len[CHATS] = {0}, turns[CHATS] = {0};
    int32_t *system_tokens[2];
    uint32_t rng = 12345;
    for (int s = 0; s < SEQS; s++)
        slot_tokens[s] = xmalloc(sizeof(int32_t) * (size_t)(max_ctx + MAX_TOKENS));
    for (int c = 0; c < CHATS; c++)
        history[c] = xmalloc(sizeof(int32_t) * (size_t)max_ctx);
    for (int t = 0; t < 2; t++) {
        system_tokens[t] = xmalloc(sizeof(int32_t) * (size_t)system);
        for (int i = 0; i < system; i++)
            system_tokens[t][i] = (int32_t)(demo_rand(&rng) % 32000);
    }
    m.tokens = slot_tokens;
    printf("\n[serving] %d layers x 8 kv heads x 64, f16, block 16, %d blocks, prefix caching "
           "(BLAKE2b keys); %d requests of 2 tenants, %d chats, system prompts of %d tokens\n",
           LAYERS, n_blocks, requests, CHATS, system);
    int64_t prompt_tokens = 0, computed = 0;
    for (int r = 0; r < requests; r++) {
        int32_t seq = r % SEQS;
        KV(kvrt_seq_rm(m.cache, seq, 0, -1)); /* the slot's last request ended */
        int c = (int)(demo_rand(&rng) % CHATS), tenant = c % 2;
        if (history_len[c] == 0 || turns[c] == TURNS) { /* a new chat: the tenant's system prompt */
            memcpy(history[c], system_tokens[tenant], sizeof(int32_t) * (size_t)system);
            history_len[c] = system;
            turns[c] = 0;
        }
        int user = 16 + (int)(demo_rand(&rng) % (USER_MAX - 15));
        for (int i = 0; i < user; i++)
            history[c][history_len[c]++] = (int32_t)(demo_rand(&rng) % 32000);
        int n = history_len[c];
        memcpy(slot_tokens[seq], history[c], sizeof(int32_t) * (size_t)n);
        const char *salt = tenant == 0 ? "tenant-a" : "tenant-b";
        int32_t covered;
        /* the last prompt token is always computed: its logits start the answer */
        KV(kvrt_seq_attach_prefix(m.cache, seq, slot_tokens[seq], n - 1, salt, 8, &covered));
        if (covered > 0) {
            expect_prompt_rows(&m, 0, seq, 0, covered, 0);
            expect_prompt_rows(&m, LAYERS - 1, seq, 0, covered, 0);
        }
        prefill(&m, seq, covered, n - covered, 64);
        prompt_tokens += n;
        computed += n - covered;
        for (int i = 0; i < ANSWER; i++) { /* the answer joins the chat's history */
            int32_t p = n + i;
            slot_tokens[seq][p] = history[c][history_len[c]++] = (int32_t)(demo_rand(&rng) % 32000);
            step_at(&m, 1, &seq, &p, p, 0);
        }
        turns[c]++;
    }
    kvrt_prefix_stats ps;
    KV(kvrt_prefix_stats_get(m.cache, &ps));
    CHECK(ps.hits > 0 && ps.tokens_served == prompt_tokens - computed,
          "serving: %lld lookups hit, %lld tokens served, %lld prompt tokens not computed",
          (long long)ps.hits, (long long)ps.tokens_served, (long long)(prompt_tokens - computed));
    say("prefix", "%lld lookups, %lld hits (%.0f%%); hit rate %.1f%% of prompt tokens; prefill "
                  "tokens saved %lld of %lld (%lld computed); %lld blocks evicted, %lld cached now",
        (long long)ps.lookups, (long long)ps.hits, 100.0 * (double)ps.hits / (double)ps.lookups,
        100.0 * (double)ps.tokens_served / (double)prompt_tokens, (long long)ps.tokens_served,
        (long long)prompt_tokens, (long long)computed, (long long)ps.evictions,
        (long long)ps.blocks_cached);
    print_stats(&m, "end");
    print_throughput(&m);
    add_totals(total, &m);
    m.tokens = NULL;
    model_close(&m);
    for (int s = 0; s < SEQS; s++)
        free(slot_tokens[s]);
    for (int c = 0; c < CHATS; c++)
        free(history[c]);
    free(system_tokens[0]);
    free(system_tokens[1]);
}

/* ------------------------------------------------------------------------ */
/* main                                                                      */
/* ------------------------------------------------------------------------ */

int main(int argc, char **argv)
{
    int quick = 0;
    kvrt_device device = {KVRT_BACKEND_CPU, 0};
    int chosen = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0) {
            quick = 1;
        } else if (strcmp(argv[i], "--backend") == 0 && i + 1 < argc) {
            const char *b = argv[++i];
            chosen = 1;
            if (strcmp(b, "cpu") == 0)
                device.backend = KVRT_BACKEND_CPU;
            else if (strcmp(b, "cuda") == 0)
                device.backend = KVRT_BACKEND_CUDA;
            else if (strcmp(b, "hip") == 0)
                device.backend = KVRT_BACKEND_HIP;
            else
                fail("unknown backend '%s' (cpu, cuda, hip)", b);
        } else {
            fprintf(stderr, "usage: kvrt-demo [--backend cpu|cuda|hip] [--quick]\n");
            return strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0 ? 0 : 2;
        }
    }
    if (!chosen) { /* the best backend this build can use */
        if (kvrt_device_count(KVRT_BACKEND_CUDA) > 0 && devmem_supports(KVRT_BACKEND_CUDA))
            device.backend = KVRT_BACKEND_CUDA;
        else if (kvrt_device_count(KVRT_BACKEND_HIP) > 0 && devmem_supports(KVRT_BACKEND_HIP))
            device.backend = KVRT_BACKEND_HIP;
    }
    CHECK(kvrt_device_count(device.backend) > 0, "no %s device in this kvrt (kvrt-info lists them)",
          kvrt_backend_name(device.backend));
    CHECK(devmem_supports(device.backend), "this kvrt-demo was built without the %s runtime",
          kvrt_backend_name(device.backend));
    char desc[256];
    KV(kvrt_device_describe(device, desc, sizeof desc));
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    printf("kvrt %s demo on %s", kvrt_version_string(), desc);
    if (device.backend == KVRT_BACKEND_CPU)
        printf(" (%d OpenMP thread%s)", threads, threads == 1 ? "" : "s");
    printf("%s: a simulated decoding session with random K, V and queries\n",
           quick ? ", quick" : "");

    totals total = {0, 0, 0};
    llama_session(device, quick, &total);
    gemma_session(device, quick, &total);
    deepseek_session(device, quick, &total);
    serving_session(device, quick, &total);
    printf("\nall checks passed: %lld tokens in %.2f s of steps, %.0f tokens/s, cache traffic "
           "%.2f GB/s\n",
           (long long)total.tokens, total.seconds, total.tokens / total.seconds,
           total.bytes / 1e9 / total.seconds);
    return 0;
}
