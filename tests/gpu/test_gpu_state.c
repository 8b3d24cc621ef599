/*
 * test_gpu_state.c: state files move between the device and the CPU
 * backend bit-exactly, both ways.
 *
 * For each cache dtype (f32, f16, bf16): a device cache with an attention
 * layer, a sliding-window layer, an MLA layer and a cross layer holds two
 * sequences (written on the device, then shifted on the device so that
 * re-rotated rows are part of the state) and cross rows. Its state (every
 * sequence) is loaded into a CPU cache of the same block size (the header
 * records it); every row and position of every layer and sequence
 * gathered from the CPU cache equals the device's, and the CPU cache's own
 * state is the same file byte for byte. That file loaded into a fresh
 * device cache of another block size again gathers equal to the CPU cache.
 * Data moves: compared bit-exact.
 *
 * Compiled once per API (KVRT_GPU_CUDA or KVRT_GPU_HIP). Exits 77 without a
 * device.
 */
#include "gpu_compat.h"

#include "gpu_test.h"

#if defined(KVRT_GPU_IS_HIP)
#  define TEST_BACKEND KVRT_BACKEND_HIP
#else
#  define TEST_BACKEND KVRT_BACKEND_CUDA
#endif

enum { N_LAYERS = 4, MAX_SEQS = 3, CROSS_ROWS = 12, MAX_ROWS = 256 };

static const kvrt_layer_desc layers[N_LAYERS] = {
    {KVRT_LAYER_ATTN, 2, 16, 8, 0, 0, 0},
    {KVRT_LAYER_ATTN, 1, 8, 16, 48, 0, 0},
    {KVRT_LAYER_MLA, 0, 0, 0, 0, 32, 16},
    {KVRT_LAYER_CROSS, 2, 8, 16, 0, 0, 0},
};

static size_t k_elems(int l)
{
    return layers[l].kind == KVRT_LAYER_MLA ? (size_t)(layers[l].latent_dim + layers[l].rope_dim)
                                            : (size_t)layers[l].n_kv_heads * layers[l].head_dim_k;
}

static size_t v_elems(int l)
{
    return layers[l].kind == KVRT_LAYER_MLA ? 0 : (size_t)layers[l].n_kv_heads * layers[l].head_dim_v;
}

/* Deterministic input value in [-2, 2]. */
static float value(uint32_t salt, int l, int32_t pos, size_t e)
{
    uint32_t x = salt * 2654435761u ^ (uint32_t)l * 7919u ^ (uint32_t)pos * 104729u ^ (uint32_t)e * 31u;
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    x ^= x >> 15;
    return (float)(x % 4001) / 1000.0f - 2.0f;
}

/* n f32 values of layer l's K (kv 0) or V (kv 1) rows for positions
 * p0.., on the device (or in host memory for the CPU backend). */
static void *rows(int on_device, uint32_t salt, int l, int kv, int32_t p0, int n)
{
    size_t w = kv == 0 ? k_elems(l) : v_elems(l), bytes = (size_t)n * w * sizeof(float);
    float *host = malloc(bytes + 4);
    for (int t = 0; t < n; t++)
        for (size_t e = 0; e < w; e++)
            host[(size_t)t * w + e] = value(salt + (uint32_t)kv, l, p0 + t, e);
    if (!on_device)
        return host;
    void *p = NULL;
    if (cudaMalloc(&p, bytes + 4) != cudaSuccess ||
        cudaMemcpy(p, host, bytes, cudaMemcpyHostToDevice) != cudaSuccess) {
        fprintf(stderr, "rows: device allocation failed\n");
        exit(1);
    }
    free(host);
    return p;
}

static void rows_free(int on_device, void *p)
{
    if (on_device)
        (void)cudaFree(p);
    else
        free(p);
}

static kvrt_cache *make(kvrt_backend backend, kvrt_dtype dtype, int block_size)
{
    kvrt_cache_desc d;
    kvrt_cache_desc_init(&d);
    d.device.backend = backend;
    d.dtype = dtype;
    d.layers = layers;
    d.n_layers = N_LAYERS;
    d.block_size = block_size;
    d.n_blocks = 512 / block_size;
    d.max_seqs = MAX_SEQS;
    d.cross_max_len = CROSS_ROWS;
    d.rope.n_rot = 8;
    d.rope.theta = 10000.0f;
    kvrt_cache *c = NULL;
    kvrt_status st = kvrt_cache_create(&d, &c);
    CHECK(st == KVRT_OK, "kvrt_cache_create (%s, block %d): %s", kvrt_backend_name(backend),
          block_size, kvrt_last_error());
    return st == KVRT_OK ? c : NULL;
}

/* Writes positions p0..p0+n-1 of seq on every self-attention layer. */
static void fill(kvrt_cache *c, int on_device, int32_t seq, int32_t p0, int n, uint32_t salt)
{
    int32_t seqs[MAX_ROWS], pos[MAX_ROWS];
    for (int t = 0; t < n; t++) {
        seqs[t] = seq;
        pos[t] = p0 + t;
    }
    kvrt_batch *b = NULL;
    OK(kvrt_batch_create(c, n, &b));
    kvrt_status st = kvrt_batch_plan(c, n, seqs, pos, b);
    CHECK(st == KVRT_OK, "kvrt_batch_plan: %s", kvrt_last_error());
    for (int l = 0; l < N_LAYERS && st == KVRT_OK; l++) {
        if (layers[l].kind == KVRT_LAYER_CROSS)
            continue;
        void *k = rows(on_device, salt, l, 0, p0, n);
        void *v = v_elems(l) > 0 ? rows(on_device, salt, l, 1, p0, n) : NULL;
        st = kvrt_write(c, b, l, k, v, KVRT_F32, NULL);
        CHECK(st == KVRT_OK, "kvrt_write layer %d: %s", l, kvrt_last_error());
        /* the write is queued: the inputs live until the stream has passed it */
        OK(kvrt_cache_sync(c));
        rows_free(on_device, k);
        if (v != NULL)
            rows_free(on_device, v);
    }
    kvrt_batch_destroy(b);
}

static void fill_cross(kvrt_cache *c, int on_device, int32_t seq, uint32_t salt)
{
    for (int l = 0; l < N_LAYERS; l++) {
        if (layers[l].kind != KVRT_LAYER_CROSS)
            continue;
        void *k = rows(on_device, salt, l, 0, 0, CROSS_ROWS), *v = rows(on_device, salt, l, 1, 0, CROSS_ROWS);
        kvrt_status st = kvrt_cross_set(c, l, seq, CROSS_ROWS, k, v, KVRT_F32, NULL);
        CHECK(st == KVRT_OK, "kvrt_cross_set: %s", kvrt_last_error());
        OK(kvrt_cache_sync(c));
        rows_free(on_device, k);
        rows_free(on_device, v);
    }
}

/* Gathers every layer of every sequence into host memory: n, positions, K, V. */
typedef struct contents {
    int64_t  n[N_LAYERS][MAX_SEQS];
    int32_t  pos[N_LAYERS][MAX_SEQS][MAX_ROWS];
    uint8_t *k[N_LAYERS][MAX_SEQS], *v[N_LAYERS][MAX_SEQS];
    size_t   kb[N_LAYERS], vb[N_LAYERS]; /* bytes per row */
} contents;

static void contents_get(const kvrt_cache *c, kvrt_dtype dtype, contents *out)
{
    memset(out, 0, sizeof *out);
    for (int l = 0; l < N_LAYERS; l++) {
        out->kb[l] = k_elems(l) * kvrt_dtype_size(dtype);
        out->vb[l] = v_elems(l) * kvrt_dtype_size(dtype);
        for (int s = 0; s < MAX_SEQS; s++) {
            out->k[l][s] = calloc(MAX_ROWS, out->kb[l]);
            out->v[l][s] = calloc(MAX_ROWS, out->vb[l] > 0 ? out->vb[l] : 1);
            kvrt_status st = kvrt_gather(c, l, s, 0, -1, out->k[l][s], out->vb[l] > 0 ? out->v[l][s] : NULL,
                                         out->pos[l][s], MAX_ROWS, &out->n[l][s], NULL);
            CHECK(st == KVRT_OK, "kvrt_gather layer %d seq %d: %s", l, s, kvrt_last_error());
        }
    }
}

static void contents_free(contents *c)
{
    for (int l = 0; l < N_LAYERS; l++)
        for (int s = 0; s < MAX_SEQS; s++) {
            free(c->k[l][s]);
            free(c->v[l][s]);
        }
}

static void contents_compare(const contents *a, const contents *b, const char *what)
{
    for (int l = 0; l < N_LAYERS; l++)
        for (int s = 0; s < MAX_SEQS; s++) {
            int64_t n = a->n[l][s];
            CHECK(b->n[l][s] == n, "%s: layer %d seq %d: %lld rows and %lld", what, l, s,
                  (long long)n, (long long)b->n[l][s]);
            if (b->n[l][s] != n)
                continue;
            CHECK(memcmp(a->pos[l][s], b->pos[l][s], (size_t)n * sizeof(int32_t)) == 0,
                  "%s: layer %d seq %d: positions differ", what, l, s);
            CHECK(memcmp(a->k[l][s], b->k[l][s], (size_t)n * a->kb[l]) == 0,
                  "%s: layer %d seq %d: K differs", what, l, s);
            CHECK(memcmp(a->v[l][s], b->v[l][s], (size_t)n * a->vb[l]) == 0,
                  "%s: layer %d seq %d: V differs", what, l, s);
        }
}

typedef struct blob {
    uint8_t *data;
    size_t   size, cap, pos;
} blob;

static kvrt_status blob_writer(void *user, const void *data, size_t n)
{
    blob *b = user;
    if (b->size + n > b->cap) {
        b->cap = (b->size + n) * 2;
        b->data = realloc(b->data, b->cap);
    }
    memcpy(b->data + b->size, data, n);
    b->size += n;
    return KVRT_OK;
}

static kvrt_status blob_reader(void *user, void *data, size_t n, size_t *got)
{
    blob *b = user;
    size_t m = b->size - b->pos < n ? b->size - b->pos : n;
    memcpy(data, b->data + b->pos, m);
    b->pos += m;
    *got = m;
    return KVRT_OK;
}

static void round_trip(kvrt_backend backend, kvrt_dtype dtype)
{
    const int on_device = backend != KVRT_BACKEND_CPU;
    kvrt_cache *dev = make(backend, dtype, 16), *cpu = make(KVRT_BACKEND_CPU, dtype, 16), *back = NULL;
    blob from_dev = {0}, from_cpu = {0};
    contents a, b, c;
    memset(&a, 0, sizeof a), memset(&b, 0, sizeof b), memset(&c, 0, sizeof c);
    if (dev == NULL || cpu == NULL)
        goto done;
    fill(dev, on_device, 0, 0, 150, 11);
    fill(dev, on_device, 1, 0, 40, 23);
    fill_cross(dev, on_device, 0, 31);
    OK(kvrt_seq_shift(dev, 0, 30, -1, 5));  /* re-rotated on the device */
    OK(kvrt_seq_shift(dev, 1, 0, -1, -3));  /* positions below 0 are dropped */
    OK(kvrt_state_write(dev, -1, blob_writer, &from_dev));
    kvrt_status st = kvrt_state_read(cpu, -1, blob_reader, &from_dev);
    CHECK(st == KVRT_OK, "%s: loading the device's state on the CPU: %s", kvrt_dtype_name(dtype),
          kvrt_last_error());
    contents_get(dev, dtype, &a);
    contents_get(cpu, dtype, &b);
    CHECK(a.n[0][0] > 100 && a.n[2][1] > 0 && a.n[3][0] == CROSS_ROWS, "the scenario left too few rows");
    contents_compare(&a, &b, "device, then CPU");
    OK(kvrt_state_write(cpu, -1, blob_writer, &from_cpu));
    CHECK(from_cpu.size == from_dev.size && memcmp(from_cpu.data, from_dev.data, from_dev.size) == 0,
          "%s: the CPU's state differs from the device's (%zu and %zu bytes)", kvrt_dtype_name(dtype),
          from_cpu.size, from_dev.size);
    back = make(backend, dtype, 64);
    if (back == NULL)
        goto done;
    st = kvrt_state_read(back, -1, blob_reader, &from_cpu);
    CHECK(st == KVRT_OK, "%s: loading the CPU's state on the device: %s", kvrt_dtype_name(dtype),
          kvrt_last_error());
    contents_get(back, dtype, &c);
    contents_compare(&b, &c, "CPU, then device");
    st = kvrt_cache_check(back);
    CHECK(st == KVRT_OK, "kvrt_cache_check after loading: %s", kvrt_last_error());
done:
    contents_free(&a);
    contents_free(&b);
    contents_free(&c);
    free(from_dev.data);
    free(from_cpu.data);
    kvrt_cache_destroy(dev);
    kvrt_cache_destroy(cpu);
    kvrt_cache_destroy(back);
}

/* Usage: test_gpu_state [cpu]. "cpu" runs it with the CPU backend in the
 * device's place, which checks the test where there is no device. */
int main(int argc, char **argv)
{
    kvrt_backend backend = argc > 1 && strcmp(argv[1], "cpu") == 0 ? KVRT_BACKEND_CPU : TEST_BACKEND;
    if (kvrt_device_count(backend) == 0) {
        printf("test_gpu_state: no %s device, skipped\n", kvrt_backend_name(backend));
        return GPU_TEST_SKIP;
    }
    const kvrt_dtype dtypes[3] = {KVRT_F32, KVRT_F16, KVRT_BF16};
    for (int i = 0; i < 3; i++)
        round_trip(backend, dtypes[i]);
    return gpu_test_result("test_gpu_state");
}
