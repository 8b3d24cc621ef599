/*
 * gguf.c: GGUF files (versions 2 and 3) of the llama architecture, f32 or
 * f16 tensors, read into the same llama_model (and llama_tokenizer) as a
 * llama2.c checkpoint, so that the decoder does not know which it ran.
 *
 * The file: "GGUF", u32 version, u64 tensor count, u64 key count; the keys
 * (string name, u32 type, value; strings are u64 length + bytes, arrays u32
 * element type + u64 count + elements); per tensor its name, u32 n_dims,
 * u64 dims (innermost first), u32 ggml type and u64 offset; then, from the
 * next multiple of general.alignment (default 32), the tensor data. A
 * tensor of dims [in, out] is row-major [out][in], as llama2.c stores it.
 * llama.cpp's converter permutes Q and K so that RoPE rotates adjacent
 * pairs (KVRT_ROPE_NORMAL), as llama2.c's export does.
 *
 * The file is mapped and walked with a cursor that checks every length,
 * count and offset against the bytes left before using it; nothing is
 * allocated from a value before it is checked against the file (the tensor
 * table: at most one entry per 32 bytes left; the weights: only once every
 * tensor is found, of the shape the config says, inside the file). Each
 * failure names the key or tensor.
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kvrt_layout.h" /* kvrt_f16_to_f32 */
#include "llama.h"

enum {
    GGUF_UINT8, GGUF_INT8, GGUF_UINT16, GGUF_INT16, GGUF_UINT32, GGUF_INT32, GGUF_FLOAT32,
    GGUF_BOOL, GGUF_STRING, GGUF_ARRAY, GGUF_UINT64, GGUF_INT64, GGUF_FLOAT64, GGUF_TYPES
};
/* Bytes of a value of each scalar type (strings and arrays: 0). */
static const uint8_t scalar_bytes[GGUF_TYPES] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

enum { GGML_F32 = 0, GGML_F16 = 1 };
enum { MAX_DIMS = 4, MIN_TENSOR_INFO = 8 + 4 + 8 + 4 + 8 }; /* empty name, one dim */

/* A cursor over the mapped file. */
typedef struct reader {
    const char          *path;
    const unsigned char *data;
    uint64_t             size, at;
} reader;

/* n more bytes are in the file, or a failure naming what was being read. */
static int need(reader *r, uint64_t n, const char *what)
{
    if (n <= r->size - r->at)
        return 0;
    return llama_fail("gguf %s: %s: %llu bytes at offset %llu run past the end of the file "
                      "(%llu bytes)", r->path, what, (unsigned long long)n,
                      (unsigned long long)r->at, (unsigned long long)r->size);
}

static int get(reader *r, void *out, uint64_t n, const char *what)
{
    if (need(r, n, what) != 0)
        return -1;
    memcpy(out, r->data + r->at, n);
    r->at += n;
    return 0;
}

static int get_u32(reader *r, uint32_t *v, const char *what) { return get(r, v, 4, what); }
static int get_u64(reader *r, uint64_t *v, const char *what) { return get(r, v, 8, what); }

/* A string in place: *s its bytes (not NUL-terminated), *len its length. */
static int get_string(reader *r, const char **s, uint64_t *len, const char *what)
{
    if (get_u64(r, len, what) != 0 || need(r, *len, what) != 0)
        return -1;
    *s = (const char *)r->data + r->at;
    r->at += *len;
    return 0;
}

/* A key's value, where it lies in the file. */
typedef struct gguf_value {
    int         found;
    uint32_t    type;
    uint64_t    at;         /* offset of the value (arrays: of the first element) */
    uint32_t    elem_type;  /* arrays */
    uint64_t    count;      /* arrays: elements */
} gguf_value;

/* Skips a value of type (arrays: of elements of elem_type, not arrays). */
static int skip_value(reader *r, uint32_t type, const char *key)
{
    if (type == GGUF_STRING) {
        const char *s;
        uint64_t len;
        return get_string(r, &s, &len, key);
    }
    if (type >= GGUF_TYPES || type == GGUF_ARRAY)
        return llama_fail("gguf %s: key %s: value type %u is not a GGUF type", r->path, key, type);
    return need(r, scalar_bytes[type], key) != 0 ? -1 : (r->at += scalar_bytes[type], 0);
}

static int read_value(reader *r, const char *key, gguf_value *v)
{
    if (get_u32(r, &v->type, key) != 0)
        return -1;
    v->at = r->at;
    if (v->type != GGUF_ARRAY)
        return skip_value(r, v->type, key);
    if (get_u32(r, &v->elem_type, key) != 0 || get_u64(r, &v->count, key) != 0)
        return -1;
    v->at = r->at;
    if (v->elem_type == GGUF_ARRAY || v->elem_type >= GGUF_TYPES)
        return llama_fail("gguf %s: key %s: array of element type %u is not read", r->path, key,
                          v->elem_type);
    if (v->elem_type != GGUF_STRING) {
        uint64_t bytes = scalar_bytes[v->elem_type];
        if (v->count > (r->size - r->at) / bytes)
            return llama_fail("gguf %s: key %s: %llu elements run past the end of the file",
                              r->path, key, (unsigned long long)v->count);
        r->at += v->count * bytes;
        return 0;
    }
    if (v->count > (r->size - r->at) / 8) /* each string has an 8-byte length */
        return llama_fail("gguf %s: key %s: %llu strings run past the end of the file", r->path,
                          key, (unsigned long long)v->count);
    for (uint64_t i = 0; i < v->count; i++)
        if (skip_value(r, GGUF_STRING, key) != 0)
            return -1;
    return 0;
}

/* The keys read; the rest are skipped. */
enum {
    K_ARCH, K_DIM, K_HIDDEN, K_LAYERS, K_HEADS, K_KV_HEADS, K_CONTEXT, K_ROPE_DIMS,
    K_ROPE_BASE, K_NORM_EPS, K_ALIGNMENT, K_TOK_MODEL, K_TOKENS, K_SCORES, N_KEYS
};
static const char *const key_names[N_KEYS] = {
    "general.architecture", "llama.embedding_length", "llama.feed_forward_length",
    "llama.block_count", "llama.attention.head_count", "llama.attention.head_count_kv",
    "llama.context_length", "llama.rope.dimension_count", "llama.rope.freq_base",
    "llama.attention.layer_norm_rms_epsilon", "general.alignment", "tokenizer.ggml.model",
    "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
};

/* An integer key's value, of any integer type, in [lo, hi]. */
static int key_int(const reader *r, const gguf_value *keys, int k, int64_t lo, int64_t hi,
                   int64_t *out)
{
    const gguf_value *v = &keys[k];
    if (!v->found)
        return llama_fail("gguf %s: key %s is missing", r->path, key_names[k]);
    const unsigned char *p = r->data + v->at;
    int64_t x;
    switch (v->type) {
    case GGUF_UINT8: x = p[0]; break;
    case GGUF_INT8: x = (int8_t)p[0]; break;
    case GGUF_UINT16: { uint16_t u; memcpy(&u, p, 2); x = u; break; }
    case GGUF_INT16: { int16_t i; memcpy(&i, p, 2); x = i; break; }
    case GGUF_UINT32: { uint32_t u; memcpy(&u, p, 4); x = u; break; }
    case GGUF_INT32: { int32_t i; memcpy(&i, p, 4); x = i; break; }
    case GGUF_UINT64: {
        uint64_t u;
        memcpy(&u, p, 8);
        x = u > (uint64_t)INT64_MAX ? INT64_MAX : (int64_t)u;
        break;
    }
    case GGUF_INT64: memcpy(&x, p, 8); break;
    default:
        return llama_fail("gguf %s: key %s has value type %u, not an integer", r->path,
                          key_names[k], v->type);
    }
    if (x < lo || x > hi)
        return llama_fail("gguf %s: %s %lld is out of range [%lld, %lld]", r->path, key_names[k],
                          (long long)x, (long long)lo, (long long)hi);
    *out = x;
    return 0;
}

/* A float key (f32 or f64), or dflt when absent. */
static int key_float(const reader *r, const gguf_value *keys, int k, double dflt, double *out)
{
    const gguf_value *v = &keys[k];
    *out = dflt;
    if (!v->found)
        return 0;
    if (v->type == GGUF_FLOAT32) {
        float f;
        memcpy(&f, r->data + v->at, 4);
        *out = f;
    } else if (v->type == GGUF_FLOAT64) {
        memcpy(out, r->data + v->at, 8);
    } else {
        return llama_fail("gguf %s: key %s has value type %u, not a float", r->path,
                          key_names[k], v->type);
    }
    if (!(*out > 0.0 && *out < 1e30))
        return llama_fail("gguf %s: %s %g is not a positive number", r->path, key_names[k], *out);
    return 0;
}

/* A string key equals want (the message says what it is otherwise). */
static int key_string_is(const reader *r, const gguf_value *keys, int k, const char *want)
{
    const gguf_value *v = &keys[k];
    if (!v->found)
        return llama_fail("gguf %s: key %s is missing", r->path, key_names[k]);
    if (v->type != GGUF_STRING)
        return llama_fail("gguf %s: key %s has value type %u, not a string", r->path,
                          key_names[k], v->type);
    uint64_t len;
    memcpy(&len, r->data + v->at, 8);
    const char *s = (const char *)r->data + v->at + 8;
    if (len != strlen(want) || memcmp(s, want, len) != 0)
        return llama_fail("gguf %s: %s is \"%.*s\"; kvrt-llama reads \"%s\"", r->path,
                          key_names[k], len > 64 ? 64 : (int)len, s, want);
    return 0;
}

typedef struct tensor_info {
    const char *name;
    uint64_t    name_len;
    uint32_t    n_dims, type;
    uint64_t    dims[MAX_DIMS];
    uint64_t    offset;     /* from the data section's start */
} tensor_info;

static int compare_tensors(const void *a, const void *b)
{
    const tensor_info *x = a, *y = b;
    uint64_t n = x->name_len < y->name_len ? x->name_len : y->name_len;
    int c = memcmp(x->name, y->name, n);
    return c != 0 ? c : (x->name_len > y->name_len) - (x->name_len < y->name_len);
}

/* What the header and keys say, and the tensor table (sorted by name). */
typedef struct gguf_file {
    reader       r;
    gguf_value   keys[N_KEYS];
    tensor_info *tensors;
    uint64_t     n_tensors, data_start, alignment;
} gguf_file;

static int read_tables(gguf_file *g)
{
    reader *r = &g->r;
    uint32_t magic, version;
    uint64_t n_keys;
    if (get_u32(r, &magic, "magic") != 0 || get_u32(r, &version, "version") != 0 ||
        get_u64(r, &g->n_tensors, "tensor count") != 0 || get_u64(r, &n_keys, "key count") != 0)
        return -1;
    if (memcmp(&magic, "GGUF", 4) != 0)
        return llama_fail("gguf %s: magic is not \"GGUF\"", r->path);
    if (version != 2 && version != 3)
        return llama_fail("gguf %s: version %u; kvrt-llama reads versions 2 and 3", r->path,
                          version);
    /* Each key takes at least 12 bytes (empty name, type), each tensor 32. */
    if (n_keys > (r->size - r->at) / 12)
        return llama_fail("gguf %s: key count %llu is more than the file can hold", r->path,
                          (unsigned long long)n_keys);
    if (g->n_tensors > (r->size - r->at) / MIN_TENSOR_INFO)
        return llama_fail("gguf %s: tensor count %llu is more than the file can hold", r->path,
                          (unsigned long long)g->n_tensors);
    for (uint64_t i = 0; i < n_keys; i++) {
        const char *name;
        uint64_t len;
        char what[64];
        snprintf(what, sizeof what, "key %llu", (unsigned long long)i);
        if (get_string(r, &name, &len, what) != 0)
            return -1;
        char key[256];
        snprintf(key, sizeof key, "%.*s", len > 255 ? 255 : (int)len, name);
        int k = 0;
        while (k < N_KEYS && !(strlen(key_names[k]) == len && memcmp(key_names[k], name, len) == 0))
            k++;
        gguf_value v = {0};
        if (read_value(r, key, &v) != 0)
            return -1;
        if (k < N_KEYS) {
            if (g->keys[k].found)
                return llama_fail("gguf %s: key %s appears twice", r->path, key_names[k]);
            g->keys[k] = v;
            g->keys[k].found = 1;
        }
    }
    int64_t alignment = 32;
    if (g->keys[K_ALIGNMENT].found &&
        key_int(r, g->keys, K_ALIGNMENT, 1, 1 << 16, &alignment) != 0)
        return -1;
    if ((alignment & (alignment - 1)) != 0)
        return llama_fail("gguf %s: general.alignment %lld is not a power of two", r->path,
                          (long long)alignment);
    g->alignment = (uint64_t)alignment;

    g->tensors = calloc(g->n_tensors ? g->n_tensors : 1, sizeof *g->tensors);
    if (!g->tensors)
        return llama_fail("gguf %s: out of memory for %llu tensors", r->path,
                          (unsigned long long)g->n_tensors);
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        tensor_info *t = &g->tensors[i];
        char what[64];
        snprintf(what, sizeof what, "tensor %llu", (unsigned long long)i);
        if (get_string(r, &t->name, &t->name_len, what) != 0 ||
            get_u32(r, &t->n_dims, what) != 0)
            return -1;
        if (t->n_dims < 1 || t->n_dims > MAX_DIMS)
            return llama_fail("gguf %s: tensor %.*s: n_dims %u is out of range [1, %d]", r->path,
                              (int)(t->name_len > 64 ? 64 : t->name_len), t->name, t->n_dims,
                              MAX_DIMS);
        for (uint32_t d = 0; d < t->n_dims; d++)
            if (get_u64(r, &t->dims[d], what) != 0)
                return -1;
        for (uint32_t d = t->n_dims; d < MAX_DIMS; d++)
            t->dims[d] = 1;
        if (get_u32(r, &t->type, what) != 0 || get_u64(r, &t->offset, what) != 0)
            return -1;
    }
    g->data_start = (r->at + g->alignment - 1) / g->alignment * g->alignment;
    if (g->data_start > r->size)
        return llama_fail("gguf %s: the data section's start (offset %llu) is past the end of "
                          "the file", r->path, (unsigned long long)g->data_start);
    qsort(g->tensors, g->n_tensors, sizeof *g->tensors, compare_tensors);
    return 0;
}

/* The tensor named name, or NULL. */
static const tensor_info *find_tensor(const gguf_file *g, const char *name)
{
    tensor_info key = {.name = name, .name_len = strlen(name)};
    return bsearch(&key, g->tensors, g->n_tensors, sizeof *g->tensors, compare_tensors);
}

/* t (named name; NULL: missing) has dims [d0, d1] (d1 == 0: one dim), type
 * f32 or f16, and lies inside the file; else NULL with a message. */
static const tensor_info *check_tensor(const gguf_file *g, const tensor_info *t,
                                       const char *name, uint64_t d0, uint64_t d1)
{
    const char *path = g->r.path;
    if (!t) {
        llama_fail("gguf %s: tensor %s is missing", path, name);
        return NULL;
    }
    uint64_t want[MAX_DIMS] = {d0, d1 ? d1 : 1, 1, 1};
    for (int d = 0; d < MAX_DIMS; d++) {
        if (t->dims[d] != want[d]) {
            llama_fail("gguf %s: tensor %s: dims [%llu, %llu, %llu, %llu], the config says "
                       "[%llu, %llu]", path, name, (unsigned long long)t->dims[0],
                       (unsigned long long)t->dims[1], (unsigned long long)t->dims[2],
                       (unsigned long long)t->dims[3], (unsigned long long)d0,
                       (unsigned long long)want[1]);
            return NULL;
        }
    }
    if (t->type != GGML_F32 && t->type != GGML_F16) {
        llama_fail("gguf %s: tensor %s: ggml type %u; kvrt-llama reads f32 (0) and f16 (1)",
                   path, name, t->type);
        return NULL;
    }
    uint64_t bytes = d0 * want[1] * (t->type == GGML_F32 ? 4 : 2); /* d0, d1 <= 2^22 */
    uint64_t room = g->r.size - g->data_start;
    if (t->offset % g->alignment != 0 || t->offset > room || bytes > room - t->offset) {
        llama_fail("gguf %s: tensor %s: %llu bytes at data offset %llu do not lie inside the "
                   "file's %llu bytes of data (aligned to %llu)", path, name,
                   (unsigned long long)bytes, (unsigned long long)t->offset,
                   (unsigned long long)room, (unsigned long long)g->alignment);
        return NULL;
    }
    return t;
}

/* Copies a tensor found by tensor() into dst as f32. */
static void load_tensor(const gguf_file *g, const tensor_info *t, float *dst)
{
    uint64_t n = t->dims[0] * t->dims[1];
    const unsigned char *src = g->r.data + g->data_start + t->offset;
    if (t->type == GGML_F32) {
        memcpy(dst, src, n * sizeof(float));
        return;
    }
    for (uint64_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, src + 2 * i, 2);
        dst[i] = kvrt_f16_to_f32(h);
    }
}

/* The names of the config's fields in a GGUF file. */
static const char *const config_names[7] = {
    "llama.embedding_length", "llama.feed_forward_length", "llama.block_count",
    "llama.attention.head_count", "llama.attention.head_count_kv",
    "vocab size (token_embd.weight's dims[1])", "llama.context_length",
};

static int read_config(const gguf_file *g, llama_config *c, float *rope_theta)
{
    const reader *r = &g->r;
    int64_t v[7] = {0};
    if (key_string_is(r, g->keys, K_ARCH, "llama") != 0)
        return -1;
    static const int keys[5] = {K_DIM, K_HIDDEN, K_LAYERS, K_HEADS, K_CONTEXT};
    static const int slots[5] = {0, 1, 2, 3, 6};
    for (int i = 0; i < 5; i++)
        if (key_int(r, g->keys, keys[i], 0, INT32_MAX, &v[slots[i]]) != 0)
            return -1;
    v[4] = v[3]; /* no head_count_kv: multi-head attention */
    if (g->keys[K_KV_HEADS].found && key_int(r, g->keys, K_KV_HEADS, 0, INT32_MAX, &v[4]) != 0)
        return -1;
    const tensor_info *emb = find_tensor(g, "token_embd.weight");
    if (!emb)
        return llama_fail("gguf %s: tensor token_embd.weight is missing", r->path);
    v[5] = emb->dims[1] > INT32_MAX ? INT32_MAX : (int64_t)emb->dims[1];
    *c = (llama_config){(int)v[0], (int)v[1], (int)v[2], (int)v[3], (int)v[4], (int)v[5],
                        (int)v[6], 1};
    if (llama_check_config("gguf", r->path, config_names, c) != 0)
        return -1;
    int64_t rope_dims = c->dim / c->n_heads;
    if (g->keys[K_ROPE_DIMS].found &&
        key_int(r, g->keys, K_ROPE_DIMS, rope_dims, rope_dims, &rope_dims) != 0)
        return llama_fail("%s (kvrt-llama rotates whole heads of %d)", llama_error(),
                          c->dim / c->n_heads);
    double base, eps;
    if (key_float(r, g->keys, K_ROPE_BASE, 10000.0, &base) != 0 ||
        key_float(r, g->keys, K_NORM_EPS, 1e-5, &eps) != 0)
        return -1;
    if (eps != (double)1e-5f && eps != 1e-5)
        return llama_fail("gguf %s: llama.attention.layer_norm_rms_epsilon %g; kvrt-llama's "
                          "RMSNorm uses 1e-5", r->path, eps);
    *rope_theta = (float)base;
    return 0;
}

/* Every weight tensor, checked, then converted into one f32 array. */
static int read_weights(const gguf_file *g, llama_model *m)
{
    const llama_config *c = &m->config;
    uint64_t dim = (uint64_t)c->dim, hidden = (uint64_t)c->hidden_dim;
    uint64_t vocab = (uint64_t)c->vocab_size, kv_dim = (uint64_t)m->kv_dim;
    enum { PER_LAYER = 9 };
    static const char *const layer_names[PER_LAYER] = {
        "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate",
        "ffn_down", "ffn_up"};
    const uint64_t shapes[PER_LAYER][2] = {{dim, 0}, {dim, dim}, {dim, kv_dim}, {dim, kv_dim},
                                           {dim, dim}, {dim, 0}, {dim, hidden}, {hidden, dim},
                                           {dim, hidden}};
    const tensor_info *emb = check_tensor(g, find_tensor(g, "token_embd.weight"),
                                          "token_embd.weight", dim, vocab);
    const tensor_info *norm = emb ? check_tensor(g, find_tensor(g, "output_norm.weight"),
                                                 "output_norm.weight", dim, 0) : NULL;
    if (!emb || !norm)
        return -1;
    /* no output.weight: the classifier is the embedding */
    const tensor_info *out = find_tensor(g, "output.weight");
    if (out && !check_tensor(g, out, "output.weight", dim, vocab))
        return -1;
    m->config.shared_classifier = out == NULL;
    const tensor_info **layers = calloc((size_t)c->n_layers * PER_LAYER, sizeof *layers);
    if (!layers)
        return llama_fail("gguf %s: out of memory", g->r.path);
    for (int l = 0; l < c->n_layers; l++) {
        for (int i = 0; i < PER_LAYER; i++) {
            char name[64];
            snprintf(name, sizeof name, "blk.%d.%s.weight", l, layer_names[i]);
            layers[l * PER_LAYER + i] = check_tensor(g, find_tensor(g, name), name,
                                                     shapes[i][0], shapes[i][1]);
            if (!layers[l * PER_LAYER + i]) {
                free(layers);
                return -1;
            }
        }
    }
    /* Every tensor lies inside the file, so this is at most twice its size. */
    uint64_t floats = llama_weight_floats(&m->config, 0);
    m->owned = malloc(floats * sizeof(float));
    if (!m->owned) {
        free(layers);
        return llama_fail("gguf %s: out of memory for %llu weights", g->r.path,
                          (unsigned long long)floats);
    }
    llama_layout_weights(m, m->owned, 0);
    llama_weights *w = &m->w;
    float *const per_layer[PER_LAYER] = {(float *)w->rms_att, (float *)w->wq, (float *)w->wk,
                                         (float *)w->wv, (float *)w->wo, (float *)w->rms_ffn,
                                         (float *)w->w1, (float *)w->w2, (float *)w->w3};
    load_tensor(g, emb, (float *)w->token_embedding);
    load_tensor(g, norm, (float *)w->rms_final);
    if (out)
        load_tensor(g, out, (float *)w->wcls);
    for (int l = 0; l < c->n_layers; l++)
        for (int i = 0; i < PER_LAYER; i++)
            load_tensor(g, layers[l * PER_LAYER + i],
                        per_layer[i] + (uint64_t)l * shapes[i][0] * (shapes[i][1] ? shapes[i][1] : 1));
    free(layers);
    return 0;
}

/* The tokenizer from tokenizer.ggml.tokens and .scores. */
static int read_tokenizer(const gguf_file *g, int vocab_size, llama_tokenizer *tok)
{
    const reader *r = &g->r;
    const gguf_value *tokens = &g->keys[K_TOKENS], *scores = &g->keys[K_SCORES];
    memset(tok, 0, sizeof *tok);
    if (key_string_is(r, g->keys, K_TOK_MODEL, "llama") != 0)
        return -1;
    if (!tokens->found || tokens->type != GGUF_ARRAY || tokens->elem_type != GGUF_STRING)
        return llama_fail("gguf %s: key tokenizer.ggml.tokens is missing or not an array of "
                          "strings", r->path);
    if (!scores->found || scores->type != GGUF_ARRAY || scores->elem_type != GGUF_FLOAT32)
        return llama_fail("gguf %s: key tokenizer.ggml.scores is missing or not an array of "
                          "f32", r->path);
    if (tokens->count != (uint64_t)vocab_size || scores->count != (uint64_t)vocab_size)
        return llama_fail("gguf %s: tokenizer.ggml.tokens has %llu and .scores %llu entries, "
                          "the model's vocab size is %d", r->path,
                          (unsigned long long)tokens->count, (unsigned long long)scores->count,
                          vocab_size);
    /* The strings were walked when the keys were read: they lie inside the
     * file, so their bytes add up to less than its size. */
    tok->vocab_size = vocab_size;
    tok->pieces = malloc((size_t)vocab_size * sizeof *tok->pieces);
    tok->scores = malloc((size_t)vocab_size * sizeof *tok->scores);
    tok->sorted = malloc((size_t)vocab_size * sizeof *tok->sorted);
    tok->text = malloc((size_t)r->size + (size_t)vocab_size);
    if (!tok->pieces || !tok->scores || !tok->sorted || !tok->text) {
        llama_tokenizer_free(tok);
        return llama_fail("gguf %s: out of memory for the tokenizer", r->path);
    }
    memcpy(tok->scores, r->data + scores->at, (size_t)vocab_size * sizeof(float));
    const unsigned char *p = r->data + tokens->at;
    char *text = tok->text;
    int max_len = 1;
    for (int i = 0; i < vocab_size; i++) {
        uint64_t len;
        memcpy(&len, p, 8);
        p += 8;
        tok->pieces[i] = text;
        for (uint64_t b = 0; b < len; b++) { /* SentencePiece's U+2581 is a space */
            if (b + 2 < len && p[b] == 0xE2 && p[b + 1] == 0x96 && p[b + 2] == 0x81) {
                *text++ = ' ';
                b += 2;
            } else {
                *text++ = (char)p[b];
            }
        }
        *text++ = '\0';
        p += len;
        int n = (int)strlen(tok->pieces[i]);
        max_len = n > max_len ? n : max_len;
        tok->sorted[i] = (llama_token_index){tok->pieces[i], i};
        if (!isfinite(tok->scores[i])) {
            llama_tokenizer_free(tok);
            return llama_fail("gguf %s: tokenizer.ggml.scores[%d] is not finite", r->path, i);
        }
    }
    tok->max_token_length = max_len;
    tok->merge = malloc(2 * (size_t)max_len + 2);
    if (!tok->merge) {
        llama_tokenizer_free(tok);
        return llama_fail("gguf %s: out of memory for the tokenizer", r->path);
    }
    llama_tokenizer_index(tok);
    return 0;
}

int llama_is_gguf(const char *path)
{
    char magic[4];
    FILE *f = fopen(path, "rb");
    int yes = f && fread(magic, 4, 1, f) == 1 && memcmp(magic, "GGUF", 4) == 0;
    if (f)
        fclose(f);
    return yes;
}

int llama_gguf_load(const char *path, llama_model *model, llama_tokenizer *tok)
{
    memset(model, 0, sizeof *model);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return llama_fail("gguf %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_size <= 0) {
        close(fd);
        return llama_fail("gguf %s: %s", path, st.st_size <= 0 ? "empty" : strerror(errno));
    }
    void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED)
        return llama_fail("gguf %s: mmap: %s", path, strerror(errno));
    gguf_file g = {.r = {path, map, (uint64_t)st.st_size, 0}};
    int rc = read_tables(&g);
    if (rc == 0)
        rc = read_config(&g, &model->config, &model->rope_theta);
    if (rc == 0) {
        model->head_size = model->config.dim / model->config.n_heads;
        model->kv_dim = model->config.n_kv_heads * model->head_size;
        rc = read_weights(&g, model);
    }
    if (rc == 0 && tok)
        rc = read_tokenizer(&g, model->config.vocab_size, tok);
    free(g.tensors);
    munmap(map, (size_t)st.st_size);
    if (rc != 0) {
        free(model->owned);
        memset(model, 0, sizeof *model);
    }
    return rc;
}
