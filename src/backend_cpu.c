/*
 * backend_cpu.c: the CPU backend. Device memory is host memory reserved with
 * mmap and committed as a region grows; every operation is the C twin of a
 * GPU kernel, threaded with OpenMP, and uses the same kvrt_layout.h
 * addressing. Work completes before a call returns; streams are ignored.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

#ifdef _OPENMP
#  include <omp.h>
#endif

#include "attention_cpu.h"
#include "cpu_isa.h"
#include "internal.h"

typedef struct cpu_ctx {
    void  *stage;        /* staging copies (host memory is device memory here) */
    size_t stage_cap, stage_used;
    int    n_threads;    /* the most threads a call runs on (kvrt_cache_desc.n_threads) */
} cpu_ctx;

/* Attention runs on one thread per this many multiply-adds, at least, so
 * that a small call (a short prompt, a decode step of a small model) does
 * not pay for waking a worker and leaves none spinning (docs/api.md,
 * "Threads"; measured in bench/RESULTS.md). */
#define ATTN_THREAD_WORK ((int64_t)1 << 18)

/* The threads a parallel region of a call on be may use: n_threads, or
 * OpenMP's count, but never more than the processors this process may run
 * on or OpenMP's thread limit. More threads than processors only wait for
 * each other, and a team libgomp cannot create ends the process (it prints
 * and exits), so a large n_threads is capped rather than trusted. */
static int cpu_threads(const kvrt_backend_t *be)
{
    const cpu_ctx *ctx = be->ctx;
#ifdef _OPENMP
    int n = ctx->n_threads > 0 ? ctx->n_threads : omp_get_max_threads();
    int procs = omp_get_num_procs(), limit = omp_get_thread_limit();
    if (ctx->n_threads > 0 && n > procs)
        n = procs;
    if (n > limit)
        n = limit;
    return n > 0 ? n : 1;
#else
    (void)ctx;
    return 1;
#endif
}

void kvrt_cpu_backend_set_threads(kvrt_backend_t *be, int n_threads)
{
    ((cpu_ctx *)be->ctx)->n_threads = n_threads;
}

int kvrt_cpu_device_count(void) { return 1; }

static size_t page_round(size_t n)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    return (n + page - 1) / page * page;
}

/* Regions of at least this size start on a multiple of it and ask for
 * transparent huge pages: attention streams K and V through whole blocks,
 * and with 4 KiB pages every 4 KiB is a TLB miss and a stop for the
 * hardware prefetcher. */
#define HUGE_PAGE ((size_t)2 << 20)

static kvrt_status cpu_region_create(kvrt_backend_t *be, size_t reserve, size_t commit, void **base)
{
    (void)be;
    size_t r = page_round(reserve > 0 ? reserve : 1);
    size_t slack = r >= HUGE_PAGE ? HUGE_PAGE : 0;
    char *p = mmap(NULL, r + slack, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    KVRT_CHECK(p != MAP_FAILED, KVRT_ERR_OUT_OF_MEMORY, "cpu: reserving %zu bytes failed: %s", r,
               strerror(errno));
    if (slack > 0) { /* keep the aligned r bytes, give back the rest */
        size_t head = (HUGE_PAGE - (uintptr_t)p % HUGE_PAGE) % HUGE_PAGE;
        if (head > 0)
            munmap(p, head);
        if (slack - head > 0)
            munmap(p + head + r, slack - head);
        p += head;
#ifdef MADV_HUGEPAGE
        (void)madvise(p, r, MADV_HUGEPAGE); /* a hint: without it, 4 KiB pages */
#endif
    }
    if (commit > 0 && mprotect(p, page_round(commit), PROT_READ | PROT_WRITE) != 0) {
        int e = errno;
        munmap(p, r);
        return kvrt_set_error(KVRT_ERR_OUT_OF_MEMORY, "cpu: committing %zu bytes failed: %s",
                              commit, strerror(e));
    }
    *base = p;
    return KVRT_OK;
}

static kvrt_status cpu_region_grow(kvrt_backend_t *be, void *base, size_t reserve, size_t old_commit,
                                   size_t new_commit)
{
    (void)be;
    (void)old_commit;
    KVRT_CHECK(new_commit <= page_round(reserve), KVRT_ERR_INTERNAL,
               "cpu: growing a region past its reservation");
    /* pages never touched are zero */
    KVRT_CHECK(mprotect(base, page_round(new_commit), PROT_READ | PROT_WRITE) == 0,
               KVRT_ERR_OUT_OF_MEMORY, "cpu: committing %zu bytes failed: %s", new_commit,
               strerror(errno));
    return KVRT_OK;
}

static void cpu_region_destroy(kvrt_backend_t *be, void *base, size_t reserve)
{
    (void)be;
    if (base != NULL)
        munmap(base, page_round(reserve > 0 ? reserve : 1));
}

static kvrt_status cpu_zero(kvrt_backend_t *be, void *dst, size_t n, void *stream)
{
    (void)be;
    (void)stream;
    memset(dst, 0, n);
    return KVRT_OK;
}

/* Host arrays are readable by this "device" as they are: staging only has to
 * outlive the caller's buffer, which it does because work completes here. */
static kvrt_status cpu_stage(kvrt_backend_t *be, const void *host, size_t n, void *stream,
                             const void **device)
{
    (void)be;
    (void)n;
    (void)stream;
    *device = host;
    return KVRT_OK;
}

static void cpu_stage_reset(kvrt_backend_t *be, void *stream)
{
    (void)be;
    (void)stream;
}

static kvrt_status cpu_upload(kvrt_backend_t *be, void *dst, const void *host, size_t n, void *stream)
{
    (void)be;
    (void)stream;
    if (n > 0)
        memcpy(dst, host, n);
    return KVRT_OK;
}

static kvrt_status cpu_copy(kvrt_backend_t *be, void *dst, const void *src, size_t n, void *stream)
{
    (void)be;
    (void)stream;
    if (n > 0)
        memmove(dst, src, n);
    return KVRT_OK;
}

static kvrt_status cpu_sync(kvrt_backend_t *be, void *stream)
{
    (void)be;
    (void)stream;
    return KVRT_OK;
}

static kvrt_status cpu_mem_kind(kvrt_backend_t *be, const void *p, kvrt_mem_kind *kind, int *ordinal)
{
    (void)be;
    (void)p;
    *kind = KVRT_MEM_THIS_DEVICE; /* all host memory is this device's */
    *ordinal = 0;
    return KVRT_OK;
}

static kvrt_status cpu_scratch_alloc(kvrt_backend_t *be, size_t n, void **p)
{
    (void)be;
    *p = malloc(n > 0 ? n : 1);
    KVRT_CHECK(*p != NULL, KVRT_ERR_OUT_OF_MEMORY, "cpu: scratch of %zu bytes", n);
    return KVRT_OK;
}

static void cpu_scratch_free(kvrt_backend_t *be, void *p)
{
    (void)be;
    free(p);
}


/* Copies n bytes. With `stream` set, and both pointers 32-byte aligned and n
 * a multiple of 64, with non-temporal stores: a large op (many MiB) would
 * otherwise read every destination line before writing it (a third of its
 * memory traffic) and evict the cache for rows nobody reads soon. The
 * caller fences (copy_fence) before its results are used. */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#  include <immintrin.h>
__attribute__((target("avx"))) static void copy_stream_avx(char *dst, const char *src, size_t n)
{
    for (size_t i = 0; i < n; i += 64) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(src + i));
        __m256i b = _mm256_loadu_si256((const __m256i *)(src + i + 32));
        _mm256_stream_si256((__m256i *)(dst + i), a);
        _mm256_stream_si256((__m256i *)(dst + i + 32), b);
    }
}
static inline void copy_fence(void) { _mm_sfence(); }
#  define HAVE_STREAM 1
#else
static inline void copy_fence(void) {}
#  define HAVE_STREAM 0
#endif

enum { STREAM_MIN_BYTES = 16 << 20 }; /* ops moving less stay in the cache */

static inline void copy_bytes(void *dst, const void *src, size_t n, int stream)
{
#if HAVE_STREAM
    if (stream && ((uintptr_t)dst & 31) == 0 && (n & 63) == 0) {
        copy_stream_avx(dst, src, n);
        return;
    }
#endif
    (void)stream;
    memcpy(dst, src, n);
}

static int stream_ok(void)
{
#if HAVE_STREAM
    return kvrt_cpu_isa_level() >= KVRT_CPU_ISA_AVX2;
#else
    return 0;
#endif
}

/* Converts n elements between dtypes (memcpy when they match). */
static void convert_row(void *dst, int32_t dst_dtype, const void *src, int32_t src_dtype, int64_t n,
                        int32_t elem_size, int stream)
{
    if (dst_dtype == src_dtype) {
        copy_bytes(dst, src, (size_t)n * (size_t)elem_size, stream);
        return;
    }
    for (int64_t i = 0; i < n; i++)
        kvrt_store(dst, dst_dtype, i, kvrt_load(src, src_dtype, i));
}

static size_t dtype_bytes(int32_t dtype)
{
    return dtype == KVRT_LAYOUT_F32 ? 4 : kvrt_dtype_quantized(dtype) ? 1 : 2;
}

/* One head row into a quantized layer: quantized from src_dtype, or (src_dtype
 * the layer's own) copied with its stored scale. */
static void quant_row_in(void *dst, float *scale, int32_t dtype, const void *src, int32_t src_dtype,
                         const float *src_scale, int64_t n)
{
    if (src_dtype == dtype) {
        memcpy(dst, src, (size_t)n);
        memcpy(scale, src_scale, sizeof *scale); /* state images align nothing */
        return;
    }
    *scale = kvrt_quant_row(dst, dtype, src, src_dtype, n);
}

/* write into a quantized layer: one scale per (row, head) of K and of V. */
static kvrt_status cpu_write_quant(const kvrt_write_op *op)
{
    const kvrt_layout L = op->layer.layout;
    const size_t src_es = dtype_bytes(op->src_dtype);
#pragma omp parallel for schedule(static) if (op->n_rows >= 64)
    for (int32_t r = 0; r < op->n_rows; r++) {
        int64_t slot = op->slots[r];
        for (int32_t h = 0; h < L.n_heads; h++) {
            int64_t rh = (int64_t)r * L.n_heads + h, si = kvrt_scale_index(&L, slot, h);
            quant_row_in((int8_t *)op->layer.k + kvrt_k_index(&L, slot, h), op->layer.k_scale + si,
                         L.dtype, (const char *)op->k_src + rh * L.dim_k * src_es, op->src_dtype,
                         op->k_scale_src != NULL ? op->k_scale_src + rh : NULL, L.dim_k);
            if (op->v_src != NULL && L.dim_v > 0)
                quant_row_in((int8_t *)op->layer.v + kvrt_v_index(&L, slot, h),
                             op->layer.v_scale + si, L.dtype,
                             (const char *)op->v_src + rh * L.dim_v * src_es, op->src_dtype,
                             op->v_scale_src != NULL ? op->v_scale_src + rh : NULL, L.dim_v);
        }
    }
    return KVRT_OK;
}

/* write: row r of the source goes to slot slots[r], every head. */
static kvrt_status cpu_write(kvrt_backend_t *be, const kvrt_write_op *op, void *stream)
{
    (void)stream;
    if (kvrt_dtype_quantized(op->layer.layout.dtype))
        return cpu_write_quant(op);
    const kvrt_layout L = op->layer.layout;
    const size_t src_es = dtype_bytes(op->src_dtype), es = (size_t)L.elem_size;
    const size_t bytes = (size_t)op->n_rows * L.n_heads * (L.dim_k + (op->v_src ? L.dim_v : 0)) * es;
    const int nt = bytes >= STREAM_MIN_BYTES && stream_ok();
#pragma omp parallel if (op->n_rows >= 64) num_threads(cpu_threads(be))
    {
#pragma omp for schedule(static) nowait
    for (int32_t r = 0; r < op->n_rows; r++) {
        int64_t slot = op->slots[r];
        for (int32_t h = 0; h < L.n_heads; h++) {
            const char *ks = (const char *)op->k_src + ((int64_t)r * L.n_heads + h) * L.dim_k * src_es;
            char *kd = (char *)op->layer.k + kvrt_k_index(&L, slot, h) * es;
            convert_row(kd, L.dtype, ks, op->src_dtype, L.dim_k, L.elem_size, nt);
            if (op->v_src != NULL && L.dim_v > 0) {
                const char *vs =
                    (const char *)op->v_src + ((int64_t)r * L.n_heads + h) * L.dim_v * src_es;
                char *vd = (char *)op->layer.v + kvrt_v_index(&L, slot, h) * es;
                convert_row(vd, L.dtype, vs, op->src_dtype, L.dim_v, L.elem_size, nt);
            }
        }
    }
    if (nt)
        copy_fence();
    }
    return KVRT_OK;
}

/* move: each span is a run of slots inside one block; per layer and head
 * the run is one contiguous piece of the block. */
static kvrt_status cpu_move(kvrt_backend_t *be, const kvrt_move_op *op, void *stream)
{
    (void)stream;
    /* Threads by bytes, not by pieces: a copy-on-write or seq_cp boundary
     * copy is one span, n_layers x n_heads pieces of block_size rows, a few
     * hundred KiB that one thread copies at half the machine's bandwidth.
     * One task per (span, layer, head). */
    int32_t heads = 1;
    size_t bytes = 0;
    for (int32_t l = 0; l < op->n_layers; l++) {
        const kvrt_layout *L = &op->layers[l].layout;
        heads = L->n_heads > heads ? L->n_heads : heads;
        bytes += (size_t)op->max_len * L->n_heads * (L->dim_k + (op->layers[l].v ? L->dim_v : 0)) *
                 (size_t)L->elem_size;
    }
    bytes *= (size_t)op->n_spans;
    int64_t total = (int64_t)op->n_spans * op->n_layers * heads;
#pragma omp parallel for schedule(static) if (bytes >= (128 << 10) && total >= 2) \
    num_threads(cpu_threads(be))
    for (int64_t t = 0; t < total; t++) {
        const kvrt_span sp = op->spans[t / heads / op->n_layers];
        const kvrt_layer_ref *ref = &op->layers[t / heads % op->n_layers];
        const kvrt_layout *L = &ref->layout;
        int32_t h = (int32_t)(t % heads);
        if (h >= L->n_heads)
            continue;
        size_t es = (size_t)L->elem_size;
        memcpy((char *)ref->k + kvrt_k_index(L, sp.dst, h) * es,
               (const char *)ref->k + kvrt_k_index(L, sp.src, h) * es,
               (size_t)sp.len * (size_t)L->dim_k * es);
        if (ref->v != NULL && L->dim_v > 0)
            memcpy((char *)ref->v + kvrt_v_index(L, sp.dst, h) * es,
                   (const char *)ref->v + kvrt_v_index(L, sp.src, h) * es,
                   (size_t)sp.len * (size_t)L->dim_v * es);
        /* a span's scales of one head are contiguous like its rows */
        if (ref->k_scale != NULL)
            memcpy(ref->k_scale + kvrt_scale_index(L, sp.dst, h),
                   ref->k_scale + kvrt_scale_index(L, sp.src, h), (size_t)sp.len * sizeof(float));
        if (ref->v_scale != NULL)
            memcpy(ref->v_scale + kvrt_scale_index(L, sp.dst, h),
                   ref->v_scale + kvrt_scale_index(L, sp.src, h), (size_t)sp.len * sizeof(float));
    }
    return KVRT_OK;
}

/* rotate: cos/sin of every pair depend only on (delta, dims), and a shift
 * moves a whole range by one delta, so each thread keeps the table of the
 * last (delta, dims) it saw instead of computing pow/cos/sin per slot,
 * layer, head and pair. Each head's rotated part is converted to f32 once,
 * turned, and converted back (F16C where the processor has it). */
enum { ROT_MAX_PAIRS = 512 };

typedef struct rot_table {
    int64_t delta;
    int32_t dims;
    float   theta;
    float   c[ROT_MAX_PAIRS], s[ROT_MAX_PAIRS];
} rot_table;

/* The table of (delta, dims) for a layer whose RoPE base is theta. */
static void rot_table_get(rot_table *t, const kvrt_rope *rope, float theta, int32_t dims,
                          int64_t delta)
{
    if (t->delta == delta && t->dims == dims && t->theta == theta)
        return;
    kvrt_rope r = *rope;
    r.theta = theta;
    for (int32_t p = 0; p < dims / 2; p++) {
        double angle = kvrt_rope_angle(&r, dims, p, delta);
        t->c[p] = (float)cos(angle);
        t->s[p] = (float)sin(angle);
    }
    t->delta = delta;
    t->dims = dims;
    t->theta = theta;
}

/* x[a], x[b] of each pair turned by the table, in f32. */
static inline void rot_apply(float *restrict out, const float *restrict x, const rot_table *t,
                             int32_t style, int32_t dims)
{
    int32_t half = dims / 2;
    if (style == 0) {
        for (int32_t p = 0; p < half; p++) {
            float a = x[2 * p], b = x[2 * p + 1];
            out[2 * p] = a * t->c[p] - b * t->s[p];
            out[2 * p + 1] = a * t->s[p] + b * t->c[p];
        }
    } else {
        for (int32_t p = 0; p < half; p++) {
            float a = x[p], b = x[p + half];
            out[p] = a * t->c[p] - b * t->s[p];
            out[p + half] = a * t->s[p] + b * t->c[p];
        }
    }
}

static void rotate_head_generic(void *k, int32_t dtype, int64_t base, const rot_table *t,
                                int32_t style, int32_t dims)
{
    float x[2 * ROT_MAX_PAIRS], out[2 * ROT_MAX_PAIRS];
    for (int32_t i = 0; i < dims; i++)
        x[i] = kvrt_load(k, dtype, base + i);
    rot_apply(out, x, t, style, dims);
    for (int32_t i = 0; i < dims; i++)
        kvrt_store(k, dtype, base + i, out[i]);
}

/* A quantized head row: dequantized whole (its scale covers every element),
 * the rotated part turned, and the row quantized again with a new scale. */
static void rotate_head_quant(const kvrt_layer_ref *ref, int64_t slot, int32_t h,
                              const rot_table *t, int32_t style)
{
    const kvrt_layout *L = &ref->layout;
    float x[KVRT_QUANT_ROW_MAX], out[2 * ROT_MAX_PAIRS];
    int8_t *row = (int8_t *)ref->k + kvrt_k_index(L, slot, h);
    float *scale = ref->k_scale + kvrt_scale_index(L, slot, h);
    for (int32_t i = 0; i < L->dim_k; i++)
        x[i] = kvrt_dequant(row, L->dtype, i, *scale);
    rot_apply(out, x + L->rot_offset, t, style, L->rot_dims);
    memcpy(x + L->rot_offset, out, sizeof(float) * (size_t)L->rot_dims);
    *scale = kvrt_quant_row(row, L->dtype, x, KVRT_LAYOUT_F32, L->dim_k);
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#  include <immintrin.h>
#  define ROT_F16C 1
__attribute__((target("avx2,fma,f16c"))) static void
rotate_head_f16c(uint16_t *k, int64_t base, const rot_table *t, int32_t style, int32_t dims)
{
    float x[2 * ROT_MAX_PAIRS], out[2 * ROT_MAX_PAIRS];
    uint16_t *h = k + base;
    int32_t i = 0;
    for (; i + 8 <= dims; i += 8)
        _mm256_storeu_ps(x + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
    for (; i < dims; i++)
        x[i] = kvrt_f16_to_f32(h[i]);
    rot_apply(out, x, t, style, dims);
    for (i = 0; i + 8 <= dims; i += 8)
        _mm_storeu_si128((__m128i *)(h + i), _mm256_cvtps_ph(_mm256_loadu_ps(out + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < dims; i++)
        h[i] = kvrt_f32_to_f16(out[i]);
}
#else
#  define ROT_F16C 0
#endif

static kvrt_status cpu_rotate(kvrt_backend_t *be, const kvrt_rotate_op *op, void *stream)
{
    (void)stream;
    int f16c = 0;
#if ROT_F16C
    f16c = kvrt_cpu_isa_level() >= KVRT_CPU_ISA_AVX2;
#endif
    if (op->n <= 0 || op->n_layers <= 0)
        return KVRT_OK;
    /* Runs of slots in one block: a task is one layer's run, walked head by
     * head, so that it sweeps the block's K ([n_heads][block_size][dim_k],
     * contiguous) in address order rather than jumping between n_layers x
     * n_heads places per slot. */
    const int32_t bs = op->layers[0].layout.block_size;
    int32_t *run = malloc(sizeof(int32_t) * ((size_t)op->n + 1));
    if (run == NULL)
        return kvrt_set_error(KVRT_ERR_OUT_OF_MEMORY, "cpu rotate: %d run starts", op->n);
    int32_t n_runs = 0;
    for (int32_t i = 0; i < op->n; i++)
        if (i == 0 || op->slots[i] / bs != op->slots[i - 1] / bs)
            run[n_runs++] = i;
    run[n_runs] = op->n;
    int64_t tasks = (int64_t)n_runs * op->n_layers;
#pragma omp parallel if (op->n >= 64) num_threads(cpu_threads(be))
    {
        rot_table t;
        t.delta = 0; /* delta 0 is skipped, so never looked up */
        t.dims = -1;
        t.theta = 0.0f;
#pragma omp for schedule(dynamic, 8)
        for (int64_t task = 0; task < tasks; task++) {
            const kvrt_layer_ref *ref = &op->layers[task % op->n_layers];
            const kvrt_layout *L = &ref->layout;
            const int32_t r = (int32_t)(task / op->n_layers), dims = L->rot_dims;
            if (dims <= 0)
                continue;
            for (int32_t h = 0; h < L->n_heads; h++) {
                /* the next head's rows (the next 4 KiB page, which hardware
                 * prefetchers do not enter) while this head's are turned */
                if (h + 1 < L->n_heads) {
                    int32_t hn = h + 1;
                    const char *a = (const char *)ref->k +
                                    (kvrt_k_index(L, op->slots[run[r]], hn) + L->rot_offset) * L->elem_size;
                    const char *z = (const char *)ref->k +
                                    (kvrt_k_index(L, op->slots[run[r + 1] - 1], hn) + L->rot_offset + dims) * L->elem_size;
                    for (; a < z; a += 64)
                        __builtin_prefetch(a, 1);
                }
                for (int32_t i = run[r]; i < run[r + 1]; i++) {
                    int64_t delta = op->deltas[i];
                    if (delta == 0)
                        continue;
                    rot_table_get(&t, &op->rope, L->rope_theta, dims, delta);
                    if (ref->k_scale != NULL) {
                        rotate_head_quant(ref, op->slots[i], h, &t, op->rope.style);
                        continue;
                    }
                    int64_t base = kvrt_k_index(L, op->slots[i], h) + L->rot_offset;
#if ROT_F16C
                    if (f16c && L->dtype == KVRT_LAYOUT_F16) {
                        rotate_head_f16c(ref->k, base, &t, op->rope.style, dims);
                        continue;
                    }
#endif
                    rotate_head_generic(ref->k, L->dtype, base, &t, op->rope.style, dims);
                }
            }
        }
    }
    (void)f16c;
    free(run);
    return KVRT_OK;
}

/* One head row of a layer converted to dst_dtype (dequantized when the
 * layer is quantized). */
static void gather_row_as(void *dst, int32_t dst_dtype, const void *src, const float *scale,
                          int32_t dtype, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        kvrt_store(dst, dst_dtype, i,
                   scale != NULL ? kvrt_dequant(src, dtype, i, *scale) : kvrt_load(src, dtype, i));
}

/* gather with conversion, and of scales */
static kvrt_status cpu_gather_as(const kvrt_gather_op *op)
{
    const kvrt_layout L = op->layer.layout;
    const size_t es = (size_t)L.elem_size, des = op->convert ? dtype_bytes(op->dst_dtype) : es;
#pragma omp parallel for schedule(static) if (op->n >= 256)
    for (int32_t r = 0; r < op->n; r++) {
        int64_t slot = op->slots[r];
        for (int32_t h = 0; h < L.n_heads; h++) {
            int64_t rh = (int64_t)r * L.n_heads + h, si = kvrt_scale_index(&L, slot, h);
            if (op->k_scale_dst != NULL)
                op->k_scale_dst[rh] = op->layer.k_scale[si];
            if (op->v_scale_dst != NULL && op->layer.v_scale != NULL)
                op->v_scale_dst[rh] = op->layer.v_scale[si];
            const char *ks = (const char *)op->layer.k + kvrt_k_index(&L, slot, h) * es;
            const char *vs = op->layer.v != NULL ? (const char *)op->layer.v + kvrt_v_index(&L, slot, h) * es
                                                 : NULL;
            if (op->k_dst != NULL && op->convert)
                gather_row_as((char *)op->k_dst + rh * L.dim_k * des, op->dst_dtype, ks,
                              op->layer.k_scale != NULL ? op->layer.k_scale + si : NULL, L.dtype, L.dim_k);
            else if (op->k_dst != NULL)
                memcpy((char *)op->k_dst + rh * L.dim_k * es, ks, (size_t)L.dim_k * es);
            if (op->v_dst == NULL || vs == NULL || L.dim_v == 0)
                continue;
            if (op->convert)
                gather_row_as((char *)op->v_dst + rh * L.dim_v * des, op->dst_dtype, vs,
                              op->layer.v_scale != NULL ? op->layer.v_scale + si : NULL, L.dtype, L.dim_v);
            else
                memcpy((char *)op->v_dst + rh * L.dim_v * es, vs, (size_t)L.dim_v * es);
        }
    }
    return KVRT_OK;
}

static kvrt_status cpu_gather(kvrt_backend_t *be, const kvrt_gather_op *op, void *stream)
{
    (void)stream;
    if (op->convert || op->k_scale_dst != NULL || op->v_scale_dst != NULL)
        return cpu_gather_as(op);
    const kvrt_layout L = op->layer.layout;
    const size_t es = (size_t)L.elem_size;
    const size_t bytes = (size_t)op->n * L.n_heads *
                         ((op->k_dst ? L.dim_k : 0) + (op->v_dst ? L.dim_v : 0)) * es;
    const int nt = bytes >= STREAM_MIN_BYTES && stream_ok();
#pragma omp parallel if (op->n >= 256) num_threads(cpu_threads(be))
    {
#pragma omp for schedule(static) nowait
    for (int32_t r = 0; r < op->n; r++) {
        int64_t slot = op->slots[r];
        for (int32_t h = 0; h < L.n_heads; h++) {
            if (op->k_dst != NULL)
                copy_bytes((char *)op->k_dst + ((int64_t)r * L.n_heads + h) * L.dim_k * es,
                           (const char *)op->layer.k + kvrt_k_index(&L, slot, h) * es,
                           (size_t)L.dim_k * es, nt);
            if (op->v_dst != NULL && L.dim_v > 0)
                copy_bytes((char *)op->v_dst + ((int64_t)r * L.n_heads + h) * L.dim_v * es,
                           (const char *)op->layer.v + kvrt_v_index(&L, slot, h) * es,
                           (size_t)L.dim_v * es, nt);
        }
    }
    if (nt)
        copy_fence();
    }
    return KVRT_OK;
}

static kvrt_status cpu_set_pos(kvrt_backend_t *be, const kvrt_pos_op *op, void *stream)
{
    (void)be;
    (void)stream;
    for (int32_t i = 0; i < op->n; i++)
        memcpy(op->pos + (int64_t)op->blocks[i] * op->block_size,
               op->data + (int64_t)i * op->block_size, (size_t)op->block_size * sizeof(int32_t));
    return KVRT_OK;
}

static kvrt_status cpu_attention(kvrt_backend_t *be, const kvrt_attention_op *op, void *stream)
{
    (void)stream;
    /* One thread per ATTN_THREAD_WORK multiply-adds (q.k and p.v of every
     * query row over its sequence's slots), so that a call too small to pay
     * for waking a thread runs on this one and leaves no worker waiting. */
    int64_t work = 0;
    for (int32_t t = 0; t < op->n_tokens; t++)
        work += op->seq_n_slots[op->tok_seq[t]];
    work *= (int64_t)op->n_q_heads * (op->layer.layout.dim_k + op->dim_v);
    int n_threads = cpu_threads(be);
    if (work / ATTN_THREAD_WORK < n_threads)
        n_threads = work / ATTN_THREAD_WORK > 1 ? (int)(work / ATTN_THREAD_WORK) : 1;
    kvrt_status st = kvrt_cpu_attention(op, n_threads);
    if (st == KVRT_ERR_OUT_OF_MEMORY)
        return kvrt_set_error(st, "cpu attention: host scratch for %d tokens could not be allocated",
                              op->n_tokens);
    return st;
}

static void cpu_shutdown(kvrt_backend_t *be)
{
    cpu_ctx *ctx = be->ctx;
    if (ctx != NULL)
        free(ctx->stage);
    free(ctx);
    be->ctx = NULL;
}

static const kvrt_backend_ops cpu_ops = {
    .name = "cpu",
    .shutdown = cpu_shutdown,
    .region_create = cpu_region_create,
    .region_grow = cpu_region_grow,
    .region_destroy = cpu_region_destroy,
    .zero = cpu_zero,
    .stage = cpu_stage,
    .stage_reset = cpu_stage_reset,
    .upload = cpu_upload,
    .copy = cpu_copy,
    .download = cpu_copy,
    .sync = cpu_sync,
    .mem_kind = cpu_mem_kind,
    .scratch_alloc = cpu_scratch_alloc,
    .scratch_free = cpu_scratch_free,
    .write = cpu_write,
    .move = cpu_move,
    .rotate = cpu_rotate,
    .gather = cpu_gather,
    .set_pos = cpu_set_pos,
    .attention = cpu_attention,
};

kvrt_status kvrt_cpu_backend_open(kvrt_device device, kvrt_backend_t *out)
{
    KVRT_CHECK(device.ordinal == 0, KVRT_ERR_NO_DEVICE, "no device cpu:%d (only cpu:0)",
               device.ordinal);
    cpu_ctx *ctx = calloc(1, sizeof *ctx);
    KVRT_CHECK(ctx != NULL, KVRT_ERR_OUT_OF_MEMORY, "cpu backend context");
    out->device = device;
    out->ctx = ctx;
    out->ops = &cpu_ops;
    return KVRT_OK;
}
