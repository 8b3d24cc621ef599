/*
 * kvrt_bench.c: times kvrt's cache operations and attention on one backend
 * and compares each with the device's copy bandwidth measured in the same
 * run.
 *
 *   kvrt-bench [--backend cpu|cuda|hip] [--dtype f16|bf16|f32|q8|fp8] [--runs N]
 *              [--size-mib M] [--quick] [--isa portable|avx2|avx512] [--json FILE] <op...>
 *   ops: write shift copy compact gather plan attention attention_decode
 *        attention_prefill attention_mla all
 *
 * For every measurement: build a cache of at least --size-mib (256 MiB on
 * the CPU, 1 GiB on GPUs), run the operation once and validate its result
 * against what was written (bit-exact where data only moves, a bound where
 * it is computed), warm up, time --runs runs (20 by default) with device
 * events on GPUs or the monotonic clock on the CPU, and report the median.
 * Untimed steps between runs put the cache back in its starting state.
 *
 * Each measurement prints a table row and one JSON line:
 *   {"op":..,"backend":..,"dtype":..,"shape":{..},"median_ms":..,"bytes":..,
 *    "gbps":..,"copy_gbps":..,"fraction":..}   (+ "tflops" for attention;
 *    + "sim":true on kvrt-sim, whose times are a CPU simulator's)
 * bytes counts the bytes the operation reads plus writes; copy_gbps is a
 * device copy of --size-mib (on the CPU a memcpy split across the OpenMP
 * threads), also counting read plus write bytes, timed once after each timed
 * run of the operation (the median of those); fraction = gbps / copy_gbps.
 * On the CPU a read-only pass over the probe's source is timed likewise:
 * "read_gbps" and "read_fraction" = gbps / read_gbps, the yardstick for
 * operations that mostly read (decode attention).
 * plan times the host side of a decode step (kvrt_batch_plan of 256
 * sequences); it moves no K/V, so its bytes are 0 and only median_ms counts.
 * It also times, per prefix-caching hash (XXH3-128, BLAKE2b), the same step
 * planned with token ids (plan_prefix_*) and the lookup of a 4096-token
 * prompt whose blocks are all cached (lookup_*).
 * On CUDA each attention row also carries its cuBLAS dense baseline
 * (baseline.h: K/V gathered contiguous, batched GEMM, masked softmax,
 * batched GEMM), timed in the same run after kvrt and checked against
 * kvrt's output: "baseline":"cublas", "baseline_ms", "vs_baseline" =
 * baseline_ms / median_ms (> 1: kvrt faster), "baseline_check" (its worst
 * error in units of its bound). Where there is none (HIP: hipBLAS is not
 * packaged; q8, fp8 and f32 caches; a build without cuBLAS) the row has
 * "vs_baseline":null and a "baseline_note". CPU rows have neither.
 * --isa caps the CPU kernels' instruction set (it sets KVRT_CPU_ISA before
 * the first kvrt call; default: the widest the processor has); every row
 * carries the level that ran ("isa", in the table too), whatever the
 * backend, since CPU-side work runs at it.
 * With --dtype q8 or fp8 (quantized caches) attention_decode runs, written
 * from f16 rows, with f16 queries and outputs; its bytes count the codes and
 * the scales read. The other ops skip quantized caches.
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
#ifdef KVRT_BENCH_CUBLAS
#  include "baseline.h"
#endif

#define MIB ((size_t)1 << 20)

/* ------------------------------------------------------------------------ */
/* Failure handling: a benchmark that cannot validate stops.                 */
/* ------------------------------------------------------------------------ */

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "kvrt-bench: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

#define KV(expr)                                                                               \
    do {                                                                                       \
        kvrt_status st_ = (expr);                                                              \
        if (st_ != KVRT_OK)                                                                    \
            die("%s:%d: %s -> %s: %s", __FILE__, __LINE__, #expr, kvrt_status_name(st_),      \
                kvrt_last_error());                                                            \
    } while (0)

#define DM(expr)                                                                               \
    do {                                                                                       \
        if ((expr) != 0)                                                                       \
            die("%s:%d: %s: %s", __FILE__, __LINE__, #expr, devmem_error());                   \
    } while (0)

static void *xmalloc(size_t n)
{
    void *p = malloc(n > 0 ? n : 1);
    if (p == NULL)
        die("host allocation of %zu bytes failed", n);
    return p;
}

/* ------------------------------------------------------------------------ */
/* Options, the run's state, reporting                                       */
/* ------------------------------------------------------------------------ */

typedef struct bench {
    kvrt_device  device;
    kvrt_dtype   dtype;          /* cache dtype of every op but MLA */
    kvrt_dtype   mla_dtype;      /* bf16 unless --dtype was given */
    int          runs;
    size_t       size;           /* bytes of K/V each operation's cache holds, at least */
    int          quick;
    int          sim;            /* the device is kvrt-sim: lines say so, times are no GPU's */
    FILE        *json;
    devmem_timer timer;
    devmem_copy_probe probe;     /* the copy each op is compared with */
    double       copy_gbps;      /* the median probe copy of the last time_op */
    double       read_gbps;      /* CPU: the median read of the probe's source, likewise */
    int          header_done;
    char         row_extra[256]; /* JSON members the next report adds (the baseline's) */
    char         row_note[64];   /* and its table text */
    const char  *isa;            /* the CPU kernels' instruction set (kvrt_cpu_isa_get) */
} bench;

static void print_header(bench *b)
{
    if (b->header_done)
        return;
    b->header_done = 1;
    printf("%-18s %-5s %-8s %-5s %-44s %10s %9s %9s %8s\n", "op", "dev", "isa", "dtype", "shape",
           "median_ms", "GB/s", "copy", "fraction");
}

/* One measurement: a table row, a JSON line on stdout and in --json. */
static void report(bench *b, const char *op, kvrt_dtype dtype, const char *shape_json,
                   const char *shape_text, double median_ms, double bytes, double flops)
{
    double gbps = devmem_gbps(bytes, median_ms);
    double fraction = b->copy_gbps > 0 ? gbps / b->copy_gbps : 0.0;
    print_header(b);
    printf("%-18s %-5s %-8s %-5s %-44s %10.3f %9.2f %9.2f %8.3f", op,
           b->sim ? "sim" : kvrt_backend_name(b->device.backend), b->isa, kvrt_dtype_name(dtype),
           shape_text, median_ms, gbps, b->copy_gbps, fraction);
    if (flops > 0)
        printf("  %.3f TFLOP/s", flops / (median_ms * 1e-3) / 1e12);
    if (b->read_gbps > 0)
        printf("  read %.2f GB/s, fraction %.3f", b->read_gbps, gbps / b->read_gbps);
    if (b->row_note[0] != '\0')
        printf("  %s", b->row_note);
    if (b->sim)
        printf("  (kvrt-sim: not a speed)");
    printf("\n");
    char line[1024];
    int n = snprintf(line, sizeof line,
                     "{\"op\":\"%s\",\"backend\":\"%s\",\"isa\":\"%s\",\"dtype\":\"%s\","
                     "\"shape\":%s,\"median_ms\":%.4f,\"bytes\":%.0f,\"gbps\":%.3f,"
                     "\"copy_gbps\":%.3f,\"fraction\":%.4f",
                     op, kvrt_backend_name(b->device.backend), b->isa, kvrt_dtype_name(dtype),
                     shape_json, median_ms, bytes, gbps, b->copy_gbps, fraction);
    if (b->sim)
        n += snprintf(line + n, sizeof line - (size_t)n, ",\"sim\":true");
    if (flops > 0)
        n += snprintf(line + n, sizeof line - (size_t)n, ",\"tflops\":%.4f",
                      flops / (median_ms * 1e-3) / 1e12);
    if (b->read_gbps > 0)
        n += snprintf(line + n, sizeof line - (size_t)n,
                      ",\"read_gbps\":%.3f,\"read_fraction\":%.4f", b->read_gbps,
                      gbps / b->read_gbps);
    n += snprintf(line + n, sizeof line - (size_t)n, "%s", b->row_extra);
    b->row_extra[0] = b->row_note[0] = '\0';
    snprintf(line + n, sizeof line - (size_t)n, "}");
    printf("%s\n", line);
    if (b->json != NULL) {
        fprintf(b->json, "%s\n", line);
        fflush(b->json);
    }
    fflush(stdout);
}

static void skip(bench *b, const char *op, const char *why)
{
    print_header(b);
    printf("skip %s on %s: %s\n", op, kvrt_backend_name(b->device.backend), why);
    fflush(stdout);
}

/* The cache ops validate by comparing gathered bytes with what they wrote,
 * which quantized caches do not keep: skipped for them. */
static int skip_quantized(bench *b, const char *op)
{
    if (!kvrt_dtype_is_quantized(b->dtype))
        return 0;
    skip(b, op, "quantized caches: attention_decode only");
    return 1;
}

/* ------------------------------------------------------------------------ */
/* Data: device buffers with a host image of what they hold                  */
/* ------------------------------------------------------------------------ */

typedef devmem_buffer buffer;

static buffer buffer_random(bench *b, kvrt_dtype dtype, size_t n, uint64_t seed)
{
    buffer buf;
    DM(devmem_buffer_random(b->device, dtype, n, seed, &buf));
    return buf;
}

static buffer buffer_empty(bench *b, size_t bytes)
{
    buffer buf;
    DM(devmem_buffer_zero(b->device, bytes, &buf));
    return buf;
}

static void buffer_pull(bench *b, buffer *buf)
{
    (void)b;
    DM(devmem_buffer_pull(buf));
}

static void buffer_free(bench *b, buffer *buf)
{
    (void)b;
    devmem_buffer_free(buf);
}

/* ------------------------------------------------------------------------ */
/* Caches and filling them                                                   */
/* ------------------------------------------------------------------------ */

/* What a cache of `dtype` is written from, and what its gathered rows hold
 * (kvrt_gather_as to f32 for quantized caches). */
static kvrt_dtype src_dtype_of(kvrt_dtype dtype)
{
    return kvrt_dtype_is_quantized(dtype) ? KVRT_F16 : dtype;
}
static kvrt_dtype rows_dtype_of(kvrt_dtype dtype)
{
    return kvrt_dtype_is_quantized(dtype) ? KVRT_F32 : dtype;
}

/* Bytes of one token's K (and V) row in a layer. */
static size_t k_row_bytes(const kvrt_layer_desc *l, kvrt_dtype dtype)
{
    size_t es = kvrt_dtype_size(dtype);
    return l->kind == KVRT_LAYER_MLA ? (size_t)(l->latent_dim + l->rope_dim) * es
                                     : (size_t)l->n_kv_heads * (size_t)l->head_dim_k * es;
}

static size_t v_row_bytes(const kvrt_layer_desc *l, kvrt_dtype dtype)
{
    size_t es = kvrt_dtype_size(dtype);
    return l->kind == KVRT_LAYER_MLA ? 0 : (size_t)l->n_kv_heads * (size_t)l->head_dim_v * es;
}

static kvrt_cache *make_cache(bench *b, kvrt_dtype dtype, kvrt_layer_desc *layers, int n_layers,
                              int block_size, int n_blocks, int max_seqs, int n_rot)
{
    kvrt_cache_desc d;
    kvrt_cache_desc_init(&d);
    d.device = b->device;
    d.dtype = dtype;
    d.layers = layers;
    d.n_layers = n_layers;
    d.block_size = block_size;
    d.n_blocks = n_blocks;
    d.max_seqs = max_seqs;
    d.rope.n_rot = n_rot;
    d.rope.theta = 10000.0f;
    kvrt_cache *c;
    KV(kvrt_cache_create(&d, &c));
    return c;
}

/* Random K/V rows that fills are written from: enough rows for one plan of
 * max_tokens plus room to start each write at a different row. */
typedef struct fill_source {
    buffer  k, v;
    size_t  k_row, v_row;
    int64_t rows;
    int64_t calls;
} fill_source;

enum { FILL_SLACK = 4096 };

static fill_source fill_source_make(bench *b, kvrt_cache *c, int max_tokens)
{
    const kvrt_cache_desc *d = kvrt_cache_get_desc(c);
    fill_source f;
    memset(&f, 0, sizeof f);
    for (int l = 0; l < d->n_layers; l++) {
        size_t kr = k_row_bytes(&d->layers[l], d->dtype), vr = v_row_bytes(&d->layers[l], d->dtype);
        f.k_row = kr > f.k_row ? kr : f.k_row;
        f.v_row = vr > f.v_row ? vr : f.v_row;
    }
    f.rows = max_tokens + FILL_SLACK;
    kvrt_dtype src = src_dtype_of(d->dtype);
    size_t es = kvrt_dtype_size(src);
    f.k_row = f.k_row / kvrt_dtype_size(d->dtype) * es;
    f.v_row = f.v_row / kvrt_dtype_size(d->dtype) * es;
    f.k = buffer_random(b, src, (size_t)f.rows * f.k_row / es, 101);
    if (f.v_row > 0)
        f.v = buffer_random(b, src, (size_t)f.rows * f.v_row / es, 202);
    return f;
}

static void fill_source_free(bench *b, fill_source *f)
{
    buffer_free(b, &f->k);
    if (f->v.dev != NULL)
        buffer_free(b, &f->v);
}

/* Writes every layer of the batch's current plan from the fill source. */
static void fill_write(kvrt_cache *c, kvrt_batch *batch, fill_source *f)
{
    const kvrt_cache_desc *d = kvrt_cache_get_desc(c);
    for (int l = 0; l < d->n_layers; l++) {
        int64_t at = (f->calls * 131 + l * 977) % FILL_SLACK;
        const char *k = (const char *)f->k.dev + at * (int64_t)f->k_row;
        const char *v = f->v.dev != NULL ? (const char *)f->v.dev + at * (int64_t)f->v_row : NULL;
        KV(kvrt_write(c, batch, l, k, d->layers[l].kind == KVRT_LAYER_MLA ? NULL : v,
                      src_dtype_of(d->dtype), NULL));
    }
    f->calls++;
}

/* Plans positions [pos0, pos0 + count) of each of n_seqs sequences
 * (seq0, seq0 + 1, ...), in plans of at most the batch's max_tokens tokens,
 * writing every layer when `write` is set. */
static void fill(kvrt_cache *c, kvrt_batch *batch, int max_tokens, fill_source *f, int32_t seq0,
                 int n_seqs, int32_t pos0, int32_t count, int write)
{
    int32_t per_plan = max_tokens / n_seqs;
    if (per_plan < 1)
        die("fill: %d sequences exceed a batch of %d tokens", n_seqs, max_tokens);
    int32_t *seqs = xmalloc(sizeof(int32_t) * (size_t)max_tokens);
    int32_t *pos = xmalloc(sizeof(int32_t) * (size_t)max_tokens);
    for (int32_t p = 0; p < count; p += per_plan) {
        int32_t m = count - p < per_plan ? count - p : per_plan, n = 0;
        for (int s = 0; s < n_seqs; s++)
            for (int32_t i = 0; i < m; i++) {
                seqs[n] = seq0 + s;
                pos[n] = pos0 + p + i;
                n++;
            }
        KV(kvrt_batch_plan(c, n, seqs, pos, batch));
        if (write)
            fill_write(c, batch, f);
    }
    free(seqs);
    free(pos);
}

/* ------------------------------------------------------------------------ */
/* Timing                                                                    */
/* ------------------------------------------------------------------------ */

typedef void (*run_fn)(bench *b, void *ctx);

/* CPU: milliseconds to read the n bytes at p once, one contiguous piece per
 * OpenMP thread, eight independent sums per thread (a read-only stream: the
 * ceiling of operations that read much and write little, as decode
 * attention does; a copy also writes). */
static double cpu_read_ms(const char *p, size_t n)
{
    static volatile uint64_t sink;
    (void)sink;
    const uint64_t *w = (const uint64_t *)(const void *)p;
    int64_t words = (int64_t)(n / 64) * 8;
    uint64_t total = 0;
    double t0 = devmem_now();
#ifdef _OPENMP
#  pragma omp parallel for schedule(static) reduction(+ : total)
#endif
    for (int64_t i = 0; i < words; i += 8)
        total += (w[i] ^ w[i + 1]) + (w[i + 2] ^ w[i + 3]) + (w[i + 4] ^ w[i + 5]) +
                 (w[i + 6] ^ w[i + 7]);
    double ms = (devmem_now() - t0) * 1e3;
    sink = total;
    return ms;
}

/* Median milliseconds of `run` over b->runs runs after two warm-up runs;
 * `reset` (untimed, may be NULL) runs before each. Each timed run is
 * followed by one timed copy of the probe, so that b->copy_gbps (the median
 * of those) is measured under the same conditions as the op, even when
 * other work on the machine or clocks change during the measurement. */
static double time_op(bench *b, run_fn run, run_fn reset, void *ctx)
{
    double *ms = xmalloc(sizeof(double) * (size_t)b->runs);
    double *copy_ms = xmalloc(sizeof(double) * (size_t)b->runs);
    double *read_ms = xmalloc(sizeof(double) * (size_t)b->runs);
    const int cpu = b->device.backend == KVRT_BACKEND_CPU;
    for (int r = -2; r < b->runs; r++) {
        if (reset != NULL)
            reset(b, ctx);
        DM(devmem_sync(b->device));
        DM(devmem_timer_start(&b->timer));
        run(b, ctx);
        double t;
        DM(devmem_timer_stop(&b->timer, &t));
        if (r >= 0) {
            ms[r] = t;
            DM(devmem_copy_probe_run(&b->probe, &copy_ms[r]));
            if (cpu)
                read_ms[r] = cpu_read_ms(b->probe.src, b->probe.bytes);
        }
    }
    double median = devmem_median(ms, b->runs);
    b->copy_gbps = devmem_gbps(2.0 * (double)b->probe.bytes, devmem_median(copy_ms, b->runs));
    b->read_gbps = cpu ? devmem_gbps((double)b->probe.bytes, devmem_median(read_ms, b->runs)) : 0.0;
    free(ms);
    free(copy_ms);
    free(read_ms);
    return median;
}

/* ------------------------------------------------------------------------ */
/* Validation helpers                                                        */
/* ------------------------------------------------------------------------ */

typedef struct rows {
    void    *k, *v;
    int32_t *pos;
    int64_t  n;
} rows;

/* A sequence's rows of one layer in [p0, p1), gathered to host memory. */
static rows gather_rows(kvrt_cache *c, int layer, int32_t seq, int32_t p0, int32_t p1)
{
    const kvrt_cache_desc *d = kvrt_cache_get_desc(c);
    const kvrt_layer_desc *l = &d->layers[layer];
    rows r;
    int64_t n;
    /* capacity 0: only counts the rows (INVALID_ARG, with the count, when there are any) */
    kvrt_status st = kvrt_gather(c, layer, seq, p0, p1, NULL, NULL, NULL, 0, &n, NULL);
    if (st != KVRT_OK && st != KVRT_ERR_INVALID_ARG)
        KV(st);
    kvrt_dtype rd = rows_dtype_of(d->dtype);
    r.k = xmalloc(k_row_bytes(l, rd) * (size_t)(n + 1));
    r.v = xmalloc(v_row_bytes(l, rd) * (size_t)(n + 1) + 1);
    r.pos = xmalloc(sizeof(int32_t) * (size_t)(n + 1));
    KV(kvrt_gather_as(c, layer, seq, p0, p1, r.k, l->kind == KVRT_LAYER_MLA ? NULL : r.v, r.pos,
                      rd, n, &r.n, NULL));
    return r;
}

static void rows_free(rows *r)
{
    free(r->k);
    free(r->v);
    free(r->pos);
}

static void expect_bytes(const void *got, const void *want, size_t n, const char *what)
{
    if (memcmp(got, want, n) != 0)
        die("validation: %s differs from what was written", what);
}

/* ------------------------------------------------------------------------ */
/* The Llama-like cache shared by the cache operations                       */
/* ------------------------------------------------------------------------ */

enum { OP_LAYERS = 8, OP_KV_HEADS = 8, OP_HEAD_DIM = 128, OP_BLOCK = 16, OP_SEQS = 16 };

static void op_layers(kvrt_layer_desc *layers, int n)
{
    for (int l = 0; l < n; l++) {
        memset(&layers[l], 0, sizeof layers[l]);
        layers[l].kind = KVRT_LAYER_ATTN;
        layers[l].n_kv_heads = OP_KV_HEADS;
        layers[l].head_dim_k = OP_HEAD_DIM;
        layers[l].head_dim_v = OP_HEAD_DIM;
    }
}

/* Bytes of one token over all layers of the ops' cache. */
static size_t op_token_bytes(bench *b)
{
    return (size_t)OP_LAYERS * OP_KV_HEADS * 2 * OP_HEAD_DIM * kvrt_dtype_size(b->dtype);
}

/* Tokens per sequence so that OP_SEQS sequences hold about b->size, a
 * multiple of the block size. */
static int32_t op_tokens_per_seq(bench *b)
{
    int64_t t = (int64_t)(b->size / op_token_bytes(b)) / OP_SEQS;
    t = t / OP_BLOCK * OP_BLOCK;
    return (int32_t)(t < OP_BLOCK ? OP_BLOCK : t);
}

static void op_shape_json(bench *b, char *buf, size_t n, const char *extra)
{
    (void)b;
    snprintf(buf, n, "{\"layers\":%d,\"kv_heads\":%d,\"head_dim\":%d,\"block_size\":%d%s%s}",
             OP_LAYERS, OP_KV_HEADS, OP_HEAD_DIM, OP_BLOCK, extra[0] ? "," : "", extra);
}

/* ------------------------------------------------------------------------ */
/* write and gather: every layer of every sequence, in one plan              */
/* ------------------------------------------------------------------------ */

typedef struct rw_ctx {
    kvrt_cache *cache;
    kvrt_batch *batch;
    int32_t     per_seq;
    buffer      k_src[OP_LAYERS], v_src[OP_LAYERS];  /* [seqs * per_seq][heads][dim] */
    buffer      k_dst[OP_LAYERS], v_dst[OP_LAYERS];  /* gather destinations */
} rw_ctx;

static void rw_setup(bench *b, rw_ctx *x, int with_dst)
{
    memset(x, 0, sizeof *x);
    kvrt_layer_desc layers[OP_LAYERS];
    op_layers(layers, OP_LAYERS);
    x->per_seq = op_tokens_per_seq(b);
    int32_t n = x->per_seq * OP_SEQS;
    x->cache = make_cache(b, b->dtype, layers, OP_LAYERS, OP_BLOCK, n / OP_BLOCK + OP_SEQS, OP_SEQS, 0);
    KV(kvrt_batch_create(x->cache, n, &x->batch));
    size_t elems = (size_t)n * OP_KV_HEADS * OP_HEAD_DIM;
    for (int l = 0; l < OP_LAYERS; l++) {
        x->k_src[l] = buffer_random(b, b->dtype, elems, 1000 + (uint64_t)l);
        x->v_src[l] = buffer_random(b, b->dtype, elems, 2000 + (uint64_t)l);
        if (with_dst) {
            x->k_dst[l] = buffer_empty(b, x->k_src[l].bytes);
            x->v_dst[l] = buffer_empty(b, x->v_src[l].bytes);
        }
    }
    /* one plan: sequence s holds positions [0, per_seq), in the sources'
     * row order (plans order tokens by sequence, then position) */
    int32_t *seqs = xmalloc(sizeof(int32_t) * (size_t)n), *pos = xmalloc(sizeof(int32_t) * (size_t)n);
    for (int32_t i = 0; i < n; i++) {
        seqs[i] = i / x->per_seq;
        pos[i] = i % x->per_seq;
    }
    KV(kvrt_batch_plan(x->cache, n, seqs, pos, x->batch));
    free(seqs);
    free(pos);
}

static void rw_teardown(bench *b, rw_ctx *x)
{
    for (int l = 0; l < OP_LAYERS; l++) {
        buffer_free(b, &x->k_src[l]);
        buffer_free(b, &x->v_src[l]);
        if (x->k_dst[l].dev != NULL) {
            buffer_free(b, &x->k_dst[l]);
            buffer_free(b, &x->v_dst[l]);
        }
    }
    kvrt_batch_destroy(x->batch);
    kvrt_cache_destroy(x->cache);
}

static void run_write(bench *b, void *ctx)
{
    (void)b;
    rw_ctx *x = ctx;
    for (int l = 0; l < OP_LAYERS; l++)
        KV(kvrt_write(x->cache, x->batch, l, x->k_src[l].dev, x->v_src[l].dev, b->dtype, NULL));
}

/* Every sequence's rows of layers 0 and the last equal their sources. */
static void rw_validate(bench *b, rw_ctx *x)
{
    size_t row = (size_t)OP_KV_HEADS * OP_HEAD_DIM * kvrt_dtype_size(b->dtype);
    for (int l = 0; l < OP_LAYERS; l += OP_LAYERS - 1)
        for (int32_t s = 0; s < OP_SEQS; s++) {
            rows r = gather_rows(x->cache, l, s, 0, -1);
            if (r.n != x->per_seq)
                die("validation: sequence %d holds %lld rows, expected %d", s, (long long)r.n,
                    x->per_seq);
            for (int64_t i = 0; i < r.n; i++)
                if (r.pos[i] != (int32_t)i)
                    die("validation: sequence %d row %lld at position %d", s, (long long)i, r.pos[i]);
            size_t at = (size_t)s * (size_t)x->per_seq * row;
            expect_bytes(r.k, (const char *)x->k_src[l].host + at, row * (size_t)r.n, "K");
            expect_bytes(r.v, (const char *)x->v_src[l].host + at, row * (size_t)r.n, "V");
            rows_free(&r);
        }
}

static void bench_write(bench *b)
{
    if (skip_quantized(b, "write"))
        return;
    rw_ctx x;
    rw_setup(b, &x, 0);
    run_write(b, &x);
    rw_validate(b, &x);
    double ms = time_op(b, run_write, NULL, &x);
    int64_t n = (int64_t)x.per_seq * OP_SEQS;
    double bytes = 2.0 * (double)n * (double)op_token_bytes(b); /* read sources, write slots */
    char extra[128], shape[256], text[96];
    snprintf(extra, sizeof extra, "\"seqs\":%d,\"tokens\":%lld", OP_SEQS, (long long)n);
    op_shape_json(b, shape, sizeof shape, extra);
    snprintf(text, sizeof text, "L%d H%d d%d, %lld tokens in %d seqs", OP_LAYERS, OP_KV_HEADS,
             OP_HEAD_DIM, (long long)n, OP_SEQS);
    report(b, "write", b->dtype, shape, text, ms, bytes, 0);
    rw_teardown(b, &x);
}

static void run_gather(bench *b, void *ctx)
{
    rw_ctx *x = ctx;
    size_t row = (size_t)OP_KV_HEADS * OP_HEAD_DIM * kvrt_dtype_size(b->dtype);
    for (int l = 0; l < OP_LAYERS; l++)
        for (int32_t s = 0; s < OP_SEQS; s++) {
            size_t at = (size_t)s * (size_t)x->per_seq * row;
            int64_t n;
            KV(kvrt_gather(x->cache, l, s, 0, -1, (char *)x->k_dst[l].dev + at,
                           (char *)x->v_dst[l].dev + at, NULL, x->per_seq, &n, NULL));
        }
}

static void bench_gather(bench *b)
{
    if (skip_quantized(b, "gather"))
        return;
    rw_ctx x;
    rw_setup(b, &x, 1);
    run_write(b, &x);
    run_gather(b, &x);
    for (int l = 0; l < OP_LAYERS; l++) {
        buffer_pull(b, &x.k_dst[l]);
        buffer_pull(b, &x.v_dst[l]);
        expect_bytes(x.k_dst[l].host, x.k_src[l].host, x.k_src[l].bytes, "gathered K");
        expect_bytes(x.v_dst[l].host, x.v_src[l].host, x.v_src[l].bytes, "gathered V");
    }
    double ms = time_op(b, run_gather, NULL, &x);
    int64_t n = (int64_t)x.per_seq * OP_SEQS;
    double bytes = 2.0 * (double)n * (double)op_token_bytes(b); /* read slots, write dst */
    char extra[128], shape[256], text[96];
    snprintf(extra, sizeof extra, "\"seqs\":%d,\"tokens\":%lld", OP_SEQS, (long long)n);
    op_shape_json(b, shape, sizeof shape, extra);
    snprintf(text, sizeof text, "L%d H%d d%d, %d seqs x %d rows", OP_LAYERS, OP_KV_HEADS,
             OP_HEAD_DIM, OP_SEQS, x.per_seq);
    report(b, "gather", b->dtype, shape, text, ms, bytes, 0);
    rw_teardown(b, &x);
}

/* ------------------------------------------------------------------------ */
/* shift: every sequence's positions move by +-16 and K is re-rotated        */
/* ------------------------------------------------------------------------ */

enum { SHIFT_POS0 = 4096, SHIFT_DELTA = 16 };

typedef struct shift_ctx {
    kvrt_cache *cache;
    int         sign;
} shift_ctx;

static void run_shift(bench *b, void *ctx)
{
    (void)b;
    shift_ctx *x = ctx;
    KV(kvrt_seq_shift(x->cache, -1, 0, -1, x->sign * SHIFT_DELTA));
    x->sign = -x->sign;
}

/* Rotation of pair i of n_rot dims (NORMAL style) by delta, in double. */
static void rope_reference(const float *in, double *out, int dim, int n_rot, int64_t delta)
{
    for (int d = 0; d < dim; d++)
        out[d] = in[d];
    for (int i = 0; i < n_rot / 2; i++) {
        double a = (double)delta * pow(10000.0, -2.0 * i / n_rot);
        double x = in[2 * i], y = in[2 * i + 1];
        out[2 * i] = x * cos(a) - y * sin(a);
        out[2 * i + 1] = x * sin(a) + y * cos(a);
    }
}

static void bench_shift(bench *b)
{
    if (skip_quantized(b, "shift"))
        return;
    kvrt_layer_desc layers[OP_LAYERS];
    op_layers(layers, OP_LAYERS);
    int32_t per_seq = op_tokens_per_seq(b);
    int n_blocks = per_seq * OP_SEQS / OP_BLOCK + OP_SEQS;
    shift_ctx x = {make_cache(b, b->dtype, layers, OP_LAYERS, OP_BLOCK, n_blocks, OP_SEQS,
                              OP_HEAD_DIM), 1};
    int max_tokens = 4096;
    kvrt_batch *batch;
    KV(kvrt_batch_create(x.cache, max_tokens, &batch));
    fill_source f = fill_source_make(b, x.cache, max_tokens);
    fill(x.cache, batch, max_tokens, &f, 0, OP_SEQS, SHIFT_POS0, per_seq, 1);

    /* validate: positions move, V stays, K turns by the reference rotation */
    const int dim = OP_KV_HEADS * OP_HEAD_DIM;
    rows before = gather_rows(x.cache, 3, 5, 0, -1);
    KV(kvrt_seq_shift(x.cache, -1, 0, -1, 37));
    rows after = gather_rows(x.cache, 3, 5, 0, -1);
    if (after.n != before.n)
        die("validation: shift changed the row count");
    float *in = xmalloc(sizeof(float) * OP_HEAD_DIM);
    double *ref = xmalloc(sizeof(double) * OP_HEAD_DIM), worst = 0;
    for (int64_t i = 0; i < after.n; i++) {
        if (after.pos[i] != before.pos[i] + 37)
            die("validation: shift: row %lld at position %d, expected %d", (long long)i,
                after.pos[i], before.pos[i] + 37);
        for (int h = 0; h < OP_KV_HEADS; h++) {
            int64_t base = i * dim + h * OP_HEAD_DIM;
            for (int d = 0; d < OP_HEAD_DIM; d++)
                in[d] = kvrt_load(before.k, b->dtype, base + d);
            rope_reference(in, ref, OP_HEAD_DIM, OP_HEAD_DIM, 37);
            for (int d = 0; d < OP_HEAD_DIM; d++) {
                /* f32 rotation of exact inputs, then one rounding to the
                 * cache dtype: within 1 ulp of the dtype at |ref| (2^-7 for
                 * bf16, 2^-10 for f16), plus f32 noise */
                double ulp = b->dtype == KVRT_BF16 ? 0x1p-7 : b->dtype == KVRT_F16 ? 0x1p-10 : 0x1p-20;
                double err = fabs(kvrt_load(after.k, b->dtype, base + d) - ref[d]) /
                             (ulp * (fabs(ref[d]) + 1e-3) + 1e-6);
                worst = err > worst ? err : worst;
            }
        }
    }
    if (worst > 1.0)
        die("validation: shifted K is off the reference rotation by %.2f of its bound", worst);
    expect_bytes(after.v, before.v, (size_t)after.n * dim * kvrt_dtype_size(b->dtype), "shifted V");
    KV(kvrt_seq_shift(x.cache, -1, 0, -1, -37));
    rows_free(&before);
    rows_free(&after);
    free(in);
    free(ref);

    double ms = time_op(b, run_shift, NULL, &x);
    int64_t n = (int64_t)per_seq * OP_SEQS;
    /* the rotated part of K (here all of it) is read and written; V is not touched */
    double bytes = 2.0 * (double)n * OP_LAYERS * OP_KV_HEADS * OP_HEAD_DIM * kvrt_dtype_size(b->dtype);
    char extra[160], shape[320], text[96];
    snprintf(extra, sizeof extra, "\"seqs\":%d,\"tokens\":%lld,\"n_rot\":%d,\"delta\":%d", OP_SEQS,
             (long long)n, OP_HEAD_DIM, SHIFT_DELTA);
    op_shape_json(b, shape, sizeof shape, extra);
    snprintf(text, sizeof text, "L%d H%d d%d rot%d, %lld tokens", OP_LAYERS, OP_KV_HEADS,
             OP_HEAD_DIM, OP_HEAD_DIM, (long long)n);
    report(b, "shift", b->dtype, shape, text, ms, bytes, 0);
    fill_source_free(b, &f);
    kvrt_batch_destroy(batch);
    kvrt_cache_destroy(x.cache);
}

/* ------------------------------------------------------------------------ */
/* plan: the host side of a decode step                                      */
/* ------------------------------------------------------------------------ */

/* A decode step of PLAN_SEQS sequences, each PLAN_CONTEXT tokens long: one
 * token each at its next position. Planning touches page tables and
 * positions, not K/V, so one small layer stands for any model (the work
 * does not grow with layers or heads: all self-attention layers share one
 * group's page tables). Every OP_BLOCK-th step appends a block to each
 * sequence; the median is the usual step. */
enum { PLAN_SEQS = 256, PLAN_CONTEXT = 1024, PLAN_HEAD_DIM = 64 };

typedef struct plan_ctx {
    kvrt_cache *cache;
    kvrt_batch *batch;
    int32_t     seqs[PLAN_SEQS], pos[PLAN_SEQS];
} plan_ctx;

static void run_plan(bench *b, void *ctx)
{
    (void)b;
    plan_ctx *x = ctx;
    KV(kvrt_batch_plan(x->cache, PLAN_SEQS, x->seqs, x->pos, x->batch));
}

static void next_positions(bench *b, void *ctx)
{
    (void)b;
    plan_ctx *x = ctx;
    for (int i = 0; i < PLAN_SEQS; i++)
        x->pos[i]++;
}

/* ---- with prefix caching ----
 * plan_prefix: the same decode step planned with token ids on a cache that
 * caches prefixes (a block's key is hashed for each sequence every
 * OP_BLOCK-th step). lookup: kvrt_seq_attach_prefix of a LOOKUP_TOKENS
 * prompt whose blocks are all cached (LOOKUP_TOKENS / OP_BLOCK keys hashed
 * and found, the blocks attached); the untimed reset removes the sequence
 * again. Both once per hash. */
enum { LOOKUP_TOKENS = 4096 };

typedef struct lookup_ctx {
    kvrt_cache *cache;
    int32_t    *tokens;
    int32_t     covered;
} lookup_ctx;

static void run_plan_tokens(bench *b, void *ctx)
{
    (void)b;
    plan_ctx *x = ctx;
    KV(kvrt_batch_plan_tokens(x->cache, PLAN_SEQS, x->seqs, x->pos, x->pos, PLAN_SEQS, x->batch));
}

static void run_lookup(bench *b, void *ctx)
{
    (void)b;
    lookup_ctx *x = ctx;
    KV(kvrt_seq_attach_prefix(x->cache, 1, x->tokens, LOOKUP_TOKENS, "bench", 5, &x->covered));
}

static void lookup_reset(bench *b, void *ctx)
{
    (void)b;
    lookup_ctx *x = ctx;
    KV(kvrt_seq_rm(x->cache, 1, 0, -1));
}

static kvrt_cache *make_prefix_cache(bench *b, kvrt_layer_desc *layer, int n_blocks, int max_seqs,
                                     int hash)
{
    kvrt_cache_desc d;
    kvrt_cache_desc_init(&d);
    d.device = b->device;
    d.dtype = b->dtype;
    d.layers = layer;
    d.n_layers = 1;
    d.block_size = OP_BLOCK;
    d.n_blocks = n_blocks;
    d.max_seqs = max_seqs;
    d.rope.n_rot = PLAN_HEAD_DIM;
    d.prefix_cache = hash;
    kvrt_cache *c;
    KV(kvrt_cache_create(&d, &c));
    return c;
}

static void bench_plan_prefix(bench *b, int hash)
{
    const char *hname = hash == KVRT_PREFIX_XXH3 ? "xxh3" : "blake2b";
    kvrt_layer_desc layer;
    memset(&layer, 0, sizeof layer);
    layer.kind = KVRT_LAYER_ATTN;
    layer.n_kv_heads = 1;
    layer.head_dim_k = layer.head_dim_v = PLAN_HEAD_DIM;
    const int steps = b->runs + 2;

    /* the decode step, token ids = positions */
    plan_ctx x;
    x.cache = make_prefix_cache(b, &layer, PLAN_SEQS * ((PLAN_CONTEXT + steps) / OP_BLOCK + 1),
                                PLAN_SEQS, hash);
    KV(kvrt_batch_create(x.cache, PLAN_SEQS, &x.batch));
    for (int i = 0; i < PLAN_SEQS; i++)
        x.seqs[i] = i;
    for (int32_t p = 0; p < PLAN_CONTEXT; p++) { /* every sequence PLAN_CONTEXT tokens long */
        for (int i = 0; i < PLAN_SEQS; i++)
            x.pos[i] = p;
        run_plan_tokens(b, &x);
    }
    for (int i = 0; i < PLAN_SEQS; i++)
        x.pos[i] = PLAN_CONTEXT - 1;
    double ms = time_op(b, run_plan_tokens, next_positions, &x);
    KV(kvrt_cache_check(x.cache));
    char shape[256], text[96], op[40];
    snprintf(shape, sizeof shape,
             "{\"seqs\":%d,\"context\":%d,\"new_tokens\":1,\"block_size\":%d,\"hash\":\"%s\"}",
             PLAN_SEQS, PLAN_CONTEXT, OP_BLOCK, hname);
    snprintf(text, sizeof text, "%d seqs x 1 token at ctx %d, p%d (%.1f us)", PLAN_SEQS,
             PLAN_CONTEXT, OP_BLOCK, ms * 1e3);
    snprintf(op, sizeof op, "plan_prefix_%s", hname);
    report(b, op, b->dtype, shape, text, ms, 0, 0);
    kvrt_batch_destroy(x.batch);
    kvrt_cache_destroy(x.cache);

    /* the lookup of a cached prompt */
    lookup_ctx L;
    L.cache = make_prefix_cache(b, &layer, 2 * LOOKUP_TOKENS / OP_BLOCK, 2, hash);
    L.tokens = xmalloc(sizeof(int32_t) * LOOKUP_TOKENS);
    int32_t *seqs = xmalloc(sizeof(int32_t) * LOOKUP_TOKENS), *pos = xmalloc(sizeof(int32_t) * LOOKUP_TOKENS);
    for (int i = 0; i < LOOKUP_TOKENS; i++) {
        L.tokens[i] = (int32_t)((i * 2654435761u) % 128000u);
        seqs[i] = 0;
        pos[i] = i;
    }
    kvrt_batch *batch;
    KV(kvrt_batch_create(L.cache, LOOKUP_TOKENS, &batch));
    KV(kvrt_seq_attach_prefix(L.cache, 0, L.tokens, 0, "bench", 5, &L.covered));
    KV(kvrt_batch_plan_tokens(L.cache, LOOKUP_TOKENS, seqs, pos, L.tokens, LOOKUP_TOKENS, batch));
    fill_source f = fill_source_make(b, L.cache, LOOKUP_TOKENS);
    fill_write(L.cache, batch, &f); /* every layer written: the keys are published */
    ms = time_op(b, run_lookup, lookup_reset, &L);
    if (L.covered != LOOKUP_TOKENS)
        die("validation: lookup (%s): %d of %d tokens found", hname, L.covered, LOOKUP_TOKENS);
    KV(kvrt_cache_check(L.cache));
    snprintf(shape, sizeof shape, "{\"tokens\":%d,\"block_size\":%d,\"hash\":\"%s\"}",
             LOOKUP_TOKENS, OP_BLOCK, hname);
    snprintf(text, sizeof text, "%d-token prompt, all cached, p%d (%.1f us)", LOOKUP_TOKENS,
             OP_BLOCK, ms * 1e3);
    snprintf(op, sizeof op, "lookup_%s", hname);
    report(b, op, b->dtype, shape, text, ms, 0, 0);
    fill_source_free(b, &f);
    kvrt_batch_destroy(batch);
    kvrt_cache_destroy(L.cache);
    free(L.tokens);
    free(seqs);
    free(pos);
}

static void bench_plan(bench *b)
{
    kvrt_layer_desc layer;
    memset(&layer, 0, sizeof layer);
    layer.kind = KVRT_LAYER_ATTN;
    layer.n_kv_heads = 1;
    layer.head_dim_k = layer.head_dim_v = PLAN_HEAD_DIM;
    const int steps = b->runs + 2, max_tokens = 4096;
    const int n_blocks = PLAN_SEQS * ((PLAN_CONTEXT + steps) / OP_BLOCK + 1);
    plan_ctx x;
    x.cache = make_cache(b, b->dtype, &layer, 1, OP_BLOCK, n_blocks, PLAN_SEQS, PLAN_HEAD_DIM);
    KV(kvrt_batch_create(x.cache, max_tokens, &x.batch));
    fill(x.cache, x.batch, max_tokens, NULL, 0, PLAN_SEQS, 0, PLAN_CONTEXT, 0);
    for (int i = 0; i < PLAN_SEQS; i++) {
        x.seqs[i] = i;
        x.pos[i] = PLAN_CONTEXT - 1; /* next_positions runs before each step */
    }

    double ms = time_op(b, run_plan, next_positions, &x);

    /* validate: each sequence ends at its last planned position, and the
     * cache's invariants hold */
    KV(kvrt_cache_check(x.cache));
    for (int i = 0; i < PLAN_SEQS; i++) {
        int32_t last;
        KV(kvrt_seq_pos_max(x.cache, i, &last));
        if (last != x.pos[i])
            die("validation: plan: sequence %d ends at %d, expected %d", i, last, x.pos[i]);
    }
    char shape[256], text[96];
    snprintf(shape, sizeof shape,
             "{\"seqs\":%d,\"context\":%d,\"new_tokens\":1,\"block_size\":%d}", PLAN_SEQS,
             PLAN_CONTEXT, OP_BLOCK);
    snprintf(text, sizeof text, "%d seqs x 1 token at ctx %d, p%d (%.1f us)", PLAN_SEQS,
             PLAN_CONTEXT, OP_BLOCK, ms * 1e3);
    report(b, "plan", b->dtype, shape, text, ms, 0, 0);
    kvrt_batch_destroy(x.batch);
    kvrt_cache_destroy(x.cache);
    bench_plan_prefix(b, KVRT_PREFIX_XXH3);
    bench_plan_prefix(b, KVRT_PREFIX_BLAKE2B);
}

/* ------------------------------------------------------------------------ */
/* copy: block copies of copy-on-write and of seq_cp boundary blocks        */
/* ------------------------------------------------------------------------ */

/* Sequences [0, n_pairs) are sources, [n_pairs, 2 n_pairs) their copies. */
typedef struct copy_ctx {
    kvrt_cache *cache;
    kvrt_batch *batch;
    int         n_pairs;
    int32_t     src_tokens;   /* tokens each source holds */
    int32_t    *seqs, *pos;   /* the first-write plan: one token per copy */
    buffer      k_new, v_new; /* its rows, every layer */
} copy_ctx;

/* cow: each copy is forked from its source (kvrt_seq_cp of everything,
 * which shares the source's one partly used block), then the first write
 * into it (a plan of one token per copy, then every layer's write) copies
 * the block. */
static void copy_fork(copy_ctx *x)
{
    for (int i = 0; i < x->n_pairs; i++)
        KV(kvrt_seq_cp(x->cache, i, x->n_pairs + i, 0, -1));
}

static void copy_first_write(bench *b, copy_ctx *x)
{
    KV(kvrt_batch_plan(x->cache, x->n_pairs, x->seqs, x->pos, x->batch));
    for (int l = 0; l < OP_LAYERS; l++)
        KV(kvrt_write(x->cache, x->batch, l, x->k_new.dev, x->v_new.dev, b->dtype, NULL));
}

static void run_copy_cow(bench *b, void *ctx)
{
    copy_fork(ctx);
    copy_first_write(b, ctx);
}

/* Removes the copies (between runs of both paths). */
static void reset_copies(bench *b, void *ctx)
{
    (void)b;
    copy_ctx *x = ctx;
    for (int i = 0; i < x->n_pairs; i++)
        KV(kvrt_seq_rm(x->cache, x->n_pairs + i, 0, -1));
}

/* seq_cp: each source holds one full block; copying the first half of its
 * positions copies the block (a boundary block). */
static void run_copy_seq_cp(bench *b, void *ctx)
{
    (void)b;
    copy_ctx *x = ctx;
    for (int i = 0; i < x->n_pairs; i++)
        KV(kvrt_seq_cp(x->cache, i, x->n_pairs + i, 0, OP_BLOCK / 2));
}

static void copy_setup(bench *b, copy_ctx *x, int32_t src_tokens, fill_source *f,
                       kvrt_batch **fill_batch)
{
    memset(x, 0, sizeof *x);
    size_t block_bytes = (size_t)OP_BLOCK * op_token_bytes(b);
    /* sources and copies: about b->size together */
    x->n_pairs = (int)(b->size / 2 / block_bytes);
    x->n_pairs = x->n_pairs < 4 ? 4 : x->n_pairs;
    x->src_tokens = src_tokens;
    kvrt_layer_desc layers[OP_LAYERS];
    op_layers(layers, OP_LAYERS);
    x->cache = make_cache(b, b->dtype, layers, OP_LAYERS, OP_BLOCK, 2 * x->n_pairs + 8,
                          2 * x->n_pairs, 0);
    KV(kvrt_batch_create(x->cache, x->n_pairs * OP_BLOCK, fill_batch));
    KV(kvrt_batch_create(x->cache, x->n_pairs, &x->batch));
    *f = fill_source_make(b, x->cache, x->n_pairs * OP_BLOCK);
    fill(x->cache, *fill_batch, x->n_pairs * OP_BLOCK, f, 0, x->n_pairs, 0, src_tokens, 1);
    x->seqs = xmalloc(sizeof(int32_t) * (size_t)x->n_pairs);
    x->pos = xmalloc(sizeof(int32_t) * (size_t)x->n_pairs);
    for (int i = 0; i < x->n_pairs; i++) {
        x->seqs[i] = x->n_pairs + i;
        x->pos[i] = src_tokens;
    }
    size_t elems = (size_t)x->n_pairs * OP_KV_HEADS * OP_HEAD_DIM;
    x->k_new = buffer_random(b, b->dtype, elems, 31);
    x->v_new = buffer_random(b, b->dtype, elems, 32);
}

static void copy_teardown(bench *b, copy_ctx *x, fill_source *f, kvrt_batch *fill_batch)
{
    buffer_free(b, &x->k_new);
    buffer_free(b, &x->v_new);
    free(x->seqs);
    free(x->pos);
    fill_source_free(b, f);
    kvrt_batch_destroy(fill_batch);
    kvrt_batch_destroy(x->batch);
    kvrt_cache_destroy(x->cache);
}

/* Copy i holds source i's rows [0, n) of every checked layer. */
static void copy_validate(bench *b, copy_ctx *x, int32_t n)
{
    size_t row = (size_t)OP_KV_HEADS * OP_HEAD_DIM * kvrt_dtype_size(b->dtype);
    for (int i = 0; i < x->n_pairs; i += x->n_pairs / 4 > 0 ? x->n_pairs / 4 : 1)
        for (int l = 0; l < OP_LAYERS; l += OP_LAYERS - 1) {
            rows src = gather_rows(x->cache, l, i, 0, n), dst = gather_rows(x->cache, l, x->n_pairs + i, 0, n);
            if (src.n != n || dst.n != n)
                die("validation: copy %d holds %lld rows of [0, %d), source %lld", i,
                    (long long)dst.n, n, (long long)src.n);
            expect_bytes(dst.pos, src.pos, sizeof(int32_t) * (size_t)n, "copied positions");
            expect_bytes(dst.k, src.k, row * (size_t)n, "copied K");
            expect_bytes(dst.v, src.v, row * (size_t)n, "copied V");
            rows_free(&src);
            rows_free(&dst);
        }
}

static void bench_copy(bench *b)
{
    if (skip_quantized(b, "copy"))
        return;
    size_t block_bytes = (size_t)OP_BLOCK * op_token_bytes(b);
    size_t row_bytes = op_token_bytes(b);
    char extra[160], shape[320], text[96];
    fill_source f;
    kvrt_batch *fill_batch;

    /* copy-on-write through a plan */
    copy_ctx x;
    copy_setup(b, &x, OP_BLOCK / 2, &f, &fill_batch);
    copy_fork(&x);
    kvrt_cache_stats st;
    KV(kvrt_cache_stats_get(x.cache, -1, &st));
    if (st.blocks_shared != x.n_pairs)
        die("validation: %lld shared blocks after the forks, expected %d",
            (long long)st.blocks_shared, x.n_pairs);
    copy_first_write(b, &x);
    KV(kvrt_cache_stats_get(x.cache, -1, &st));
    if (st.blocks_shared != 0)
        die("validation: %lld blocks still shared after the first writes", (long long)st.blocks_shared);
    copy_validate(b, &x, x.src_tokens);
    double ms = time_op(b, run_copy_cow, reset_copies, &x);
    /* each copy reads and writes a whole block; each new row is read and written */
    double bytes = 2.0 * x.n_pairs * (double)block_bytes + 2.0 * x.n_pairs * (double)row_bytes;
    snprintf(extra, sizeof extra, "\"path\":\"seq_cp_then_write\",\"blocks\":%d,\"block_mib\":%.3f",
             x.n_pairs, (double)block_bytes / MIB);
    op_shape_json(b, shape, sizeof shape, extra);
    snprintf(text, sizeof text, "fork + first write: %d COW blocks of %zu KiB", x.n_pairs, block_bytes >> 10);
    report(b, "copy", b->dtype, shape, text, ms, bytes, 0);
    copy_teardown(b, &x, &f, fill_batch);

    /* seq_cp of a range that splits each source's block */
    copy_setup(b, &x, OP_BLOCK, &f, &fill_batch);
    run_copy_seq_cp(b, &x);
    KV(kvrt_cache_stats_get(x.cache, -1, &st));
    if (st.blocks_shared != 0 || st.blocks_used != 2 * x.n_pairs)
        die("validation: seq_cp of half blocks: %lld used, %lld shared (expected %d, 0)",
            (long long)st.blocks_used, (long long)st.blocks_shared, 2 * x.n_pairs);
    copy_validate(b, &x, OP_BLOCK / 2);
    ms = time_op(b, run_copy_seq_cp, reset_copies, &x);
    bytes = 2.0 * x.n_pairs * (double)block_bytes;
    snprintf(extra, sizeof extra, "\"path\":\"seq_cp_boundary\",\"blocks\":%d,\"block_mib\":%.3f",
             x.n_pairs, (double)block_bytes / MIB);
    op_shape_json(b, shape, sizeof shape, extra);
    snprintf(text, sizeof text, "seq_cp: %d boundary blocks of %zu KiB", x.n_pairs, block_bytes >> 10);
    report(b, "copy", b->dtype, shape, text, ms, bytes, 0);
    copy_teardown(b, &x, &f, fill_batch);
}

/* ------------------------------------------------------------------------ */
/* compact: half of every block is a hole                                     */
/* ------------------------------------------------------------------------ */

enum { COMPACT_HIGH = 1 << 24 };

typedef struct compact_ctx {
    kvrt_cache *cache;
    kvrt_batch *batch;
    fill_source f;
    int         max_tokens;
    int32_t     blocks_per_seq;
} compact_ctx;

/* Block j of every sequence holds positions [8j, 8j + 8) in its first half
 * and HIGH + [8j, 8j + 8) in its second; removing [HIGH, end) leaves a hole
 * in the second half of every block. */
static void compact_layout(compact_ctx *x, int write)
{
    const int half = OP_BLOCK / 2;
    KV(kvrt_seq_rm(x->cache, -1, 0, -1));
    for (int32_t j = 0; j < x->blocks_per_seq; j++) {
        fill(x->cache, x->batch, x->max_tokens, &x->f, 0, OP_SEQS, j * half, half, write);
        fill(x->cache, x->batch, x->max_tokens, &x->f, 0, OP_SEQS, COMPACT_HIGH + j * half, half, write);
    }
    KV(kvrt_seq_rm(x->cache, -1, COMPACT_HIGH, -1));
}

static void reset_compact(bench *b, void *ctx)
{
    (void)b;
    compact_layout(ctx, 0);
}

static void run_compact(bench *b, void *ctx)
{
    (void)b;
    compact_ctx *x = ctx;
    KV(kvrt_cache_compact(x->cache));
}

static void bench_compact(bench *b)
{
    if (skip_quantized(b, "compact"))
        return;
    compact_ctx x;
    memset(&x, 0, sizeof x);
    kvrt_layer_desc layers[OP_LAYERS];
    op_layers(layers, OP_LAYERS);
    x.blocks_per_seq = op_tokens_per_seq(b) / OP_BLOCK;
    x.blocks_per_seq = x.blocks_per_seq < 2 ? 2 : x.blocks_per_seq;
    x.cache = make_cache(b, b->dtype, layers, OP_LAYERS, OP_BLOCK, x.blocks_per_seq * OP_SEQS + OP_SEQS,
                         OP_SEQS, 0);
    x.max_tokens = OP_SEQS * OP_BLOCK;
    KV(kvrt_batch_create(x.cache, x.max_tokens, &x.batch));
    x.f = fill_source_make(b, x.cache, x.max_tokens);
    compact_layout(&x, 1);

    kvrt_cache_stats st;
    KV(kvrt_cache_stats_get(x.cache, -1, &st));
    const int half = OP_BLOCK / 2;
    int64_t live = (int64_t)OP_SEQS * x.blocks_per_seq * half;
    if (st.slots_live != live || st.holes != live - OP_SEQS * half)
        die("validation: before compaction %lld live, %lld holes", (long long)st.slots_live,
            (long long)st.holes);
    rows before[2][2], after;
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++)
            before[i][j] = gather_rows(x.cache, i * (OP_LAYERS - 1), j * (OP_SEQS - 1), 0, -1);
    run_compact(b, &x);
    KV(kvrt_cache_stats_get(x.cache, -1, &st));
    int64_t blocks_after = (int64_t)OP_SEQS * ((x.blocks_per_seq * half + OP_BLOCK - 1) / OP_BLOCK);
    if (st.holes != 0 || st.slots_live != live || st.blocks_used != blocks_after)
        die("validation: after compaction %lld live, %lld holes, %lld blocks used",
            (long long)st.slots_live, (long long)st.holes, (long long)st.blocks_used);
    size_t row = (size_t)OP_KV_HEADS * OP_HEAD_DIM * kvrt_dtype_size(b->dtype);
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++) {
            after = gather_rows(x.cache, i * (OP_LAYERS - 1), j * (OP_SEQS - 1), 0, -1);
            if (after.n != before[i][j].n)
                die("validation: compaction changed a sequence's row count");
            expect_bytes(after.pos, before[i][j].pos, sizeof(int32_t) * (size_t)after.n, "positions");
            expect_bytes(after.k, before[i][j].k, row * (size_t)after.n, "compacted K");
            expect_bytes(after.v, before[i][j].v, row * (size_t)after.n, "compacted V");
            rows_free(&after);
            rows_free(&before[i][j]);
        }
    KV(kvrt_cache_check(x.cache));

    /* moved rows: the live slots at or past a sequence's live count */
    int64_t moved = 0, per_seq_live = (int64_t)x.blocks_per_seq * half;
    for (int32_t j = 0; j < x.blocks_per_seq; j++)
        for (int k = 0; k < half; k++)
            moved += (int64_t)j * OP_BLOCK + k >= per_seq_live;
    moved *= OP_SEQS;

    double ms = time_op(b, run_compact, reset_compact, &x);
    double bytes = 2.0 * (double)moved * (double)op_token_bytes(b);
    char extra[160], shape[320], text[96];
    snprintf(extra, sizeof extra, "\"seqs\":%d,\"blocks\":%d,\"holes_per_block\":%d,\"rows_moved\":%lld",
             OP_SEQS, OP_SEQS * x.blocks_per_seq, half, (long long)moved);
    op_shape_json(b, shape, sizeof shape, extra);
    snprintf(text, sizeof text, "%d blocks half holes, %lld rows moved", OP_SEQS * x.blocks_per_seq,
             (long long)moved);
    report(b, "compact", b->dtype, shape, text, ms, bytes, 0);
    fill_source_free(b, &x.f);
    kvrt_batch_destroy(x.batch);
    kvrt_cache_destroy(x.cache);
}

/* ------------------------------------------------------------------------ */
/* attention                                                                 */
/* ------------------------------------------------------------------------ */

typedef struct attn_shape {
    const char *op;       /* attention_decode, attention_prefill, attention_mla */
    int         mla;
    int         n_q_heads, n_kv_heads, head_dim;     /* ATTN */
    int         latent_dim, rope_dim;                /* MLA */
    int         block_size;
    int         batch;     /* sequences */
    int32_t     context;   /* cached tokens per sequence before the step */
    int32_t     new_tokens;/* tokens per sequence in the step (1: decode) */
} attn_shape;

typedef struct attn_ctx {
    const attn_shape     *shape;
    kvrt_cache           *cache;
    kvrt_batch           *batch;
    int                   n_layers;
    kvrt_attention_params params;
    buffer                q, out;  /* [tokens][n_q_heads][dim] */
} attn_ctx;

static void run_attention(bench *b, void *ctx)
{
    (void)b;
    attn_ctx *x = ctx;
    for (int l = 0; l < x->n_layers; l++)
        KV(kvrt_attention(x->cache, x->batch, l, x->q.dev, x->out.dev, &x->params, NULL));
}

/* Worst error of token t's output (already in x->out.host) against attention
 * in double over the gathered rows, in units of its bound. */
static double attention_check(attn_ctx *x, int layer, int32_t seq, int32_t qpos, int t)
{
    const attn_shape *sh = x->shape;
    kvrt_dtype cache_dtype = kvrt_cache_get_desc(x->cache)->dtype;
    kvrt_dtype dtype = src_dtype_of(cache_dtype), rd = rows_dtype_of(cache_dtype);
    rows r = gather_rows(x->cache, layer, seq, 0, qpos + 1);
    int dk = sh->mla ? sh->latent_dim + sh->rope_dim : sh->head_dim;
    int dv = sh->mla ? sh->latent_dim : sh->head_dim;
    int kv_heads = sh->mla ? 1 : sh->n_kv_heads, group = sh->n_q_heads / kv_heads;
    double scale = 1.0 / sqrt((double)dk), worst = 0;
    double *logit = xmalloc(sizeof(double) * (size_t)(r.n + 1)), *ref = xmalloc(sizeof(double) * (size_t)dv);
    for (int h = 0; h < sh->n_q_heads; h++) {
        int kvh = h / group;
        const int64_t qat = ((int64_t)t * sh->n_q_heads + h) * dk;
        double most = -INFINITY, sum = 0;
        for (int64_t j = 0; j < r.n; j++) {
            double s = 0;
            for (int d = 0; d < dk; d++)
                s += (double)kvrt_load(x->q.host, dtype, qat + d) *
                     kvrt_load(r.k, rd, (j * kv_heads + kvh) * dk + d);
            logit[j] = s * scale;
            most = logit[j] > most ? logit[j] : most;
        }
        for (int d = 0; d < dv; d++)
            ref[d] = 0;
        for (int64_t j = 0; j < r.n; j++) {
            double w = exp(logit[j] - most);
            sum += w;
            for (int d = 0; d < dv; d++)
                ref[d] += w * (sh->mla ? kvrt_load(r.k, rd, j * dk + d)
                                       : kvrt_load(r.v, rd, (j * kv_heads + kvh) * dv + d));
        }
        /* f32 accumulation over up to 32k keys and one rounding of the
         * output to the cache dtype: 1 ulp of the dtype plus 1e-4 */
        double ulp = dtype == KVRT_BF16 ? 0x1p-7 : dtype == KVRT_F16 ? 0x1p-10 : 0x1p-20;
        for (int d = 0; d < dv; d++) {
            double want = ref[d] / sum;
            double got = kvrt_load(x->out.host, dtype, ((int64_t)t * sh->n_q_heads + h) * dv + d);
            double err = fabs(got - want) / (ulp * fabs(want) + 1e-4);
            worst = err > worst ? err : worst;
        }
    }
    free(logit);
    free(ref);
    rows_free(&r);
    return worst;
}

/* ------------------------------------------------------------------------ */
/* attention: the cuBLAS dense baseline (baseline.h; CUDA only)              */
/* ------------------------------------------------------------------------ */

/* Sets the baseline's members of the next report: "vs_baseline" null with
 * "baseline_note" saying why. */
static void baseline_none(bench *b, const char *why)
{
    snprintf(b->row_extra, sizeof b->row_extra,
             ",\"baseline\":null,\"vs_baseline\":null,\"baseline_note\":\"%s\"", why);
    snprintf(b->row_note, sizeof b->row_note, "no baseline");
}

#ifdef KVRT_BENCH_CUBLAS
typedef struct baseline_ctx {
    bench_baseline *bl;
    const void     *q;
    void           *out;
} baseline_ctx;

static void run_baseline(bench *b, void *ctx)
{
    (void)b;
    baseline_ctx *x = ctx;
    if (bench_baseline_run(x->bl, x->q, x->out) != 0)
        die("%s", bench_baseline_error());
}

/* The baseline's output (host) against kvrt's for the same layer, every
 * element; returns the worst error in units of its bound. Both are within
 * reach of o, the exact attention of the rounded inputs (|q|, |k|, |v| <= 1;
 * u the unit roundoff of the cache dtype, 2^-11 f16, 2^-8 bf16):
 *   kvrt:     |kvrt - o| <= 2u |o| + 1e-4         (attention_check's bound)
 *   baseline: logits from f32 sums of dk exact products, scaled by
 *             1/sqrt(dk): off by at most d = dk * 2^-24 * dk / sqrt(dk);
 *             the weights then by a factor within e^(+-2d), the output by
 *             <= 2.1 d max|v|; exp and normalization in f32: <= 8 * 2^-24;
 *             P rounded to the dtype: <= u * sum p |v| <= u; the P V sums
 *             in f32 over n keys: <= n * 2^-24 * sum p |v|; the output
 *             rounded: <= u |o|.
 * With |o| ~ |kvrt| (the difference is within the 1e-4 term):
 *   |baseline - kvrt| <= 3u |kvrt| + u + 1e-4 + (2.1 dk^1.5 + n + 8) 2^-24. */
static double baseline_error(const void *base, const void *kvrt, kvrt_dtype dtype, int64_t n,
                             int dk, int keys)
{
    double u = dtype == KVRT_BF16 ? 0x1p-8 : 0x1p-11, worst = 0;
    double floor = u + 1e-4 + (2.1 * pow(dk, 1.5) + keys + 8) * 0x1p-24;
    for (int64_t i = 0; i < n; i++) {
        double want = kvrt_load(kvrt, dtype, i), got = kvrt_load(base, dtype, i);
        double err = fabs(got - want) / (3 * u * fabs(want) + floor);
        if (!(err <= worst)) /* NaN counts as the worst */
            worst = isnan(err) ? INFINITY : err;
    }
    return worst;
}

/* Gathers every layer and sequence of x's cache into a baseline; NULL with
 * the reason in *why when it cannot be built (device memory, mostly). */
static bench_baseline *baseline_build(bench *b, attn_ctx *x, kvrt_dtype dtype, char *why,
                                      size_t why_n)
{
    const attn_shape *sh = x->shape;
    int32_t total = sh->context + sh->new_tokens;
    bench_baseline_shape s = {dtype == KVRT_BF16, x->n_layers, sh->batch,
                              sh->mla ? 1 : sh->n_kv_heads, 0, sh->new_tokens, total,
                              sh->mla ? sh->latent_dim + sh->rope_dim : sh->head_dim,
                              sh->mla ? sh->latent_dim : sh->head_dim, sh->mla, sh->context};
    s.group = sh->n_q_heads / s.kv_heads;
    bench_baseline *bl;
    if (bench_baseline_create(&s, &bl) != 0) {
        snprintf(why, why_n, "%s", bench_baseline_error());
        return NULL;
    }
    const kvrt_cache_desc *d = kvrt_cache_get_desc(x->cache);
    size_t kb = (size_t)total * k_row_bytes(&d->layers[0], dtype);
    size_t vb = (size_t)total * v_row_bytes(&d->layers[0], dtype);
    void *k = devmem_alloc(b->device, kb), *v = vb > 0 ? devmem_alloc(b->device, vb) : NULL;
    int32_t *pos = xmalloc(sizeof(int32_t) * (size_t)total);
    int ok = k != NULL && (vb == 0 || v != NULL);
    if (!ok)
        snprintf(why, why_n, "baseline: no device memory for a sequence's rows");
    for (int l = 0; ok && l < x->n_layers; l++)
        for (int q = 0; ok && q < sh->batch; q++) {
            int64_t n;
            int first = l == 0 && q == 0;
            KV(kvrt_gather(x->cache, l, q, 0, total, k, v, first ? pos : NULL, total, &n, NULL));
            if (n != total)
                die("baseline: layer %d sequence %d has %lld rows, not %d", l, q, (long long)n, total);
            for (int32_t j = 0; first && j < total; j++)
                if (pos[j] != j)
                    die("baseline: row %d is at position %d, not %d", j, pos[j], j);
            if (bench_baseline_load(bl, l, q, k, v) != 0) {
                snprintf(why, why_n, "%s", bench_baseline_error());
                ok = 0;
            }
        }
    free(pos);
    devmem_free(b->device, k);
    devmem_free(b->device, v);
    if (!ok) {
        bench_baseline_destroy(bl);
        return NULL;
    }
    return bl;
}
#endif

/* The dense baseline of x's attention, after kvrt's was timed (kvrt_ms):
 * timed as kvrt was, then its output checked against kvrt's of the last
 * layer (a time from a wrong result stops the bench before it is reported);
 * sets the next report's "baseline", "baseline_ms" and "vs_baseline"
 * (baseline time / kvrt time: > 1 when kvrt is faster). GPU backends only. */
static void attention_baseline(bench *b, attn_ctx *x, double kvrt_ms)
{
    kvrt_dtype dtype = kvrt_cache_get_desc(x->cache)->dtype;
    if (b->device.backend == KVRT_BACKEND_CPU)
        return;
    if (b->device.backend == KVRT_BACKEND_HIP) {
        baseline_none(b, "no baseline on HIP: hipBLAS is not packaged");
        return;
    }
    if (dtype != KVRT_F16 && dtype != KVRT_BF16) {
        baseline_none(b, "the cuBLAS baseline takes f16 and bf16 caches");
        return;
    }
#ifndef KVRT_BENCH_CUBLAS
    (void)kvrt_ms;
    baseline_none(b, "this kvrt-bench was built without cuBLAS");
#else
    char why[200];
    bench_baseline *bl = baseline_build(b, x, dtype, why, sizeof why);
    if (bl == NULL) {
        baseline_none(b, why);
        return;
    }
    baseline_ctx c = {bl, x->q.dev, NULL};
    buffer out = buffer_empty(b, x->out.bytes);
    c.out = out.dev;
    double copy_gbps = b->copy_gbps, read_gbps = b->read_gbps; /* kvrt's run's */
    double ms = time_op(b, run_baseline, NULL, &c);
    b->copy_gbps = copy_gbps;
    b->read_gbps = read_gbps;
    buffer_pull(b, &out); /* the last timed run's */
    KV(kvrt_attention(x->cache, x->batch, x->n_layers - 1, x->q.dev, x->out.dev, &x->params, NULL));
    buffer_pull(b, &x->out);
    const attn_shape *sh = x->shape;
    int dk = sh->mla ? sh->latent_dim + sh->rope_dim : sh->head_dim;
    double worst = baseline_error(out.host, x->out.host, dtype,
                                  (int64_t)(x->out.bytes / kvrt_dtype_size(dtype)), dk,
                                  sh->context + sh->new_tokens);
    if (worst > 1.0)
        die("validation: the cuBLAS baseline of %s is off kvrt's output by %.2f of its bound",
            sh->op, worst);
    snprintf(b->row_extra, sizeof b->row_extra,
             ",\"baseline\":\"cublas\",\"baseline_ms\":%.4f,\"vs_baseline\":%.4f,"
             "\"baseline_check\":%.3f",
             ms, ms / kvrt_ms, worst);
    snprintf(b->row_note, sizeof b->row_note, "cuBLAS %.3f ms, x%.2f", ms, ms / kvrt_ms);
    buffer_free(b, &out);
    bench_baseline_destroy(bl);
#endif
}

static void bench_attention_shape(bench *b, const attn_shape *sh)
{
    kvrt_dtype dtype = sh->mla ? b->mla_dtype : b->dtype;
    if (kvrt_dtype_is_quantized(dtype) && (sh->mla || sh->new_tokens > 1)) {
        skip(b, sh->op, "quantized caches: attention_decode only");
        return;
    }
    kvrt_dtype io = src_dtype_of(dtype); /* q, out and the rows written */
    size_t es = kvrt_dtype_size(io);
    kvrt_layer_desc token_layer;
    memset(&token_layer, 0, sizeof token_layer);
    token_layer.kind = KVRT_LAYER_ATTN;
    token_layer.n_kv_heads = sh->n_kv_heads;
    token_layer.head_dim_k = token_layer.head_dim_v = sh->head_dim;
    /* cache bytes of a token: elements (and scales, quantized) */
    size_t token_bytes = sh->mla ? (size_t)(sh->latent_dim + sh->rope_dim) * kvrt_dtype_size(dtype)
                                 : kvrt_layer_row_bytes(&token_layer, dtype);
    int32_t total = sh->context + sh->new_tokens;
    double layer_bytes = (double)sh->batch * total * (double)token_bytes;
    /* decode is memory-bound: enough layers that a step reads at least the
     * size asked for, as a model's step does; prefill and MLA are bound by
     * arithmetic and use one layer */
    int n_layers = 1;
    if (!sh->mla && sh->new_tokens == 1) {
        n_layers = (int)ceil((double)b->size / layer_bytes);
        n_layers = n_layers < 1 ? 1 : n_layers > 256 ? 256 : n_layers;
    }
    kvrt_layer_desc *layers = xmalloc(sizeof(kvrt_layer_desc) * (size_t)n_layers);
    for (int l = 0; l < n_layers; l++) {
        memset(&layers[l], 0, sizeof layers[l]);
        if (sh->mla) {
            layers[l].kind = KVRT_LAYER_MLA;
            layers[l].latent_dim = sh->latent_dim;
            layers[l].rope_dim = sh->rope_dim;
        } else {
            layers[l].kind = KVRT_LAYER_ATTN;
            layers[l].n_kv_heads = sh->n_kv_heads;
            layers[l].head_dim_k = layers[l].head_dim_v = sh->head_dim;
        }
    }
    int blocks_per_seq = (total + sh->block_size - 1) / sh->block_size;
    attn_ctx x;
    memset(&x, 0, sizeof x);
    x.shape = sh;
    x.n_layers = n_layers;
    x.cache = make_cache(b, dtype, layers, n_layers, sh->block_size, sh->batch * (blocks_per_seq + 1),
                         sh->batch, 0);
    free(layers);
    int max_tokens = 8192 > sh->batch * sh->new_tokens ? 8192 : sh->batch * sh->new_tokens;
    KV(kvrt_batch_create(x.cache, max_tokens, &x.batch));
    fill_source f = fill_source_make(b, x.cache, max_tokens);
    if (sh->context > 0)
        fill(x.cache, x.batch, max_tokens, &f, 0, sh->batch, 0, sh->context, 1);
    fill(x.cache, x.batch, max_tokens, &f, 0, sh->batch, sh->context, sh->new_tokens, 1);

    int n_tokens = sh->batch * sh->new_tokens;
    int dk = sh->mla ? sh->latent_dim + sh->rope_dim : sh->head_dim;
    int dv = sh->mla ? sh->latent_dim : sh->head_dim;
    x.q = buffer_random(b, io, (size_t)n_tokens * sh->n_q_heads * dk, 77);
    x.out = buffer_empty(b, (size_t)n_tokens * sh->n_q_heads * dv * es);
    x.params.n_q_heads = sh->n_q_heads;
    x.params.q_dtype = io;
    x.params.out_dtype = io;

    /* validate: the first and last sequence's first and last new token, in
     * the first and last layer */
    kvrt_status st = kvrt_attention(x.cache, x.batch, 0, x.q.dev, x.out.dev, &x.params, NULL);
    if (st == KVRT_ERR_UNSUPPORTED) {
        skip(b, sh->op, kvrt_last_error());
    } else {
        KV(st);
        double worst = 0;
        for (int pass = 0; pass < 2; pass++) {
            int layer = pass == 0 ? 0 : n_layers - 1;
            if (pass == 1) {
                if (n_layers == 1)
                    break;
                KV(kvrt_attention(x.cache, x.batch, layer, x.q.dev, x.out.dev, &x.params, NULL));
            }
            buffer_pull(b, &x.out);
            for (int s = 0; s < sh->batch; s += sh->batch > 1 ? sh->batch - 1 : 1)
                for (int i = 0; i < sh->new_tokens; i += sh->new_tokens > 1 ? sh->new_tokens - 1 : 1) {
                    /* plans order tokens by sequence, then position */
                    double e = attention_check(&x, layer, s, sh->context + i, s * sh->new_tokens + i);
                    worst = e > worst ? e : worst;
                }
        }
        if (worst > 1.0)
            die("validation: %s output is off the double-precision reference by %.2f of its bound",
                sh->op, worst);
        double ms = time_op(b, run_attention, NULL, &x);
        /* K and V read once, q read, out written */
        double bytes = n_layers * (layer_bytes + (double)n_tokens * sh->n_q_heads * (dk + dv) * es);
        double visible = 0; /* keys seen, summed over the step's tokens (causal) */
        for (int32_t i = 0; i < sh->new_tokens; i++)
            visible += (double)sh->context + i + 1;
        double flops = (double)n_layers * sh->batch * visible * sh->n_q_heads * 2.0 * (dk + dv);
        char shape[320], text[96];
        if (sh->mla)
            snprintf(shape, sizeof shape,
                     "{\"q_heads\":%d,\"latent_dim\":%d,\"rope_dim\":%d,\"block_size\":%d,"
                     "\"batch\":%d,\"context\":%d,\"new_tokens\":%d,\"layers\":%d}",
                     sh->n_q_heads, sh->latent_dim, sh->rope_dim, sh->block_size, sh->batch,
                     total, sh->new_tokens, n_layers);
        else
            snprintf(shape, sizeof shape,
                     "{\"q_heads\":%d,\"kv_heads\":%d,\"head_dim\":%d,\"block_size\":%d,"
                     "\"batch\":%d,\"context\":%d,\"new_tokens\":%d,\"layers\":%d}",
                     sh->n_q_heads, sh->n_kv_heads, sh->head_dim, sh->block_size, sh->batch,
                     total, sh->new_tokens, n_layers);
        if (sh->mla)
            snprintf(text, sizeof text, "%dq %d+%d p%d, b%d x ctx %d, L%d", sh->n_q_heads,
                     sh->latent_dim, sh->rope_dim, sh->block_size, sh->batch, total, n_layers);
        else if (sh->new_tokens == 1)
            snprintf(text, sizeof text, "%dq/%dkv d%d p%d, b%d x ctx %d, L%d", sh->n_q_heads,
                     sh->n_kv_heads, sh->head_dim, sh->block_size, sh->batch, total, n_layers);
        else
            snprintf(text, sizeof text, "%dq/%dkv d%d p%d, %d new on ctx %d", sh->n_q_heads,
                     sh->n_kv_heads, sh->head_dim, sh->block_size, sh->new_tokens, sh->context);
        attention_baseline(b, &x, ms);
        report(b, sh->op, dtype, shape, text, ms, bytes, flops);
    }
    buffer_free(b, &x.q);
    buffer_free(b, &x.out);
    fill_source_free(b, &f);
    kvrt_batch_destroy(x.batch);
    kvrt_cache_destroy(x.cache);
}

static attn_shape decode_shape(int batch, int32_t context)
{
    attn_shape s = {"attention_decode", 0, 32, 8, 128, 0, 0, 16, batch, context - 1, 1};
    return s;
}

static void bench_attention_decode(bench *b)
{
    /* Llama-3-8B heads, page 16. GPUs: batch 1..256 x context 1k..32k; the
     * CPU takes a subset that runs in seconds, kvrt-sim a smaller one. */
    static const int gpu_batch[] = {1, 16, 64, 256}, cpu_batch[] = {1, 4, 16},
                     quick_batch[] = {1, 4}, sim_batch[] = {1, 4};
    static const int32_t gpu_ctx[] = {1024, 4096, 16384, 32768}, cpu_ctx[] = {1024, 4096, 16384},
                         quick_ctx[] = {1024, 4096}, sim_ctx[] = {1024};
    const int *bs;
    const int32_t *cs;
    int nb, nc;
    if (b->quick && b->sim) { /* kvrt-sim: the GPU path runs, slowly */
        bs = sim_batch, nb = 2, cs = sim_ctx, nc = 1;
    } else if (b->quick) {
        bs = quick_batch, nb = 2, cs = quick_ctx, nc = 2;
    } else if (b->device.backend == KVRT_BACKEND_CPU) {
        bs = cpu_batch, nb = 3, cs = cpu_ctx, nc = 3;
    } else {
        bs = gpu_batch, nb = 4, cs = gpu_ctx, nc = 4;
    }
    for (int i = 0; i < nb; i++)
        for (int j = 0; j < nc; j++) {
            attn_shape s = decode_shape(bs[i], cs[j]);
            bench_attention_shape(b, &s);
        }
    if (!b->quick && b->device.backend == KVRT_BACKEND_CPU) {
        attn_shape s = decode_shape(1, 32768);
        bench_attention_shape(b, &s);
    }
}

static void bench_attention_prefill(bench *b)
{
    /* one sequence: a chunk of new tokens over a cached context. GPUs:
     * prompts of 1k and 8k tokens at the Llama-3-8B shape (the tensor-core
     * kernel); the CPU a chunk of 512 and one of 256 over 2k cached */
    attn_shape s = {"attention_prefill", 0, 32, 8, 128, 0, 0, 16, 1, 0, 512};
    if (b->quick) {
        s.new_tokens = 128;
        bench_attention_shape(b, &s);
        return;
    }
    if (b->device.backend != KVRT_BACKEND_CPU) {
        s.new_tokens = 1024;
        bench_attention_shape(b, &s);
        s.new_tokens = 8192;
        bench_attention_shape(b, &s);
        return;
    }
    bench_attention_shape(b, &s);
    s.context = 2048;
    s.new_tokens = 256;
    bench_attention_shape(b, &s);
}

static void bench_attention_mla(bench *b)
{
    /* DeepSeek-V3: 128 query heads over one latent row of 512 + 64, page 64 */
    attn_shape s = {"attention_mla", 1, 128, 0, 0, 512, 64, 64, 1, 4095, 1};
    if (b->quick) {
        s.n_q_heads = 16;
        s.context = 1023;
        bench_attention_shape(b, &s);
        return;
    }
    if (b->device.backend != KVRT_BACKEND_CPU) {
        /* GPUs (the tensor-core MLA kernel): bf16, batch 16..128 x context
         * 4k and 16k */
        static const int gpu_batch[] = {16, 64, 128};
        static const int32_t gpu_ctx[] = {4096, 16384};
        for (int i = 0; i < 3; i++)
            for (int j = 0; j < 2; j++) {
                s.batch = gpu_batch[i];
                s.context = gpu_ctx[j] - 1;
                bench_attention_shape(b, &s);
            }
        return;
    }
    bench_attention_shape(b, &s);
}

/* ------------------------------------------------------------------------ */
/* main                                                                      */
/* ------------------------------------------------------------------------ */

static void usage(FILE *to)
{
    fprintf(to,
            "usage: kvrt-bench [--backend cpu|cuda|hip] [--dtype f16|bf16|f32|q8|fp8] [--runs N]\n"
            "                  [--size-mib M] [--quick] [--isa portable|avx2|avx512]\n"
            "                  [--json FILE] <op...>\n"
            "ops: write shift copy compact gather plan attention attention_decode\n"
            "     attention_prefill attention_mla all\n"
            "Caches hold at least --size-mib MiB (256 on the CPU, 1024 on GPUs); each op is\n"
            "validated, warmed up, then timed --runs times (default 20) and its median reported\n"
            "with GB/s and the fraction of the copy bandwidth measured in the same run.\n");
}

typedef struct op_entry {
    const char *name;
    void (*fn)(bench *b);
} op_entry;

static const op_entry ops[] = {
    {"write", bench_write},
    {"shift", bench_shift},
    {"copy", bench_copy},
    {"compact", bench_compact},
    {"gather", bench_gather},
    {"plan", bench_plan},
    {"attention_decode", bench_attention_decode},
    {"attention_prefill", bench_attention_prefill},
    {"attention_mla", bench_attention_mla},
};
enum { N_OPS = sizeof ops / sizeof ops[0] };

int main(int argc, char **argv)
{
    bench b;
    memset(&b, 0, sizeof b);
    b.device.backend = KVRT_BACKEND_CPU;
    b.dtype = KVRT_F16;
    b.mla_dtype = KVRT_BF16;
    b.runs = 20;
    long size_mib = 0;
    const char *json_path = NULL;
    int selected[N_OPS] = {0}, any = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(a, "--backend") == 0 && val) {
            i++;
            if (strcmp(val, "cpu") == 0)
                b.device.backend = KVRT_BACKEND_CPU;
            else if (strcmp(val, "cuda") == 0)
                b.device.backend = KVRT_BACKEND_CUDA;
            else if (strcmp(val, "hip") == 0)
                b.device.backend = KVRT_BACKEND_HIP;
            else
                die("unknown backend '%s' (cpu, cuda, hip)", val);
        } else if (strcmp(a, "--dtype") == 0 && val) {
            i++;
            if (strcmp(val, "f16") == 0)
                b.dtype = KVRT_F16;
            else if (strcmp(val, "bf16") == 0)
                b.dtype = KVRT_BF16;
            else if (strcmp(val, "f32") == 0)
                b.dtype = KVRT_F32;
            else if (strcmp(val, "q8") == 0)
                b.dtype = KVRT_Q8;
            else if (strcmp(val, "fp8") == 0)
                b.dtype = KVRT_FP8_E4M3;
            else
                die("unknown dtype '%s' (f16, bf16, f32, q8, fp8)", val);
            if (!kvrt_dtype_is_quantized(b.dtype))
                b.mla_dtype = b.dtype;
        } else if (strcmp(a, "--runs") == 0 && val) {
            i++;
            b.runs = atoi(val);
            if (b.runs < 1)
                die("--runs %s must be >= 1", val);
        } else if (strcmp(a, "--size-mib") == 0 && val) {
            i++;
            size_mib = atol(val);
            if (size_mib < 1)
                die("--size-mib %s must be >= 1", val);
        } else if (strcmp(a, "--json") == 0 && val) {
            i++;
            json_path = val;
        } else if (strcmp(a, "--quick") == 0) {
            b.quick = 1;
        } else if (strcmp(a, "--isa") == 0 && val) {
            i++;
            if (strcmp(val, "portable") != 0 && strcmp(val, "avx2") != 0 &&
                strcmp(val, "avx512") != 0)
                die("unknown --isa '%s' (portable, avx2, avx512)", val);
            setenv("KVRT_CPU_ISA", val, 1); /* before the first kvrt call reads it */
        } else if (a[0] == '-') {
            usage(stderr);
            die("unknown option '%s'", a);
        } else {
            int found = 0;
            for (int k = 0; k < N_OPS; k++) {
                int match = strcmp(a, ops[k].name) == 0 || strcmp(a, "all") == 0 ||
                            (strcmp(a, "attention") == 0 && strncmp(ops[k].name, "attention", 9) == 0);
                if (match)
                    selected[k] = found = any = 1;
            }
            if (!found) {
                usage(stderr);
                die("unknown op '%s'", a);
            }
        }
    }
    if (!any) {
        usage(stderr);
        return 2;
    }
    kvrt_cpu_isa_info isa;
    kvrt_cpu_isa_get(&isa);
    b.isa = kvrt_cpu_isa_name(isa.used);
    if (isa.requested > (int)isa.machine)
        printf("kvrt-bench: --isa %s is above this processor's %s: capped to it\n", isa.env,
               kvrt_cpu_isa_name(isa.machine));
    if (kvrt_device_count(b.device.backend) < 1)
        die("no %s device: this kvrt has %d (kvrt-info lists the backends built in)",
            kvrt_backend_name(b.device.backend), kvrt_device_count(b.device.backend));
    if (!devmem_supports(b.device.backend))
        die("this kvrt-bench was built without the %s runtime", kvrt_backend_name(b.device.backend));
    if (size_mib == 0)
        size_mib = b.quick ? 32 : b.device.backend == KVRT_BACKEND_CPU ? 256 : 1024;
    b.size = (size_t)size_mib * MIB;
    if (json_path != NULL && (b.json = fopen(json_path, "a")) == NULL)
        die("cannot open %s for appending", json_path);
    DM(devmem_timer_init(&b.timer, b.device));
    DM(devmem_copy_probe_init(&b.probe, b.device, b.size));

    char desc[256];
    KV(kvrt_device_describe(b.device, desc, sizeof desc));
    b.sim = strstr(desc, "kvrt-sim") != NULL;
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    printf("kvrt %s bench on %s, %d OpenMP thread%s, CPU kernels %s, caches >= %ld MiB, "
           "median of %d runs\n",
           kvrt_version_string(), desc, threads, threads == 1 ? "" : "s", b.isa, size_mib, b.runs);
    if (b.sim)
        printf("kvrt-sim runs the GPU code on the CPU: these times are no GPU's speed figures\n");
    for (int k = 0; k < N_OPS; k++)
        if (selected[k])
            ops[k].fn(&b);
    devmem_copy_probe_destroy(&b.probe);
    devmem_timer_destroy(&b.timer);
    if (b.json != NULL)
        fclose(b.json);
    return 0;
}
