/*
 * fuzz.c: kvrt-fuzz, the differential fuzzer.
 *
 * Random operation streams run on a kvrt cache (any backend) and on the
 * reference model (tests/ref) side by side: plans with ragged batches,
 * writes, cross-attention K/V, rm, cp, keep, shift, div, compact, clear,
 * gathers, attention, state save/load (into the same cache, into a second
 * cache of another block size, damaged images, files), offload/restore and
 * invalid calls. After every operation:
 *   (a) kvrt's status is one the reference allows for the call;
 *   (b) every sequence's rows of every layer, gathered in position order,
 *       equal the reference: bit-exact where data was only moved, within a
 *       bound where it was re-rotated; positions and the position queries
 *       agree; sliding-window layers hold a subset of the reference rows that
 *       includes every row above the group's evicted_max;
 *   (c) kvrt_cache_check passes and the statistics add up;
 *   (d) a call that failed (and any read-only call) changed nothing: the
 *       statistics, group infos and every gathered byte are as before.
 * kvrt_batch_plan's KVRT_ERR_CAPACITY and KVRT_ERR_WINDOW_EVICTED are judged
 * against kvrt's own statistics and group infos: a refusal must be justified
 * by them, and an acceptance must not lose a row a token should see. After a
 * decode step of a sequence only ever appended to, a sliding-window group
 * holds at most ceil(window / block_size) + 2 blocks of it.
 *
 * Usage: kvrt-fuzz [--backend cpu|cuda|hip] [--streams N] [--seed S]
 *                  [--first I] [--model attn|gemma|deepseek|whisper|mixed|prefix|q8|fp8|prerope]
 *                  [--block-size B] [--dtype f32|f16|bf16] [--ops N] [-v]
 *        kvrt-fuzz [--backend cpu|cuda|hip] --scenario NAME|all|list [-v]
 * --streams defaults to $KVRT_FUZZ_STREAMS or 200. Stream i draws everything
 * from (seed, i) alone, so "--first i --streams 1" replays it. A scenario is
 * a fixed operation list, the shortest case of a defect found, checked the
 * same way.
 * Exit status: 0 all streams passed, 1 a mismatch (the seed, the stream, the
 * last operations and a command that replays it are printed), 2 bad usage,
 * 77 no device for the backend.
 */
#include <dlfcn.h>
#include <float.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../isa_check.h"
#include "kvrt.h"
#include "kvrt_layout.h"
#include "ref.h"

enum {
    MAX_LAYERS = 8,
    MAX_SEQS = 8,
    MAX_BATCH = 48,    /* tokens a generated plan may hold (beyond max_tokens on purpose) */
    MAX_TOKENS = 32,   /* largest batch max_tokens */
    LOG_KEEP = 50,     /* operations printed on failure */
    LOG_LINE = 256,
    PROMPT_MAX = 160,  /* tokens of a prefix-caching prompt */
};

#define SET(st) REF_BIT(KVRT_##st)

/* ------------------------------------------------------------------------ */
/* PRNG: xoshiro256** seeded through splitmix64                              */
/* ------------------------------------------------------------------------ */

typedef struct rng {
    uint64_t s[4];
} rng;

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t rotl64(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t rng_next(rng *r)
{
    uint64_t *s = r->s;
    uint64_t result = rotl64(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl64(s[3], 45);
    return result;
}

static void rng_seed(rng *r, uint64_t seed, uint64_t stream)
{
    uint64_t x = seed ^ (stream * 0xd1342543de82ef95ull + 0x632be59bd9b4e019ull);
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix64(&x);
}

/* [0, n) */
static int64_t rng_below(rng *r, int64_t n) { return n <= 1 ? 0 : (int64_t)(rng_next(r) % (uint64_t)n); }
/* [lo, hi] */
static int64_t rng_between(rng *r, int64_t lo, int64_t hi) { return lo + rng_below(r, hi - lo + 1); }
static double rng_unit(rng *r) { return (double)(rng_next(r) >> 11) * 0x1.0p-53; }
static int rng_chance(rng *r, double p) { return rng_unit(r) < p; }

/* ------------------------------------------------------------------------ */
/* Options                                                                   */
/* ------------------------------------------------------------------------ */

enum { MODEL_ATTN, MODEL_GEMMA, MODEL_DEEPSEEK, MODEL_WHISPER, MODEL_MIXED, MODEL_PREFIX,
       MODEL_Q8, MODEL_FP8, MODEL_PREROPE, N_MODELS };
static const char *const model_names[N_MODELS] = {"attn", "gemma", "deepseek", "whisper", "mixed",
                                                  "prefix", "q8", "fp8", "prerope"};

typedef struct options {
    kvrt_backend backend;
    int64_t      streams;
    uint64_t     seed;
    int64_t      first;
    int          model;
    int          block_size;  /* 0: drawn per stream */
    int          dtype;       /* -1: drawn per stream */
    int          ops;
    int          verbose;
    const char  *scenario;    /* --scenario NAME|all|list */
} options;

static void usage(void)
{
    fprintf(stderr,
            "usage: kvrt-fuzz [--backend cpu|cuda|hip] [--streams N] [--seed S] [--first I]\n"
            "                 [--model attn|gemma|deepseek|whisper|mixed|prefix|q8|fp8|prerope]\n"
            "                 [--block-size B]\n"
            "                 [--dtype f32|f16|bf16] [--ops N] [-v]\n"
            "       kvrt-fuzz [--backend cpu|cuda|hip] --scenario NAME|all|list [-v]\n");
    exit(2);
}

static int64_t parse_int(const char *s, int64_t lo, int64_t hi)
{
    char *end;
    long long v = strtoll(s, &end, 0);
    if (*s == '\0' || *end != '\0' || v < lo || v > hi)
        usage();
    return v;
}

static options parse_options(int argc, char **argv)
{
    options o;
    memset(&o, 0, sizeof o);
    o.backend = KVRT_BACKEND_CPU;
    o.streams = 200;
    const char *env = getenv("KVRT_FUZZ_STREAMS");
    if (env != NULL && *env != '\0')
        o.streams = parse_int(env, 0, INT64_MAX);
    o.seed = 1;
    o.model = MODEL_ATTN;
    o.dtype = -1;
    o.ops = 40;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "-v") == 0) {
            o.verbose = 1;
            continue;
        }
        if (v == NULL)
            usage();
        i++;
        if (strcmp(a, "--backend") == 0) {
            if (strcmp(v, "cpu") == 0)
                o.backend = KVRT_BACKEND_CPU;
            else if (strcmp(v, "cuda") == 0)
                o.backend = KVRT_BACKEND_CUDA;
            else if (strcmp(v, "hip") == 0)
                o.backend = KVRT_BACKEND_HIP;
            else
                usage();
        } else if (strcmp(a, "--streams") == 0) {
            o.streams = parse_int(v, 0, INT64_MAX);
        } else if (strcmp(a, "--seed") == 0) {
            o.seed = (uint64_t)parse_int(v, 0, INT64_MAX);
        } else if (strcmp(a, "--first") == 0) {
            o.first = parse_int(v, 0, INT64_MAX);
        } else if (strcmp(a, "--model") == 0) {
            o.model = -1;
            for (int m = 0; m < N_MODELS; m++)
                if (strcmp(v, model_names[m]) == 0)
                    o.model = m;
            if (o.model < 0)
                usage();
        } else if (strcmp(a, "--block-size") == 0) {
            o.block_size = (int)parse_int(v, 1, 256);
            if (o.block_size & (o.block_size - 1))
                usage();
        } else if (strcmp(a, "--dtype") == 0) {
            if (strcmp(v, "f32") == 0)
                o.dtype = KVRT_F32;
            else if (strcmp(v, "f16") == 0)
                o.dtype = KVRT_F16;
            else if (strcmp(v, "bf16") == 0)
                o.dtype = KVRT_BF16;
            else
                usage();
        } else if (strcmp(a, "--ops") == 0) {
            o.ops = (int)parse_int(v, 1, 1000000);
        } else if (strcmp(a, "--scenario") == 0) {
            o.scenario = v;
        } else {
            usage();
        }
    }
    return o;
}

/* ------------------------------------------------------------------------ */
/* Device memory for write sources and attention buffers: host memory on the */
/* CPU backend, the CUDA or HIP runtime (opened at run time) otherwise.      */
/* ------------------------------------------------------------------------ */

typedef struct devmem {
    kvrt_backend backend;
    void        *lib;
    int (*alloc)(void **, size_t);
    int (*release)(void *);
    int (*copy)(void *, const void *, size_t, int); /* kind 1: to device, 2: to host */
} devmem;

static devmem dev;

static void *dev_symbol(const char *name)
{
    void *p = dlsym(dev.lib, name);
    if (p == NULL) {
        fprintf(stderr, "kvrt-fuzz: %s not found in the runtime library\n", name);
        exit(77);
    }
    return p;
}

static void dev_open(kvrt_backend backend)
{
    dev.backend = backend;
    if (backend == KVRT_BACKEND_CPU)
        return;
    static const char *const cuda_libs[] = {"libcudart.so", "libcudart.so.12", "libcudart.so.11.0", NULL};
    static const char *const hip_libs[] = {"libamdhip64.so", "libamdhip64.so.6", "libamdhip64.so.5", NULL};
    const char *const *libs = backend == KVRT_BACKEND_CUDA ? cuda_libs : hip_libs;
#if defined(KVRT_FUZZ_SIM)
    dev.lib = dlopen(NULL, RTLD_NOW); /* kvrt-sim: the runtime is linked into this program */
#endif
    for (int i = 0; libs[i] != NULL && dev.lib == NULL; i++)
        dev.lib = dlopen(libs[i], RTLD_NOW | RTLD_LOCAL);
    if (dev.lib == NULL) {
        fprintf(stderr, "kvrt-fuzz: no %s runtime library to allocate device buffers\n",
                kvrt_backend_name(backend));
        exit(77);
    }
    int cuda = backend == KVRT_BACKEND_CUDA;
    void *a = dev_symbol(cuda ? "cudaMalloc" : "hipMalloc");
    void *f = dev_symbol(cuda ? "cudaFree" : "hipFree");
    void *c = dev_symbol(cuda ? "cudaMemcpy" : "hipMemcpy");
    memcpy(&dev.alloc, &a, sizeof a);
    memcpy(&dev.release, &f, sizeof f);
    memcpy(&dev.copy, &c, sizeof c);
}

static void *dev_alloc(size_t n)
{
    void *p = NULL;
    if (n == 0)
        n = 1;
    if (dev.backend == KVRT_BACKEND_CPU)
        p = malloc(n);
    else if (dev.alloc(&p, n) != 0)
        p = NULL;
    if (p == NULL) {
        fprintf(stderr, "kvrt-fuzz: allocating %zu bytes failed\n", n);
        exit(1);
    }
    return p;
}

static void dev_free(void *p)
{
    if (p == NULL)
        return;
    if (dev.backend == KVRT_BACKEND_CPU)
        free(p);
    else
        dev.release(p);
}

static void dev_upload(void *dst, const void *src, size_t n)
{
    if (dev.backend == KVRT_BACKEND_CPU)
        memcpy(dst, src, n);
    else if (dev.copy(dst, src, n, 1) != 0)
        fprintf(stderr, "kvrt-fuzz: upload of %zu bytes failed\n", n), exit(1);
}

static void dev_download(void *dst, const void *src, size_t n)
{
    if (dev.backend == KVRT_BACKEND_CPU)
        memcpy(dst, src, n);
    else if (dev.copy(dst, src, n, 2) != 0)
        fprintf(stderr, "kvrt-fuzz: download of %zu bytes failed\n", n), exit(1);
}

/* A device buffer that grows. */
typedef struct dbuf {
    void  *p;
    size_t cap;
} dbuf;

static void *dbuf_get(dbuf *b, size_t n)
{
    if (n > b->cap) {
        dev_free(b->p);
        b->cap = n * 2;
        b->p = dev_alloc(b->cap);
    }
    return b->p;
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (p == NULL)
        fprintf(stderr, "kvrt-fuzz: out of host memory\n"), exit(1);
    return p;
}

static void *xrealloc(void *p, size_t n)
{
    p = realloc(p, n ? n : 1);
    if (p == NULL)
        fprintf(stderr, "kvrt-fuzz: out of host memory\n"), exit(1);
    return p;
}

/* ------------------------------------------------------------------------ */
/* Stream state                                                              */
/* ------------------------------------------------------------------------ */

typedef struct layer_info {
    kvrt_layer_desc d;
    int             group;
    int64_t         k_elems, v_elems;   /* per token, all heads */
    uint8_t        *rotary;             /* [k_elems] 1: rotated by RoPE */
} layer_info;

typedef struct group_desc {
    int self;        /* ATTN or MLA */
    int window;      /* ATTN window (0 full) */
    int evicting;    /* a sliding window that drops rows (window > 0, not swa_full) */
    int first_layer;
} group_desc;

/* One sequence's rows of one layer, as kvrt_gather returned them. */
typedef struct snap_rows {
    int64_t  n, cap;
    uint8_t *k, *v;
    int32_t *pos;
} snap_rows;

/* Everything kvrt shows of the cache at one moment. */
typedef struct snapshot {
    snap_rows           rows[MAX_SEQS][MAX_LAYERS];
    kvrt_seq_group_info info[MAX_SEQS][MAX_LAYERS];
    kvrt_cache_stats    stats[MAX_LAYERS + 1];  /* per group; [n_groups]: all */
    int32_t             pos_min[MAX_SEQS], pos_max[MAX_SEQS];
    int64_t             n_tokens[MAX_SEQS];
    kvrt_prefix_stats   prefix;                 /* prefix caching (zeros when off) */
} snapshot;

enum { PLAN_NONE, PLAN_VALID, PLAN_MAYBE, PLAN_STALE };

typedef struct scenario scenario;

typedef struct fuzz {
    const options  *opt;
    const scenario *sc;              /* a scenario's stream, or NULL */
    int             has_full;        /* some self group keeps every row */
    int64_t         stream;
    rng             r;
    /* the cache */
    kvrt_cache_desc desc;
    kvrt_layer_desc layers[MAX_LAYERS];
    int             n_layers;
    layer_info      li[MAX_LAYERS];
    int             n_groups;
    group_desc      g[MAX_LAYERS];
    kvrt_cache     *cache;
    kvrt_batch     *batch;
    int             max_tokens;
    ref_model      *ref;
    char            config[512];
    /* what kvrt showed after the last operation, and the one being taken */
    snapshot       *snap[2];
    int             cur;
    /* the batch's plan */
    int             plan_state;
    int             plan_n;
    int32_t         plan_seq[MAX_BATCH], plan_pos[MAX_BATCH];
    int             pristine[MAX_SEQS];  /* only appended to, in position order */
    /* buffers */
    dbuf            dk, dv, dq, dout;
    void           *hk, *hv, *hq, *hout;
    size_t          hk_cap, hv_cap, hq_cap, hout_cap;
    double         *qd, *outd;
    size_t          qd_cap, outd_cap;
    int             attention_unsupported[3];  /* per layer kind */
    int             state_unsupported;         /* no checksum library in this build */
    /* an offloaded sequence: kvrt's copy and the reference's */
    kvrt_offload   *off;
    ref_model      *off_ref;
    int32_t         off_seq;
    int64_t         off_rows[MAX_LAYERS];      /* per group */
    /* counts */
    int64_t         n_ops, n_checks, n_errors_seen;
    int             op_index;
    /* the operation log, a ring */
    char            log[LOG_KEEP][LOG_LINE];
    int64_t         log_n;
    /* shared handles: a second handle (kvrt_cache_create_shared) naming every
     * layer of the first; each operation goes through one drawn from hr (its
     * own generator, so that the rest of a stream is what it would be
     * without it); base is NULL once destroyed, leaving the draft alone */
    kvrt_cache     *base, *draft;
    rng             hr;
    /* prefix caching (the prefix shape) */
    int             prefix;                    /* the cache caches prefixes */
    int             prefix_exact;              /* no edit or eviction since the last clear:
                                                  a lookup finds every recorded block */
    const int32_t  *plan_tokens;               /* token ids of the plan being made, or NULL */
    int32_t         prompts[3][PROMPT_MAX];    /* prompts sharing prefixes */
    int             seq_prompt[MAX_SEQS];      /* the prompt a sequence's tokens come from */
} fuzz;

static int64_t total_ops, total_checks, total_errors, total_attention;
/* prefix caching: lookups that attached blocks, tokens attached, lookups
 * whose hit was checked for equality with the reference */
static int64_t total_prefix_hits, total_prefix_tokens, total_prefix_exact;
static int64_t rows_rotated, rows_exact, max_rotations;
/* Largest error of a re-rotated element seen, per dtype, in units of
 * rotations * eps * max|rotated element| (the bound allows 4 + a little). */
static double worst_rotation_error[KVRT_FP8_E4M3 + 1];
static double worst_attention_error; /* largest |error| / bound of an attention output */

/* Per call and status, how often it happened (printed with -v). */
enum { TALLY_CALLS = 48, TALLY_STATUS = 16 };
static struct {
    char    call[40];
    int64_t n[TALLY_STATUS];
} tally[TALLY_CALLS];

static void tally_add(const char *call, kvrt_status st)
{
    size_t len = strcspn(call, "( ");
    if (len >= sizeof tally[0].call)
        len = sizeof tally[0].call - 1;
    for (int i = 0; i < TALLY_CALLS; i++) {
        if (tally[i].call[0] == '\0') {
            memcpy(tally[i].call, call, len);
            tally[i].call[len] = '\0';
        }
        if (strncmp(tally[i].call, call, len) == 0 && tally[i].call[len] == '\0') {
            if (-(int)st >= 0 && -(int)st < TALLY_STATUS)
                tally[i].n[-(int)st]++;
            return;
        }
    }
}

static void tally_print(void)
{
    for (int i = 0; i < TALLY_CALLS && tally[i].call[0]; i++) {
        printf("  %-26s", tally[i].call);
        for (int k = 0; k < TALLY_STATUS; k++)
            if (tally[i].n[k])
                printf(" %s %" PRId64, kvrt_status_name((kvrt_status)-k) + 5, tally[i].n[k]);
        printf("\n");
    }
    printf("  rows compared: %" PRId64 " exact, %" PRId64 " re-rotated (up to %" PRId64 " times)\n",
           rows_exact, rows_rotated, max_rotations);
    printf("  largest re-rotation error, in rotations x eps x max|element| (bound 4): f32 %.3g, "
           "f16 %.3g, bf16 %.3g, q8 %.3g, fp8 %.3g\n",
           worst_rotation_error[0], worst_rotation_error[1], worst_rotation_error[2],
           worst_rotation_error[KVRT_Q8], worst_rotation_error[KVRT_FP8_E4M3]);
    printf("  largest attention error, as a fraction of its bound: %.3g\n", worst_attention_error);
}

static const char *sname(kvrt_status st) { return kvrt_status_name(st); }

static void set_string(ref_status_set set, char *buf, size_t size)
{
    buf[0] = '\0';
    size_t at = 0;
    for (int b = 0; b < 32; b++)
        if (set & (1u << b))
            at += (size_t)snprintf(buf + at, at < size ? size - at : 0, "%s%s", at ? "|" : "",
                                   sname((kvrt_status)(-b)));
    if (at == 0)
        snprintf(buf, size, "(none)");
}

static void oplog(fuzz *F, const char *fmt, ...)
{
    char *line = F->log[F->log_n % LOG_KEEP];
    int at = snprintf(line, LOG_LINE, "op %d: ", F->op_index);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line + at, (size_t)(LOG_LINE - at), fmt, ap);
    va_end(ap);
    F->log_n++;
}

/* Appends " -> STATUS" to the last log line. */
static void oplog_status(fuzz *F, kvrt_status st)
{
    char *line = F->log[(F->log_n - 1) % LOG_KEEP];
    size_t len = strlen(line);
    if (len + 1 < LOG_LINE)
        snprintf(line + len, LOG_LINE - len, " -> %s", sname(st));
}

#if defined(__GNUC__)
__attribute__((noreturn, format(printf, 2, 3)))
#endif
static void fail(fuzz *F, const char *fmt, ...)
{
    fflush(stdout);
    fprintf(stderr, "kvrt-fuzz: FAIL: ");
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n  kvrt_last_error: %s\n", kvrt_last_error());
    fprintf(stderr, "  seed %" PRIu64 ", stream %" PRId64 ", operation %d\n", F->opt->seed, F->stream,
            F->op_index);
    fprintf(stderr, "  cache: %s\n", F->config);
    int64_t first = F->log_n > LOG_KEEP ? F->log_n - LOG_KEEP : 0;
    fprintf(stderr, "  last %" PRId64 " operations:\n", F->log_n - first);
    for (int64_t i = first; i < F->log_n; i++)
        fprintf(stderr, "    %s\n", F->log[i % LOG_KEEP]);
    const options *o = F->opt;
    if (F->sc != NULL) {
        fprintf(stderr, "  replay: kvrt-fuzz --backend %s --scenario %s -v\n",
                kvrt_backend_name(o->backend), o->scenario);
        exit(1);
    }
    fprintf(stderr, "  replay: kvrt-fuzz --backend %s --model %s", kvrt_backend_name(o->backend),
            model_names[o->model]);
    if (o->block_size)
        fprintf(stderr, " --block-size %d", o->block_size);
    if (o->dtype >= 0)
        fprintf(stderr, " --dtype %s", kvrt_dtype_name((kvrt_dtype)o->dtype));
    fprintf(stderr, " --ops %d --seed %" PRIu64 " --first %" PRId64 " --streams 1 -v\n", o->ops,
            o->seed, F->stream);
    exit(1);
}

/* Checks that a call's status is one the reference allows. */
static void expect(fuzz *F, const char *call, kvrt_status st, ref_status_set allowed)
{
    tally_add(call, st);
    if (!REF_HAS(allowed, st)) {
        char want[256];
        set_string(allowed, want, sizeof want);
        fail(F, "%s returned %s; expected %s", call, sname(st), want);
    }
    if (st != KVRT_OK)
        F->n_errors_seen++;
}

/* Bytes per element of what snapshots hold: the cache dtype's elements, or
 * for quantized caches their values as f32 (snap_gather). */
static int cache_elem_size(const fuzz *F)
{
    return kvrt_dtype_is_quantized(F->desc.dtype) ? 4 : (int)kvrt_dtype_size(F->desc.dtype);
}

/* The dtype of snapshot elements. */
static kvrt_dtype snap_dtype(const fuzz *F)
{
    return kvrt_dtype_is_quantized(F->desc.dtype) ? KVRT_F32 : F->desc.dtype;
}

/* kvrt_gather, or for quantized caches kvrt_gather_as to f32 (the values
 * the codes and scales stand for; tests/quant checks the codes and scales
 * themselves). */
static kvrt_status snap_gather(const fuzz *F, kvrt_cache *cache, int layer, int32_t seq, int32_t p0,
                               int32_t p1, void *k, void *v, int32_t *pos, int64_t cap, int64_t *n)
{
    if (kvrt_dtype_is_quantized(F->desc.dtype))
        return kvrt_gather_as(cache, layer, seq, p0, p1, k, v, pos, KVRT_F32, cap, n, NULL);
    return kvrt_gather(cache, layer, seq, p0, p1, k, v, pos, cap, n, NULL);
}

/* ------------------------------------------------------------------------ */
/* Snapshots                                                                 */
/* ------------------------------------------------------------------------ */

static void rows_reserve(const fuzz *F, snap_rows *r, int layer, int64_t cap)
{
    if (cap <= r->cap)
        return;
    int64_t es = cache_elem_size(F);
    r->cap = cap * 2;
    r->k = xrealloc(r->k, (size_t)(r->cap * F->li[layer].k_elems * es));
    r->v = xrealloc(r->v, (size_t)(r->cap * (F->li[layer].v_elems ? F->li[layer].v_elems : 1) * es));
    r->pos = xrealloc(r->pos, (size_t)r->cap * sizeof(int32_t));
}

static void snapshot_free(snapshot *S)
{
    if (S == NULL)
        return;
    for (int s = 0; s < MAX_SEQS; s++)
        for (int l = 0; l < MAX_LAYERS; l++) {
            free(S->rows[s][l].k);
            free(S->rows[s][l].v);
            free(S->rows[s][l].pos);
        }
    free(S);
}

/* Everything `cache` (F's cache, or another with the same layers) shows.
 * Row capacities come from the reference, so the other cache must hold the
 * same tokens. */
static void take_snapshot_of(fuzz *F, kvrt_cache *cache, snapshot *S);

static void take_snapshot(fuzz *F, snapshot *S) { take_snapshot_of(F, F->cache, S); }

static void take_snapshot_of(fuzz *F, kvrt_cache *cache, snapshot *S)
{
    for (int s = 0; s < F->desc.max_seqs; s++) {
        for (int l = 0; l < F->n_layers; l++) {
            snap_rows *r = &S->rows[s][l];
            int64_t cap;
            if (F->li[l].d.kind == KVRT_LAYER_CROSS)
                cap = F->desc.cross_max_len + 1;
            else
                ref_seq_tokens(F->ref, s, &cap), cap += 1;
            rows_reserve(F, r, l, cap);
            int64_t n = -7;
            kvrt_status st = snap_gather(F, cache, l, s, 0, -1, r->k,
                                         F->li[l].v_elems ? r->v : NULL, r->pos, cap, &n);
            if (st != KVRT_OK)
                fail(F, "kvrt_gather(layer %d, seq %d) returned %s with n_out %" PRId64
                        " (capacity %" PRId64 ", one more than the reference's rows)",
                     l, s, sname(st), n, cap);
            if (n < 0 || n > cap)
                fail(F, "kvrt_gather(layer %d, seq %d): n_out %" PRId64 " outside [0, %" PRId64 "]",
                     l, s, n, cap);
            r->n = n;
        }
        for (int g = 0; g < F->n_groups; g++) {
            kvrt_status st = kvrt_seq_group_info_get(cache, s, g, &S->info[s][g]);
            if (st != KVRT_OK)
                fail(F, "kvrt_seq_group_info_get(seq %d, group %d) returned %s", s, g, sname(st));
        }
        kvrt_status st = kvrt_seq_pos_min(cache, s, &S->pos_min[s]);
        if (st == KVRT_OK)
            st = kvrt_seq_pos_max(cache, s, &S->pos_max[s]);
        if (st == KVRT_OK)
            st = kvrt_seq_n_tokens(cache, s, &S->n_tokens[s]);
        if (st != KVRT_OK)
            fail(F, "a position query of seq %d returned %s", s, sname(st));
    }
    for (int g = 0; g <= F->n_groups; g++) {
        kvrt_status st = kvrt_cache_stats_get(cache, g == F->n_groups ? -1 : g, &S->stats[g]);
        if (st != KVRT_OK)
            fail(F, "kvrt_cache_stats_get(%d) returned %s", g == F->n_groups ? -1 : g, sname(st));
    }
    memset(&S->prefix, 0, sizeof S->prefix);
    if (F->prefix && kvrt_prefix_stats_get(cache, &S->prefix) != KVRT_OK)
        fail(F, "kvrt_prefix_stats_get returned an error on a prefix-caching cache");
}

/* The snapshot of the state before the current operation. */
static snapshot *before(const fuzz *F) { return F->snap[F->cur]; }

/* ------------------------------------------------------------------------ */
/* Comparing kvrt with the reference                                         */
/* ------------------------------------------------------------------------ */

/* Unit roundoff of the cache dtype per re-rotation. kvrt re-rotates a row
 * by loading the stored values (exact in f32), turning each pair (x, y) by
 * cos/sin computed from a double angle and rounded to f32, in f32
 * arithmetic, and rounding the result to the cache dtype. For a pair of norm
 * r that is at most about 3 * 2^-24 * (|x| + |y|) <= 5 * 2^-24 * r of f32
 * arithmetic plus u * r of final rounding (u = 2^-24 f32, 2^-11 f16, 2^-8
 * bf16). Rotations preserve the norm of an error vector, so errors of
 * successive rotations add up: after n re-rotations an element is within
 * n * (u + 5 * 2^-24) * r of the reference, which rotates in double, and
 * r <= sqrt(2) * max|element|. The bound used is
 *     n * 4 * eps * max|rotated element of the row| + n * 2^-24
 * with eps = 2^-22 (f32), 2^-11 (f16), 2^-8 (bf16): a factor of about 2
 * above the estimate, plus an absolute term for f16 subnormals. */
static double rotation_eps(kvrt_dtype dt)
{
    return dt == KVRT_F32 ? 0x1.0p-22 : dt == KVRT_F16 ? 0x1.0p-11 : 0x1.0p-8;
}

/* Quantized caches re-rotate a head row by dequantizing it whole, turning
 * its rotary part in f32 and quantizing it again with a new scale: every
 * element of the row (rotated or not) moves by at most half a step of the
 * new scale, eps_q * amax' (q8: amax' / 254; fp8: 2^-4 of the element or
 * 2^-10 of the scale, <= amax' / 16), plus the f32 turn. amax' <= sqrt(2)
 * max|row| (a turn keeps pair norms) plus the errors so far; the bound per
 * re-rotation used is
 *     2 * eps_q * max|K element of the token| + 4 * 2^-22 * max + 2^-24,
 * errors of successive re-rotations adding up. */
static double quant_rotation_bound(const fuzz *F, int layer, const double *ref_k)
{
    double maxabs = 0;
    for (int64_t e = 0; e < F->li[layer].k_elems; e++)
        maxabs = fmax(maxabs, fabs(ref_k[e]));
    double eps_q = F->desc.dtype == KVRT_Q8 ? 1.0 / 254 : 1.0 / 16;
    return 2 * eps_q * maxabs + 4 * 0x1.0p-22 * maxabs + 0x1.0p-24;
}

static double rotation_bound(const fuzz *F, int layer, const double *ref_k, int32_t rotations)
{
    if (rotations == 0)
        return 0;
    double maxabs = 0;
    for (int64_t e = 0; e < F->li[layer].k_elems; e++)
        if (F->li[layer].rotary[e])
            maxabs = fmax(maxabs, fabs(ref_k[e]));
    if (kvrt_dtype_is_quantized(F->desc.dtype))
        return rotations * quant_rotation_bound(F, layer, ref_k);
    return rotations * (4 * rotation_eps(F->desc.dtype) * maxabs + 0x1.0p-24);
}

static void describe_elem(const fuzz *F, int layer, int64_t e, char *buf, size_t size)
{
    const kvrt_layer_desc *L = &F->li[layer].d;
    if (L->kind == KVRT_LAYER_MLA)
        snprintf(buf, size, "[%" PRId64 "]%s", e, e >= L->latent_dim ? " (rope part)" : "");
    else
        snprintf(buf, size, "head %" PRId64 " dim %" PRId64 "%s", e / L->head_dim_k,
                 e % L->head_dim_k, F->li[layer].rotary[e] ? " (rotary)" : "");
}

/* Row i of r against a reference K row (and V row) of a layer. */
static void compare_row(fuzz *F, int seq, int layer, int32_t pos, const snap_rows *r, int64_t i,
                        const double *ref_k, const double *ref_v, int32_t rotations)
{
    kvrt_dtype dt = snap_dtype(F);
    const int quant = kvrt_dtype_is_quantized(F->desc.dtype); /* a re-rotation requantizes the row */
    const layer_info *L = &F->li[layer];
    double bound = rotation_bound(F, layer, ref_k, rotations);
    if (rotations > 0)
        rows_rotated++;
    else
        rows_exact++;
    if (rotations > max_rotations)
        max_rotations = rotations;
    for (int64_t e = 0; e < L->k_elems; e++) {
        double got = ref_load(r->k, dt, i * L->k_elems + e), want = ref_k[e];
        int ok;
        if (rotations > 0 && (L->rotary[e] || quant)) {
            ok = fabs(got - want) <= bound;
            double unit = (bound - rotations * 0x1.0p-24) / 4;
            if (unit > 0 && fabs(got - want) / unit > worst_rotation_error[F->desc.dtype])
                worst_rotation_error[F->desc.dtype] = fabs(got - want) / unit;
        }
        else
            ok = got == want && signbit(got) == signbit(want);
        if (!ok) {
            char where[96];
            describe_elem(F, layer, e, where, sizeof where);
            fail(F, "seq %d layer %d pos %d: K %s is %.9g, reference %.9g (difference %.3g; "
                    "re-rotated %d times, bound %.3g)",
                 seq, layer, (int)pos, where, got, want, got - want, (int)rotations, bound);
        }
    }
    for (int64_t e = 0; e < L->v_elems; e++) {
        double got = ref_load(r->v, dt, i * L->v_elems + e), want = ref_v[e];
        if (!(got == want && signbit(got) == signbit(want)))
            fail(F, "seq %d layer %d pos %d: V[%" PRId64 "] is %.9g, reference %.9g", seq, layer,
                 (int)pos, e, got, want);
    }
}

static int64_t find_pos(const int32_t *pos, int64_t n, int32_t p)
{
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (pos[mid] < p)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && pos[lo] == p ? lo : -1;
}

/* Whether a token of seq at pos would miss a row it must see: a reference
 * row inside its window that an evicting group no longer holds (judged on
 * snapshot S). Sets *group to that group. */
static int window_rows_missing(const fuzz *F, const snapshot *S, int32_t seq, int32_t pos,
                               int *group, int32_t *missing)
{
    int64_t n;
    const ref_token *t = ref_seq_tokens(F->ref, seq, &n);
    for (int g = 0; g < F->n_groups; g++) {
        if (!F->g[g].evicting)
            continue;
        const snap_rows *r = &S->rows[seq][F->g[g].first_layer];
        for (int64_t i = 0; i < n; i++) {
            if (t[i].pos > pos || (int64_t)t[i].pos <= (int64_t)pos - F->g[g].window)
                continue;
            if (find_pos(r->pos, r->n, t[i].pos) < 0) {
                *group = g;
                *missing = t[i].pos;
                return 1;
            }
        }
    }
    return 0;
}

/* Whether kvrt's group infos show that a window was evicted for a token of
 * seq at pos: some evicting group's evicted_max > pos - window. */
static int window_evicted_shown(const fuzz *F, const snapshot *S, int32_t seq, int32_t pos)
{
    for (int g = 0; g < F->n_groups; g++)
        if (F->g[g].evicting && S->info[seq][g].evicted_max >= 0 &&
            (int64_t)S->info[seq][g].evicted_max > (int64_t)pos - F->g[g].window)
            return 1;
    return 0;
}

static int64_t max_blocks_of(const fuzz *F)
{
    return F->desc.max_blocks > 0 ? F->desc.max_blocks : F->desc.n_blocks;
}

/* Blocks group g could still hand out: free ones plus room to grow. */
static int64_t blocks_available(const fuzz *F, const snapshot *S, int g)
{
    return S->stats[g].blocks_free + S->stats[g].blocks_cached +
           (max_blocks_of(F) - S->stats[g].blocks_total);
}

static void compare_with_ref(fuzz *F, snapshot *S)
{
    kvrt_status st;
    for (int s = 0; s < F->desc.max_seqs; s++) {
        int64_t n;
        const ref_token *t = ref_seq_tokens(F->ref, s, &n);
        int32_t rmin = ref_seq_pos_min(F->ref, s), rmax = ref_seq_pos_max(F->ref, s);
        int64_t rn = n;
        if (!F->has_full) { /* every group drops rows: the queries follow what they hold */
            rmin = rmax = -1;
            rn = -1;
            for (int g = 0; g < F->n_groups; g++) {
                const snap_rows *r = &S->rows[s][F->g[g].first_layer];
                if (!F->g[g].self)
                    continue;
                if (rn < 0)
                    rn = r->n;
                if (r->n > 0 && (rmin < 0 || r->pos[0] < rmin))
                    rmin = r->pos[0];
                if (r->n > 0 && r->pos[r->n - 1] > rmax)
                    rmax = r->pos[r->n - 1];
            }
            if (rn < 0)
                rn = 0;
        }
        if (S->pos_min[s] != rmin || S->pos_max[s] != rmax || S->n_tokens[s] != rn)
            fail(F, "seq %d: kvrt pos_min %d pos_max %d n_tokens %" PRId64
                    ", reference %d %d %" PRId64,
                 s, (int)S->pos_min[s], (int)S->pos_max[s], S->n_tokens[s], (int)rmin, (int)rmax, rn);

        for (int l = 0; l < F->n_layers; l++) {
            const layer_info *L = &F->li[l];
            const snap_rows *r = &S->rows[s][l];
            if (L->d.kind == KVRT_LAYER_CROSS) {
                const double *ck, *cv;
                int cn = ref_cross_rows(F->ref, l, s, &ck, &cv);
                if (r->n != cn)
                    fail(F, "seq %d cross layer %d: kvrt holds %" PRId64 " rows, reference %d", s, l,
                         r->n, cn);
                for (int64_t i = 0; i < cn; i++) {
                    if (r->pos[i] != i)
                        fail(F, "seq %d cross layer %d: row %" PRId64 " numbered %d", s, l, i,
                             (int)r->pos[i]);
                    compare_row(F, s, l, (int32_t)i, r, i, ck + i * L->k_elems, cv + i * L->v_elems, 0);
                }
                continue;
            }
            int64_t off = ref_layer_offset(F->ref, l);
            const group_desc *G = &F->g[L->group];
            if (!G->evicting) {
                if (r->n != n)
                    fail(F, "seq %d layer %d: kvrt holds %" PRId64 " rows, reference %" PRId64, s, l,
                         r->n, n);
                for (int64_t i = 0; i < n; i++) {
                    if (r->pos[i] != t[i].pos)
                        fail(F, "seq %d layer %d: row %" PRId64 " at position %d, reference %d", s, l,
                             i, (int)r->pos[i], (int)t[i].pos);
                    if (t[i].written[l])
                        compare_row(F, s, l, t[i].pos, r, i, t[i].data + off,
                                    t[i].data + off + L->k_elems, t[i].rotations[l]);
                }
                continue;
            }
            /* a sliding window: a subset of the reference, holding every row
             * above evicted_max */
            int32_t evicted_max = S->info[s][L->group].evicted_max;
            int64_t i = 0;
            for (int64_t j = 0; j < n; j++) {
                if (i < r->n && r->pos[i] == t[j].pos) {
                    if (t[j].written[l])
                        compare_row(F, s, l, t[j].pos, r, i, t[j].data + off,
                                    t[j].data + off + L->k_elems, t[j].rotations[l]);
                    i++;
                } else if (t[j].pos > evicted_max) {
                    fail(F, "seq %d sliding-window layer %d (window %d): position %d is missing "
                            "but the group's evicted_max is %d",
                         s, l, L->d.window, (int)t[j].pos, (int)evicted_max);
                }
            }
            if (i != r->n)
                fail(F, "seq %d sliding-window layer %d: kvrt row at position %d is not in the "
                        "reference (or out of order)",
                     s, l, (int)r->pos[i]);
        }

        /* group infos */
        for (int g = 0; g < F->n_groups; g++) {
            const kvrt_seq_group_info *I = &S->info[s][g];
            if (!F->g[g].self)
                continue;
            const snap_rows *r = &S->rows[s][F->g[g].first_layer];
            int32_t gmin = r->n ? r->pos[0] : -1, gmax = r->n ? r->pos[r->n - 1] : -1;
            int64_t bs = F->desc.block_size;
            if (I->n_tokens != r->n || I->pos_min != gmin || I->pos_max != gmax ||
                I->n_slots < I->n_tokens || I->n_slots > (int64_t)I->n_blocks * bs ||
                (I->n_blocks > 0 && I->n_slots <= (int64_t)(I->n_blocks - 1) * bs))
                fail(F, "seq %d group %d info: pos [%d, %d], %" PRId64 " tokens, %" PRId64
                        " slots, %d blocks; gathered [%d, %d], %" PRId64 " rows (block_size %d)",
                     s, g, (int)I->pos_min, (int)I->pos_max, I->n_tokens, I->n_slots, I->n_blocks,
                     (int)gmin, (int)gmax, r->n, F->desc.block_size);
            if (!F->g[g].evicting && I->evicted_max != -1)
                fail(F, "seq %d group %d keeps every row but has evicted_max %d", s, g,
                     (int)I->evicted_max);
            /* an empty sequence starts afresh: nothing of it is evicted */
            if (n == 0 && I->evicted_max != -1)
                fail(F, "seq %d holds no token but group %d has evicted_max %d (a new token at "
                        "position 0 would be refused)",
                     s, g, (int)I->evicted_max);
        }

        /* kvrt_seq_can_resume agrees with what the groups hold */
        int32_t probe[2] = {rmax < INT32_MAX - 1 ? rmax + 1 : rmax, 0};
        if (n > 0)
            probe[1] = t[rng_below(&F->r, n)].pos;
        for (int k = 0; k < 2; k++) {
            int ok = -1, group = -1;
            int32_t missing = -1;
            st = kvrt_seq_can_resume(F->cache, s, probe[k], &ok);
            if (st != KVRT_OK || (ok != 0 && ok != 1))
                fail(F, "kvrt_seq_can_resume(seq %d, pos %d) returned %s, ok %d", s, (int)probe[k],
                     sname(st), ok);
            if (ok && window_rows_missing(F, S, s, probe[k], &group, &missing))
                fail(F, "kvrt_seq_can_resume(seq %d, pos %d) says yes, but group %d lost position "
                        "%d inside the window",
                     s, (int)probe[k], group, (int)missing);
            if (!ok && !window_evicted_shown(F, S, s, probe[k]))
                fail(F, "kvrt_seq_can_resume(seq %d, pos %d) says no, but no group's evicted_max "
                        "reaches the window",
                     s, (int)probe[k]);
        }
    }

    /* statistics */
    kvrt_cache_stats sum;
    memset(&sum, 0, sizeof sum);
    for (int g = 0; g < F->n_groups; g++) {
        const kvrt_cache_stats *x = &S->stats[g];
        if (x->blocks_free + x->blocks_used + x->blocks_cached != x->blocks_total ||
            x->blocks_shared > x->blocks_used || x->blocks_free < 0 || x->holes < 0 ||
            x->slots_live < 0 || x->blocks_cached < 0 || (!F->prefix && x->blocks_cached != 0))
            fail(F, "group %d stats: total %" PRId64 " free %" PRId64 " used %" PRId64
                    " cached %" PRId64 " shared %" PRId64 " live %" PRId64 " holes %" PRId64,
                 g, x->blocks_total, x->blocks_free, x->blocks_used, x->blocks_cached,
                 x->blocks_shared, x->slots_live, x->holes);
        if (F->g[g].self) {
            if (x->blocks_total < F->desc.n_blocks || x->blocks_total > max_blocks_of(F))
                fail(F, "group %d has %" PRId64 " blocks; n_blocks %d, max_blocks %d", g,
                     x->blocks_total, F->desc.n_blocks, F->desc.max_blocks);
            int64_t page_refs = 0, tokens = 0, holes = 0;
            for (int s = 0; s < F->desc.max_seqs; s++) {
                page_refs += S->info[s][g].n_blocks;
                tokens += S->info[s][g].n_tokens;
                holes += S->info[s][g].n_slots - S->info[s][g].n_tokens;
            }
            if (x->blocks_used > page_refs || (x->blocks_shared == 0 && x->blocks_used != page_refs))
                fail(F, "group %d: %" PRId64 " blocks used (%" PRId64 " shared), page tables "
                        "reference %" PRId64,
                     g, x->blocks_used, x->blocks_shared, page_refs);
            if (x->blocks_shared == 0 && x->slots_live != tokens)
                fail(F, "group %d: %" PRId64 " live slots, sequences hold %" PRId64 " tokens", g,
                     x->slots_live, tokens);
            if (x->holes != holes)
                fail(F, "group %d: %" PRId64 " holes, sequences have %" PRId64, g, x->holes, holes);
        }
        sum.blocks_total += x->blocks_total;
        sum.blocks_free += x->blocks_free;
        sum.blocks_used += x->blocks_used;
        sum.blocks_shared += x->blocks_shared;
        sum.slots_live += x->slots_live;
        sum.holes += x->holes;
        sum.bytes_device += x->bytes_device;
        sum.blocks_cached += x->blocks_cached;
    }
    if (F->prefix && (S->prefix.blocks_cached != S->stats[F->n_groups].blocks_cached ||
                      S->prefix.blocks_keyed < S->prefix.blocks_cached ||
                      S->prefix.hits + S->prefix.misses != S->prefix.lookups ||
                      S->prefix.tokens_served > S->prefix.tokens_queried))
        fail(F, "prefix stats: %" PRId64 " cached (cache stats %" PRId64 "), %" PRId64
                " keyed, %" PRId64 " lookups = %" PRId64 " hits + %" PRId64 " misses, %" PRId64
                " tokens served of %" PRId64,
             S->prefix.blocks_cached, S->stats[F->n_groups].blocks_cached, S->prefix.blocks_keyed,
             S->prefix.lookups, S->prefix.hits, S->prefix.misses, S->prefix.tokens_served,
             S->prefix.tokens_queried);
    const kvrt_cache_stats *all = &S->stats[F->n_groups];
    if (memcmp(&sum, all, sizeof sum) != 0)
        fail(F, "stats of all groups (total %" PRId64 " free %" PRId64 " used %" PRId64
                " bytes %" PRId64 ") differ from the sum over groups (%" PRId64 " %" PRId64
                " %" PRId64 " %" PRId64 ")",
             all->blocks_total, all->blocks_free, all->blocks_used, all->bytes_device,
             sum.blocks_total, sum.blocks_free, sum.blocks_used, sum.bytes_device);
}

/* After a failed or read-only call: kvrt shows exactly what it showed before. */
static void compare_unchanged(fuzz *F, const snapshot *A, const snapshot *B)
{
    int64_t es = cache_elem_size(F);
    for (int s = 0; s < F->desc.max_seqs; s++) {
        for (int l = 0; l < F->n_layers; l++) {
            const snap_rows *a = &A->rows[s][l], *b = &B->rows[s][l];
            int64_t kb = a->n * F->li[l].k_elems * es, vb = a->n * F->li[l].v_elems * es;
            if (a->n != b->n || memcmp(a->pos, b->pos, (size_t)a->n * sizeof(int32_t)) != 0 ||
                memcmp(a->k, b->k, (size_t)kb) != 0 || (vb && memcmp(a->v, b->v, (size_t)vb) != 0))
                fail(F, "the call changed seq %d layer %d (%" PRId64 " rows before, %" PRId64
                        " after)",
                     s, l, a->n, b->n);
        }
        for (int g = 0; g < F->n_groups; g++) {
            const kvrt_seq_group_info *x = &A->info[s][g], *y = &B->info[s][g];
            if (x->pos_min != y->pos_min || x->pos_max != y->pos_max || x->n_tokens != y->n_tokens ||
                x->n_slots != y->n_slots || x->n_blocks != y->n_blocks ||
                x->evicted_max != y->evicted_max)
                fail(F, "the call changed seq %d group %d: %" PRId64 " slots %d blocks evicted_max %d "
                        "before, %" PRId64 " %d %d after",
                     s, g, x->n_slots, x->n_blocks, (int)x->evicted_max, y->n_slots, y->n_blocks,
                     (int)y->evicted_max);
        }
    }
    if (memcmp(&A->prefix, &B->prefix, sizeof A->prefix) != 0)
        fail(F, "the call changed the prefix statistics (lookups %" PRId64 " -> %" PRId64
                ", keyed %" PRId64 " -> %" PRId64 ", cached %" PRId64 " -> %" PRId64 ")",
             A->prefix.lookups, B->prefix.lookups, A->prefix.blocks_keyed, B->prefix.blocks_keyed,
             A->prefix.blocks_cached, B->prefix.blocks_cached);
    for (int g = 0; g <= F->n_groups; g++)
        if (memcmp(&A->stats[g], &B->stats[g], sizeof(kvrt_cache_stats)) != 0)
            fail(F, "the call changed the stats of %s %d: blocks total %" PRId64 " -> %" PRId64
                    ", free %" PRId64 " -> %" PRId64 ", used %" PRId64 " -> %" PRId64,
                 g == F->n_groups ? "all groups" : "group", g == F->n_groups ? -1 : g,
                 A->stats[g].blocks_total, B->stats[g].blocks_total, A->stats[g].blocks_free,
                 B->stats[g].blocks_free, A->stats[g].blocks_used, B->stats[g].blocks_used);
}

/* The checks after every operation. unchanged: the call failed or only read. */
static void check(fuzz *F, int unchanged)
{
    kvrt_status st = kvrt_cache_check(F->cache);
    if (st != KVRT_OK)
        fail(F, "kvrt_cache_check returned %s", sname(st));
    snapshot *next = F->snap[1 - F->cur];
    take_snapshot(F, next);
    if (next->prefix.evictions != F->snap[F->cur]->prefix.evictions)
        F->prefix_exact = 0; /* an evicted block may have been the only one with its key */
    compare_with_ref(F, next);
    if (unchanged)
        compare_unchanged(F, F->snap[F->cur], next);
    F->cur = 1 - F->cur;
    for (int s = 0; s < F->desc.max_seqs; s++) {
        int64_t n;
        ref_seq_tokens(F->ref, s, &n);
        if (n == 0)
            F->pristine[s] = 1;
    }
    F->n_checks++;
}

/* A cheap digest of the reference's tokens and cross rows, to tell whether
 * an edit changed anything. */
static uint64_t ref_digest(const fuzz *F)
{
    uint64_t h = 1469598103934665603ull;
    for (int s = 0; s < F->desc.max_seqs; s++) {
        int64_t n;
        const ref_token *t = ref_seq_tokens(F->ref, s, &n);
        h = (h ^ (uint64_t)n) * 1099511628211ull;
        for (int64_t i = 0; i < n; i++) {
            h = (h ^ (uint64_t)(uint32_t)t[i].pos) * 1099511628211ull;
            for (int l = 0; l < F->n_layers; l++)
                h = (h ^ (uint64_t)t[i].rotations[l]) * 1099511628211ull;
        }
        for (int l = 0; l < F->n_layers; l++)
            if (F->li[l].d.kind == KVRT_LAYER_CROSS)
                h = (h ^ (uint64_t)ref_cross_rows(F->ref, l, s, NULL, NULL)) * 1099511628211ull;
    }
    return h;
}

/* The plan after a successful edit: stale when the edit changed anything. */
static void edit_done(fuzz *F, uint64_t digest_before, int always_stale)
{
    if (always_stale || ref_digest(F) != digest_before)
        F->plan_state = F->plan_state == PLAN_NONE ? PLAN_NONE : PLAN_STALE;
    else if (F->plan_state == PLAN_VALID)
        F->plan_state = PLAN_MAYBE;
}

/* ------------------------------------------------------------------------ */
/* Random data                                                               */
/* ------------------------------------------------------------------------ */

static void *host_buf(void **p, size_t *cap, size_t n)
{
    if (n > *cap) {
        *cap = n * 2;
        *p = xrealloc(*p, *cap);
    }
    return *p;
}

/* n values in [-scale, scale] of dtype dt, with a few zeros and negative zeros. */
static void fill_random(fuzz *F, void *buf, kvrt_dtype dt, int64_t n)
{
    double scale = rng_chance(&F->r, 0.8) ? 1 : rng_chance(&F->r, 0.5) ? 1.0 / 64 : 16;
    for (int64_t i = 0; i < n; i++) {
        double x = (rng_unit(&F->r) * 2 - 1) * scale;
        if (rng_chance(&F->r, 0.01))
            x = rng_chance(&F->r, 0.5) ? 0.0 : -0.0;
        ref_store(buf, dt, i, x);
    }
}

static kvrt_dtype random_dtype(fuzz *F) { return (kvrt_dtype)rng_below(&F->r, 3); }

/* ------------------------------------------------------------------------ */
/* Cache descriptions                                                        */
/* ------------------------------------------------------------------------ */

static kvrt_layer_desc attn_layer(fuzz *F, int window)
{
    static const int heads[] = {1, 2, 4};
    kvrt_layer_desc l;
    memset(&l, 0, sizeof l);
    l.kind = KVRT_LAYER_ATTN;
    l.n_kv_heads = heads[rng_below(&F->r, 3)];
    l.head_dim_k = rng_chance(&F->r, 0.5) ? 16 : 8;
    l.head_dim_v = rng_chance(&F->r, 0.7) ? l.head_dim_k : 24 - l.head_dim_k;
    l.window = window;
    return l;
}

static kvrt_layer_desc mla_layer(int latent, int rope)
{
    kvrt_layer_desc l;
    memset(&l, 0, sizeof l);
    l.kind = KVRT_LAYER_MLA;
    l.latent_dim = latent;
    l.rope_dim = rope;
    return l;
}

static kvrt_layer_desc cross_layer(fuzz *F)
{
    kvrt_layer_desc l;
    memset(&l, 0, sizeof l);
    l.kind = KVRT_LAYER_CROSS;
    l.n_kv_heads = 1 + (int)rng_below(&F->r, 2);
    l.head_dim_k = rng_chance(&F->r, 0.5) ? 16 : 8;
    l.head_dim_v = rng_chance(&F->r, 0.7) ? l.head_dim_k : 24 - l.head_dim_k;
    return l;
}

/* The q8 and fp8 shapes: ATTN layers (full and sliding-window, own RoPE
 * bases sometimes) and sometimes a CROSS layer; quantized caches hold no
 * MLA layer. */
static int quant_layers(fuzz *F)
{
    rng *r = &F->r;
    int n = 0;
    F->layers[n++] = attn_layer(F, 0);
    if (rng_chance(r, 0.5))
        F->layers[n++] = attn_layer(F, rng_chance(r, 0.5) ? 0 : 4 + (int)rng_below(r, 40));
    if (rng_chance(r, 0.3))
        F->layers[n++] = cross_layer(F);
    if (rng_chance(r, 0.3))
        F->layers[n - 1 - (F->layers[n - 1].kind == KVRT_LAYER_CROSS)].rope_theta = 1000000.0f;
    return n;
}

/* The pre-RoPE shape: ATTN layers with a local and a global base (Gemma 3),
 * sometimes sliding windows, MLA or CROSS layers. */
static int prerope_layers(fuzz *F)
{
    rng *r = &F->r;
    int n = 0, window = rng_chance(r, 0.4) ? 4 + (int)rng_below(r, 40) : 0;
    kvrt_layer_desc local = attn_layer(F, window), global = attn_layer(F, 0);
    local.rope_theta = rng_chance(r, 0.5) ? 10000.0f : 0.0f;
    global.rope_theta = rng_chance(r, 0.7) ? 1000000.0f : 0.0f;
    F->layers[n++] = local;
    F->layers[n++] = global;
    if (rng_chance(r, 0.3)) {
        F->layers[n] = mla_layer(16, 8);
        F->layers[n++].rope_theta = rng_chance(r, 0.5) ? 50.0f : 0.0f;
    }
    if (rng_chance(r, 0.2))
        F->layers[n++] = cross_layer(F);
    return n;
}

static void make_layers(fuzz *F)
{
    rng *r = &F->r;
    int n = 0;
    switch (F->opt->model) {
    case MODEL_ATTN: {
        int count = 1 + (int)rng_below(r, 3);
        for (int i = 0; i < count; i++)
            F->layers[n++] = attn_layer(F, 0);
        break;
    }
    case MODEL_GEMMA: {
        static const int windows[] = {8, 20, 48, 5};
        int window = rng_chance(r, 0.7) ? 32 : windows[rng_below(r, 4)];
        kvrt_layer_desc swa = attn_layer(F, window), global = attn_layer(F, 0);
        swa.n_kv_heads = global.n_kv_heads = 1 + (int)rng_below(r, 2);
        for (int i = 0; i < 5; i++)
            F->layers[n++] = swa;
        F->layers[n++] = global;
        break;
    }
    case MODEL_DEEPSEEK: {
        if (rng_chance(r, 0.08)) {
            F->layers[n++] = mla_layer(512, 64);
        } else {
            int count = 1 + (int)rng_below(r, 2);
            int rope = rng_chance(r, 0.1) ? 0 : 16;
            for (int i = 0; i < count; i++)
                F->layers[n++] = mla_layer(64, rope);
        }
        break;
    }
    case MODEL_WHISPER: {
        int count = 1 + (int)rng_below(r, 2);
        for (int i = 0; i < count; i++) {
            F->layers[n++] = attn_layer(F, 0);
            F->layers[n++] = cross_layer(F);
        }
        break;
    }
    case MODEL_PREFIX: { /* full attention, maybe a sliding window and MLA */
        F->layers[n++] = attn_layer(F, 0);
        if (rng_chance(r, 0.3))
            F->layers[n++] = attn_layer(F, 0);
        if (rng_chance(r, 0.5))
            F->layers[n++] = attn_layer(F, 2 + (int)rng_below(r, 40));
        if (rng_chance(r, 0.3))
            F->layers[n++] = mla_layer(16, rng_chance(r, 0.8) ? 8 : 0);
        break;
    }
    case MODEL_Q8:
    case MODEL_FP8:
        n = quant_layers(F);
        break;
    case MODEL_PREROPE:
        n = prerope_layers(F);
        break;
    default: { /* mixed: one of each, in random order */
        kvrt_layer_desc all[4] = {attn_layer(F, 0), attn_layer(F, 8 + (int)rng_below(r, 33)),
                                  mla_layer(rng_chance(r, 0.5) ? 16 : 32, rng_chance(r, 0.8) ? 8 : 0),
                                  cross_layer(F)};
        for (int i = 3; i > 0; i--) {
            int j = (int)rng_below(r, i + 1);
            kvrt_layer_desc t = all[i];
            all[i] = all[j];
            all[j] = t;
        }
        for (int i = 0; i < 4; i++)
            F->layers[n++] = all[i];
        break;
    }
    }
    F->n_layers = n;
}

/* What the q8, fp8 and prerope shapes set beyond the drawn description: the
 * quantized dtype; the pre-RoPE mode (queries rotated by kvrt or not, n_rot
 * partial or whole; quantized on the CPU backend only, as GPU caches are
 * f32/f16/bf16 in this build). Draws from F->r after everything else. */
static void shape_desc(fuzz *F, kvrt_cache_desc *d)
{
    if (F->opt->model == MODEL_Q8 || F->opt->model == MODEL_FP8)
        d->dtype = F->opt->model == MODEL_Q8 ? KVRT_Q8 : KVRT_FP8_E4M3;
    if (F->opt->model != MODEL_PREROPE)
        return;
    d->rope.mode = KVRT_ROPE_IN_ATTENTION;
    d->rope.rotate_q = rng_chance(&F->r, 0.5);
    if (F->opt->dtype < 0 && F->opt->backend == KVRT_BACKEND_CPU && rng_chance(&F->r, 0.3))
        d->dtype = rng_chance(&F->r, 0.5) ? KVRT_Q8 : KVRT_FP8_E4M3;
    for (int l = 0; l < F->n_layers; l++) /* quantized caches hold no MLA layer */
        if (kvrt_dtype_is_quantized(d->dtype) && F->layers[l].kind == KVRT_LAYER_MLA)
            d->dtype = KVRT_F32;
}

/* The description's RoPE mode and per-layer bases, after F->config's first
 * `at` characters. */
static void shape_config(fuzz *F, int at)
{
    const kvrt_cache_desc *d = &F->desc;
    if (d->rope.mode == KVRT_ROPE_IN_ATTENTION && at < (int)sizeof F->config)
        at += snprintf(F->config + at, sizeof F->config - (size_t)at,
                       "; rope in attention, rotate_q %d", d->rope.rotate_q);
    for (int l = 0; l < F->n_layers && at < (int)sizeof F->config; l++)
        if (F->layers[l].rope_theta != 0.0f)
            at += snprintf(F->config + at, sizeof F->config - (size_t)at, "; layer %d theta %g", l,
                           (double)F->layers[l].rope_theta);
}

static void make_desc(fuzz *F)
{
    rng *r = &F->r;
    const options *o = F->opt;
    kvrt_cache_desc *d = &F->desc;
    kvrt_cache_desc_init(d);
    make_layers(F);
    d->device.backend = o->backend;
    d->device.ordinal = 0;
    d->dtype = o->dtype >= 0 ? (kvrt_dtype)o->dtype : random_dtype(F);
    d->n_layers = F->n_layers;
    d->layers = F->layers;
    d->max_seqs = 1 + (int)rng_below(r, MAX_SEQS);
    if (o->block_size)
        d->block_size = o->block_size;
    else if (o->model == MODEL_GEMMA && rng_chance(r, 0.5))
        d->block_size = 16;
    else
        d->block_size = 1 << (rng_chance(r, 0.05) ? 7 + rng_below(r, 2) : rng_below(r, 7));
    int big = 0;
    for (int l = 0; l < F->n_layers; l++)
        big |= F->layers[l].latent_dim >= 512;
    int64_t slots = big ? rng_between(r, 8, 64) : rng_between(r, 12, 256);
    d->n_blocks = (int)(slots / d->block_size);
    if (d->n_blocks < 1)
        d->n_blocks = 1;
    if (d->n_blocks < 3 && rng_chance(r, 0.5))
        d->n_blocks += (int)rng_below(r, 3);
    d->max_blocks = rng_chance(r, 0.3) ? d->n_blocks + 1 + (int)rng_below(r, 2 * d->n_blocks) : 0;
    int has_cross = 0, min_dk = 1024, has_swa = 0;
    for (int l = 0; l < F->n_layers; l++) {
        has_cross |= F->layers[l].kind == KVRT_LAYER_CROSS;
        has_swa |= F->layers[l].window > 0;
        if (F->layers[l].kind == KVRT_LAYER_ATTN && F->layers[l].head_dim_k < min_dk)
            min_dk = F->layers[l].head_dim_k;
    }
    d->cross_max_len = has_cross ? 1 + (int)rng_below(r, 24) : 0;
    static const int rots[] = {0, 2, 4, 6, 8, 16};
    do
        d->rope.n_rot = rots[rng_below(r, 6)];
    while (d->rope.n_rot > min_dk);
    if (min_dk == 1024) /* no ATTN layer: n_rot is 0 or the MLA layers' rope_dim */
        for (int l = 0; l < F->n_layers; l++)
            if (F->layers[l].kind == KVRT_LAYER_MLA && d->rope.n_rot != 0)
                d->rope.n_rot = F->layers[l].rope_dim;
    static const float thetas[] = {10000.0f, 500000.0f, 1000000.0f, 50.0f};
    static const float scales[] = {1.0f, 1.0f, 0.5f, 0.25f, 2.0f};
    d->rope.theta = thetas[rng_below(r, 4)];
    d->rope.freq_scale = scales[rng_below(r, 5)];
    d->rope.style = rng_chance(r, 0.5) ? KVRT_ROPE_NORMAL : KVRT_ROPE_NEOX;
    d->swa_full = has_swa && rng_chance(r, 0.2);
    F->max_tokens = 1 + (int)rng_below(r, MAX_TOKENS);
    if (rng_chance(r, 0.5) && F->max_tokens < 8)
        F->max_tokens += 8;
    if (o->model == MODEL_PREFIX) { /* small blocks, so that prompts share many */
        d->prefix_cache = rng_chance(r, 0.5) ? KVRT_PREFIX_BLAKE2B : KVRT_PREFIX_XXH3;
        if (!o->block_size)
            d->block_size = 1 << rng_below(r, 5);
        d->n_blocks = (int)(rng_between(r, 24, 200) / d->block_size);
        if (d->n_blocks < 2)
            d->n_blocks = 2;
        if (d->max_blocks > 0 && d->max_blocks < d->n_blocks)
            d->max_blocks = d->n_blocks + 1;
        if (d->max_seqs < 3)
            d->max_seqs = 3 + (int)rng_below(r, MAX_SEQS - 2);
    }

    shape_desc(F, d);
    int at = snprintf(F->config, sizeof F->config,
                      "%s, %s, max_seqs %d, block_size %d, n_blocks %d, max_blocks %d, rope n_rot "
                      "%d theta %g scale %g %s, swa_full %d, cross_max_len %d, max_tokens %d, "
                      "prefix_cache %d; layers:",
                      kvrt_backend_name(d->device.backend), kvrt_dtype_name(d->dtype), d->max_seqs,
                      d->block_size, d->n_blocks, d->max_blocks, d->rope.n_rot, (double)d->rope.theta,
                      (double)d->rope.freq_scale, d->rope.style ? "neox" : "normal", d->swa_full,
                      d->cross_max_len, F->max_tokens, d->prefix_cache);
    for (int l = 0; l < F->n_layers && at < (int)sizeof F->config; l++) {
        const kvrt_layer_desc *L = &F->layers[l];
        if (L->kind == KVRT_LAYER_MLA)
            at += snprintf(F->config + at, sizeof F->config - (size_t)at, " mla %d+%d",
                           L->latent_dim, L->rope_dim);
        else
            at += snprintf(F->config + at, sizeof F->config - (size_t)at, " %s %dx%d/%d%s%.0d",
                           L->kind == KVRT_LAYER_CROSS ? "cross" : "attn", L->n_kv_heads,
                           L->head_dim_k, L->head_dim_v, L->window ? " w" : "", L->window);
    }
    shape_config(F, at);
}

/* Invalid descriptions: each must be refused with INVALID_ARG and *out NULL. */
static void check_invalid_descs(fuzz *F)
{
    static const float non_finite[] = {INFINITY, -INFINITY, NAN};
    static const float negative[] = {-FLT_MAX, -FLT_MIN, -FLT_TRUE_MIN, -1e-30f};
    for (int k = 0; k < 23; k++) {
        kvrt_cache_desc d = F->desc;
        kvrt_layer_desc layers[MAX_LAYERS];
        memcpy(layers, F->layers, sizeof layers);
        d.layers = layers;
        int l = (int)rng_below(&F->r, F->n_layers);
        int self = layers[l].kind != KVRT_LAYER_CROSS;
        const char *what = "";
        switch (k) {
        case 0: d.block_size = 3 << rng_below(&F->r, 4), what = "block_size not a power of two"; break;
        case 1: d.block_size = 512, what = "block_size 512"; break;
        case 2: d.n_blocks = 0, what = "n_blocks 0"; break;
        case 3: d.max_seqs = 0, what = "max_seqs 0"; break;
        case 4: d.dtype = (kvrt_dtype)7, what = "dtype 7"; break;
        case 5: d.rope.n_rot = 3, what = "odd n_rot"; break;
        case 6: d.n_layers = 0, what = "n_layers 0"; break;
        case 7: d.layers = NULL, what = "layers NULL"; break;
        case 8: d.max_blocks = d.n_blocks > 1 ? d.n_blocks - 1 : -1, what = "max_blocks < n_blocks"; break;
        case 9:
            if (layers[l].kind == KVRT_LAYER_MLA)
                layers[l].latent_dim = 12;
            else
                layers[l].head_dim_k = 12;
            what = "a dimension not a multiple of 8";
            break;
        case 10:
            if (layers[l].kind == KVRT_LAYER_MLA)
                layers[l].n_kv_heads = 2;
            else
                layers[l].latent_dim = 8;
            what = "a field that does not apply";
            break;
        case 11: layers[l].window = self ? -1 : 4, what = "bad window"; break;
        case 12: layers[l].kind = (kvrt_layer_kind)5, what = "kind 5"; break;
        case 13: d.rope.theta = 0, what = "theta 0"; break;
        case 14: d.rope.style = (kvrt_rope_style)3, what = "rope style 3"; break;
        case 15: d.rope.theta = non_finite[rng_below(&F->r, 3)], what = "theta inf or NaN"; break;
        case 16: d.rope.freq_scale = non_finite[rng_below(&F->r, 3)], what = "freq_scale inf or NaN"; break;
        case 17: /* -0 once passed ">= 0" and then failed the state check */
            layers[l].rope_theta = self ? -0.0f : 1.0f, what = "layer rope_theta -0 (CROSS: 1)";
            break;
        case 18: d.rope.theta = -0.0f, what = "theta -0"; break;
        case 19: d.n_threads = 4097, what = "n_threads 4097"; break;
        case 20: /* the far ends of the negative floats, a denormal among them */
            d.rope.theta = negative[rng_below(&F->r, 4)], what = "theta -FLT_MAX or a negative denormal";
            break;
        case 21:
            if (rng_chance(&F->r, 0.5))
                d.rope.freq_scale = -0.0f, what = "freq_scale -0";
            else
                layers[l].rope_theta = self ? negative[rng_below(&F->r, 4)] : -1.0f,
                what = "layer rope_theta -FLT_MAX or a negative denormal (CROSS: -1)";
            break;
        default:
            if (layers[l].kind == KVRT_LAYER_MLA)
                layers[l].rope_dim = 7;
            else if (layers[l].kind == KVRT_LAYER_ATTN)
                d.rope.n_rot = layers[l].head_dim_k + 2;
            else
                d.cross_max_len = 0;
            what = "rope_dim odd, n_rot > head_dim_k or cross_max_len 0";
            break;
        }
        kvrt_cache *c = (kvrt_cache *)&d; /* must be overwritten with NULL */
        oplog(F, "kvrt_cache_create(%s)", what);
        kvrt_status st = kvrt_cache_create(&d, &c);
        oplog_status(F, st);
        expect(F, "kvrt_cache_create with an invalid description", st, SET(ERR_INVALID_ARG));
        if (c != NULL)
            fail(F, "kvrt_cache_create failed but left *out non-NULL");
        if (kvrt_last_error()[0] == '\0')
            fail(F, "kvrt_cache_create failed without a message");
    }
    kvrt_cache *c = NULL;
    expect(F, "kvrt_cache_create(NULL desc)", kvrt_cache_create(NULL, &c), SET(ERR_INVALID_ARG));
    expect(F, "kvrt_cache_create(NULL out)", kvrt_cache_create(&F->desc, NULL), SET(ERR_INVALID_ARG));
}

static void scenario_desc(fuzz *F);
static void prefix_setup(fuzz *F);

/* One stream in four (not scenarios) runs with a second handle naming every
 * layer of the first, so that each operation, state and offload included,
 * may go through either; in one of those three the first handle is
 * destroyed at once and the draft alone holds the cache. */
static void shared_setup(fuzz *F)
{
    rng_seed(&F->hr, F->opt->seed ^ 0x5ca1ab1e0ddba11ull, (uint64_t)F->stream);
    F->base = F->cache;
    if (F->sc != NULL || !rng_chance(&F->hr, 0.25))
        return;
    int base_layers[MAX_LAYERS];
    for (int l = 0; l < F->n_layers; l++)
        base_layers[l] = l;
    /* half the time from the description the cache returns, whose layer
     * table lives inside the cache (it once read freed memory) */
    int own = rng_chance(&F->hr, 0.5);
    oplog(F, "kvrt_cache_create_shared(every layer, %s)",
          own ? "kvrt_cache_get_desc's description" : "the description");
    kvrt_status st = kvrt_cache_create_shared(F->cache, own ? kvrt_cache_get_desc(F->cache) : &F->desc,
                                              base_layers, &F->draft);
    oplog_status(F, st);
    if (st != KVRT_OK)
        fail(F, "kvrt_cache_create_shared returned %s: %s", sname(st), kvrt_last_error());
    if (rng_chance(&F->hr, 1.0 / 3)) {
        oplog(F, "kvrt_cache_destroy(the first handle)");
        kvrt_cache_destroy(F->base);
        F->base = NULL;
    }
    F->cache = F->base != NULL ? F->base : F->draft;
    size_t at = strlen(F->config);
    snprintf(F->config + at, sizeof F->config - at, "%s",
             F->base != NULL ? "; a shared handle" : "; a shared handle alone");
}

/* The handle the next operation goes through. */
static void shared_pick(fuzz *F)
{
    if (F->draft == NULL || F->base == NULL)
        return;
    kvrt_cache *c = rng_chance(&F->hr, 0.5) ? F->draft : F->base;
    if (c != F->cache)
        oplog(F, "(through the %s handle)", c == F->draft ? "draft" : "first");
    F->cache = c;
}

static void shared_teardown(fuzz *F)
{
    if (F->draft != NULL && F->base != NULL && rng_chance(&F->hr, 0.5)) {
        kvrt_cache_destroy(F->base); /* either may go first */
        F->base = NULL;
    }
    kvrt_cache_destroy(F->base);
    kvrt_cache_destroy(F->draft);
    F->cache = NULL;
}

static void stream_setup(fuzz *F)
{
    F->op_index = -1;
    if (F->sc != NULL) {
        scenario_desc(F);
    } else {
        make_desc(F);
        if (rng_chance(&F->r, 0.1))
            check_invalid_descs(F);
    }
    oplog(F, "kvrt_cache_create(%s)", F->config);
    kvrt_status st = kvrt_cache_create(&F->desc, &F->cache);
    oplog_status(F, st);
    if (st != KVRT_OK)
        fail(F, "kvrt_cache_create returned %s", sname(st));
    shared_setup(F);
    F->ref = ref_create(&F->desc);
    ref_policy policy;
    memset(&policy, 0, sizeof policy); /* every open reading allows either answer */
    policy.rm_drops_cross = REF_RM_CROSS_FULL_RANGE;
    ref_set_policy(F->ref, &policy);

    const kvrt_cache_desc *got = kvrt_cache_get_desc(F->cache);
    if (got == NULL || got->n_layers != F->n_layers || got->block_size != F->desc.block_size ||
        got->max_seqs != F->desc.max_seqs || got->dtype != F->desc.dtype ||
        memcmp(got->layers, F->layers, sizeof(kvrt_layer_desc) * (size_t)F->n_layers) != 0)
        fail(F, "kvrt_cache_get_desc differs from the description");

    F->n_groups = kvrt_cache_n_groups(F->cache);
    if (F->n_groups < 1 || F->n_groups > F->n_layers)
        fail(F, "kvrt_cache_n_groups is %d for %d layers", F->n_groups, F->n_layers);
    for (int g = 0; g < F->n_groups; g++)
        F->g[g].first_layer = -1;
    for (int l = 0; l < F->n_layers; l++) {
        layer_info *L = &F->li[l];
        L->d = F->layers[l];
        L->group = kvrt_layer_group(F->cache, l);
        if (L->group < 0 || L->group >= F->n_groups)
            fail(F, "kvrt_layer_group(%d) is %d of %d groups", l, L->group, F->n_groups);
        L->k_elems = ref_k_elems(F->ref, l);
        L->v_elems = ref_v_elems(F->ref, l);
        L->rotary = xmalloc((size_t)L->k_elems);
        for (int64_t e = 0; e < L->k_elems; e++)
            L->rotary[e] = (uint8_t)ref_k_elem_rotary(F->ref, l, e);
        size_t row = kvrt_layer_row_bytes(&L->d, F->desc.dtype);
        if (row != (size_t)(L->k_elems + L->v_elems) * kvrt_dtype_size(F->desc.dtype) +
                       kvrt_layer_scale_bytes(&L->d, F->desc.dtype))
            fail(F, "kvrt_layer_row_bytes(layer %d) is %zu", l, row);
        group_desc *G = &F->g[L->group];
        int self = L->d.kind != KVRT_LAYER_CROSS;
        if (G->first_layer < 0) {
            G->first_layer = l;
            G->self = self;
            G->window = L->d.window;
            G->evicting = L->d.window > 0 && !F->desc.swa_full;
        } else if (G->self != self || G->window != L->d.window) {
            fail(F, "layer %d shares group %d with layer %d of another kind or window", l, L->group,
                 G->first_layer);
        }
    }
    for (int g = 0; g < F->n_groups; g++)
        F->has_full |= F->g[g].self && !F->g[g].evicting;
    prefix_setup(F);
    if (kvrt_layer_group(F->cache, -1) != -1 || kvrt_layer_group(F->cache, F->n_layers) != -1)
        fail(F, "kvrt_layer_group of a layer out of range is not -1");

    st = kvrt_batch_create(F->cache, F->max_tokens, &F->batch);
    if (st != KVRT_OK)
        fail(F, "kvrt_batch_create(%d) returned %s", F->max_tokens, sname(st));
    if (kvrt_batch_n_tokens(F->batch) != 0)
        fail(F, "a new batch has %d tokens", kvrt_batch_n_tokens(F->batch));
    F->plan_state = PLAN_NONE;
    F->plan_n = 0;
    for (int s = 0; s < MAX_SEQS; s++)
        F->pristine[s] = 1;
    F->snap[0] = calloc(1, sizeof(snapshot));
    F->snap[1] = calloc(1, sizeof(snapshot));
    if (!F->snap[0] || !F->snap[1])
        fprintf(stderr, "kvrt-fuzz: out of host memory\n"), exit(1);
    F->cur = 0;
    take_snapshot(F, F->snap[0]);
    F->op_index = 0;
    check(F, 1);
}

static void stream_teardown(fuzz *F)
{
    kvrt_offload_free(F->off);
    ref_destroy(F->off_ref);
    kvrt_batch_destroy(F->batch);
    shared_teardown(F);
    ref_destroy(F->ref);
    snapshot_free(F->snap[0]);
    snapshot_free(F->snap[1]);
    for (int l = 0; l < F->n_layers; l++)
        free(F->li[l].rotary);
    dev_free(F->dk.p);
    dev_free(F->dv.p);
    dev_free(F->dq.p);
    dev_free(F->dout.p);
    free(F->hk);
    free(F->hv);
    free(F->hq);
    free(F->hout);
    free(F->qd);
    free(F->outd);
}

/* ------------------------------------------------------------------------ */
/* Writes                                                                    */
/* ------------------------------------------------------------------------ */

/* Status sets of a call that needs the batch's plan. */
static ref_status_set plan_needed(const fuzz *F, ref_status_set when_valid)
{
    switch (F->plan_state) {
    case PLAN_VALID: return when_valid;
    case PLAN_MAYBE: return when_valid | SET(ERR_INVALID_ARG);
    default: return SET(ERR_INVALID_ARG);
    }
}

/* Writes random rows of the planned tokens into one self layer. */
static void prefix_rows(fuzz *F, int layer, void *k, void *v, kvrt_dtype src);

static void op_write(fuzz *F, int layer)
{
    const layer_info *L = &F->li[layer];
    kvrt_dtype src = random_dtype(F);
    size_t es = kvrt_dtype_size(src);
    int n = F->plan_n;
    size_t kb = (size_t)n * (size_t)L->k_elems * es, vb = (size_t)n * (size_t)L->v_elems * es;
    void *hk = host_buf(&F->hk, &F->hk_cap, kb), *hv = host_buf(&F->hv, &F->hv_cap, vb);
    fill_random(F, hk, src, n * L->k_elems);
    fill_random(F, hv, src, n * L->v_elems);
    if (F->prefix)
        prefix_rows(F, layer, hk, hv, src);
    void *dk = dbuf_get(&F->dk, kb), *dv = L->v_elems ? dbuf_get(&F->dv, vb) : NULL;
    dev_upload(dk, hk, kb);
    if (dv)
        dev_upload(dv, hv, vb);
    ref_status_set allowed =
        plan_needed(F, ref_write(F->ref, layer, n, F->plan_seq, F->plan_pos, hk, dv ? hv : NULL, src, 0));
    oplog(F, "kvrt_write(layer %d, %d tokens, src %s)", layer, n, kvrt_dtype_name(src));
    kvrt_status st = kvrt_write(F->cache, F->batch, layer, dk, dv, src, NULL);
    oplog_status(F, st);
    expect(F, "kvrt_write", st, allowed);
    if (st == KVRT_OK)
        ref_write(F->ref, layer, n, F->plan_seq, F->plan_pos, hk, dv ? hv : NULL, src, 1);
    check(F, st != KVRT_OK);
}

/* ------------------------------------------------------------------------ */
/* Attention                                                                 */
/* ------------------------------------------------------------------------ */

/* Largest |K| element, largest |V| element and largest re-rotation bound
 * over the rows a query of seq at qpos sees in a layer; the count of them. */
static int64_t visible_rows(const fuzz *F, int layer, int32_t seq, int32_t qpos, double *kmax,
                            double *vmax, double *kerr)
{
    const layer_info *L = &F->li[layer];
    *kmax = *vmax = *kerr = 0;
    if (L->d.kind == KVRT_LAYER_CROSS) {
        const double *ck, *cv;
        int cn = ref_cross_rows(F->ref, layer, seq, &ck, &cv);
        for (int64_t e = 0; e < cn * L->k_elems; e++)
            *kmax = fmax(*kmax, fabs(ck[e]));
        for (int64_t e = 0; e < cn * L->v_elems; e++)
            *vmax = fmax(*vmax, fabs(cv[e]));
        return cn;
    }
    int64_t n, count = 0;
    const ref_token *t = ref_seq_tokens(F->ref, seq, &n);
    int64_t off = ref_layer_offset(F->ref, layer);
    int mla = L->d.kind == KVRT_LAYER_MLA;
    for (int64_t i = 0; i < n; i++) {
        if (t[i].pos > qpos || (L->d.window > 0 && (int64_t)t[i].pos <= (int64_t)qpos - L->d.window))
            continue;
        const double *k = t[i].data + off;
        for (int64_t e = 0; e < L->k_elems; e++)
            *kmax = fmax(*kmax, fabs(k[e]));
        const double *v = mla ? k : k + L->k_elems;
        int64_t nv = mla ? L->d.latent_dim : L->v_elems;
        for (int64_t e = 0; e < nv; e++)
            *vmax = fmax(*vmax, fabs(v[e]));
        *kerr = fmax(*kerr, rotation_bound(F, layer, k, t[i].rotations[layer]));
        count++;
    }
    return count;
}

/* Whether every row a query of seq at qpos sees in a layer has been written. */
static int visible_written(const fuzz *F, int layer, int32_t seq, int32_t qpos)
{
    const layer_info *L = &F->li[layer];
    if (L->d.kind == KVRT_LAYER_CROSS)
        return 1;
    int64_t n;
    const ref_token *t = ref_seq_tokens(F->ref, seq, &n);
    for (int64_t i = 0; i < n; i++) {
        if (t[i].pos > qpos || (L->d.window > 0 && (int64_t)t[i].pos <= (int64_t)qpos - L->d.window))
            continue;
        if (!t[i].written[layer])
            return 0;
    }
    return 1;
}

/* Unit roundoff of a dtype's elements. */
static double dtype_unit(kvrt_dtype dt)
{
    return dt == KVRT_F32 ? 0x1.0p-24 : dt == KVRT_F16 ? 0x1.0p-11 : 0x1.0p-8;
}

/* An attention output dtype other than f32: the cache's, or for quantized
 * caches any of f16 and bf16. */
static kvrt_dtype out_dtype_other(fuzz *F)
{
    if (kvrt_dtype_is_quantized(F->desc.dtype))
        return rng_chance(&F->r, 0.5) ? KVRT_F16 : KVRT_BF16;
    return F->desc.dtype;
}

/* Pre-RoPE: kvrt turns each key (and with rotate_q each query) in f32 as
 * it reads it, the reference in double. As one re-rotation of stored K
 * (rotation_bound), a turned key is within 4 * 2^-22 * kmax + 2^-24 of the
 * reference's, and a turned query's error adds as much to a logit
 * (|dq . k| <= |dq|_1 kmax), so kerr grows by that once or twice. */
static double prerope_kerr(const fuzz *F, const layer_info *L, double kmax)
{
    if (F->desc.rope.mode != KVRT_ROPE_IN_ATTENTION || L->d.kind == KVRT_LAYER_CROSS)
        return 0;
    return (F->desc.rope.rotate_q ? 2 : 1) * (4 * 0x1.0p-22 * kmax + 0x1.0p-24);
}

/* Attention of the planned tokens over one layer, against the reference in
 * double. The bound: logits differ by at most
 *     ds = scale * |q|_1 * (kmax * (u + (dk + 8) * 2^-24) + kerr) + softcap * 2^-21
 * (K and q rounded to the cache dtype, u its unit roundoff, for backends
 * that compute in it; f32 dot products; re-rotated K off by kerr), which
 * moves the softmax weights by at most expm1(2 ds) in L1, so an output is
 * within
 *     vmax * (expm1(2 ds) + u + (n_keys + dk + 16) * 2^-23) + u_out * vmax
 * of the reference (u_out: 2^-24 for f32 output, else u). */
static void op_attention(fuzz *F, int layer)
{
    const layer_info *L = &F->li[layer];
    if (F->attention_unsupported[L->d.kind])
        return;
    rng *r = &F->r;
    int mla = L->d.kind == KVRT_LAYER_MLA;
    int n_kv = mla ? 1 : L->d.n_kv_heads;
    int dk = mla ? L->d.latent_dim + L->d.rope_dim : L->d.head_dim_k;
    int dv = mla ? L->d.latent_dim : L->d.head_dim_v;
    kvrt_attention_params p;
    memset(&p, 0, sizeof p);
    p.n_q_heads = mla ? 1 + (int)rng_below(r, 4) : n_kv * (1 + (int)rng_below(r, 3));
    p.scale = rng_chance(r, 0.5) ? 0.0f : (float)(0.05 + rng_unit(r) * 0.5);
    p.softcap = rng_chance(r, 0.7) ? 0.0f : (float)(0.5 + rng_unit(r) * 30);
    p.q_dtype = random_dtype(F);
    p.out_dtype = rng_chance(r, 0.5) ? KVRT_F32 : out_dtype_other(F);
    int n = F->plan_n;
    int64_t q_elems = (int64_t)n * p.n_q_heads * dk, out_elems = (int64_t)n * p.n_q_heads * dv;
    size_t qb = (size_t)q_elems * kvrt_dtype_size(p.q_dtype);
    size_t ob = (size_t)out_elems * kvrt_dtype_size(p.out_dtype);
    void *hq = host_buf(&F->hq, &F->hq_cap, qb), *hout = host_buf(&F->hout, &F->hout_cap, ob);
    fill_random(F, hq, p.q_dtype, q_elems);
    void *dq = dbuf_get(&F->dq, qb), *dout = dbuf_get(&F->dout, ob);
    dev_upload(dq, hq, qb);

    oplog(F, "kvrt_attention(layer %d, %d tokens, %d q heads, scale %g, softcap %g, q %s, out %s)",
          layer, n, p.n_q_heads, (double)p.scale, (double)p.softcap, kvrt_dtype_name(p.q_dtype),
          kvrt_dtype_name(p.out_dtype));
    kvrt_status st = kvrt_attention(F->cache, F->batch, layer, dq, dout, &p, NULL);
    oplog_status(F, st);
    if (st == KVRT_ERR_UNSUPPORTED) {
        F->attention_unsupported[L->d.kind] = 1;
        check(F, 1);
        return;
    }
    expect(F, "kvrt_attention", st, plan_needed(F, SET(OK)));
    if (st == KVRT_OK) {
        total_attention++;
        dev_download(hout, dout, ob);
        F->qd = host_buf((void **)&F->qd, &F->qd_cap, (size_t)p.n_q_heads * dk * sizeof(double));
        F->outd = host_buf((void **)&F->outd, &F->outd_cap, (size_t)p.n_q_heads * dv * sizeof(double));
        double scale = p.scale > 0 ? (double)p.scale : 1.0 / sqrt((double)dk);
        /* quantized caches: the reference holds the dequantized values,
         * which kvrt computes with in f32 */
        double u = dtype_unit(snap_dtype(F));
        double u_out = dtype_unit(p.out_dtype);
        for (int t = 0; t < n; t++) {
            int32_t seq = F->plan_seq[t], qpos = F->plan_pos[t];
            if (!visible_written(F, layer, seq, qpos))
                continue;
            for (int64_t e = 0; e < (int64_t)p.n_q_heads * dk; e++)
                F->qd[e] = ref_load(hq, p.q_dtype, (int64_t)t * p.n_q_heads * dk + e);
            int64_t keys = ref_attention(F->ref, layer, seq, qpos, F->qd, p.n_q_heads, scale,
                                         (double)p.softcap, F->outd);
            if (keys < 0)
                fail(F, "ref_attention failed for layer %d seq %d pos %d", layer, seq, (int)qpos);
            double kmax, vmax, kerr;
            visible_rows(F, layer, seq, qpos, &kmax, &vmax, &kerr);
            kerr += prerope_kerr(F, L, kmax);
            double q1 = 0;
            for (int h = 0; h < p.n_q_heads; h++) {
                double s = 0;
                for (int e = 0; e < dk; e++)
                    s += fabs(F->qd[(int64_t)h * dk + e]);
                q1 = fmax(q1, s);
            }
            double ds = scale * q1 * (kmax * (u + (dk + 8) * 0x1.0p-24) + kerr) +
                        (double)p.softcap * 0x1.0p-21;
            double tol = vmax * (expm1(2 * ds) + u + (double)(keys + dk + 16) * 0x1.0p-23) +
                         u_out * vmax;
            for (int64_t e = 0; e < (int64_t)p.n_q_heads * dv; e++) {
                double got = ref_load(hout, p.out_dtype, (int64_t)t * p.n_q_heads * dv + e);
                double want = F->outd[e];
                int ok = keys == 0 ? got == 0 : fabs(got - want) <= tol;
                if (keys > 0 && fabs(got - want) / tol > worst_attention_error)
                    worst_attention_error = fabs(got - want) / tol;
                if (!ok)
                    fail(F, "attention layer %d token %d (seq %d pos %d) head %" PRId64
                            " dim %" PRId64 ": %.9g, reference %.9g (difference %.3g, bound %.3g, "
                            "%" PRId64 " keys)",
                         layer, t, seq, (int)qpos, e / dv, e % dv, got, want, got - want, tol, keys);
            }
        }
    }
    check(F, 1);
}

/* ------------------------------------------------------------------------ */
/* Plans                                                                     */
/* ------------------------------------------------------------------------ */

/* Blocks a plan needs from group g's pool beyond those its sliding window
 * frees: bounds [lower, upper].
 * A group without eviction needs, per sequence, the blocks its new slots
 * take beyond its last block (lower) plus a copy of a partly used last block
 * when blocks are shared (upper).
 * A sliding-window group frees the blocks whose rows all lie at or below
 * the sequence's lowest new position - window. For a sequence only ever
 * appended to in position order, without holes, in a pool without shared
 * blocks, slot order is position order, so its gathered rows in blocks of
 * block_size are its page table and the count is exact. Otherwise eviction
 * can free anything (lower) or nothing (upper). */
static void plan_need(const fuzz *F, int n, const int32_t *seqs, const int32_t *pos, int g,
                      int64_t *lower, int64_t *upper)
{
    const snapshot *S = F->snap[F->cur];
    int64_t count[MAX_SEQS] = {0};
    int32_t pmin[MAX_SEQS];
    for (int i = 0; i < n; i++)
        if (seqs[i] >= 0 && seqs[i] < F->desc.max_seqs && pos[i] >= 0) {
            if (count[seqs[i]] == 0 || pos[i] < pmin[seqs[i]])
                pmin[seqs[i]] = pos[i];
            count[seqs[i]]++;
        }
    int64_t bs = F->desc.block_size;
    int shared = S->stats[g].blocks_shared > 0;
    *lower = *upper = 0;
    for (int s = 0; s < F->desc.max_seqs; s++) {
        if (count[s] == 0)
            continue;
        const kvrt_seq_group_info *I = &S->info[s][g];
        const snap_rows *r = &S->rows[s][F->g[g].first_layer];
        int64_t extra = (I->n_slots + count[s] + bs - 1) / bs - I->n_blocks;
        if (extra < 0)
            extra = 0;
        if (!F->g[g].evicting) {
            *lower += extra;
            *upper += extra + (I->n_slots % bs != 0 && shared);
        } else if (F->pristine[s] && !shared && I->n_slots == r->n) {
            int64_t limit = (int64_t)pmin[s] - F->g[g].window, evicted = 0;
            for (int64_t k = 0; limit >= -1 && k < I->n_blocks; k++) {
                int64_t last = (k + 1) * bs < r->n ? (k + 1) * bs : r->n;
                if (r->pos[last - 1] > limit) /* rows ascend within and across blocks */
                    break;
                evicted++;
            }
            int64_t kept = I->n_blocks - evicted;
            int64_t cur = kept == 0 ? 0 : I->n_slots - evicted * bs;
            int64_t exact = (cur + count[s] + bs - 1) / bs - kept - evicted;
            *lower += exact;
            *upper += exact;
        } else {
            *lower -= I->n_blocks;
            *upper += extra + (I->n_slots % bs != 0 && shared);
        }
    }
}

static int gen_plan(fuzz *F, int32_t *seqs, int32_t *pos)
{
    rng *r = &F->r;
    int max_seqs = F->desc.max_seqs;
    int order[MAX_SEQS];
    for (int s = 0; s < max_seqs; s++)
        order[s] = s;
    for (int s = max_seqs - 1; s > 0; s--) {
        int j = (int)rng_below(r, s + 1), t = order[s];
        order[s] = order[j];
        order[j] = t;
    }
    int n_seqs = 1 + (int)rng_below(r, max_seqs < 4 ? max_seqs : 4);
    int n = 0;
    for (int k = 0; k < n_seqs && n < MAX_BATCH; k++) {
        int32_t s = order[k];
        int32_t pmax = ref_seq_pos_max(F->ref, s);
        int64_t start = (int64_t)pmax + 1;
        double x = rng_unit(r);
        if (x < 0.08 && pmax >= 0)
            start = rng_between(r, 0, pmax);
        else if (x < 0.2)
            start += rng_between(r, 1, 40);
        else if (x < 0.21)
            start = INT32_MAX - rng_below(r, 40);
        int count = rng_chance(r, 0.55) ? 1 : 2 + (int)rng_below(r, 20);
        for (int c = 0; c < count && n < MAX_BATCH && start + c <= INT32_MAX; c++) {
            seqs[n] = s;
            pos[n] = (int32_t)(start + c);
            n++;
        }
    }
    if (rng_chance(r, 0.04)) { /* a position already present or twice in the batch */
        int i = (int)rng_below(r, n);
        int64_t m;
        const ref_token *t = ref_seq_tokens(F->ref, seqs[i], &m);
        if (m > 0 && rng_chance(r, 0.5))
            pos[i] = t[rng_below(r, m)].pos;
        else if (n > 1) {
            int j = (int)rng_below(r, n);
            seqs[i] = seqs[j];
            pos[i] = pos[j];
        }
    }
    if (rng_chance(r, 0.02))
        pos[rng_below(r, n)] = -1 - (int32_t)rng_below(r, 5);
    if (rng_chance(r, 0.02))
        seqs[rng_below(r, n)] = rng_chance(r, 0.5) ? -1 : max_seqs + (int32_t)rng_below(r, 3);
    if (n > F->max_tokens && rng_chance(r, 0.9))
        n = F->max_tokens;
    if (rng_chance(r, 0.4))
        for (int i = n - 1; i > 0; i--) {
            int j = (int)rng_below(r, i + 1);
            int32_t ts = seqs[i], tp = pos[i];
            seqs[i] = seqs[j];
            pos[i] = pos[j];
            seqs[j] = ts;
            pos[j] = tp;
        }
    return n;
}

static void log_plan(fuzz *F, int n, const int32_t *seqs, const int32_t *pos)
{
    char buf[LOG_LINE];
    int at = snprintf(buf, sizeof buf, "kvrt_batch_plan(n %d:", n);
    for (int i = 0; i < n && at < (int)sizeof buf - 24; i++)
        at += snprintf(buf + at, sizeof buf - (size_t)at, " %d@%d", (int)seqs[i], (int)pos[i]);
    if (at >= (int)sizeof buf - 24)
        snprintf(buf + sizeof buf - 25, 25, " ...");
    else
        snprintf(buf + at, sizeof buf - (size_t)at, ")");
    oplog(F, "%s", buf);
}

/* The sliding-window ring bound after a decode step of a sequence that was
 * only ever appended to in position order. */
static void check_ring(fuzz *F, int32_t seq)
{
    const snapshot *S = F->snap[F->cur];
    for (int g = 0; g < F->n_groups; g++) {
        if (!F->g[g].evicting)
            continue;
        int64_t bs = F->desc.block_size;
        int64_t bound = (F->g[g].window + bs - 1) / bs + 2;
        if (S->info[seq][g].n_blocks > bound)
            fail(F, "seq %d sliding-window group %d (window %d) holds %d blocks after a decode "
                    "step; at most %" PRId64 " expected",
                 seq, g, F->g[g].window, S->info[seq][g].n_blocks, bound);
    }
}

/* Plans n tokens, and after a successful plan writes every self layer
 * (now and then one stays unwritten) and maybe runs attention. */
static void do_plan(fuzz *F, int n, int32_t *seqs, int32_t *pos)
{
    const snapshot *S = before(F);
    const int32_t *tokens = F->plan_tokens;
    F->plan_tokens = NULL;
    ref_status_set allowed = tokens ? ref_plan_tokens(F->ref, n, seqs, pos, tokens, F->max_tokens, 0)
                                    : ref_plan(F->ref, n, seqs, pos, F->max_tokens, 0);
    /* sliding windows and capacity, judged on kvrt's own state */
    int shown = 0, missing = 0, miss_group = -1;
    int32_t miss_pos = -1, miss_tok = -1;
    for (int i = 0; i < n; i++) {
        if (seqs[i] < 0 || seqs[i] >= F->desc.max_seqs || pos[i] < 0)
            continue;
        /* kvrt judges a sequence by its lowest new position */
        int32_t pmin = pos[i];
        for (int j = 0; j < n; j++)
            if (seqs[j] == seqs[i] && pos[j] >= 0 && pos[j] < pmin)
                pmin = pos[j];
        shown |= window_evicted_shown(F, S, seqs[i], pmin);
        if (!missing && window_rows_missing(F, S, seqs[i], pos[i], &miss_group, &miss_pos)) {
            missing = 1;
            miss_tok = i;
        }
    }
    int cap_justified = 0, cap_required = 0;
    int64_t lower[MAX_LAYERS] = {0}, upper[MAX_LAYERS] = {0};
    for (int g = 0; g < F->n_groups; g++) {
        if (!F->g[g].self)
            continue;
        plan_need(F, n, seqs, pos, g, &lower[g], &upper[g]);
        int64_t avail = blocks_available(F, S, g);
        cap_justified |= upper[g] > avail;
        cap_required |= lower[g] > avail;
    }
    if (shown)
        allowed |= SET(ERR_WINDOW_EVICTED);
    if (cap_justified)
        allowed |= SET(ERR_CAPACITY);
    if (missing || cap_required)
        allowed &= ~SET(OK);
    if (n < 1 || n > F->max_tokens)
        allowed = SET(ERR_INVALID_ARG);

    int prev_n = kvrt_batch_n_tokens(F->batch);
    log_plan(F, n, seqs, pos);
    kvrt_status st = tokens ? kvrt_batch_plan_tokens(F->cache, n, seqs, pos, tokens, n, F->batch)
                            : kvrt_batch_plan(F->cache, n, seqs, pos, F->batch);
    oplog_status(F, st);
    tally_add(tokens ? "kvrt_batch_plan_tokens" : "kvrt_batch_plan", st);
    if (!REF_HAS(allowed, st)) {
        char want[256], detail[2048] = "";
        set_string(allowed, want, sizeof want);
        int at = 0;
        if (missing)
            at += snprintf(detail + at, sizeof detail - (size_t)at,
                           "; token %d (seq %d pos %d) needs position %d, which group %d no longer "
                           "holds",
                           miss_tok, (int)seqs[miss_tok], (int)pos[miss_tok], (int)miss_pos,
                           miss_group);
        for (int g = 0; g < F->n_groups && at < (int)sizeof detail; g++)
            if (F->g[g].self)
                at += snprintf(detail + at, sizeof detail - (size_t)at,
                               "; group %d needs %" PRId64 "..%" PRId64 " blocks, %" PRId64
                               " available",
                               g, lower[g], upper[g], blocks_available(F, S, g));
        for (int g = 0; g < F->n_groups && at < (int)sizeof detail; g++)
            for (int s = 0; s < F->desc.max_seqs && F->g[g].self && at < (int)sizeof detail; s++) {
                const kvrt_seq_group_info *I = &S->info[s][g];
                if (I->n_slots > 0)
                    at += snprintf(detail + at, sizeof detail - (size_t)at,
                                   "; g%d s%d: %" PRId64 " slots %d blocks pos [%d, %d] evicted_max %d",
                                   g, s, I->n_slots, I->n_blocks, (int)I->pos_min,
                                   (int)I->pos_max, (int)I->evicted_max);
            }
        fail(F, "kvrt_batch_plan returned %s; expected %s%s", sname(st), want, detail);
    }
    if (st != KVRT_OK) {
        F->n_errors_seen++;
        if (kvrt_batch_n_tokens(F->batch) != prev_n)
            fail(F, "a failed plan changed the batch's token count from %d to %d", prev_n,
                 kvrt_batch_n_tokens(F->batch));
        if (F->plan_state == PLAN_VALID)
            F->plan_state = PLAN_MAYBE;
        check(F, 1);
        return;
    }

    /* which sequences stay appended in position order */
    int decode[MAX_SEQS] = {0};
    for (int s = 0; s < F->desc.max_seqs; s++) { /* new slots follow in position order */
        int32_t last = ref_seq_pos_max(F->ref, s);
        int count = 0;
        for (int i = 0; i < n; i++) {
            if (seqs[i] != s)
                continue;
            count++;
            if (pos[i] <= last)
                F->pristine[s] = 0;
        }
        decode[s] = count == 1;
    }
    if (tokens)
        ref_plan_tokens(F->ref, n, seqs, pos, tokens, F->max_tokens, 1);
    else
        ref_plan(F->ref, n, seqs, pos, F->max_tokens, 1);
    if (kvrt_batch_n_tokens(F->batch) != n)
        fail(F, "the batch holds %d tokens after planning %d", kvrt_batch_n_tokens(F->batch), n);
    F->plan_state = PLAN_VALID;
    F->plan_n = n;
    memcpy(F->plan_seq, seqs, sizeof(int32_t) * (size_t)n);
    memcpy(F->plan_pos, pos, sizeof(int32_t) * (size_t)n);
    check(F, 0);
    for (int s = 0; s < F->desc.max_seqs; s++)
        if (decode[s] && F->pristine[s])
            check_ring(F, s);

    /* the writes of the step; now and then a layer stays unwritten (never in
     * a plan with token ids, whose keys need every layer) */
    for (int l = 0; l < F->n_layers; l++)
        if (F->li[l].d.kind != KVRT_LAYER_CROSS && (tokens || !rng_chance(&F->r, 0.03)))
            op_write(F, l);
    if (rng_chance(&F->r, 0.05)) { /* write a layer again */
        int l = (int)rng_below(&F->r, F->n_layers);
        if (F->li[l].d.kind != KVRT_LAYER_CROSS)
            op_write(F, l);
    }
    if (rng_chance(&F->r, 0.3))
        op_attention(F, (int)rng_below(&F->r, F->n_layers));
}

static void op_plan(fuzz *F)
{
    int32_t seqs[MAX_BATCH], pos[MAX_BATCH];
    int n = gen_plan(F, seqs, pos);
    do_plan(F, n, seqs, pos);
}

/* ------------------------------------------------------------------------ */
/* Sequence edits                                                            */
/* ------------------------------------------------------------------------ */

static int32_t random_seq(fuzz *F, double p_all, double p_bad)
{
    double x = rng_unit(&F->r);
    if (x < p_all)
        return -1;
    if (x < p_all + p_bad)
        return F->desc.max_seqs + (int32_t)rng_below(&F->r, 3);
    return (int32_t)rng_below(&F->r, F->desc.max_seqs);
}

/* A range [p0, p1) over the positions of seq (any sequence's when seq < 0). */
static void gen_range(fuzz *F, int32_t seq, int32_t *p0, int32_t *p1)
{
    rng *r = &F->r;
    if (seq < 0 || seq >= F->desc.max_seqs)
        seq = (int32_t)rng_below(r, F->desc.max_seqs);
    int64_t n;
    const ref_token *t = ref_seq_tokens(F->ref, seq, &n);
    if (n == 0) {
        *p0 = (int32_t)rng_below(r, 10);
        *p1 = rng_chance(r, 0.5) ? -1 : *p0 + (int32_t)rng_below(r, 10);
        return;
    }
    int32_t a = t[rng_below(r, n)].pos, b = t[rng_below(r, n)].pos;
    if (a > b) {
        int32_t x = a;
        a = b;
        b = x;
    }
    switch (rng_below(r, 12)) {
    case 0: *p0 = 0, *p1 = -1; break;
    case 1: case 2: *p0 = a, *p1 = -1; break;
    case 3: *p0 = 0, *p1 = a; break;
    case 4: case 5: *p0 = a, *p1 = b < INT32_MAX ? b + 1 : b; break;
    case 6: *p0 = a, *p1 = b; break;
    case 7: *p0 = a < INT32_MAX ? a + 1 : a, *p1 = b; break; /* maybe reversed */
    case 8: *p0 = -1 - (int32_t)rng_below(r, 100), *p1 = rng_chance(r, 0.5) ? -1 : b; break;
    case 9: *p0 = b < INT32_MAX ? b + 1 : b, *p1 = a; break; /* reversed unless a == b + 1 */
    case 10: *p0 = *p1 = a; break;
    default: {
        int32_t pmax = ref_seq_pos_max(F->ref, seq);
        *p0 = pmax < INT32_MAX - 10 ? pmax + 1 + (int32_t)rng_below(r, 10) : pmax;
        *p1 = -1;
        break;
    }
    }
}

/* Whether an edit of seq (all when < 0) may need a block for copy-on-write
 * that the pool cannot give: some shared block and fewer available blocks
 * than the affected page tables hold. Then KVRT_ERR_CAPACITY is a right
 * answer, also beside a collision (the checks may run in either order). */
static int cow_capacity_possible(const fuzz *F, int32_t seq)
{
    const snapshot *S = before(F);
    for (int g = 0; g < F->n_groups; g++) {
        if (!F->g[g].self || S->stats[g].blocks_shared == 0)
            continue;
        int64_t pages = 0;
        for (int s = 0; s < F->desc.max_seqs; s++)
            if (seq < 0 || s == seq)
                pages += S->info[s][g].n_blocks;
        if (blocks_available(F, S, g) < pages)
            return 1;
    }
    return 0;
}

static void finish_edit(fuzz *F, const char *call, kvrt_status st, ref_status_set allowed,
                        uint64_t digest, int always_stale)
{
    expect(F, call, st, allowed);
    if (st == KVRT_OK)
        edit_done(F, digest, always_stale);
    if (st == KVRT_OK && strcmp(call, "kvrt_seq_keep") != 0 && strcmp(call, "kvrt_seq_rm") != 0)
        F->prefix_exact = 0; /* keys of edited blocks go; edited sequences key no more */
    check(F, st != KVRT_OK);
}

static void op_rm(fuzz *F, int32_t seq, int32_t p0, int32_t p1)
{
    uint64_t digest = ref_digest(F);
    ref_status_set allowed = ref_seq_rm(F->ref, seq, p0, p1, 0);
    if ((allowed & ~SET(ERR_INVALID_ARG)) && cow_capacity_possible(F, seq))
        allowed |= SET(ERR_CAPACITY);
    oplog(F, "kvrt_seq_rm(seq %d, [%d, %d))", (int)seq, (int)p0, (int)p1);
    kvrt_status st = kvrt_seq_rm(F->cache, seq, p0, p1);
    oplog_status(F, st);
    if (st == KVRT_OK) {
        ref_seq_rm(F->ref, seq, p0, p1, 1);
        for (int s = 0; s < F->desc.max_seqs; s++)
            if (seq < 0 || s == seq)
                F->pristine[s] = 0;
        if (p0 > 0 || p1 >= 0) /* a partial removal edits blocks */
            F->prefix_exact = 0;
    }
    finish_edit(F, "kvrt_seq_rm", st, allowed, digest, 0);
}

static void op_shift(fuzz *F, int32_t seq, int32_t p0, int32_t p1, int32_t delta)
{
    uint64_t digest = ref_digest(F);
    ref_status_set allowed = ref_seq_shift(F->ref, seq, p0, p1, delta, 0);
    if ((allowed & ~SET(ERR_INVALID_ARG)) && cow_capacity_possible(F, seq))
        allowed |= SET(ERR_CAPACITY);
    oplog(F, "kvrt_seq_shift(seq %d, [%d, %d), delta %d)", (int)seq, (int)p0, (int)p1, (int)delta);
    kvrt_status st = kvrt_seq_shift(F->cache, seq, p0, p1, delta);
    oplog_status(F, st);
    if (st == KVRT_OK) {
        ref_seq_shift(F->ref, seq, p0, p1, delta, 1);
        for (int s = 0; s < F->desc.max_seqs; s++)
            if (seq < 0 || s == seq)
                F->pristine[s] = 0;
    }
    finish_edit(F, "kvrt_seq_shift", st, allowed, digest, 0);
}

static void op_div(fuzz *F, int32_t seq, int32_t p0, int32_t p1, int d)
{
    uint64_t digest = ref_digest(F);
    ref_status_set allowed = ref_seq_div(F->ref, seq, p0, p1, d, 0);
    if ((allowed & ~SET(ERR_INVALID_ARG)) && cow_capacity_possible(F, seq))
        allowed |= SET(ERR_CAPACITY);
    oplog(F, "kvrt_seq_div(seq %d, [%d, %d), d %d)", (int)seq, (int)p0, (int)p1, d);
    kvrt_status st = kvrt_seq_div(F->cache, seq, p0, p1, d);
    oplog_status(F, st);
    if (st == KVRT_OK) {
        ref_seq_div(F->ref, seq, p0, p1, d, 1);
        for (int s = 0; s < F->desc.max_seqs; s++)
            if (seq < 0 || s == seq)
                F->pristine[s] = 0;
    }
    finish_edit(F, "kvrt_seq_div", st, allowed, digest, 0);
}

static void do_cp(fuzz *F, int32_t src, int32_t dst, int32_t p0, int32_t p1);

static void op_cp(fuzz *F)
{
    rng *r = &F->r;
    int32_t src = random_seq(F, 0, 0.03), dst = random_seq(F, 0.01, 0.03);
    if (rng_chance(r, 0.7)) { /* mostly into an empty sequence */
        for (int k = 0; k < F->desc.max_seqs; k++) {
            int32_t s = (int32_t)rng_below(r, F->desc.max_seqs);
            if (src >= 0 && src < F->desc.max_seqs && s != src && ref_seq_is_empty(F->ref, s)) {
                dst = s;
                break;
            }
        }
    }
    int32_t p0 = 0, p1 = -1;
    if (rng_chance(r, 0.5))
        gen_range(F, src, &p0, &p1);
    do_cp(F, src, dst, p0, p1);
}

static void do_cp(fuzz *F, int32_t src, int32_t dst, int32_t p0, int32_t p1)
{
    uint64_t digest = ref_digest(F);
    ref_status_set allowed = ref_seq_cp(F->ref, src, dst, p0, p1, 0);
    if (REF_HAS(allowed, KVRT_OK) && src >= 0 && src < F->desc.max_seqs) {
        const snapshot *S = before(F);
        for (int g = 0; g < F->n_groups; g++)
            if (F->g[g].self && S->info[src][g].n_blocks > blocks_available(F, S, g))
                allowed |= SET(ERR_CAPACITY);
    }
    oplog(F, "kvrt_seq_cp(src %d, dst %d, [%d, %d))", (int)src, (int)dst, (int)p0, (int)p1);
    kvrt_status st = kvrt_seq_cp(F->cache, src, dst, p0, p1);
    oplog_status(F, st);
    if (st == KVRT_OK) {
        ref_seq_cp(F->ref, src, dst, p0, p1, 1);
        F->pristine[dst] = 0;
    }
    finish_edit(F, "kvrt_seq_cp", st, allowed, digest, 0);
}

static void do_keep(fuzz *F, int32_t seq)
{
    uint64_t digest = ref_digest(F);
    ref_status_set allowed = ref_seq_keep(F->ref, seq, 0);
    oplog(F, "kvrt_seq_keep(seq %d)", (int)seq);
    kvrt_status st = kvrt_seq_keep(F->cache, seq);
    oplog_status(F, st);
    if (st == KVRT_OK)
        ref_seq_keep(F->ref, seq, 1);
    finish_edit(F, "kvrt_seq_keep", st, allowed, digest, 0);
}

static void op_keep(fuzz *F) { do_keep(F, random_seq(F, 0.05, 0.05)); }

static int32_t gen_delta(fuzz *F, int32_t seq)
{
    rng *r = &F->r;
    int32_t pmax = seq >= 0 && seq < F->desc.max_seqs ? ref_seq_pos_max(F->ref, seq) : 0;
    if (pmax < 0)
        pmax = 0;
    int sign = rng_chance(r, 0.5) ? 1 : -1;
    double x = rng_unit(r);
    if (x < 0.03)
        return 0;
    if (x < 0.6)
        return sign * (int32_t)rng_between(r, 1, 32);
    if (x < 0.8)
        return sign * (int32_t)rng_between(r, 33, 3000);
    if (x < 0.9) /* removes tokens */
        return (int32_t)-((int64_t)pmax + rng_between(r, 1, 10) > INT32_MAX
                              ? INT32_MAX
                              : (int64_t)pmax + rng_between(r, 1, 10));
    if (x < 0.95)
        return sign * (int32_t)rng_between(r, 100000, 1000000000);
    int64_t to_end = (int64_t)INT32_MAX - pmax + rng_between(r, -3, 3); /* at the int32 limit */
    return (int32_t)(to_end > INT32_MAX ? INT32_MAX : to_end);
}

/* llama.cpp's context shift: drop n_discard tokens after n_keep and move the
 * rest down. */
static void op_context_shift(fuzz *F)
{
    int32_t seq = (int32_t)rng_below(&F->r, F->desc.max_seqs);
    int64_t n;
    const ref_token *t = ref_seq_tokens(F->ref, seq, &n);
    if (n < 2)
        return;
    int64_t keep = rng_below(&F->r, n / 2 + 1), discard = 1 + rng_below(&F->r, n - keep);
    int32_t a = t[keep].pos, b = keep + discard < n ? t[keep + discard].pos : t[n - 1].pos + 1;
    op_rm(F, seq, a, b);
    F->op_index++;
    op_shift(F, seq, b, -1, -(b - a));
}

static void do_cross_set(fuzz *F, int layer, int32_t seq, int n);

static void op_cross_set(fuzz *F)
{
    rng *r = &F->r;
    int layers[MAX_LAYERS], n_cross = 0;
    for (int l = 0; l < F->n_layers; l++)
        if (F->li[l].d.kind == KVRT_LAYER_CROSS)
            layers[n_cross++] = l;
    if (n_cross == 0)
        return;
    int layer = layers[rng_below(r, n_cross)];
    int32_t seq = random_seq(F, 0.02, 0.03);
    int n = 1 + (int)rng_below(r, F->desc.cross_max_len);
    if (rng_chance(r, 0.04))
        n = F->desc.cross_max_len + 1;
    else if (rng_chance(r, 0.04))
        n = 0;
    do_cross_set(F, layer, seq, n);
}

static void do_cross_set(fuzz *F, int layer, int32_t seq, int n)
{
    const layer_info *L = &F->li[layer];
    kvrt_dtype src = random_dtype(F);
    size_t es = kvrt_dtype_size(src);
    int64_t rows = n > 0 ? n : 1;
    size_t kb = (size_t)(rows * L->k_elems) * es, vb = (size_t)(rows * L->v_elems) * es;
    void *hk = host_buf(&F->hk, &F->hk_cap, kb), *hv = host_buf(&F->hv, &F->hv_cap, vb);
    fill_random(F, hk, src, rows * L->k_elems);
    fill_random(F, hv, src, rows * L->v_elems);
    void *dk = dbuf_get(&F->dk, kb), *dv = dbuf_get(&F->dv, vb);
    dev_upload(dk, hk, kb);
    dev_upload(dv, hv, vb);
    uint64_t digest = ref_digest(F);
    ref_status_set allowed = ref_cross_set(F->ref, layer, seq, n, hk, hv, src, 0);
    oplog(F, "kvrt_cross_set(layer %d, seq %d, %d rows, src %s)", layer, (int)seq, n,
          kvrt_dtype_name(src));
    kvrt_status st = kvrt_cross_set(F->cache, layer, seq, n, dk, dv, src, NULL);
    oplog_status(F, st);
    if (st == KVRT_OK)
        ref_cross_set(F->ref, layer, seq, n, hk, hv, src, 1);
    expect(F, "kvrt_cross_set", st, allowed);
    if (st == KVRT_OK) {
        (void)digest;
        if (F->plan_state == PLAN_VALID)
            F->plan_state = PLAN_MAYBE;
    }
    check(F, st != KVRT_OK);
}

static void op_compact(fuzz *F)
{
    uint64_t digest = ref_digest(F);
    int holes = before(F)->stats[F->n_groups].holes > 0;
    oplog(F, "kvrt_cache_compact()");
    kvrt_status st = kvrt_cache_compact(F->cache);
    oplog_status(F, st);
    finish_edit(F, "kvrt_cache_compact", st, SET(OK), digest, holes);
}

static void op_clear(fuzz *F)
{
    oplog(F, "kvrt_cache_clear()");
    kvrt_status st = kvrt_cache_clear(F->cache);
    oplog_status(F, st);
    if (st == KVRT_OK)
        ref_clear(F->ref);
    finish_edit(F, "kvrt_cache_clear", st, SET(OK), 0, 1);
    F->prefix_exact = 1; /* kvrt and the reference forgot every key */
}

/* A gather of a random range with a random capacity: the rows of the full
 * gather of the last check that lie in the range, bit for bit. */
static void op_gather(fuzz *F)
{
    rng *r = &F->r;
    int layer = (int)rng_below(r, F->n_layers);
    int32_t seq = (int32_t)rng_below(r, F->desc.max_seqs);
    int32_t p0, p1;
    gen_range(F, seq, &p0, &p1);
    const snap_rows *full = &before(F)->rows[seq][layer];
    const layer_info *L = &F->li[layer];
    int64_t es = cache_elem_size(F);
    int64_t lo = p0 < 0 ? 0 : p0, hi = p1 < 0 ? INT64_MAX : p1, first = -1, count = 0;
    for (int64_t i = 0; i < full->n; i++)
        if (full->pos[i] >= lo && full->pos[i] < hi) {
            if (first < 0)
                first = i;
            count++;
        }
    int64_t cap = rng_chance(r, 0.8) ? count + (int64_t)rng_below(r, 3) : rng_below(r, count + 1);
    int with_k = rng_chance(r, 0.8), with_v = rng_chance(r, 0.8), with_pos = rng_chance(r, 0.8);
    size_t kb = (size_t)((cap + 1) * L->k_elems * es), vb = (size_t)((cap + 1) * (L->v_elems + 1) * es);
    uint8_t *k = xmalloc(kb), *v = xmalloc(vb);
    int32_t *pos = xmalloc((size_t)(cap + 1) * sizeof(int32_t));
    ref_status_set allowed = count > cap ? SET(ERR_INVALID_ARG) : SET(OK);
    if (p1 >= 0 && p0 > p1)
        allowed |= SET(ERR_INVALID_ARG);
    if (p0 < 0)
        allowed |= SET(ERR_INVALID_ARG);
    int64_t n_out = -7;
    oplog(F, "kvrt_gather(layer %d, seq %d, [%d, %d), capacity %" PRId64 "%s%s%s)", layer, (int)seq,
          (int)p0, (int)p1, cap, with_k ? ", k" : "", with_v ? ", v" : "", with_pos ? ", pos" : "");
    kvrt_status st = snap_gather(F, F->cache, layer, seq, p0, p1, with_k ? k : NULL,
                                 with_v ? v : NULL, with_pos ? pos : NULL, cap, &n_out);
    oplog_status(F, st);
    expect(F, "kvrt_gather", st, allowed);
    if ((st == KVRT_OK || count > cap) && n_out != count && !(p1 >= 0 && p0 > p1))
        fail(F, "kvrt_gather: n_out %" PRId64 ", %" PRId64 " rows in the range", n_out, count);
    if (st == KVRT_OK && count > 0) {
        if (with_pos && memcmp(pos, full->pos + first, (size_t)count * sizeof(int32_t)) != 0)
            fail(F, "kvrt_gather of a range: positions differ from the full gather");
        if (with_k && memcmp(k, full->k + first * L->k_elems * es, (size_t)(count * L->k_elems * es)))
            fail(F, "kvrt_gather of a range: K differs from the full gather");
        if (with_v && L->v_elems &&
            memcmp(v, full->v + first * L->v_elems * es, (size_t)(count * L->v_elems * es)))
            fail(F, "kvrt_gather of a range: V differs from the full gather");
    }
    free(k);
    free(v);
    free(pos);
    check(F, 1);
}

/* ------------------------------------------------------------------------ */
/* State files and host offload                                              */
/* ------------------------------------------------------------------------ */

typedef struct membuf {
    uint8_t *p;
    size_t   n, cap;
} membuf;

static kvrt_status mem_write(void *user, const void *data, size_t size)
{
    membuf *b = user;
    if (b->n + size > b->cap) {
        b->cap = (b->n + size) * 2;
        b->p = xrealloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, data, size);
    b->n += size;
    return KVRT_OK;
}

typedef struct memread {
    const uint8_t *p;
    size_t         n, at;
} memread;

static kvrt_status mem_read(void *user, void *data, size_t size, size_t *got)
{
    memread *r = user;
    size_t k = r->n - r->at < size ? r->n - r->at : size;
    memcpy(data, r->p + r->at, k);
    r->at += k;
    *got = k;
    return KVRT_OK;
}

/* Rows per group a sequence holds in snapshot S: live tokens of a self
 * group, rows of a cross group. */
static void seq_group_rows(const fuzz *F, const snapshot *S, int32_t seq, int64_t *rows)
{
    for (int g = 0; g < F->n_groups; g++)
        rows[g] = F->g[g].self ? S->info[seq][g].n_tokens : S->rows[seq][F->g[g].first_layer].n;
}

/* Whether rows (per group, summed over the loaded sequences, each sequence's
 * count rounded up to blocks of bs) fit the blocks free or growable in S of
 * a cache whose pools may grow to max_blocks: KVRT_OK or
 * KVRT_ERR_CAPACITY. A load packs each sequence's rows into whole blocks. */
static ref_status_set load_fits(const fuzz *F, const snapshot *S, int n_seqs,
                                int64_t rows[][MAX_LAYERS], int bs, int64_t max_blocks)
{
    for (int g = 0; g < F->n_groups; g++) {
        if (!F->g[g].self)
            continue; /* a cross row set takes the target's own cross slot */
        int64_t need = 0;
        for (int i = 0; i < n_seqs; i++)
            need += (rows[i][g] + bs - 1) / bs;
        if (need > S->stats[g].blocks_free + S->stats[g].blocks_cached +
                       (max_blocks - S->stats[g].blocks_total))
            return SET(ERR_CAPACITY);
    }
    return SET(OK);
}

/* Saves one sequence (or all) into memory: the image, or NULL when this
 * build writes no states. */
static membuf save_state(fuzz *F, int32_t seq, kvrt_status *status)
{
    membuf b = {NULL, 0, 0};
    uint64_t size = 0;
    int bad = seq >= F->desc.max_seqs;
    oplog(F, "kvrt_state_size(seq %d)", (int)seq);
    kvrt_status st = kvrt_state_size(F->cache, seq, &size);
    oplog_status(F, st);
    expect(F, "kvrt_state_size", st, bad ? SET(ERR_INVALID_ARG) : SET(OK) | SET(ERR_UNSUPPORTED));
    oplog(F, "kvrt_state_write(seq %d) to memory", (int)seq);
    st = kvrt_state_write(F->cache, seq, mem_write, &b);
    oplog_status(F, st);
    expect(F, "kvrt_state_write", st, bad ? SET(ERR_INVALID_ARG) : SET(OK) | SET(ERR_UNSUPPORTED));
    if (st == KVRT_ERR_UNSUPPORTED)
        F->state_unsupported = 1;
    if (st == KVRT_OK && b.n != size)
        fail(F, "kvrt_state_write wrote %zu bytes, kvrt_state_size said %" PRIu64, b.n, size);
    *status = st;
    check(F, 1);
    return b;
}

/* Loads an image into F's cache; allowed statuses given; on success the
 * reference imports `seqs` of `from` (dst >= 0: the one sequence into dst). */
static kvrt_status load_state(fuzz *F, const membuf *image, size_t len, int32_t dst,
                              ref_status_set allowed, const char *what)
{
    memread r = {image->p, len, 0};
    oplog(F, "kvrt_state_read(dst %d, %zu of %zu bytes%s)", (int)dst, len, image->n, what);
    kvrt_status st = kvrt_state_read(F->cache, dst, mem_read, &r);
    oplog_status(F, st);
    expect(F, "kvrt_state_read", st, allowed);
    if (st != KVRT_OK && kvrt_last_error()[0] == '\0')
        fail(F, "kvrt_state_read failed without a message");
    return st;
}

/* A damaged copy of an image: one bit flipped, or cut short. */
static size_t damage(fuzz *F, membuf *copy, const membuf *image, const char **what)
{
    copy->p = xmalloc(image->n);
    copy->n = copy->cap = image->n;
    memcpy(copy->p, image->p, image->n);
    if (image->n > 0 && rng_chance(&F->r, 0.6)) {
        size_t at = (size_t)rng_below(&F->r, (int64_t)image->n);
        copy->p[at] ^= (uint8_t)(1u << rng_below(&F->r, 8));
        *what = ", one bit flipped";
        return image->n;
    }
    *what = ", truncated";
    return image->n > 0 ? (size_t)rng_below(&F->r, (int64_t)image->n) : 0;
}

/* Every sequence saved, then loaded into a second cache of another block
 * size, which must then show the same rows, positions and evicted ranges;
 * and into a cache of a different description, which must refuse it. */
static void load_elsewhere(fuzz *F, const membuf *image)
{
    const snapshot *S = before(F);
    kvrt_cache_desc d = F->desc;
    int shift = (int)rng_below(&F->r, 7);
    d.block_size = 1 << shift;
    if (d.block_size == F->desc.block_size)
        d.block_size = d.block_size == 64 ? 8 : d.block_size * 2;
    int64_t rows[MAX_SEQS][MAX_LAYERS], need = 1;
    for (int s = 0; s < F->desc.max_seqs; s++) {
        seq_group_rows(F, S, s, rows[s]);
    }
    for (int g = 0; g < F->n_groups; g++) {
        int64_t n = 0;
        for (int s = 0; s < F->desc.max_seqs; s++)
            n += (rows[s][g] + d.block_size - 1) / d.block_size;
        if (n > need)
            need = n;
    }
    d.n_blocks = (int)need + (int)rng_below(&F->r, 3) - (rng_chance(&F->r, 0.1) ? 1 : 0);
    if (d.n_blocks < 1)
        d.n_blocks = 1;
    d.max_blocks = 0;
    kvrt_cache *other = NULL;
    oplog(F, "kvrt_cache_create(a second cache, block_size %d, n_blocks %d)", d.block_size, d.n_blocks);
    kvrt_status st = kvrt_cache_create(&d, &other);
    oplog_status(F, st);
    expect(F, "kvrt_cache_create", st, SET(OK));
    snapshot *T = calloc(1, sizeof(snapshot));
    if (T == NULL)
        fprintf(stderr, "kvrt-fuzz: out of host memory\n"), exit(1);
    take_snapshot_of(F, other, T);
    ref_status_set allowed = SET(OK);
    for (int g = 0; g < F->n_groups; g++) {
        if (!F->g[g].self)
            continue;
        int64_t n = 0;
        for (int s = 0; s < F->desc.max_seqs; s++)
            n += (rows[s][g] + d.block_size - 1) / d.block_size;
        if (n > d.n_blocks)
            allowed = SET(ERR_CAPACITY);
    }
    memread r = {image->p, image->n, 0};
    oplog(F, "kvrt_state_read(the second cache, dst -1, %zu bytes)", image->n);
    st = kvrt_state_read(other, -1, mem_read, &r);
    oplog_status(F, st);
    expect(F, "kvrt_state_read into a cache of another block size", st, allowed);
    if (st == KVRT_OK) {
        if (kvrt_cache_check(other) != KVRT_OK)
            fail(F, "kvrt_cache_check of the second cache: %s", kvrt_last_error());
        take_snapshot_of(F, other, T);
        int64_t es = cache_elem_size(F);
        for (int s = 0; s < F->desc.max_seqs; s++) {
            for (int l = 0; l < F->n_layers; l++) {
                const snap_rows *a = &S->rows[s][l], *b = &T->rows[s][l];
                int64_t kb = a->n * F->li[l].k_elems * es, vb = a->n * F->li[l].v_elems * es;
                if (a->n != b->n || memcmp(a->pos, b->pos, (size_t)a->n * sizeof(int32_t)) != 0 ||
                    memcmp(a->k, b->k, (size_t)kb) != 0 || (vb && memcmp(a->v, b->v, (size_t)vb)))
                    fail(F, "seq %d layer %d loaded into a cache of block size %d differs (%" PRId64
                            " rows saved, %" PRId64 " loaded)",
                         s, l, d.block_size, a->n, b->n);
            }
            for (int g = 0; g < F->n_groups; g++)
                if (S->info[s][g].n_tokens != T->info[s][g].n_tokens ||
                    S->info[s][g].evicted_max != T->info[s][g].evicted_max)
                    fail(F, "seq %d group %d loaded into a cache of block size %d: %" PRId64
                            " tokens evicted_max %d, saved %" PRId64 " and %d",
                         s, g, d.block_size, T->info[s][g].n_tokens, (int)T->info[s][g].evicted_max,
                         S->info[s][g].n_tokens, (int)S->info[s][g].evicted_max);
        }
    }
    snapshot_free(T);
    kvrt_cache_destroy(other);

    /* a cache of another description refuses the image */
    kvrt_cache_desc e = F->desc;
    kvrt_layer_desc layers[MAX_LAYERS];
    memcpy(layers, F->layers, sizeof layers);
    e.layers = layers;
    const char *field;
    int l = (int)rng_below(&F->r, F->n_layers);
    switch (rng_below(&F->r, 4)) {
    case 0: e.dtype = (kvrt_dtype)((e.dtype + 1) % 3), field = "dtype"; break;
    case 1: e.rope.theta *= 2, field = "rope theta"; break;
    case 2: e.rope.style = e.rope.style == KVRT_ROPE_NORMAL ? KVRT_ROPE_NEOX : KVRT_ROPE_NORMAL, field = "rope style"; break;
    default:
        if (layers[l].kind == KVRT_LAYER_MLA)
            layers[l].latent_dim += 8;
        else
            layers[l].head_dim_v = layers[l].head_dim_v == 8 ? 16 : 8;
        field = "a layer's dimension";
        break;
    }
    oplog(F, "kvrt_cache_create(a cache with another %s)", field);
    st = kvrt_cache_create(&e, &other);
    oplog_status(F, st);
    expect(F, "kvrt_cache_create", st, SET(OK));
    r.at = 0;
    oplog(F, "kvrt_state_read(the cache with another %s, dst -1)", field);
    st = kvrt_state_read(other, -1, mem_read, &r);
    oplog_status(F, st);
    expect(F, "kvrt_state_read into an incompatible cache", st, SET(ERR_INCOMPATIBLE));
    if (kvrt_last_error()[0] == '\0')
        fail(F, "kvrt_state_read: KVRT_ERR_INCOMPATIBLE without a message");
    kvrt_cache_stats stats;
    if (kvrt_cache_stats_get(other, -1, &stats) != KVRT_OK || stats.blocks_used != 0)
        fail(F, "a refused state load changed the cache");
    kvrt_cache_destroy(other);
    check(F, 1);
}

static void op_save_load(fuzz *F)
{
    if (F->state_unsupported)
        return;
    rng *r = &F->r;
    int all = rng_chance(r, 0.35);
    int32_t seq = all ? -1 : random_seq(F, 0, 0.03);
    kvrt_status st;
    membuf image = save_state(F, seq, &st);
    if (st != KVRT_OK) {
        free(image.p);
        return;
    }
    const snapshot *S = before(F);
    ref_model *saved = ref_clone(F->ref);
    int64_t rows[MAX_SEQS][MAX_LAYERS];
    int variant = (int)rng_below(r, 4);
    if (variant == 0) { /* damaged */
        membuf bad;
        const char *what;
        size_t len = damage(F, &bad, &image, &what);
        int32_t dst = all ? -1 : (int32_t)rng_below(r, F->desc.max_seqs);
        load_state(F, &bad, len, dst,
                   SET(ERR_CORRUPT) | SET(ERR_INCOMPATIBLE) | SET(ERR_INVALID_ARG), what);
        free(bad.p);
        check(F, 1);
    } else if (all && variant == 1) {
        load_elsewhere(F, &image);
    } else if (all) { /* clear, then load everything back */
        for (int s = 0; s < F->desc.max_seqs; s++)
            seq_group_rows(F, S, s, rows[s]);
        oplog(F, "kvrt_cache_clear()");
        st = kvrt_cache_clear(F->cache);
        oplog_status(F, st);
        expect(F, "kvrt_cache_clear", st, SET(OK));
        if (F->plan_state != PLAN_NONE)
            F->plan_state = PLAN_STALE;
        ref_prefix_forget(F->ref); /* the rows come back, their keys do not */
        F->prefix_exact = 0;
        /* an empty cache: every block free, the pool as far as it grew */
        snapshot *E = calloc(1, sizeof(snapshot));
        if (E == NULL)
            fprintf(stderr, "kvrt-fuzz: out of host memory\n"), exit(1);
        for (int g = 0; g < F->n_groups; g++) {
            E->stats[g] = S->stats[g];
            E->stats[g].blocks_free = S->stats[g].blocks_total;
            E->stats[g].blocks_cached = 0;
        }
        ref_status_set allowed =
            load_fits(F, E, F->desc.max_seqs, rows, F->desc.block_size, max_blocks_of(F));
        free(E);
        st = load_state(F, &image, image.n, -1, allowed, "");
        if (st != KVRT_OK)
            ref_clear(F->ref);
        for (int s = 0; s < F->desc.max_seqs; s++)
            F->pristine[s] = 0;
        check(F, 0);
    } else { /* one sequence into another id (or the same), through memory or a file */
        int32_t dst = (int32_t)rng_below(r, F->desc.max_seqs);
        for (int k = 0; k < F->desc.max_seqs && rng_chance(r, 0.8); k++) {
            int32_t s = (int32_t)rng_below(r, F->desc.max_seqs);
            if (ref_seq_is_empty(F->ref, s)) {
                dst = s;
                break;
            }
        }
        ref_status_set allowed;
        if (seq >= F->desc.max_seqs || !ref_seq_is_empty(F->ref, dst)) {
            allowed = SET(ERR_INVALID_ARG);
        } else {
            seq_group_rows(F, S, seq, rows[0]);
            allowed = load_fits(F, S, 1, rows, F->desc.block_size, max_blocks_of(F));
        }
        uint64_t digest = ref_digest(F);
        if (variant == 3 && rng_chance(r, 0.3)) {
            char path[256];
            const char *dir = getenv("TMPDIR");
            snprintf(path, sizeof path, "%s/kvrt-fuzz-%ld-%" PRId64 ".state",
                     dir && *dir ? dir : "/tmp", (long)getpid(), F->stream);
            oplog(F, "kvrt_state_save_file(seq %d, %s)", (int)seq, path);
            st = kvrt_state_save_file(F->cache, seq, path);
            oplog_status(F, st);
            expect(F, "kvrt_state_save_file", st, SET(OK));
            oplog(F, "kvrt_state_load_file(dst %d)", (int)dst);
            st = kvrt_state_load_file(F->cache, dst, path);
            oplog_status(F, st);
            expect(F, "kvrt_state_load_file", st, allowed);
            remove(path);
            oplog(F, "kvrt_state_load_file(dst %d, a missing file)", (int)dst);
            kvrt_status st2 = kvrt_state_load_file(F->cache, dst, path);
            oplog_status(F, st2);
            expect(F, "kvrt_state_load_file of a missing file", st2, SET(ERR_IO));
        } else {
            st = load_state(F, &image, image.n, dst, allowed, "");
        }
        if (st == KVRT_OK) {
            ref_seq_import(F->ref, dst, saved, seq);
            F->prefix_exact = 0; /* loaded rows carry no keys */
            F->pristine[dst] = 0;
            edit_done(F, digest, 1);
        }
        check(F, st != KVRT_OK);
    }
    ref_destroy(saved);
    free(image.p);
}

static void op_offload(fuzz *F)
{
    if (F->state_unsupported)
        return;
    rng *r = &F->r;
    if (F->off != NULL && rng_chance(r, 0.2)) {
        oplog(F, "kvrt_offload_free()");
        kvrt_offload_free(F->off);
        ref_destroy(F->off_ref);
        F->off = NULL;
        F->off_ref = NULL;
        return;
    }
    if (F->off == NULL) {
        int32_t seq = random_seq(F, 0, 0.03);
        kvrt_offload *off = NULL;
        uint64_t digest = ref_digest(F);
        oplog(F, "kvrt_seq_offload(seq %d)", (int)seq);
        kvrt_status st = kvrt_seq_offload(F->cache, seq, &off);
        oplog_status(F, st);
        expect(F, "kvrt_seq_offload", st,
               seq >= F->desc.max_seqs ? SET(ERR_INVALID_ARG) : SET(OK) | SET(ERR_UNSUPPORTED));
        if (st == KVRT_ERR_UNSUPPORTED)
            F->state_unsupported = 1;
        if (st != KVRT_OK) {
            if (off != NULL)
                fail(F, "a failed kvrt_seq_offload left *out non-NULL");
            check(F, 1);
            return;
        }
        if (off == NULL || kvrt_offload_bytes(off) == 0)
            fail(F, "kvrt_seq_offload returned no offload");
        F->off = off;
        F->off_ref = ref_clone(F->ref);
        F->off_seq = seq;
        seq_group_rows(F, before(F), seq, F->off_rows);
        ref_seq_rm(F->ref, seq, 0, -1, 1);
        edit_done(F, digest, 1);
        check(F, 0);
        return;
    }
    int32_t dst = (int32_t)rng_below(r, F->desc.max_seqs);
    for (int k = 0; k < F->desc.max_seqs && rng_chance(r, 0.8); k++) {
        int32_t s = (int32_t)rng_below(r, F->desc.max_seqs);
        if (ref_seq_is_empty(F->ref, s)) {
            dst = s;
            break;
        }
    }
    ref_status_set allowed = SET(ERR_INVALID_ARG);
    if (ref_seq_is_empty(F->ref, dst)) {
        int64_t rows[1][MAX_LAYERS];
        memcpy(rows[0], F->off_rows, sizeof F->off_rows);
        allowed = load_fits(F, before(F), 1, rows, F->desc.block_size, max_blocks_of(F));
    }
    uint64_t digest = ref_digest(F);
    oplog(F, "kvrt_seq_restore(dst %d) of seq %d", (int)dst, (int)F->off_seq);
    kvrt_status st = kvrt_seq_restore(F->cache, dst, F->off);
    oplog_status(F, st);
    expect(F, "kvrt_seq_restore", st, allowed);
    if (st == KVRT_OK) {
        ref_seq_import(F->ref, dst, F->off_ref, F->off_seq);
        F->prefix_exact = 0; /* loaded rows carry no keys */
        F->pristine[dst] = 0;
        edit_done(F, digest, 1);
    }
    check(F, st != KVRT_OK);
}

/* A write of the batch's current plan, whatever its state. */
static void op_stale_write(fuzz *F)
{
    int layers[MAX_LAYERS], n_self = 0;
    for (int l = 0; l < F->n_layers; l++)
        if (F->li[l].d.kind != KVRT_LAYER_CROSS)
            layers[n_self++] = l;
    if (n_self == 0 || F->plan_n == 0) {
        float k[8] = {0}, v[8] = {0};
        oplog(F, "kvrt_write(layer 0) before any plan");
        kvrt_status st = kvrt_write(F->cache, F->batch, 0, k, v, KVRT_F32, NULL);
        oplog_status(F, st);
        expect(F, "kvrt_write before any plan", st, SET(ERR_INVALID_ARG));
        check(F, 1);
        return;
    }
    op_write(F, layers[rng_below(&F->r, n_self)]);
}

static void op_new_batch(fuzz *F)
{
    kvrt_batch_destroy(F->batch);
    F->max_tokens = 1 + (int)rng_below(&F->r, MAX_TOKENS);
    oplog(F, "kvrt_batch_create(max_tokens %d)", F->max_tokens);
    kvrt_status st = kvrt_batch_create(F->cache, F->max_tokens, &F->batch);
    oplog_status(F, st);
    expect(F, "kvrt_batch_create", st, SET(OK));
    F->plan_state = PLAN_NONE;
    F->plan_n = 0;
    check(F, 1);
}

/* Calls with a bad argument: each must fail (or, for queries, answer) and
 * change nothing. */
static void op_invalid(fuzz *F)
{
    rng *r = &F->r;
    kvrt_cache *c = F->cache;
    int ms = F->desc.max_seqs, nl = F->n_layers;
    int32_t bad_seq = rng_chance(r, 0.5) ? -1 - (int32_t)rng_below(r, 3) : ms + (int32_t)rng_below(r, 3);
    int bad_layer = rng_chance(r, 0.5) ? -1 : nl + (int)rng_below(r, 2);
    int self = -1, cross = -1, attn = -1;
    for (int l = 0; l < nl; l++) {
        if (F->li[l].d.kind == KVRT_LAYER_CROSS)
            cross = l;
        else
            self = l;
        if (F->li[l].d.kind == KVRT_LAYER_ATTN)
            attn = l;
    }
    float buf[64] = {0};
    int32_t seqs[2] = {0, 0}, pos[2] = {0, 1};
    int32_t i32 = 0;
    int64_t i64 = 0;
    int ok = 0;
    kvrt_seq_group_info info;
    kvrt_cache_stats stats;
    kvrt_attention_params ap;
    memset(&ap, 0, sizeof ap);
    ap.n_q_heads = 1;
    ap.q_dtype = ap.out_dtype = KVRT_F32;
    kvrt_status st;
    ref_status_set allowed = SET(ERR_INVALID_ARG);
    const char *what;
    int which = (int)rng_below(r, 31);
    int plan_call = 0;
    switch (which) {
    case 0: what = "kvrt_batch_plan(NULL cache)"; st = kvrt_batch_plan(NULL, 1, seqs, pos, F->batch); break;
    case 1: what = "kvrt_batch_plan(NULL batch)"; st = kvrt_batch_plan(c, 1, seqs, pos, NULL); break;
    case 2: what = "kvrt_batch_plan(NULL seq_ids)"; st = kvrt_batch_plan(c, 1, NULL, pos, F->batch); plan_call = 1; break;
    case 3: what = "kvrt_batch_plan(n 0)"; st = kvrt_batch_plan(c, 0, seqs, pos, F->batch); plan_call = 1; break;
    case 4: what = "kvrt_write(bad layer)"; st = kvrt_write(c, F->batch, bad_layer, buf, buf, KVRT_F32, NULL); break;
    case 5: what = "kvrt_write(NULL batch)"; st = kvrt_write(c, NULL, self < 0 ? 0 : self, buf, buf, KVRT_F32, NULL); break;
    case 6:
        if (cross < 0)
            return;
        what = "kvrt_write(CROSS layer)";
        st = kvrt_write(c, F->batch, cross, buf, buf, KVRT_F32, NULL);
        break;
    case 7:
        if (self < 0)
            return;
        what = "kvrt_write(NULL k)";
        st = kvrt_write(c, F->batch, self, NULL, buf, KVRT_F32, NULL);
        break;
    case 8:
        if (attn < 0)
            return;
        what = "kvrt_write(ATTN layer, NULL v)";
        st = kvrt_write(c, F->batch, attn, buf, NULL, KVRT_F32, NULL);
        break;
    case 9:
        if (self < 0)
            return;
        what = "kvrt_write(src_dtype 7)";
        st = kvrt_write(c, F->batch, self, buf, buf, (kvrt_dtype)7, NULL);
        break;
    case 10: what = "kvrt_seq_rm(bad seq)"; st = kvrt_seq_rm(c, ms + (int32_t)rng_below(r, 3), 0, -1); break;
    case 11: what = "kvrt_seq_cp(bad src or dst)";
        st = rng_chance(r, 0.5) ? kvrt_seq_cp(c, bad_seq, 0, 0, -1) : kvrt_seq_cp(c, 0, bad_seq, 0, -1);
        break;
    case 12: what = "kvrt_seq_keep(bad seq)"; st = kvrt_seq_keep(c, bad_seq); break;
    case 13: what = "kvrt_seq_shift(bad seq)"; st = kvrt_seq_shift(c, ms + (int32_t)rng_below(r, 3), 0, -1, 1); break;
    case 14: what = "kvrt_seq_div(d < 1)"; st = kvrt_seq_div(c, 0, 0, -1, -(int)rng_below(r, 3)); break;
    case 15:
        what = "kvrt_cross_set(not a CROSS layer)";
        st = kvrt_cross_set(c, self >= 0 ? self : bad_layer, 0, 1, buf, buf, KVRT_F32, NULL);
        break;
    case 16:
        if (cross < 0)
            return;
        what = "kvrt_cross_set(NULL k or bad seq)";
        st = rng_chance(r, 0.5) ? kvrt_cross_set(c, cross, 0, 1, NULL, buf, KVRT_F32, NULL)
                                : kvrt_cross_set(c, cross, bad_seq, 1, buf, buf, KVRT_F32, NULL);
        break;
    case 17: what = "kvrt_gather(bad layer)"; st = kvrt_gather(c, bad_layer, 0, 0, -1, NULL, NULL, NULL, 0, &i64, NULL); break;
    case 18: what = "kvrt_gather(bad seq)"; st = kvrt_gather(c, 0, bad_seq, 0, -1, NULL, NULL, NULL, 0, &i64, NULL); break;
    case 19: what = "kvrt_gather(NULL n_out)"; st = kvrt_gather(c, 0, 0, 0, -1, NULL, NULL, NULL, 0, NULL, NULL); break;
    case 20: what = "kvrt_gather(capacity -1)"; st = kvrt_gather(c, 0, 0, 0, -1, NULL, NULL, NULL, -1, &i64, NULL); break;
    case 21: what = "kvrt_seq_pos_min(bad seq)"; st = kvrt_seq_pos_min(c, bad_seq, &i32); break;
    case 22: what = "kvrt_seq_pos_max(NULL out)"; st = kvrt_seq_pos_max(c, 0, NULL); break;
    case 23: what = "kvrt_seq_n_tokens(bad seq)"; st = kvrt_seq_n_tokens(c, bad_seq, &i64); break;
    case 24:
        what = "kvrt_seq_group_info_get(bad group)";
        st = kvrt_seq_group_info_get(c, 0, rng_chance(r, 0.5) ? -1 : F->n_groups, &info);
        break;
    case 25:
        what = "kvrt_cache_stats_get(bad group)";
        st = kvrt_cache_stats_get(c, rng_chance(r, 0.5) ? -2 : F->n_groups, &stats);
        break;
    case 26:
        what = "kvrt_seq_can_resume(negative pos)";
        st = kvrt_seq_can_resume(c, 0, -1, &ok);
        allowed |= SET(ERR_POS_RANGE);
        break;
    case 27:
        what = "kvrt_attention(bad layer or NULL params)";
        st = rng_chance(r, 0.5) ? kvrt_attention(c, F->batch, bad_layer, buf, buf, &ap, NULL)
                                : kvrt_attention(c, F->batch, self < 0 ? 0 : self, buf, buf, NULL, NULL);
        allowed |= SET(ERR_UNSUPPORTED);
        break;
    case 29: {
        static const float non_finite[] = {INFINITY, -INFINITY, NAN};
        what = "kvrt_attention(scale or softcap inf or NaN)";
        if (rng_chance(r, 0.5))
            ap.scale = non_finite[rng_below(r, 3)];
        else
            ap.softcap = non_finite[rng_below(r, 3)];
        st = kvrt_attention(c, F->batch, self < 0 ? 0 : self, buf, buf, &ap, NULL);
        allowed |= SET(ERR_UNSUPPORTED);
        break;
    }
    case 28: {
        what = "edits and queries of a NULL cache";
        kvrt_status all[] = {kvrt_seq_rm(NULL, 0, 0, -1), kvrt_seq_cp(NULL, 0, 0, 0, -1),
                             kvrt_seq_keep(NULL, 0), kvrt_seq_shift(NULL, 0, 0, -1, 1),
                             kvrt_seq_div(NULL, 0, 0, -1, 2), kvrt_cache_clear(NULL),
                             kvrt_cache_compact(NULL), kvrt_cache_check(NULL),
                             kvrt_cache_stats_get(NULL, -1, &stats), kvrt_seq_pos_min(NULL, 0, &i32),
                             kvrt_seq_can_resume(NULL, 0, 0, &ok), kvrt_cache_sync(NULL),
                             kvrt_gather(NULL, 0, 0, 0, -1, NULL, NULL, NULL, 0, &i64, NULL)};
        st = KVRT_ERR_INVALID_ARG;
        for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
            if (all[i] != KVRT_ERR_INVALID_ARG)
                st = all[i];
        if (kvrt_cache_n_groups(NULL) != 0 || kvrt_cache_get_desc(NULL) != NULL ||
            kvrt_layer_group(NULL, 0) != -1 || kvrt_batch_n_tokens(NULL) != 0)
            fail(F, "a query of a NULL cache or batch did not answer 0 / NULL / -1");
        kvrt_batch_destroy(NULL);
        kvrt_cache_destroy(NULL);
        break;
    }
    default: {
        what = "kvrt_batch_create(max_tokens 0 or NULL out)";
        kvrt_batch *b = (kvrt_batch *)F;
        st = rng_chance(r, 0.5) ? kvrt_batch_create(c, 0, &b) : kvrt_batch_create(c, 4, NULL);
        break;
    }
    }
    oplog(F, "%s", what);
    oplog_status(F, st);
    expect(F, what, st, allowed);
    if (plan_call && st != KVRT_OK && F->plan_state == PLAN_VALID)
        F->plan_state = PLAN_MAYBE;
    if (st != KVRT_OK && kvrt_last_error()[0] == '\0')
        fail(F, "%s failed without a message", what);
    check(F, 1);
}


/* ------------------------------------------------------------------------ */
/* Prefix caching (the prefix shape): plans with token ids, lookups that     */
/* attach cached blocks, requests that end, memory pressure, bad input.      */
/* Rows written for declared tokens are a function of (salt, token prefix,   */
/* layer), as a model's would be, so every block with a key holds the rows   */
/* the reference recorded for it, whichever sequence computed them.          */
/* ------------------------------------------------------------------------ */

static const char *const prefix_salts[3] = {"", "tenant-a", "tenant-b"};

static void prefix_setup(fuzz *F)
{
    F->prefix = F->desc.prefix_cache != KVRT_PREFIX_OFF;
    F->prefix_exact = 1;
    if (!F->prefix) { /* the calls are refused, naming the cause, changing nothing */
        kvrt_cache_stats a, b;
        kvrt_prefix_stats ps;
        int32_t covered = -7, seq = 0, pos = 0, tok = 0;
        if (kvrt_cache_stats_get(F->cache, -1, &a) != KVRT_OK)
            fail(F, "kvrt_cache_stats_get failed");
        kvrt_status st[3] = {kvrt_seq_attach_prefix(F->cache, 0, &tok, 1, NULL, 0, &covered),
                             kvrt_batch_plan_tokens(F->cache, 1, &seq, &pos, &tok, 1, NULL),
                             kvrt_prefix_stats_get(F->cache, &ps)};
        for (int i = 0; i < 3; i++)
            if (st[i] != KVRT_ERR_INVALID_ARG)
                fail(F, "prefix call %d on a cache without prefix caching returned %s", i, sname(st[i]));
        if (strstr(kvrt_last_error(), "without prefix caching") == NULL || covered != -7)
            fail(F, "a refused prefix call on a cache without prefix caching: message '%s', "
                    "n_covered %d", kvrt_last_error(), (int)covered);
        if (kvrt_cache_stats_get(F->cache, -1, &b) != KVRT_OK || memcmp(&a, &b, sizeof a) != 0)
            fail(F, "a refused prefix call changed the cache's statistics");
        return;
    }
    rng *r = &F->r;
    /* prompt 1 starts as prompt 0, prompt 2 as prompt 1 */
    for (int p = 0; p < 3; p++) {
        int shared = p == 0 ? 0 : (int)rng_below(r, PROMPT_MAX);
        for (int i = 0; i < PROMPT_MAX; i++)
            F->prompts[p][i] = i < shared ? F->prompts[p - 1][i] : (int32_t)rng_below(r, 500);
    }
    for (int s = 0; s < MAX_SEQS; s++)
        F->seq_prompt[s] = (int)rng_below(r, 3);
}

/* Rows of the planned tokens whose sequence holds declared tokens up to
 * them: values k/64, |k| <= 64, exact in every dtype, drawn from the
 * reference's digest of (salt, token prefix) and the layer. */
static void prefix_rows(fuzz *F, int layer, void *k, void *v, kvrt_dtype src)
{
    const layer_info *L = &F->li[layer];
    for (int i = 0; i < F->plan_n; i++) {
        uint64_t digest;
        if (!ref_seq_token_digest(F->ref, F->plan_seq[i], F->plan_pos[i], &digest))
            continue;
        uint64_t x = digest ^ ((uint64_t)layer * 0x9e3779b97f4a7c15ull);
        for (int64_t e = 0; e < L->k_elems + L->v_elems; e++) {
            double value = (double)((int)(splitmix64(&x) % 129) - 64) / 64.0;
            if (e < L->k_elems)
                ref_store(k, src, i * L->k_elems + e, value);
            else
                ref_store(v, src, i * L->v_elems + (e - L->k_elems), value);
        }
    }
}

/* A lookup of a prompt's first tokens under a salt, into seq (< 0: mostly
 * an empty sequence). Its hit must be whole blocks, no longer than the run
 * the reference recorded, exactly that run while nothing was edited or
 * evicted; the attached rows are compared with the records by check(). */
static void op_attach(fuzz *F, int32_t seq)
{
    rng *r = &F->r;
    if (seq < 0) {
        seq = (int32_t)rng_below(r, F->desc.max_seqs);
        for (int k = 0; k < 4 * F->desc.max_seqs && !ref_seq_is_empty(F->ref, seq) &&
                        rng_chance(r, 0.97);
             k++)
            seq = (int32_t)rng_below(r, F->desc.max_seqs);
    }
    int prompt = (int)rng_below(r, 3);
    const char *salt = prefix_salts[rng_below(r, 3)];
    int salt_len = (int)strlen(salt), n = (int)rng_between(r, 0, PROMPT_MAX);
    const int32_t *tokens = F->prompts[prompt];
    ref_status_set allowed = ref_attach_prefix(F->ref, seq, tokens, n, salt, salt_len, 0, 0);
    int32_t longest = REF_HAS(allowed, KVRT_OK)
                          ? ref_prefix_longest(F->ref, tokens, n, salt, salt_len, F->desc.block_size)
                          : 0;
    const snapshot *S = before(F);
    uint64_t digest = ref_digest(F);
    int32_t covered = -7;
    oplog(F, "kvrt_seq_attach_prefix(seq %d, prompt %d, %d tokens, salt \"%s\")", (int)seq, prompt,
          n, salt);
    kvrt_status st = kvrt_seq_attach_prefix(F->cache, seq, tokens, n, salt, salt_len, &covered);
    oplog_status(F, st);
    tally_add("kvrt_seq_attach_prefix", st);
    expect(F, "kvrt_seq_attach_prefix", st, allowed);
    if (st != KVRT_OK) {
        F->n_errors_seen++;
        if (covered != -7)
            fail(F, "a failed kvrt_seq_attach_prefix wrote n_covered %d", (int)covered);
        check(F, 1);
        return;
    }
    oplog(F, "  covered %d; reference: %d recorded, exact %d", (int)covered, (int)longest,
          F->prefix_exact);
    if (covered < 0 || covered > n || covered % F->desc.block_size != 0 || covered > longest ||
        (F->prefix_exact && covered != longest))
        fail(F, "kvrt_seq_attach_prefix covered %d of %d tokens; the reference recorded the "
                "first %d (%s)",
             (int)covered, n, (int)longest,
             F->prefix_exact ? "nothing was edited or evicted since: they must all be found"
                             : "an upper bound after edits or evictions");
    ref_attach_prefix(F->ref, seq, tokens, n, salt, salt_len, covered, 1);
    F->seq_prompt[seq] = prompt;
    total_prefix_hits += covered > 0;
    total_prefix_tokens += covered;
    total_prefix_exact += F->prefix_exact;
    edit_done(F, digest, 1);
    kvrt_prefix_stats was = S->prefix;
    check(F, 0);
    const kvrt_prefix_stats *now = &before(F)->prefix;
    if (now->lookups != was.lookups + 1 || now->tokens_queried != was.tokens_queried + n ||
        now->tokens_served != was.tokens_served + covered ||
        now->hits != was.hits + (covered > 0) || now->misses != was.misses + (covered == 0))
        fail(F, "prefix stats after a lookup covering %d of %d tokens: lookups %" PRId64
                " -> %" PRId64 ", served %" PRId64 " -> %" PRId64,
             (int)covered, n, was.lookups, now->lookups, was.tokens_served, now->tokens_served);
}

/* The next tokens of one or two sequences' prompts, planned with their ids
 * (an empty sequence looks its prompt up first, now and then). */
static void op_prefix_plan(fuzz *F)
{
    rng *r = &F->r;
    int32_t seqs[MAX_BATCH], pos[MAX_BATCH], tokens[MAX_BATCH];
    int n = 0, n_seqs = 1 + (int)rng_below(r, 2), used[MAX_SEQS] = {0};
    for (int k = 0; k < n_seqs && n < F->max_tokens; k++) {
        int32_t s = (int32_t)rng_below(r, F->desc.max_seqs);
        if (used[s])
            continue;
        used[s] = 1;
        if (k == 0 && ref_seq_is_empty(F->ref, s) && rng_chance(r, 0.6))
            op_attach(F, s);
        int64_t start = (int64_t)ref_seq_pos_max(F->ref, s) + 1;
        int count = rng_chance(r, 0.5) ? 1 : 2 + (int)rng_below(r, 30);
        for (int c = 0; c < count && n < F->max_tokens && start + c < INT32_MAX; c++) {
            int64_t p = start + c;
            seqs[n] = s;
            pos[n] = (int32_t)p;
            tokens[n] = p < PROMPT_MAX ? F->prompts[F->seq_prompt[s]][p] : (int32_t)(p * 7 + s);
            n++;
        }
    }
    for (int i = n - 1; i > 0 && rng_chance(r, 0.3); i--) { /* any order */
        int j = (int)rng_below(r, i + 1);
        int32_t ts = seqs[i], tp = pos[i], tt = tokens[i];
        seqs[i] = seqs[j], pos[i] = pos[j], tokens[i] = tokens[j];
        seqs[j] = ts, pos[j] = tp, tokens[j] = tt;
    }
    if (n == 0)
        return;
    F->plan_tokens = tokens;
    do_plan(F, n, seqs, pos);
}

/* A request ends: its sequence goes, its keyed blocks stay cached. */
static void op_prefix_release(fuzz *F)
{
    int32_t seq = (int32_t)rng_below(&F->r, F->desc.max_seqs);
    for (int k = 0; k < F->desc.max_seqs && ref_seq_is_empty(F->ref, seq); k++)
        seq = (seq + 1) % F->desc.max_seqs;
    op_rm(F, seq, 0, -1);
}

/* A plan as large as the batch allows, without token ids: free blocks run
 * out and cached ones must be evicted rather than the plan refused. */
static void op_pressure(fuzz *F)
{
    int32_t seqs[MAX_BATCH], pos[MAX_BATCH];
    int32_t s = (int32_t)rng_below(&F->r, F->desc.max_seqs);
    int64_t start = (int64_t)ref_seq_pos_max(F->ref, s) + 1;
    int n = 0;
    for (; n < F->max_tokens && start + n < INT32_MAX; n++) {
        seqs[n] = s;
        pos[n] = (int32_t)(start + n);
    }
    if (n > 0)
        do_plan(F, n, seqs, pos);
}

/* Bad input to the prefix calls: refused with a message naming the call,
 * nothing changed. */
static void op_prefix_invalid(fuzz *F)
{
    rng *r = &F->r;
    kvrt_cache *c = F->cache;
    static char salt[8] = "salt";
    int32_t covered = -7, any = (int32_t)rng_below(r, F->desc.max_seqs), full = -1;
    for (int32_t s = 0; s < F->desc.max_seqs; s++)
        if (!ref_seq_is_empty(F->ref, s))
            full = s;
    int32_t seqs[2] = {any, any}, pos[2], tokens[2] = {1, 2};
    /* the next positions, kept within int32 (shifts may have taken the
     * sequence near INT32_MAX; these plans are refused before positions
     * are looked at) */
    int64_t next = (int64_t)ref_seq_pos_max(F->ref, any) + 1;
    pos[0] = (int32_t)(next < INT32_MAX ? next : INT32_MAX);
    pos[1] = (int32_t)(next + 1 < INT32_MAX ? next + 1 : INT32_MAX);
    const int32_t *prompt = F->prompts[0];
    const char *what, *fn = "kvrt_seq_attach_prefix";
    kvrt_status st;
    int plan_call = 0, k = (int)rng_below(r, 9);
    if (k == 0 && full < 0)
        k = 1;
    switch (k) {
    case 0: what = "kvrt_seq_attach_prefix(a sequence that is not empty)";
        st = kvrt_seq_attach_prefix(c, full, prompt, PROMPT_MAX, NULL, 0, &covered); break;
    case 1: what = "kvrt_seq_attach_prefix(NULL tokens)";
        st = kvrt_seq_attach_prefix(c, any, NULL, 1 + (int)rng_below(r, 40), NULL, 0, &covered); break;
    case 2: what = "kvrt_seq_attach_prefix(salt_len beyond KVRT_PREFIX_SALT_MAX)";
        st = kvrt_seq_attach_prefix(c, any, prompt, 8, salt,
                                    KVRT_PREFIX_SALT_MAX + 1 + (int)rng_below(r, 1 << 20), &covered);
        break;
    case 3: what = "kvrt_seq_attach_prefix(negative salt_len)";
        st = kvrt_seq_attach_prefix(c, any, prompt, 8, salt, -1 - (int)rng_below(r, 9), &covered); break;
    case 4: what = "kvrt_seq_attach_prefix(NULL salt with a length)";
        st = kvrt_seq_attach_prefix(c, any, prompt, 8, NULL, 4, &covered); break;
    case 5: what = "kvrt_seq_attach_prefix(NULL n_covered)";
        st = kvrt_seq_attach_prefix(c, any, prompt, 8, NULL, 0, NULL); break;
    case 6: what = "kvrt_seq_attach_prefix(negative n)";
        st = kvrt_seq_attach_prefix(c, any, prompt, -1 - (int)rng_below(r, 9), NULL, 0, &covered); break;
    case 7: what = "kvrt_batch_plan_tokens(NULL token_ids)";
        fn = "kvrt_batch_plan_tokens", plan_call = 1;
        st = kvrt_batch_plan_tokens(c, 2, seqs, pos, NULL, 2, F->batch); break;
    default: what = "kvrt_batch_plan_tokens(token_ids shorter than the plan)";
        fn = "kvrt_batch_plan_tokens", plan_call = 1;
        st = kvrt_batch_plan_tokens(c, 2, seqs, pos, tokens, 1, F->batch); break;
    }
    oplog(F, "%s", what);
    oplog_status(F, st);
    tally_add(fn, st);
    expect(F, what, st, SET(ERR_INVALID_ARG));
    F->n_errors_seen++;
    if (strncmp(kvrt_last_error(), fn, strlen(fn)) != 0)
        fail(F, "%s: the message '%s' does not start with %s", what, kvrt_last_error(), fn);
    if (covered != -7)
        fail(F, "%s wrote n_covered %d", what, (int)covered);
    if (plan_call && F->plan_state == PLAN_VALID)
        F->plan_state = PLAN_MAYBE;
    check(F, 1);
}

/* ------------------------------------------------------------------------ */
/* Scenarios: fixed operation lists, each the shortest case of a defect the  */
/* fuzzer found, replayed through the same checks (--scenario NAME|all).     */
/* ------------------------------------------------------------------------ */

struct scenario {
    const char *name;
    const char *what;      /* what kvrt must do */
    /* layers: "full" ATTN 1x8/8, "swaW" the same with window W, "cross" CROSS
     * 1x8/8, "mla" MLA 16+8 */
    const char *layers;
    int         block_size, n_blocks, max_blocks, max_seqs;
    /* "plan S@P0..P1 S@P ...", "rm S P0 P1", "shift S P0 P1 D", "div S P0 P1 D",
     * "cp SRC DST P0 P1", "keep S", "cross LAYER S N", "compact", "clear" */
    const char *ops[12];
};

static const scenario scenarios[] = {
    {"plan-negative-position", "a negative position is KVRT_ERR_INVALID_ARG",
     "full", 16, 4, 0, 1, {"plan 0@-1"}},
    {"window-frees-blocks",
     "blocks that leave the window make room for the new tokens (no KVRT_ERR_CAPACITY)",
     "swa2", 2, 2, 0, 1, {"plan 0@0..3", "plan 0@6..8"}},
    {"window-frees-for-earlier-sequence",
     "blocks one sequence's window frees serve an earlier sequence of the same plan "
     "(no KVRT_ERR_INTERNAL half-way through)",
     "swa4", 2, 4, 0, 2, {"plan 1@0..3", "plan 0@0..1", "plan 0@2..5 1@100"}},
    {"shift-evicted-rows",
     "moving positions a window dropped moves evicted_max with them, so a token whose window "
     "holds them is refused",
     "full swa4", 2, 16, 0, 1, {"plan 0@0..9", "plan 0@10", "shift 0 4 6 100", "plan 0@106"}},
    {"emptied-sequence-starts-afresh",
     "a sequence emptied by removals in parts keeps no evicted range",
     "full swa4", 2, 16, 0, 1,
     {"plan 0@0..9", "plan 0@10", "rm 0 2 4", "rm 0 0 2", "rm 0 4 -1", "plan 0@0"}},
    {"copy-without-tokens", "a copy that holds no token holds no evicted range",
     "full swa4", 2, 16, 0, 2, {"plan 0@0..9", "plan 0@10", "rm 0 2 4", "cp 0 1 2 4", "plan 1@0"}},
    {"failed-plan-keeps-pools", "a plan refused in one group grows no other group's pool",
     "full swa4", 2, 2, 8, 2, {"plan 0@0..3", "plan 0@10", "rm 0 10 11", "plan 1@0..5 0@4"}},
    {"copy-cross-to-fresh-sequence",
     "kvrt_seq_cp shares cross K/V with a sequence that never had any",
     "full cross", 16, 4, 0, 2, {"cross 1 0 3", "cp 0 1 0 -1"}},
    {"copy-empty-range-shares-cross", "a copy of an empty range still shares the cross K/V",
     "full cross", 16, 4, 0, 2, {"cross 1 0 3", "cp 0 1 0 0"}},
};

enum { N_SCENARIOS = (int)(sizeof scenarios / sizeof scenarios[0]) };

static void scenario_desc(fuzz *F)
{
    const scenario *sc = F->sc;
    kvrt_cache_desc *d = &F->desc;
    kvrt_cache_desc_init(d);
    F->n_layers = 0;
    char buf[128];
    snprintf(buf, sizeof buf, "%s", sc->layers);
    for (char *t = strtok(buf, " "); t != NULL && F->n_layers < MAX_LAYERS; t = strtok(NULL, " ")) {
        kvrt_layer_desc l;
        memset(&l, 0, sizeof l);
        if (strcmp(t, "mla") == 0) {
            l = mla_layer(16, 8);
        } else {
            l.kind = strcmp(t, "cross") == 0 ? KVRT_LAYER_CROSS : KVRT_LAYER_ATTN;
            l.n_kv_heads = 1;
            l.head_dim_k = l.head_dim_v = 8;
            if (strncmp(t, "swa", 3) == 0)
                l.window = atoi(t + 3);
        }
        F->layers[F->n_layers++] = l;
    }
    d->device.backend = F->opt->backend;
    d->dtype = KVRT_F32;
    d->n_layers = F->n_layers;
    d->layers = F->layers;
    d->max_seqs = sc->max_seqs;
    d->block_size = sc->block_size;
    d->n_blocks = sc->n_blocks;
    d->max_blocks = sc->max_blocks;
    d->cross_max_len = strstr(sc->layers, "cross") ? 4 : 0;
    d->rope.n_rot = 8;
    F->max_tokens = MAX_TOKENS;
    snprintf(F->config, sizeof F->config,
             "scenario %s: layers %s, block_size %d, n_blocks %d, max_blocks %d, max_seqs %d",
             sc->name, sc->layers, sc->block_size, sc->n_blocks, sc->max_blocks, sc->max_seqs);
}

/* Runs one operation of a scenario. */
static void scenario_op(fuzz *F, const char *op)
{
    int a[4] = {0};
    if (strncmp(op, "plan ", 5) == 0) {
        int32_t seqs[MAX_BATCH], pos[MAX_BATCH];
        int n = 0;
        for (const char *p = op + 5; *p != '\0' && n < MAX_BATCH;) {
            int seq, p0, p1, used = 0;
            if (sscanf(p, "%d@%d..%d%n", &seq, &p0, &p1, &used) == 3) {
            } else if (sscanf(p, "%d@%d%n", &seq, &p0, &used) == 2) {
                p1 = p0;
            } else {
                fprintf(stderr, "kvrt-fuzz: bad scenario operation '%s'\n", op);
                exit(2);
            }
            for (int q = p0; q <= p1 && n < MAX_BATCH; q++)
                seqs[n] = seq, pos[n] = q, n++;
            p += used;
            while (*p == ' ')
                p++;
        }
        do_plan(F, n, seqs, pos);
    } else if (sscanf(op, "rm %d %d %d", &a[0], &a[1], &a[2]) == 3) {
        op_rm(F, a[0], a[1], a[2]);
    } else if (sscanf(op, "shift %d %d %d %d", &a[0], &a[1], &a[2], &a[3]) == 4) {
        op_shift(F, a[0], a[1], a[2], a[3]);
    } else if (sscanf(op, "div %d %d %d %d", &a[0], &a[1], &a[2], &a[3]) == 4) {
        op_div(F, a[0], a[1], a[2], a[3]);
    } else if (sscanf(op, "cp %d %d %d %d", &a[0], &a[1], &a[2], &a[3]) == 4) {
        do_cp(F, a[0], a[1], a[2], a[3]);
    } else if (sscanf(op, "keep %d", &a[0]) == 1) {
        do_keep(F, a[0]);
    } else if (sscanf(op, "cross %d %d %d", &a[0], &a[1], &a[2]) == 3) {
        do_cross_set(F, a[0], a[1], a[2]);
    } else if (strcmp(op, "compact") == 0) {
        op_compact(F);
    } else if (strcmp(op, "clear") == 0) {
        op_clear(F);
    } else {
        fprintf(stderr, "kvrt-fuzz: bad scenario operation '%s'\n", op);
        exit(2);
    }
}

/* ------------------------------------------------------------------------ */
/* Streams                                                                   */
/* ------------------------------------------------------------------------ */

static void run_op(fuzz *F)
{
    rng *r = &F->r;
    int has_cross = 0;
    for (int l = 0; l < F->n_layers; l++)
        has_cross |= F->li[l].d.kind == KVRT_LAYER_CROSS;
    /* weights */
    enum { W_PLAN, W_RM, W_CP, W_KEEP, W_SHIFT, W_CTX, W_DIV, W_COMPACT, W_CLEAR, W_CROSS,
           W_GATHER, W_INVALID, W_STALE, W_BATCH, W_STATE, W_OFFLOAD, W_PREFIX_PLAN,
           W_ATTACH, W_RELEASE, W_PRESSURE, W_PREFIX_INVALID, W_N };
    int p = F->prefix; /* prefix caching: its operations, and fewer edits */
    int w[W_N] = {p ? 10 : 34, p ? 3 : 9, p ? 2 : 7, 1, p ? 2 : 8, p ? 1 : 3, p ? 1 : 4,
                  p ? 1 : 4, 1, has_cross ? 7 : 0, 4, p ? 3 : 8, 2, 1, p ? 1 : 3, p ? 1 : 2,
                  p ? 30 : 0, p ? 16 : 0, p ? 8 : 0, p ? 3 : 0, p ? 3 : 0};
    int total = 0;
    for (int i = 0; i < W_N; i++)
        total += w[i];
    int pick = (int)rng_below(r, total), op = 0;
    while (pick >= w[op])
        pick -= w[op++];
    switch (op) {
    case W_PLAN: op_plan(F); break;
    case W_RM: {
        int32_t seq = random_seq(F, 0.1, 0.02), p0, p1;
        gen_range(F, seq, &p0, &p1);
        op_rm(F, seq, p0, p1);
        break;
    }
    case W_CP: op_cp(F); break;
    case W_KEEP: op_keep(F); break;
    case W_SHIFT: {
        int32_t seq = random_seq(F, 0.1, 0.02), p0, p1;
        gen_range(F, seq, &p0, &p1);
        op_shift(F, seq, p0, p1, gen_delta(F, seq));
        break;
    }
    case W_CTX: op_context_shift(F); break;
    case W_DIV: {
        int32_t seq = random_seq(F, 0.05, 0.02), p0, p1;
        gen_range(F, seq, &p0, &p1);
        int d = rng_chance(r, 0.95) ? 1 + (int)rng_below(r, 4) : -(int)rng_below(r, 2);
        op_div(F, seq, p0, p1, d);
        break;
    }
    case W_COMPACT: op_compact(F); break;
    case W_CLEAR: op_clear(F); break;
    case W_CROSS: op_cross_set(F); break;
    case W_GATHER: op_gather(F); break;
    case W_INVALID: op_invalid(F); break;
    case W_STALE:
        if (F->plan_n > 0 && rng_chance(r, 0.4))
            op_attention(F, (int)rng_below(r, F->n_layers)); /* on whatever the plan is now */
        else
            op_stale_write(F);
        break;
    case W_STATE: op_save_load(F); break;
    case W_OFFLOAD: op_offload(F); break;
    case W_PREFIX_PLAN: op_prefix_plan(F); break;
    case W_ATTACH: op_attach(F, -1); break;
    case W_RELEASE: op_prefix_release(F); break;
    case W_PRESSURE: op_pressure(F); break;
    case W_PREFIX_INVALID: op_prefix_invalid(F); break;
    default: op_new_batch(F); break;
    }
}

static void run_stream(const options *o, int64_t stream, const scenario *sc)
{
    fuzz *F = calloc(1, sizeof *F);
    if (F == NULL)
        fprintf(stderr, "kvrt-fuzz: out of host memory\n"), exit(1);
    F->opt = o;
    F->sc = sc;
    F->stream = stream;
    rng_seed(&F->r, o->seed, (uint64_t)stream);
    stream_setup(F);
    if (o->verbose)
        printf("stream %" PRId64 ": %s\n", stream, F->config);
    for (F->op_index = 1; sc != NULL && F->op_index <= 12 && sc->ops[F->op_index - 1]; F->op_index++) {
        scenario_op(F, sc->ops[F->op_index - 1]);
        F->n_ops++;
    }
    for (F->op_index = 1; sc == NULL && F->op_index <= o->ops; F->op_index++) {
        shared_pick(F);
        run_op(F);
        F->n_ops++;
    }
    total_ops += F->n_ops;
    total_checks += F->n_checks;
    total_errors += F->n_errors_seen;
    stream_teardown(F);
    free(F);
}

int main(int argc, char **argv)
{
    options o = parse_options(argc, argv);
    if (getenv("KVRT_CPU_ISA") != NULL) {
        int isa = test_isa_check("kvrt-fuzz");
        if (isa != 0)
            return isa;
    }
    if (kvrt_device_count(o.backend) == 0) {
        printf("kvrt-fuzz: no %s device; skipped\n", kvrt_backend_name(o.backend));
        return 77;
    }
    if (kvrt_version_number() != KVRT_VERSION_NUMBER) {
        fprintf(stderr, "kvrt-fuzz: library version %u, header %u\n", kvrt_version_number(),
                (unsigned)KVRT_VERSION_NUMBER);
        return 1;
    }
    dev_open(o.backend);
    if (o.scenario != NULL) {
        int found = 0;
        for (int i = 0; i < N_SCENARIOS; i++) {
            const scenario *sc = &scenarios[i];
            if (strcmp(o.scenario, "list") == 0) {
                printf("%-36s %s\n", sc->name, sc->what);
                found = 1;
                continue;
            }
            if (strcmp(o.scenario, "all") != 0 && strcmp(o.scenario, sc->name) != 0)
                continue;
            options one = o;
            one.scenario = sc->name;
            run_stream(&one, 0, sc);
            printf("kvrt-fuzz: scenario %s: ok\n", sc->name);
            found = 1;
        }
        if (!found)
            usage();
        return 0;
    }
    for (int64_t i = 0; i < o.streams; i++)
        run_stream(&o, o.first + i, NULL);
    printf("kvrt-fuzz: %s %s: %" PRId64 " streams, %" PRId64 " operations (%" PRId64
           " refused as expected), %" PRId64 " checks, %" PRId64 " attention calls compared: ok\n",
           kvrt_backend_name(o.backend), model_names[o.model], o.streams, total_ops, total_errors,
           total_checks, total_attention);
    if (o.model == MODEL_PREFIX)
        printf("kvrt-fuzz: prefix caching: %" PRId64 " lookups attached %" PRId64
               " tokens, %" PRId64 " lookups checked for the reference's exact hit\n",
               total_prefix_hits, total_prefix_tokens, total_prefix_exact);
    if (o.verbose)
        tally_print();
    return 0;
}
