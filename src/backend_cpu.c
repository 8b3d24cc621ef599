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

#include "attention_cpu.h"
#include "internal.h"

typedef struct cpu_ctx {
    void  *stage;        /* staging copies (host memory is device memory here) */
    size_t stage_cap, stage_used;
} cpu_ctx;

int kvrt_cpu_device_count(void) { return 1; }

static size_t page_round(size_t n)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    return (n + page - 1) / page * page;
}

static kvrt_status cpu_region_create(kvrt_backend_t *be, size_t reserve, size_t commit, void **base)
{
    (void)be;
    size_t r = page_round(reserve > 0 ? reserve : 1);
    void *p = mmap(NULL, r, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    KVRT_CHECK(p != MAP_FAILED, KVRT_ERR_OUT_OF_MEMORY, "cpu: reserving %zu bytes failed: %s", r,
               strerror(errno));
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

/* Converts n elements between dtypes (memcpy when they match). */
static void convert_row(void *dst, int32_t dst_dtype, const void *src, int32_t src_dtype, int64_t n,
                        int32_t elem_size)
{
    if (dst_dtype == src_dtype) {
        memcpy(dst, src, (size_t)n * (size_t)elem_size);
        return;
    }
    for (int64_t i = 0; i < n; i++)
        kvrt_store(dst, dst_dtype, i, kvrt_load(src, src_dtype, i));
}

static size_t dtype_bytes(int32_t dtype) { return dtype == KVRT_LAYOUT_F32 ? 4 : 2; }

/* write: row r of the source goes to slot slots[r], every head. */
static kvrt_status cpu_write(kvrt_backend_t *be, const kvrt_write_op *op, void *stream)
{
    (void)be;
    (void)stream;
    const kvrt_layout L = op->layer.layout;
    const size_t src_es = dtype_bytes(op->src_dtype), es = (size_t)L.elem_size;
#pragma omp parallel for schedule(static) if (op->n_rows >= 64)
    for (int32_t r = 0; r < op->n_rows; r++) {
        int64_t slot = op->slots[r];
        for (int32_t h = 0; h < L.n_heads; h++) {
            const char *ks = (const char *)op->k_src + ((int64_t)r * L.n_heads + h) * L.dim_k * src_es;
            char *kd = (char *)op->layer.k + kvrt_k_index(&L, slot, h) * es;
            convert_row(kd, L.dtype, ks, op->src_dtype, L.dim_k, L.elem_size);
            if (op->v_src != NULL && L.dim_v > 0) {
                const char *vs =
                    (const char *)op->v_src + ((int64_t)r * L.n_heads + h) * L.dim_v * src_es;
                char *vd = (char *)op->layer.v + kvrt_v_index(&L, slot, h) * es;
                convert_row(vd, L.dtype, vs, op->src_dtype, L.dim_v, L.elem_size);
            }
        }
    }
    return KVRT_OK;
}

/* move: each span is a run of slots inside one block; per layer and head
 * the run is one contiguous piece of the block. */
static kvrt_status cpu_move(kvrt_backend_t *be, const kvrt_move_op *op, void *stream)
{
    (void)be;
    (void)stream;
    int64_t total = (int64_t)op->n_spans * op->n_layers;
#pragma omp parallel for schedule(dynamic, 4) if (total >= 16)
    for (int64_t t = 0; t < total; t++) {
        const kvrt_span sp = op->spans[t / op->n_layers];
        const kvrt_layer_ref *ref = &op->layers[t % op->n_layers];
        const kvrt_layout *L = &ref->layout;
        for (int32_t h = 0; h < L->n_heads; h++) {
            size_t es = (size_t)L->elem_size;
            memcpy((char *)ref->k + kvrt_k_index(L, sp.dst, h) * es,
                   (const char *)ref->k + kvrt_k_index(L, sp.src, h) * es,
                   (size_t)sp.len * (size_t)L->dim_k * es);
            if (ref->v != NULL && L->dim_v > 0)
                memcpy((char *)ref->v + kvrt_v_index(L, sp.dst, h) * es,
                       (const char *)ref->v + kvrt_v_index(L, sp.src, h) * es,
                       (size_t)sp.len * (size_t)L->dim_v * es);
        }
    }
    return KVRT_OK;
}

/* rotate: per slot, the angle of each pair is computed once (in double) and
 * applied to every layer and head in f32, rounding back to the cache dtype. */
static kvrt_status cpu_rotate(kvrt_backend_t *be, const kvrt_rotate_op *op, void *stream)
{
    (void)be;
    (void)stream;
#pragma omp parallel for schedule(static) if (op->n >= 64)
    for (int32_t i = 0; i < op->n; i++) {
        int64_t slot = op->slots[i];
        int64_t delta = op->deltas[i];
        if (delta == 0)
            continue;
        for (int32_t l = 0; l < op->n_layers; l++) {
            const kvrt_layer_ref *ref = &op->layers[l];
            const kvrt_layout *L = &ref->layout;
            int32_t dims = L->rot_dims;
            for (int32_t p = 0; p < dims / 2; p++) {
                double angle = kvrt_rope_angle(&op->rope, dims, p, delta);
                float c = (float)cos(angle), s = (float)sin(angle);
                int32_t a, b;
                kvrt_rope_pair(op->rope.style, dims, p, &a, &b);
                for (int32_t h = 0; h < L->n_heads; h++) {
                    int64_t base = kvrt_k_index(L, slot, h) + L->rot_offset;
                    float x = kvrt_load(ref->k, L->dtype, base + a);
                    float y = kvrt_load(ref->k, L->dtype, base + b);
                    kvrt_store(ref->k, L->dtype, base + a, x * c - y * s);
                    kvrt_store(ref->k, L->dtype, base + b, x * s + y * c);
                }
            }
        }
    }
    return KVRT_OK;
}

static kvrt_status cpu_gather(kvrt_backend_t *be, const kvrt_gather_op *op, void *stream)
{
    (void)be;
    (void)stream;
    const kvrt_layout L = op->layer.layout;
    const size_t es = (size_t)L.elem_size;
#pragma omp parallel for schedule(static) if (op->n >= 256)
    for (int32_t r = 0; r < op->n; r++) {
        int64_t slot = op->slots[r];
        for (int32_t h = 0; h < L.n_heads; h++) {
            if (op->k_dst != NULL)
                memcpy((char *)op->k_dst + ((int64_t)r * L.n_heads + h) * L.dim_k * es,
                       (const char *)op->layer.k + kvrt_k_index(&L, slot, h) * es,
                       (size_t)L.dim_k * es);
            if (op->v_dst != NULL && L.dim_v > 0)
                memcpy((char *)op->v_dst + ((int64_t)r * L.n_heads + h) * L.dim_v * es,
                       (const char *)op->layer.v + kvrt_v_index(&L, slot, h) * es,
                       (size_t)L.dim_v * es);
        }
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
    (void)be;
    (void)stream;
    return kvrt_cpu_attention(op);
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
