/*
 * desc.c: cache descriptions: defaults, validation (every bad field gets a
 * message naming it and its value), row sizes.
 */
#include <math.h>

#include "internal.h"

void kvrt_cache_desc_init(kvrt_cache_desc *desc)
{
    if (desc == NULL)
        return;
    memset(desc, 0, sizeof *desc);
    desc->device.backend = KVRT_BACKEND_CPU;
    desc->dtype = KVRT_F16;
    desc->max_seqs = 1;
    desc->block_size = 16;
    desc->rope.theta = 10000.0f;
    desc->rope.freq_scale = 1.0f;
    desc->rope.style = KVRT_ROPE_NORMAL;
    desc->validate = 1;
}

static int head_dim_ok(int d) { return d >= 8 && d <= 1024 && d % 8 == 0; }

/* The layer rules of check_layer below that need no cache context. */
static int layer_shape_ok(const kvrt_layer_desc *l)
{
    switch (l->kind) {
    case KVRT_LAYER_ATTN:
    case KVRT_LAYER_CROSS:
        return l->n_kv_heads >= 1 && l->n_kv_heads <= 1024 && head_dim_ok(l->head_dim_k) &&
               head_dim_ok(l->head_dim_v) && l->latent_dim == 0 && l->rope_dim == 0 &&
               l->window >= 0 && (l->kind == KVRT_LAYER_ATTN || l->window == 0);
    case KVRT_LAYER_MLA:
        return l->n_kv_heads == 0 && l->head_dim_k == 0 && l->head_dim_v == 0 && l->window == 0 &&
               head_dim_ok(l->latent_dim) && l->rope_dim >= 0 && l->rope_dim <= 1024 &&
               l->rope_dim % 2 == 0;
    }
    return 0;
}

/* Whether a layer kind can be stored in a dtype: quantized rows are ATTN
 * and CROSS only. An MLA row in q8 is refused by design; in fp8 its
 * FlashMLA-style packed row is defined (kvrt_layout.h, kvrt_mla_fp8_*) but
 * not yet stored by any backend. */
static int kind_takes_dtype(kvrt_layer_kind kind, kvrt_dtype dtype)
{
    return !kvrt_dtype_is_quantized(dtype) || kind != KVRT_LAYER_MLA;
}

size_t kvrt_layer_scale_bytes(const kvrt_layer_desc *layer, kvrt_dtype dtype)
{
    if (layer == NULL || !kvrt_dtype_is_quantized(dtype) || !layer_shape_ok(layer) ||
        !kind_takes_dtype(layer->kind, dtype))
        return 0;
    return 2 * (size_t)layer->n_kv_heads * sizeof(float);
}

size_t kvrt_layer_row_bytes(const kvrt_layer_desc *layer, kvrt_dtype dtype)
{
    size_t es = kvrt_dtype_size(dtype);
    if (layer == NULL || es == 0 || !layer_shape_ok(layer) || !kind_takes_dtype(layer->kind, dtype))
        return 0;
    if (layer->kind == KVRT_LAYER_MLA)
        return (size_t)(layer->latent_dim + layer->rope_dim) * es;
    return (size_t)layer->n_kv_heads * (size_t)(layer->head_dim_k + layer->head_dim_v) * es +
           kvrt_layer_scale_bytes(layer, dtype);
}

const char *kvrt_layer_kind_name(int kind)
{
    switch (kind) {
    case KVRT_LAYER_ATTN: return "ATTN";
    case KVRT_LAYER_MLA: return "MLA";
    case KVRT_LAYER_CROSS: return "CROSS";
    }
    return "?";
}

int kvrt_layers_share_group(const kvrt_layer_desc *a, const kvrt_layer_desc *b)
{
    return a->kind != KVRT_LAYER_CROSS && a->kind == b->kind && a->window == b->window;
}

#define kind_name(k) kvrt_layer_kind_name((int)(k))

#define LAYER_CHECK(cond, ...) KVRT_CHECK(cond, KVRT_ERR_INVALID_ARG, __VA_ARGS__)

static kvrt_status check_head_dim(int i, const char *field, int value)
{
    LAYER_CHECK(value >= 8 && value <= 1024 && value % 8 == 0,
                "layer %d: %s %d must be a multiple of 8 in [8, 1024]", i, field, value);
    return KVRT_OK;
}

static kvrt_status check_layer(const kvrt_cache_desc *desc, int i)
{
    const kvrt_layer_desc *l = &desc->layers[i];
    LAYER_CHECK(isfinite(l->rope_theta) && l->rope_theta >= 0.0f && !signbit(l->rope_theta),
                "layer %d: rope_theta %g must be finite and >= 0, not -0 (0: the cache's "
                "rope.theta)", i, (double)l->rope_theta);
    LAYER_CHECK(l->kind != KVRT_LAYER_CROSS || l->rope_theta == 0.0f,
                "layer %d (CROSS): rope_theta %g must be 0 (cross-attention has no positions)", i,
                (double)l->rope_theta);
    switch (l->kind) {
    case KVRT_LAYER_ATTN:
    case KVRT_LAYER_CROSS:
        LAYER_CHECK(l->n_kv_heads >= 1 && l->n_kv_heads <= 1024,
                    "layer %d (%s): n_kv_heads %d must be in [1, 1024]", i, kind_name(l->kind),
                    l->n_kv_heads);
        KVRT_TRY(check_head_dim(i, "head_dim_k", l->head_dim_k));
        KVRT_TRY(check_head_dim(i, "head_dim_v", l->head_dim_v));
        LAYER_CHECK(l->latent_dim == 0, "layer %d (%s): latent_dim %d must be 0 (MLA only)", i,
                    kind_name(l->kind), l->latent_dim);
        LAYER_CHECK(l->rope_dim == 0, "layer %d (%s): rope_dim %d must be 0 (MLA only)", i,
                    kind_name(l->kind), l->rope_dim);
        if (l->kind == KVRT_LAYER_CROSS) {
            LAYER_CHECK(l->window == 0,
                        "layer %d (CROSS): window %d must be 0 (cross-attention has no positions)",
                        i, l->window);
            LAYER_CHECK(desc->cross_max_len >= 1 && desc->cross_max_len <= (1 << 20),
                        "layer %d (CROSS): cross_max_len %d must be in [1, 1048576]", i,
                        desc->cross_max_len);
        } else {
            LAYER_CHECK(l->window >= 0, "layer %d (ATTN): window %d must be >= 0", i, l->window);
            LAYER_CHECK(desc->rope.n_rot <= l->head_dim_k,
                        "layer %d (ATTN): rope.n_rot %d exceeds head_dim_k %d", i, desc->rope.n_rot,
                        l->head_dim_k);
        }
        return KVRT_OK;
    case KVRT_LAYER_MLA:
        LAYER_CHECK(l->n_kv_heads == 0,
                    "layer %d (MLA): n_kv_heads %d must be 0 (an MLA row is shared by all heads)",
                    i, l->n_kv_heads);
        LAYER_CHECK(l->head_dim_k == 0 && l->head_dim_v == 0,
                    "layer %d (MLA): head_dim_k %d / head_dim_v %d must be 0 (use latent_dim and "
                    "rope_dim)",
                    i, l->head_dim_k, l->head_dim_v);
        LAYER_CHECK(l->window == 0, "layer %d (MLA): window %d must be 0", i, l->window);
        KVRT_TRY(check_head_dim(i, "latent_dim", l->latent_dim));
        LAYER_CHECK(l->rope_dim >= 0 && l->rope_dim <= 1024 && l->rope_dim % 2 == 0,
                    "layer %d (MLA): rope_dim %d must be even in [0, 1024]", i, l->rope_dim);
        return KVRT_OK;
    }
    return kvrt_set_error(KVRT_ERR_INVALID_ARG, "layer %d: kind %d is not ATTN, MLA or CROSS", i,
                          (int)l->kind);
}

kvrt_status kvrt_desc_validate(const kvrt_cache_desc *desc)
{
    KVRT_CHECK(desc != NULL, KVRT_ERR_INVALID_ARG, "kvrt_cache_create: desc is NULL");
    const kvrt_cache_desc *d = desc;
    LAYER_CHECK(d->device.backend == KVRT_BACKEND_CPU || d->device.backend == KVRT_BACKEND_CUDA ||
                    d->device.backend == KVRT_BACKEND_HIP,
                "device.backend %d is not CPU, CUDA or HIP", (int)d->device.backend);
    LAYER_CHECK(kvrt_dtype_size(d->dtype) != 0, "dtype %d is not f32, f16, bf16, q8 or fp8_e4m3",
                (int)d->dtype);
    LAYER_CHECK(d->n_layers >= 1 && d->n_layers <= 4096, "n_layers %d must be in [1, 4096]",
                d->n_layers);
    LAYER_CHECK(d->layers != NULL, "layers is NULL (n_layers %d)", d->n_layers);
    LAYER_CHECK(d->max_seqs >= 1 && d->max_seqs <= (1 << 20), "max_seqs %d must be in [1, 1048576]",
                d->max_seqs);
    LAYER_CHECK(d->block_size >= 1 && d->block_size <= 256 &&
                    (d->block_size & (d->block_size - 1)) == 0,
                "block_size %d must be a power of two in [1, 256]", d->block_size);
    LAYER_CHECK(d->n_blocks >= 1, "n_blocks %d must be >= 1", d->n_blocks);
    LAYER_CHECK(d->max_blocks == 0 || d->max_blocks >= d->n_blocks,
                "max_blocks %d must be 0 or >= n_blocks %d", d->max_blocks, d->n_blocks);
    int64_t maxb = d->max_blocks > 0 ? d->max_blocks : d->n_blocks;
    LAYER_CHECK(maxb * d->block_size <= INT32_MAX,
                "max_blocks %lld x block_size %d exceeds 2^31 slots", (long long)maxb, d->block_size);
    LAYER_CHECK(d->cross_max_len >= 0, "cross_max_len %d must be >= 0", d->cross_max_len);
    LAYER_CHECK(d->rope.n_rot >= 0 && d->rope.n_rot % 2 == 0, "rope.n_rot %d must be even and >= 0",
                d->rope.n_rot);
    /* finite: an infinite or NaN angle would turn every re-rotated K into NaN */
    LAYER_CHECK(isfinite(d->rope.theta) && d->rope.theta > 0.0f,
                "rope.theta %g must be finite and > 0", (double)d->rope.theta);
    LAYER_CHECK(isfinite(d->rope.freq_scale) && d->rope.freq_scale > 0.0f,
                "rope.freq_scale %g must be finite and > 0", (double)d->rope.freq_scale);
    LAYER_CHECK(d->rope.style == KVRT_ROPE_NORMAL || d->rope.style == KVRT_ROPE_NEOX,
                "rope.style %d is not NORMAL or NEOX", (int)d->rope.style);
    LAYER_CHECK(d->rope.mode == KVRT_ROPE_STORED_ROTATED || d->rope.mode == KVRT_ROPE_IN_ATTENTION,
                "rope.mode %d is not STORED_ROTATED or IN_ATTENTION", (int)d->rope.mode);
    LAYER_CHECK(d->rope.rotate_q == 0 || (d->rope.rotate_q == 1 && d->rope.mode == KVRT_ROPE_IN_ATTENTION),
                "rope.rotate_q %d must be 0, or 1 with rope.mode IN_ATTENTION", d->rope.rotate_q);
    LAYER_CHECK(d->swa_full == 0 || d->swa_full == 1, "swa_full %d must be 0 or 1", d->swa_full);
    LAYER_CHECK(d->validate == 0 || d->validate == 1, "validate %d must be 0 or 1", d->validate);
    LAYER_CHECK(d->n_threads >= 0 && d->n_threads <= 4096, "n_threads %d is out of range [0, 4096]",
                d->n_threads);
    for (int i = 0; i < d->n_layers; i++)
        KVRT_TRY(check_layer(d, i));
    for (int i = 0; i < d->n_layers; i++)
        KVRT_CHECK(kind_takes_dtype(d->layers[i].kind, d->dtype), KVRT_ERR_UNSUPPORTED,
                   "layer %d (%s): dtype %s is not supported for this kind (q8 and fp8_e4m3 "
                   "store ATTN and CROSS layers; %s)",
                   i, kind_name(d->layers[i].kind), kvrt_dtype_name(d->dtype),
                   d->dtype == KVRT_Q8 ? "an MLA row has no int8 form: use fp8_e4m3 or a float dtype"
                                       : "the FlashMLA-style fp8 MLA row is defined in docs/layouts.md "
                                         "but no backend stores it yet");
    return KVRT_OK;
}

/* What rope.n_rot means where no ATTN layer uses it: MLA layers rotate their
 * rope_dim part (with rope_dim in the angle), so a cache of MLA and CROSS
 * layers only takes n_rot 0 or that rope_dim; anything else describes a
 * rotation no layer has. Checked on a whole cache (kvrt_cache_create); a
 * shared handle takes its base's RoPE. */
kvrt_status kvrt_desc_validate_rope_use(const kvrt_cache_desc *d)
{
    int mla = -1;
    for (int i = 0; i < d->n_layers; i++) {
        if (d->layers[i].kind == KVRT_LAYER_ATTN)
            return KVRT_OK;
        if (d->layers[i].kind == KVRT_LAYER_MLA && (mla < 0 || d->rope.n_rot != d->layers[i].rope_dim))
            mla = i;
    }
    if (d->rope.n_rot == 0)
        return KVRT_OK;
    LAYER_CHECK(mla >= 0, "rope.n_rot %d: no layer has positions to rotate (CROSS layers only); "
                "it must be 0", d->rope.n_rot);
    LAYER_CHECK(d->rope.n_rot == d->layers[mla].rope_dim,
                "rope.n_rot %d: without ATTN layers only MLA rows are rotated, over their rope_dim; "
                "layer %d (MLA) has rope_dim %d, so n_rot must be 0 or %d",
                d->rope.n_rot, mla, d->layers[mla].rope_dim, d->layers[mla].rope_dim);
    return KVRT_OK;
}

