/*
 * ops.c: the step's device work: kvrt_write and kvrt_attention validate
 * their arguments and the batch, then hand one op to the backend.
 */
#include <math.h>

#include "internal.h"
#include "prefix.h"

static kvrt_status check_batch(const kvrt_cache *cache, const kvrt_batch *batch, int layer,
                               const char *fn)
{
    KVRT_TRY(kvrt_check_cache(cache, fn));
    KVRT_CHECK(batch != NULL, KVRT_ERR_INVALID_ARG, "%s: batch is NULL", fn);
    KVRT_CHECK(batch->cache == cache, KVRT_ERR_INVALID_ARG,
               "%s: the batch was created for another cache", fn);
    KVRT_CHECK(batch->n_tokens > 0, KVRT_ERR_INVALID_ARG, "%s: the batch has not been planned", fn);
    KVRT_CHECK(batch->epoch == cache->epoch, KVRT_ERR_INVALID_ARG,
               "%s: the batch is stale (the cache was planned or edited after it); plan again", fn);
    KVRT_CHECK(layer >= 0 && layer < cache->n_layers_total, KVRT_ERR_INVALID_ARG,
               "%s: layer %d is out of range [0, %d)", fn, layer, cache->n_layers_total);
    return KVRT_OK;
}

static const kvrt_layer_ref *layer_ref(const kvrt_cache *cache, int layer)
{
    const kvrt_group *g = &cache->groups[cache->layer_group[layer]];
    for (int i = 0; i < g->n_layers; i++)
        if (g->layers[i] == layer)
            return &g->refs[i];
    return &g->refs[0];
}

static kvrt_status do_write(kvrt_cache *cache, const kvrt_batch *batch, int layer, const void *k,
                            const void *v, kvrt_dtype src_dtype, void *stream)
{
    KVRT_TRY(kvrt_check_cache(cache, "kvrt_write"));
    const int named = layer; /* the caller's index (a shared handle's), for messages */
    KVRT_TRY(kvrt_map_layer(cache, &layer, "kvrt_write"));
    cache = KVRT_CORE(cache);
    KVRT_TRY(check_batch(cache, batch, layer, "kvrt_write"));
    const kvrt_layer_desc *l = &cache->layers[layer];
    KVRT_CHECK(l->kind != KVRT_LAYER_CROSS, KVRT_ERR_INVALID_ARG,
               "kvrt_write: layer %d is a CROSS layer (use kvrt_cross_set)", named);
    KVRT_CHECK(kvrt_dtype_is_plain(src_dtype), KVRT_ERR_INVALID_ARG,
               "kvrt_write: src_dtype %d is not f32, f16 or bf16", (int)src_dtype);
    KVRT_CHECK(k != NULL, KVRT_ERR_INVALID_ARG, "kvrt_write: layer %d: k is NULL", named);
    KVRT_CHECK(l->kind == KVRT_LAYER_MLA || v != NULL, KVRT_ERR_INVALID_ARG,
               "kvrt_write: layer %d: v is NULL", named);
    KVRT_CHECK(l->kind != KVRT_LAYER_MLA || v == NULL, KVRT_ERR_INVALID_ARG,
               "kvrt_write: layer %d (MLA): v must be NULL (V is the first latent_dim values of "
               "each k row)", named);
    KVRT_TRY(kvrt_check_device_ptr(cache, k, "kvrt_write: k"));
    if (l->kind != KVRT_LAYER_MLA)
        KVRT_TRY(kvrt_check_device_ptr(cache, v, "kvrt_write: v"));
    kvrt_write_op op;
    memset(&op, 0, sizeof op);
    op.layer = *layer_ref(cache, layer);
    op.k_src = k;
    op.v_src = l->kind == KVRT_LAYER_MLA ? NULL : v;
    op.src_dtype = (int32_t)src_dtype;
    op.n_rows = batch->n_tokens;
    op.slots = batch->groups[cache->layer_group[layer]].d_slots;
    KVRT_TRY(cache->be.ops->write(&cache->be, &op, stream));
    kvrt_prefix_written(cache, batch, layer);
    return KVRT_OK;
}

static kvrt_status do_attention(kvrt_cache *cache, const kvrt_batch *batch, int layer, const void *q,
                                void *out, const kvrt_attention_params *params, void *stream)
{
    KVRT_TRY(kvrt_check_cache(cache, "kvrt_attention"));
    const int named = layer; /* the caller's index (a shared handle's), for messages */
    KVRT_TRY(kvrt_map_layer(cache, &layer, "kvrt_attention"));
    cache = KVRT_CORE(cache);
    KVRT_TRY(check_batch(cache, batch, layer, "kvrt_attention"));
    KVRT_CHECK(params != NULL, KVRT_ERR_INVALID_ARG, "kvrt_attention: params is NULL");
    KVRT_CHECK(q != NULL && out != NULL, KVRT_ERR_INVALID_ARG, "kvrt_attention: q or out is NULL");
    const kvrt_layer_desc *l = &cache->layers[layer];
    const kvrt_group *g = &cache->groups[cache->layer_group[layer]];
    const kvrt_layer_ref *ref = layer_ref(cache, layer);
    KVRT_CHECK(params->n_q_heads >= 1 && params->n_q_heads <= 4096, KVRT_ERR_INVALID_ARG,
               "kvrt_attention: n_q_heads %d must be in [1, 4096]", params->n_q_heads);
    KVRT_CHECK(params->n_q_heads % ref->layout.n_heads == 0, KVRT_ERR_INVALID_ARG,
               "kvrt_attention: layer %d: n_q_heads %d is not a multiple of n_kv_heads %d", named,
               params->n_q_heads, ref->layout.n_heads);
    KVRT_CHECK(kvrt_dtype_is_plain(params->q_dtype), KVRT_ERR_INVALID_ARG,
               "kvrt_attention: q_dtype %d is not f32, f16 or bf16", (int)params->q_dtype);
    KVRT_CHECK(kvrt_dtype_is_plain(params->out_dtype) &&
                   (params->out_dtype == KVRT_F32 || params->out_dtype == cache->desc.dtype ||
                    kvrt_dtype_is_quantized(cache->desc.dtype)),
               KVRT_ERR_INVALID_ARG, "kvrt_attention: out_dtype %d (%s) must be f32 or the cache's %s",
               (int)params->out_dtype, kvrt_dtype_name(params->out_dtype),
               kvrt_dtype_name(cache->desc.dtype));
    KVRT_CHECK(params->scale >= 0.0f && isfinite(params->scale), KVRT_ERR_INVALID_ARG,
               "kvrt_attention: scale %g must be finite and >= 0", (double)params->scale);
    KVRT_CHECK(params->softcap >= 0.0f && isfinite(params->softcap), KVRT_ERR_INVALID_ARG,
               "kvrt_attention: softcap %g must be finite and >= 0", (double)params->softcap);
    KVRT_TRY(kvrt_check_device_ptr(cache, q, "kvrt_attention: q"));
    KVRT_TRY(kvrt_check_device_ptr(cache, out, "kvrt_attention: out"));
    const kvrt_batch_group *bg = &batch->groups[cache->layer_group[layer]];
    kvrt_attention_op op;
    memset(&op, 0, sizeof op);
    op.layer = *ref;
    op.pos = kvrt_group_is_self(g) ? g->pos_device : NULL;
    op.causal = kvrt_group_is_self(g);
    op.window = l->kind == KVRT_LAYER_ATTN ? l->window : 0;
    op.mla = l->kind == KVRT_LAYER_MLA;
    op.dim_v = l->kind == KVRT_LAYER_MLA ? l->latent_dim : l->head_dim_v;
    op.n_tokens = batch->n_tokens;
    op.n_q_heads = params->n_q_heads;
    op.scale = params->scale > 0.0f ? params->scale : 1.0f / sqrtf((float)ref->layout.dim_k);
    op.softcap = params->softcap;
    op.q_dtype = (int32_t)params->q_dtype;
    op.out_dtype = (int32_t)params->out_dtype;
    op.q = q;
    op.out = out;
    op.tok_seq = batch->d_tok_seq;
    op.tok_pos = batch->d_positions;
    op.page_indptr = bg->d_page_indptr;
    op.page_indices = bg->d_page_indices;
    op.seq_n_slots = bg->d_seq_n_slots;
    op.n_seqs = batch->n_seqs;
    op.max_seq_slots = bg->max_seq_slots;
    op.rope_in_attention = cache->desc.rope.mode == KVRT_ROPE_IN_ATTENTION && kvrt_group_is_self(g);
    op.rotate_q = op.rope_in_attention && cache->desc.rope.rotate_q;
    op.rope.n_rot = cache->desc.rope.n_rot;
    op.rope.style = (int32_t)cache->desc.rope.style;
    op.rope.theta = ref->layout.rope_theta;
    op.rope.freq_scale = cache->desc.rope.freq_scale;
    return cache->be.ops->attention(&cache->be, &op, stream);
}

/* ---- public entries: the message of a failure starts with the function ---- */

kvrt_status kvrt_write(kvrt_cache *cache, const kvrt_batch *batch, int layer, const void *k,
                       const void *v, kvrt_dtype src_dtype, void *stream)
{
    KVRT_ENTRY(cache, "kvrt_write", do_write(cache, batch, layer, k, v, src_dtype, stream));
}

kvrt_status kvrt_attention(kvrt_cache *cache, const kvrt_batch *batch, int layer, const void *q,
                           void *out, const kvrt_attention_params *params, void *stream)
{
    KVRT_ENTRY(cache, "kvrt_attention", do_attention(cache, batch, layer, q, out, params, stream));
}
