/*
 * shared.c: a second handle on a cache (a speculative draft: MTP, EAGLE).
 * It shares the base's block pool, sequences and positions, names the base
 * layers it reads, and adds layers of its own to the base's groups, so every
 * plan and edit through either handle moves, copies and rotates the draft's
 * rows together with the base's.
 */
#include <stdio.h>

#include "internal.h"

kvrt_status kvrt_desc_validate(const kvrt_cache_desc *desc);


#define SAME(field, what)                                                                      \
    KVRT_CHECK(a->field == b->field, KVRT_ERR_INCOMPATIBLE,                                    \
               "kvrt_cache_create_shared: layer %d: " what " %d in the new handle, %d in base "   \
               "layer %d",                                                                     \
               i, (int)a->field, (int)b->field, base_index)

static kvrt_status same_shape(int i, const kvrt_layer_desc *a, const kvrt_layer_desc *b, int base_index)
{
    SAME(kind, "kind");
    SAME(n_kv_heads, "n_kv_heads");
    SAME(head_dim_k, "head_dim_k");
    SAME(head_dim_v, "head_dim_v");
    SAME(window, "window");
    SAME(latent_dim, "latent_dim");
    SAME(rope_dim, "rope_dim");
    KVRT_CHECK(a->rope_theta == b->rope_theta, KVRT_ERR_INCOMPATIBLE,
               "kvrt_cache_create_shared: layer %d: rope_theta %g, base layer %d has %g", i,
               (double)a->rope_theta, base_index, (double)b->rope_theta);
    return KVRT_OK;
}

#define SAME_CACHE(field, fmt, cast)                                                           \
    KVRT_CHECK(desc->field == core->desc.field, KVRT_ERR_INCOMPATIBLE,                         \
               "kvrt_cache_create_shared: " #field " " fmt " in the new handle, " fmt " in the base", \
               (cast)desc->field, (cast)core->desc.field)

/* The group an own layer joins: same kind and window. */
static int find_group(const kvrt_cache *core, const kvrt_layer_desc *l)
{
    for (int j = 0; j < core->n_groups; j++) {
        const kvrt_group *g = &core->groups[j];
        if (kvrt_layers_share_group(&core->layers[g->layers[0]], l))
            return j;
    }
    return -1;
}

/* A core layer index freed by kvrt_shared_release, reused before the core's
 * tables grow; -1 if none. */
static int released_slot(const kvrt_cache *core)
{
    for (int li = core->desc.n_layers; li < core->n_layers_total; li++)
        if (core->layer_group[li] < 0)
            return li;
    return -1;
}

/* Own layers are freed with the last handle that uses them, so that a
 * decoder recreating its draft per request does not grow the cache. An own
 * layer leaves its group's table (uploaded again once the stream is idle);
 * if that upload fails, the layer stays attached, unused, until the core is
 * destroyed: a table naming freed memory would be worse than the bytes. */
void kvrt_shared_release(kvrt_cache *core, kvrt_cache *h)
{
    kvrt_backend_t *be = &core->be;
    int synced = 0;
    for (int i = 0; i < h->desc.n_layers; i++) {
        int li = h->layer_map != NULL ? h->layer_map[i] : -1;
        if (li < core->desc.n_layers || --core->layer_users[li] > 0)
            continue;
        if (!synced) { /* queued work may still read the layer */
            (void)be->ops->sync(be, core->stream);
            synced = 1;
        }
        kvrt_group *g = &core->groups[core->layer_group[li]];
        int at = 0;
        while (at < g->n_layers && g->layers[at] != li)
            at++;
        if (at == g->n_layers)
            continue;
        kvrt_layer_ref ref = g->refs[at];
        memmove(&g->layers[at], &g->layers[at + 1], sizeof(int) * (size_t)(g->n_layers - at - 1));
        memmove(&g->refs[at], &g->refs[at + 1], sizeof(kvrt_layer_ref) * (size_t)(g->n_layers - at - 1));
        g->n_layers--;
        kvrt_status st = be->ops->upload(be, g->refs_device, g->refs,
                                         sizeof(kvrt_layer_ref) * (size_t)g->n_layers, core->stream);
        if (st == KVRT_OK)
            st = be->ops->sync(be, core->stream);
        if (st != KVRT_OK) { /* put it back */
            memmove(&g->layers[at + 1], &g->layers[at], sizeof(int) * (size_t)(g->n_layers - at));
            memmove(&g->refs[at + 1], &g->refs[at], sizeof(kvrt_layer_ref) * (size_t)(g->n_layers - at));
            g->layers[at] = li;
            g->refs[at] = ref;
            g->n_layers++;
            continue;
        }
        g->max_rot_dims = 0;
        for (int k = 0; k < g->n_layers; k++)
            if (g->refs[k].layout.rot_dims > g->max_rot_dims)
                g->max_rot_dims = g->refs[k].layout.rot_dims;
        kvrt_layer_mem *m = &core->mem[li];
        core->bytes_device -= (int64_t)(kvrt_layer_mem_block(m) * (size_t)g->n_blocks);
        kvrt_layer_mem_destroy(core, m);
        memset(m, 0, sizeof *m);
        core->layer_group[li] = -1;
    }
}

static kvrt_status do_cache_create_shared(kvrt_cache *base, const kvrt_cache_desc *desc,
                                          const int *base_layers, kvrt_cache **out)
{
    KVRT_CHECK(out != NULL, KVRT_ERR_INVALID_ARG, "kvrt_cache_create_shared: out is NULL");
    *out = NULL;
    KVRT_TRY(kvrt_check_cache(base, "kvrt_cache_create_shared"));
    KVRT_CHECK(desc != NULL, KVRT_ERR_INVALID_ARG, "kvrt_cache_create_shared: desc is NULL");
    kvrt_cache *core = KVRT_CORE(base);
    KVRT_CHECK(desc->device.backend == KVRT_BACKEND_CPU || desc->device.backend == KVRT_BACKEND_CUDA ||
                   desc->device.backend == KVRT_BACKEND_HIP,
               KVRT_ERR_INVALID_ARG, "kvrt_cache_create_shared: device.backend %d is not CPU, CUDA or HIP",
               (int)desc->device.backend);
    /* another device: refused before anything else (the draft would read
     * and write the base's memory from the wrong device) */
    if (desc->device.backend != core->desc.device.backend ||
        desc->device.ordinal != core->desc.device.ordinal) {
        int first = 0;
        for (int i = 0; base_layers != NULL && i < desc->n_layers; i++)
            if (base_layers[i] >= 0) {
                first = i;
                break;
            }
        return kvrt_set_error(KVRT_ERR_DEVICE_MISMATCH,
                              "kvrt_cache_create_shared: layer %d: the new handle is on %s:%d, "
                              "the base cache on %s:%d; a shared cache must live on its base's "
                              "device",
                              first, kvrt_backend_name(desc->device.backend), desc->device.ordinal,
                              kvrt_backend_name(core->desc.device.backend),
                              core->desc.device.ordinal);
    }
    /* the pool is the base's: its sizes need not be given */
    kvrt_cache_desc d = *desc;
    d.n_blocks = core->desc.n_blocks;
    d.max_blocks = core->desc.max_blocks;
    KVRT_TRY(kvrt_desc_validate(&d));
    SAME_CACHE(dtype, "%d", int);
    SAME_CACHE(block_size, "%d", int);
    SAME_CACHE(max_seqs, "%d", int);
    SAME_CACHE(swa_full, "%d", int);
    SAME_CACHE(rope.n_rot, "%d", int);
    SAME_CACHE(rope.style, "%d", int);
    SAME_CACHE(rope.theta, "%g", double);
    SAME_CACHE(rope.freq_scale, "%g", double);
    SAME_CACHE(rope.mode, "%d", int);
    SAME_CACHE(rope.rotate_q, "%d", int);
    int n_own = 0;
    for (int i = 0; i < d.n_layers; i++) {
        const kvrt_layer_desc *l = &d.layers[i];
        int bl = base_layers != NULL ? base_layers[i] : -1;
        KVRT_CHECK(bl >= -1, KVRT_ERR_INVALID_ARG,
                   "kvrt_cache_create_shared: base_layers[%d] is %d; it must be a layer of the base "
                   "or -1 (a layer of the new handle's own)", i, bl);
        if (bl >= 0) {
            int mapped = bl;
            KVRT_TRY(kvrt_map_layer(base, &mapped, "kvrt_cache_create_shared: base_layers"));
            KVRT_TRY(same_shape(i, l, &core->layers[mapped], bl));
            continue;
        }
        KVRT_CHECK(l->kind != KVRT_LAYER_CROSS, KVRT_ERR_INCOMPATIBLE,
                   "kvrt_cache_create_shared: layer %d: a shared handle's own layers must be ATTN "
                   "or MLA (cross K/V is set per layer on the base)",
                   i);
        KVRT_CHECK(find_group(core, l) >= 0, KVRT_ERR_INCOMPATIBLE,
                   "kvrt_cache_create_shared: layer %d: the base has no %s group with window %d "
                   "to share a page table with",
                   i, kvrt_layer_kind_name(l->kind), l->window);
        n_own++;
    }

    /* allocate everything first */
    kvrt_backend_t *be = &core->be;
    kvrt_cache *h = calloc(1, sizeof *h);
    int *map = malloc(sizeof(int) * (size_t)d.n_layers);
    kvrt_layer_desc *own = malloc(sizeof(kvrt_layer_desc) * (size_t)d.n_layers);
    kvrt_layer_mem *mems = calloc((size_t)(n_own > 0 ? n_own : 1), sizeof(kvrt_layer_mem));
    void **new_refs = calloc((size_t)core->n_groups, sizeof(void *));
    kvrt_status st = KVRT_OK;
    if (!h || !map || !own || !mems || !new_refs)
        st = kvrt_set_error(KVRT_ERR_OUT_OF_MEMORY, "kvrt_cache_create_shared: host allocation");
    else /* desc's layers may be base's own table (kvrt_cache_get_desc), which the
          * reallocations below move: read them from this copy from here on */
        d.layers = memcpy(own, d.layers, sizeof(kvrt_layer_desc) * (size_t)d.n_layers);
    int total = core->n_layers_total + n_own;
    if (st == KVRT_OK) {
        kvrt_layer_desc *layers = realloc(core->layers, sizeof(kvrt_layer_desc) * (size_t)total);
        if (layers != NULL) {
            core->layers = layers;
            core->desc.layers = layers;
        }
        int *lg = realloc(core->layer_group, sizeof(int) * (size_t)total);
        if (lg != NULL)
            core->layer_group = lg;
        kvrt_layer_mem *mem = realloc(core->mem, sizeof(kvrt_layer_mem) * (size_t)total);
        if (mem != NULL)
            core->mem = mem;
        int *users = realloc(core->layer_users, sizeof(int) * (size_t)total);
        if (users != NULL)
            core->layer_users = users;
        if (!layers || !lg || !mem || !users)
            st = kvrt_set_error(KVRT_ERR_OUT_OF_MEMORY, "kvrt_cache_create_shared: host allocation");
    }
    for (int j = 0; st == KVRT_OK && j < core->n_groups; j++) {
        kvrt_group *g = &core->groups[j];
        int *gl = realloc(g->layers, sizeof(int) * (size_t)(g->n_layers + n_own));
        if (gl != NULL)
            g->layers = gl;
        kvrt_layer_ref *refs = realloc(g->refs, sizeof(kvrt_layer_ref) * (size_t)(g->n_layers + n_own));
        if (refs != NULL)
            g->refs = refs;
        if (!gl || !refs)
            st = kvrt_set_error(KVRT_ERR_OUT_OF_MEMORY, "kvrt_cache_create_shared: host allocation");
    }
    /* device memory of the own layers, and the groups' new layer tables */
    int k = 0;
    for (int i = 0; st == KVRT_OK && i < d.n_layers; i++) {
        if (base_layers != NULL && base_layers[i] >= 0)
            continue;
        const kvrt_layer_desc *l = &d.layers[i];
        const kvrt_group *g = &core->groups[find_group(core, l)];
        kvrt_layer_mem *m = &mems[k++];
        kvrt_layout L = kvrt_layout_of(core, l, g);
        st = kvrt_layer_mem_create(core, m, &L, g->n_blocks, g->max_blocks);
    }
    if (st != KVRT_OK) {
        for (int i = 0; mems != NULL && i < n_own; i++)
            kvrt_layer_mem_destroy(core, &mems[i]);
        free(h);
        free(map);
        free(own);
        free(mems);
        free(new_refs);
        return st;
    }

    /* commit: append the own layers to the core and their groups */
    (void)be->ops->sync(be, core->stream); /* old layer tables may be in use */
    k = 0;
    for (int i = 0; i < d.n_layers; i++) {
        if (base_layers != NULL && base_layers[i] >= 0) {
            int mapped = base_layers[i];
            (void)kvrt_map_layer(base, &mapped, "kvrt_cache_create_shared");
            map[i] = mapped;
            if (mapped >= core->desc.n_layers) /* another handle's own layer */
                core->layer_users[mapped]++;
            continue;
        }
        int li = released_slot(core);
        if (li < 0)
            li = core->n_layers_total++;
        core->layer_users[li] = 1;
        int gi = find_group(core, &d.layers[i]);
        kvrt_group *g = &core->groups[gi];
        core->layers[li] = d.layers[i];
        core->layer_group[li] = gi;
        core->mem[li] = mems[k++];
        kvrt_layout L = kvrt_layer_layout(core, li);
        g->layers[g->n_layers] = li;
        g->refs[g->n_layers].layout = L;
        g->refs[g->n_layers].k = core->mem[li].k;
        g->refs[g->n_layers].v = core->mem[li].v;
        g->refs[g->n_layers].k_scale = core->mem[li].k_scale;
        g->refs[g->n_layers].v_scale = core->mem[li].v_scale;
        g->n_layers++;
        if (L.rot_dims > g->max_rot_dims)
            g->max_rot_dims = L.rot_dims;
        core->bytes_device += (int64_t)(kvrt_layer_mem_block(&core->mem[li]) * (size_t)g->n_blocks);
        new_refs[gi] = (void *)1; /* table to re-upload */
        map[i] = li;
    }
    for (int j = 0; j < core->n_groups; j++) {
        if (new_refs[j] == NULL)
            continue;
        kvrt_group *g = &core->groups[j];
        size_t bytes = sizeof(kvrt_layer_ref) * (size_t)g->n_layers;
        void *rd = NULL;
        st = be->ops->region_create(be, bytes, bytes, &rd);
        if (st == KVRT_OK)
            st = be->ops->upload(be, rd, g->refs, bytes, core->stream);
        if (st != KVRT_OK) /* the table stays the old one: the draft's rows would not follow edits */
            break;
        be->ops->region_destroy(be, g->refs_device, g->refs_device_bytes);
        g->refs_device = rd;
        g->refs_device_bytes = bytes;
    }
    free(mems);
    free(new_refs);
    h->desc = d; /* d.layers is own */
    h->desc.layers = own;
    h->layers = own;
    h->layer_map = map;
    h->core = core;
    h->n_layers_total = d.n_layers;
    core->n_handles++;
    if (st != KVRT_OK) {
        kvrt_cache_destroy(h);
        return st;
    }
    core->epoch++;
    *out = h;
    return KVRT_OK;
}

/* ---- public entries: the message of a failure starts with the function ---- */

kvrt_status kvrt_cache_create_shared(kvrt_cache *base, const kvrt_cache_desc *desc,
                                     const int *base_layers, kvrt_cache **out)
{
    KVRT_ENTRY(base, "kvrt_cache_create_shared",
               do_cache_create_shared(base, desc, base_layers, out));
}
